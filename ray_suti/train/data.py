"""Turning Parquet rows into training batches, in two parts.

``Prepare`` is the deterministic work: images decoded, checked and resized (uint8, a flag per image),
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
from PIL import Image

from ..utils.images import inspect_image
from .config import TrainConfig

DEMO_SLOTS = 5  # demos of an example prepared ahead of the trainer (SuTI takes at most 5)


def decode(data, size: int) -> np.ndarray | None:
    """Encoded bytes -> (size, size, 3) uint8, or None for anything broken."""
    img, reason = inspect_image(data)
    if reason:
        return None
    img = img.convert("RGB")
    if img.size != (size, size):  # area averaging, as the world renders
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img)


def pixels_to_float(pixels: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) in [-1, 1]."""
    return pixels.movedim(-1, -3).float() / 127.5 - 1.0


class Prepare:
    """Raw Parquet columns -> fixed-shape numpy arrays, no strings and no random draws (see the module
    docstring), called by Ray Data tasks (``trainer.py``) or by the worker itself. Broken images become
    zeros flagged False.

    pretrain: target (n, S, S, 3) uint8, target_ok (n,), prompt_ids (n, L).
    suti: also demo_images (n, 5, S, S, 3) uint8, demo_ok (n, 5), demo_caption_ids (n, 5, L), and per
    control control_map_<name> (n, C, S, S), control_present_<name> (n,). Cached: target_latents,
    prompt_states (n, L, D), demo_latents (n, 5, c, h, w), demo_caption_states (n, 5, L, D) in float16.
    """

    def __init__(self, cfg: TrainConfig, tokenizer, image_size: int, max_len: int):
        self.cfg, self.tokenizer, self.size, self.max_len = cfg, tokenizer, image_size, max_len

    def tokens(self, texts) -> np.ndarray:
        return self.tokenizer([str(t or "") for t in texts], padding="max_length", max_length=self.max_len,
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
            target = from_bytes(batch["target_latent"][first], native=True)
            lat, txt, dtype = target.shape, from_bytes(batch["prompt_states"][first]).shape, target.numpy().dtype
        out = {"target_latents": np.zeros((n, *lat), dtype), "target_ok": np.zeros(n, bool),
               "prompt_states": np.zeros((n, *txt), dtype),
               "demo_latents": np.zeros((n, DEMO_SLOTS, *lat), dtype), "demo_ok": np.zeros((n, DEMO_SLOTS), bool),
               "demo_caption_states": np.zeros((n, DEMO_SLOTS, *txt), dtype)}
        for j in range(n):
            if batch["target_latent"][j] is None or batch["prompt_states"][j] is None:
                continue
            out["target_latents"][j], out["target_ok"][j] = from_bytes(batch["target_latent"][j]).numpy(), True
            out["prompt_states"][j] = from_bytes(batch["prompt_states"][j]).numpy()
            demos = _items(batch["demo_latents"][j])[:DEMO_SLOTS]
            for d, (latent, states) in enumerate(zip(demos, batch["demo_caption_states"][j])):
                out["demo_latents"][j, d], out["demo_caption_states"][j, d] = from_bytes(latent), from_bytes(states)
                out["demo_ok"][j, d] = True
        return out


def _items(value) -> list:
    """A list cell as a list (null -> empty): cells arrive as lists, numpy arrays or None."""
    return [] if value is None else list(value)


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
    head = np.frombuffer(data, np.int32, count=1)[0]
    shape = tuple(np.frombuffer(data, np.int32, count=head + 2)[1:head + 1])
    itemsize = int(np.frombuffer(data, np.int32, count=head + 2)[-1])
    values = np.frombuffer(data, {2: np.float16, 4: np.float32}[itemsize], offset=4 * (head + 2))
    return torch.from_numpy((values.copy() if native else values.astype(np.float32)).reshape(shape))


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
