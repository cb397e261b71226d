"""Models: tiny-sd, the offline tokenizer, single-file SD1.x checkpoints, the model manager."""

from __future__ import annotations

import pytest
import torch
from support.graph_builder import node_of
from support.sd_original_layout import build_random_sd, small_sd15_configs, write_original_checkpoint

from plinth.nodes.core.context import ModelHandle, NodeInputError
from plinth.nodes.models.checkpoint import load_checkpoint
from plinth.nodes.models.tiny_sd import ensure_tiny_sd
from plinth.server.model_manager import ModelManager, ModelTooLarge

CPU = torch.device("cpu")


def test_tokenizer_is_clips_own(models_dir):
    model = load_checkpoint(ensure_tiny_sd(models_dir), models_dir, CPU, torch.float32)
    tok = model.tokenizer
    assert len(tok) == 49408
    assert tok("a photo of a red sneaker").input_ids == [49406, 320, 1125, 539, 320, 736, 24781, 49407]


def test_tiny_sd_is_deterministic(tmp_path, models_dir):
    again = ensure_tiny_sd(tmp_path)
    a = load_checkpoint(again, tmp_path, CPU, torch.float32).unet.state_dict()
    b = load_checkpoint(ensure_tiny_sd(models_dir), models_dir, CPU, torch.float32).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def original_layout_file(models_dir):
    """A scaled-down SD1.5 (same key layout) written as one original-layout .safetensors file."""
    unet, vae, text = build_random_sd(small_sd15_configs(), seed=3)
    path = models_dir / "checkpoints" / "small-sd15.safetensors"
    write_original_checkpoint(path, unet, vae, text)
    return path, (unet, vae, text)


def test_single_file_loads_back_exactly(original_layout_file, models_dir):
    path, originals = original_layout_file
    loaded = load_checkpoint(path, models_dir, CPU, torch.float32)
    for original, got in zip(originals, (loaded.unet, loaded.vae, loaded.text_encoder), strict=False):
        want, have = original.state_dict(), got.state_dict()
        assert set(want) == set(have)
        assert all(torch.equal(want[k], have[k]) for k in want)
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    assert torch.equal(originals[2](tokens).last_hidden_state, loaded.text_encoder(tokens).last_hidden_state)


def test_single_file_runs_through_the_node(client, txt2img, original_layout_file):
    checkpoint = node_of(txt2img, "CheckpointLoaderSimple")
    checkpoint.inputs["ckpt_name"] = "small-sd15.safetensors"
    result = client.run(txt2img)
    assert result.status == "completed" and len(result.images) == 2
    assert result.nodes[checkpoint.id].class_type == "CheckpointLoaderSimple"


def test_a_file_that_is_not_sd1_fails_the_job_with_a_clear_error(client, txt2img, models_dir):
    from safetensors.torch import save_file

    from plinth.clients import JobFailed

    save_file({"some.weight": torch.zeros(2)}, str(models_dir / "checkpoints" / "not-sd.safetensors"))
    node_of(txt2img, "CheckpointLoaderSimple").inputs["ckpt_name"] = "not-sd.safetensors"
    with pytest.raises(JobFailed) as info:
        client.run(txt2img)
    assert "not an SD1.x checkpoint" in info.value.result.error
    assert client.health() == "SERVING"


class Sized:
    def __init__(self, nbytes):
        self._n = nbytes

    def nbytes(self):
        return self._n


def test_model_manager_shares_loads_and_evicts_least_recently_used():
    loads = []

    def handle(key, size):
        return ModelHandle(key, lambda: loads.append(key) or Sized(size))

    manager = ModelManager(budget_bytes=100)
    a = manager.get(handle("a", 40))
    assert manager.get(handle("a", 40)) is a and loads == ["a"]
    manager.get(handle("b", 40))
    manager.get(handle("a", 40))  # a is now the most recent
    manager.get(handle("c", 40))  # evicts b
    assert [m.key for m in manager.loaded()] == ["a", "c"]
    with pytest.raises(ModelTooLarge, match="budget"):
        manager.get(handle("huge", 1000))


def test_model_names_stay_inside_the_models_dir(server):
    with pytest.raises(NodeInputError):
        server.components.folders.model_path("checkpoints", "../../etc/passwd")


def test_model_listing_counts_a_diffusers_folder_once(tmp_path):
    from plinth.server.storage.model_folders import ModelFolders

    folders = ModelFolders(tmp_path / "models", tmp_path / "data")
    folder = tmp_path / "models" / "checkpoints" / "brand" / "sd-folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "models" / "checkpoints" / "one.safetensors").write_bytes(b"")
    (tmp_path / "models" / "checkpoints" / "notes.txt").write_text("not a model")
    (tmp_path / "models" / "loras" / "style.safetensors").write_bytes(b"")
    assert folders.models("checkpoints") == [
        "brand/sd-folder",
        "one.safetensors",
        "tiny-flux",
        "tiny-sd",
        "tiny-sdxl",
        "tiny-sdxl-refiner",
    ]
    assert folders.models("loras") == ["style.safetensors"]


def test_a_checkpoint_replaced_under_the_same_name_is_loaded_anew(server, client, txt2img, models_dir):
    import os

    import numpy as np

    path = models_dir / "checkpoints" / "swapped.safetensors"
    node_of(txt2img, "CheckpointLoaderSimple").inputs["ckpt_name"] = "swapped.safetensors"
    images = []
    for seed in (5, 6):
        write_original_checkpoint(path, *build_random_sd(small_sd15_configs(), seed=seed))
        os.utime(path, ns=(seed * 10**9, seed * 10**9))  # a distinct mtime even within one clock tick
        images.append([np.asarray(i) for i in client.run(txt2img).images])
    assert not np.array_equal(images[0][0], images[1][0])
    loaded = [m.key for m in server.components.models.loaded() if m.key.startswith("checkpoints/swapped.safetensors@")]
    assert len(loaded) == 1  # the replaced file's weights were released
