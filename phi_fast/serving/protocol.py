"""OpenAI's wire format: request bodies checked into plain dataclasses, response objects built as dicts.

Validation is by hand rather than by pydantic models so that every refusal is one OpenAI error object whose
message names the field and the bad value (`messages[1].content[0].type: unknown content part type 'audio'`),
and so that the sampling fields map one to one onto phi_fast.sampling.SamplingParams, which checks the ranges.
Fields OpenAI defines that change nothing here (user, metadata, store, zero penalties) are accepted; those this
server cannot honour (tools, echo, a non-zero penalty, ...) are refused by name instead of being ignored.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from ..prompt import IMAGE_PLACEHOLDER
from ..sampling import MAX_LOGPROBS, SamplingParams

DEFAULT_MAX_TOKENS = 256  # when a request gives neither max_tokens nor max_completion_tokens (the context bounds it)
MAX_N = 16  # choices per request

# Fields refused unless they hold their "off" value (which OpenAI's clients may send explicitly).
_UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                "function_call": (None, "none"), "logit_bias": (None, {}), "frequency_penalty": (None, 0, 0.0),
                "presence_penalty": (None, 0, 0.0), "best_of": (None, 1), "echo": (None, False),
                "suffix": (None, ""), "audio": (None,), "prediction": (None,), "parallel_tool_calls": (None, False)}


class APIError(Exception):
    """An error the client is shown as an OpenAI error object with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable",
             500: "internal_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """{"error": {message, type, param, code}}, as OpenAI sends it."""
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


@dataclass
class ImagePart:
    """An image_url content part: where it sits among the messages and the URL to fetch."""

    url: str
    param: str  # e.g. "messages[0].content[1].image_url.url", for error messages


@dataclass
class GenerationRequest:
    """What both routes share once checked."""

    model: str | None
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool  # chat: logprobs=true; completions: logprobs is an int
    top_logprobs: int


@dataclass
class ChatRequest(GenerationRequest):
    messages: list[dict[str, str]] = field(default_factory=list)  # content as text with "<image>" markers
    images: list[ImagePart] = field(default_factory=list)  # one per marker, in order


@dataclass
class CompletionRequest(GenerationRequest):
    prompts: list[str] = field(default_factory=list)


def parse_chat(body: Any) -> ChatRequest:
    """A /v1/chat/completions body -> ChatRequest (APIError 400 naming the field otherwise)."""
    body = _object(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list", "messages")
    messages, images = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role must be 'system', 'user' or 'assistant', got {_show(role)}", f"{where}.role")
        messages.append({"role": role, "content": _content(m.get("content"), role, where, images)})
    base = _generation(body, chat=True)
    return ChatRequest(**vars(base), messages=messages, images=images)


def parse_completion(body: Any) -> CompletionRequest:
    """A /v1/completions body -> CompletionRequest."""
    body = _object(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad(f"prompt must be a string or a non-empty list of strings, got {_show(prompt)}", "prompt")
    base = _generation(body, chat=False)
    return CompletionRequest(**vars(base), prompts=prompts)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise bad(f"{name} is not supported by this server", name)
    return body


def _content(content: Any, role: str, where: str, images: list[ImagePart]) -> str:
    """A message's content (a string, or a list of text / image_url parts) -> text with one "<image>\\n"
    marker per image, the images first (LLaVA's convention, as Model.generate places its image)."""
    if isinstance(content, str):
        _no_marker(content, f"{where}.content")
        return content
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content parts, got {_show(content)}",
                  f"{where}.content")
    texts, n_images = [], 0
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{at}.text must be a string, got {_show(text)}", f"{at}.text")
            _no_marker(text, f"{at}.text")
            texts.append(text)
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{at}: only user messages may hold images, not {role} ones", at)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url:
                raise bad(f"{at}.image_url.url must be a non-empty string, got {_show(url)}", f"{at}.image_url.url")
            images.append(ImagePart(url, f"{at}.image_url.url"))
            n_images += 1
        else:
            raise bad(f"{at}.type: unknown content part type {_show(kind)} (supported: 'text', 'image_url')",
                      f"{at}.type")
    return (IMAGE_PLACEHOLDER + "\n") * n_images + "\n".join(texts)


def _no_marker(text: str, where: str) -> None:
    if IMAGE_PLACEHOLDER in text:
        raise bad(f"{where}: the text holds {IMAGE_PLACEHOLDER!r}; send images as image_url parts", where)


def _generation(body: dict[str, Any], chat: bool) -> GenerationRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {_show(model)}", "model")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad("stream_options must be an object, and only with stream=true", "stream_options")
    include_usage = bool(options and _bool(options, "include_usage", False, "stream_options.include_usage"))
    n = _int(body, "n", 1, 1, MAX_N)
    if chat:
        logprobs = _bool(body, "logprobs", False)
        top = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
        if "top_logprobs" in body and body["top_logprobs"] is not None and not logprobs:
            raise bad("top_logprobs needs logprobs=true", "top_logprobs")
    else:
        value = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        logprobs, top = value is not None, value or 0
    max_tokens = _int(body, "max_completion_tokens", None, 1) if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise bad(f"stop must be a string or a list of strings, got {_show(stop)}", "stop")
    try:
        params = SamplingParams(
            max_new_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
            top_k=max(_int(body, "top_k", 0, -1), 0),  # vLLM's extension; -1 = off as there
            seed=_int(body, "seed", None), stop=stop, ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=top if logprobs else None)
    except ValueError as e:
        raise bad(str(e).replace("max_new_tokens", "max_tokens")) from None
    return GenerationRequest(model, params, n, stream, include_usage, logprobs, top)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bool(body: dict[str, Any], name: str, default: bool, where: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{where or name} must be a boolean, got {_show(value)}", where or name)
    return value


def _int(body: dict[str, Any], name: str, default: int | None, lo: int | None = None,
         hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer, got {_show(value)}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad(f"{name} must be {bounds}, got {value}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a finite number, got {_show(value)}", name)
    return float(value)


# --- responses ----------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    """An OpenAI-style object id: "chatcmpl-<hex>", "cmpl-<hex>"."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def finish_reason(engine_reason: str | None) -> str:
    """The engine's finish reason in OpenAI's words: eos and stop strings are "stop", the token limit "length"."""
    return "length" if engine_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
