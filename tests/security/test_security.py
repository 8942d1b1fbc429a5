"""Nothing let in, nothing sent out: safe loading, dataset paths, the _target_ allowlist, wandb offline."""

from __future__ import annotations

import ast
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY = ["device=cpu", "max_steps=2", "batch_size=8", "dataset.train_samples=32", "dataset.validation_samples=16",
        "dataset.image_size=16", "model.image_size=16", "eval.batch_size=16", "eval.every_n_steps=100",
        "checkpoint.every_n_steps=100"]


def test_every_torch_load_passes_weights_only_true():
    offenders, seen = [], 0
    for folder in ("mmtrain", "recipes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch"):
                    continue
                seen += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert seen >= 1  # the scan does find the calls that exist
    assert offenders == []


def test_no_plain_pickle_loads_outside_the_restricted_unpickler():
    offenders = []
    for folder in ("mmtrain", "recipes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("load", "loads") and isinstance(node.func.value, ast.Name)
                        and node.func.value.id in ("pickle", "dill", "cloudpickle")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


# ------------------------------------------------------------------------------------------- dataset paths
@pytest.fixture
def folder(tmp_path):
    split = tmp_path / "data" / "train"
    split.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype="uint8")).save(split / f"{i}.png")
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype="uint8")).save(outside)
    return split, outside


def _metadata(split, names):
    import json

    (split / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a caption"}) + "\n"
                                                  for n in names))


@pytest.mark.parametrize("kind", ["dotdot", "etc-passwd", "absolute", "symlink-out"])
def test_file_name_cannot_escape_the_dataset_folder(folder, kind):
    from mmtrain.data.image_folder import image_folder_dataset
    from mmtrain.errors import DataError

    split, outside = folder
    name = {"dotdot": "../../secret.png", "etc-passwd": "../../../../../../etc/passwd",
            "absolute": str(outside), "symlink-out": "link.png"}[kind]
    if kind == "symlink-out":
        (split / "link.png").symlink_to(outside)
    _metadata(split, ["0.png", "1.png", "2.png", name])
    with pytest.raises(DataError, match=r"metadata\.jsonl:4: file_name .* points outside"):
        image_folder_dataset("train", path=str(split.parent), validation_fraction=0.25)


def test_symlink_inside_the_folder_is_fine(folder):
    from mmtrain.data.image_folder import image_folder_dataset

    split, _ = folder
    (split / "alias.png").symlink_to(split / "0.png")
    _metadata(split, ["alias.png", "1.png", "2.png", "3.png"])
    dataset = image_folder_dataset("train", path=str(split.parent), validation_fraction=0.25)
    assert len(dataset) == 3


# --------------------------------------------------------------------------------------- _target_ allowlist
@pytest.fixture
def outside_target(tmp_path, monkeypatch):
    """A module outside the allowlist whose scheduler factory leaves a sentinel file when it runs."""
    sentinel = tmp_path / "factory_ran"
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_schedules.py").write_text(
        "import pathlib, torch\n"
        f"SENTINEL = pathlib.Path({str(sentinel)!r})\n"
        "def constant(optimizer, num_training_steps, **unused):\n"
        "    SENTINEL.touch()\n"
        "    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    yield sentinel
    sys.modules.pop("my_schedules", None)


def test_target_outside_allowlist_refused_then_allowed_with_flag(outside_target, tmp_path, capsys):
    from mmtrain.cli.main import main

    argv = ["run", "contrastive", "--config", "align_tiny", f"output_dir={tmp_path / 'out'}", *TINY,
            "lr_scheduler._target_=my_schedules.constant"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'my_schedules.constant' is not allowed" in err[0] and "--allow-any-target" in err[0]
    assert not outside_target.exists()

    assert main(argv + ["--allow-any-target"]) == 0
    assert outside_target.exists()


# ---------------------------------------------------------------------------------------------- no network
class _FakeRun:
    def __init__(self):
        self.logged = []

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        pass


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(kwargs)
        return _FakeRun()

    module.init = init
    module.run = None
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return calls


@pytest.mark.parametrize("setting, mode", [(True, "offline"), ({"project": "p"}, "offline"),
                                           ({"mode": "online"}, "online")])
def test_wandb_is_offline_unless_configured(fake_wandb, tmp_path, setting, mode):
    from mmtrain.training.metrics import MetricLogger

    logger = MetricLogger(tmp_path, rank=0, total_steps=1, wandb=setting)
    logger.log(1, {"loss": 1.0})
    logger.close(plot=False)
    assert [c["mode"] for c in fake_wandb] == [mode]


def test_wandb_not_used_when_not_configured(fake_wandb, tmp_path):
    from mmtrain.training.metrics import MetricLogger

    logger = MetricLogger(tmp_path, rank=0, total_steps=1, wandb=False)
    logger.log(1, {"loss": 1.0})
    logger.close(plot=False)
    assert fake_wandb == []


def test_builtin_configs_send_nothing_by_default():
    import yaml

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        wandb = ((yaml.safe_load(path.read_text()) or {}).get("log") or {}).get("wandb", False)
        assert wandb in (False, None), path


def test_default_run_opens_no_network_connection(tmp_path, capsys, monkeypatch):
    from mmtrain.cli.main import main

    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    assert main(["run", "contrastive", "--config", "align_tiny", f"output_dir={tmp_path}", *TINY]) == 0
    assert attempts == []
