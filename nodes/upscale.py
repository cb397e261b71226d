"""Image scaling nodes: resizing by interpolation (ImageScale, ImageScaleBy,
ImageScaleToTotalPixels) and super-resolution models (UpscaleModelLoader, ImageUpscaleWithModel).

Super-resolution files are read with spandrel, which recognises ESRGAN, Real-ESRGAN and many other
architectures from their keys alone. Models run tile by tile, so memory stays bounded whatever the
image size, and the tile size halves when the device runs out of memory, as ComfyUI does it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.core.context import ModelHandle, NodeContext, NodeInputError, file_model
from plinth.nodes.core.schema import Choice, Float, Int, Link, Node, Output
from plinth.nodes.latent import MAX_RESOLUTION
from plinth.nodes.resize import resize_image

log = logging.getLogger("plinth.nodes.upscale")

METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
TILE = 512  # input pixels per tile side, as ComfyUI
TILE_OVERLAP = 32
MIN_TILE = 128  # below this, tiles are mostly overlap: give up instead


class ImageScale(Node):
    """Resize images to a width and height; 0 for one of them keeps the aspect ratio."""

    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image"
    OUTPUTS = (Output("IMAGE"),)

    image = Link("IMAGE")
    upscale_method = Choice(options=METHODS, default="nearest-exact")
    width = Int(default=512, min=0, max=MAX_RESOLUTION, limit="width")
    height = Int(default=512, min=0, max=MAX_RESOLUTION, limit="height")
    crop = Choice(options=("disabled", "center"), default="disabled")

    def run(
        self, ctx: NodeContext, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str
    ) -> tuple[torch.Tensor]:
        if width == 0 and height == 0:
            return (image,)
        old_height, old_width = image.shape[1:3]
        if width == 0:
            width = max(1, round(old_width * height / old_height))
        elif height == 0:
            height = max(1, round(old_height * width / old_width))
        return (resize_image(image, width, height, upscale_method, crop),)


class ImageScaleBy(Node):
    """Resize images by a factor."""

    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image By"
    OUTPUTS = (Output("IMAGE"),)

    image = Link("IMAGE")
    upscale_method = Choice(options=METHODS, default="nearest-exact")
    scale_by = Float(default=1.0, min=0.01, max=8.0, step=0.01)

    def run(self, ctx: NodeContext, image: torch.Tensor, upscale_method: str, scale_by: float) -> tuple[torch.Tensor]:
        height, width = image.shape[1:3]
        return (resize_image(image, max(1, round(width * scale_by)), max(1, round(height * scale_by)), upscale_method),)


class ImageScaleToTotalPixels(Node):
    """Resize images to about a number of megapixels (2^20 pixels each), keeping the aspect ratio."""

    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Scale Image to Total Pixels"
    OUTPUTS = (Output("IMAGE"),)

    image = Link("IMAGE")
    upscale_method = Choice(options=METHODS, default="nearest-exact")
    megapixels = Float(default=1.0, min=0.01, max=16.0, step=0.01)

    def run(self, ctx: NodeContext, image: torch.Tensor, upscale_method: str, megapixels: float) -> tuple[torch.Tensor]:
        height, width = image.shape[1:3]
        factor = math.sqrt(megapixels * 1024 * 1024 / (width * height))
        return (resize_image(image, max(1, round(width * factor)), max(1, round(height * factor)), upscale_method),)


class Upscaler:
    """A loaded super-resolution model: what the model manager keeps for an UPSCALE_MODEL."""

    def __init__(self, descriptor: Any) -> None:
        self.descriptor = descriptor
        self.scale: int = descriptor.scale

    def __call__(self, tile: torch.Tensor) -> torch.Tensor:
        """[1,3,h,w] in 0..1 on any device → [1,3,h*scale,w*scale] in 0..1, float32 on the CPU."""
        model = self.descriptor
        return model(tile.to(device=model.device, dtype=model.dtype)).float().cpu()

    def nbytes(self) -> int:
        """Bytes of weights (parameters and buffers), for the model manager's budget."""
        module = self.descriptor.model
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


_NOT_SR = {"Restoration": "a 1x restoration", "FaceSR": "a face restoration", "Inpainting": "an inpainting"}


def load_upscaler(path: Path, device: torch.device, dtype: torch.dtype) -> Upscaler:
    """Read a super-resolution model with spandrel, on `device`, in eval mode, in `dtype` where
    the architecture supports it (else float32).

    Only .safetensors files are read (a pickled .pth can run code when loaded). Anything that is
    not a single-image model enlarging RGB images is refused with a NodeInputError naming it.
    """
    if path.suffix != ".safetensors":
        raise NodeInputError(f"upscale model {path.name!r}: only .safetensors files are loaded")
    # spandrel imports every architecture it knows (and torchvision): only when a model loads.
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    try:
        descriptor = ModelLoader(device).load_from_file(path)
    except UnsupportedModelError:
        raise NodeInputError(
            f"upscale model {path.name!r} is not an architecture spandrel knows; "
            "expected a super-resolution model such as ESRGAN or Real-ESRGAN"
        ) from None
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a damaged file, or one detected whose tensors do not fit the architecture
        raise NodeInputError(f"upscale model {path.name!r} could not be loaded: {exc}") from exc
    what = f"upscale model {path.name!r} ({descriptor.architecture.name})"
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose != "SR":
        raise NodeInputError(
            f"{what} is {_NOT_SR[descriptor.purpose]} model, not a single-image super-resolution model"
        )
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise NodeInputError(
            f"{what} takes {descriptor.input_channels} and gives {descriptor.output_channels} "
            "channels; only RGB models (3 and 3) are supported"
        )
    if (dtype == torch.float16 and not descriptor.supports_half) or (
        dtype == torch.bfloat16 and not descriptor.supports_bfloat16
    ):
        dtype = torch.float32
    descriptor.to(dtype)
    descriptor.eval()
    return Upscaler(descriptor)


