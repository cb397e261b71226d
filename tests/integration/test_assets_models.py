"""AssetService (chunked upload and download past gRPC's 4 MiB messages) and ModelService
(list, load, unload; names kept inside the models directory; pickles only with allow_pickle),
through real servers, the Python clients and the `plinth` command."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import struct
import subprocess
import sys
import zlib

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from support import files, lora_files
from support.graph_builder import GraphBuilder, linked, node_of
from support.sd_original_layout import build_random_sd, small_sd15_configs, to_original_state_dict

from plinth.clients import AsyncClient, Client, PlinthError
from plinth.clients.v1 import asset_service_pb2 as asp
from plinth.server.app import PlinthServer
from plinth.server.cli.main import main as cli_main
from plinth.server.config import Config, Limits
from plinth.server.storage.model_folders import MODEL_FOLDERS

MiB = 1 << 20
LOAD_AND_SAVE = {
    "1": {"class_type": "LoadImage", "inputs": {"image": ""}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "assets"}},
}


def load_and_save(image: str) -> dict:
    graph = json.loads(json.dumps(LOAD_AND_SAVE))
    graph["1"]["inputs"]["image"] = image
    return graph


def encoded(pixels: np.ndarray, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind, **options)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of `width` x `height` black pixels: kilobytes on disk, width * height
    pixels once decoded (written row by row, so making it costs no such memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def rpc_code(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code().name


@pytest.fixture(scope="module")
def noise() -> tuple[np.ndarray, bytes]:
    """A 2048x2048 noisy RGB PNG: about 12 MB, three times gRPC's default message size."""
    pixels = np.random.default_rng(2048).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    data = encoded(pixels, compress_level=1)
    assert len(data) > 3 * 4 * MiB
    return pixels, data


@pytest.fixture(scope="module")
def small_server(models_dir, tmp_path_factory):
    """gRPC's default 4 MiB messages, 16 MiB uploads and a 1 MiB model budget."""
    config = Config(
        models_dir=models_dir,
        data_dir=tmp_path_factory.mktemp("assets-data"),
        device="cpu",
        port=0,
        model_budget_bytes=MiB,
        limits=Limits(max_message_bytes=4 * MiB, max_upload_bytes=16 * MiB),
    )
    with PlinthServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def small_client(small_server):
    with Client(small_server.address, timeout=120) as c:
        yield c


# assets


def test_a_12_mb_upload_in_chunks_reaches_load_image_exactly_and_the_output_downloads(
    small_server, small_client, noise
):
    pixels, data = noise
    with pytest.raises(PlinthError) as info:  # the same image inline does not fit one 4 MiB message
        small_client.submit(load_and_save("big.png"), inputs={"big.png": data})
    assert info.value.code == "RESOURCE_EXHAUSTED"

    asset = small_client.upload_asset(data, name="big.png")
    assert asset.id == hashlib.sha256(data).hexdigest()
    assert (asset.name, asset.size, asset.width, asset.height, asset.format, asset.kind) == (
        "big.png",
        len(data),
        2048,
        2048,
        "PNG",
        "input",
    )
    stored = small_server.components.assets.inputs_dir / f"{asset.id}.png"
    assert stored.read_bytes() == data
    assert not list(small_server.components.assets.inputs_dir.glob(".upload-*"))

    result = small_client.run(load_and_save(asset.id), omit_image_bytes=True)  # outputs too big to go inline
    assert result.status == "completed"
    (ref,) = result.image_refs
    chunks = list(small_client.download_chunks(ref.id))
    assert len(chunks) > 4 and all(len(c.data) <= MiB for c in chunks)
    assert chunks[0].asset.id == ref.id and chunks[0].asset.kind == "output" and chunks[0].asset.format == "PNG"
    assert (chunks[0].asset.width, chunks[0].asset.height) == (2048, 2048)
    assert not any(c.HasField("asset") for c in chunks[1:])
    png = b"".join(c.data for c in chunks)
    assert len(png) == chunks[0].asset.size > 4 * MiB
    assert hashlib.sha256(png).hexdigest() == ref.id
    with Image.open(io.BytesIO(png)) as out:
        assert np.array_equal(np.asarray(out.convert("RGB")), pixels), "LoadImage saw other pixels"

    assert small_client.download(asset.id) == data  # the upload itself, exact


