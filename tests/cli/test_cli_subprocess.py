"""`python -m mmtrain.cli.main` and a recipe file run as a script, in fresh processes (what users type)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_version_and_help(cli):
    from importlib.metadata import version

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mmtrain {version('mmtrain')}"
    result = cli("--help")
    assert result.returncode == 0
    for verb in ("ls", "cp", "print", "validate", "run", "bench"):
        assert f"\n  {verb} " in result.stdout
    result = cli("run", "--help")
    assert result.returncode == 0
    for option in ("--config", "--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint",
                   "--max-restarts", "--allow-any-target"):
        assert option in result.stdout


def test_user_error_is_one_line_without_traceback_unless_debug(cli, toy):
    args = ["print", toy.recipe, "--config", toy.config, toy.out_override, "max_step=3"]
    result = cli(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "key 'max_step' does not exist" in result.stderr
    debug = cli("--debug", *args)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    env_debug = cli(*args, env={"MMTRAIN_DEBUG": "1"})
    assert "Traceback" in env_debug.stderr


def test_recipe_file_runs_as_script(toy):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MMTRAIN_DEBUG", None)
    ok = subprocess.run([sys.executable, str(toy.recipe), "--config", str(toy.config), toy.out_override,
                         "max_steps=1"], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (toy.out / "summary_rank0.json").is_file()


@pytest.mark.slow
def test_nproc_per_node_2_starts_two_ranks_through_torchrun(cli, toy):
    result = cli("run", toy.recipe, "--config", toy.config, toy.out_override, "--nproc-per-node", "2",
                 timeout=300)
    assert result.returncode == 0, result.stderr
    summaries = [json.loads((toy.out / f"summary_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["rank"] for s in summaries] == [0, 1] and all(s["world_size"] == 2 for s in summaries)
    # all_reduce: both ranks hold the same sum of the two ranks' final losses
    assert summaries[0]["loss_sum"] == summaries[1]["loss_sum"]


@pytest.mark.slow
def test_user_error_in_distributed_workers_exits_2(cli, toy):
    result = cli("run", toy.recipe, "--config", toy.config, toy.out_override, "fail_with=bad_shard",
                 "--nproc-per-node", "2", timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert sorted(lines) == ["error: rank 0: bad_shard", "error: rank 1: bad_shard"], result.stderr


def test_config_error_is_reported_once_before_launching(cli, toy):
    result = cli("run", toy.recipe, "--config", toy.config, toy.out_override, "max_step=1", "--nproc-per-node", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "'max_step'" in result.stderr
