"""Where SuTI pipelines come from and go to: presets, diffusers folders, Stable Diffusion bases with
an adapter, and the single-file format of the embedded default. Safetensors only, never a pickle.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from ..utils.storage import local_copy, staged
from .presets import PRESETS, SuTIConfig, get_preset

if TYPE_CHECKING:
    import torch

    from .suti import SuTIModel

# --dtype of the CLI and Serve -> torch's name; this module imports no torch (Ray Data tasks read
# tokenizers and sizes of checkpoints through it)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")
# Single files written before the SuTI layers became their own component (SuTIUNet held them).
LEGACY_PREFIXES = (("unet.unet.", "unet."), ("unet.neighbours.", "suti.neighbours."),
                   ("unet.control_encoders.", "suti.control_encoders."))


def _plain(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def suti_config_of(pipe) -> SuTIConfig:
    """The SuTIConfig the pipeline's components make up (what training and the single file use)."""
    tc, s, sched = pipe.text_encoder.config, pipe.suti.config if pipe.suti is not None else None, pipe.scheduler.config
    text = {k: getattr(tc, k) for k in TEXT_KEYS}
    vae = pipe.vae
    return SuTIConfig(
        name=s.name if s else "base", image_size=pipe.image_size, unet=_plain(pipe.unet.config), text=text,
        vae=_plain(vae.config) if vae is not None else None,
        vae_scaling_factor=vae.config.scaling_factor if vae is not None else 0.18215,
        neighbour_levels=tuple(s.neighbour_levels) if s else (), neighbour_heads=s.neighbour_heads if s else 0,
        neighbour_cosine=s.neighbour_cosine if s else False, max_demos=s.max_demos if s else 0,
        controls=tuple(s.controls) if s else (), prediction_type=sched.prediction_type,
        beta_schedule=sched.beta_schedule)


def torch_dtype(name: str) -> torch.dtype:
    """``DTYPES``' name (fp32, fp16, bf16) -> the torch dtype."""
    import torch

    return getattr(torch, DTYPES[name])


def model_from_preset(name: str, seed: int = 0) -> SuTIModel:
    import torch

    from .suti import SuTIModel

    config = get_preset(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SuTIModel(config)


def from_base(cls, path: str, adapter: str | None, torch_dtype, suti_options: dict):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .layers import SuTILayers
    from .schedulers import make_scheduler

    path = local_copy(path)
    load = dict(use_safetensors=True, torch_dtype=torch_dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load)
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), use_safetensors=True,
                                                 dtype=torch_dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    sched = DDIMScheduler.load_config(path, subfolder="scheduler")
    if adapter:
        suti = SuTILayers.from_adapter(adapter)
        suti.check_unet(unet)
    else:
        image_size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        options = dict(neighbour_levels=(1, 2), neighbour_heads=8, max_demos=5, image_size=image_size,
                       name=f"base:{os.path.basename(os.path.normpath(path))}") | suti_options
        suti = SuTILayers.for_unet(unet, **options)
    if torch_dtype is not None:
        suti = suti.to(torch_dtype)
    config = SuTIConfig("base", 0, {}, {}, vae={}, prediction_type=sched.get("prediction_type", "epsilon"),
                        beta_schedule=sched.get("beta_schedule", "scaled_linear"))
    return cls(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=make_scheduler("ddim", config),
               suti=suti, vae=vae)


def from_pretrained(cls, path: str, kwargs: dict, diffusers_from_pretrained):
    path = local_copy(path)  # a URI fetched; a SuTI folder still being written waited for (its manifest)
    if path.endswith(".safetensors") and os.path.isfile(path):
        return from_single_file(cls, path, kwargs.get("torch_dtype"))
    if os.path.isfile(os.path.join(path, "suti.json")):
        raise ValueError(f"{path} is a folder of the old SuTI layout (suti.json); load it with ray-suti 0.1 "
                         "and save it again, or export a single file")
    kwargs.setdefault("use_safetensors", True)
    if os.path.isdir(path) or kwargs.get("local_files_only"):
        return diffusers_from_pretrained(cls, path, **kwargs)
    try:  # a hub id
        return diffusers_from_pretrained(cls, path, **kwargs)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load {path!r}: it is not a local folder or .safetensors file, and the Hugging "
                      f"Face Hub did not provide it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def image_size_of(checkpoint: str) -> int:
    """The pixel size a preset or saved model draws, read from its configs (no weights loaded)."""
    from ..utils import storage

    if checkpoint in PRESETS:
        return get_preset(checkpoint).image_size
    if checkpoint.endswith(".safetensors"):
        return json.loads(single_file_metadata(checkpoint)["suti_config"])["image_size"]
    unet = json.loads(storage.read_bytes(storage.join(checkpoint, "unet", "config.json")))
    vae = storage.join(checkpoint, "vae", "config.json")
    factor = 2 ** (len(json.loads(storage.read_bytes(vae))["block_out_channels"]) - 1) if storage.exists(vae) else 1
    return unet["sample_size"] * factor


