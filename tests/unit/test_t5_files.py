"""T5 v1.1 text encoders from ComfyUI's t5xxl files, and the real T5 tokenizer offline (plinth.nodes.models.t5).

Small random T5 encoders are written in ComfyUI's key layout by tests/support/t5_files.py (from the modules, one
name at a time) as fp32, fp16, fp8 and scaled-fp8 files, bare and inside an all-in-one checkpoint, and loaded back:
every weight must come back as written (dequantised for fp8, by a small function here, not Plinth's), the config
read from the shapes must be the one the model was built with, and the forward must agree. A missing, misshapen or
unexpected weight fails naming it. The tokenizer is the real one: ids are checked against pieces of its own
vocabulary, an independent Unigram Viterbi over its scores, and the ids of transformers' documented example.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from support.t5_files import COMFY_PREFIX, SCALED_FP8_MARKER, build_random_t5, small_t5_config, write_t5_file
from transformers import T5Config, T5EncoderModel

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.t5 import (
    EOS_ID,
    FLUX_MIN_LENGTH,
    PAD_ID,
    TOKENIZER_DATA,
    detect_t5,
    encode_t5,
    infer_t5_config,
    load_t5_encoder,
    load_t5_tokenizer,
    t5_tokens,
    write_t5_tokenizer_files,
)

PROMPT = "a red sneaker on a plinth"
# Pieces of the T5 v1.1 vocabulary: T5 writes a lone "a" as "▁" + "a" (no "▁a" beats that split), "sneaker" as
# "▁sneak" + "er", "plinth" as "▁plin" + "th"; each id is the piece's index in the vocabulary, checked below.
PROMPT_PIECES = ["▁", "a", "▁red", "▁sneak", "er", "▁on", "▁", "a", "▁plin", "th", "</s>"]
PROMPT_IDS = [3, 9, 1131, 14801, 49, 30, 3, 9, 10996, 189, 1]
WORDS = ["a", "red", "sneaker", "on", "plinth", "Hello", "world", "product", "photograph", "minimalist", "studio"]
CONFIG_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "feed_forward_proj",
    "is_gated_act",
    "dense_act_fn",
    "layer_norm_epsilon",
)
WO = "encoder.block.1.layer.1.DenseReluDense.wo.weight"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_t5_tokenizer(write_t5_tokenizer_files(tmp_path_factory.mktemp("t5-tokenizer")))


@pytest.fixture(scope="module")
def vocab() -> list[tuple[str, float]]:
    """The Unigram pieces and scores of the shipped tokenizer.json, read here without transformers."""
    return [tuple(p) for p in json.loads(gzip.decompress(TOKENIZER_DATA.read_bytes()))["model"]["vocab"]]


@pytest.fixture(scope="module")
def model() -> T5EncoderModel:
    return build_random_t5(small_t5_config(), seed=0)


def dequantize(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8 dequantisation, for the tests: scaled weights times their scale_weight, fp8 tensors cast,
    the marker and scale keys dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith((SCALED_FP8_MARKER, ".scale_weight", ".scale_input")):
            continue
        scale = state.get(key.removesuffix(".weight") + ".scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            value = value.float() * scale.float()
        out[key] = (
            value.to(dtype) if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or scale is not None else value
        )
    return out


def load_file(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def forward(model: T5EncoderModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state.float()


def sample_ids(length: int = 12) -> list[int]:
    return [int(i) for i in torch.randint(3, 32100, (length,), generator=torch.Generator().manual_seed(3))] + [EOS_ID]


# --- the tokenizer ---------------------------------------------------------------------------------------------


def test_tokenizer_is_the_real_t5_v11_one(tokenizer, vocab):
    assert len(tokenizer) == 32100 and len(vocab) == 32100
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert [piece for piece, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"]
    assert tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]
    ids = tokenizer(PROMPT).input_ids
    assert ids == PROMPT_IDS
    assert tokenizer.convert_ids_to_tokens(ids) == PROMPT_PIECES
    assert [vocab[i][0] for i in ids] == PROMPT_PIECES  # the ids are the pieces' places in the shipped vocabulary
    assert "".join(PROMPT_PIECES[:-1]) == "▁" + PROMPT.replace(" ", "▁")
    assert tokenizer("Hello world").input_ids == [8774, 296, 1]  # transformers' T5 documentation example


def _viterbi(word: str, scores: dict[str, float]) -> list[str]:
    """The highest-scoring split of "▁" + word into vocabulary pieces (SentencePiece Unigram decoding)."""
    text = "▁" + word
    best: list[tuple[float, int]] = [(0.0, 0)] + [(-math.inf, 0)] * len(text)
    for end in range(1, len(text) + 1):
        for start in range(max(0, end - 20), end):
            piece = text[start:end]
            if piece in scores and best[start][0] + scores[piece] > best[end][0]:
                best[end] = (best[start][0] + scores[piece], start)
    pieces: list[str] = []
    end = len(text)
    while end:
        start = best[end][1]
        pieces.insert(0, text[start:end])
        end = start
    return pieces


def test_tokenizer_agrees_with_a_unigram_viterbi_over_its_own_scores(tokenizer, vocab):
    scores = {piece: score for piece, score in vocab[3:32000]}
    for word in WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == _viterbi(word, scores), word


def test_tokenizer_files_are_written_once(tmp_path):
    folder = write_t5_tokenizer_files(tmp_path / "tok")
    first = (folder / "tokenizer.json").stat().st_mtime_ns
    assert write_t5_tokenizer_files(folder) == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns == first
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_tokens_pad_to_256_with_pad_after_one_end_token_as_comfyui_does_for_flux(tokenizer):
    tokens = t5_tokens(tokenizer, PROMPT)
    assert [t for t, _ in tokens] == PROMPT_IDS + [PAD_ID] * (FLUX_MIN_LENGTH - len(PROMPT_IDS))
    assert all(w == 1.0 for _, w in tokens)
    assert len(t5_tokens(tokenizer, PROMPT, min_length=77)) == 77
    long = t5_tokens(tokenizer, "red " * 300)  # nothing cut, nothing split: 300 tokens and the end token
    assert len(long) == 301 and long[-1] == (EOS_ID, 1.0) and long[-2] == (1131, 1.0)


def test_tokens_carry_comfyui_emphasis(tokenizer):
    tokens = t5_tokens(tokenizer, "a (red:1.5) (sneaker) on a plinth")
    assert [t for t, _ in tokens[:11]] == PROMPT_IDS  # parentheses and weights are not text
    assert [w for _, w in tokens[:6]] == [1.0, 1.0, 1.5, pytest.approx(1.1), pytest.approx(1.1), 1.0]


# --- the encoder files -----------------------------------------------------------------------------------------


def test_detect_t5_bare_and_in_an_all_in_one_checkpoint(model):
    keys = set(model.state_dict())
    assert detect_t5(keys)
    assert detect_t5({COMFY_PREFIX + k for k in keys} | {"model.diffusion_model.img_in.weight"})
    assert not detect_t5({"text_model.encoder.layers.0.mlp.fc1.weight", "text_model.final_layer_norm.weight"})
    assert not detect_t5({"double_blocks.0.img_attn.qkv.weight", "img_in.weight"})
    umt5 = keys | {"encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"}
    assert not detect_t5(umt5)  # UMT5: a relative attention bias in every block


def test_config_read_from_the_shapes(tmp_path, model):
    state = load_file(write_t5_file(model, tmp_path, "t5.safetensors"))
    config = infer_t5_config({k: tuple(v.shape) for k, v in state.items()})
    for field in CONFIG_FIELDS:
        assert getattr(config, field) == getattr(model.config, field), field


def test_config_of_the_released_t5_xxl_size():
    """ComfyUI's t5_config_xxl.json, built on the meta device (shapes only)."""
    xxl = small_t5_config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T5EncoderModel(xxl).state_dict().items()}
    config = infer_t5_config(shapes)
    for field in CONFIG_FIELDS:
        assert getattr(config, field) == getattr(xxl, field), field


