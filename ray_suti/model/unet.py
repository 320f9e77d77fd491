"""SuTIUNet: diffusers' UNet2DConditionModel plus neighbour attention over demonstration features.

Re-Imagen / SuTI in three moves (DESIGN.md, "Model"):

1. ``encode_demos`` runs the demonstrations through the *same* UNet's downsampling path (shared
   weights, clean input at timestep 0, each demo with its own caption) and keeps, per resolution
   level, the last feature map before downsampling. Feature maps become tokens, concatenated across
   a request's demos: level i gives ``(B, K * H_i * W_i, C_i)``.
2. After every text cross-attention (``attn2`` of each transformer block) at the configured levels,
   a ``NeighbourAttention`` lets the denoiser attend to the demo tokens of its own resolution. It is
   attached as a forward hook, so the UNet's own modules and state-dict keys stay exactly diffusers'
   (real Stable Diffusion weights load unchanged) and the new weights live under ``neighbours.*``.
3. Each neighbour attention's output projection is zero-initialised (and nothing else is), so a
   fresh SuTI is exactly its base model, while the gradient of the output projection is non-zero
   from the first step and opens the path.

Demo features do not depend on the noise step: compute them once per request and pass the same
``DemoFeatures`` to every denoising step and guidance branch. Spatial controls (box, keypoints,
edges) have their own encoders under ``control_encoders.*`` (controls.py); their residuals are passed in.
"""
from __future__ import annotations

import math
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from .controls import ControlEncoders, Controls

COSINE_INIT_SCALE = 10.0  # initial temperature of cosine neighbour attention


@dataclass
class DemoFeatures:
    """Per-level demo tokens ``{level: (B, K*T_level, C_level)}`` and which demos are real ``(B, K)``."""

    tokens: dict[int, torch.Tensor]
    valid: torch.Tensor  # bool (B, K); False for padding and for examples whose demos are dropped
    # Step-independent work derived from these features (rows with demos, each neighbour layer's
    # keys and values), kept for as long as the features are reused: a request, or a cached subject.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def memo(self, key, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def rows_with_demos(self) -> torch.Tensor:
        return self.memo("rows", lambda: self.valid.any(dim=1).nonzero().squeeze(1))

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def key_mask(self, level: int) -> torch.Tensor:
        """(B, K*T) bool: which tokens of ``level`` may be attended to."""
        b, k = self.valid.shape
        per_demo = self.tokens[level].shape[1] // k
        return self.valid[:, :, None].expand(b, k, per_demo).reshape(b, k * per_demo)

    def repeat(self, n: int) -> "DemoFeatures":
        """Each example repeated n times in place (num_images_per_prompt)."""
        return DemoFeatures({l: t.repeat_interleave(n, 0) for l, t in self.tokens.items()},
                            self.valid.repeat_interleave(n, 0))

    def with_valid(self, keep: torch.Tensor) -> "DemoFeatures":
        """Same tokens, with the demos of examples where ``keep`` (B,) is False switched off."""
        return DemoFeatures(self.tokens, self.valid & keep.to(self.valid.device)[:, None])

    @staticmethod
    def cat(parts: list["DemoFeatures"]) -> "DemoFeatures":
        return DemoFeatures({l: torch.cat([p.tokens[l] for p in parts]) for l in parts[0].tokens},
                            torch.cat([p.valid for p in parts]))


