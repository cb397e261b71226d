"""What the saved graphs in graphs/ need to run on tiny-sd: a product photo, a style reference,
and the model files they name (random weights, real layouts). Shared by the tests and
bench/graphs.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from support import controlnet_files, files, ipadapter_files, lora_files, upscaler_files


def product_photo(size: int = 64) -> np.ndarray:
    """A size x size packshot (64x64 unless asked): a red box with a white label on a plain
    light-grey backdrop."""
    pixels = np.full((size, size, 3), 236, np.uint8)
    pixels[14:50, 20:44] = (190, 30, 35)
    pixels[26:34, 26:38] = (250, 250, 250)
    return pixels


def reference_photo() -> np.ndarray:
    """A 64x64 colour gradient with a little noise: a style and tone to take."""
    rng = np.random.default_rng(7)
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[..., 0] = np.linspace(20, 240, 64, dtype=np.uint8)[None, :]
    pixels[..., 2] = np.linspace(240, 20, 64, dtype=np.uint8)[:, None]
    return np.clip(pixels + rng.integers(0, 20, pixels.shape), 0, 255).astype(np.uint8)


INPUTS = {"product.png": files.png(product_photo()), "reference.png": files.png(reference_photo())}


def write_graph_models(models_dir: Path) -> None:
    """The model files the saved graphs name, made for tiny-sd, under models_dir."""
    files.write(upscaler_files.real_esrgan_x4(), models_dir / "upscale_models", "RealESRGAN_x4plus.safetensors")
    controlnet = controlnet_files.tiny_controlnet(seed=11)
    files.write(
        controlnet_files.to_original_state_dict(controlnet),
        models_dir / "controlnet",
        "control_v11p_sd15_canny.safetensors",
    )
    files.write(ipadapter_files.plain(seed=12), models_dir / "ipadapter", "ip-adapter_sd15.safetensors")
    files.write(
        ipadapter_files.clip_vision(seed=13), models_dir / "clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    )
    files.write(lora_files.kohya(lora_files.random_lora(seed=14)), models_dir / "loras", "product-style.safetensors")
