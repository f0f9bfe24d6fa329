"""LLaVA-Phi's prompt: the `phi-2_v0` conversation template and LLaVA's image-marker tokenization.

Single turn, with an image (spec section 6):

    {SYSTEM_PROMPT} USER: <image>\\n{question} ASSISTANT:

Earlier answers end with `<|endoftext|>`, directly followed by the next `USER: `. The prompt is split at
`<image>`, each piece tokenized on its own (no BOS), and the pieces joined by IMAGE_TOKEN_INDEX; the model
replaces each marker with the image's 576 embedding rows.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def build_prompt(conversation: str | Sequence[Turn], *, with_image: bool = True) -> str:
    """The `phi-2_v0` prompt text for one question or a list of (question, answer) turns.

    Only the last turn may have answer None (it ends the prompt with "ASSISTANT:" for the model to continue).
    With `with_image`, "<image>\\n" opens the first question unless that question already holds "<image>"
    (LLaVA's run script convention); without it the prompt has no marker.
    """
    turns: list[Turn] = [(conversation, None)] if isinstance(conversation, str) else list(conversation)
    if not turns:
        raise ValueError("build_prompt needs at least one turn")
    for i, (_, answer) in enumerate(turns[:-1]):
        if answer is None:
            raise ValueError(f"turn {i} of {len(turns)} has no answer; only the last turn may be unanswered")
    user, assistant = ROLES
    text = SYSTEM_PROMPT + TURN_SEP
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
