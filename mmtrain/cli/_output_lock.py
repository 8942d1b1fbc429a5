"""One run per output folder: ``mmtrain run`` holds an exclusive lock on ``output_dir/.mmtrain.lock`` while it runs.

Two runs writing the same folder delete each other's half-written checkpoints and interleave ``metrics.jsonl``; the
second one now stops at once with a one-line error naming the first. The lock is a POSIX record lock
(``fcntl.lockf``): the kernel releases it when the process ends however it ends (a killed run leaves no stale lock),
and, unlike ``flock``, it belongs to the process, not to the open file, so data-loader workers forked from the run
do not hold it on after a ``kill -9`` of the run. POSIX locks do not exclude the process that holds them, so folders
locked by this process are also remembered here. Where ``fcntl`` is missing (Windows) runs are not locked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from mmtrain.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".mmtrain.lock"
_held_here: set[tuple[int, int]] = set()  # (device, inode) of the lock files this process holds


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike | None) -> Iterator[None]:
    if output_dir is None or fcntl is None or not str(output_dir).strip():
        yield
        return
    folder = Path(output_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # not a folder, not writable: the recipe reports that in one line
        yield
        return
    identity = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    locked = False
    try:
        try:
            if identity in _held_here:
                raise BlockingIOError
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError) and e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"output_dir: {folder} is in use by {holder}; wait for that run to end or choose "
                            "another output_dir") from None
        locked = True
        _held_here.add(identity)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"mmtrain run (process {os.getpid()} on {socket.gethostname()})".encode(), 0)
        yield
    finally:
        if locked:
            _held_here.discard(identity)
        os.close(fd)  # releases the lock
