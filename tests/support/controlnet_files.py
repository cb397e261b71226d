"""Write small random-weight ControlNets for the tiny-sd architecture in the layouts real files use.

ComfyUI users drop files such as ``control_v11p_sd15_canny.safetensors`` (original layout, keys
unprefixed), ``control_sd15_canny.safetensors`` (original layout under ``control_model.``, next to
a whole SD model) or diffusers' ``diffusion_pytorch_model.safetensors`` into models/controlnet.
Tests cannot download them, so this module builds a ControlNet from tiny-sd's UNet config with
diffusers and writes it in each layout; the original keys are the inverse of what diffusers'
converter reads, written here from the UNet mapping in sd_original_layout.py plus the parts only
a ControlNet has.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from plinth.nodes.models.tiny_sd import UNET as TINY_UNET
from support.files import write
from support.sd_original_layout import _rename, _unet_prefixes

# Narrower than SD1.5's (16, 32, 96, 256), so the loader has to read them off the weights.
HINT_WIDTHS = (8, 16, 32, 64)


def tiny_controlnet(seed: int = 0, unet_config: dict | None = None) -> ControlNetModel:
    """A ControlNet for tiny-sd (or the UNet of `unet_config`) with seeded random weights, in
    eval mode.

    Every parameter gets seeded noise: ControlNets start with zero convolutions at their outputs,
    which would make an untrained one a no-op, and equal norms or biases would let a wrong key
    mapping pass unnoticed. The global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(TINY_UNET if unet_config is None else unet_config))
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_WIDTHS)
        with torch.no_grad():
            for param in controlnet.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return controlnet.eval()


def to_original_state_dict(controlnet: ControlNetModel) -> dict[str, torch.Tensor]:
    """The ControlNet's weights under the original ControlNet keys (no prefix, as v1.1 files)."""
    # _unet_prefixes also maps a UNet's up blocks, which a ControlNet lacks; mirrored names will do.
    config = controlnet.config
    unet_config = {**config, "up_block_types": [t.replace("Down", "Up") for t in reversed(config["down_block_types"])]}
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    prefixes = _unet_prefixes(unet_config) + [
        ("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", {}),
        *((f"controlnet_cond_embedding.blocks.{j}.", f"input_hint_block.{2 * j + 2}.", {}) for j in range(blocks)),
        ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * blocks + 2}.", {}),
        *(
            (f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", {})
            for i in range(len(controlnet.controlnet_down_blocks))
        ),
        ("controlnet_mid_block.", "middle_block_out.0.", {}),
    ]
    return {_rename(key, prefixes): tensor for key, tensor in controlnet.state_dict().items()}


def write_all_layouts(controlnet: ControlNetModel, folder: Path) -> dict[str, str]:
    """The same ControlNet as a diffusers folder, a diffusers-layout file, an original v1.1-style
    file and an original v1.0-style file (control_model.* beside stray SD weights), in `folder`;
    returns the model names by layout."""
    names = {
        "folder": "tiny-control-diffusers",
        "diffusers": "tiny-control-diffusers.safetensors",
        "original": "control_v11p_tiny.safetensors",
        "original_v10": "control_tiny_v10.safetensors",
    }
    controlnet.save_pretrained(folder / names["folder"])
    write(controlnet.state_dict(), folder, names["diffusers"])
    original = to_original_state_dict(controlnet)
    write(original, folder, names["original"])
    stray = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.ones(32, 4, 3, 3),
        "first_stage_model.post_quant_conv.weight": torch.ones(4, 4, 1, 1),
    }
    write({**{f"control_model.{k}": v for k, v in original.items()}, **stray}, folder, names["original_v10"])
    return names
