"""T2I-Adapters (TencentARC) read through ControlNetLoader, as ComfyUI reads them, and their
features for a UNet call.

A T2I-Adapter turns a hint image into one feature map per UNet down level, added to the UNet's
hidden state at the end of that level (before its downsampler). It looks at the hint only, so
its features are made once per hint and size, not once per step. ComfyUI's ControlNetLoader
recognises an adapter by the file's keys and returns a CONTROL_NET that ControlNetApply(Advanced)
attach like a ControlNet (strength, start/end percent); here load_controlnet hands such files to
load_t2i_adapter, and the sampling loop passes adapter_residuals() to the UNet as diffusers'
down_intrablock_additional_residuals.

Layouts, all built as diffusers' T2IAdapter with sizes read from the shapes:
- the original full adapter (t2iadapter_depth_sd14v1.pth, ...): conv_in, body.<n>.block1/block2,
  body.<n>.in_conv where the width changes; <n> counts resnets over all levels;
- the original light adapter (t2iadapter_color_sd14v1.pth): body.<level>.in_conv/out_conv and
  body.<level>.body.<n>.block1/block2;
- diffusers' T2IAdapter (full or light), adapter.*: a .safetensors file or a folder whose
  config.json names T2IAdapter.
The original adapters pool an odd-sized map with one cell of zero padding on both sides, where
diffusers' pool takes a partial window; the original pooling is kept, so odd latent sizes give
ComfyUI's features. SDXL adapters and the original variants diffusers cannot express (strided
convolution downsampling, 3x3 second convolutions, skip convolutions) are refused by name.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plinth.nodes.core.context import NodeContext, NodeInputError
from plinth.nodes.core.types import ControlSpec
from plinth.nodes.models.strict_load import assign_strict
from plinth.nodes.patches.model_patch import Progress
from plinth.nodes.resize import repeat_to_batch, resize

UNSHUFFLE = 8  # SD1.x adapters work on 8x8 pixel cells, one per latent cell
_CACHED = 4  # feature sets kept per adapter (hint and size)


def adapter_layout(keys: Sequence[str]) -> str | None:
    """ "full", "light" (original layouts), "diffusers", or None when the keys are no adapter's."""
    names = set(keys)
    if "adapter.conv_in.weight" in names or "adapter.body.0.in_conv.weight" in names:
        return "diffusers"
    if "body.0.in_conv.weight" in names and "body.0.out_conv.weight" in names:
        return "light"
    if "conv_in.weight" in names and "body.0.block1.weight" in names:
        return "full"
    return None


