"""Meta's tiktoken ``tokenizer.model`` read as a byte-level BPE: the same ids as tiktoken's merging (written out
here) and as the tokenizer.json holding the same vocabulary, Llama 3's special tokens after the ranks, errors."""

import pytest
import regex

from mmtrain.data.llama3_tokenizer import Llama3VisionTokenizer, tokenizer_from_tiktoken
from mmtrain.errors import ConfigError

SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
         r"\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = ["what colour is the circle?", "red", "It's 42 degrees.", "a square and a triangle\n\nblue", "  two  ",
         "How MANY objects're there?? 123456", "circles reddish squares whatsoever colours", "café ñ 日本語 👍",
         "tab\there\r\nand\nnewlines", "user assistant"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, write_llama3_tokenizer_json, write_llama3_tiktoken_model):
    """The toy tokenizer.json and the same vocabulary as a tiktoken file."""
    folder = tmp_path_factory.mktemp("original")
    write_llama3_tokenizer_json(folder / "tokenizer.json")
    ranks = write_llama3_tiktoken_model(folder / "tokenizer.model")
    return folder, ranks


def tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm: split with the pattern; a piece in the vocabulary is one token; otherwise merge the
    adjacent pair of lowest rank until none is in the vocabulary."""
    ids = []
    for piece in regex.findall(SPLIT, text):
        data = piece.encode()
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [data[i:i + 1] for i in range(len(data))]
        while True:
            pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_tiktoken_file_encodes_as_tiktoken_and_as_the_json_with_the_same_vocabulary(files) -> None:
    folder, ranks = files
    from_model = Llama3VisionTokenizer(folder / "tokenizer.model", max_seq_len=None)
    from_json = Llama3VisionTokenizer(folder / "tokenizer.json", max_seq_len=None)
    for text in TEXTS:
        ids = from_model.encode(text)
        assert ids == tiktoken_encode(text, ranks), text
        assert ids == from_json.encode(text), text
        assert from_model.decode(ids) == text


def test_special_tokens_follow_the_ranks_as_in_llama3(files) -> None:
    folder, ranks = files
    base = len(ranks)
    tok = Llama3VisionTokenizer(folder / "tokenizer.model")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.start_header_id, tok.end_header_id, tok.eom_id, tok.eot_id,
            tok.python_tag_id) == (base, base + 1, base + 4, base + 6, base + 7, base + 8, base + 9, base + 10)
    assert tok.image_token_id == base + 256 and tok.vocab_size == base + 256  # 128000 + 256 = 128256 when published
    vocab = tokenizer_from_tiktoken(folder / "tokenizer.model").get_vocab(with_added_tokens=True)
    assert vocab["<|step_id|>"] == base + 5 and vocab["<|reserved_special_token_244|>"] == base + 255
    tokens, labels = tok.tokenize_messages([{"role": "user", "content": "<|image|>red"},
                                            {"role": "assistant", "content": "blue"}])
    assert tokens[:2] == [base, base + 6] and tokens.count(base + 256) == 1 and tokens[-1] == base + 9
    assert labels[-2:] == [tok.encode("blue")[-1], base + 9]
    # a folder holding only tokenizer.model (Meta's original/ folder) is read through it
    only_model = folder.parent / "meta_only"
    only_model.mkdir()
    (only_model / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    assert Llama3VisionTokenizer(only_model).encode("red") == tok.encode("red")


def test_a_malformed_tiktoken_file_is_a_config_error(tmp_path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_text("cmVk 0\nnot-base64!! 1\n")
    with pytest.raises(ConfigError, match="line 2 is not 'base64-token rank'"):
        Llama3VisionTokenizer(bad)
    bad.write_text("cmVk 0\nYmx1ZQ== 2\n")
    with pytest.raises(ConfigError, match="ranks are not 0..1"):
        Llama3VisionTokenizer(bad)
    with pytest.raises(ConfigError, match="Meta's tiktoken tokenizer.model"):
        Llama3VisionTokenizer(tmp_path / "empty_folder")
