"""vlm_finetune / vlm_generate end to end on the tiny config (CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["dataset.train_samples=64", "dataset.validation_samples=8", "batch_size=8", "eval.every_n_steps=0",
        "log.progress_bar=false", "log.every_n_steps=1"]


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmtrain.cli.main", "run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_vlm_finetune_few_steps_then_generate(tmp_path) -> None:
    out = tmp_path / "run"
    result = _run(["vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={out}", "max_steps=3",
                   "checkpoint.every_n_steps=2", *TINY])
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    accs = [r["val/answer_acc"] for r in records if "val/answer_acc" in r]
    assert len(accs) == 1 and 0.0 <= accs[0] <= 1.0
    assert "summary: 3 steps" in result.stdout
    assert (out / "checkpoints" / "step_00000003").is_dir()
    # The exported weights load, key for key, into a fresh model built from the exported config.
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from mmtrain.config import instantiate

    exported = load_file(out / "model" / "model.safetensors")
    fresh = instantiate(OmegaConf.load(out / "model" / "config.yaml").model)
    fresh.load_state_dict(exported, strict=True)
    assert "decoder.tok_embeddings.weight" in exported  # torchtune's key names

    gen = _run(["vlm_generate", "--config", "llama3_2_vision_tiny", f"checkpoint={out}",
                "image=shapes:validation:1", "prompt=what colour is the circle?"])
    assert gen.returncode == 0, gen.stderr[-2000:]
    answer = gen.stdout.strip().splitlines()[0]
    assert all(word.isalpha() for word in answer.split())  # decoded words, no special tokens
    # The export answers as the checkpoint it was written from.
    from_export = _run(["vlm_generate", "--config", "llama3_2_vision_tiny", "checkpoint=null",
                        f"pretrained={out / 'model'}", "image=shapes:validation:1",
                        "prompt=what colour is the circle?"])
    assert from_export.returncode == 0, from_export.stderr[-2000:]
    assert from_export.stdout.strip().splitlines()[0] == answer


def test_vlm_generate_missing_image_is_one_line_error(tmp_path) -> None:
    result = _run(["vlm_generate", "--config", "llama3_2_vision_tiny", "checkpoint=null",
                   f"image={tmp_path}/nope.png"])
    assert result.returncode == 2
    assert "nope.png" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_vlm_finetune_tiny_reaches_answer_accuracy(tmp_path) -> None:
    out = tmp_path / "run"
    result = _run(["vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={out}",
                   "log.progress_bar=false"], timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "val/answer_acc" in r][-1]["val/answer_acc"] >= 0.8


@pytest.mark.parametrize("name", ["scaled_dot_product", "local", "random", "global", "nystrom", "favor",
                                  "linformer", "orthoformer"])
def test_every_mechanism_swaps_into_the_fusion_model_from_the_command_line(name, capsys) -> None:
    from mmtrain.cli.main import main

    status = main(["validate", "vlm_finetune", "--config", "llama3_2_vision_tiny", f"model/attention={name}"])
    output = capsys.readouterr()
    if name in ("linformer", "orthoformer"):  # they mix all positions: a causal decoder cannot use them
        assert status == 2 and "cannot be causal" in output.err
    else:
        assert status == 0, output.err


def test_export_false_writes_no_model_folder(tmp_path) -> None:
    from mmtrain.cli.main import main

    out = tmp_path / "run"
    assert main(["run", "vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={out}", "max_steps=1",
                 "export=false", "checkpoint.every_n_steps=0", *TINY]) == 0
    assert (out / "metrics.jsonl").is_file() and not (out / "model").exists()


def test_rerun_of_a_finished_run_says_so_and_writes_nothing(tmp_path) -> None:
    from mmtrain.cli.main import main

    out = tmp_path / "run"
    args = ["run", "vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={out}", "max_steps=2",
            "checkpoint.every_n_steps=2", *TINY]
    assert main(args) == 0
    metrics_before = (out / "metrics.jsonl").read_text()
    written = (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "metrics.jsonl").read_text() == metrics_before
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == written


CHAT_CONFIG = """
defaults:
  - /model: llama3_2_vision_tiny
  - _self_
