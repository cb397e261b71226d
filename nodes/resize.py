"""Resizing [B,C,H,W] tensors (latents, and images moved channel-first) by ComfyUI's method
names, with the optional centre crop to the target's aspect ratio."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def resize(samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """`samples` resized to height x width; methods nearest-exact, bilinear, area, bicubic,
    bislerp (spherical, for latents) and lanczos (for images in 0..1)."""
    if crop == "center":
        samples = crop_to_aspect(samples, width / height)
    if samples.shape[-2:] == (height, width):
        return samples
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        return lanczos(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=method)


def crop_to_aspect(samples: torch.Tensor, aspect: float) -> torch.Tensor:
    """The centred part of `samples` with width/height == aspect."""
    height, width = samples.shape[-2:]
    if width / height > aspect:
        keep = max(1, round(height * aspect))
        x = (width - keep) // 2
        return samples[..., :, x:x + keep]
    keep = max(1, round(width / aspect))
    y = (height - keep) // 2
    return samples[..., y:y + keep, :]


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Lanczos from PIL (torch has none), channel by channel as 32-bit float images, which keeps
    full precision where an 8-bit round trip would quantise."""
    out = torch.empty(*samples.shape[:2], height, width, dtype=torch.float32)
    for b, planes in enumerate(samples.detach().float().cpu().numpy()):
        for c, plane in enumerate(planes):
            picture = Image.fromarray(plane).resize((width, height), Image.Resampling.LANCZOS)
            out[b, c] = torch.from_numpy(np.array(picture))
    return out.to(samples.device)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resize that interpolates each cell's channel vector spherically (direction by
    slerp, length linearly), which keeps latent statistics better than plain bilinear."""
    return _slerp_axis(_slerp_axis(samples.float(), width, dim=3), height, dim=2).to(samples.dtype)


def _slerp_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    old = x.shape[dim]
    pos = (torch.arange(size, dtype=torch.float32, device=x.device) + 0.5) * old / size - 0.5
    pos = pos.clamp(0, old - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=old - 1)
    t = (pos - lo).view(*([1] * dim), size, *([1] * (x.dim() - dim - 1)))
    a, b = x.index_select(dim, lo), x.index_select(dim, hi)
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-8), b / nb.clamp_min(1e-8)
    omega = (ua * ub).sum(dim=1, keepdim=True).clamp(-1, 1).acos()
    so = omega.sin()
    straight = so.abs() < 1e-4
    wa = torch.where(straight, 1 - t, ((1 - t) * omega).sin() / so.where(~straight, torch.ones_like(so)))
    wb = torch.where(straight, t, (t * omega).sin() / so.where(~straight, torch.ones_like(so)))
    direction = wa * ua + wb * ub
    return direction * (na * (1 - t) + nb * t)
