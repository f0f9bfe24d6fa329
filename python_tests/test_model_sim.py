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
from phi_fast.kv_cache import SequencePages
from phi_fast.model import StepBatch
from phi_fast.prompt import build_prompt, tokenize_prompt
from phi_fast.sampling import SamplingParams

from checkpoints import make_tiny_checkpoints
from tokenizer_fixture import write_tokenizer

pytestmark = pytest.mark.cuda_sim
DECISIVE = 0.5  # top-1 minus top-2 logit (fp32 reference) above which bf16 must pick the same token


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


def _last_logits(model: phi_fast.Model, embeds: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the last position of `embeds` ([T, C]) through a fresh sequence in the model's pool."""
    engine = model.engine
    seq = SequencePages()
    n = embeds.shape[0]
    slots = seq.reserve(engine.pool, n)
    try:
        batch = StepBatch(positions=torch.arange(n), slot_mapping=torch.tensor(slots),
                          block_table=torch.tensor([seq.pages], dtype=torch.int32),
                          seq_lens=torch.tensor([n], dtype=torch.int32),
                          cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32), no_prefix=True)
        return model.llava.forward(embeds, batch, engine.pool)[0].float()
    finally:
        seq.free(engine.pool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_logits_match_cpu_fp32(ckpt, dtype):
    cpu = phi_fast.load(ckpt, progress=False)
    ids, px = _inputs(cpu, seed=2)
    expected = _last_logits(cpu, cpu.llava.embed_prompt(ids, px[None]))
    with ops.use_backend("sim"):
        sim = phi_fast.load(ckpt, "cpu", dtype, progress=False)
        got = _last_logits(sim, sim.llava.embed_prompt(ids, px[None]))
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
    # bf16: identical tokens until the first difference, and that one only where the fp32 reference was a close call
    prompt = cpu.llava.embed_prompt(ids, px[None])
    n_same = 0
    for i, token in enumerate(ref.output_ids):
        if got.output_ids[i] != token:
            emb = torch.cat([prompt, cpu.llava.decoder.embed(torch.tensor(ref.output_ids[:i], dtype=torch.int64))])
            top2 = _last_logits(cpu, emb).topk(2).values
            assert (top2[0] - top2[1]).item() < DECISIVE, f"step {i}: {got.output_ids[i]} != {token}"
            break
        n_same += 1
    assert n_same >= 8, f"only {n_same} identical tokens"
