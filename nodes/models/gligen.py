"""GLIGEN text-box models (ComfyUI's gligen_sd14_textbox_pruned.safetensors), loaded offline.

GLIGEN grounds phrases in boxes: each box becomes one grounding token (its phrase's pooled CLIP
embedding and its corners, Fourier-encoded, through a small MLP), and a gated self-attention
layer (a "fuser") in every transformer block of the UNet mixes those tokens into the image
tokens between the block's self- and cross-attention. A file holds both, keyed as in the GLIGEN
UNet it was cut from:

- position_net.*: null_positive_feature, null_position_feature and linears.0/2/4;
- <block>.transformer_blocks.<k>.fuser.*, for every transformer block ("input_blocks.1.1", ...,
  "middle_block.1", ..., "output_blocks.11.1"): linear, attn.to_q/to_k/to_v/to_out.0,
  ff.net.0.proj, ff.net.2, norm1, norm2, alpha_attn and alpha_dense.

diffusers' GLIGENTextBoundingboxProjection and GatedSelfAttentionDense have exactly these
parameter names, so the weights load into them once a prefix (e.g. model.diffusion_model.) is
cut. Sizes come from the shapes: the phrase width (null_positive_feature), the grounding-token
width (the fusers' linear), each fuser's width and the number of Fourier frequencies. Heads
follow ComfyUI's rule: 8 for a 768-wide text model (SD1.x), else 64-wide heads (at least one).
Loading is strict: a missing, unexpected or misshapen weight is a NodeInputError naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.strict_load import assign_strict

MAX_BOXES = 30  # grounding tokens per conditioning entry; unused ones carry the null features
POSITION = "position_net."
_SECTIONS = ("input_blocks", "middle_block", "output_blocks")
_FUSER = re.compile(
    r"^(?:.*\.)?(input_blocks|middle_block|output_blocks)\.((?:\d+\.)+)transformer_blocks\.(\d+)\.fuser\.(.+)$"
)


@dataclass(frozen=True, eq=False)
class Box:
    """One GLIGEN box: its phrase's pooled text embedding [D] and its place in latent cells."""

    embedding: torch.Tensor
    height: int
    width: int
    y: int
    x: int


class GligenModel(nn.Module):
    """A GLIGEN file: the box projection and the fusers, in the order the UNet runs its
    transformer blocks (down, middle, up), with those blocks' ldm names for messages."""

    def __init__(self, position_net: Any, fusers: Sequence[nn.Module], blocks: Sequence[str]) -> None:
        super().__init__()
        self.position_net = position_net
        self.fusers = nn.ModuleList(fusers)
        self.blocks = list(blocks)
        self.text_width = int(position_net.positive_len)  # the phrase embeddings' (CLIP's) width

    def grounding_tokens(self, boxes: Sequence[Box], height: int, width: int) -> torch.Tensor:
        """The grounding tokens [1, MAX_BOXES, D] of `boxes` on a latent height x width: each box
        as (x1, y1, x2, y2) over the latent's size (as ComfyUI places them), unused slots masked
        to the learned null features."""
        param = next(self.parameters())
        corners = torch.zeros(1, MAX_BOXES, 4)
        masks = torch.zeros(1, MAX_BOXES)
        phrases = torch.zeros(1, MAX_BOXES, self.text_width)
        for i, box in enumerate(boxes):
            corners[0, i] = torch.tensor(
                [box.x / width, box.y / height, (box.x + box.width) / width, (box.y + box.height) / height]
            )
            masks[0, i] = 1.0
            phrases[0, i] = box.embedding.float()
        device, dtype = param.device, param.dtype
        return self.position_net(corners.to(device, dtype), masks.to(device, dtype), phrases.to(device, dtype))


def _heads(query_dim: int, key_dim: int) -> int:
    """ComfyUI's rule for a fuser's attention heads (shapes do not say)."""
    return 8 if key_dim == 768 else max(1, query_dim // 64)


def _split(state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], dict[tuple, dict]]:
    """The file's weights as (position_net weights, {block sort key: (ldm name, fuser weights)})."""
    position: dict[str, torch.Tensor] = {}
    fusers: dict[tuple, dict[str, Any]] = {}
    stray = []
    for key, value in state.items():
        match = _FUSER.match(key)
        if match:
            section, indices, transformer, rest = match.groups()
            numbers = tuple(int(i) for i in indices.rstrip(".").split("."))
            sort_key = (_SECTIONS.index(section), numbers, int(transformer))
            block = f"{section}.{indices}transformer_blocks.{transformer}"
            fusers.setdefault(sort_key, {"block": block, "weights": {}})["weights"][rest] = value
        elif POSITION in key and key.split(POSITION, 1)[0] in ("", "model.diffusion_model."):
            position[key.split(POSITION, 1)[1]] = value
        else:
            stray.append(key)
    if stray:
        raise NodeInputError(f"{name}: not a GLIGEN text-box model: unexpected weights {sorted(stray)[:5]}")
    if not position or not fusers:
        raise NodeInputError(
            f"{name}: not a GLIGEN text-box model (it needs position_net.* and "
            "<block>.transformer_blocks.<k>.fuser.* weights)"
        )
    return position, fusers


def build_gligen(state: dict[str, torch.Tensor], name: str) -> GligenModel:
    """A GligenModel with exactly these weights, its sizes read off their shapes."""
    from diffusers.models.attention import GatedSelfAttentionDense
    from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

    position, fusers = _split(state, name)
    for key in ("null_positive_feature", "null_position_feature", "linears.4.weight"):
        if key not in position:
            raise NodeInputError(f"{name}: not a GLIGEN text-box model: weight {POSITION}{key} is missing")
    position_dim = position["null_position_feature"].shape[0]
    if position_dim % 8:
        raise NodeInputError(f"{name}: {POSITION}null_position_feature has {position_dim} values, not 8 per frequency")
    with torch.device("meta"):
        projection = GLIGENTextBoundingboxProjection(
            positive_len=position["null_positive_feature"].shape[0],
            out_dim=position["linears.4.weight"].shape[0],
            feature_type="text-only",
            fourier_freqs=position_dim // 8,
        )
    assign_strict(projection, position, name, "GLIGEN's position_net layout")
    modules, blocks = [], []
    for sort_key in sorted(fusers):
        block, weights = fusers[sort_key]["block"], fusers[sort_key]["weights"]
        if "linear.weight" not in weights:
            raise NodeInputError(f"{name}: weight {block}.fuser.linear.weight is missing")
        query_dim, key_dim = weights["linear.weight"].shape
        heads = _heads(query_dim, key_dim)
        with torch.device("meta"):
            fuser = GatedSelfAttentionDense(query_dim, key_dim, heads, query_dim // heads)
        assign_strict(fuser, weights, name, f"GLIGEN's {block}.fuser layout")
        modules.append(fuser)
        blocks.append(block)
    return GligenModel(projection, modules, blocks)


def load_gligen(path: Path, device: torch.device, dtype: torch.dtype) -> GligenModel:
    """A GLIGEN text-box model from a .safetensors file, in eval mode without gradients, on
    `device` in `dtype`."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise NodeInputError(f"{path.name}: only .safetensors GLIGEN files load")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc
    model = build_gligen(state, path.name)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
