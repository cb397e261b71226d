"""Model files and input images for ComfyUI's template workflows (read from its template packages).

A template names its files in its loader nodes' widgets (``v1-5-pruned-emaonly-fp16.safetensors``,
``control_v11p_sd15_scribble_fp16.safetensors``, ``MoXinV1.safetensors``, ...) and its input
images in its LoadImage nodes. Tests cannot download any of them, so this module writes, under
exactly those names, small random-weight files in the layouts the real ones have: SD1.x and
SDXL checkpoints in the original single-file layouts (fp16, as the files the templates link to), the
VAE-only file in its original layout, kohya LoRAs, v1.1 ControlNets (original keys, fp16),
Real-ESRGAN in basicsr's layout and a GLIGEN text-box model. Every checkpoint shares one small
SD1.5-layout architecture, so a template's LoRAs and ControlNets fit whichever checkpoint it
loads; each file gets its own seed from its name, so two checkpoints in one template differ.
"""

from __future__ import annotations

import importlib.util
import io
import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from support import controlnet_files, files, lora_files, upscaler_files
from support.sd_original_layout import (
    VAE_PREFIX,
    build_random_sd,
    small_sd15_configs,
    to_original_state_dict,
    write_original_checkpoint,
)
from support.sdxl_original_layout import build_random_sdxl, small_sdxl_configs, write_sdxl_checkpoint

# ComfyUI's template packages (MIT; pinned in the dev extra), whose templates/ hold the workflows.
PACKAGES = {"comfyui_workflow_templates_media_image": "0.3.17", "comfyui_workflow_templates_media_other": "0.3.15"}


def template_path(name: str) -> Path:
    """Where ComfyUI's template `name` lies in the installed template packages."""
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "templates" / f"{name}.json"
            if path.is_file():
                return path
    raise FileNotFoundError(f"ComfyUI template {name!r} is in none of {', '.join(PACKAGES)} (the dev extra)")


# Loader class_type -> the models folder its first widget names a file in (ComfyUI's folders).
LOADER_FOLDERS = {
    "CheckpointLoaderSimple": "checkpoints",
    "VAELoader": "vae",
    "LoraLoader": "loras",
    "ControlNetLoader": "controlnet",
    "UpscaleModelLoader": "upscale_models",
    "GLIGENLoader": "gligen",
}
INPUT_SIZE = (64, 64)  # input images' default (width, height): the templates resize or re-encode them


def load(name: str) -> dict[str, Any]:
    """The vendored template `name` (without .json), as the editor saved it."""
    return json.loads(template_path(name).read_text())


def editor_nodes(workflow: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of the workflow, those inside its subgraph definitions included."""
    yield from workflow["nodes"]
    for subgraph in workflow.get("definitions", {}).get("subgraphs", []):
        yield from subgraph.get("nodes", [])


def model_files(workflow: dict[str, Any]) -> set[tuple[str, str]]:
    """(folder, file name) of every model the workflow's loader nodes name."""
    return {
        (LOADER_FOLDERS[node["type"]], node["widgets_values"][0])
        for node in editor_nodes(workflow)
        if node["type"] in LOADER_FOLDERS
    }


def write_model_files(models_dir: Path, workflow: dict[str, Any]) -> None:
    """Write every model file the workflow names under models_dir, unless already there."""
    for folder, name in sorted(model_files(workflow)):
        path = models_dir / folder / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _WRITERS[folder](path)


def input_images(workflow: dict[str, Any], sizes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, bytes]:
    """An image for each name the workflow's LoadImage nodes ask for (PNG, or JPEG for .jpg
    names), INPUT_SIZE unless `sizes` gives its (width, height)."""
    sizes = sizes or {}
    return {
        node["widgets_values"][0]: _drawing(node["widgets_values"][0], sizes.get(node["widgets_values"][0], INPUT_SIZE))
        for node in editor_nodes(workflow)
        if node["type"] == "LoadImage"
    }


def _drawing(name: str, size: tuple[int, int]) -> bytes:
    """A line drawing on a tinted backdrop: edges for Canny, strokes for scribble and pose hints."""
    width, height = size
    image = Image.new("RGB", size, (235, 228, 215))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.3, height * 0.1, width * 0.7, height * 0.45), outline=(20, 20, 20), width=2)
    draw.line((width * 0.5, height * 0.45, width * 0.5, height * 0.8), fill=(20, 20, 20), width=2)
    draw.line((width * 0.2, height * 0.6, width * 0.8, height * 0.6), fill=(20, 20, 20), width=2)
    draw.rectangle((0, height * 0.85, width - 1, height - 1), fill=(90, 120, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG")
    return buffer.getvalue()


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 2**31


def _checkpoint(path: Path) -> None:
    """An SD1.5-layout file, or for SDXL names (sd_xl_base_1.0, sd_xl_refiner_1.0,
    sd_xl_turbo_1.0_fp16) one in SDXL's layout: base or refiner as the name says."""
    if "_xl_" in path.name:
        configs = small_sdxl_configs(refiner="refiner" in path.name)
        write_sdxl_checkpoint(path, build_random_sdxl(configs, seed=_seed(path.name)), dtype=torch.float16)
        return
    write_original_checkpoint(path, *build_random_sd(small_sd15_configs(), seed=_seed(path.name)), dtype=torch.float16)


def _vae(path: Path) -> None:
    """A VAE-only file as vae-ft-mse-840000-ema-pruned is: original keys, no prefix, fp32."""
    state = to_original_state_dict(*build_random_sd(small_sd15_configs(), seed=_seed(path.name)))
    files.write(
        {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)}, path.parent, path.name
    )


def _meta_modules() -> dict[str, torch.nn.Module]:
    """The checkpoints' UNet and text model, shapes only."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = small_sd15_configs()
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }


def _lora(path: Path) -> None:
    """A kohya LoRA for UNet and text encoder, fp16, as the civitai files the templates link to."""
    weights = lora_files.random_lora(seed=_seed(path.name), modules=_meta_modules())
    files.write({k: v.half() for k, v in lora_files.kohya(weights).items()}, path.parent, path.name)


def _controlnet(path: Path) -> None:
    """A ControlNet v1.1 in its original, unprefixed keys, fp16 (ControlNet-v1-1_fp16_safetensors)."""
    controlnet = controlnet_files.tiny_controlnet(seed=_seed(path.name), unet_config=small_sd15_configs()["unet"])
    state = controlnet_files.to_original_state_dict(controlnet)
    files.write({k: v.half() for k, v in state.items()}, path.parent, path.name)


def _upscaler(path: Path) -> None:
    files.write(upscaler_files.real_esrgan_x4(), path.parent, path.name)


def _gligen(path: Path) -> None:
    """A GLIGEN text-box model for the checkpoints' UNet, in gligen_sd14_textbox_pruned's layout."""
    from diffusers import UNet2DConditionModel

    from support.gligen_files import gligen_state  # arrives with GLIGEN support (issue 10)

    configs = small_sd15_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
    state = gligen_state(unet, text_width=configs["text_encoder"]["hidden_size"], seed=_seed(path.name))
    files.write(state, path.parent, path.name)


_WRITERS: dict[str, Callable[[Path], None]] = {
    "checkpoints": _checkpoint,
    "vae": _vae,
    "loras": _lora,
    "controlnet": _controlnet,
    "upscale_models": _upscaler,
    "gligen": _gligen,
}


def is_flat(image: Image.Image) -> bool:
    """True for an image of one colour (what NaNs or a dead pipeline leave behind)."""
    return bool(np.asarray(image).std() == 0)
