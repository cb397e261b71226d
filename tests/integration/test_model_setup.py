"""Model set-up at load (attention, dtype, compile, warm-up), the two-tier model manager, and
one copy of shared weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from support.graph_builder import GraphBuilder, linked

from plinth.nodes.core.context import ModelHandle, ModelOptions
from plinth.nodes.models import checkpoint
from plinth.nodes.models.checkpoint import ModelSetupError, StableDiffusion, load_checkpoint, use_xformers
from plinth.nodes.models.tiny_sd import ensure_tiny_sd
from plinth.server.model_manager import ModelManager, ModelTooLarge, move_model

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
PLAIN = ModelOptions(warm_up=False)


@pytest.fixture(scope="module")
def tiny(models_dir):
    return ensure_tiny_sd(models_dir)


# attention


def test_auto_and_sdpa_attention_use_torch_sdpa_on_the_cpu(tiny, models_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    for attention in ("auto", "sdpa"):
        model = load_checkpoint(tiny, models_dir, CPU, torch.float32, ModelOptions(attention=attention, warm_up=False))
        processors = {**model.unet.attn_processors, **model.vae.attn_processors}
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_xformers_on_the_cpu_is_refused_naming_the_setting(tiny, models_dir):
    with pytest.raises(ModelSetupError, match="attention 'xformers'.*CUDA"):
        load_checkpoint(tiny, models_dir, CPU, torch.float32, ModelOptions(attention="xformers"))


def test_xformers_without_the_package_points_at_the_gpu_extra(monkeypatch):
    monkeypatch.setattr(checkpoint, "xformers_importable", lambda: False)
    with pytest.raises(ModelSetupError, match="`gpu` extra"):
        use_xformers(CUDA, "xformers")
    assert use_xformers(CUDA, "auto") is False  # auto falls back to SDPA


def test_auto_takes_xformers_only_on_cuda_with_the_package(monkeypatch):
    monkeypatch.setattr(checkpoint, "xformers_importable", lambda: True)
    assert use_xformers(CUDA, "auto") is True
    assert use_xformers(CPU, "auto") is False
    assert use_xformers(CUDA, "sdpa") is False
    with pytest.raises(ModelSetupError, match="not one of"):
        use_xformers(CPU, "flash")


def test_the_gpu_extra_lists_xformers():
    import tomllib

    from support.paths import REPO

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("xformers") for req in extras["gpu"])


# dtype, warm-up, compile


def test_bfloat16_load_puts_every_part_in_bfloat16(tiny, models_dir):
    model = load_checkpoint(tiny, models_dir, CPU, torch.bfloat16, PLAIN)
    assert {m.dtype for m in (model.unet, model.vae, model.text_encoder)} == {torch.bfloat16}


def test_warm_up_runs_each_part_once_at_load(tiny, models_dir):
    def count(model: StableDiffusion) -> dict[str, int]:
        calls = {"unet": 0, "vae_decoder": 0, "text_encoder": 0}
        for name, module in (
            ("unet", model.unet),
            ("vae_decoder", model.vae.decoder),
            ("text_encoder", model.text_encoder),
        ):
            module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        return calls

    model = load_checkpoint(tiny, models_dir, CPU, torch.float32, PLAIN)
    calls = count(model)
    checkpoint.prepare_model(model, CPU, ModelOptions(warm_up=True))
    assert calls == {"unet": 1, "vae_decoder": 1, "text_encoder": 1}
    calls = count(model)
    checkpoint.prepare_model(model, CPU, ModelOptions(warm_up=False))
    assert calls == {"unet": 0, "vae_decoder": 0, "text_encoder": 0}


def test_warm_up_works_in_bfloat16(tiny, models_dir):
    load_checkpoint(tiny, models_dir, CPU, torch.bfloat16, ModelOptions(warm_up=True))


def test_channels_last_is_for_cuda_only(tiny, models_dir):
    model = load_checkpoint(tiny, models_dir, CPU, torch.float32, ModelOptions(channels_last=True, warm_up=False))
    weight = model.unet.conv_in.weight
    assert weight.is_contiguous()  # untouched on the CPU


def test_compile_keeps_the_module_object_config_and_parameters(tiny, models_dir, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model = load_checkpoint(tiny, models_dir, CPU, torch.float32, ModelOptions(compile=True, warm_up=False))
    assert compiled == [model.unet]  # in place: the UNet object callers hold is the compiled one
    assert model.unet.config.in_channels == 4 and next(model.unet.parameters()).dtype == torch.float32


def _has_c_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_c_compiler(), reason="torch.compile (inductor) needs a C compiler on the CPU")
def test_compiled_unet_gives_the_eager_output(tiny, models_dir):
    eager = load_checkpoint(tiny, models_dir, CPU, torch.float32, PLAIN)
    model = load_checkpoint(tiny, models_dir, CPU, torch.float32, ModelOptions(compile=True, warm_up=False))
    args = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]))
    context = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = eager.unet(*args, encoder_hidden_states=context).sample
        got = model.unet(*args, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# bf16 end to end through a server


@pytest.fixture(scope="module")
def bf16_client(models_dir, tmp_path_factory):
    from plinth.clients import Client
    from plinth.server.app import PlinthServer
    from plinth.server.config import Config

    config = Config(
        models_dir=models_dir, data_dir=tmp_path_factory.mktemp("bf16-data"), device="cpu", port=0, precision="bfloat16"
    )
    with PlinthServer(config) as running, Client(running.address, timeout=120) as c:
        yield running, c


def test_bfloat16_txt2img_runs_end_to_end_on_the_cpu(bf16_client, txt2img):
    server, client = bf16_client
    assert server.components.dtype == torch.bfloat16
    result = client.run(txt2img)
    assert result.status == "completed" and len(result.images) == 2
    pixels = np.asarray(result.images[0])
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    model = next(e.model for e in server.components.models.loaded() if e.key.startswith("checkpoints/tiny-sd@"))
    assert model.unet.dtype == model.text_encoder.dtype == model.vae.dtype == torch.bfloat16


# one copy of shared weights


def test_load_model_then_two_graphs_share_one_copy(server, client, txt2img):
    client.load_model("checkpoints", "tiny-sd")
    entries = [e for e in server.components.models.loaded() if e.key.startswith("checkpoints/tiny-sd@")]
    assert len(entries) == 1
    first = entries[0].model
    b = GraphBuilder(txt2img)
    sampler = b.find("KSampler")
    linked(sampler.graph, sampler, "positive").inputs["text"] = "another prompt entirely"
    other = b.build()
    loads = server.components.models.loads
    client.run(txt2img)
    client.run(other)
    entries = [e for e in server.components.models.loaded() if e.key.startswith("checkpoints/tiny-sd@")]
    assert len(entries) == 1 and entries[0].model is first
    assert server.components.models.loads == loads


def test_a_lora_job_uses_the_base_weights_and_leaves_them_unchanged(server, client, txt2img, models_dir):
    from safetensors.torch import save_file

    client.load_model("checkpoints", "tiny-sd")
    base = next(e.model for e in server.components.models.loaded() if e.key.startswith("checkpoints/tiny-sd@"))
    params = dict(base.unet.named_parameters())
    before = {k: (v.data_ptr(), v.clone()) for k, v in params.items()}
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = base.unet.get_submodule(target)
    gen = torch.Generator().manual_seed(0)
    lora = {
        f"unet.{target}.lora.down.weight": torch.randn(4, layer.in_features, generator=gen),
        f"unet.{target}.lora.up.weight": torch.randn(layer.out_features, 4, generator=gen),
    }
    save_file(lora, str(models_dir / "loras" / "setup-test.safetensors"))
    b = GraphBuilder(txt2img)
    model = b.find("CheckpointLoaderSimple").out(0)
    lora = b.add("LoraLoaderModelOnly", model=model, lora_name="setup-test.safetensors", strength_model=1.0)
    b.find("KSampler").inputs["model"] = lora.out(0)
    graph = b.build()
    with_lora = client.run(graph)
    plain = client.run(txt2img)
    assert not np.array_equal(np.asarray(with_lora.images[0]), np.asarray(plain.images[0]))
    after = next(e.model for e in server.components.models.loaded() if e.key.startswith("checkpoints/tiny-sd@"))
    assert after is base
    for name, param in base.unet.named_parameters():
        ptr, value = before[name]
        assert param.data_ptr() == ptr and torch.equal(param, value), name


# the two-tier model manager, with fake models that record their moves


class Fake:
    def __init__(self, name: str, size: int, moves: list) -> None:
        self.name, self.size, self.moves, self.device = name, size, moves, "cuda"

    def nbytes(self) -> int:
        return self.size


def recording_mover(model: Fake, device) -> bool:
    model.moves.append((model.name, str(device)))
    model.device = str(device)
    return True


def fakes():
    loads, moves = [], []

    def handle(key: str, size: int = 40) -> ModelHandle:
        return ModelHandle(key, lambda: loads.append(key) or Fake(key, size, moves))

    return handle, loads, moves


def test_evicted_models_move_to_the_cpu_and_come_back_without_a_reload():
    handle, loads, moves = fakes()
    manager = ModelManager(100, device="cuda", offload_budget_bytes=100, mover=recording_mover)
    a = manager.get(handle("a"))
    manager.get(handle("b"))
    manager.get(handle("c"))  # the device holds two: a (least recent) goes to the CPU
    assert moves == [("a", "cpu")] and a.device == "cpu"
    assert [(e.key, e.device) for e in manager.loaded()] == [("a", "cpu"), ("b", "cuda"), ("c", "cuda")]
    assert manager.get(handle("a")) is a  # back on the device; b made room on the CPU
    assert loads == ["a", "b", "c"] and manager.restores == 1
    assert moves == [("a", "cpu"), ("b", "cpu"), ("a", "cuda")] and a.device == "cuda"
    assert manager.bytes_used == 80 and manager.offloaded_bytes == 40


def test_the_offloaded_tier_drops_its_least_recently_used_past_its_budget():
    handle, loads, moves = fakes()
    manager = ModelManager(40, device="cuda", offload_budget_bytes=80, mover=recording_mover)
    for key in "abcd":
        manager.get(handle(key))
    assert [(e.key, e.device) for e in manager.loaded()] == [("b", "cpu"), ("c", "cpu"), ("d", "cuda")]
    manager.get(handle("a"))  # dropped: read from disk again
    assert loads == ["a", "b", "c", "d", "a"]
    big = ModelManager(100, device="cuda", offload_budget_bytes=30, mover=recording_mover)
    big.get(handle("x", 60))
    big.get(handle("y", 60))  # x is larger than the offload budget: dropped, never moved
    assert [e.key for e in big.loaded()] == ["y"] and ("x", "cpu") not in moves


def test_on_the_cpu_or_without_an_offload_budget_eviction_drops():
    for device, offload in (("cpu", 100), (None, 100), ("cuda", 0)):
        handle, loads, moves = fakes()
        manager = ModelManager(40, device=device, offload_budget_bytes=offload, mover=recording_mover)
        manager.get(handle("a"))
        manager.get(handle("b"))
        assert [e.key for e in manager.loaded()] == ["b"] and moves == []


def test_models_the_running_job_holds_are_not_moved_until_it_ends():
    handle, loads, moves = fakes()
    manager = ModelManager(50, device="cuda", offload_budget_bytes=100, mover=recording_mover)
    with manager.job_scope():
        manager.get(handle("a"))
        manager.get(handle("b"))  # over budget, but a is in use by this job
        assert moves == [] and manager.bytes_used == 80
    assert moves == [("a", "cpu")] and manager.bytes_used == 40


def test_jobs_side_by_side_each_keep_their_own_models_and_free_them_when_they_end():
    import threading

    handle, loads, moves = fakes()
    manager = ModelManager(50, device="cuda", offload_budget_bytes=100, mover=recording_mover)
    a_holds, b_ends, a_ends = threading.Event(), threading.Event(), threading.Event()

    def job_a():
        with manager.job_scope():
            manager.get(handle("a"))
            a_holds.set()
            b_ends.wait(10)
            manager.get(handle("c"))  # over budget: b (ended) goes, a (held) stays
            assert ("a", "cpu") not in moves and ("b", "cpu") in moves
        a_ends.set()

    thread = threading.Thread(target=job_a)
    thread.start()
    a_holds.wait(10)
    with manager.job_scope():  # job b, on this thread, while a runs
        manager.get(handle("b"))  # over budget, but a is held by job a
        assert moves == []
    b_ends.set()
    thread.join(10)
    assert a_ends.is_set()
    assert ("a", "cpu") in moves and manager.bytes_used <= 50  # both ended: back under budget


def test_unmovable_models_are_dropped_and_errors_are_clear():
    handle, loads, moves = fakes()
    manager = ModelManager(40, device="cuda", offload_budget_bytes=100, mover=lambda model, device: False)
    manager.get(handle("a"))
    manager.get(handle("b"))
    assert [e.key for e in manager.loaded()] == ["b"]
    with pytest.raises(ModelTooLarge, match=r"model huge needs .* GiB, more than the model memory budget"):
        manager.get(handle("huge", 1000))


def test_unload_and_free_memory_cover_both_tiers():
    handle, loads, moves = fakes()
    manager = ModelManager(40, device="cuda", offload_budget_bytes=100, mover=recording_mover)
    for key in "abc":
        manager.get(handle(key))
    assert manager.unload("a") and not manager.unload("a")
    assert manager.free_memory() == 40  # b, offloaded
    assert [e.key for e in manager.loaded()] == ["c"]
    assert manager.free_memory(unload_device_models=True) == 40 and manager.loaded() == []


def test_the_default_mover_moves_modules_and_stable_diffusion_in_place(tiny, models_dir):
    module = torch.nn.Linear(2, 2)
    assert move_model(module, "cpu") and not move_model(object(), "cpu")
    model = load_checkpoint(tiny, models_dir, CPU, torch.float32, PLAIN)
    unet = model.unet
    assert move_model(model, "cpu") and model.unet is unet
