"""Training checkpoints, safetensors + JSON: trained weights, their EMA, the optimizer state and a
state file (step, learning-rate warm-up start, data position, configs).

The optimizer state is ``optimizer.safetensors`` (the one-process runner's torch AdamW, by parameter
name) or, under DeepSpeed, DeepSpeed's own per-rank files in ``deepspeed/`` (ZeRO partitions Adam's
moments across ranks; those files are torch pickles: resume only from checkpoints your own runs
wrote). Models for inference never come from here but from exports, which are safetensors only.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the frozen VAE (which the base model folder already holds)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("vae.")}


def save_checkpoint(path: str, weights: dict, ema: dict, state: dict, optimizer: dict | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    save_file(weights, os.path.join(path, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(path, "ema.safetensors"))
    if optimizer is not None:
        save_file(optimizer, os.path.join(path, OPTIMIZER))
    with open(os.path.join(path, STATE) + ".tmp", "w") as f:  # written last: its presence means complete
        json.dump(state, f, indent=2)
    os.replace(os.path.join(path, STATE) + ".tmp", os.path.join(path, STATE))


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    return load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(path, "ema.safetensors")), state


def load_optimizer(path: str) -> dict | None:
    """The one-process runner's optimizer state, or None (an older checkpoint, or a DeepSpeed one)."""
    file = os.path.join(path, OPTIMIZER)
    return load_file(file) if os.path.exists(file) else None
