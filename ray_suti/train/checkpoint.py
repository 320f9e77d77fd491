"""Training checkpoints: safetensors weights + EMA + a JSON state, never pickles."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the frozen VAE (which the base model folder already holds)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("vae.")}


def save_checkpoint(path: str, weights: dict, ema: dict, state: dict) -> None:
    os.makedirs(path, exist_ok=True)
    save_file(weights, os.path.join(path, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.items()}, os.path.join(path, "ema.safetensors"))
    with open(os.path.join(path, STATE), "w") as f:
        json.dump(state, f, indent=2)


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    with open(os.path.join(path, STATE)) as f:
        state = json.load(f)
    return load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(path, "ema.safetensors")), state
