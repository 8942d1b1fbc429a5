"""VQA data: tokenizer, answer-only labels, masks, chat JSONL files."""

import json

import pytest
import torch
from PIL import Image

from mmtrain.data.vqa import CROSS_ENTROPY_IGNORE_IDX, ChatVQADataset, ShapesVQA, VQATokenizer
from mmtrain.errors import ConfigError, DataError


def test_labels_only_on_answer_tokens_and_eot() -> None:
    tok = VQATokenizer()
    ds = ShapesVQA("train", 8, tok)
    for i in range(8):
        sample = ds[i]
        tokens, labels = sample["tokens"], sample["labels"]
        assert len(tokens) == len(labels)
        answer_start = tokens.index(tok.assistant_id) + 1
        assert all(label == CROSS_ENTROPY_IGNORE_IDX for label in labels[:answer_start])
        assert labels[answer_start:] == tokens[answer_start:]
        assert tokens[-1] == tok.eot_id
        assert tok.decode(tokens[answer_start:]) == ds.questions[i][1]
        mask = sample["encoder_mask"][0]
        image_pos = tokens.index(tok.image_token_id)
        assert mask.shape == (len(tokens), 17)
        assert not mask[:image_pos].any() and mask[image_pos:].all()
        assert sample["encoder_input"]["images"][0].shape == (1, 3, 32, 32)


def test_prompt_sample_ends_with_assistant_and_splits_are_disjoint() -> None:
    tok = VQATokenizer()
    train, val = ShapesVQA("train", 64, tok), ShapesVQA("validation", 64, tok)
    prompt, answer = val.prompt_sample(0)
    assert prompt["tokens"][-1] == tok.assistant_id and "labels" not in prompt
    assert answer == val.questions[0][1]
    train_images = {bytes(img.numpy()) for img in train.images}
    assert not any(bytes(img.numpy()) in train_images for img in val.images)


def test_tokenizer_round_trip_and_errors(tmp_path) -> None:
    tok = VQATokenizer()
    ids = tok.encode("<|image|>What colour is the circle?")
    assert ids[0] == tok.image_token_id and tok.decode(ids) == "what colour is the circle?"
    assert tok.encode("zebra") == [tok.unk_id]
    with pytest.raises(ConfigError, match="image_token_id"):
        VQATokenizer(image_token_id=10)
    bad = tmp_path / "vocab.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ConfigError, match="must start with"):
        VQATokenizer(bad)


def test_chat_jsonl_dataset(tmp_path) -> None:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
                          {"role": "assistant", "content": "red"}], "images": ["red.png"]},
            {"messages": [{"role": "user", "content": "<|image|>what colour?"},
                          {"role": "assistant", "content": "red"}], "images": ["missing.png"]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok = VQATokenizer()
    ds = ChatVQADataset(str(path), tok)
    sample = ds[0]
    trained = [t for t, label in zip(sample["tokens"], sample["labels"]) if label != CROSS_ENTROPY_IGNORE_IDX]
    assert tok.decode(trained) == "red" and trained[-1] == tok.eot_id
    assert torch.is_tensor(sample["encoder_mask"][0])
    with pytest.raises(DataError, match="row 1: image .*missing.png does not exist"):
        ds[1]
    with pytest.raises(DataError, match="does not exist"):
        ChatVQADataset(str(tmp_path / "nope.jsonl"), tok)
