"""Image nodes with ComfyUI's names and meaning: LoadImageMask, ImageCompositeMasked, ImageCrop,
ImageInvert, ImageBatch, ImagePadForOutpaint and Canny.

These are the pixel operations of the product pipeline: pad a packshot to an ad format, paste
the original product pixels back over a generated background, edge maps for ControlNet.
IMAGE is [B,H,W,C] in 0..1 throughout.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.schema import Boolean, Choice, Float, Int, Link, Node, Output
from plinth.nodes.io import decode_image
from plinth.nodes.resize import fit_mask, repeat_to_batch, resize_image

LIMIT = 16384
# Luma weights (ITU-R BT.601), the grey ComfyUI's Canny (through kornia) works on.
LUMA = (0.299, 0.587, 0.114)


def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """An IMAGE with `channels` channels: extra ones dropped, missing ones (alpha) filled with 1."""
    have = image.shape[-1]
    if have >= channels:
        return image[..., :channels]
    return torch.cat([image, image.new_ones((*image.shape[:-1], channels - have))], dim=-1)


def composite(
    destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`source` pasted onto a copy of `destination` with its top-left corner at (x, y).

    The mask (stretched to the source's size, as ComfyUI does) weighs source against
    destination: where it is 1 the result is exactly the source pixel, where 0 exactly the
    destination pixel. Whatever falls outside the destination is cut off.
    """
    out = destination.clone()
    batch, height, width, channels = out.shape
    source = repeat_to_batch(match_channels(source, channels).to(out), batch)
    src_h, src_w = source.shape[1:3]
    visible_h, visible_w = min(src_h, height - y), min(src_w, width - x)
    if visible_h <= 0 or visible_w <= 0:
        return out
    region = out[:, y : y + visible_h, x : x + visible_w]
    pasted = source[:, :visible_h, :visible_w]
    if mask is None:
        out[:, y : y + visible_h, x : x + visible_w] = pasted
        return out
    weight = fit_mask(mask.to(out.device), batch, src_h, src_w)[:, :visible_h, :visible_w, None]
    out[:, y : y + visible_h, x : x + visible_w] = pasted * weight + region * (1.0 - weight)
    return out


