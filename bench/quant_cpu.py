"""Quantized weights on the CPU at LLaVA-Phi's real sizes: phi_fast bf16 / int8 / int4 next to llama.cpp F16 /
Q8_0 / Q4_0 on the same random Phi-2 weights, in one run.

    python -m bench.quant_cpu [--dir /work/quant_bench] [--llamacpp /work/llamacpp] [--threads 2] [--reps 2]
                              [--new-tokens 64] [--context 620] [--skip-llamacpp] [--out DIR]

Model: random weights at the real sizes (Phi-2: 2560 x 32 layers, 32 x 80 heads, MLP 10240, vocab 51200; CLIP
ViT-L/14-336) written once into --dir as a bf16 LLaVA-Phi checkpoint (phi_fast.checkpoint_writer). llama.cpp gets
the same Phi-2 text weights as a transformers Phi checkpoint in fp16, converted with its convert_hf_to_gguf.py
(the tokenizer's pre-tokenizer declared "phi-2": ../shared/notes/llamacpp-baseline.md) and quantized with
llama-quantize; it is a baseline only, found at --llamacpp (build/bin/llama-bench, the vendored source tree).
Measured, per precision (phi_fast: model dtype bf16, linears packed at load time for int8/int4):
- prompt: a 620-token text prompt, tokens / s of the prefill (phi_fast: the engine steps up to the first token;
  llama-bench: pp620);
- decode: 64 tokens after a 1-token prompt and after a 620-token prompt, tokens / s of the decode steps
  (llama-bench: tg64 and tg64 at depth 620), greedy, batch 1;
- the memory floor: bytes read per token (decoder weights + lm_head, packed or not) / the read bandwidth measured
  in the same run (a sum over 256 MiB).
llama-bench runs with -r reps at its best setting: each cell the better of -fa 0 and -fa 1, weights repacked
(its default; --repack 0 for a test where that crashes). phi_fast takes the best of --reps repetitions (medians
would need more time than the run has). Both stacks run with OpenMP's default wait policy (unless OMP_WAIT_POLICY
is set for the whole run): OMP_WAIT_POLICY=passive, which earlier runs set, cost llama.cpp's Q4_0 decode a third
(15.28 -> 10.06 tokens/s) and phi_fast's int4 decode 6% (14.88 -> 13.93) in this script's two runs of 2026-12-02.
Writes bench/results/quant_cpu-cpu-<cores>core-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")  # as the run was started (bench.e2e_cpu sets its own default)

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import phi_fast  # noqa: E402
from bench.common import RESULTS, git_commit, require_current_build, write_report  # noqa: E402
from bench.e2e_cpu import _busy_seconds, _others_share, _uncommitted, measure_ceilings  # noqa: E402
from phi_fast.checkpoint_writer import write_random_llava_phi  # noqa: E402
from phi_fast.config import TextConfig, VisionConfig  # noqa: E402
from phi_fast.quant import QuantizedWeight  # noqa: E402
from phi_fast.sampling import SamplingParams  # noqa: E402
from phi_fast.tokenizer import write_demo_tokenizer  # noqa: E402
from phi_fast.weights import read_checkpoint  # noqa: E402

log = logging.getLogger("phi_fast.bench")

PHI2 = TextConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_layers=32, num_heads=32,
                  rotary_dim=32, rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=2048)
CLIP = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                    patch_size=14, layer_norm_eps=1e-5)
PRECISIONS = {"bf16": (None, "F16"), "int8": ("int8", "Q8_0"), "int4": ("int4", "Q4_0")}


def checkpoint(folder: Path) -> Path:
    """The real-size random LLaVA-Phi (bf16), written once."""
    if not (folder / "config.json").is_file():
        write_random_llava_phi(folder, text=PHI2, vision=CLIP, dtype=torch.bfloat16, max_shard_bytes=2 << 30)
        write_demo_tokenizer(folder)
    return folder


def hf_phi(src: Path, folder: Path) -> Path:
    """The checkpoint's Phi-2 text weights as a transformers Phi checkpoint in fp16 (q/k/v split from the fused
    per-head qkv), for llama.cpp's converter."""
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import PhiConfig

    folder.mkdir(parents=True, exist_ok=True)
    t = PHI2
    tensors = {}
    for info in read_checkpoint(src).values():
        name = info.name
        if not (name.startswith("model.layers.") or name.startswith("lm_head") or name.startswith("model.embed")
                or name.startswith("model.final_layernorm")):
            continue
        with safe_open(str(info.file), "pt") as f:
            x = f.get_tensor(name).to(torch.float16)
        if "query_key_value" in name:
            parts = x.view(t.num_heads, 3, t.head_dim, *x.shape[1:])
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                tensors[name.replace("query_key_value", proj)] = parts[:, j].reshape(-1, *x.shape[1:]).contiguous()
        else:
            tensors[name] = x
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    PhiConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
              num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, partial_rotary_factor=0.4,
              max_position_embeddings=t.max_position_embeddings, torch_dtype="float16",
              architectures=["PhiForCausalLM"]).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            (folder / name).write_bytes((src / name).read_bytes())
    return folder


