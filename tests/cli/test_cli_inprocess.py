"""`mmtrain` verbs called in-process (mmtrain.cli.main.main(argv) -> exit status), one test per error case.

Every user mistake: exit status 2, exactly one line on stderr starting with ``error:``, naming the file/key.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from mmtrain.cli.main import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _toy_args(toy, *overrides, verb="print"):
    return [verb, str(toy.recipe), "--config", str(toy.config), toy.out_override, *overrides]


# ------------------------------------------------------------------------------------------ working verbs


def test_print_resolved_yaml(toy, capsys):
    assert main(_toy_args(toy, "model.out_features=5", "+note=${max_steps}")) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["out_features"] == 5 and printed["note"] == 2
    assert printed["output_dir"] == str(toy.out)


def test_overrides_may_come_before_and_after_options(toy, capsys):
    args = ["print", str(toy.recipe), "seed=3", "--config", str(toy.config), toy.out_override, "max_steps=4"]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["seed"], printed["max_steps"]) == (3, 4)


def test_run_in_process(toy, capsys):
    assert main(_toy_args(toy, "max_steps=3", verb="run")) == 0
    summary = json.loads((toy.out / "summary_rank0.json").read_text())
    assert summary == {"rank": 0, "world_size": 1, "steps": 3, "loss_sum": pytest.approx(summary["loss_sum"])}


def test_validate_ok(toy, capsys):
    assert main(_toy_args(toy, verb="validate")) == 0
    out = capsys.readouterr().out
    assert "model: torch.nn.Linear: 10 parameters" in out and "toy: 2 steps" in out and out.rstrip().endswith("ok")


def test_validate_reports_every_problem(toy, capsys):
    status = main(_toy_args(toy, "+model.bogus=1", "optimizer.lr=-1", "max_steps=0", verb="validate"))
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "Traceback" not in "".join(err)
    assert "key 'model.bogus'" in err[0] and "key 'optimizer'" in err[1] and "key 'max_steps'" in err[2]
    assert err[3].endswith("3 problem(s) found")


def test_ls_lists_recipes_descriptions_and_configs(builtin_tree, capsys):
    (builtin_tree.configs / "toy" / "small.yaml").write_text("output_dir: x\n")
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "toy  Toy recipe for CLI tests: fits a linear layer to random data for a few steps." in out
    assert "configs: small, toy" in out
    assert "model: toy_attn, toy_linear" in out and "model/attention: local, plain" in out


def test_cp_config_then_use_it(builtin_tree, tmp_path, capsys):
    assert main(["cp", "toy", str(tmp_path)]) == 2  # 'toy' names both the recipe and its config
    line = _error_line(capsys)
    assert "'toy' is ambiguous: toy.py (recipe), toy/toy" in line and "RECIPE/NAME" in line
    assert list(tmp_path.iterdir()) == [builtin_tree.root]
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "toy/toy", str(dest)]) == 0
    assert dest.read_text() == (builtin_tree.configs / "toy" / "toy.yaml").read_text()
    assert main(["print", "toy", "--config", str(dest), f"output_dir={tmp_path}"]) == 0
    assert "toy_linear" not in capsys.readouterr().out  # composed: the default became the model's keys


def test_cp_recipe_and_unique_config_name(builtin_tree, tmp_path, capsys):
    (builtin_tree.configs / "toy" / "small.yaml").write_text("output_dir: x\n")
    assert main(["cp", "small", str(tmp_path)]) == 0
    assert (tmp_path / "small.yaml").is_file()
    (builtin_tree.configs / "toy" / "toy.yaml").rename(builtin_tree.configs / "toy" / "base.yaml")
    assert main(["cp", "toy", str(tmp_path / "my_recipe.py")]) == 0
    assert (tmp_path / "my_recipe.py").read_text() == (builtin_tree.recipes / "toy.py").read_text()


def test_a_copied_recipe_keeps_its_originals_configs_by_name(builtin_tree, tmp_path, capsys):
    # The README: `mmtrain cp contrastive my_recipe.py`, then `mmtrain run ./my_recipe.py --config align_tiny`.
    (tmp_path / "my_recipe.py").write_text((builtin_tree.recipes / "toy.py").read_text())  # what cp writes
    out = tmp_path / "out"
    assert main(["print", str(tmp_path / "my_recipe.py"), "--config", "toy", f"output_dir={out}"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == str(out)
    # A name two recipes share is ambiguous: the error names both.
    (builtin_tree.recipes / "other.py").write_text((builtin_tree.recipes / "toy.py").read_text())
    (builtin_tree.configs / "other").mkdir()
    shutil.copy(builtin_tree.configs / "toy" / "toy.yaml", builtin_tree.configs / "other" / "toy.yaml")
    assert main(["print", str(tmp_path / "my_recipe.py"), "--config", "toy"]) == 2
    assert "it is a config of other, toy: give its path" in _error_line(capsys)


def test_bench_lists_modules_on_unknown_name(capsys):
    assert main(["bench", "definitely_not_a_benchmark"]) == 2
    line = _error_line(capsys)
    assert "unknown benchmark 'definitely_not_a_benchmark'" in line and "available:" in line


def test_bench_dispatches_to_module_main(monkeypatch, tmp_path, capsys):
    import mmtrain.bench

    (tmp_path / "toy_bench.py").write_text("def main(argv):\n    print('toy bench', argv)\n    return 3\n")
    monkeypatch.setattr(mmtrain.bench, "__path__", [*mmtrain.bench.__path__, str(tmp_path)])
    assert main(["bench", "toy_bench", "--size", "4"]) == 3
    assert "toy bench ['--size', '4']" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ error cases


def test_yaml_syntax_error(toy, capsys):
    toy.config.write_text("seed: 0\nmax_steps: [1, 2\n")
    assert main(_toy_args(toy)) == 2
    line = _error_line(capsys)
    assert "toy.yaml:" in line and "line 3" in line


def test_empty_yaml(toy, capsys):
    toy.config.write_text("")
    assert main(_toy_args(toy)) == 2
    assert "toy.yaml: the config file is empty" in _error_line(capsys)


def test_non_mapping_yaml(toy, capsys):
    toy.config.write_text("- a\n- b\n")
    assert main(_toy_args(toy)) == 2
    assert "toy.yaml: expected a mapping" in _error_line(capsys)


def test_unknown_config_name(builtin_tree, capsys):
    assert main(["print", "toy", "--config", "tyo"]) == 2
    line = _error_line(capsys)
    assert "unknown config 'tyo'" in line and "did you mean 'toy'" in line


def test_unknown_recipe(builtin_tree, capsys):
    assert main(["run", "tyo", "--config", "toy"]) == 2
    line = _error_line(capsys)
    assert "unknown recipe 'tyo'" in line and "did you mean 'toy'" in line


def test_missing_config_file(toy, capsys):
    assert main(["print", str(toy.recipe), "--config", str(toy.root / "gone.yaml")]) == 2
    assert "gone.yaml: config file not found" in _error_line(capsys)


def test_missing_recipe_file(toy, capsys):
    assert main(["run", str(toy.root / "gone.py"), "--config", str(toy.config)]) == 2
    assert "gone.py: recipe file not found" in _error_line(capsys)


def test_override_of_missing_key(toy, capsys):
    assert main(_toy_args(toy, "max_step=3")) == 2
    line = _error_line(capsys)
    assert "key 'max_step' does not exist" in line and "did you mean 'max_steps'" in line and "'+max_step=3'" in line


def test_type_mismatch(toy, capsys):
    assert main(_toy_args(toy, "max_steps=many")) == 2
    assert "type mismatch at key 'max_steps'" in _error_line(capsys)


def test_unset_required_value(toy, capsys):
    assert main(["print", str(toy.recipe), "--config", str(toy.config)]) == 2
    line = _error_line(capsys)
    assert "'output_dir'" in line and "???" in line


def test_target_not_importable(toy, capsys):
    assert main(_toy_args(toy, "loss._target_=torch.nn.MSELos", verb="run")) == 2
    line = _error_line(capsys)
    assert "key 'loss._target_'" in line and "did you mean 'MSELoss'" in line


def test_target_not_allowed(toy, capsys):
    assert main(_toy_args(toy, "loss._target_=collections.OrderedDict", verb="run")) == 2
    line = _error_line(capsys)
    assert "key 'loss._target_'" in line and "--allow-any-target" in line
    # trusted: OrderedDict() is not a loss, so the toy recipe fails further on with a real bug (TypeError)
    with pytest.raises(TypeError):
        main(_toy_args(toy, "loss._target_=collections.OrderedDict", "--allow-any-target", verb="run"))


def test_target_bad_argument(toy, capsys):
    assert main(_toy_args(toy, "+optimizer.momentumm=0.9", verb="run")) == 2
    line = _error_line(capsys)
    assert "key 'optimizer.momentumm'" in line and "did you mean 'momentum'" in line and "SGD(params, lr=" in line


def test_user_error_raised_by_recipe(toy, capsys):
    assert main(_toy_args(toy, "fail_with=no_such_folder", verb="run")) == 2
    assert _error_line(capsys) == "error: rank 0: no_such_folder"


def test_debug_reraises(toy):
    from mmtrain.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", *_toy_args(toy, "max_step=3")])
    with pytest.raises(ConfigError):
        main([*_toy_args(toy, "max_step=3"), "--debug"])


def test_recipe_entry_argument_handling(toy, capsys):
    from mmtrain.config import run_recipe_main

    seen = []
    assert run_recipe_main(seen.append, toy.recipe, ["--config", str(toy.config), toy.out_override, "seed=5"]) == 0
    assert seen[0].seed == 5
    assert run_recipe_main(seen.append, toy.recipe, ["seed=x", "--config", str(toy.config), toy.out_override]) == 2
    assert "type mismatch at key 'seed'" in _error_line(capsys)


def test_cp_refuses_to_overwrite(builtin_tree, tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    dest.write_text("mine: 1\n")
    assert main(["cp", "toy/toy", str(dest)]) == 2
    assert "already exists; pass --force" in _error_line(capsys)
    assert main(["cp", "toy/toy", str(dest), "--force"]) == 0
    assert dest.read_text() == (builtin_tree.configs / "toy" / "toy.yaml").read_text()


# ------------------------------------------------------------------------------ the real built-in tree


def test_ls_and_cp_on_the_installed_tree(tmp_path, capsys):
    from mmtrain.config import builtin_configs_dir, builtin_recipes_dir

    recipes = sorted(p.stem for p in builtin_recipes_dir().glob("*.py") if not p.name.startswith("_"))
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in recipes)
    align_tiny = builtin_configs_dir() / "contrastive" / "align_tiny.yaml"
    if align_tiny.is_file():  # written by the contrastive recipe's engineer
        assert main(["cp", "contrastive/align_tiny", str(tmp_path)]) == 0
        assert (tmp_path / "align_tiny.yaml").read_bytes() == align_tiny.read_bytes()
