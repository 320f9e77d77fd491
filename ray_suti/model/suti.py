"""SuTIModel: the trainable whole (text encoder + UNet + SuTI layers + optional frozen VAE) and its loss.

The pipeline's components, held together for training (DeepSpeed wraps one module) and for the
steps that use several of them at once. The UNet is a plain ``UNet2DConditionModel`` with the SuTI
layers attached as attention processors (layers.py).

Images enter in [-1, 1]. Pixel presets work on them directly; latent presets go through the VAE
(deterministic mean for demos and targets). Text and demos are dropped independently in training
so that sampling can guide on each separately.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from .controls import Controls
from .layers import DemoFeatures, SuTILayers
from .presets import SuTIConfig


def suti_layers_for(config: SuTIConfig, unet: UNet2DConditionModel) -> SuTILayers:
    return SuTILayers.for_unet(unet, neighbour_levels=tuple(config.neighbour_levels),
                               neighbour_heads=config.neighbour_heads, neighbour_cosine=config.neighbour_cosine,
                               max_demos=config.max_demos, controls=tuple(config.controls),
                               image_size=config.image_size, name=config.name)


def denoiser_forward(unet: UNet2DConditionModel, sample: torch.Tensor, timestep, text: torch.Tensor,
                     neighbour_inputs: dict | None = None, control_residuals: tuple | None = None,
                     cross_attention_kwargs: dict | None = None, down_block_additional_residuals=None,
                     mid_block_additional_residual=None, **unet_kwargs) -> torch.Tensor:
    """One UNet pass with SuTI's per-call inputs: the demo keys and values (``suti.neighbour_inputs``)
    and the control encoders' residuals, summed with any ControlNet's -> prediction (B, C, H, W)."""
    down, mid = down_block_additional_residuals, mid_block_additional_residual
    if control_residuals is not None:
        ours, our_mid = [r.to(sample.dtype) for r in control_residuals[0]], control_residuals[1].to(sample.dtype)
        down = ours if down is None else [a + b for a, b in zip(ours, down)]
        mid = our_mid if mid is None else our_mid + mid
    if down is not None:
        unet_kwargs.update(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
    kwargs = dict(cross_attention_kwargs or {})
    if neighbour_inputs is not None:
        kwargs["suti"] = neighbour_inputs
    return unet(sample, timestep, encoder_hidden_states=text, cross_attention_kwargs=kwargs or None,
                return_dict=False, **unet_kwargs)[0]


class SuTIModel(nn.Module):
    def __init__(self, config: SuTIConfig, unet: UNet2DConditionModel | None = None, suti: SuTILayers | None = None,
                 text_encoder: CLIPTextModel | None = None, vae: AutoencoderKL | None = None):
        super().__init__()
        self.config = config
        self.unet = unet or UNet2DConditionModel(**{k: v for k, v in config.unet.items() if not k.startswith("_")})
        self.suti = suti if suti is not None else suti_layers_for(config, self.unet)
        self.suti.attach(self.unet)
        self.text_encoder = text_encoder or CLIPTextModel(CLIPTextConfig(**config.text))
        self.vae = vae if vae is not None else (AutoencoderKL(**config.vae) if config.latent else None)
        if self.vae is not None:
            self.vae.requires_grad_(False)

    # ---- spaces --------------------------------------------------------------------------------
    def null_prompt_ids(self, batch: int, device=None) -> torch.Tensor:
        """Token ids of the empty prompt: BOS then EOS padding, as the CLIP tokenizer makes them."""
        t = self.config.text
        ids = torch.full((batch, self.config.max_text_len), t["eos_token_id"], dtype=torch.long, device=device)
        ids[:, 0] = t["bos_token_id"]
        return ids

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, L, D)"""
        return self.text_encoder(input_ids=ids).last_hidden_state

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> the denoiser's space (pixels, or scaled VAE latents)."""
        if self.vae is None:
            return images
        with torch.no_grad():
            return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean * self.config.vae_scaling_factor

    def from_model_space(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x
        with torch.no_grad():
            return self.vae.decode(x.to(self.vae.dtype) / self.config.vae_scaling_factor).sample

    def encode_demos(self, images: torch.Tensor, caption_ids: torch.Tensor, valid: torch.Tensor | None = None) -> DemoFeatures:
        """images (B, K, 3, H, W) in [-1, 1], caption_ids (B, K, L) -> DemoFeatures."""
        b, k = images.shape[:2]
        x = self.to_model_space(images.flatten(0, 1)).unflatten(0, (b, k))
        text = self.encode_text(caption_ids.flatten(0, 1)).unflatten(0, (b, k))
        return self.suti.encode_demos(self.unet, x, text, valid)

    def forward(self, sample, timestep, text: torch.Tensor, demos: DemoFeatures | None = None,
                control_residuals: tuple | None = None) -> torch.Tensor:
        """sample (B, C, H, W), text (B, L, D), demos and control residuals of B rows -> prediction (B, C, H, W)."""
        if demos is not None and demos.batch_size != sample.shape[0]:
            raise ValueError(f"demo features for {demos.batch_size} examples, sample has {sample.shape[0]}")
        neighbour_inputs = self.suti.neighbour_inputs(demos, sample.dtype)
        return denoiser_forward(self.unet, sample, timestep, text, neighbour_inputs, control_residuals)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward: the UNet's blocks (so the demo-encoding pass, which runs
        the same down blocks, and the neighbour attention inside the transformer blocks too) and the
        text encoder's layers. Same loss and gradients, less memory."""
        self.unet.enable_gradient_checkpointing()
        self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def parts(self) -> tuple:
        return self.unet, self.suti, self.text_encoder, self.vae

    # ---- training ------------------------------------------------------------------------------
    def noise_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(num_train_timesteps=1000, beta_schedule=self.config.beta_schedule,
                             prediction_type=self.config.prediction_type)

    def loss(self, batch: dict, scheduler: DDPMScheduler, demo_grad: bool = True,
             generator: torch.Generator | None = None, noise_repeats: int = 1,
             high_noise_frac: float = 0.0) -> torch.Tensor:
        """Denoising loss of one batch.

        batch: ``target`` (B, 3, H, W), ``prompt_ids`` (B, L), optional ``drop_text`` (B,) and, for
        in-context examples, ``demo_images`` (B, K, 3, H, W), ``demo_caption_ids`` (B, K, L),
        ``demo_valid`` (B, K) and optional ``drop_demos`` (B,); optional controls (a Controls
        as ``Controls.to_batch()`` keys, its controls already dropped at random per row). Cached
        inputs (``ray-suti encode``, latent models) replace the first four with ``target_latents``
        (B, C, h, w), ``prompt_states`` (B, L, D; the empty prompt's where the text is dropped),
        ``demo_latents`` (B, K, C, h, w) and ``demo_caption_states`` (B, K, L, D): neither the VAE
        nor the text encoder runs. Each target is trained at ``noise_repeats`` noise levels while
        its text and demos are encoded once. A fraction ``high_noise_frac`` of the timesteps is drawn
        from the noisier half only, where the demos decide most.
        """
        cached, r = "target_latents" in batch, noise_repeats
        target = batch["target_latents"] if cached else batch["target"]
        b, device = target.shape[0], target.device
        if cached:
            text = batch["prompt_states"]
        else:
            prompt_ids = batch["prompt_ids"]
            if "drop_text" in batch:
                prompt_ids = torch.where(batch["drop_text"][:, None], self.null_prompt_ids(b, device), prompt_ids)
            text = self.encode_text(prompt_ids)
        demos = None
        if "demo_valid" in batch:
            with torch.set_grad_enabled(demo_grad and torch.is_grad_enabled()):
                if cached:
                    demos = self.suti.encode_demos(self.unet, batch["demo_latents"], batch["demo_caption_states"],
                                                   batch["demo_valid"])
                else:
                    demos = self.encode_demos(batch["demo_images"], batch["demo_caption_ids"], batch["demo_valid"])
            if "drop_demos" in batch:
                demos = demos.with_valid(~batch["drop_demos"])
            demos = demos.repeat(r) if r > 1 else demos
        x0 = target if cached else self.to_model_space(target)
        residuals = self.suti.encode_controls(Controls.from_batch(batch), x0.dtype)
        if residuals is not None and r > 1:
            residuals = ([t.repeat_interleave(r, 0) for t in residuals[0]], residuals[1].repeat_interleave(r, 0))
        text, x0 = text.repeat_interleave(r, 0), x0.repeat_interleave(r, 0)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        steps = scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b * r,), generator=generator, device=device)
        if high_noise_frac > 0:
            high = torch.rand(b * r, generator=generator, device=device) < high_noise_frac
            t = torch.where(high, steps // 2 + t // 2, t)  # uniform on [T/2, T) for those
        noisy = scheduler.add_noise(x0, noise, t)
        want = noise if self.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        pred = self(noisy, t, text, demos, residuals)
        return F.mse_loss(pred.float(), want.float())
