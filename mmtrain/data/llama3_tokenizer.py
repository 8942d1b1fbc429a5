"""The Llama 3.2 Vision tokenizer and chat prompt format, on the Hugging Face ``tokenizers`` library.

Reads the ``tokenizer.json`` of a Hugging Face Llama-3.2-11B/90B-Vision(-Instruct) folder: a byte-level BPE with
128,000 base tokens, 256 special tokens after them and ``<|image|>`` last. The ids (read from the file, checked to
exist) are, for the published files:

    <|begin_of_text|> 128000    <|end_of_text|> 128001    <|finetune_right_pad_id|> 128004 (padding)
    <|start_header_id|> 128006  <|end_header_id|> 128007  <|eom_id|> 128008  <|eot_id|> 128009
    <|python_tag|> 128010       <|reserved_special_token_N|> the other ids up to 128255
    <|image|> 128256: the first of the decoder's fusion tokens, outside the base vocabulary (``vocab_size`` 128256)

A conversation is tokenized as torchtune's ``Llama3Tokenizer.tokenize_messages`` does (the format of the
Instruct models' chat template):

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>What is this?<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\nA cat.<|eot_id|>

(one line, no line breaks but the two ``\\n\\n`` after each header). Every text part of a message is stripped of
surrounding whitespace and encoded on its own; ``<|image|>`` (a ``{"type": "image"}`` part, or the marker in a
string) is the image id with nothing added around it. Other special-token spellings inside message text are
encoded as plain text, so data cannot forge a header or an end of turn. A message ends with ``<|eot_id|>``, or
``<|eom_id|>`` when it says ``"eot": False`` (a tool call expecting a result). ``add_generation_prompt=True`` ends
the tokens with ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` for the model to continue. Generation
stops at ``<|end_of_text|>``, ``<|eot_id|>`` or ``<|eom_id|>``.

Labels are the tokens of each assistant message, its header included, as torchtune masks whole messages: header,
content and ``<|eot_id|>``; -100 elsewhere (user, system and tool messages, ``<|begin_of_text|>``, and assistant
messages with ``"masked": True``). Samples longer than ``max_seq_len`` are cut to it. Unlike torchtune, no masked
``<|end_of_text|>`` is appended (it changes no loss), so the ids are the Instruct chat template's.

    tokenizer = llama3_2_vision_tokenizer("/models/Llama-3.2-11B-Vision-Instruct", max_seq_len=8192)
    tokens, labels = tokenizer.tokenize_messages(
        [{"role": "user", "content": "<|image|>What is this?"}, {"role": "assistant", "content": "A cat."}])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmtrain.data.vqa import CROSS_ENTROPY_IGNORE_IDX, IMAGE_TOKEN, content_parts
from mmtrain.errors import ConfigError, DataError

__all__ = ["LLAMA3_SPECIAL_TOKENS", "Llama3VisionTokenizer", "llama3_2_vision_tokenizer", "tokenizer_from_tiktoken"]

ROLES = ("system", "user", "assistant", "ipython", "tool")

# The ids of the published Llama 3.2 Vision tokenizer.json (documentation and tests; the ids used are the file's).
LLAMA3_SPECIAL_TOKENS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    IMAGE_TOKEN: 128256,
}
_REQUIRED = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", IMAGE_TOKEN)

# Llama 3's pre-tokenizer split (tiktoken's pat_str of the published tokenizer.model; the Split of tokenizer.json).
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                        r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Special tokens after a tiktoken file's base ranks, by offset, as torchtune's Llama3Tokenizer names them (it leaves
# offset 11 unnamed; here it is the last reserved name); the rest of the 256 are reserved, and <|image|> follows them
# (128256 for the published file).
_TIKTOKEN_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 2: "<|reserved_special_token_0|>",
                      3: "<|reserved_special_token_1|>", 4: "<|finetune_right_pad_id|>", 5: "<|step_id|>",
                      6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                      10: "<|python_tag|>", 11: "<|reserved_special_token_245|>", 12: "<|video|>"}
_NUM_RESERVED_SPECIALS = 256


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of GPT-2 and ``tokenizers``' ByteLevel: printable bytes stand for themselves, the
    others for the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _merge_parts(token: bytes, ranks: Mapping[bytes, int]) -> list[bytes]:
    """tiktoken's byte-pair merge of ``token`` with the ranks below its own: the two parts its last merge joined
    (more parts when no merge sequence reaches it)."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def tokenizer_from_tiktoken(path: str | os.PathLike) -> Any:
    """A tiktoken BPE file (``tokenizer.model`` of Meta's Llama 3 downloads: one ``base64(token) rank`` per line)
    -> the same tokenizer as a ``tokenizers.Tokenizer``: byte-level BPE over the ranks (each token's merge is the
    last pair tiktoken's merging joins; a token in the vocabulary is taken whole, as tiktoken does), Llama 3's split
    pattern, the 256 special tokens after the ranks and ``<|image|>`` after those."""
    import base64
    import binascii

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks: dict[bytes, int] = {}
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ConfigError(f"tokenizer.path: {path} line {number} is not 'base64-token rank' (a tiktoken "
                                  "tokenizer.model)") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"tokenizer.path: {path}: the ranks are not 0..{len(ranks) - 1}, each once")
    alphabet = _byte_to_unicode()

    def spelled(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        parts = _merge_parts(token, ranks)
        if len(parts) == 2:
            merges.append((spelled(parts[0]), spelled(parts[1])))
    vocab = {spelled(token): rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    names = [_TIKTOKEN_SPECIALS.get(k, f"<|reserved_special_token_{k - 11}|>") for k in range(_NUM_RESERVED_SPECIALS)]
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in [*names, IMAGE_TOKEN]])
    return tokenizer


