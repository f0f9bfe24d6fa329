"""End to end on the CPU, fp32: phi_fast's engine against transformers' generate on the same random weights.

    python -m bench.e2e_cpu [--vocab 51200] [--new-tokens 64] [--reps 3] [--batch-reps 3] [--threads 2]
                            [--out DIR] [--profile]

The model is a mid-size LLaVA-Phi built with transformers (LlavaForConditionalGeneration: Phi text model with
hidden 1024, 16 heads x 64, partial rotary 0.5 -> 32, 8 layers, intermediate 4096; CLIP 224px / patch 14 with
hidden 512, 8 heads, 4 layers, read at hidden_states[-2]; mlp2x_gelu projector), weights drawn by
phi_fast.checkpoint_writer.random_tensor, saved with save_pretrained (the llava_hf layout) and loaded by
phi_fast.load. The lm_head rows of EOS and of the image token are zeroed on both sides, so neither is ever the
greedy choice and both stacks generate exactly --new-tokens tokens.

Measured in the same run, the stacks' repetitions interleaved, medians (--reps after a warm-up round at batch 1,
--batch-reps at batch 8):
- batch 1: time to first token (image encode + prefill) and decode tokens/s = (N - 1) / (time after the first
  token); inside transformers' generate a logits processor timestamps the end of every forward pass (TTFT = call
  start to the first, decode = first to last), and the greedy tokens of both stacks are compared (reported, not
  enforced);
- batch 8: 8 different requests (images and questions) submitted together vs the same 8 one after another, and
  against transformers' generate on the 8 left-padded together; throughput = generated tokens / wall time,
  image encodes and prefills included.
The weights-read floor of batch-1 decode is (bytes read per token: every decoder weight, lm_head and the KV
cache at the mean context) / the measured copy bandwidth. The batch-1 TTFT is warm: the repetitions ask the same
question about the same image, so all but the last prompt token comes from the prefix cache.
- time to first token, cold and warm (--reps, prefix cache cleared before each): a first request (nothing
  cached), then a second one with another image and question (it shares only the system prompt), then the first
  again (warm: its whole prompt is cached);
- chunked prefill (--itl-reps, budget on and off interleaved): 4 streams decode; 4 new image prompts arrive at
  once; the inter-token latency of the 4 running streams (p50, p99, max = the stall) from the arrival until every
  newcomer has its first token, and the newcomers' TTFT. On = the default token budget (512); off = a budget
  that holds every prompt whole (the newcomers prefill in one step next to the decodes, as before chunking).

OMP_WAIT_POLICY defaults to "passive" here (set before torch loads OpenMP): the C++ kernels' OpenMP team and
torch's contend when threads spin (bench/NOTES.md). The value in effect is recorded in the results.
Writes bench/results/e2e_cpu-cpu-<cores>core-<date>.{json,md} (ceilings, load of the machine during the run, the
uncommitted files of phi_fast/ and csrc/, per-repetition raw seconds); --profile prints a cProfile of batch-1
decode steps instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch (and its libgomp) loads; see the docstring

import argparse  # noqa: E402
import cProfile  # noqa: E402
import datetime  # noqa: E402
import logging  # noqa: E402
import pstats  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LogitsProcessor,  # noqa: E402
                          LogitsProcessorList, PhiConfig)

import phi_fast  # noqa: E402
from bench.common import RESULTS, ROOT, git_commit, require_current_build, write_report  # noqa: E402
from phi_fast.checkpoint_writer import random_tensor  # noqa: E402
from phi_fast.image import load_image, preprocess  # noqa: E402
from phi_fast.prompt import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt  # noqa: E402
from phi_fast.sampling import SamplingParams  # noqa: E402
from phi_fast.tokenizer import Tokenizer, write_demo_tokenizer  # noqa: E402

log = logging.getLogger("phi_fast.bench")

TEXT = dict(hidden_size=1024, num_attention_heads=16, partial_rotary_factor=0.5, num_hidden_layers=8,
            intermediate_size=4096, max_position_embeddings=2048)
VISION = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, image_size=224,
              patch_size=14, projection_dim=512)
QUESTIONS = ("What is in this picture?", "Describe the image in detail.", "What colour is the sky?",
             "How many people are there?", "Is there a dog in the kitchen?", "What is the cat doing on the sofa?",
             "Where was this photo taken?", "What time of day is it, and why do you think so?")


# --- the model --------------------------------------------------------------------------------------------

def build_checkpoint(folder: Path, vocab: int, seed: int = 0) -> LlavaForConditionalGeneration:
    """Write a random mid-size llava_hf checkpoint + demo tokenizer to folder; return the fp32 transformers model."""
    write_demo_tokenizer(folder)
    eos = Tokenizer.from_dir(folder).eos_token_id
    image_token = vocab - 1
    text = PhiConfig(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **TEXT)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_token_index=image_token)
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    llava = LlavaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in llava.named_parameters():
            p.copy_(random_tensor(name, tuple(p.shape), generator))
        llava.lm_head.weight[[image_token, eos]] = 0.0  # never chosen: both stacks always generate N tokens
    llava.generation_config.pad_token_id = eos
    llava.save_pretrained(folder)
    return llava


def decode_bytes(llava: LlavaForConditionalGeneration, context: int) -> int:
    """Bytes one batch-1 decode step must read: the decoder's weights, lm_head, one embedding row, the KV cache."""
    text = llava.config.text_config
    lm = llava.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
    weights += llava.lm_head.weight.numel() * llava.lm_head.weight.element_size()
    weights += text.hidden_size * 4  # the new token's embedding row
    kv = 2 * text.num_hidden_layers * context * text.hidden_size * 4
    return weights + kv


