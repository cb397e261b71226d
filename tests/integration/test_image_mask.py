"""Image and mask nodes with ComfyUI's meaning, through a real server where it is cheap (images
in by LoadImage, tensors read back from the output cache) and as pure functions otherwise."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.files import png
from support.live_server import node_output

from plinth.clients import PlinthError
from plinth.nodes.core.context import JobCancelled
from plinth.nodes.image import canny, composite, outpaint_mask
from plinth.nodes.mask import GrowMask, batch_mask, feather, grow


def gradient(height: int, width: int) -> np.ndarray:
    """A uint8 RGB image whose every pixel differs from its neighbours."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 7 % 256, ys * 11 % 256, (xs + ys) * 5 % 256], axis=-1).astype(np.uint8)


def test_composite_is_exact_where_the_mask_is_one_and_untouched_where_zero(server, client):
    destination = gradient(24, 32)
    source = np.full((16, 16, 3), (10, 200, 60), dtype=np.uint8)
    mask = np.zeros((16, 16, 3), dtype=np.uint8)
    mask[:, :6] = 255  # red channel 1: copy the source
    mask[:, 6:8] = 128  # a blend
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "dest.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "src.png"}},
        "3": {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}},
        "4": {
            "class_type": "ImageCompositeMasked",
            "inputs": {
                "destination": ["1", 0],
                "source": ["2", 0],
                "x": 20,
                "y": 12,
                "resize_source": False,
                "mask": ["3", 0],
            },
        },
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "comp"}},
    }
    result = client.run(graph, inputs={"dest.png": png(destination), "src.png": png(source), "mask.png": png(mask)})
    assert result.images[0].size == (32, 24)  # the source's overhang is cut off, not grown into
    out = node_output(server, result, "4")[0][0]
    dest = torch.from_numpy(destination).float() / 255
    src = torch.from_numpy(source).float() / 255
    assert torch.equal(out[12:24, 20:26], src[:12, :6])  # mask 1: the source, bit for bit
    assert torch.equal(out[12:24, 28:32], dest[12:24, 28:32])  # mask 0: the destination
    blend = out[12:24, 26:28]
    assert torch.allclose(blend, src[:12, 6:8] * (128 / 255) + dest[12:24, 26:28] * (127 / 255), atol=1e-6)
    outside = torch.ones(24, 32, dtype=torch.bool)
    outside[12:, 20:] = False
    assert torch.equal(out[outside], dest[outside])


def test_composite_without_mask_pastes_and_clips_at_the_border():
    destination = torch.zeros(2, 8, 8, 3)
    source = torch.rand(1, 5, 5, 3)
    out = composite(destination, source, 6, 5)
    assert torch.equal(out[:, 5:, 6:], source[:, :3, :2].expand(2, -1, -1, -1))
    assert out[:, :5].abs().sum() == 0 and out[:, :, :6].abs().sum() == 0
    assert destination.abs().sum() == 0  # the input is not changed in place
    assert torch.equal(composite(destination, source, 8, 0), destination)  # entirely off the image


def test_resize_source_fills_the_destination(server, client):
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "dest.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "src.png"}},
        "3": {
            "class_type": "ImageCompositeMasked",
            "inputs": {"destination": ["1", 0], "source": ["2", 0], "x": 0, "y": 0, "resize_source": True},
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    source = np.full((5, 7, 3), (0, 0, 255), dtype=np.uint8)
    result = client.run(graph, inputs={"dest.png": png(gradient(12, 20)), "src.png": png(source)})
    out = node_output(server, result, "3")[0]
    assert out.shape == (1, 12, 20, 3)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 1.0]).expand_as(out), atol=1e-6)


