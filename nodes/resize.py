"""Resizing, centre-cropping and batch shaping of tensors: the one place for them.

`resize` works on [B,C,H,W] tensors (latents, and images moved channel-first) by ComfyUI's
method names, with the optional centre crop to the target's aspect ratio; `resize_image` is the
same for IMAGE [B,H,W,C]. The mask helpers turn a MASK into [B,H,W] or [B,1,H,W] planes,
resized and repeated to a batch. `crop_to_multiple_with_mask` crops pixels and their mask to
the VAE's multiple with the same offsets, and `require_vae_size` refuses images too small for
it. This module imports no other node module, so every node module can import from it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from plinth.nodes.core.context import NodeInputError


def resize(
    samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled", antialias: bool = False
) -> torch.Tensor:
    """`samples` resized to height x width; methods nearest-exact, bilinear, area, bicubic,
    bislerp (spherical, for latents) and lanczos (for images in 0..1). Nothing is clamped.

    A no-op when the size already matches, so samples that need no resizing keep their exact
    values. crop "center" first cuts the middle to the target's aspect ratio (`crop_to_aspect`).
    antialias (bilinear, bicubic) low-pass filters when shrinking, so shrinking a large photo
    does not alias; it is computed in float32 (antialiasing has no half-precision CPU kernel)
    and returned in the samples' own dtype.
    """
    if crop == "center":
        samples = crop_to_aspect(samples, width / height)
    if samples.shape[-2:] == (height, width):
        return samples
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        return lanczos(samples, width, height)
    if antialias:
        resized = F.interpolate(samples.float(), size=(height, width), mode=method, align_corners=False, antialias=True)
        return resized.to(samples.dtype)
    return F.interpolate(samples, size=(height, width), mode=method)


def resize_image(
    image: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled", antialias: bool = False
) -> torch.Tensor:
    """IMAGE [B,H,W,C] resized to width x height as `resize` does it, with bicubic and lanczos
    results clamped to 0..1, because their kernels overshoot near edges."""
    resized = resize(image.movedim(-1, 1), width, height, method, crop, antialias=antialias)
    if method in ("bicubic", "lanczos"):
        resized = resized.clamp(0, 1)
    return resized.movedim(1, -1)


def center_crop(samples: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The height x width middle of `samples` [...,H,W]; where the excess is odd, the extra row
    or column comes off the bottom or right."""
    top, left = (samples.shape[-2] - height) // 2, (samples.shape[-1] - width) // 2
    return samples[..., top : top + height, left : left + width]


def require_vae_size(pixels: torch.Tensor, multiple: int) -> None:
    """Raise NodeInputError when IMAGE pixels [B,H,W,C] are smaller than `multiple` (the VAE's
    scale, 8 for SD) on a side: the VAE nodes crop to multiples of it, which would leave nothing
    to encode."""
    height, width = pixels.shape[1:3]
    if height < multiple or width < multiple:
        raise NodeInputError(
            f"the image is {width}x{height} pixels; the VAE needs at least {multiple}x{multiple} "
            f"(it encodes {multiple}x{multiple}-pixel cells)"
        )


def crop_to_multiple_with_mask(
    pixels: torch.Tensor, mask: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE pixels [B,H,W,C] and a mask [B,1,H,W] of the same H and W, both centre-cropped to
    sides divisible by `multiple` with the same offsets ((size % multiple) // 2 off the top and
    left, as the VAE nodes and ComfyUI crop), so every mask value stays on its pixel."""
    if mask.shape[-2:] != pixels.shape[1:3]:
        raise NodeInputError(
            f"mask of {mask.shape[-1]}x{mask.shape[-2]} pixels for an image of "
            f"{pixels.shape[2]}x{pixels.shape[1]}; resize it to the image first"
        )
    height, width = pixels.shape[1] // multiple * multiple, pixels.shape[2] // multiple * multiple
    return center_crop(pixels.movedim(-1, 1), height, width).movedim(1, -1), center_crop(mask, height, width)


def crop_to_aspect(samples: torch.Tensor, aspect: float) -> torch.Tensor:
    """The centred part of `samples` [...,H,W] with width/height == aspect as near as whole
    pixels allow: the same rounded number of pixels off both ends (ComfyUI's rule, for images and
    latents alike), keeping at least one pixel."""
    height, width = samples.shape[-2:]
    x = min(round((width - height * aspect) / 2), (width - 1) // 2) if width / height > aspect else 0
    y = min(round((height - width / aspect) / 2), (height - 1) // 2) if width / height < aspect else 0
    return samples[..., y : height - y, x : width - x]


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


def repeat_to_batch(values: torch.Tensor, batch: int) -> torch.Tensor:
    """The first `batch` entries of `values` repeated cyclically along dim 0 (ComfyUI pairs
    batches of different sizes this way: a single mask or image serves every entry)."""
    if values.shape[0] == batch:
        return values
    return values[torch.arange(batch, device=values.device) % values.shape[0]]


def batch_mask(mask: torch.Tensor) -> torch.Tensor:
    """A MASK as float [B,H,W], accepting the [H,W] and [B,1,H,W] shapes some nodes produce."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    elif mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask.squeeze(1)
    if mask.dim() != 3:
        raise NodeInputError(f"a MASK must be [B,H,W] or [H,W], got shape {tuple(mask.shape)}")
    return mask.float()


def mask_planes(
    mask: torch.Tensor,
    height: int | None = None,
    width: int | None = None,
    batch: int | None = None,
    antialias: bool = False,
) -> torch.Tensor:
    """A MASK as float [B,1,H,W] planes (the latents' layout); given a size, bilinearly resized
    to height x width (see `resize` for antialias); given a batch, repeated to that many entries."""
    planes = batch_mask(mask).unsqueeze(1)
    if height is not None and width is not None:
        planes = resize(planes, width, height, "bilinear", antialias=antialias)
    if batch is not None:
        planes = repeat_to_batch(planes, batch)
    return planes


def fit_mask(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """A MASK stretched to height x width (antialiased bilinear) and repeated to `batch` entries,
    as [batch,H,W]."""
    return mask_planes(mask, height, width, batch, antialias=True).squeeze(1)
