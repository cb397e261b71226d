"""IP-Adapter files: SD1.x adapters in the original layout, read into an image projection and
the per-layer to_k_ip/to_v_ip weights.

Layouts: "image_proj.*"/"ip_adapter.*" keys (.safetensors) or the nested {"image_proj",
"ip_adapter"} dict of .bin files. Variants: "plain" (image_proj.proj + norm, reading CLIP image
embeddings) and "plus" (a Resampler over the penultimate hidden states), built as diffusers'
ImageProjection and IPAdapterPlusImageProjection. FaceID, full-face and SDXL adapters are
refused with a message rather than run wrongly. Putting an adapter on a UNet is
plinth.nodes.patches.ipadapter_attention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.clip_vision import HEAD_DIM, ClipVisionOutput, load_strict, read_safetensors

if TYPE_CHECKING:
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

# Weights that mark a plus adapter's Resampler and that its sizes are read from.
RESAMPLER_KEYS = {"latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"}


def split_ipadapter_state(state: dict[str, Any], name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(image_proj, ip_adapter) weights from the flattened .safetensors layout
    ("image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight") or the nested dict of .bin files."""
    if isinstance(state.get("image_proj"), dict) and isinstance(state.get("ip_adapter"), dict):
        return dict(state["image_proj"]), dict(state["ip_adapter"])
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part in parts:
            parts[part][rest] = value
    if not parts["image_proj"] or not parts["ip_adapter"]:
        raise NodeInputError(f"{name}: not an IP-Adapter file (no image_proj.* and ip_adapter.* weights)")
    return parts["image_proj"], parts["ip_adapter"]