@functools.lru_cache(maxsize=64)
def _sincos_2d(n_tokens: int, dim: int, device, dtype) -> torch.Tensor | None:
    """Fixed 2D sine-cosine positions for a square token grid ``(n_tokens, dim)``; None if not square."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens or dim % 4:
        return None
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 4, device=device) / (dim // 4))
    coords = torch.arange(side, device=device, dtype=torch.float32)
    ang_y = coords[:, None, None] * freqs  # (side, 1, dim/4)
    ang_x = coords[None, :, None] * freqs  # (1, side, dim/4)
    emb = torch.cat([ang_y.sin().expand(side, side, -1), ang_y.cos().expand(side, side, -1),
                     ang_x.sin().expand(side, side, -1), ang_x.cos().expand(side, side, -1)], dim=-1)
    return emb.reshape(n_tokens, dim).to(dtype)


class NeighbourAttention(nn.Module):
    """Multi-head attention from denoiser tokens to the demo tokens of the same resolution level."""

    def __init__(self, query_dim: int, demo_dim: int, heads: int, level: int, positions: bool = True,
                 cosine: bool = False):
        super().__init__()
        if query_dim % heads:
            raise ValueError(f"query_dim {query_dim} is not divisible by {heads} heads")
        self.level, self.heads, self.positions = level, heads, positions
        # Cosine attention: unit-norm queries and keys times a learnt per-head temperature. Plain
        # dot products of fresh projections stayed near-uniform after 3k GPU steps (entropy ~0.9x
        # of uniform: demos were averaged, colours moved but patterns did not); a temperature that
        # starts sharp lets attention pick parts of the subject from the start.
        self.logit_scale = nn.Parameter(torch.full((heads,), math.log(COSINE_INIT_SCALE))) if cosine else None
        self.norm_q, self.norm_kv = nn.LayerNorm(query_dim), nn.LayerNorm(demo_dim)
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(demo_dim, query_dim, bias=False)
        self.to_v = nn.Linear(demo_dim, query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim)
        nn.init.zeros_(self.to_out.weight)  # exact no-op at init; its gradient is not zero
        nn.init.zeros_(self.to_out.bias)
        self.demos: DemoFeatures | None = None  # set by SuTIUNet around each forward

    def keys_values(self, demos: torch.Tensor, tokens_per_demo: int) -> tuple[torch.Tensor, torch.Tensor]:
        """demos (B, K*T, Cd) -> keys and values (B, heads, K*T, C/heads); step-independent."""
        kv_in = self.norm_kv(demos)
        if self.positions:  # each demo lies on the query's grid, so attention can use location
            pos = _sincos_2d(tokens_per_demo, kv_in.shape[-1], demos.device, demos.dtype)
            if pos is not None:
                kv_in = kv_in + pos.repeat(demos.shape[1] // tokens_per_demo, 1)
        b, m, h = demos.shape[0], demos.shape[1], self.heads
        k = self.to_k(kv_in).view(b, m, h, -1).transpose(1, 2)
        v = self.to_v(kv_in).view(b, m, h, -1).transpose(1, 2)
        return (k if self.logit_scale is None else F.normalize(k, dim=-1)), v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x: (B, N, Cq) denoiser tokens of examples that have demos; k, v: (B, h, K*T, Cq/h);
        # key_mask: (B, K*T) bool, at least one True per row
        b, n, c = x.shape
        q_in = self.norm_q(x)
        if self.positions:
            pos = _sincos_2d(n, c, x.device, x.dtype)
            q_in = q_in if pos is None else q_in + pos
        q = self.to_q(q_in).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, C/h)
        scale = None
        if self.logit_scale is not None:  # logits = temperature * cos(q, k)
            q, scale = F.normalize(q, dim=-1) * self.logit_scale.exp().clamp(max=100)[:, None, None], 1.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], scale=scale)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))

    def hook(self, module, args, kwargs, output):
        """Forward hook on ``attn2``: adds neighbour attention after the text cross-attention."""
        demos = self.demos
        if demos is None:
            return output
        hidden = args[0] if args else kwargs["hidden_states"]
        tokens = demos.tokens[self.level]
        n = hidden.shape[1]
        if tokens.shape[1] != n * demos.valid.shape[1]:
            raise ValueError("demo features and sample have different resolutions")
        rows = demos.rows_with_demos()  # examples without demos (dropped, or the unconditional
        if rows.numel() == 0:  # guidance branch) get exactly nothing added, at no cost
            return output
        k, v = demos.memo(self, lambda: self.keys_values(tokens[rows].to(hidden.dtype), n))
        mask = demos.memo((self, "mask"), lambda: demos.key_mask(self.level)[rows])
        x = (hidden + output)[rows]
        extra = self(x, k, v, mask)
        if rows.numel() == hidden.shape[0]:
            return output + extra
        return output.index_add(0, rows, extra)


def transformer_blocks_by_level(unet: UNet2DConditionModel):
    """Yields ``(name, BasicTransformerBlock, level)``; level 0 is full resolution."""
    n = len(unet.config.block_out_channels)
    groups = [(f"down_blocks.{i}", b, i) for i, b in enumerate(unet.down_blocks)]
    groups.append(("mid_block", unet.mid_block, n - 1))
    groups += [(f"up_blocks.{j}", b, n - 1 - j) for j, b in enumerate(unet.up_blocks)]
    for prefix, block, level in groups:
        for a, attn in enumerate(getattr(block, "attentions", None) or []):
            for t, tb in enumerate(getattr(attn, "transformer_blocks", [])):
                if getattr(tb, "attn2", None) is not None:
                    yield f"{prefix}.attentions.{a}.transformer_blocks.{t}", tb, level


class SuTIUNet(ModelMixin, ConfigMixin):
    """A UNet2DConditionModel that can also look at demonstrations of a subject."""

    @register_to_config
    def __init__(self, base_config: dict, neighbour_levels: tuple = (1, 2), neighbour_heads: int = 4,
                 neighbour_positions: bool = True, max_demos: int = 5, neighbour_cosine: bool = False,
                 controls: tuple = (), image_size: int = 0):
        super().__init__()
        self.unet = UNet2DConditionModel(**{k: v for k, v in base_config.items() if not k.startswith("_")})
        self.control_encoders = ControlEncoders(tuple(controls), self.unet.config, image_size or self.unet.config.sample_size)
        channels = self.unet.config.block_out_channels
        self.neighbours = nn.ModuleDict()
        for name, block, level in transformer_blocks_by_level(self.unet):
            if level not in neighbour_levels:
                continue
            module = NeighbourAttention(block.attn2.to_q.in_features, channels[level], neighbour_heads,
                                        level, neighbour_positions, neighbour_cosine)
            self.neighbours[name.replace(".", "__")] = module
            block.attn2.register_forward_hook(module.hook, with_kwargs=True)
        missing = set(neighbour_levels) - {m.level for m in self.neighbours.values()}
        if missing:
            raise ValueError(f"neighbour_levels {sorted(missing)} have no cross-attention block in this UNet")

    @property
    def levels(self) -> list[int]:
        return sorted({m.level for m in self.neighbours.values()})

    def encode_demos(self, images: torch.Tensor, text: torch.Tensor, valid: torch.Tensor | None = None) -> DemoFeatures:
        """images (B, K, C, H, W) clean model-space inputs; text (B, K, L, D) caption embeddings."""
        b, k = images.shape[:2]
        if k > self.config.max_demos:
            raise ValueError(f"{k} demonstrations given; this model takes at most {self.config.max_demos}")
        valid = torch.ones(b, k, dtype=torch.bool, device=images.device) if valid is None else valid.bool()
        unet, levels = self.unet, self.levels
        self._set_demos(None)
        x, txt = images.flatten(0, 1), text.flatten(0, 1)
        t = torch.zeros(x.shape[0], device=x.device)  # clean input: timestep 0
        emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
        h, tokens = unet.conv_in(x), {}
        for i, block in enumerate(unet.down_blocks[: max(levels) + 1]):
            if getattr(block, "has_cross_attention", False):
                h, res = block(h, temb=emb, encoder_hidden_states=txt)
            else:
                h, res = block(h, temb=emb)
            if i in levels:
                fmap = res[len(block.resnets) - 1]  # (B*K, C_i, H_i, W_i), before downsampling
                tokens[i] = fmap.flatten(2).transpose(1, 2).reshape(b, -1, fmap.shape[1])  # (B, K*H_i*W_i, C_i)
        return DemoFeatures(tokens, valid)

    def _set_demos(self, demos: DemoFeatures | None) -> None:
        for module in self.neighbours.values():
            module.demos = demos

    def encode_controls(self, controls: Controls | None, dtype=torch.float32) -> tuple | None:
        """Controls -> (down residuals, mid residual), step-independent; None without any control."""
        return None if controls is None else self.control_encoders(controls, dtype)

    def forward(self, sample: torch.Tensor, timestep, text: torch.Tensor, demos: DemoFeatures | None = None,
                control_residuals: tuple | None = None) -> torch.Tensor:
        """sample (B, C, H, W), text (B, L, D), control residuals of B rows -> model prediction (B, C, H, W)."""
        if demos is not None and demos.batch_size != sample.shape[0]:
            raise ValueError(f"demo features for {demos.batch_size} examples, sample has {sample.shape[0]}")
        extra = {}
        if control_residuals is not None:
            down, mid = control_residuals
            extra = dict(down_block_additional_residuals=tuple(r.to(sample.dtype) for r in down),
                         mid_block_additional_residual=mid.to(sample.dtype))
        self._set_demos(demos)
        try:
            return self.unet(sample, timestep, encoder_hidden_states=text, **extra).sample
        finally:
            self._set_demos(None)
