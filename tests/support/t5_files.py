"""Write small random T5 v1.1 encoders as ComfyUI's t5xxl files (t5xxl_fp16 / _fp8_e4m3fn / _fp8_e4m3fn_scaled).

The files hold transformers' T5EncoderModel layout: `shared.weight`, per block `encoder.block.N.layer.0.SelfAttention`
q/k/v/o (block 0 also its relative_attention_bias), `layer.0.layer_norm`, `layer.1.DenseReluDense` wi_0/wi_1/wo and
`layer.1.layer_norm`, then `encoder.final_layer_norm`; all-in-one checkpoints put them under
``text_encoders.t5xxl.transformer.``. The keys are written here from the modules one name at a time, not from
state_dict(), so that the file says what ComfyUI's files say (one embedding, no `encoder.embed_tokens` twin).

ComfyUI's scaled-fp8 files store each linear weight as float8_e4m3fn with a float32 `<layer>.scale_weight` beside
it (weight ≈ stored * scale) and a `scaled_fp8` marker tensor; norms, the embedding and the relative attention bias
stay in the file's higher precision. Tests cannot download such files.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from transformers import T5Config, T5EncoderModel

COMFY_PREFIX = "text_encoders.t5xxl.transformer."
SCALED_FP8_MARKER = "scaled_fp8"
LINEARS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")
FF_LINEARS = ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")


def small_t5_config(**changes) -> T5Config:
    """A T5 v1.1 encoder config at test size: d_model 32, 2 layers, 4 heads of 8 (so q's 32 outputs alone cannot
    tell heads from head width), d_ff 64, T5's 32128-row embedding, 32 buckets, gated GELU."""
    values = {
        "vocab_size": 32128,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 32,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
    }
    return T5Config(**{**values, **changes})


def build_random_t5(config: T5Config, seed: int) -> T5EncoderModel:
    """A T5EncoderModel of `config` in eval mode, every parameter given seeded noise (layer norms no longer all 1).
    The global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def to_comfy_state_dict(model: T5EncoderModel, embedding_key: str = "shared.weight") -> dict[str, torch.Tensor]:
    """The encoder's weights under ComfyUI's t5xxl key names (no prefix), as fresh contiguous tensors; the embedding
    under `embedding_key` alone."""
    state: dict[str, torch.Tensor] = {embedding_key: model.get_parameter("shared.weight")}
    for i in range(model.config.num_layers):
        names = [f"layer.0.{name}" for name in LINEARS] + ["layer.0.layer_norm"]
        if i == 0:  # T5: only the first block has the relative attention bias
            names.append("layer.0.SelfAttention.relative_attention_bias")
        names += [f"layer.1.{name}" for name in FF_LINEARS] + ["layer.1.layer_norm"]
        for name in names:
            key = f"encoder.block.{i}.{name}.weight"
            state[key] = model.get_parameter(key)
    state["encoder.final_layer_norm.weight"] = model.get_parameter("encoder.final_layer_norm.weight")
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def to_scaled_fp8(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 form of `state`: linear weights as float8_e4m3fn with a per-tensor scale_weight (the
    weight's absolute maximum over e4m3's largest value, 448), the rest in `dtype`, and the marker."""
    out: dict[str, torch.Tensor] = {SCALED_FP8_MARKER: torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if any(f".{name}.weight" in key for name in LINEARS + FF_LINEARS):
            scale = value.abs().max().float() / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            out[key] = value.to(dtype)
    return out


def write_t5_file(
    model: T5EncoderModel,
    folder: Path,
    name: str,
    *,
    dtype: torch.dtype | None = None,
    scaled_fp8: bool = False,
    prefix: str = "",
    embedding_key: str = "shared.weight",
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` as a ComfyUI t5xxl .safetensors file: every tensor in `dtype` (a float8 dtype for
    t5xxl_fp8_e4m3fn), or scaled fp8; keys under `prefix` (COMFY_PREFIX for an all-in-one checkpoint), `extra`
    tensors (another model's parts) beside them."""
    state = to_comfy_state_dict(model, embedding_key)
    if scaled_fp8:
        state = to_scaled_fp8(state)
    elif dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    state = {prefix + k: v for k, v in state.items()} | dict(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
