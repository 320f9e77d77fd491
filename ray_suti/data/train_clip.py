"""``ray-suti train-clip``: the embedded default's small CLIP, one config, two recipes, two runners.

Pretrained CLIP weights cannot be downloaded here, and alt text is weak (often empty or
boilerplate), so the signal is image-image contrast. Recipes (``--recipe``):

- ``pages`` (``train_clip_pages``): crawled web pairs. Two different photos of one page (the same
  subject in different scenes) are a positive pair, which is exactly the identity the coherence
  filter must see; two augmented views of one photo are an instance pair, so distinct photos of
  one subject stay apart and only true near-duplicates land above the duplicate threshold.
- ``render`` (``train_clip_render``): pages rendered on the fly from the synthetic world: one
  subject in two sampled contexts is a positive pair, junk imagery only matches itself.

Runners: a Ray Train job (default; ``--num-workers`` DDP workers on CPUs) or one process without
Ray (``--local``; the GPU with ``--use-gpu``). Every runner and recipe shares ``run_steps``: AdamW,
linear warm-up then cosine decay (``lr_at``: a small ViT at a constant high rate collapses to one
embedding for every image), gradient clipping at 1, reports and snapshots.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

WEIGHTS = "clip.safetensors"
RECIPES = ("pages", "render")
# Options left unset take their recipe's value (the render values are those of the committed CLIP).
RECIPE_DEFAULTS = {
    "pages": {"steps": 2000, "lr": 5e-4, "warmup_steps": 50, "report_every": 50, "seed": 0},
    "render": {"steps": 1000, "lr": 3e-4, "warmup_steps": 30, "report_every": 25, "seed": 11},
}


def _per_recipe(name: str, help_text: str) -> dict:
    values = ", ".join(f"{r} {d[name]}" for r, d in RECIPE_DEFAULTS.items())
    return {"help": f"{help_text}; unset: {values}"}


@dataclass(frozen=True)
class ClipTrainConfig:
    recipe: str = field(default="pages", metadata={"help": "pages: crawled web pairs (--input); render: pages "
                                                           "rendered on the fly from the synthetic world"})
    input: str = field(default="runs/world/web", metadata={"help": "pages: web-pairs Parquet or webdataset tars"})
    output: str = field(default="runs/clip/tiny-clip.safetensors", metadata={"help": "trained weights (safetensors)"})
    init: str = field(default="", metadata={"help": "tiny CLIP weights to start from (empty: random)"})
    steps: int | None = field(default=None, metadata=_per_recipe("steps", "optimizer steps"))
    max_minutes: float = field(default=0.0, metadata={"help": "--local: stop and save after this long; the cosine "
                                                              "decay follows whichever ends first (0: no limit)"})
    batch_size: int = field(default=128, metadata={"help": "pairs per step per worker"})
    lr: float | None = field(default=None, metadata=_per_recipe("lr", "peak AdamW learning rate"))
    warmup_steps: int | None = field(default=None, metadata=_per_recipe("warmup_steps", "linear warm-up, then "
                                                                                          "cosine decay to 0"))
    instance_weight: float = field(default=1.0, metadata={"help": "weight of the view-vs-view (instance) loss"})
    text_weight: float = field(default=0.0, metadata={"help": "pages: weight of the image-text loss on cleaned "
                                                              "captions"})
    junk_frac: float = field(default=0.15, metadata={"help": "render: share of each batch that is junk imagery"})
    p_stylize: float = field(default=0.4, metadata={"help": "render: probability of a stylised context"})
    p_recolor: float = field(default=0.4, metadata={"help": "render: probability of a recoloured context"})
    jitter: float = field(default=0.03, metadata={"help": "render: context jitter (sample_context)"})
    pool_subjects: int = field(default=3000, metadata={"help": "render: subjects in the rendered pool"})
    views: int = field(default=4, metadata={"help": "render: renders per pooled subject"})
    refresh: int = field(default=24, metadata={"help": "render: pooled subjects re-rendered per step"})
    augment_anchor: bool = field(default=False, metadata={"help": "render: shift/flip-augment the anchor view too"})
    hard_instance: bool = field(default=True, metadata={"help": "render: the subject's other photo is an instance "
                                                                "negative"})
    local: bool = field(default=False, metadata={"help": "one process without Ray instead of a Ray Train job"})
    use_gpu: bool = field(default=False, metadata={"help": "--local: train on the GPU when one is present (bf16)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per process (0: torch's default)"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per Ray Train worker"})
    storage_path: str = field(default="runs/train", metadata={"help": "Ray Train storage"})
    report_every: int | None = field(default=None, metadata=_per_recipe("report_every", "steps between loss reports"))
    snapshot_every: int = field(default=0, metadata={"help": "--local: also save OUTPUT-stepN.safetensors every N "
                                                             "steps (0: never)"})
    seed: int | None = field(default=None, metadata=_per_recipe("seed", "seed"))

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}: use pages (crawled web pairs) or render (pages "
                             "rendered on the fly)")
        for name, value in RECIPE_DEFAULTS[self.recipe].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name, low in (("steps", 1), ("batch_size", 2), ("warmup_steps", 0), ("report_every", 1), ("threads", 0),
                          ("snapshot_every", 0), ("num_workers", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if not self.lr > 0 or self.max_minutes < 0:
            raise ValueError(f"lr must be > 0 and max_minutes >= 0, got {self.lr} and {self.max_minutes}")
        if self.local and self.num_workers != 1:
            raise ValueError("--local trains in one process; --num-workers is for the Ray Train job")
        local_only = [f"--{n.replace('_', '-')}" for n in ("max_minutes", "use_gpu", "snapshot_every")
                      if getattr(self, n)]
        if local_only and not self.local:
            raise ValueError(f"{', '.join(local_only)}: only with --local (the Ray Train job's workers run a fixed "
                             "number of steps, on CPUs)")
        if self.recipe == "render":
            self._check_render()

    def _check_render(self) -> None:
        if self.text_weight:
            raise ValueError("--text-weight needs --recipe pages: rendered pages have no captions")
        if not 0 <= self.junk_frac < 1:
            raise ValueError(f"junk_frac must be in [0, 1), got {self.junk_frac}")
        if not (0 <= self.p_stylize <= 1 and 0 <= self.p_recolor <= 1 and self.jitter >= 0):
            raise ValueError("p_stylize and p_recolor must be in [0, 1] and jitter >= 0")
        if self.views < 2 or not 0 <= self.refresh <= self.pool_subjects:
            raise ValueError(f"need views >= 2 and 0 <= refresh <= pool_subjects ({self.pool_subjects}), "
                             f"got views {self.views}, refresh {self.refresh}")
        subjects = self.batch_size - int(round(self.batch_size * self.junk_frac))
        if not 2 <= subjects <= self.pool_subjects:
            raise ValueError(f"a batch holds {subjects} rendered subjects; need 2 to pool_subjects "
                             f"({self.pool_subjects})")


def lr_at(cfg: ClipTrainConfig, step: int, progress: float | None = None) -> float:
    """Linear warm-up over steps, then cosine decay over ``progress`` (default: step / steps)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    progress = min(step, cfg.steps) / cfg.steps if progress is None else min(1.0, progress)
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))