def requests(model: phi_fast.Model, n: int) -> list[tuple[list[int], torch.Tensor]]:
    """n different (prompt ids with the image marker, preprocessed pixels [3, S, S]) pairs."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        w, h = (320, 240) if i % 2 else (240, 300)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        px = preprocess(load_image(img), image_size=model.config.vision.image_size,
                        pad_to_square=model.config.pad_to_square)
        ids = tokenize_prompt(model.tokenizer, build_prompt(QUESTIONS[i % len(QUESTIONS)], with_image=True))
        out.append((ids, px))
    return out


def hf_ids(ids: list[int], image_token: int, n_image: int) -> list[int]:
    """Our prompt ids with each image marker expanded to n_image image tokens (what Llava's forward expects)."""
    out: list[int] = []
    for t in ids:
        out.extend([image_token] * n_image if t == IMAGE_TOKEN_INDEX else [t])
    return out


# --- timing -----------------------------------------------------------------------------------------------

def ours_single(model: phi_fast.Model, ids: list[int], px: torch.Tensor, n: int) -> dict[str, object]:
    """One request through the engine (px: [3, S, S]): encode s (in add), ttft s (add + prefill step), decode s
    (the N - 1 later steps), tokens."""
    engine, params = model.engine, SamplingParams(max_new_tokens=n, ignore_eos=True)
    t0 = time.perf_counter()
    req = engine.add(ids, [px], params)
    t1 = time.perf_counter()
    engine.step()  # prefill: the first token
    t2 = time.perf_counter()
    while not req.finished:
        engine.step()
    t3 = time.perf_counter()
    if req.error is not None:
        raise req.error
    return {"encode": t1 - t0, "ttft": t2 - t0, "decode": t3 - t2, "tokens": list(req.output_ids)}


def first_token_s(model: phi_fast.Model, ids: list[int], px: torch.Tensor, n: int = 2) -> float:
    """Seconds from add to the first token of one request (px: [3, S, S]), then run it to the end."""
    t0 = time.perf_counter()
    req = model.engine.add(ids, [px], SamplingParams(max_new_tokens=n, ignore_eos=True))
    while not req.output_ids and not req.finished:
        model.engine.step()
    t1 = time.perf_counter()
    model.engine.run()
    if req.error is not None:
        raise req.error
    return t1 - t0


def ttft_cold_warm(model: phi_fast.Model, reqs: list[tuple[list[int], torch.Tensor]], reps: int) -> dict[str, object]:
    """TTFT of a cold first request, of a second one sharing only the system prompt (another image, another
    question), and of the first again (warm); medians over reps, the prefix cache cleared before each."""
    runs: dict[str, list[float]] = {"first_cold": [], "second_system_prompt_only": [], "first_again_warm": []}
    first, second = reqs[0], reqs[1]
    for _ in range(reps + 1):  # the first round warms up
        model.engine.clear_prefix_cache()
        times = [first_token_s(model, *first), first_token_s(model, *second), first_token_s(model, *first)]
        for key, t in zip(runs, times):
            runs[key].append(t)
    runs = {k: v[1:] for k, v in runs.items()}
    med = {k: round(statistics.median(v) * 1e3, 1) for k, v in runs.items()}
    shared = first[0].index(IMAGE_TOKEN_INDEX)  # the system prompt and "USER:", before the image
    return {"name": "time to first token: cold, system prompt shared, warm",
            "shape": f"{len(first[0]) + model.llava.image_tokens - 1}-token prompt (1 image)", "dtype": "fp32",
            "ttft_ms": med["first_cold"], "ttft_second_ms": med["second_system_prompt_only"],
            "ttft_warm_ms": med["first_again_warm"], "system_prompt_tokens": shared,
            "raw_s": {k: [round(t, 3) for t in v] for k, v in runs.items()}}


def arrivals_run(model: phi_fast.Model, reqs: list[tuple[list[int], torch.Tensor]], budget: int,
                 n: int) -> dict[str, list[float]]:
    """4 streams decode, 4 image prompts arrive at once (token budget `budget`): the streams' inter-token gaps
    (s) from the arrival until every newcomer has its first token, the newcomers' TTFTs (s), the step kinds."""
    engine = model.engine
    engine.clear_prefix_cache()
    engine.scheduler.token_budget = budget
    running = [engine.add(ids, [px], SamplingParams(max_new_tokens=n, ignore_eos=True)) for ids, px in reqs[:4]]
    while any(len(r.output_ids) < 4 for r in running):
        engine.step()
    engine.clear_prefix_cache()  # the newcomers share the system prompt with the running streams, not more
    t0 = time.perf_counter()
    last = {r.id: t0 for r in running}
    counts = {r.id: len(r.output_ids) for r in running}
    new = [engine.add(ids, [px], SamplingParams(max_new_tokens=4, ignore_eos=True)) for ids, px in reqs[4:8]]
    gaps, ttft, kinds = [], {}, []
    while len(ttft) < len(new):
        engine.step()
        now = time.perf_counter()
        kinds.append(engine.last_plan.kind)
        for r in running:
            if len(r.output_ids) > counts[r.id]:
                gaps.append(now - last[r.id])
                last[r.id], counts[r.id] = now, len(r.output_ids)
        for r in new:
            if r.output_ids and r.id not in ttft:
                ttft[r.id] = now - t0
        if any(r.finished for r in running):
            raise RuntimeError(f"a running stream finished during the arrivals: raise n ({n})")
    engine.run()
    for r in running + new:
        if r.error is not None:
            raise r.error
    return {"gaps": gaps, "ttft": list(ttft.values()), "kinds": kinds}


def chunked_prefill(model: phi_fast.Model, reqs: list[tuple[list[int], torch.Tensor]], reps: int,
                    n: int) -> list[dict[str, object]]:
    """Budget on (the engine's default) and off (every prompt whole), interleaved: ITL of the running streams
    while 4 prompts arrive, and the newcomers' TTFT."""
    on = model.engine.token_budget
    off = 8 * model.config.text.max_position_embeddings
    runs: dict[str, list[dict[str, list[float]]]] = {"on": [], "off": []}
    for rep in range(reps + 1):  # the first round warms up
        for key, budget in (("off", off), ("on", on)):
            result = arrivals_run(model, reqs, budget, n)
            if rep:
                runs[key].append(result)
    model.engine.scheduler.token_budget = on
    out = []
    for key, budget in (("on", on), ("off", off)):
        gaps = [g for r in runs[key] for g in r["gaps"]]
        ttfts = [t for r in runs[key] for t in r["ttft"]]
        stall = max(gaps)
        out.append({"name": f"4 streams while 4 image prompts arrive, token budget {key}",
                    "shape": f"budget {budget}, {len(reqs[4][0]) + model.llava.image_tokens - 1}-token prompts",
                    "dtype": "fp32", "itl_p50_ms": round(float(np.percentile(gaps, 50)) * 1e3, 1),
                    "itl_p99_ms": round(float(np.percentile(gaps, 99)) * 1e3, 1),
                    "itl_max_ms": round(stall * 1e3, 1),
                    "newcomer_ttft_median_ms": round(statistics.median(ttfts) * 1e3, 1),
                    "newcomer_ttft_max_ms": round(max(ttfts) * 1e3, 1),
                    "stall_over_ttft": round(stall / statistics.median(ttfts), 2),
                    "steps": {k: sum(r["kinds"].count(k) for r in runs[key]) for k in ("decode", "prefill", "mixed")},
                    "raw_s": {"gaps": [round(g, 4) for g in gaps], "ttft": [round(t, 3) for t in ttfts]}})
    return out


def ours_batch(model: phi_fast.Model, reqs: list[tuple[list[int], torch.Tensor]], n: int) -> int:
    """All (ids, px [3, S, S]) requests submitted together, run to the end; returns the generated token count."""
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    submitted = [model.engine.add(ids, [px], params) for ids, px in reqs]
    model.engine.run()
    for r in submitted:
        if r.error is not None:
            raise r.error
    return sum(len(r.output_ids) for r in submitted)


class StepClock(LogitsProcessor):
    """Records when generate asks for each token's logits processing: right after each forward pass."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def hf_generate(llava: LlavaForConditionalGeneration, ids: list[list[int]], px: torch.Tensor, n: int,
                pad: int) -> dict[str, object]:
    """Greedy generate of exactly n tokens for left-padded prompts (px: [B, 3, S, S]): ttft s (the call's start
    to the first forward's end), decode s (first to last forward's end: n - 1 forward passes), tokens [B, n]."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    clock = StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = llava.generate(input_ids=input_ids, attention_mask=mask, pixel_values=px, max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    return {"ttft": clock.times[0] - t0, "decode": clock.times[-1] - clock.times[0], "tokens": out[:, width:]}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall seconds of one call of fn, and its result."""
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: bool = True) -> dict[str, list]:
    """Runs every fn once per repetition, in turn (so load drift on a shared machine hits all of them alike);
    returns name -> [(seconds, result)] of the timed repetitions. With warmup, one untimed round first."""
    if warmup:
        for fn in fns.values():
            fn()
    out: dict[str, list] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            out[name].append(timed(fn))
    return out


