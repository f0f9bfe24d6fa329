"""Serving on the CPU: N concurrent streaming clients (the async `openai` client) against `python -m phi_fast serve`.

    python -m bench.serve [--clients 1,8,32] [--requests 2] [--max-tokens 32] [--vocab 51200] [--threads 2]
                          [--transformers [--transformers-clients 1,8]] [--out DIR]

The model is bench/e2e_cpu.py's mid-size LLaVA-Phi (random weights, llava_hf layout, EOS never the greedy choice so
every answer is exactly --max-tokens tokens), written to a temporary folder. The server runs in its own process
on 127.0.0.1 (an ephemeral port), started and stopped here. For each N, N clients each send --requests chat
completions one after another (greedy, stream=True, include_usage), each with a different image (a PNG data URL)
and question, after one warm-up request. Reported per N:
- requests/s and output tokens/s: finished requests and their completion tokens / the wall time of the round;
- TTFT p50 / p99: request sent to the first content chunk (image fetch + encode, queueing, prefill);
- ITL p50 / p99: the gaps between consecutive content chunks of a request, over all requests (a chunk may hold
  more than one token when the server coalesces; the median TPOT per request is reported next to it).
--transformers also starts `transformers serve` (its default settings: no continuous batching) on the same
checkpoint folder and runs the rounds of --transformers-clients against it; it needs `accelerate`, which is not a
phi_fast dependency (bench/NOTES.md: how it was run here). A stack that fails is reported under "not_measured".
--ray 1,2 also measures `phi_fast serve --ray` (a local Ray instance started by the command, one CPU and one
torch thread per replica) with each of these replica counts at the same offered load (the rounds of --clients;
`2/1`: 2 replicas with --affinity-imbalance 1), and reports each one's throughput over the first one's and the
per-replica efficiency (that ratio over the replica ratio); the result files are then serve_ray-*. The load of
the machine is recorded (load average before / after, the share of the cores other processes kept busy). Writes
bench/results/serve-cpu-<cores>core-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import RESULTS, ROOT, git_commit, require_current_build, write_report
from bench.e2e_cpu import QUESTIONS, TEXT, VISION, _uncommitted, build_checkpoint

log = logging.getLogger("phi_fast.bench")

START_TIMEOUT_S = 900.0  # loading the model on a busy 2-core machine
REQUEST_TIMEOUT_S = 900.0


def image_urls(n: int) -> list[str]:
    """n different PNG data URLs (noise images, two sizes)."""
    urls = []
    for i in range(n):
        rng = np.random.default_rng(i)
        w, h = (320, 240) if i % 2 else (240, 300)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def build_model(folder: Path, vocab: int) -> None:
    """bench/e2e_cpu.py's checkpoint, made servable by both stacks: the tokenizer gains an `<image>` token (id =
    its old size) that config.json names as the image token, and a LlavaProcessor (CLIP preprocessing, the chat
    template, no torchvision needed) is saved beside it for `transformers serve`. lm_head rows from that id up are
    zeroed (EOS's already is): greedy answers are then made of tokens the small demo tokenizer can print, so each
    streamed chunk carries text, at the same cost per step (the shapes do not change)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    llava = build_checkpoint(folder, vocab)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    size = VISION["image_size"]
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                                  crop_size={"height": size, "width": size}),
                               tokenizer=tokenizer, patch_size=VISION["patch_size"], num_additional_image_tokens=1,
                               vision_feature_select_strategy="default", image_token="<image>",
                               chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    llava.config.image_token_id = image_id
    llava.config.image_token_index = image_id
    with torch.no_grad():
        llava.lm_head.weight[image_id:] = 0.0
    llava.save_pretrained(folder)


# phi-2_v0 (phi_fast.prompt) as a chat template, for `transformers serve`'s processor
CHAT_TEMPLATE = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. {% for m in messages %}"
                 "{% if m['role'] == 'user' %}USER: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}"
                 "{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% elif m['role'] == 'assistant' %}ASSISTANT: "
                 "{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}<|endoftext|>"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1:port; `ready` waits (bounded) for its /health to answer 200."""

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str], log_path: Path):
        self.name, self.port = name, port
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.log_path = log_path

    def ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}; its log:\n"
                                   f"{self.log_path.read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            try:
                self.proc.wait(1.0)  # the poll interval, cut short if the server exits
            except subprocess.TimeoutExpired:
                pass
        raise TimeoutError(f"{self.name} did not answer /health within {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()


async def one_request(client, model: str, question: str, url: str, max_tokens: int) -> dict[str, object]:
    """One streamed chat completion: send time, content chunk times, completion tokens."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    raw = await client.chat.completions.with_raw_response.create(
        model=model, max_tokens=max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": question}]}])
    async for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"t0": t0, "stamps": stamps, "tokens": tokens if tokens is not None else len(stamps),
            "replica": raw.headers.get("x-phi-fast-replica")}  # on Ray: the replica that answered