def _assert_loaded(loaded: T5EncoderModel, expected: dict[str, torch.Tensor]) -> None:
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


def test_fp32_file_loads_weight_for_weight_and_forward_equal(tmp_path, model):
    loaded = load_t5_encoder(
        load_file(write_t5_file(model, tmp_path, "t5.safetensors")), "t5.safetensors", torch.float32
    )
    _assert_loaded(loaded, model.state_dict())
    assert not loaded.training
    ids = sample_ids()
    assert torch.equal(forward(loaded, ids), forward(model, ids))


def test_all_in_one_checkpoint_loads_its_t5_part(tmp_path, model):
    others = {
        "model.diffusion_model.img_in.weight": torch.randn(4, 4),
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.randn(8),
    }
    path = write_t5_file(model, tmp_path, "flux1-dev-fp8.safetensors", prefix=COMFY_PREFIX, extra=others)
    loaded = load_t5_encoder(load_file(path), path.name, torch.float32)
    _assert_loaded(loaded, model.state_dict())


def test_file_naming_the_embedding_encoder_embed_tokens_loads(tmp_path, model):
    path = write_t5_file(model, tmp_path, "t5.safetensors", embedding_key="encoder.embed_tokens.weight")
    assert "shared.weight" not in load_file(path)
    loaded = load_t5_encoder(load_file(path), path.name, torch.float32)
    _assert_loaded(loaded, model.state_dict())


