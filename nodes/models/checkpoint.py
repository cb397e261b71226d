"""Loading Stable Diffusion 1.x and SDXL checkpoints into torch objects, fully offline.

Two layouts load: a diffusers folder (model_index.json, unet/, vae/, text_encoder/, and for SDXL
text_encoder_2/) and a single .safetensors file in the original key layout (SD1.x: CompVis;
SDXL: Stability's, with its text models under conditioner.embedders). The family is told by key
names and the architecture read off the weights (single_file.py, sdxl.py), so no config is
fetched from anywhere.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.core.context import ModelOptions, NodeInputError
from plinth.nodes.models.single_file import SD15_CONFIG, load_single_file, load_vae_file, read_state
from plinth.nodes.models.tokenizer import load_tokenizer, write_tokenizer_files

log = logging.getLogger("plinth.models")
ATTENTION = ("auto", "sdpa", "xformers")
FAMILIES = ("sd1", "sdxl", "sdxl_refiner")


class ModelSetupError(RuntimeError):
    """A model loaded but cannot be set up as the server's settings ask (e.g. attention
    "xformers" without CUDA or without the package); the message names the setting."""


@dataclass
class StableDiffusion:
    """The parts of an SD1.x checkpoint the nodes use, on one device and dtype."""

    unet: Any
    vae: Any
    text_encoder: Any  # CLIP-L; None for the SDXL refiner, which has CLIP-G only
    tokenizer: Any
    scheduler_config: dict[str, Any]
    # SDXL: the second text model (CLIP-G, a CLIPTextModelWithProjection) and its tokenizer
    # (pads with "!", id 0, where CLIP-L pads with its end token). diffusers' names.
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: str = "sd1"  # one of FAMILIES

    def parts(self) -> list[Any]:
        """The modules this checkpoint holds (UNet, VAE, text models), without absent ones."""
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def text_models(self) -> list[Any]:
        """The text models prompts go through, in encoding order (CLIP-L before CLIP-G)."""
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell along one side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.parts() for p in m.parameters())

    def to(self, device: torch.device | str) -> StableDiffusion:
        """Move the weights to `device` in place (the model manager offloads to the CPU and
        back); the dtype and every module object stay the same, so hooks and processors hold."""
        for module in self.parts():
            module.to(device)
        return self


def tokenizer_dir(models_dir: Path) -> Path:
    """Where the offline CLIP tokenizer is written once per models directory."""
    return write_tokenizer_files(models_dir / ".plinth" / "clip-tokenizer")


def load_checkpoint(
    path: Path, models_dir: Path, device: torch.device, dtype: torch.dtype, options: ModelOptions | None = None
) -> StableDiffusion:
    """Load a diffusers folder or an original-layout .safetensors file, set up for `device`
    as `options` ask (see prepare_model); without options, plain eval-mode modules."""
    if path.is_dir():
        model = _load_folder(path, models_dir)
    elif path.suffix == ".safetensors":
        model = _load_single_file(path, models_dir)
    else:
        raise NodeInputError(f"{path.name}: only diffusers folders and .safetensors files load")
    for module in model.parts():
        module.to(device).eval().requires_grad_(False)
        # SDXL's VAE overflows in float16 (NaN, black images): it stays float32 there, as
        # diffusers upcasts it and ComfyUI never runs it in float16. The codec decodes in the
        # VAE's own dtype.
        wanted = torch.float32 if module is model.vae and model.family != "sd1" and dtype == torch.float16 else dtype
        if module.dtype != wanted:
            module.to(wanted)
    if options is not None:
        prepare_model(model, device, options)
    return model


def load_vae(path: Path, device: torch.device, dtype: torch.dtype, options: ModelOptions | None = None) -> Any:
    """A standalone AutoencoderKL: a diffusers folder or a .safetensors file."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, local_files_only=True) if path.is_dir() else load_vae_file(path)
    vae.to(device).eval().requires_grad_(False)
    if vae.dtype != dtype:
        vae.to(dtype)
    if options is not None:
        prepare_vae(vae, device, options, use_xformers(device, options.attention))
    return vae


