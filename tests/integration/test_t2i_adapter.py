"""T2I-Adapters through ControlNetLoader and ControlNetApplyAdvanced, as ComfyUI runs them.

The adapters are random-weight ones for the small SD1.5-layout checkpoint (4 levels, as SD1.5's
adapters have) written in TencentARC's original layouts and in diffusers' (see
tests/support/t2i_adapter_files.py); a reference forward written here from the original keys
checks the conversion, the odd-size pooling included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import files, small_sd15, t2i_adapter_files

from plinth.clients import JobFailed
from plinth.nodes.controlnet import load_controlnet
from plinth.nodes.models.t2i_adapter import T2IAdapterModel
from plinth.server.storage.model_folders import ModelFolders

CPU = torch.device("cpu")
WIDTHS = [32, 64, 128, 128]  # the small checkpoint's down blocks
TRUNCATED, XL, SKIPS = "t2i-truncated.safetensors", "t2i-xl.safetensors", "t2i-skip-convs.safetensors"


@pytest.fixture(scope="module")
def adapters(models_dir) -> dict[str, object]:
    small_sd15.small_sd15(models_dir)
    return {
        "full": t2i_adapter_files.tiny_adapter(WIDTHS, "full", seed=1),
        "light": t2i_adapter_files.tiny_adapter(WIDTHS, "light", seed=2),
        "sketch": t2i_adapter_files.tiny_adapter(WIDTHS, "full", hint_channels=1, seed=3),
    }


@pytest.fixture(scope="module")
def names(models_dir, adapters) -> dict[str, dict[str, str]]:
    folder = models_dir / "controlnet"
    written = {kind: t2i_adapter_files.write_layouts(adapter, folder, kind) for kind, adapter in adapters.items()}
    original = t2i_adapter_files.to_original_state_dict(adapters["full"])
    files.write({k: v for k, v in original.items() if k != "body.7.block2.bias"}, folder, TRUNCATED)
    files.write({**original, "conv_in.weight": torch.zeros(32, 768, 3, 3)}, folder, XL)
    files.write({**original, "body.0.skep.weight": torch.zeros(32, 32, 1, 1)}, folder, SKIPS)
    return written


def hint_png(width: int, height: int, seed: int = 0) -> bytes:
    """Blocky random pixels, a hint with structure at every adapter level."""
    cells = np.random.default_rng(seed).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return files.png(cells.repeat(8, axis=0).repeat(8, axis=1)[:height, :width])


def with_adapter(name: str | None, strength: float = 1.0, start: float = 0.0, end: float = 1.0) -> dict:
    """The small checkpoint's txt2img with LoadImage -> ControlNetApplyAdvanced(adapter)."""
    graph, nodes = small_sd15.txt2img()
    if name is not None:
        hint = graph.add("LoadImage", image="hint.png")
        loader = graph.add("ControlNetLoader", control_net_name=name)
        apply = graph.add(
            "ControlNetApplyAdvanced",
            positive=nodes["positive"].out(0),
            negative=nodes["negative"].out(0),
            control_net=loader.out(0),
            image=hint.out(0),
            strength=strength,
            start_percent=start,
            end_percent=end,
        )
        nodes["sampler"].inputs.update(positive=apply.out(0), negative=apply.out(1))
    return graph.build()


def images(client, graph: dict) -> list[np.ndarray]:
    result = client.run(graph, inputs={"hint.png": hint_png(64, 64, seed=4)})
    return [np.asarray(image.convert("RGB")) for image in result.images]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def baseline(client, names) -> list[np.ndarray]:
    return images(client, with_adapter(None))


def test_an_adapter_changes_the_image_and_strength_zero_does_not(client, names, baseline):
    on = images(client, with_adapter(names["full"]["original"]))
    off = images(client, with_adapter(names["full"]["original"], strength=0.0))
    assert not same(on, baseline) and same(off, baseline)


def test_the_window_limits_the_steps_the_adapter_acts_in(client, names, baseline):
    name = names["full"]["original"]
    # Progress 0 is timestep 1000, which no schedule reaches: the adapter never acts.
    assert same(images(client, with_adapter(name, start=0.0, end=0.0)), baseline)
    # Two euler steps run at progress 0.001 and 1: a window of the first half holds one.
    first = images(client, with_adapter(name, start=0.0, end=0.5))
    whole = images(client, with_adapter(name))
    assert not same(first, baseline) and not same(first, whole)


def test_every_layout_of_an_adapter_gives_the_same_image(client, names, baseline):
    for kind, layouts in names.items():
        results = {layout: images(client, with_adapter(name)) for layout, name in layouts.items()}
        assert not same(results["original"], baseline), kind
        for layout, result in results.items():
            assert same(result, results["original"]), (kind, layout)


