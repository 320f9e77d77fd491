"""CLIP image embeddings for the dataset builder, through one code path for every model.

``model="tiny"`` is the embedded default's small open_clip CLIP (a custom config: no download),
whose weights come from ``pretrained`` (a safetensors file written by ``ray-suti train-clip``) or
stay random. Any other name is an open_clip model with a pretrained tag or a local checkpoint path,
as real runs use (e.g. ``ViT-B-32`` + ``laion2b_s34b_b79k`` or ``/models/clip.bin``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: drivers read default_shifts and TINY_CLIP without it

# 4-px patches (8x8 tokens): with 8-px patches a 16-px subject covered 2x2 tokens, and junk-vs-subject
# page AUC stayed at 0.72 after 1,500 steps; 4-px patches reached 0.87 in 600 (docs/NOTES.md).
TINY_CLIP = dict(embed_dim=64,
                 vision_cfg={"image_size": 32, "layers": 4, "width": 128, "patch_size": 4, "head_width": 32},
                 text_cfg={"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2})
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def default_shifts(model: str) -> int:
    """1-px shift averaging (``embed_images``' ``shifts``) the model needs: 3 for the tiny CLIP, whose
    4-px patches make it shift-sensitive; 1 (off) for real CLIPs, where it would only cost 9x."""
    return 3 if model == "tiny" else 1


def load_clip(model: str = "tiny", pretrained: str = "", device: str = "cpu"):
    """-> (open_clip model in eval mode, input image size). ``pretrained``: a local path, a URI
    (fetched once into a local cache) or, for named models, an open_clip tag."""
    import open_clip
    import torch

    from ..utils.storage import is_uri, local_copy

    pretrained = local_copy(pretrained) if is_uri(pretrained) else pretrained

    if model == "tiny":
        with torch.random.fork_rng():  # untrained weights are still the same on every actor and run
            torch.manual_seed(0)
            clip = open_clip.model.CLIP(**TINY_CLIP)
        if pretrained:
            from safetensors.torch import load_file

            clip.load_state_dict(load_file(pretrained))
        size = TINY_CLIP["vision_cfg"]["image_size"]
    else:
        clip = open_clip.create_model(model, pretrained=pretrained or None)
        size = clip.visual.image_size if isinstance(clip.visual.image_size, int) else clip.visual.image_size[0]
    return clip.to(device).eval(), size


def preprocess(images, size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) normalised as CLIP expects (centre square, bicubic)."""
    import torch

    from ..model.inputs import square

    arrays = [(np.asarray(square(img.convert("RGB"), size), np.float32) / 255 - MEAN) / STD for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def embed_images(clip, images, size: int, device: str = "cpu", shifts: int = 1) -> np.ndarray:
    """-> (N, D) float32, unit length. ``shifts`` > 1 averages the unit embeddings of the image rolled
    by every (dy, dx) in a ``shifts`` x ``shifts`` grid of 1-px offsets (centred: 3 -> -1, 0, 1), then
    renormalises: the tiny CLIP's 4-px patches make it sensitive to a 1-px shift (a re-upload's
    cosine to its original, with and without: docs/stages/1-dataset.md), at ``shifts**2`` forward
    passes."""
    import torch

    if not images:
        return np.zeros((0, 0), np.float32)
    x = preprocess(images, size).to(device)
    offsets = [o - (shifts - 1) // 2 for o in range(shifts)]
    with torch.no_grad():
        feats = sum(torch.nn.functional.normalize(clip.encode_image(torch.roll(x, (dy, dx), (2, 3))).float(), dim=-1)
                    for dy in offsets for dx in offsets)
    return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()


def embed_texts(clip, texts: list[str], model: str = "tiny", device: str = "cpu") -> np.ndarray:
    """-> (N, D) float32, unit length, with the tokenizer that belongs to ``model``."""
    import open_clip
    import torch

    if model == "tiny":
        from open_clip.tokenizer import SimpleTokenizer

        ids = SimpleTokenizer()(list(texts), context_length=TINY_CLIP["text_cfg"]["context_length"])
    else:
        ids = open_clip.get_tokenizer(model)(list(texts))
    with torch.no_grad():
        feats = clip.encode_text(ids.to(device))
    return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()
