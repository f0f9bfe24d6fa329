"""End to end on a CUDA GPU at the real LLaVA-Phi sizes, bf16: phi_fast next to transformers on the same weights.

    python -m bench.e2e [--new-tokens 256] [--batches 8,32,64] [--batch-new-tokens 128] [--reps 3] [--out DIR]
                        [--no-transformers] [--no-compile] [--budget-s 360] [--grace-s 60]

Model: Phi-2 (hidden 2560, 32 layers, 32 heads x 80, rotary 32, MLP 10240, vocab 51200) + CLIP ViT-L/14-336
(hidden 1024, 24 layers, 16 heads, MLP 4096, read at hidden_states[-2]) + the mlp2x_gelu projector. Random weights
are drawn on the GPU (phi_fast.checkpoint_writer.random_tensor's rules, seeded) straight into transformers'
LlavaForConditionalGeneration in bf16 and saved once with save_pretrained: the llava_hf layout, which has no
lm_head bias (phi_fast adds a zero bias), then loaded by phi_fast.load. Both stacks run the very same bf16 tensors;
no fp32 copy is ever written (generating on the CPU and writing a 12 GB fp32 checkpoint would dominate the run).
The lm_head rows of EOS and of the image token are zeroed on both sides. Prompts are token ids of the demo
tokenizer (its vocabulary is small; the ids are just ids) after one image marker.

Measured (phi_fast first, then transformers on the same inputs):
- ceilings: a 1 GiB device copy and an 8192^3 bf16 matmul (bench.common.measure_ceilings);
- image encode: one preprocessed [1, 3, 336, 336] image -> [1, 576, 2560] projected rows (CUDA events, median)
  vs transformers' get_image_features;
- time to first token: one image + a 32-token question (engine.add + the prefill step) vs
  generate(max_new_tokens=1);
- batch-1 decode: 576 + 64 = 640-token prompt, --new-tokens greedy tokens (ignore_eos); tok/s = (N - 1) / (time
  after the first token); bytes per token = every decoder weight + lm_head + the KV cache at the mean context,
  achieved GB/s next to the floor copy_gbps / bytes. Through the engine (what users get), and through
  phi_fast.cuda_graphs.DecodeGraphRunner directly (graphs + GPU sampling, tokens fed back on the device and
  read one step late: the engine's target). transformers: generate with sdpa, flash_attention_2 when importable,
  and a static cache (which transformers compiles with torch.compile), each in try/except;
- batched decode: --batches requests (different images) of 640-token prompts + --batch-new-tokens new tokens
  (~700 mean context); throughput = tokens generated after the last prefill / time, engine and runner;
- peak GPU memory of phi_fast (allocated beyond what was resident before it loaded).
Writes bench/results/e2e-<gpu>-<date>.{json,md}; the whole run is meant to take well under 8 minutes on an H200
(transformers' compile is skipped when --budget-s would be exceeded).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import phi_fast
from bench.common import (RESULTS, git_commit, gpu_slug, measure_ceilings, require_current_build, time_us,
                          write_report)
from phi_fast import ops
from phi_fast.checkpoint_writer import random_tensor
from phi_fast.cuda_graphs import DecodeGraphRunner
from phi_fast.image import preprocess
from phi_fast.prompt import IMAGE_TOKEN_INDEX
from phi_fast.sampling import SamplingParams
from phi_fast.tokenizer import Tokenizer, write_demo_tokenizer

log = logging.getLogger("phi_fast.bench")

TEXT = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
            num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=336, patch_size=14, projection_dim=768)
TTFT_TEXT_TOKENS = 32  # the question after the image: 576 + 32 rows
DECODE_TEXT_TOKENS = 64  # 576 + 64 = 640-token context for decode
MAX_NUM_SEQS = 64


# --- the model --------------------------------------------------------------------------------------------

def build_checkpoint(folder: Path, text: dict, vision: dict, device: str, seed: int = 0):
    """Random weights in transformers' Llava (bf16 on `device`), saved to folder with the demo tokenizer.

    Returns (the transformers model, seconds to build, seconds to save)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, PhiConfig

    t0 = time.perf_counter()
    write_demo_tokenizer(folder)
    eos = Tokenizer.from_dir(folder).eos_token_id
    image_token = text["vocab_size"] - 1
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision),
                         text_config=PhiConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **text),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_token_index=image_token)
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    generator = torch.Generator(device=device).manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # bf16 parameters; buffers made in fp32 on purpose (rotary) stay fp32
    try:
        with torch.device(device):
            llava = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.device(device):
        with torch.no_grad():
            for name, p in llava.named_parameters():
                p.copy_(random_tensor(name, tuple(p.shape), generator))
            llava.lm_head.weight[[image_token, eos]] = 0.0  # never chosen: both stacks generate every token asked
    llava.generation_config.pad_token_id = eos
    _sync()
    t1 = time.perf_counter()
    llava.save_pretrained(folder)
    return llava, t1 - t0, time.perf_counter() - t1


