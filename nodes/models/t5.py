"""T5 v1.1 text encoders (FLUX.1's second text model) from ComfyUI's t5xxl files, and the T5 tokenizer, offline.

Files: ComfyUI's t5xxl_fp16 / t5xxl_fp8_e4m3fn / t5xxl_fp8_e4m3fn_scaled .safetensors hold a T5 v1.1 encoder in
transformers' T5EncoderModel key layout: `shared.weight` (the token embedding; a file may hold it, or
also, as `encoder.embed_tokens.weight`, transformers' tied twin: either is read, shared.weight first), per block i
`encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`, `encoder.block.{i}.layer.0.layer_norm.weight`,
`encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`, `encoder.block.{i}.layer.1.layer_norm.weight`,
only block 0's `SelfAttention.relative_attention_bias.weight` [buckets, heads], and `encoder.final_layer_norm.weight`.
All-in-one checkpoints (SD3.5, Comfy-Org's FLUX.1 fp8 checkpoints) hold the same keys under
`text_encoders.t5xxl.transformer.`. Every size is read off the shapes: d_model and the vocabulary (32128 rows for
32100 tokens) from the embedding, the layer count from the blocks, d_ff from wi_0, the heads from the relative
attention bias's columns and so d_kv = q's outputs / heads (q alone gives only heads * d_kv), the buckets from its
rows. Gated-GELU (T5 v1.1: wi_0 and wi_1) or, for the original T5's `wi`, ReLU. UMT5 (a relative attention bias
in every block) is another model and is refused.

fp8 files are dequantised by the caller before load_t5_encoder (plinth.nodes.models.flux.dequantize_fp8 reads
ComfyUI's scaled-fp8 format, which text models share); plain fp8 tensors are cast. As transformers' from_pretrained
does for T5, the feed-forward output projections (`wo`) stay float32 when the rest is float16: T5 v1.1 XXL
overflows float16 there.

Tokenizer: Google's T5 v1.1 SentencePiece Unigram tokenizer (32,000 pieces + 100 `<extra_id_N>`, `<pad>` 0,
`</s>` 1, `<unk>` 2), shipped gzipped beside this module (t5_tokenizer/, provenance and license in its SOURCE.md);
write_t5_tokenizer_files puts it in a folder from which transformers' T5 tokenizer loads, never from a hub.

Encoding as ComfyUI does for FLUX.1 (comfy/text_encoders/flux.py T5XXLTokenizer, comfy/sd1_clip.py SDTokenizer /
ClipTokenWeightEncoder, comfy/text_encoders/sd3_clip.py T5XXLModel):
- `T5XXLTokenizer(..., pad_with_end=False, has_start_token=False, pad_to_max_length=False, max_length=99999999,
  min_length=256)`: no start token; the prompt's words, each tokenised alone without its `</s>`
  (`self.tokenizer(word)["input_ids"][self.tokens_start:-1]`, tokens_start 0), then one `</s>` (1), then `<pad>`
  (0, as pad_with_end=False gives) up to 256 tokens; a longer prompt is never cut nor split: it runs to its length.
  (SD3's T5 pads to 77, PixArt's to 1 (not at all), LTXV's to 128: min_length is a parameter here.)
- Emphasis is parsed as for CLIP (`(word:1.2)`, `(word)` = 1.1, `\\(`): ComfyUI's one parser for every text model.
  A weighted prompt is encoded beside the empty one (`gen_empty_tokens({"end": 1, "pad": 0}, L)` = [1, 0, 0, ...])
  and each weighted token moved: z' = (z - z_empty) * w + z_empty (tokens of weight 1 are left as they are).
- No attention mask: `T5XXLModel(..., attention_mask=False)` is the default and flux_clip passes none
  (`enable_attention_masks=attention_mask`), so every token, padding too, attends to every other (Black Forest
  Labs' reference code, too, encodes its padded prompt with attention_mask=None). The output is the last layer
  after the final layer norm (layer "last"), as float32.
- Not here yet: `embedding:NAME` (ComfyUI's t5xxl textual inversions) is tokenised as text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.strict_load import assign_strict
from plinth.nodes.prompt import prompt_words

if TYPE_CHECKING:
    from transformers import T5Config, T5EncoderModel

T5_PREFIX = "text_encoders.t5xxl.transformer."  # ComfyUI's all-in-one checkpoints (SD3.5, FLUX.1 fp8)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
TOKENIZER_SIZE = 32100  # 32,000 SentencePiece pieces + 100 <extra_id_N>
FLUX_MIN_LENGTH = 256  # ComfyUI pads FLUX.1's T5 prompt to this many tokens (comfy/text_encoders/flux.py)
MAX_DISTANCE = 128  # T5's relative_attention_max_distance: in no shape; every T5 v1.1 size uses 128
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
# A whole T5ForConditionalGeneration's other half, which an encoder does not use (as transformers ignores it).
NOT_ENCODER = ("decoder.", "lm_head.")
_Q = "encoder.block.{}.layer.0.SelfAttention.q.weight"
_BIAS = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"
_FF = "encoder.block.0.layer.1.DenseReluDense."
_MARKER = "encoder.final_layer_norm.weight"
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")

TOKENIZER_DATA = Path(__file__).parent / "t5_tokenizer" / "tokenizer.json.gz"
TOKENIZER_SHA256 = "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a"

Shapes = Mapping[str, tuple[int, ...]]


def t5_prefix(keys: Iterable[str]) -> str | None:
    """ "" for a bare T5 encoder's keys, T5_PREFIX for an all-in-one checkpoint's, None for neither.
    UMT5 (a relative attention bias in block 1 too) is not T5 here."""
    keys = set(keys)
    for prefix in ("", T5_PREFIX):
        if (
            prefix + _MARKER in keys
            and prefix + _Q.format(0) in keys
            and prefix + _BIAS.format(0) in keys
            and prefix + _BIAS.format(1) not in keys
        ):
            return prefix
    return None


def detect_t5(keys: Iterable[str]) -> bool:
    """Whether these are a T5 (v1.1 or original) encoder's weights, bare or under T5_PREFIX."""
    return t5_prefix(keys) is not None


