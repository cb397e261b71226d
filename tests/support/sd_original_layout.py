"""Write diffusers Stable Diffusion 1.x models as original (CompVis / SD1.5) single-file checkpoints.

ComfyUI graphs name checkpoints such as ``v1-5-pruned-emaonly.safetensors``: one file holding the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the CLIP text encoder under
``cond_stage_model.transformer.text_model.``. Tests cannot download such a file, so this module builds small random
models with diffusers/transformers and writes them in that layout (the inverse of what diffusers' single-file
loader converts). A checkpoint loader that reads the file back must reproduce every tensor exactly; random,
perturbed weights make sure a wrong key mapping cannot pass by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from plinth.nodes.models.single_file import SD15_CONFIG

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

# Leaf-module renames inside one block: diffusers name -> original name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# (diffusers module prefix, original module prefix, leaf renames inside it)
_PrefixMap = list[tuple[str, str, dict[str, str]]]


def sd15_configs() -> dict:
    """Configs of the real SD1.5 (860M UNet, 83M VAE, 123M CLIP-L text encoder): the ones Plinth ships.

    For benchmarks only: the models take ~4 GB in fp32, far too big to build in unit tests.
    """

    def read(part: str) -> dict:
        config = json.loads((SD15_CONFIG / part / "config.json").read_text())
        return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}

    return {part: read(part) for part in ("unet", "vae", "text_encoder")}


def small_sd15_configs() -> dict:
    """SD1.5 configs shrunk to a few million parameters (fast on CPU) with exactly SD1.5's key layout.

    Only widths change. Channels keep SD1.5's c, 2c, 4c, 4c pattern so that the same resnets get a
    ``skip_connection`` / ``nin_shortcut`` as in the real file; blocks, layers, attention placement, the 77-token
    context and the 49408-token vocabulary stay as they are. ``cross_attention_dim`` equals the text hidden size.
    The default sample size is 64x64 pixels (8x8 latents).
    """
    configs = sd15_configs()
    configs["unet"].update(sample_size=8, block_out_channels=[32, 64, 128, 128], cross_attention_dim=64)
    configs["vae"].update(sample_size=64, block_out_channels=[32, 64, 128, 128])
    # One 64-wide head: CLIP text models keep 64-dimensional heads, which is how loaders infer the count.
    text = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 1}
    configs["text_encoder"].update(text, projection_dim=64)
    return configs


def build_random_sd(configs: dict, seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Build (unet, vae, text_encoder) with deterministic random weights, in eval mode.

    Every parameter also gets seeded noise: norms (init to ones), biases and zero-initialised convs would otherwise
    be equal across layers, and a mapping that swaps them would go unnoticed. The global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        with torch.no_grad():
            for model in (unet, vae, text_encoder):
                for param in model.parameters():
                    param.add_(torch.randn_like(param) * 0.05)
    return unet.eval(), vae.eval(), text_encoder.eval()


def _unet_prefixes(config: dict) -> _PrefixMap:
    per_block = config["layers_per_block"] + 1  # input/output_blocks entries per resolution level
    prefixes: _PrefixMap = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
    ]
    for i in range(len(config["block_out_channels"])):
        for j in range(per_block - 1):
            index = 1 + i * per_block + j
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", _UNET_RESNET))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1.", {}))
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per_block}.0.op.", {}))
        for j in range(per_block):
            index = i * per_block + j
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", _UNET_RESNET))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1.", {}))
        # The upsampler follows the last resnet (and its attention, when the block has one).
        slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        last = i * per_block + per_block - 1
        prefixes.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{last}.{slot}.conv.", {}))
    return prefixes


def _vae_prefixes(config: dict) -> _PrefixMap:
    levels = len(config["block_out_channels"])
    prefixes: _PrefixMap = [
        ("quant_conv.", "quant_conv.", {}),
        ("post_quant_conv.", "post_quant_conv.", {}),
    ]
    for part in ("encoder", "decoder"):
        prefixes += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
        ]
    for i in range(levels):
        # The decoder's up blocks are numbered from the lowest resolution in diffusers, from the highest originally.
        level = levels - 1 - i
        for j in range(config["layers_per_block"] + 1):  # the decoder has one resnet more per level
            prefixes.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
            prefixes.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{level}.block.{j}.", _VAE_RESNET))
        prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
        prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{level}.upsample.conv.", {}))
    return prefixes


def _rename(key: str, prefixes: _PrefixMap) -> str:
    """Map one diffusers key through the longest matching prefix and that prefix's leaf renames."""
    matches = [entry for entry in prefixes if key.startswith(entry[0])]
    if not matches:
        raise KeyError(f"no SD1 original-layout mapping for diffusers key {key!r}")
    source, target, leaves = max(matches, key=lambda entry: len(entry[0]))
    rest = key[len(source) :]
    for old, new in leaves.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return target + rest