output_dir: out
seed: 0
device: cpu
max_steps: 2
resume: auto
batch_size: 4
micro_batch_size: 4
precision: fp32
distributed: {{strategy: none}}
tokenizer: {{_target_: mmtrain.data.vqa.vqa_tokenizer, image_token_id: 128, max_seq_len: 48}}
dataset: {{_target_: mmtrain.data.vqa.chat_vqa_dataset, train_files: {data}, tile_size: 32, patch_size: 8}}
optimizer: {{_target_: torch.optim.AdamW, _partial_: true, lr: 1.0e-3}}
checkpoint: {{every_n_steps: 0}}
eval: {{every_n_steps: 0, batch_size: 1, max_new_tokens: 1, max_samples: 1}}
log: {{every_n_steps: 1, wandb: false, progress_bar: false}}
"""


def test_micro_batches_weigh_every_answer_token_alike(tmp_path) -> None:
    """Answers of 1 to 12 words: the step's loss is the mean over all its answer tokens (torchtune's weighting),
    so splitting the batch of 4 into micro-batches of 1 trains like the whole batch (it weighed each micro-batch's
    mean alike, so a one-word answer's token counted 12 times as much as a long answer's)."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from mmtrain.cli.main import main

    Image.fromarray(np.zeros((32, 32, 3), dtype="uint8")).save(tmp_path / "img.png")
    answers = ["red", "a big blue circle", "two small green squares on the left", "one " * 12]
    rows = [{"messages": [{"role": "user", "content": "<|image|> what is it ?"},
                          {"role": "assistant", "content": answer.strip()}], "images": ["img.png"]}
            for answer in answers]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "chat.yaml"
    config.write_text(CHAT_CONFIG.format(data=tmp_path / "chat.jsonl"))
    base = ["run", "vlm_finetune", "--config", str(config)]
    losses, weights = {}, {}
    for micro in (4, 1):
        out = tmp_path / f"micro{micro}"
        assert main([*base, f"output_dir={out}", f"micro_batch_size={micro}"]) == 0
        losses[micro] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                         if "loss" in r]
        weights[micro] = load_file(out / "model" / "model.safetensors")
    assert losses[1] == pytest.approx(losses[4], rel=1e-5)
    for key, value in weights[4].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_lora_finetune_from_an_export_trains_only_adapters_and_exports_them_merged(tmp_path, capsys) -> None:
    """torchtune's LoRA workflow on the tiny model: start from a full run's export (``pretrained``), train the
    adapters alone, export the merged weights (loadable into the model without LoRA) and the adapters alone."""
    from safetensors.torch import load_file

    from mmtrain.cli.main import main
    from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny

    base, lora = tmp_path / "base", tmp_path / "lora"
    assert main(["run", "vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={base}", "max_steps=2",
                 "checkpoint.every_n_steps=0", *TINY]) == 0
    assert main(["run", "vlm_finetune", "--config", "llama3_2_vision_tiny_lora", f"output_dir={lora}",
                 "max_steps=3", "checkpoint.every_n_steps=0", f"pretrained={base / 'model'}", *TINY]) == 0
    assert f"from {base / 'model'} (model.safetensors)" in capsys.readouterr().out
    start, merged = load_file(base / "model" / "model.safetensors"), load_file(lora / "model" / "model.safetensors")
    adapters = load_file(lora / "model" / "adapter_model.safetensors")
    assert sorted(merged) == sorted(start)
    adapted = {k[: -len(".lora_a.weight")] for k in adapters if k.endswith(".lora_a.weight")}
    assert "decoder.layers.1.fusion_layer.attn.q_proj" in adapted and "encoder.clip.layers.0.mlp.w1" in adapted
    for key, value in merged.items():
        layer = key[: -len(".weight")]
        if layer in adapted:  # the frozen base weight plus the trained update (alpha 16 / rank 8)
            a, b = adapters[f"{layer}.lora_a.weight"].double(), adapters[f"{layer}.lora_b.weight"].double()
            assert b.abs().max() > 0  # the adapters trained
            torch.testing.assert_close(value.double(), start[key].double() + 2.0 * b @ a, rtol=1e-5, atol=1e-6)
        else:  # frozen: gates, fusion embeddings, norms, unadapted projections
            assert torch.equal(value, start[key]), key
    llama3_2_vision_tiny().load_state_dict(merged, strict=True)


