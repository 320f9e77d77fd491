"""ray-suti: subject-driven text-to-image generation in context, on Ray."""
import atexit
import gc

__version__ = "0.1.0"

# Our processes (Ray workers, job drivers, the CLI) import this package before torch and diffusers,
# whose ~500,000 long-lived objects CPython walks at every full collection, many times while they
# import and once more as the interpreter exits. So full collections come 10x rarer (young ones as
# before), and at exit the heap is frozen, which the final collections skip: atexit handlers
# registered after this one still run first, and the OS frees the memory (bench/import_cost.py).
gc.set_threshold(*gc.get_threshold()[:2], 100)
atexit.register(gc.freeze)


def __getattr__(name):  # lazy, so `ray-suti world` does not import torch
    if name in ("SuTIPipeline", "SuTIModel", "SuTILayers", "DemoFeatures", "SuTIInputError"):
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