# --- setting a loaded model up for its device -------------------------------------------------


def xformers_importable() -> bool:
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers  # noqa: F401
        import xformers.ops  # noqa: F401
    except Exception:  # a broken install (e.g. built for another torch) counts as absent
        return False
    return True


def use_xformers(device: torch.device, attention: str) -> bool:
    """Whether the `attention` setting means xformers on `device`: "auto" takes it only on CUDA
    with the package importable; "xformers" without either is an error naming the setting."""
    if attention not in ATTENTION:
        raise ModelSetupError(f"attention {attention!r} is not one of {', '.join(ATTENTION)}")
    if attention == "sdpa":
        return False
    if device.type != "cuda":
        if attention == "xformers":
            raise ModelSetupError(
                f"attention 'xformers' needs a CUDA device, and models run on {device}; set attention to auto or sdpa"
            )
        return False
    if not xformers_importable():
        if attention == "xformers":
            raise ModelSetupError(
                "attention 'xformers' needs the xformers package: install the `gpu` extra "
                "(pip install 'plinth[gpu]'), or set attention to auto or sdpa"
            )
        return False
    return True


def set_attention(module: Any, xformers: bool) -> None:
    """xformers memory-efficient attention, or torch SDPA (diffusers' AttnProcessor2_0) set
    explicitly, on a diffusers UNet or VAE."""
    if xformers:
        module.enable_xformers_memory_efficient_attention()
    elif hasattr(module, "set_attn_processor") and getattr(module, "attn_processors", None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        module.set_attn_processor(AttnProcessor2_0())


def prepare_model(model: StableDiffusion, device: torch.device, options: ModelOptions) -> StableDiffusion:
    """Set a loaded StableDiffusion up for `device` (already on it, in its dtype): attention
    kernel, channels_last memory format (CUDA only), torch.compile of the UNet in place, and a
    warm-up forward of each part. Every module object stays the same, so callers' references,
    `unet.config`, `.parameters()` and LoRA / IP-Adapter hooks and processors keep working."""
    xformers = use_xformers(device, options.attention)
    set_attention(model.unet, xformers)
    if options.channels_last and device.type == "cuda":
        model.unet.to(memory_format=torch.channels_last)
    if options.compile:
        # nn.Module.compile keeps the module object: its config, parameters, submodules and
        # hooks stay what callers hold. Compilation happens at the first call (the warm-up).
        model.unet.compile()
    if options.warm_up:
        warm_up_unet_and_text(model)
    prepare_vae(model.vae, device, options, xformers)
    log.info(
        "model set up on %s: attention %s, channels_last %s, compile %s, warm-up %s",
        device,
        "xformers" if xformers else "sdpa",
        options.channels_last and device.type == "cuda",
        options.compile,
        options.warm_up,
    )
    return model


def prepare_vae(vae: Any, device: torch.device, options: ModelOptions, xformers: bool) -> None:
    """A VAE's part of the set-up, for one in a checkpoint or loaded on its own."""
    set_attention(vae, xformers)
    if options.channels_last and device.type == "cuda":
        vae.to(memory_format=torch.channels_last)
    if options.warm_up:
        warm_up_vae(vae)


@torch.inference_mode()
def warm_up_unet_and_text(model: StableDiffusion) -> None:
    """One small forward of the text models and the UNet (the VAE's is warm_up_vae), so the
    first job does not pay the process's first-call costs (kernel selection, allocator growth,
    compile)."""
    start = time.perf_counter()
    unet = model.unet
    device = next(unet.parameters()).device
    length = 77
    for text in model.text_models:
        length = min(77, int(getattr(text.config, "max_position_embeddings", 77) or 77))
        eos = int(getattr(text.config, "eos_token_id", 2) or 2)
        text(torch.full((1, length), eos, dtype=torch.long, device=device))
    width = int(unet.config.cross_attention_dim)
    context = torch.zeros(1, length, width, device=device, dtype=unet.dtype)
    sample = torch.zeros(1, int(unet.config.in_channels), 8, 8, device=device, dtype=unet.dtype)
    unet(sample, torch.tensor([999], device=device), encoder_hidden_states=context, **added_inputs(model, 1))
    log.info("warm-up took %.2f s", time.perf_counter() - start)


def added_inputs(model: StableDiffusion, batch: int) -> dict[str, Any]:
    """Zero size conditioning for an SDXL UNet's call (nothing for SD1.x), for warm-ups."""
    if model.text_encoder_2 is None:
        return {}
    from plinth.nodes.models.sdxl import time_numbers

    param = next(model.unet.parameters())
    pooled = int(model.text_encoder_2.config.projection_dim)
    zeros = lambda n: torch.zeros(batch, n, device=param.device, dtype=param.dtype)  # noqa: E731
    return {"added_cond_kwargs": {"text_embeds": zeros(pooled), "time_ids": zeros(time_numbers(model.family))}}


@torch.inference_mode()
def warm_up_vae(vae: Any) -> None:
    """One decode of a 2x2 latent (16x16 pixels for SD's VAE)."""
    param = next(vae.parameters())
    vae.decode(torch.zeros(1, int(vae.config.latent_channels), 2, 2, device=param.device, dtype=param.dtype))


def _load_folder(path: Path, models_dir: Path) -> StableDiffusion:
    """An SD1.x or SDXL diffusers folder (SDXL has text_encoder_2/; its refiner no text_encoder/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl = (path / "text_encoder_2").is_dir()
    needed = ["unet", "vae"] + ([] if sdxl else ["text_encoder"])
    if any(not (path / part).is_dir() for part in needed):
        raise NodeInputError(f"{path.name}: a diffusers folder needs {', '.join(p + '/' for p in needed)}")
    has_l = (path / "text_encoder").is_dir()
    tok = path / "tokenizer"
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    model = StableDiffusion(
        unet=unet,
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True) if has_l else None,
        tokenizer=load_tokenizer(tok if tok.is_dir() else tokenizer_dir(models_dir)),
        scheduler_config=_scheduler_config(path / "scheduler" / "scheduler_config.json"),
    )
    if sdxl:
        model.family = "sdxl" if has_l else "sdxl_refiner"
        model.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            path / "text_encoder_2", local_files_only=True
        )
        tok_2 = path / "tokenizer_2"
        model.tokenizer_2 = clip_g_tokenizer(load_tokenizer(tok_2 if tok_2.is_dir() else tokenizer_dir(models_dir)))
        if unet.config.addition_embed_type != "text_time":
            raise NodeInputError(f"{path.name}: an SDXL folder whose UNet takes no size conditioning")
    return model


def clip_g_tokenizer(tokenizer: Any) -> Any:
    """SDXL's second tokenizer: CLIP's BPE padding with "!" (id 0), as SDXL was trained."""
    tokenizer.pad_token = "!"
    return tokenizer


def _load_single_file(path: Path, models_dir: Path) -> StableDiffusion:
    from plinth.nodes.models import sdxl

    keys = _keys(path)
    if sdxl.detect(keys) is not None:
        prediction = sdxl.prediction(keys, path.name)
        parts = sdxl.load_sdxl(read_state(path), path.name)
        return StableDiffusion(
            parts["unet"],
            parts["vae"],
            parts["text_encoder"],
            load_tokenizer(tokenizer_dir(models_dir)),
            {**_scheduler_config(SD15_CONFIG / "scheduler" / "scheduler_config.json"), **prediction},
            text_encoder_2=parts["text_encoder_2"],
            tokenizer_2=clip_g_tokenizer(load_tokenizer(tokenizer_dir(models_dir))),
            family=parts["family"],
        )
    unet, vae, text_encoder = load_single_file(path)
    return StableDiffusion(
        unet,
        vae,
        text_encoder,
        load_tokenizer(tokenizer_dir(models_dir)),
        _scheduler_config(SD15_CONFIG / "scheduler" / "scheduler_config.json"),
    )


def _keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc


def _scheduler_config(path: Path) -> dict[str, Any]:
    if path.exists():
        return dict(json.loads(path.read_text()))
    return dict(json.loads((SD15_CONFIG / "scheduler" / "scheduler_config.json").read_text()))