@dataclass(frozen=True)
class UpscaleModel:
    """UPSCALE_MODEL: a handle on the model file; the model manager holds the weights."""

    handle: ModelHandle

    def load(self, ctx: NodeContext) -> Upscaler:
        return ctx.model(self.handle)


class UpscaleModelLoader(Node):
    """Load a super-resolution model (ESRGAN, Real-ESRGAN and the other architectures spandrel
    recognises) from a .safetensors file under models/upscale_models."""

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load Upscale Model"
    OUTPUTS = (Output("UPSCALE_MODEL"),)

    model_name = Choice(source="upscale_models")

    def run(self, ctx: NodeContext, model_name: str) -> tuple[UpscaleModel]:
        device, dtype = ctx.device, ctx.dtype
        return (
            UpscaleModel(
                file_model(ctx, "upscale_models", model_name, lambda path: load_upscaler(path, device, dtype))
            ),
        )


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced tile starts covering 0..length, neighbours overlapping by at least `overlap`."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _tile_weights(size: int, inner_start: bool, inner_end: bool, overlap: int, scale: int) -> torch.Tensor:
    """Blend weights along one side of a tile, at output resolution.

    Near an edge shared with another tile the model saw zero padding instead of the neighbouring
    pixels, so the outermost quarter of the overlap gets no weight and the middle half ramps
    linearly to 1 (the blend divides by the summed weights, so wider overlaps blend the same way).
    Image borders keep full weight.
    """
    margin = overlap // 4
    ramp = max(overlap - 2 * margin, 1)
    distance = (torch.arange(size * scale, dtype=torch.float32) + 0.5) / scale
    weights = torch.ones(size * scale)
    if inner_start:
        weights = torch.minimum(weights, ((distance - margin) / ramp).clamp(0, 1))
    if inner_end:
        weights = torch.minimum(weights, ((size - distance - margin) / ramp).clamp(0, 1))
    return weights


def upscale_tiled(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scale: int,
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
    ctx: NodeContext | None = None,
) -> torch.Tensor:
    """IMAGE [B,H,W,C] → [B,H*scale,W*scale,C] on the CPU, in 0..1, running `model` on
    overlapping tiles of at most tile x tile input pixels and blending them.

    `model` maps [1,C,h,w] to [1,C,h*scale,w*scale] on the CPU. With `ctx`, cancellation is
    checked before each tile and progress reported after it.
    """
    batch, height, width, channels = image.shape
    tile_h, tile_w = min(tile, height), min(tile, width)
    ys, xs = _tile_starts(height, tile_h, overlap), _tile_starts(width, tile_w, overlap)
    weight_y = [_tile_weights(tile_h, y > 0, y + tile_h < height, overlap, scale) for y in ys]
    weight_x = [_tile_weights(tile_w, x > 0, x + tile_w < width, overlap, scale) for x in xs]
    out = torch.zeros(batch, channels, height * scale, width * scale)
    total_weight = torch.zeros(height * scale, width * scale)
    for y, wy in zip(ys, weight_y, strict=False):
        for x, wx in zip(xs, weight_x, strict=False):
            total_weight[y * scale : (y + tile_h) * scale, x * scale : (x + tile_w) * scale] += wy[:, None] * wx
    total, done = batch * len(ys) * len(xs), 0
    for b in range(batch):
        for y, wy in zip(ys, weight_y, strict=False):
            for x, wx in zip(xs, weight_x, strict=False):
                if ctx is not None:
                    ctx.check_cancelled()
                piece = image[b : b + 1, y : y + tile_h, x : x + tile_w].movedim(-1, 1)
                result = model(piece)[0]
                out[b, :, y * scale : (y + tile_h) * scale, x * scale : (x + tile_w) * scale] += result * (
                    wy[:, None] * wx
                )
                done += 1
                if ctx is not None:
                    ctx.progress(done, total)
    return (out / total_weight).clamp_(0, 1).movedim(1, -1)


def upscale_image(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scale: int,
    ctx: NodeContext | None = None,
    tile: int = TILE,
    min_tile: int = MIN_TILE,
) -> torch.Tensor:
    """upscale_tiled, halving the tile size each time the device runs out of memory, down to
    `min_tile`; then a RuntimeError that says so."""
    while True:
        try:
            return upscale_tiled(model, image, scale, tile, TILE_OVERLAP, ctx)
        except torch.OutOfMemoryError as exc:
            if tile // 2 < min_tile:
                raise RuntimeError(
                    f"out of device memory upscaling a {image.shape[2]}x{image.shape[1]} image, "
                    f"even with tiles of {tile} px; free memory or use a smaller image"
                ) from exc
            log.warning("out of memory upscaling with %d-px tiles; trying %d", tile, tile // 2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the failed attempt's blocks back before the retry
        tile //= 2


class ImageUpscaleWithModel(Node):
    """Enlarge images with a super-resolution model, tile by tile (512-px tiles, fewer pixels
    per tile when the device runs out of memory)."""

    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image (using Model)"
    OUTPUTS = (Output("IMAGE"),)

    upscale_model = Link("UPSCALE_MODEL")
    image = Link("IMAGE")

    def run(self, ctx: NodeContext, upscale_model: UpscaleModel, image: torch.Tensor) -> tuple[torch.Tensor]:
        if image.shape[-1] != 3:
            raise NodeInputError(f"upscale models take RGB images; this one has {image.shape[-1]} channels")
        upscaler = upscale_model.load(ctx)
        with torch.inference_mode():
            return (upscale_image(upscaler, image, upscaler.scale, ctx),)
