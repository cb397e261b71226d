"""LoRA as a model patch: forward hooks that add a LoRA's update to the layers it matches.

The model's weights are never copied or edited: `LoraPatch.applied()` adds
strength * alpha/rank * up(down(x)) to each matched layer's output through a forward hook and
removes the hooks on exit, so several LoRAs stack and the next job sees the plain model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plinth.nodes.core.context import ModelHandle, NodeContext
from plinth.nodes.models.lora import LoraFile, LoraLayer
from plinth.nodes.patches.model_patch import Progress


def _delta_hook(module: nn.Module, layer: LoraLayer, strength: float) -> Callable[..., torch.Tensor]:
    """A forward hook adding strength * scale * up(down(x)), in the module's dtype and device."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), "LoRA layers resolve to Linear and Conv2d modules only"
    down = layer.down.to(weight.device, weight.dtype)
    up = (layer.up.float() * (strength * layer.scale)).to(weight.device, weight.dtype)
    if isinstance(module, nn.Conv2d):
        stride, padding, dilation = module.stride, module.padding, module.dilation

        def delta(x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(F.conv2d(x, down, None, stride, padding, dilation), up)
    else:

        def delta(x: torch.Tensor) -> torch.Tensor:
            return F.linear(F.linear(x, down), up)

    def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + delta(args[0])

    return hook


@dataclass(frozen=True)
class LoraPatch:
    """A LoRA file on one part of a checkpoint ("unet" or "text_encoder") at a strength."""

    lora: ModelHandle
    strength: float
    part: str

    @contextmanager
    def applied(self, ctx: NodeContext, module: nn.Module) -> Iterator[None]:
        lora: LoraFile = ctx.model(self.lora)
        handles = []
        try:
            for path, layer in lora.resolve(self.part, module).items():
                target = module.get_submodule(path)
                handles.append(target.register_forward_hook(_delta_hook(target, layer, self.strength)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def call_kwargs(self, ctx: NodeContext, positive_rows: Sequence[bool], progress: Progress) -> dict[str, Any]:
        return {}
