"""CLIP vision nodes (ComfyUI core): CLIPVisionLoader and CLIPVisionEncode.

Their outputs feed IP-Adapters (ipadapter.py); loading and encoding are
plinth.nodes.models.clip_vision.
"""

from __future__ import annotations

import torch

from plinth.nodes.core.context import ModelHandle, NodeContext, file_model
from plinth.nodes.core.schema import Choice, Link, Node, Output
from plinth.nodes.models.clip_vision import ClipVisionOutput, encode_image, load_clip_vision


class CLIPVisionLoader(Node):
    """Load a CLIP vision encoder (transformers layout) from models/clip_vision: a .safetensors
    file, its architecture read off the weights, or a folder with config.json."""

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load CLIP Vision"
    OUTPUTS = (Output("CLIP_VISION"),)

    clip_name = Choice(source="clip_vision")

    def run(self, ctx: NodeContext, clip_name: str) -> tuple[ModelHandle]:
        device, dtype = ctx.device, ctx.dtype
        handle = file_model(ctx, "clip_vision", clip_name, lambda path: load_clip_vision(path, device, dtype))
        ctx.model(handle)  # a wrong file fails here, at the node that names it
        return (handle,)


class CLIPVisionEncode(Node):
    """Encode images with a CLIP vision model: projected image embeddings and the penultimate
    hidden states (crop "center" keeps the aspect and cuts the middle, "none" squeezes)."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Vision Encode"
    OUTPUTS = (Output("CLIP_VISION_OUTPUT"),)

    clip_vision = Link("CLIP_VISION")
    image = Link("IMAGE")
    crop = Choice(options=("center", "none"), default="center")

    def run(
        self, ctx: NodeContext, clip_vision: ModelHandle, image: torch.Tensor, crop: str
    ) -> tuple[ClipVisionOutput]:
        return (encode_image(ctx.model(clip_vision), image, crop == "center"),)