def test_load_image_mask_reads_one_minus_alpha_or_a_colour_channel(server, client):
    pixels = np.zeros((6, 9, 4), dtype=np.uint8)
    pixels[..., 1] = 200
    pixels[..., 3] = 255
    pixels[:, :3, 3] = 0  # transparent on the left
    graph = {
        "1": {"class_type": "LoadImageMask", "inputs": {"image": "rgba.png", "channel": "alpha"}},
        "2": {"class_type": "LoadImageMask", "inputs": {"image": "rgba.png", "channel": "green"}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "5": {"class_type": "ImageBatch", "inputs": {"image1": ["3", 0], "image2": ["4", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    result = client.run(graph, inputs={"rgba.png": png(pixels)})
    alpha = node_output(server, result, "1")[0]
    assert alpha.shape == (1, 6, 9)
    assert (alpha[0, :, :3] == 1).all() and (alpha[0, :, 3:] == 0).all()
    assert torch.allclose(node_output(server, result, "2")[0], torch.full((1, 6, 9), 200 / 255))
    assert len(result.images) == 2 and result.images[0].getpixel((0, 0)) == (255, 255, 255)


def test_pad_for_outpaint_gives_grey_border_and_mask_of_the_new_area(server, client):
    image = gradient(24, 32)
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "shot.png"}},
        "2": {
            "class_type": "ImagePadForOutpaint",
            "inputs": {"image": ["1", 0], "left": 8, "top": 0, "right": 16, "bottom": 8, "feathering": 4},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "pad"}},
        "4": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 1]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    result = client.run(graph, inputs={"shot.png": png(image)})
    assert [i.size for i in result.images] == [(56, 32), (56, 32)]
    padded, mask = node_output(server, result, "2")
    assert padded.shape == (1, 32, 56, 3) and mask.shape == (1, 32, 56)
    assert torch.equal(padded[0, :24, 8:40], torch.from_numpy(image).float() / 255)
    assert (padded[0, 24:] == 0.5).all() and (padded[0, :, :8] == 0.5).all() and (padded[0, :, 40:] == 0.5).all()
    new_area = torch.ones(32, 56, dtype=torch.bool)
    new_area[:24, 8:40] = False
    assert (mask[0][new_area] == 1).all()
    assert (mask[0, :20, 12:36] == 0).all()  # the interior beyond the feathering band
    band = mask[0, 10, 8:13]  # feathered from the left: ((4 - d) / 4)^2 for d = 0..4
    assert torch.allclose(band, torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0]))
    assert (mask[0, :24, 8:40][:, 0] > mask[0, :24, 8:40][:, 2]).all()  # falls off into the image
    assert (mask[0, 0, 12:36] == 0).all()  # no band on the unpadded top side


def test_outpaint_mask_without_feathering_is_a_hard_frame():
    mask = outpaint_mask(4, 4, 1, 1, 1, 1, 0)
    expected = torch.ones(6, 6)
    expected[1:5, 1:5] = 0
    assert torch.equal(mask, expected)


def test_crop_invert_and_batch(server, client):
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, 8:56] = (0, 255, 0)  # the part a centre crop to 3:2 keeps
    wide[:, :8] = wide[:, 56:] = (255, 0, 0)
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "wide.png"}},
        "3": {"class_type": "ImageCrop", "inputs": {"image": ["1", 0], "width": 10, "height": 50, "x": 20, "y": 4}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    image = gradient(16, 24)
    result = client.run(graph, inputs={"a.png": png(image), "wide.png": png(wide)})
    source = torch.from_numpy(image).float() / 255
    cropped = node_output(server, result, "3")[0]
    assert torch.equal(cropped[0], source[4:, 20:])  # clipped to the image: 4 wide, 12 high
    assert torch.equal(node_output(server, result, "4")[0], 1.0 - cropped)
    batch = node_output(server, result, "5")[0]
    assert batch.shape == (2, 16, 24, 3)
    assert torch.equal(batch[0], source)
    assert torch.allclose(batch[1], torch.tensor([0.0, 1.0, 0.0]).expand(16, 24, 3), atol=1e-6)


def rectangle_image() -> np.ndarray:
    pixels = np.full((48, 64, 3), 30, dtype=np.uint8)
    pixels[12:36, 16:48] = 220
    return pixels


def test_canny_finds_the_edges_of_a_rectangle_and_nothing_in_flat_areas(server, client):
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "rect.png"}},
        "2": {"class_type": "Canny", "inputs": {"image": ["1", 0], "low_threshold": 0.4, "high_threshold": 0.8}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "canny"}},
    }
    result = client.run(graph, inputs={"rect.png": png(rectangle_image())})
    edges = node_output(server, result, "2")[0][0]
    assert edges.shape == (48, 64, 3) and torch.equal(edges[..., 0], edges[..., 2])
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    found = edges[..., 0].bool()
    # Every edge pixel lies on the rectangle's outline (one pixel either side of the step) ...
    near_outline = torch.zeros(48, 64, dtype=torch.bool)
    near_outline[10:38, 14:50] = True
    near_outline[14:34, 18:46] = False
    assert not (found & ~near_outline).any()
    # ... and each side is traced along its straight part, one pixel thick.
    for line in (found[10:14, 20:44].T, found[34:38, 20:44].T, found[16:32, 14:18], found[16:32, 46:50]):
        assert (line.sum(dim=1) == 1).all()
    assert np.asarray(result.images[0]).max() == 255


