"""Text-encoder files as ComfyUI's CLIPLoader and DualCLIPLoader read them from models/text_encoders (or the
older models/clip), and the CLIP values they make.

Which model a file holds is told by its key names, as ComfyUI's text-encoder detection does (comfy/sd.py
load_text_encoder_state_dicts / detect_te_model):
- CLIP text models in transformers' CLIPTextModel layout (`text_model.embeddings.token_embedding.weight`,
  `text_model.embeddings.position_embedding.weight`, `text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj,
  layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.{weight,bias}`, `text_model.final_layer_norm.{weight,bias}`): a
  31st layer (`text_model.encoder.layers.30.`) is CLIP-G's (bigG, 32 layers), a 23rd one CLIP-H's (24 layers),
  otherwise CLIP-L (12 layers in the released model). ComfyUI's clip_l.safetensors may also hold
  `text_projection.weight` and `logit_scale` (CLIP's image-text head, which a CLIPTextModel does not have) and
  `text_model.embeddings.position_ids` (a buffer): those three are skipped.
- T5 encoders (t5xxl_fp16, t5xxl_fp8_e4m3fn, t5xxl_fp8_e4m3fn_scaled): plinth.nodes.models.t5's detect_t5, after
  fp8 weights are dequantised (plinth.nodes.models.flux.dequantize_fp8: the scaled-fp8 format is shared).
- Anything else is a NodeInputError naming the file.

CLIP-L is built from its shapes, on the meta device, and filled strictly (assign_strict): the width from the token
embedding, the layer count from the highest layer index, 64-channel heads (every released CLIP text model has
them), the MLP width from fc1, the positions from the position embedding; quick-GELU and end token 49407, as
OpenAI's CLIP ViT-L/14 text model has.

What each CLIPLoader / DualCLIPLoader `type` builds (TYPES): DualCLIPLoader "flux" a CLIP-L and a T5 (in either
order: files are sorted by what they hold), as FLUX.1's text side (family "flux"); CLIPLoader "stable_diffusion" a
CLIP-L alone, as SD1.x's text side (family "sd1"). The other types ComfyUI offers are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models import t5
from plinth.nodes.models.checkpoint import StableDiffusion, tokenizer_dir
from plinth.nodes.models.flux import dequantize_fp8
from plinth.nodes.models.strict_load import assign_strict
from plinth.nodes.models.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import CLIPTextConfig, CLIPTextModel

# ComfyUI 0.3.75's type choices (nodes.py CLIPLoader / DualCLIPLoader), in its order.
CLIP_LOADER_TYPES = (
    "stable_diffusion",
    "stable_cascade",
    "sd3",
    "stable_audio",
    "mochi",
    "ltxv",
    "pixart",
    "cosmos",
    "lumina2",
    "wan",
    "hidream",
    "chroma",
    "ace",
    "omnigen2",
    "qwen_image",
    "hunyuan_image",
    "flux2",
)
DUAL_CLIP_LOADER_TYPES = ("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15")
DEVICES = ("default", "cpu")
# The types Plinth builds: type -> the file kinds it takes, in the order the model holds them.
TYPES: dict[str, tuple[str, ...]] = {"stable_diffusion": ("clip_l",), "flux": ("clip_l", "t5")}
KIND_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "clip_h": "CLIP-H", "t5": "T5"}

CLIP_PREFIX = "text_model."
CLIP_MARKER = CLIP_PREFIX + "final_layer_norm.weight"
_CLIP_G_LAYER = CLIP_PREFIX + "encoder.layers.30.mlp.fc1.weight"  # ComfyUI's cue for CLIP-G (32 layers)
_CLIP_H_LAYER = CLIP_PREFIX + "encoder.layers.22.mlp.fc1.weight"  # ... and for CLIP-H (24 layers)
_TOKENS = CLIP_PREFIX + "embeddings.token_embedding.weight"
_POSITIONS = CLIP_PREFIX + "embeddings.position_embedding.weight"
_FC1 = CLIP_PREFIX + "encoder.layers.0.mlp.fc1.weight"
_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
# In a CLIP-L file but not part of a CLIPTextModel: CLIP's image-text head, and the position_ids buffer.
CLIP_L_SKIPPED = ("text_projection.weight", "logit_scale")
HEAD_WIDTH = 64  # every released CLIP text model has 64-channel attention heads
BOS_ID, EOS_ID = 49406, 49407
T5_TOKENIZER_FOLDER = Path(".plinth") / "t5-tokenizer"

Shapes = Mapping[str, tuple[int, ...]]


def text_encoder_kind(keys: Iterable[str]) -> str | None:
    """What a text-encoder file holds, from its tensor names: "clip_l", "clip_g", "clip_h", "t5", or None."""
    keys = set(keys)
    if CLIP_MARKER in keys:
        if _CLIP_G_LAYER in keys:
            return "clip_g"
        if _CLIP_H_LAYER in keys:
            return "clip_h"
        return "clip_l"
    if t5.detect_t5(keys):
        return "t5"
    return None


def read_text_encoder(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, weights) of a text-encoder .safetensors file; a NodeInputError naming it when it is unreadable or
    holds no text encoder Plinth knows."""
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise NodeInputError(f"{path.name}: only .safetensors text-encoder files load")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise NodeInputError(f"{path.name}: not a readable .safetensors file ({exc})") from exc
    kind = text_encoder_kind(state)
    if kind is None:
        raise NodeInputError(
            f"{path.name}: not a text encoder Plinth reads (neither a CLIP text model in transformers' layout, "
            f"with {CLIP_MARKER}, nor a T5 encoder, with encoder.final_layer_norm.weight)"
        )
    return kind, state


