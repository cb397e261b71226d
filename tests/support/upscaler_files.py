"""Write small random-weight super-resolution models in the key layouts real files use.

ComfyUI users drop files such as ``RealESRGAN_x4plus.safetensors`` or ``realesr-general-x4v3``
into models/upscale_models. Tests cannot download them, so this module writes tensors of the same
names and shape pattern, scaled down where the layout allows, and spandrel has to recognise them
exactly as it would the originals (nothing here uses spandrel's own modules to make the files).
"""

from __future__ import annotations

import torch

# spandrel builds every RRDB with 32 growth channels, so real files and these share that width.
RRDB_GROWTH = 32


def _conv(
    state: dict[str, torch.Tensor], name: str, out_ch: int, in_ch: int, gen: torch.Generator, gain: float
) -> None:
    fan_in = in_ch * 9
    state[f"{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=gen) * (gain / fan_in**0.5)
    state[f"{name}.bias"] = torch.randn(out_ch, generator=gen) * 0.01


def real_esrgan_x4(features: int = 8, blocks: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """RRDBNet x4 in Real-ESRGAN's (basicsr) layout: conv_first, body.N.rdbK.convJ, conv_body,
    conv_up1, conv_up2, conv_hr, conv_last."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    _conv(state, "conv_first", features, 3, gen, 1.0)
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for j in range(1, 5):
                _conv(state, f"body.{block}.rdb{rdb}.conv{j}", RRDB_GROWTH, features + (j - 1) * RRDB_GROWTH, gen, 1.0)
            _conv(state, f"body.{block}.rdb{rdb}.conv5", features, features + 4 * RRDB_GROWTH, gen, 1.0)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        _conv(state, name, features, features, gen, 1.0)
    _conv(state, "conv_last", 3, features, gen, 1.0)
    state["conv_last.bias"] += 0.5  # centre the random output in 0..1 so clamping hides little
    return state


def compact(scale: int = 4, features: int = 8, convs: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """SRVGGNetCompact (Real-ESRGAN's realesr-*-x4v3) layout: body.0 conv, then PReLU and conv
    pairs, the last conv giving 3*scale*scale channels for the pixel shuffle. scale=1 makes a
    restoration (denoise-style) model of the same family."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    _conv(state, "body.0", features, 3, gen, 1.0)
    index = 1
    for _ in range(convs):
        state[f"body.{index}.weight"] = torch.full((features,), 0.25)
        _conv(state, f"body.{index + 1}", features, features, gen, 1.0)
        index += 2
    state[f"body.{index}.weight"] = torch.full((features,), 0.25)
    _conv(state, f"body.{index + 1}", 3 * scale * scale, features, gen, 0.5)
    return state


def not_an_image_model(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small classifier-like file: valid safetensors, but no architecture spandrel knows."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "encoder.layer.0.weight": torch.randn(16, 16, generator=gen),
        "head.weight": torch.randn(10, 16, generator=gen),
    }
