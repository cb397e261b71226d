"""UNet-only model files (ComfyUI's UNETLoader, "Load Diffusion Model") for SD1.x, loaded offline.

ComfyUI keeps such files in models/diffusion_models (and the older models/unet): a checkpoint's
UNet alone in the original (CompVis ldm) key layout, with or without the checkpoint's
`model.diffusion_model.` prefix; a whole checkpoint also loads here, its UNet taken and nothing
else read. The architecture is read off the keys and shapes, not assumed: resolution levels and
resnets per level from the input blocks and their downsamplers, each level's width, which levels
carry attention and how deep, the input and output channels (9-channel inpainting UNets too) and
the cross-attention width. Heads are 8 per attention, as ComfyUI's SD1.x configs have them
(shapes cannot tell). SD2.x-style UNets (linear attention projections) and class-conditioned ones
(SDXL, unCLIP) are refused by name. Keys are converted with diffusers' own function and loaded
strictly: a missing, unexpected or misshapen weight is a NodeInputError naming the file.

The MODEL samples in SD1.x's latent space (4 channels scaled by 0.18215, 8 pixels per latent
cell, SD1.5's noise schedule), so it pairs with any SD1.x checkpoint's CLIP and VAE, as in
ComfyUI. weight_dtype: ComfyUI's fp8 choices keep the UNet's weights in an 8-bit float format;
here the weights are rounded to that format (so samples are those of the fp8 weights) but kept in
the compute dtype, so memory is not reduced. fp8_e4m3fn_fast is ComfyUI's fp8 matrix-multiply
path on GPUs that have one; here it rounds as fp8_e4m3fn does.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.core.context import ModelOptions, NodeInputError
from plinth.nodes.models.checkpoint import StableDiffusion, set_attention, use_xformers
from plinth.nodes.models.single_file import SD15_CONFIG, UNET
from plinth.nodes.models.strict_load import assign_strict

log = logging.getLogger("plinth.models")
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
_ROUNDING = {
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
SD1_LATENT_SCALE = 0.18215  # ComfyUI's SD1.5 latent format
SD1_VAE_SCALE = 8


def rounding_of(weight_dtype: str) -> str:
    """The 8-bit format a weight_dtype choice rounds to ("" for default): choices that round
    alike share one loaded copy."""
    dtype = _ROUNDING.get(weight_dtype)
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


@dataclass
class UnetOnly(StableDiffusion):
    """A MODEL loaded from a UNet-only file: no VAE, text model or tokenizer (vae, text_encoder
    and tokenizer are None); the latent facts are SD1.x's."""

    @property
    def latent_scale(self) -> float:
        return SD1_LATENT_SCALE

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def vae_scale(self) -> int:
        return SD1_VAE_SCALE

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.unet.parameters())

    def to(self, device: torch.device | str) -> UnetOnly:
        self.unet.to(device)
        return self


