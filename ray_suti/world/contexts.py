"""Contexts: where, how and in which style a subject is shown, and the words that say it.

A ``Context`` holds exact render parameters. Its ``prompt()`` is built from a small fixed grammar
(``VOCABULARY`` holds every word it can use), so a caption can name the class and the context but
never the subject. Contexts sampled for training and evaluation sit exactly on the grid the words
describe; crawl photos add a small jitter, as real photos do.

Skills (SuTI's five): recontextualisation (scene, position, size), stylisation, attribute change
(recolour), novel view (rotation, mirror) and accessorisation. A context with two or more skills is
a composition.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np

SCENES = ("studio", "beach", "forest", "snow", "city", "desert", "night", "grass", "room", "underwater")
SCENE_PHRASES = {
    "studio": "", "beach": "on the beach", "forest": "in the forest", "snow": "in the snow",
    "city": "in the city", "desert": "in the desert", "night": "under the night sky",
    "grass": "on the grass", "room": "in a room", "underwater": "underwater",
}
POSITIONS = {"left": 0.3, "center": 0.5, "right": 0.7}
SCALES = {"small": 0.25, "medium": 0.35, "large": 0.45}
STYLES = ("none", "sketch", "negative", "posterised", "greyscale")
STYLE_PHRASES = {"none": "", "sketch": "as a pencil sketch", "negative": "as a photo negative",
                 "posterised": "in posterised style", "greyscale": "in black and white"}
COLOURS = {  # recolour targets: canonical named colours
    "red": (0.86, 0.1, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.1, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.55, 0.15, 0.7), "orange": (0.98, 0.5, 0.05),
    "pink": (0.98, 0.55, 0.75), "white": (0.97, 0.97, 0.97), "black": (0.06, 0.06, 0.06),
}
ROTATIONS = {0: "", 90: "lying on its side", 180: "upside down", 270: "tipped over to the right"}
ACCESSORIES = ("none", "hat", "scarf", "glasses", "bowtie")
ACCESSORY_PHRASES = {"none": "", "hat": "wearing a hat", "scarf": "wearing a scarf",
                     "glasses": "wearing sunglasses", "bowtie": "wearing a bow tie"}
SKILLS = ("recontext", "stylize", "recolor", "view", "accessorize")


@dataclass(frozen=True)
class Context:
    scene: str = "studio"
    position: str = "center"
    size: str = "medium"
    style: str = "none"
    colour: str = "none"
    rotation: int = 0  # degrees, counter-clockwise
    mirror: bool = False
    accessory: str = "none"
    jitter: tuple = (0.0, 0.0, 0.0)  # (dx, dy, dscale) as fractions of the frame; 0 on the grid

    def __post_init__(self):
        checks = [(self.scene, SCENES), (self.position, POSITIONS), (self.size, SCALES),
                  (self.style, STYLES), (self.rotation, ROTATIONS), (self.accessory, ACCESSORIES)]
        for value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"unknown context value {value!r}; expected one of {list(allowed)}")
        if self.colour != "none" and self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {list(COLOURS)}")

    @property
    def skills(self) -> list[str]:
        out = []
        if self.scene != "studio" or self.position != "center" or self.size != "medium":
            out.append("recontext")
        if self.style != "none":
            out.append("stylize")
        if self.colour != "none":
            out.append("recolor")
        if self.rotation or self.mirror:
            out.append("view")
        if self.accessory != "none":
            out.append("accessorize")
        return out

    def prompt(self, class_word: str) -> str:
        """The caption a careful person would write: class word and context, never the subject."""
        size = "" if self.size == "medium" else self.size
        colour = "" if self.colour == "none" else self.colour
        head = " ".join(w for w in ("a", size, colour, class_word) if w)
        view = [ROTATIONS[self.rotation]] + (["mirrored"] if self.mirror else [])
        where = {"left": "on the left", "right": "on the right", "center": ""}[self.position]
        parts = [head, ACCESSORY_PHRASES[self.accessory], *view, where, SCENE_PHRASES[self.scene]]
        text = " ".join(p for p in parts if p)
        return text + (", " + STYLE_PHRASES[self.style] if self.style != "none" else "")

    def on_grid(self) -> "Context":
        return replace(self, jitter=(0.0, 0.0, 0.0))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Context":
        d = json.loads(text)
        d["jitter"] = tuple(d["jitter"])
        return cls(**d)


def _vocabulary() -> frozenset[str]:
    words = {"a", "on", "the", "left", "right", "mirrored", "small", "large", *COLOURS}
    for phrase_set in (SCENE_PHRASES, STYLE_PHRASES, ROTATIONS, ACCESSORY_PHRASES):
        for phrase in phrase_set.values():
            words.update(phrase.split())
    return frozenset(words)


VOCABULARY = _vocabulary()


def sample_context(rng: np.random.Generator, skill_probs: dict | None = None, jitter: float = 0.0) -> Context:
    """A random context; each skill is switched on independently with its probability."""
    p = {"recontext": 0.8, "stylize": 0.25, "recolor": 0.25, "view": 0.3, "accessorize": 0.25}
    p.update(skill_probs or {})
    kw: dict = {}
    if rng.random() < p["recontext"]:
        kw["scene"] = str(rng.choice(SCENES[1:]))
        kw["position"] = str(rng.choice(list(POSITIONS)))
        kw["size"] = str(rng.choice(list(SCALES)))
    if rng.random() < p["stylize"]:
        kw["style"] = str(rng.choice(STYLES[1:]))
    if rng.random() < p["recolor"]:
        kw["colour"] = str(rng.choice(list(COLOURS)))
    if rng.random() < p["view"]:
        kw["rotation"] = int(rng.choice(list(ROTATIONS)))
        kw["mirror"] = bool(rng.random() < 0.5) or kw["rotation"] == 0
    if rng.random() < p["accessorize"]:
        kw["accessory"] = str(rng.choice(ACCESSORIES[1:]))
    if jitter:
        kw["jitter"] = tuple(float(x) for x in rng.uniform(-jitter, jitter, 3))
    return Context(**kw)
