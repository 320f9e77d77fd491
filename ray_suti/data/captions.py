"""Re-captioning, behind one small interface.

A captioner is a callable ``(images: list[PIL.Image], alt_texts: list[str]) -> list[str]``, one
caption per image. Two ship:

- ``AltTextCaptioner`` (default, ``--captioner alt``): cleans the alt text. It trims and collapses
  whitespace and blanks what is not a description (file names, camera names, shop boilerplate), so
  a demo's caption is either words about the picture or empty.
- ``ModelCaptioner`` (``--captioner /path/to/model``): any transformers image-to-text model saved
  locally (BLIP, GIT, ... anything ``AutoModelForImageTextToText`` loads, with its processor); its
  output is cleaned the same way. The builder runs it on an actor pool, like CLIP.
"""
from __future__ import annotations

import re

BOILERPLATE = re.compile(
    r"^(img|dsc|dscn|pxl|photo|image|picture|untitled|thumbnail|thumb|product image|click to enlarge|buy now|"
    r"sale!?|image \d+ of \d+|[\w-]+\.(jpe?g|png|gif|webp))[\s_\-\d]*$|^(img|dsc|dscn|pxl)_?\d+(\.\w+)?$",
    re.IGNORECASE)


def clean_caption(text) -> str:
    text = " ".join(str(text or "").split())
    return "" if not text or BOILERPLATE.match(text) else text


class AltTextCaptioner:
    def __call__(self, images: list, alt_texts: list[str]) -> list[str]:
        return [clean_caption(t) for t in alt_texts]


class ModelCaptioner:
    """A local transformers image-to-text model; ``prompt`` is passed to processors that take one."""

    def __init__(self, path: str, device: str = "cpu", max_new_tokens: int = 30, prompt: str = ""):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path).to(device).eval()
        self.device, self.max_new_tokens, self.prompt = device, max_new_tokens, prompt

    def __call__(self, images: list, alt_texts: list[str]) -> list[str]:
        import torch

        if not images:
            return []
        kwargs = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt", **kwargs).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        if self.prompt and "input_ids" in inputs:  # decoder-only models echo the prompt
            out = out[:, inputs["input_ids"].shape[1]:]
        return [clean_caption(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def make_captioner(spec: str, device: str = "cpu"):
    """``alt`` -> AltTextCaptioner; a transformers model folder (local or a URI) -> ModelCaptioner."""
    from ..utils import storage

    if spec in ("", "alt"):
        return AltTextCaptioner()
    if not storage.is_dir(spec):
        raise ValueError(f"captioner must be 'alt' or a transformers model folder; {spec!r} is neither")
    return ModelCaptioner(storage.local_copy(spec), device=device)