def test_fp16_file_loads_with_wo_kept_float32(tmp_path, model):
    path = write_t5_file(model, tmp_path, "t5xxl_fp16.safetensors", dtype=torch.float16)
    loaded = load_t5_encoder(load_file(path), path.name, torch.float16)
    expected = {
        k: v.half().float() if k.endswith("DenseReluDense.wo.weight") else v.half()
        for k, v in model.state_dict().items()
    }
    _assert_loaded(loaded, expected)
    ids = sample_ids()
    torch.testing.assert_close(forward(loaded, ids), forward(model, ids), atol=2e-2, rtol=2e-2)


def test_fp8_file_loads_dequantised(tmp_path, model):
    path = write_t5_file(model, tmp_path, "t5xxl_fp8_e4m3fn.safetensors", dtype=torch.float8_e4m3fn)
    loaded = load_t5_encoder(dequantize(load_file(path)), path.name, torch.float32)
    expected = {k: v.to(torch.float8_e4m3fn).float() for k, v in model.state_dict().items()}
    _assert_loaded(loaded, expected)
    reference = build_random_t5(small_t5_config(), seed=0)
    reference.load_state_dict(expected)
    assert torch.equal(forward(loaded, sample_ids()), forward(reference, sample_ids()))


def test_scaled_fp8_file_loads_dequantised(tmp_path, model):
    path = write_t5_file(model, tmp_path, "t5xxl_fp8_e4m3fn_scaled.safetensors", scaled_fp8=True)
    raw = load_file(path)
    assert raw[WO].dtype == torch.float8_e4m3fn and SCALED_FP8_MARKER in raw
    loaded = load_t5_encoder(dequantize(raw), path.name, torch.float32)

    def stored(key: str) -> torch.Tensor:  # what the file holds for `key`, times its scale where it has one
        key = "shared.weight" if key == "encoder.embed_tokens.weight" else key
        scale = raw.get(key.removesuffix(".weight") + ".scale_weight")
        return raw[key].float() * scale if scale is not None else raw[key].float()

    expected = {k: stored(k) for k in model.state_dict()}
    _assert_loaded(loaded, expected)
    torch.testing.assert_close(expected[WO], model.state_dict()[WO], atol=0.02, rtol=0.07)  # e4m3: 3 mantissa bits
    reference = build_random_t5(small_t5_config(), seed=0)
    reference.load_state_dict(expected)
    assert torch.equal(forward(loaded, sample_ids()), forward(reference, sample_ids()))
    with pytest.raises(NodeInputError, match="scale_weight"):  # not dequantised: the scales are unexpected keys
        load_t5_encoder(raw, path.name, torch.float32)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("missing", WO),
        ("misshapen", "encoder.block.1.layer.0.layer_norm.weight"),
        ("unexpected", "encoder.block.0.layer.0.SelfAttention.extra.weight"),
    ],
)
def test_a_file_that_does_not_fit_fails_naming_the_key(tmp_path, model, change, named):
    state = load_file(write_t5_file(model, tmp_path, "t5.safetensors"))
    if change == "missing":
        del state[named]
    elif change == "misshapen":
        state[named] = torch.ones(31)
    else:
        state[named] = torch.ones(2, 2)
    with pytest.raises(NodeInputError, match=rf"t5\.safetensors: .*{named.replace('.', '[.]')}"):
        load_t5_encoder(state, "t5.safetensors", torch.float32)