def outpaint_mask(
    height: int, width: int, left: int, top: int, right: int, bottom: int, feathering: int
) -> torch.Tensor:
    """The [H+top+bottom, W+left+right] inpainting mask of ImagePadForOutpaint: 1 on the new
    border, 0 on the original image except a band of `feathering` pixels along each padded side
    where it falls off as ((f - d) / f)^2 with d the distance into the image.

    As in ComfyUI, d counts from 0 on the top and left sides and from 1 on the bottom and right
    ones, and there is no band when the image is not larger than twice the feathering.
    """
    mask = torch.ones((height + top + bottom, width + left + right))
    inner = torch.zeros((height, width))
    if 0 < feathering and 2 * feathering < height and 2 * feathering < width:
        rows = torch.arange(height, dtype=torch.float32)[:, None]
        cols = torch.arange(width, dtype=torch.float32)[None, :]
        distance = torch.full((height, width), float(max(height, width)))
        for padded, d in ((top, rows), (bottom, height - rows), (left, cols), (right, width - cols)):
            if padded:
                distance = torch.minimum(distance, d.expand(height, width))
        inner = torch.where(distance < feathering, ((feathering - distance) / feathering) ** 2, 0.0)
    mask[top : top + height, left : left + width] = inner
    return mask


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """A normalised 1-D Gaussian of 2 * radius + 1 taps, applied along rows then columns."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def canny(image: torch.Tensor, low_threshold: float, high_threshold: float) -> torch.Tensor:
    """Canny edges of each IMAGE entry as a [B,H,W] tensor of 0 and 1.

    The steps and scale are those of ComfyUI's Canny (kornia's): BT.601 grey, 5x5 Gaussian with
    sigma 1, unnormalised Sobel gradients (so a full black-to-white step has a magnitude of
    about 2.6, and the 0.4/0.8 defaults pick up edges of moderate contrast), non-maximum
    suppression along the gradient quantised to 45 degrees, then hysteresis: a pixel above the
    low threshold is an edge when it is 8-connected to one above the high threshold.
    """
    rgb = match_channels(image.float(), 3)
    grey = (rgb * rgb.new_tensor(LUMA)).sum(-1, keepdim=True).movedim(-1, 1)
    gauss = gaussian_kernel(1.0, 2).to(grey)
    blurred = F.pad(grey, (2, 2, 2, 2), mode="replicate")
    blurred = F.conv2d(F.conv2d(blurred, gauss.view(1, 1, 1, 5)), gauss.view(1, 1, 5, 1))
    sobel = grey.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(blurred, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().contiguous().view(1, 1, 3, 3))
    magnitude = torch.sqrt(gx * gx + gy * gy)[:, 0]
    sector = torch.round(torch.atan2(gy, gx)[:, 0] / (math.pi / 4)).long() % 4
    # Neighbour offsets (dy, dx) along the gradient for sectors 0, 45, 90 and 135 degrees.
    height, width = magnitude.shape[-2:]
    ring = F.pad(magnitude, (1, 1, 1, 1))
    ahead = torch.zeros_like(magnitude)
    behind = torch.zeros_like(magnitude)
    for index, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        here = sector == index
        forward = ring[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        backward = ring[:, 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]
        ahead = torch.where(here, forward, ahead)
        behind = torch.where(here, backward, behind)
    # Strict on one side only, so a ridge two pixels wide keeps exactly one of them.
    thin = magnitude * ((magnitude > ahead) & (magnitude >= behind))
    weak = (thin > low_threshold).cpu().numpy()
    strong = (thin > high_threshold).cpu().numpy()
    edges = np.zeros_like(weak)
    for index, candidates in enumerate(weak):
        labels, _ = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
        seeds = np.unique(labels[strong[index]])
        edges[index] = np.isin(labels, seeds[seeds > 0])
    return torch.from_numpy(edges).to(image.device, torch.float32)


class LoadImageMask(Node):
    """Load one channel of an image sent with the request as a MASK; for alpha the mask is
    1 - alpha (1 where transparent), as ComfyUI does."""

    CATEGORY = "mask"
    DISPLAY_NAME = "Load Image (as Mask)"
    OUTPUTS = (Output("MASK"),)

    image = Choice(source="input_images", image_upload=True)
    channel = Choice(options=("alpha", "red", "green", "blue"), default="alpha")

    def run(self, ctx: NodeContext, image: str, channel: str) -> tuple[torch.Tensor]:
        pixels, transparency = decode_image(ctx.input_image(image), image)
        if channel == "alpha":
            return (transparency[:1],)
        return (pixels[:1, :, :, ("red", "green", "blue").index(channel)].clone(),)


class ImageCompositeMasked(Node):
    """Paste `source` onto `destination` at (x, y), through an optional mask: exact source
    pixels where the mask is 1, the destination where it is 0, a blend in between."""

    CATEGORY = "image"
    DISPLAY_NAME = "Image Composite Masked"
    OUTPUTS = (Output("IMAGE"),)

    destination = Link("IMAGE")
    source = Link("IMAGE")
    x = Int(default=0, min=0, max=LIMIT)
    y = Int(default=0, min=0, max=LIMIT)
    resize_source = Boolean(default=False)
    mask = Link("MASK", optional=True)

    def run(
        self,
        ctx: NodeContext,
        destination: torch.Tensor,
        source: torch.Tensor,
        x: int,
        y: int,
        resize_source: bool,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        if resize_source:
            source = resize_image(source, destination.shape[2], destination.shape[1], "bilinear", antialias=True)
        return (composite(destination, source, x, y, mask),)


class ImageCrop(Node):
    """Cut a width x height window out of an image, starting at (x, y); the window is clipped
    to the image, and a start outside it is moved onto its last row or column (ComfyUI)."""

    CATEGORY = "image/transform"
    DISPLAY_NAME = "Image Crop"
    OUTPUTS = (Output("IMAGE"),)

    image = Link("IMAGE")
    width = Int(default=512, min=1, max=LIMIT)
    height = Int(default=512, min=1, max=LIMIT)
    x = Int(default=0, min=0, max=LIMIT)
    y = Int(default=0, min=0, max=LIMIT)

    def run(
        self, ctx: NodeContext, image: torch.Tensor, width: int, height: int, x: int, y: int
    ) -> tuple[torch.Tensor]:
        x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
        return (image[:, y : y + height, x : x + width].clone(),)


class ImageInvert(Node):
    """1 - image: the photographic negative."""

    CATEGORY = "image"
    DISPLAY_NAME = "Invert Image"
    OUTPUTS = (Output("IMAGE"),)

    image = Link("IMAGE")

    def run(self, ctx: NodeContext, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - image,)


class ImageBatch(Node):
    """Join two images into one batch; the second is centre-cropped to the first's aspect ratio
    and resized to its size when they differ (ComfyUI's behaviour)."""

    CATEGORY = "image"
    DISPLAY_NAME = "Batch Images"
    OUTPUTS = (Output("IMAGE"),)

    image1 = Link("IMAGE")
    image2 = Link("IMAGE")

    def run(self, ctx: NodeContext, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
        image2 = match_channels(image2, image1.shape[-1]).to(image1)
        if image2.shape[1:3] != image1.shape[1:3]:
            # ComfyUI's "center" crop to image1's aspect ratio, then resized to its size
            image2 = resize_image(image2, image1.shape[2], image1.shape[1], "bilinear", "center", antialias=True)
        return (torch.cat([image1, image2], dim=0),)


class ImagePadForOutpaint(Node):
    """Extend an image on each side with mid grey (0.5) and return the mask to outpaint with:
    1 on the new area, feathered into the original along the padded sides."""

    CATEGORY = "image"
    DISPLAY_NAME = "Pad Image for Outpainting"
    OUTPUTS = (Output("IMAGE"), Output("MASK"))

    image = Link("IMAGE")
    left = Int(default=0, min=0, max=LIMIT, step=8)
    top = Int(default=0, min=0, max=LIMIT, step=8)
    right = Int(default=0, min=0, max=LIMIT, step=8)
    bottom = Int(default=0, min=0, max=LIMIT, step=8)
    feathering = Int(default=40, min=0, max=LIMIT)

    def run(
        self, ctx: NodeContext, image: torch.Tensor, left: int, top: int, right: int, bottom: int, feathering: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, height, width, channels = image.shape
        padded = image.new_full((batch, height + top + bottom, width + left + right, channels), 0.5)
        padded[:, top : top + height, left : left + width] = image
        mask = outpaint_mask(height, width, left, top, right, bottom, feathering).to(image.device)
        return padded, mask.expand(batch, -1, -1).clone()


class Canny(Node):
    """Canny edge map: white edges on black, as a 3-channel image (ControlNet's canny input)."""

    CATEGORY = "image/preprocessors"
    DISPLAY_NAME = "Canny"
    OUTPUTS = (Output("IMAGE"),)

    image = Link("IMAGE")
    low_threshold = Float(default=0.4, min=0.01, max=0.99, step=0.01)
    high_threshold = Float(default=0.8, min=0.01, max=0.99, step=0.01)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        low, high = inputs.get("low_threshold"), inputs.get("high_threshold")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low > high:
            return [("low_threshold", "invalid_combination", f"low_threshold {low} is above high_threshold {high}")]
        return []

    def run(
        self, ctx: NodeContext, image: torch.Tensor, low_threshold: float, high_threshold: float
    ) -> tuple[torch.Tensor]:
        edges = canny(image, low_threshold, high_threshold)
        return (edges.unsqueeze(-1).repeat(1, 1, 1, 3),)
