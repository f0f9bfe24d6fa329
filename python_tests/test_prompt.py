"""phi_fast.prompt: the exact phi-2_v0 text and LLaVA's split-at-<image> tokenization."""

from __future__ import annotations

import pytest

from phi_fast.prompt import IMAGE_TOKEN_INDEX, SYSTEM_PROMPT, build_prompt, chat_prompt, tokenize_prompt

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def test_single_turn_template_is_exact():
    assert build_prompt("What is the cat doing?") == (
        SYSTEM + " USER: <image>\nWhat is the cat doing? ASSISTANT:")
    assert build_prompt([("What is the cat doing?", None)]) == build_prompt("What is the cat doing?")


def test_text_only_prompt_has_no_image_marker():
    assert build_prompt("Tell me a joke.", with_image=False) == SYSTEM + " USER: Tell me a joke. ASSISTANT:"


def test_multi_turn_template_is_exact():
    turns = [("What is it?", "A cat."), ("What color?", "Orange."), ("Is it asleep?", None)]
    assert build_prompt(turns) == (
        SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A cat.<|endoftext|>USER: What color? ASSISTANT: "
        "Orange.<|endoftext|>USER: Is it asleep? ASSISTANT:")
    assert build_prompt(turns, with_image=False).count("<image>") == 0


def test_existing_image_marker_is_not_duplicated():
    assert build_prompt("Look: <image> what is this?") == SYSTEM + " USER: Look: <image> what is this? ASSISTANT:"


def test_bad_conversations_are_rejected():
    with pytest.raises(ValueError, match="at least one turn"):
        build_prompt([])
    with pytest.raises(ValueError, match="turn 0 of 2 has no answer"):
        build_prompt([("a?", None), ("b?", None)])


def _llava_reference_ids(encode, prompt: str, marker_id: int) -> list[int]:
    """LLaVA's tokenizer_image_token, restated: tokenize the text between markers chunk by chunk, interleave."""
    chunks, start = [], 0
    while (found := prompt.find("<image>", start)) >= 0:
        chunks.append(prompt[start:found])
        start = found + len("<image>")
    chunks.append(prompt[start:])
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(marker_id)
        ids += encode(chunk)
    return ids


PROMPTS = [
    build_prompt("What is the cat doing?"),
    build_prompt("Describe it. Ça va? 猫 😀", with_image=False),
    build_prompt([("What is it?", "A cat."), ("What color?", "Orange, mostly."), ("Why?", None)]),
    build_prompt("First <image> then <image> again"),
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenization_matches_llava_reference(tokenizer_dir, tok, prompt):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CodeGenTokenizer.from_pretrained(str(tokenizer_dir))
    expected = _llava_reference_ids(lambda text: reference(text).input_ids, prompt, IMAGE_TOKEN_INDEX)
    assert tokenize_prompt(tok, prompt) == expected
    assert tokenize_prompt(tok, prompt, image_token_id=7) == _llava_reference_ids(tok.encode, prompt, 7)


def test_pieces_are_tokenized_separately(tok):
    ids = tokenize_prompt(tok, build_prompt("Hello?"), num_images=1)
    marker = ids.index(IMAGE_TOKEN_INDEX)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids[marker - 1] == tok.encode(" ")[0]  # "USER: " ends with a lone space token
    assert ids[marker + 1] == tok.encode("\n")[0]  # the second piece starts afresh with "\n"
    assert tok.decode(ids[:marker]) + "<image>" + tok.decode(ids[marker + 1:]) == build_prompt("Hello?")


def test_multi_turn_answers_end_with_eos(tok):
    ids = tokenize_prompt(tok, build_prompt([("Q1?", "A1."), ("Q2?", None)]))
    eos = ids.index(tok.eos_token_id)
    assert ids.count(tok.eos_token_id) == 1
    assert tok.decode(ids[eos + 1:]) == "USER: Q2? ASSISTANT:"


def test_marker_count_must_match_images(tok):
    with pytest.raises(ValueError, match="1 <image> markers but 0 images"):
        tokenize_prompt(tok, build_prompt("Hi"), num_images=0)
    with pytest.raises(ValueError, match="0 <image> markers but 1 images"):
        tokenize_prompt(tok, build_prompt("Hi", with_image=False), num_images=1)
    assert IMAGE_TOKEN_INDEX not in tokenize_prompt(tok, build_prompt("Hi", with_image=False), num_images=0)


def test_chat_messages_map_onto_the_template():
    user = {"role": "user", "content": "<image>\nWhat is it?"}
    assert chat_prompt([user]) == build_prompt("What is it?", with_image=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."}, user,
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Colour?"},
                {"role": "user", "content": "And size?"}]
    assert chat_prompt(messages) == build_prompt([("<image>\nWhat is it?", "A cat."), ("Colour?\nAnd size?", None)],
                                                 system="Be brief.\nBe kind.")
    assert SYSTEM_PROMPT not in chat_prompt(messages)  # a system message replaces the default


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a str"),
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "start with a user"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "before the first user"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message"),
])
def test_bad_chat_messages_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        chat_prompt(messages)
