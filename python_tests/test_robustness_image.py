"""Extreme aspect ratios cost bounded memory (issue 10, class 5), and the bounded paths stay close to the spec's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import phi_fast
from phi_fast.image import CLIP_MEAN, center_crop, expand_to_square, preprocess_uint8, resize_shortest_edge

FILL = tuple(int(m * 255) for m in CLIP_MEAN)

# In a child process: import, measure the address space, allow 256 MiB more, then preprocess thin strips (a few
# hundred bytes of PNG each) that padded to a square would need 1.2-11 GB.
_CHILD = textwrap.dedent("""
    import io, resource
    import numpy as np
    from PIL import Image
    from phi_fast.image import preprocess

    def address_space():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))

    strips = []
    for w, h in [(20000, 1), (60000, 1), (1, 60000), (30000, 7)]:
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), (200, 30, 30), np.uint8)).save(buf, "PNG")
        strips.append(((w, h), buf.getvalue()))
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + 256 * 2**20, resource.RLIM_INFINITY))
    for (w, h), png in strips:
        assert len(png) < 1000
        for pad in (True, False):
            x = preprocess(png, pad_to_square=pad)
            assert x.shape == (3, 336, 336), x.shape
            if pad:  # the fill around the strip (which is a faint tint of one line or two, as in the spec)
                assert float(x[:, 0, 0].abs().max()) < 0.02, ((w, h), x[:, 0, 0])
            else:  # the centre of the strip, stretched
                assert bool(((x[0] > 1.0) & (x[1] < 0)).all()), ((w, h), pad)
    print("bounded")
""")


def test_extreme_aspect_ratios_preprocess_within_a_memory_limit():
    paths = [str(Path(phi_fast.__file__).parents[1])]
    env = {"PYTHONPATH": ":".join(paths), "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "bounded" in result.stdout, result.stderr[-3000:]


def _smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 20), max(2, width // 20), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


def _spec_pad(image: Image.Image) -> np.ndarray:
    return np.asarray(center_crop(resize_shortest_edge(expand_to_square(image, FILL), 336), 336)).astype(int)


def _spec_no_pad(image: Image.Image) -> np.ndarray:
    return np.asarray(center_crop(resize_shortest_edge(image, 336), 336)).astype(int)


def _ours(image: Image.Image, pad: bool) -> np.ndarray:
    return preprocess_uint8(image, pad_to_square=pad).permute(1, 2, 0).numpy().astype(int)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("make", [_smooth, _noise])
@pytest.mark.parametrize("size", [(2000, 100), (100, 2000), (3000, 37), (37, 3000), (5000, 1), (1, 5000)])
def test_bounded_pad_path_gives_the_specs_pixels(size, make):
    image = make(*size)
    diff = np.abs(_ours(image, True) - _spec_pad(image))
    assert diff.max() <= (0 if size[0] > size[1] else 1)  # tall: rounding between Pillow's two passes


def test_a_strip_too_long_for_the_bounded_window_is_a_clear_error():
    with pytest.raises(ValueError, match=r"cannot preprocess a 700000x1 image: .* above the limit"):
        preprocess_uint8(Image.new("RGB", (700000, 1), (200, 30, 30)))


@pytest.mark.parametrize("size", [(2000, 100), (100, 2000), (3000, 37), (37, 3000)])
def test_bounded_no_pad_path_resamples_the_same_pixels(size):
    image = _smooth(*size)
    diff = np.abs(_ours(image, False) - _spec_no_pad(image))
    assert diff.max() <= 2 and diff.mean() < 0.05


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1600, 400), (900, 899)])
def test_ordinary_aspect_ratios_take_the_exact_path(size):
    image = _smooth(*size)
    assert np.array_equal(_ours(image, True), _spec_pad(image))
    assert np.array_equal(_ours(image, False), _spec_no_pad(image))
