"""Raw Parquet rows -> fixed-shape numpy arrays: the deterministic half of building a batch (the
random half, ``data.Collate``, runs in the trainer; ``data`` says how the two meet).

``Prepare`` runs in Ray Data tasks ahead of the trainers, and Ray Train's controller and Ray Data's
coordinators unpickle the dataset plan that holds it before any row moves: so this module imports
no torch, and a ``Prepare`` carries its tokenizer as the checkpoint it comes from, loaded where it is
used (a pickled tokenizer is megabytes, and unpickling it imports transformers).
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from ..utils.images import inspect_image
from .config import TrainConfig

DEMO_SLOTS = 5  # demos of an example prepared ahead of the trainer (SuTI takes at most 5)


@functools.lru_cache(maxsize=4)
def _tokenizer_of(checkpoint: str):
    from ..model.loading import tokenizer_of

    return tokenizer_of(checkpoint)


def decode(data, size: int) -> np.ndarray | None:
    """Encoded bytes -> (size, size, 3) uint8, or None for anything broken."""
    img, reason = inspect_image(data)
    if reason:
        return None
    img = img.convert("RGB")
    if img.size != (size, size):  # area averaging, as the world renders
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img)


class Prepare:
    """Raw Parquet columns -> fixed-shape numpy arrays, no strings and no random draws (see the module
    docstring), called by Ray Data tasks (``trainer.py``) or by the worker itself. Broken images become
    zeros flagged False.

    pretrain: target (n, S, S, 3) uint8, target_ok (n,), prompt_ids (n, L).
    suti: also demo_images (n, 5, S, S, 3) uint8, demo_ok (n, 5), demo_caption_ids (n, 5, L), and per
    control control_map_<name> (n, C, S, S), control_present_<name> (n,). Cached: target_latents,
    prompt_states (n, L, D), demo_latents (n, 5, c, h, w), demo_caption_states (n, 5, L, D) in float16.
    """

    def __init__(self, cfg: TrainConfig, tokenizer, image_size: int, max_len: int | None = None):
        """``tokenizer``: a tokenizer, or the checkpoint (preset, file, folder or URI) whose tokenizer
        each process loads on first use, so that a pickled ``Prepare`` stays small; ``max_len``: the
        token length, by default the tokenizer's."""
        self.cfg, self.size, self.max_len = cfg, image_size, max_len
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        return _tokenizer_of(self._tokenizer) if isinstance(self._tokenizer, str) else self._tokenizer

    def tokens(self, texts) -> np.ndarray:
        return self.tokenizer([str(t or "") for t in texts], padding="max_length",
                              max_length=self.max_len or self.tokenizer.model_max_length,
                              truncation=True, return_tensors="np").input_ids.astype(np.int64)

    def images(self, column) -> tuple[np.ndarray, np.ndarray]:
        out, ok = np.zeros((len(column), self.size, self.size, 3), np.uint8), np.zeros(len(column), bool)
        for i, data in enumerate(column):
            img = None if data is None else decode(data, self.size)
            if img is not None:
                out[i], ok[i] = img, True
        return out, ok

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        if self.cfg.mode == "pretrain":
            target, ok = self.images(batch["image"])
            return {"target": target, "target_ok": ok, "prompt_ids": self.tokens(batch["caption"])}
        out = self.cached(batch) if "target_latent" in batch else self.pixels(batch)
        n = len(out["target_ok"])
        for name in self.cfg.controls:
            from ..model.controls import CONTROL_CHANNELS

            maps = np.zeros((n, CONTROL_CHANNELS[name], self.size, self.size), np.float32)
            present = np.zeros(n, bool)
            for j in range(n):
                got = row_controls({CONTROL_COLUMNS[name]: batch[CONTROL_COLUMNS[name]][j]}, (name,), self.size)
                if name in got:
                    maps[j], present[j] = got[name].numpy(), True
            out[f"control_map_{name}"], out[f"control_present_{name}"] = maps, present
        return out

    def pixels(self, batch: dict) -> dict[str, np.ndarray]:
        target, target_ok = self.images(batch["target_image"])
        n, s = len(target_ok), self.size
        demo_images, demo_ok = np.zeros((n, DEMO_SLOTS, s, s, 3), np.uint8), np.zeros((n, DEMO_SLOTS), bool)
        captions = [[""] * DEMO_SLOTS for _ in range(n)]
        for j, (demos, caps) in enumerate(zip(batch["demo_images"], batch["demo_captions"])):
            demos, caps = _items(demos)[:DEMO_SLOTS], _items(caps)
            demo_images[j, : len(demos)], demo_ok[j, : len(demos)] = self.images(demos)
            captions[j][: len(demos)] = [str(c or "") for c in caps[: len(demos)]]
        return {"target": target, "target_ok": target_ok, "prompt_ids": self.tokens(batch["target_prompt"]),
                "demo_images": demo_images, "demo_ok": demo_ok,
                "demo_caption_ids": self.tokens(sum(captions, [])).reshape(n, DEMO_SLOTS, -1)}

    def cached(self, batch: dict) -> dict[str, np.ndarray]:
        """Stored tensors; demos and their captions' states were checked when encoded."""
        n = len(batch["target_latent"])
        first = next((j for j in range(n) if batch["target_latent"][j] is not None and len(_items(batch["demo_latents"][j]))), None)
        lat, txt, dtype = (0,), (0,), np.float16
        if first is not None:  # shapes and dtype (--dtype of the encode job) as stored
            target = array_from_bytes(batch["target_latent"][first], native=True)
            lat, txt, dtype = target.shape, array_from_bytes(batch["prompt_states"][first]).shape, target.dtype
        out = {"target_latents": np.zeros((n, *lat), dtype), "target_ok": np.zeros(n, bool),
               "prompt_states": np.zeros((n, *txt), dtype),
               "demo_latents": np.zeros((n, DEMO_SLOTS, *lat), dtype), "demo_ok": np.zeros((n, DEMO_SLOTS), bool),
               "demo_caption_states": np.zeros((n, DEMO_SLOTS, *txt), dtype)}
        for j in range(n):
            if batch["target_latent"][j] is None or batch["prompt_states"][j] is None:
                continue
            out["target_latents"][j], out["target_ok"][j] = array_from_bytes(batch["target_latent"][j]), True
            out["prompt_states"][j] = array_from_bytes(batch["prompt_states"][j])
            demos = _items(batch["demo_latents"][j])[:DEMO_SLOTS]
            for d, (latent, states) in enumerate(zip(demos, batch["demo_caption_states"][j])):
                out["demo_latents"][j, d], out["demo_caption_states"][j, d] = array_from_bytes(latent), array_from_bytes(states)
                out["demo_ok"][j, d] = True
        return out