def controls_of(checkpoint: str) -> tuple:
    """The spatial controls a preset or saved model was trained with, read from its configs (no
    weights loaded): what ``SuTIPipeline.controls`` says once loaded."""
    from ..utils import storage

    if checkpoint in PRESETS:
        return tuple(get_preset(checkpoint).controls)
    if checkpoint.endswith(".safetensors"):
        return SuTIConfig.from_dict(json.loads(single_file_metadata(checkpoint)["suti_config"])).controls
    suti = storage.join(checkpoint, "suti", "config.json")  # a folder without SuTI layers draws text-only
    return tuple(json.loads(storage.read_bytes(suti)).get("controls", ())) if storage.exists(suti) else ()


def tokenizer_of(checkpoint: str):
    """The tokenizer of a preset or saved model, without its weights (for Ray Data's batch builders)."""
    from .tokenizer import clip_tokenizer

    if checkpoint in PRESETS:
        return clip_tokenizer(get_preset(checkpoint).max_text_len)
    if checkpoint.endswith(".safetensors"):
        return clip_tokenizer(SuTIConfig.from_dict(json.loads(single_file_metadata(checkpoint)["suti_config"])).max_text_len)
    from transformers import CLIPTokenizer

    from ..utils import storage

    return CLIPTokenizer.from_pretrained(local_copy(storage.join(checkpoint, "tokenizer")))


def _state_dict(pipe) -> dict:
    parts = {"unet": pipe.unet, "suti": pipe.suti, "text_encoder": pipe.text_encoder}
    return {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}


def save_single_file(pipe, path: str, metadata: dict | None, dtype) -> None:
    from safetensors.torch import save_file

    if pipe.vae is not None:
        raise ValueError("single-file export is for pixel presets; use save_pretrained for latent models")
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in _state_dict(pipe).items()}
    meta = {"suti_config": json.dumps(pipe.suti_config.to_dict()), "scheduler": json.dumps(_plain(pipe.scheduler.config)
            | {"_class_name": type(pipe.scheduler).__name__}), **{k: str(v) for k, v in (metadata or {}).items()}}
    with staged(path) as local:
        save_file(tensors, local + ".tmp", metadata=meta)
        os.replace(local + ".tmp", local)


def upgrade_keys(state: dict) -> dict:
    """State-dict keys of any earlier single file -> today's (unet., suti., text_encoder.)."""
    out = {}
    for k, v in state.items():
        for old, new in LEGACY_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def from_single_file(cls, path: str, torch_dtype=None):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .schedulers import scheduler_class
    from .suti import SuTIModel

    path = local_copy(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "suti_config" not in meta:
        raise ValueError(f"{path} is not a SuTI single file (no suti_config in its metadata)")
    config = SuTIConfig.from_dict(json.loads(meta["suti_config"]))
    model = SuTIModel(config)
    state = upgrade_keys(load_file(path))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    scheduler = None
    if "scheduler" in meta:
        sched = json.loads(meta["scheduler"])
        scheduler = scheduler_class(sched["_class_name"]).from_config(sched)
    pipe = cls.from_model(model, scheduler)
    return pipe.to(torch_dtype) if torch_dtype is not None else pipe


def single_file_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(local_copy(path), framework="numpy") as f:  # "pt" would import torch
        return dict(f.metadata())


def resolve_checkpoint(checkpoint: str) -> str:
    """Checks a checkpoint argument before any work starts -> a preset name, a URI or an absolute
    local path (Ray tasks and replicas need not share the driver's working directory)."""
    from ..utils import storage

    if checkpoint in PRESETS:
        return checkpoint
    if not ((checkpoint.endswith(".safetensors") and storage.is_file(checkpoint))
            or storage.is_file(storage.join(checkpoint, "model_index.json"))):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} is neither a preset ({', '.join(PRESETS)}) nor a saved "
                                "model (a .safetensors file or a save_pretrained folder)")
    return checkpoint if storage.is_uri(checkpoint) else os.path.abspath(checkpoint)
