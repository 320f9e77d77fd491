"""The per-worker training loop: DeepSpeed ZeRO over a SuTI model, fed by a Ray Data shard.

Every worker runs the same number of steps (Ray Train splits the data into equal shards, and each
worker loops over its shard), reports at the same steps, and rank 0 writes the checkpoints:
weights, EMA weights and the step, as safetensors + JSON. After a failure Ray Train restarts the
workers and ``ray.train.get_checkpoint()`` hands back the last checkpoint; Adam's moments restart
there (they are not saved, to keep checkpoints pickle-free), under a short learning-rate warm-up.
"""
from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import time

import numpy as np
import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint, trainable_state
from .config import TrainConfig
from .data import Collate, columns

TORCH_EXTENSIONS_DIR = os.path.expanduser("~/.cache/ray-suti/torch_extensions")
SMALL_SHARD_ROWS = 4096  # a worker's shard this small is read once and replayed from memory


def start_pipeline(cfg: TrainConfig):
    """The model training starts from: a checkpoint (folder or single file) or a fresh preset."""
    import dataclasses

    from ..model import SuTIModel, SuTIPipeline

    pipe = SuTIPipeline.from_pretrained(cfg.init_from) if cfg.init_from else SuTIPipeline.from_preset(cfg.preset, seed=cfg.seed)
    config = pipe.suti_config
    if cfg.neighbour_cosine and not config.neighbour_cosine:
        # Switch to cosine neighbour attention: every weight carries over, the temperatures start fresh.
        model = SuTIModel(dataclasses.replace(config, neighbour_cosine=True), pipe.unet, text_encoder=pipe.text_encoder,
                          vae=pipe.vae)
        missing, unexpected = model.load_state_dict(pipe.model.state_dict(), strict=False)
        if unexpected or any(not k.endswith("logit_scale") for k in missing):
            raise ValueError(f"cannot switch {cfg.init_from or cfg.preset} to cosine attention: {missing} {unexpected}")
        pipe = SuTIPipeline.from_model(model, pipe.scheduler)
    if set(cfg.controls) - set(pipe.controls):
        # New control encoders: every weight carries over, the encoders start as exact no-ops.
        names = tuple(dict.fromkeys(pipe.controls + tuple(cfg.controls)))
        model = SuTIModel(dataclasses.replace(pipe.suti_config, controls=names), pipe.unet,
                          text_encoder=pipe.text_encoder, vae=pipe.vae)
        missing, unexpected = model.load_state_dict(pipe.model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("suti.control_encoders.") for k in missing):
            raise ValueError(f"cannot add controls to {cfg.init_from or cfg.preset}: {missing} {unexpected}")
        pipe = SuTIPipeline.from_model(model, pipe.scheduler)
    if cfg.gradient_checkpointing:
        pipe.model.enable_gradient_checkpointing()
    return pipe


def continued_step(cfg: TrainConfig) -> int:
    """A single-file checkpoint of the same mode carries its step count on (training across
    sessions continues from the committed file); anything else starts at 0."""
    from ..model import SuTIPipeline

    if not cfg.init_from.endswith(".safetensors"):
        return 0
    meta = SuTIPipeline.single_file_metadata(cfg.init_from)
    return int(meta.get("step", 0)) if meta.get("mode") == cfg.mode else 0


