"""The control signals of a render, from its ground truth: the subject's box, its two landmarks
(top and right-hand side, in the subject's own frame, so they turn and mirror with it) and its
outline. Training reads them as inputs; evaluation asks for them and checks the result against
``render`` (box IoU, keypoint error). Coordinates are fractions of the image (model/controls.py).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .contexts import POSITIONS, SCALES, Context
from .render import SUBJECT_Y, render
from .subjects import Subject

# The subject-frame points the keypoints name, in units of the body radius (KEYPOINT_NAMES order).
LANDMARKS_UV = ((0.0, -1.0), (1.0, 0.0))


def landmarks(subject: Subject | int, ctx: Context) -> np.ndarray:
    """(2, 2) image coordinates of the subject's top and right-hand side: render's placement
    (``subject_frame``) run forwards."""
    subj = subject if isinstance(subject, Subject) else Subject.from_seed(int(subject))
    dx, dy, ds = ctx.jitter
    half, t = SCALES[ctx.size] * (1 + ds), np.deg2rad(ctx.rotation)
    out = []
    for lu, lv in LANDMARKS_UV:
        u, v = lu * subj.radius, lv * subj.radius
        u = -u if ctx.mirror else u
        px, py = u * np.cos(t) + v * np.sin(t), -u * np.sin(t) + v * np.cos(t)
        out.append((POSITIONS[ctx.position] + dx + px * half, SUBJECT_Y + dy + py * half))
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """(x0, y0, x1, y1) of a boolean mask's pixels as fractions of the image; None if empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    h, w = mask.shape
    return np.asarray([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h], np.float32)


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) float32: 1 on the mask's boundary pixels (in the mask, with a 4-neighbour outside)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return (mask & ~inner).astype(np.float32)


def controls_of(subject: Subject | int, ctx: Context, size: int, mask: np.ndarray | None = None) -> dict:
    """{"box": (4,), "keypoints": (2, 2), "edges": (size, size)} of the subject rendered in ``ctx``."""
    if mask is None:
        mask = render(subject, ctx, size)[1]
    box = mask_box(mask)
    return {"box": box if box is not None else np.asarray([0.0, 0.0, 1.0, 1.0], np.float32),
            "keypoints": landmarks(subject, ctx), "edges": outline(mask)}


def without_skill(ctx: Context, skill: str) -> Context:
    """The context with one skill undone (what a model that ignored that part of the prompt draws)."""
    undo = {"recontext": dict(scene="studio", position="center", size="medium"), "stylize": dict(style="none"),
            "recolor": dict(colour="none"), "view": dict(rotation=0, mirror=False), "accessorize": dict(accessory="none")}
    return replace(ctx, **undo[skill])
