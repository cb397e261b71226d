"""Loader nodes: turn a model name into handles the model manager resolves."""

from __future__ import annotations

from typing import Any

from plinth.nodes.context import ModelHandle, NodeContext, ValidationEnv
from plinth.nodes.models.checkpoint import load_checkpoint, load_vae
from plinth.nodes.schema import Choice, Node, Output
from plinth.nodes.types import DiffusionModel, TextEncoder, Vae


class CheckpointLoaderSimple(Node):
    """Load a Stable Diffusion checkpoint: a diffusers folder or an original-layout .safetensors
    file under models/checkpoints, or the embedded `tiny-sd`."""

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load Checkpoint"
    OUTPUTS = (Output("MODEL"), Output("CLIP"), Output("VAE"))

    ckpt_name = Choice(source="checkpoints")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: ValidationEnv) -> str:
        return env.fingerprint("checkpoints", inputs.get("ckpt_name", ""))

    def run(self, ctx: NodeContext, ckpt_name: str) -> tuple:
        path = ctx.model_path("checkpoints", ckpt_name)
        models_dir, device, dtype = ctx.models_dir, ctx.device, ctx.dtype
        handle = ModelHandle(f"checkpoints/{ckpt_name}",
                             lambda: load_checkpoint(path, models_dir, device, dtype))
        return DiffusionModel(handle), TextEncoder(handle), Vae(handle)


class VAELoader(Node):
    """Load a VAE on its own (e.g. a fine-tuned one) from models/vae: an original-layout or
    diffusers-layout .safetensors file, or a diffusers folder."""

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load VAE"
    OUTPUTS = (Output("VAE"),)

    vae_name = Choice(source="vae")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], env: ValidationEnv) -> str:
        return env.fingerprint("vae", inputs.get("vae_name", ""))

    def run(self, ctx: NodeContext, vae_name: str) -> tuple[Vae]:
        path = ctx.model_path("vae", vae_name)
        device, dtype = ctx.device, ctx.dtype
        return (Vae(ModelHandle(f"vae/{vae_name}", lambda: load_vae(path, device, dtype))),)
