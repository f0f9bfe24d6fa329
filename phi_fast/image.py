"""Image loading and LLaVA-Phi preprocessing (spec section 5): LLaVA's pad-to-square + CLIPImageProcessor.

    RGB -> pad to a square of side max(W, H), centred, filled with int(255 * mean) -> resize the short edge to S
    (long edge int(S * long / short), Pillow BICUBIC) -> centre crop S x S, top = (H - S) // 2, left = (W - S) // 2
    -> x / 255 -> (x - mean) / std, channels first.

Everything up to the crop is Pillow on uint8 pixels (`preprocess_uint8`); `rescale_normalize` does the last step
in float32 (x / 255 rounds exactly like transformers' float64 x * (1/255) for all 256 values), so `preprocess`
matches transformers' PIL backend to the bit.

Deliberate difference from Pillow's convert("RGB"): 16-bit grayscale ("I;16*" modes, e.g. 16-bit PNGs) keeps
its high byte instead of being clipped at 255, which would turn most such images white.

Memory: decoding is bounded by Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, an error above twice
it). Preprocessing then makes no intermediate image larger than `GROWTH` times the decoded image or
`SMALL_CANVAS` S x S images, whichever is more. A padded canvas or a resized image above that (an extreme aspect
ratio, beyond 4:1 for large images: a 20000 x 1 strip would pad to 20000 x 20000) is never made. Instead the pad
path runs Pillow's two resampling passes separately, the second over just the window of the canvas that can
differ from the fill, and the no-pad path resamples only the source box that the centre crop keeps: the same
pixels as the spec's way, up to 1 (rounding between the passes; 0 for wide images). Strips a few pixels thin and
about 600000 pixels long or more (at S = 336) would still need a window above the limit: ValueError.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 336
GROWTH = 4  # intermediate images may hold up to 4x the decoded image's pixels ...
SMALL_CANVAS = 64  # ... or 64 x S x S pixels (21 MiB of RGB at S = 336), whichever is more

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, bytes, bytearray]

_NUMPY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels of an HxWxC uint8 array -> Pillow mode
_CONVERT_VIA = {"La": "LA"}  # modes Pillow cannot convert to RGB directly


def load_image(src: ImageInput) -> Image.Image:
    """Open `src` as a Pillow image, pixels loaded, mode unchanged.

    src: a file path, a PIL image (returned as is), encoded file bytes, or a uint8 numpy array
    [H, W] (grayscale), [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA).
    Raises ValueError naming the source when it cannot be read, TypeError for other kinds of input.
    """
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, (bytes, bytearray)):
        return _open(io.BytesIO(src), f"{len(src)} bytes of image data")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            reason = "is a directory" if path.is_dir() else "no such file"
            raise ValueError(f"cannot read image {str(path)!r}: {reason}")
        return _open(path, repr(str(path)))
    raise TypeError(f"cannot load an image from a {type(src).__name__}: expected a path, PIL image, bytes or "
                    f"numpy array")


def _open(fp: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with Image.open(fp) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {name}: {type(err).__name__}: {err}") from err
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 (values 0..255), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] in _NUMPY_MODES:
        mode = _NUMPY_MODES[array.shape[2]]
        array = array[:, :, 0] if mode == "L" else array
    elif array.ndim == 2:
        mode = "L"
    else:
        raise ValueError(f"image array must be [H, W] or [H, W, C] with C in (1, 3, 4), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array is empty: shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def to_rgb(image: Image.Image) -> Image.Image:
    """Pillow's convert("RGB") (alpha dropped, not composited), except 16-bit grayscale keeps its high byte."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        high_byte = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high_byte, mode="L").convert("RGB")
    if image.mode in _CONVERT_VIA:
        image = image.convert(_CONVERT_VIA[image.mode])
    return image.convert("RGB")


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA's expand2square: paste `image` centred on a max(W, H) square canvas of colour `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short edge is `size` and the long edge int(size * long / short) (truncated)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The size x size centre: top = (H - size) // 2, left = (W - size) // 2. The image must be at least that big."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {width}x{height} image")
    top, left = (height - size) // 2, (width - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess_uint8(image: ImageInput, *, image_size: int = IMAGE_SIZE, mean: Sequence[float] = CLIP_MEAN,
                     pad_to_square: bool = True) -> torch.Tensor:
    """Pixels after RGB, optional pad (filled with int(255 * mean)), resize and crop: uint8 [3, S, S]."""
    rgb = to_rgb(load_image(image))
    if pad_to_square:
        cropped = _pad_and_resize(rgb, image_size, tuple(int(m * 255) for m in mean))
    else:
        cropped = _resize_and_crop(rgb, image_size)
    return torch.from_numpy(np.asarray(cropped).copy()).permute(2, 0, 1).contiguous()


