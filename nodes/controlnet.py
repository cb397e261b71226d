"""ControlNet: ControlNetLoader reads SD1.x ControlNets; ControlNetApplyAdvanced attaches one to
conditioning, where the sampling loop (denoise.py) evaluates it at every step in its window.

Three kinds of file load, fully offline and all into a diffusers ControlNetModel:

- a diffusers folder: config.json plus diffusion_pytorch_model[.fp16].safetensors;
- a single .safetensors in the diffusers key layout (controlnet_cond_embedding.*, down_blocks.*,
  controlnet_down_blocks.*, controlnet_mid_block.*);
- a single .safetensors in the original ControlNet layout (input_hint_block.*, input_blocks.*,
  zero_convs.*, middle_block_out.*), unprefixed as lllyasviel's v1.1 files or under
  control_model.* as the v1.0 files, which also carry a whole SD model that is not read.

A T2I-Adapter in the same folder (original .pth/.safetensors layouts or diffusers') is recognised
by its keys and loaded as one, as ComfyUI does (nodes/models/t2i_adapter.py); ControlNetApply-
Advanced attaches it the same way and the sampling loop adds its features instead of residuals.

A single file has no config, so the architecture is read off the weights with SD1.5's UNet
config as the template (the ControlNet is a copy of the UNet's encoder): levels, layers per
level, widths, attention placement, input channels, cross-attention size and the hint encoder's
widths come from tensor names and shapes. Original keys are converted with diffusers' own
function. Loading is strict: a missing, unexpected or misshapen weight is a NodeInputError
naming it, never a silently random layer.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.core.context import ModelHandle, NodeContext, NodeInputError, file_model
from plinth.nodes.core.schema import Choice, Float, Link, Node, Output
from plinth.nodes.core.types import Conditioning, ConditioningEntry, ControlSpec, Vae
from plinth.nodes.models.single_file import SD15_CONFIG
from plinth.nodes.models.strict_load import assign_strict
from plinth.nodes.models.t2i_adapter import is_t2i_adapter, load_t2i_adapter

ORIGINAL_PREFIX = "control_model."
HINT_WIDTHS = (16, 32, 96, 256)  # SD1.5 ControlNets' hint encoder (conditioning_embedding_out_channels)
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def _template() -> dict[str, Any]:
    """SD1.5's UNet config reduced to the arguments ControlNetModel takes."""
    from diffusers import ControlNetModel

    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = json.loads((SD15_CONFIG / "unet" / "config.json").read_text())
    template = {k: v for k, v in config.items() if k in accepted}
    template["conditioning_embedding_out_channels"] = list(HINT_WIDTHS)
    return template


