"""``ray-suti train-clip``: a small CLIP for the embedded default, trained with Ray Train.

Pretrained CLIP weights cannot be downloaded here, and alt text is weak (often empty or
boilerplate), so the signal is image-image contrast, two ways at once:

- page contrast: two different photos of one page (the same subject in different scenes) are a
  positive pair, which is exactly the identity the coherence filter must see;
- instance contrast: two augmented views (shift-crop, flip) of one photo are a positive pair and
  other photos, even of the same page, are not, so distinct photos of one subject stay apart and
  only true near-duplicates land above the duplicate threshold.

Same-page pairs in a batch are masked out of the negatives. An optional image-text term uses the
captions that survive cleaning. Pairs are made by grouping the web pairs by normalised page URL
with Ray Data. A linear warm-up and cosine decay keep the small ViT from collapsing (at a constant
1e-3 every image got the same embedding: loss at chance).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

WEIGHTS = "clip.safetensors"


@dataclass(frozen=True)
class ClipTrainConfig:
    input: str = field(default="runs/world/web", metadata={"help": "web-pairs Parquet or webdataset tars"})
    output: str = field(default="runs/clip/tiny-clip.safetensors", metadata={"help": "trained weights (safetensors)"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "pairs per step per worker"})
    lr: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up, then cosine decay to 0"})
    instance_weight: float = field(default=1.0, metadata={"help": "weight of the view-vs-view (instance) loss"})
    text_weight: float = field(default=0.0, metadata={"help": "weight of the image-text loss on cleaned captions"})
    num_workers: int = field(default=1, metadata={"help": "training workers"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per worker"})
    storage_path: str = field(default="runs/train", metadata={"help": "Ray Train storage"})
    report_every: int = field(default=50, metadata={"help": "steps between loss reports"})
    seed: int = field(default=0, metadata={"help": "seed"})


def page_pairs(group: pd.DataFrame, seed: int) -> pd.DataFrame:
    """All valid photos of one page -> pairs (a, b) of different photos, each photo once as ``a``."""
    from .captions import clean_caption

    group = group[group["reason"] == ""]
    if len(group) < 2:
        return pd.DataFrame({"a": [], "b": [], "caption": [], "page": []})
    n = len(group)
    rng = np.random.default_rng([seed, n, sum(map(ord, group["page_key"].iloc[0]))])
    partners = [(j + 1 + int(rng.integers(n - 1))) % n for j in range(n)]
    return pd.DataFrame({"a": list(group["image"]), "b": [group["image"].iloc[p] for p in partners],
                         "caption": [clean_caption(c) for c in group["caption"]],
                         "page": [group["page_key"].iloc[0]] * n})


def augment(x, rng: np.random.Generator, shift: int = 3, brightness: float = 0.05, noise: float = 0.01):
    """(N, 3, S, S) CLIP-normalised images -> a random shift-crop (edge padding), flip, brightness
    scale and pixel noise of each: what separates a re-upload from its original, so that near-copies
    embed together (noise in [0, 1] pixel units)."""
    import torch
    import torch.nn.functional as F

    from .clip import MEAN, STD

    n, _, s, _ = x.shape
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    dy, dx = (torch.from_numpy(rng.integers(0, 2 * shift + 1, n)).to(x.device) for _ in range(2))
    grid = torch.arange(s, device=x.device)
    rows, cols = (dy[:, None] + grid)[:, :, None], (dx[:, None] + grid)[:, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (N, 3, S, S)
    flip = torch.from_numpy(rng.random(n) < 0.5).to(x.device)[:, None, None, None]
    out = torch.where(flip, out.flip(-1), out)
    std = torch.as_tensor(STD, device=x.device)[:, None, None]
    mean = torch.as_tensor(MEAN, device=x.device)[:, None, None]
    scale = torch.from_numpy(rng.uniform(1 - brightness, 1 + brightness, (n, 1, 1, 1)).astype(np.float32)).to(x.device)
    pixels = (out * std + mean) * scale + noise * torch.randn(out.shape, device=x.device)
    return ((pixels - mean) / std).contiguous()


def contrastive(x, y, scale, same_page=None):
    """Symmetric InfoNCE between row-aligned unit embeddings; ``same_page`` (N, N) masks false negatives."""
    import torch
    import torch.nn.functional as F

    logits = scale * x @ y.T
    if same_page is not None:
        eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
        logits = logits.masked_fill(same_page.to(x.device) & ~eye, float("-inf"))
    target = torch.arange(len(x), device=x.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def lr_at(cfg: ClipTrainConfig, step: int, progress: float | None = None) -> float:
    """Linear warm-up over steps, then cosine decay over ``progress`` (default: step / steps)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    progress = min(step, cfg.steps) / cfg.steps if progress is None else min(1.0, progress)
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))


