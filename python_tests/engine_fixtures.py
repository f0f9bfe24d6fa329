"""What the engine tests share: a tiny LLaVA-Phi checkpoint with its tokenizer, and small random images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from checkpoints import make_tiny_checkpoints
from tokenizer_fixture import write_tokenizer


def tiny_llava_phi(folder: Path) -> Path:
    """A tiny random checkpoint in LLaVA-Phi's own layout, with a tokenizer, under `folder`; returns its path."""
    path = make_tiny_checkpoints(folder, variants=("llava_phi",)).paths["llava_phi"]
    write_tokenizer(path)
    return path


def random_image(seed: int) -> Image.Image:
    """An RGB noise image of (40 + seed) x 60 pixels: each seed a different image and size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40 + seed, 60, 3), dtype=np.uint8), "RGB")