def test_canny_thresholds_decide_which_edges_survive():
    image = torch.zeros(1, 32, 48, 3)
    image[:, 8:24, 4:20] = 1.0  # strong step
    image[:, 8:24, 28:44] = 0.12  # faint step
    edges = canny(image, 0.1, 0.2)[0]
    assert edges[:, :24].sum() > 0 and edges[:, 24:].sum() > 0
    edges = canny(image, 0.4, 0.8)[0]
    assert edges[:, :24].sum() > 0 and edges[:, 26:].sum() == 0
    assert canny(torch.full((1, 16, 16, 3), 0.7), 0.01, 0.02).sum() == 0


def test_canny_refuses_low_threshold_above_high(client):
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "rect.png"}},
        "2": {"class_type": "Canny", "inputs": {"image": ["1", 0], "low_threshold": 0.9, "high_threshold": 0.3}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    with pytest.raises(PlinthError) as info:
        client.run(graph, inputs={"rect.png": png(rectangle_image())})
    assert [(e.node_id, e.input) for e in info.value.errors] == [("2", "low_threshold")]


def test_mask_nodes_on_a_hand_made_mask(server, client):
    pixels = np.zeros((9, 9, 3), dtype=np.uint8)
    pixels[4, 4, 0] = 255  # one selected pixel in the red channel
    pixels[1, 1, 0] = 100  # and a faint one
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "dot.png"}},
        "2": {"class_type": "ImageToMask", "inputs": {"image": ["1", 0], "channel": "red"}},
        "3": {"class_type": "ThresholdMask", "inputs": {"mask": ["2", 0], "value": 0.5}},
        "4": {"class_type": "GrowMask", "inputs": {"mask": ["3", 0], "expand": 2, "tapered_corners": True}},
        "5": {"class_type": "GrowMask", "inputs": {"mask": ["3", 0], "expand": 2, "tapered_corners": False}},
        "6": {"class_type": "GrowMask", "inputs": {"mask": ["5", 0], "expand": -1, "tapered_corners": False}},
        "7": {"class_type": "InvertMask", "inputs": {"mask": ["5", 0]}},
        "8": {"class_type": "FeatherMask", "inputs": {"mask": ["7", 0], "left": 2, "top": 0, "right": 0, "bottom": 3}},
        "9": {"class_type": "SolidMask", "inputs": {"value": 0.25, "width": 5, "height": 3}},
    }
    for shown in ("4", "6", "8", "9"):  # every mask node above feeds an output
        graph[f"show{shown}"] = {"class_type": "MaskToImage", "inputs": {"mask": [shown, 0]}}
        graph[f"out{shown}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"show{shown}", 0]}}
    result = client.run(graph, inputs={"dot.png": png(pixels)})
    assert result.status == "completed" and len(result.images) == 4
    out = {node: node_output(server, result, node)[0][0] for node in ("2", "3", "4", "5", "6", "7", "8", "9")}
    assert out["2"][1, 1] == pytest.approx(100 / 255) and out["2"][4, 4] == 1.0
    assert out["3"].sum() == 1 and out["3"][4, 4] == 1  # the faint pixel is below 0.5
    diamond = torch.tensor([[abs(y - 4) + abs(x - 4) <= 2 for x in range(9)] for y in range(9)]).float()
    assert torch.equal(out["4"], diamond)
    square = torch.zeros(9, 9)
    square[2:7, 2:7] = 1
    assert torch.equal(out["5"], square)
    shrunk = torch.zeros(9, 9)
    shrunk[3:6, 3:6] = 1
    assert torch.equal(out["6"], shrunk)
    assert torch.equal(out["7"], 1 - square)
    assert torch.allclose(out["8"][8, :3], torch.tensor([1 / 2 / 3, 1 / 3, 1 / 3]))  # both ramps meet
    assert torch.allclose(out["8"][0, :3], torch.tensor([0.5, 1.0, 1.0]))
    assert torch.equal(out["9"], torch.full((3, 5), 0.25))


def test_grow_handles_soft_masks_batches_and_the_border():
    mask = torch.zeros(2, 5, 7)
    mask[0, 2, 3] = 0.6
    mask[1] = 1.0
    grown = grow(mask, 1, tapered_corners=False)
    assert torch.equal(grown[0, 1:4, 2:5], torch.full((3, 3), 0.6))  # grey dilation keeps the value
    assert torch.equal(grow(mask, -3, tapered_corners=True)[1], mask[1])  # no erosion in from outside
    assert torch.equal(grow(mask, 0, True), mask)
    assert torch.equal(grow(mask, 100, True)[0], torch.full((5, 7), 0.6))  # huge expands are capped


def comfyui_grow(mask: torch.Tensor, expand: int, tapered_corners: bool) -> torch.Tensor:
    """GrowMask as it was before the distance transforms, step by step: the review checked it
    equals ComfyUI's loop of scipy grey_dilation/grey_erosion with a 3x3 cross or square."""
    steps = abs(expand)
    if steps == 0:
        return mask.clone()
    sign = 1.0 if expand > 0 else -1.0
    planes = mask.unsqueeze(1) * sign
    height, width = mask.shape[-2:]

    def max_filter(x, radius_y, radius_x):
        if radius_x:
            x = F.max_pool2d(x, (1, 2 * radius_x + 1), stride=1, padding=(0, radius_x))
        if radius_y:
            x = F.max_pool2d(x, (2 * radius_y + 1, 1), stride=1, padding=(radius_y, 0))
        return x

    if tapered_corners:
        for _ in range(min(steps, height + width)):
            planes = torch.maximum(max_filter(planes, 0, 1), max_filter(planes, 1, 0))
    else:
        planes = max_filter(planes, min(steps, height), min(steps, width))
    return planes.squeeze(1) * sign


@pytest.mark.parametrize("kind", ["binary", "soft", "mixed batch"])
def test_grow_equals_the_step_by_step_loop(kind):
    generator = torch.Generator().manual_seed({"binary": 1, "soft": 2, "mixed batch": 3}[kind])
    for _ in range(60):
        height, width = torch.randint(1, 24, (2,), generator=generator).tolist()
        density = float(torch.rand(1, generator=generator))
        mask = (torch.rand(2, height, width, generator=generator) < density).float()
        if kind != "binary":
            soft = torch.rand(2, height, width, generator=generator) * mask
            mask = torch.stack([soft[0], mask[1]]) if kind == "mixed batch" else soft
        for expand in (1, -1, 2, -3, 5, -8, 13, -21, 40, -40, 1000, -1000):
            for tapered in (True, False):
                assert torch.equal(grow(mask, expand, tapered), comfyui_grow(mask, expand, tapered)), (
                    height,
                    width,
                    expand,
                    tapered,
                )


def test_grow_of_a_binary_mask_costs_the_same_at_any_expand():
    dot = torch.zeros(1, 1024, 1024)
    dot[0, 100, 900] = 1
    start = time.perf_counter()
    diamond = grow(dot, 16384, True)
    square = grow(dot, 16384, False)
    shrunk = grow(1 - dot, -16384, True)
    assert time.perf_counter() - start < 3  # the step-by-step loop takes about 30 s here
    assert diamond.min() == 1 and square.min() == 1 and shrunk.max() == 0
    near = grow(dot, 300, True)[0]
    assert near[100, 600] == 1 and near[101, 600] == 0 and near[400, 900] == 1 and near[401, 900] == 0


def test_grow_of_a_soft_mask_stops_when_nothing_changes_and_can_be_cancelled():
    mask = torch.zeros(1, 9, 9)
    mask[0, 4, 4] = 0.5
    calls = []
    grown = grow(mask, 10000, True, lambda: calls.append(1))
    assert torch.equal(grown, torch.full((1, 9, 9), 0.5))
    assert len(calls) == 9  # 8 steps reach the corners, the 9th changes nothing
    assert grow(mask, 10000, True) is not None  # usable without a callback

    calls.clear()

    def cancel_at_third():
        calls.append(1)
        if len(calls) == 3:
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        grow(mask, 10000, True, cancel_at_third)
    assert len(calls) == 3


def test_grow_mask_node_checks_for_cancellation():
    class Cancelled:
        def check_cancelled(self):
            raise JobCancelled()

    soft = torch.full((1, 6, 6), 0.25)
    soft[0, 0, 0] = 0.75
    with pytest.raises(JobCancelled):
        GrowMask().run(Cancelled(), mask=soft, expand=3, tapered_corners=True)


def test_feather_ramps_every_edge_the_same_way():
    mask = feather(torch.ones(1, 4, 6), 0, 0, 3, 0)[0]
    assert torch.allclose(mask[0], torch.tensor([1, 1, 1, 1, 2 / 3, 1 / 3]))
    assert torch.equal(feather(torch.ones(1, 2, 2), 9, 9, 9, 9), torch.full((1, 2, 2), 0.25))  # clipped


def test_bare_masks_are_accepted():
    assert batch_mask(torch.ones(3, 4)).shape == (1, 3, 4)
    assert batch_mask(torch.ones(2, 1, 3, 4)).shape == (2, 3, 4)