def to_original_state_dict(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """Return all three models' weights under the original SD1.5 checkpoint keys.

    VAE mid-block attention q/k/v/proj_out are 1x1 convs in the original model, so their Linear weights become
    [C, C, 1, 1]. ``position_ids`` adds ``cond_stage_model.transformer.text_model.embeddings.position_ids`` (int64
    [1, 77]) as real SD1.5 files carry it although transformers no longer saves that buffer; loaders must ignore
    it, and diffusers does.
    """
    out: dict[str, torch.Tensor] = {}
    unet_prefixes = _unet_prefixes(unet.config)
    for key, tensor in unet.state_dict().items():
        out[UNET_PREFIX + _rename(key, unet_prefixes)] = tensor
    vae_prefixes = _vae_prefixes(vae.config)
    for key, tensor in vae.state_dict().items():
        out[VAE_PREFIX + _rename(key, vae_prefixes)] = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
    # transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel; older versions still have it.
    for key, tensor in text_encoder.state_dict().items():
        out[TEXT_PREFIX + key.removeprefix("text_model.")] = tensor
    if position_ids:
        positions = text_encoder.config.max_position_embeddings
        out[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def write_original_checkpoint(
    path: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    dtype: torch.dtype | None = None,
    position_ids: bool = True,
) -> None:
    """Save the models as one original-layout .safetensors file.

    ``dtype`` casts floating-point tensors (e.g. torch.float16, as most community checkpoints are stored);
    position_ids stay int64. ``position_ids=False`` writes a file like those saved by newer tools, without them.
    """
    state = to_original_state_dict(unet, vae, text_encoder, position_ids=position_ids)
    tensors = {
        key: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().contiguous()
        for key, t in state.items()
    }
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})


def write_diffusers_config_dir(path: str | Path, configs: dict) -> None:
    """Write a weightless diffusers StableDiffusionPipeline folder to pass as ``config=`` to ``from_single_file``.

    Holds model_index.json (no safety checker or feature extractor), unet/, vae/ and text_encoder/ config.json and
    the SD1.5 PNDM scheduler config. It has no tokenizer/ folder: a caller loading the whole pipeline must add one
    (e.g. ``CLIPTokenizer.save_pretrained(path / "tokenizer")``) or pass ``tokenizer=`` itself.
    """
    root = Path(path)
    version = diffusers.__version__

    def dump(relative: str, data: dict) -> None:
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2) + "\n")

    dump(
        "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": version,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    dump("unet/config.json", {"_class_name": "UNet2DConditionModel", "_diffusers_version": version, **configs["unet"]})
    dump("vae/config.json", {"_class_name": "AutoencoderKL", "_diffusers_version": version, **configs["vae"]})
    CLIPTextConfig(**configs["text_encoder"], architectures=["CLIPTextModel"]).save_pretrained(root / "text_encoder")
    dump(
        "scheduler/scheduler_config.json",
        {
            "_class_name": "PNDMScheduler",
            "_diffusers_version": version,
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "trained_betas": None,
            "prediction_type": "epsilon",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
        },
    )