def t5_weights(state: Mapping[str, torch.Tensor], name: str = "T5") -> dict[str, torch.Tensor]:
    """The encoder's weights under bare T5EncoderModel keys: the prefix of an all-in-one checkpoint and its other
    parts dropped, a whole encoder-decoder's decoder dropped, and the embedding under both of transformers' names
    (one tensor; from `shared.weight` where a file has both)."""
    prefix = t5_prefix(state)
    if prefix is None:
        raise NodeInputError(
            f"{name}: not a T5 text encoder (no {_MARKER} and block 0 relative attention bias, bare or under "
            f"{T5_PREFIX}; UMT5 files are not T5)"
        )
    weights = {
        key[len(prefix) :]: value
        for key, value in state.items()
        if key.startswith(prefix) and not key[len(prefix) :].startswith(NOT_ENCODER)
    }
    embedding = next((weights[k] for k in EMBEDDING_KEYS if k in weights), None)
    if embedding is not None:
        for key in EMBEDDING_KEYS:
            weights[key] = embedding
    return weights


def _need(shapes: Shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise NodeInputError(f"no {key} weight: not a T5 encoder's layout")
    return tuple(shapes[key])


def infer_t5_config(shapes: Shapes) -> T5Config:
    """The T5Config of an encoder with these weight shapes (bare T5EncoderModel keys)."""
    from transformers import T5Config

    embedding = next((tuple(shapes[k]) for k in EMBEDDING_KEYS if k in shapes), None)
    if embedding is None or len(embedding) != 2:
        raise NodeInputError(f"no token embedding ({' or '.join(EMBEDDING_KEYS)}): not a T5 encoder's layout")
    vocab_size, d_model = embedding
    blocks = {int(m.group(1)) for key in shapes if (m := _BLOCK.match(key))}
    if not blocks:
        raise NodeInputError("no encoder.block.N weights: not a T5 encoder's layout")
    num_layers = max(blocks) + 1
    buckets, num_heads = _need(shapes, _BIAS.format(0))
    inner = _need(shapes, _Q.format(0))[0]
    if inner % num_heads:
        raise NodeInputError(f"{_Q.format(0)} has {inner} outputs, not a multiple of the {num_heads} attention heads")
    if _FF + "wi_0.weight" in shapes:
        d_ff, feed_forward = _need(shapes, _FF + "wi_0.weight")[0], "gated-gelu"
    else:
        d_ff, feed_forward = _need(shapes, _FF + "wi.weight")[0], "relu"
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=MAX_DISTANCE,
        feed_forward_proj=feed_forward,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )


