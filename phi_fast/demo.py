"""`python -m phi_fast demo`: the whole pipeline on a small random-weight checkpoint, for machines without weights.

It writes a LLaVA-Phi-layout checkpoint (random weights, a small trained tokenizer) to a folder, loads it
through the real loader, and answers a question about a generated image, printing timings. The answer is
gibberish: the weights are random. The sizes keep Phi-2's head_dim 80 with partial rotary 32 and CLIP's
336px / patch 14 geometry (577 tokens), with fewer and narrower layers.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .config import TextConfig, VisionConfig
from .sampling import SamplingParams
from .tokenizer import write_demo_tokenizer
from .checkpoint_writer import write_random_llava_phi

log = logging.getLogger(__name__)

DEMO_TEXT = TextConfig(vocab_size=1024, hidden_size=320, intermediate_size=1280, num_layers=4, num_heads=4,
                       rotary_dim=32, rope_theta=10000.0, layer_norm_eps=1e-5, max_position_embeddings=2048)
DEMO_VISION = VisionConfig(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=2, image_size=336,
                           patch_size=14, layer_norm_eps=1e-5)


def write_demo_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random LLaVA-Phi-layout checkpoint with a tokenizer in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
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


def run_demo(args: argparse.Namespace) -> int:
    from .__main__ import sampling_kwargs
    from .api import load

    with tempfile.TemporaryDirectory(prefix="phi_fast_demo_") as tmp:
        folder = Path(args.dir) if args.dir else Path(tmp)
        t0 = time.perf_counter()
        write_demo_checkpoint(folder)
        t1 = time.perf_counter()
        model = load(folder, args.device, args.dtype, progress=False, quantize=args.quantize)
        t2 = time.perf_counter()
        prompt = "What is in this picture?"
        print(f"checkpoint: {folder} (random weights, LLaVA-Phi layout)")
        print(f"question:   {prompt}")
        print("answer:     ", end="", flush=True)
        t3 = time.perf_counter()
        req = model._submit([(demo_image(), prompt)], SamplingParams(**sampling_kwargs(args)))[0]
        t4 = time.perf_counter()
        model.engine.step()  # CLIP, projector and prefill: the first token
        t5 = time.perf_counter()
        while not req.finished:
            model.engine.step()
            if args.stream:
                print(req.take_new_text(), end="", flush=True)
        t6 = time.perf_counter()
        print(req.take_new_text())
        n = len(req.output_ids)
        decode = f", decode {(n - 1) / (t6 - t5):.1f} tokens/s" if n > 1 else ""
        print(f"timings:    write {t1 - t0:.2f} s, load {t2 - t1:.2f} s, "
              f"preprocess + tokenize {(t4 - t3) * 1e3:.0f} ms, "
              f"first token (image encode + prefill included) {(t5 - t3) * 1e3:.0f} ms{decode} ({n} tokens, {req.finish_reason}) "
              f"on {model.device} in {str(model.dtype).replace('torch.', '')}")
    return 0
