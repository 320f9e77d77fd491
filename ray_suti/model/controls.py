"""Spatial controls beyond text and demos: where and how large (a box), which way the subject faces
(keypoints) and its outline (an edge map).

Each control is rasterised to maps at the model's image size (``rasterize``) and read by its own
light encoder (``ControlEncoder``, T2I-Adapter style: a pixel-unshuffle for latent models, then a
few strided convolutions, one feature map per UNet level). The features enter the UNet where
ControlNet's do, added to the skip connections (diffusers' ``down_block_additional_residuals`` and
``mid_block_additional_residual``), each through a zero-initialised 1x1 convolution: a fresh
encoder changes nothing, the gradient of those convolutions is non-zero from the first step, and a
request without controls runs exactly the model without them. Controls do not depend on the noise
step, so they are encoded once per request (like demo features) and reused by every step and
guidance branch. Any subset of controls per request, per row of a batch (``present`` masks).

Coordinates are fractions of the image, x right and y down, in [0, 1]:
    box        (x0, y0, x1, y1) of the subject, x0 < x1, y0 < y1
    keypoints  ((x, y) of the subject's top, (x, y) of its right-hand side), in the subject's own
               frame (they turn and mirror with it; the world's ``landmarks``)
    edges      a (H, W) map in [0, 1], 1 on the subject's outline
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .inputs import SuTIInputError, load_image

CONTROL_CHANNELS = {"box": 1, "keypoints": 2, "edges": 1}
KEYPOINT_NAMES = ("top", "side")


@dataclass
class Controls:
    """Rasterised controls of a batch: ``maps[name]`` (B, C, H, W) and ``present[name]`` (B,) bool."""

    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    present: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [n for n in self.maps if bool(self.present[n].any())]

    def repeat(self, n: int) -> "Controls":
        return Controls({k: v.repeat_interleave(n, 0) for k, v in self.maps.items()},
                        {k: v.repeat_interleave(n, 0) for k, v in self.present.items()})

    def tile(self, n: int) -> "Controls":
        """The whole batch n times over (one copy per guidance branch)."""
        return Controls({k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in self.maps.items()},
                        {k: v.repeat(n) for k, v in self.present.items()})

    def to_batch(self) -> dict[str, torch.Tensor]:
        """Flat tensors, so training batches can be concatenated, sliced and moved as dicts."""
        return {**{f"control_map_{n}": m for n, m in self.maps.items()},
                **{f"control_present_{n}": p for n, p in self.present.items()}}

    @staticmethod
    def from_batch(batch: dict) -> "Controls | None":
        names = [k[len("control_map_"):] for k in batch if k.startswith("control_map_")]
        if not names:
            return None
        return Controls({n: batch[f"control_map_{n}"] for n in names},
                        {n: batch[f"control_present_{n}"].bool() for n in names})


def box_map(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """boxes (B, 4) -> (B, 1, size, size): 1 where a pixel's centre lies in the box."""
    c = (torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5) / size
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    inside_x = (c[None] >= x0) & (c[None] <= x1)  # (B, W)
    inside_y = (c[None] >= y0) & (c[None] <= y1)  # (B, H)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]


def keypoint_maps(points: torch.Tensor, size: int, sigma_frac: float = 0.05) -> torch.Tensor:
    """points (B, P, 2) -> (B, P, size, size) Gaussian heat maps, one channel per named point."""
    c = (torch.arange(size, device=points.device, dtype=torch.float32) + 0.5) / size
    dx = c[None, None, None, :] - points[..., 0, None, None]  # (B, P, 1, W)
    dy = c[None, None, :, None] - points[..., 1, None, None]  # (B, P, H, 1)
    return torch.exp(-(dx**2 + dy**2) / (2 * sigma_frac**2))


def rasterize(size: int, box=None, keypoints=None, edges=None, device=None) -> dict[str, torch.Tensor]:
    """One request's controls (any subset; None = absent) -> {name: (C, size, size)} maps."""
    maps = {}
    if box is not None:
        maps["box"] = box_map(torch.as_tensor(box, dtype=torch.float32, device=device)[None], size)[0]
    if keypoints is not None:
        maps["keypoints"] = keypoint_maps(torch.as_tensor(keypoints, dtype=torch.float32, device=device)[None], size)[0]
    if edges is not None:
        e = torch.as_tensor(edges, dtype=torch.float32, device=device)
        if e.shape != (size, size):  # area-average to the model's size, keep lines visible
            e = F.adaptive_max_pool2d(e[None, None], size)[0, 0] if min(e.shape) >= size else \
                F.interpolate(e[None, None], size=(size, size), mode="nearest")[0, 0]
        maps["edges"] = e.clamp(0, 1)[None]
    return maps


def batch_controls(rows: list[dict[str, torch.Tensor]], size: int, device=None, names: tuple = ()) -> Controls | None:
    """Per-row control maps (from ``rasterize``) -> a batch's Controls, zeros where absent; None if
    no row has any control (and no ``names`` are asked for: those are always present in the result)."""
    names = [n for n in CONTROL_CHANNELS if n in names or any(n in r for r in rows)]
    if not names:
        return None
    out = Controls()
    for n in names:
        out.maps[n] = torch.stack([r.get(n, torch.zeros(CONTROL_CHANNELS[n], size, size, device=device))
                                   .to(device) for r in rows])
        out.present[n] = torch.tensor([n in r for r in rows], device=device)
    return out


