"""Answer a question about an image with a trained fusion model (greedy decoding with KV caches).

    mmtrain run vlm_generate --config llama3_2_vision_tiny checkpoint=outputs/vlm_finetune_tiny \
        image=photo.png prompt="what colour is the circle?"

``checkpoint``: a checkpoint folder or a run's output_dir (its newest complete checkpoint); or ``pretrained``:
weights as ``vlm_finetune`` starts from them (a Hugging Face Llama-3.2-Vision folder, an export such as
``outputs/vlm_finetune_tiny/model``, a .safetensors file with torchtune's keys, Meta's consolidated.pth). ``image``: an image
file, or ``shapes:SPLIT:INDEX`` for a scene of the built-in generator (its true answer is printed alongside).
Prints the answer; returns ``{"answer": ..., "prompt": ...}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mmtrain.config import instantiate
from mmtrain.errors import ConfigError


def _resolve_image(spec: str, image_size: int) -> tuple[Any, str | None]:
    if spec.startswith("shapes:"):
        from mmtrain.data.shapes import render_scene

        try:
            _, split, index = spec.split(":")
            if int(index) < 0:
                raise ValueError(f"INDEX must be >= 0, got {index}")
            image, _, caption = render_scene(int(index), split, image_size)
        except ValueError as err:
            raise ConfigError(f"image={spec}: expected shapes:SPLIT:INDEX ({err})") from None
        return image, caption
    if not Path(spec).is_file():
        raise ConfigError(f"image={spec}: no such file")
    return spec, None


def main(cfg: DictConfig) -> dict:
    from mmtrain.data.vqa import build_prompt
    from mmtrain.generation import generate
    from mmtrain.training.checkpoint import CheckpointManager

    if not OmegaConf.select(cfg, "image"):
        raise ConfigError("image: required (a file, or shapes:SPLIT:INDEX)")
    if not OmegaConf.select(cfg, "prompt"):
        raise ConfigError("prompt: required (the question)")
    device = torch.device(cfg.get("device", "cpu") if cfg.get("device", "auto") != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.get('device')}: no CUDA device here; use device=auto or cpu")
    torch.manual_seed(int(cfg.get("seed", 0)))
    tokenizer = instantiate(cfg.tokenizer)
    model = instantiate(cfg.model)
    checkpoint, pretrained = OmegaConf.select(cfg, "checkpoint"), OmegaConf.select(cfg, "pretrained")
    if checkpoint and pretrained:
        raise ConfigError(f"checkpoint={checkpoint} and pretrained={pretrained}: give one (a training checkpoint, or "
                          "weights such as an export)")
    if pretrained:
        from mmtrain.models.llama3_2_vision._pretrained import load_pretrained

        load_pretrained(model, str(pretrained))
    elif checkpoint:
        if not Path(str(checkpoint)).expanduser().is_dir():
            raise ConfigError(f"checkpoint={checkpoint}: no such folder (a checkpoint folder or a run's output_dir)")
        manager = CheckpointManager(str(checkpoint), log_fn=lambda msg: None)
        path = manager.resolve_resume(str(checkpoint))  # a run's output_dir: its newest complete checkpoint
        if path is None:
            from mmtrain.errors import CheckpointError

            raise CheckpointError(f"checkpoint={checkpoint}: no complete checkpoint found")
        manager.load(path, model)
    else:
        print("warning: no checkpoint= or pretrained= given; answering with randomly initialised weights")
    model.to(device).eval()

    # Tiling as the model was built (the builders' image_size / patch_size / max_num_tiles arguments).
    tile = int(OmegaConf.select(cfg, "model.image_size") or 560)
    patch = int(OmegaConf.select(cfg, "model.patch_size") or 14)
    max_tiles = int(OmegaConf.select(cfg, "model.max_num_tiles") or (1 if "tiny" in str(cfg.model._target_) else 4))
    image, caption = _resolve_image(str(cfg.image), tile)
    sample = build_prompt(tokenizer, image, str(cfg.prompt), tile_size=tile, patch_size=patch,
                          max_num_tiles=max_tiles)
    from mmtrain.data.collate import padded_collate_tiled_images_and_mask

    batch = padded_collate_tiled_images_and_mask([sample], padding_idx=tokenizer.pad_id, pad_direction="left")
    tokens = batch["tokens"].to(device)
    encoder_input = {k: v.to(device) for k, v in batch["encoder_input"].items()}
    try:
        out = generate(model, tokens, max_new_tokens=int(cfg.get("max_new_tokens", 8)), pad_id=tokenizer.pad_id,
                       stop_tokens=tokenizer.stop_tokens, encoder_input=encoder_input,
                       encoder_mask=batch["encoder_mask"].to(device),
                       temperature=float(cfg.get("temperature", 0.0) or 0.0), top_k=cfg.get("top_k"),
                       rng=torch.Generator(device=device).manual_seed(int(cfg.get("seed", 0))))
    except ValueError as err:
        if "max_new_tokens" in str(err):
            raise ConfigError(f"max_new_tokens: {err}") from None
        raise
    new = out[0, tokens.shape[1]:].tolist()
    if tokenizer.eot_id in new:
        new = new[: new.index(tokenizer.eot_id)]
    answer = tokenizer.decode(new)
    print(answer)
    if caption is not None:
        print(f"(scene: {caption})")
    return {"answer": answer, "prompt": str(cfg.prompt)}


def validate(cfg: DictConfig, report: Any) -> None:
    """Checked by ``mmtrain validate`` and before ``mmtrain run`` starts."""
    from mmtrain.config import check_common_keys

    check_common_keys(cfg, report, components=("model", "tokenizer"))
    new_tokens = OmegaConf.select(cfg, "max_new_tokens", default=8)
    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
        report.error("max_new_tokens", f"must be a positive integer, got {new_tokens!r}")
    temperature = OmegaConf.select(cfg, "temperature", default=0.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        report.error("temperature", f"must be a number >= 0 (0: greedy), got {temperature!r}")
    top_k = OmegaConf.select(cfg, "top_k", default=None)
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        report.error("top_k", f"must be a positive integer or null, got {top_k!r}")


if __name__ == "__main__":
    from mmtrain.config import recipe_entry

    recipe_entry(main)
