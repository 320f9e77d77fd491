"""SuTIPipeline: subject photos + prompt -> images, as a diffusers ``DiffusionPipeline``.

Components: ``unet`` (a plain ``UNet2DConditionModel``), ``text_encoder``, ``tokenizer``,
``scheduler`` (any of diffusers', schedulers.py), ``vae`` (latent models), ``suti`` (the SuTI layers,
attached to the UNet as attention processors, layers.py) and, optionally, a diffusers ``controlnet``
(or several) and a T2I ``adapter``. A saved pipeline is a diffusers folder (``model_index.json``);
a latent one is also a Stable Diffusion folder that ``StableDiffusionPipeline`` loads (text-only).

Guidance has separate text and subject scales. ``guidance_mode="branches"`` runs three branches
each step,

    pred = u + s_subject * (s - u) + s_text * (f - s)
    u = (no text, no demos)   s = (no text, demos)   f = (text, demos)

dropping those whose weight is zero (``s_subject == 1`` drops ``u``, equal scales drop ``s``).
Written as ``s + s_text * (f - s) + (s_subject - 1) * (s - u)``, it is ``s`` plus a text direction
and a subject direction. ``guidance_mode="interleaved"`` interleaves them as Re-Imagen does, two
UNet passes a step: ``s`` every step, and ``f`` (refreshing the text direction) or ``u`` (the subject
direction), whichever has gone stale the most weighted by its scale, the other carried over (the
first step runs all three). ``guidance_mode="reimagen"`` is Re-Imagen's rule to the letter: even
steps ``s + s_text * (f - s)``, odd steps ``t + s_subject * (f - t)`` with ``t = (text, no
demos)``, the other guidance dropped (docs/model.md has how the three compare). Demo features,
their keys and values, and control features are computed once per call and shared by every step
and branch.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
import diffusers
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from . import loading
from .controls import Controls, batch_controls, check_control, per_prompt, rasterize
from .inputs import SuTIInputError, subject_list, subject_tensor
from .layers import DemoFeatures, SuTILayers
from .presets import SuTIConfig
from .schedulers import GUIDANCE_MODES, make_scheduler, switch_scheduler
from .suti import SuTIModel, denoiser_forward

MAX_STEPS = 1000


@dataclass
class SuTIPipelineOutput(BaseOutput):
    images: list | np.ndarray | torch.Tensor
    neighbours: list | None = None  # per prompt, the knowledge base's entries used as demos


def guidance_branches(text_scale: float, subject_scale: float, with_demos: bool, mode: str = "branches",
                      step: int = 0) -> list[tuple[float, bool, bool]]:
    """(weight, use_text, use_demos) of each branch that contributes at denoising step ``step``; for
    "interleaved" the three branches, of which ``interleaved_run`` says which are run."""
    if not with_demos:
        raw = [(text_scale, True, False), (1 - text_scale, False, False)]
    elif mode != "reimagen":
        raw = [(text_scale, True, True), (subject_scale - text_scale, False, True), (1 - subject_scale, False, False)]
    elif step % 2 == 0:  # Re-Imagen: text guidance on even steps
        raw = [(text_scale, True, True), (1 - text_scale, False, True)]
    else:  # and subject guidance on odd ones
        raw = [(subject_scale, True, True), (1 - subject_scale, True, False)]
    return [b for b in raw if b[0] != 0]


def interleaved_run(branches: list, step: int, debt: dict) -> list:
    """The branches interleaved guidance runs at ``step``: all three first, then s with whichever of
    f (text direction) and u (subject direction) has gone stale the most, staleness weighted by the
    direction's scale (so equal weights alternate, and a text scale of 3 against a subject weight
    of 0.5 refreshes the text direction six times as often). ``debt`` carries that over steps."""
    if len(branches) < 3 or step == 0:
        return branches
    f, s, u = branches
    debt["text"] = debt.get("text", 0.0) + abs(f[0])  # f's weight is s_text
    debt["subject"] = debt.get("subject", 0.0) + abs(u[0])  # u's weight is 1 - s_subject
    refresh = "text" if debt["text"] >= debt["subject"] else "subject"
    debt[refresh] = 0.0
    return [s, f] if refresh == "text" else [s, u]


class SuTIPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae", "suti", "controlnet", "adapter"]
    _exclude_from_cpu_offload = ["suti"]  # its layers run inside the UNet's forward
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, scheduler,
                 suti: SuTILayers | None = None, vae: AutoencoderKL | None = None, controlnet=None, adapter=None):
        super().__init__()
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              suti=suti, vae=vae, controlnet=controlnet, adapter=adapter)
        if suti is not None:
            suti.attach(unet)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.control_image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True,
                                                         do_normalize=False)
        self._model = None

    # ---- what the components make together ---------------------------------------------------
    @property
    def suti_config(self) -> SuTIConfig:
        return loading.suti_config_of(self)

    @property
    def model(self) -> SuTIModel:
        """The components as one trainable module (shares their weights)."""
        parts = (self.unet, self.suti, self.text_encoder, self.vae)
        if self._model is None or any(a is not b for a, b in zip(self._model.parts, parts)):
            if self.suti is None:
                raise ValueError("this pipeline has no SuTI layers; load_suti_adapter() first")
            self._model = SuTIModel(self.suti_config, self.unet, self.suti, self.text_encoder, self.vae)
        return self._model

    @property
    def image_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def max_demos(self) -> int:
        return self.suti.config.max_demos if self.suti is not None else 0

    @property
    def controls(self) -> tuple:
        return tuple(self.suti.config.controls) if self.suti is not None else ()

    # ---- construction and persistence (loading.py does the work) ----------------------------
    @classmethod
    def from_preset(cls, name: str, seed: int = 0) -> "SuTIPipeline":
        """An untrained pipeline of a named preset (``tiny-32``, ``tiny-64``, ``tiny-latent``, ``sd15``)."""
        return cls.from_model(loading.model_from_preset(name, seed))

    @classmethod
    def from_model(cls, model: SuTIModel, scheduler=None) -> "SuTIPipeline":
        from .tokenizer import clip_tokenizer

        return cls(unet=model.unet, text_encoder=model.text_encoder, tokenizer=clip_tokenizer(model.config.max_text_len),
                   scheduler=scheduler or make_scheduler("ddim", model.config), suti=model.suti, vae=model.vae)

    @classmethod
    def from_base(cls, path: str, adapter: str | None = None, torch_dtype=None, **suti_options) -> "SuTIPipeline":
        """Any diffusers Stable Diffusion 1.x/2.x folder (local or a URI) -> SuTI: the layers of the
        ``adapter`` file, or fresh ones shaped by ``suti_options`` (neighbour_levels, neighbour_heads,
        max_demos, ...)."""
        return loading.from_base(cls, path, adapter, torch_dtype, suti_options)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "SuTIPipeline":
        """A folder written by ``save_pretrained`` (local, a URI, or a hub id), or a single
        ``.safetensors`` file from ``save_single_file``: safetensors only, never unpickles."""
        return loading.from_pretrained(cls, str(pretrained_model_name_or_path), kwargs,
                                       super(SuTIPipeline, cls).from_pretrained.__func__)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """A diffusers folder (``model_index.json`` + components, safetensors); local or a URI."""
        from ..utils.storage import staged

        kwargs.setdefault("safe_serialization", True)
        with staged(str(save_directory), publish=True) as local:
            super().save_pretrained(local, **kwargs)

    def save_single_file(self, path: str, metadata: dict | None = None, dtype=torch.float16) -> None:
        """Every trainable weight in one .safetensors file, the config in its metadata (pixel presets;
        the small committed checkpoints use this). ``path``: local or a URI."""
        loading.save_single_file(self, path, metadata, dtype)

    @classmethod
    def from_single_file(cls, path: str, torch_dtype=None) -> "SuTIPipeline":
        return loading.from_single_file(cls, path, torch_dtype)

    @staticmethod
    def single_file_metadata(path: str) -> dict:
        return loading.single_file_metadata(path)

    def load_suti_adapter(self, path: str) -> "SuTIPipeline":
        """SuTI layers from an adapter file (``save_suti_adapter``) onto this pipeline's UNet."""
        layers = SuTILayers.from_adapter(path)
        layers.check_unet(self.unet)
        self.register_modules(suti=layers.to(self.unet.device, self.unet.dtype))
        layers.attach(self.unet)
        return self

    def save_suti_adapter(self, path: str, dtype=torch.float16) -> None:
        """The SuTI layers alone (neighbour attention and control encoders) as one safetensors file."""
        if self.suti is None:
            raise ValueError("this pipeline has no SuTI layers to save")
        self.suti.save_adapter(path, dtype)

    def unload_suti_adapter(self) -> "SuTIPipeline":
        SuTILayers.detach(self.unet)
        self.register_modules(suti=None)
        return self

    def set_scheduler(self, name: str) -> "SuTIPipeline":
        """Switch sampler (an allowed name, schedulers.py), keeping the trained noise schedule."""
        self.scheduler = switch_scheduler(self.scheduler, name, self.vae is not None)
        return self

    # ---- encoding ----------------------------------------------------------------------------
    # ``device`` arguments: the execution device, which ``__call__`` looks up once (diffusers' lookup
    # walks every component's modules, a few milliseconds each time)
    def tokenize(self, texts: list[str], device=None) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device or self._execution_device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device=None) -> torch.Tensor:
        """(B,) prompts -> (B, L, D) text-encoder states."""
        return self.text_encoder(input_ids=self.tokenize(prompts, device)).last_hidden_state

    def _onload_unet(self) -> None:
        # The demo pass calls the UNet's blocks, not its forward: move it as model offload would.
        hook = getattr(self.unet, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self.unet)

    def _demo_inputs(self, subjects: list[list], captions: list[list[str]] | None, device=None):
        """Per-example photo lists -> padded (B, K, 3, H, W) in [-1, 1], caption ids (B, K, L), valid (B, K)."""
        if self.suti is None:
            raise SuTIInputError("this pipeline has no SuTI layers (load_suti_adapter first); it draws text only")
        k_max, size = max(len(s) for s in subjects), self.image_size
        images = torch.zeros(len(subjects), k_max, 3, size, size)
        valid = torch.zeros(len(subjects), k_max, dtype=torch.bool)
        texts = []
        for i, photos in enumerate(subjects):
            if not 1 <= len(photos) <= self.max_demos:
                raise SuTIInputError(f"give 1 to {self.max_demos} subject images, got {len(photos)}")
            images[i, : len(photos)] = subject_tensor(photos, size)
            valid[i, : len(photos)] = True
            caps = list(captions[i]) if captions is not None else []
            if len(caps) not in (0, len(photos)):
                raise SuTIInputError(f"{len(caps)} captions for {len(photos)} subject images")
            texts += [str(c) for c in caps] + [""] * (k_max - len(caps))
        device = device or self._execution_device
        ids = self.tokenize(texts, device).view(len(subjects), k_max, -1)
        return images.to(device, self.unet.dtype), ids, valid.to(device)

    @torch.no_grad()
    def encode_demos(self, images: torch.Tensor, caption_ids: torch.Tensor, valid: torch.Tensor) -> DemoFeatures:
        """(B, K, 3, H, W) in [-1, 1], (B, K, L), (B, K) -> demo features in the UNet's dtype."""
        b, k = images.shape[:2]
        text = self.text_encoder(input_ids=caption_ids.flatten(0, 1)).last_hidden_state.unflatten(0, (b, k))
        x = images.flatten(0, 1)
        if self.vae is not None:
            x = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor
        self._onload_unet()
        return self.suti.encode_demos(self.unet, x.to(self.unet.dtype).unflatten(0, (b, k)), text.to(self.unet.dtype),
                                      valid)

    @torch.no_grad()
    def encode_subject(self, images, captions: list[str] | None = None) -> DemoFeatures:
        """One subject's photos -> demo features to reuse across requests (what Serve caches)."""
        return self.encode_demos(*self._demo_inputs([subject_list(images)], None if captions is None else [captions]))

    def prepare_controls(self, b: int, box=None, keypoints=None, edges=None, device=None) -> Controls | None:
        """Each control: None, one value for every prompt, or a list with one value (or None) per
        prompt -> the batch's rasterised Controls (None when no prompt has any)."""
        given = {"box": box, "keypoints": keypoints, "edges": edges}
        if all(v is None for v in given.values()):
            return None
        device = device or self._execution_device
        rows: list[dict] = [{} for _ in range(b)]
        for name, value in given.items():
            if value is None:
                continue
            if name not in self.controls:
                raise SuTIInputError(f"this checkpoint has no {name!r} control (it has: "
                                     f"{', '.join(self.controls) or 'none'})")
            values = value if per_prompt(name, value) else [value] * b
            if len(values) != b:
                raise SuTIInputError(f"{len(values)} {name} values for {b} prompts")
            for row, v in zip(rows, values):
                if v is not None:
                    row.update(rasterize(self.image_size, device=device,
                                         **{name: check_control(name, v)}))
        return batch_controls(rows, self.image_size, device)

    def prepare_extra_step_kwargs(self, generator, eta):
        """eta (DDIM) and the generator (ancestral and SDE samplers), for schedulers that take them."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}

    def _condition_images(self, image, n: int, height: int, dtype) -> torch.Tensor:
        """A control image (or one per prompt) -> (n, 3, H, W) in [0, 1] on the execution device."""
        x = self.control_image_processor.preprocess(image, height=height, width=height).to(torch.float32)
        if x.shape[0] == 1:
            x = x.repeat(n, 1, 1, 1)
        elif n % x.shape[0] == 0:
            x = x.repeat_interleave(n // x.shape[0], 0)
        else:
            raise SuTIInputError(f"{x.shape[0]} control images for {n} images")
        return x.to(self._execution_device, dtype)

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    @property
    def num_timesteps(self) -> int:
        return getattr(self, "_num_timesteps", 0)

    # ---- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, subject_images=None, subject_captions=None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 25,
                 guidance_scale_text: float = 1.5, guidance_scale_subject: float = 1.5,
                 guidance_mode: str = "branches", negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0, generator=None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 box=None, keypoints=None, edges=None, control_image=None, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=1.0, adapter_image=None,
                 adapter_conditioning_scale: float = 1.0, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), cache_demo_features: bool = True,
                 knowledge_base=None, num_neighbours: int = 3):
        """Draw the subject of ``subject_images`` as ``prompt`` describes.

        prompt: one prompt or a list (or ``prompt_embeds`` (B, L, D)). subject_images: the photos of
        one subject (paths, bytes, PIL images, arrays or tensors: diffusers' ``PipelineImageInput``),
        one list of photos per prompt, ``DemoFeatures`` from ``encode_subject``, or None for plain
        text-to-image. subject_captions: optional captions, shaped like the photos. Spatial controls
        with the model's own encoders (checkpoints trained with them; controls.py), each one value
        for every prompt or a list of one per prompt (None where absent): ``box`` (x0, y0, x1, y1),
        ``keypoints`` ((x, y) of the subject's top, (x, y) of its right-hand side), as fractions of
        the image; ``edges``, an outline image or (H, W) array. ``knowledge_base`` (a
        ``ray_suti.knowledge.KnowledgeBase``) instead of photos: each prompt's ``num_neighbours``
        nearest image-text pairs of one page become its demos (Re-Imagen), listed in ``neighbours``. ``control_image`` feeds the
        pipeline's ``controlnet`` (a list for several), ``adapter_image`` its T2I ``adapter``.
        Returns ``SuTIPipelineOutput(images)`` (or a tuple with ``return_dict=False``).
        """
        # 0. Check inputs
        size = self.image_size
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise SuTIInputError("prompt must be a non-empty string (or a list of them)")
            b = len(prompts)
        else:
            b = prompt_embeds.shape[0]
        if not (isinstance(num_inference_steps, int) and 1 <= num_inference_steps <= MAX_STEPS):
            raise SuTIInputError(f"num_inference_steps must be an integer in [1, {MAX_STEPS}]")
        if not (isinstance(num_images_per_prompt, int) and num_images_per_prompt >= 1):
            raise SuTIInputError("num_images_per_prompt must be a positive integer")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise SuTIInputError("output_type must be 'pil', 'np', 'pt' or 'latent'")
        if guidance_mode not in GUIDANCE_MODES:
            raise SuTIInputError(f"guidance_mode must be one of {', '.join(GUIDANCE_MODES)}")
        if (height or size) != size or (width or size) != size:
            raise SuTIInputError(f"this model draws {size}x{size} images (its demos are encoded at that size)")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise SuTIInputError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}")
        if control_image is not None and self.controlnet is None:
            raise SuTIInputError("control_image needs a pipeline with a controlnet")
        if adapter_image is not None and self.adapter is None:
            raise SuTIInputError("adapter_image needs a pipeline with a T2I adapter")

        neighbours = None
        if knowledge_base is not None:  # Re-Imagen: the demos come from the knowledge base
            if subject_images is not None or prompt_embeds is not None:
                raise SuTIInputError("knowledge_base retrieves by prompt text: give no subject_images or prompt_embeds")
            if not (isinstance(num_neighbours, int) and 1 <= num_neighbours <= self.max_demos):
                raise SuTIInputError(f"num_neighbours must be an integer in [1, {self.max_demos}]")
            neighbours = [knowledge_base.search(p, num_neighbours) for p in prompts]
            if not all(neighbours):
                raise SuTIInputError("the knowledge base is empty")
            subject_images = [[x.image for x in found] for found in neighbours]
            subject_captions = [[x.caption for x in found] for found in neighbours]

        # 1. Define call parameters
        device, n, dtype = self._execution_device, num_images_per_prompt, self.unet.dtype
        rows = b * n
        self._interrupt = False

        # 2. Encode the prompt and the negative prompt ("" by default: the unconditional text)
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompts, device)
        if negative_prompt_embeds is None:
            negatives = [negative_prompt or ""] * b if not isinstance(negative_prompt, list) else negative_prompt
            if len(negatives) != b:
                raise SuTIInputError(f"{len(negatives)} negative prompts for {b} prompts")
            negative_prompt_embeds = self.encode_prompt(negatives, device)
        prompt_embeds = prompt_embeds.to(device, dtype).repeat_interleave(n, 0)
        negative_prompt_embeds = negative_prompt_embeds.to(device, dtype).repeat_interleave(n, 0)

        # 3. Encode the subject: demo features once per call (or at every step, the uncached reference)
        demos, demo_inputs = None, None
        if isinstance(subject_images, DemoFeatures):
            if subject_images.batch_size not in (1, b, rows):
                raise SuTIInputError(f"demo features for {subject_images.batch_size} examples, {b} prompts")
            demos = subject_images if subject_images.batch_size in (b, rows) else subject_images.repeat(b)
        elif subject_images is not None:
            photos = subject_list(subject_images)
            per_prompt = bool(photos) and all(isinstance(p, (list, tuple)) for p in photos)
            subjects = photos if per_prompt else [photos] * b
            captions = subject_captions if (subject_captions is None or per_prompt) else [subject_captions] * b
            if len(subjects) != b:
                raise SuTIInputError(f"{len(subjects)} subject photo lists for {b} prompts")
            demo_inputs = tuple(t.repeat_interleave(n, 0) for t in self._demo_inputs(subjects, captions, device))
            if cache_demo_features:
                demos, demo_inputs = self.encode_demos(*demo_inputs), None
        if demos is not None and demos.batch_size == b and n > 1:
            demos = demos.repeat(n)
        with_demos = demos is not None or demo_inputs is not None

        # 4. Encode the controls: the model's own encoders, ControlNet and T2I-Adapter conditions
        controls = self.prepare_controls(b, box, keypoints, edges, device)
        controls = controls.repeat(n) if controls is not None and n > 1 else controls
        control = self._prepare_controlnet(control_image, rows, size, controlnet_conditioning_scale,
                                           control_guidance_start, control_guidance_end, num_inference_steps)
        adapter_state = None
        if adapter_image is not None and adapter_conditioning_scale != 0:  # once per call, added in the down blocks
            cond = self._condition_images(adapter_image, rows, size, self.adapter.dtype)
            adapter_state = [s.to(dtype) * adapter_conditioning_scale for s in self.adapter(cond)]

        # 5. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 6. Prepare latents
        shape = (rows, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise SuTIInputError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma

        # 7. Prepare extra step kwargs, and each guidance branch set's step-independent inputs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        prepared: dict = {}
        demo_kv = self.suti.neighbour_inputs(demos, dtype) if demos is not None else None

        def branch_inputs(branches):
            key = tuple((t, d) for _, t, d in branches)
            if key in prepared and demo_inputs is None:
                return prepared[key]
            text = torch.cat([prompt_embeds if use_text else negative_prompt_embeds for _, use_text, _ in branches])
            kv = None
            if with_demos:  # the demos' keys and values once per call (at every step when uncached)
                feats = demos if demo_inputs is None else self.encode_demos(*demo_inputs)
                per_row = demo_kv if demo_inputs is None else self.suti.neighbour_inputs(feats, dtype)
                kv = self.suti.tile_neighbour_inputs(per_row, [d for _, _, d in branches], rows)
            residuals = self.suti.encode_controls(None if controls is None else controls.tile(len(branches)), dtype) \
                if self.suti is not None else None
            prepared[key] = text, kv, residuals
            return prepared[key]

        # 8. Denoising loop
        directions, debt = {}, {}  # interleaved guidance: the latest directions, and how stale each is
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                branches = guidance_branches(guidance_scale_text, guidance_scale_subject, with_demos, guidance_mode, i)
                interleave = guidance_mode == "interleaved" and len(branches) == 3
                run = interleaved_run(branches, i, debt) if interleave else branches
                text, kv, residuals = branch_inputs(run)
                m = len(run)
                x = self.scheduler.scale_model_input(torch.cat([latents] * m), t)
                unet_kwargs = {"cross_attention_kwargs": cross_attention_kwargs}
                if control is not None:
                    unet_kwargs.update(self._controlnet_residuals(control, x, t, text, i, m))
                if adapter_state is not None:
                    unet_kwargs["down_intrablock_additional_residuals"] = [s.repeat(m, 1, 1, 1) for s in adapter_state]
                preds = denoiser_forward(self.unet, x, t, text, kv, residuals, **unet_kwargs).chunk(m)
                if interleave:  # s + s_text (f - s) + (s_subject - 1) (s - u), one direction carried over
                    got = {(use_text, use_demos): p for (_, use_text, use_demos), p in zip(run, preds)}
                    pred_s = got[False, True]
                    if (True, True) in got:
                        directions["text"] = got[True, True] - pred_s
                    if (False, False) in got:
                        directions["subject"] = pred_s - got[False, False]
                    pred = (pred_s + guidance_scale_text * directions["text"]
                            + (guidance_scale_subject - 1) * directions["subject"])
                else:
                    pred = sum(w * p for (w, _, _), p in zip(branches, preds))
                latents = self.scheduler.step(pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}) or {}
                    latents = out.pop("latents", latents)
                    if "prompt_embeds" in out or "negative_prompt_embeds" in out:
                        prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = out.pop("negative_prompt_embeds", negative_prompt_embeds)
                        prepared.clear()
                progress.update()

        # 9. Decode and post-process
        if output_type == "latent":
            images = latents
        else:
            x = latents
            if self.vae is not None:
                x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            images = (x.float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in images]
        self.maybe_free_model_hooks()
        return SuTIPipelineOutput(images=images, neighbours=neighbours) if return_dict else (images,)

    # ---- ControlNet --------------------------------------------------------------------------
    def _prepare_controlnet(self, image, rows, size, scale, start, end, steps):
        """-> (condition images (rows, 3, H, W) or a list, scales, per-step keep) or None."""
        if image is None:
            return None
        multi = isinstance(self.controlnet, MultiControlNetModel)
        count = len(self.controlnet.nets) if multi else 1
        images = image if multi else [image]
        if len(images) != count:
            raise SuTIInputError(f"{len(images)} control images for {count} controlnets")
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * count
        starts = list(start) if isinstance(start, (list, tuple)) else [start] * count
        ends = list(end) if isinstance(end, (list, tuple)) else [end] * count
        if not (len(scales) == len(starts) == len(ends) == count):
            raise SuTIInputError("give one controlnet_conditioning_scale / control_guidance_start / end per controlnet")
        if any(not 0 <= s < e <= 1 for s, e in zip(starts, ends)):
            raise SuTIInputError("control_guidance_start must be below control_guidance_end, both in [0, 1]")
        conds = [self._condition_images(im, rows, size, self.controlnet.dtype) for im in images]
        keep = [[1.0 - float(i / steps < s or (i + 1) / steps > e) for s, e in zip(starts, ends)] for i in range(steps)]
        return conds, scales, keep, multi

    def _controlnet_residuals(self, control, x, t, text, step: int, branches: int) -> dict:
        conds, scales, keep, multi = control
        step_scales = [s * k for s, k in zip(scales, keep[step])]
        if all(s == 0 for s in step_scales):  # off at this step: exactly the model without it
            return {}
        conds = [c.repeat(branches, 1, 1, 1) for c in conds]
        down, mid = self.controlnet(x, t, encoder_hidden_states=text, controlnet_cond=conds if multi else conds[0],
                                    conditioning_scale=step_scales if multi else step_scales[0], return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


resolve_checkpoint = loading.resolve_checkpoint


def load_pipeline(checkpoint: str, torch_dtype=None) -> SuTIPipeline:
    """A preset name (untrained: noise, but every path runs), a ``save_pretrained`` folder, or a
    single ``.safetensors`` file; local or a URI (s3://..., fetched once into a local cache)."""
    from .presets import PRESETS

    if checkpoint in PRESETS:
        return SuTIPipeline.from_preset(checkpoint)
    return SuTIPipeline.from_pretrained(checkpoint, torch_dtype=torch_dtype)


# So that `DiffusionPipeline.from_pretrained(folder)` finds the class a SuTI model_index.json names
# (diffusers looks `_class_name` up on its own module).
setattr(diffusers, "SuTIPipeline", SuTIPipeline)
