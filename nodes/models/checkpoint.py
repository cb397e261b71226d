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
FAMILIES = ("sd1", "sdxl", "sdxl_refiner", "flux")


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


@dataclass
class FluxModel(StableDiffusion):
    """A FLUX.1 model: its transformer in `unet` (the field every family's sampler reads),
    with or without text models and VAE (UNETLoader's file holds the transformer alone), in
    FLUX's latent space: 16 channels, shifted then scaled (ComfyUI's latent_formats.Flux)."""

    @property
    def latent_scale(self) -> float:
        return 0.3611

    @property
    def latent_shift(self) -> float:
        return 0.1159

    @property
    def latent_channels(self) -> int:
        return 16

    @property
    def vae_scale(self) -> int:
        return 8


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
    if model.family == "flux" and dtype == torch.float16 and model.text_encoder_2 is not None:
        keep_t5_output_projections_float32(model.text_encoder_2)
    if options is not None:
        prepare_model(model, device, options)
    return model


def keep_t5_output_projections_float32(t5: Any) -> None:
    """T5 v1.1 XXL overflows float16 in its feed-forward output projections (`wo`): those stay
    float32, as transformers' from_pretrained keeps them; the layer casts its input to match."""
    for name, module in t5.named_modules():
        if name.endswith("DenseReluDense.wo"):
            module.to(torch.float32)


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
    if model.family == "flux":
        # FLUX's transformer keeps diffusers' own attention processors (SDPA, with its rotary
        # embeddings); the UNet set-up below does not apply to it.
        prepare_vae(model.vae, device, options, xformers)
        log.info("FLUX model set up on %s (transformer attention: diffusers' SDPA)", device)
        return model
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
    if model.family not in ("sdxl", "sdxl_refiner"):
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

    if (path / "transformer").is_dir():
        return _load_flux_folder(path, models_dir)
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


def _load_flux_folder(path: Path, models_dir: Path) -> StableDiffusion:
    """A FLUX.1 diffusers folder (transformer/, text_encoder/ CLIP-L, text_encoder_2/ T5, vae/)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from plinth.nodes.models.flux import flux_scheduler_config
    from plinth.nodes.models.text_encoders import t5_tokenizer

    needed = ("transformer", "text_encoder", "text_encoder_2", "vae")
    if any(not (path / part).is_dir() for part in needed):
        raise NodeInputError(f"{path.name}: a FLUX.1 diffusers folder needs {', '.join(p + '/' for p in needed)}")
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", local_files_only=True)
    tok = path / "tokenizer"
    return FluxModel(
        unet=transformer,
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True),
        tokenizer=load_tokenizer(tok if tok.is_dir() else tokenizer_dir(models_dir)),
        scheduler_config=flux_scheduler_config(dict(transformer.config)),
        text_encoder_2=T5EncoderModel.from_pretrained(path / "text_encoder_2", local_files_only=True),
        tokenizer_2=t5_tokenizer(models_dir),
        family="flux",
    )


def clip_g_tokenizer(tokenizer: Any) -> Any:
    """SDXL's second tokenizer: CLIP's BPE padding with "!" (id 0), as SDXL was trained."""
    tokenizer.pad_token = "!"
    return tokenizer


def _load_single_file(path: Path, models_dir: Path) -> StableDiffusion:
    from plinth.nodes.models import sdxl

    keys = _keys(path)
    from plinth.nodes.models.flux import detect_flux

    if detect_flux(keys):
        return _load_flux_checkpoint(path, models_dir)
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


# ComfyUI's all-in-one FLUX.1 checkpoints (flux1-dev-fp8.safetensors, ...): the transformer under
# model.diffusion_model., CLIP-L and T5-XXL under text_encoders.*.transformer., the VAE under vae.
FLUX_CLIP_L = "text_encoders.clip_l.transformer."
FLUX_VAE = "vae."


def _load_flux_checkpoint(path: Path, models_dir: Path) -> StableDiffusion:
    from plinth.nodes.models.flux import BFL_PREFIX, dequantize_fp8, flux_scheduler_config, load_flux_transformer
    from plinth.nodes.models.single_file import vae_from_state
    from plinth.nodes.models.t5 import T5_PREFIX
    from plinth.nodes.models.text_encoders import load_clip_l, load_t5_file, t5_tokenizer

    state = read_state(path)
    missing = [p for p in (FLUX_CLIP_L, T5_PREFIX, FLUX_VAE) if not any(k.startswith(p) for k in state)]
    if missing:
        raise NodeInputError(
            f"{path.name}: a FLUX.1 transformer without {', '.join(p.rstrip('.') for p in missing)}: load it with "
            "UNETLoader (Load Diffusion Model) and its text models with DualCLIPLoader"
        )

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    transformer = load_flux_transformer(
        {k: v for k, v in state.items() if k.startswith(BFL_PREFIX)}, path.name, torch.float32
    )
    vae_state = dequantize_fp8(part(FLUX_VAE))
    return FluxModel(
        unet=transformer,
        vae=vae_from_state(vae_state, path),
        text_encoder=load_clip_l(dequantize_fp8(part(FLUX_CLIP_L)), path.name, torch.float32),
        tokenizer=load_tokenizer(tokenizer_dir(models_dir)),
        scheduler_config=flux_scheduler_config(dict(transformer.config)),
        text_encoder_2=load_t5_file(
            {k: v for k, v in state.items() if k.startswith(T5_PREFIX)}, path.name, torch.float32
        ),
        tokenizer_2=t5_tokenizer(models_dir),
        family="flux",
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
