"""output_dir_lock: one run per folder, and a killed run's forked workers do not keep the folder locked."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mmtrain.cli._output_lock import output_dir_lock
from mmtrain.errors import UserError

HOLDER = textwrap.dedent("""
    import os, sys, time
    from mmtrain.cli._output_lock import output_dir_lock
    with output_dir_lock(sys.argv[1]):
        child = os.fork()
        if child == 0:  # a data-loader worker stand-in: it outlives the run for a while
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
""")


def test_the_same_folder_twice_in_one_process_is_refused(tmp_path):
    with output_dir_lock(tmp_path):
        with pytest.raises(UserError, match=f"in use by mmtrain run \\(process {os.getpid()} "):
            with output_dir_lock(tmp_path):
                pass
    with output_dir_lock(tmp_path):  # released on exit
        pass


def test_a_killed_run_leaves_the_folder_free_while_its_forked_workers_live(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(UserError, match=f"process {holder.pid} "):
            with output_dir_lock(tmp_path):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(worker, 0)  # the worker is still alive
        with output_dir_lock(tmp_path):
            pass
    finally:
        holder.kill()
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass
