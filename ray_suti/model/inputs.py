"""Normalising the photos users send (documented in docs/model.md, "Subject photos").

Any of: a path, bytes, a PIL image, a numpy array ((H, W, C) uint8, or float in [0, 1]) or a torch
tensor ((C, H, W) float in [0, 1]); a batch of photos may also come as one (N, H, W, C) array or
(N, C, H, W) tensor, diffusers' ``PipelineImageInput``. Steps, in order:
1. refuse images above ``MAX_PIXELS`` (decompression bombs) or with a side under ``MIN_SIDE`` px;
2. apply the EXIF orientation, so phone photos stand upright;
3. convert to 8-bit RGB: transparency (RGBA, LA, palette with transparency) is composited on white;
   16-bit and 32-bit greyscale is rescaled from its full range; greyscale, CMYK etc. become RGB;
4. centre-crop the largest square and resize it to the model's size (Lanczos, antialiased), so
   4000 px and 10 px photos both arrive at e.g. 32 x 32.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..utils.images import MAX_PIXELS, MIN_SIDE  # the limits every image check shares


class SuTIInputError(ValueError):
    """A request the model cannot serve: the message says what to change."""


def _array_image(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise SuTIInputError("float image arrays must hold values in [0, 1]")
        a = np.round(a * 255).astype(np.uint8)
    try:
        return Image.fromarray(a)
    except TypeError as e:
        raise SuTIInputError(f"not an image array: shape {a.shape}, dtype {a.dtype} ({e})") from None


def _open(src) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, torch.Tensor):
        if src.dim() != 3:
            raise SuTIInputError(f"an image tensor is (C, H, W), got shape {tuple(src.shape)}")
        return _array_image(src.detach().float().permute(1, 2, 0).cpu().numpy())
    if isinstance(src, np.ndarray):
        return _array_image(src)
    try:
        if isinstance(src, (bytes, bytearray)):
            return Image.open(io.BytesIO(src))
        return Image.open(Path(src))
    except (UnidentifiedImageError, OSError) as e:
        raise SuTIInputError(f"not a readable image: {e}") from None


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src) -> Image.Image:
    """Any supported input -> upright 8-bit RGB PIL image (steps 1-3 above)."""
    img = _open(src)
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise SuTIInputError(f"image is {w}x{h} = {w * h} pixels; the limit is {MAX_PIXELS}")
    if min(w, h) < MIN_SIDE:
        raise SuTIInputError(f"image is {w}x{h}; each side must be at least {MIN_SIDE} px")
    try:
        img.load()
        return _to_8bit_rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data surfaces here
        raise SuTIInputError(f"image data is corrupt: {e}") from None


def subject_list(images) -> list:
    """PipelineImageInput -> a list: one photo, a list of photos, a (N, ...) batch array or tensor,
    or (per prompt) a list of such lists."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return [subject_list(x) if isinstance(x, (list, tuple)) else x for x in images]
    return [images]


def square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop the largest square and resize it to ``size`` (step 4)."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return img.resize((size, size), Image.LANCZOS, box=box, reducing_gap=3.0)


def subject_tensor(images, size: int) -> torch.Tensor:
    """A list of photos -> (K, 3, size, size) float in [-1, 1]."""
    arrays = [np.asarray(square(load_image(src), size), dtype=np.float32) for src in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