def infer_clip_config(shapes: Shapes, name: str = "CLIP-L") -> CLIPTextConfig:
    """The CLIPTextConfig of a CLIP-L file with these shapes (its keys, `text_model.` included)."""
    from transformers import CLIPTextConfig

    for key in (_TOKENS, _POSITIONS, _FC1):
        if key not in shapes or len(shapes[key]) != 2:
            raise NodeInputError(f"{name}: no {key} weight: not a CLIP text model's layout")
    vocab_size, hidden = shapes[_TOKENS]
    if hidden % HEAD_WIDTH:
        raise NodeInputError(f"{name}: a CLIP text model {hidden} wide does not split into {HEAD_WIDTH}-wide heads")
    layers = {int(m.group(1)) for key in shapes if (m := _LAYER.match(key))}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=shapes[_FC1][0],
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=hidden // HEAD_WIDTH,
        max_position_embeddings=shapes[_POSITIONS][0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=1,
    )


def load_clip_l(state: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> CLIPTextModel:
    """A CLIPTextModel in `dtype`, for eval, from a CLIP-L file's weights (`text_model.` keys; the image-text
    head and position_ids skipped). Strict: a missing, unexpected or misshapen weight is a NodeInputError naming
    the file `name` and the key."""
    from transformers import CLIPTextModel

    weights = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in dequantize_fp8(state, dtype).items()
        if k not in CLIP_L_SKIPPED and not k.endswith("position_ids")
    }
    config = infer_clip_config({k: tuple(v.shape) for k, v in weights.items()}, name)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    # transformers 5's CLIPTextModel has no `text_model.` level; older ones have it.
    if not any(k.startswith(CLIP_PREFIX) for k in model.state_dict()):
        weights = {k[len(CLIP_PREFIX) :] if k.startswith(CLIP_PREFIX) else k: v for k, v in weights.items()}
    assign_strict(model, weights, name, "a CLIP-L text model's layout")
    # position_ids is a buffer left out of the file (and of state_dict): made here, not left on the meta device.
    embeddings = model.get_input_embeddings()
    holder = next(m for m in model.modules() if getattr(m, "token_embedding", None) is embeddings)
    holder.position_ids = torch.arange(config.max_position_embeddings).expand((1, -1))
    return model.eval().requires_grad_(False)


def _t5_dequantized(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp8 weights dequantised into `dtype`, but T5's `wo` projections into float32 when `dtype` is float16 (where
    load_t5_encoder keeps them float32): not rounded through float16 on the way."""
    if dtype != torch.float16:
        return dequantize_fp8(state, dtype)
    wide = {k for k in state if ".DenseReluDense.wo." in k}
    rest = dequantize_fp8({k: v for k, v in state.items() if k not in wide}, dtype)
    return rest | dequantize_fp8({k: state[k] for k in wide}, torch.float32)


def load_t5_file(state: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> Any:
    """A T5EncoderModel from a t5xxl file's weights (fp16, fp8 or scaled fp8)."""
    return t5.load_t5_encoder(_t5_dequantized(state, dtype), name, dtype)