def residual_layout(unet_config) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """[(channels, level)] of each skip connection of a UNet2DConditionModel, and the mid block's."""
    channels, n = unet_config.block_out_channels, len(unet_config.block_out_channels)
    out = [(channels[0], 0)]  # conv_in
    for i, c in enumerate(channels):
        out += [(c, i)] * unet_config.layers_per_block
        if i < n - 1:
            out.append((c, i + 1))  # the downsampler's output is at the next level's size
    return out, (channels[-1], n - 1)


class ControlEncoder(nn.Module):
    """One control's maps (B, C_in, H, W) -> residuals for every skip connection and the mid block."""

    def __init__(self, in_channels: int, unet_config, image_size: int):
        super().__init__()
        layout, mid = residual_layout(unet_config)
        n = len(unet_config.block_out_channels)
        widths = [max(16, c // 4) for c in unet_config.block_out_channels]  # light: a quarter of the UNet
        factor = image_size // unet_config.sample_size  # 8 for latent models, 1 in pixel space
        self.unshuffle = nn.PixelUnshuffle(factor) if factor > 1 else nn.Identity()
        self.stem = nn.Sequential(nn.Conv2d(in_channels * factor**2, widths[0], 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.SiLU())
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i - 1], widths[i], 3, stride=2, padding=1), nn.SiLU(),
                          nn.Conv2d(widths[i], widths[i], 3, padding=1), nn.SiLU()) for i in range(1, n))
        self.levels = [level for _, level in layout] + [mid[1]]
        self.outs = nn.ModuleList(nn.Conv2d(widths[level], c, 1) for c, level in layout + [mid])
        for conv in self.outs:  # exact no-op at init; the gradient of each is not zero
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, maps: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(self.unshuffle(maps))]  # level 0: (B, w0, h, w)
        for down in self.downs:
            feats.append(down(feats[-1]))  # level i: (B, w_i, h / 2^i, w / 2^i)
        return [out(feats[level]) for out, level in zip(self.outs, self.levels)]


class ControlEncoders(nn.Module):
    """The encoders of the controls a model was built with; sums what a batch provides."""

    def __init__(self, names: tuple, unet_config, image_size: int):
        super().__init__()
        unknown = set(names) - set(CONTROL_CHANNELS)
        if unknown:
            raise ValueError(f"unknown controls {sorted(unknown)}; choose from {list(CONTROL_CHANNELS)}")
        self.encoders = nn.ModuleDict({n: ControlEncoder(CONTROL_CHANNELS[n], unet_config, image_size) for n in names})

    def forward(self, controls: Controls, dtype) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """-> (down residuals, mid residual) for ``unet(down_block_additional_residuals=...,
        mid_block_additional_residual=...)``, or None when no row of the batch has a control."""
        total = None
        for name in controls.names:
            if name not in self.encoders:
                raise ValueError(f"this model has no {name!r} control (it has: {list(self.encoders) or 'none'})")
            gate = controls.present[name].to(dtype)[:, None, None, None]  # absent rows add exactly 0
            outs = [r * gate for r in self.encoders[name](controls.maps[name].to(dtype))]
            total = outs if total is None else [t + o for t, o in zip(total, outs)]
        return None if total is None else (total[:-1], total[-1])


def per_prompt(name: str, value) -> bool:
    """A list of per-prompt values, or one value for every prompt?"""
    if name == "edges":
        return isinstance(value, (list, tuple))
    depth, v = 0, value
    while isinstance(v, (list, tuple, np.ndarray, torch.Tensor)) and len(v):
        v = next((x for x in v if x is not None), None) if depth == 0 else v[0]
        depth += 1
    return depth > {"box": 1, "keypoints": 2}[name]


def check_control(name: str, value):
    """One control value -> checked numbers or a [0, 1] map; SuTIInputError with the reason."""
    if name == "edges":
        if isinstance(value, (np.ndarray, torch.Tensor)) and np.ndim(value) == 2:
            arr = np.asarray(value, dtype=np.float32)
        else:
            arr = np.asarray(load_image(value).convert("L"), dtype=np.float32) / 255.0
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise SuTIInputError("edges must be an image or an (H, W) array with values in [0, 1]")
        return arr
    want = {"box": (4,), "keypoints": (len(KEYPOINT_NAMES), 2)}[name]
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != want or not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        what = "x0, y0, x1, y1" if name == "box" else "[[x, y] of the top], [[x, y] of the right-hand side]"
        raise SuTIInputError(f"{name} must be {what} as fractions of the image in [0, 1], got {value!r}")
    if name == "box" and not (arr[0] < arr[2] and arr[1] < arr[3]):
        raise SuTIInputError(f"box needs x0 < x1 and y0 < y1, got {value!r}")
    return arr
