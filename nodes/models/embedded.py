"""The embedded checkpoints: random-weight models of each family's real layout, made locally on
first use under models/checkpoints (nothing is downloaded), listed among the checkpoints always."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from plinth.nodes.models import tiny_flux, tiny_sd, tiny_sdxl

EMBEDDED: dict[str, Callable[[Path], Path]] = {
    tiny_sd.NAME: tiny_sd.ensure_tiny_sd,
    tiny_sdxl.BASE: lambda models_dir: tiny_sdxl.ensure_tiny_sdxl(models_dir, tiny_sdxl.BASE),
    tiny_sdxl.REFINER: lambda models_dir: tiny_sdxl.ensure_tiny_sdxl(models_dir, tiny_sdxl.REFINER),
    tiny_flux.NAME: tiny_flux.ensure_tiny_flux,
}


def ensure_embedded(models_dir: Path, name: str) -> Path:
    """The folder of embedded checkpoint `name`, made unless it exists."""
    return EMBEDDED[name](models_dir)
