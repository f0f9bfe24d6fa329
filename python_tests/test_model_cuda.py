"""The whole model on CUDA (bf16/fp16 kernels + cuBLAS) against the CPU fp32 path on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import phi_fast
from phi_fast import ops
from phi_fast.image import preprocess, preprocess_uint8
from phi_fast.prompt import build_prompt, tokenize_prompt
from phi_fast.sampling import SamplingParams

from checkpoints import make_tiny_checkpoints
from model_agreement import assert_tokens_agree_until_a_close_call, last_logits
from tokenizer_fixture import write_tokenizer

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", params=[80, 64], ids=["head_dim80", "head_dim64"])
def ckpt(request, tmp_path_factory):
    if "cuda" not in ops.available_backends():
        pytest.skip("phi_fast was built without CUDA kernels")
    tiny = make_tiny_checkpoints(tmp_path_factory.mktemp(f"cuda{request.param}"), head_dim=request.param,
                                 variants=("llava_phi",))
    write_tokenizer(tiny.paths["llava_phi"])
    return tiny.paths["llava_phi"]


def _inputs(model: phi_fast.Model, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8), "RGB")
    ids = tokenize_prompt(model.tokenizer, build_prompt("Describe the picture in detail.", with_image=True))
    return image, ids, preprocess(image, image_size=model.config.vision.image_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vision_tower_matches_cpu_fp32(ckpt, dtype):
    cpu = phi_fast.load(ckpt, progress=False)
    gpu = phi_fast.load(ckpt, "cuda", dtype, progress=False)
    image, _, px = _inputs(cpu)
    expected = cpu.llava.encode_images(px[None])
    got = gpu.llava.encode_images(px[None].cuda()).float().cpu()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=5e-2 * expected.abs().max().item(), rtol=5e-2)
    # the uint8 path (rescale + normalize inside patch_embed) gives the same features
    raw = preprocess_uint8(image, image_size=cpu.config.vision.image_size)
    got_u8 = gpu.llava.encode_images(raw[None].cuda()).float().cpu()
    torch.testing.assert_close(got_u8, got, atol=2e-2 * got.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_decoding_matches_cpu_fp32_where_decisive(ckpt, dtype):
    cpu = phi_fast.load(ckpt, progress=False)
    gpu = phi_fast.load(ckpt, "cuda", dtype, progress=False)
    _, ids, px = _inputs(cpu, seed=1)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ref = cpu.engine.add(ids, [px], params)
    cpu.engine.run()
    got = gpu.engine.add(ids, [px.cuda()], params)
    gpu.engine.run()
    assert_tokens_agree_until_a_close_call(cpu, ids, px, ref.output_ids, got.output_ids)


def test_prefill_logits_within_bf16_tolerance(ckpt):
    cpu = phi_fast.load(ckpt, progress=False)
    gpu = phi_fast.load(ckpt, "cuda", torch.bfloat16, progress=False)
    _, ids, px = _inputs(cpu, seed=2)
    expected = last_logits(cpu, cpu.llava.embed_prompt(ids, px[None]))
    got = last_logits(gpu, gpu.llava.embed_prompt(ids, px[None].cuda())).cpu()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=3e-2 * expected.abs().max().item(), rtol=3e-2)