async def round_(base_url: str, model: str, clients: int, per_client: int, max_tokens: int,
                 urls: list[str]) -> dict[str, object]:
    """N clients x per_client requests, each client's one after another; the round's figures."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="bench", timeout=REQUEST_TIMEOUT_S, max_retries=0)

    async def worker(c: int) -> list[dict[str, object]]:
        out = []
        for r in range(per_client):
            k = c * per_client + r
            out.append(await one_request(client, model, QUESTIONS[k % len(QUESTIONS)], urls[k % len(urls)],
                                         max_tokens))
        return out

    await one_request(client, model, QUESTIONS[0], urls[0], max_tokens)  # warm-up
    wall0 = time.perf_counter()
    runs = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
    wall = time.perf_counter() - wall0
    await client.close()
    ttft = [r["stamps"][0] - r["t0"] for r in runs if r["stamps"]]
    itl = [b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:])]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (r["tokens"] - 1) for r in runs if r["tokens"] > 1 and r["stamps"]]
    tokens = sum(r["tokens"] for r in runs)
    return {"clients": clients, "requests": len(runs), "wall_s": round(wall, 3),
            "req_s": round(len(runs) / wall, 3), "tok_s": round(tokens / wall, 2), "output_tokens": tokens,
            "ttft_ms": {"p50": _ms(pct(ttft, 50)), "p99": _ms(pct(ttft, 99))},
            "itl_ms": {"p50": _ms(pct(itl, 50)), "p99": _ms(pct(itl, 99))},
            "tpot_ms_p50": _ms(pct(tpot, 50)), "empty_answers": sum(1 for r in runs if not r["stamps"]),
            "requests_per_replica": sorted(Counter(r["replica"] for r in runs if r["replica"]).values(), reverse=True)}


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation); None for no values."""
    return float(np.percentile(values, q)) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def start_phi_fast(folder: Path, port: int, threads: int, max_seqs: int, log_dir: Path) -> Server:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "passive",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "phi_fast", "serve", "--model", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", "bench", "--max-num-seqs", str(max_seqs),
               "--cache-memory", "1G"]  # 32 requests x ~330 tokens x 64 KiB a token: ~0.7 GiB
    return Server("phi_fast serve", command, port, env, log_dir / "phi_fast_serve.log")


def start_phi_fast_ray(folder: Path, port: int, replicas: int, imbalance: int | None, max_seqs: int,
                       log_dir: Path) -> Server:
    # RAY_worker_niceness: Ray runs its workers (the replicas among them) 15 nice levels below the raylet by
    # default; at 0 they compete for the cores as the single server does.
    env = {**os.environ, "OMP_WAIT_POLICY": "passive", "RAY_worker_niceness": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "phi_fast", "serve", "--ray", "--replicas", str(replicas), "--replica-cpus", "1",
               "--model", str(folder), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "bench",
               "--max-num-seqs", str(max_seqs), "--cache-memory", "1G"]
    if imbalance is not None:
        command += ["--affinity-imbalance", str(imbalance)]
    return Server(f"phi_fast serve --ray --replicas {replicas}", command, port, env,
                  log_dir / f"phi_fast_ray_{replicas}_{imbalance}.log")


