"""Named model presets, nanoGPT-style: ``PRESETS["tiny-32"]`` etc.

Pixel presets (``tiny-32``, ``tiny-64``) have no VAE and train from scratch on a laptop CPU;
``tiny-latent`` is the smallest latent model (a tiny VAE), so every latent path (Stable Diffusion
folders, VAE encoding of demos) runs on a CPU; ``sd15`` is Stable Diffusion 1.5's architecture
(latent, 512 px), built untrained by ``from_preset`` and filled with real weights by
``SuTIPipeline.from_base(path)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SuTIConfig:
    name: str
    image_size: int  # pixels of generated images and of demos after normalisation
    unet: dict  # UNet2DConditionModel keyword arguments
    text: dict  # transformers CLIPTextConfig keyword arguments
    vae: dict | None = None  # AutoencoderKL keyword arguments; None = pixel space
    vae_scaling_factor: float = 0.18215
    neighbour_levels: tuple = (1, 2)  # UNet levels (0 = full resolution) that look at demos
    neighbour_heads: int = 4
    neighbour_cosine: bool = False  # cosine neighbour attention with a learnt temperature (layers.py)
    max_demos: int = 5
    controls: tuple = ()  # spatial controls with their own encoders: "box", "keypoints", "edges"
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def max_text_len(self) -> int:
        return self.text["max_position_embeddings"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SuTIConfig":
        d = dict(d)
        d["neighbour_levels"] = tuple(d["neighbour_levels"])
        d["controls"] = tuple(d.get("controls", ()))
        return cls(**d)


def _tiny_text(hidden: int = 64) -> dict:
    # Full CLIP BPE vocabulary (offline, from open_clip's vocab file) so any prompt tokenises.
    return dict(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=49407)


def _tiny_unet(size: int, channels: tuple, cross_dim: int) -> dict:
    n = len(channels)
    return dict(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
                up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
                layers_per_block=1, cross_attention_dim=cross_dim, attention_head_dim=2,
                norm_num_groups=16)  # attention_head_dim is diffusers' head *count*: 2 heads of 32-64
                # channels run ~2x faster on CPU than 8 tiny heads


PRESETS: dict[str, SuTIConfig] = {
    # 32 px: levels 32/16/8; demos are attended at 16x16 and 8x8.
    "tiny-32": SuTIConfig("tiny-32", 32, _tiny_unet(32, (32, 64, 128), 64), _tiny_text(64),
                          neighbour_levels=(1, 2), neighbour_heads=2),
    # 64 px: levels 64/32/16/8; demos are attended at 16x16 and 8x8.
    "tiny-64": SuTIConfig("tiny-64", 64, _tiny_unet(64, (32, 64, 128, 128), 64), _tiny_text(64),
                          neighbour_levels=(2, 3), neighbour_heads=2),
    # 64 px through a tiny VAE (factor 4) to 16x16x4 latents: levels 16/8/4; demos attended at 8x8 and 4x4.
    "tiny-latent": SuTIConfig(
        "tiny-latent", 64,
        unet=dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  layers_per_block=1, cross_attention_dim=64, attention_head_dim=2, norm_num_groups=16),
        text=_tiny_text(64),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 layers_per_block=1, norm_num_groups=16, sample_size=64),
        neighbour_levels=(1, 2), neighbour_heads=2, prediction_type="epsilon", beta_schedule="scaled_linear",
    ),
    # Stable Diffusion 1.5 (latent 64x64 at 512 px); demos attended at 32x32 and 16x16 latents.
    "sd15": SuTIConfig(
        "sd15", 512,
        unet=dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  layers_per_block=2, cross_attention_dim=768, attention_head_dim=8),
        text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, sample_size=512),
        neighbour_levels=(1, 2), neighbour_heads=8, prediction_type="epsilon", beta_schedule="scaled_linear",
    ),
}


def get_preset(name: str) -> SuTIConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
