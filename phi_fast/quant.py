"""Weight-only quantization of the linear layers: formats, packing, and the load-time quantizer.

Formats (the kernels' contract: csrc/cpu/quant_linear.h; the math: phi_fast.reference.dequantize):
- "int8": one fp32 scale per output channel, scale = max|w[n, :]| / 127, q = round(w / scale) in [-127, 127];
  qweight int8 [N, K], scales fp32 [N].
- "int4": groups of G consecutive inputs (G a multiple of 32; default DEFAULT_GROUP_SIZE), one fp16 scale per
  group, symmetric like llama.cpp's Q4_0: the group's weight of largest magnitude m maps to -8, scale =
  fp16(m / -8), q = clamp(round(w / scale), -8, 7) with that rounded scale. K is padded with zeros up to Kp (a
  multiple of G). qweight uint8 [N, Kp / 2]: each run of 32 weights is 16 bytes, byte i = (q[i] + 8) |
  (q[i + 16] + 8) << 4; scales fp16 [N, Kp / G]. At G = 32 that is 4.5 bits per weight, Q4_0's size: decode reads
  the weights once per token, and fp32 scales would add 11% to those bytes (bench/NOTES.md, quantized decode v3).
  Groups whose largest weight is below ~5e-4 get a subnormal scale (fewer significant bits), below ~5e-7 zero;
  a weight above 8 * 65504 cannot be represented and is refused.
Decode-sized products (up to 16 rows of x) quantize the activations on the fly to int8 in blocks of 32 (scale
max|x| / 127) and use integer dot products, like llama.cpp's Q8_0 x Q8_0 / Q4_0 x Q8_0; prompts dequantize the
weights tile by tile into torch's GEMM and keep the activations as they are (csrc/cpu/quant_linear.cpp).

Which tensors: the Phi-2 linears (qkv, dense, fc1, fc2 of every layer, lm_head) and the projector's two linears.
The vision tower stays in the model dtype: it runs once per image as a 577-token compute-bound GEMM (weights
are read once per image, not once per token), so packing it would save 0.6 GB of memory but no time, and its
features feed every answer about the image. The token embedding is a row gather and stays as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import reference

FORMATS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # most accurate and no slower than 64 or 128 (bench/NOTES.md)
_RUN = 32  # int4 weights per 16-byte run
_ROWS_PER_STEP = 4096  # quantize this many rows at a time (bounds the fp32 temporaries of lm_head)
_QUANTIZED = re.compile(r"(text\.layers\.\d+\.(qkv|dense|fc1|fc2)|text\.lm_head|projector\.fc[12])\.weight")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize into: format "int8" or "int4", and the int4 group size (0 for int8, which has none)."""

    format: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unsupported quantize {self.format!r} (supported: {', '.join(FORMATS)})")
        if self.format == "int8":
            object.__setattr__(self, "group_size", 0)  # one scale per row: configs differing only here are equal
        elif self.group_size not in GROUP_SIZES:
            raise ValueError(f"unsupported int4 group_size {self.group_size} (supported: {GROUP_SIZES})")

    def to_json(self) -> dict:
        """The `quantization_config` entry of a quantized checkpoint's config.json."""
        out = {"quant_method": "phi_fast", "format": self.format}
        if self.format == "int4":
            out["group_size"] = self.group_size
        return out

    @classmethod
    def from_json(cls, raw: object, source: str) -> "QuantConfig":
        """Parse a config.json `quantization_config` entry; source names the file in errors."""
        if not isinstance(raw, dict) or raw.get("quant_method") != "phi_fast":
            raise ValueError(f"{source}: quantization_config {raw!r} is not phi_fast's (expected "
                             f"{{'quant_method': 'phi_fast', 'format': 'int8' | 'int4', ...}})")
        try:
            return cls(raw.get("format"), int(raw.get("group_size", DEFAULT_GROUP_SIZE)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid quantization_config {raw!r}: {e}") from e


@dataclass(frozen=True)
class QuantizedWeight:
    """A packed linear weight [out_features, in_features] (formats in the module docstring)."""

    qweight: torch.Tensor  # int8 [N, K] or uint8 [N, Kp / 2]
    scales: torch.Tensor  # int8: fp32 [N]; int4: fp16 [N, Kp / G]
    in_features: int

    @property
    def format(self) -> str:
        return "int8" if self.qweight.dtype == torch.int8 else "int4"

    @property
    def group_size(self) -> int:
        """int4: inputs per scale; int8: in_features (one scale per row)."""
        return self.in_features if self.format == "int8" else 2 * self.qweight.shape[1] // self.scales.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self) -> torch.Tensor:
        """fp32 [out_features, in_features] (the reference's dequantization)."""
        return reference.dequantize(self.qweight, self.scales, self.in_features)


def is_quantized_name(name: str) -> bool:
    """Whether load-time quantization packs the canonical weight `name` (weights.py's names)."""
    return _QUANTIZED.fullmatch(name) is not None


def quantize(weight: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    """Pack weight [N, K] (any float dtype, any device) into config's format; rows are processed a few thousand at
    a time so the fp32 temporaries stay small."""
    if weight.dim() != 2:
        raise ValueError(f"quantize: weight must be 2-D [N, K], got shape {list(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"quantize: weight must be a float tensor, got {weight.dtype}")
    parts = [_quantize_rows(weight[i:i + _ROWS_PER_STEP], config) for i in range(0, weight.shape[0], _ROWS_PER_STEP)]
    if not parts:
        parts = [_quantize_rows(weight, config)]
    return QuantizedWeight(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), weight.shape[1])


def _quantize_rows(w: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    if config.format == "int8":
        scale = w.abs().amax(dim=1) / 127.0 if w.shape[1] else torch.zeros(w.shape[0], device=w.device)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return q, scale.contiguous()
    n, k = w.shape
    g = config.group_size
    kp = max(-(-k // g), 1) * g
    w = torch.nn.functional.pad(w, (0, kp - k)).view(n, kp // g, g)
    extreme = w.gather(2, w.abs().argmax(dim=2, keepdim=True))  # [n, groups, 1], signed
    scale = (extreme / -8.0).half()
    if not torch.isfinite(scale).all():
        if torch.isnan(extreme).any():
            raise ValueError("quantize int4: the weight holds NaN")
        raise ValueError(f"quantize int4: a weight of magnitude {extreme.abs().max().item():.6g} is beyond what fp16 "
                         f"group scales hold (at most 8 * 65504)")
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = (torch.round(w / safe).clamp_(-8, 7) + 8).to(torch.uint8).view(n, kp // _RUN, 2, _RUN // 2)
    packed = q[:, :, 0] | (q[:, :, 1] << 4)  # [n, runs, 16]: byte i = q[i] | q[i + 16] << 4
    return packed.reshape(n, kp // 2).contiguous(), scale.view(n, kp // g).contiguous()
