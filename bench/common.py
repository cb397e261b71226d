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


def build_sdxl_reduced(models_dir: Path, name: str = "sdxl-reduced") -> Path:
    """A diffusers folder in SDXL's layout at reduced widths, seeded random weights: SDXL's
    three UNet levels (plain, then attention 2 and 4 transformer blocks deep; real: 2 and 10),
    half its channels (160/320/640; real 320/640/1280), linear projections, the pooled text and
    six size numbers embedded beside the time step, CLIP-L and a projecting CLIP-G at reduced
    widths and depths, and SD's full-size VAE with SDXL's scale. About 0.6 GB in fp32."""
    from plinth.nodes.models.sdxl import BASE_NUMBERS, SIZE_EMBED_DIM, VAE_SCALE
    from plinth.nodes.models.tiny_sdxl import write_sdxl_folder

    text_l = dict(
        vocab_size=49408, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1, projection_dim=384,
    )  # fmt: skip
    text_g = {**text_l, "hidden_size": 640, "intermediate_size": 2560, "num_hidden_layers": 8,
              "num_attention_heads": 10, "hidden_act": "gelu", "projection_dim": 640}  # fmt: skip
    unet = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(160, 320, 640),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 4), attention_head_dim=(2, 5, 10), use_linear_projection=True,
        cross_attention_dim=384 + 640, addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMBED_DIM,
        projection_class_embeddings_input_dim=640 + BASE_NUMBERS * SIZE_EMBED_DIM, norm_num_groups=32,
    )  # fmt: skip
    vae = json.loads((Path(__file__).resolve().parents[1] / "nodes/models/configs/sd15/vae/config.json").read_text())
    vae = {k: v for k, v in vae.items() if not k.startswith("_")} | {"scaling_factor": VAE_SCALE}
    return write_sdxl_folder(models_dir, name, unet, text_l, text_g, vae, seed=0)


def build_flux_reduced(models_dir: Path, name: str = "flux-reduced") -> Path:
    """FLUX.1-dev's layout at reduced size, seeded random weights, twice from the same modules:
    ComfyUI's all-in-one file checkpoints/NAME.safetensors for Plinth (BFL's transformer keys,
    clip_l and t5xxl, the VAE) and a diffusers folder diffusers/NAME for FluxPipeline. The
    transformer keeps FLUX's 128-channel heads, rotary axes and guidance embedder at width 768
    (6 heads; real 3072) with 4 double and 8 single blocks (real 19 and 38); T5 1024 wide x 6
    (real 4096 x 24), CLIP-L 768 wide x 6, FLUX's full-size 16-channel VAE. About 1.4 GB."""
    import sys

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from plinth.nodes.models.tiny_flux import write_flux_folder

    file = models_dir / "checkpoints" / f"{name}.safetensors"
    folder = models_dir / "diffusers" / name
    if file.exists() and (folder / "model_index.json").exists():
        return file
    # The original-layout writers the tests use (BFL transformer keys, ComfyUI's text-encoder keys).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.flux_files import bfl_vae_state, to_bfl_state_dict
    from support.t5_files import to_comfy_state_dict
    from support.text_encoder_files import clip_l_state_dict

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=6,
        joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )  # fmt: skip
    clip_l = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1, projection_dim=768,
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=6, num_heads=16,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False,
    ))  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip
    for module in (transformer, clip_l, t5, vae):
        module.eval().requires_grad_(False)

    staging = folder.with_name(f".{name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write_flux_folder(models_dir, staging, transformer, clip_l, t5, vae)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)

    state = {f"model.diffusion_model.{k}": v for k, v in to_bfl_state_dict(transformer).items()}
    state |= {f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_l_state_dict(clip_l).items()}
    state |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in to_comfy_state_dict(t5).items()}
    state |= {f"vae.{k}": v for k, v in bfl_vae_state(vae).items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return file


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
