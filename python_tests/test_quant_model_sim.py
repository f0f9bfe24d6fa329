"""A quantized tiny model on the CUDA kernel path under the SIMT emulator (backend "sim": csrc/cuda/quant_linear.cu
for every packed linear) against the same quantized model on the CPU.

The CUDA kernels keep the activations as they are while the CPU decode kernels round them to int8 blocks, so the
exact oracle for the logits is the reference backend over the same packed weights (dequantize, then matmul); the
greedy tokens are held to the CPU quantized model's until a step where it was itself unsure (model_agreement.py).
"""

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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tiny = make_tiny_checkpoints(tmp_path_factory.mktemp("simq"), head_dim=80, variants=("llava_phi",))
    write_tokenizer(tiny.paths["llava_phi"])
    return tiny.paths["llava_phi"]


def _inputs(model: phi_fast.Model, seed: int):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8), "RGB")
    ids = tokenize_prompt(model.tokenizer, build_prompt("Describe the picture in detail.", with_image=True))
    return ids, preprocess(image, image_size=model.config.vision.image_size)


@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int4", 32), ("int4", 128)], ids=["int8", "int4g32", "int4g128"])
def test_quantized_logits_match_reference(ckpt, fmt, group):
    """Prompt (the dequantized-tile path) and last-position lm_head (the GEMV kernel) in fp32."""
    ref = phi_fast.load(ckpt, progress=False, quantize=fmt, group_size=group)
    ids, px = _inputs(ref, seed=2)
    with ops.use_backend("reference"):
        expected = last_logits(ref, ref.llava.embed_prompt(ids, px[None]))
    with ops.use_backend("sim"):
        sim = phi_fast.load(ckpt, "cpu", torch.float32, progress=False, quantize=fmt, group_size=group)
        got = last_logits(sim, sim.llava.embed_prompt(ids, px[None]))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("fmt,dtype", [("int8", torch.float32), ("int4", torch.float32), ("int4", torch.bfloat16)],
                         ids=["int8-fp32", "int4-fp32", "int4-bf16"])
def test_quantized_greedy_tokens_agree_with_cpu(ckpt, fmt, dtype):
    """Prefill, then decode steps whose every packed linear is the GEMV kernel (M = 1)."""
    cpu = phi_fast.load(ckpt, progress=False, quantize=fmt)
    ids, px = _inputs(cpu, seed=1)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ref = cpu.engine.add(ids, [px], params)
    cpu.engine.run()
    with ops.use_backend("sim"):
        sim = phi_fast.load(ckpt, "cpu", dtype, progress=False, quantize=fmt)
        got = sim.engine.add(ids, [px], params)
        sim.engine.run()
    assert len(set(ref.output_ids)) > 4, "a degenerate (repetitive) continuation would make a weak test"
    assert_tokens_agree_until_a_close_call(cpu, ids, px, ref.output_ids, got.output_ids)
