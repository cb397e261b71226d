"""IP-Adapter: a reference image steers an SD1.x UNet (its style, or its content) alongside the prompt.

Nodes: CLIPVisionLoader and CLIPVisionEncode (ComfyUI core), IPAdapterModelLoader and
IPAdapterAdvanced (the names of cubiq/ComfyUI_IPAdapter_plus, so exported graphs carry over).

An IP-Adapter adds, to every cross-attention layer, a second attention over a few "image tokens"
projected from a CLIP vision embedding of the reference: out = attn(q, text) + weight *
attn(q, image). diffusers has the pieces (IPAdapterAttnProcessor2_0, ImageProjection,
IPAdapterPlusImageProjection, the UNet's "ip_image_proj" path); IPAdapterPatch puts them on the
shared UNet for one sampling run and takes them off again, and feeds the image embeddings per
UNet call: the reference's for positive rows, the unconditional ones for negative rows.

Loaded here: CLIP vision encoders in the transformers layout (single .safetensors, architecture read
off the tensor shapes, or a folder with config.json) and SD1.x IP-Adapter files in the original
layout ("image_proj.*"/"ip_adapter.*" keys, or the nested {"image_proj", "ip_adapter"} dict):
"plain" (image_proj.proj + norm) and "plus" (a Resampler over the penultimate hidden states).
FaceID and full-face adapters, SDXL adapters and several IP-Adapters on one model are refused
with a message rather than run wrongly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plinth.nodes.core.context import ModelHandle, NodeContext, NodeInputError, file_model
from plinth.nodes.core.schema import Choice, Float, Link, Node, Output
from plinth.nodes.core.types import DiffusionModel
from plinth.nodes.resize import center_crop, repeat_to_batch, resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_DIM = 64  # CLIP vision and the IP-Adapter Resampler both use 64-wide attention heads
# (hidden size, layers) of OpenAI's ViT-B and ViT-L, trained with quick_gelu; LAION's ViT-H and
# ViT-bigG (what most IP-Adapters pair with) use gelu. The shapes cannot tell the two apart.
QUICK_GELU_SHAPES = {(768, 12), (1024, 24)}
# Weights that mark a plus adapter's Resampler and that its sizes are read from.
RESAMPLER_KEYS = {"latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"}
# Keys of a whole CLIPModel that a vision encoder does not use.
NOT_VISION = ("text_model.", "text_projection.", "logit_scale")


# CLIP vision


@dataclass
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: projected image embeddings [B, projection_dim] (what plain
    IP-Adapters read) and the penultimate layer's hidden states [B, tokens, hidden] (plus)."""

    image_embeds: torch.Tensor
    penultimate_hidden_states: torch.Tensor


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str, what: str) -> None:
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
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            path, local_files_only=True, output_loading_info=True
        )
        if info["missing_keys"]:
            raise NodeInputError(f"{path.name}: weights missing from the folder: {sorted(info['missing_keys'])[:5]}")
    else:
        state = {}
        for key, value in _read_safetensors(path).items():
            if key.startswith(NOT_VISION) or key.endswith("position_ids"):
                continue
            state[key if key.startswith(("vision_model.", "visual_projection.")) else f"vision_model.{key}"] = value
        config = clip_vision_config({k: tuple(v.shape) for k, v in state.items()}, path.name)
        with no_init_weights():  # every weight is copied in next; initialising ViT-H costs seconds
            model = CLIPVisionModelWithProjection(config)
        _load_strict(model, state, path.name, "CLIP vision model")
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


# IP-Adapter weights


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