class LossModule(nn.Module):
    """What DeepSpeed wraps: forward(batch) -> scalar loss."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.noise = model.noise_scheduler()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.loss(batch, self.noise, demo_grad=self.cfg.demo_grad, noise_repeats=self.cfg.noise_repeats,
                               high_noise_frac=self.cfg.high_noise_frac)


def deepspeed_config(cfg: TrainConfig) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.offload and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.use_gpu},
        "zero_allow_untested_optimizer": True,  # a client torch AdamW (no JIT-compiled optimizer on CPU)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def probe_batch(cfg: TrainConfig, collate: Collate, n: int = 16) -> dict:
    """A fixed batch of held-out subjects: the demos-vs-no-demos loss gap is the early signal."""
    from ..world.oracle import OracleConfig, oracle_example
    from ..world.subjects import heldout_seeds

    ocfg = OracleConfig(image_size=collate.size, num_demos=cfg.max_demos, seed=12345)
    rows = [oracle_example(ocfg, i, subject_seed=s) for i, s in enumerate(heldout_seeds(n))]
    table = {k: [r[k] for r in rows] for k in columns(cfg.mode, cfg.controls)}
    saved, collate.rng = collate.rng, np.random.default_rng(0)
    try:
        batch = collate.icl(table, all_demos=True)
    finally:
        collate.rng = saved
    batch.pop("drop_text"), batch.pop("drop_demos")
    return batch


def trainable_groups(model, cfg: TrainConfig) -> tuple[list, list[dict]]:
    """(named trainable parameters, optimizer groups): new neighbour layers at ``new_lr``, the rest at
    ``base_lr``; pretraining leaves the neighbour layers out, latent models freeze the text encoder."""
    if cfg.mode == "pretrain":
        model.suti.requires_grad_(False)
    if not cfg.train_text_encoder or model.config.latent:
        model.text_encoder.requires_grad_(False)
    if cfg.adapter_only:  # IP-Adapter's recipe: the base model frozen, only the SuTI layers learn
        model.requires_grad_(False)
        model.suti.requires_grad_(True)
    if cfg.controls_only:  # ControlNet-style: everything else frozen
        model.requires_grad_(False)
        model.suti.control_encoders.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_new = lambda n: n.startswith("suti.")  # noqa: E731
    new = [p for n, p in named if is_new(n)]
    old = [p for n, p in named if not is_new(n)]
    groups = [g for g in ({"params": old, "lr": cfg.base_lr, "initial_lr": cfg.base_lr},
                          {"params": new, "lr": cfg.new_lr, "initial_lr": cfg.new_lr}) if g["params"]]
    return named, groups


def set_lr(optimizer, cfg: TrainConfig, step: int, resumed_from: int) -> None:
    """Linear warm-up from every (re)start: Adam's moments start empty there."""
    warm = min(1.0, (step - resumed_from + 1) / max(1, cfg.warmup_steps))
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * warm


@torch.no_grad()
def ema_update(ema: dict, named: list, decay: float, step: int) -> None:
    decay = min(decay, (1 + step) / (10 + step))  # short memory early, when weights move fast
    for n, p in named:
        ema[n].mul_(decay).add_(p.detach().float().to(ema[n].device), alpha=1 - decay)


