"""Conditioning nodes: prompt encoding, CLIP skip, and combining or placing conditioning."""

from __future__ import annotations

from dataclasses import replace

import torch

from plinth.nodes import prompt
from plinth.nodes.context import NodeContext, NodeInputError
from plinth.nodes.patches import patched
from plinth.nodes.schema import Float, Int, Link, Node, Output, String
from plinth.nodes.types import Conditioning, ConditioningEntry, TextEncoder

MAX_RESOLUTION = 16384


def encode_prompt(clip: TextEncoder, ctx: NodeContext, text: str) -> torch.Tensor:
    """Token embeddings [1, 77*k, D] for `text`, with the CLIP's patches (LoRA) applied."""
    model = clip.load(ctx)
    with torch.inference_mode(), patched(ctx, clip.patches, model.text_encoder):
        return prompt.encode(model.tokenizer, model.text_encoder, text, clip.stop_at_layer, ctx.device)


class CLIPTextEncode(Node):
    """Encode a prompt with the checkpoint's CLIP text model into conditioning. Emphasis
    `(word:1.2)` and `(word)` weigh tokens; long prompts are encoded window by window."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Text Encode (Prompt)"
    OUTPUTS = (Output("CONDITIONING"),)

    text = String(multiline=True)
    clip = Link("CLIP")

    def run(self, ctx: NodeContext, text: str, clip: TextEncoder) -> tuple[Conditioning]:
        return ([ConditioningEntry(encode_prompt(clip, ctx, text))],)


class CLIPSetLastLayer(Node):
    """Take the text embeddings from an earlier CLIP layer ("CLIP skip"): -1 is the last."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Set Last Layer"
    OUTPUTS = (Output("CLIP"),)

    clip = Link("CLIP")
    stop_at_clip_layer = Int(default=-1, min=-24, max=-1, step=1)

    def run(self, ctx: NodeContext, clip: TextEncoder, stop_at_clip_layer: int) -> tuple[TextEncoder]:
        layers = clip.load(ctx).text_encoder.config.num_hidden_layers
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
    """Limit conditioning to a rectangle of the image (pixels, multiples of 8), with a strength."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "Conditioning (Set Area)"
    OUTPUTS = (Output("CONDITIONING"),)

    conditioning = Link("CONDITIONING")
    width = Int(default=64, min=64, max=MAX_RESOLUTION, step=8)
    height = Int(default=64, min=64, max=MAX_RESOLUTION, step=8)
    x = Int(default=0, min=0, max=MAX_RESOLUTION, step=8)
    y = Int(default=0, min=0, max=MAX_RESOLUTION, step=8)
    strength = Float(default=1.0, min=0.0, max=10.0, step=0.01)

    def run(self, ctx: NodeContext, conditioning: Conditioning, width: int, height: int, x: int, y: int,
            strength: float) -> tuple[Conditioning]:
        area = (height // 8, width // 8, y // 8, x // 8)
        return ([ConditioningEntry(e.embeds, {**e.options, "area": area, "strength": strength})
                 for e in conditioning],)


class ConditioningZeroOut(Node):
    """Conditioning of all zeros: a neutral negative, common with inpainting and ControlNet."""

    CATEGORY = "advanced/conditioning"
    OUTPUTS = (Output("CONDITIONING"),)

    conditioning = Link("CONDITIONING")

    def run(self, ctx: NodeContext, conditioning: Conditioning) -> tuple[Conditioning]:
        return ([ConditioningEntry(torch.zeros_like(e.embeds), dict(e.options)) for e in conditioning],)
