"""Stage 3: apprenticeship (DreamBooth experts write ICL-V2 targets). See ``job.py``."""
from .dreambooth import DreamBoothConfig, dreambooth_expert, dreambooth_subject
from .prompts import Prompt, make_prompt_writer

__all__ = ["DreamBoothConfig", "dreambooth_expert", "dreambooth_subject", "Prompt", "make_prompt_writer"]
