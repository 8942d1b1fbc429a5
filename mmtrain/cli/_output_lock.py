"""One run per output folder: ``mmtrain run`` holds an exclusive lock on ``output_dir/.mmtrain.lock`` while it runs.

Two runs writing the same folder delete each other's half-written checkpoints and interleave ``metrics.jsonl``; the
second one now stops at once with a one-line error naming the first. The lock is ``flock``-based, so the kernel
releases it when the process ends however it ends (a killed run leaves no stale lock). Where ``fcntl`` is missing
(Windows) runs are not locked.
"""

from __future__ import annotations

import contextlib
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
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"output_dir: {folder} is in use by {holder}; wait for that run to end or choose "
                            "another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"mmtrain run (process {os.getpid()} on {socket.gethostname()})".encode(), 0)
        yield
    finally:
        os.close(fd)
