"""Turning Parquet rows into training batches, inside each worker (streamed by Ray Data).

Web pairs (pretrain): decode, drop broken records, resize to the model's size. ICL-V2 (suti): pick
1..max_demos demos at random (so every demo count is learnt), pad them with a validity mask, and
draw the text and demo dropouts for classifier-free guidance. Cached inputs (``ray-suti encode``
output, latent models): the same draws over stored VAE latents and text-encoder states instead of
images and token ids, so the same seed gives the same batch either way.
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


DEMO_SLOTS = 5  # demos of an example decoded ahead of the trainer (SuTI takes at most 5)


def decode_images(batch: dict, size: int) -> dict:
    """Ray Data ``map_batches`` ahead of the trainer: image bytes -> (size, size, 3) uint8 arrays
    with a flag per image (broken ones are zeros, flagged False), so training workers only draw
    demos and dropouts, tokenize and stack. Other columns pass through."""
    out = {k: (_lists(v) if k in LIST_COLUMNS else v) for k, v in batch.items()
           if k not in ("image", "target_image", "demo_images")}
    blank = np.zeros((size, size, 3), np.uint8)

    def pixels(data):
        img = decode(data, size)
        return (blank, False) if img is None else (img, True)

    for column, prefix in (("image", "pixels"), ("target_image", "target_pixels")):
        if column in batch:
            got = [pixels(d) for d in batch[column]]
            out[prefix], out[prefix.replace("pixels", "ok")] = np.stack([g[0] for g in got]), np.array([g[1] for g in got])
    if "demo_images" in batch:
        n = len(batch["demo_images"])
        out["demo_pixels"] = np.zeros((n, DEMO_SLOTS, size, size, 3), np.uint8)
        out["demo_ok"] = np.zeros((n, DEMO_SLOTS), bool)
        for i, demos in enumerate(batch["demo_images"]):
            for j, data in enumerate(list(demos)[:DEMO_SLOTS]):
                out["demo_pixels"][i, j], out["demo_ok"][i, j] = pixels(data)
    return out


LIST_COLUMNS = ("demo_captions", "target_box", "target_keypoints")


def _lists(column) -> np.ndarray:
    """An object array of Python lists (None kept): what Arrow turns back into a list column."""
    out = np.empty(len(column), dtype=object)
    out[:] = [None if v is None else list(v) for v in column]
    return out


def batch_rows(batch: dict) -> int:
    return batch["drop_text"].shape[0]


class Collate:
    """``iter_torch_batches(collate_fn=...)``: a dict of numpy columns -> the loss's batch dict.
    ``null_prompt``: the empty prompt's text-encoder states (L, D), for batches of cached inputs."""

    def __init__(self, cfg: TrainConfig, tokenizer, image_size: int, max_len: int, seed: int,
                 null_prompt: torch.Tensor | None = None):
        self.cfg, self.tokenizer, self.size, self.max_len = cfg, tokenizer, image_size, max_len
        self.rng = np.random.default_rng(seed)
        self.null_prompt = null_prompt

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
        decoded = zip(batch["pixels"], batch["ok"]) if "pixels" in batch else ((decode(d, self.size), True)
                                                                                 for d in batch["image"])
        for (img, ok), caption in zip(decoded, batch["caption"]):
            if img is not None and ok:
                images.append(img)
                captions.append(str(caption or ""))
        n = len(images)
        return {"target": _to_tensor(images), "prompt_ids": self.tokens(captions),
                "drop_text": self.drops(n, self.cfg.text_drop)}

    def icl(self, batch: dict, all_demos: bool = False) -> dict:
        cached = "target_latent" in batch
        if cached:  # stored tensors; demos and their captions' states were checked when encoded
            targets = [None if t is None else from_bytes(t) for t in batch["target_latent"]]
            demo_lists = [[] if d is None else list(zip(map(from_bytes, d), map(from_bytes, c)))
                          for d, c in zip(batch["demo_latents"], batch["demo_caption_states"])]
            prompts = [None if p is None else from_bytes(p) for p in batch["prompt_states"]]
        elif "target_pixels" in batch:  # decoded ahead by Ray Data (decode_images)
            targets = [p if ok else None for p, ok in zip(batch["target_pixels"], batch["target_ok"])]
            demo_lists = [[(pix[j], str(c or "")) for j, c in enumerate(list(caps)[:DEMO_SLOTS]) if ok[j]]
                          for pix, ok, caps in zip(batch["demo_pixels"], batch["demo_ok"], batch["demo_captions"])]
            prompts = [str(p) for p in batch["target_prompt"]]
        else:
            targets = [decode(t, self.size) for t in batch["target_image"]]
            demo_lists = [[p for p in ((decode(d, self.size), str(c or "")) for d, c in zip(list(demos)[:DEMO_SLOTS], caps))
                           if p[0] is not None] for demos, caps in zip(batch["demo_images"], batch["demo_captions"])]
            prompts = [str(p) for p in batch["target_prompt"]]
        k_max, rows, control_rows = self.cfg.max_demos, [], []
        for j, (tgt, pairs, prompt) in enumerate(zip(targets, demo_lists, prompts)):
            if tgt is None or not pairs:
                continue
            k = min(len(pairs), k_max)
            k = k if all_demos or self.rng.random() < 0.5 else int(self.rng.integers(1, k + 1))
            chosen = [pairs[i] for i in self.rng.permutation(len(pairs))[:k]]
            rows.append((tgt, prompt, chosen))
            if self.cfg.controls:  # each control dropped on its own, so every subset is learnt
                maps = row_controls({c: batch[c][j] for c in CONTROL_COLUMNS.values() if c in batch},
                                    self.cfg.controls, self.size)
                control_rows.append({n: m for n, m in maps.items() if self.rng.random() >= self.cfg.control_drop})
        n = len(rows)
        valid = torch.zeros(n, k_max, dtype=torch.bool)
        for i, (_, _, chosen) in enumerate(rows):
            valid[i, : len(chosen)] = True
        out = {"demo_valid": valid, "drop_text": self.drops(n, self.cfg.text_drop),
               "drop_demos": self.drops(n, self.cfg.demo_drop)}
        if cached:
            out.update(self._cached_tensors(rows, k_max, out["drop_text"]))
        else:
            s = self.size
            demo_images = torch.zeros(n, k_max, 3, s, s)
            captions = []
            for i, (_, _, chosen) in enumerate(rows):
                demo_images[i, : len(chosen)] = _to_tensor([c[0] for c in chosen])
                captions += [c[1] for c in chosen] + [""] * (k_max - len(chosen))
            out.update({"target": _to_tensor([r[0] for r in rows]), "prompt_ids": self.tokens([r[1] for r in rows]),
                        "demo_images": demo_images, "demo_caption_ids": self.tokens(captions).view(n, k_max, -1)})
        if self.cfg.controls:  # every batch has the same keys, present or not
            from ..model.controls import batch_controls

            out.update(batch_controls(control_rows, self.size, names=self.cfg.controls).to_batch())
        return out

    def _cached_tensors(self, rows: list, k_max: int, drop_text: torch.Tensor) -> dict:
        """Cached rows -> target latents, prompt states (the empty prompt's where the text is dropped,
        as the model would encode it) and padded demo latents and caption states."""
        if self.null_prompt is None:
            raise ValueError("cached inputs need the empty prompt's states (null_prompt.safetensors of the encode output)")
        n, (lat, txt) = len(rows), (rows[0][2][0][0].shape, rows[0][2][0][1].shape) if rows else ((0,), (0,))
        demo_latents, demo_states = torch.zeros(n, k_max, *lat), torch.zeros(n, k_max, *txt)
        for i, (_, _, chosen) in enumerate(rows):
            for j, (latent, states) in enumerate(chosen):
                demo_latents[i, j], demo_states[i, j] = latent, states
        prompts = torch.stack([r[1] for r in rows]) if rows else torch.zeros(0, *txt)
        prompts = torch.where(drop_text[:, None, None], self.null_prompt.to(prompts.dtype), prompts)
        return {"target_latents": torch.stack([r[0] for r in rows]) if rows else torch.zeros(0, *lat),
                "prompt_states": prompts, "demo_latents": demo_latents, "demo_caption_states": demo_states}


def to_bytes(t: torch.Tensor, dtype=np.float16) -> bytes:
    """A cached tensor as Parquet bytes: a little header of its shape, then the values."""
    a = t.detach().cpu().float().numpy().astype(dtype)
    return np.asarray([a.ndim, *a.shape, np.dtype(dtype).itemsize], np.int32).tobytes() + a.tobytes()


def from_bytes(data: bytes) -> torch.Tensor:
    head = np.frombuffer(data, np.int32, count=1)[0]
    shape = tuple(np.frombuffer(data, np.int32, count=head + 2)[1:head + 1])
    itemsize = int(np.frombuffer(data, np.int32, count=head + 2)[-1])
    values = np.frombuffer(data, {2: np.float16, 4: np.float32}[itemsize], offset=4 * (head + 2))
    return torch.from_numpy(values.astype(np.float32).reshape(shape))


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
