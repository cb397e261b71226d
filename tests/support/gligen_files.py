"""Write small random-weight GLIGEN text-box models in the layout ComfyUI's
gligen_sd14_textbox_pruned.safetensors uses.

That file holds the box projection under ``position_net.`` and one gated self-attention layer
per transformer block of the UNet under ``<ldm block>.transformer_blocks.<k>.fuser.`` (e.g.
``input_blocks.1.1.transformer_blocks.0.fuser.attn.to_q.weight``). Tests cannot download it, so
this module builds the same pieces with diffusers at the widths of a given test UNet and writes
them under those names, the ldm block names taken from the UNet mapping in sd_original_layout.py.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection

from support.sd_original_layout import _rename, _unet_prefixes


def transformer_block_names(unet: UNet2DConditionModel) -> list[tuple[str, int]]:
    """(diffusers module name, width) of the UNet's transformer blocks, in the order it runs them."""
    names = [
        (name, int(module.attn1.to_q.in_features))
        for name, module in unet.named_modules()
        if isinstance(module, BasicTransformerBlock)
    ]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda item: order[item[0].split(".")[0]])  # stable: keeps order within a part


def gligen_state(
    unet: UNet2DConditionModel, text_width: int, token_width: int = 48, seed: int = 0, gated: bool = True
) -> dict[str, torch.Tensor]:
    """A GLIGEN model for `unet` in the pruned file's layout, with seeded random weights.

    Every parameter gets seeded noise; `gated` gives the gates (alpha_attn, alpha_dense) values
    away from 0, so the layers act; gated=False zeroes them, which makes the model a no-op, as an
    untrained GLIGEN is. The global RNG is left untouched."""
    prefixes = _unet_prefixes(unet.config)
    state: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = GLIGENTextBoundingboxProjection(text_width, token_width, feature_type="text-only")
        modules = {"position_net.": projection}
        for name, width in transformer_block_names(unet):
            heads = max(1, width // 64)
            modules[_rename(f"{name}.fuser.x", prefixes)[: -len("x")]] = GatedSelfAttentionDense(
                width, token_width, heads, width // heads
            )
        with torch.no_grad():
            for prefix, module in modules.items():
                for key, param in module.named_parameters():
                    if key.startswith("alpha_"):
                        param.fill_(0.7 if key == "alpha_attn" else -0.4) if gated else param.zero_()
                    else:
                        param.add_(torch.randn_like(param) * 0.2)
                    state[prefix + key] = param.detach().clone()
    return state