def _allowed_pixels(image: Image.Image, size: int) -> int:
    """The largest intermediate image (pixels) preprocessing makes for `image` (see the module docs)."""
    width, height = image.size
    return max(GROWTH * width * height, SMALL_CANVAS * size * size)


def _pad_and_resize(image: Image.Image, size: int, fill: tuple[int, ...]) -> Image.Image:
    """Pad to square, then resize to size x size: the spec's way when the canvas is small enough, else the same
    resampling as two separate passes that never hold the canvas (an extreme aspect ratio)."""
    width, height = image.size
    side = max(width, height)
    if side * side <= _allowed_pixels(image, size):
        return center_crop(resize_shortest_edge(expand_to_square(image, fill), size), size)
    wide = width >= height
    short = height if wide else width
    # 1. The long axis, side -> size: along it the canvas is the image itself, so this is the canvas's pass.
    band = image.resize((size, short) if wide else (short, size), resample=Image.Resampling.BICUBIC)
    # 2. The short axis, side -> size, over a window of the canvas: the band with enough fill around it that every
    # output line whose filter reaches the band sees all the fill it would see in the full canvas.
    scale = side / size  # canvas pixels per output pixel
    support = 2 * scale  # bicubic reach, in canvas pixels
    offset = (side - short) // 2  # the band's place on the canvas
    first = max(0, math.floor((offset - support) / scale) - 1)  # output lines that may differ from the fill
    last = min(size, math.ceil((offset + short + support) / scale) + 1)
    lo = max(0, math.floor(first * scale - support) - 1)  # canvas lines those lines read
    hi = min(side, math.ceil(last * scale + support) + 1)
    if size * (hi - lo) > _allowed_pixels(image, size):  # only strips a few pixels thin, ~600000+ long at S = 336
        raise ValueError(f"cannot preprocess a {width}x{height} image: padding it to a square would need a "
                         f"{size}x{hi - lo} intermediate, above the limit of {_allowed_pixels(image, size)} pixels")
    window = Image.new(image.mode, (size, hi - lo) if wide else (hi - lo, size), fill)
    window.paste(band, (0, offset - lo) if wide else (offset - lo, 0))
    box = (0, first * scale - lo, size, last * scale - lo) if wide else (first * scale - lo, 0, last * scale - lo, size)
    lines = window.resize((size, last - first) if wide else (last - first, size), resample=Image.Resampling.BICUBIC,
                          box=box)
    canvas = Image.new(image.mode, (size, size), fill)
    canvas.paste(lines, (0, first) if wide else (first, 0))
    return canvas


def _resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short edge to size, centre crop size x size; when the resized image would be too large, only
    the source box the crop keeps is resampled (same scale and centres)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    if size * new_long <= _allowed_pixels(image, size):
        return center_crop(resize_shortest_edge(image, size), size)
    scale = long / new_long  # source pixels per resized pixel along the long edge
    lo, hi = (new_long - size) // 2 * scale, ((new_long - size) // 2 + size) * scale
    box = (lo, 0, hi, height) if width >= height else (0, lo, width, hi)
    return image.resize((size, size), resample=Image.Resampling.BICUBIC, box=box)


def rescale_normalize(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """(pixels / 255 - mean) / std per channel, in float32 arithmetic (transformers' rounding).

    pixels: uint8 [..., 3, H, W] -> float32 [..., 3, H, W].
    """
    if pixels.dtype != torch.uint8 or pixels.dim() < 3 or pixels.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"pixels must be uint8 [..., {len(mean)}, H, W] (mean {len(mean)}, std {len(std)} values), "
                         f"got {pixels.dtype} {list(pixels.shape)}")
    x = pixels.to(torch.float32) / 255
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean_t) / std_t


def preprocess(image: ImageInput, *, image_size: int = IMAGE_SIZE, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD, pad_to_square: bool = True) -> torch.Tensor:
    """LLaVA-Phi's pixel values of one image: float32 [3, S, S]. `pad_to_square=False` skips LLaVA's pad."""
    pixels = preprocess_uint8(image, image_size=image_size, mean=mean, pad_to_square=pad_to_square)
    return rescale_normalize(pixels, mean, std)


def preprocess_batch(images: Sequence[ImageInput], *, image_size: int = IMAGE_SIZE,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, pad_to_square: bool = True,
                     as_uint8: bool = False) -> torch.Tensor:
    """Stack of `preprocess` (float32) or, with `as_uint8`, of `preprocess_uint8` (uint8): [B, 3, S, S]."""
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image")
    pixels = torch.stack([preprocess_uint8(image, image_size=image_size, mean=mean, pad_to_square=pad_to_square)
                          for image in images])
    return pixels if as_uint8 else rescale_normalize(pixels, mean, std)
