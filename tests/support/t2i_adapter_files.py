"""Write small random-weight T2I-Adapters in the layouts real files use.

TencentARC's files (``t2iadapter_depth_sd14v1.pth``, the repackaged
``t2iadapter_depth_sd15v2.safetensors``) keep the original keys: the full adapter as ``conv_in``
and ``body.<n>.block1/block2`` (``<n>`` counting resnets over every level, ``body.<n>.in_conv``
where the width changes), the light adapter as ``body.<level>.in_conv/out_conv`` and
``body.<level>.body.<n>.block1/block2``. diffusers saves the same weights under ``adapter.``
with ``body.<level>.resnets.<n>``. Tests cannot download any of them, so this module builds
diffusers T2IAdapters with seeded random weights and writes them in each layout; the original
keys are the inverse of the conversion the loader does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import T2IAdapter

from support.files import write


def tiny_adapter(widths: list[int], kind: str = "full", hint_channels: int = 3, seed: int = 0) -> T2IAdapter:
    """A T2IAdapter whose features fit a UNet with these down-block widths ("full": two resnets
    per level; "light": four, its last two levels of equal width), every weight perturbed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "full":
            adapter = T2IAdapter(
                in_channels=hint_channels, channels=widths, num_res_blocks=2, adapter_type="full_adapter"
            )
        else:
            assert widths[-1] == widths[-2], "a light adapter's last two levels share a width"
            adapter = T2IAdapter(
                in_channels=hint_channels, channels=widths[:-1], num_res_blocks=4, adapter_type="light_adapter"
            )
        with torch.no_grad():
            for param in adapter.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return adapter.eval()


def to_original_state_dict(adapter: T2IAdapter) -> dict[str, torch.Tensor]:
    """The adapter's weights under TencentARC's original keys."""
    per_level = adapter.config.num_res_blocks
    out = {}
    for key, value in adapter.state_dict().items():
        key = key.removeprefix("adapter.")
        if adapter.config.adapter_type == "light_adapter":
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", key)
        else:
            match = re.match(r"body\.(\d+)\.(?:resnets\.(\d+)\.)?(.+)$", key)
            if match:
                level, index, rest = int(match.group(1)), int(match.group(2) or 0), match.group(3)
                key = f"body.{level * per_level + index}.{rest}"
        out[key] = value
    return out


def write_layouts(adapter: T2IAdapter, folder: Path, stem: str) -> dict[str, str]:
    """The adapter as an original-layout file, a diffusers-layout file and a diffusers folder in
    `folder`; returns the model names by layout."""
    names = {
        "original": f"t2iadapter_{stem}_sd14v1.safetensors",
        "diffusers": f"{stem}-diffusers.safetensors",
        "folder": f"{stem}-diffusers",
    }
    write(to_original_state_dict(adapter), folder, names["original"])
    write(adapter.state_dict(), folder, names["diffusers"])
    adapter.save_pretrained(folder / names["folder"])
    config = json.loads((folder / names["folder"] / "config.json").read_text())
    assert config["_class_name"] == "T2IAdapter"
    return names