def scaling(results: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per client count: each Ray run's throughput over the first Ray run's (the --ray list's first entry), and
    that per replica."""
    rows = []
    ray_runs = [r for r in results if r.get("replicas")]
    for clients in sorted({r["clients"] for r in ray_runs}):
        base, *runs = [r for r in ray_runs if r["clients"] == clients]
        for r in runs:
            ratio = r["tok_s"] / base["tok_s"] if base["tok_s"] else None
            rows.append({"clients": clients, "compared": f"{r['name']} vs {base['name']}",
                         "throughput_ratio": None if ratio is None else round(ratio, 2),
                         "per_replica_efficiency": None if ratio is None else
                         round(ratio / (r["replicas"] / base["replicas"]), 2)})
    return rows


def start_transformers(folder: Path, port: int, threads: int, log_dir: Path) -> Server:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "passive", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    return Server("transformers serve", command, port, env, log_dir / "transformers_serve.log")


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds the machine was busy, CPU seconds of this process and its waited-for children, the servers)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return None
    own = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK"), own


def others_share(start: tuple[float, float] | None, wall0: float) -> float | None:
    """Fraction of the cores other processes (not this one, not its servers) kept busy since `start`."""
    end = busy_seconds()
    if start is None or end is None:
        return None
    others = (end[0] - start[0]) - (end[1] - start[1])
    return round(max(others, 0.0) / ((time.perf_counter() - wall0) * os.cpu_count()), 2)


def markdown(report: dict[str, object]) -> str:
    dirty = f" + {len(report['uncommitted'])} uncommitted files" if report["uncommitted"] else ""
    ray_note = ("; Ray's processes count among the others: they are not this process's children"
                if any(r.get("replicas") for r in report["results"]) else "")
    lines = [f"# {report['suite']} on {report['gpu']} ({report['date']}, commit {report['commit']}{dirty}, "
             f"{report['threads']} threads)", "", f"Model: {report['model']}", "",
             f"Each client sends {report['requests_per_client']} streamed chat completions (one PNG data-URL image "
             f"+ a question, greedy, max_tokens {report['max_tokens']}) one after another, after one warm-up "
             f"request. Load average (1 min) before / after: {report['loadavg_1min']['before']} / "
             f"{report['loadavg_1min']['after']}; other processes kept {report['others_cpu_share']} of the cores "
             f"busy during the run (0 = a quiet machine{ray_note}). Not measured on a GPU.", "",
             "| server | clients | requests | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
             "ITL p99 ms | TPOT p50 ms | requests per replica | load after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in report["results"]:
        lines.append(f"| {r['name']} | {r['clients']} | {r['requests']} | {r['req_s']} | {r['tok_s']} | "
                     f"{r['ttft_ms']['p50']} | {r['ttft_ms']['p99']} | {r['itl_ms']['p50']} | {r['itl_ms']['p99']} | "
                     f"{r['tpot_ms_p50']} | {'/'.join(map(str, r['requests_per_replica'])) or '-'} | "
                     f"{r['loadavg_1min_after']} |")
    if report.get("scaling"):
        lines += ["", "| clients | compared | output tok/s ratio | per-replica efficiency |",
                  "| ---: | --- | ---: | ---: |"]
        lines += [f"| {r['clients']} | {r['compared']} | {r['throughput_ratio']} | {r['per_replica_efficiency']} |"
                  for r in report["scaling"]]
    for name, why in report.get("not_measured", {}).items():
        lines += ["", f"{name}: not measured: {why}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in each round")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--vocab", type=int, default=51200, help="text vocabulary (51200 = Phi-2's)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server process")
    parser.add_argument("--transformers", action="store_true", help="also measure `transformers serve`")
    parser.add_argument("--transformers-clients", default="1,8",
                        help="its numbers of clients (it answers one request at a time: 32 x 2 would take long)")
    parser.add_argument("--ray", default=None, metavar="N,M/K",
                        help="also measure `phi_fast serve --ray` with these replica counts (1 CPU each); N/K: "
                             "with --affinity-imbalance K")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the result files")
    args = parser.parse_args(argv)
    require_current_build()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("httpx", "openai"):  # a line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    clients = [int(c) for c in args.clients.split(",")]
    hf_clients = [int(c) for c in args.transformers_clients.split(",")]
    urls = image_urls(8)
    results, not_measured = [], {}
    commit, uncommitted = git_commit(), _uncommitted()  # of the code measured: read before the run
    load_before, wall0, busy0 = os.getloadavg(), time.perf_counter(), busy_seconds()
    with tempfile.TemporaryDirectory(prefix="phi_fast_bench_serve_") as tmp:
        folder, logs = Path(tmp) / "model", Path(tmp)
        build_model(folder, args.vocab)
        stacks = [("phi_fast", lambda port: start_phi_fast(folder, port, args.threads, max(clients), logs), "bench",
                   clients, None)]
        for spec in args.ray.split(",") if args.ray else []:
            n, k = int(spec.split("/")[0]), int(spec.split("/")[1]) if "/" in spec else None
            name = f"phi_fast on Ray, {n} replica{'s' if n > 1 else ''}" + ("" if k is None else f", imbalance {k}")
            stacks.append((name, lambda port, n=n, k=k: start_phi_fast_ray(folder, port, n, k, max(clients), logs),
                           "bench", clients, n))
        if args.transformers:
            stacks.append(("transformers serve", lambda port: start_transformers(folder, port, args.threads, logs),
                           str(folder), hf_clients, None))
        for name, start, model_name, counts, replicas in stacks:
            port = free_port()
            server = start(port)
            try:
                server.ready()
                for n in counts:
                    record = asyncio.run(round_(f"http://127.0.0.1:{port}/v1", model_name, n, args.requests,
                                                args.max_tokens, urls))
                    record["name"] = name
                    record["replicas"] = replicas
                    record["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
                    log.info("%s", record)
                    results.append(record)
            except Exception as error:  # noqa: BLE001 - a stack that cannot serve is reported, not fatal
                log.exception("%s failed", name)
                not_measured[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            finally:
                server.stop()
    date = datetime.date.today().isoformat()
    t, v = TEXT, VISION
    report = {"suite": "serve_ray" if args.ray else "serve", "gpu": f"cpu-{os.cpu_count()}core",
              "torch": _torch_version(), "cuda": None,
              "commit": commit, "uncommitted": uncommitted, "date": date, "threads": args.threads,
              "max_tokens": args.max_tokens, "requests_per_client": args.requests,
              "loadavg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
              "others_cpu_share": others_share(busy0, wall0),
              "model": (f"Phi hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, intermediate "
                        f"{t['intermediate_size']}, vocab {args.vocab}; CLIP {v['image_size']}px/{v['patch_size']}, "
                        f"hidden {v['hidden_size']}, {v['num_hidden_layers']} layers (bench/e2e_cpu.py's); random "
                        f"weights, fp32"),
              "results": results, "scaling": scaling(results), "not_measured": not_measured}
    write_report(args.out / f"{report['suite']}-{report['gpu']}-{date}", report, markdown(report))
    log.info("%s", markdown(report))
    return report


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
