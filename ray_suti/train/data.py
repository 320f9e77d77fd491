"""Turning Parquet rows into training batches, in two parts.

``Prepare`` (``prepare.py``) is the deterministic work: images decoded, checked and resized (uint8, a flag per image),
texts tokenized, cached tensors unpacked, controls rasterised, into fixed-shape arrays. It runs in
Ray Data's ``map_batches`` ahead of the trainers (tasks on any CPU node), so the workers read
tensors with ``iter_torch_batches``. ``Collate.draw`` is the random part, in the worker, as index
operations: web pairs lose their broken records and draw text dropout; ICL-V2 examples pick 1..max_demos
of their good demos (so every demo count is learnt), padded with a validity mask, and draw the text,
demo and control dropouts for classifier-free guidance. The draws stay in the worker because they are
seeded by its position in its shard, which is what a resumed run restores; a map task cannot know
the epoch. Cached inputs (``ray-suti encode`` output, latent models) take the same draws over stored
VAE latents and text-encoder states, so the same seed gives the same batch either way.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import TrainConfig
from .prepare import CONTROL_COLUMNS, Prepare, array_from_bytes


def pixels_to_float(pixels: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) in [-1, 1]."""
    return pixels.movedim(-1, -3).float() / 127.5 - 1.0


def as_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """What ``iter_torch_batches`` hands a worker, for batches prepared in the worker itself."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def batch_rows(batch: dict) -> int:
    return batch["drop_text"].shape[0]


class Collate:
    """A raw batch -> the loss's batch dict: ``draw(as_tensors(prepare(raw)))``; workers fed by Ray Data
    call ``draw`` on the prepared tensors. ``rng`` is set per batch by the runner (resumable draws).
    ``null_prompt``: the empty prompt's text-encoder states (L, D), for batches of cached inputs."""

    def __init__(self, cfg: TrainConfig, tokenizer, image_size: int, max_len: int, seed: int,
                 null_prompt: torch.Tensor | None = None):
        self.cfg, self.size = cfg, image_size
        self.prepare = Prepare(cfg, tokenizer, image_size, max_len)
        self.rng = np.random.default_rng(seed)
        self.null_prompt = null_prompt
        self.empty_caption = torch.from_numpy(self.prepare.tokens([""])[0])  # padding demos' caption

    def __call__(self, batch: dict) -> dict:
        return self.draw(as_tensors(self.prepare(batch)))

    def drops(self, n: int, p: float) -> torch.Tensor:
        return torch.from_numpy(self.rng.random(n) < p)

    def draw(self, batch: dict[str, torch.Tensor], all_demos: bool = False) -> dict:
        keep = batch["target_ok"].bool()
        if self.cfg.mode == "pretrain":
            return {"target": pixels_to_float(batch["target"][keep]), "prompt_ids": batch["prompt_ids"][keep],
                    "drop_text": self.drops(int(keep.sum()), self.cfg.text_drop)}
        demo_ok = batch["demo_ok"].bool()
        rows = torch.nonzero(keep & demo_ok.any(1)).flatten()
        n, k_max = len(rows), self.cfg.max_demos
        chosen = torch.zeros(n, k_max, dtype=torch.long)  # demo slot of each position
        valid = torch.zeros(n, k_max, dtype=torch.bool)
        controls = [c for c in CONTROL_COLUMNS if c in self.cfg.controls]
        kept = {c: torch.zeros(n, dtype=torch.bool) for c in controls}
        for i, j in enumerate(rows.tolist()):
            slots = np.flatnonzero(demo_ok[j].numpy())
            k = min(len(slots), k_max)
            k = k if all_demos or self.rng.random() < 0.5 else int(self.rng.integers(1, k + 1))
            picked = slots[self.rng.permutation(len(slots))[:k]]
            chosen[i, :k], valid[i, :k] = torch.from_numpy(picked), True
            for c in controls:  # each control dropped on its own, so every subset is learnt
                if batch[f"control_present_{c}"][j]:
                    kept[c][i] = self.rng.random() >= self.cfg.control_drop
        out = {"demo_valid": valid, "drop_text": self.drops(n, self.cfg.text_drop),
               "drop_demos": self.drops(n, self.cfg.demo_drop)}

        def demos(column: str, to_float=torch.Tensor.float) -> torch.Tensor:  # (n, k_max, ...), zeros past each row's demos
            picked = to_float(batch[column][rows[:, None], chosen])
            return picked * valid.view(n, k_max, *[1] * (picked.dim() - 2))

        if "target_latents" in batch:
            if self.null_prompt is None:
                raise ValueError("cached inputs need the empty prompt's states (null_prompt.safetensors of the encode output)")
            prompts = batch["prompt_states"][rows].float()  # the empty prompt's where dropped, as the model would encode it
            prompts = torch.where(out["drop_text"][:, None, None], self.null_prompt.float(), prompts)
            out.update({"target_latents": batch["target_latents"][rows].float(), "prompt_states": prompts,
                        "demo_latents": demos("demo_latents"), "demo_caption_states": demos("demo_caption_states")})
        else:
            captions = torch.where(valid[..., None], batch["demo_caption_ids"][rows[:, None], chosen], self.empty_caption)
            out.update({"target": pixels_to_float(batch["target"][rows]), "prompt_ids": batch["prompt_ids"][rows],
                        "demo_images": demos("demo_images", pixels_to_float), "demo_caption_ids": captions})
        for c in controls:  # every batch has the same keys, present or not
            out[f"control_map_{c}"] = batch[f"control_map_{c}"][rows] * kept[c].view(n, 1, 1, 1)
            out[f"control_present_{c}"] = kept[c]
        return out


def to_bytes(t: torch.Tensor, dtype=np.float16) -> bytes:
    """A cached tensor as Parquet bytes: a little header of its shape, then the values."""
    a = t.detach().cpu().float().numpy().astype(dtype)
    return np.asarray([a.ndim, *a.shape, np.dtype(dtype).itemsize], np.int32).tobytes() + a.tobytes()


def from_bytes(data: bytes, native: bool = False) -> torch.Tensor:
    """``to_bytes``'s inverse: float32, or the stored dtype when ``native``."""
    return torch.from_numpy(array_from_bytes(data, native))
