"""SDXL's conditioning: both text models, the pooled text, and the numbers its UNet embeds.

As ComfyUI encodes for SDXL: CLIP-L and CLIP-G each read the prompt (CLIPTextEncodeSDXL gives
each its own), each gives its penultimate layer as it is (no final layer norm; CLIPSetLastLayer
picks another), and the two are joined along the channels, CLIP-L first; CLIP-G's projected
end-token state of the first window is the pooled text. The refiner has CLIP-G alone.

Beside the text the UNet embeds six numbers (image height and width, crop top and left, target
height and width), or for the refiner five (height, width, crop top and left, aesthetic score).
They travel as conditioning options ("width", "height", "crop_w", "crop_h", "target_width",
"target_height", "aesthetic_score", ComfyUI's names); where a prompt did not set them the
sampler takes the size of the image being sampled, a zero crop, and an aesthetic score of 6 for
positive and 2.5 for negative prompts (sdxl_time_ids).
"""

from __future__ import annotations

from typing import Any

import torch

from plinth.nodes import prompt
from plinth.nodes.core.context import NodeContext, NodeInputError
from plinth.nodes.core.schema import Float, Int, Link, Node, Output
from plinth.nodes.core.types import Conditioning, ConditioningEntry, TextEncoder
from plinth.nodes.models.checkpoint import StableDiffusion
from plinth.nodes.models.sdxl import time_numbers
from plinth.nodes.patches.model_patch import patched
from plinth.nodes.textual_inversion import PromptText, embedding_lookup

__all__ = ["time_numbers"]  # the sampler reads it from here, beside the rest of SDXL's conditioning

MAX_RESOLUTION = 16384
DEFAULT_LAYER = -2  # SDXL's text models give their penultimate layer
POSITIVE_SCORE, NEGATIVE_SCORE = 6.0, 2.5  # the refiner's aesthetic scores where none is set


def is_sdxl(model: StableDiffusion) -> bool:
    return model.family in ("sdxl", "sdxl_refiner")


