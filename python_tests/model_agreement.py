"""How a low-precision model (bf16 on CUDA or under the sim backend) is held to the CPU fp32 model: last-position
logits through a fresh paged sequence, and greedy tokens that agree until a step where fp32 itself was unsure."""

from __future__ import annotations

import torch

import phi_fast
from phi_fast.kv_cache import SequencePages
from phi_fast.model import StepBatch

DECISIVE = 0.5  # top-1 minus top-2 logit (fp32 reference) above which bf16 must pick the same token


def last_logits(model: phi_fast.Model, embeds: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the last position of `embeds` ([T, C]) through a fresh sequence in the model's pool."""
    engine = model.engine
    seq = SequencePages()
    n = embeds.shape[0]
    slots = seq.reserve(engine.pool, n)
    try:
        dev = model.device
        batch = StepBatch(positions=torch.arange(n, device=dev), slot_mapping=torch.tensor(slots, device=dev),
                          block_table=torch.tensor([seq.pages], dtype=torch.int32, device=dev),
                          seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
                          cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev), no_prefix=True)
        return model.llava.forward(embeds, batch, engine.pool)[0].float()
    finally:
        seq.free(engine.pool)


def assert_tokens_agree_until_a_close_call(cpu: phi_fast.Model, ids: list[int], pixels: torch.Tensor,
                                           expected: list[int], got: list[int], min_same: int = 8) -> None:
    """`got` equals the fp32 model's `expected` greedy tokens for the prompt (ids, pixels [3, S, S]) up to the first
    difference, which may only come where fp32's top two logits were within DECISIVE; at least `min_same` agree."""
    prompt = cpu.llava.embed_prompt(ids, pixels[None])
    n_same = 0
    for i, token in enumerate(expected):
        if got[i] != token:
            emb = torch.cat([prompt, cpu.llava.decoder.embed(torch.tensor(expected[:i], dtype=torch.int64))])
            top2 = last_logits(cpu, emb).topk(2).values
            assert (top2[0] - top2[1]).item() < DECISIVE, f"step {i}: {got[i]} != {token}"
            break
        n_same += 1
    assert n_same >= min_same, f"only {n_same} identical tokens"
