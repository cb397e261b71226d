"""Conditioning nodes: prompt encoding, CLIP skip, and combining or placing conditioning."""

from __future__ import annotations

from dataclasses import replace

import torch

from plinth.nodes import flux, prompt, sdxl
from plinth.nodes.core.context import NodeContext, NodeInputError
from plinth.nodes.core.schema import Float, Int, Link, Node, Output
from plinth.nodes.core.types import Conditioning, ConditioningEntry, TextEncoder
from plinth.nodes.patches.model_patch import patched
from plinth.nodes.textual_inversion import PromptText, embedding_lookup

MAX_RESOLUTION = 16384


def area_in_latent(area: tuple[int, int, int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """ConditioningSetArea's area (h, w, y, x in latent cells) clipped to a height x width
    latent, as ComfyUI's sampler narrows it (h becomes min(h, height - y), likewise w).

    An area with nothing left inside the latent (e.g. x=64 on a 64-pixel-wide image) raises a
    NodeInputError giving the area and the image in pixels; ComfyUI would run the model on an
    empty slice there and fail with a tensor error.
    """
    h, w, y, x = area
    clipped_h, clipped_w = min(h, height - y), min(w, width - x)
    if clipped_h <= 0 or clipped_w <= 0:
        raise NodeInputError(
            f"ConditioningSetArea's area (x={x * 8}, y={y * 8}, {w * 8}x{h * 8} pixels) lies outside the "
            f"{width * 8}x{height * 8}-pixel image being sampled; move it inside (x below {width * 8}, "
            f"y below {height * 8})"
        )
    return clipped_h, clipped_w, y, x


def encode_prompt(clip: TextEncoder, ctx: NodeContext, text: str) -> torch.Tensor:
    """Token embeddings [1, 77*k, D] for `text`, with the CLIP's patches (LoRA) applied and its
    `embedding:NAME` words read from models/embeddings."""
    model = clip.load(ctx)
    embeddings = embedding_lookup(ctx, model.text_encoder.get_input_embeddings().embedding_dim)
    layer = -1 if clip.stop_at_layer is None else clip.stop_at_layer
    with torch.inference_mode(), patched(ctx, clip.patches, model.text_encoder):
        return prompt.encode(model.tokenizer, model.text_encoder, text, layer, ctx.device, embeddings)


class CLIPTextEncode(Node):
    """Encode a prompt with the checkpoint's CLIP text model into conditioning. Emphasis
    `(word:1.2)` and `(word)` weigh tokens; `embedding:NAME` puts a textual-inversion embedding
    from models/embeddings in the prompt; long prompts are encoded window by window."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Text Encode (Prompt)"
    OUTPUTS = (Output("CONDITIONING"),)

    text = PromptText(multiline=True)
    clip = Link("CLIP")

    def run(self, ctx: NodeContext, text: str, clip: TextEncoder) -> tuple[Conditioning]:
        model = clip.load(ctx)
        if flux.is_flux(model):
            return ([flux.encode_prompt_flux(clip, ctx, text)],)
        if sdxl.is_sdxl(model):
            return ([sdxl.encode_prompt_sdxl(clip, ctx, text)],)
        return ([ConditioningEntry(encode_prompt(clip, ctx, text))],)


class CLIPSetLastLayer(Node):
    """Take the text embeddings from an earlier CLIP layer ("CLIP skip"): -1 is the last."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Set Last Layer"
    OUTPUTS = (Output("CLIP"),)

    clip = Link("CLIP")
    stop_at_clip_layer = Int(default=-1, min=-24, max=-1, step=1)

    def run(self, ctx: NodeContext, clip: TextEncoder, stop_at_clip_layer: int) -> tuple[TextEncoder]:
        layers = min(m.config.num_hidden_layers for m in clip.load(ctx).text_models)
        if -stop_at_clip_layer > layers:
            raise NodeInputError(f"stop_at_clip_layer {stop_at_clip_layer}: the text model has {layers} layers")
        return (replace(clip, stop_at_layer=stop_at_clip_layer),)


class ConditioningCombine(Node):
    """Both conditionings at once: the sampler averages the predictions of every entry."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "Conditioning (Combine)"
    OUTPUTS = (Output("CONDITIONING"),)

    conditioning_1 = Link("CONDITIONING")
    conditioning_2 = Link("CONDITIONING")

    def run(self, ctx: NodeContext, conditioning_1: Conditioning, conditioning_2: Conditioning) -> tuple[Conditioning]:
        return (list(conditioning_1) + list(conditioning_2),)


class ConditioningSetArea(Node):
    """Limit conditioning to a rectangle of the image (pixels, multiples of 8), with a strength.
    An area reaching past the image is clipped to it at sampling (ComfyUI); one wholly outside
    the image fails there with an error."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "Conditioning (Set Area)"
    OUTPUTS = (Output("CONDITIONING"),)

    conditioning = Link("CONDITIONING")
    width = Int(default=64, min=64, max=MAX_RESOLUTION, step=8)
    height = Int(default=64, min=64, max=MAX_RESOLUTION, step=8)
    x = Int(default=0, min=0, max=MAX_RESOLUTION, step=8)
    y = Int(default=0, min=0, max=MAX_RESOLUTION, step=8)
    strength = Float(default=1.0, min=0.0, max=10.0, step=0.01)

    def run(
        self, ctx: NodeContext, conditioning: Conditioning, width: int, height: int, x: int, y: int, strength: float
    ) -> tuple[Conditioning]:
        area = (height // 8, width // 8, y // 8, x // 8)
        return ([ConditioningEntry(e.embeds, {**e.options, "area": area, "strength": strength}) for e in conditioning],)


class ConditioningZeroOut(Node):
    """Conditioning of all zeros: a neutral negative, common with inpainting and ControlNet."""

    CATEGORY = "advanced/conditioning"
    OUTPUTS = (Output("CONDITIONING"),)

    conditioning = Link("CONDITIONING")

    def run(self, ctx: NodeContext, conditioning: Conditioning) -> tuple[Conditioning]:
        out = []
        for entry in conditioning:
            options = dict(entry.options)
            if options.get("pooled_output") is not None:  # SDXL's pooled text, zeroed too (as ComfyUI)
                options["pooled_output"] = torch.zeros_like(options["pooled_output"])
            out.append(ConditioningEntry(torch.zeros_like(entry.embeds), options))
        return (out,)
