"""A rank process ends through ``exit_with``: exit handlers and buffered output survive the os._exit shortcut."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    from mmtrain.config._entry import exit_with
    atexit.register(lambda: print("exit handler ran"))
    def body():
        sys.stdout.write("buffered, no newline")
        return {outcome}
    exit_with(body)
    """
)


def run_rank(outcome: str, world_size: str = "2") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(outcome=outcome)], capture_output=True, text=True,
                          env={"WORLD_SIZE": world_size, "PATH": ""}, timeout=60, check=False)


@pytest.mark.parametrize("outcome, code", [("3", 3), ("None", 0), ("sys.exit(4)", 4)])
def test_rank_process_keeps_exit_status_output_and_exit_handlers(outcome, code):
    result = run_rank(outcome)
    assert result.returncode == code, result.stderr
    assert result.stdout == "buffered, no newlineexit handler ran\n"


def test_bug_in_rank_process_prints_traceback_and_exits_1():
    result = run_rank("1 / 0")
    assert result.returncode == 1
    assert "ZeroDivisionError" in result.stderr and "Traceback" in result.stderr
    assert result.stdout.endswith("exit handler ran\n")


def test_single_process_exits_as_sys_exit_does():
    result = run_rank("5", world_size="1")
    assert result.returncode == 5 and result.stdout == "buffered, no newlineexit handler ran\n"
