"""``render(subject, context, size) -> (image, mask)``: the exact ground truth of any subject in any
context. Every crawl image, oracle target and evaluation reference comes from here.

Rendering is analytic: each output pixel averages a 4x4 grid of samples (anti-aliasing that keeps
32, 64 and 128 px renders consistent). The subject is placed, rotated and mirrored through an inverse
map from image to subject frame, accessories are drawn in the subject frame (they move with the
view), and the style is applied to the whole picture, as a style prompt asks.
"""
from __future__ import annotations

import numpy as np

from .contexts import COLOURS, POSITIONS, SCALES, Context
from .subjects import Subject

SUPERSAMPLE = 4
SUBJECT_Y = 0.55  # subjects stand a little below the middle, on the scene's ground
SIZES = (32, 64, 128)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    n = size * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / n
    return np.meshgrid(c, c)  # x right, y down, both in [0, 1]


def _fill(shape, rgb) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.float32), (*shape, 3)).copy()


def _paint(img, mask, rgb):
    img[mask] = np.asarray(rgb, np.float32)


def background(scene: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    img = _fill(x.shape, (0.92, 0.92, 0.9))
    img -= (0.06 * y)[..., None]  # soft studio light from above
    if scene == "beach":
        _paint(img, y < 0.4, (0.55, 0.78, 0.95))
        _paint(img, (y >= 0.4) & (y < 0.55), (0.1, 0.4, 0.75))
        _paint(img, y >= 0.55, (0.93, 0.83, 0.58))
    elif scene == "forest":
        _paint(img, y < 0.82, (0.12, 0.38, 0.16))
        for tx in (0.08, 0.42, 0.88):
            _paint(img, (np.abs(x - tx) < 0.035) & (y < 0.82), (0.35, 0.22, 0.1))
        _paint(img, y >= 0.82, (0.3, 0.22, 0.1))
    elif scene == "snow":
        _paint(img, y < 0.6, (0.75, 0.82, 0.9))
        _paint(img, (y < 0.6) & (y > 0.2 + np.abs(x - 0.3) * 0.9), (0.5, 0.52, 0.58))
        _paint(img, y >= 0.6, (0.98, 0.98, 1.0))
    elif scene == "city":
        _paint(img, np.ones_like(x, bool), (0.35, 0.25, 0.5))
        for x0, x1, top in ((0.0, 0.22, 0.3), (0.25, 0.5, 0.15), (0.55, 0.72, 0.35), (0.76, 1.0, 0.2)):
            block = (x >= x0) & (x < x1) & (y > top)
            _paint(img, block, (0.4, 0.4, 0.44))
            windows = block & (np.mod(x * 20, 1) < 0.4) & (np.mod(y * 16, 1) < 0.4)
            _paint(img, windows, (0.98, 0.85, 0.3))
        _paint(img, y > 0.85, (0.2, 0.2, 0.22))
    elif scene == "desert":
        _paint(img, np.ones_like(x, bool), (0.98, 0.92, 0.7))
        _paint(img, y > 0.55 + 0.06 * np.sin(x * 2 * np.pi * 1.5), (0.9, 0.6, 0.25))
        _paint(img, (x - 0.15) ** 2 + (y - 0.15) ** 2 < 0.07**2, (1.0, 0.95, 0.4))
    elif scene == "night":
        _paint(img, np.ones_like(x, bool), (0.04, 0.05, 0.2))
        for sx, sy in ((0.1, 0.1), (0.3, 0.22), (0.55, 0.08), (0.72, 0.3), (0.2, 0.4), (0.92, 0.45)):
            _paint(img, (x - sx) ** 2 + (y - sy) ** 2 < 0.018**2, (1, 1, 0.85))
        _paint(img, (x - 0.85) ** 2 + (y - 0.13) ** 2 < 0.08**2, (0.95, 0.95, 0.8))
    elif scene == "grass":
        _paint(img, y < 0.5, (0.5, 0.75, 0.98))
        _paint(img, y >= 0.5, (0.3, 0.68, 0.22))
    elif scene == "room":
        _paint(img, y < 0.68, (0.88, 0.8, 0.66))
        _paint(img, (x > 0.06) & (x < 0.3) & (y > 0.1) & (y < 0.4), (0.6, 0.85, 0.98))
        _paint(img, y >= 0.68, (0.5, 0.32, 0.18))
    elif scene == "underwater":
        img = _fill(x.shape, (0.0, 0.55, 0.65)) * (1 - 0.6 * y)[..., None]
        for bx, by, br in ((0.15, 0.3, 0.04), (0.2, 0.15, 0.025), (0.85, 0.6, 0.035), (0.8, 0.4, 0.02)):
            ring = np.abs(np.hypot(x - bx, y - by) - br) < 0.008
            _paint(img, ring, (0.85, 0.95, 1.0))
    return img


def _accessory(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """(mask, colour image) of an accessory in the subject frame."""
    colour = np.zeros((*u.shape, 3), np.float32)
    if kind == "hat":  # a dark top hat with a red band, sitting on the body's top
        crown = (np.abs(u) < 0.26) & (v > -r - 0.5) & (v < -r + 0.02)
        brim = (np.abs(u) < 0.45) & (np.abs(v + r) < 0.06)
        mask = crown | brim
        colour[:] = (0.1, 0.1, 0.12)
        colour[crown & (v > -r - 0.16) & (v < -r - 0.06)] = (0.85, 0.1, 0.1)
    elif kind == "scarf":  # a red-and-white striped band round the middle with one hanging end
        band = (np.abs(v - 0.12) < 0.1) & (np.abs(u) < r + 0.04)
        tail = (u > 0.1) & (u < 0.3) & (v > 0.12) & (v < r + 0.2)
        mask = band | tail
        colour[:] = (0.9, 0.1, 0.15)
        colour[np.mod((u + v) * 6, 1) < 0.5] = (0.97, 0.97, 0.97)
    elif kind == "glasses":  # two dark lenses and a bridge
        lens = ((np.abs(u) - 0.25) ** 2 / 0.17**2 + (v + 0.2) ** 2 / 0.12**2) < 1
        mask = lens | ((np.abs(u) < 0.12) & (np.abs(v + 0.22) < 0.03))
        colour[:] = (0.05, 0.05, 0.08)
    elif kind == "bowtie":  # a yellow bow tie under the middle
        mask = (np.abs(u) < 0.32) & (np.abs(v - 0.3) < np.abs(u) * 0.7 + 0.03)
        colour[:] = (0.98, 0.8, 0.05)
    else:
        mask = np.zeros(u.shape, bool)
    return mask, colour


def _stylise(img: np.ndarray, style: str) -> np.ndarray:
    if style == "negative":
        return 1.0 - img
    if style == "posterised":
        return np.round(img * 2) / 2
    if style == "greyscale":
        return np.repeat(img @ np.array([0.299, 0.587, 0.114], np.float32), 3).reshape(img.shape)
    if style == "sketch":  # dark outlines of every colour edge on white paper
        diff = np.zeros(img.shape[:2], np.float32)
        diff[:, 1:] += np.abs(np.diff(img, axis=1)).sum(-1)
        diff[1:, :] += np.abs(np.diff(img, axis=0)).sum(-1)
        edge = diff > 0.25
        for axis in (0, 1):  # thicken to ~1 output pixel so lines survive the downsampling
            for shift in range(1, SUPERSAMPLE - 1):
                edge = edge | np.roll(edge, shift, axis)
        out = _fill(img.shape[:2], (0.97, 0.96, 0.92))
        out[edge] = (0.15, 0.15, 0.18)
        return out
    return img


def _downsample(a: np.ndarray, size: int) -> np.ndarray:
    return a.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, *a.shape[2:]).mean(axis=(1, 3))


def subject_frame(ctx: Context, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse placement: image coordinates -> subject-frame (u, v)."""
    dx, dy, ds = ctx.jitter
    half = SCALES[ctx.size] * (1 + ds)
    px, py = (x - POSITIONS[ctx.position] - dx) / half, (y - SUBJECT_Y - dy) / half
    t = np.deg2rad(ctx.rotation)
    u, v = px * np.cos(t) - py * np.sin(t), px * np.sin(t) + py * np.cos(t)
    return (-u if ctx.mirror else u), v


def render(subject: Subject | int, context: Context, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(image (size, size, 3) uint8, mask (size, size) bool)``; mask marks the subject's own
    visible pixels (accessories excluded)."""
    subj = subject if isinstance(subject, Subject) else Subject.from_seed(int(subject))
    x, y = _grid(size)
    img = background(context.scene, x, y)
    u, v = subject_frame(context, x, y)

    body = subj.body_mask(u, v)
    parts, dark = subj.parts_mask(u, v)
    colours = subj.colours.copy()
    if context.colour != "none":
        colours[0] = COLOURS[context.colour]
    img[body] = colours[subj.pattern_index(u, v)][body]
    _paint(img, parts & ~dark, colours[2])
    _paint(img, dark, (0.05, 0.05, 0.05))
    acc_mask, acc_colour = _accessory(context.accessory, u, v, subj.radius)
    img[acc_mask] = acc_colour[acc_mask]

    img = _stylise(np.clip(img, 0, 1), context.style)
    subject_mask = (body | parts) & ~acc_mask
    image = np.round(_downsample(img, size) * 255).astype(np.uint8)
    mask = _downsample(subject_mask.astype(np.float32), size) > 0.5
    return image, mask
