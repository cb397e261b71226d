"""Prompt encoding nodes."""

from __future__ import annotations

import torch

from plinth.nodes.context import NodeContext
from plinth.nodes.patches import patched
from plinth.nodes.schema import Link, Node, Output, String
from plinth.nodes.types import Conditioning, ConditioningEntry, TextEncoder

CHUNK = 75  # tokens per CLIP window, between the start and end tokens


def encode_prompt(clip: TextEncoder, ctx: NodeContext, text: str) -> torch.Tensor:
    """Token embeddings [1, 77*k, D] for `text`.

    Prompts longer than one 77-token window are split into windows of 75 tokens, each encoded
    with its own start and end token and concatenated, as ComfyUI does; nothing is truncated.
    """
    model = clip.load(ctx)
    tokenizer, encoder = model.tokenizer, model.text_encoder
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    windows = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)] or [[]]
    rows = [[bos] + w + [eos] + [pad] * (CHUNK - len(w)) for w in windows]
    tokens = torch.tensor(rows, dtype=torch.long, device=ctx.device)
    with torch.inference_mode(), patched(ctx, clip.patches, encoder):
        if clip.stop_at_layer == -1:
            hidden = encoder(tokens).last_hidden_state
        else:
            states = encoder(tokens, output_hidden_states=True).hidden_states
            hidden = encoder.text_model.final_layer_norm(states[clip.stop_at_layer])
    return hidden.reshape(1, -1, hidden.shape[-1]).float()


class CLIPTextEncode(Node):
    """Encode a prompt with the checkpoint's CLIP text model into conditioning."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Text Encode (Prompt)"
    OUTPUTS = (Output("CONDITIONING"),)

    text = String(multiline=True)
    clip = Link("CLIP")

    def run(self, ctx: NodeContext, text: str, clip: TextEncoder) -> tuple[Conditioning]:
        return ([ConditioningEntry(encode_prompt(clip, ctx, text))],)
