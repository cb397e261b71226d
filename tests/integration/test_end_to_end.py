"""The demo graph through a real server: images, caching across jobs, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support.graph_builder import linked, node_of
from support.live_server import executed
from support.paths import GRAPHS


def pixels_hash(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def test_demo_graph_gives_pngs_of_requested_size_and_batch(client, txt2img):
    latent = node_of(txt2img, "EmptyLatentImage")
    sampler = node_of(txt2img, "KSampler")
    latent.inputs.update(width=96, height=64, batch_size=3)
    sampler.inputs["seed"] = 1001
    result = client.run(txt2img)
    assert result.status == "completed"
    assert len(result.images) == 3
    assert {im.size for im in result.images} == {(96, 64)}
    assert all(ref.width == 96 and ref.height == 64 and ref.kind == "output" for ref in result.image_refs)
    first = Image.open(io.BytesIO(result.image_refs[0].png))
    assert first.format == "PNG"
    assert json.loads(first.text["prompt"]) == txt2img  # the graph, as ComfyUI embeds it
    assert len({pixels_hash(im) for im in result.images}) == 3  # batch entries differ


def test_identical_rerun_executes_no_node(client, txt2img):
    sampler = node_of(txt2img, "KSampler")
    sampler.inputs["seed"] = 2002
    first = client.run(txt2img)
    again = client.run(txt2img)
    assert executed(again) == set()
    assert {n.status for n in again.nodes.values()} == {"cached"}
    assert set(again.nodes) == set(first.nodes)
    assert [pixels_hash(i) for i in again.images] == [pixels_hash(i) for i in first.images]


def test_seed_change_reruns_exactly_sampler_decode_and_save(client, txt2img):
    sampler = node_of(txt2img, "KSampler")
    sampler.inputs["seed"] = 3003
    client.run(txt2img)
    sampler.inputs["seed"] = 3004
    result = client.run(txt2img)
    assert executed(result) == {"KSampler", "VAEDecode", "SaveImage"}


def test_prompt_change_also_reruns_its_text_encoder(client, txt2img):
    sampler = node_of(txt2img, "KSampler")
    decode = node_of(txt2img, "VAEDecode")
    save = node_of(txt2img, "SaveImage")
    positive = linked(txt2img, sampler, "positive")
    sampler.inputs["seed"] = 4004
    client.run(txt2img)
    positive.inputs["text"] = "a red handbag on a wooden table, golden hour"
    result = client.run(txt2img)
    ran = {nid for nid, n in result.nodes.items() if n.status == "executed"}
    assert ran == {positive.id, sampler.id, decode.id, save.id}  # the changed CLIPTextEncode, not the negative one


def test_cache_keys_ignore_node_ids(client, txt2img):
    sampler = node_of(txt2img, "KSampler")
    sampler.inputs["seed"] = 5005
    client.run(txt2img)
    decode = node_of(txt2img, "VAEDecode")
    text = json.dumps(txt2img)
    renumbered = json.loads(text.replace(f'"{sampler.id}"', '"30"').replace(f'"{decode.id}"', '"80"'))
    result = client.run(renumbered)
    # only SaveImage runs again: it embeds the graph it was given in the PNG
    assert executed(result) == {"SaveImage"}
    assert json.loads(result.images[0].text["prompt"]) == renumbered


@pytest.mark.slow
def test_same_graph_and_seed_give_identical_pixels_from_a_fresh_process(client, txt2img, models_dir, tmp_path):
    sampler = node_of(txt2img, "KSampler")
    sampler.inputs["seed"] = 6006
    here = client.run(txt2img)
    graph_file = tmp_path / "g.json"
    graph_file.write_text(json.dumps(txt2img))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "plinth.server.cli",
            "run",
            str(graph_file),
            "--json",
            "-o",
            str(out),
            "--models",
            str(models_dir),
            "--data",
            str(tmp_path / "data"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["status"] == "completed"
    there = [Image.open(p) for p in report["outputs"]]
    assert [pixels_hash(i) for i in there] == [pixels_hash(i) for i in here.images]


def test_saved_demo_graph_file_runs_unchanged(client):
    result = client.run(GRAPHS / "txt2img.json")
    assert result.status == "completed"
    assert len(result.images) == 2
