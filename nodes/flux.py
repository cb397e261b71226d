"""FLUX.1's conditioning: T5's token states, CLIP-L's pooled text and the guidance strength, and the loaders of
its text-encoder files.

As ComfyUI encodes for FLUX.1 (comfy/text_encoders/flux.py FluxClipModel): the prompt's T5 token states are the
conditioning (each word tokenised alone, one `</s>`, `<pad>` up to 256 tokens, no attention mask, the last layer
after the final layer norm: plinth.nodes.models.t5), and CLIP-L's pooled text rides beside them as the
"pooled_output" option: the final-normed state of the end token in the prompt's first 77-token window (start
token, up to 75 tokens, end token, padded with the end token), unweighted, as CLIPTextModel's pooler_output gives
it. CLIP-L's token states are not used, so CLIPSetLastLayer changes nothing here, as in ComfyUI. CLIPTextEncode
gives one prompt to both; CLIPTextEncodeFlux each its own, and sets "guidance", the strength FLUX.1-dev's
guidance embedding reads (FluxGuidance sets it on a conditioning; the sampler takes 3.5 where none is set).

CLIPLoader and DualCLIPLoader load text-encoder files from models/text_encoders (or models/clip) as ComfyUI's do,
by `type`: DualCLIPLoader "flux" takes CLIP-L and T5 in either order, CLIPLoader "stable_diffusion" a CLIP-L alone
(SD1.x's text side); the other types ComfyUI lists are refused at validation, naming the type
(plinth.nodes.models.text_encoders).
"""

from __future__ import annotations

from typing import Any

import torch

from plinth.nodes import prompt
from plinth.nodes.core.context import ModelHandle, NodeContext, NodeInputError
from plinth.nodes.core.schema import Choice, Float, Link, Node, Output, String
from plinth.nodes.core.types import Conditioning, ConditioningEntry, TextEncoder
from plinth.nodes.models import t5
from plinth.nodes.models.checkpoint import StableDiffusion
from plinth.nodes.models.text_encoders import (
    CLIP_LOADER_TYPES,
    DEVICES,
    DUAL_CLIP_LOADER_TYPES,
    load_text_encoders,
    unsupported,
)
from plinth.nodes.patches.model_patch import patched
from plinth.nodes.textual_inversion import PromptText, embedding_lookup

FAMILY = "flux"
DEFAULT_GUIDANCE = 3.5  # ComfyUI's CLIPTextEncodeFlux / FluxGuidance default
DEVICE_TOOLTIP = "accepted for ComfyUI's graphs; Plinth's model manager places the text models itself"


def is_flux(model: StableDiffusion) -> bool:
    return model.family == FAMILY


def _device(module: Any) -> torch.device:
    return next(module.parameters()).device


def _no_embeddings(name: str) -> torch.Tensor | None:
    return None


def clip_pooled(
    tokenizer: Any, encoder: Any, text: str, device: torch.device, embeddings: prompt.EmbeddingLookup = _no_embeddings
) -> torch.Tensor:
    """CLIP's pooled text of `text`, float32 [1, hidden]: the text model's pooler_output (the final-normed
    end-token state) of the prompt's first window, without emphasis, as ComfyUI takes it for FLUX.1 (called with
    any model patches already applied). `embeddings` finds `embedding:NAME` vectors."""
    first = [token for token, _ in prompt.weighted_tokens(tokenizer, text, embeddings)[0]]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    row = [tokenizer.bos_token_id, *first, eos] + [pad] * (prompt.CHUNK - len(first))
    vectors = {(0, j): t for j, t in enumerate(row) if isinstance(t, torch.Tensor)}
    ids = [[prompt.PLACEHOLDER if isinstance(t, torch.Tensor) else t for t in row]]
    with prompt._token_vectors(encoder, vectors):
        out = encoder(torch.tensor(ids, dtype=torch.long, device=device))
    return out.pooler_output.float()


def _flux_clip(clip: TextEncoder, ctx: NodeContext, node: str) -> StableDiffusion:
    model = clip.load(ctx)
    if not is_flux(model):
        raise NodeInputError(
            f"{node} needs FLUX.1's CLIP (DualCLIPLoader type flux: CLIP-L and T5); this CLIP is {model.family}'s"
        )
    return model


