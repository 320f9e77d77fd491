"""Image helpers shared by every stage: encoding and contact sheets."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

# One set of limits for every image the system takes in: web records (the dataset builder), subject
# photos (the API's store) and pipeline inputs. Above MAX_PIXELS an image is refused from its header,
# before decoding (decompression bombs); 50 MP lets a 48 MP phone photo through.
MAX_PIXELS = 50_000_000
MIN_SIDE = 8


def inspect_image(data, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image | None, str | None]:
    """Encoded bytes of a web record -> (decoded image, None) or (None, reason): ``empty``,
    ``not_image``, ``too_large``, ``too_small`` or ``truncated``. Never raises."""
    if not data:
        return None, "empty"
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return None, "too_large"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, "not_image"
    if img.width * img.height > max_pixels:
        return None, "too_large"
    if min(img.size) < min_side:
        return None, "too_small"
    try:
        img.load()
    except Exception:  # PIL raises OSError / SyntaxError / struct errors for cut-off files
        return None, "truncated"
    return img, None


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode(array: np.ndarray, fmt: str = "png") -> bytes:
    if fmt == "png":
        return encode_png(array)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def contact_sheet(rows: list[list[np.ndarray | None]], labels: list[str] | None = None,
                  cell: int = 64, header: list[str] | None = None, label_width: int = 150) -> Image.Image:
    """A grid of images, one labelled row each; ``None`` cells stay blank."""
    n_cols = max(len(r) for r in rows)
    top = 14 if header else 0
    left = label_width if labels else 0
    sheet = Image.new("RGB", (left + n_cols * (cell + 2), top + len(rows) * (cell + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, text in enumerate(header or []):
        draw.text((left + j * (cell + 2) + 2, 1), text[:12], fill=(0, 0, 0))
    for i, row in enumerate(rows):
        y = top + i * (cell + 2)
        if labels:
            draw.text((2, y + cell // 2 - 6), labels[i][:24], fill=(0, 0, 0))
        for j, img in enumerate(row):
            if img is not None:
                tile = Image.fromarray(np.asarray(img)).convert("RGB").resize((cell, cell), Image.NEAREST)
                sheet.paste(tile, (left + j * (cell + 2), y))
    return sheet