class Llama3VisionTokenizer:
    """Llama 3.2 Vision tokenizer: text <-> ids and chat messages -> (tokens, labels).

    Args:
        path: a ``tokenizer.json`` (Hugging Face ``tokenizers`` format), Meta's tiktoken ``tokenizer.model``, or a
            folder holding one (``tokenizer.json`` first), such as a downloaded
            meta-llama/Llama-3.2-11B-Vision-Instruct folder or its ``original/`` folder.
        max_seq_len: tokens kept per sample (longer samples are cut); None keeps everything.

    Attributes: ``bos_id``, ``eos_id`` (``<|end_of_text|>``), ``eot_id``, ``eom_id``, ``pad_id``
    (``<|finetune_right_pad_id|>``, as torchtune), ``start_header_id``, ``end_header_id``, ``python_tag_id``,
    ``image_token_id``, ``stop_tokens``, ``max_seq_len``, ``vocab_size`` (ids below ``<|image|>``: the size of
    the decoder's base embedding).

    Raises:
        ConfigError: the file is missing or unreadable, or is not a Llama 3.2 Vision tokenizer.
    """

    def __init__(self, path: str | os.PathLike, max_seq_len: int | None = 8192) -> None:
        from tokenizers import Tokenizer

        if not path:
            raise ConfigError("tokenizer.path: required (a tokenizer.json, or the Hugging Face folder holding one)")
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path / "tokenizer.model"
        if not path.is_file():
            raise ConfigError(f"tokenizer.path: no tokenizer file at {path} (a tokenizer.json, Meta's tiktoken "
                              "tokenizer.model, or a folder holding one)")
        if max_seq_len is not None and int(max_seq_len) < 1:
            raise ConfigError(f"tokenizer.max_seq_len: must be at least 1 (or null for no limit), got {max_seq_len}")
        if path.suffix == ".model":
            tokenizer = tokenizer_from_tiktoken(path)
        else:
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as error:  # the Rust side raises plain Exceptions  # noqa: BLE001
                cause = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ConfigError(f"tokenizer.path: {path} cannot be read as a Hugging Face tokenizer.json "
                                  f"({cause})") from None
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [token for token in _REQUIRED if token not in vocab]
        if missing:
            raise ConfigError(f"tokenizer.path: {path} is not a Llama 3.2 Vision tokenizer (no {' '.join(missing)} "
                              "token)")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.path = path
        self._tokenizer = tokenizer
        self._set_literal_specials()
        self.bos_id = vocab["<|begin_of_text|>"]
        self.eos_id = vocab["<|end_of_text|>"]
        self.pad_id = vocab["<|finetune_right_pad_id|>"]
        self.start_header_id = vocab["<|start_header_id|>"]
        self.end_header_id = vocab["<|end_header_id|>"]
        self.eom_id = vocab["<|eom_id|>"]
        self.eot_id = vocab["<|eot_id|>"]
        self.python_tag_id = vocab.get("<|python_tag|>")
        self.image_token_id = vocab[IMAGE_TOKEN]
        self._vocab_size = 1 + max(i for token, i in vocab.items() if token != IMAGE_TOKEN)
        if self.image_token_id < self._vocab_size:
            raise ConfigError(f"tokenizer.path: {path}: {IMAGE_TOKEN} is id {self.image_token_id}, inside the base "
                              f"vocabulary of {self._vocab_size} ids; it must come after it (a fusion token)")
        self._special_ids = frozenset(
            i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special) | {self.image_token_id}
        self.max_seq_len = int(max_seq_len) if max_seq_len is not None else None
        self._newlines = self.encode("\n\n")

    def _set_literal_specials(self) -> None:
        # "<|eot_id|>" typed in a message stays text (torchtune encodes text with special tokens disallowed);
        # markers the format needs are placed as ids by this class.
        self._tokenizer.encode_special_tokens = True

    def __setstate__(self, state: dict[str, Any]) -> None:  # DataLoader workers: the flag is not pickled
        self.__dict__.update(state)
        self._set_literal_specials()

    @property
    def vocab_size(self) -> int:
        """Ids of the base vocabulary (text and special tokens): every id below ``image_token_id``."""
        return self._vocab_size

    @property
    def stop_tokens(self) -> list[int]:
        return [self.eos_id, self.eot_id, self.eom_id]

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> ids; each ``<|image|>`` marker -> ``image_token_id``, other special-token spellings stay text.
        Whitespace is kept (``tokenize_messages`` strips message text, ``encode`` does not)."""
        ids = [self.bos_id] if add_bos else []
        for k, piece in enumerate(text.split(IMAGE_TOKEN)):
            if k:
                ids.append(self.image_token_id)
            if piece:
                ids += self._tokenizer.encode(piece, add_special_tokens=False).ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Ids -> text. Special tokens are dropped, and so are whole headers (``<|start_header_id|>role
        <|end_header_id|>`` and the ``\\n\\n`` after it), as torchtune's decode does; ids outside the vocabulary
        (other fusion tokens, padding) are dropped too."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if not skip_special_tokens:
            return self._tokenizer.decode([i for i in ids if 0 <= i], skip_special_tokens=False)
        pieces: list[str] = []
        run: list[int] = []
        after_header = run_after_header = False
        k = 0
        while k < len(ids):
            i = ids[k]
            normal = 0 <= i < self._vocab_size and i not in self._special_ids
            if normal:
                if not run:
                    run_after_header = after_header
                run.append(i)
            else:
                if run:
                    pieces.append(self._decode_run(run, run_after_header))
                    run = []
                after_header = False
                if i == self.start_header_id:  # skip to the header's end, if it has one
                    try:
                        k = ids.index(self.end_header_id, k + 1)
                        after_header = True
                    except ValueError:
                        pass
            k += 1
        if run:
            pieces.append(self._decode_run(run, run_after_header))
        return "".join(pieces)

    def _decode_run(self, run: list[int], after_header: bool) -> str:
        text = self._tokenizer.decode(run, skip_special_tokens=False)
        return text.removeprefix("\n\n") if after_header else text

    def _header(self, role: str) -> list[int]:
        return [self.start_header_id] + self.encode(role) + [self.end_header_id] + self._newlines

    def _content_ids(self, content: Any) -> list[int]:
        """A message's content (a string with ``<|image|>`` markers, or typed parts) -> ids; text stripped."""
        ids: list[int] = []
        for part in content_parts(content):
            if part is None:
                ids.append(self.image_token_id)
                continue
            for k, piece in enumerate(part.split(IMAGE_TOKEN)):
                if k:
                    ids.append(self.image_token_id)
                piece = piece.strip()
                if piece:
                    ids += self._tokenizer.encode(piece, add_special_tokens=False).ids
        return ids

    def tokenize_messages(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Chat messages ``{"role", "content", "masked"?, "eot"?}`` -> (tokens, labels), both (s,) with
        s <= ``max_seq_len``. Labels are the token where trained (assistant messages: header, content, end token),
        else -100.
        With ``add_generation_prompt`` the tokens end with an assistant header for the model to continue."""
        tokens, labels = [self.bos_id], [CROSS_ENTROPY_IGNORE_IDX]
        for message in messages:
            role = message["role"]
            if role not in ROLES:
                raise DataError(f"message role {role!r}: expected one of {', '.join(ROLES)}")
            header = self._header(role)
            body = self._content_ids(message["content"])
            body.append(self.eot_id if message.get("eot", True) is not False else self.eom_id)
            tokens += header + body
            trained = role == "assistant" and message.get("masked", False) is not True
            labels += header + body if trained else [CROSS_ENTROPY_IGNORE_IDX] * (len(header) + len(body))
        if add_generation_prompt:
            header = self._header("assistant")
            tokens += header
            labels += [CROSS_ENTROPY_IGNORE_IDX] * len(header)
        if self.max_seq_len is not None:
            tokens, labels = tokens[: self.max_seq_len], labels[: self.max_seq_len]
        return tokens, labels


def llama3_2_vision_tokenizer(path: str, max_seq_len: int | None = 8192,
                              image_token_id: int | None = None) -> Llama3VisionTokenizer:
    """Config builder for :class:`Llama3VisionTokenizer` (``path``: a tokenizer.json or a Hugging Face folder).

    ``image_token_id``, when given, is checked against the file's ``<|image|>`` id (a config that states the id its
    model was built for, such as the ``vlm_finetune`` configs' inline tokenizer, then fails early on a mismatch).
    """
    tokenizer = Llama3VisionTokenizer(path, max_seq_len=max_seq_len)
    if image_token_id is not None and int(image_token_id) != tokenizer.image_token_id:
        raise ConfigError(f"tokenizer.image_token_id: {image_token_id}, but {tokenizer.path} has {IMAGE_TOKEN} = "
                          f"{tokenizer.image_token_id}")
    return tokenizer
