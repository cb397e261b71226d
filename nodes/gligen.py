"""GLIGEN nodes: GLIGENLoader reads a GLIGEN text-box model from models/gligen, and
GLIGENTextBoxApply grounds a phrase in a box of the image through the conditioning.

As in ComfyUI, a box goes with the conditioning entries it is applied to (their "gligen" option
holds the model and every box so far), and the sampling loop puts the GLIGEN layers on the UNet
only for the calls of entries that carry boxes (nodes/patches/gligen_attention.py). The phrase is
encoded to CLIP's pooled output, unprojected, as ComfyUI's return_pooled="unprojected" gives it:
the text model's last layer, final layer norm applied, at the first window's end token, whatever
CLIPSetLastLayer says, with the CLIP's patches (LoRA) on.
"""

from __future__ import annotations

import torch

from plinth.nodes import prompt
from plinth.nodes.conditioning import MAX_RESOLUTION
from plinth.nodes.core.context import ModelHandle, NodeContext, NodeInputError, file_model
from plinth.nodes.core.schema import Choice, Int, Link, Node, Output, String
from plinth.nodes.core.types import Conditioning, ConditioningEntry, TextEncoder
from plinth.nodes.models.gligen import MAX_BOXES, Box, GligenModel, load_gligen
from plinth.nodes.patches.gligen_attention import GligenBoxes
from plinth.nodes.patches.model_patch import patched

PIXELS_PER_CELL = 8  # ComfyUI places boxes in latent cells of 8 pixels (SD1.x's VAE)


def pooled_text(clip: TextEncoder, ctx: NodeContext, text: str) -> torch.Tensor:
    """CLIP's unprojected pooled output [D] for `text` (see the module docstring)."""
    model = clip.load(ctx)
    tokenizer = model.tokenizer
    window = [token for token, _ in prompt.weighted_tokens(tokenizer, text)[0]]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = [tokenizer.bos_token_id, *window, eos] + [pad] * (prompt.CHUNK - len(window))
    with torch.inference_mode(), patched(ctx, clip.patches, model.text_encoder):
        hidden = model.text_encoder(torch.tensor([ids], device=ctx.device)).last_hidden_state
    return hidden[0, len(window) + 1].float().cpu()


class GLIGENLoader(Node):
    """Load a GLIGEN text-box model (e.g. gligen_sd14_textbox_pruned.safetensors) from
    models/gligen."""

    CATEGORY = "loaders"
    OUTPUTS = (Output("GLIGEN"),)

    gligen_name = Choice(source="gligen")

    def run(self, ctx: NodeContext, gligen_name: str) -> tuple[ModelHandle]:
        device, dtype = ctx.device, ctx.dtype
        handle = file_model(ctx, "gligen", gligen_name, lambda path: load_gligen(path, device, dtype))
        ctx.model(handle)  # load now, so a bad file fails this node rather than the sampler
        return (handle,)


class GLIGENTextBoxApply(Node):
    """Ground `text` in a box of the image (pixels, from the top left): the conditioning's
    entries get the box added to the ones they carry, at most 30. Apply it to the prompt the box
    belongs to; entries without boxes (e.g. the negative prompt) sample as before."""

    CATEGORY = "conditioning/gligen"
    OUTPUTS = (Output("CONDITIONING"),)

    conditioning_to = Link("CONDITIONING")
    clip = Link("CLIP")
    gligen_textbox_model = Link("GLIGEN")
    text = String(multiline=True)
    width = Int(default=64, min=8, max=MAX_RESOLUTION, step=8)
    height = Int(default=64, min=8, max=MAX_RESOLUTION, step=8)
    x = Int(default=0, min=0, max=MAX_RESOLUTION, step=8)
    y = Int(default=0, min=0, max=MAX_RESOLUTION, step=8)

    def run(
        self,
        ctx: NodeContext,
        conditioning_to: Conditioning,
        clip: TextEncoder,
        gligen_textbox_model: ModelHandle,
        text: str,
        width: int,
        height: int,
        x: int,
        y: int,
    ) -> tuple[Conditioning]:
        gligen: GligenModel = ctx.model(gligen_textbox_model)
        embedding = pooled_text(clip, ctx, text)
        if embedding.shape[0] != gligen.text_width:
            raise NodeInputError(
                f"the GLIGEN model takes {gligen.text_width}-wide phrase embeddings; this CLIP gives "
                f"{embedding.shape[0]}: use the GLIGEN model made for this checkpoint's text model"
            )
        cell = PIXELS_PER_CELL
        box = Box(embedding, height // cell, width // cell, y // cell, x // cell)
        out = []
        for entry in conditioning_to:
            previous = entry.options.get("gligen")
            boxes = (*(previous.boxes if isinstance(previous, GligenBoxes) else ()), box)
            if len(boxes) > MAX_BOXES:
                raise NodeInputError(f"GLIGEN takes at most {MAX_BOXES} boxes per conditioning; this would be the 31st")
            out.append(
                ConditioningEntry(entry.embeds, {**entry.options, "gligen": GligenBoxes(gligen_textbox_model, boxes)})
            )
        return (out,)
