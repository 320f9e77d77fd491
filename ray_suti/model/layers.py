"""The SuTI layers: neighbour attention over demonstrations (plus the spatial-control encoders), a
diffusers component of their own that attaches to a plain ``UNet2DConditionModel`` as attention
processors, IP-Adapter style.

Re-Imagen / SuTI in three moves (docs/model.md):

1. ``encode_demos`` runs the demonstrations through the *same* UNet's downsampling path (shared
   weights, clean input at timestep 0, each demo with its own caption) and keeps, per resolution
   level, the last feature map before downsampling. Feature maps become tokens, concatenated across
   a request's demos: level i gives ``(B, K * H_i * W_i, C_i)``.
2. After every text cross-attention (``attn2`` of each transformer block) at the configured levels,
   a ``NeighbourAttention`` lets the denoiser attend to the demo tokens of its own resolution. It
   runs inside that ``attn2``'s ``SuTIAttnProcessor``; the keys and values of the demos arrive per
   call in ``cross_attention_kwargs["suti"]`` (``neighbour_inputs``), so nothing is stored on a
   module during a forward (two forwards at once are safe, and ``torch.compile`` sees pure tensors).
   The UNet's modules and state-dict keys stay exactly diffusers' (a SuTI folder is an SD folder).
3. Each neighbour attention's output projection is zero-initialised (and nothing else is), so fresh
   SuTI layers leave the base model exactly as it was, while the gradient of the output projection
   is non-zero from the first step and opens the path.

Demo features do not depend on the noise step: compute them once per request, turn them into keys
and values once (``neighbour_inputs``), and pass the same inputs to every denoising step and
guidance branch. The weights of these layers alone are the SuTI adapter file (``save_adapter``).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .controls import ControlEncoders, Controls

COSINE_INIT_SCALE = 10.0  # initial temperature of cosine neighbour attention
ADAPTER_FORMAT = "suti-adapter/1"


@dataclass
class DemoFeatures:
    """Per-level demo tokens ``{level: (B, K*T_level, C_level)}`` and which demos are real ``(B, K)``."""

    tokens: dict[int, torch.Tensor]
    valid: torch.Tensor  # bool (B, K); False for padding and for examples whose demos are dropped
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # step-independent derived work

    def memo(self, key, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tokens.values())).dtype

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

    def to(self, device=None, dtype=None) -> "DemoFeatures":
        return DemoFeatures({l: t.to(device=device, dtype=dtype) for l, t in self.tokens.items()},
                            self.valid.to(device))

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
        # Cosine attention: unit-norm queries and keys times a learnt per-head temperature, so
        # attention can pick parts of the subject from the start (docs/model.md).
        self.logit_scale = nn.Parameter(torch.full((heads,), math.log(COSINE_INIT_SCALE))) if cosine else None
        self.norm_q, self.norm_kv = nn.LayerNorm(query_dim), nn.LayerNorm(demo_dim)
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(demo_dim, query_dim, bias=False)
        self.to_v = nn.Linear(demo_dim, query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim)
        nn.init.zeros_(self.to_out.weight)  # exact no-op at init; its gradient is not zero
        nn.init.zeros_(self.to_out.bias)

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
        if self.logit_scale is not None:  # unit keys, normalised in fp32 (half-precision norms overflow)
            k = F.normalize(k.float(), dim=-1).to(k.dtype)
        # contiguous once per request: SDPA would otherwise copy strided keys and values every call
        return k.contiguous(), v.contiguous()

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x: (B, N, Cq) denoiser tokens of examples that have demos; k, v: (B, h, K*T, Cq/h);
        # key_mask: (B, K*T) bool with at least one True per row, or None (every key may be attended to)
        b, n, c = x.shape
        q_in = self.norm_q(x)
        if self.positions:
            pos = _sincos_2d(n, c, x.device, x.dtype)
            q_in = q_in if pos is None else q_in + pos
        q = self.to_q(q_in).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, C/h)
        scale = None
        if self.logit_scale is not None:  # logits = temperature * cos(q, k), the temperature in fp32
            temperature = self.logit_scale.float().exp().clamp(max=100)[:, None, None]
            q, scale = (F.normalize(q.float(), dim=-1) * temperature).to(q.dtype), 1.0
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class SuTIAttnProcessor:
    """Processor of one attention layer: its base processor, then (for a cross-attention that has
    one) neighbour attention over the demo keys and values this call's ``suti`` inputs hold.

    Not an ``nn.Module``: the neighbour weights belong to the SuTI layers component, so the UNet's
    state dict stays diffusers' own.
    """

    def __init__(self, name: str, neighbour: NeighbourAttention | None = None, base=None):
        self.name, self.neighbour, self.base = name, neighbour, base or AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 suti: dict | None = None, **kwargs):
        output = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        entry = None if suti is None or self.neighbour is None else suti.get(self.name)
        if entry is None:
            return output
        k, v, mask, rows, tokens_per_demo = entry
        if tokens_per_demo != hidden_states.shape[1]:
            raise ValueError("demo features and sample have different resolutions")
        if rows.numel() == hidden_states.shape[0]:
            return output + self.neighbour(hidden_states + output, k, v, mask)
        # examples without demos (dropped, or a guidance branch without them) get exactly nothing
        extra = self.neighbour((hidden_states + output)[rows], k, v, mask)
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


def _key(block_name: str) -> str:
    return block_name.replace(".", "__")  # ModuleDict keys cannot hold dots


def unet_layout(unet: UNet2DConditionModel) -> dict:
    """What SuTI layers need to know of a UNet: cross-attention blocks (query width, level) and the
    skip connections the control encoders feed."""
    c = unet.config
    return {"blocks": {_key(n): [tb.attn2.to_q.in_features, level] for n, tb, level in transformer_blocks_by_level(unet)},
            "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
            "sample_size": c.sample_size, "in_channels": c.in_channels}


class _UNetShape:  # the fields of a UNet config the control encoders read
    def __init__(self, layout: dict):
        self.block_out_channels, self.layers_per_block = tuple(layout["block_out_channels"]), layout["layers_per_block"]
        self.sample_size = layout["sample_size"]


class SuTILayers(ModelMixin, ConfigMixin):
    """Neighbour attention at the chosen UNet levels, plus the control encoders: SuTI's own weights."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, unet_layout: dict, neighbour_levels: tuple = (1, 2), neighbour_heads: int = 4,
                 neighbour_positions: bool = True, neighbour_cosine: bool = False, max_demos: int = 5,
                 controls: tuple = (), image_size: int = 0, name: str = "suti"):
        super().__init__()
        channels = unet_layout["block_out_channels"]
        self.neighbours = nn.ModuleDict({
            key: NeighbourAttention(query_dim, channels[level], neighbour_heads, level, neighbour_positions,
                                    neighbour_cosine)
            for key, (query_dim, level) in unet_layout["blocks"].items() if level in neighbour_levels})
        missing = set(neighbour_levels) - {m.level for m in self.neighbours.values()}
        if missing:
            raise ValueError(f"neighbour_levels {sorted(missing)} have no cross-attention block in this UNet")
        self.control_encoders = ControlEncoders(tuple(controls), _UNetShape(unet_layout),
                                                image_size or unet_layout["sample_size"])

    @classmethod
    def for_unet(cls, unet: UNet2DConditionModel, **kwargs) -> "SuTILayers":
        """Fresh SuTI layers shaped for ``unet`` (an exact no-op until trained)."""
        return cls(unet_layout=unet_layout(unet), **kwargs)

    @property
    def levels(self) -> list[int]:
        return sorted({m.level for m in self.neighbours.values()})

    # ---- attaching to a UNet ---------------------------------------------------------------
    def check_unet(self, unet: UNet2DConditionModel) -> None:
        theirs, ours = unet_layout(unet), self.config.unet_layout
        diff = [k for k in ours if json.dumps(ours[k]) != json.dumps(theirs[k])]
        if diff:
            raise ValueError(f"these SuTI layers were made for another UNet shape (differs in {', '.join(diff)})")

    def attach(self, unet: UNet2DConditionModel) -> None:
        """Install ``SuTIAttnProcessor`` on every attention layer of ``unet`` (each keeps its current
        processor as its base); the cross-attentions at ``levels`` get their neighbour attention."""
        self.check_unet(unet)
        blocks = {f"{n}.attn2.processor": _key(n) for n, _, _ in transformer_blocks_by_level(unet)}
        procs = {}
        for name, proc in unet.attn_processors.items():
            base = proc.base if isinstance(proc, SuTIAttnProcessor) else proc
            key = blocks.get(name)
            procs[name] = SuTIAttnProcessor(key or name, self.neighbours[key] if key in self.neighbours else None, base)
        unet.set_attn_processor(procs)

    @staticmethod
    def detach(unet: UNet2DConditionModel) -> None:
        """Back to the UNet's base processors."""
        unet.set_attn_processor({n: p.base if isinstance(p, SuTIAttnProcessor) else p
                                 for n, p in unet.attn_processors.items()})

    # ---- demos -----------------------------------------------------------------------------
    def encode_demos(self, unet: UNet2DConditionModel, images: torch.Tensor, text: torch.Tensor,
                     valid: torch.Tensor | None = None) -> DemoFeatures:
        """images (B, K, C, H, W) clean model-space inputs; text (B, K, L, D) caption embeddings."""
        b, k = images.shape[:2]
        if k > self.config.max_demos:
            raise ValueError(f"{k} demonstrations given; this model takes at most {self.config.max_demos}")
        valid = torch.ones(b, k, dtype=torch.bool, device=images.device) if valid is None else valid.bool()
        levels = self.levels
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

    def neighbour_inputs(self, demos: DemoFeatures | None, dtype=None) -> dict | None:
        """Demo features -> ``cross_attention_kwargs["suti"]``: per neighbour layer the keys, values,
        key mask, the rows that have demos and the tokens per demo; None when no row has any.
        Step-independent: compute once per request (memoised on ``demos``)."""
        if demos is None:
            return None
        rows = demos.valid.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        out = {}
        for key, module in self.neighbours.items():
            tokens = demos.tokens[module.level]
            per_demo = tokens.shape[1] // demos.valid.shape[1]
            k, v = module.keys_values(tokens[rows].to(dtype or tokens.dtype), per_demo)
            mask = demos.key_mask(module.level)[rows]
            # no padding: no mask, so SDPA may take its fused kernels (a mask forces the generic one)
            out[key] = (k, v, None if bool(mask.all()) else mask, rows, per_demo)
        return out

    @staticmethod
    def tile_neighbour_inputs(inputs: dict | None, use_demos: list[bool], rows: int) -> dict | None:
        """Neighbour inputs of ``rows`` examples -> those of a guidance batch of ``len(use_demos)``
        branches, each the same ``rows`` examples, with no demos in the branches where ``use_demos``
        is False. Keys and values are reused, not recomputed."""
        branches = [j for j, d in enumerate(use_demos) if d]
        if inputs is None or not branches:
            return None
        n, out = len(branches), {}
        for key, (k, v, mask, have, per_demo) in inputs.items():
            tile = (lambda t: t) if n == 1 else (lambda t: t.repeat(n, *([1] * (t.dim() - 1))))
            out[key] = (tile(k), tile(v), None if mask is None else tile(mask),
                        torch.cat([have + j * rows for j in branches]), per_demo)
        return out

    def encode_controls(self, controls: Controls | None, dtype=torch.float32) -> tuple | None:
        """Controls -> (down residuals, mid residual), step-independent; None without any control."""
        return None if controls is None else self.control_encoders(controls, dtype)

    # ---- the adapter file ------------------------------------------------------------------
    def save_adapter(self, path: str, dtype=torch.float16) -> None:
        """These layers' weights alone as one safetensors file, their config in its metadata."""
        from safetensors.torch import save_file

        from ..utils.storage import staged

        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        meta = {"format": ADAPTER_FORMAT, "config": json.dumps(dict(self.config))}
        with staged(path) as local:
            save_file(tensors, local + ".tmp", metadata=meta)
            import os

            os.replace(local + ".tmp", local)

    @classmethod
    def from_adapter(cls, path: str) -> "SuTILayers":
        """An adapter file written by ``save_adapter`` (local or a URI); safetensors only."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from ..utils.storage import local_copy

        path = local_copy(path)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path} is not a SuTI adapter file (metadata format {meta.get('format')!r})")
        config = {k: v for k, v in json.loads(meta["config"]).items() if not k.startswith("_")}
        layers = cls(**config)
        state = load_file(path)
        layers.load_state_dict({k: v.float() for k, v in state.items()})
        return layers