def _resampler_key(key: str) -> list[str]:
    """diffusers' IPAdapterPlusImageProjection name(s) for an original Resampler weight
    (to_kv becomes to_k and to_v)."""
    rules = (
        (r"layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."),
        (r"layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
        (r"layers\.(\d+)\.0\.to_q\.", r"layers.\1.attn.to_q."),
        (r"layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
        (r"layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."),
        (r"layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
        (r"layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2."),
    )
    if m := re.match(r"layers\.(\d+)\.0\.to_kv\.(.+)", key):
        return [f"layers.{m.group(1)}.attn.to_k.{m.group(2)}", f"layers.{m.group(1)}.attn.to_v.{m.group(2)}"]
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return [re.sub(pattern, replacement, key, count=1)]
    return [key]


def _image_projection(
    proj: dict[str, torch.Tensor], name: str
) -> tuple[str, ImageProjection | IPAdapterPlusImageProjection, int]:
    """(kind, module, input width) for the image_proj weights of a plain or plus adapter."""
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    if "proj.weight" in proj and "norm.weight" in proj:
        cross = proj["norm.weight"].shape[0]
        tokens, rest = divmod(proj["proj.weight"].shape[0], cross)
        if rest:
            raise NodeInputError(
                f"{name}: image_proj.proj gives {proj['proj.weight'].shape[0]} values, "
                f"not a whole number of {cross}-wide tokens"
            )
        embed = proj["proj.weight"].shape[1]
        plain = ImageProjection(image_embed_dim=embed, cross_attention_dim=cross, num_image_text_embeds=tokens)
        state = {k.replace("proj.", "image_embeds.", 1) if k.startswith("proj.") else k: v for k, v in proj.items()}
        load_strict(plain, state, name, "plain IP-Adapter image projection")
        return "plain", plain, embed
    if RESAMPLER_KEYS <= proj.keys():
        hidden = proj["latents"].shape[2]
        heads, rest = divmod(proj["layers.0.0.to_q.weight"].shape[0], HEAD_DIM)
        if rest or not heads:
            raise NodeInputError(f"{name}: Resampler attention width is not a multiple of {HEAD_DIM}")
        embed = proj["proj_in.weight"].shape[1]
        plus = IPAdapterPlusImageProjection(
            embed_dims=embed,
            output_dims=proj["proj_out.weight"].shape[0],
            hidden_dims=hidden,
            depth=len({k.split(".")[1] for k in proj if k.startswith("layers.")}),
            dim_head=HEAD_DIM,
            heads=heads,
            num_queries=proj["latents"].shape[1],
            ffn_ratio=proj["layers.0.1.1.weight"].shape[0] / hidden,
        )
        state = {}
        for key, value in proj.items():
            names = _resampler_key(key)
            for new, part in zip(names, value.chunk(len(names)), strict=False):
                state[new] = part
        load_strict(plus, state, name, "plus IP-Adapter Resampler")
        return "plus", plus, embed
    raise NodeInputError(
        f"{name}: unsupported IP-Adapter variant; plain (image_proj.proj) and plus "
        "(image_proj.latents) SD1.x adapters load, FaceID and full-face ones do not"
    )


@dataclass
class IPAdapterWeights:
    """A loaded IP-Adapter: its image projection (input `embed_dim` wide: CLIP image embeds for
    plain, CLIP hidden states for plus) and to_k_ip/to_v_ip per cross-attention layer, keyed by
    the layer's position among the UNet's attention processors (the original file's numbering)."""

    name: str
    kind: str
    image_proj: torch.nn.Module
    embed_dim: int
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def nbytes(self) -> int:
        tensors = [*self.image_proj.parameters(), *(t for pair in self.layers.values() for t in pair)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def features(self, encoded: ClipVisionOutput) -> torch.Tensor:
        """What the image projection reads from a CLIP vision encoding."""
        return encoded.image_embeds if self.kind == "plain" else encoded.penultimate_hidden_states

    def matching_layers(self, unet: torch.nn.Module) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
        """(attention module, to_k_ip, to_v_ip) for each cross-attention layer of `unet`, or an
        error naming why this adapter does not belong to this model."""
        found: list[tuple[int, Any]] = []  # (position among the processors, diffusers Attention)
        processors = cast(dict[str, Any], unet.attn_processors)  # a UNet2DConditionModel property
        for index, key in enumerate(processors):
            attn = unet.get_submodule(key.removesuffix(".processor"))
            if getattr(attn, "is_cross_attention", False):
                found.append((index, attn))
        if sorted(self.layers) != [index for index, _ in found]:
            raise NodeInputError(
                f"{self.name}: the adapter has {len(self.layers)} cross-attention layers, the model "
                f"{len(found)}: it was made for another base model (SD1.5 adapters fit SD1.x)"
            )
        pairs = []
        for index, attn in found:
            k, v = self.layers[index]
            if k.shape != attn.to_k.weight.shape or v.shape != attn.to_v.weight.shape:
                raise NodeInputError(
                    f"{self.name}: layer {index} is {tuple(k.shape)} but the model's is "
                    f"{tuple(attn.to_k.weight.shape)}: it was made for another base model"
                )
            pairs.append((attn, k, v))
        return pairs


def load_ipadapter(
    path: Path, device: torch.device, dtype: torch.dtype, state: dict[str, Any] | None = None
) -> IPAdapterWeights:
    """Parse an IP-Adapter .safetensors (or an already read `state`, flattened or nested)."""
    from diffusers.models.embeddings import ImageProjection

    proj, ip = split_ipadapter_state(read_safetensors(path) if state is None else state, path.name)
    kind, module, embed = _image_projection(proj, path.name)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ip.items():
        m = re.fullmatch(r"(\d+)\.(to_k_ip|to_v_ip)\.weight", key)
        if not m:
            raise NodeInputError(
                f"{path.name}: unsupported IP-Adapter weight ip_adapter.{key} "
                "(only to_k_ip/to_v_ip layers are understood)"
            )
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = value.to(device=device, dtype=dtype, copy=True)
    incomplete = sorted(i for i, pair in layers.items() if len(pair) != 2)
    if incomplete:
        raise NodeInputError(f"{path.name}: layers {incomplete} lack to_k_ip or to_v_ip")
    cross = {pair["to_k_ip"].shape[1] for pair in layers.values()}
    norm = module.norm if isinstance(module, ImageProjection) else module.norm_out
    out = norm.normalized_shape[0]  # image token width
    if cross != {out}:
        raise NodeInputError(f"{path.name}: image tokens are {out} wide but the layers read {sorted(cross)}")
    return IPAdapterWeights(
        path.name,
        kind,
        module.to(device, dtype).eval().requires_grad_(False),
        embed,
        {i: (pair["to_k_ip"], pair["to_v_ip"]) for i, pair in layers.items()},
    )