def encode_sdxl(clip: TextEncoder, ctx: NodeContext, text_l: str, text_g: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings [1, 77*k, L+G], pooled [1, P]) of two prompts, CLIP-L's and CLIP-G's
    (the refiner: CLIP-G's alone). The shorter prompt is lengthened with empty windows."""
    model = clip.load(ctx)
    layer = DEFAULT_LAYER if clip.stop_at_layer is None else clip.stop_at_layer
    parts = [
        (encoder, tokenizer, text, key)
        for encoder, tokenizer, text, key in (
            (model.text_encoder, model.tokenizer, text_l, "clip_l"),
            (model.text_encoder_2, model.tokenizer_2, text_g, "clip_g"),
        )
        if encoder is not None
    ]

    def run(encoder: Any, tokenizer: Any, text: str, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        lookup = embedding_lookup(ctx, encoder.get_input_embeddings().embedding_dim, key)
        # a patch naming a part (a LoRA's CLIP-L or CLIP-G layers) goes on that text model only
        part = "text_encoder" if key == "clip_l" else "text_encoder_2"
        patches = [p for p in clip.patches if getattr(p, "part", part) == part]
        with torch.inference_mode(), patched(ctx, patches, encoder):
            return prompt.encode_with_pooled(tokenizer, encoder, text, layer, ctx.device, lookup, final_norm=False)

    encoded = [run(*part) for part in parts]
    length = max(hidden.shape[1] for hidden, _ in encoded)
    joined = []
    for (hidden, _), (encoder, tokenizer, _, key) in zip(encoded, parts, strict=True):
        if hidden.shape[1] < length:
            empty = run(encoder, tokenizer, "", key)[0]
            hidden = torch.cat([hidden, empty.repeat(1, (length - hidden.shape[1]) // empty.shape[1], 1)], dim=1)
        joined.append(hidden)
    pooled = encoded[-1][1]
    if pooled is None:
        raise NodeInputError("SDXL's CLIP-G gave no pooled text (its text model has no projection)")
    return torch.cat(joined, dim=-1), pooled


def encode_prompt_sdxl(clip: TextEncoder, ctx: NodeContext, text: str) -> ConditioningEntry:
    """CLIPTextEncode's conditioning on an SDXL CLIP: one prompt through both text models."""
    embeds, pooled = encode_sdxl(clip, ctx, text, text)
    return ConditioningEntry(embeds, {"pooled_output": pooled})


def sdxl_time_ids(options: dict[str, Any], family: str, positive: bool, height: int, width: int) -> torch.Tensor:
    """The numbers an SDXL UNet embeds beside the pooled text, [1, 6] (refiner [1, 5]), from a
    conditioning entry's options; `height` x `width` (pixels of the image sampled) where unset."""
    h = float(options.get("height", height))
    w = float(options.get("width", width))
    crop_h, crop_w = float(options.get("crop_h", 0)), float(options.get("crop_w", 0))
    if family == "sdxl_refiner":
        score = float(options.get("aesthetic_score", POSITIVE_SCORE if positive else NEGATIVE_SCORE))
        return torch.tensor([[h, w, crop_h, crop_w, score]])
    target_h = float(options.get("target_height", h))
    target_w = float(options.get("target_width", w))
    return torch.tensor([[h, w, crop_h, crop_w, target_h, target_w]])


def pooled_of(options: dict[str, Any], width: int) -> torch.Tensor:
    """The pooled text of a conditioning entry for an SDXL UNet expecting `width` channels."""
    pooled = options.get("pooled_output")
    if pooled is None:
        raise NodeInputError(
            "an SDXL model needs the pooled text of its own CLIP-G: this conditioning was not encoded "
            "by an SDXL checkpoint's CLIP (CLIPTextEncode, CLIPTextEncodeSDXL or CLIPTextEncodeSDXLRefiner)"
        )
    if pooled.shape[-1] != width:
        raise NodeInputError(
            f"the conditioning's pooled text is {pooled.shape[-1]} wide; this SDXL model takes {width}: "
            "was it encoded by another model's CLIP?"
        )
    return pooled


def _sdxl_clip(clip: TextEncoder, ctx: NodeContext, node: str, family: str | None = None) -> StableDiffusion:
    model = clip.load(ctx)
    if not is_sdxl(model):
        raise NodeInputError(f"{node} needs an SDXL checkpoint's CLIP; this CLIP is {model.family}'s")
    if family is not None and model.family != family:
        raise NodeInputError(f"{node} needs the CLIP of an {family} checkpoint; this one is {model.family}'s")
    return model


class CLIPTextEncodeSDXL(Node):
    """Encode SDXL's two prompts (text_g for CLIP-G, text_l for CLIP-L) with the size and crop
    numbers the UNet embeds: the image size it should look as if made at, the crop's top-left
    corner, and the target size."""

    CATEGORY = "advanced/conditioning"
    OUTPUTS = (Output("CONDITIONING"),)

    clip = Link("CLIP")
    width = Int(default=1024, min=0, max=MAX_RESOLUTION)
    height = Int(default=1024, min=0, max=MAX_RESOLUTION)
    crop_w = Int(default=0, min=0, max=MAX_RESOLUTION)
    crop_h = Int(default=0, min=0, max=MAX_RESOLUTION)
    target_width = Int(default=1024, min=0, max=MAX_RESOLUTION)
    target_height = Int(default=1024, min=0, max=MAX_RESOLUTION)
    text_g = PromptText(multiline=True)
    text_l = PromptText(multiline=True)

    def run(
        self,
        ctx: NodeContext,
        clip: TextEncoder,
        width: int,
        height: int,
        crop_w: int,
        crop_h: int,
        target_width: int,
        target_height: int,
        text_g: str,
        text_l: str,
    ) -> tuple[Conditioning]:
        _sdxl_clip(clip, ctx, "CLIPTextEncodeSDXL", "sdxl")
        embeds, pooled = encode_sdxl(clip, ctx, text_l, text_g)
        options = dict(
            pooled_output=pooled,
            width=width,
            height=height,
            crop_w=crop_w,
            crop_h=crop_h,
            target_width=target_width,
            target_height=target_height,
        )
        return ([ConditioningEntry(embeds, options)],)


class CLIPTextEncodeSDXLRefiner(Node):
    """Encode a prompt for the SDXL refiner with the aesthetic score its UNet embeds (higher
    asks for a more "aesthetic" image; 6 is what it was mostly trained towards) and the size."""

    CATEGORY = "advanced/conditioning"
    OUTPUTS = (Output("CONDITIONING"),)

    ascore = Float(default=6.0, min=0.0, max=1000.0, step=0.01)
    width = Int(default=1024, min=0, max=MAX_RESOLUTION)
    height = Int(default=1024, min=0, max=MAX_RESOLUTION)
    text = PromptText(multiline=True)
    clip = Link("CLIP")

    def run(
        self, ctx: NodeContext, ascore: float, width: int, height: int, text: str, clip: TextEncoder
    ) -> tuple[Conditioning]:
        _sdxl_clip(clip, ctx, "CLIPTextEncodeSDXLRefiner")
        embeds, pooled = encode_sdxl(clip, ctx, text, text)
        options = dict(pooled_output=pooled, aesthetic_score=ascore, width=width, height=height)
        return ([ConditioningEntry(embeds, options)],)