def _count(keys: Sequence[str], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def _original_to_diffusers(state: dict[str, torch.Tensor], layout: str, name: str) -> dict[str, torch.Tensor]:
    """Original keys as diffusers' T2IAdapter names them."""
    if any(k.endswith("down_opt.op.weight") for k in state):
        raise NodeInputError(f"{name}: a T2I-Adapter with strided-convolution downsampling, which Plinth cannot run")
    if any(".skep." in k for k in state):
        raise NodeInputError(f"{name}: a T2I-Adapter with skip convolutions (sk=False), which Plinth cannot run")
    out = {}
    if layout == "light":
        for key, value in state.items():
            key = re.sub(r"^body\.(\d+)\.body\.(\d+)\.", r"body.\1.resnets.\2.", key)
            out["adapter." + key] = value
        return out
    resnets = _count(list(state), r"body\.(\d+)\.")
    starts = sorted(int(k.split(".")[1]) for k in state if re.match(r"body\.\d+\.in_conv\.weight$", k))
    per_level = starts[0] if starts else 2  # resnets per level: the first width change, else ComfyUI's 2
    if per_level == 0 or resnets % per_level or any(s % per_level for s in starts):
        raise NodeInputError(f"{name}: the T2I-Adapter's {resnets} resnets do not split into levels")
    for key, value in state.items():
        match = re.match(r"body\.(\d+)\.(.+)$", key)
        if match:
            level, index = divmod(int(match.group(1)), per_level)
            rest = match.group(2)
            key = f"body.{level}.{rest}" if rest.startswith("in_conv.") else f"body.{level}.resnets.{index}.{rest}"
        out["adapter." + key] = value
    return out


class _OddPadPool(nn.Module):
    """The original adapters' 2x2 average pool: an odd side gets one cell of zero padding on
    both ends (counted in the average)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2, 2, padding=(x.shape[2] % 2, x.shape[3] % 2))


def _adapter_config(state: dict[str, torch.Tensor], name: str) -> dict[str, Any]:
    """diffusers T2IAdapter arguments for weights in its key layout."""
    keys = list(state)
    levels = _count(keys, r"adapter\.body\.(\d+)\.")
    resnets = _count(keys, r"adapter\.body\.0\.resnets\.(\d+)\.")
    if "adapter.conv_in.weight" in state:
        first = state["adapter.conv_in.weight"]
        channels = [state[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0] for i in range(levels)]
        kind = "full_adapter"
        if state["adapter.body.0.resnets.0.block2.weight"].shape[-1] != 1:
            raise NodeInputError(
                f"{name}: a T2I-Adapter with 3x3 second convolutions (ksize 3), which Plinth cannot run"
            )
    else:
        first = state["adapter.body.0.in_conv.weight"]
        outs = [state[f"adapter.body.{i}.out_conv.weight"].shape[0] for i in range(levels)]
        if levels < 2 or outs[-1] != outs[-2]:
            raise NodeInputError(f"{name}: a light T2I-Adapter whose last two levels differ in width ({outs})")
        channels, kind = outs[:-1], "light_adapter"
    hint_channels, rest = divmod(first.shape[1], UNSHUFFLE**2)
    if rest or hint_channels not in (1, 3):
        raise NodeInputError(
            f"{name}: a T2I-Adapter for {first.shape[1]} unshuffled input channels, not SD1.x's 64 or 192 "
            "(SDXL adapters do not load here)"
        )
    return {
        "in_channels": hint_channels,
        "channels": channels,
        "num_res_blocks": resnets,
        "downscale_factor": UNSHUFFLE,
        "adapter_type": kind,
    }


class T2IAdapterModel(nn.Module):
    """A loaded T2I-Adapter: diffusers' T2IAdapter and the hint channels it takes (1: the
    hint's channels are averaged, as ComfyUI does), with its last feature sets kept."""

    def __init__(self, adapter: nn.Module, hint_channels: int) -> None:
        super().__init__()
        self.adapter = adapter
        self.hint_channels = hint_channels
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()

    def features(self, hint: torch.Tensor, height: int, width: int, scale: int) -> list[torch.Tensor]:
        """The feature maps for an IMAGE hint [B,H,W,C] on a latent height x width (`scale`
        pixels per cell): the hint centre-cropped and resized nearest-exact, as ComfyUI fits it."""
        param = next(self.parameters())
        key = (id(hint), height, width, scale, param.device, param.dtype)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] is hint:  # the entry holds the hint, so its id is not reused
                self._cache.move_to_end(key)
                return cached[1]
        pixels = resize(hint[..., :3].movedim(-1, 1).float(), width * scale, height * scale, "nearest-exact", "center")
        if self.hint_channels == 1 and pixels.shape[1] > 1:
            pixels = pixels.mean(dim=1, keepdim=True)
        with torch.inference_mode():
            maps = list(self.adapter(pixels.to(param.device, param.dtype)))
        with self._lock:
            self._cache[key] = (hint, maps)
            while len(self._cache) > _CACHED:
                self._cache.popitem(last=False)
        return maps