def _indices(keys: Any, pattern: str) -> list[int]:
    """The sorted distinct integers that `pattern`'s one group captures at the start of keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def infer_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The ControlNetModel config whose weights, in diffusers key layout, have these shapes."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise NodeInputError(f"not an SD1.x ControlNet: weight {key} is missing")
        return shapes[key]

    config = _template()
    levels = _indices(shapes, r"down_blocks\.(\d+)\.")
    if not levels:
        raise NodeInputError("not an SD1.x ControlNet: it has no down_blocks weights")
    config["layers_per_block"] = len(_indices(shapes, r"down_blocks\.0\.resnets\.(\d+)\."))
    config["block_out_channels"] = [shape(f"down_blocks.{i}.resnets.0.conv2.weight")[0] for i in levels]
    config["down_block_types"] = [
        "CrossAttnDownBlock2D" if any(k.startswith(f"down_blocks.{i}.attentions.") for k in shapes) else "DownBlock2D"
        for i in levels
    ]
    config["in_channels"] = shape("conv_in.weight")[1]
    to_k = sorted(k for k in shapes if k.endswith("attn2.to_k.weight"))
    if to_k:
        config["cross_attention_dim"] = shapes[to_k[0]][1]
    hint_in = shape("controlnet_cond_embedding.conv_in.weight")
    config["conditioning_channels"] = hint_in[1]
    steps = len(_indices(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.")) // 2
    config["conditioning_embedding_out_channels"] = [hint_in[0]] + [
        shape(f"controlnet_cond_embedding.blocks.{2 * k + 1}.weight")[0] for k in range(steps)
    ]
    return config


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The ControlNet tensors of a .safetensors file and its layout ("diffusers" or "original");
    original keys come back without the control_model. prefix. Only ControlNet tensors are read,
    so the SD model inside a v1.0 file costs nothing."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if "controlnet_cond_embedding.conv_in.weight" in keys:
                layout, wanted, strip = "diffusers", keys, ""
            elif f"{ORIGINAL_PREFIX}input_hint_block.0.weight" in keys:
                layout, strip = "original", ORIGINAL_PREFIX
                wanted = [k for k in keys if k.startswith(ORIGINAL_PREFIX)]
            elif "input_hint_block.0.weight" in keys:
                layout, wanted, strip = "original", keys, ""
            else:
                raise NodeInputError(
                    f"{path.name}: not a ControlNet or T2I-Adapter (it has neither diffusers' "
                    "controlnet_cond_embedding.* nor the original input_hint_block.* weights, nor an adapter's)"
                )
            state = {k[len(strip) :]: f.get_tensor(k) for k in wanted}
    except NodeInputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc
    return state, layout


def _convert_original(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original keys converted to diffusers' with diffusers' own function, plus the original keys
    it did not use (which the strict check reports as unexpected)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    # The converter needs layers_per_block: input blocks before the first downsampler, less conv_in.
    blocks = _indices(state, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in state]
    layers = downsamplers[0] - 1 if downsamplers else len(blocks) - 1
    converted = {
        k: v for k, v in convert_controlnet_checkpoint(state, {"layers_per_block": layers}).items() if v is not None
    }
    used = {id(v) for v in converted.values()}
    return converted, sorted(k for k, v in state.items() if id(v) not in used)


def build_controlnet(
    state: dict[str, torch.Tensor], name: str, layout: str = "diffusers", config: dict[str, Any] | None = None
) -> Any:
    """A ControlNetModel with exactly these weights (diffusers keys, or original keys without a
    prefix), its config read off the weights unless given. The module is made on the meta
    device, so no time goes into a random initialisation the weights would overwrite."""
    from diffusers import ControlNetModel

    unused: list[str] = []
    if layout == "original":
        state, unused = _convert_original(state)
    if config is None:
        try:
            config = infer_config({k: tuple(v.shape) for k, v in state.items()})
        except NodeInputError as exc:
            raise NodeInputError(f"{name}: {exc}") from None
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    assign_strict(model, state, name, "an SD1.x ControlNet layout", unused)
    return model


def load_controlnet(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """A diffusers ControlNetModel from a folder or a .safetensors file (or a T2IAdapterModel,
    when the file holds a T2I-Adapter), in eval mode without gradients, on `device` in `dtype`."""
    if is_t2i_adapter(path):
        return load_t2i_adapter(path, device, dtype)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as exc:
            raise NodeInputError(f"{path.name}: config.json is not valid JSON ({exc})") from exc
        if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
            raise NodeInputError(f"{path.name}: config.json does not describe a ControlNetModel")
        weights = next((path / w for w in FOLDER_WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            raise NodeInputError(f"{path.name}: no {' or '.join(FOLDER_WEIGHTS)} in the folder")
        state, layout = _read_safetensors(weights)
        if layout != "diffusers":
            raise NodeInputError(f"{path.name}: the folder's weights are not in the diffusers layout")
        model = build_controlnet(state, path.name, layout, config)
    elif path.suffix == ".safetensors":
        state, layout = _read_safetensors(path)
        model = build_controlnet(state, path.name, layout)
    else:
        raise NodeInputError(f"{path.name}: only diffusers folders and .safetensors files load")
    model.to(device).eval().requires_grad_(False)
    return model if model.dtype == dtype else model.to(dtype)


class ControlNetLoader(Node):
    """Load a ControlNet: a diffusers folder or a .safetensors file (diffusers or original
    layout) under models/controlnet; or a T2I-Adapter (original or diffusers layout), which
    the Apply ControlNet nodes attach the same way."""

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load ControlNet Model"
    OUTPUTS = (Output("CONTROL_NET"),)

    control_net_name = Choice(source="controlnet")

    def run(self, ctx: NodeContext, control_net_name: str) -> tuple[ModelHandle]:
        device, dtype = ctx.device, ctx.dtype
        handle = file_model(ctx, "controlnet", control_net_name, lambda path: load_controlnet(path, device, dtype))
        ctx.model(handle)  # load now, so a bad file fails this node rather than the sampler
        return (handle,)


def _with_control(cond: Conditioning, spec: ControlSpec) -> Conditioning:
    """Copies of the entries with `spec` added to their controls; the entries given (maybe cached
    outputs of other nodes) are left as they were."""
    return [
        ConditioningEntry(entry.embeds, {**entry.options, "controls": (*entry.options.get("controls", ()), spec)})
        for entry in cond
    ]


class ControlNetApplyAdvanced(Node):
    """Guide sampling with a ControlNet and a hint image, on both the positive and the negative
    conditioning (as ComfyUI does), between start_percent and end_percent of the schedule.

    The hint is resized to the latent's pixel size when sampling. Strength 0 returns the inputs
    unchanged. The optional vae exists for ComfyUI compatibility only: ControlNets that take a
    latent hint use it, SD1.x ControlNets take pixels and ignore it.
    """

    CATEGORY = "conditioning/controlnet"
    DISPLAY_NAME = "Apply ControlNet"
    OUTPUTS = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"))

    positive = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    control_net = Link("CONTROL_NET")
    image = Link("IMAGE")
    strength = Float(default=1.0, min=0.0, max=10.0, step=0.01)
    start_percent = Float(default=0.0, min=0.0, max=1.0, step=0.001)
    end_percent = Float(default=1.0, min=0.0, max=1.0, step=0.001)
    vae = Link("VAE", optional=True)

    def run(
        self,
        ctx: NodeContext,
        positive: Conditioning,
        negative: Conditioning,
        control_net: ModelHandle,
        image: torch.Tensor,
        strength: float,
        start_percent: float,
        end_percent: float,
        vae: Vae | None = None,
    ) -> tuple[Conditioning, Conditioning]:
        if strength == 0:
            return positive, negative
        spec = ControlSpec(control_net, image, strength, start_percent, end_percent)
        return _with_control(positive, spec), _with_control(negative, spec)
