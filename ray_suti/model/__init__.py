"""The SuTI model: a plain diffusers UNet, and SuTI layers that let it attend to demonstrations."""
import diffusers

from .inputs import SuTIInputError, load_image
from .layers import DemoFeatures, NeighbourAttention, SuTIAttnProcessor, SuTILayers
from .pipeline import SuTIPipeline, SuTIPipelineOutput, load_pipeline
from .presets import PRESETS, SuTIConfig, get_preset
from .suti import SuTIModel

# So that `DiffusionPipeline.from_pretrained(folder)` finds the class a SuTI model_index.json names.
setattr(diffusers, "SuTIPipeline", SuTIPipeline)

__all__ = ["PRESETS", "DemoFeatures", "NeighbourAttention", "SuTIAttnProcessor", "SuTIConfig", "SuTIInputError",
           "SuTILayers", "SuTIModel", "SuTIPipeline", "SuTIPipelineOutput", "get_preset", "load_image",
           "load_pipeline"]