def test_upload_refuses_as_soon_as_max_upload_bytes_is_passed(small_server, small_client):
    pulled = 0

    def endless():
        nonlocal pulled
        piece = bytes(64 << 10)
        yield asp.UploadChunk(name="endless.png", data=piece)
        while True:
            pulled += 1
            yield asp.UploadChunk(data=piece)

    with pytest.raises(grpc.RpcError) as info:
        small_client.assets.Upload(endless(), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_upload_bytes" in info.value.details() and str(16 * MiB) in info.value.details()
    assert pulled * (64 << 10) < 32 * MiB  # stopped near the 16 MiB limit (plus what gRPC buffers), not at the end
    with pytest.raises(PlinthError) as refused:
        small_client.upload(bytes(16 * MiB + 1))
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert not list(small_server.components.assets.inputs_dir.glob(".upload-*")), "partial upload left behind"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_gif_and_decompression_bombs_are_refused(server, client):
    gif = encoded(np.zeros((8, 8, 3), np.uint8), "GIF")
    with pytest.raises(PlinthError) as info:
        client.upload(gif, name="anim.gif")
    assert (
        info.value.code == "INVALID_ARGUMENT"
        and "GIF" in info.value.message
        and "PNG, JPEG and WebP" in info.value.message
    )
    with pytest.raises(PlinthError) as info:
        client.upload(b"not an image at all")
    assert info.value.code == "INVALID_ARGUMENT"
    for side in (10_000, 20_000):  # over our limit; the second also over Pillow's own ceiling
        bomb = bomb_png(side, side)
        assert len(bomb) < 100_000
        with pytest.raises(PlinthError) as info:
            client.upload(bomb, name="bomb.png")
        assert info.value.code == "RESOURCE_EXHAUSTED" and "decompression bomb" in info.value.message
        assert server.components.assets.asset_path(hashlib.sha256(bomb).hexdigest()) is None
    assert not list(server.components.assets.inputs_dir.glob(".upload-*"))


def test_jpeg_and_webp_assets_load_by_id_and_are_choices(server, client):
    pixels = np.random.default_rng(5).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    for kind, suffix in (("JPEG", ".jpg"), ("WEBP", ".webp")):
        data = encoded(pixels, kind, quality=90)
        asset_id = client.upload(data, name=f"photo{suffix}")
        assert client.upload(data) == asset_id  # content-addressed: the same bytes are one asset
        assert (server.components.assets.inputs_dir / f"{asset_id}{suffix}").read_bytes() == data
        load_image = next(n for n in client.list_nodes() if n.class_type == "LoadImage")
        assert asset_id in load_image.inputs[0].choices
        result = client.run(load_and_save(asset_id))
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(np.asarray(result.images[0].convert("RGB")), decoded)


def test_upload_stream_shape_and_download_errors(client):
    png = encoded(np.zeros((4, 4, 3), np.uint8))
    assert rpc_code(lambda: client.assets.Upload(iter([asp.UploadChunk(data=png)]), timeout=30)) == "INVALID_ARGUMENT"
    twice = iter([asp.UploadChunk(name="a.png", data=png[:10]), asp.UploadChunk(name="a.png", data=png[10:])])
    assert rpc_code(lambda: client.assets.Upload(twice, timeout=30)) == "INVALID_ARGUMENT"
    assert rpc_code(lambda: client.assets.Upload(iter([]), timeout=30)) == "INVALID_ARGUMENT"
    with pytest.raises(PlinthError) as info:
        client.upload(b"", name="empty.png")
    assert info.value.code == "INVALID_ARGUMENT" and "empty" in info.value.message
    with pytest.raises(PlinthError) as info:
        client.download("0" * 64)
    assert info.value.code == "NOT_FOUND"
    for bad in ("../images/x", "A" * 64, ""):
        with pytest.raises(PlinthError) as info:
            client.download(bad)
        assert info.value.code == "INVALID_ARGUMENT"


def test_async_client_uploads_downloads_and_lists_models(server):
    png = encoded(np.random.default_rng(9).integers(0, 256, (300, 200, 3), dtype=np.uint8))

    async def go():
        async with AsyncClient(server.address, timeout=60) as aio:
            asset = await aio.upload(png, name="async.png", chunk_bytes=4096)
            return asset, await aio.download(asset), await aio.list_models("checkpoints")

    asset_id, back, models = asyncio.run(go())
    assert asset_id == hashlib.sha256(png).hexdigest() and back == png
    assert "tiny-sd" in {m.name for m in models}


# models


def _loaded_keys(server) -> list[str]:
    return [e.key for e in server.components.models.loaded()]


def test_list_load_use_and_unload_tiny_sd(server, client, txt2img):
    listed = {(m.folder, m.name): m for m in client.list_models()}
    tiny = listed[("checkpoints", "tiny-sd")]
    assert tiny.size_bytes > 1_000_000
    assert {m.folder for m in client.list_models()} <= set(MODEL_FOLDERS)  # whatever other tests wrote

    client.unload_model("checkpoints", "tiny-sd")
    assert not any(k.startswith("checkpoints/tiny-sd@") for k in _loaded_keys(server))
    before = server.components.models.loads
    model = client.load_model("checkpoints", "tiny-sd")
    assert model.loaded and model.loaded_bytes > 1_000_000 and server.components.models.loads == before + 1
    assert next(m for m in client.list_models("checkpoints") if m.name == "tiny-sd").loaded
    assert client.load_model("checkpoints/tiny-sd").loaded and server.components.models.loads == before + 1

    sampler = node_of(txt2img, "KSampler")
    sampler.inputs["seed"] = 880_001  # a fresh seed, so the sampler runs on the model
    result = client.run(txt2img)
    assert result.nodes[sampler.id].status == "executed"
    assert server.components.models.loads == before + 1, "the graph loaded the model again"

    released = client.unload_model("checkpoints", "tiny-sd")
    assert not released.loaded and released.loaded_bytes == 0
    assert not any(k.startswith("checkpoints/tiny-sd@") for k in _loaded_keys(server))
    assert not next(m for m in client.list_models("checkpoints") if m.name == "tiny-sd").loaded
    sampler.inputs["seed"] = 880_002
    client.run(txt2img)
    assert server.components.models.loads == before + 2  # released for real: the next graph loads it anew


def test_a_lora_loads_through_its_loader_node_and_graphs_use_that_copy(server, client, txt2img, models_dir):
    name = "assets-models-lora.safetensors"
    files.write(lora_files.kohya(lora_files.random_lora(seed=31, rank=2, alpha=2.0)), models_dir / "loras", name)
    client.load_model("checkpoints", "tiny-sd")
    model = client.load_model("loras", name)
    assert model.loaded and model.size_bytes == (models_dir / "loras" / name).stat().st_size
    before = server.components.models.loads
    b = GraphBuilder(txt2img)
    checkpoint, sampler = b.find("CheckpointLoaderSimple"), b.find("KSampler")
    lora = b.add(
        "LoraLoader",
        model=checkpoint.out(0),
        clip=checkpoint.out(1),
        lora_name=name,
        strength_model=0.8,
        strength_clip=0.8,
    )
    sampler.inputs.update(model=lora.out(0), seed=880_003)
    for prompt in ("positive", "negative"):
        linked(sampler.graph, sampler, prompt).inputs["clip"] = lora.out(1)
    assert client.run(b.build()).status == "completed"
    assert server.components.models.loads == before
    assert not client.unload_model("loras", name).loaded


def test_names_stay_inside_the_models_dir(client):
    for name in ("../x.safetensors", "/etc/passwd", "a/../../x.safetensors", "..\\x.safetensors", "./tiny-sd", ""):
        for call in (client.load_model, client.unload_model):
            with pytest.raises(PlinthError) as info:
                call("checkpoints", name)
            assert info.value.code == "INVALID_ARGUMENT", name
            assert "not a path inside models/checkpoints" in info.value.message
    with pytest.raises(PlinthError) as info:
        client.load_model("checkpoints", "no-such-model.safetensors")
    assert info.value.code == "NOT_FOUND" and "no-such-model.safetensors" in info.value.message
    with pytest.raises(PlinthError) as info:
        client.list_models("../checkpoints")
    assert info.value.code == "INVALID_ARGUMENT" and "unknown model folder" in info.value.message


def test_a_model_over_the_budget_is_resource_exhausted_with_the_sizes(small_client):
    with pytest.raises(PlinthError) as info:
        small_client.load_model("checkpoints", "tiny-sd")
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "GiB" in info.value.message and f"model_budget_bytes = {MiB} bytes" in info.value.message


def test_pickle_conversion_keeps_every_tensor_exactly(tmp_path):
    from safetensors.torch import load_file

    from plinth.server.storage.model_folders import convert_pickle

    weight = torch.randn(6, 4)
    state = {
        "tied": weight,
        "tied_again": weight,
        "rows": weight[2:],
        "transposed": weight.t(),
        "steps": torch.arange(3),
    }
    torch.save({"state_dict": state, "global_step": 5}, tmp_path / "zip.ckpt")
    torch.save({"params_ema": state}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("zip.ckpt", "legacy.pth"):
        convert_pickle(tmp_path / name, tmp_path / f"{name}.safetensors")
        copy = load_file(tmp_path / f"{name}.safetensors")
        assert copy.keys() == state.keys() and all(torch.equal(copy[k], state[k]) for k in state), name


@pytest.fixture(scope="module")
def own_models(tmp_path_factory):
    """A models directory with pickled files, a symlink out and a .bin-only diffusers folder;
    `small` is one small SD1.5-layout state dict saved both as small.ckpt and small.safetensors."""
    root = tmp_path_factory.mktemp("own-models")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    state = to_original_state_dict(*build_random_sd(small_sd15_configs(), seed=17))
    checkpoints = root / "checkpoints"
    files.write(state, checkpoints, "small.safetensors")
    torch.save({"state_dict": state, "global_step": 3}, checkpoints / "small.ckpt")
    marker = elsewhere / "pwned"

    class Payload:  # what a hostile pickle does: call anything on load (here: create a file)
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload()}, checkpoints / "evil.ckpt")
    files.write({"w": torch.zeros(2)}, elsewhere, "secret.safetensors")
    (checkpoints / "outside.safetensors").symlink_to(elsewhere / "secret.safetensors")
    (checkpoints / "binonly" / "unet").mkdir(parents=True)
    (checkpoints / "binonly" / "model_index.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, checkpoints / "binonly" / "unet" / "diffusion_pytorch_model.bin")
    (root / "rembg").mkdir()
    torch.save({"w": torch.zeros(2)}, root / "rembg" / "cut.pth")
    return root, state, marker


@pytest.fixture(scope="module")
def guarded(own_models, tmp_path_factory):
    config = Config(models_dir=own_models[0], data_dir=tmp_path_factory.mktemp("guarded-data"), device="cpu", port=0)
    with PlinthServer(config) as running, Client(running.address, timeout=120) as c:
        yield running, c


@pytest.fixture(scope="module")
def permissive(own_models, tmp_path_factory):
    config = Config(
        models_dir=own_models[0],
        data_dir=tmp_path_factory.mktemp("pickle-data"),
        device="cpu",
        port=0,
        allow_pickle=True,
    )
    with PlinthServer(config) as running, Client(running.address, timeout=120) as c:
        yield running, c


def test_pickles_and_symlinks_out_are_refused_by_default(guarded, txt2img):
    _, client = guarded
    names = {m.name for m in client.list_models("checkpoints")}
    assert {"small.safetensors", "binonly", "tiny-sd"} <= names
    assert not names & {"small.ckpt", "evil.ckpt", "outside.safetensors"}
    for name in ("small.ckpt", "binonly"):
        with pytest.raises(PlinthError) as info:
            client.load_model("checkpoints", name)
        assert info.value.code == "FAILED_PRECONDITION" and "allow_pickle" in info.value.message, name
    assert "unet/diffusion_pytorch_model.bin" in info.value.message
    with pytest.raises(PlinthError) as info:
        client.load_model("checkpoints", "outside.safetensors")
    assert info.value.code == "INVALID_ARGUMENT" and "leads outside models/checkpoints" in info.value.message
    node_of(txt2img, "CheckpointLoaderSimple").inputs["ckpt_name"] = "outside.safetensors"
    with pytest.raises(PlinthError) as info:
        client.submit(txt2img)
    assert info.value.code == "INVALID_ARGUMENT" and info.value.errors[0].code == "value_not_in_list"


def test_allow_pickle_loads_checkpoints_weights_only_and_runs_no_code(permissive, own_models, txt2img):
    server, client = permissive
    root, state, marker = own_models
    names = {m.name for m in client.list_models("checkpoints")}
    assert {"small.ckpt", "evil.ckpt", "small.safetensors"} <= names and "outside.safetensors" not in names

    with pytest.raises(PlinthError) as info:
        client.load_model("checkpoints", "evil.ckpt")
    assert info.value.code == "FAILED_PRECONDITION" and "weights_only=True" in info.value.message
    assert not marker.exists(), "the pickle ran code"
    with pytest.raises(PlinthError) as info:
        client.load_model("rembg", "cut.pth")
    assert info.value.code == "FAILED_PRECONDITION" and ".onnx" in info.value.message

    model = client.load_model("checkpoints", "small.ckpt")
    assert model.loaded and model.size_bytes == (root / "checkpoints" / "small.ckpt").stat().st_size
    (converted,) = (server.components.assets.data_dir / "converted" / "checkpoints").glob("*.safetensors")
    from safetensors.torch import load_file

    copy = load_file(converted)
    assert copy.keys() == state.keys() and all(torch.equal(copy[k], state[k]) for k in state)

    before = server.components.models.loads
    images = {}
    for name in ("small.ckpt", "small.safetensors"):
        node_of(txt2img, "CheckpointLoaderSimple").inputs["ckpt_name"] = name
        node_of(txt2img, "KSampler").inputs["seed"] = 880_004
        images[name] = np.asarray(client.run(txt2img).images[0])
    assert server.components.models.loads == before + 1  # the .safetensors twin only; the .ckpt was loaded
    assert np.array_equal(images["small.ckpt"], images["small.safetensors"])


def test_both_services_are_in_health_and_reflection(server, client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    for name in ("plinth.v1.AssetService", "plinth.v1.ModelService"):
        assert name in services and client.health(name) == "SERVING"


def test_uploads_and_model_calls_need_the_token_when_the_server_wants_one(models_dir, tmp_path):
    from plinth.server.config import Auth

    config = Config(
        models_dir=models_dir, data_dir=tmp_path / "data", device="cpu", port=0, auth=Auth(tokens=("assets-token",))
    )
    png = encoded(np.zeros((8, 8, 3), np.uint8))
    with PlinthServer(config) as secured:
        with Client(secured.address, timeout=30, token="wrong") as stranger:
            for call in (
                lambda: stranger.upload(png),  # client streaming: refused before any chunk is read
                lambda: stranger.download("0" * 64),
                stranger.list_models,
                lambda: stranger.load_model("checkpoints", "tiny-sd"),
                lambda: stranger.unload_model("checkpoints", "tiny-sd"),
            ):
                with pytest.raises(PlinthError) as info:
                    call()
                assert info.value.code == "UNAUTHENTICATED"
        with Client(secured.address, timeout=30, token="assets-token") as member:
            asset_id = member.upload(png)
            assert member.download(asset_id) == png and member.list_models("checkpoints")
    assert not list((tmp_path / "data" / "inputs").glob(".upload-*"))


# the command line


def test_cli_upload_and_models_commands(server, client, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    photo.write_bytes(encoded(np.random.default_rng(3).integers(0, 256, (32, 24, 3), dtype=np.uint8)))
    assert cli_main(["upload", str(photo), "--server", server.address]) == 0
    asset_id = capsys.readouterr().out.strip()
    assert asset_id == hashlib.sha256(photo.read_bytes()).hexdigest()
    assert cli_main(["upload", str(photo), "--server", server.address, "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described == {
        "id": asset_id,
        "name": "photo.png",
        "size": photo.stat().st_size,
        "width": 24,
        "height": 32,
        "format": "PNG",
    }
    gif = tmp_path / "anim.gif"
    gif.write_bytes(encoded(np.zeros((4, 4, 3), np.uint8), "GIF"))
    assert cli_main(["upload", str(gif), "--server", server.address]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err

    assert cli_main(["models", "load", "checkpoints/tiny-sd", "--server", server.address]) == 0
    assert "checkpoints/tiny-sd" in capsys.readouterr().out
    assert cli_main(["models", "list", "--server", server.address, "--json"]) == 0
    rows = {(r["folder"], r["name"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows[("checkpoints", "tiny-sd")]["loaded"] and rows[("checkpoints", "tiny-sd")]["loaded_bytes"] > 0
    assert cli_main(["models", "list", "--server", server.address, "--folder", "checkpoints"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.split()[0] == "checkpoints/tiny-sd")
    assert "loaded (" in line
    assert cli_main(["models", "unload", "checkpoints/tiny-sd", "--server", server.address, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loaded"] is False

    assert cli_main(["models", "load", "checkpoints/../../etc/passwd", "--server", server.address]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert cli_main(["models", "load", "checkpoints/missing.safetensors", "--server", server.address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli_main(["models", "load", "checkpoints/tiny-sd"]) == 2  # no --server
    assert cli_main(["models", "load", "tiny-sd", "--server", server.address]) == 2  # no folder
    capsys.readouterr()

    local = ["--models", str(server.config.models_dir), "--data", str(tmp_path / "data")]
    assert cli_main(["models", "list", *local]) == 0  # the local listing still works, without a server
    assert "checkpoints/tiny-sd" in capsys.readouterr().out.split()
    assert cli_main(["models", "list", "--json", *local]) == 0
    assert ("checkpoints", "tiny-sd") in {(r["folder"], r["name"]) for r in json.loads(capsys.readouterr().out)}


def test_cli_upload_and_models_list_do_not_import_torch(server, tmp_path):
    photo = tmp_path / "p.png"
    photo.write_bytes(encoded(np.zeros((8, 8, 3), np.uint8)))
    code = (
        "import sys; from plinth.server.cli.main import main; "
        f"assert main(['upload', {str(photo)!r}, '--server', '{server.address}']) == 0; "
        f"assert main(['models', 'list', '--server', '{server.address}']) == 0; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'heavy import'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(photo.read_bytes()).hexdigest() in proc.stdout