def gguf_models(hf_dir: Path, llamacpp: Path, folder: Path) -> dict[str, Path]:
    """F16 (converted), Q8_0 and Q4_0 (llama-quantize) GGUF files, made once."""
    src = llamacpp / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    out = {"F16": folder / "phi2-F16.gguf", "Q8_0": folder / "phi2-Q8_0.gguf", "Q4_0": folder / "phi2-Q4_0.gguf"}
    if not out["F16"].is_file():
        code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']\n"
                "import conversion.base as base\n"
                "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'phi-2'  # a fresh BPE: say it is phi-2's\n"
                "sys.argv = ['convert', sys.argv[2], '--outtype', 'f16', '--outfile', sys.argv[3]]\n"
                "import convert_hf_to_gguf; convert_hf_to_gguf.main()\n")
        tmp = out["F16"].with_suffix(".tmp")
        subprocess.run([sys.executable, "-c", code, str(src), str(hf_dir), str(tmp)], check=True, cwd=src)
        tmp.rename(out["F16"])  # only whole files count as made
    for kind in ("Q8_0", "Q4_0"):
        if not out[kind].is_file():
            tmp = out[kind].with_suffix(".tmp")
            subprocess.run([str(llamacpp / "build" / "bin" / "llama-quantize"), str(out["F16"]), str(tmp), kind],
                           check=True, capture_output=True)
            tmp.rename(out[kind])
    return out


def llama_bench(llamacpp: Path, model: Path, threads: int, reps: int, n: int, context: int) -> dict[str, float]:
    """tokens/s of llama-bench at its best setting: prompt (pp<context>), decode (tg<n>) and decode at depth
    <context>, each the best of flash attention off and on (-fa 0,1), with its default weight repacking, per test
    falling back to --repack 0 where repacking crashes (this build's repacked Q8_0 / Q4_0 prompt processing dies with
    SIGSEGV on the AVX-512 machines of 2026-12-01 and 2026-12-02; their decode runs)."""
    exe = str(llamacpp / "build" / "bin" / "llama-bench")
    tests = {"prompt": ["-p", str(context), "-n", "0"], "decode": ["-p", "0", "-n", str(n)],
             "decode_ctx": ["-p", "0", "-n", str(n), "-d", str(context)]}
    out: dict = {}
    for key, test in tests.items():
        common = [exe, "-m", str(model), "-t", str(threads), "-r", str(reps), "-fa", "0,1", "-o", "json", *test]
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if OMP_WAIT_POLICY is not None:
            env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
        try:
            runs, repack = subprocess.run(common, check=True, capture_output=True, text=True, env=env).stdout, True
        except subprocess.CalledProcessError as e:
            log.warning("llama-bench %s with weight repacking failed (%s); measuring with --repack 0", key,
                        e.returncode)
            runs, repack = subprocess.run([*common, "--repack", "0"], check=True, capture_output=True, text=True,
                                          env=env).stdout, False
        best = max(json.loads(runs), key=lambda r: r["avg_ts"])
        out[key] = round(best["avg_ts"], 2)
        out[key + "_flash_attn"], out[key + "_repack"] = best.get("flash_attn"), repack
    return out


def decode_bytes(model: phi_fast.Model) -> int:
    """Bytes of the weights every decode step reads: the decoder's linears, norms and biases, and lm_head."""
    total = 0
    for name, w in model.llava.decoder.w.items():
        if name.startswith("text.") and name != "text.embed":
            total += w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
    return total


def run_ours(model: phi_fast.Model, ids: list[int], n: int) -> tuple[float, float]:
    """(seconds of the prefill, seconds of the n - 1 decode steps after it) for one request. The prefill is every
    step until the first token: a prompt longer than the token budget (512 on the CPU) takes several."""
    engine = model.engine
    req = engine.add(ids, [], SamplingParams(max_new_tokens=n, ignore_eos=True))
    t0 = time.perf_counter()
    while not req.output_ids and not req.finished:
        engine.step()
    t1 = time.perf_counter()
    while not req.finished:
        engine.step()
    t2 = time.perf_counter()
    if req.error is not None:
        raise req.error
    engine.release(req)
    return t1 - t0, t2 - t1


