"""Tiny-CLIP training on pages rendered on the fly from the synthetic world (no fixed crawl).

Why (issue 5 diagnosis, docs/NOTES.md): trained on crawled pages, the page-contrast loss also takes
two images of a *junk* page as a positive pair, so unrelated banners, logos and empty scenes embed
together (junk-junk pairs of the seed-7 crawl: mean cosine 0.58, vs 0.52 for two photos of one
subject) and junk pages with many such images look coherent. Background was not the problem (plain
photos, same subject other scene 0.62 vs other subject same scene 0.23); stylised and recoloured
photos were (pairs with one stylised photo 0.39 vs 0.63 without).

Here every positive pair is one subject rendered in two independently sampled contexts (the crawl's
own ``sample_context`` with jitter, stylise/recolour made more frequent), and junk imagery (the
crawl's ``_junk_image``) only ever appears as an instance: its positive is an augmented view of
itself, and everything else in the batch is a negative. A pool of rendered subjects is refreshed a
little every step, so the model sees new subjects throughout (no epoch over a fixed world).

    python -m ray_suti.data.train_clip_render --output clip.safetensors --init checkpoints/tiny-clip.safetensors \
        --steps 1000 --max-minutes 45
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from .clip import MEAN, STD, load_clip
from .train_clip import augment, contrastive
from .train_clip_local import save_weights


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) CLIP-normalised."""
    return torch.from_numpy(((images.astype(np.float32) / 255 - MEAN) / STD)).permute(0, 3, 1, 2).contiguous()


def _reupload(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """What the crawl does to a re-upload (1 px roll, +-4% brightness, noise 2/255), on normalised tensors."""
    mean, std = torch.as_tensor(MEAN)[:, None, None], torch.as_tensor(STD)[:, None, None]
    out = []
    for img in x:
        dy, dx = (int(v) for v in rng.integers(-1, 2, 2))
        px = torch.roll(img * std + mean, (dy, dx), dims=(1, 2)) * float(rng.uniform(0.96, 1.04))
        px = px + torch.randn(px.shape) * (2 / 255)
        out.append(((px.clamp(0, 1) - mean) / std))
    return torch.stack(out)


class RenderedPool:
    """``subjects`` subjects x ``views`` renders each, ``refresh`` subjects re-drawn per call to ``step``."""

    def __init__(self, rng, subjects: int, views: int, size: int, skill_probs: dict, jitter: float):
        from ..world.subjects import train_seed

        self.rng, self.views, self.size, self.skill_probs, self.jitter = rng, views, size, skill_probs, jitter
        self._train_seed = train_seed
        self.images = np.zeros((subjects, views, size, size, 3), np.uint8)
        for i in range(subjects):
            self._fill(i)

    def _fill(self, i: int) -> None:
        from ..world import render, sample_context

        seed = self._train_seed(self.rng)
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
    from ..world.crawl import _junk_image

    return np.stack([_junk_image(rng, size) for _ in range(n)]) if n else np.zeros((0, size, size, 3), np.uint8)


def train(args) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    clip, size = load_clip("tiny", args.init)
    clip.train()
    t0 = time.time()
    probs = {"stylize": args.p_stylize, "recolor": args.p_recolor}
    pool = RenderedPool(rng, args.pool_subjects, args.views, size, probs, args.jitter)
    print(f"pool of {args.pool_subjects}x{args.views} rendered in {time.time() - t0:.0f}s", flush=True)
    opt = torch.optim.AdamW(clip.parameters(), lr=args.lr, weight_decay=0.05)
    n_junk = int(round(args.batch_size * args.junk_frac))
    n_subj = args.batch_size - n_junk
    t0, deadline = time.time(), time.time() + args.max_minutes * 60 if args.max_minutes else float("inf")
    step, losses = 0, []
    while step < args.steps and time.time() < deadline:
        progress = max(step / args.steps, (time.time() - t0) / (deadline - t0) if args.max_minutes else 0)
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps) * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))
        pool.step(args.refresh)
        a_img, b_img = pool.pairs(n_subj)
        junk = junk_images(rng, n_junk, size)
        a = _to_tensor(np.concatenate([a_img, junk]))
        b = torch.cat([_to_tensor(b_img), augment(_to_tensor(junk), rng)])
        # a as the crawl has it, b augmented, and a re-upload of a: the instance pair is exactly the
        # crawl's near-copy relation (a 1 px roll moved the 4-px-patch ViT's cosine to ~0.93)
        views = [augment(a, rng) if args.augment_anchor else a, augment(b, rng), _reupload(a, rng)]
        za, zb, za2 = torch.nn.functional.normalize(clip.encode_image(torch.cat(views)), dim=-1).split(len(a))
        scale = clip.logit_scale.exp().clamp(max=100)
        loss = contrastive(za, zb, scale)
        if args.hard_instance:  # the same subject's other photo is a negative for the instance pair
            target = torch.arange(len(a))
            ce = torch.nn.functional.cross_entropy
            inst = (ce(scale * za @ torch.cat([za2, zb]).T, target) + ce(scale * za2 @ torch.cat([za, zb]).T, target)) / 2
        else:
            inst = contrastive(za, za2, scale)
        loss = loss + args.instance_weight * inst
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % args.report_every == 0:
            print(json.dumps({"step": step, "loss": round(float(np.mean(losses)), 4), "lr": f"{lr:.2e}",
                              "s_per_step": round((time.time() - t0) / step, 2)}), flush=True)
            losses = []
        if args.snapshot_every and step % args.snapshot_every == 0:
            save_weights(clip, args.output.replace(".safetensors", f"-step{step}.safetensors"))
    save_weights(clip, args.output)
    return {"step": step, "minutes": round((time.time() - t0) / 60, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--init", default="", help="tiny CLIP weights to start from (default: random)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--max-minutes", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--instance-weight", type=float, default=1.0)
    p.add_argument("--junk-frac", type=float, default=0.15, help="share of each batch that is junk imagery")
    p.add_argument("--p-stylize", type=float, default=0.4)
    p.add_argument("--p-recolor", type=float, default=0.4)
    p.add_argument("--jitter", type=float, default=0.03)
    p.add_argument("--pool-subjects", type=int, default=3000)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--refresh", type=int, default=24, help="subjects re-rendered per step")
    p.add_argument("--report-every", type=int, default=25)
    p.add_argument("--snapshot-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--augment-anchor", type=int, default=0, help="1: shift/flip-augment the anchor view too")
    p.add_argument("--hard-instance", type=int, default=1, help="1: other photos of the subject are instance negatives")
    print(train(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
