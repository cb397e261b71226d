"""ControlNetLoader and ControlNetApplyAdvanced, through the real server where a graph can show it.

The ControlNet is a random-weight one for tiny-sd's architecture (tests/support/controlnet_files.py)
written in every layout the loader reads; its weights are all perturbed, so it changes the image
whenever it is active, and any layout that loaded differently would give different pixels.
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from support import controlnet_files, files
from support.graph_builder import linked, node_of
from support.paths import GRAPHS

from plinth.clients import JobFailed
from plinth.nodes.controlnet import ControlNetApplyAdvanced, _template, build_controlnet, infer_config, load_controlnet
from plinth.nodes.core.context import ModelHandle, NodeInputError
from plinth.nodes.core.types import ConditioningEntry, ControlSpec

CPU = torch.device("cpu")
BROKEN = "broken.safetensors"
FOREIGN = "classifier.safetensors"
TRUNCATED = "control_truncated.safetensors"


@pytest.fixture(scope="module")
def controlnet():
    return controlnet_files.tiny_controlnet()


@pytest.fixture(scope="module")
def names(models_dir, controlnet) -> dict[str, str]:
    """The ControlNet in every layout, plus files that must be refused, under models/controlnet."""
    folder = models_dir / "controlnet"
    names = controlnet_files.write_all_layouts(controlnet, folder)
    (folder / BROKEN).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    files.write({"encoder.layer.0.weight": torch.ones(4, 4), "head.weight": torch.ones(2, 4)}, folder, FOREIGN)
    original = controlnet_files.to_original_state_dict(controlnet)
    del original["zero_convs.2.0.weight"]
    files.write(original, folder, TRUNCATED)
    return names


def hint_png(width: int, height: int, seed: int = 0) -> bytes:
    """Blocky random pixels: structure a ControlNet and Canny both respond to."""
    cells = np.random.default_rng(seed).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    pixels = cells.repeat(8, axis=0).repeat(8, axis=1)[:height, :width]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def with_controlnet(
    graph: dict, name: str, strength: float = 1.0, start: float = 0.0, end: float = 1.0, canny: bool = False
) -> dict:
    """txt2img with LoadImage -> [Canny] -> ControlNetApplyAdvanced between the prompts and KSampler."""
    graph = copy.deepcopy(graph)  # a copy: a test may add ControlNets to one txt2img several times
    sampler = node_of(graph, "KSampler")
    positive, negative = linked(graph, sampler, "positive"), linked(graph, sampler, "negative")
    graph.update(
        {
            "hint": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
            "cn_load": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": name}},
            "cn_apply": {
                "class_type": "ControlNetApplyAdvanced",
                "inputs": {
                    "positive": positive.out(0),
                    "negative": negative.out(0),
                    "control_net": ["cn_load", 0],
                    "image": ["canny", 0] if canny else ["hint", 0],
                    "strength": strength,
                    "start_percent": start,
                    "end_percent": end,
                },
            },
        }
    )
    if canny:
        graph["canny"] = {
            "class_type": "Canny",
            "inputs": {"image": ["hint", 0], "low_threshold": 0.2, "high_threshold": 0.5},
        }
    sampler.inputs.update(positive=["cn_apply", 0], negative=["cn_apply", 1])
    return graph


def images(client, graph: dict, hint: bytes | None = None) -> list[np.ndarray]:
    result = client.run(graph, inputs={"hint.png": hint} if hint is not None else None)
    return [np.asarray(image.convert("RGB")) for image in result.images]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))


@pytest.fixture(scope="module")
def baseline(client, names) -> list[np.ndarray]:
    """txt2img's images with no ControlNet."""
    return images(client, json.loads((GRAPHS / "txt2img.json").read_text()))


def test_strength_zero_is_exactly_no_controlnet_and_strength_one_is_not(client, txt2img, names, baseline):
    hint = hint_png(64, 64)
    off = images(client, with_controlnet(txt2img, names["diffusers"], strength=0.0), hint)
    on = images(client, with_controlnet(txt2img, names["diffusers"], strength=1.0), hint)
    assert same(off, baseline)
    assert not any(np.array_equal(x, y) for x, y in zip(on, baseline, strict=False))


def test_the_window_limits_the_steps_the_controlnet_acts_in(client, txt2img, names, baseline):
    hint = hint_png(64, 64)
    # Progress 0 would be timestep 1000, which no schedule reaches (the last training step is 999).
    outside = images(client, with_controlnet(copy.deepcopy(txt2img), names["diffusers"], start=0.0, end=0.0), hint)
    assert same(outside, baseline)
    # Two euler steps run at timesteps 999 and 0 (progress 0.001 and 1): the first half has one.
    first = images(client, with_controlnet(copy.deepcopy(txt2img), names["diffusers"], start=0.0, end=0.5), hint)
    whole = images(client, with_controlnet(txt2img, names["diffusers"]), hint)
    assert not same(first, baseline) and not same(first, whole)