def decode_bytes(model: phi_fast.Model, seqs: int, mean_context: float) -> float:
    """Bytes one decode step over `seqs` sequences must read: every decoder weight, lm_head, the final LayerNorm,
    one embedding row per sequence, and each sequence's K and V at the mean context."""
    t = model.config.text
    w = model.llava.decoder.w
    weights = sum(v.numel() * v.element_size() for k, v in w.items() if k.startswith("text.") and k != "text.embed")
    elem = w["text.embed"].element_size()
    kv = 2 * t.num_layers * mean_context * t.hidden_size * elem
    return weights + seqs * (t.hidden_size * elem + kv)


def request_inputs(model: phi_fast.Model, n: int, text_tokens: int) -> list[tuple[list[int], torch.Tensor]]:
    """n (prompt ids = image marker + text_tokens random ids, preprocessed [3, S, S] pixels), images differ."""
    eos = model.tokenizer.eos_token_id
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        size = model.config.vision.image_size
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
        ids = [IMAGE_TOKEN_INDEX] + rng.integers(0, eos, text_tokens).tolist()
        out.append((ids, preprocess(image, image_size=size, pad_to_square=model.config.pad_to_square)))
    return out


# --- phi_fast ---------------------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _wall(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds of fn() with the GPU drained before and after, and its result."""
    _sync()
    t = time.perf_counter()
    result = fn()
    _sync()
    return time.perf_counter() - t, result


def ours_ttft(model: phi_fast.Model, inputs: tuple[list[int], torch.Tensor], reps: int) -> float:
    """Median seconds from engine.add (image encode, prompt embedding) to the first token on the host."""
    ids, px = inputs
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def first_token() -> None:
        req = model.engine.add(ids, [px], params)
        while not req.finished:
            model.engine.step()

    first_token()  # warm-up
    return statistics.median(_wall(first_token)[0] for _ in range(reps))


