"""Image input and output nodes: LoadImage, SaveImage, PreviewImage, and their PNG encoding."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, PngImagePlugin, UnidentifiedImageError

from plinth.nodes.core.context import ImageRef, NodeContext, NodeInputError
from plinth.nodes.core.schema import Choice, Link, Node, Output, String


def encode_png(image: torch.Tensor, graph: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> bytes:
    """One IMAGE [H,W,C] as PNG bytes, with the graph in a "prompt" text chunk as ComfyUI writes
    it (and the editor workflow, when the graph came from one, in a "workflow" chunk)."""
    pixels = np.clip(image.detach().cpu().float().numpy() * 255.0, 0, 255).astype(np.uint8)
    info = PngImagePlugin.PngInfo()
    if graph is not None:
        info.add_text("prompt", json.dumps(graph))
    for key, value in (extra or {}).items():
        info.add_text(key, json.dumps(value))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


# Decoded pixels one image may become, over all its frames: a small animated file can
# otherwise expand to gigabytes of float32 (Pillow's bomb check looks at one frame only).
MAX_DECODED_PIXELS = 2**26


def frame_pixels(frame: Image.Image) -> np.ndarray:
    """One decoded frame as float32 RGB [H,W,3] in 0..1.

    16-bit greyscale (Pillow's "I;16", "I;16B", ... modes, which convert to RGB by clipping at
    255, i.e. almost white) is scaled from its full 0..65535 range, keeping its precision;
    32-bit "I" frames are scaled by 1/255 first, as ComfyUI does.
    """
    if frame.mode.startswith("I;16"):
        grey = np.asarray(frame).astype(np.float32) / 65535.0
        return np.repeat(grey[..., None], 3, axis=-1)
    if frame.mode == "I":
        frame = frame.point(lambda v: v * (1 / 255))
    return np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0


def decode_image(data: bytes, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [B,H,W,3] and MASK [B,H,W] from encoded bytes; every frame of the same size as the
    first becomes one batch entry, and frames of another size are skipped (ComfyUI). An MPO
    file (the JPEG phones write, with a second, depth or stereo, frame) gives its first frame
    only, as in ComfyUI. The mask is 1 where the image is transparent (ComfyUI's convention),
    and all 0 when there is no alpha channel."""
    try:
        picture = Image.open(io.BytesIO(data))
        first_only = picture.format == "MPO"
        frames: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for index, frame in enumerate(ImageSequence.Iterator(picture)):
            if (index + 1) * frame.width * frame.height > MAX_DECODED_PIXELS:
                raise NodeInputError(
                    f"image {name!r} decodes to more than {MAX_DECODED_PIXELS} pixels "
                    f"({frame.width}x{frame.height}, frame {index + 1})"
                )
            frame = ImageOps.exif_transpose(frame)
            if frames and (frame.height, frame.width) != frames[0].shape[:2]:
                continue
            rgb = frame_pixels(frame)
            if "A" in frame.getbands() or (frame.mode == "P" and "transparency" in frame.info):
                alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
                masks.append(1.0 - alpha)
            else:
                masks.append(np.zeros(rgb.shape[:2], dtype=np.float32))
            frames.append(rgb)
            if first_only:
                break
    except NodeInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise NodeInputError(f"image {name!r} could not be decoded: {exc}") from exc
    return torch.from_numpy(np.stack(frames)), torch.from_numpy(np.stack(masks))


def save_images(ctx: NodeContext, images: torch.Tensor, prefix: str, kind: str) -> dict[str, list[ImageRef]]:
    refs = []
    for image in images:
        ctx.check_cancelled()
        png = encode_png(image, ctx.graph, ctx.extra_pnginfo)
        refs.append(ctx.save_image(png, int(image.shape[1]), int(image.shape[0]), prefix, kind))
    return {"images": refs}


class SaveImage(Node):
    """Store images as PNG (with the graph in a "prompt" text chunk) and return them."""

    CATEGORY = "image"
    DISPLAY_NAME = "Save Image"
    OUTPUT_NODE = True
    USES_GRAPH = True

    images = Link("IMAGE")
    filename_prefix = String(default="ComfyUI")

    def run(self, ctx: NodeContext, images: torch.Tensor, filename_prefix: str) -> dict[str, Any]:
        return save_images(ctx, images, filename_prefix, "output")


class PreviewImage(Node):
    """Return images as previews: sent to the client, not kept as job outputs on disk."""

    CATEGORY = "image"
    DISPLAY_NAME = "Preview Image"
    OUTPUT_NODE = True
    USES_GRAPH = True

    images = Link("IMAGE")

    def run(self, ctx: NodeContext, images: torch.Tensor) -> dict[str, Any]:
        return save_images(ctx, images, "preview", "preview")


class LoadImage(Node):
    """Load an image sent with the request (or kept in the server's inputs folder) as IMAGE,
    and its alpha channel as MASK."""

    CATEGORY = "image"
    DISPLAY_NAME = "Load Image"
    OUTPUTS = (Output("IMAGE"), Output("MASK"))

    image = Choice(source="input_images", image_upload=True)

    def run(self, ctx: NodeContext, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_image(ctx.input_image(image), image)
