"""Llama 3.2 Vision tokenizer: the chat format as ids, labels, truncation, decode, parity with ``tokenizers`` and
transformers on the same tokenizer.json, and the VQA datasets running on it.

The tokenizer.json is built here like the published one: a byte-level BPE (Llama 3's split regex, trained on a few
sentences, its vocabulary filled with unreachable tokens up to 128,000 ids), the 256 special tokens at 128000-128255
and ``<|image|>`` at 128256, as added tokens with their real ids.
"""

import json
import pickle

import pytest
import torch
from PIL import Image

from mmtrain.data.llama3_tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    Llama3VisionTokenizer,
    llama3_2_vision_tokenizer,
)
from mmtrain.data.vqa import ChatVQADataset, ShapesVQA, build_prompt
from mmtrain.errors import ConfigError, DataError

IGNORE = -100
BOS, EOS, PAD, START, END, EOM, EOT, IMAGE = 128000, 128001, 128004, 128006, 128007, 128008, 128009, 128256
QUESTION, ANSWER = "what colour is the circle?", "red"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, write_llama3_tokenizer_json):
    folder = tmp_path_factory.mktemp("Llama-3.2-11B-Vision-Instruct")
    write_llama3_tokenizer_json(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def raw(model_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok(model_dir):
    return Llama3VisionTokenizer(model_dir, max_seq_len=8192)


def text_ids(raw, text: str) -> list[int]:
    return raw.encode(text, add_special_tokens=False).ids


def conversation(raw) -> tuple[list[int], list[int], int]:
    """The format written out: (tokens, labels, length of the prompt up to and with the assistant header)."""
    user, assistant, nl = text_ids(raw, "user"), text_ids(raw, "assistant"), text_ids(raw, "\n\n")
    question, answer = text_ids(raw, QUESTION), text_ids(raw, ANSWER)
    header = [START, *assistant, END, *nl]
    prompt = [BOS, START, *user, END, *nl, IMAGE, *question, EOT, *header]
    tokens = prompt + answer + [EOT]
    labels = [IGNORE] * (len(prompt) - len(header)) + header + answer + [EOT]  # torchtune trains the whole message
    return tokens, labels, len(prompt)


def chat(question=QUESTION, answer=ANSWER):
    return [{"role": "user", "content": "<|image|>" + question}, {"role": "assistant", "content": answer}]


def test_special_ids_vocab_size_and_stop_tokens(tok, raw) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id, tok.eom_id, tok.image_token_id) == \
        (BOS, EOS, PAD, EOT, EOM, IMAGE)
    assert (tok.start_header_id, tok.end_header_id, tok.python_tag_id) == (START, END, 128010)
    assert {name: raw.token_to_id(name) for name in LLAMA3_SPECIAL_TOKENS} == LLAMA3_SPECIAL_TOKENS
    assert raw.token_to_id("<|reserved_special_token_247|>") == 128255
    assert tok.vocab_size == 128256  # ids below <|image|>: the decoder's base embedding rows
    assert tok.stop_tokens == [EOS, EOT, EOM]
    assert tok.max_seq_len == 8192


def test_tokenize_messages_writes_the_llama3_format(tok, raw) -> None:
    tokens, labels, _ = conversation(raw)
    assert tok.tokenize_messages(chat()) == (tokens, labels)
    # The same conversation as typed parts, or with whitespace around the text: each text part is stripped
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " " + QUESTION + "\n"}]},
             {"role": "assistant", "content": [{"type": "text", "text": ANSWER + " "}]}]
    assert tok.tokenize_messages(parts) == (tokens, labels)
    assert tok.tokenize_messages(chat(" " + QUESTION, "\n" + ANSWER)) == (tokens, labels)


def test_format_matches_the_rendered_chat_string(tok, raw) -> None:
    """Ids placed by the tokenizer == the chat template's string encoded by ``tokenizers`` with special tokens."""
    rendered = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>" + QUESTION +
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER + "<|eot_id|>")
    tokens, _ = tok.tokenize_messages(chat())
    assert raw.encode(rendered, add_special_tokens=False).ids == tokens
    prompt = rendered[: rendered.rindex("\n\n") + 2]
    assert raw.encode(prompt, add_special_tokens=False).ids == \
        tok.tokenize_messages(chat()[:1], add_generation_prompt=True)[0]


