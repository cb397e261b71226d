"""Product cutout: the first step of every packshot workflow (ANCHORS §7). Not ComfyUI core
nodes, so the names are Plinth's own:

- RemoveBackground (image, model) -> IMAGE, MASK: a local rembg-style ONNX model from
  models/rembg (u2net family, isnet, BiRefNet) run with onnxruntime. The MASK is 1 on the
  product (foreground) and 0 on the background; the IMAGE is the input, passed on so a graph
  can take both from one node as with LoadImage.
- PlainBackgroundCutout (image, tolerance, min_area, keep_enclosed, soft_edge) -> MASK: no
  weights at all, for products shot on a plain or seamless backdrop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from plinth.nodes.core.context import NodeContext, file_model
from plinth.nodes.core.schema import Boolean, Choice, Float, Int, Link, Node, Output
from plinth.nodes.resize import resize, resize_image

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class Preprocessing:
    """How a family of cutout models wants its input: size (when the ONNX file leaves it
    open) and the mean/std applied after dividing the image by its maximum (rembg's way)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def preprocessing_for(name: str) -> Preprocessing:
    """rembg's settings by model family, recognised from the file name: isnet 1024 px with
    mean 0.5 / std 1, BiRefNet 1024 px with ImageNet statistics, the u2net family (u2net,
    u2netp, silueta, ...) 320 px with ImageNet statistics."""
    lowered = name.lower()
    if "isnet" in lowered:
        return Preprocessing(1024, *HALF)
    if "birefnet" in lowered:
        return Preprocessing(1024, *IMAGENET)
    return Preprocessing(320, *IMAGENET)


class CutoutModel:
    """A loaded ONNX cutout model; the model manager keeps it like any other model."""

    def __init__(self, path: Path, use_cuda: bool) -> None:
        import onnxruntime as ort  # only when a cutout model is actually used

        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if use_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.file_bytes = path.stat().st_size
        spec = self.session.get_inputs()[0]
        self.input_name = spec.name
        defaults = preprocessing_for(path.name)
        height, width = spec.shape[2:4] if len(spec.shape) == 4 else (None, None)
        self.height = height if isinstance(height, int) and height > 0 else defaults.size
        self.width = width if isinstance(width, int) and width > 0 else defaults.size
        self.mean = np.asarray(defaults.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(defaults.std, dtype=np.float32)[:, None, None]

    def nbytes(self) -> int:
        """The file size: a fair measure of what the session holds, for the memory budget."""
        return self.file_bytes

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Foreground probability [H,W] in 0..1 for one IMAGE entry [H,W,C]."""
        height, width = image.shape[:2]
        small = resize_image(image[None, ..., :3].float().cpu(), self.width, self.height, "bilinear", antialias=True)[0]
        pixels = small.permute(2, 0, 1).numpy()
        pixels = pixels / max(float(pixels.max()), 1e-6)
        batch = ((pixels - self.mean) / self.std)[None].astype(np.float32)
        prediction = np.asarray(self.session.run(None, {self.input_name: batch})[0], dtype=np.float32)
        prediction = prediction.reshape(-1, *prediction.shape[-2:])[0]
        if prediction.min() < 0.0 or prediction.max() > 1.0:  # logits (BiRefNet): to probabilities
            prediction = 1.0 / (1.0 + np.exp(-prediction))
        low, high = float(prediction.min()), float(prediction.max())
        prediction = (prediction - low) / max(high - low, 1e-6)
        full = resize(torch.from_numpy(prediction)[None, None], width, height, "bilinear", antialias=True)[0, 0]
        return full.clamp(0.0, 1.0)


def plain_background_mask(
    rgb: np.ndarray, tolerance: float, min_area: int, keep_enclosed: bool, soft_edge: float
) -> np.ndarray:
    """Product mask [H,W] (1 = product) for one float RGB image [H,W,3] on a plain backdrop.

    The backdrop colour is the median of a thin band along the image border (robust to a
    product that touches an edge). Pixels within `tolerance` of it (RGB distance scaled so
    black to white is 1) that are 4-connected to the image border are the backdrop; a region
    of backdrop colour enclosed by the product (a white label on a white bottle) is therefore
    product. With keep_enclosed off, enclosed regions of at least `min_area` pixels count as
    backdrop seen through the product (a mug handle); smaller ones are filled either way.
    Product specks under `min_area` pixels (dust, noise) are dropped, and `soft_edge` blurs the
    outline by that Gaussian sigma in pixels.
    """
    height, width = rgb.shape[:2]
    band = max(1, round(min(height, width) * 0.02))
    border = np.concatenate(
        [
            rgb[:band].reshape(-1, 3),
            rgb[-band:].reshape(-1, 3),
            rgb[:, :band].reshape(-1, 3),
            rgb[:, -band:].reshape(-1, 3),
        ]
    )
    backdrop = np.median(border, axis=0)
    near = np.linalg.norm(rgb - backdrop, axis=-1) / np.sqrt(3.0) <= tolerance
    labels, _ = ndimage.label(near)
    edge_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, edge_labels[edge_labels > 0])
    product = ~outside
    if not keep_enclosed:
        product &= ~_regions_at_least(near & ~outside, min_area)
    product &= _regions_at_least(product, min_area)
    mask = product.astype(np.float32)
    if soft_edge > 0:
        mask = ndimage.gaussian_filter(mask, soft_edge, mode="nearest")
    return mask


def _regions_at_least(selected: np.ndarray, min_area: int) -> np.ndarray:
    """The 8-connected regions of `selected` with at least `min_area` pixels."""
    if min_area <= 1:
        return selected.copy()
    labels, count = ndimage.label(selected, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    large = sizes >= min_area
    large[0] = False
    return large[labels]


class RemoveBackground(Node):
    """Cut the product out with a local rembg-style ONNX model (models/rembg/*.onnx): MASK is
    1 on the product, 0 on the background; IMAGE is the input image."""

    ORIGIN = "Plinth"
    CATEGORY = "image/cutout"
    DISPLAY_NAME = "Remove Background"
    OUTPUTS = (Output("IMAGE"), Output("MASK"))

    image = Link("IMAGE")
    model = Choice(source="rembg")

    def run(self, ctx: NodeContext, image: torch.Tensor, model: str) -> tuple[torch.Tensor, torch.Tensor]:
        use_cuda = ctx.device.type == "cuda"
        cutout: CutoutModel = ctx.model(file_model(ctx, "rembg", model, lambda path: CutoutModel(path, use_cuda)))
        masks = []
        for entry in image:
            ctx.check_cancelled()
            masks.append(cutout.predict(entry))
        return image, torch.stack(masks).to(image.device)


class PlainBackgroundCutout(Node):
    """Cut a product out of a plain or seamless backdrop without any model: the backdrop colour
    is read from the image border and flood-filled inwards. MASK is 1 on the product."""

    ORIGIN = "Plinth"
    CATEGORY = "image/cutout"
    DISPLAY_NAME = "Plain Background Cutout"
    OUTPUTS = (Output("MASK"),)

    image = Link("IMAGE")
    tolerance = Float(
        default=0.1,
        min=0.0,
        max=1.0,
        step=0.01,
        tooltip="how far from the backdrop colour a pixel may be and still count as "
        "backdrop (0..1, black to white is 1)",
    )
    min_area = Int(
        default=64,
        min=0,
        max=1 << 28,
        tooltip="product specks and enclosed holes smaller than this many pixels are dropped or filled",
    )
    keep_enclosed = Boolean(
        default=True,
        tooltip="regions of backdrop colour surrounded by the product stay product "
        "(off: large ones are holes through the product)",
    )
    soft_edge = Float(default=1.0, min=0.0, max=64.0, step=0.1, tooltip="Gaussian blur of the outline, in pixels")

    def run(
        self,
        ctx: NodeContext,
        image: torch.Tensor,
        tolerance: float,
        min_area: int,
        keep_enclosed: bool,
        soft_edge: float,
    ) -> tuple[torch.Tensor]:
        masks = []
        for entry in image:
            ctx.check_cancelled()
            rgb = entry[..., :3].float().cpu().numpy()
            masks.append(torch.from_numpy(plain_background_mask(rgb, tolerance, min_area, keep_enclosed, soft_edge)))
        return (torch.stack(masks).to(image.device),)
