"""VAE tiling: VAEDecodeTiled / VAEEncodeTiled, and VAEDecode's fall-back to tiles when the
whole-image decode runs out of memory."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.graph_builder import GraphBuilder

from plinth.nodes.core.context import ModelOptions
from plinth.nodes.core.types import Latent
from plinth.nodes.latent import VAEDecode, VAEDecodeTiled, VAEEncodeTiled
from plinth.nodes.models.checkpoint import load_checkpoint
from plinth.nodes.models.tiny_sd import ensure_tiny_sd
from plinth.nodes.vae_codec import tiled, vae_decode, vae_encode

CPU = torch.device("cpu")


class Ctx:
    device = CPU

    def check_cancelled(self) -> None:
        pass


class FakeVae:
    def __init__(self, module) -> None:
        self._module = module

    def module(self, ctx):
        return self._module


@pytest.fixture(scope="module")
def vae(models_dir):
    model = load_checkpoint(ensure_tiny_sd(models_dir), models_dir, CPU, torch.float32, ModelOptions(warm_up=False))
    return model.vae


@pytest.fixture(scope="module")
def latent():
    return torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(0))  # 192x160 pixels


def test_tiles_of_a_local_function_blend_back_to_the_whole_exactly():
    x = torch.randn(1, 4, 37, 29, generator=torch.Generator().manual_seed(1))
    calls = []

    def up(part):
        calls.append(part.shape[-2:])
        return F.interpolate(part, scale_factor=8, mode="nearest")

    out = tiled(up, x, 16, 4, 8, 1)
    assert len(calls) == 9 and out.shape == (1, 4, 37 * 8, 29 * 8)  # 3x3 tiles, the last flush with the edge
    torch.testing.assert_close(out, up(x), atol=1e-6, rtol=1e-6)
    down = tiled(lambda p: F.avg_pool2d(p, 8), up(x), 128, 32, 1, 8)
    torch.testing.assert_close(down, x, atol=1e-6, rtol=1e-6)


def test_tiled_decode_is_close_to_the_whole_decode(vae, latent):
    calls = []
    decode = vae.decode

    class Counting:
        config = vae.config

        def parameters(self):
            return vae.parameters()

        def decode(self, z):
            calls.append(tuple(z.shape[-2:]))
            return decode(z)

    whole = vae_decode(Ctx(), FakeVae(vae), latent)
    tiles = vae_decode(Ctx(), FakeVae(Counting()), latent, (128, 32))
    assert tiles.shape == whole.shape == (1, 192, 160, 3)
    assert len(calls) == 4 and set(calls) == {(16, 16)}  # 2x2 tiles of 128 px, 32 px overlap
    # Not equal: the decoder's GroupNorms and mid-block attention see one tile instead of the
    # whole image, which the overlap's linear blend hides at the seams but cannot undo; with
    # this random-weight VAE and tiles this small (16 latent cells, 4 of overlap) the effect is
    # large: on the 0..1 scale (image std about 0.2) the mean difference is about 0.037, the
    # largest 0.37 (384x320 in 256 px tiles: 0.015 and 0.22). Another latent differs far more.
    diff = (tiles - whole).abs()
    assert diff.mean() < 0.06 and diff.max() < 0.5
    other = vae_decode(Ctx(), FakeVae(vae), torch.randn(latent.shape, generator=torch.Generator().manual_seed(9)))
    assert (other - whole).abs().mean() > 3 * diff.mean()
    # One tile covering everything is the whole decode.
    torch.testing.assert_close(vae_decode(Ctx(), FakeVae(vae), latent, (256, 64)), whole, atol=1e-5, rtol=0)


def test_tiled_encode_is_close_to_the_whole_encode(vae, latent):
    pixels = vae_decode(Ctx(), FakeVae(vae), latent)
    whole = vae_encode(Ctx(), FakeVae(vae), pixels)
    tiles = vae_encode(Ctx(), FakeVae(vae), pixels, (128, 32))
    assert tiles.shape == whole.shape == (1, 4, 24, 20)
    diff = (tiles - whole).abs()  # same reasons as the decoder; latents' mean magnitude is about 0.22
    assert diff.mean() < 0.05 and diff.max() < 0.3  # measured: 0.027 and 0.19
    torch.testing.assert_close(vae_encode(Ctx(), FakeVae(vae), pixels, (256, 64)), whole, atol=1e-5, rtol=0)


def test_vae_decode_falls_back_to_tiles_when_out_of_memory(vae, latent, caplog, monkeypatch):
    from plinth.nodes import vae_codec

    monkeypatch.setattr(vae_codec, "FALLBACK_TILE", 128)
    monkeypatch.setattr(vae_codec, "FALLBACK_OVERLAP", 32)
    decode = vae.decode

    class Tight:  # "runs out of memory" above 16x16 latents
        config = vae.config

        def parameters(self):
            return vae.parameters()

        def decode(self, z):
            if z.shape[-1] * z.shape[-2] > 16 * 16:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return decode(z)

    with caplog.at_level(logging.WARNING, logger="plinth.nodes"):
        (image,) = VAEDecode().run(Ctx(), Latent(latent), FakeVae(Tight()))
    assert image.shape == (1, 192, 160, 3)
    assert "ran out of memory; decoding in 128 px tiles" in caplog.text
    torch.testing.assert_close(image, vae_decode(Ctx(), FakeVae(vae), latent, (128, 32)))


def test_tiled_nodes_have_comfyuis_inputs():
    decode = [
        (
            i.name,
            getattr(i, "default", None),
            getattr(i, "min", None),
            getattr(i, "max", None),
            getattr(i, "step", None),
        )
        for i in VAEDecodeTiled.schema.inputs
    ]
    assert decode == [
        ("samples", None, None, None, None),
        ("vae", None, None, None, None),
        ("tile_size", 512, 64, 4096, 32),
        ("overlap", 64, 0, 4096, 32),
        ("temporal_size", 64, 8, 4096, 4),
        ("temporal_overlap", 8, 4, 4096, 4),
    ]
    assert [i.name for i in VAEEncodeTiled.schema.inputs] == [
        "pixels",
        "vae",
        "tile_size",
        "overlap",
        "temporal_size",
        "temporal_overlap",
    ]
    assert VAEEncodeTiled.schema.input("tile_size").step == 64


def test_tiled_nodes_run_in_a_graph(client, txt2img):
    b = GraphBuilder(txt2img)
    b.find("EmptyLatentImage").inputs.update(width=192, height=128, batch_size=1)
    vae = b.find("CheckpointLoaderSimple").out(2)
    tiles = {"tile_size": 64, "overlap": 32, "temporal_size": 64, "temporal_overlap": 8}
    decode = b.replace(b.find("VAEDecode"), "VAEDecodeTiled", samples=b.find("KSampler").out(0), vae=vae, **tiles)
    encode = b.add("VAEEncodeTiled", pixels=decode.out(0), vae=vae, **tiles)
    again = b.add("VAEDecode", samples=encode.out(0), vae=vae)
    b.add("PreviewImage", images=again.out(0))
    graph = b.build()
    result = client.run(graph)
    assert result.status == "completed"
    sizes = {np.asarray(image).shape for image in result.images}
    assert sizes == {(128, 192, 3)}
