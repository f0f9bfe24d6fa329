"""LLaVA-Phi's prompt: the `phi-2_v0` conversation template and LLaVA's image-marker tokenization.

Single turn, with an image (spec section 6):

    {SYSTEM_PROMPT} USER: <image>\\n{question} ASSISTANT:

Earlier answers end with `<|endoftext|>`, directly followed by the next `USER: `. The prompt is split at
`<image>`, each piece tokenized on its own (no BOS), and the pieces joined by IMAGE_TOKEN_INDEX; the model
replaces each marker with the image's 576 embedding rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = ("USER", "ASSISTANT")
TURN_SEP = " "  # after the system prompt and after each question
ANSWER_SEP = "<|endoftext|>"  # after each answer

Turn = tuple[str, str | None]  # (question, answer); answer None = the turn the model answers


class TextEncoder(Protocol):
    """Anything with `encode(text) -> ids` that adds no special tokens (phi_fast.tokenizer.Tokenizer)."""

    def encode(self, text: str) -> list[int]: ...


def build_prompt(conversation: str | Sequence[Turn], *, with_image: bool = True, system: str = SYSTEM_PROMPT) -> str:
    """The `phi-2_v0` prompt text for one question or a list of (question, answer) turns.

    Only the last turn may have answer None (it ends the prompt with "ASSISTANT:" for the model to continue).
    With `with_image`, "<image>\\n" opens the first question unless that question already holds "<image>"
    (LLaVA's run script convention); without it the prompt has no marker. `system` replaces the default system
    text.
    """
    turns: list[Turn] = [(conversation, None)] if isinstance(conversation, str) else list(conversation)
    if not turns:
        raise ValueError("build_prompt needs at least one turn")
    for i, (_, answer) in enumerate(turns[:-1]):
        if answer is None:
            raise ValueError(f"turn {i} of {len(turns)} has no answer; only the last turn may be unanswered")
    user, assistant = ROLES
    text = system + TURN_SEP
    for i, (question, answer) in enumerate(turns):
        if i == 0 and with_image and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        text += f"{user}: {question}{TURN_SEP}"
        text += f"{assistant}:" if answer is None else f"{assistant}: {answer}{ANSWER_SEP}"
    return text


def tokenize_prompt(tokenizer: TextEncoder, prompt_text: str, image_token_id: int = IMAGE_TOKEN_INDEX,
                    num_images: int | None = None) -> list[int]:
    """Ids of `prompt_text`: each piece between `<image>` markers tokenized separately, joined by `image_token_id`.

    When `num_images` is given, the number of markers must equal it.
    """
    pieces = prompt_text.split(IMAGE_PLACEHOLDER)
    if num_images is not None and len(pieces) - 1 != num_images:
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} markers but {num_images} images "
                         f"were given")
    ids = list(tokenizer.encode(pieces[0]))
    for piece in pieces[1:]:
        ids.append(image_token_id)
        ids.extend(tokenizer.encode(piece))
    return ids


CHAT_ROLES = ("system", "user", "assistant")


def chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The `phi-2_v0` prompt of OpenAI-style messages: [{"role": "system" | "user" | "assistant", "content": str}].

    System messages (only before the first user message; several are joined by a newline) replace the default
    system text; consecutive messages of one role are joined by a newline; the conversation must alternate user
    and assistant turns and end with a user message. "<image>" markers in the contents are kept where they
    are (the caller passes one image per marker). ValueError names the offending message.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} messages")
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []  # (role, contents) with consecutive roles merged
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, Mapping) else (None, None)
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r:.40}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a str, got {type(content).__name__}")
        if role == "system":
            if turns:
                raise ValueError(f"messages[{i}]: a system message must come before the first user message")
            system.append(content)
        elif not turns and role == "assistant":
            raise ValueError(f"messages[{i}]: the conversation must start with a user message, not an assistant one")
        elif turns and turns[-1][0] == role:
            turns[-1][1].append(content)
        else:
            turns.append((role, [content]))
    if not turns or turns[-1][0] != "user":
        raise ValueError("the last message must be a user message (the model answers it)")
    pairs: list[Turn] = []
    for k in range(0, len(turns), 2):
        answer = "\n".join(turns[k + 1][1]) if k + 1 < len(turns) else None
        pairs.append(("\n".join(turns[k][1]), answer))
    return build_prompt(pairs, with_image=False, system="\n".join(system) if system else SYSTEM_PROMPT)