def encode_flux(clip: TextEncoder, ctx: NodeContext, text_l: str, text_t5: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5's token states [1, L, d_model], L = max(256, tokens + 1), CLIP-L's pooled text [1, hidden]), both
    float32, of two prompts: `text_l` for CLIP-L, `text_t5` for T5. A patch naming a part (a LoRA's layers) goes
    on that text model only: "text_encoder" is CLIP-L, "text_encoder_2" T5."""
    model = _flux_clip(clip, ctx, "a FLUX.1 prompt")
    clip_l, t5_model = model.text_encoder, model.text_encoder_2

    def patches(part: str) -> list[Any]:
        return [p for p in clip.patches if getattr(p, "part", part) == part]

    with torch.inference_mode(), patched(ctx, patches("text_encoder_2"), t5_model):
        hidden = t5.encode_t5(model.tokenizer_2, t5_model, text_t5, _device(t5_model))
    lookup = embedding_lookup(ctx, clip_l.get_input_embeddings().embedding_dim, "clip_l")
    with torch.inference_mode(), patched(ctx, patches("text_encoder"), clip_l):
        pooled = clip_pooled(model.tokenizer, clip_l, text_l, _device(clip_l), lookup)
    return hidden, pooled


def encode_prompt_flux(clip: TextEncoder, ctx: NodeContext, text: str) -> ConditioningEntry:
    """CLIPTextEncode's conditioning on FLUX.1's CLIP: one prompt through both text models."""
    hidden, pooled = encode_flux(clip, ctx, text, text)
    return ConditioningEntry(hidden, {"pooled_output": pooled})


class CLIPTextEncodeFlux(Node):
    """Encode FLUX.1's two prompts (clip_l for CLIP-L's pooled text, t5xxl for T5's token states) with the
    guidance strength FLUX.1-dev's guidance embedding reads."""

    CATEGORY = "advanced/conditioning/flux"
    OUTPUTS = (Output("CONDITIONING"),)

    clip = Link("CLIP")
    clip_l = PromptText(multiline=True)
    t5xxl = String(multiline=True, tooltip="T5 reads `embedding:NAME` as plain text")
    guidance = Float(default=DEFAULT_GUIDANCE, min=0.0, max=100.0, step=0.1)

    def run(self, ctx: NodeContext, clip: TextEncoder, clip_l: str, t5xxl: str, guidance: float) -> tuple[Conditioning]:
        hidden, pooled = encode_flux(clip, ctx, clip_l, t5xxl)
        return ([ConditioningEntry(hidden, {"pooled_output": pooled, "guidance": guidance})],)


class FluxGuidance(Node):
    """Set the guidance strength FLUX.1-dev's guidance embedding reads on every entry of a conditioning."""

    CATEGORY = "advanced/conditioning/flux"
    OUTPUTS = (Output("CONDITIONING"),)

    conditioning = Link("CONDITIONING")
    guidance = Float(default=DEFAULT_GUIDANCE, min=0.0, max=100.0, step=0.1)

    def run(self, ctx: NodeContext, conditioning: Conditioning, guidance: float) -> tuple[Conditioning]:
        return ([ConditioningEntry(entry.embeds, {**entry.options, "guidance": guidance}) for entry in conditioning],)


def _clip_handle(ctx: NodeContext, names: list[str], kind: str, node: str) -> ModelHandle:
    """A handle for the CLIP made of these text-encoder files: keyed by the names (sorted, so either order shares
    one loaded copy), the type, and the files' fingerprints, so a file replaced under its name loads anew."""
    names = sorted(names)
    paths = [ctx.model_path("text_encoders", name) for name in names]
    prints = "+".join(ctx.model_fingerprint("text_encoders", name)[:16] for name in names)
    models_dir, device, dtype = ctx.models_dir, ctx.device, ctx.dtype
    return ModelHandle(
        f"text_encoders/{'+'.join(names)}#{kind}@{prints}",
        lambda: load_text_encoders(paths, kind, models_dir, dtype, node).to(device),
    )


class CLIPLoader(Node):
    """Load a text encoder from models/text_encoders (or models/clip) as a CLIP. Plinth builds type
    stable_diffusion (a CLIP-L file: SD1.x's text model) so far; FLUX.1's two files load with DualCLIPLoader."""

    CATEGORY = "advanced/loaders"
    DISPLAY_NAME = "Load CLIP"
    OUTPUTS = (Output("CLIP"),)

    clip_name = Choice(source="text_encoders")
    type = Choice(options=CLIP_LOADER_TYPES)
    device = Choice(options=DEVICES, default="default", optional=True, tooltip=DEVICE_TOOLTIP)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        problem = unsupported("CLIPLoader", inputs.get("type", ""), 1)
        return [("type", "custom_validation_failed", problem)] if problem else []

    def run(self, ctx: NodeContext, clip_name: str, type: str, device: str) -> tuple[TextEncoder]:
        handle = _clip_handle(ctx, [clip_name], type, "CLIPLoader")
        ctx.model(handle)  # load now, so a bad file fails this node rather than the prompt
        return (TextEncoder(handle),)


class DualCLIPLoader(Node):
    """Load two text encoders from models/text_encoders (or models/clip) as one CLIP. Plinth builds type flux so
    far: CLIP-L and T5 (t5xxl fp16, fp8 or scaled fp8), in either order."""

    CATEGORY = "advanced/loaders"
    OUTPUTS = (Output("CLIP"),)

    clip_name1 = Choice(source="text_encoders")
    clip_name2 = Choice(source="text_encoders")
    type = Choice(options=DUAL_CLIP_LOADER_TYPES)
    device = Choice(options=DEVICES, default="default", optional=True, tooltip=DEVICE_TOOLTIP)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        problem = unsupported("DualCLIPLoader", inputs.get("type", ""), 2)
        return [("type", "custom_validation_failed", problem)] if problem else []

    def run(self, ctx: NodeContext, clip_name1: str, clip_name2: str, type: str, device: str) -> tuple[TextEncoder]:
        handle = _clip_handle(ctx, [clip_name1, clip_name2], type, "DualCLIPLoader")
        ctx.model(handle)  # load now, so a bad file fails this node rather than the prompt
        return (TextEncoder(handle),)