def t5_tokenizer(models_dir: Path) -> Any:
    """The offline T5 v1.1 tokenizer, written once per models directory."""
    return t5.load_t5_tokenizer(t5.write_t5_tokenizer_files(models_dir / T5_TOKENIZER_FOLDER))


def _sorted_files(paths: Sequence[Path], kinds: tuple[str, ...], what: str) -> list[tuple[Path, dict]]:
    """The files' weights in the order of `kinds` (whatever order the files were given in)."""
    read = [(path, *read_text_encoder(path)) for path in paths]
    found = [kind for _, kind, _ in read]
    if sorted(found) != sorted(kinds):
        given = ", ".join(f"{path.name} ({KIND_LABELS[kind]})" for path, kind, _ in read)
        wanted = " and ".join(KIND_LABELS[kind] for kind in kinds)
        raise NodeInputError(f"{what} takes {wanted}; given {given}")
    by_kind = {kind: (path, state) for path, kind, state in read}
    return [by_kind[kind] for kind in kinds]


def load_flux_text(clip_l_path: Path, t5_path: Path, models_dir: Path, dtype: torch.dtype) -> StableDiffusion:
    """FLUX.1's text side from a CLIP-L file and a T5 file (given in either order): CLIP-L (its pooled text)
    and the CLIP tokenizer, T5 (its token states) and the T5 tokenizer, in `dtype` on the CPU; no UNet, no VAE."""
    (l_path, l_state), (t_path, t_state) = _sorted_files([clip_l_path, t5_path], TYPES["flux"], "FLUX.1's CLIP")
    clip_l = load_clip_l(l_state, l_path.name, dtype)
    del l_state
    t5_model = load_t5_file(t_state, t_path.name, dtype)
    return StableDiffusion(
        unet=None,
        vae=None,
        text_encoder=clip_l,
        tokenizer=load_tokenizer(tokenizer_dir(models_dir)),
        scheduler_config={},
        text_encoder_2=t5_model,
        tokenizer_2=t5_tokenizer(models_dir),
        family="flux",
    )


def load_sd1_text(clip_l_path: Path, models_dir: Path, dtype: torch.dtype) -> StableDiffusion:
    """SD1.x's text side from a CLIP-L file: CLIP-L and the CLIP tokenizer; no UNet, no VAE."""
    ((path, state),) = _sorted_files([clip_l_path], TYPES["stable_diffusion"], "CLIPLoader type stable_diffusion")
    return StableDiffusion(
        unet=None,
        vae=None,
        text_encoder=load_clip_l(state, path.name, dtype),
        tokenizer=load_tokenizer(tokenizer_dir(models_dir)),
        scheduler_config={},
        family="sd1",
    )


def unsupported(node: str, kind: str, count: int) -> str | None:
    """Why `node` cannot build a CLIP of ComfyUI type `kind` from `count` files; None when it can."""
    wanted = TYPES.get(kind)
    if wanted is None:
        built = ", ".join(k for k, files in TYPES.items() if len(files) == count) or "none"
        return f"{node} type {kind}: not supported yet (Plinth builds: {built})"
    if len(wanted) != count:
        files = " and ".join(KIND_LABELS[k] for k in wanted)
        loader = "DualCLIPLoader" if len(wanted) == 2 else "CLIPLoader"
        return f"{node} type {kind}: {kind} takes {files} ({len(wanted)} files, {loader}), not {count}"
    return None


def load_text_encoders(
    paths: Sequence[Path], kind: str, models_dir: Path, dtype: torch.dtype, node: str = ""
) -> StableDiffusion:
    """The CLIP a CLIPLoader (one path) or DualCLIPLoader (two) of ComfyUI type `kind` loads, in `dtype` on the
    CPU; a NodeInputError for a type Plinth does not build, or files that are not what the type takes."""
    node = node or ("CLIPLoader" if len(paths) == 1 else "DualCLIPLoader")
    problem = unsupported(node, kind, len(paths))
    if problem:
        raise NodeInputError(problem)
    if kind == "flux":
        return load_flux_text(paths[0], paths[1], models_dir, dtype)
    return load_sd1_text(paths[0], models_dir, dtype)
