"""CLIP vision encoders: loading them (transformers layout) and encoding images with them.

Loaded: a single .safetensors (architecture read off the tensor shapes; a whole CLIPModel's text
half is ignored) or a folder with config.json. IP-Adapters read these encodings
(plinth.nodes.models.ipadapter); the nodes are CLIPVisionLoader and CLIPVisionEncode in
plinth.nodes.ipadapter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.resize import center_crop, resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_DIM = 64  # CLIP vision and the IP-Adapter Resampler both use 64-wide attention heads
# (hidden size, layers) of OpenAI's ViT-B and ViT-L, trained with quick_gelu; LAION's ViT-H and
# ViT-bigG (what most IP-Adapters pair with) use gelu. The shapes cannot tell the two apart.
QUICK_GELU_SHAPES = {(768, 12), (1024, 24)}
# Keys of a whole CLIPModel that a vision encoder does not use.
NOT_VISION = ("text_model.", "text_projection.", "logit_scale")


@dataclass
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: projected image embeddings [B, projection_dim] (what plain
    IP-Adapters read) and the penultimate layer's hidden states [B, tokens, hidden] (plus)."""

    image_embeds: torch.Tensor
    penultimate_hidden_states: torch.Tensor


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str, what: str) -> None:
    """Every weight present and used, or an error: never a silently random layer. The weights are
    copied into the module's own memory: kept in the file's buffer, their alignment there (which
    depends on the key names) changes float results in the last bit."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).partition(":")[2].split())[:400]  # past "Error(s) in loading ...:"
        raise NodeInputError(f"{name}: the weights do not fit a {what} ({detail})") from exc


def clip_vision_config(shapes: dict[str, tuple[int, ...]], name: str) -> Any:
    """The CLIPVisionConfig of transformers-layout weights ("vision_model.*" keys)."""
    from transformers import CLIPVisionConfig

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise NodeInputError(
                f"{name}: not a CLIP vision model in the transformers layout with a "
                f"projection (weight {key} is missing)"
            )
        return shapes[key]

    hidden, _, patch, _ = shape("vision_model.embeddings.patch_embedding.weight")
    positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise NodeInputError(f"{name}: {positions} position embeddings are not a square grid plus one")
    layers = len({m.group(1) for k in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))})
    return CLIPVisionConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // HEAD_DIM),
        intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        patch_size=patch,
        image_size=grid * patch,
        projection_dim=shape("visual_projection.weight")[0],
        hidden_act="quick_gelu" if (hidden, layers) in QUICK_GELU_SHAPES else "gelu",
    )


def load_clip_vision(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """A CLIPVisionModelWithProjection from a folder with config.json or one .safetensors file
    (keys with or without the "vision_model." prefix; a whole CLIPModel's text half is ignored)."""
    from transformers import CLIPVisionModelWithProjection
    from transformers.initialization import no_init_weights

    if path.is_dir():
        # With output_loading_info a (model, info) pair, which from_pretrained's annotation omits.
        loaded: Any = CLIPVisionModelWithProjection.from_pretrained(
            path, local_files_only=True, output_loading_info=True
        )
        model, info = loaded
        if info["missing_keys"]:
            raise NodeInputError(f"{path.name}: weights missing from the folder: {sorted(info['missing_keys'])[:5]}")
    else:
        state = {}
        for key, value in read_safetensors(path).items():
            if key.startswith(NOT_VISION) or key.endswith("position_ids"):
                continue
            state[key if key.startswith(("vision_model.", "visual_projection.")) else f"vision_model.{key}"] = value
        config = clip_vision_config({k: tuple(v.shape) for k, v in state.items()}, path.name)
        with no_init_weights():  # every weight is copied in next; initialising ViT-H costs seconds
            model = CLIPVisionModelWithProjection(config)
        load_strict(model, state, path.name, "CLIP vision model")
    return model.to(device, dtype).eval().requires_grad_(False)


def clip_pixels(image: torch.Tensor, size: int, crop: bool) -> torch.Tensor:
    """IMAGE [B,H,W,C] in 0..1 as CLIP's normalised input [B,3,size,size]: the short side
    resized to `size` and the centre cut out (crop), or the whole image squeezed to a square."""
    pixels = image[..., :3].movedim(-1, 1).float()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    h, w = pixels.shape[-2:]
    target = (max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))) if crop else (size, size)
    if (h, w) != target:
        pixels = resize(pixels, target[1], target[0], "bicubic", antialias=True).clamp(0, 1)
    pixels = center_crop(pixels, size, size)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def encode_pixels(model: Any, pixels: torch.Tensor) -> ClipVisionOutput:
    """Run the encoder on normalised pixels; results on the CPU in float32 for the output cache."""
    param = next(model.parameters())
    with torch.no_grad():  # not inference_mode: these tensors live on in the output cache
        out = model(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True)
    return ClipVisionOutput(out.image_embeds.float().cpu(), out.hidden_states[-2].float().cpu())


def encode_image(model: Any, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
    return encode_pixels(model, clip_pixels(image, int(model.config.image_size), crop))
