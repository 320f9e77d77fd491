"""One training step for both runners: the model training starts from, its trainable groups and
learning rates, the loss, the EMA, per-step seeding, and restoring a checkpoint's weights, EMA and
optimizer state with every name checked.

Two runners drive it: ``loop.py`` (Ray Train workers, DeepSpeed ZeRO, a Ray Data shard each) and
``local.py`` (one process, one GPU or the CPU, a DataLoader). Both write the checkpoint format of
``checkpoint.py``. A step's random draws (noise, timesteps, dropouts) depend only on (seed, rank,
step), so a resumed run draws exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import Collate, as_tensors
from .prepare import columns


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
    from ..model.loading import single_file_metadata  # the metadata alone: no model stack imported

    if not cfg.init_from.endswith(".safetensors"):
        return 0
    meta = single_file_metadata(cfg.init_from)
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



def set_lr(optimizer, cfg: TrainConfig, step: int, warm_from: int) -> None:
    """Linear warm-up from ``warm_from``: the run's first step, or a resume that had no optimizer
    state to restore (Adam's moments start empty there)."""
    warm = min(1.0, (step - warm_from + 1) / max(1, cfg.warmup_steps))
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * warm


@torch.no_grad()
def ema_update(ema: dict, named: list, decay: float, step: int) -> None:
    decay = min(decay, (1 + step) / (10 + step))  # short memory early, when weights move fast
    for n, p in named:
        ema[n].mul_(decay).add_(p.detach().float().to(ema[n].device), alpha=1 - decay)



def probe_batch(cfg: TrainConfig, collate: Collate, n: int = 16) -> dict:
    """A fixed batch of held-out subjects: the demos-vs-no-demos loss gap is the early signal."""
    from ..world.oracle import OracleConfig, oracle_example
    from ..world.subjects import heldout_seeds

    ocfg = OracleConfig(image_size=collate.size, num_demos=cfg.max_demos, seed=12345)
    rows = [oracle_example(ocfg, i, subject_seed=s) for i, s in enumerate(heldout_seeds(n))]
    table = {k: [r[k] for r in rows] for k in columns(cfg.mode, cfg.controls)}
    saved, collate.rng = collate.rng, np.random.default_rng(0)
    try:
        batch = collate.draw(as_tensors(collate.prepare(table)), all_demos=True)
    finally:
        collate.rng = saved
    batch.pop("drop_text"), batch.pop("drop_demos")
    return batch


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


def training_data(cfg: TrainConfig) -> tuple[str, list[str]]:
    """(Parquet folder or URI, columns) a runner reads: examples or web pairs, or cached inputs."""
    return (cfg.latents or cfg.data), columns(cfg.mode, cfg.controls, cached=bool(cfg.latents))


def make_collate(cfg: TrainConfig, pipe, seed: int) -> Collate:
    """The batch builder; for cached inputs, with the empty prompt's stored states, after checking
    the cache was made by a model of this one's shapes."""
    import json

    from safetensors.torch import load_file

    from ..utils import storage

    model, null = pipe.model, None
    if cfg.latents:
        info = json.loads(storage.read_bytes(storage.join(cfg.latents, "encoder.json")))
        c = model.unet.config
        want = {"latent_shape": [c.in_channels, c.sample_size, c.sample_size],
                "text_states_shape": [model.config.max_text_len, model.text_encoder.config.hidden_size]}
        if model.vae is None or any(info[k] != v for k, v in want.items()):
            raise ValueError(f"{cfg.latents} was encoded for another model ({info['checkpoint']}: "
                             f"{ {k: info[k] for k in want} }; this one: {want})")
        null = load_file(storage.local_copy(storage.join(cfg.latents, "null_prompt.safetensors")))["null_prompt"]
    return Collate(cfg, pipe.tokenizer, model.config.image_size, model.config.max_text_len, seed=seed, null_prompt=null)


def seed_step(cfg: TrainConfig, step: int, rank: int = 0) -> None:
    """Seeds the global torch RNG (the loss's noise and timesteps) from (seed, rank, step) alone."""
    torch.manual_seed(cfg.seed * 1_000_003 + rank * 7919 + step)


def _names(keys: list[str], n: int = 6) -> str:
    return "none" if not keys else ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def restore_weights(model, weights: dict, source: str) -> None:
    """A checkpoint's trained weights into ``model``; their names must be exactly the model's (the
    frozen VAE is not stored), so a checkpoint of another configuration fails naming the keys."""
    from ..model.loading import upgrade_keys

    state = upgrade_keys(weights)
    expected = {k for k in model.state_dict() if not k.startswith("vae.")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{source} does not match this model's layers: missing {_names(missing)}; "
                         f"unexpected {_names(unexpected)}")
    model.load_state_dict(state, strict=False)  # strict but for the VAE, checked above


def check_ema(ema: dict, named: list, source: str) -> None:
    """The EMA of a checkpoint must cover exactly the parameters this run trains."""
    missing, unexpected = sorted({n for n, _ in named} - ema.keys()), sorted(ema.keys() - {n for n, _ in named})
    if missing or unexpected:
        raise ValueError(f"{source}: its EMA does not match the trained parameters of this run (missing "
                         f"{_names(missing)}; unexpected {_names(unexpected)}): train the same layers as the run "
                         "that wrote it, or start a new run with --init-from")


def optimizer_state(optimizer: torch.optim.Optimizer, named: list) -> dict[str, torch.Tensor]:
    """A torch optimizer's per-parameter state, by parameter name (``name::exp_avg``), as tensors."""
    index = {id(p): n for n, p in named}
    return {f"{index[id(p)]}::{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
            for p, state in optimizer.state.items() for k, v in state.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, named: list, tensors: dict, source: str) -> None:
    by_name = dict(named)
    unknown = sorted({k.split("::")[0] for k in tensors} - by_name.keys())
    if unknown:
        raise ValueError(f"{source}: optimizer state for parameters this run does not train: {_names(unknown)}")
    for key, value in tensors.items():
        name, field = key.split("::")
        optimizer.state[by_name[name]][field] = value.to(by_name[name].device)