def run_steps(model, cfg: ClipTrainConfig, next_loss, report, snapshot=None) -> dict:
    """The training loop of every runner and recipe. ``next_loss()`` -> the next batch's loss;
    ``report(metrics)`` every ``report_every`` steps; ``snapshot(step)`` every ``snapshot_every``.
    Stops at ``cfg.steps`` or after ``max_minutes``; with a time limit the cosine decay follows
    whichever ends first, so a timed run still ends annealed. -> the last step and mean loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    t0, budget = time.time(), cfg.max_minutes * 60 or float("inf")
    step, losses, last = 0, [], float("nan")
    while step < cfg.steps and time.time() - t0 < budget:
        loss = next_loss()
        lr = lr_at(cfg, step, max(step / cfg.steps, (time.time() - t0) / budget))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % cfg.report_every == 0 and step < cfg.steps:
            last, losses = float(np.mean(losses)), []
            report({"step": step, "loss": round(last, 4), "lr": f"{lr:.2e}",
                    "s_per_step": round((time.time() - t0) / step, 3)})
        if snapshot and cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < cfg.steps:
            snapshot(step)
    return {"step": step, "loss": float(np.mean(losses)) if losses else last}


def save_weights(model, path: str) -> None:
    """fp16 safetensors (``load_clip`` loads it into fp32 parameters)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    save_file({k: v.detach().half().contiguous().cpu() for k, v in model.state_dict().items()}, path)


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


