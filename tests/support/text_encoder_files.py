"""Write small random text encoders as ComfyUI's text-encoder files (models/text_encoders): clip_l.safetensors and
t5xxl_fp16 / t5xxl_fp8_e4m3fn_scaled.safetensors.

ComfyUI's clip_l.safetensors holds OpenAI's CLIP ViT-L/14 text model in transformers' CLIPTextModel layout under
`text_model.`: `embeddings.token_embedding` and `embeddings.position_embedding`, per layer N
`encoder.layers.N.self_attn.{q,k,v,out}_proj`, `layer_norm1`, `mlp.fc1`, `mlp.fc2`, `layer_norm2`, then
`final_layer_norm`; beside them it may carry CLIP's `text_projection.weight` and `logit_scale` and the
`text_model.embeddings.position_ids` buffer, which a text model does not use. The keys are written here from the
modules one name at a time, not from state_dict(), so the file says what ComfyUI's files say whatever the installed
transformers calls its modules. The T5 files come from tests/support/t5_files.py. Tests cannot download such files.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

from support.t5_files import build_random_t5, small_t5_config, write_t5_file

CLIP_L_NAME = "clip_l.safetensors"
T5_FP16_NAME = "t5xxl_fp16.safetensors"
T5_SCALED_NAME = "t5xxl_fp8_e4m3fn_scaled.safetensors"
LAYER_PARTS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "layer_norm1",
    "mlp.fc1",
    "mlp.fc2",
    "layer_norm2",
)


def small_clip_l_config(**changes) -> CLIPTextConfig:
    """CLIP-L's text model at test size: 64 wide (one 64-channel head), 2 layers, MLP 256 (CLIP-L's ratio 4),
    CLIP's full 49,408-token vocabulary and 77 positions, quick-GELU, end token 49407."""
    values = {
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    return CLIPTextConfig(**{**values, **changes})


def build_random_clip_l(config: CLIPTextConfig | None = None, seed: int = 0) -> CLIPTextModel:
    """A CLIPTextModel of `config` in eval mode, every parameter given seeded noise (norms no longer 1, biases no
    longer 0). The global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config or small_clip_l_config())
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def _text_model(model: CLIPTextModel) -> torch.nn.Module:
    """The module holding embeddings, encoder and final_layer_norm (transformers 4 nests it as .text_model)."""
    return getattr(model, "text_model", model)


def clip_l_state_dict(model: CLIPTextModel, extras: bool = True) -> dict[str, torch.Tensor]:
    """The text model's weights under ComfyUI's clip_l key names, as fresh contiguous tensors; with `extras` also
    the text_projection, logit_scale and position_ids a real file may carry."""
    text = _text_model(model)
    modules = {
        "embeddings.token_embedding": text.embeddings.token_embedding,
        "embeddings.position_embedding": text.embeddings.position_embedding,
        "final_layer_norm": text.final_layer_norm,
    }
    for i, layer in enumerate(text.encoder.layers):
        for part in LAYER_PARTS:
            modules[f"encoder.layers.{i}.{part}"] = layer.get_submodule(part)
    state: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for leaf, param in module.named_parameters(recurse=False):
            state[f"text_model.{name}.{leaf}"] = param
    if extras:
        hidden = model.config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            state["text_projection.weight"] = torch.randn(hidden, hidden)
        state["logit_scale"] = torch.tensor(4.6052)
        state["text_model.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_clip_l_file(
    model: CLIPTextModel, folder: Path, name: str = CLIP_L_NAME, dtype: torch.dtype | None = None, extras: bool = True
) -> Path:
    """Write `model` as a ComfyUI clip_l .safetensors file (floating tensors in `dtype` if given)."""
    state = clip_l_state_dict(model, extras)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    safetensors.torch.save_file(state, str(path))
    return path


def small_flux_t5(seed: int = 0) -> T5EncoderModel:
    """T5 v1.1 at test size (tests/support/t5_files.py): d_model 32, 2 layers."""
    return build_random_t5(small_t5_config(), seed=seed)


def write_flux_text_encoders(
    folder: Path, clip_l: CLIPTextModel, t5: T5EncoderModel, scaled: bool = True
) -> dict[str, Path]:
    """clip_l.safetensors, t5xxl_fp16.safetensors and (with `scaled`) t5xxl_fp8_e4m3fn_scaled.safetensors in
    `folder`, as ComfyUI's FLUX.1 text-encoder downloads are named; {name: path}."""
    paths = {CLIP_L_NAME: write_clip_l_file(clip_l, folder)}
    paths[T5_FP16_NAME] = write_t5_file(t5, folder, T5_FP16_NAME, dtype=torch.float16)
    if scaled:
        paths[T5_SCALED_NAME] = write_t5_file(t5, folder, T5_SCALED_NAME, scaled_fp8=True)
    return paths
