"""LoRA files: low-rank weight updates read from .safetensors files and matched to a model's layers.

Two key layouts load. kohya-ss (what ComfyUI and A1111 users download): `lora_unet_<path>` and
`lora_te_<path>` (SDXL: `lora_te1_` for CLIP-L, `lora_te2_` for CLIP-G) with `.lora_down.weight`,
`.lora_up.weight` and `.alpha`, where <path> is the module path with "." written as "_": the
diffusers path, or for UNet layers the original model's (`input_blocks_4_1_...`, as kohya's SDXL
scripts write them; sgm_paths maps them from the UNet's config) (LoCon conv layers: a k x k down
and a 1x1 up).
diffusers: `unet.<path>`, `text_encoder.<path>` and `text_encoder_2.<path>` with PEFT's `.lora_A/.lora_B.weight` or the
older `.lora.down/.up`, `.lora_linear_layer.down/.up` and attention-processor `to_q_lora.down`
spellings, an optional `.alpha`, and PEFT's lora_alpha in the file's metadata.

kohya's underscore names are ambiguous on their own, so they are resolved against the module
names of the model the LoRA is applied to (`named_modules()` with "." replaced by "_") rather
than through a hand-written table that could drift from diffusers or transformers. A key that
is not a LoRA weight, or a layer that matches no module, fails the node: nothing is dropped.

This module only reads and matches; putting a LoRA on a model is plinth.nodes.patches.lora_hooks.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from plinth.nodes.core.context import NodeInputError

# Also the StableDiffusion attributes they patch; text_encoder_2 is SDXL's CLIP-G.
UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
PART_LABELS = {UNET: "UNet", TEXT_ENCODER: "text encoder", TEXT_ENCODER_2: "second text encoder (CLIP-G)"}
# kohya's part names: lora_te_ (SD1.x), lora_te1_/lora_te2_ (SDXL's CLIP-L and CLIP-G).
_KOHYA_PARTS = {"unet": UNET, "te": TEXT_ENCODER, "te1": TEXT_ENCODER, "te2": TEXT_ENCODER_2}

# Key suffix -> role, per layout.
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS_ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}
_KOHYA = re.compile(rf"lora_(unet|te1|te2|te)_(\w+)\.({'|'.join(map(re.escape, _KOHYA_ROLES))})")
_DIFFUSERS = re.compile(rf"(unet|text_encoder_2|text_encoder)\.(.+?)\.({'|'.join(map(re.escape, _DIFFUSERS_ROLES))})")
_ATTN_PROCESSOR = re.compile(
    r"(unet|text_encoder_2|text_encoder)\.(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"
)
# Old diffusers attention processors named the projection they wrapped, per model.
_PROCESSOR_TARGETS = {
    UNET: {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    TEXT_ENCODER: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
    TEXT_ENCODER_2: {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# transformers 5 dropped CLIPTextModel's `text_model.` level; LoRA files keep writing it.
_LEGACY_PREFIXES = ("text_model.", "text_model_")


@dataclass(frozen=True)
class LoraLayer:
    """One layer's update up @ down, scaled by alpha/rank. Without alpha (or alpha 0, kohya's
    convention) the scale is 1, as kohya and diffusers both read it."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha else 1.0


class LoraFile:
    """A parsed LoRA: layers per part ("unet", "text_encoder") keyed by the module path as the
    file writes it. `resolve()` maps them onto a concrete model's modules, once per model."""

    def __init__(self, name: str, layers: dict[str, dict[str, LoraLayer]]) -> None:
        self.name = name
        self.layers = layers
        self._resolved: dict[str, weakref.WeakKeyDictionary[nn.Module, dict[str, LoraLayer]]] = {}

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for part in self.layers.values()
            for layer in part.values()
            for t in (layer.down, layer.up)
        )

    def resolve(self, part: str, module: nn.Module) -> dict[str, LoraLayer]:
        """Module path in `module` -> its layer, with down/up shaped for that module.

        Raises NodeInputError naming layers that match no module or whose shapes do not fit.
        Cached by module identity (weakly, so an unloaded model is not kept alive)."""
        cache = self._resolved.setdefault(part, weakref.WeakKeyDictionary())
        if module not in cache:
            cache[module] = self._match(part, module)
        return cache[module]

    def _match(self, part: str, module: nn.Module) -> dict[str, LoraLayer]:
        modules = dict(module.named_modules())
        names = {**{path.replace(".", "_"): path for path in modules}, **{path: path for path in modules}}
        if part == UNET:  # kohya's SDXL LoRAs name UNet layers as the original (sgm) model does
            names.update({sgm.replace(".", "_"): path for path, sgm in sgm_paths(module, modules).items()})
        resolved: dict[str, LoraLayer] = {}
        unmatched: list[str] = []
        for written, layer in self.layers.get(part, {}).items():
            path = _module_path(names, written)
            if path is None:
                unmatched.append(layer.name)
            elif path in resolved:
                raise NodeInputError(f"{self.name}: {resolved[path].name} and {layer.name} both patch {path}")
            else:
                resolved[path] = _fit(self.name, layer, path, modules[path])
        if unmatched:
            raise NodeInputError(
                f"{self.name}: {len(unmatched)} layers match no module of this checkpoint's "
                f"{PART_LABELS[part]}: {_few(unmatched)}"
            )
        return resolved


