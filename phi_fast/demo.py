"""`phi_fast demo`: the whole pipeline on a small random-weight checkpoint, for machines without weights.

It writes a LLaVA-Phi-layout checkpoint (random weights, a small trained tokenizer) to a folder, loads it
through the real loader, and answers a question about a generated image, printing timings. The answer is
gibberish: the weights are random. The sizes keep Phi-2's head_dim 80 with partial rotary 32 and CLIP's
336px / patch 14 geometry (577 tokens), with fewer and narrower layers.

`--dir` keeps the checkpoint in a folder of the user's; the demo writes only into a new or empty folder or one
it wrote before (marked by its MARKER file), so it can never overwrite a real checkpoint.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .checkpoint_writer import write_random_llava_phi
from .cli import add_load_options, add_sampling_options, answer, load_model, sampling_params
from .config import TextConfig, VisionConfig
from .tokenizer import write_demo_tokenizer

DEMO_TEXT = TextConfig(vocab_size=1024, hidden_size=320, intermediate_size=1280, num_layers=4, num_heads=4,
                       rotary_dim=32, rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=2048)
DEMO_VISION = VisionConfig(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=2, image_size=336,
                           patch_size=14, layer_norm_eps=1e-5)


MARKER = "phi_fast_demo.txt"  # in a folder the demo wrote; its presence lets a later demo overwrite the folder
PROMPT = "What is in this picture?"


def write_demo_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random LLaVA-Phi-layout checkpoint with a tokenizer in `folder` (new, empty, or written by the demo)."""
    check_demo_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("A random-weight checkpoint written by `phi_fast demo`; the demo may overwrite "
                                 "this folder.\n")
    write_demo_tokenizer(folder, vocab_size=1000)
    write_random_llava_phi(folder, text=DEMO_TEXT, vision=DEMO_VISION, seed=seed)
    return folder


def demo_image(width: int = 480, height: int = 360) -> Image.Image:
    """A non-square test picture: a colour gradient with a dark disc (exercises pad-to-square)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 128.0)], axis=-1)
    disc = (x - width / 3) ** 2 + (y - height / 2) ** 2 < (height / 4) ** 2
    rgb[disc] = (20, 20, 40)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def check_demo_folder(folder: Path) -> None:
    """Refuses a folder the demo must not write into: a file, or a folder with files the demo did not write."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"demo --dir {folder}: is a file, not a folder")
    if folder.is_dir() and not (folder / MARKER).is_file() and any(folder.iterdir()):
        raise ValueError(f"demo --dir {folder}: the folder is not empty and was not written by the demo (no "
                         f"{MARKER}), so it may hold a real checkpoint; give a new or empty folder")


def add_demo_parser(sub: Any, **kwargs) -> None:
    """The `demo` subcommand, with the shared model-loading (less --model) and sampling options."""
    demo = sub.add_parser("demo", help="write a small random-weight checkpoint and run the whole pipeline on it",
                          description="Write a small random-weight checkpoint in LLaVA-Phi's layout, load it and "
                                      "answer a question about a generated image, with timings. No weights "
                                      "needed; the answer is gibberish.", **kwargs)
    demo.add_argument("--dir", type=Path, metavar="FOLDER",
                      help="keep the checkpoint in this new or empty folder (default: a temporary folder)")
    add_load_options(demo, model=False)
    add_sampling_options(demo)
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """`demo`: write the checkpoint, load it, answer about demo_image(), print the answer and timings."""
    params = sampling_params(args)
    with tempfile.TemporaryDirectory(prefix="phi_fast_demo_") as tmp:
        folder = args.dir if args.dir is not None else Path(tmp)
        t0 = time.perf_counter()
        write_demo_checkpoint(folder)
        t1 = time.perf_counter()
        model = load_model(args, folder)
        t2 = time.perf_counter()
        if not args.json:
            print(f"checkpoint: {folder} (random weights, LLaVA-Phi layout)")
            print(f"question:   {PROMPT}")
            print("answer:     ", end="", flush=True)
        result = answer(model, demo_image(), PROMPT, params,
                        on_piece=(lambda piece: print(piece, end="", flush=True)) if args.stream else None)
        if args.json:
            print(result.to_json(write_s=round(t1 - t0, 4), load_s=round(t2 - t1, 4)))
            return 0
        print("" if args.stream else result.text)
        n, decode = result.completion_tokens, result.generate_s - result.first_text_s
        rate = f", decode {(n - 1) / decode:.1f} tokens/s" if n > 1 and decode > 0 else ""
        print(f"timings:    write {t1 - t0:.2f} s, load {t2 - t1:.2f} s, first text (preprocess, image encode "
              f"and prefill included) {result.first_text_s * 1e3:.0f} ms{rate} ({n} tokens, "
              f"{result.finish_reason}) on {model.device} in {str(model.dtype).replace('torch.', '')}")
    return 0