def _indices(keys: Any, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def infer_unet_config(shapes: dict[str, tuple[int, ...]], name: str) -> dict[str, Any]:
    """The UNet2DConditionModel config of unprefixed ldm UNet weights with these shapes."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise NodeInputError(f"{name}: not an SD1.x UNet: weight {key} is missing")
        return shapes[key]

    if any(k.startswith("label_emb.") for k in shapes):
        raise NodeInputError(f"{name}: a class-conditioned UNet (label_emb, as SDXL and unCLIP have); only SD1.x loads")
    blocks = _indices(shapes, r"input_blocks\.(\d+)\.")
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in shapes]
    per_level = downsamplers[0] if downsamplers else len(blocks)  # a level's resnets, plus conv_in or a downsampler
    levels = len(downsamplers) + 1
    if (
        per_level < 2
        or blocks != list(range(levels * per_level))
        or downsamplers != [per_level * (k + 1) for k in range(levels - 1)]
    ):
        raise NodeInputError(f"{name}: the input blocks {blocks} are not laid out as an SD1.x UNet's")
    firsts = [1 + level * per_level for level in range(levels)]
    attention = [f"input_blocks.{i}.1.proj_in.weight" in shapes for i in firsts]
    projections = [shapes[f"input_blocks.{i}.1.proj_in.weight"] for i, a in zip(firsts, attention, strict=True) if a]
    if any(len(p) == 2 for p in projections):
        raise NodeInputError(f"{name}: an SD2.x-style UNet (linear attention projections); only SD1.x loads")
    if "middle_block.1.proj_in.weight" not in shapes:
        raise NodeInputError(f"{name}: not an SD1.x UNet: its middle block has no attention")
    depths = {len(_indices(shapes, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")) for i in firsts}
    to_k = sorted(k for k in shapes if k.endswith("attn2.to_k.weight"))
    config = json.loads((SD15_CONFIG / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    config.update(
        in_channels=shape("input_blocks.0.0.weight")[1],
        out_channels=shape("out.2.weight")[0],
        block_out_channels=[shape(f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in firsts],
        layers_per_block=per_level - 1,
        down_block_types=down,
        up_block_types=[t.replace("Down", "Up") for t in reversed(down)],
        cross_attention_dim=shapes[to_k[0]][1] if to_k else config["cross_attention_dim"],
        transformer_layers_per_block=max(depths - {0}, default=1),
    )
    return config


def _read_unet(path: Path) -> dict[str, torch.Tensor]:
    """The UNet tensors of a .safetensors file, without the model.diffusion_model. prefix; a
    whole checkpoint's other parts are not read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if any(k.startswith(UNET) for k in keys):
                wanted, strip = [k for k in keys if k.startswith(UNET)], UNET
            elif "input_blocks.0.0.weight" in keys:
                wanted, strip = keys, ""
            else:
                raise NodeInputError(
                    f"{path.name}: not an SD1.x UNet in the original layout (it has neither input_blocks.* "
                    f"nor {UNET}input_blocks.* weights)"
                )
            return {k[len(strip) :]: f.get_tensor(k) for k in wanted}
    except NodeInputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc


def build_unet(state: dict[str, torch.Tensor], name: str) -> Any:
    """A UNet2DConditionModel with exactly these (unprefixed ldm) weights, made on the meta
    device so no time goes into a random initialisation."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    config = infer_unet_config({k: tuple(v.shape) for k, v in state.items()}, name)
    try:
        converted = convert_ldm_unet_checkpoint({UNET + k: v for k, v in state.items()}, copy.deepcopy(config))
    except KeyError as exc:  # the converter looks weights up by name and stops at the first absent one
        raise NodeInputError(
            f"{name}: the weights do not match an SD1.x UNet layout (missing [{exc.args[0]!r}])"
        ) from None
    used = {id(v) for v in converted.values()}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unused = [k for k, v in state.items() if id(v) not in used]
    assign_strict(unet, converted, name, "an SD1.x UNet layout", unused)
    return unet


def load_unet_file(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    weight_dtype: str = "default",
    options: ModelOptions | None = None,
) -> UnetOnly:
    """An SD1.x UNet or a FLUX.1 transformer from a .safetensors file as a MODEL's model, on
    `device` in `dtype`, its
    weights rounded as `weight_dtype` asks, set up as `options` ask (attention kernel,
    channels_last on CUDA, compile, warm-up)."""
    if path.suffix != ".safetensors":
        raise NodeInputError(f"{path.name}: only .safetensors UNet files load")
    if weight_dtype not in WEIGHT_DTYPES:
        raise NodeInputError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    from plinth.nodes.models.flux import detect_flux, load_flux_file

    if detect_flux(_keys(path)):
        flux = load_flux_file(path, device, dtype)
        _round(flux.unet, weight_dtype)
        return flux
    unet = build_unet(_read_unet(path), path.name)
    unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    _round(unet, weight_dtype)
    scheduler = json.loads((SD15_CONFIG / "scheduler" / "scheduler_config.json").read_text())
    model = UnetOnly(unet, None, None, None, dict(scheduler))
    if options is not None:
        _prepare(unet, device, options)
    return model


def _round(model: Any, weight_dtype: str) -> None:
    """Round the weights to the 8-bit format weight_dtype names (kept in their dtype)."""
    rounding = _ROUNDING.get(weight_dtype)
    if rounding is not None:
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(rounding).to(param.dtype))


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc


def _prepare(unet: Any, device: torch.device, options: ModelOptions) -> None:
    """The UNet's part of checkpoint.prepare_model: attention kernel, channels_last on CUDA,
    torch.compile in place, and one small warm-up forward."""
    set_attention(unet, use_xformers(device, options.attention))
    if options.channels_last and device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    if options.compile:
        unet.compile()
    if options.warm_up:
        start = time.perf_counter()
        with torch.inference_mode():
            context = torch.zeros(1, 77, int(unet.config.cross_attention_dim), device=device, dtype=unet.dtype)
            sample = torch.zeros(1, int(unet.config.in_channels), 8, 8, device=device, dtype=unet.dtype)
            unet(sample, torch.tensor([999], device=device), encoder_hidden_states=context)
        log.info("UNet warm-up took %.2f s", time.perf_counter() - start)
