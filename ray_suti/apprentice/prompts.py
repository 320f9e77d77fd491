"""Prompt writers: new prompts for a cluster's subject, covering the five skills and their mixes.

Every writer has one method, ``write(class_word, captions, n, rng) -> list[Prompt]``: ``n`` prompts
that name the class (never the subject itself), each labelled with the skills it asks for, none
equal to one of the cluster's own captions (a prompt the photos already answer teaches copying).

- ``WorldPromptWriter``: the synthetic world's grammar (its scenes, styles, colours, views and
  accessories, as ``Context.prompt`` writes them), with the drawn context kept in ``Prompt.context``
  so that the world can render the exact ground truth of every target.
- ``TemplatePromptWriter``: a template grammar for real photos (DreamBench-like phrases).
- ``LLMPromptWriter``: any local transformers causal language model writes them; lines that do not
  name the class or repeat a caption are replaced from the template grammar, and counted.

``make_prompt_writer("world" | "templates" | <local model folder>)`` picks one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..world.contexts import SKILLS, Context, sample_context

# Probabilities that each skill is asked for: every prompt has at least one, and about a third mix
# two or three (the compositions SuTI itself could not do).
SKILL_PROBS = {"recontext": 0.6, "stylize": 0.3, "recolor": 0.3, "view": 0.3, "accessorize": 0.3}


@dataclass(frozen=True)
class Prompt:
    text: str
    skills: tuple
    context: str = ""  # the world's Context as JSON (WorldPromptWriter only)


def _normal(text: str) -> str:
    return " ".join(str(text).lower().replace(",", " ").split())


class WorldPromptWriter:
    def write(self, class_word: str, captions: list[str], n: int, rng: np.random.Generator) -> list[Prompt]:
        seen, out = {_normal(c) for c in captions}, []
        while len(out) < n:
            ctx = sample_context(rng, SKILL_PROBS)
            text = ctx.prompt(class_word)
            if ctx.skills and _normal(text) not in seen:
                seen.add(_normal(text))
                out.append(Prompt(text, tuple(ctx.skills), ctx.to_json()))
        return out


TEMPLATES = {
    "recontext": ["on the beach", "in the snow", "in a forest", "on a city street", "in the desert at night",
                  "on a wooden table in a kitchen", "floating in a swimming pool", "on top of a mountain"],
    "stylize": ["in the style of Van Gogh", "as a pencil sketch", "as a watercolour painting", "in pixel art style",
                "as a Picasso cubist painting", "as a 3d render"],
    "recolor": ["red", "blue", "green", "yellow", "purple", "pink", "black", "white"],
    "view": ["seen from above", "seen from behind", "seen from the side", "upside down", "in a close-up photo"],
    "accessorize": ["wearing a santa hat", "wearing sunglasses", "wearing a red scarf", "with a crown on it",
                    "wearing a bowtie"],
}


class TemplatePromptWriter:
    """``a [colour] <class> [accessory] [view] [scene][, style]`` with each part drawn per skill."""

    def __init__(self, templates: dict | None = None):
        self.templates = templates or TEMPLATES
        if set(self.templates) != set(SKILLS):
            raise ValueError(f"templates must cover exactly the skills {list(SKILLS)}")

    def one(self, class_word: str, rng: np.random.Generator) -> Prompt:
        skills = [s for s in SKILLS if rng.random() < SKILL_PROBS[s]] or [str(rng.choice(SKILLS))]
        pick = {s: str(rng.choice(self.templates[s])) for s in skills}
        head = " ".join(w for w in ("a", pick.get("recolor", ""), class_word) if w)
        parts = [head, pick.get("accessorize", ""), pick.get("view", ""), pick.get("recontext", "")]
        text = " ".join(p for p in parts if p) + (", " + pick["stylize"] if "stylize" in pick else "")
        return Prompt(text, tuple(skills))

    def write(self, class_word: str, captions: list[str], n: int, rng: np.random.Generator) -> list[Prompt]:
        seen, out = {_normal(c) for c in captions}, []
        for _ in range(100 * n):
            if len(out) == n:
                break
            p = self.one(class_word, rng)
            if _normal(p.text) not in seen:
                seen.add(_normal(p.text))
                out.append(p)
        return out


class LLMPromptWriter:
    """A local causal LM continues an instruction; its lines become prompts when they name the class."""

    INSTRUCTION = ("Write {n} short, varied image prompts for a photo of a {cls}: new places, art styles, "
                   "colours, viewpoints and accessories, one per line.\n1.")

    def __init__(self, path: str, max_new_tokens: int = 96, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"LLM prompt writer: {path!r} is not a local model folder")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.max_new_tokens, self.device = max_new_tokens, device
        self.fallback, self.replaced = TemplatePromptWriter(), 0

    def generate(self, class_word: str, n: int, seed: int) -> list[str]:
        import torch

        ids = self.tokenizer(self.INSTRUCTION.format(n=n, cls=class_word), return_tensors="pt").to(self.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=True, top_p=0.95,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        text = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        return [line.strip(" .-0123456789)\t") for line in text.splitlines()]

    def write(self, class_word: str, captions: list[str], n: int, rng: np.random.Generator) -> list[Prompt]:
        seen, out = {_normal(c) for c in captions}, []
        for line in self.generate(class_word, n, int(rng.integers(2**31))):
            if len(out) < n and class_word.lower() in _normal(line).split() and _normal(line) not in seen:
                seen.add(_normal(line))
                out.append(Prompt(line, tuple(skills_of(line))))
        self.replaced += n - len(out)
        return out + self.fallback.write(class_word, captions + [p.text for p in out], n - len(out), rng)


def skills_of(text: str) -> list[str]:
    """The skills a free-form prompt asks for, by the template grammar's words (recontext if none)."""
    words = set(_normal(text).split())
    found = [s for s, phrases in TEMPLATES.items()
             if any(set(_normal(p).split()) - {"a", "the", "in", "on", "as", "of", "with", "it"} <= words
                    for p in phrases)]
    return found or ["recontext"]


def make_prompt_writer(spec: str):
    if spec == "world":
        return WorldPromptWriter()
    if spec == "templates":
        return TemplatePromptWriter()
    from ..utils.storage import local_copy

    return LLMPromptWriter(local_copy(spec))  # a model folder, local or a URI


def target_context(prompt: Prompt) -> Context | None:
    return Context.from_json(prompt.context) if prompt.context else None
