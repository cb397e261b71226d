"""Writing the test-made model files and images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image


def write(state: dict[str, torch.Tensor], folder: Path, name: str, metadata: dict[str, str] | None = None) -> Path:
    """Save `state` as folder/name (a .safetensors file, folder made if needed) and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H,W,3] or [H,W,4] array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
