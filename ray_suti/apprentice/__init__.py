"""Stage 3: apprenticeship (DreamBooth experts write ICL-V2 targets). See ``job.py``."""
