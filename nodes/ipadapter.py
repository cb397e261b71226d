"""IP-Adapter nodes: a reference image steers an SD1.x UNet (its style, or its content) alongside the prompt.

Nodes: IPAdapterModelLoader and IPAdapterAdvanced (the names of cubiq/ComfyUI_IPAdapter_plus,
so exported graphs carry over); the CLIP vision encoder they need comes from clip_vision.py.
The files they load are read by plinth.nodes.models.clip_vision and plinth.nodes.models.ipadapter;
the patch that runs an adapter during sampling is plinth.nodes.patches.ipadapter_attention.
"""

from __future__ import annotations

from typing import Any

import torch

from plinth.nodes.core.context import ModelHandle, NodeContext, NodeInputError, file_model
from plinth.nodes.core.schema import Choice, Float, Link, Node, Output
from plinth.nodes.core.types import DiffusionModel
from plinth.nodes.models.clip_vision import encode_image, encode_pixels
from plinth.nodes.models.ipadapter import IPAdapterWeights, load_ipadapter
from plinth.nodes.patches.ipadapter_attention import IPAdapterPatch
from plinth.nodes.resize import repeat_to_batch


class IPAdapterModelLoader(Node):
    """Load an SD1.x IP-Adapter (plain or plus) from models/ipadapter."""

    ORIGIN = "ComfyUI_IPAdapter_plus"
    CATEGORY = "ipadapter/loaders"
    DISPLAY_NAME = "IPAdapter Model Loader"
    OUTPUTS = (Output("IPADAPTER"),)

    ipadapter_file = Choice(source="ipadapter")

    def run(self, ctx: NodeContext, ipadapter_file: str) -> tuple[ModelHandle]:
        device, dtype = ctx.device, ctx.dtype
        handle = file_model(ctx, "ipadapter", ipadapter_file, lambda path: load_ipadapter(path, device, dtype))
        ctx.model(handle)  # a wrong file fails here, at the node that names it
        return (handle,)


class IPAdapterAdvanced(Node):
    """Steer a MODEL with a reference image through an IP-Adapter (style and content transfer).

    cubiq's node, with the subset of its inputs Plinth implements: weight (negative pushes away),
    start_at/end_at (the part of the schedule in which it acts, 0 = start), image_negative (the
    unconditional side's image instead of a blank one) and clip_vision, which Plinth needs linked
    because it has no unified loader. weight_type, combine_embeds and embeds_scaling accept only
    the behaviour implemented: linear (one weight everywhere), concat (several reference images
    add their tokens side by side) and "V only" (the weight scales the image attention's output).
    """

    ORIGIN = "ComfyUI_IPAdapter_plus"
    CATEGORY = "ipadapter"
    DISPLAY_NAME = "IPAdapter Advanced"
    OUTPUTS = (Output("MODEL"),)

    model = Link("MODEL")
    ipadapter = Link("IPADAPTER")
    image = Link("IMAGE")
    weight = Float(default=1.0, min=-1.0, max=5.0, step=0.05)
    weight_type = Choice(options=("linear",), default="linear")
    combine_embeds = Choice(options=("concat",), default="concat")
    start_at = Float(default=0.0, min=0.0, max=1.0, step=0.001)
    end_at = Float(default=1.0, min=0.0, max=1.0, step=0.001)
    embeds_scaling = Choice(options=("V only",), default="V only")
    image_negative = Link("IMAGE", optional=True)
    clip_vision = Link(
        "CLIP_VISION",
        optional=True,
        tooltip="required on Plinth: a CLIPVisionLoader with the encoder the adapter was trained with",
    )

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        if inputs.get("start_at", 0.0) > inputs.get("end_at", 1.0):
            return [("end_at", "custom_validation_failed", "end_at must not be before start_at")]
        return []

    def run(
        self,
        ctx: NodeContext,
        model: DiffusionModel,
        ipadapter: ModelHandle,
        image: torch.Tensor,
        weight: float,
        weight_type: str,
        combine_embeds: str,
        start_at: float,
        end_at: float,
        embeds_scaling: str,
        image_negative: torch.Tensor | None = None,
        clip_vision: ModelHandle | None = None,
    ) -> tuple[DiffusionModel]:
        if clip_vision is None:
            raise NodeInputError(
                "IPAdapterAdvanced needs its clip_vision input linked to a CLIPVisionLoader "
                "(Plinth has no unified loader that brings the encoder along)"
            )
        if any(isinstance(p, IPAdapterPatch) for p in model.patches):
            raise NodeInputError("this MODEL already has an IP-Adapter; Plinth applies one IP-Adapter per model")
        adapter: IPAdapterWeights = ctx.model(ipadapter)
        encoder = ctx.model(clip_vision)
        adapter.matching_layers(model.load(ctx).unet)
        width = encoder.config.projection_dim if adapter.kind == "plain" else encoder.config.hidden_size
        if width != adapter.embed_dim:
            what = "image embeddings" if adapter.kind == "plain" else "hidden states"
            raise NodeInputError(
                f"{adapter.name} reads CLIP vision {what} {adapter.embed_dim} wide, but "
                f"the linked CLIP vision model gives {width}: use the encoder it was trained with"
            )
        if weight == 0:
            return (model,)
        positive = adapter.features(encode_image(encoder, image))
        if image_negative is not None:
            negative = adapter.features(encode_image(encoder, image_negative))
        elif adapter.kind == "plain":
            negative = torch.zeros_like(positive)
        else:  # as the adapter was trained: hidden states of all-zero (normalised) pixels
            size = int(encoder.config.image_size)
            negative = adapter.features(encode_pixels(encoder, torch.zeros(1, 3, size, size)))
        patch = IPAdapterPatch(ipadapter, positive, repeat_to_batch(negative, len(positive)), weight, start_at, end_at)
        return (model.with_patch(patch),)
