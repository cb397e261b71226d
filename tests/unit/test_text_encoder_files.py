"""FLUX.1's text side from ComfyUI's text-encoder files (plinth.nodes.models.text_encoders, plinth.nodes.flux).

Small random CLIP-L and T5 encoders are written as clip_l.safetensors, t5xxl_fp16.safetensors and
t5xxl_fp8_e4m3fn_scaled.safetensors by tests/support/text_encoder_files.py and loaded back: every weight must come
back exactly as written (dequantised for scaled fp8), the files must be told apart by their key names, and
DualCLIPLoader's two files may come in either order. The encoding is checked against diffusers' FluxPipeline,
an independent implementation of the same model: its encode_prompt gives the T5 token states and CLIP-L's pooled
text FLUX.1 is conditioned on, and for plain prompts ComfyUI's tokenisation (word by word) gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import safetensors.torch
import torch
from support.t5_files import to_comfy_state_dict
from support.text_encoder_files import (
    CLIP_L_NAME,
    T5_FP16_NAME,
    T5_SCALED_NAME,
    build_random_clip_l,
    clip_l_state_dict,
    small_clip_l_config,
    small_flux_t5,
    write_clip_l_file,
    write_flux_text_encoders,
)

from plinth.nodes import flux
from plinth.nodes.core.context import ModelHandle, NodeInputError
from plinth.nodes.core.types import ConditioningEntry, TextEncoder
from plinth.nodes.models import text_encoders
from plinth.nodes.models.checkpoint import tokenizer_dir
from plinth.nodes.models.text_encoders import (
    load_clip_l,
    load_flux_text,
    load_text_encoders,
    read_text_encoder,
    text_encoder_kind,
)
from plinth.nodes.models.tokenizer import load_tokenizer

PLAIN_PROMPTS = [
    "a red sneaker on a plinth",
    "Studio photograph of a ceramic teapot, soft light, 3.5mm lens; minimalist background",
    "",
]


@dataclass
class Context:
    """The parts of a NodeContext the text nodes use: models through their handles, on the CPU."""

    models_dir: Path
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    loaded: dict[str, object] = field(default_factory=dict)

    def model(self, handle: ModelHandle):
        if handle.key not in self.loaded:
            self.loaded[handle.key] = handle.load()
        return self.loaded[handle.key]

    def model_path(self, source: str, name: str) -> Path:
        return self.models_dir / source / name

    def model_fingerprint(self, source: str, name: str) -> str:
        stat = (self.models_dir / source / name).stat()
        return f"{stat.st_size:016x}{stat.st_mtime_ns:016x}"


@pytest.fixture(scope="module")
def clip_l():
    return build_random_clip_l(seed=0)


@pytest.fixture(scope="module")
def t5_model():
    return small_flux_t5(seed=1)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, clip_l, t5_model) -> Path:
    path = tmp_path_factory.mktemp("models")
    write_flux_text_encoders(path / "text_encoders", clip_l, t5_model)
    return path


@pytest.fixture(scope="module")
def files(models_dir) -> Path:
    return models_dir / "text_encoders"


@pytest.fixture(scope="module")
def ctx(models_dir) -> Context:
    return Context(models_dir)


@pytest.fixture(scope="module")
def flux_clip(ctx, files) -> TextEncoder:
    """DualCLIPLoader type flux on clip_l + t5xxl_fp16, the T5 file named first as some templates do."""
    return flux.DualCLIPLoader().run(ctx, T5_FP16_NAME, CLIP_L_NAME, "flux", "default")[0]


def plain_keys(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights keyed as ComfyUI's file (with `text_model.`), whatever transformers calls them."""
    state = module.state_dict()
    nested = any(k.startswith("text_model.") for k in state)
    return {(k if nested else "text_model." + k): v for k, v in state.items() if not k.endswith("position_ids")}


# --- the files ------------------------------------------------------------------------------------------


