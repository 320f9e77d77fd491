"""The ``render`` recipe of ``ray-suti train-clip``: batches of pages rendered on the fly.

Trained on crawled pages, page contrast also takes two images of a *junk* page as a positive
pair, so unrelated banners, logos and empty scenes embed together. Here every positive pair is one
subject rendered in two independently sampled contexts (the crawl's own ``sample_context`` with
jitter, stylise and recolour made more frequent), and junk imagery (the crawl's ``junk_image``)
only ever appears as an instance: its positive is an augmented view of itself, and everything else
in the batch is a negative. The instance view is what the crawl does to a re-upload. A pool of
rendered subjects is refreshed a little every step, so the model sees new subjects throughout (no
epoch over a fixed world). Why, with the figures: docs/stages/1-dataset.md.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from .clip import MEAN, STD
from .train_clip import ClipTrainConfig, augment, contrastive


def to_tensor(images: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) CLIP-normalised."""
    x = torch.from_numpy(((images.astype(np.float32) / 255 - MEAN) / STD)).permute(0, 3, 1, 2).contiguous()
    return x.to(device)


def reupload(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """What the crawl does to a re-upload (1 px roll, +-4% brightness, noise 2/255), on normalised tensors."""
    mean = torch.as_tensor(MEAN, device=x.device)[:, None, None]
    std = torch.as_tensor(STD, device=x.device)[:, None, None]
    out = []
    for img in x:
        dy, dx = (int(v) for v in rng.integers(-1, 2, 2))
        px = torch.roll(img * std + mean, (dy, dx), dims=(1, 2)) * float(rng.uniform(0.96, 1.04))
        px = px + torch.randn(px.shape, device=x.device) * (2 / 255)
        out.append(((px.clamp(0, 1) - mean) / std))
    return torch.stack(out)


class RenderedPool:
    """``subjects`` subjects x ``views`` renders each, ``refresh`` subjects re-drawn per call to ``step``."""

    def __init__(self, rng, subjects: int, views: int, size: int, skill_probs: dict, jitter: float):
        self.rng, self.views, self.size, self.skill_probs, self.jitter = rng, views, size, skill_probs, jitter
        self.images = np.zeros((subjects, views, size, size, 3), np.uint8)
        for i in range(subjects):
            self._fill(i)

    def _fill(self, i: int) -> None:
        from ..world import render, sample_context
        from ..world.subjects import train_seed

        seed = train_seed(self.rng)
        for v in range(self.views):
            ctx = sample_context(self.rng, self.skill_probs, jitter=self.jitter)
            self.images[i, v] = render(seed, ctx, self.size)[0]

    def step(self, refresh: int) -> None:
        for i in self.rng.choice(len(self.images), refresh, replace=False):
            self._fill(int(i))

    def pairs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.rng.choice(len(self.images), n, replace=False)
        va = self.rng.integers(self.views, size=n)
        vb = (va + 1 + self.rng.integers(self.views - 1, size=n)) % self.views
        return self.images[idx, va], self.images[idx, vb]


def junk_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    from ..world.crawl import junk_image

    return np.stack([junk_image(rng, size) for _ in range(n)]) if n else np.zeros((0, size, size, 3), np.uint8)


def render_loss(model, cfg: ClipTrainConfig, rng: np.random.Generator, pool: RenderedPool, size: int,
                device: str = "cpu"):
    """One step: refresh the pool, then the loss on rendered pairs plus junk instances."""
    pool.step(cfg.refresh)
    n_junk = int(round(cfg.batch_size * cfg.junk_frac))
    a_img, b_img = pool.pairs(cfg.batch_size - n_junk)
    junk = junk_images(rng, n_junk, size)
    a = to_tensor(np.concatenate([a_img, junk]), device)
    b = torch.cat([to_tensor(b_img, device), augment(to_tensor(junk, device), rng)])
    # a as the crawl has it, b augmented, and a re-upload of a: the instance pair is exactly the
    # crawl's near-copy relation (the 4-px-patch ViT is sensitive to a 1 px roll)
    views = [augment(a, rng) if cfg.augment_anchor else a, augment(b, rng), reupload(a, rng)]
    # One forward through the (DDP-)wrapped model: unit embeddings and the logit scale.
    feats, _, scale = model(image=torch.cat(views))[:3]
    za, zb, za2 = feats.split(len(a))
    scale = scale.clamp(max=100)
    loss = contrastive(za, zb, scale)
    if cfg.hard_instance:  # the same subject's other photo is a negative for the instance pair
        target = torch.arange(len(a), device=za.device)
        ce = torch.nn.functional.cross_entropy
        inst = (ce(scale * za @ torch.cat([za2, zb]).T, target) + ce(scale * za2 @ torch.cat([za, zb]).T, target)) / 2
    else:
        inst = contrastive(za, za2, scale)
    return loss + cfg.instance_weight * inst


def render_losses(model, cfg: ClipTrainConfig, rng: np.random.Generator, size: int, device: str = "cpu"):
    """Renders the pool (``pool_subjects`` x ``views``) -> a callable giving the next step's loss."""
    t0 = time.time()
    pool = RenderedPool(rng, cfg.pool_subjects, cfg.views, size, {"stylize": cfg.p_stylize, "recolor": cfg.p_recolor},
                        cfg.jitter)
    print(json.dumps({"clip_pool": f"{cfg.pool_subjects}x{cfg.views}", "seconds": round(time.time() - t0, 1)}),
          flush=True)
    return lambda: render_loss(model, cfg, rng, pool, size, device)
