"""ColorTransfer: match an image's colour and tone to a reference, without any model.

Used to harmonise a pasted product with a generated background, or to bring a batch of
packshots to one look. Not a ComfyUI core node; the class_type is Plinth's own.
Reinhard et al.'s transfer: shift and scale each channel so its mean and standard deviation
become the reference's, in CIE Lab (decorrelated, perceptual channels) or plain RGB.
"""

from __future__ import annotations

import torch

from plinth.nodes.core.context import NodeContext, NodeInputError
from plinth.nodes.core.schema import Choice, Float, Link, Node, Output
from plinth.nodes.resize import fit_mask

# sRGB (D65) to CIE XYZ, and the D65 white point.
RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
WHITE = (0.95047, 1.0, 1.08883)
DELTA = 6.0 / 29.0
# Smallest standard deviation divided by, in the units of the working space (RGB 0..1, and Lab
# divided by 100), so a flat image is moved onto the reference mean instead of blown up.
MIN_STD = 1e-3


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in 0..1 [...,3] to CIE Lab (D65), scaled by 1/100 so L runs 0..1."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp_min(0) + 0.055) / 1.055) ** 2.4)
    xyz = linear @ rgb.new_tensor(RGB_TO_XYZ).t() / rgb.new_tensor(WHITE)
    f = torch.where(xyz > DELTA**3, xyz.clamp_min(DELTA**3) ** (1.0 / 3.0), xyz / (3 * DELTA**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([1.16 * fy - 0.16, 5.0 * (fx - fy), 2.0 * (fy - fz)], dim=-1)


def lab_to_srgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of srgb_to_lab; values outside the sRGB gamut are not clipped here."""
    light, a, b = lab.unbind(-1)
    fy = (light + 0.16) / 1.16
    f = torch.stack([fy + a / 5.0, fy, fy - b / 2.0], dim=-1)
    xyz = torch.where(f > DELTA, f**3, 3 * DELTA**2 * (f - 4.0 / 29.0)) * lab.new_tensor(WHITE)
    linear = xyz @ torch.linalg.inv(lab.new_tensor(RGB_TO_XYZ)).t()
    return torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055)


def channel_stats(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and standard deviation per channel over every dimension but the last
    (the weights must not all be 0)."""
    flat = values.reshape(-1, values.shape[-1])
    w = weights.reshape(-1, 1)
    total = w.sum()
    mean = (flat * w).sum(0) / total
    std = (((flat - mean) ** 2 * w).sum(0) / total).sqrt()
    return mean, std


def transfer_colors(
    image: torch.Tensor,
    reference: torch.Tensor,
    strength: float,
    method: str,
    mask: torch.Tensor | None = None,
    reference_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`image` [B,H,W,C] with the colour statistics of `reference` [b,h,w,C].

    Each image entry is measured on its own (inside `mask`, where given); the reference's
    statistics are pooled over its whole batch (inside `reference_mask`). The change is applied
    in proportion to strength x mask, so strength 0 or mask 0 leave pixels exactly as they were.
    Channels beyond RGB (alpha) pass through unchanged.
    """
    to_space, from_space = (srgb_to_lab, lab_to_srgb) if method == "lab" else (lambda t: t, lambda t: t)
    batch, height, width = image.shape[:3]
    rgb = image[..., :3].float()
    ref = to_space(reference[..., :3].float().to(rgb.device))
    ref_weights = (
        torch.ones(ref.shape[:3], device=ref.device)
        if reference_mask is None
        else fit_mask(reference_mask.to(ref.device), ref.shape[0], ref.shape[1], ref.shape[2])
    )
    if ref_weights.sum() <= 0:
        raise NodeInputError("reference_mask selects no pixels of the reference to measure")
    ref_mean, ref_std = channel_stats(ref, ref_weights)
    weights = (
        torch.ones((batch, height, width), device=rgb.device)
        if mask is None
        else fit_mask(mask.to(rgb.device), batch, height, width)
    )
    moved = []
    for entry, entry_weights in zip(to_space(rgb), weights, strict=False):
        if entry_weights.sum() <= 0:  # nothing to measure, and nothing will be changed
            moved.append(entry)
            continue
        mean, std = channel_stats(entry, entry_weights)
        moved.append((entry - mean) * (ref_std / std.clamp_min(MIN_STD)) + ref_mean)
    result = from_space(torch.stack(moved)).clamp(0.0, 1.0)
    amount = (strength * weights).unsqueeze(-1)
    out = image.clone()
    out[..., :3] = (rgb + (result - rgb) * amount).to(image.dtype)
    return out


class ColorTransfer(Node):
    """Match an image's colours and tones to a reference image (Reinhard mean/std transfer in
    Lab or RGB); an optional mask limits where the image is measured and changed, an optional
    reference_mask where the reference is measured."""

    ORIGIN = "Plinth"
    CATEGORY = "image/color"
    DISPLAY_NAME = "Color Transfer"
    OUTPUTS = (Output("IMAGE"),)

    image = Link("IMAGE")
    reference = Link("IMAGE")
    strength = Float(default=1.0, min=0.0, max=1.0, step=0.01)
    method = Choice(options=("lab", "rgb"), default="lab")
    mask = Link("MASK", optional=True)
    reference_mask = Link("MASK", optional=True)

    def run(
        self,
        ctx: NodeContext,
        image: torch.Tensor,
        reference: torch.Tensor,
        strength: float,
        method: str,
        mask: torch.Tensor | None = None,
        reference_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        return (transfer_colors(image, reference, strength, method, mask, reference_mask),)
