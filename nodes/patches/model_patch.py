"""The protocol every model patch follows, and applying a stack of them. A patch is a change a
MODEL or CLIP carries (LoRA, IP-Adapter, ...), put on the shared torch modules only while one
node runs and taken off afterwards.

Loaded weights are shared by every job and graph (the model manager holds one copy), so a patch
never edits them for good: `applied()` installs hooks or processors for the duration of a
`with` block. Patches stack in the order the graph applied them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from plinth.nodes.core.context import NodeContext


@dataclass(frozen=True)
class Progress:
    """Where one model call sits in the schedule, for what acts only between a start and an end
    percent (ControlNets, T2I-Adapters, IPAdapter). ComfyUI's test, in sigma: active while
    percent_to_sigma(end) <= sigma <= percent_to_sigma(start). Percent 0 maps above every sigma
    (ComfyUI's 999999999.9), so a window that ends at 0 never acts."""

    sigma: float
    percent_to_sigma: Callable[[float], float]

    def within(self, start_percent: float, end_percent: float) -> bool:
        return self.percent_to_sigma(end_percent) <= self.sigma <= self.percent_to_sigma(start_percent)


class ModelPatch(Protocol):
    def applied(self, ctx: NodeContext, module: torch.nn.Module) -> AbstractContextManager[None]:
        """Put the patch on `module` (a UNet or a CLIP text model) for the duration of a `with`."""

    def call_kwargs(self, ctx: NodeContext, positive_rows: Sequence[bool], progress: Progress) -> dict[str, Any]:
        """Extra keyword arguments for one UNet call whose batch rows are positive (True) or
        negative (False) conditioning, at `progress` through the schedule; {} for patches that
        only change weights. A patch active only in part of the schedule (start/end percent)
        switches itself on or off here (progress.within)."""


@contextmanager
def patched(ctx: NodeContext, patches: Sequence[ModelPatch], module: torch.nn.Module) -> Iterator[None]:
    """All `patches` applied to `module`, in order, undone in reverse on exit."""
    with ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch.applied(ctx, module))
        yield


def merged_call_kwargs(
    ctx: NodeContext, patches: Sequence[ModelPatch], positive_rows: Sequence[bool], progress: Progress
) -> dict[str, Any]:
    """The patches' extra UNet keyword arguments, merged (nested dicts merged key by key)."""
    merged: dict[str, Any] = {}
    for patch in patches:
        for key, value in patch.call_kwargs(ctx, positive_rows, progress).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged
