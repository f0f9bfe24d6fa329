"""phi_fast.tokenizer: both file formats, transformers' CodeGen tokenizer as the reference, streaming decode."""

from __future__ import annotations

import json
import random

import pytest
import tokenizers
from tokenizer_fixture import SPACE_RUNS, write_tokenizer

from phi_fast.tokenizer import EOS_TOKEN, Tokenizer, clean_up_tokenization, write_demo_tokenizer

TEXTS = [
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\nWhat is this?",
    "USER: Le café est très bon. ASSISTANT: 猫が好きです 😀🐈‍⬛ ok",
    "first answer<|endoftext|>USER: second question ASSISTANT:",
    "def main():\n    print('hi')\n\t\treturn 0\n",
    "  leading and trailing spaces  ",
    "It isn't . It 's fine , they 're here ' ok ' ? ! n't",
    "",
]


def test_both_formats_give_the_same_ids(tmp_path):
    from_json = Tokenizer.from_dir(write_tokenizer(tmp_path / "json", "json"))
    from_files = Tokenizer.from_dir(write_tokenizer(tmp_path / "files", "files"))
    assert from_json.vocab_size == from_files.vocab_size
    assert from_json.eos_token_id == from_files.eos_token_id
    for text in TEXTS:
        assert from_json.encode(text) == from_files.encode(text), text


def test_ids_match_transformers_codegen_tokenizer(tokenizer_dir, tok):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CodeGenTokenizer.from_pretrained(str(tokenizer_dir))
    for text in TEXTS:
        assert tok.encode(text) == reference(text).input_ids, text  # no BOS added either


def test_special_and_added_tokens(tok):
    eos = tok.eos_token_id
    assert tok.vocab_size == eos + 1 + len(SPACE_RUNS)  # EOS closes the BPE vocabulary, then the added runs
    assert tok.encode(EOS_TOKEN) == [eos]
    ids = tok.encode("answer<|endoftext|>USER:")
    assert ids.count(eos) == 1 and ids[0] != eos and ids[-1] != eos
    assert tok.encode("x    y").count(eos + 1) == 1  # the four-space added token is matched whole


def test_decode_round_trip_and_special_tokens(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == text.replace(EOS_TOKEN, "")
    assert tok.decode([tok.eos_token_id]) == ""


def test_clean_up_setting_comes_from_tokenizer_config(tmp_path):
    text = "It isn't . It 's fine , ok"
    plain = Tokenizer.from_dir(write_tokenizer(tmp_path / "a", "files"))
    cleaned = Tokenizer.from_dir(write_tokenizer(tmp_path / "b", "json", clean_up_tokenization_spaces=True))
    assert not plain.clean_up_tokenization_spaces and cleaned.clean_up_tokenization_spaces
    ids = plain.encode(text)
    assert cleaned.encode(text) == ids
    assert plain.decode(ids) == text
    assert cleaned.decode(ids) == "It isn't. It's fine, ok"
    assert cleaned.decode(ids, clean_up_tokenization_spaces=False) == text


def test_clean_up_matches_transformers():
    base = pytest.importorskip("transformers.tokenization_utils_base")
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(" .?!,'ntmsvrea") for _ in range(rng.randint(0, 12)))
        assert clean_up_tokenization(text) == base.PreTrainedTokenizerBase.clean_up_tokenization(None, text), text


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = tok.stream_decoder(**kwargs)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.finish())
    return pieces


@pytest.mark.parametrize("text", ["é", "猫", "😀", "Le café: 猫 et 🐈‍⬛ 😀😀!", "a<|endoftext|>é b"])
def test_stream_pieces_concatenate_to_decode(tok, text):
    ids = tok.encode(text)
    for skip in (True, False):
        pieces = _stream(tok, ids, skip_special_tokens=skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in piece for piece in pieces)


def test_stream_holds_back_a_split_character(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji is not in the tiny vocabulary, so its bytes are separate tokens
    pieces = _stream(tok, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "😀" and pieces[-1] == ""


def test_stream_of_invalid_utf8_matches_decode(tok):
    continuation_byte = tok.encode("😀")[-1]  # a lone UTF-8 continuation byte never completes
    ids = [continuation_byte] + tok.encode(" ok") + [continuation_byte]
    assert tok.decode(ids) == "\ufffd ok\ufffd"
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_stream_with_clean_up_matches_decode(tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer(tmp_path, "json", clean_up_tokenization_spaces=True))
    rng = random.Random(1)
    words = ["It", " isn", "'t", " .", " ?", " !", " ,", " '", " ' ", " n", "'", "t", " 's", " 're", " 've", " 'm",
             " ok", "é", " 猫", "😀", " ", "  ", "re", "ve", "\n", "<|endoftext|>"]
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 15)))
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == clean_up_tokenization(text.replace(EOS_TOKEN, "")), text
    assert any(_stream(tok, tok.encode("It is good to see you"))[:-1])  # text is released before finish()


def test_missing_files_name_the_folder_and_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.json, merges\.txt"):
        Tokenizer.from_dir(tmp_path)
    write_tokenizer(tmp_path, "files")
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*missing: merges\.txt"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_files_raise_value_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    folder = write_tokenizer(tmp_path / "files", "files")
    added = folder / "added_tokens.json"
    added.write_text(json.dumps({run: 10_000 + i for i, run in enumerate(SPACE_RUNS)}))
    with pytest.raises(ValueError, match="has id 10000"):
        Tokenizer.from_dir(folder)


def test_missing_eos_is_an_error(tmp_path):
    bare = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    bare.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> token"):
        _ = tok.eos_token_id


def test_demo_tokenizer(tmp_path):
    write_demo_tokenizer(tmp_path, vocab_size=600)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size <= 600 and tok.eos_token_id == tok.vocab_size - 1
    prompt = "A chat between a curious user and an artificial intelligence assistant. USER: What? ASSISTANT:"
    assert tok.decode(tok.encode(prompt)) == prompt
    assert len(tok.encode(prompt)) < len(prompt) // 2  # trained on the template words: few tokens