def test_the_clip_l_file_loads_as_the_model_it_was_written_from(files, clip_l):
    kind, state = read_text_encoder(files / CLIP_L_NAME)
    assert kind == "clip_l"
    assert {"text_projection.weight", "logit_scale", "text_model.embeddings.position_ids"} <= set(state)
    loaded = load_clip_l(state, CLIP_L_NAME, torch.float32)
    config = loaded.config
    want = small_clip_l_config()
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "eos_token_id",
        "bos_token_id",
    ):
        assert getattr(config, name) == getattr(want, name), name
    mine, theirs = plain_keys(loaded), clip_l_state_dict(clip_l, extras=False)
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    ids = torch.tensor([[49406, 320, 1746, 49407] + [49407] * 73])
    with torch.inference_mode():
        a, b = loaded(ids), clip_l(ids)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_a_half_precision_clip_l_file_loads_in_the_asked_dtype(tmp_path, clip_l):
    path = write_clip_l_file(clip_l, tmp_path, dtype=torch.float16, extras=False)
    loaded = load_clip_l(read_text_encoder(path)[1], path.name, torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    theirs = clip_l_state_dict(clip_l, extras=False)
    mine = plain_keys(loaded)
    assert all(torch.equal(mine[k], v.half().to(torch.bfloat16)) for k, v in theirs.items())


@pytest.mark.parametrize("name", [T5_FP16_NAME, T5_SCALED_NAME])
def test_the_t5_files_load_with_the_weights_written(files, t5_model, name):
    kind, state = read_text_encoder(files / name)
    assert kind == "t5"
    loaded = text_encoders.load_t5_file(state, name, torch.float32)
    written = to_comfy_state_dict(t5_model)
    mine = loaded.state_dict()
    for key, value in written.items():
        if name == T5_FP16_NAME:
            want = value.half().float()
        elif f"{key[: -len('.weight')]}.scale_weight" in state:  # ComfyUI's scaled fp8: stored * scale
            want = state[key].float() * state[f"{key[: -len('.weight')]}.scale_weight"].float()
        else:
            want = state[key].float()
        assert torch.equal(mine[key], want), key
    assert loaded.config.d_model == 32 and loaded.config.num_layers == 2


def test_a_scaled_fp8_t5_keeps_its_wo_projections_float32_at_float16(files):
    """T5's `wo` stays float32 in a float16 model (load_t5_encoder), and is dequantised straight into float32."""
    state = read_text_encoder(files / T5_SCALED_NAME)[1]
    loaded = text_encoders.load_t5_file(state, T5_SCALED_NAME, torch.float16)
    key = "encoder.block.1.layer.1.DenseReluDense.wo"
    assert loaded.get_parameter(key + ".weight").dtype == torch.float32
    want = state[key + ".weight"].float() * state[key + ".scale_weight"].float()
    assert torch.equal(loaded.get_parameter(key + ".weight"), want)
    assert loaded.get_parameter("encoder.block.1.layer.1.DenseReluDense.wi_0.weight").dtype == torch.float16


def test_files_are_told_apart_by_their_key_names(files):
    clip_keys = set(safetensors.torch.load_file(str(files / CLIP_L_NAME)))
    assert text_encoder_kind(clip_keys) == "clip_l"
    assert text_encoder_kind(clip_keys - {"text_projection.weight", "logit_scale"}) == "clip_l"
    assert text_encoder_kind(clip_keys | {"text_model.encoder.layers.30.mlp.fc1.weight"}) == "clip_g"
    assert text_encoder_kind(clip_keys | {"text_model.encoder.layers.22.mlp.fc1.weight"}) == "clip_h"
    assert text_encoder_kind(set(safetensors.torch.load_file(str(files / T5_FP16_NAME)))) == "t5"
    assert text_encoder_kind(set(safetensors.torch.load_file(str(files / T5_SCALED_NAME)))) == "t5"
    assert text_encoder_kind({"model.diffusion_model.img_in.weight"}) is None


def test_a_file_that_is_no_text_encoder_is_refused_by_name(tmp_path):
    path = tmp_path / "not_a_clip.safetensors"
    safetensors.torch.save_file({"img_in.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(NodeInputError, match="not_a_clip.safetensors: not a text encoder"):
        read_text_encoder(path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(NodeInputError, match="broken.safetensors: not a readable .safetensors file"):
        read_text_encoder(broken)


def test_a_clip_l_file_missing_a_weight_is_refused_naming_it(tmp_path, clip_l):
    state = clip_l_state_dict(clip_l)
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(NodeInputError, match=r"clip_l.safetensors: .*missing .*layers\.1\.mlp\.fc2\.bias"):
        load_clip_l(state, "clip_l.safetensors", torch.float32)


def test_load_flux_text_takes_its_two_files_in_either_order(files, models_dir):
    for order in ((CLIP_L_NAME, T5_FP16_NAME), (T5_FP16_NAME, CLIP_L_NAME)):
        model = load_flux_text(files / order[0], files / order[1], models_dir, torch.float32)
        assert model.family == "flux" and model.unet is None and model.vae is None
        assert type(model.text_encoder).__name__ == "CLIPTextModel"
        assert type(model.text_encoder_2).__name__ == "T5EncoderModel"
        assert model.tokenizer.eos_token_id == 49407 and model.tokenizer.pad_token_id == 49407
        assert model.tokenizer_2.eos_token_id == 1 and model.tokenizer_2.pad_token_id == 0
        assert model.scheduler_config == {} and len(model.parts()) == 2 and model.nbytes() > 0


def test_dual_clip_loader_files_that_are_not_clip_l_and_t5_are_refused(files, models_dir):
    with pytest.raises(NodeInputError, match=r"takes CLIP-L and T5; given clip_l.safetensors \(CLIP-L\), clip_l"):
        load_flux_text(files / CLIP_L_NAME, files / CLIP_L_NAME, models_dir, torch.float32)
    with pytest.raises(NodeInputError, match="DualCLIPLoader type flux: flux takes CLIP-L and T5 .* not 1"):
        load_text_encoders([files / CLIP_L_NAME], "flux", models_dir, torch.float32, "DualCLIPLoader")
    with pytest.raises(NodeInputError, match="CLIPLoader type flux: flux takes CLIP-L and T5"):
        load_text_encoders([files / T5_FP16_NAME], "flux", models_dir, torch.float32)


def test_types_plinth_does_not_build_are_refused_by_name(files, models_dir):
    with pytest.raises(NodeInputError, match="DualCLIPLoader type sdxl: not supported yet"):
        load_text_encoders([files / CLIP_L_NAME, files / T5_FP16_NAME], "sdxl", models_dir, torch.float32)
    with pytest.raises(NodeInputError, match="CLIPLoader type sd3: not supported yet"):
        load_text_encoders([files / T5_FP16_NAME], "sd3", models_dir, torch.float32)
    # ... and at validation, before anything loads
    checks = flux.DualCLIPLoader.check_inputs({"clip_name1": "a", "clip_name2": "b", "type": "hidream"})
    assert checks == [("type", "custom_validation_failed", checks[0][2])]
    assert checks[0][2].startswith("DualCLIPLoader type hidream: not supported yet (Plinth builds: flux)")
    assert flux.DualCLIPLoader.check_inputs({"type": "flux"}) == []
    assert "CLIPLoader type wan: not supported yet" in flux.CLIPLoader.check_inputs({"type": "wan"})[0][2]
    assert flux.CLIPLoader.check_inputs({"type": "stable_diffusion"}) == []


def test_clip_loader_stable_diffusion_loads_a_clip_l_file_as_sd1s_text_model(files, models_dir, clip_l):
    model = load_text_encoders([files / CLIP_L_NAME], "stable_diffusion", models_dir, torch.float32)
    assert model.family == "sd1" and model.text_encoder_2 is None and model.unet is None
    assert all(torch.equal(plain_keys(model.text_encoder)[k], v) for k, v in plain_keys(clip_l).items())
    with pytest.raises(NodeInputError, match=r"takes CLIP-L; given t5xxl_fp16.safetensors \(T5\)"):
        load_text_encoders([files / T5_FP16_NAME], "stable_diffusion", models_dir, torch.float32)


# --- the schemas ----------------------------------------------------------------------------------------


def test_the_nodes_have_comfyuis_inputs_in_its_widget_order():
    def names(node):
        return [(i.name, i.type, i.optional) for i in node.schema.inputs]

    assert names(flux.CLIPTextEncodeFlux) == [
        ("clip", "CLIP", False),
        ("clip_l", "STRING", False),
        ("t5xxl", "STRING", False),
        ("guidance", "FLOAT", False),
    ]
    guidance = flux.CLIPTextEncodeFlux.schema.input("guidance")
    assert (guidance.default, guidance.min, guidance.max, guidance.step) == (3.5, 0.0, 100.0, 0.1)
    assert names(flux.FluxGuidance) == [("conditioning", "CONDITIONING", False), ("guidance", "FLOAT", False)]
    assert names(flux.DualCLIPLoader) == [
        ("clip_name1", "COMBO", False),
        ("clip_name2", "COMBO", False),
        ("type", "COMBO", False),
        ("device", "COMBO", True),
    ]
    assert names(flux.CLIPLoader) == [
        ("clip_name", "COMBO", False),
        ("type", "COMBO", False),
        ("device", "COMBO", True),
    ]
    assert flux.DualCLIPLoader.schema.input("clip_name1").source == "text_encoders"
    assert list(flux.DualCLIPLoader.schema.input("device").options) == ["default", "cpu"]
    assert flux.DualCLIPLoader.schema.input("device").default == "default"
    assert "flux" in flux.DualCLIPLoader.schema.input("type").options
    for node in (flux.CLIPTextEncodeFlux, flux.FluxGuidance):
        assert node.schema.category == "advanced/conditioning/flux" and node.schema.outputs[0].type == "CONDITIONING"
    for node in (flux.CLIPLoader, flux.DualCLIPLoader):
        assert node.schema.category == "advanced/loaders" and node.schema.outputs[0].type == "CLIP"


# --- the encoding ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(ctx, flux_clip):
    """diffusers' FluxPipeline around the same text models and tokenizers (no transformer, no VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer

    model = flux_clip.load(ctx)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=model.text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir(ctx.models_dir)), local_files_only=True),
        text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2,
        transformer=None,
    )


@pytest.mark.parametrize("text", PLAIN_PROMPTS)
def test_encode_flux_equals_diffusers_flux_pipeline(ctx, flux_clip, pipeline, text):
    hidden, pooled = flux.encode_flux(flux_clip, ctx, text, text)
    with torch.inference_mode():
        embeds, pooled_embeds, text_ids = pipeline.encode_prompt(
            prompt=text, prompt_2=text, device=torch.device("cpu"), max_sequence_length=256
        )
    assert hidden.shape == embeds.shape == (1, 256, 32) and hidden.dtype == torch.float32
    assert pooled.shape == pooled_embeds.shape == (1, 64) and pooled.dtype == torch.float32
    torch.testing.assert_close(hidden, embeds.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, pooled_embeds.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("text", PLAIN_PROMPTS[:2])
def test_comfyuis_word_by_word_tokens_are_diffusers_tokens_for_plain_prompts(flux_clip, ctx, text):
    """What makes the comparison above meaningful: the same token ids both ways (CLIP-L's first window, T5's)."""
    from plinth.nodes import prompt
    from plinth.nodes.models import t5

    model = flux_clip.load(ctx)
    assert [t for t, _ in t5.t5_tokens(model.tokenizer_2, text, 0)] == model.tokenizer_2(text).input_ids
    assert [t for t, _ in prompt.weighted_tokens(model.tokenizer, text)[0]] == model.tokenizer(text).input_ids[1:-1]


def test_emphasis_weighs_t5s_tokens_but_not_the_pooled_text(ctx, flux_clip):
    """As in ComfyUI: weights move T5's token states; CLIP-L's pooled text is the unweighted first window's."""
    plain_hidden, plain_pooled = flux.encode_flux(flux_clip, ctx, "red sneaker", "red sneaker")
    hidden, pooled = flux.encode_flux(flux_clip, ctx, "(red:1.5) sneaker", "(red:1.5) sneaker")
    assert torch.equal(pooled, plain_pooled)
    assert hidden.shape == plain_hidden.shape and not torch.allclose(hidden, plain_hidden)


def test_the_pooled_text_is_the_first_windows(ctx, flux_clip):
    long = " ".join(["plinth"] * 80)  # 80 one-token words: a window of 75, then 5 more
    first = " ".join(["plinth"] * 75)
    assert torch.equal(flux.encode_flux(flux_clip, ctx, long, "")[1], flux.encode_flux(flux_clip, ctx, first, "")[1])
    hidden = flux.encode_flux(flux_clip, ctx, "", " ".join(["word"] * 300))[0]
    assert hidden.shape[1] == 301  # T5's prompt is never cut: 300 tokens and </s>


@dataclass(frozen=True)
class RecordingPatch:
    """A patch on one part that scales its text model's embeddings (every nn.Embedding) while applied."""

    part: str
    applied_to: list = field(default_factory=list, compare=False)

    def applied(self, ctx, module):
        from contextlib import contextmanager

        @contextmanager
        def scaled():
            self.applied_to.append(type(module).__name__)
            handles = [
                m.register_forward_hook(lambda m, a, out: out * 1.5)
                for m in module.modules()
                if isinstance(m, torch.nn.Embedding)
            ]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

        return scaled()

    def call_kwargs(self, ctx, positive_rows, progress):
        return {}


def test_a_patch_goes_on_the_text_model_of_its_part(ctx, flux_clip):
    hidden, pooled = flux.encode_flux(flux_clip, ctx, "a red sneaker", "a red sneaker")
    on_l = RecordingPatch("text_encoder")
    l_hidden, l_pooled = flux.encode_flux(flux_clip.with_patch(on_l), ctx, "a red sneaker", "a red sneaker")
    assert on_l.applied_to == ["CLIPTextModel"]
    assert torch.equal(l_hidden, hidden) and not torch.equal(l_pooled, pooled)
    on_t5 = RecordingPatch("text_encoder_2")
    t_hidden, t_pooled = flux.encode_flux(flux_clip.with_patch(on_t5), ctx, "a red sneaker", "a red sneaker")
    assert on_t5.applied_to == ["T5EncoderModel"]
    assert not torch.equal(t_hidden, hidden) and torch.equal(t_pooled, pooled)


def test_the_prompt_nodes_carry_the_pooled_text_and_guidance(ctx, flux_clip):
    hidden, pooled = flux.encode_flux(flux_clip, ctx, "a teapot", "a ceramic teapot on a plinth")
    (entry,) = flux.CLIPTextEncodeFlux().run(ctx, flux_clip, "a teapot", "a ceramic teapot on a plinth", 2.5)[0]
    assert torch.equal(entry.embeds, hidden) and torch.equal(entry.options["pooled_output"], pooled)
    assert entry.options["guidance"] == 2.5
    plain = flux.encode_prompt_flux(flux_clip, ctx, "a teapot")
    same = flux.encode_flux(flux_clip, ctx, "a teapot", "a teapot")
    assert torch.equal(plain.embeds, same[0]) and torch.equal(plain.options["pooled_output"], same[1])
    assert set(plain.options) == {"pooled_output"}  # the sampler's default guidance applies


def test_flux_guidance_sets_guidance_on_every_entry_and_leaves_the_input_as_it_was(ctx):
    first = ConditioningEntry(torch.zeros(1, 4, 8), {"pooled_output": torch.ones(1, 2), "guidance": 3.5})
    second = ConditioningEntry(torch.ones(1, 4, 8), {"strength": 0.5})
    (out,) = flux.FluxGuidance().run(ctx, [first, second], 6.0)
    assert [e.options["guidance"] for e in out] == [6.0, 6.0]
    assert out[0].embeds is first.embeds and out[0].options["pooled_output"] is first.options["pooled_output"]
    assert out[1].options["strength"] == 0.5
    assert first.options["guidance"] == 3.5 and "guidance" not in second.options


def test_flux_prompts_need_a_flux_clip(ctx, files):
    sd1_clip = flux.CLIPLoader().run(ctx, CLIP_L_NAME, "stable_diffusion", "default")[0]
    with pytest.raises(NodeInputError, match="needs FLUX.1's CLIP .* this CLIP is sd1's"):
        flux.CLIPTextEncodeFlux().run(ctx, sd1_clip, "a", "a", 3.5)


def test_either_file_order_shares_one_loaded_clip(ctx, flux_clip):
    swapped = flux.DualCLIPLoader().run(ctx, CLIP_L_NAME, T5_FP16_NAME, "flux", "cpu")[0]
    assert swapped.checkpoint.key == flux_clip.checkpoint.key
    assert swapped.load(ctx) is flux_clip.load(ctx)
    scaled = flux.DualCLIPLoader().run(ctx, CLIP_L_NAME, T5_SCALED_NAME, "flux", "default")[0]
    assert scaled.checkpoint.key != flux_clip.checkpoint.key
    tokenizer = load_tokenizer(tokenizer_dir(ctx.models_dir))
    assert scaled.load(ctx).tokenizer.get_vocab() == tokenizer.get_vocab()
