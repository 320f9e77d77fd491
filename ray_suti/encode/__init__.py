"""Stage 3b: cached VAE latents and text-encoder states of ICL-V2 examples (``job.py``)."""
