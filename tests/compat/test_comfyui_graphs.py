"""Graphs written in ComfyUI itself run unchanged: a hires fix and an inpaint exported in API
format (tests/data/comfyui_api), naming ComfyUI's usual checkpoint file, which the test makes
as a random SD1.5-layout file under that name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support.files import png
from support.graph_builder import node_of
from support.live_server import node_output
from support.paths import DATA
from support.sd_original_layout import build_random_sd, small_sd15_configs, write_original_checkpoint

API = DATA / "comfyui_api"


@pytest.fixture(scope="module")
def sd15_file(models_dir):
    path = models_dir / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    if not path.exists():
        write_original_checkpoint(path, *build_random_sd(small_sd15_configs(), seed=21))
    return path


def test_hires_fix_runs_unchanged(server, client, sd15_file):
    graph = json.loads((API / "hires_fix.json").read_text())
    result = client.run(graph)
    assert [i.size for i in result.images] == [(96, 96)]
    upscaled = node_output(server, result.job_id, node_of(graph, "LatentUpscaleBy").id)[0]
    assert upscaled.samples.shape[-1] == 12  # 8 latent cells x 1.5


def test_inpaint_runs_unchanged_and_keeps_the_unmasked_area(server, client, sd15_file):
    graph = json.loads((API / "inpaint.json").read_text())
    photo = np.full((64, 64, 4), 255, np.uint8)
    photo[..., :3] = (30, 120, 200)
    photo[:, :32, 3] = 0  # transparent left half: the area to inpaint
    result = client.run(graph, inputs={"product_inpaint.png": png(photo)})
    assert result.images[0].size == (64, 64)
    latent_in = node_output(server, result.job_id, node_of(graph, "VAEEncodeForInpaint").id)[0]
    latent_out = node_output(server, result.job_id, node_of(graph, "KSampler").id)[0].samples
    assert torch.equal(latent_out[..., 6:], latent_in.samples[..., 6:])  # grown mask reaches cell 4
    assert not torch.equal(latent_out[..., :3], latent_in.samples[..., :3])
