"""GLIGEN on the UNet for one call: a GLIGEN file's fusers set into the UNet's transformer blocks,
fed with each conditioning entry's grounding tokens.

GLIGEN travels with conditioning, as in ComfyUI (GLIGENTextBoxApply puts a GligenBoxes under the
entry's "gligen" option), so one UNet call may mix entries with boxes and entries without (its
template grounds the positive prompt only). diffusers' BasicTransformerBlock already runs
`self.fuser(hidden, objs)` between its self- and cross-attention when the call's
cross_attention_kwargs carry "gligen", and the UNet turns that entry into `objs` with its
`position_net`; a UNet built without GLIGEN has neither, and it is shared by every job.
gligen_fusers() puts both on it for the duration of one call and takes them off again:
position_net hands the precomputed grounding tokens through, and each block's fuser runs a
GLIGEN's layer on the rows of the entries that use it, leaving the other rows untouched, as
ComfyUI runs an entry without GLIGEN on the plain model. Fusers pair with the UNet's transformer
blocks in the order the UNet runs them, as ComfyUI pairs them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from plinth.nodes.core.context import ModelHandle, NodeContext, NodeInputError
from plinth.nodes.models.gligen import Box, GligenModel

# One GLIGEN's rows in a call: its grounding tokens [R, MAX_BOXES, D] and the row indices [R].
_Group = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class GligenBoxes:
    """A conditioning entry's "gligen" option: the GLIGEN model and its boxes (latent cells)."""

    model: ModelHandle
    boxes: tuple[Box, ...]


class _RowFuser(nn.Module):
    """A transformer block's fuser for one call: each GLIGEN's layer on that GLIGEN's rows."""

    def __init__(self, fusers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.fusers = nn.ModuleList(fusers)

    def forward(self, hidden: torch.Tensor, groups: Sequence[_Group]) -> torch.Tensor:
        out = hidden.clone()
        for fuser, (tokens, rows) in zip(self.fusers, groups, strict=True):
            out[rows] = fuser(hidden[rows], tokens.to(hidden.dtype))
        return out


class _Grounding(nn.Module):
    """Stands in for the UNet's position_net: the grounding tokens are made before the call."""

    def forward(self, groups: Sequence[_Group]) -> Sequence[_Group]:
        return groups


def transformer_blocks(unet: Any) -> list[nn.Module]:
    """The UNet's BasicTransformerBlocks in the order it runs them: down, middle, up."""
    from diffusers.models.attention import BasicTransformerBlock

    parts = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [m for part in parts if part is not None for m in part.modules() if isinstance(m, BasicTransformerBlock)]


def _check_fit(gligen: GligenModel, blocks: Sequence[Any], name: str) -> None:
    widths = [int(b.attn1.to_q.in_features) for b in blocks]
    fusers: list[Any] = list(gligen.fusers)
    fuser_widths = [int(f.linear.out_features) for f in fusers]
    if widths != fuser_widths:
        raise NodeInputError(
            f"the GLIGEN model {name} does not fit this model: its {len(fuser_widths)} fusers have widths "
            f"{fuser_widths}, the model's {len(widths)} transformer blocks {widths}"
        )


@contextmanager
def gligen_fusers(
    ctx: NodeContext,
    unet: Any,
    per_part: Sequence[GligenBoxes | None],
    batch: int,
    size: tuple[int, int],
    kwargs: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """For one UNet call over len(per_part) entries of `batch` rows each, on a latent `size`
    (height, width): `kwargs` with the GLIGEN cross_attention_kwargs added, while the fusers sit
    on the UNet; `kwargs` itself when no entry has boxes."""
    if not any(per_part):
        yield kwargs
        return
    blocks = transformer_blocks(unet)
    models: dict[str, GligenModel] = {}
    tokens: dict[str, list[torch.Tensor]] = {}
    rows: dict[str, list[int]] = {}
    param = next(unet.parameters())
    for index, entry in enumerate(per_part):
        if entry is None:
            continue
        key = entry.model.key
        if key not in models:
            models[key] = ctx.model(entry.model)
            _check_fit(models[key], blocks, key.split("@")[0])
        grounding = models[key].grounding_tokens(entry.boxes, size[0], size[1])
        tokens.setdefault(key, []).append(grounding.to(param.device).expand(batch, -1, -1))
        rows.setdefault(key, []).extend(range(index * batch, (index + 1) * batch))
    groups = [(torch.cat(tokens[k]), torch.tensor(rows[k], device=param.device)) for k in models]
    saved = [(block, block._modules.get("fuser")) for block in blocks]
    saved_position = unet._modules.get("position_net")
    try:
        for i, block in enumerate(blocks):
            block.fuser = _RowFuser([m.fusers[i] for m in models.values()])
        unet.position_net = _Grounding()
        extra = {**kwargs.get("cross_attention_kwargs", {}), "gligen": {"groups": groups}}
        yield {**kwargs, "cross_attention_kwargs": extra}
    finally:
        for block, fuser in saved:
            _restore(block, "fuser", fuser)
        _restore(unet, "position_net", saved_position)


def _restore(module: nn.Module, name: str, previous: nn.Module | None) -> None:
    """Put back a submodule slot as it was before the call (absent, or the module it held)."""
    module._modules.pop(name, None)
    if previous is not None:
        module.add_module(name, previous)
