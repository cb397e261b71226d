"""Loader nodes: turn a model name into handles the model manager resolves."""

from __future__ import annotations

from plinth.nodes.core.context import ModelHandle, NodeContext, file_model
from plinth.nodes.core.schema import Choice, Node, Output
from plinth.nodes.core.types import DiffusionModel, TextEncoder, Vae
from plinth.nodes.models.checkpoint import load_checkpoint, load_vae
from plinth.nodes.models.unet_file import WEIGHT_DTYPES, load_unet_file, rounding_of


class CheckpointLoaderSimple(Node):
    """Load a Stable Diffusion checkpoint: a diffusers folder or an original-layout .safetensors
    file under models/checkpoints, or the embedded `tiny-sd`."""

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load Checkpoint"
    OUTPUTS = (Output("MODEL"), Output("CLIP"), Output("VAE"))

    ckpt_name = Choice(source="checkpoints")

    def run(self, ctx: NodeContext, ckpt_name: str) -> tuple:
        models_dir, device, dtype, options = ctx.models_dir, ctx.device, ctx.dtype, ctx.model_options
        handle = file_model(
            ctx, "checkpoints", ckpt_name, lambda path: load_checkpoint(path, models_dir, device, dtype, options)
        )
        return DiffusionModel(handle), TextEncoder(handle), Vae(handle)


class VAELoader(Node):
    """Load a VAE on its own (e.g. a fine-tuned one) from models/vae: an original-layout or
    diffusers-layout .safetensors file, or a diffusers folder."""

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load VAE"
    OUTPUTS = (Output("VAE"),)

    vae_name = Choice(source="vae")

    def run(self, ctx: NodeContext, vae_name: str) -> tuple[Vae]:
        device, dtype, options = ctx.device, ctx.dtype, ctx.model_options
        return (Vae(file_model(ctx, "vae", vae_name, lambda path: load_vae(path, device, dtype, options))),)


class UNETLoader(Node):
    """Load a UNet on its own from models/diffusion_models (or the older models/unet): an SD1.x
    UNet in the original key layout, to pair with a checkpoint's CLIP and VAE. The fp8
    weight_dtype choices round the weights to that format, as ComfyUI stores them; they are kept
    in the compute dtype, so memory is not reduced (nodes/models/unet_file.py)."""

    CATEGORY = "advanced/loaders"
    DISPLAY_NAME = "Load Diffusion Model"
    OUTPUTS = (Output("MODEL"),)

    unet_name = Choice(source="diffusion_models")
    weight_dtype = Choice(options=WEIGHT_DTYPES)

    def run(self, ctx: NodeContext, unet_name: str, weight_dtype: str) -> tuple[DiffusionModel]:
        device, dtype, options = ctx.device, ctx.dtype, ctx.model_options
        plain = file_model(
            ctx,
            "diffusion_models",
            unet_name,
            lambda path: load_unet_file(path, device, dtype, weight_dtype, options),
        )
        rounding = rounding_of(weight_dtype)
        handle = ModelHandle(f"{plain.key}#{rounding}", plain.load) if rounding else plain
        ctx.model(handle)  # load now, so a bad file fails this node rather than the sampler
        return (DiffusionModel(handle),)