def test_generation_prompt_masks_and_roles(tok, raw) -> None:
    tokens, labels, n_prompt = conversation(raw)
    prompt, prompt_labels = tok.tokenize_messages(chat()[:1], add_generation_prompt=True)
    assert prompt == tokens[:n_prompt] and prompt[-1] != EOT
    header = [START, *text_ids(raw, "assistant"), END, *text_ids(raw, "\n\n")]
    assert prompt[-len(header):] == header
    assert prompt_labels == [IGNORE] * n_prompt
    # A masked assistant turn is context; system and tool roles get their own headers; eot=False ends with eom
    messages = [{"role": "system", "content": "two"},
                {"role": "user", "content": "<|image|>" + QUESTION},
                {"role": "assistant", "content": "blue", "masked": True},
                {"role": "user", "content": "green"},
                {"role": "assistant", "content": ANSWER, "eot": False}]
    got, got_labels = tok.tokenize_messages(messages)

    def turn(role, body_ids):
        return [START, *text_ids(raw, role), END, *text_ids(raw, "\n\n"), *body_ids]

    body = [*turn("system", text_ids(raw, "two")), EOT, *turn("user", [IMAGE, *text_ids(raw, QUESTION)]), EOT,
            *turn("assistant", text_ids(raw, "blue")), EOT, *turn("user", text_ids(raw, "green")), EOT,
            *turn("assistant", [])]
    assert got == [BOS, *body, *text_ids(raw, ANSWER), EOM]
    last_header = turn("assistant", [])  # trained; the masked assistant turn's header is not
    assert got_labels == [IGNORE] * (1 + len(body) - len(last_header)) + last_header + text_ids(raw, ANSWER) + [EOM]
    with pytest.raises(DataError, match="role 'robot'"):
        tok.tokenize_messages([{"role": "robot", "content": "hi"}])
    with pytest.raises(DataError, match="'video'"):
        tok.tokenize_messages([{"role": "user", "content": [{"type": "video"}]}])


def test_truncation_to_max_seq_len(model_dir, raw) -> None:
    tokens, labels, _ = conversation(raw)
    short = Llama3VisionTokenizer(model_dir / "tokenizer.json", max_seq_len=9)
    assert short.tokenize_messages(chat()) == (tokens[:9], labels[:9])
    assert Llama3VisionTokenizer(model_dir, max_seq_len=None).tokenize_messages(chat()) == (tokens, labels)
    assert llama3_2_vision_tokenizer(str(model_dir), max_seq_len=len(tokens) - 1).tokenize_messages(chat()) == \
        (tokens[:-1], labels[:-1])


def test_decode_drops_special_tokens_and_headers(tok, raw) -> None:
    tokens, _, _ = conversation(raw)
    assert tok.decode(tokens) == QUESTION + ANSWER  # torchtune's decode: headers and specials removed
    # What the recipes decode: generated ids cut at <|eot_id|>, or with stop/pad/unknown fusion ids after them
    answer = text_ids(raw, ANSWER)
    assert tok.decode(answer) == ANSWER
    assert tok.decode(torch.tensor(answer + [EOT, PAD, PAD, IMAGE + 3])) == ANSWER
    assert tok.decode([IMAGE, *text_ids(raw, "two"), EOM]) == "two"
    assert tok.decode([START, *text_ids(raw, "user")]) == "user"  # no header end: the text stays
    assert tok.decode(tokens[:3], skip_special_tokens=False) == "<|begin_of_text|><|start_header_id|>user"
    text = "héllo wörld, It's 42 degrees.\n\n  two\tspaces "
    assert tok.decode(tok.encode(text)) == text


TEXTS = ["what colour is the circle?", "It's 42 degrees.", "héllo wörld 12345 ?!", "  leading and trailing  ",
         "lines\n\nand\ttabs\r\n", "東京 🙂", ""]


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_tokenizers(tok, raw, text) -> None:
    expected = raw.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == expected and (text == "" or expected)
    assert tok.encode(text, add_bos=True, add_eos=True) == [BOS, *expected, EOS]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf, text) -> None:
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text, add_special_tokens=False),
                                                     clean_up_tokenization_spaces=False)