# Leaf renames inside a UNet resnet: diffusers -> original (sgm) names.
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _sgm_prefixes(config: Any) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers module prefix, original prefix, leaf renames) for a UNet2DConditionModel of
    this config: input_blocks/middle_block/output_blocks numbered from its levels and resnets."""
    per_level = int(config.layers_per_block) + 1
    prefixes = [
        ("time_embedding.linear_1", "time_embed.0", {}),
        ("time_embedding.linear_2", "time_embed.2", {}),
        ("add_embedding.linear_1", "label_emb.0.0", {}),
        ("add_embedding.linear_2", "label_emb.0.2", {}),
        ("conv_in", "input_blocks.0.0", {}),
        ("mid_block.resnets.0", "middle_block.0", _SGM_RESNET),
        ("mid_block.attentions.0", "middle_block.1", {}),
        ("mid_block.resnets.1", "middle_block.2", _SGM_RESNET),
        ("conv_norm_out", "out.0", {}),
        ("conv_out", "out.2", {}),
    ]
    for i, kind in enumerate(config.up_block_types):
        for j in range(per_level - 1):
            index = 1 + i * per_level + j
            prefixes.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", _SGM_RESNET))
            prefixes.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1", {}))
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * per_level}.0.op", {}))
        for j in range(per_level):
            index = i * per_level + j
            prefixes.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", _SGM_RESNET))
            prefixes.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1", {}))
        slot = 2 if kind.startswith("CrossAttn") else 1
        prefixes.append(
            (f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * per_level + per_level - 1}.{slot}.conv", {})
        )
    return prefixes


def sgm_paths(unet: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """diffusers module path -> the original (sgm / CompVis) path of the same layer, for a
    diffusers UNet (empty for anything else): how kohya names SDXL LoRA layers."""
    config = getattr(unet, "config", None)
    if config is None or not hasattr(config, "layers_per_block") or not hasattr(config, "up_block_types"):
        return {}
    if not isinstance(config.layers_per_block, int):
        return {}
    prefixes = _sgm_prefixes(config)
    out = {}
    for path in modules:
        matches = [p for p in prefixes if path == p[0] or path.startswith(p[0] + ".")]
        if not matches:
            continue
        source, target, leaves = max(matches, key=lambda p: len(p[0]))
        rest = path[len(source) :].lstrip(".")
        for old, new in leaves.items():
            if rest == old or rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                break
        out[path] = f"{target}.{rest}" if rest else target
    return out


def _module_path(names: Mapping[str, str], written: str) -> str | None:
    """The module a layer name from a file means (exact, or kohya's "_" for "."), also when the
    file keeps the `text_model.` level the loaded CLIP text model no longer has."""
    for candidate in (written, *(written[len(p) :] for p in _LEGACY_PREFIXES if written.startswith(p))):
        if candidate in names:
            return names[candidate]
    return None


def parse_lora(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, name: str = "LoRA"
) -> LoraFile:
    """Group a LoRA file's tensors into layers; every key must be a LoRA weight or alpha."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        part, path, role, label = parsed
        entry = entries.setdefault((part, path), {"label": label})
        if role in entry:
            raise NodeInputError(f"{name}: {label} has its {role} weight twice (under two layouts?)")
        entry[role] = tensor
    if unknown:
        raise NodeInputError(
            f"{name}: {len(unknown)} keys are not LoRA weights in the kohya (lora_unet_*/lora_te_* with "
            f"lora_down/lora_up/alpha) or diffusers (unet.*/text_encoder.* with lora_A/lora_B) layout: "
            f"{_few(unknown)}"
        )
    if not entries:
        raise NodeInputError(f"{name}: the file holds no LoRA weights")
    config = _adapter_config(metadata or {}, name)
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (part, path), entry in entries.items():
        label = entry["label"]
        missing = [role for role in ("down", "up") if role not in entry]
        if missing:
            raise NodeInputError(f"{name}: {label} has no {' or '.join(missing)} weight")
        down, up = entry["down"], entry["up"]
        if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
            raise NodeInputError(
                f"{name}: {label} has down {tuple(down.shape)} and up {tuple(up.shape)}, not a low-rank pair"
            )
        if "alpha" in entry:
            if entry["alpha"].numel() != 1:
                raise NodeInputError(f"{name}: {label}.alpha is not a single number")
            alpha: float | None = float(entry["alpha"].flatten()[0])
        else:
            alpha = _config_alpha(config, part, path)
        layers.setdefault(part, {})[path] = LoraLayer(label, down, up, alpha)
    return LoraFile(name, layers)


def read_lora(path: Path) -> LoraFile:
    """Read and parse a LoRA .safetensors file (its PEFT metadata included)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc
    return parse_lora(tensors, metadata, path.name)


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(part, module path as written, "down"/"up"/"alpha", layer label) for a LoRA key."""
    if match := _KOHYA.fullmatch(key):
        te, path, suffix = match.groups()
        part = _KOHYA_PARTS[te]
        return part, path, _KOHYA_ROLES[suffix], key.split(".")[0]
    if match := _ATTN_PROCESSOR.fullmatch(key):
        part, parent, projection, role = match.groups()
        path = f"{parent}.{_PROCESSOR_TARGETS[part][projection]}"
        return part, path, role, f"{part}.{path}"
    if match := _DIFFUSERS.fullmatch(key):
        part, path, suffix = match.groups()
        return part, path, _DIFFUSERS_ROLES[suffix], f"{part}.{path}"
    return None


def _adapter_config(metadata: Mapping[str, str], name: str) -> dict[str, Any]:
    """The PEFT adapter settings diffusers writes into the file's metadata, e.g. "unet.lora_alpha"."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise NodeInputError(f"{name}: unreadable lora_adapter_metadata ({exc})") from exc
    for option in ("use_dora", "use_rslora"):
        if any(config.get(f"{part}.{option}") for part in PART_LABELS):
            raise NodeInputError(f"{name}: {option} adapters are not supported")
    return config


def _config_alpha(config: Mapping[str, Any], part: str, path: str) -> float | None:
    """PEFT's alpha for one module: the first alpha_pattern entry matching the end of its path,
    else the adapter's lora_alpha; None (scale 1) when the file does not say."""
    for pattern, alpha in (config.get(f"{part}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path):
            return float(alpha)
    alpha = config.get(f"{part}.lora_alpha")
    return None if alpha is None else float(alpha)


def _fit(file: str, layer: LoraLayer, path: str, module: nn.Module) -> LoraLayer:
    """The layer with down/up shaped for `module` (1x1 convs and linears may be written either
    way), or NodeInputError when it cannot apply there."""
    down, up = layer.down, layer.up
    want: tuple[tuple[int, ...], tuple[int, ...]]
    if isinstance(module, nn.Linear):
        down, up = (t.flatten(1) if t.ndim == 4 and t.shape[2:] == (1, 1) else t for t in (down, up))
        want = ((layer.rank, module.in_features), (module.out_features, layer.rank))
    elif isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        down, up = (t[:, :, None, None] if t.ndim == 2 else t for t in (down, up))
        want = ((layer.rank, module.in_channels, *module.kernel_size), (module.out_channels, layer.rank, 1, 1))
    else:
        raise NodeInputError(
            f"{file}: {layer.name} targets {path}, a {type(module).__name__}; LoRA applies to Linear and Conv2d layers"
        )
    if (tuple(down.shape), tuple(up.shape)) != want:
        raise NodeInputError(
            f"{file}: {layer.name} has down {tuple(layer.down.shape)} and up "
            f"{tuple(layer.up.shape)}; {path} needs {want[0]} and {want[1]}"
        )
    return replace(layer, down=down, up=up)


def _few(names: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
