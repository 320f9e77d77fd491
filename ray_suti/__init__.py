"""ray-suti: subject-driven text-to-image generation in context, on Ray."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `ray-suti world` does not import torch
    if name in ("SuTIPipeline", "SuTIModel", "SuTILayers", "DemoFeatures", "SuTIInputError"):
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
