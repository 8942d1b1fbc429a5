"""Config and override mistakes: each ends with exit status 2 and one stderr line naming the file / key.

Table-driven: (overrides on top of the tiny align_tiny run, texts the error line must contain).
"""

from __future__ import annotations

import pytest

ALIGN_TINY = "configs/contrastive/align_tiny.yaml"

OVERRIDE_CASES = [
    # override syntax and unknown keys
    pytest.param(["a.b=[1,"], ["override 'a.b=[1,'", "cannot parse"], id="override-syntax"),
    pytest.param(["nokey=1"], ["'nokey' does not exist", "+nokey=1"], id="unknown-top-key"),
    pytest.param(["model.hidden_sise=8"], ["model.hidden_sise", "did you mean 'model.hidden_size'"],
                 id="unknown-key-typo"),
    pytest.param(["+model.bogus=1"], ["key 'model.bogus'", "unexpected keyword argument 'bogus'"],
                 id="added-key-not-an-argument"),
    pytest.param(["~nothing_here"], ["'~nothing_here'", "does not exist"], id="delete-missing-key"),
    pytest.param(["eval={batch_sise: 4}"], ["'eval' has no key 'batch_sise'", "did you mean 'eval.batch_size'",
                                            "'++eval={batch_sise: 4}'"], id="dict-override-new-sub-key"),
    pytest.param(["optimizer={lr: 1.0, foo: 2}"], ["'optimizer' has no key 'foo'", "'++optimizer={lr: 1.0, foo: 2}'"],
                 id="dict-override-of-a-group-new-sub-key"),
    pytest.param(["output_dir=/tmp/café"], ["cannot parse", "quote it inside the argument: \"output_dir='/tmp/café'\""],
                 id="unquoted-non-ascii-value"),
    pytest.param(["+seed=1"], ["'seed' already exists"], id="add-existing-key"),
    pytest.param(["+x=${nope}"], ["key 'x'", "interpolation", "nope"], id="interpolation-to-missing-key"),
    # wrong types
    pytest.param(["optimizer.lr=abc"], ["optimizer.lr", "type mismatch", "float"], id="lr-not-a-number"),
    pytest.param(["max_steps=2.5"], ["max_steps", "type mismatch", "int"], id="steps-float"),
    pytest.param(["batch_size=[8]"], ["batch_size", "type mismatch", "list"], id="batch-list"),
    pytest.param(["model=3"], ["'model' is a config group"], id="group-given-a-number"),
    # groups
    pytest.param(["model/attention=bogus"], ["model/attention=bogus", "favor", "nystrom"], id="unknown-attention"),
    pytest.param(["loss=nonexistent"], ["loss=nonexistent", "align", "siglip"], id="unknown-loss-option"),
    # impossible values
    pytest.param(["model/attention=local", "model.attention.window_size=4"], ["local", "window_size=4", "even"],
                 id="even-local-window-without-causal"),
    pytest.param(["model/attention=nystrom", "model.attention.num_landmarks=0"], ["nystrom", "num_landmarks"],
                 id="zero-landmarks"),
    pytest.param(["model/attention=random", "model.attention.r=2.0"], ["random", "r must be"], id="random-r>1"),
    pytest.param(["model.num_attention_heads=3"], ["key 'model'", "not a multiple of num_attention_heads"],
                 id="heads-do-not-divide-width"),
    pytest.param(["model.vocab_size=10"], ["model.vocab_size", "tokenizer has"], id="vocab-smaller-than-tokenizer"),
    pytest.param(["optimizer.lr=-1.0"], ["key 'optimizer'", "Invalid learning rate: -1"], id="negative-lr"),
    pytest.param(["optimizer.betas=[2.0,0.9]"], ["key 'optimizer'", "beta"], id="beta-above-one"),
    pytest.param(["max_steps=-3"], ["max_steps", "positive integer"], id="negative-steps"),
    pytest.param(["max_steps=0"], ["max_steps", "positive integer"], id="zero-steps"),
    pytest.param(["batch_size=0"], ["batch_size"], id="zero-batch"),
    pytest.param(["gradient_accumulation_steps=3"], ["batch_size", "global batch 8", "3 accumulation steps"],
                 id="batch-not-divisible-by-accumulation"),
    pytest.param(["gradient_accumulation_steps=-2"], ["gradient_accumulation_steps", "positive integer"],
                 id="negative-accumulation"),
    pytest.param(["accumulation_mode=sometimes"], ["accumulation_mode", "cached, independent", "sometimes"],
                 id="unknown-accumulation-mode"),
    pytest.param(["lr_scheduler.num_warmup_steps=-5"], ["lr_scheduler.num_warmup_steps"], id="negative-warmup"),
    pytest.param(["checkpoint.every_n_steps=-1"], ["checkpoint.every_n_steps"], id="negative-checkpoint-interval"),
    pytest.param(["tokenizer.max_length=0"], ["tokenizer.max_length"], id="zero-text-length"),
    pytest.param(["dataset.image_size=0"], ["dataset.image_size"], id="zero-image-size"),
    pytest.param(["precision=fp16"], ["precision", "fp16"], id="unknown-precision"),
    pytest.param(["nonfinite.policy=maybe"], ["nonfinite.policy", "maybe"], id="unknown-nonfinite-policy"),
    pytest.param(["nonfinite.max_consecutive=0"], ["nonfinite.max_consecutive"], id="zero-nonfinite-limit"),
    pytest.param(["distributed.strategy=bogus"], ["distributed.strategy", "bogus"], id="unknown-strategy"),
    pytest.param(["device=tpu"], ["device", "tpu"], id="unknown-device"),
    # _target_
    pytest.param(["model._target_=mmtrain.models.align.nope"], ["model._target_", "cannot import"],
                 id="target-does-not-exist"),
    pytest.param(["model._target_=os.system"], ["model._target_", "not allowed", "--allow-any-target"],
                 id="target-outside-allowlist"),
    # checked by the recipe before `run` starts (before: a traceback mid-run, or silently wrong training)
    pytest.param(["clip_grad_norm=-1.0"], ["clip_grad_norm", "number >= 0"], id="negative-clip-norm"),
    pytest.param(["~optimizer"], ["key 'optimizer'", "no _target_"], id="optimizer-group-deleted"),
    pytest.param(["~output_dir"], ["key 'output_dir'", "missing"], id="output-dir-deleted"),
    pytest.param(["seed=${output_dir}"], ["key 'seed'", "must be an integer"], id="seed-interpolated-to-a-path"),
    pytest.param(["num_workers=-1"], ["key 'num_workers'", ">= 0"], id="negative-workers"),
    pytest.param(["device=meta"], ["key 'device'", "'meta'"], id="meta-device"),
    pytest.param(["host_sync=bogus"], ["key 'host_sync'", "bogus"], id="unknown-host-sync"),
    pytest.param(["eval.batch_size=0"], ["key 'eval.batch_size'"], id="zero-eval-batch"),
    # checkpoint-related settings
    pytest.param(["resume=/nonexistent/run"], ["key 'resume'", "/nonexistent/run", "no such checkpoint"],
                 id="resume-path-missing"),
]