def build_t2i_adapter(state: dict[str, torch.Tensor], name: str) -> T2IAdapterModel:
    """A T2IAdapterModel with exactly these weights (any layout adapter_layout names)."""
    from diffusers.models.adapter import T2IAdapter

    layout = adapter_layout(list(state))
    if layout is None:
        raise NodeInputError(f"{name}: not a T2I-Adapter")
    if layout != "diffusers":
        state = _original_to_diffusers(state, layout, name)
    config = _adapter_config(state, name)
    with torch.device("meta"):
        adapter = T2IAdapter(**config)
    assign_strict(adapter, state, name, "a T2I-Adapter layout")
    for block in adapter.adapter.body:
        if block.downsample is not None:
            block.downsample = _OddPadPool()
    return T2IAdapterModel(adapter, config["in_channels"])


def is_t2i_adapter(path: Path) -> bool:
    """Whether a ControlNetLoader file (or diffusers folder) holds a T2I-Adapter."""
    from safetensors import safe_open

    weights = _weights_file(path) if path.is_dir() else path
    if weights is None or weights.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(weights), framework="pt") as f:
            return adapter_layout(list(f.keys())) is not None
    except Exception:  # unreadable: load_controlnet reports it
        return False


def _weights_file(folder: Path) -> Path | None:
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("_class_name") != "T2IAdapter":
        return None
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    return next((folder / n for n in names if (folder / n).is_file()), None)


def load_t2i_adapter(path: Path, device: torch.device, dtype: torch.dtype) -> T2IAdapterModel:
    """A T2I-Adapter from a .safetensors file or a diffusers folder, in eval mode without
    gradients, on `device` in `dtype`."""
    from safetensors.torch import load_file

    weights = _weights_file(path) if path.is_dir() else path
    if weights is None:
        raise NodeInputError(f"{path.name}: no T2IAdapter config.json and weights in the folder")
    try:
        # Copied out of the file's buffer into freshly allocated (aligned) memory: tensors at the
        # file's odd offsets can take other SIMD paths, so layouts would differ in the last bit.
        state = {k: v.clone() for k, v in load_file(str(weights)).items()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc
    model = build_t2i_adapter(state, path.name)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def is_adapter(ctx: NodeContext, spec: ControlSpec) -> bool:
    """Whether a CONTROL_NET attached to conditioning is a T2I-Adapter (not a ControlNet)."""
    return isinstance(ctx.model(spec.controlnet), T2IAdapterModel)


def adapter_residuals(
    ctx: NodeContext,
    unet: Any,
    controls: Sequence[Sequence[ControlSpec]],
    x_in: torch.Tensor,
    progress: Progress,
    scale: int,
) -> list[torch.Tensor] | None:
    """The T2I-Adapter features for one UNet call over len(controls) entries of x_in's batch
    each: per entry the strength-weighted sum of its adapters whose window holds `progress`,
    zeros for an entry without; None when no entry has one."""
    batch, _, height, width = x_in.shape
    per_part: list[list[torch.Tensor] | None] = []
    for specs in controls:
        summed: list[torch.Tensor] | None = None
        for spec in specs:
            if not progress.within(spec.start_percent, spec.end_percent) or not is_adapter(ctx, spec):
                continue
            maps = ctx.model(spec.controlnet).features(spec.hint, height, width, scale)
            scaled = [repeat_to_batch(m, batch) * spec.strength for m in maps]
            summed = scaled if summed is None else [a + b for a, b in zip(summed, scaled, strict=True)]
        per_part.append(summed)
    template = next((p for p in per_part if p is not None), None)
    if template is None:
        return None
    widths, fits = [int(m.shape[1]) for m in template], [int(c) for c in unet.config.block_out_channels]
    if widths != fits:
        raise NodeInputError(
            f"the T2I-Adapter's features (widths {widths}) do not fit this model's down blocks (widths {fits})"
        )
    dtype = next(unet.parameters()).dtype
    return [
        torch.cat([(p[i] if p else torch.zeros_like(m)) for p in per_part]).to(dtype) for i, m in enumerate(template)
    ]
