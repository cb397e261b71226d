"""Textual-inversion embeddings through a real server: a job's CLIPTextEncode reads
models/embeddings, an embedding file replaced under its name is read anew (not served from
the output cache), an unknown one is refused at submit, and ListModels shows the folder.

The conditioning is compared with plinth.nodes.prompt.encode run here on the same tiny-sd with
the file's vectors (tests/unit/test_textual_inversion.py shows what encode does with them)."""

from __future__ import annotations

import os

import pytest
import torch
from support import files
from support.graph_builder import linked, node_of
from support.live_server import node_output

from plinth.clients import PlinthError
from plinth.nodes.models.checkpoint import load_checkpoint
from plinth.nodes.models.tiny_sd import ensure_tiny_sd
from plinth.nodes.prompt import encode

CPU = torch.device("cpu")
NAME = "jobs-style.safetensors"


@pytest.fixture(scope="module")
def tiny(models_dir):
    return load_checkpoint(ensure_tiny_sd(models_dir), models_dir, CPU, torch.float32)


def expected(tiny, text: str, vectors: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return encode(tiny.tokenizer, tiny.text_encoder, text, -1, CPU, {"jobs-style": vectors}.get)


def test_a_job_reads_the_embedding_and_a_replaced_file_anew(server, client, txt2img, models_dir, tiny):
    folder = models_dir / "embeddings"
    first = torch.randn(2, 64, generator=torch.Generator().manual_seed(11))
    path = files.write({"emb_params": first}, folder, NAME)
    assert NAME in {m.name for m in client.list_models("embeddings")}

    prompt = linked(txt2img, node_of(txt2img, "KSampler"), "positive")
    prompt.inputs["text"] = text = "a sneaker, (embedding:jobs-style:1.2), studio light"
    result = client.run(txt2img)
    ((entry,),) = node_output(server, result, prompt.id)
    assert torch.allclose(entry.embeds, expected(tiny, text, first), atol=1e-6)

    stat = path.stat()
    files.write({"emb_params": -first}, folder, NAME)  # same name and size, other vectors
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = client.run(txt2img)
    assert again.nodes[prompt.id].status == "executed"
    ((entry,),) = node_output(server, again, prompt.id)
    assert torch.allclose(entry.embeds, expected(tiny, text, -first), atol=1e-6)
    assert not torch.allclose(entry.embeds, expected(tiny, text, first), atol=1e-3)


def test_an_unknown_embedding_is_refused_at_submit_naming_node_and_name(client, txt2img):
    negative = linked(txt2img, node_of(txt2img, "KSampler"), "negative")
    negative.inputs["text"] = "blurry, (embedding:bad-hands-5:1.3)"
    with pytest.raises(PlinthError) as info:
        client.submit(txt2img)
    assert info.value.code == "INVALID_ARGUMENT"
    (error,) = info.value.errors
    assert (error.node_id, error.input, error.code) == (negative.id, "text", "unknown_embedding")
    assert "unknown embedding 'bad-hands-5'" in error.message