def prefilled(model: phi_fast.Model, inputs: list[tuple[list[int], torch.Tensor]], new_tokens: int):
    """Submit the requests and step the engine until every one is prefilled (holds its first token)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [model.engine.add(ids, [px], params) for ids, px in inputs]
    while model.engine.waiting:
        model.engine.step()
    return reqs


def ours_engine_decode(model: phi_fast.Model, inputs: list[tuple[list[int], torch.Tensor]],
                       new_tokens: int) -> tuple[float, list[list[int]]]:
    """Engine decode throughput (tokens generated after the last prefill / seconds) and the outputs."""
    reqs = prefilled(model, inputs, new_tokens)
    before = sum(len(r.output_ids) for r in reqs)
    seconds, _ = _wall(model.engine.run)
    for r in reqs:
        if r.error is not None:
            raise r.error
    return (sum(len(r.output_ids) for r in reqs) - before) / seconds, [r.output_ids for r in reqs]


def runner_decode(model: phi_fast.Model, runner: DecodeGraphRunner, reqs, steps: int) -> tuple[float, list[list[int]]]:
    """`steps` decode steps of the prefilled requests through the runner, the way the pipelined engine would:
    inputs fed back on the device, tokens read one step late. -> (tokens/s, the tokens of each request)."""
    pool = model.engine.pool
    out = [list(r.output_ids) for r in reqs]

    def run() -> None:
        pending = None
        for _ in range(steps):
            step = runner.new_step(len(reqs))
            for i, r in enumerate(reqs):
                slot = r.seq.reserve(pool, 1)[0]
                source = {"prev_row": i} if pending is not None else {"token": out[i][-1]}
                step.set_row(i, position=r.seq.length - 1, slot=slot, pages=r.seq.pages, **source)
            launched = runner.launch(step)
            if pending is not None:
                for tokens, t in zip(out, pending.result()):
                    tokens.append(t)
            pending = launched
        for tokens, t in zip(out, pending.result()):
            tokens.append(t)

    seconds, _ = _wall(run)
    for r in reqs:
        model.engine.abort(r)
    return len(reqs) * steps / seconds, out


# --- transformers -----------------------------------------------------------------------------------------

def hf_prompt(ids: list[int], image_token: int, n_image: int) -> list[int]:
    """Our prompt ids with each image marker expanded to n_image image tokens (what Llava's forward expects)."""
    out: list[int] = []
    for t in ids:
        out.extend([image_token] * n_image if t == IMAGE_TOKEN_INDEX else [t])
    return out


def hf_generate(llava, ids: list[int], px: torch.Tensor, n: int, **kwargs) -> list[int]:
    """Greedy generate of exactly n tokens for one prompt (pixels [3, S, S]) -> the new tokens."""
    dev = llava.device
    input_ids = torch.tensor([ids], device=dev)
    with torch.inference_mode():
        out = llava.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pixel_values=px[None].to(dev, torch.bfloat16), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def hf_batch1(llava, ids: list[int], px: torch.Tensor, ttft_ids: list[int], n: int, reps: int, warmup_tokens: int,
              **kwargs) -> dict[str, object]:
    """TTFT (generate 1 token of the short prompt) and decode tok/s ((n - 1) / (time of n - time of 1)), medians,
    after one generate of warmup_tokens (n for a static cache: it is sized by the length, and compiled for it)."""
    t_warm, _ = _wall(lambda: hf_generate(llava, ids, px, warmup_tokens, **kwargs))
    ttft = statistics.median(_wall(lambda: hf_generate(llava, ttft_ids, px, 1, **kwargs))[0] for _ in range(reps))
    first = statistics.median(_wall(lambda: hf_generate(llava, ids, px, 1, **kwargs))[0] for _ in range(reps))
    runs = [_wall(lambda: hf_generate(llava, ids, px, n, **kwargs)) for _ in range(reps)]
    total = statistics.median(t for t, _ in runs)
    tok_s = round((n - 1) / (total - first), 1) if total > first else None  # None: too noisy to tell
    return {"ttft_ms": round(ttft * 1e3, 2), "tok_s": tok_s,
            "warmup_s": round(t_warm, 1), "tokens": runs[-1][1]}


def hf_image_encode_us(llava, px: torch.Tensor, iters: int) -> float:
    pixels = px[None].to(llava.device, torch.bfloat16)

    def encode() -> None:
        with torch.inference_mode():
            llava.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                           vision_feature_select_strategy="default")

    return time_us(encode, iters)


def set_attention(llava, impl: str) -> None:
    if hasattr(llava, "set_attn_implementation"):
        llava.set_attn_implementation(impl)
    else:
        for cfg in (llava.config, llava.config.text_config, llava.config.vision_config):
            cfg._attn_implementation = impl