def test_not_a_t5_file_is_refused(model):
    with pytest.raises(NodeInputError, match="clip.safetensors: not a T5 text encoder"):
        load_t5_encoder({"text_model.final_layer_norm.weight": torch.ones(8)}, "clip.safetensors", torch.float32)


# --- encoding --------------------------------------------------------------------------------------------------


def test_encode_t5_is_the_unmasked_encoding_of_the_padded_tokens(tokenizer, model):
    cond = encode_t5(tokenizer, model, PROMPT, torch.device("cpu"))
    assert cond.shape == (1, FLUX_MIN_LENGTH, 32) and cond.dtype == torch.float32
    ids = PROMPT_IDS + [PAD_ID] * (FLUX_MIN_LENGTH - len(PROMPT_IDS))
    assert torch.equal(cond, forward(model, ids))
    with torch.no_grad():
        mask = torch.tensor([[1] * len(PROMPT_IDS) + [0] * (FLUX_MIN_LENGTH - len(PROMPT_IDS))])
        masked = model(input_ids=torch.tensor([ids]), attention_mask=mask).last_hidden_state
    assert not torch.allclose(cond, masked)  # ComfyUI's FLUX T5 attends to the padding: so must we
    assert encode_t5(tokenizer, model, PROMPT, torch.device("cpu"), min_length=77).shape == (1, 77, 32)


def test_encode_t5_weights_move_tokens_from_the_empty_prompt(tokenizer, model):
    cond = encode_t5(tokenizer, model, "a (red:1.5) sneaker on a plinth", torch.device("cpu"))
    plain = forward(model, PROMPT_IDS + [PAD_ID] * (FLUX_MIN_LENGTH - len(PROMPT_IDS)))
    empty = forward(model, [EOS_ID] + [PAD_ID] * (FLUX_MIN_LENGTH - 1))
    expected = plain.clone()
    expected[0, 2] = (plain[0, 2] - empty[0, 2]) * 1.5 + empty[0, 2]
    torch.testing.assert_close(cond, expected, atol=1e-5, rtol=1e-5)


def test_config_from_shapes_round_trips_a_non_square_head_split():
    """8 heads of 4 give q the same 32 outputs as 4 heads of 8: the bias's columns tell them apart."""
    other = build_random_t5(small_t5_config(num_heads=8, d_kv=4, num_layers=3), seed=1)
    config = infer_t5_config({k: tuple(v.shape) for k, v in other.state_dict().items()})
    assert (config.num_heads, config.d_kv, config.num_layers) == (8, 4, 3)
    assert isinstance(config, T5Config)
