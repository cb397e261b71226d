"""Latent nodes: empty latents and the VAE's way between pixels and latents."""

from __future__ import annotations

import torch

from plinth.nodes.context import NodeContext
from plinth.nodes.schema import Int, Link, Node, Output
from plinth.nodes.types import Latent, Vae

MAX_RESOLUTION = 16384


class EmptyLatentImage(Node):
    """A batch of zero latents of the given pixel size, to sample an image from."""

    CATEGORY = "latent"
    DISPLAY_NAME = "Empty Latent Image"
    OUTPUTS = (Output("LATENT"),)

    width = Int(default=512, min=16, max=MAX_RESOLUTION, step=8)
    height = Int(default=512, min=16, max=MAX_RESOLUTION, step=8)
    batch_size = Int(default=1, min=1, max=4096)

    def run(self, ctx: NodeContext, width: int, height: int, batch_size: int) -> tuple[Latent]:
        # SD's four latent channels at 1/8 of the pixel size, like ComfyUI's EmptyLatentImage.
        return (Latent(torch.zeros(batch_size, 4, height // 8, width // 8)),)


class VAEDecode(Node):
    """Decode latents to an IMAGE [B,H,W,C] in 0..1."""

    CATEGORY = "latent"
    DISPLAY_NAME = "VAE Decode"
    OUTPUTS = (Output("IMAGE"),)

    samples = Link("LATENT")
    vae = Link("VAE")

    def run(self, ctx: NodeContext, samples: Latent, vae: Vae) -> tuple[torch.Tensor]:
        module = vae.module(ctx)
        dtype = next(module.parameters()).dtype
        images = []
        with torch.inference_mode():
            for one in samples.samples.split(1):  # one at a time keeps decode memory flat
                ctx.check_cancelled()
                decoded = module.decode(one.to(ctx.device, dtype)).sample
                images.append(((decoded.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu())
        return (torch.cat(images),)