def test_dora_finetune_exports_merged_weights_from_trained_magnitudes(tmp_path, capsys) -> None:
    """``model.use_dora=true``: the DoRA run starts from the export, trains adapters and magnitudes, and its merged
    export is ``(W + s B A) * m / ||W + s B A||`` per row, loadable into the model without adapters."""
    from safetensors.torch import load_file

    from mmtrain.cli.main import main
    from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny

    base, dora = tmp_path / "base", tmp_path / "dora"
    assert main(["run", "vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={base}", "max_steps=1",
                 "checkpoint.every_n_steps=0", *TINY]) == 0
    assert main(["run", "vlm_finetune", "--config", "llama3_2_vision_tiny_lora", f"output_dir={dora}",
                 "max_steps=3", "checkpoint.every_n_steps=0", "model.use_dora=true", f"pretrained={base / 'model'}",
                 *TINY]) == 0
    start, merged = load_file(base / "model" / "model.safetensors"), load_file(dora / "model" / "model.safetensors")
    adapters = load_file(dora / "model" / "adapter_model.safetensors")
    assert json.loads((dora / "model" / "adapter_config.json").read_text())["use_dora"] is True
    layers = [k[: -len(".magnitude")] for k in adapters if k.endswith(".magnitude")]
    assert "decoder.layers.1.fusion_layer.attn.q_proj" in layers and sorted(merged) == sorted(start)
    moved = 0
    for layer in layers:
        a, b = adapters[f"{layer}.lora_a.weight"].double(), adapters[f"{layer}.lora_b.weight"].double()
        direction = start[f"{layer}.weight"].double() + 2.0 * b @ a
        magnitude = adapters[f"{layer}.magnitude"].double()
        moved += not torch.allclose(magnitude, start[f"{layer}.weight"].double().norm(dim=1))
        expected = direction * (magnitude / direction.norm(dim=1)).unsqueeze(1)
        torch.testing.assert_close(merged[f"{layer}.weight"].double(), expected, rtol=1e-5, atol=1e-6)
    assert moved  # the magnitudes trained
    llama3_2_vision_tiny().load_state_dict(merged, strict=True)


def test_the_planned_world_size_binds_validate_but_not_a_single_process_run(tmp_path, capsys) -> None:
    """``distributed.world_size: 8`` (the 11B configs) plans the job `mmtrain validate` estimates; a run in one
    process, e.g. on one GPU with ``distributed.strategy=none``, splits its batch over the one rank it has."""
    from mmtrain.cli.main import main

    planned = ["distributed.world_size=4", "batch_size=6"]
    assert main(["validate", "vlm_finetune", "--config", "llama3_2_vision_tiny", *planned]) == 2
    assert "global batch 6 is not divisible by the world size 4" in capsys.readouterr().err
    assert main(["run", "vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={tmp_path}", "max_steps=1",
                 "checkpoint.every_n_steps=0", "export=false", *TINY, *planned]) == 0


def test_lora_from_metas_original_folder_with_its_tiktoken_tokenizer(tmp_path, capsys,
                                                                    write_llama3_tiktoken_model) -> None:
    """Meta's download layout at toy size: consolidated.pth (Meta's keys) and the tiktoken tokenizer.model in one
    folder -> LoRA fine-tuning reads both from it, and the export holds Meta's weights where no adapter trained."""
    from safetensors.torch import load_file

    from mmtrain.cli.main import main
    from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny, mmtrain_to_meta

    folder = tmp_path / "original"
    folder.mkdir()
    vocab = len(write_llama3_tiktoken_model(folder / "tokenizer.model")) + 256  # ranks, then the special tokens
    torch.manual_seed(0)
    source = llama3_2_vision_tiny(vocab_size=vocab, max_num_tiles=2)
    torch.save({**mmtrain_to_meta(source.state_dict()), "text_model.rope.freqs": torch.ones(4)},
               folder / "consolidated.pth")
    out = tmp_path / "lora"
    assert main(["run", "vlm_finetune", "--config", "llama3_2_vision_tiny_lora", f"output_dir={out}", "max_steps=2",
                 "checkpoint.every_n_steps=0", f"pretrained={folder}", f"model.vocab_size={vocab}",
                 "model.max_num_tiles=2", "tokenizer=llama3_2_vision", f"tokenizer.path={folder}",
                 f"tokenizer.image_token_id={vocab}", "tokenizer.max_seq_len=48", *TINY]) == 0
    assert "(Meta checkpoint)" in capsys.readouterr().out
    merged = load_file(out / "model" / "model.safetensors")
    adapters = load_file(out / "model" / "adapter_model.safetensors")
    adapted = {k[: -len(".lora_a.weight")] + ".weight" for k in adapters if k.endswith(".lora_a.weight")}
    start = source.state_dict()
    assert sorted(merged) == sorted(start) and adapted
    assert all(torch.equal(merged[k], start[k]) for k in start if k not in adapted)


