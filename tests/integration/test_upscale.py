"""Image scaling and super-resolution nodes, through the real server where a graph can show it.

Model files are small random-weight ESRGAN-family models written in the key layouts of the real
files (tests/support/upscaler_files.py), so spandrel's detection is exercised as in production.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from support import files, upscaler_files

from plinth.clients import JobFailed, PlinthError
from plinth.nodes.core.context import JobCancelled, NodeInputError
from plinth.nodes.upscale import load_upscaler, upscale_image, upscale_tiled

ESRGAN = "tiny-RealESRGAN_x4plus.safetensors"
COMPACT = "tiny-realesr-compact-x4.safetensors"
RESTORE_1X = "tiny-compact-1x-denoise.safetensors"
NOT_IMAGE = "classifier.safetensors"
PICKLED = "pickled-x4.pth"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def upscale_dir(models_dir):
    folder = models_dir / "upscale_models"
    files.write(upscaler_files.real_esrgan_x4(), folder, ESRGAN)
    files.write(upscaler_files.compact(scale=4), folder, COMPACT)
    files.write(upscaler_files.compact(scale=1), folder, RESTORE_1X)
    files.write(upscaler_files.not_an_image_model(), folder, NOT_IMAGE)
    torch.save(upscaler_files.real_esrgan_x4(), folder / PICKLED)
    return folder


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels: every method and model leaves its own trace on them."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def run_graph(client, nodes: dict, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Run `nodes` plus a LoadImage "in" of `pixels`; the saved images by SaveImage node id."""
    graph = {"in": {"class_type": "LoadImage", "inputs": {"image": "in.png"}}, **nodes}
    result = client.run(graph, inputs={"in.png": png(pixels)})
    return {
        ref.node_id: np.asarray(image.convert("RGB"))
        for ref, image in zip(result.image_refs, result.images, strict=False)
    }


def save(source: str) -> dict:
    return {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": "upscale"}}


def scale(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": {"image": ["in", 0], **inputs}}


def model_upscale(name: str, image: list | None = None) -> dict:
    return {
        "loader": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": name}},
        "up": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["loader", 0], "image": image or ["in", 0]},
        },
        "save_up": save("up"),
    }


