"""SuTIPipeline: subject photos + prompt -> images, in the manner of a diffusers pipeline.

Sampling uses a diffusers scheduler (DDIM by default, DPM-Solver++ via ``set_scheduler``) and
three-branch classifier-free guidance with separate text and subject scales:

    pred = u + s_subject * (s - u) + s_text * (f - s)
    u = (no text, no demos)   s = (no text, demos)   f = (text, demos)

Branches whose weight is zero are not computed: ``s_subject == 1`` drops ``u``, and
``s_subject == s_text`` drops ``s``, so equal scales cost what ordinary text guidance costs. Demo
features are computed once per call and shared by every step and branch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from ..utils.storage import local_copy, staged
from .controls import KEYPOINT_NAMES, Controls, batch_controls, rasterize
from .inputs import SuTIInputError, load_image, subject_tensor
from .presets import SuTIConfig, get_preset
from .suti import SuTIModel
from .tokenizer import clip_tokenizer
from .unet import DemoFeatures, SuTIUNet

SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
MAX_STEPS = 1000


@dataclass
class SuTIPipelineOutput(BaseOutput):
    images: list | np.ndarray | torch.Tensor


def _scheduler_kwargs(name: str, config: SuTIConfig) -> dict:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    if name == "ddim":
        return dict(clip_sample=not config.latent, set_alpha_to_one=False)
    return dict(algorithm_type="dpmsolver++", solver_order=2)


def make_scheduler(name: str, config: SuTIConfig):
    return SCHEDULERS[name](num_train_timesteps=1000, beta_schedule=config.beta_schedule,
                            prediction_type=config.prediction_type, timestep_spacing="trailing",
                            **_scheduler_kwargs(name, config))


def guidance_branches(text_scale: float, subject_scale: float, with_demos: bool) -> list[tuple[float, bool, bool]]:
    """(weight, use_text, use_demos) of each branch that contributes."""
    if with_demos:
        raw = [(text_scale, True, True), (subject_scale - text_scale, False, True), (1 - subject_scale, False, False)]
    else:
        raw = [(text_scale, True, False), (1 - text_scale, False, False)]
    return [b for b in raw if b[0] != 0]


class SuTIPipeline:
    def __init__(self, model: SuTIModel, tokenizer: CLIPTokenizer, scheduler=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.scheduler = scheduler or make_scheduler("ddim", model.config)
        self._progress_kwargs: dict = {}

    # ---- construction and persistence -----------------------------------------------------
    @property
    def config(self) -> SuTIConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    def to(self, device=None, dtype=None) -> "SuTIPipeline":
        self.model.to(device=device, dtype=dtype)
        return self

    @classmethod
    def from_preset(cls, name: str, seed: int = 0) -> "SuTIPipeline":
        """An untrained pipeline of a named preset (``tiny-32``, ``tiny-64``, ``sd15``)."""
        config = get_preset(name)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = SuTIModel(config)
        return cls(model, clip_tokenizer(config.max_text_len))

    @classmethod
    def from_base(cls, path: str, neighbour_levels: tuple = (1, 2), neighbour_heads: int = 8,
                  max_demos: int = 5) -> "SuTIPipeline":
        """Any diffusers Stable Diffusion 1.x/2.x folder (local or a URI) -> SuTI with fresh neighbour layers."""
        path = local_copy(path)
        base = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        sched = DDIMScheduler.load_config(path, subfolder="scheduler")
        tc = text_encoder.config
        text = {k: getattr(tc, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "max_position_embeddings", "hidden_act",
                                            "bos_token_id", "eos_token_id")}
        text["pad_token_id"] = tokenizer.pad_token_id
        unet_cfg = {k: v for k, v in base.config.items() if not k.startswith("_")}
        config = SuTIConfig(
            name=f"base:{os.path.basename(os.path.normpath(path))}",
            image_size=base.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1),
            unet=unet_cfg, text=text, vae={k: v for k, v in vae.config.items() if not k.startswith("_")},
            vae_scaling_factor=vae.config.scaling_factor, neighbour_levels=tuple(neighbour_levels),
            neighbour_heads=neighbour_heads, max_demos=max_demos,
            prediction_type=sched.get("prediction_type", "epsilon"),
            beta_schedule=sched.get("beta_schedule", "scaled_linear"),
        )
        unet = SuTIUNet(base_config=unet_cfg, neighbour_levels=config.neighbour_levels, neighbour_heads=neighbour_heads,
                        max_demos=max_demos)
        unet.unet.load_state_dict(base.state_dict())
        return cls(SuTIModel(config, unet, text_encoder, vae), tokenizer)

    def save_pretrained(self, path: str) -> None:
        """A folder of safetensors weights and JSON configs; nothing pickled. ``path``: local or a URI."""
        with staged(path) as local:
            self._save_folder(local)

    def _save_folder(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.model.unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
        self.model.text_encoder.save_pretrained(os.path.join(path, "text_encoder"), safe_serialization=True)
        if self.model.vae is not None:
            self.model.vae.save_pretrained(os.path.join(path, "vae"), safe_serialization=True)
        self.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
        self.scheduler.save_pretrained(os.path.join(path, "scheduler"))
        with open(os.path.join(path, "suti.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)

    def save_single_file(self, path: str, metadata: dict | None = None, dtype=torch.float16) -> None:
        """Every trainable weight in one .safetensors file, the config in its metadata (pixel presets;
        the small committed checkpoints use this). ``path``: local or a URI."""
        from safetensors.torch import save_file

        if self.model.vae is not None:
            raise ValueError("single-file export is for pixel presets; use save_pretrained for latent models")
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.model.state_dict().items()}
        meta = {"suti_config": json.dumps(self.config.to_dict()), **{k: str(v) for k, v in (metadata or {}).items()}}
        with staged(path) as local:
            save_file(tensors, local + ".tmp", metadata=meta)
            os.replace(local + ".tmp", local)

    @classmethod
    def from_single_file(cls, path: str) -> "SuTIPipeline":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            config = SuTIConfig.from_dict(json.loads(f.metadata()["suti_config"]))
        model = SuTIModel(config)
        state = {k: v.float() for k, v in load_file(path).items()}
        model.load_state_dict(state)
        return cls(model, clip_tokenizer(config.max_text_len))

    @staticmethod
    def single_file_metadata(path: str) -> dict:
        from safetensors import safe_open

        with safe_open(local_copy(path), framework="pt") as f:
            return dict(f.metadata())

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype | None = None) -> "SuTIPipeline":
        """Loads a folder written by ``save_pretrained`` (or a single file from ``save_single_file``):
        safetensors only, never unpickles. ``path``: local or a URI (fetched once into a local cache)."""
        path = local_copy(path)
        if os.path.isfile(path) and path.endswith(".safetensors"):
            return cls.from_single_file(path)
        with open(os.path.join(path, "suti.json")) as f:
            config = SuTIConfig.from_dict(json.load(f))
        unet = SuTIUNet.from_pretrained(os.path.join(path, "unet"), use_safetensors=True, torch_dtype=torch_dtype)
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), use_safetensors=True,
                                                     dtype=torch_dtype)
        vae = None
        if config.latent:
            vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae"), use_safetensors=True, torch_dtype=torch_dtype)
        sched_cfg = DDIMScheduler.load_config(os.path.join(path, "scheduler"))
        by_class = {c.__name__: c for c in SCHEDULERS.values()}
        if sched_cfg.get("_class_name") not in by_class:
            raise ValueError(f"unsupported scheduler {sched_cfg.get('_class_name')!r} in {path}")
        scheduler = by_class[sched_cfg["_class_name"]].from_config(sched_cfg)
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        return cls(SuTIModel(config, unet, text_encoder, vae), tokenizer, scheduler)

    def set_scheduler(self, name: str) -> "SuTIPipeline":
        """Switch sampler ("ddim" or "dpm++"), keeping the noise schedule the model was trained with."""
        kwargs = _scheduler_kwargs(name, self.config)  # refuses unknown names
        self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config, **kwargs)
        return self

    # ---- progress --------------------------------------------------------------------------
    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_kwargs = kwargs

    def progress_bar(self, iterable):
        return tqdm(iterable, **{"desc": "sampling", "leave": False, **self._progress_kwargs})

    # ---- encoding --------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.config.max_text_len, truncation=True,
                              return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenize(prompts))

    def _demo_inputs(self, subjects: list[list], captions: list[list[str]] | None):
        """Per-example photo lists -> padded (B, K, 3, H, W), caption ids (B, K, L), valid (B, K)."""
        k_max, size = max(len(s) for s in subjects), self.config.image_size
        images = torch.zeros(len(subjects), k_max, 3, size, size)
        valid = torch.zeros(len(subjects), k_max, dtype=torch.bool)
        texts = []
        for i, photos in enumerate(subjects):
            if not 1 <= len(photos) <= self.config.max_demos:
                raise SuTIInputError(f"give 1 to {self.config.max_demos} subject images, got {len(photos)}")
            images[i, : len(photos)] = subject_tensor(photos, size)
            valid[i, : len(photos)] = True
            caps = list(captions[i]) if captions is not None else []
            if len(caps) not in (0, len(photos)):
                raise SuTIInputError(f"{len(caps)} captions for {len(photos)} subject images")
            texts += [str(c) for c in caps] + [""] * (k_max - len(caps))
        ids = self.tokenize(texts).view(len(subjects), k_max, -1)
        dtype = next(self.model.unet.parameters()).dtype
        return images.to(self.device, dtype), ids, valid.to(self.device)

    @torch.no_grad()
    def encode_subject(self, images: list, captions: list[str] | None = None) -> DemoFeatures:
        """One subject's photos -> demo features to reuse across requests (what Serve caches)."""
        return self.model.encode_demos(*self._demo_inputs([list(images)], None if captions is None else [captions]))

    # ---- sampling --------------------------------------------------------------------------
    def prepare_controls(self, b: int, box=None, keypoints=None, edges=None) -> Controls | None:
        """Each control: None, one value for every prompt, or a list with one value (or None) per
        prompt -> the batch's rasterised Controls (None when no prompt has any)."""
        given = {"box": box, "keypoints": keypoints, "edges": edges}
        rows: list[dict] = [{} for _ in range(b)]
        for name, value in given.items():
            if value is None:
                continue
            if name not in self.config.controls:
                raise SuTIInputError(f"this checkpoint has no {name!r} control (it has: "
                                     f"{', '.join(self.config.controls) or 'none'})")
            values = value if _per_prompt(name, value) else [value] * b
            if len(values) != b:
                raise SuTIInputError(f"{len(values)} {name} values for {b} prompts")
            for row, v in zip(rows, values):
                if v is not None:
                    row.update(rasterize(self.config.image_size, device=self.device, **{name: _check_control(name, v)}))
        return batch_controls(rows, self.config.image_size, self.device)

    @torch.no_grad()
    def denoise(self, text: torch.Tensor, demos: DemoFeatures | None, *, num_inference_steps: int,
                guidance_scale_text: float, guidance_scale_subject: float, generator=None,
                demo_inputs: tuple | None = None, controls: Controls | None = None) -> torch.Tensor:
        """text (B, L, D); demos for B examples (or ``demo_inputs`` to re-encode them at every step
        and branch, the uncached reference); controls of B rows (every guidance branch keeps them,
        as ControlNet does) -> clean samples in model space (B, C, h, w)."""
        b = text.shape[0]
        null = self.model.encode_text(self.model.null_prompt_ids(b, text.device))
        with_demos = demos is not None or demo_inputs is not None
        branches = guidance_branches(guidance_scale_text, guidance_scale_subject, with_demos)
        branch_text = torch.cat([text if use_text else null for _, use_text, _ in branches])
        unet_cfg = self.model.unet.unet.config
        shape = (b, unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=text.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        def branch_demos() -> DemoFeatures | None:  # one DemoFeatures for all branches of a step
            if not with_demos:
                return None
            parts = []
            for _, _, use_demos in branches:
                feats = demos if demo_inputs is None else self.model.encode_demos(*demo_inputs)
                parts.append(feats.with_valid(torch.full((b,), use_demos, device=self.device)))
            return DemoFeatures.cat(parts)

        shared = branch_demos() if demo_inputs is None else None  # reused by every step
        residuals = self.model.unet.encode_controls(None if controls is None else controls.tile(len(branches)),
                                                    text.dtype)  # once per request, like the demo features
        for t in self.progress_bar(self.scheduler.timesteps):
            step_demos = shared if demo_inputs is None else branch_demos()
            x = self.scheduler.scale_model_input(torch.cat([latents] * len(branches)), t)
            preds = self.model(x, t, branch_text, step_demos, residuals).chunk(len(branches))
            pred = sum(w * p for (w, _, _), p in zip(branches, preds))
            latents = self.scheduler.step(pred, t, latents).prev_sample
        return latents

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], subject_images, subject_captions=None,
                 num_inference_steps: int = 25, guidance_scale_text: float = 1.5,
                 guidance_scale_subject: float = 1.5, generator=None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", cache_demo_features: bool = True, box=None, keypoints=None,
                 edges=None) -> SuTIPipelineOutput:
        """Draw the subject of ``subject_images`` as ``prompt`` describes.

        prompt: one prompt or a list. subject_images: the photos of one subject (paths, bytes, PIL
        images or arrays), one list of photos per prompt, ``DemoFeatures`` from ``encode_subject``,
        or None for plain text-to-image. subject_captions: optional captions, shaped like the photos.
        Spatial controls (any subset, for checkpoints trained with them; see controls.py), each one
        value for every prompt or a list of one per prompt (None where absent): ``box`` (x0, y0, x1,
        y1), ``keypoints`` ((x, y) of the subject's top, (x, y) of its right-hand side), both as
        fractions of the image; ``edges``, an outline image (bright lines on dark) or (H, W) array.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise SuTIInputError("prompt must be a non-empty string (or a list of them)")
        if not (isinstance(num_inference_steps, int) and 1 <= num_inference_steps <= MAX_STEPS):
            raise SuTIInputError(f"num_inference_steps must be an integer in [1, {MAX_STEPS}]")
        if not (isinstance(num_images_per_prompt, int) and num_images_per_prompt >= 1):
            raise SuTIInputError("num_images_per_prompt must be a positive integer")
        if output_type not in ("pil", "np", "pt"):
            raise SuTIInputError("output_type must be 'pil', 'np' or 'pt'")
        b = len(prompts)
        controls = self.prepare_controls(b, box, keypoints, edges)
        if controls is not None and num_images_per_prompt > 1:
            controls = controls.repeat(num_images_per_prompt)

        demo_inputs, demos = None, None
        if subject_images is None:  # plain text-to-image: the base model (and DreamBooth experts)
            pass
        elif isinstance(subject_images, DemoFeatures):
            demos = subject_images if subject_images.batch_size == b else subject_images.repeat(b)
        else:
            photos = list(subject_images or [])
            per_prompt = bool(photos) and all(isinstance(p, (list, tuple)) for p in photos)
            subjects = photos if per_prompt else [photos] * b
            captions = subject_captions if (subject_captions is None or per_prompt) else [subject_captions] * b
            if len(subjects) != b:
                raise SuTIInputError(f"{len(subjects)} subject photo lists for {b} prompts")
            demo_inputs = self._demo_inputs(subjects, captions)
            if num_images_per_prompt > 1:
                demo_inputs = tuple(t.repeat_interleave(num_images_per_prompt, 0) for t in demo_inputs)
            if cache_demo_features:
                demos, demo_inputs = self.model.encode_demos(*demo_inputs), None
        if demos is not None and num_images_per_prompt > 1 and demos.batch_size == b:
            demos = demos.repeat(num_images_per_prompt)

        text = self.encode_prompt(prompts).repeat_interleave(num_images_per_prompt, 0)
        latents = self.denoise(text, demos, num_inference_steps=num_inference_steps,
                               guidance_scale_text=guidance_scale_text, guidance_scale_subject=guidance_scale_subject,
                               generator=generator, demo_inputs=demo_inputs, controls=controls)
        images = (self.model.from_model_space(latents).float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return SuTIPipelineOutput(images=images)
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return SuTIPipelineOutput(images=array)
        return SuTIPipelineOutput(images=[Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in array])


def _per_prompt(name: str, value) -> bool:
    """A list of per-prompt values, or one value for every prompt?"""
    if name == "edges":
        return isinstance(value, (list, tuple))
    depth, v = 0, value
    while isinstance(v, (list, tuple, np.ndarray, torch.Tensor)) and len(v):
        v = next((x for x in v if x is not None), None) if depth == 0 else v[0]
        depth += 1
    return depth > {"box": 1, "keypoints": 2}[name]


def _check_control(name: str, value):
    """One control value -> checked numbers or a [0, 1] map; SuTIInputError with the reason."""
    if name == "edges":
        if isinstance(value, (np.ndarray, torch.Tensor)) and np.ndim(value) == 2:
            arr = np.asarray(value, dtype=np.float32)
        else:
            arr = np.asarray(load_image(value).convert("L"), dtype=np.float32) / 255.0
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise SuTIInputError("edges must be an image or an (H, W) array with values in [0, 1]")
        return arr
    want = {"box": (4,), "keypoints": (len(KEYPOINT_NAMES), 2)}[name]
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != want or not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        what = "x0, y0, x1, y1" if name == "box" else "[[x, y] of the top], [[x, y] of the right-hand side]"
        raise SuTIInputError(f"{name} must be {what} as fractions of the image in [0, 1], got {value!r}")
    if name == "box" and not (arr[0] < arr[2] and arr[1] < arr[3]):
        raise SuTIInputError(f"box needs x0 < x1 and y0 < y1, got {value!r}")
    return arr


def resolve_checkpoint(checkpoint: str) -> str:
    """Checks a checkpoint argument before any work starts -> a preset name, a URI or an absolute
    local path (Ray tasks and replicas need not share the driver's working directory)."""
    from ..utils import storage
    from .presets import PRESETS

    if checkpoint in PRESETS:
        return checkpoint
    if not ((checkpoint.endswith(".safetensors") and storage.is_file(checkpoint))
            or storage.is_file(storage.join(checkpoint, "suti.json"))):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} is neither a preset ({', '.join(PRESETS)}) nor a saved "
                                "model (a .safetensors file or a save_pretrained folder)")
    return checkpoint if storage.is_uri(checkpoint) else os.path.abspath(checkpoint)


def load_pipeline(checkpoint: str) -> SuTIPipeline:
    """A preset name (untrained: noise, but every path runs), a ``save_pretrained`` folder, or a
    single ``.safetensors`` file; local or a URI (s3://..., fetched once into a local cache)."""
    from .presets import PRESETS

    if checkpoint in PRESETS:
        return SuTIPipeline.from_preset(checkpoint)
    checkpoint = local_copy(checkpoint)
    if os.path.isfile(os.path.join(checkpoint, "suti.json")) or (
            os.path.isfile(checkpoint) and checkpoint.endswith(".safetensors")):
        return SuTIPipeline.from_pretrained(checkpoint)
    raise ValueError(f"{checkpoint!r} is neither a preset ({', '.join(PRESETS)}) nor a saved checkpoint")