def pair_loss(model, cfg: ClipTrainConfig, rng: np.random.Generator, batch: dict, tokenizer, size: int,
              device: str = "cpu"):
    """One step's loss on a batch of page pairs: ``a``, ``b`` (encoded images or (N, 3, S, S)
    normalised tensors), ``page`` and ``caption`` columns."""
    import torch

    from ..utils.images import inspect_image
    from .clip import TINY_CLIP, preprocess

    def images(col):
        if isinstance(col, torch.Tensor):
            return col.to(device)
        return preprocess([inspect_image(x)[0] for x in col], size).to(device)

    a, b = images(batch["a"]), images(batch["b"])
    pages = pd.factorize(np.asarray(batch["page"]))[0]
    same_page = torch.from_numpy(pages[:, None] == pages[None, :])
    views = [augment(a, rng), augment(b, rng)] + ([augment(a, rng)] if cfg.instance_weight else [])
    captions = np.asarray(batch["caption"], dtype=object)
    has_text = np.array([bool(c) for c in captions])
    use_text = bool(cfg.text_weight) and has_text.sum() > 1
    text = None
    if use_text:
        text = tokenizer(list(captions[has_text]), context_length=TINY_CLIP["text_cfg"]["context_length"]).to(device)
    # One forward through the (DDP-)wrapped model, so gradients are synchronised across workers.
    feats, zt, scale = model(image=torch.cat(views), text=text)[:3]
    za, zb, *za2 = feats.split(len(a))
    scale = scale.clamp(max=100)
    loss = contrastive(za, zb, scale, same_page)
    if cfg.instance_weight:
        loss = loss + cfg.instance_weight * contrastive(za, za2[0], scale)
    if use_text:
        keep = torch.from_numpy(has_text)
        loss = loss + cfg.text_weight * contrastive(za[keep.to(device)], zt, scale, same_page[keep][:, keep])
    return loss


def _loop(config: dict) -> None:
    import ray.train
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    from .clip import load_clip

    cfg = ClipTrainConfig(**config)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    rank = ray.train.get_context().get_world_rank()
    rng = np.random.default_rng([cfg.seed, rank])
    clip, size = load_clip("tiny")
    clip.train()
    model = ray.train.torch.prepare_model(clip)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    tokenizer = SimpleTokenizer()
    shard = ray.train.get_dataset_shard("train")
    step, losses = 0, []
    while step < cfg.steps:
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pandas", drop_last=True,
                                        local_shuffle_buffer_size=8 * cfg.batch_size, local_shuffle_seed=cfg.seed + step):
            loss = pair_loss(model, cfg, rng, batch, tokenizer, size)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(float(loss))
            if step % cfg.report_every == 0 and step < cfg.steps:
                if rank == 0:
                    print(f"clip step={step} loss={np.mean(losses):.4f} lr={lr_at(cfg, step):.2e}", flush=True)
                ray.train.report({"step": step, "loss": float(np.mean(losses))})
                losses = []
            if step >= cfg.steps:
                break
    with tempfile.TemporaryDirectory() as tmp:  # the weights travel as a Ray Train checkpoint, so
        checkpoint = None  # workers on other nodes and s3:// storage work alike
        if rank == 0:
            from safetensors.torch import save_file

            core = model.module if hasattr(model, "module") else model
            save_file({k: v.detach().contiguous() for k, v in core.state_dict().items()}, os.path.join(tmp, WEIGHTS))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            print(f"clip step={step} loss={np.mean(losses or [float('nan')]):.4f}", flush=True)
        ray.train.report({"step": step, "loss": float(np.mean(losses or [float("nan")]))}, checkpoint=checkpoint)


def train_clip(cfg: ClipTrainConfig) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..utils.images import MIN_SIDE
    from ..utils.ray_utils import init_ray
    from .builder import check_shards, read_web_pairs, validate_records

    files, fs, _ = check_shards(cfg.input, tolerate=True)
    init_ray()
    ds = read_web_pairs(files, fs, num_cpus=0.25)
    ds = ds.map_batches(validate_records, fn_kwargs={"min_side": MIN_SIDE}, batch_format="pandas", num_cpus=0.25)
    ds = ds.filter(lambda r: r["page_key"] != "" and r["reason"] == "")
    ds = ds.groupby("page_key").map_groups(page_pairs, fn_kwargs={"seed": cfg.seed}, batch_format="pandas",
                                           num_cpus=0.25)
    trainer = TorchTrainer(
        _loop, train_loop_config=asdict(cfg), datasets={"train": ds},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="train-clip", storage_path=os.path.abspath(cfg.storage_path)),
        torch_config=TorchConfig(backend="gloo"),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        shutil.copyfile(os.path.join(d, WEIGHTS), cfg.output)
    return result.metrics
