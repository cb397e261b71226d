"""SDXL checkpoint files load through CheckpointLoaderSimple's loader as the diffusers models
they were written from, and Plinth encodes prompts as diffusers' SDXL pipeline does.

Files are written from small random-weight diffusers models in SDXL's original single-file
layout (support/sdxl_original_layout.py, checked on its own against diffusers' converters);
reading them back must give every tensor exactly and the same outputs of one forward.
"""

from __future__ import annotations

import pytest
import torch
from support.sdxl_original_layout import build_random_sdxl, small_sdxl_configs, write_sdxl_checkpoint

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.checkpoint import load_checkpoint
from plinth.nodes.models.embedded import ensure_embedded

CPU = torch.device("cpu")


def same_weights(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    mine, theirs = loaded.state_dict(), source.state_dict()
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key


@pytest.fixture(scope="module", params=["base", "refiner"])
def written(request, tmp_path_factory):
    refiner = request.param == "refiner"
    models = build_random_sdxl(small_sdxl_configs(refiner=refiner), seed=21 if refiner else 20)
    folder = tmp_path_factory.mktemp("sdxl-files")
    path = folder / f"sdxl-{request.param}.safetensors"
    write_sdxl_checkpoint(path, models)
    return refiner, models, load_checkpoint(path, folder, CPU, torch.float32)


def test_every_part_has_the_weights_it_was_written_from(written):
    refiner, source, loaded = written
    assert loaded.family == ("sdxl_refiner" if refiner else "sdxl")
    for part in ("unet", "vae", "text_encoder_2"):
        same_weights(getattr(loaded, part), source[part])
    if refiner:
        assert loaded.text_encoder is None
    else:
        same_weights(loaded.text_encoder, source["text_encoder"])
    assert loaded.vae.config.scaling_factor == pytest.approx(0.13025)


@torch.inference_mode()
def test_one_forward_of_each_part_matches_the_diffusers_models(written):
    refiner, source, loaded = written
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49406, (1, 77), generator=generator)
    tokens[0, 9] = 49407
    for name in ("text_encoder", "text_encoder_2"):
        if source[name] is None:
            continue
        want = source[name](tokens, output_hidden_states=True)
        got = getattr(loaded, name)(tokens, output_hidden_states=True)
        torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        loaded.text_encoder_2(tokens).text_embeds, source["text_encoder_2"](tokens).text_embeds, rtol=1e-5, atol=1e-5
    )
    unet = source["unet"]
    numbers = 5 if refiner else 6
    pooled = unet.config.projection_class_embeddings_input_dim - numbers * 256
    args = (torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([500]))
    kwargs = dict(
        encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator),
        added_cond_kwargs={
            "text_embeds": torch.randn(1, pooled, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0] + ([6.0] if refiner else [64.0, 64.0])]),
        },
    )
    torch.testing.assert_close(loaded.unet(*args, **kwargs).sample, unet(*args, **kwargs).sample, rtol=1e-5, atol=1e-5)
    image = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    torch.testing.assert_close(
        loaded.vae.decode(loaded.vae.encode(image).latent_dist.mean).sample,
        source["vae"].decode(source["vae"].encode(image).latent_dist.mean).sample,
        rtol=1e-5,
        atol=1e-5,
    )


def test_an_fp16_file_loads_and_keeps_its_values(tmp_path):
    models = build_random_sdxl(small_sdxl_configs(), seed=22)
    path = tmp_path / "sd_xl_base_fp16.safetensors"
    write_sdxl_checkpoint(path, models, dtype=torch.float16)
    loaded = load_checkpoint(path, tmp_path, CPU, torch.float32)
    key = "conv_in.weight"
    assert torch.equal(loaded.unet.state_dict()[key], models["unet"].state_dict()[key].half().float())


def test_a_truncated_file_names_the_missing_weight(tmp_path):
    import safetensors.torch
    from support.sdxl_original_layout import to_sdxl_original_state_dict

    models = build_random_sdxl(small_sdxl_configs(), seed=23)
    state = to_sdxl_original_state_dict(models["unet"], models["vae"], models["text_encoder"], models["text_encoder_2"])
    del state["model.diffusion_model.out.2.weight"]
    path = tmp_path / "broken-sdxl.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(NodeInputError, match=r"model\.diffusion_model\.out\.2\.weight is missing"):
        load_checkpoint(path, tmp_path, CPU, torch.float32)


