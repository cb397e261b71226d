"""Mask nodes (ComfyUI's ImageToMask, MaskToImage, InvertMask, GrowMask, FeatherMask, SolidMask,
ThresholdMask).

A MASK is a float tensor [B,H,W] in 0..1. Some nodes hand on a bare [H,W] mask, so every node
here first goes through `batch_mask`. It and the other mask and batch shaping helpers
(`mask_planes`, `fit_mask`, `repeat_to_batch`) live in resize.py, which imports no node module,
so every node module can share them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from plinth.nodes.core.context import NodeContext, NodeInputError
from plinth.nodes.core.schema import Boolean, Choice, Float, Int, Link, Node, Output
from plinth.nodes.resize import batch_mask

CHANNELS = ("red", "green", "blue", "alpha")


def grow(
    mask: torch.Tensor, expand: int, tapered_corners: bool, check_cancelled: Callable[[], None] | None = None
) -> torch.Tensor:
    """Dilate (expand > 0) or erode (expand < 0) a [B,H,W] mask by |expand| pixels.

    The result is ComfyUI's GrowMask: |expand| steps of a 3x3 grey dilation/erosion, with a
    cross-shaped kernel when tapered_corners (the grown shape has diamond corners) and a full
    square otherwise; pixels outside the image take no part, so erosion does not eat in from
    the border. It is computed without the steps where the result is the same:

    - a binary mask (only 0 and 1) in one pass of a distance transform: a pixel is selected
      after growing when its city-block (tapered) or chessboard (square) distance to the
      nearest selected pixel is at most |expand|, and after shrinking when its distance to the
      nearest unselected one is more than |expand|;
    - a soft mask with square corners by one separable max (min) filter of the whole radius;
    - a soft mask with tapered corners by repeating the 3x3 step, stopping as soon as a step
      changes nothing (at most height + width steps), with `check_cancelled` called before
      every step so a long run can be cancelled.
    """
    steps = abs(expand)
    if steps == 0:
        return mask.clone()
    out = torch.empty_like(mask, dtype=torch.float32)
    for index, plane in enumerate(mask):
        if bool(((plane == 0) | (plane == 1)).all()):
            out[index] = _grow_binary(plane, expand, tapered_corners)
        elif tapered_corners:
            out[index] = _grow_soft_tapered(plane, expand, check_cancelled)
        else:
            out[index] = _grow_soft_square(plane, expand)
    return out


def _grow_binary(plane: torch.Tensor, expand: int, tapered_corners: bool) -> torch.Tensor:
    metric = "taxicab" if tapered_corners else "chessboard"
    selected = plane.detach().cpu().numpy() > 0.5
    if expand > 0:
        if not selected.any():
            return torch.zeros_like(plane, dtype=torch.float32)
        # distance of every pixel to the nearest selected one (0 on the selected ones)
        grown = ndimage.distance_transform_cdt(~selected, metric=metric) <= expand
    else:
        if selected.all():
            return torch.ones_like(plane, dtype=torch.float32)
        # distance of every selected pixel to the nearest unselected one (0 on those)
        grown = ndimage.distance_transform_cdt(selected, metric=metric) > -expand
    return torch.from_numpy(grown.astype(np.float32)).to(plane.device)


def _grow_soft_square(plane: torch.Tensor, expand: int) -> torch.Tensor:
    # 'nearest' padding repeats a border pixel that is inside the window anyway, so outside
    # pixels take no part; these filters cost the same at any radius.
    values = plane.detach().float().cpu().numpy()
    height, width = values.shape
    filter1d = ndimage.maximum_filter1d if expand > 0 else ndimage.minimum_filter1d
    steps = abs(expand)
    values = filter1d(values, 2 * min(steps, width) + 1, axis=1, mode="nearest")
    values = filter1d(values, 2 * min(steps, height) + 1, axis=0, mode="nearest")
    return torch.from_numpy(values).to(plane.device)


def _grow_soft_tapered(plane: torch.Tensor, expand: int, check_cancelled: Callable[[], None] | None) -> torch.Tensor:
    sign = 1.0 if expand > 0 else -1.0
    planes = plane.float()[None, None] * sign
    height, width = plane.shape

    def cross_max(x: torch.Tensor) -> torch.Tensor:
        rows = F.max_pool2d(x, (1, 3), stride=1, padding=(0, 1))
        columns = F.max_pool2d(x, (3, 1), stride=1, padding=(1, 0))
        return torch.maximum(rows, columns)

    for _ in range(min(abs(expand), height + width)):
        if check_cancelled is not None:
            check_cancelled()
        grown = cross_max(planes)
        if torch.equal(grown, planes):
            break
        planes = grown
    return planes[0, 0] * sign


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

    def run(self, ctx: NodeContext, mask: torch.Tensor, expand: int, tapered_corners: bool) -> tuple[torch.Tensor]:
        return (grow(batch_mask(mask), expand, tapered_corners, ctx.check_cancelled),)


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

    def run(
        self, ctx: NodeContext, mask: torch.Tensor, left: int, top: int, right: int, bottom: int
    ) -> tuple[torch.Tensor]:
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
