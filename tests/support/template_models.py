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
    "UNETLoader": "diffusion_models",
    "DualCLIPLoader": "text_encoders",
    "CLIPLoader": "text_encoders",
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
    found = set()
    for node in editor_nodes(workflow):
        if node["type"] in LOADER_FOLDERS:
            names = node["widgets_values"][:2] if node["type"] == "DualCLIPLoader" else node["widgets_values"][:1]
            found.update((LOADER_FOLDERS[node["type"]], name) for name in names)
    return found


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


# FLUX.1 files share one small set of widths, so a template's transformer, text models and VAE
# fit one another: T5 32 wide, CLIP-L 64 wide (support/text_encoder_files.py).
def _flux_transformer(name: str) -> Any:
    from support.flux_files import build_random_flux, small_flux_config

    variant = "schnell" if "schnell" in name else "dev"
    config = {**small_flux_config(variant), "pooled_projection_dim": 64, "joint_attention_dim": 32}
    return build_random_flux(config, seed=_seed(name))


def _flux_checkpoint(path: Path) -> None:
    """An all-in-one FLUX.1 file as Comfy-Org's flux1-dev-fp8: the transformer in fp8 under
    model.diffusion_model., CLIP-L and T5 under text_encoders.*, the VAE under vae."""
    from support.flux_files import bfl_vae_state, small_flux_vae, to_bfl_state_dict
    from support.t5_files import to_comfy_state_dict
    from support.text_encoder_files import build_random_clip_l, clip_l_state_dict, small_flux_t5

    transformer = to_bfl_state_dict(_flux_transformer(path.name))
    clip_l = clip_l_state_dict(build_random_clip_l(seed=1))
    t5 = to_comfy_state_dict(small_flux_t5(seed=2))
    state = {f"model.diffusion_model.{k}": v.to(torch.float8_e4m3fn) for k, v in transformer.items()}
    state |= {f"text_encoders.clip_l.transformer.{k}": v.half() for k, v in clip_l.items()}
    state |= {f"text_encoders.t5xxl.transformer.{k}": v.half() for k, v in t5.items()}
    state |= {f"vae.{k}": v for k, v in bfl_vae_state(small_flux_vae(seed=3)).items()}
    files.write({k: v.contiguous() for k, v in state.items()}, path.parent, path.name)


def _diffusion_model(path: Path) -> None:
    """A FLUX.1 transformer in BFL's layout (fp8 where the name says, scaled as Comfy-Org's)."""
    from support.flux_files import write_flux_file

    if "fp8" in path.name:
        write_flux_file(path, _flux_transformer(path.name), scaled_fp8="scaled" in path.name, dtype=torch.float8_e4m3fn)
    else:
        write_flux_file(path, _flux_transformer(path.name))


def _text_encoder(path: Path) -> None:
    """ComfyUI's clip_l / t5xxl files (T5 in fp16, or scaled fp8 where the name says)."""
    from support.t5_files import write_t5_file
    from support.text_encoder_files import build_random_clip_l, small_flux_t5, write_clip_l_file

    if path.name.startswith("clip_l"):
        write_clip_l_file(build_random_clip_l(seed=1), path.parent, path.name)
    elif "scaled" in path.name:
        write_t5_file(small_flux_t5(seed=2), path.parent, path.name, scaled_fp8=True)
    else:
        write_t5_file(small_flux_t5(seed=2), path.parent, path.name, dtype=torch.float16)


def _checkpoint(path: Path) -> None:
    """An SD1.5-layout file, or for SDXL names (sd_xl_base_1.0, sd_xl_refiner_1.0,
    sd_xl_turbo_1.0_fp16) one in SDXL's layout: base or refiner as the name says; for FLUX.1
    names (flux1-dev-fp8, flux1-schnell-fp8) ComfyUI's all-in-one FLUX layout."""
    if path.name.startswith("flux1"):
        _flux_checkpoint(path)
        return
    if "_xl_" in path.name:
        configs = small_sdxl_configs(refiner="refiner" in path.name)
        write_sdxl_checkpoint(path, build_random_sdxl(configs, seed=_seed(path.name)), dtype=torch.float16)
        return
    write_original_checkpoint(path, *build_random_sd(small_sd15_configs(), seed=_seed(path.name)), dtype=torch.float16)


def _vae(path: Path) -> None:
    """A VAE-only file as vae-ft-mse-840000-ema-pruned is: original keys, no prefix, fp32; for
    FLUX.1's ae.safetensors its 16-channel VAE."""
    if path.name == "ae.safetensors":
        from support.flux_files import bfl_vae_state, small_flux_vae

        files.write(bfl_vae_state(small_flux_vae(seed=3)), path.parent, path.name)
        return
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
    "diffusion_models": _diffusion_model,
    "text_encoders": _text_encoder,
}


def is_flat(image: Image.Image) -> bool:
    """True for an image of one colour (what NaNs or a dead pipeline leave behind)."""
    return bool(np.asarray(image).std() == 0)