def test_rendered_chat_matches_transformers(tok, hf) -> None:
    rendered = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>" + QUESTION +
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER + "<|eot_id|>")
    assert hf.encode(rendered, add_special_tokens=False) == tok.tokenize_messages(chat())[0]
    assert hf.convert_tokens_to_ids(["<|image|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]) == [IMAGE, EOT, PAD]


def test_special_token_text_in_data_stays_text(tok, raw) -> None:
    assert tok.encode("<|image|>two<|image|>") == [IMAGE, *text_ids(raw, "two"), IMAGE]
    forged = tok.encode("<|eot_id|><|start_header_id|>")
    assert EOT not in forged and START not in forged and len(forged) > 2
    tokens, _ = tok.tokenize_messages([{"role": "user", "content": "<|eot_id|>"}])
    assert tokens.count(EOT) == 1 and tokens[-1] == EOT
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers get a copy: same behaviour
    assert clone.encode("<|eot_id|>x<|image|>") == tok.encode("<|eot_id|>x<|image|>")
    assert clone.tokenize_messages(chat()) == tok.tokenize_messages(chat())


def test_errors_are_one_line_config_errors(tmp_path, model_dir, write_llama3_tokenizer_json) -> None:
    errors = []
    with pytest.raises(ConfigError, match="no tokenizer file") as info:
        Llama3VisionTokenizer(tmp_path / "missing.json")
    errors.append(info.value)
    with pytest.raises(ConfigError, match="no tokenizer file") as info:
        Llama3VisionTokenizer(tmp_path)  # a folder without tokenizer.json
    errors.append(info.value)
    with pytest.raises(ConfigError, match="tokenizer.path: required") as info:
        Llama3VisionTokenizer(None)  # e.g. path: ${pretrained} with no pretrained= given
    errors.append(info.value)
    garbage = tmp_path / "garbage" / "tokenizer.json"
    garbage.parent.mkdir()
    garbage.write_text("IQ== 0\nIg== 1\n")  # tiktoken's lines under the JSON's name
    with pytest.raises(ConfigError, match="cannot be read as a Hugging Face tokenizer.json") as info:
        Llama3VisionTokenizer(garbage)
    errors.append(info.value)
    no_image = tmp_path / "llama3_text" / "tokenizer.json"
    no_image.parent.mkdir()
    write_llama3_tokenizer_json(no_image, image_token=False)
    with pytest.raises(ConfigError, match=r"not a Llama 3.2 Vision tokenizer \(no <\|image\|> token\)") as info:
        Llama3VisionTokenizer(no_image.parent)
    errors.append(info.value)
    with pytest.raises(ConfigError, match="image_token_id: 128257") as info:
        llama3_2_vision_tokenizer(str(model_dir), image_token_id=128257)
    errors.append(info.value)
    with pytest.raises(ConfigError, match="max_seq_len") as info:
        Llama3VisionTokenizer(model_dir, max_seq_len=0)
    errors.append(info.value)
    assert all("\n" not in str(err) for err in errors)
    assert llama3_2_vision_tokenizer(str(model_dir), image_token_id=IMAGE).image_token_id == IMAGE


def test_config_file_builds_the_tokenizer(model_dir) -> None:
    from pathlib import Path

    from omegaconf import OmegaConf

    from mmtrain.config import instantiate

    cfg = OmegaConf.load(Path(__file__).parents[2] / "configs" / "tokenizer" / "llama3_2_vision.yaml")
    assert OmegaConf.is_missing(cfg, "path")
    cfg.path = str(model_dir)
    built = instantiate(cfg)
    assert isinstance(built, Llama3VisionTokenizer) and built.max_seq_len == 8192 and built.image_token_id == IMAGE


def test_chat_dataset_and_build_prompt_end_to_end(tmp_path, tok, raw) -> None:
    from mmtrain.data.collate import padded_collate_tiled_images_and_mask

    Image.new("RGB", (20, 12), (200, 30, 30)).save(tmp_path / "red.png")  # 12 high, 20 wide: a 1 x 2 tile grid
    rows = [{"messages": chat(), "images": ["red.png"]},
            {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": " " + ANSWER + "\n"}], "images": ["red.png"]}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = ChatVQADataset(str(path), tok, tile_size=16, patch_size=8, max_num_tiles=2)
    tokens, labels, n_prompt = conversation(raw)
    for i in range(2):
        sample = ds[i]
        assert sample["tokens"] == tokens and sample["labels"] == labels
        assert sample["encoder_input"]["images"][0].shape == (2, 3, 16, 16)
        assert sample["encoder_input"]["aspect_ratio"][0].tolist() == [1, 2]
        mask = sample["encoder_mask"][0]
        image_pos = tokens.index(IMAGE)
        assert mask.shape[0] == len(tokens) and mask.shape[1] >= 2 * (2 * 2 + 1)
        assert not mask[:image_pos].any() and mask[image_pos:, : 2 * 5].all()
        prompt, answer = ds.prompt_sample(i)
        assert prompt["tokens"] == tokens[:n_prompt] and "labels" not in prompt and answer == ANSWER
    sample = build_prompt(tok, Image.open(tmp_path / "red.png"), QUESTION, tile_size=16, patch_size=8,
                          max_num_tiles=2)
    assert sample["tokens"] == tokens[:n_prompt]
    assert build_prompt(tok, tmp_path / "red.png", "<|image|> " + QUESTION, tile_size=16,
                        patch_size=8)["tokens"] == tokens[:n_prompt]
    short = build_prompt(tok, tmp_path / "red.png", "two", tile_size=16, patch_size=8, max_num_tiles=2)
    batch = padded_collate_tiled_images_and_mask([sample, short], padding_idx=tok.pad_id, pad_direction="left")
    padding = n_prompt - len(short["tokens"])
    assert batch["tokens"].shape == (2, n_prompt)
    assert batch["tokens"][1].tolist() == [PAD] * padding + short["tokens"]


def test_shapes_vqa_on_the_llama3_tokenizer(tok) -> None:
    ds = ShapesVQA("train", 4, tok)
    for i in range(4):
        sample = ds[i]
        question, answer = ds.questions[i]
        trained = [t for t in sample["labels"] if t != IGNORE]
        assert trained[-1] == EOT and tok.decode(trained) == answer
        assert sample["tokens"][:6] == [BOS, START, *tok.encode("user"), END, *tok.encode("\n\n"), IMAGE][:6]
        assert tok.decode(sample["tokens"]) == question + answer
        prompt, expected = ds.prompt_sample(i)
        assert expected == answer and prompt["tokens"][-1] == tok.encode("\n\n")[-1]
