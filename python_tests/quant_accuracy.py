"""Test helper: how far a quantized (or bf16) model's logits are from the fp32 model's on the same weights.

    ref, quant = phi_fast.load(path), phi_fast.load(path, quantize="int4")
    acc = compare(ref, quant, ids, chunk=16)   # teacher-forced over ids, 16 tokens per step (the decode kernels)
    acc.rel_error, acc.top1, greedy_agreement(ref, quant, first_ids, 64)

Teacher forcing runs the token ids through each model's paged cache `chunk` tokens per step: chunk <= 16 takes
the decode kernels (int8 activations for packed weights), a whole-prompt chunk the prompt path (the integer GEMM,
int8 activations too; dequantized tiles without activation rounding on AMX CPUs or with
PHI_FAST_CPU_DEQUANT_PROMPTS=1). Also runnable at Phi-2's shapes with random weights (the numbers for bench/NOTES.md):
    python python_tests/quant_accuracy.py --hidden 2560 --layers 4 --positions 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import phi_fast
from phi_fast.kv_cache import PagePool, SequencePages
from phi_fast.model import StepBatch


@dataclass
class Accuracy:
    rel_error: float  # ||logits - ref|| / ||ref|| over all positions
    top1: float  # fraction of positions whose argmax equals the reference's


@torch.inference_mode()
def teacher_forced_logits(model: phi_fast.Model, ids: list[int], chunk: int) -> torch.Tensor:
    """fp32 [T, V] logits of every position of the text-only sequence ids, fed `chunk` tokens per step."""
    llava, t = model.llava, model.config.text
    n = len(ids)
    pool = PagePool(num_layers=t.num_layers, num_heads=t.num_heads, head_dim=t.head_dim, num_pages=n // 16 + 2,
                    dtype=model.dtype)
    seq = SequencePages()
    out = []
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        slots = seq.reserve(pool, hi - lo)
        batch = StepBatch(positions=torch.arange(lo, hi), slot_mapping=torch.tensor(slots),
                          block_table=torch.tensor([seq.pages], dtype=torch.int32),
                          seq_lens=torch.tensor([hi], dtype=torch.int32),
                          cu_seqlens_q=torch.tensor([0, hi - lo], dtype=torch.int32), no_prefix=lo == 0)
        embeds = llava.decoder.embed(torch.tensor(ids[lo:hi]))
        out.append(llava.forward(embeds, batch, pool, all_logits=True).float())
    return torch.cat(out)


def compare(ref: phi_fast.Model, model: phi_fast.Model, ids: list[int], chunk: int) -> Accuracy:
    a, b = teacher_forced_logits(ref, ids, chunk), teacher_forced_logits(model, ids, chunk)
    rel = float((b - a).norm() / a.norm())
    return Accuracy(rel, float((a.argmax(-1) == b.argmax(-1)).float().mean()))


@torch.inference_mode()
def greedy_agreement(ref: phi_fast.Model, model: phi_fast.Model, ids: list[int], n: int) -> int:
    """Greedy tokens (n, teacher-free, one token per decode step) equal to the reference's before the first
    divergence."""
    def greedy(m: phi_fast.Model) -> list[int]:
        seq = list(ids)
        for _ in range(n):  # a full forward per token, chunked by 16: simple and exact
            seq.append(int(teacher_forced_logits(m, seq, 16)[-1].argmax()))
        return seq[len(ids):]

    a, b = greedy(ref), greedy(model)
    same = 0
    while same < n and a[same] == b[same]:
        same += 1
    return same


def main(argv: list[str] | None = None) -> int:
    """Accuracy of bf16, int8 and int4 (each group size) against fp32 at a given size, as JSON on stdout."""
    from phi_fast.checkpoint_writer import write_random_llava_phi
    from phi_fast.config import TextConfig, VisionConfig
    sys.path.insert(0, str(Path(__file__).parent))
    from tokenizer_fixture import write_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--greedy", type=int, default=32)
    args = p.parse_args(argv)
    heads = args.hidden // 80
    text = TextConfig(vocab_size=51200, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_layers=args.layers, num_heads=heads, rotary_dim=32, max_position_embeddings=2048,
                      rope_theta=10000.0, layer_norm_eps=1e-5)
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1, image_size=28,
                          patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu", select_layer=-2,
                          select_feature="patch")
    torch.manual_seed(0)
    ids = torch.randint(0, 50000, (args.positions,)).tolist()
    results = {"hidden": args.hidden, "layers": args.layers, "positions": args.positions}
    with tempfile.TemporaryDirectory() as d:
        write_random_llava_phi(d, text=text, vision=vision, dtype=torch.float32)
        write_tokenizer(Path(d))
        ref = phi_fast.load(d, progress=False)
        variants = {"bf16": dict(dtype="bfloat16"), "int8": dict(quantize="int8")}
        variants.update({f"int4_g{g}": dict(quantize="int4", group_size=g) for g in (32, 64, 128)})
        for name, kw in variants.items():
            m = phi_fast.load(d, progress=False, **kw)
            row = {}
            for label, chunk in (("decode_path", 16), ("prompt_path", args.positions)):
                acc = compare(ref, m, ids, chunk)
                row[label] = {"rel_error": acc.rel_error, "top1": acc.top1}
            row["greedy_equal"] = greedy_agreement(ref, m, ids[:16], args.greedy)
            results[name] = row
            print(name, json.dumps(row), file=sys.stderr, flush=True)
            del m
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
