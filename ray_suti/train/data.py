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
        k_max, rows = self.cfg.max_demos, []
        for demos, caps, target, prompt in zip(batch["demo_images"], batch["demo_captions"],
                                               batch["target_image"], batch["target_prompt"]):
            tgt = decode(target, self.size)
            pairs = [(decode(d, self.size), str(c or "")) for d, c in zip(demos, caps)]
            pairs = [p for p in pairs if p[0] is not None]
            if tgt is None or not pairs:
                continue
            k = min(len(pairs), k_max)
            k = k if all_demos or self.rng.random() < 0.5 else int(self.rng.integers(1, k + 1))
            chosen = [pairs[i] for i in self.rng.permutation(len(pairs))[:k]]
            rows.append((tgt, str(prompt), chosen))
        n, s = len(rows), self.size
        demo_images = torch.zeros(n, k_max, 3, s, s)
        valid = torch.zeros(n, k_max, dtype=torch.bool)
        captions = []
        for i, (_, _, chosen) in enumerate(rows):
            demo_images[i, : len(chosen)] = _to_tensor([c[0] for c in chosen])
            valid[i, : len(chosen)] = True
            captions += [c[1] for c in chosen] + [""] * (k_max - len(chosen))
        return {"target": _to_tensor([r[0] for r in rows]), "prompt_ids": self.tokens([r[1] for r in rows]),
                "demo_images": demo_images, "demo_caption_ids": self.tokens(captions).view(n, k_max, -1),
                "demo_valid": valid, "drop_text": self.drops(n, self.cfg.text_drop),
                "drop_demos": self.drops(n, self.cfg.demo_drop)}


def columns(mode: str) -> list[str]:
    return ["image", "caption"] if mode == "pretrain" else ["demo_images", "demo_captions", "target_image",
                                                             "target_prompt"]
