"""phi_fast.image against transformers' CLIPImageProcessor (PIL backend) after LLaVA's pad-to-square."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from phi_fast.image import (CLIP_MEAN, CLIP_STD, load_image, preprocess, preprocess_batch, preprocess_uint8,
                            rescale_normalize, resize_shortest_edge, to_rgb)

PAD_FILL = (122, 116, 104)  # int(255 * CLIP_MEAN), spec section 5


def _random_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "P":
        return _random_image("RGB", width, height, seed).quantize(colors=50)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width), dtype=np.uint8) * 255).convert("1")
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    # Smooth-ish content as well as noise, so resampling is exercised on gradients too.
    pixels[: height // 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode=mode)


def _expand2square_reference(image: Image.Image) -> Image.Image:
    """LLaVA's expand2square restated with numpy: centred on a max(W, H) canvas of the mean colour."""
    pixels = np.asarray(image)
    height, width, _ = pixels.shape
    side = max(width, height)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = PAD_FILL
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = pixels
    return Image.fromarray(canvas)


def _clip_reference(image: Image.Image, pad: bool, size: int = 336) -> np.ndarray:
    """LLaVA's pipeline: Image.convert("RGB"), optional expand2square, then CLIPImageProcessor."""
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                   crop_size={"height": size, "width": size},
                                                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    rgb = image.convert("RGB")
    if pad:
        rgb = _expand2square_reference(rgb)
    return processor(images=rgb, return_tensors="np")["pixel_values"][0]


CASES = [
    ("RGB", 513, 401), ("RGB", 401, 513), ("RGB", 336, 336), ("RGB", 335, 337), ("RGB", 17, 9), ("RGB", 1, 1),
    ("RGBA", 300, 200), ("LA", 120, 333), ("L", 250, 400), ("P", 320, 240), ("CMYK", 200, 300), ("1", 64, 49),
    ("RGB", 1, 500), ("RGB", 337, 1), ("RGB", 4000, 3001),
]


@pytest.mark.parametrize("pad", [True, False], ids=["pad", "no_pad"])
@pytest.mark.parametrize("mode,width,height", CASES, ids=[f"{m}-{w}x{h}" for m, w, h in CASES])
def test_matches_clip_image_processor(mode, width, height, pad):
    image = _random_image(mode, width, height)
    expected = _clip_reference(image, pad)
    got = preprocess(image, pad_to_square=pad)
    assert got.dtype == torch.float32 and got.shape == (3, 336, 336)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


def test_bit_exact_with_clip_image_processor():
    image = _random_image("RGB", 700, 457, seed=3)
    np.testing.assert_array_equal(preprocess(image).numpy(), _clip_reference(image, True))


def test_other_image_size_matches():
    image = _random_image("RGB", 640, 480)
    np.testing.assert_allclose(preprocess(image, image_size=224).numpy(), _clip_reference(image, True, 224),
                               rtol=0, atol=1e-6)


def test_padding_uses_the_mean_colour_and_centres():
    black = Image.new("RGB", (100, 300), (0, 0, 0))  # portrait: bars left and right
    pixels = preprocess_uint8(black)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 336, 336)
    assert pixels[:, 0, 0].tolist() == list(PAD_FILL) and pixels[:, 335, 335].tolist() == list(PAD_FILL)
    assert pixels[:, 168, 168].tolist() == [0, 0, 0]
    unpadded = preprocess_uint8(black, pad_to_square=False)
    assert unpadded.eq(0).all()


def test_long_edge_is_truncated():
    assert resize_shortest_edge(Image.new("RGB", (1000, 299)), 336).size == (1123, 336)  # 336*1000/299 = 1123.7
    assert resize_shortest_edge(Image.new("RGB", (299, 1000)), 336).size == (336, 1123)


def test_uint8_path_plus_normalize_equals_preprocess():
    image = _random_image("RGB", 500, 375)
    pixels = preprocess_uint8(image)
    assert torch.equal(rescale_normalize(pixels), preprocess(image))
    expected = (pixels.double() / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(3, 1, 1)) / \
        torch.tensor(CLIP_STD, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(rescale_normalize(pixels).double(), expected, rtol=0, atol=1e-6)


def test_batch_stacks_single_images():
    images = [_random_image("RGB", 400, 300, seed=1), _random_image("L", 200, 260, seed=2)]
    batch = preprocess_batch(images)
    assert batch.shape == (2, 3, 336, 336) and batch.dtype == torch.float32
    for i, image in enumerate(images):
        assert torch.equal(batch[i], preprocess(image))
    as_uint8 = preprocess_batch(images, as_uint8=True, pad_to_square=False)
    assert as_uint8.dtype == torch.uint8 and torch.equal(as_uint8[1], preprocess_uint8(images[1], pad_to_square=False))
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_batch([])


def test_every_source_kind_gives_the_same_pixels(tmp_path):
    rgb = _random_image("RGB", 90, 70)
    rgba = _random_image("RGBA", 90, 70)
    gray = _random_image("L", 90, 70)
    path = tmp_path / "img.png"
    rgb.save(path)
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    expected = preprocess(rgb)
    for src in (path, str(path), buffer.getvalue(), bytearray(buffer.getvalue()), np.asarray(rgb),
                np.asarray(rgb)[:, ::-1][:, ::-1]):
        assert torch.equal(preprocess(src), expected)
    assert torch.equal(preprocess(np.asarray(rgba)), preprocess(rgba))
    assert torch.equal(preprocess(np.asarray(gray)), preprocess(gray))
    assert torch.equal(preprocess(np.asarray(gray)[:, :, None]), preprocess(gray))
    assert load_image(rgb) is rgb


def test_sixteen_bit_grayscale_keeps_the_high_byte():
    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    assert np.array_equal(np.asarray(to_rgb(image))[:, :, 0], (values >> 8).astype(np.uint8))


def test_premultiplied_modes_convert():
    la = _random_image("LA", 40, 30)
    assert np.array_equal(np.asarray(to_rgb(la.convert("La"))), np.asarray(la.convert("La").convert("LA")
                                                                          .convert("RGB")))


def test_unreadable_sources_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read image 11 bytes of image data: UnidentifiedImageError"):
        load_image(b"not a jpeg!")
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ValueError, match=f"cannot read image '{missing}': no such file"):
        load_image(missing)
    with pytest.raises(ValueError, match=f"cannot read image '{tmp_path}': is a directory"):
        load_image(str(tmp_path))
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    _random_image("RGB", 200, 200).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:2000])
    with pytest.raises(ValueError, match=f"cannot read image '{truncated}'"):
        preprocess(truncated)
    with pytest.raises(ValueError, match="must be uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got shape \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="from a int"):
        load_image(42)
