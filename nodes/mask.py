"""Mask nodes (ComfyUI's ImageToMask, MaskToImage, InvertMask, GrowMask, FeatherMask, SolidMask,
ThresholdMask).

A MASK is a float tensor [B,H,W] in 0..1. Some nodes hand on a bare [H,W] mask, so every node
here first goes through `batch_mask`. It and the other mask and batch shaping helpers
(`mask_planes`, `fit_mask`, `repeat_to_batch`) live in resize.py, which imports no node module,
so every node module can share them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plinth.nodes.context import NodeContext, NodeInputError
from plinth.nodes.resize import batch_mask
from plinth.nodes.schema import Boolean, Choice, Float, Int, Link, Node, Output

CHANNELS = ("red", "green", "blue", "alpha")


def grow(mask: torch.Tensor, expand: int, tapered_corners: bool) -> torch.Tensor:
    """Dilate (expand > 0) or erode (expand < 0) a [B,H,W] mask by |expand| pixels.

    As ComfyUI's GrowMask: |expand| steps of a 3x3 grey dilation/erosion, with a cross-shaped
    kernel when tapered_corners (the grown shape has diamond corners) and a full square
    otherwise. Pixels outside the image take no part, so erosion does not eat in from the
    border. The square case is one separable max filter of the whole radius; the cross case
    repeats the 3x3 step, which is what makes its corners tapered.
    """
    steps = abs(expand)
    if steps == 0:
        return mask.clone()
    sign = 1.0 if expand > 0 else -1.0
    planes = mask.unsqueeze(1) * sign
    height, width = mask.shape[-2:]

    def max_filter(x: torch.Tensor, radius_y: int, radius_x: int) -> torch.Tensor:
        if radius_x:
            x = F.max_pool2d(x, (1, 2 * radius_x + 1), stride=1, padding=(0, radius_x))
        if radius_y:
            x = F.max_pool2d(x, (2 * radius_y + 1, 1), stride=1, padding=(radius_y, 0))
        return x

    if tapered_corners:
        for _ in range(min(steps, height + width)):
            planes = torch.maximum(max_filter(planes, 0, 1), max_filter(planes, 1, 0))
    else:
        planes = max_filter(planes, min(steps, height), min(steps, width))
    return planes.squeeze(1) * sign


def feather(mask: torch.Tensor, left: int, top: int, right: int, bottom: int) -> torch.Tensor:
    """Fade a [B,H,W] mask linearly to the chosen edges: the pixel row or column at distance d
    from an edge with feather width n is multiplied by (d + 1) / n, for d < n.

    This is what ComfyUI's FeatherMask means; its loop for the right and bottom edges starts at
    index -0, which scales the first column/row instead of the last one. Here every edge gets
    the same ramp.
    """
    height, width = mask.shape[-2:]

    def ramp(size: int, start: int, end: int) -> torch.Tensor:
        index = torch.arange(size, dtype=torch.float32, device=mask.device)
        factor = torch.ones(size, device=mask.device)
        if start:
            factor = factor * torch.where(index < start, (index + 1) / start, 1.0)
        if end:
            from_end = size - 1 - index
            factor = factor * torch.where(from_end < end, (from_end + 1) / end, 1.0)
        return factor

    columns = ramp(width, min(left, width), min(right, width))
    rows = ramp(height, min(top, height), min(bottom, height))
    return mask * rows[:, None] * columns[None, :]


class ImageToMask(Node):
    """Take one channel of an image as a mask."""

    CATEGORY = "mask"
    DISPLAY_NAME = "Convert Image to Mask"
    OUTPUTS = (Output("MASK"),)

    image = Link("IMAGE")
    channel = Choice(options=CHANNELS, default="red")

    def run(self, ctx: NodeContext, image: torch.Tensor, channel: str) -> tuple[torch.Tensor]:
        index = CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise NodeInputError(f"the image has {image.shape[-1]} channels, so no {channel} channel")
        return (image[..., index].float().clone(),)


class MaskToImage(Node):
    """Show a mask as a grey RGB image (white where the mask is 1)."""

    CATEGORY = "mask"
    DISPLAY_NAME = "Convert Mask to Image"
    OUTPUTS = (Output("IMAGE"),)

    mask = Link("MASK")

    def run(self, ctx: NodeContext, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (batch_mask(mask).unsqueeze(-1).repeat(1, 1, 1, 3),)


class InvertMask(Node):
    """1 - mask: swap what is selected and what is not."""

    CATEGORY = "mask"
    DISPLAY_NAME = "Invert Mask"
    OUTPUTS = (Output("MASK"),)

    mask = Link("MASK")

    def run(self, ctx: NodeContext, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - batch_mask(mask),)


class GrowMask(Node):
    """Grow (positive expand) or shrink (negative) a mask by whole pixels."""

    CATEGORY = "mask"
    DISPLAY_NAME = "Grow Mask"
    OUTPUTS = (Output("MASK"),)

    mask = Link("MASK")
    expand = Int(default=0, min=-16384, max=16384)
    tapered_corners = Boolean(default=True)

    def run(self, ctx: NodeContext, mask: torch.Tensor, expand: int,
            tapered_corners: bool) -> tuple[torch.Tensor]:
        return (grow(batch_mask(mask), expand, tapered_corners),)


class FeatherMask(Node):
    """Fade a mask to 0 over the given number of pixels at each edge of the image."""

    CATEGORY = "mask"
    DISPLAY_NAME = "Feather Mask"
    OUTPUTS = (Output("MASK"),)

    mask = Link("MASK")
    left = Int(default=0, min=0, max=16384)
    top = Int(default=0, min=0, max=16384)
    right = Int(default=0, min=0, max=16384)
    bottom = Int(default=0, min=0, max=16384)

    def run(self, ctx: NodeContext, mask: torch.Tensor, left: int, top: int, right: int,
            bottom: int) -> tuple[torch.Tensor]:
        return (feather(batch_mask(mask), left, top, right, bottom),)


class SolidMask(Node):
    """A mask of one value everywhere."""

    CATEGORY = "mask"
    DISPLAY_NAME = "Solid Mask"
    OUTPUTS = (Output("MASK"),)

    value = Float(default=1.0, min=0.0, max=1.0, step=0.01)
    width = Int(default=512, min=1, max=16384, limit="width")
    height = Int(default=512, min=1, max=16384, limit="height")

    def run(self, ctx: NodeContext, value: float, width: int, height: int) -> tuple[torch.Tensor]:
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class ThresholdMask(Node):
    """1 where the mask is above the value, 0 elsewhere."""

    CATEGORY = "mask"
    DISPLAY_NAME = "Threshold Mask"
    OUTPUTS = (Output("MASK"),)

    mask = Link("MASK")
    value = Float(default=0.5, min=0.0, max=1.0, step=0.01)

    def run(self, ctx: NodeContext, mask: torch.Tensor, value: float) -> tuple[torch.Tensor]:
        return ((batch_mask(mask) > value).float(),)
