"""DreamBooth on the base model: the apprenticeship stage's expert and evaluation's main baseline.

An expert is the base text-to-image model (the SuTI model with no demos) fine-tuned on one
subject's photos, each captioned with a rare identifier before its class word ("a sks mug on the
beach"), so that the identifier comes to mean this subject. LoRA on the UNet by default (peft,
through diffusers' adapter API); a full UNet fine-tune and class-prior preservation (the base
model's own images of "a <class>" trained alongside, so the class does not drift) are options.

    with dreambooth_expert(pipe, photos, captions, "mug", DreamBoothConfig()) as expert:
        images = expert.sample(["a mug in the snow"], seed=0)

``dreambooth_subject`` does both and times them, for the evaluation job.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where an expert trains or samples: the config is read by the CLI
    import torch


@dataclass(frozen=True)
class DreamBoothConfig:
    steps: int = field(default=150, metadata={"help": "fine-tuning steps per subject"})
    batch_size: int = field(default=4, metadata={"help": "photos per step"})
    lr: float = field(default=0.0, metadata={"help": "learning rate (0: 1e-3 for LoRA, 5e-5 for a full fine-tune)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_targets: str = field(default="to_q,to_k,to_v,to_out.0,conv1,conv2",
                              metadata={"help": "UNet module names that get LoRA (comma-separated)"})
    full_finetune: bool = field(default=False, metadata={"help": "fine-tune every UNet weight instead of LoRA"})
    prior_preservation: bool = field(default=False, metadata={"help": "train on the base model's class images too"})
    prior_weight: float = field(default=1.0, metadata={"help": "weight of the class-prior loss"})
    num_class_images: int = field(default=8, metadata={"help": "class images for prior preservation"})
    identifier: str = field(default="sks", metadata={"help": "rare token that comes to name the subject"})
    sample_steps: int = field(default=25, metadata={"help": "sampling steps of the expert"})
    guidance: float = field(default=1.5, metadata={"help": "text guidance scale of the expert"})
    seed: int = field(default=0, metadata={"help": "seed of fine-tuning and class images"})

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lora_rank < 1:
            raise ValueError("steps, batch_size and lora_rank must be positive")
        if not re.fullmatch(r"[a-z]+", self.identifier):
            raise ValueError("identifier must be one lower-case word")

    @property
    def learning_rate(self) -> float:
        return self.lr or (5e-5 if self.full_finetune else 1e-3)


def with_identifier(text: str, class_word: str, identifier: str) -> str:
    """"a mug on the beach" -> "a sks mug on the beach"; a text without the class word gets it."""
    pattern = rf"\b{re.escape(class_word)}\b"
    if re.search(pattern, text, flags=re.IGNORECASE):
        return re.sub(pattern, f"{identifier} {class_word}", text, count=1, flags=re.IGNORECASE)
    return f"a {identifier} {class_word}, {text}" if text.strip() else f"a {identifier} {class_word}"


class Expert:
    """The pipeline while a subject's fine-tune is applied: samples text-to-image with the identifier."""

    def __init__(self, pipe, class_word: str, cfg: DreamBoothConfig):
        self.pipe, self.class_word, self.cfg = pipe, class_word, cfg

    def save_lora(self, path: str) -> None:
        """This expert's LoRA in diffusers' format, for any pipeline's ``load_lora_weights(path)``."""
        from diffusers import StableDiffusionPipeline
        from peft import get_peft_model_state_dict

        if self.cfg.full_finetune:
            raise ValueError("a full fine-tune has no LoRA to save")
        layers = get_peft_model_state_dict(self.pipe.unet)  # PEFT keys: what diffusers' loaders read back whole
        StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=layers, safe_serialization=True)

    def sample(self, prompts: list[str], seed: int, num_images_per_prompt: int = 1) -> np.ndarray:
        """-> (len(prompts) * num_images_per_prompt, H, W, 3) float in [0, 1]."""
        import torch

        texts = [with_identifier(p, self.class_word, self.cfg.identifier) for p in prompts]
        generator = torch.Generator(self.pipe.device).manual_seed(seed)
        with torch.no_grad():
            return self.pipe(texts, None, num_inference_steps=self.cfg.sample_steps,
                             guidance_scale_text=self.cfg.guidance, generator=generator,
                             num_images_per_prompt=num_images_per_prompt, output_type="np").images


def _training_loss(model, scheduler, targets, prompt_ids, generator) -> torch.Tensor:
    return model.loss({"target": targets, "prompt_ids": prompt_ids}, scheduler, generator=generator)


@contextmanager
def dreambooth_expert(pipe, photos: list, captions: list[str] | None, class_word: str, cfg: DreamBoothConfig):
    """Fine-tunes ``pipe``'s UNet on one subject in place, yields an ``Expert``, then restores the
    base weights (LoRA adapter removed, or the full fine-tune's weights put back)."""
    import torch

    from ..model.inputs import subject_tensor

    if not photos:
        raise ValueError("DreamBooth needs at least one photo")
    model, unet = pipe.model, pipe.unet
    device = pipe.device
    captions = list(captions or [""] * len(photos))
    images = subject_tensor(photos, pipe.image_size).to(device)  # (N, 3, H, W) in [-1, 1]
    ids = pipe.tokenize([with_identifier(c, class_word, cfg.identifier) for c in captions])
    generator = torch.Generator(device).manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    scheduler = model.noise_scheduler()
    prior = None
    if cfg.prior_preservation:  # the base model's own class images, drawn before any weight moves
        class_prompts = [f"a {class_word}"] * cfg.num_class_images
        drawn = pipe(class_prompts, None, num_inference_steps=cfg.sample_steps, guidance_scale_text=cfg.guidance,
                     generator=generator, output_type="pt").images
        prior = (drawn * 2 - 1, pipe.tokenize(class_prompts))
    was_training = model.training
    saved = None
    model.requires_grad_(False)
    if cfg.full_finetune:
        saved = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        unet.requires_grad_(True)
    else:
        from peft import LoraConfig

        torch.manual_seed(cfg.seed)  # LoRA's initial weights come from torch's global generator
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                    target_modules=[t for t in cfg.lora_targets.split(",") if t]))
    try:
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        model.train()
        for _ in range(cfg.steps):
            pick = torch.from_numpy(rng.integers(0, len(images), cfg.batch_size)).to(device)
            loss = _training_loss(model, scheduler, images[pick], ids[pick], generator)
            if prior is not None:
                pick = torch.from_numpy(rng.integers(0, len(prior[0]), cfg.batch_size)).to(device)
                loss = loss + cfg.prior_weight * _training_loss(model, scheduler, prior[0][pick], prior[1][pick],
                                                                generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        model.eval()
        yield Expert(pipe, class_word, cfg)
    finally:
        if saved is not None:
            unet.load_state_dict(saved)
        else:
            unet.unload_lora()  # removes the adapter and peft's wrappers: the plain base modules again
        model.requires_grad_(False)
        model.train(was_training)


def dreambooth_subject(pipe, photos: list, captions: list[str] | None, class_word: str, prompts: list[str],
                       cfg: DreamBoothConfig = DreamBoothConfig(), seed: int = 0) -> tuple[np.ndarray, dict]:
    """Fine-tune on one subject, then draw one image per prompt: (images, seconds per phase)."""
    t0 = time.perf_counter()
    with dreambooth_expert(pipe, photos, captions, class_word, cfg) as expert:
        t1 = time.perf_counter()
        images = expert.sample(prompts, seed)
    t2 = time.perf_counter()
    return images, {"finetune_s": t1 - t0, "sample_s": t2 - t1, "total_s": t2 - t0}