def ours(folder: Path, quantize: str | None, n: int, context: int, reps: int) -> dict[str, float]:
    t0 = time.perf_counter()
    model = phi_fast.load(folder, dtype="bfloat16", quantize=quantize, progress=False, prefix_cache=0)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50000, (context,), generator=gen).tolist()
    short = prompt[:1]
    run_ours(model, short, 4)  # warm-up
    best = {"prompt": 0.0, "decode": 0.0, "decode_ctx": 0.0}
    for _ in range(reps):
        pre, dec = run_ours(model, prompt, n)
        best["prompt"] = max(best["prompt"], context / pre)
        best["decode_ctx"] = max(best["decode_ctx"], (n - 1) / dec)
        _, dec = run_ours(model, short, n)
        best["decode"] = max(best["decode"], (n - 1) / dec)
    result = {k: round(v, 2) for k, v in best.items()}
    result.update(load_s=round(load_s, 1), weight_bytes=decode_bytes(model))
    del model
    gc.collect()
    return result


def markdown(report: dict) -> str:
    lines = [f"# quant_cpu ({report['date']}, commit {report['commit']}, {report['threads']} threads)", "",
             f"read bandwidth {report['ceilings']['read_gbps']} GB/s, copy {report['ceilings']['copy_gbps']} GB/s; "
             f"load average {report['loadavg_1min']}, other processes' share of the cores {report['others_share']}",
             "", "| precision | phi_fast prompt 620 | llama.cpp | phi_fast decode | llama.cpp | phi_fast decode @620 | "
             "llama.cpp | floor (weights / read bw) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report["results"].items():
        lc = r.get("llamacpp", {})
        lines.append(f"| {name} ({r['llamacpp_type']}) | {r['prompt']} | {lc.get('prompt', '-')} | {r['decode']} | "
                     f"{lc.get('decode', '-')} | {r['decode_ctx']} | {lc.get('decode_ctx', '-')} | "
                     f"{r['floor_tok_s']} |")
    lines.append("")
    lines.append("tokens / s; decode = 64 tokens after a 1-token prompt; @620 = after a 620-token prompt.")
    res = report["results"]
    if "bf16" in res:
        lines += ["", "| precision | decode / phi_fast bf16 | @620 / phi_fast bf16 | prompt / llama.cpp | "
                  "decode / llama.cpp | @620 / llama.cpp |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        def ratio(a: float, b: float | None) -> str:
            return f"{a / b:.2f}x" if b else "-"

        for name, r in res.items():
            lc = r.get("llamacpp", {})
            cells = [ratio(r["decode"], res["bf16"]["decode"]), ratio(r["decode_ctx"], res["bf16"]["decode_ctx"]),
                     ratio(r["prompt"], lc.get("prompt")), ratio(r["decode"], lc.get("decode")),
                     ratio(r["decode_ctx"], lc.get("decode_ctx"))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/work/quant_bench"))
    p.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=620)
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--only", nargs="*", default=list(PRECISIONS))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    require_current_build()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    folder = checkpoint(args.dir / "llava_phi_bf16")
    ggufs = {} if args.skip_llamacpp else gguf_models(hf_phi(folder, args.dir / "hf_phi2_f16"), args.llamacpp,
                                                        args.dir)
    busy0, wall0 = _busy_seconds(), time.perf_counter()
    ceilings = measure_ceilings()
    results = {}
    for name in args.only:
        quantize, kind = PRECISIONS[name]
        r = ours(folder, quantize, args.new_tokens, args.context, args.reps)
        log.info("phi_fast %s: %s", name, json.dumps(r))
        r["llamacpp_type"] = kind
        if kind in ggufs:
            r["llamacpp"] = llama_bench(args.llamacpp, ggufs[kind], args.threads, args.reps, args.new_tokens,
                                        args.context)
            r["llamacpp"]["file_bytes"] = ggufs[kind].stat().st_size
        r["floor_tok_s"] = round(ceilings["read_gbps"] * 1e9 / r["weight_bytes"], 2)
        results[name] = r
        log.info("%s: %s", name, json.dumps(r))
        report = {"suite": "quant_cpu", "gpu": "cpu", "torch": torch.__version__, "commit": git_commit(),
                  "uncommitted": _uncommitted(), "date": datetime.date.today().isoformat(), "threads": args.threads,
                  "reps": args.reps, "omp_wait_policy": OMP_WAIT_POLICY,
                  "cpu_features": phi_fast.ops.cpu_features(), "loadavg_1min": os.getloadavg()[0],
                  "others_share": _others_share(busy0, wall0), "ceilings": ceilings, "results": results}
        stem = args.out / f"quant_cpu-cpu-{os.cpu_count()}core-{report['date']}"
        write_report(stem, report, markdown(report))  # after every precision: a cut-short run keeps its rows
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
