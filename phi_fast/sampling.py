"""How a request picks its tokens and when it stops (the drawing itself is phi_fast.gpu_sampling)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

MAX_TOP_K = 2**31 - 1  # anything above the vocabulary keeps every token; the bound keeps it an int64 on device
MAX_LOGPROBS = 20  # most top alternatives a request may ask for per token (OpenAI's top_logprobs bound)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops.

    Every field is checked here, when the request is made, so that nothing a caller passes can fail later inside
    an engine step shared with other requests: a bad value raises ValueError naming the parameter and the value.
    Integral and real numbers of other types (numpy scalars) are accepted and stored as int / float.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    logprobs: int | None = None  # None: off; k in [0, MAX_LOGPROBS]: each token's logprob and the k most likely

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the values once, here
        set_(self, "max_new_tokens", _int("max_new_tokens", self.max_new_tokens, 1))
        set_(self, "temperature", _real("temperature", self.temperature))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        set_(self, "top_p", _real("top_p", self.top_p))
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        set_(self, "top_k", _int("top_k", self.top_k, 0, MAX_TOP_K))
        if self.seed is not None:
            set_(self, "seed", _int("seed", self.seed))
        set_(self, "stop", check_stop(self.stop))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            set_(self, "logprobs", _int("logprobs", self.logprobs, 0, MAX_LOGPROBS))


def check_stop(stop: object) -> tuple[str, ...]:
    """None, one stop string, or a sequence of them -> a tuple of non-empty str (ValueError otherwise)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if isinstance(stop, (bytes, bytearray)) or not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a str or a list of str, got {type(stop).__name__} {stop!r:.80}")
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop strings must be str, got {type(s).__name__} {s!r:.80} in stop={stop!r:.200}")
        if not s:
            raise ValueError("stop strings must be non-empty")
    return tuple(stop)


def _int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r:.80}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r:.80}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