def _losses(model, cfg: ClipTrainConfig, rng: np.random.Generator, size: int, device: str = "cpu", shard=None):
    """The recipe's batches -> (a callable giving the next step's loss, counts to report)."""
    if cfg.recipe == "render":
        from .train_clip_render import render_losses

        return render_losses(model, cfg, rng, size, device), {}
    from .train_clip_pages import shard_losses, tensor_losses

    if shard is not None:
        return shard_losses(model, cfg, rng, size, shard), {}
    return tensor_losses(model, cfg, rng, size, device)


def _freeze_unused(clip, cfg: ClipTrainConfig) -> None:
    """Without the image-text loss the text tower gets no gradient: freeze it, so that DDP waits for none."""
    if not cfg.text_weight:
        for name, p in clip.named_parameters():
            if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
                p.requires_grad_(False)


def _log(metrics: dict) -> None:
    print(json.dumps({"clip_" + k: v for k, v in metrics.items()}), flush=True)


def train_clip_local(cfg: ClipTrainConfig) -> dict:
    """One process without Ray, on the GPU (``use_gpu``, when one is present) or the CPU."""
    import torch

    from .clip import load_clip

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    clip, size = load_clip("tiny", cfg.init, device=device)
    clip.train()
    _freeze_unused(clip, cfg)
    losses, stats = _losses(clip, cfg, rng, size, device)
    _log({"recipe": cfg.recipe, "device": device, **stats})

    def next_loss():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return losses()

    def snapshot(step: int) -> None:
        save_weights(clip, cfg.output.replace(".safetensors", f"-step{step}.safetensors"))

    t0 = time.time()
    result = run_steps(clip, cfg, next_loss, _log, snapshot)
    save_weights(clip, cfg.output)
    return {**result, **stats, "minutes": round((time.time() - t0) / 60, 2), "output": cfg.output}


def _loop(config: dict) -> None:
    """A Ray Train worker: DDP over the (CPU) workers, the same loop as ``--local``."""
    import ray.train
    import torch

    from .clip import load_clip

    cfg = ClipTrainConfig(**config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rank = ray.train.get_context().get_world_rank()
    rng = np.random.default_rng([cfg.seed, rank])
    clip, size = load_clip("tiny", cfg.init)
    clip.train()
    _freeze_unused(clip, cfg)
    # with the text loss on, a batch with under two captions still leaves the text tower out
    unused = {"find_unused_parameters": cfg.text_weight > 0}
    model = ray.train.torch.prepare_model(clip, parallel_strategy_kwargs=unused)
    shard = ray.train.get_dataset_shard("train") if cfg.recipe == "pages" else None
    losses, _ = _losses(model, cfg, rng, size, shard=shard)

    def report(metrics: dict) -> None:
        if rank == 0:
            _log(metrics)
        ray.train.report({"step": metrics["step"], "loss": metrics["loss"]})

    result = run_steps(model, cfg, losses, report)
    with tempfile.TemporaryDirectory() as tmp:  # the weights travel as a Ray Train checkpoint, so
        checkpoint = None  # workers on other nodes and s3:// storage work alike
        if rank == 0:
            save_weights(model.module if hasattr(model, "module") else model, os.path.join(tmp, WEIGHTS))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            _log(result)
        ray.train.report(result, checkpoint=checkpoint)


def train_clip(cfg: ClipTrainConfig) -> dict:
    """Trains with ``cfg.recipe`` in one process (``cfg.local``) or as a Ray Train job; -> last step and loss."""
    if cfg.local:
        return train_clip_local(cfg)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..utils.ray_utils import fit, init_ray
    from .builder import check_shards
    from .train_clip_pages import page_dataset

    files, fs, _ = check_shards(cfg.input, tolerate=True) if cfg.recipe == "pages" else (None, None, None)
    init_ray()
    trainer = TorchTrainer(
        _loop, train_loop_config=asdict(cfg), datasets={"train": page_dataset(files, fs, cfg)} if files else None,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name="train-clip", storage_path=os.path.abspath(cfg.storage_path)),
        torch_config=TorchConfig(backend="gloo"),
    )
    result = fit(trainer)
    with result.checkpoint.as_directory() as d:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        shutil.copyfile(os.path.join(d, WEIGHTS), cfg.output)
    return {"step": result.metrics["step"], "loss": result.metrics["loss"], "output": cfg.output}