def test_every_file_layout_gives_the_same_image(client, txt2img, names, baseline):
    hint = hint_png(64, 64)
    results = {
        layout: images(client, with_controlnet(copy.deepcopy(txt2img), name), hint) for layout, name in names.items()
    }
    first = results["diffusers"]
    assert not same(first, baseline)
    for layout, result in results.items():
        assert same(result, first), layout


def test_a_hint_of_another_size_is_resized_to_the_image(client, txt2img, names, baseline):
    result = images(client, with_controlnet(txt2img, names["original"], canny=True), hint_png(96, 80, seed=1))
    assert [r.shape for r in result] == [(64, 64, 3)] * 2
    assert not same(result, baseline)


def test_bad_files_fail_the_job_clearly_and_the_server_keeps_serving(client, txt2img, names):
    expected = {
        BROKEN: "not a readable .safetensors file",
        FOREIGN: "not a ControlNet",
        TRUNCATED: "missing ['controlnet_down_blocks.2.weight']",
    }
    hint = hint_png(64, 64)
    for name, message in expected.items():
        graph = with_controlnet(copy.deepcopy(txt2img), name)
        with pytest.raises(JobFailed) as info:
            client.run(graph, inputs={"hint.png": hint})
        error = info.value.result.error
        assert info.value.result.status == "failed"
        assert message in error and name in error and "ControlNetLoader" in error, error
    assert len(images(client, with_controlnet(txt2img, names["diffusers"]), hint)) == 2


def test_every_layout_loads_the_exact_weights(models_dir, names, controlnet):
    written = controlnet.state_dict()
    for layout, name in names.items():
        loaded = load_controlnet(models_dir / "controlnet" / name, CPU, torch.float32)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        state = loaded.state_dict()
        assert state.keys() == written.keys(), layout
        assert all(torch.equal(state[k], written[k]) for k in written), layout
        assert list(loaded.config.conditioning_embedding_out_channels) == list(controlnet_files.HINT_WIDTHS)


def test_an_sd15_sized_original_file_maps_onto_the_sd15_config():
    """Real SD1.5 ControlNet shapes (12 input blocks, hint encoder 16/32/96/256), on the meta
    device so nothing is allocated: the inferred config is SD1.5's and every key maps."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        sd15 = ControlNetModel.from_config(_template())
    original = controlnet_files.to_original_state_dict(sd15)
    assert "input_hint_block.14.weight" in original and "zero_convs.11.0.weight" in original
    loaded = build_controlnet(original, "sd15", "original")
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == {
        k: tuple(v.shape) for k, v in sd15.state_dict().items()
    }
    inferred = infer_config({k: tuple(v.shape) for k, v in sd15.state_dict().items()})
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in inferred.items()} == _template() | {
        "conditioning_channels": 3
    }


def test_a_misshapen_weight_is_refused_by_name(controlnet):
    state = dict(controlnet.state_dict())
    state["controlnet_mid_block.weight"] = state["controlnet_mid_block.weight"][:8]
    with pytest.raises(NodeInputError, match=r"wrong shape \['controlnet_mid_block.weight'\]"):
        build_controlnet(state, "bad")


def test_apply_copies_entries_and_leaves_the_inputs_alone():
    handle = ModelHandle("controlnet/x", lambda: None)
    earlier = ControlSpec(ModelHandle("controlnet/earlier", lambda: None), torch.zeros(1, 8, 8, 3))
    positive = [ConditioningEntry(torch.zeros(1, 77, 8), {"controls": (earlier,), "strength": 0.5})]
    negative = [ConditioningEntry(torch.ones(1, 77, 8))]
    hint = torch.rand(1, 16, 16, 3)
    pos, neg = ControlNetApplyAdvanced().run(None, positive, negative, handle, hint, 0.7, 0.1, 0.9)
    spec = ControlSpec(handle, hint, 0.7, 0.1, 0.9)
    assert pos[0].options == {"controls": (earlier, spec), "strength": 0.5} and pos[0].embeds is positive[0].embeds
    assert neg[0].options == {"controls": (spec,)}
    assert positive[0].options == {"controls": (earlier,), "strength": 0.5} and negative[0].options == {}
    assert pos[0].options["controls"][1].hint is hint
    unchanged = ControlNetApplyAdvanced().run(None, positive, negative, handle, hint, 0.0, 0.0, 1.0)
    assert unchanged[0] is positive and unchanged[1] is negative