def _gathered(params, stage: int):
    if stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def raw_batches(shard, cfg: TrainConfig, step: int):
    """The worker's rows as numpy batches, epoch after epoch, shuffled locally. A shard of at most
    ``SMALL_SHARD_ROWS`` rows is kept after its first epoch and replayed in a new order each time:
    re-reading a few rows costs a Ray Data execution (seconds) per epoch."""
    epoch, kept, rows = 0, [], 0
    while True:
        for raw in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                      local_shuffle_buffer_size=cfg.shuffle_buffer,
                                      local_shuffle_seed=cfg.seed + 1000 * epoch + step):
            rows += len(next(iter(raw.values())))
            if rows <= SMALL_SHARD_ROWS:
                kept.append(raw)
            yield raw
        epoch += 1
        if 0 < rows <= SMALL_SHARD_ROWS:
            break
        kept, rows = [], 0
    rng = np.random.default_rng(cfg.seed + step)
    while True:
        for i in rng.permutation(len(kept)):
            yield kept[i]


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig(**config)
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)
    torch.set_num_threads(cfg.threads)
    import deepspeed
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.use_gpu else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")

    pipe = start_pipeline(cfg)
    model = pipe.model
    step, ema = continued_step(cfg), None
    # Ray's own checkpoint after a restart wins; else --resume-from (a folder or a URI, downloaded)
    ckpt = ray.train.get_checkpoint() or (ray.train.Checkpoint(cfg.resume_from) if cfg.resume_from else None)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            weights, ema, state = load_checkpoint(d)
        from ..model.loading import upgrade_keys

        model.load_state_dict(upgrade_keys(weights), strict=False)
        step = state["step"]
    resumed_from = step

    named, groups = trainable_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    engine, optimizer, _, _ = deepspeed.initialize(model=LossModule(model, cfg).to(device), optimizer=optimizer,
                                                   config=deepspeed_config(cfg))
    ema_names = [n for n, _ in named]
    ema = {n: v.to(device) for n, v in ema.items()} if ema is not None and rank == 0 else ema
    with _gathered([p for _, p in named], cfg.zero_stage):
        if rank == 0 and ema is None:
            ema = {n: p.detach().float().clone() for n, p in named}  # on the worker's device

    collate = Collate(cfg, pipe.tokenizer, model.config.image_size, model.config.max_text_len,
                      seed=cfg.seed * 1_000_003 + rank * 7919 + step)
    probe = probe_batch(cfg, collate) if cfg.mode == "suti" else None
    shard = ray.train.get_dataset_shard("train")

    def batches():
        """Collated batches of exactly ``batch_size`` rows, forever: the rows an epoch leaves over are
        carried into the next, so a shard smaller than a batch still trains (with drop_last it
        yielded nothing and the run never ended)."""
        carry = None
        for raw in raw_batches(shard, cfg, step):
            batch = collate(raw)
            if carry is not None:
                batch = {k: torch.cat([carry[k], v]) for k, v in batch.items()}
            while batch["target"].shape[0] >= cfg.batch_size:
                yield {k: v[:cfg.batch_size] for k, v in batch.items()}
                batch = {k: v[cfg.batch_size:] for k, v in batch.items()}
            carry = batch

    losses, last_time, last_step, last_batch = [], time.time(), step, None
    dtype = torch.bfloat16 if cfg.use_gpu else torch.float32
    for batch in batches():
        if step >= cfg.steps:
            break
        if batch["target"].shape[0] == 0:  # every row broken: reuse the last batch, never skip a
            batch = last_batch  # collective step
        last_batch = batch
        batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
        set_lr(optimizer, cfg, step, resumed_from)
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        step += 1
        losses.append(loss.item())
        with _gathered([p for _, p in named], cfg.zero_stage):
            if rank == 0:
                ema_update(ema, named, cfg.ema_decay, step)

        checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if step % cfg.report_every and not checkpoint_now:
            continue
        elapsed = time.time() - last_time
        metrics = {"step": step, "loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
                   "samples_per_s": world * cfg.batch_size * (step - last_step) / max(elapsed, 1e-9),
                   "grad_norm": float(engine.get_global_grad_norm() or 0.0), "resumed_from": resumed_from,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if probe is not None and cfg.probe_every > 0 and (step % cfg.probe_every == 0 or step == cfg.steps):
            metrics["demo_gain"] = demo_gain(engine.module.model, probe, device)
        losses, last_time, last_step = [], time.time(), step
        if rank == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
                  flush=True)
        if not checkpoint_now:
            ray.train.report(metrics)
            continue
        with _gathered([p for _, p in model.named_parameters()], cfg.zero_stage):
            weights = trainable_state(model) if rank == 0 else None
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(tmp, weights, {n: ema[n].cpu() for n in ema_names},
                                {"step": step, "suti_config": model.config.to_dict(), "train_config": config})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


@torch.no_grad()
def demo_gain(model, probe: dict, device) -> float:
    """1 - loss(with demos) / loss(demos dropped), same noise and timesteps: > 0 once demos help."""
    was_training = model.training
    model.eval()
    dtype = next(model.unet.parameters()).dtype  # bf16 under DeepSpeed on GPU
    batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in probe.items()}
    scheduler = model.noise_scheduler()
    with_demos = model.loss(batch, scheduler, generator=torch.Generator(device).manual_seed(0), noise_repeats=4)
    batch["drop_demos"] = torch.ones(batch["target"].shape[0], dtype=torch.bool, device=device)
    without = model.loss(batch, scheduler, generator=torch.Generator(device).manual_seed(0), noise_repeats=4)
    model.train(was_training)
    return float(1 - with_demos / without)
