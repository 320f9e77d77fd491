"""The SuTI model: a diffusers UNet that also attends to demonstrations of a subject."""
from .inputs import SuTIInputError, load_image
from .pipeline import SuTIPipeline, SuTIPipelineOutput, load_pipeline
from .presets import PRESETS, SuTIConfig, get_preset
from .suti import SuTIModel
from .unet import DemoFeatures, NeighbourAttention, SuTIUNet

__all__ = ["PRESETS", "DemoFeatures", "NeighbourAttention", "SuTIConfig", "SuTIInputError", "SuTIModel",
           "SuTIPipeline", "SuTIPipelineOutput", "SuTIUNet", "get_preset", "load_image",
           "load_pipeline"]
