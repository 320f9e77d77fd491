"""DreamBench's three scores, with one code path for the tiny in-repo models and real weights.

- DINO: mean cosine between the self-supervised ViT-S/16 [CLS] embeddings of a generated image and
  each real photo of the subject (subject fidelity that ignores the prompt);
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine between a generated image and its prompt (prompt fidelity).

Real runs pass ``--dino-model vit_small_patch16_224.dino --dino-pretrained /models/dino_vits16.pth``
(any timm ViT name and a local weights file) and an open_clip name with a tag or path for CLIP.
``"tiny"`` builds a small timm ViT from a config in code; without weights it stays at its seeded
random initialisation, which the results say (random ViT features still rank near-copies first,
but they are not DINO's numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# torch and the CLIP code are imported where scoring happens: the CLI reads ScorerConfig
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
TINY_DINO = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)  # ViT-S/16's shape, scaled down


def load_dino(model: str = "tiny", pretrained: str = "", device: str = "cpu"):
    """-> (timm ViT returning its [CLS] embedding, input size). ``pretrained``: a path or a URI."""
    import timm
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from ..utils.storage import local_copy

    if model == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            vit = VisionTransformer(**TINY_DINO, num_classes=0, global_pool="token")
        if pretrained:
            from safetensors.torch import load_file

            vit.load_state_dict(load_file(local_copy(pretrained)))
    else:
        overlay = {"file": local_copy(pretrained)} if pretrained else None
        vit = timm.create_model(model, pretrained=bool(pretrained), pretrained_cfg_overlay=overlay, num_classes=0,
                                global_pool="token")
    size = vit.patch_embed.img_size[0]
    return vit.to(device).eval(), size


def embed_dino(vit, images, size: int, device: str = "cpu") -> np.ndarray:
    """PIL images -> (N, D) unit [CLS] embeddings (centre square, bicubic, ImageNet normalisation)."""
    import torch

    from ..model.inputs import square

    arrays = [(np.asarray(square(img.convert("RGB"), size), np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
              for img in images]
    with torch.no_grad():
        feats = vit(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device))
    return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()


@dataclass(frozen=True)
class ScorerConfig:
    clip_model: str = "tiny"
    clip_pretrained: str = "checkpoints/tiny-clip.safetensors"
    dino_model: str = "tiny"
    dino_pretrained: str = ""

    @property
    def dino_is_random(self) -> bool:
        return self.dino_model == "tiny" and not self.dino_pretrained


class Scorers:
    """Loads CLIP and DINO once; scores one subject's generated images against its real photos."""

    def __init__(self, cfg: ScorerConfig, device: str = "cpu"):
        from ..data.clip import default_shifts, load_clip

        self.cfg, self.device = cfg, device
        self.clip, self.clip_size = load_clip(cfg.clip_model, cfg.clip_pretrained, device)
        self.shifts = default_shifts(cfg.clip_model)  # the same embedding as the dataset builder's
        self.dino, self.dino_size = load_dino(cfg.dino_model, cfg.dino_pretrained, device)

    def references(self, photos) -> dict:
        """Embeddings of the subject's real photos, computed once per subject."""
        from ..data.clip import embed_images

        return {"clip": embed_images(self.clip, photos, self.clip_size, self.device, self.shifts),
                "dino": embed_dino(self.dino, photos, self.dino_size, self.device)}

    def score(self, images, prompts: list[str], refs: dict, exclude: list[int | None] | None = None) -> dict:
        """images[i] was drawn for prompts[i]. ``exclude[i]`` is the reference photo an output *is*
        (copy-a-demo), left out of its own comparison as DreamBench's real-image row does."""
        from ..data.clip import embed_images, embed_texts

        clip_i = embed_images(self.clip, images, self.clip_size, self.device, self.shifts)
        dino = embed_dino(self.dino, images, self.dino_size, self.device)
        texts = embed_texts(self.clip, prompts, self.cfg.clip_model, self.device)
        keep = np.ones((len(images), len(refs["clip"])), bool)
        for i, j in enumerate(exclude or []):
            if j is not None:
                keep[i, j] = False

        def mean_cos(a, b):
            return float(((a @ b.T)[keep]).mean())

        return {"dino": mean_cos(dino, refs["dino"]), "clip_i": mean_cos(clip_i, refs["clip"]),
                "clip_t": float(np.mean(np.sum(clip_i * texts, axis=1)))}