@pytest.mark.parametrize("overrides, expected", OVERRIDE_CASES)
def test_override_mistake_is_one_line(contrastive, one_line, overrides, expected):
    one_line(contrastive(*overrides), *expected)


def test_output_dir_that_is_a_file(contrastive, one_line, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    one_line(contrastive(f"output_dir={blocker}"), "output_dir", "not a folder")
    assert blocker.read_text() == "not a folder"


YAML_CASES = [
    pytest.param("max_steps: [1, 2\nseed: 0\n", [":2:", "YAML syntax error"], id="yaml-syntax"),
    pytest.param("model:\n  a: 1\n   b: 2\n", ["bad.yaml:", "YAML syntax error"], id="yaml-indentation"),
    pytest.param("- just\n- a list\n", ["bad.yaml", "mapping"], id="yaml-top-level-list"),
    pytest.param("", ["bad.yaml", "empty"], id="yaml-empty-file"),
    pytest.param("defaults:\n  - /model: no_such_model\n  - _self_\n", ["no config 'no_such_model'", "align_tiny"],
                 id="yaml-unknown-default"),
    pytest.param(b"max_steps: 1\nnote: \xff\xfe\n", ["bad.yaml", "not UTF-8 text"], id="yaml-not-utf8"),
    pytest.param("defaults:\n  - bad\n  - _self_\nmax_steps: 1\n", ["bad.yaml", "in a cycle"],
                 id="yaml-defaults-list-itself"),
]


@pytest.mark.parametrize("text, expected", YAML_CASES)
def test_broken_config_file_is_one_line(contrastive, one_line, tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line(contrastive(config=path, base=[]), *expected)


def test_config_file_not_found(contrastive, one_line, tmp_path):
    one_line(contrastive(config=tmp_path / "missing.yaml", base=[]), "missing.yaml", "not found")


def test_unknown_recipe_and_config_names(cli, one_line):
    one_line(cli(["run", "contrastiv", "--config", "align_tiny"]), "unknown recipe 'contrastiv'",
                          "did you mean 'contrastive'")
    one_line(cli(["run", "contrastive", "--config", "align_tiyn"]), "unknown config 'align_tiyn'",
                          "align_tiny")


def test_validate_reports_every_problem_each_on_one_line(contrastive):
    result = contrastive("optimizer.lr=-1.0", "max_steps=0", "nonfinite.policy=maybe", verb="validate")
    assert result.status == 2 and "Traceback" not in result.err
    errors = [line for line in result.lines if line.startswith("error: ")]
    assert len(errors) == 3, result.err
    assert any("key 'optimizer'" in e for e in errors)
    assert any("key 'max_steps'" in e for e in errors)
    assert any("key 'nonfinite.policy'" in e for e in errors)
    assert result.lines[-1] == f"{ALIGN_TINY}: 3 problem(s) found"


# ------------------------------------------------------------------------- fusion model (vlm_finetune) configs
VLM_CASES = [
    pytest.param(["model.patch_size=5", "dataset.patch_size=5"], ["model.patch_size", "does not divide", "32"],
                 id="patch-size-does-not-divide-tile"),
    pytest.param(["model.patch_size=16"], ["dataset.patch_size", "model.patch_size 16"], id="patch-size-mismatch"),
    pytest.param(["dataset.image_size=64"], ["dataset.image_size", "model.image_size 32"], id="tile-size-mismatch"),
    pytest.param(["tokenizer.image_token_id=500"], ["tokenizer.image_token_id", "500"], id="image-token-id-out-of-range"),
    pytest.param(["model.num_heads=3"], ["key 'model'"], id="vlm-heads-do-not-divide-width"),
    pytest.param(["fused_qkv=always"], ["fused_qkv", "auto, true or false", "always"], id="vlm-fused-qkv-value"),
    pytest.param(["clip_grad_norm=-0.5"], ["clip_grad_norm", "number >= 0"], id="vlm-negative-clip-norm"),
    pytest.param(["~output_dir"], ["key 'output_dir'", "missing"], id="vlm-output-dir-deleted"),
]


@pytest.mark.parametrize("overrides, expected", VLM_CASES)
def test_vlm_config_mistake_is_one_line(cli, one_line, tiny, tmp_path, overrides, expected):
    argv = ["run", "vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={tmp_path}", *tiny.vlm,
            *overrides]
    one_line(cli(argv), *expected)


def test_resume_from_a_runs_output_dir_and_refit_hint(contrastive, cli, one_line, tiny, tmp_path):
    """resume= accepts a run's output_dir (its checkpoints/ folder is searched); a checkpoint that resume=auto
    picked up but that does not fit says how to start afresh."""
    first = contrastive("checkpoint.every_n_steps=1")
    assert first.status == 0, first.err
    second = cli(["run", "contrastive", "--config", "align_tiny", f"output_dir={tmp_path / 'second'}",
                  *tiny.contrastive, "max_steps=3", f"resume={contrastive.out}"])
    assert second.status == 0, second.err
    assert f"resumed from {contrastive.out / 'checkpoints' / 'step_00000002'}" in second.out
    refit = contrastive("model.hidden_size=24", "max_steps=3")
    one_line(refit, "does not fit the model", "resume=auto picked up this earlier run", "resume=none")


def test_a_second_run_into_a_folder_in_use_is_one_line(contrastive, one_line):
    """Two runs in one output_dir would delete each other's half-written checkpoints; the second one stops."""
    from mmtrain.cli._output_lock import output_dir_lock

    with output_dir_lock(contrastive.out):
        one_line(contrastive(), "output_dir", "is in use by mmtrain run (process", "choose another output_dir")
    finished = contrastive()  # the lock went with the first holder
    assert finished.status == 0, finished.err


GENERATE_CASES = [
    pytest.param(["checkpoint=null", "max_new_tokens=500"], ["max_new_tokens", "max_seq_len"],
                 id="generate-past-max-seq-len"),
    pytest.param(["max_new_tokens=-1"], ["max_new_tokens", "positive integer"], id="generate-negative-tokens"),
    pytest.param(["temperature=-1.0"], ["temperature", ">= 0"], id="generate-negative-temperature"),
    pytest.param(["top_k=0"], ["top_k", "positive integer or null"], id="generate-zero-top-k"),
    pytest.param(["checkpoint=null", "image=shapes:validation:-5"], ["image=shapes:validation:-5", "INDEX must be >= 0"],
                 id="generate-negative-scene-index"),
    pytest.param(["device=bogus"], ["key 'device'", "bogus"], id="generate-unknown-device"),
    pytest.param(["checkpoint=/nonexistent/run"], ["checkpoint=/nonexistent/run", "no such folder"],
                 id="generate-missing-checkpoint"),
]


@pytest.mark.parametrize("overrides, expected", GENERATE_CASES)
def test_generate_mistake_is_one_line(cli, one_line, overrides, expected):
    argv = ["run", "vlm_generate", "--config", "llama3_2_vision_tiny", "device=cpu", "image=shapes:validation:0",
            "prompt=what colour is the circle?", *overrides]
    one_line(cli(argv), *expected)


@pytest.mark.parametrize("option, expected", [
    (["--nproc-per-node", "0"], "--nproc-per-node: expected an integer >= 1, got 0"),
    (["--nproc-per-node", "abc"], "--nproc-per-node: expected an integer >= 1, got 'abc'"),
    (["--nnodes", "2:1"], "--nnodes: MIN:MAX with MIN <= MAX"),
    (["--max-restarts", "-1"], "--max-restarts: expected an integer >= 0, got -1"),
    (["--rdzv-backend", "bogus"], "--rdzv-backend: invalid choice: 'bogus'"),
    (["--rdzv-endpoint", "h:99999"], "--rdzv-endpoint: expected HOST:PORT"),
], ids=["nproc-zero", "nproc-word", "nnodes-reversed", "negative-restarts", "rdzv-backend", "rdzv-port"])
def test_launcher_options_are_checked_before_anything_starts(cli, option, expected):
    result = cli(["run", "contrastive", "--config", "align_tiny", *option])
    assert result.status == 2 and "Traceback" not in result.err
    assert expected in result.err, result.err


def test_debug_environment_variable_off_means_off(monkeypatch):
    from mmtrain.config._entry import debug_requested

    for value in ("off", "0", "false", "no", ""):
        monkeypatch.setenv("MMTRAIN_DEBUG", value)
        assert not debug_requested(False), value
    monkeypatch.setenv("MMTRAIN_DEBUG", "1")
    assert debug_requested(False)


@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT not"),
    ({"RANK": "1"}, "RANK=1 is outside WORLD_SIZE=1"),
], ids=["stray-world-size", "stray-rank"])
def test_stray_launcher_environment_is_one_line(contrastive, one_line, monkeypatch, env, expected):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    one_line(contrastive(), expected, "--nproc-per-node")


def test_validate_reports_a_missing_data_folder_and_resume_path(cli, tmp_path):
    """`validate` said ok for both; `run` failed later."""
    result = cli(["validate", "contrastive", "--config", "align_tiny", "dataset=image_folder",
                  f"dataset.path={tmp_path / 'nowhere'}", f"resume={tmp_path / 'no_run'}"])
    assert result.status == 2 and "Traceback" not in result.err
    assert any("dataset.path" in line and "does not exist" in line for line in result.lines), result.err
    assert any("key 'resume'" in line and "no such checkpoint folder" in line for line in result.lines), result.err


def test_zero_intervals_mean_never_for_run_and_validate(contrastive):
    """eval/checkpoint.every_n_steps 0 means never (as the recipe documents); run's validate step agreed with
    the recipe only for null."""
    assert contrastive("eval.every_n_steps=0", "checkpoint.every_n_steps=0", verb="validate").status == 0
    result = contrastive("eval.every_n_steps=0", "checkpoint.every_n_steps=0")
    assert result.status == 0, result.err
    assert not (contrastive.out / "checkpoints").exists() or not any((contrastive.out / "checkpoints").iterdir())
