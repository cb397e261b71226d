"""LoRA nodes: LoraLoader and LoraLoaderModelOnly put a LoRA file on a MODEL and its CLIP.

The file format is plinth.nodes.models.lora; the patch that applies it while a sampler or text
encoder runs is plinth.nodes.patches.lora_hooks. Here the nodes only resolve the file against
the checkpoint (so a mismatched file fails at the loader node) and attach the patch.
"""

from __future__ import annotations

from plinth.nodes.core.context import ModelHandle, NodeContext, NodeInputError, file_model
from plinth.nodes.core.schema import Choice, Float, Link, Node, Output
from plinth.nodes.core.types import CheckpointPart, DiffusionModel, TextEncoder
from plinth.nodes.models.lora import PART_LABELS, TEXT_ENCODER, TEXT_ENCODER_2, UNET, LoraFile, read_lora
from plinth.nodes.patches.lora_hooks import LoraPatch


def _lora_handle(ctx: NodeContext, lora_name: str) -> ModelHandle:
    return file_model(ctx, "loras", lora_name, read_lora)


def _with_lora(
    ctx: NodeContext, value: CheckpointPart, handle: ModelHandle, strength: float, part: str
) -> CheckpointPart:
    """`value` carrying the LoRA's layers for `part`; unchanged at strength 0 or when the file
    has none for it. Resolving here makes a mismatched file fail at the loader node."""
    if strength == 0:
        return value
    lora: LoraFile = ctx.model(handle)
    if not lora.layers.get(part):
        return value
    target = getattr(value.load(ctx), part)
    if target is None:  # e.g. lora_te1_ layers for the SDXL refiner, which has CLIP-G only
        raise NodeInputError(
            f"{handle.key.split('@')[0]}: the LoRA has layers for a {PART_LABELS[part]} this checkpoint does not have"
        )
    lora.resolve(part, target)
    return value.with_patch(LoraPatch(handle, strength, part))


class LoraLoader(Node):
    """Apply a LoRA from models/loras (kohya or diffusers layout) to a model and its CLIP.

    Strength scales the LoRA's change (negative values invert it); 0 leaves that input as it is.
    The weights are never modified: the LoRA rides on the MODEL/CLIP value and is put on the
    shared modules only while a sampler or text encoder runs.
    """

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load LoRA"
    OUTPUTS = (Output("MODEL"), Output("CLIP"))

    model = Link("MODEL")
    clip = Link("CLIP")
    lora_name = Choice(source="loras")
    strength_model = Float(default=1.0, min=-100.0, max=100.0, step=0.01)
    strength_clip = Float(default=1.0, min=-100.0, max=100.0, step=0.01)

    def run(
        self,
        ctx: NodeContext,
        model: DiffusionModel,
        clip: TextEncoder,
        lora_name: str,
        strength_model: float,
        strength_clip: float,
    ) -> tuple:
        if strength_model == 0 and strength_clip == 0:
            return model, clip
        handle = _lora_handle(ctx, lora_name)
        return (
            _with_lora(ctx, model, handle, strength_model, UNET),
            _with_lora(
                ctx, _with_lora(ctx, clip, handle, strength_clip, TEXT_ENCODER), handle, strength_clip, TEXT_ENCODER_2
            ),
        )


class LoraLoaderModelOnly(Node):
    """Apply a LoRA from models/loras to a model's UNet only, leaving prompts encoded as they were."""

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load LoRA (Model Only)"
    OUTPUTS = (Output("MODEL"),)

    model = Link("MODEL")
    lora_name = Choice(source="loras")
    strength_model = Float(default=1.0, min=-100.0, max=100.0, step=0.01)

    def run(self, ctx: NodeContext, model: DiffusionModel, lora_name: str, strength_model: float) -> tuple:
        if strength_model == 0:
            return (model,)
        return (_with_lora(ctx, model, _lora_handle(ctx, lora_name), strength_model, UNET),)