def transformers_runs(llava, ours: dict, args, deadline: float) -> dict[str, dict[str, object]]:
    """Every transformers variant that works here: name -> figures (or the error)."""
    import transformers

    def out_of_time(signum, frame):
        raise TimeoutError(f"past the time budget ({args.budget_s} + {args.grace_s} s)")

    signal.signal(signal.SIGALRM, out_of_time)
    out: dict[str, dict[str, object]] = {}
    variants: list[tuple[str, str, dict]] = [("sdpa", "sdpa", {})]
    if importlib.util.find_spec("flash_attn") is not None:
        variants.append(("flash_attention_2", "flash_attention_2", {}))
    if not args.no_compile:
        variants.append(("sdpa + static cache (torch.compile)", "sdpa", {"cache_implementation": "static"}))
    for name, impl, kwargs in variants:
        label = f"transformers {transformers.__version__} generate ({name})"
        if time.monotonic() > deadline:
            out[label] = {"error": f"skipped: past the --budget-s of {args.budget_s} s"}
            continue
        signal.alarm(max(10, int(deadline + args.grace_s - time.monotonic())))  # a compile may take long
        try:
            set_attention(llava, impl)
            fig = hf_batch1(llava, ours["decode_ids"], ours["px"], ours["ttft_ids"], args.new_tokens, args.hf_reps,
                            args.new_tokens if kwargs else 8, **kwargs)
            tokens = fig.pop("tokens")
            fig["greedy_match"] = f"{_common_prefix(ours['tokens'], tokens)}/{args.new_tokens}"
            if impl == "sdpa" and not kwargs:
                fig["image_encode_ms"] = round(hf_image_encode_us(llava, ours["px"], args.iters) / 1e3, 3)
            out[label] = fig
        except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, not fatal
            log.exception("%s failed", label)
            out[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            signal.alarm(0)
        log.info("%s: %s", label, out[label])
    set_attention(llava, "sdpa")
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --- the benchmark ----------------------------------------------------------------------------------------

def setup(args, text: dict, vision: dict, device: str):
    """-> (transformers model, phi_fast model, setup seconds, bytes resident before phi_fast loaded)."""
    with tempfile.TemporaryDirectory(prefix="phi_fast_e2e_") as tmp:
        llava, build_s, save_s = build_checkpoint(Path(tmp), text, vision, device)
        log.info("random weights: built in %.1f s, saved in %.1f s", build_s, save_s)
        resident = torch.cuda.memory_allocated() if device == "cuda" else 0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        t = llava.config.text_config
        image_rows = (vision["image_size"] // vision["patch_size"]) ** 2
        longest = image_rows + DECODE_TEXT_TOKENS + max(args.batch_new_tokens, args.new_tokens) + 32  # + 2 pages
        cache_bytes = MAX_NUM_SEQS * longest * 2 * t.num_hidden_layers * t.hidden_size * 2  # K and V, bf16
        model = phi_fast.load(tmp, device=device, dtype="bfloat16", progress=False, cache_memory=cache_bytes,
                              max_num_seqs=MAX_NUM_SEQS)
        load_s = time.perf_counter() - t0
    log.info("phi_fast.load: %.1f s", load_s)
    return llava, model, {"build_weights": round(build_s, 1), "save": round(save_s, 1),
                          "phi_fast_load": round(load_s, 1)}, resident


def measure_ours(args, model: phi_fast.Model, ceilings: dict[str, float], resident: int) -> dict[str, object]:
    """Every phi_fast figure: image encode, TTFT, batch-1 and batched decode (engine and runner), memory."""
    ttft_in = request_inputs(model, 1, TTFT_TEXT_TOKENS)[0]
    px_dev = ttft_in[1][None].to(model.device)
    encode_ms = time_us(lambda: model.llava.encode_images(px_dev), args.iters) / 1e3
    ttft_ms = ours_ttft(model, ttft_in, args.reps) * 1e3
    log.info("image encode %.3f ms, TTFT %.2f ms", encode_ms, ttft_ms)

    decode_in = request_inputs(model, 1, DECODE_TEXT_TOKENS)
    prompt_len = len(decode_in[0][0]) - 1 + model.llava.image_tokens
    n = args.new_tokens
    engine_runs = [ours_engine_decode(model, decode_in, n) for _ in range(args.reps)]
    runner = DecodeGraphRunner(model.llava, model.engine.pool, max_num_seqs=MAX_NUM_SEQS)
    runner_decode(model, runner, prefilled(model, decode_in, n), 8)  # captures bucket 1
    runner_runs = [runner_decode(model, runner, prefilled(model, decode_in, n), n - 1) for _ in range(args.reps)]
    tokens = engine_runs[-1][1][0]
    batch1 = {"engine": statistics.median(r for r, _ in engine_runs),
              "runner": statistics.median(r for r, _ in runner_runs),
              "runner_match": _common_prefix(tokens, runner_runs[-1][1][0]),
              "bytes": decode_bytes(model, 1, prompt_len + n / 2)}
    batch1["floor"] = ceilings["copy_gbps"] * 1e9 / batch1["bytes"]
    log.info("batch 1: %s", batch1)

    batched = []
    for seqs in args.batches:
        inputs = request_inputs(model, seqs, DECODE_TEXT_TOKENS)
        m = args.batch_new_tokens
        engine_tok_s, _ = ours_engine_decode(model, inputs, m)
        runner_decode(model, runner, prefilled(model, inputs, m), 4)  # captures this bucket
        runner_tok_s, _ = runner_decode(model, runner, prefilled(model, inputs, m), m - 1)
        floor = seqs * ceilings["copy_gbps"] * 1e9 / decode_bytes(model, seqs, prompt_len + m / 2)
        batched.append({"seqs": seqs, "new": m, "engine": engine_tok_s, "runner": runner_tok_s, "floor": floor})
        log.info("batch %d: %s", seqs, batched[-1])

    w = model.llava.decoder.w  # every weight of the model, under canonical names
    kv = model.engine.pool.key_caches + model.engine.pool.value_caches
    peak = torch.cuda.max_memory_allocated() - resident if model.device.type == "cuda" else None
    memory = {"peak_gb": peak and round(peak / 1e9, 2),
              "weights_gb": round(sum(v.numel() * v.element_size() for v in w.values()) / 1e9, 2),
              "kv_cache_gb": round(sum(c.numel() * c.element_size() for c in kv) / 1e9, 2),
              "graphs_mb": round(runner.graph_memory / 2**20, 1), "graphs_captured": runner.captured}
    image_token = model.config.image_token_id
    return {"encode_ms": encode_ms, "ttft_ms": ttft_ms, "prompt_len": prompt_len, "batch1": batch1,
            "batched": batched, "memory": memory, "tokens": tokens, "px": decode_in[0][1],
            "decode_ids": hf_prompt(decode_in[0][0], image_token, model.llava.image_tokens),
            "ttft_ids": hf_prompt(ttft_in[0], image_token, model.llava.image_tokens),
            "engine_uses_graphs": getattr(model.engine, "graphs", None) is not None}


def result_entries(args, ours: dict[str, object], baselines: dict[str, dict[str, object]]) -> list[dict]:
    """The results list of design.md section 6; the baseline is transformers' generate with sdpa."""
    sdpa = next((v for k, v in baselines.items() if k.endswith("(sdpa)") and "error" not in v), {})
    base = "transformers generate (sdpa)"
    b1, n, prompt = ours["batch1"], args.new_tokens, ours["prompt_len"]
    out = [_entry("image encode", "1 x 3 x 336 x 336 -> 576 x 2560", ms=round(ours["encode_ms"], 3),
                  baseline="transformers get_image_features (sdpa)", baseline_ms=sdpa.get("image_encode_ms"),
                  speedup=_ratio(sdpa.get("image_encode_ms"), ours["encode_ms"])),
           _entry("time to first token", f"1 image (576 rows) + {TTFT_TEXT_TOKENS} tokens",
                  ttft_ms=round(ours["ttft_ms"], 2), baseline=base, baseline_ttft_ms=sdpa.get("ttft_ms"),
                  speedup=_ratio(sdpa.get("ttft_ms"), ours["ttft_ms"]))]
    for path, label in (("engine", "engine"), ("runner", "graph runner")):
        tok_s = b1[path]
        extra = {"greedy_match_engine": f"{b1['runner_match']}/{n}"} if path == "runner" else {}
        out.append(_entry(f"decode batch 1, {label}", f"{prompt}-token prompt + {n} new", tok_s=round(tok_s, 1),
                          ms_per_token=round(1e3 / tok_s, 3), gbps=round(b1["bytes"] * tok_s / 1e9, 1),
                          floor_tok_s=round(b1["floor"], 1), pct_floor=round(100 * tok_s / b1["floor"], 1),
                          bytes_per_token_mb=round(b1["bytes"] / 1e6, 1), baseline=base,
                          baseline_tok_s=sdpa.get("tok_s"), speedup=_ratio(tok_s, sdpa.get("tok_s")), **extra))
    for b in ours["batched"]:
        for path, label in (("engine", "engine"), ("runner", "graph runner")):
            out.append(_entry(f"decode batch {b['seqs']}, {label}", f"{b['seqs']} x ({prompt}-token prompt + "
                              f"{b['new']} new)", tok_s=round(b[path], 1), floor_tok_s=round(b["floor"], 1),
                              pct_floor=round(100 * b[path] / b["floor"], 1), baseline=None))
    return out


def run(args, text: dict, vision: dict, device: str) -> dict[str, object]:
    """The whole benchmark -> the report (design.md section 6, plus transformers' variants, memory, setup)."""
    start = time.monotonic()
    ceilings = measure_ceilings()
    log.info("ceilings: %s", ceilings)
    llava, model, setup_s, resident = setup(args, text, vision, device)
    ours = measure_ours(args, model, ceilings, resident)
    baselines = {} if args.no_transformers else transformers_runs(llava, ours, args, start + args.budget_s)
    setup_s["total"] = round(time.monotonic() - start, 1)
    return {"suite": "e2e", "gpu": torch.cuda.get_device_name() if device == "cuda" else device,
            "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
            "date": datetime.date.today().isoformat(), "ceilings": ceilings,
            "results": result_entries(args, ours, baselines), "transformers": baselines, "memory": ours["memory"],
            "setup_s": setup_s, "engine_uses_graphs": ours["engine_uses_graphs"]}


def _entry(name: str, shape: str, **fields) -> dict[str, object]:
    return {"name": name, "shape": shape, "dtype": "bf16", **fields}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def markdown(report: dict[str, object]) -> str:
    c, mem = report["ceilings"], report["memory"]
    lines = [f"# {report['suite']} on {report['gpu']} ({report['date']}, commit {report['commit']}, torch "
             f"{report['torch']}, CUDA {report['cuda']})", "",
             "LLaVA-Phi at the real sizes (Phi-2 2.7B + CLIP ViT-L/14-336 + projector), random bf16 weights, "
             "the same tensors in both stacks.", "",
             f"Ceilings: copy {c['copy_gbps']} GB/s, bf16 matmul {c['bf16_tflops']} TFLOP/s. phi_fast peak GPU "
             f"memory {mem['peak_gb']} GB (weights {mem['weights_gb']} GB, KV cache {mem['kv_cache_gb']} GB, decode "
             f"graphs {mem['graphs_mb']} MB for {len(mem['graphs_captured'])} captures).", "",
             "| name | shape | ms | TTFT ms | tok/s | GB/s | floor tok/s | % floor | baseline | baseline | speedup |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in report["results"]:
        base = r.get("baseline_ms") or r.get("baseline_ttft_ms") or r.get("baseline_tok_s") or ""
        lines.append(f"| {r['name']} | {r['shape']} | {r.get('ms', '')} | {r.get('ttft_ms', '')} | "
                     f"{r.get('tok_s', '')} | {r.get('gbps', '')} | {r.get('floor_tok_s', '')} | "
                     f"{r.get('pct_floor', '')} | {r.get('baseline') or ''} | {base} | "
                     f"{str(r['speedup']) + 'x' if r.get('speedup') else ''} |")
    if report["transformers"]:
        lines += ["", "transformers, batch 1 (same prompts; decode tok/s = (N - 1) / (generate(N) - generate(1))):", "",
                  "| variant | TTFT ms | decode tok/s | greedy tokens equal to phi_fast's | note |",
                  "| --- | ---: | ---: | --- | --- |"]
        for name, fig in report["transformers"].items():
            note = fig["error"] if "error" in fig else f"first call (warm-up) {fig['warmup_s']} s"
            lines.append(f"| {name} | {fig.get('ttft_ms', '')} | {fig.get('tok_s', '')} | "
                         f"{fig.get('greedy_match', '')} | {note} |")
    s = report["setup_s"]
    lines += ["", f"Setup: random weights built on the GPU in {s['build_weights']} s, saved in {s['save']} s, "
              f"phi_fast.load {s['phi_fast_load']} s; whole run {s['total']} s. Engine uses the graph runner: "
              f"{report['engine_uses_graphs']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256, help="batch-1 greedy tokens (N)")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 64],
                        help="batch sizes of the batched decode (at most 64)")
    parser.add_argument("--batch-new-tokens", type=int, default=128, help="tokens per request in batched decode")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of phi_fast's runs (median)")
    parser.add_argument("--hf-reps", type=int, default=2, help="timed repetitions of transformers' runs (median)")
    parser.add_argument("--iters", type=int, default=20, help="CUDA-event timed image encodes (median)")
    parser.add_argument("--no-transformers", action="store_true", help="measure phi_fast only")
    parser.add_argument("--no-compile", action="store_true", help="skip transformers' static cache + compile")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="skip the transformers variants still to run once this many seconds have passed")
    parser.add_argument("--grace-s", type=float, default=60.0,
                        help="a transformers variant still running --budget-s + this many seconds in is stopped")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the result files")
    args = parser.parse_args(argv)
    if max(args.batches) > MAX_NUM_SEQS or min(args.batches) < 1:
        parser.error(f"--batches must lie in 1..{MAX_NUM_SEQS}")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    require_current_build()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        sys.exit(f"bench.e2e: needs a CUDA GPU (torch {torch.__version__} sees none)")
    if "cuda" not in ops.available_backends():
        sys.exit("bench.e2e: phi_fast was built without its CUDA kernels (pip install --no-build-isolation .)")
    torch.backends.cuda.matmul.allow_tf32 = False
    report = run(args, TEXT, VISION, "cuda")
    write_report(args.out / f"e2e-{gpu_slug()}-{report['date']}", report, markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
