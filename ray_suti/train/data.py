"""Turning Parquet rows into training batches, inside each worker (streamed by Ray Data).

Web pairs (pretrain): decode, drop broken records, resize to the model's size. ICL-V2 (suti): pick
1..max_demos demos at random (so every demo count is learnt), pad them with a validity mask, and
draw the text and demo dropouts for classifier-free guidance.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..utils.images import inspect_image
from .config import TrainConfig


def decode(data, size: int) -> np.ndarray | None:
    """Encoded bytes -> (size, size, 3) uint8, or None for anything broken."""
    img, reason = inspect_image(data)
    if reason:
        return None
    img = img.convert("RGB")
    if img.size != (size, size):  # area averaging, as the world renders
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img)


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Collate:
    """``iter_torch_batches(collate_fn=...)``: a dict of numpy columns -> the loss's batch dict."""

    def __init__(self, cfg: TrainConfig, tokenizer, image_size: int, max_len: int, seed: int):
        self.cfg, self.tokenizer, self.size, self.max_len = cfg, tokenizer, image_size, max_len
        self.rng = np.random.default_rng(seed)

    def tokens(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.max_len, truncation=True,
                              return_tensors="pt").input_ids

    def drops(self, n: int, p: float) -> torch.Tensor:
        return torch.from_numpy(self.rng.random(n) < p)

    def __call__(self, batch: dict) -> dict:
        if self.cfg.mode == "pretrain":
            return self.web_pairs(batch)
        return self.icl(batch)

    def web_pairs(self, batch: dict) -> dict:
        images, captions = [], []
        for data, caption in zip(batch["image"], batch["caption"]):
            img = decode(data, self.size)
            if img is not None:
                images.append(img)
                captions.append(str(caption or ""))
        n = len(images)
        return {"target": _to_tensor(images), "prompt_ids": self.tokens(captions),
                "drop_text": self.drops(n, self.cfg.text_drop)}

    def icl(self, batch: dict, all_demos: bool = False) -> dict:
        k_max, rows, control_rows = self.cfg.max_demos, [], []
        for j, (demos, caps, target, prompt) in enumerate(zip(batch["demo_images"], batch["demo_captions"],
                                                              batch["target_image"], batch["target_prompt"])):
            tgt = decode(target, self.size)
            pairs = [(decode(d, self.size), str(c or "")) for d, c in zip(demos, caps)]
            pairs = [p for p in pairs if p[0] is not None]
            if tgt is None or not pairs:
                continue
            k = min(len(pairs), k_max)
            k = k if all_demos or self.rng.random() < 0.5 else int(self.rng.integers(1, k + 1))
            chosen = [pairs[i] for i in self.rng.permutation(len(pairs))[:k]]
            rows.append((tgt, str(prompt), chosen))
            if self.cfg.controls:  # each control dropped on its own, so every subset is learnt
                maps = row_controls({c: batch[c][j] for c in columns("suti", self.cfg.controls)[4:]},
                                    self.cfg.controls, self.size)
                control_rows.append({n: m for n, m in maps.items() if self.rng.random() >= self.cfg.control_drop})
        n, s = len(rows), self.size
        demo_images = torch.zeros(n, k_max, 3, s, s)
        valid = torch.zeros(n, k_max, dtype=torch.bool)
        captions = []
        for i, (_, _, chosen) in enumerate(rows):
            demo_images[i, : len(chosen)] = _to_tensor([c[0] for c in chosen])
            valid[i, : len(chosen)] = True
            captions += [c[1] for c in chosen] + [""] * (k_max - len(chosen))
        out = {"target": _to_tensor([r[0] for r in rows]), "prompt_ids": self.tokens([r[1] for r in rows]),
               "demo_images": demo_images, "demo_caption_ids": self.tokens(captions).view(n, k_max, -1),
               "demo_valid": valid, "drop_text": self.drops(n, self.cfg.text_drop),
               "drop_demos": self.drops(n, self.cfg.demo_drop)}
        if self.cfg.controls:  # every batch has the same keys, present or not
            from ..model.controls import batch_controls

            out.update(batch_controls(control_rows, self.size, names=self.cfg.controls).to_batch())
        return out


def columns(mode: str, controls: tuple = ()) -> list[str]:
    if mode == "pretrain":
        return ["image", "caption"]
    return ["demo_images", "demo_captions", "target_image", "target_prompt"] + [CONTROL_COLUMNS[c] for c in controls]


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
