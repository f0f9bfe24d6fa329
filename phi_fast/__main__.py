"""Command line: `python -m phi_fast generate ...` and `python -m phi_fast demo`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi_fast", description="LLaVA-Phi inference")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a question about an image")
    gen.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer)")
    gen.add_argument("--image", help="image file (omit for a text-only question)")
    gen.add_argument("--prompt", required=True, help="the question")
    _add_run_options(gen)

    demo = sub.add_parser("demo", help="write a small random-weight checkpoint and run the whole pipeline on it")
    demo.add_argument("--dir", help="where to write the checkpoint (default: a temporary folder)")
    _add_run_options(demo)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    return _generate(args)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="pack the language model's linear weights at load time (CPU only)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed)


def _generate(args: argparse.Namespace) -> int:
    from .api import load

    try:
        model = load(args.model, args.device, args.dtype, progress=sys.stderr.isatty(), quantize=args.quantize)
        out = model.generate(args.image, args.prompt, stream=args.stream, **sampling_kwargs(args))
        if args.stream:
            for piece in out:
                print(piece, end="", flush=True)
            print()
        else:
            print(out)
    except (ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
