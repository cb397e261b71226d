"""The rules for images and graphs a client sends, checked by the servicers before anything
is decoded: GraphService's Submit and Run (check_request, images inline) and AssetService's
Upload (check_image, on the finished upload).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from plinth.server.config import Limits
from plinth.server.engine.graph import GraphError, GraphValidationError
from plinth.server.engine.validate import LimitExceeded

# The image formats a client may send, as Pillow names them.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageRefused(ValueError):
    """An image a client sent breaks one of check_image's rules. `code` is "limit_exceeded"
    (too many bytes or pixels: RESOURCE_EXHAUSTED) or "invalid_image" (not a readable PNG, JPEG
    or WebP: INVALID_ARGUMENT)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "PNG", "JPEG" or "WEBP"
    width: int
    height: int


def check_image(data: bytes | Path, name: str, limits: Limits) -> ImageInfo:
    """The rules for every image a client sends, inline with a request (check_request) or
    uploaded in chunks (AssetService.Upload), before anything is decoded: at most
    limits.max_upload_bytes, PNG, JPEG or WebP only, and at most limits.max_pixels * 4 pixels
    by its header (decompression bombs). Reads the header only; raises ImageRefused."""
    size = len(data) if isinstance(data, (bytes, bytearray)) else Path(data).stat().st_size
    if size > limits.max_upload_bytes:
        raise ImageRefused("limit_exceeded", f"image {name!r} is {size} bytes; the limit is {limits.max_upload_bytes}")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else Path(data)) as picture:
            kind, (width, height) = picture.format, picture.size
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling, far above ours
        raise ImageRefused("limit_exceeded", f"image {name!r} is a decompression bomb ({exc})") from None
    except (OSError, ValueError) as exc:
        raise ImageRefused("invalid_image", f"image {name!r} is not a readable image ({exc})") from None
    if kind == "MPO":  # the JPEG phones write (a second, depth or stereo, frame): a JPEG file
        kind = "JPEG"
    if kind not in ACCEPTED_FORMATS:
        raise ImageRefused("invalid_image", f"image {name!r} is {kind}; only PNG, JPEG and WebP are accepted")
    if width * height > limits.max_pixels * 4:
        raise ImageRefused(
            "limit_exceeded",
            f"image {name!r} is {width}x{height} pixels; the limit is "
            f"{limits.max_pixels * 4} (a decompression bomb or simply too large)",
        )
    return ImageInfo(kind, width, height)


def check_request(graph: str | bytes | dict[str, Any], inputs: dict[str, bytes], limits: Limits) -> None:
    """Sizes and kinds of what a request carries, before anything is decoded: the graph's
    JSON size, and each image by check_image's rules. Raises LimitExceeded or
    GraphValidationError with every problem found."""
    too_big, bad = [], []
    if isinstance(graph, (str, bytes)) and len(graph) > limits.max_graph_bytes:
        too_big.append(
            GraphError(
                "", "", "", "limit_exceeded", f"graph JSON is {len(graph)} bytes; the limit is {limits.max_graph_bytes}"
            )
        )
    for name, data in inputs.items():
        try:
            check_image(data, name, limits)
        except ImageRefused as exc:
            (too_big if exc.code == "limit_exceeded" else bad).append(
                GraphError("", "", f"inputs.{name}", exc.code, str(exc))
            )
    if bad:
        raise GraphValidationError(bad + too_big)
    if too_big:
        raise LimitExceeded(too_big)