def _items(value) -> list:
    """A list cell as a list (null -> empty): cells arrive as lists, numpy arrays or None."""
    return [] if value is None else list(value)


def array_from_bytes(data: bytes, native: bool = False) -> np.ndarray:
    """A cached tensor stored by ``data.to_bytes`` -> float32, or the stored dtype when ``native``."""
    head = np.frombuffer(data, np.int32, count=1)[0]
    shape = tuple(np.frombuffer(data, np.int32, count=head + 2)[1:head + 1])
    itemsize = int(np.frombuffer(data, np.int32, count=head + 2)[-1])
    values = np.frombuffer(data, {2: np.float16, 4: np.float32}[itemsize], offset=4 * (head + 2))
    return (values.copy() if native else values.astype(np.float32)).reshape(shape)


def columns(mode: str, controls: tuple = (), cached: bool = False) -> list[str]:
    if mode == "pretrain":
        return ["image", "caption"]
    inputs = CACHED_COLUMNS if cached else ["demo_images", "demo_captions", "target_image", "target_prompt"]
    return inputs + [CONTROL_COLUMNS[c] for c in controls]


CACHED_COLUMNS = ["demo_latents", "demo_caption_states", "target_latent", "prompt_states"]


CONTROL_COLUMNS = {"box": "target_box", "keypoints": "target_keypoints", "edges": "target_edges"}


def row_controls(row: dict, names: tuple, size: int) -> dict:
    """An ICL-V2 row's control columns (null where unknown) -> {name: (C, size, size) map}."""
    from ..model.controls import rasterize

    given = {}
    for name in names:
        value = row.get(CONTROL_COLUMNS[name])
        if value is None or isinstance(value, float) or (name != "edges" and len(value) != 4):  # null or malformed
            continue
        if name == "edges":
            img, reason = inspect_image(value)
            if reason:
                continue
            given[name] = np.asarray(img.convert("L"), np.float32) / 255.0
        else:
            given[name] = np.asarray(value, np.float32).reshape(-1, 2) if name == "keypoints" else np.asarray(value, np.float32)
    return rasterize(size, **given)