def _keep_fp32(key: str, dtype: torch.dtype) -> bool:
    """transformers keeps T5's `wo` projections float32 in a float16 model (T5PreTrainedModel._keep_in_fp32_modules)."""
    return dtype == torch.float16 and key.endswith(".DenseReluDense.wo.weight")


def load_t5_encoder(state: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype) -> T5EncoderModel:
    """A T5EncoderModel in `dtype`, for eval, from a T5 encoder file's (already dequantised) weights, bare or under
    T5_PREFIX beside other parts (ignored). Strict: a missing, unexpected or misshapen weight is a NodeInputError
    naming the file `name` and the key."""
    from transformers import T5EncoderModel

    weights = t5_weights(state, name)
    try:
        config = infer_t5_config({k: tuple(v.shape) for k, v in weights.items()})
    except NodeInputError as exc:
        raise NodeInputError(f"{name}: {exc}") from None
    with torch.device("meta"):
        model = T5EncoderModel(config)
    # Cast tensor by tensor, not the model after: no second copy of the whole model.
    cast = {k: v.to(torch.float32 if _keep_fp32(k, dtype) else dtype) for k, v in weights.items()}
    assign_strict(model, cast, name, "a T5 encoder's layout")
    return model.eval().requires_grad_(False)


def _tokenizer_json() -> bytes:
    data = gzip.decompress(TOKENIZER_DATA.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise RuntimeError(f"{TOKENIZER_DATA} is not the T5 v1.1 tokenizer (SHA-256 {digest})")
    return data


def write_t5_tokenizer_files(folder: Path) -> Path:
    """Write tokenizer.json and the tokenizer configs of the T5 v1.1 tokenizer into `folder` (idempotent)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "tokenizer.json").exists() and (folder / "tokenizer_config.json").exists():
        return folder
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tmp = folder / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    (tmp / "tokenizer.json").write_bytes(_tokenizer_json())
    (tmp / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 512, **special}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    for f in tmp.iterdir():
        os.replace(f, folder / f.name)
    tmp.rmdir()
    return folder


def load_t5_tokenizer(folder: Path) -> Any:
    """transformers' T5 tokenizer (in transformers 5 the fast one, on the tokenizers library) from a folder written
    by write_t5_tokenizer_files."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)


def t5_tokens(tokenizer: Any, text: str, min_length: int = FLUX_MIN_LENGTH) -> list[tuple[int, float]]:
    """(token id, weight) of `text` as ComfyUI's T5XXLTokenizer gives them: each word tokenised alone, then `</s>`,
    then `<pad>` up to `min_length` tokens; nothing cut."""
    tokens = [
        (token, weight)
        for word, weight in prompt_words(text)
        for token in tokenizer(word, add_special_tokens=False).input_ids
    ]
    tokens.append((EOS_ID, 1.0))
    tokens += [(PAD_ID, 1.0)] * (min_length - len(tokens))
    return tokens


def encode_t5(
    tokenizer: Any, encoder: Any, text: str, device: torch.device, min_length: int = FLUX_MIN_LENGTH
) -> torch.Tensor:
    """ComfyUI's T5 conditioning of `text`: float32 [1, L, d_model], L = max(min_length, tokens + 1), no attention
    mask, emphasis applied against the empty prompt's encoding."""
    tokens = t5_tokens(tokenizer, text, min_length)
    ids = [[token for token, _ in tokens]]
    weighted = any(weight != 1.0 for _, weight in tokens)
    if weighted:
        ids.append([EOS_ID] + [PAD_ID] * (len(tokens) - 1))  # ComfyUI's gen_empty_tokens for T5
    with torch.no_grad():
        hidden = encoder(input_ids=torch.tensor(ids, dtype=torch.long, device=device)).last_hidden_state.float()
    if not weighted:
        return hidden
    empty, hidden = hidden[1:], hidden[:1]
    weights = torch.tensor([weight for _, weight in tokens], device=hidden.device).view(1, -1, 1)
    return torch.where(weights != 1.0, (hidden - empty) * weights + empty, hidden)  # ComfyUI moves weighted ones only
