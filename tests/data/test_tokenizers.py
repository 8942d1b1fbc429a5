"""WordPiece tokenizers: ids on known text, padding/truncation contract, the shapes vocabulary."""

import pytest
import torch

from mmtrain.data.shapes import caption_vocabulary
from mmtrain.data.tokenizers import SHAPES_VOCAB, WordPieceTokenizer, minilm_tokenizer, shapes_tokenizer
from mmtrain.errors import ConfigError


def test_shapes_tokenizer_ids_follow_the_vocab_file():
    lines = SHAPES_VOCAB.read_text(encoding="utf-8").splitlines()
    ids = {token: i for i, token in enumerate(lines)}
    tok = shapes_tokenizer(max_length=8)
    assert tok.vocab_size == len(lines) == 72 and tok.pad_id == 0 and lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    out = tok(["a small red circle", "A LARGE Blue zebra"])
    expected = [
        [ids["[CLS]"], ids["a"], ids["small"], ids["red"], ids["circle"], ids["[SEP]"], 0, 0],
        [ids["[CLS]"], ids["a"], ids["large"], ids["blue"], ids["[UNK]"], ids["[SEP]"], 0, 0],
    ]
    assert out["input_ids"].tolist() == expected
    assert out["attention_mask"].tolist() == [[1] * 6 + [0] * 2] * 2
    assert out["token_type_ids"].tolist() == [[0] * 8] * 2
    assert all(v.dtype == torch.long for v in out.values())


def test_every_caption_word_is_in_the_shapes_vocab():
    tok = shapes_tokenizer()
    for word in caption_vocabulary():
        assert tok.unk_id not in tok([word])["input_ids"][0].tolist(), word


def test_overlong_text_is_truncated_with_sep_last():
    tok = shapes_tokenizer(max_length=6)
    out = tok(["a small red circle above a large blue square"])
    assert out["input_ids"].shape == (1, 6)
    assert out["input_ids"][0, -1].item() == tok.sep_id and out["attention_mask"].sum().item() == 6


def test_minilm_tokenizer_matches_bert_uncased_ids():
    tok = minilm_tokenizer(max_length=8)
    assert tok.vocab_size == 30522 and tok.pad_id == 0
    # bert-base-uncased ids: [CLS]=101 hello=7592 world=2088 ,=1010 [SEP]=102
    assert tok(["Hello, World"])["input_ids"].tolist() == [[101, 7592, 1010, 2088, 102, 0, 0, 0]]


def test_vocab_txt_and_folder_loading(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n##s\n", encoding="utf-8")
    tok = WordPieceTokenizer(tmp_path, max_length=5)
    assert tok(["hellos"])["input_ids"].tolist() == [[2, 4, 5, 3, 0]]
    with pytest.raises(ConfigError, match="no tokenizer file"):
        WordPieceTokenizer(tmp_path / "missing.txt")
    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / "vocab.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[UNK\]"):
        WordPieceTokenizer(tmp_path / "bad")