def test_pretrained_weights_of_another_size_are_a_one_line_error(tmp_path) -> None:
    from mmtrain.cli.main import main

    base = tmp_path / "base"
    assert main(["run", "vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={base}", "max_steps=1",
                 "checkpoint.every_n_steps=0", "model.intermediate_dim=96", *TINY]) == 0
    result = _run(["vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={tmp_path / 'next'}",
                   "max_steps=1", f"pretrained={base / 'model'}", *TINY])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "decoder.layers.0.mlp.w1.weight has shape (96, 64), the model (128, 64)" in result.stderr
    result = _run(["vlm_finetune", "--config", "llama3_2_vision_tiny", f"output_dir={tmp_path / 'next'}",
                   "max_steps=1", f"pretrained={tmp_path / 'nowhere'}", *TINY])
    assert result.returncode == 2 and "no such file or folder" in result.stderr


def test_lora_from_a_hugging_face_folder_with_its_tokenizer(tmp_path, capsys, write_llama3_tokenizer_json,
                                                            write_tiny_mllama_folder) -> None:
    """The published-weights workflow at toy size: an HF Llama-3.2-Vision folder (config.json, safetensors in HF's
    keys, tokenizer.json) -> LoRA fine-tuning with Llama 3's tokenizer and chat format -> the merged export answers
    through vlm_generate."""
    from safetensors.torch import load_file

    from mmtrain.cli.main import main
    from mmtrain.models.llama3_2_vision import llama3_2_vision_tiny

    vocab = 128_256  # Llama 3's base vocabulary: the tokenizer's ids are the real ones
    torch.manual_seed(0)
    source = llama3_2_vision_tiny(vocab_size=vocab, max_num_tiles=2)
    folder = tmp_path / "Llama-3.2-Vision-toy"
    write_tiny_mllama_folder(source, folder, vocab_size=vocab)
    write_llama3_tokenizer_json(folder / "tokenizer.json")
    shapes = [f"model.vocab_size={vocab}", "model.max_num_tiles=2", "tokenizer=llama3_2_vision",
              f"tokenizer.path={folder}", f"tokenizer.image_token_id={vocab}", "tokenizer.max_seq_len=48"]

    out = tmp_path / "lora"
    assert main(["run", "vlm_finetune", "--config", "llama3_2_vision_tiny_lora", f"output_dir={out}", "max_steps=2",
                 "checkpoint.every_n_steps=0", f"pretrained={folder}", *shapes, *TINY]) == 0
    assert "(Hugging Face Llama-3.2-Vision checkpoint)" in capsys.readouterr().out
    merged = load_file(out / "model" / "model.safetensors")
    adapters = load_file(out / "model" / "adapter_model.safetensors")
    adapted = {k[: -len(".lora_a.weight")] + ".weight" for k in adapters if k.endswith(".lora_a.weight")}
    start = source.state_dict()
    assert sorted(merged) == sorted(start)
    assert all(torch.equal(merged[k], start[k]) for k in start if k not in adapted)  # HF's weights, unchanged
    llama3_2_vision_tiny(vocab_size=vocab, max_num_tiles=2).load_state_dict(merged, strict=True)

    gen = _run(["vlm_generate", "--config", "llama3_2_vision_tiny", "checkpoint=null", f"pretrained={out / 'model'}",
                "image=shapes:validation:1", "prompt=what colour is the circle?", "max_new_tokens=3", *shapes])
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "<|" not in gen.stdout.splitlines()[0]  # decoded text, the special tokens dropped