def _image_projection(proj: dict[str, torch.Tensor], name: str) -> tuple[str, torch.nn.Module, int]:
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
        module = ImageProjection(image_embed_dim=embed, cross_attention_dim=cross, num_image_text_embeds=tokens)
        state = {k.replace("proj.", "image_embeds.", 1) if k.startswith("proj.") else k: v for k, v in proj.items()}
        _load_strict(module, state, name, "plain IP-Adapter image projection")
        return "plain", module, embed
    if RESAMPLER_KEYS <= proj.keys():
        hidden = proj["latents"].shape[2]
        heads, rest = divmod(proj["layers.0.0.to_q.weight"].shape[0], HEAD_DIM)
        if rest or not heads:
            raise NodeInputError(f"{name}: Resampler attention width is not a multiple of {HEAD_DIM}")
        embed = proj["proj_in.weight"].shape[1]
        module = IPAdapterPlusImageProjection(
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
        _load_strict(module, state, name, "plus IP-Adapter Resampler")
        return "plus", module, embed
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
        found = []
        for index, key in enumerate(unet.attn_processors):
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
    proj, ip = split_ipadapter_state(_read_safetensors(path) if state is None else state, path.name)
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
    out = (module.norm if kind == "plain" else module.norm_out).normalized_shape[0]  # image token width
    if cross != {out}:
        raise NodeInputError(f"{path.name}: image tokens are {out} wide but the layers read {sorted(cross)}")
    return IPAdapterWeights(
        path.name,
        kind,
        module.to(device, dtype).eval().requires_grad_(False),
        embed,
        {i: (pair["to_k_ip"], pair["to_v_ip"]) for i, pair in layers.items()},
    )


# the patch


@dataclass
class _Active:
    processors: list[Any]
    positive: torch.Tensor
    negative: torch.Tensor


@dataclass(eq=False)
class IPAdapterPatch:
    """An IP-Adapter on a MODEL: the image features of the reference (`positive`) and of the
    unconditional side (`negative`), one entry per reference image, and when it acts."""

    adapter: ModelHandle
    positive: torch.Tensor
    negative: torch.Tensor
    weight: float
    start_at: float
    end_at: float
    _active: _Active | None = field(default=None, init=False, repr=False)

    @contextmanager
    def applied(self, ctx: NodeContext, unet: torch.nn.Module) -> Iterator[None]:
        """IP-Adapter processors on the cross-attention layers and the image projection as the
        UNet's encoder_hid_proj for one run; the UNet is shared, so everything is put back."""
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        if unet.encoder_hid_proj is not None:
            raise NodeInputError(
                "the model already has an image projection (another IP-Adapter); "
                "Plinth applies one IP-Adapter per model"
            )
        adapter: IPAdapterWeights = ctx.model(self.adapter)
        layers = adapter.matching_layers(unet)
        param = next(unet.parameters())
        processors = []
        for _, k, v in layers:
            with torch.device("meta"):
                processor = IPAdapterAttnProcessor2_0(k.shape[0], k.shape[1], scale=self.weight)
            processor.load_state_dict(
                {
                    "to_k_ip.0.weight": k.to(param.device, param.dtype),
                    "to_v_ip.0.weight": v.to(param.device, param.dtype),
                },
                assign=True,
            )
            processors.append(processor)
        saved = [(attn, attn.processor) for attn, _, _ in layers]
        hid_dim_type = unet.config.encoder_hid_dim_type
        try:
            for (attn, _), processor in zip(saved, processors, strict=False):
                attn.set_processor(processor)
            unet.encoder_hid_proj = MultiIPAdapterImageProjection([adapter.image_proj.to(param.device, param.dtype)])
            unet.config.encoder_hid_dim_type = "ip_image_proj"  # an attribute, as diffusers sets it
            self._active = _Active(
                processors, self.positive.to(param.device, param.dtype), self.negative.to(param.device, param.dtype)
            )
            yield
        finally:
            self._active = None
            for attn, processor in saved:
                attn.set_processor(processor)
            del unet.encoder_hid_proj  # back to the plain None attribute the UNet was built with
            unet.encoder_hid_proj = None
            unet.config.encoder_hid_dim_type = hid_dim_type

    def call_kwargs(self, ctx: NodeContext, positive_rows: Sequence[bool], progress: float) -> dict[str, Any]:
        """The image features for each batch row; outside start_at..end_at the processors' scale
        is 0, which diffusers' processor skips, so those steps are exactly the plain model's."""
        if self._active is None:
            raise RuntimeError("IPAdapterPatch.call_kwargs outside applied()")
        scale = self.weight if self.start_at <= progress <= self.end_at else 0.0
        for processor in self._active.processors:
            processor.scale = [scale]
        rows = [self._active.positive if positive else self._active.negative for positive in positive_rows]
        return {"added_cond_kwargs": {"image_embeds": [torch.stack(rows)]}}


# nodes


class CLIPVisionLoader(Node):
    """Load a CLIP vision encoder (transformers layout) from models/clip_vision: a .safetensors
    file, its architecture read off the weights, or a folder with config.json."""

    CATEGORY = "loaders"
    DISPLAY_NAME = "Load CLIP Vision"
    OUTPUTS = (Output("CLIP_VISION"),)

    clip_name = Choice(source="clip_vision")

    def run(self, ctx: NodeContext, clip_name: str) -> tuple[ModelHandle]:
        device, dtype = ctx.device, ctx.dtype
        handle = file_model(ctx, "clip_vision", clip_name, lambda path: load_clip_vision(path, device, dtype))
        ctx.model(handle)  # a wrong file fails here, at the node that names it
        return (handle,)


class CLIPVisionEncode(Node):
    """Encode images with a CLIP vision model: projected image embeddings and the penultimate
    hidden states (crop "center" keeps the aspect and cuts the middle, "none" squeezes)."""

    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Vision Encode"
    OUTPUTS = (Output("CLIP_VISION_OUTPUT"),)

    clip_vision = Link("CLIP_VISION")
    image = Link("IMAGE")
    crop = Choice(options=("center", "none"), default="center")

    def run(
        self, ctx: NodeContext, clip_vision: ModelHandle, image: torch.Tensor, crop: str
    ) -> tuple[ClipVisionOutput]:
        return (encode_image(ctx.model(clip_vision), image, crop == "center"),)


class IPAdapterModelLoader(Node):
    """Load an SD1.x IP-Adapter (plain or plus) from models/ipadapter."""

    ORIGIN = "ComfyUI_IPAdapter_plus"
    CATEGORY = "ipadapter/loaders"
    DISPLAY_NAME = "IPAdapter Model Loader"
    OUTPUTS = (Output("IPADAPTER"),)

    ipadapter_file = Choice(source="ipadapter")

    def run(self, ctx: NodeContext, ipadapter_file: str) -> tuple[ModelHandle]:
        device, dtype = ctx.device, ctx.dtype
        handle = file_model(ctx, "ipadapter", ipadapter_file, lambda path: load_ipadapter(path, device, dtype))
        ctx.model(handle)  # a wrong file fails here, at the node that names it
        return (handle,)


class IPAdapterAdvanced(Node):
    """Steer a MODEL with a reference image through an IP-Adapter (style and content transfer).

    cubiq's node, with the subset of its inputs Plinth implements: weight (negative pushes away),
    start_at/end_at (the part of the schedule in which it acts, 0 = start), image_negative (the
    unconditional side's image instead of a blank one) and clip_vision, which Plinth needs linked
    because it has no unified loader. weight_type, combine_embeds and embeds_scaling accept only
    the behaviour implemented: linear (one weight everywhere), concat (several reference images
    add their tokens side by side) and "V only" (the weight scales the image attention's output).
    """

    ORIGIN = "ComfyUI_IPAdapter_plus"
    CATEGORY = "ipadapter"
    DISPLAY_NAME = "IPAdapter Advanced"
    OUTPUTS = (Output("MODEL"),)

    model = Link("MODEL")
    ipadapter = Link("IPADAPTER")
    image = Link("IMAGE")
    weight = Float(default=1.0, min=-1.0, max=5.0, step=0.05)
    weight_type = Choice(options=("linear",), default="linear")
    combine_embeds = Choice(options=("concat",), default="concat")
    start_at = Float(default=0.0, min=0.0, max=1.0, step=0.001)
    end_at = Float(default=1.0, min=0.0, max=1.0, step=0.001)
    embeds_scaling = Choice(options=("V only",), default="V only")
    image_negative = Link("IMAGE", optional=True)
    clip_vision = Link(
        "CLIP_VISION",
        optional=True,
        tooltip="required on Plinth: a CLIPVisionLoader with the encoder the adapter was trained with",
    )

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        if inputs.get("start_at", 0.0) > inputs.get("end_at", 1.0):
            return [("end_at", "custom_validation_failed", "end_at must not be before start_at")]
        return []

    def run(
        self,
        ctx: NodeContext,
        model: DiffusionModel,
        ipadapter: ModelHandle,
        image: torch.Tensor,
        weight: float,
        weight_type: str,
        combine_embeds: str,
        start_at: float,
        end_at: float,
        embeds_scaling: str,
        image_negative: torch.Tensor | None = None,
        clip_vision: ModelHandle | None = None,
    ) -> tuple[DiffusionModel]:
        if clip_vision is None:
            raise NodeInputError(
                "IPAdapterAdvanced needs its clip_vision input linked to a CLIPVisionLoader "
                "(Plinth has no unified loader that brings the encoder along)"
            )
        if any(isinstance(p, IPAdapterPatch) for p in model.patches):
            raise NodeInputError("this MODEL already has an IP-Adapter; Plinth applies one IP-Adapter per model")
        adapter: IPAdapterWeights = ctx.model(ipadapter)
        encoder = ctx.model(clip_vision)
        adapter.matching_layers(model.load(ctx).unet)
        width = encoder.config.projection_dim if adapter.kind == "plain" else encoder.config.hidden_size
        if width != adapter.embed_dim:
            what = "image embeddings" if adapter.kind == "plain" else "hidden states"
            raise NodeInputError(
                f"{adapter.name} reads CLIP vision {what} {adapter.embed_dim} wide, but "
                f"the linked CLIP vision model gives {width}: use the encoder it was trained with"
            )
        if weight == 0:
            return (model,)
        positive = adapter.features(encode_image(encoder, image))
        if image_negative is not None:
            negative = adapter.features(encode_image(encoder, image_negative))
        elif adapter.kind == "plain":
            negative = torch.zeros_like(positive)
        else:  # as the adapter was trained: hidden states of all-zero (normalised) pixels
            size = int(encoder.config.image_size)
            negative = adapter.features(encode_pixels(encoder, torch.zeros(1, 3, size, size)))
        patch = IPAdapterPatch(ipadapter, positive, repeat_to_batch(negative, len(positive)), weight, start_at, end_at)
        return (model.with_patch(patch),)
