"""Fixtures shared across test folders.

``write_llama3_tokenizer_json(path, image_token=True)``: writes a tokenizer.json built like the published Llama 3.2
Vision one: a byte-level BPE (Llama 3's split regex, trained on a few sentences, its vocabulary filled with
unreachable tokens up to 128,000 ids), the 256 special tokens at 128000-128255 and ``<|image|>`` at 128256, as added
tokens with their real ids.

``write_llama3_tiktoken_model(path)``: the same vocabulary (without the fillers) as Meta's tiktoken
``tokenizer.model``; returns its ranks.
"""

import json

import pytest

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["what colour is the circle?", "red", "user", "assistant", "system", "\n\n", "what shape is the red object?",
          "how many objects are there?", "two", "a square and a triangle", "blue", "green", "It's 42 degrees."]
NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|reserved_special_token_0|>",
         3: "<|reserved_special_token_1|>", 4: "<|finetune_right_pad_id|>", 5: "<|reserved_special_token_2|>",
         6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}


def _write_llama3_tokenizer_json(path, *, image_token: bool = True) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 10, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), 128000):  # never produced: no merge leads to them, no pre-token spells them
        vocab[f"<filler_{i}>"] = i
    names = [NAMED.get(k, f"<|reserved_special_token_{k - 8}|>") for k in range(256)]
    names += ["<|image|>"] if image_token else []
    data["added_tokens"] = [{"id": 128000 + k, "content": name, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True} for k, name in enumerate(names)]
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    data["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                 "tokens": ["<|begin_of_text|>"]}}}
    path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def write_llama3_tokenizer_json():
    return _write_llama3_tokenizer_json


def gpt2_byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte -> the byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def _write_llama3_tiktoken_model(path) -> dict[bytes, int]:
    """Meta's ``tokenizer.model`` layout (``base64(token) rank`` lines) for the vocabulary of
    ``write_llama3_tokenizer_json`` without its fillers (rank = id: the trainer numbers each merged token after the
    ones it joins, as tiktoken's ranks are ordered). Returns the ranks; the special tokens follow them."""
    import base64
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as scratch:
        _write_llama3_tokenizer_json(Path(scratch) / "tokenizer.json")
        vocab = json.loads((Path(scratch) / "tokenizer.json").read_text())["model"]["vocab"]
    alphabet = gpt2_byte_alphabet()
    ranks = {bytes(alphabet[c] for c in token): i for token, i in vocab.items() if not token.startswith("<filler_")}
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    Path(path).write_text("\n".join(lines) + "\n")
    return ranks


@pytest.fixture(scope="session")
def write_llama3_tiktoken_model():
    return _write_llama3_tiktoken_model


def _write_tiny_mllama_folder(model, folder, *, vocab_size: int = 128) -> None:
    """A Hugging Face Llama-3.2-Vision folder (config.json + model.safetensors in HF's keys) holding the weights of
    ``llama3_2_vision_tiny(vocab_size=vocab_size, max_num_tiles=2)``. The tile grid's (2, 2) cell belongs to no aspect
    ratio of 2 tiles and HF does not store it: it is zeroed in ``model`` first, so the folder reads back as ``model``."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from mmtrain.models.llama3_2_vision import mmtrain_to_hf

    clip = model.encoder.clip
    with torch.no_grad():
        for grid in (clip.pre_tile_pos_embed.embedding, clip.post_tile_pos_embed.embedding,
                     clip.token_pos_embedding.global_token_positional_embedding):
            grid[1, 1] = 0.0
    folder.mkdir(parents=True, exist_ok=True)
    save_file(mmtrain_to_hf(model.state_dict(), num_heads=4, num_kv_heads=2, dim=64, vocab_size=vocab_size,
                            encoder_dim=64, tile_size=32, num_tiles=2), str(folder / "model.safetensors"))
    rope = dict(rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    transformers.MllamaConfig(
        vision_config=dict(hidden_size=64, attention_heads=4, num_hidden_layers=2, num_global_layers=1,
                           intermediate_size=256, vision_output_dim=128, image_size=32, patch_size=8, max_num_tiles=2,
                           intermediate_layers_indices=[1], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, cross_attention_layers=[1, 4],
                         max_position_embeddings=128, rope_parameters=rope),
    ).save_pretrained(folder)


@pytest.fixture(scope="session")
def write_tiny_mllama_folder():
    """``write(model, folder, vocab_size=128)``: see ``_write_tiny_mllama_folder``; needs transformers (test extra)."""
    pytest.importorskip("transformers")
    return _write_tiny_mllama_folder
