"""UNETLoader ("Load Diffusion Model"): SD1.x UNets alone, in the original key layout, from
models/diffusion_models and the older models/unet, paired with a checkpoint's CLIP and VAE.

The files hold exactly a checkpoint's UNet, so the graph with UNETLoader must give the
checkpoint's own pixels: for the small SD1.5-layout checkpoint (SD1.5's blocks) and for tiny-sd
(2 levels, 1 resnet per level, attention on one level), whose layout no template describes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from support import files, small_sd15
from support.sd_original_layout import UNET_PREFIX, _rename, _unet_prefixes, to_original_state_dict

from plinth.clients import JobFailed
from plinth.nodes.core.registry import NODES
from plinth.nodes.models.unet_file import load_unet_file
from plinth.server.storage.model_folders import ModelFolders

CPU = torch.device("cpu")
PREFIXED, BARE, LEGACY, WHOLE, TINY = (
    "sd15-unet-prefixed.safetensors",
    "sd15-unet.safetensors",
    "sd15-unet-legacy.safetensors",
    "sd15-whole-checkpoint.safetensors",
    "tiny-sd-unet.safetensors",
)
FOREIGN, TRUNCATED, SD2 = "unet-foreign.safetensors", "unet-truncated.safetensors", "unet-sd2.safetensors"


def ldm_unet(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under the original keys, without the checkpoint prefix."""
    prefixes = _unet_prefixes(unet.config)
    return {_rename(k, prefixes): v for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def sd15(models_dir):
    return small_sd15.small_sd15(models_dir)


@pytest.fixture(scope="module")
def unets(models_dir, sd15) -> dict[str, dict[str, torch.Tensor]]:
    """Every UNet file the tests use, under models/diffusion_models (one under models/unet)."""
    from plinth.nodes.models.checkpoint import load_checkpoint

    folder, legacy = models_dir / "diffusion_models", models_dir / "unet"
    bare = ldm_unet(sd15[0])
    tiny = load_checkpoint(models_dir / "checkpoints" / "tiny-sd", models_dir, CPU, torch.float32).unet
    written = {
        PREFIXED: {UNET_PREFIX + k: v for k, v in bare.items()},
        BARE: bare,
        WHOLE: to_original_state_dict(*sd15),
        TINY: ldm_unet(tiny),
        FOREIGN: {"encoder.layer.0.weight": torch.ones(4, 4)},
        TRUNCATED: {k: v for k, v in bare.items() if k != "output_blocks.5.2.conv.bias"},
        SD2: {**bare, "input_blocks.1.1.proj_in.weight": bare["input_blocks.1.1.proj_in.weight"][:, :, 0, 0]},
    }
    for name, state in written.items():
        files.write(state, folder, name)
    files.write(bare, legacy, LEGACY)
    return written


def graph(unet: str | None, ckpt: str = small_sd15.NAME, weight_dtype: str = "default") -> dict:
    """txt2img over `ckpt`, its MODEL replaced by UNETLoader's when `unet` is given."""
    built, nodes = small_sd15.txt2img(ckpt=ckpt)
    if unet is not None:
        loader = built.add("UNETLoader", unet_name=unet, weight_dtype=weight_dtype)
        nodes["sampler"].inputs["model"] = loader.out(0)
    return built.build()


def images(client, graph: dict) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in client.run(graph).images]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_every_file_form_gives_the_checkpoints_own_pixels(client, unets):
    own = images(client, graph(None))
    for name in (PREFIXED, BARE, LEGACY, WHOLE):
        assert same(images(client, graph(name)), own), name


def test_a_unet_of_another_layout_gives_its_checkpoints_pixels(client, unets):
    """tiny-sd's UNet read off its keys (2 levels, 1 resnet each, attention on the first only)."""
    assert same(images(client, graph(TINY, ckpt="tiny-sd")), images(client, graph(None, ckpt="tiny-sd")))


def test_fp8_rounds_the_weights_to_that_format(models_dir, unets, client):
    path = models_dir / "diffusion_models" / BARE
    plain = load_unet_file(path, CPU, torch.float32).unet.state_dict()
    for choice, fp8 in (("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        rounded = load_unet_file(path, CPU, torch.float32, choice).unet.state_dict()
        assert all(torch.equal(rounded[k], plain[k].to(fp8).float()) for k in plain), choice
        assert any(not torch.equal(rounded[k], plain[k]) for k in plain), choice
    default = images(client, graph(BARE))
    e4m3 = images(client, graph(BARE, weight_dtype="fp8_e4m3fn"))
    assert not same(e4m3, default) and same(images(client, graph(BARE, weight_dtype="fp8_e4m3fn_fast")), e4m3)


def test_the_legacy_folder_is_listed_under_diffusion_models(models_dir, unets, tmp_path):
    folders = ModelFolders(models_dir, tmp_path)
    listed = folders.models("diffusion_models")
    assert {PREFIXED, BARE, LEGACY, TINY} <= set(listed)
    assert folders.find_model("diffusion_models", LEGACY) == (models_dir / "unet" / LEGACY).resolve()
    described = {name: size for name, size, _ in folders.describe_models("diffusion_models")}
    assert described[LEGACY] == (models_dir / "unet" / LEGACY).stat().st_size


def test_bad_files_fail_the_job_clearly(client, unets):
    expected = {
        FOREIGN: "not an SD1.x UNet in the original layout",
        TRUNCATED: "missing ['output_blocks.5.2.conv.bias']",
        SD2: "an SD2.x-style UNet",
    }
    for name, message in expected.items():
        with pytest.raises(JobFailed) as info:
            client.run(graph(name))
        error = info.value.result.error
        assert message in error and name in error and "UNETLoader" in error, error


def test_schema_is_comfyuis():
    schema = NODES["UNETLoader"].schema
    assert [(i.name, i.type) for i in schema.inputs] == [("unet_name", "COMBO"), ("weight_dtype", "COMBO")]
    assert list(schema.inputs[1].options) == ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
    assert schema.inputs[0].source == "diffusion_models" and schema.inputs[1].default is None
    assert [o.type for o in schema.outputs] == ["MODEL"] and schema.category == "advanced/loaders"