def median_s(runs: list[tuple[float, object]]) -> float:
    return statistics.median(t for t, _ in runs)


def measure_ceilings(reps: int = 10) -> dict[str, float]:
    """copy_gbps: a 256 MiB memcpy (bytes read + written per second); read_gbps: a sum over 256 MiB of fp32
    (a read-only stream, like a GEMV's weights); fp32_gflops: a 2048^3 fp32 matmul. Medians of reps."""
    n = 1 << 28
    src, dst = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    x = torch.ones(n // 4)
    m = 2048
    a, b = torch.randn(m, m), torch.randn(m, m)
    runs = interleaved({"copy": lambda: dst.copy_(src), "read": lambda: x.sum(), "mm": lambda: a @ b}, reps)
    return {"copy_gbps": round(2 * n / median_s(runs["copy"]) / 1e9, 1),
            "read_gbps": round(n / median_s(runs["read"]) / 1e9, 1),
            "fp32_gflops": round(2 * m ** 3 / median_s(runs["mm"]) / 1e9, 1)}


# --- the benchmark ----------------------------------------------------------------------------------------

def batch1(model: phi_fast.Model, llava: LlavaForConditionalGeneration, req: tuple[list[int], torch.Tensor],
           n: int, reps: int, pad: int, ceilings: dict[str, float]) -> dict[str, object]:
    ids, px = req
    full = hf_ids(ids, llava.config.image_token_index, model.llava.image_tokens)
    runs = interleaved({"ours": lambda: ours_single(model, ids, px, n),
                        "hf": lambda: hf_generate(llava, [full], px[None], n, pad)}, reps)
    ours, hf = [r for _, r in runs["ours"]], [r for _, r in runs["hf"]]
    ttft, decode, encode = (statistics.median(r[k] for r in ours) for k in ("ttft", "decode", "encode"))
    hf_ttft, hf_decode = (statistics.median(r[k] for r in hf) for k in ("ttft", "decode"))
    ours_tokens, theirs = ours[-1]["tokens"], hf[-1]["tokens"][0].tolist()
    same = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs)) if a != b), min(len(ours_tokens), len(theirs)))
    tok_s, hf_tok_s = (n - 1) / decode, (n - 1) / hf_decode
    nbytes = decode_bytes(llava, len(full) + n // 2)
    floor = ceilings["copy_gbps"] * 1e9 / nbytes
    return {"name": "decode batch 1 (TTFT warm)", "shape": f"{len(full)}-token prompt (1 image) + {n} new",
            "dtype": "fp32",
            "tok_s": round(tok_s, 2), "ttft_ms": round(ttft * 1e3, 1), "encode_ms": round(encode * 1e3, 1),
            "floor_tok_s": round(floor, 2), "floor_read_tok_s": round(ceilings["read_gbps"] * 1e9 / nbytes, 2),
            "bytes_per_token_mb": round(nbytes / 1e6, 1), "gbps": round(nbytes * tok_s / 1e9, 2),
            "pct_floor": round(100 * tok_s / floor, 1),
            "baseline": f"transformers {transformers.__version__} generate (sdpa)",
            "baseline_tok_s": round(hf_tok_s, 2), "baseline_ttft_ms": round(hf_ttft * 1e3, 1),
            "speedup": round(tok_s / hf_tok_s, 2), "ttft_speedup": round(hf_ttft / ttft, 2),
            "greedy_match": f"{same}/{n}",
            "raw_s": {f"{who}_{k}": [round(r[k], 3) for r in rs] for who, rs in (("ours", ours), ("hf", hf))
                      for k in ("ttft", "decode")}}


def batch8(model: phi_fast.Model, llava: LlavaForConditionalGeneration, reqs: list[tuple[list[int], torch.Tensor]],
           n: int, reps: int, pad: int) -> list[dict[str, object]]:
    count = len(reqs) * n
    image_token, n_image = llava.config.image_token_index, model.llava.image_tokens
    full = [hf_ids(ids, image_token, n_image) for ids, _ in reqs]
    pixels = torch.stack([px for _, px in reqs])
    runs = interleaved({"together": lambda: ours_batch(model, reqs, n),
                        "sequential": lambda: sum(ours_batch(model, [r], n) for r in reqs),
                        "hf": lambda: hf_generate(llava, full, pixels, n, pad)["tokens"].numel()},
                       reps, warmup=False)  # batch1 warmed both stacks up on these shapes
    for name, rs in runs.items():
        if any(got != count for _, got in rs):
            raise RuntimeError(f"{name}: generated {[got for _, got in rs]} tokens, expected {count} each time")
    together, sequential, hf = (median_s(runs[k]) for k in ("together", "sequential", "hf"))
    shape = f"{len(reqs)} requests x ({min(map(len, full))}-{max(map(len, full))} prompt + {n} new)"
    tok_s = round(count / together, 2)
    raw = {k: [round(t, 2) for t, _ in rs] for k, rs in runs.items()}
    return [
        {"name": f"batch {len(reqs)}: together vs one after another", "shape": shape, "dtype": "fp32",
         "tok_s": tok_s, "baseline": f"phi_fast, the {len(reqs)} one after another",
         "baseline_tok_s": round(count / sequential, 2), "speedup": round(sequential / together, 2),
         "raw_s": {k: raw[k] for k in ("together", "sequential")}},
        {"name": f"batch {len(reqs)}: together vs transformers", "shape": shape, "dtype": "fp32", "tok_s": tok_s,
         "baseline": f"transformers {transformers.__version__} generate (sdpa), the {len(reqs)} left-padded together",
         "baseline_tok_s": round(count / hf, 2), "speedup": round(hf / together, 2),
         "raw_s": {k: raw[k] for k in ("together", "hf")}},
    ]


def profile_decode(model: phi_fast.Model, req: tuple[list[int], torch.Tensor], steps: int = 16) -> None:
    """Print a cProfile of `steps` batch-1 decode steps (by own time)."""
    ids, px = req
    r = model.engine.add(ids, [px], SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
    model.engine.step()
    prof = cProfile.Profile()
    prof.enable()
    while not r.finished:
        model.engine.step()
    prof.disable()
    print(f"cProfile of {steps} decode steps at batch 1 (own time):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def _uncommitted() -> list[str]:
    """`git status --porcelain` lines of phi_fast/ and csrc/: the measured code differs from the commit by these."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "phi_fast", "csrc"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ["unknown"]
    return out.stdout.splitlines()


def _busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes on the machine were busy, CPU seconds of this process) so far; None without
    /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    return busy, usage.ru_utime + usage.ru_stime


def _others_share(start: tuple[float, float] | None, wall0: float) -> float | None:
    """Fraction of the machine's cores that other processes kept busy since `start` (0 on a quiet machine)."""
    end = _busy_seconds()
    if start is None or end is None:
        return None
    others = (end[0] - start[0]) - (end[1] - start[1])
    return round(max(others, 0.0) / ((time.perf_counter() - wall0) * os.cpu_count()), 2)


def markdown(report: dict[str, object]) -> str:
    c = report["ceilings"]
    dirty = f" + {len(report['uncommitted'])} uncommitted files" if report["uncommitted"] else ""
    lines = [f"# {report['suite']} on {report['gpu']} ({report['date']}, commit {report['commit']}{dirty}, torch "
             f"{report['torch']}, {report['threads']} threads, OMP_WAIT_POLICY={report['omp_wait_policy']})", "",
             f"Model: {report['model']}", "",
             f"Ceilings: copy {c['copy_gbps']} GB/s (read + write), read {c['read_gbps']} GB/s, fp32 matmul "
             f"{c['fp32_gflops']} GFLOP/s. Load average (1 min) before / after: {report['loadavg_1min']['before']} / "
             f"{report['loadavg_1min']['after']}; other processes kept {report['others_cpu_share']} of the cores busy "
             f"during the run (0 = a quiet machine).",
             "",
             "| name | shape | tok/s | TTFT ms | floor tok/s | baseline | baseline tok/s | baseline TTFT ms | speedup |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in report["results"][:3]:
        lines.append(f"| {r['name']} | {r['shape']} | {r['tok_s']} | {r.get('ttft_ms', '')} | "
                     f"{r.get('floor_tok_s', '')} | {r['baseline']} | {r['baseline_tok_s']} | "
                     f"{r.get('baseline_ttft_ms', '')} | {r['speedup']}x |")
    b1 = report["results"][0]
    lines += ["", f"Batch 1: image encode {b1['encode_ms']} ms of the TTFT; decode reads {b1['bytes_per_token_mb']} MB "
              f"per token, {b1['gbps']} GB/s achieved = {b1['pct_floor']}% of the copy-bandwidth floor "
              f"(read-only floor {b1['floor_read_tok_s']} tok/s); TTFT {b1['ttft_speedup']}x transformers'; greedy "
              f"tokens equal to transformers' for the first {b1['greedy_match']}. Its TTFT is warm: the repetitions "
              f"ask the same question about the same image, so the prompt comes from the prefix cache but for its "
              f"last token."]
    t = report["results"][3]
    lines += ["", f"Time to first token ({t['shape']}, median of the repetitions, prefix cache cleared before each): "
              f"cold {t['ttft_ms']} ms; a second request with another image and question, sharing only the "
              f"{t['system_prompt_tokens']}-token system prompt, {t['ttft_second_ms']} ms; the first again (warm) "
              f"{t['ttft_warm_ms']} ms.", "",
              "| chunked prefill: 4 streams decode, 4 image prompts arrive | ITL p50 ms | ITL p99 ms | stall (max ITL) ms "
              "| newcomer TTFT median / max ms | stall / TTFT | steps decode / prefill / mixed |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["results"][4:]:
        st = r["steps"]
        lines.append(f"| {r['name']} ({r['shape']}) | {r['itl_p50_ms']} | {r['itl_p99_ms']} | {r['itl_max_ms']} | "
                     f"{r['newcomer_ttft_median_ms']} / {r['newcomer_ttft_max_ms']} | {r['stall_over_ttft']} | "
                     f"{st['decode']} / {st['prefill']} / {st['mixed']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=51200, help="text vocabulary (51200 = Phi-2's)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (N)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of the batch-1 runs (median)")
    parser.add_argument("--batch-reps", type=int, default=3, help="timed repetitions of the batched runs (median)")
    parser.add_argument("--batch", type=int, default=8, help="requests in the batched measurement (>= 8)")
    parser.add_argument("--itl-reps", type=int, default=2, help="repetitions of the arrivals, budget on and off")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both stacks")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the result files")
    parser.add_argument("--profile", action="store_true", help="only print a cProfile of batch-1 decode steps")
    args = parser.parse_args(argv)
    require_current_build()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="phi_fast_e2e_cpu_") as tmp:
        llava = build_checkpoint(Path(tmp), args.vocab)
        model = phi_fast.load(tmp, progress=False)
    pad = llava.generation_config.pad_token_id
    reqs = requests(model, args.batch)
    if args.profile:
        ours_single(model, *reqs[0], 4)
        profile_decode(model, reqs[0])
        return {}
    load_before, wall0, busy0 = os.getloadavg(), time.perf_counter(), _busy_seconds()
    ceilings = measure_ceilings()
    log.info("ceilings: %s", ceilings)
    results = [batch1(model, llava, reqs[0], args.new_tokens, args.reps, pad, ceilings)]
    log.info("%s", results[0])
    results += batch8(model, llava, reqs, args.new_tokens, args.batch_reps, pad)
    log.info("%s", results[1:3])
    results.append(ttft_cold_warm(model, reqs, args.reps))
    log.info("%s", results[3])
    results += chunked_prefill(model, reqs, args.itl_reps, args.new_tokens)
    log.info("%s", results[4:])
    date = datetime.date.today().isoformat()
    t, v = TEXT, VISION
    report = {"suite": "e2e_cpu", "gpu": f"cpu-{os.cpu_count()}core", "torch": torch.__version__, "cuda": None,
              "commit": git_commit(), "uncommitted": _uncommitted(), "date": date, "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "loadavg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
              "others_cpu_share": _others_share(busy0, wall0),
              "attn_implementation": llava.config.text_config._attn_implementation,
              "model": (f"Phi hidden {t['hidden_size']}, {t['num_attention_heads']} heads x "
                        f"{t['hidden_size'] // t['num_attention_heads']} (rotary "
                        f"{int(t['partial_rotary_factor'] * t['hidden_size'] // t['num_attention_heads'])}), "
                        f"{t['num_hidden_layers']} layers, intermediate {t['intermediate_size']}, vocab {args.vocab}; "
                        f"CLIP {v['image_size']}px/{v['patch_size']}, hidden {v['hidden_size']}, "
                        f"{v['num_attention_heads']} heads, {v['num_hidden_layers']} layers; random weights, fp32"),
              "ceilings": ceilings, "results": results}
    write_report(args.out / f"e2e_cpu-{report['gpu']}-{date}", report, markdown(report))
    log.info("%s", markdown(report))
    return report


if __name__ == "__main__":
    main()
