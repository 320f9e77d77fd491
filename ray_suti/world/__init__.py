"""The synthetic web world: procedural subjects, worded contexts, an exact renderer and a crawl."""
from .contexts import SKILLS, VOCABULARY, Context, sample_context
from .render import render
from .subjects import CLASS_WORDS, Subject, heldout_seeds, is_heldout

__all__ = ["CLASS_WORDS", "SKILLS", "VOCABULARY", "Context", "Subject", "heldout_seeds",
           "is_heldout", "render", "sample_context"]