def test_a_clip_g_weight_left_over_is_named(tmp_path):
    import safetensors.torch
    from support.sdxl_original_layout import to_sdxl_original_state_dict

    models = build_random_sdxl(small_sdxl_configs(), seed=24)
    state = to_sdxl_original_state_dict(models["unet"], models["vae"], models["text_encoder"], models["text_encoder_2"])
    state["conditioner.embedders.1.model.stray.weight"] = torch.zeros(2)
    path = tmp_path / "stray-sdxl.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(NodeInputError, match=r"CLIP-G text model weights do not match.*stray\.weight"):
        load_checkpoint(path, tmp_path, CPU, torch.float32)


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_prompts_encode_as_the_diffusers_sdxl_pipelines_encode_them(models_dir, name):
    """Plinth's conditioning for a prompt (joined text, pooled CLIP-G) and its size numbers are
    what diffusers' StableDiffusionXL(Img2Img)Pipeline computes from the same folder."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from plinth.nodes import sdxl
    from plinth.nodes.core.context import ModelHandle
    from plinth.nodes.core.types import TextEncoder

    folder = ensure_embedded(models_dir, name)
    refiner = name.endswith("refiner")
    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    model = load_checkpoint(folder, models_dir, CPU, torch.float32)

    class Ctx:
        device = CPU
        models_dir = folder.parent.parent

        def model(self, handle):
            return model

        def model_path(self, source, name):  # no embeddings in these prompts
            raise AssertionError("no embedding file is read")

    prompt = "a glass perfume bottle on a marble counter, soft light"
    clip = TextEncoder(ModelHandle(f"checkpoints/{name}", lambda: model))
    with torch.inference_mode():
        embeds, pooled = sdxl.encode_sdxl(clip, Ctx(), prompt, prompt)  # type: ignore[arg-type]
        want, _, want_pooled, _ = pipe.encode_prompt(prompt, device=CPU, do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-5)

    options = {"width": 96, "height": 64, "crop_w": 8, "crop_h": 4}
    if refiner:
        want_ids = pipe._get_add_time_ids(
            (64, 96), (4, 8), (64, 96), 7.0, 2.5, (64, 96), (4, 8), (64, 96), torch.float32, 32
        )[0]
        got = sdxl.sdxl_time_ids({**options, "aesthetic_score": 7.0}, "sdxl_refiner", True, 0, 0)
    else:
        want_ids = pipe._get_add_time_ids((64, 96), (4, 8), (64, 96), torch.float32, 32)
        got = sdxl.sdxl_time_ids(options, "sdxl", True, 0, 0)
    assert torch.equal(got, want_ids)


def write_state(path, state: dict) -> None:
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def sdxl_state(seed: int) -> dict:
    from support.sdxl_original_layout import to_sdxl_original_state_dict

    models = build_random_sdxl(small_sdxl_configs(), seed=seed)
    return to_sdxl_original_state_dict(models["unet"], models["vae"], models["text_encoder"], models["text_encoder_2"])


def test_v_prediction_and_zero_snr_markers_set_the_model_sampling(tmp_path):
    """SDXL fine-tunes mark v-prediction and zero terminal SNR with `v_pred` and `ztsnr` keys,
    as ComfyUI reads them; the sampling core then denoises as v-prediction on the rescaled table."""
    from plinth.nodes.sampling.model_sampling import resolve

    state = sdxl_state(25)
    plain = tmp_path / "sdxl-eps.safetensors"
    write_state(plain, state)
    marked = tmp_path / "sdxl-vpred.safetensors"
    write_state(marked, {**state, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    eps = resolve((), load_checkpoint(plain, tmp_path, CPU, torch.float32).scheduler_config)
    vpred = resolve((), load_checkpoint(marked, tmp_path, CPU, torch.float32).scheduler_config)
    x, out, sigma = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 0.5), torch.tensor(2.0)
    assert not torch.equal(eps.calculate_denoised(sigma, out, x), vpred.calculate_denoised(sigma, out, x))
    assert vpred.sigma_max > 1000 > eps.sigma_max  # zero terminal SNR: the last sigma is (nearly) infinite


def test_an_edm_sdxl_file_is_refused_by_name(tmp_path):
    path = tmp_path / "playground-like.safetensors"
    write_state(path, {**sdxl_state(26), "edm_mean": torch.zeros(4), "edm_std": torch.ones(4)})
    with pytest.raises(NodeInputError, match="EDM-parameterised SDXL model .edm_mean, edm_std"):
        load_checkpoint(path, tmp_path, CPU, torch.float32)


def test_harmless_extras_of_real_files_load(tmp_path):
    """What tools save beside CLIP-G: a position_ids buffer, the projection as a Linear weight."""
    state = sdxl_state(27)
    prefix = "conditioner.embedders.1.model."
    state[prefix + "text_projection.weight"] = state.pop(prefix + "text_projection").T
    state[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "sdxl-extras.safetensors"
    write_state(path, state)
    loaded = load_checkpoint(path, tmp_path, CPU, torch.float32)
    assert torch.equal(loaded.text_encoder_2.text_projection.weight, state[prefix + "text_projection.weight"])


def test_sdxl_vae_stays_float32_when_the_rest_runs_in_float16(models_dir):
    """SDXL's VAE overflows in float16; diffusers upcasts it, ComfyUI never runs it so."""
    folder = ensure_embedded(models_dir, "tiny-sdxl")
    loaded = load_checkpoint(folder, models_dir, CPU, torch.float16)
    assert loaded.unet.dtype == torch.float16 and loaded.text_encoder_2.dtype == torch.float16
    assert loaded.vae.dtype == torch.float32
    sd1 = load_checkpoint(models_dir / "checkpoints" / "tiny-sd", models_dir, CPU, torch.float16)
    assert sd1.vae.dtype == torch.float16  # SD1.x's VAE is fine in float16
