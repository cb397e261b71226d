"""Helpers the benchmarks share: timing with medians, and an SD1.5-shaped random model."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall-clock seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def build_sd15_random(models_dir: Path, name: str = "sd15-random") -> Path:
    """A diffusers folder with SD1.5's real shapes and seeded random weights (about 4 GB in fp32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from plinth.nodes.models.checkpoint import SD15_CONFIG, tokenizer_dir

    target = models_dir / "checkpoints" / name
    if (target / "model_index.json").exists():
        return target

    def config(part: str) -> dict:
        data = json.loads((SD15_CONFIG / part / "config.json").read_text())
        return {k: v for k, v in data.items() if not k.startswith("_") and k != "architectures"}

    torch.manual_seed(0)
    staging = target.with_name(f".{name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    UNet2DConditionModel(**config("unet")).save_pretrained(staging / "unet")
    AutoencoderKL(**config("vae")).save_pretrained(staging / "vae")
    CLIPTextModel(CLIPTextConfig(**config("text_encoder"))).save_pretrained(staging / "text_encoder")
    shutil.copytree(tokenizer_dir(models_dir), staging / "tokenizer")
    shutil.copytree(SD15_CONFIG / "scheduler", staging / "scheduler")
    shutil.copy(SD15_CONFIG / "model_index.json", staging / "model_index.json")
    staging.rename(target)
    return target


def write_json(data: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def report(data: object, path: Path | None) -> None:
    """Print the figures as JSON, and write them to `path` too when given."""
    print(json.dumps(data, indent=2))
    if path is not None:
        write_json(data, path)


def rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