def levels(a: np.ndarray, b: np.ndarray) -> int:
    """Largest difference in 8-bit levels."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_model_upscale_is_4x_matches_spandrel_and_differs_from_lanczos(client, upscale_dir):
    pixels = picture(32, 24)
    out = run_graph(
        client,
        {
            **model_upscale(ESRGAN),
            "lanczos": scale("ImageScaleBy", upscale_method="lanczos", scale_by=4.0),
            "save_lanczos": save("lanczos"),
        },
        pixels,
    )
    assert out["save_up"].shape == out["save_lanczos"].shape == (96, 128, 3)
    assert np.abs(out["save_up"].astype(int) - out["save_lanczos"].astype(int)).mean() > 10

    from spandrel import ModelLoader  # the reference: spandrel running the same file on its own

    reference = ModelLoader().load_from_file(upscale_dir / ESRGAN).eval()
    expected = reference(torch.from_numpy(pixels).float().div(255).permute(2, 0, 1)[None])[0].permute(1, 2, 0)
    assert levels(out["save_up"], (expected.numpy() * 255).astype(np.uint8)) <= 1


def test_model_upscale_reports_progress_and_loads_the_model_once(client, server, upscale_dir):
    events, loads = [], []
    graph = {"in": {"class_type": "LoadImage", "inputs": {"image": "in.png"}}, **model_upscale(COMPACT)}
    for seed in (1, 2):
        result = client.run(graph, inputs={"in.png": png(picture(20, 16, seed))}, on_event=events.append)
        assert result.images[0].size == (80, 64)
        loads.append(server.components.models.loads)
    assert loads[0] == loads[1], "the second image reuses the loaded model"
    progress = [e.progress for e in events if e.WhichOneof("kind") == "progress"]
    assert [(p.node_id, p.step, p.total) for p in progress] == [("up", 1, 1)] * 2


def test_tiled_output_equals_untiled_on_an_image_larger_than_a_tile(upscale_dir):
    image = torch.from_numpy(picture(90, 70)).float().div(255)[None]
    for name, tolerance in ((COMPACT, 1e-5), (ESRGAN, 1e-3)):
        model = load_upscaler(upscale_dir / name, CPU, torch.float32)
        with torch.inference_mode():
            whole = upscale_tiled(model, image, 4, tile=512)
            tiled = upscale_tiled(model, image, 4, tile=32, overlap=16)
        assert whole.shape == tiled.shape == (1, 280, 360, 3)
        assert (whole - tiled).abs().max() < tolerance, name
        assert (whole - upscale_tiled(model, image, 4, tile=32, overlap=0)).abs().max() > 10 * tolerance, (
            "without overlap the seams show, so the test above can tell"
        )


class RecordingContext:
    """The two calls upscale_tiled makes on a NodeContext, recorded; cancels at a given check."""

    def __init__(self, cancel_at: int = 0) -> None:
        self.checks, self.steps, self.cancel_at = 0, [], cancel_at

    def check_cancelled(self) -> None:
        self.checks += 1
        if self.checks == self.cancel_at:
            raise JobCancelled()

    def progress(self, step: int, total: int) -> None:
        self.steps.append((step, total))


def nearest_x2(tile: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(tile, scale_factor=2, mode="nearest")


def test_tiles_report_progress_and_stop_when_cancelled():
    image = torch.rand(2, 40, 60, 3)
    ctx = RecordingContext()
    out = upscale_tiled(nearest_x2, image, 2, tile=32, overlap=16, ctx=ctx)
    assert torch.allclose(out, nearest_x2(image.movedim(-1, 1)).movedim(1, -1), atol=1e-6)
    tiles = 2 * 2 * 3  # batch x rows x columns of 32-px tiles overlapping by at least 16
    assert ctx.checks == tiles and ctx.steps == [(i, tiles) for i in range(1, tiles + 1)]

    calls = []
    cancelling = RecordingContext(cancel_at=3)
    with pytest.raises(JobCancelled):
        upscale_tiled(lambda t: calls.append(t) or nearest_x2(t), image, 2, tile=32, overlap=16, ctx=cancelling)
    assert len(calls) == 2


def test_out_of_memory_halves_the_tile_then_fails_clearly():
    image = torch.rand(1, 300, 300, 3)

    def needs_small_tiles(limit: int):
        def model(tile: torch.Tensor) -> torch.Tensor:
            if max(tile.shape[-2:]) > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return nearest_x2(tile)

        return model

    out = upscale_image(needs_small_tiles(256), image, 2)
    assert torch.allclose(out, nearest_x2(image.movedim(-1, 1)).movedim(1, -1), atol=1e-6)
    with pytest.raises(RuntimeError, match="out of device memory .* even with tiles of 128 px"):
        upscale_image(needs_small_tiles(100), image, 2)


def test_loaded_model_is_in_eval_mode_and_counts_its_weight_bytes(upscale_dir):
    from safetensors.torch import load_file

    model = load_upscaler(upscale_dir / ESRGAN, CPU, torch.float32)
    assert model.scale == 4 and not model.descriptor.model.training
    assert model.nbytes() == sum(t.numel() * t.element_size() for t in load_file(upscale_dir / ESRGAN).values())


def test_files_that_are_not_super_resolution_models_fail_and_the_server_keeps_serving(client, upscale_dir):
    pixels = picture(16, 12)
    for name, message in (
        (NOT_IMAGE, "not an architecture spandrel knows"),
        (RESTORE_1X, "1x restoration model, not a single-image super-resolution model"),
    ):
        with pytest.raises(JobFailed) as info:
            run_graph(client, model_upscale(name), pixels)
        assert info.value.result.status == "failed"
        assert message in info.value.result.error and name in info.value.result.error
    assert run_graph(client, model_upscale(COMPACT), pixels)["save_up"].shape == (48, 64, 3)


def test_damaged_mismatched_or_pickled_files_are_refused_clearly(tmp_path, upscale_dir):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    wrong = upscaler_files.real_esrgan_x4()
    wrong["conv_body.weight"] = wrong["conv_body.weight"][:, :4]
    files.write(wrong, tmp_path, "mismatched.safetensors")
    for name in ("broken.safetensors", "mismatched.safetensors"):
        with pytest.raises(NodeInputError, match=f"upscale model '{name}' could not be loaded"):
            load_upscaler(tmp_path / name, CPU, torch.float32)
    with pytest.raises(NodeInputError, match="only .safetensors files are loaded"):
        load_upscaler(upscale_dir / PICKLED, CPU, torch.float32)


def test_only_safetensors_files_are_offered(client, upscale_dir):
    loader = next(n for n in client.list_nodes() if n.class_type == "UpscaleModelLoader")
    assert {ESRGAN, COMPACT} <= set(loader.inputs[0].choices) and PICKLED not in loader.inputs[0].choices
    with pytest.raises(PlinthError) as info:
        run_graph(client, model_upscale(PICKLED), picture(16, 12))
    assert info.value.code == "INVALID_ARGUMENT"
    assert [(e.node_id, e.input, e.code) for e in info.value.errors] == [("loader", "model_name", "value_not_in_list")]


def test_scale_nodes_give_the_sizes_comfyui_gives(client):
    nodes = {
        "fixed": scale("ImageScale", upscale_method="bilinear", width=50, height=20, crop="disabled"),
        "by_height": scale("ImageScale", upscale_method="bilinear", width=0, height=60, crop="disabled"),
        "by_width": scale("ImageScale", upscale_method="area", width=16, height=0, crop="center"),
        "unchanged": scale("ImageScale", upscale_method="bicubic", width=0, height=0, crop="disabled"),
        "by": scale("ImageScaleBy", upscale_method="nearest-exact", scale_by=1.5),
        "total": scale("ImageScaleToTotalPixels", upscale_method="lanczos", megapixels=0.01),
    }
    nodes.update({f"save_{k}": save(k) for k in list(nodes)})
    pixels = picture(32, 24)
    out = run_graph(client, nodes, pixels)
    side = math.sqrt(0.01 * 2**20 / (32 * 24))
    assert {k[5:]: v.shape[1::-1] for k, v in out.items()} == {
        "fixed": (50, 20),
        "by_height": (80, 60),
        "by_width": (16, 12),
        "unchanged": (32, 24),
        "by": (48, 36),
        "total": (round(32 * side), round(24 * side)),
    }
    assert np.array_equal(out["save_unchanged"], pixels)


def test_center_crop_trims_to_the_target_aspect_before_scaling(client):
    pixels = np.zeros((24, 48, 3), np.uint8)
    pixels[:, :12] = (255, 0, 0)
    pixels[:, 12:36] = (0, 255, 0)
    pixels[:, 36:] = (0, 0, 255)
    nodes = {
        "crop": scale("ImageScale", upscale_method="nearest-exact", width=12, height=12, crop="center"),
        "squash": scale("ImageScale", upscale_method="nearest-exact", width=12, height=12, crop="disabled"),
    }
    out = run_graph(client, {**nodes, "save_crop": save("crop"), "save_squash": save("squash")}, pixels)
    assert (out["save_crop"] == (0, 255, 0)).all()
    assert (out["save_squash"][:, 0] == (255, 0, 0)).all() and (out["save_squash"][:, -1] == (0, 0, 255)).all()


def test_each_method_resamples_its_own_way(client):
    pixels = picture(16, 12)
    up = {
        m: scale("ImageScaleBy", upscale_method=m, scale_by=2.0)
        for m in ("nearest-exact", "bilinear", "bicubic", "lanczos")
    }
    down = {f"down-{m}": scale("ImageScaleBy", upscale_method=m, scale_by=0.5) for m in ("nearest-exact", "area")}
    nodes = {**up, **down}
    out = run_graph(client, {**nodes, **{f"save-{k}": save(k) for k in nodes}}, pixels)
    enlarged = [out[f"save-{m}"] for m in up]
    for i, a in enumerate(enlarged):
        for b in enlarged[i + 1 :]:
            assert np.abs(a.astype(int) - b.astype(int)).mean() > 2
    assert np.array_equal(out["save-nearest-exact"], pixels.repeat(2, axis=0).repeat(2, axis=1))
    means = pixels.reshape(6, 2, 8, 2, 3).astype(float).mean(axis=(1, 3))
    assert levels(out["save-down-area"], np.floor(means + 1e-3).astype(np.uint8)) <= 1
    assert np.array_equal(out["save-down-nearest-exact"], pixels[1::2, 1::2])
    assert levels(out["save-down-area"], out["save-down-nearest-exact"]) > 30
