"""LoadImage/SaveImage and the `plinth` command line against a real server."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support.graph_builder import node_of
from support.live_server import output_cache
from support.paths import GRAPHS

LOAD_AND_SAVE = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "product.png"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copy"}},
}


def rgba_product() -> bytes:
    """A 40x24 image: an opaque red box on a transparent background."""
    pixels = np.zeros((24, 40, 4), dtype=np.uint8)
    pixels[6:18, 10:30] = (200, 30, 30, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_image_round_trips_pixels_and_reads_mask_from_alpha(server, client):
    result = client.run(LOAD_AND_SAVE, inputs={"product.png": rgba_product()})
    out = np.asarray(result.images[0].convert("RGB"))
    assert out.shape == (24, 40, 3)
    assert (out[6:18, 10:30] == (200, 30, 30)).all()
    image, mask = output_cache(server).get(
        next(n.key for n in server.components.jobs.get(result.job_id).plan.nodes if n.id == "1")
    )
    assert tuple(image.shape) == (1, 24, 40, 3) and tuple(mask.shape) == (1, 24, 40)
    assert mask[0, 0, 0] == 1.0 and mask[0, 10, 20] == 0.0  # 1 where transparent, as in ComfyUI


def test_changed_upload_under_the_same_name_is_not_served_from_cache(client):
    client.run(LOAD_AND_SAVE, inputs={"product.png": rgba_product()})
    other = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(other, format="PNG")
    result = client.run(LOAD_AND_SAVE, inputs={"product.png": other.getvalue()})
    assert result.nodes["1"].status == "executed"
    assert result.images[0].size == (8, 8)


def plinth(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "plinth.server.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_cli_run_with_set_input_and_json(server, tmp_path):
    photo = tmp_path / "p.png"
    photo.write_bytes(rgba_product())
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(LOAD_AND_SAVE))
    proc = plinth(
        "run",
        str(graph),
        "--server",
        server.address,
        "--input",
        f"shot={photo}",
        "--set",
        "1.image=shot",
        "--set",
        "2.filename_prefix=cli",
        "-o",
        str(tmp_path / "o"),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"] == "completed" and report["job_id"]
    assert len(report["outputs"]) == 1 and "cli_" in report["outputs"][0]
    assert Image.open(report["outputs"][0]).size == (40, 24)
    assert {v["class_type"] for v in report["nodes"].values()} == {"LoadImage", "SaveImage"}
    assert {v["status"] for v in report["nodes"].values()} <= {"executed", "cached"}


def test_cli_run_refused_graph_exits_non_zero_and_prints_errors(server):
    proc = plinth(
        "run",
        str(GRAPHS / "txt2img.json"),
        "--server",
        server.address,
        "--set",
        "3.steps=0",
        "--set",
        "3.sampler_name=nope",
        "--json",
    )
    assert proc.returncode != 0
    assert "INVALID_ARGUMENT" in proc.stderr and "node 3 (KSampler) input 'steps'" in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {e["input"] for e in report["errors"]} == {"steps", "sampler_name"}


def test_cli_set_reads_json_then_text(server, tmp_path):
    proc = plinth(
        "run",
        str(GRAPHS / "txt2img.json"),
        "--server",
        server.address,
        "--set",
        "6.text=[1, 2",
        "--set",
        "3.seed=123",
        "--set",
        "5.batch_size=1",
        "-o",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr  # "[1, 2" is not JSON, so it is taken as text
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["outputs"]) == 1


def test_cli_set_on_a_missing_node_is_an_error(tmp_path):
    proc = plinth("run", str(GRAPHS / "txt2img.json"), "--server", "127.0.0.1:1", "--set", "99.seed=1")
    assert proc.returncode == 2 and "no node '99'" in proc.stderr


def test_cli_nodes_json_is_keyed_by_class_type(server):
    proc = plinth("nodes", "--server", server.address, "--json")
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout)
    assert nodes["KSampler"]["class_type"] == "KSampler"
    steps = next(i for i in nodes["KSampler"]["inputs"] if i["name"] == "steps")
    assert steps["default"] == 20 and steps["min"] == 1


def test_client_commands_do_not_import_torch(server):
    code = (
        "import sys; from plinth.server.cli.main import main; from plinth.clients import Client; "
        f"main(['nodes', '--server', '{server.address}']); "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'heavy import'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_cli_models_init_makes_the_embedded_models_and_list_shows_them(tmp_path):
    models = tmp_path / "models"
    proc = plinth("models", "init", "--models", str(models), "--data", str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr
    for name in ("tiny-sd", "tiny-sdxl", "tiny-sdxl-refiner"):
        assert (models / "checkpoints" / name / "unet" / "config.json").exists()
    assert (models / "checkpoints" / "tiny-flux" / "transformer" / "config.json").exists()
    assert (models / "checkpoints" / "tiny-sdxl" / "text_encoder_2" / "config.json").exists()
    proc = plinth("models", "list", "--models", str(models), "--data", str(tmp_path / "data"))
    listed = proc.stdout.split()
    assert proc.returncode == 0
    assert {
        "checkpoints/tiny-sd",
        "checkpoints/tiny-sdxl",
        "checkpoints/tiny-sdxl-refiner",
        "checkpoints/tiny-flux",
    } <= set(listed)


@pytest.mark.slow
def test_plinth_demo_writes_pngs_and_says_where(tmp_path):
    import os

    env = {**os.environ, "PLINTH_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "plinth.server.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (64, 64) for p in pngs)
    assert str(tmp_path / "out") in proc.stderr


def test_cli_sends_the_token_and_a_refusal_names_the_status(models_dir, tmp_path):
    from plinth.server.app import PlinthServer
    from plinth.server.config import Auth, Config

    config = Config(
        models_dir=models_dir, data_dir=tmp_path / "data", device="cpu", port=0, auth=Auth(tokens=("s3cret",))
    )
    with PlinthServer(config) as secured:
        refused = plinth("nodes", "--server", secured.address)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        assert plinth("nodes", "--server", secured.address, "--token", "s3cret").returncode == 0


def test_serve_refuses_to_bind_off_loopback_without_tokens(tmp_path):
    proc = plinth("serve", "--host", "0.0.0.0", "--port", "0", "--data", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "tokens are required" in proc.stderr


@pytest.mark.slow
def test_serve_exposes_metrics_and_stops_gracefully_on_sigterm(models_dir, tmp_path, txt2img):
    import signal
    import socket
    import urllib.request

    from plinth.clients import Client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "plinth.server.cli",
            "serve",
            "--port",
            "0",
            "--models",
            str(models_dir),
            "--data",
            str(tmp_path / "data"),
            "--device",
            "cpu",
            "--metrics-port",
            str(metrics_port),
            "--log-json",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = None
        for line in proc.stderr:
            if line.startswith("plinth serving on "):
                address = line.split()[-1]
                break
        assert address
        with Client(address, timeout=120) as client:
            client.run(txt2img)
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'plinth_jobs_total{status="completed"} 1.0' in page
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log_lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert any(rec.get("job_id") for rec in log_lines)  # the job's log lines carry its id
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_jobs_list_get_and_cancel(server, client, txt2img):
    node_of(txt2img, "KSampler").inputs["seed"] = 8181
    done = client.run(txt2img).job_id
    listed = plinth("jobs", "list", "--server", server.address, "--status", "completed", "--json")
    assert listed.returncode == 0, listed.stderr
    assert done in {j["job_id"] for j in json.loads(listed.stdout)}
    got = plinth("jobs", "get", done, "--server", server.address)
    assert got.returncode == 0 and done in got.stdout and "completed" in got.stdout
    node_of(txt2img, "KSampler").inputs.update(seed=8182, steps=400)
    running = client.submit(txt2img)
    cancelled = plinth("jobs", "cancel", running, "--server", server.address, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert [e.WhichOneof("kind") for e in client.watch(running)][-1] == "cancelled"
    missing = plinth("jobs", "get", "nope", "--server", server.address)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
