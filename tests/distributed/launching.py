"""Helpers shared by the launcher tests: the environment a child launch starts from, and the losses a run logged."""

import json
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]


def launch_env(**extra: str) -> dict[str, str]:
    """This process's environment without a rank's variables (the launcher sets its own), one thread per rank, the
    repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def logged_losses(output_dir: pathlib.Path) -> dict[int, float]:
    """step -> loss from output_dir/metrics.jsonl; a step logged twice (before a crash and after the restart) keeps
    its last value."""
    out: dict[int, float] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if "loss" in event:
            out[event["step"]] = event["loss"]
    return out
