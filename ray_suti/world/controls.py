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


def render_background(ctx: Context, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the context's scene and style with no subject in it."""
    from .render import _downsample, _grid, _stylise, background

    x, y = _grid(size)
    img = _stylise(np.clip(background(ctx.scene, x, y), 0, 1), ctx.style)
    return np.round(_downsample(img, size) * 255).astype(np.uint8)


def foreground(image: np.ndarray, ctx: Context, threshold: float = 0.12) -> np.ndarray:
    """(H, W) bool: pixels of ``image`` that differ from the empty scene (the subject and what it wears)."""
    bg = render_background(ctx, image.shape[0]).astype(np.float32)
    return np.abs(image.astype(np.float32) - bg).mean(-1) / 255.0 > threshold


def box_iou(mask: np.ndarray, box) -> float:
    """IoU of a pixel mask with a box's pixels (pixel centres inside the box)."""
    h, w = mask.shape
    cx, cy = (np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h
    inside = ((cy >= box[1]) & (cy <= box[3]))[:, None] & ((cx >= box[0]) & (cx <= box[2]))[None, :]
    union = (mask | inside).sum()
    return float((mask & inside).sum() / union) if union else 0.0


def pose_of(image: np.ndarray, subject: Subject | int, ctx: Context) -> Context:
    """The view (rotation x mirror, 8 of them) under which ``render`` of this subject at ``ctx``'s
    placement best matches ``image``: analysis by synthesis against the ground truth."""
    best, best_err = ctx, np.inf
    for rotation in (0, 90, 180, 270):
        for mirror in (False, True):
            variant = replace(ctx, rotation=rotation, mirror=mirror)
            err = float(np.mean((render(subject, variant, image.shape[0])[0].astype(np.float32) - image) ** 2))
            if err < best_err:
                best, best_err = variant, err
    return best


def keypoint_error(image: np.ndarray, subject: Subject | int, ctx: Context, keypoints) -> float:
    """Mean distance (fraction of the image side) from the requested keypoints to the landmarks of
    the view ``image`` shows (``pose_of``)."""
    found = landmarks(subject, pose_of(image, subject, ctx))
    return float(np.linalg.norm(found - np.asarray(keypoints, np.float32), axis=1).mean())