def _reference_features(state: dict[str, torch.Tensor], kind: str, pixels: torch.Tensor) -> list[torch.Tensor]:
    """TencentARC's adapter forward written from the original keys: pixel unshuffle by 8, then
    per level a 2x2 average pool (odd sides padded by one zero cell on both ends) except the
    first, a width change, resnets x + block2(relu(block1(x))), the level's output kept."""

    def conv(x, key):
        weight = state[f"{key}.weight"]
        return F.conv2d(x, weight, state[f"{key}.bias"], padding=weight.shape[-1] // 2)

    def pool(x):
        return F.avg_pool2d(x, 2, 2, padding=(x.shape[2] % 2, x.shape[3] % 2))

    def resnet(x, key):
        return x + conv(F.relu(conv(x, f"{key}.block1")), f"{key}.block2")

    x, features = F.pixel_unshuffle(pixels, 8), []
    if kind == "light":
        for level in range(len(WIDTHS)):
            x = conv(pool(x) if level else x, f"body.{level}.in_conv")
            for n in range(4):
                x = resnet(x, f"body.{level}.body.{n}")
            x = conv(x, f"body.{level}.out_conv")
            features.append(x)
        return features
    x = conv(x, "conv_in")
    for level in range(len(WIDTHS)):
        for n in (2 * level, 2 * level + 1):
            if n == 2 * level and level:
                x = pool(x)
            if f"body.{n}.in_conv.weight" in state:
                x = conv(x, f"body.{n}.in_conv")
            x = resnet(x, f"body.{n}")
        features.append(x)
    return features


@pytest.mark.parametrize("kind", ["full", "light", "sketch"])
def test_features_follow_the_original_adapter_at_odd_sizes(models_dir, names, adapters, kind):
    """A 72x40-pixel image (latent 9x5: odd sides at every level) through each layout's loaded
    adapter gives the reference forward's features; a one-channel adapter averages the hint."""
    state = t2i_adapter_files.to_original_state_dict(adapters[kind])
    hint = torch.rand(1, 40, 72, 3)
    pixels = hint.movedim(-1, 1)
    if kind == "sketch":
        pixels = pixels.mean(dim=1, keepdim=True)
    expected = _reference_features(state, "light" if kind == "light" else "full", pixels)
    for layout, name in names[kind].items():
        model = load_controlnet(models_dir / "controlnet" / name, CPU, torch.float32)
        assert isinstance(model, T2IAdapterModel) and not model.training, layout
        got = model.features(hint, 5, 9, 8)
        assert [tuple(f.shape) for f in got] == [tuple(f.shape) for f in expected], layout
        assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected, strict=True)), (kind, layout)


def test_a_pickled_original_file_loads_with_allow_pickle(tmp_path, adapters):
    """TencentARC's .pth files are plain state dicts: with allow_pickle the converted copy loads."""
    folders = ModelFolders(tmp_path / "models", tmp_path / "data", allow_pickle=True)
    original = t2i_adapter_files.to_original_state_dict(adapters["full"])
    torch.save(original, tmp_path / "models" / "controlnet" / "t2iadapter_depth_sd14v1.pth")
    model = load_controlnet(folders.model_path("controlnet", "t2iadapter_depth_sd14v1.pth"), CPU, torch.float32)
    hint = torch.rand(1, 64, 64, 3)
    assert isinstance(model, T2IAdapterModel)
    expected = _reference_features(original, "full", hint.movedim(-1, 1))
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(model.features(hint, 8, 8, 8), expected, strict=True))


def test_bad_files_fail_the_job_clearly(client, names):
    expected = {
        TRUNCATED: "missing ['adapter.body.3.resnets.1.block2.bias']",
        XL: "SDXL adapters do not load here",
        SKIPS: "skip convolutions",
    }
    for name, message in expected.items():
        with pytest.raises(JobFailed) as info:
            client.run(with_adapter(name), inputs={"hint.png": hint_png(64, 64)})
        error = info.value.result.error
        assert message in error and name in error and "ControlNetLoader" in error, error


def test_an_adapter_that_does_not_fit_the_model_is_refused_by_its_widths(client, models_dir, adapters):
    """The small checkpoint's adapter on tiny-sd (2 levels, widths 32 and 64)."""
    graph = with_adapter(
        t2i_adapter_files.write_layouts(adapters["full"], models_dir / "controlnet", "misfit")["original"]
    )
    for node in graph.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = "tiny-sd"
    with pytest.raises(JobFailed) as info:
        client.run(graph, inputs={"hint.png": hint_png(64, 64)})
    assert "widths [32, 64, 128, 128]" in info.value.result.error and "(widths [32, 64])" in info.value.result.error
