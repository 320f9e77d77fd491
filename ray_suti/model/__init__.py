"""The SuTI model: a plain diffusers UNet, and SuTI layers that let it attend to demonstrations.

Names are imported on first use (as diffusers does), so a command that only needs the scheduler
names or the presets does not pay for importing diffusers. Importing ``SuTIPipeline`` registers it
with diffusers (``pipeline.py``)."""
import importlib

_WHERE = {"SuTIInputError": "inputs", "load_image": "inputs", "DemoFeatures": "layers",
          "NeighbourAttention": "layers", "SuTIAttnProcessor": "layers", "SuTILayers": "layers",
          "SuTIPipeline": "pipeline", "SuTIPipelineOutput": "pipeline", "load_pipeline": "pipeline",
          "PRESETS": "presets", "SuTIConfig": "presets", "get_preset": "presets", "SuTIModel": "suti"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
