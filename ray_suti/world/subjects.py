"""Procedural subjects: one integer seed -> one visually distinctive subject.

A subject lives in its own frame, u (right) and v (down) in [-1, 1]. It has a body outline
(a radial shape with a few harmonics), a coarse multi-colour pattern, and class-specific parts
placed asymmetrically so that mirroring and rotation are visible. Colours are drawn from a
continuous space, so no word names a subject: text can only give its generic class word.

Split (fixed, documented in docs/design.md): a subject seed is held out iff ``seed % 10 == 0``. The crawl
and every training set use train seeds only; evaluation uses held-out seeds.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

CLASS_WORDS = ("creature", "mug", "toy", "robot")
PATTERNS = ("stripes", "checker", "sectors", "rings", "spots", "split")
HELDOUT_MODULUS = 10


def is_heldout(seed: int) -> bool:
    return seed % HELDOUT_MODULUS == 0


def heldout_seeds(n: int, start: int = 0) -> list[int]:
    """The first ``n`` held-out subject seeds at or after ``start``."""
    first = -(-start // HELDOUT_MODULUS) * HELDOUT_MODULUS
    return [first + HELDOUT_MODULUS * i for i in range(n)]


def train_seed(rng: np.random.Generator) -> int:
    while True:
        seed = int(rng.integers(1, 2**31 - 1))
        if not is_heldout(seed):
            return seed


def _distinct_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n saturated colours far apart in RGB, so the pattern survives downscaling to 32 px."""
    colours: list[np.ndarray] = []
    while len(colours) < n:
        hue, sat, val = rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)
        rgb = np.array(colorsys.hsv_to_rgb(hue, sat, val))
        if all(np.abs(rgb - c).sum() > 0.6 for c in colours):
            colours.append(rgb)
    return np.stack(colours).astype(np.float32)


@dataclass(frozen=True)
class Subject:
    seed: int
    class_word: str
    radius: float  # mean body radius in the subject frame
    harmonics: tuple  # ((k, amplitude, phase), ...) of the outline r(theta)
    squareness: float  # superellipse exponent: 2 = round, larger = boxier
    pattern: str
    pattern_angle: float
    pattern_freq: int
    colours: np.ndarray  # (3, 3) float RGB in [0, 1]: pattern colours 0, 1 and the parts colour
    part_side: int  # +1 or -1: the side that carries the asymmetric part

    @classmethod
    def from_seed(cls, seed: int) -> "Subject":
        rng = np.random.default_rng([0x5071, seed])
        n_harm = int(rng.integers(1, 3))
        harmonics = tuple(
            (int(rng.integers(2, 6)), float(rng.uniform(0.05, 0.14)), float(rng.uniform(0, 2 * np.pi)))
            for _ in range(n_harm)
        )
        return cls(
            seed=seed,
            class_word=CLASS_WORDS[int(rng.integers(len(CLASS_WORDS)))],
            radius=float(rng.uniform(0.55, 0.66)),
            harmonics=harmonics,
            squareness=float(rng.choice([2.0, 2.0, 3.0, 5.0])),
            pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
            pattern_angle=float(rng.uniform(0, np.pi)),
            pattern_freq=int(rng.integers(2, 4)),
            colours=_distinct_colours(rng, 3),
            part_side=int(rng.choice([-1, 1])),
        )

    # ---- geometry in the subject frame; u, v are arrays of any shape ----------------------
    def body_mask(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        theta = np.arctan2(v, u)
        r_outline = self.radius * (1 + sum(a * np.cos(k * theta + p) for k, a, p in self.harmonics))
        q = self.squareness
        r = (np.abs(u) ** q + np.abs(v) ** q) ** (1 / q)
        return r <= r_outline

    def pattern_index(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """0 or 1: which pattern colour covers (u, v)."""
        c, s = np.cos(self.pattern_angle), np.sin(self.pattern_angle)
        a, b = c * u + s * v, -s * u + c * v
        f = self.pattern_freq
        if self.pattern == "stripes":
            idx = np.floor(a * f * 1.25 + 0.5)
        elif self.pattern == "checker":
            idx = np.floor(a * f) + np.floor(b * f)
        elif self.pattern == "sectors":
            idx = np.floor((np.arctan2(b, a) + np.pi) / (2 * np.pi) * (2 * f))
        elif self.pattern == "rings":
            idx = np.floor(np.hypot(u, v) / self.radius * (f + 0.5))
        elif self.pattern == "spots":
            cells = np.floor(a * f * 1.2), np.floor(b * f * 1.2)
            fa, fb = a * f * 1.2 - cells[0] - 0.5, b * f * 1.2 - cells[1] - 0.5
            idx = (np.hypot(fa, fb) < 0.3).astype(np.float64)
        else:  # split: two halves along a random diagonal
            idx = (a > 0.1).astype(np.float64)
        return (idx.astype(np.int64) % 2).astype(np.int64)

    def parts_mask(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(parts, dark details): class-specific parts drawn in the parts colour, details in black."""
        side, r = self.part_side, self.radius

        def disc(cu, cv, rad):
            return (u - cu) ** 2 + (v - cv) ** 2 <= rad**2

        def box(u0, v0, u1, v1):
            return (u >= min(u0, u1)) & (u <= max(u0, u1)) & (v >= min(v0, v1)) & (v <= max(v0, v1))

        dark = np.zeros(np.broadcast(u, v).shape, bool)
        if self.class_word == "creature":  # legs, a tail on one side, one big eye off-centre
            parts = box(-0.35, r * 0.8, -0.2, 0.95) | box(0.2, r * 0.8, 0.35, 0.95)
            parts |= disc(side * (r + 0.12), -0.05, 0.16)
            parts |= disc(side * 0.22, -r * 0.45, 0.17)
            dark = disc(side * 0.25, -r * 0.45, 0.08)
        elif self.class_word == "mug":  # a ring handle on one side, a rim band on top
            ring = np.hypot(u - side * (r + 0.12), v) - 0.22
            parts = (np.abs(ring) < 0.07) | box(-r * 0.8, -r - 0.05, r * 0.8, -r + 0.12)
        elif self.class_word == "toy":  # two wheels below, a knob on one side of the top
            parts = disc(-0.35, r + 0.12, 0.2) | disc(0.35, r + 0.12, 0.2)
            parts |= box(side * 0.3, -r - 0.25, side * 0.4, -r + 0.1) | disc(side * 0.35, -r - 0.3, 0.12)
            dark = disc(-0.35, r + 0.12, 0.08) | disc(0.35, r + 0.12, 0.08)
        else:  # robot: an antenna on one side, an arm on the other, two square eyes
            parts = box(-side * 0.05, -r - 0.3, -side * 0.12, -r + 0.1) | disc(-side * 0.085, -r - 0.33, 0.1)
            parts |= box(side * (r - 0.05), -0.05, side * (r + 0.3), 0.1)
            dark = box(-0.3, -0.3, -0.1, -0.12) | box(0.1, -0.3, 0.3, -0.12)
        return parts | dark, dark
