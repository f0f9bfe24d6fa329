"""The whole model on its CUDA kernel path, run on the CPU by the SIMT emulator (backend "sim": every fused op is a
csrc/cuda kernel; GEMMs are torch's), against the CPU fp32 model (backend "cpp") on a tiny random checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import phi_fast
from phi_fast import ops
from phi_fast.image import preprocess
from phi_fast.prompt import build_prompt, tokenize_prompt
from phi_fast.sampling import SamplingParams

from checkpoints import make_tiny_checkpoints
from model_agreement import assert_tokens_agree_until_a_close_call, last_logits
from tokenizer_fixture import write_tokenizer

pytestmark = pytest.mark.cuda_sim


@pytest.fixture(scope="module", params=[80, 64], ids=["head_dim80", "head_dim64"])
def ckpt(request, tmp_path_factory):
    tiny = make_tiny_checkpoints(tmp_path_factory.mktemp(f"sim{request.param}"), head_dim=request.param,
                                 variants=("llava_phi",))
    write_tokenizer(tiny.paths["llava_phi"])
    return tiny.paths["llava_phi"]


def _inputs(model: phi_fast.Model, seed: int):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8), "RGB")
    ids = tokenize_prompt(model.tokenizer, build_prompt("Describe the picture in detail.", with_image=True))
    return ids, preprocess(image, image_size=model.config.vision.image_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_logits_match_cpu_fp32(ckpt, dtype):
    cpu = phi_fast.load(ckpt, progress=False)
    ids, px = _inputs(cpu, seed=2)
    expected = last_logits(cpu, cpu.llava.embed_prompt(ids, px[None]))
    with ops.use_backend("sim"):
        sim = phi_fast.load(ckpt, "cpu", dtype, progress=False)
        got = last_logits(sim, sim.llava.embed_prompt(ids, px[None]))
    assert torch.isfinite(got).all()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_match_cpu_fp32(ckpt, dtype):
    """Prefill (flash attention with the mma path in bf16), then decode steps (paged attention with split-K)."""
    cpu = phi_fast.load(ckpt, progress=False)
    ids, px = _inputs(cpu, seed=1)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ref = cpu.engine.add(ids, [px], params)
    cpu.engine.run()
    with ops.use_backend("sim"):
        sim = phi_fast.load(ckpt, "cpu", dtype, progress=False)
        got = sim.engine.add(ids, [px], params)
        sim.engine.run()
    assert len(set(ref.output_ids)) > 4, "a degenerate (repetitive) continuation would make a weak test"
    if dtype == torch.float32:
        assert got.output_ids == ref.output_ids
        return
    assert_tokens_agree_until_a_close_call(cpu, ids, px, ref.output_ids, got.output_ids)
