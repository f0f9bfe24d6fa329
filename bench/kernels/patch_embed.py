"""CLIP patch embedding from a uint8 image on the GPU to pre-LayerNorm output, ours vs PyTorch's conv2d path.

    python -m bench.kernels.patch_embed [--iters N] [--out DIR]

Ours: phi_fast.ops.patch_embed, the model's path: patchify (normalize + patchify in one pass) -> bf16 GEMM
with the conv weight as a matrix -> embed_layernorm (class token + position embedding + LayerNorm in one pass).
PyTorch: normalize -> conv2d -> flatten -> cat class -> + pos -> layer_norm. Also patchify alone vs
phi_fast.reference.patchify.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Case, run_suite
from phi_fast import ops, reference

PATCH, SIDE, HIDDEN, EPS = 14, 336, 1024, 1e-5
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def make_cases() -> list[Case]:
    dt = torch.bfloat16
    cases = []
    for batch in (1, 8):
        pixels = torch.randint(0, 256, (batch, 3, SIDE, SIDE), dtype=torch.uint8, device="cuda")
        mean = torch.tensor(MEAN, device="cuda")
        std = torch.tensor(STD, device="cuda")
        conv = torch.randn(HIDDEN, 3, PATCH, PATCH, device="cuda", dtype=dt) * 0.02
        cls = torch.randn(HIDDEN, device="cuda", dtype=dt)
        patches = (SIDE // PATCH) ** 2
        pos = torch.randn(patches + 1, HIDDEN, device="cuda", dtype=dt)
        w, b = torch.ones(HIDDEN, device="cuda", dtype=dt), torch.zeros(HIDDEN, device="cuda", dtype=dt)

        def ours(pixels=pixels, mean=mean, std=std, conv=conv, cls=cls, pos=pos, w=w, b=b):
            return ops.patch_embed(pixels, conv, cls, pos, w, b, EPS, PATCH, mean, std, backend="cpp")

        def torch_path(pixels=pixels, mean=mean, std=std, conv=conv, cls=cls, pos=pos, w=w, b=b):
            x = ((pixels.float() / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).to(dt)
            e = F.conv2d(x, conv, stride=PATCH).flatten(2).transpose(1, 2)
            e = torch.cat((cls.expand(e.shape[0], 1, -1), e), 1) + pos
            return F.layer_norm(e, (HIDDEN,), w, b, EPS)

        gemm_flops = 2 * batch * patches * 3 * PATCH * PATCH * HIDDEN
        cases.append(Case(name="patch_embed uint8 -> pre-LN", shape=f"[{batch}, 3, {SIDE}, {SIDE}]", dtype="bf16",
                          fn=ours, baseline="normalize + conv2d + cat + add + F.layer_norm",
                          baseline_fn=torch_path, flops=gemm_flops))
        cases.append(Case(
            name="patchify uint8", shape=f"[{batch}, 3, {SIDE}, {SIDE}]", dtype="uint8 -> fp32",
            fn=lambda pixels=pixels, mean=mean, std=std: ops.patchify(pixels, PATCH, mean, std, backend="cpp"),
            baseline="phi_fast.reference.patchify (PyTorch ops)",
            baseline_fn=lambda pixels=pixels, mean=mean, std=std: reference.patchify(pixels, PATCH, mean, std),
            bytes_moved=batch * 3 * SIDE * SIDE * (1 + 4), flush_l2=batch == 1))
    return cases


if __name__ == "__main__":
    run_suite("kernels-patch_embed", make_cases)
