"""Textual-inversion files in models/embeddings: each layout users download loads, pickled ones
only where allow_pickle says so, a wrong width fails naming the file, and validation refuses an
unknown embedding at submit (naming node and name) and keys the cache on the files' fingerprints.

The files are made here with random vectors in each layout; the server's storage
(ModelFolders) and the node side (plinth.nodes.textual_inversion) are used as a job uses them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from support import files
from support.graph_builder import linked, node_of

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.core.registry import NODES
from plinth.nodes.textual_inversion import embedding_lookup, resolve
from plinth.server.engine.graph import GraphValidationError, parse_graph
from plinth.server.engine.validate import validate
from plinth.server.storage.model_folders import ModelFolders, PickleRefused

WIDTH = 64  # tiny-sd's text encoder
VECTORS = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(7))


def write_layouts(folder: Path) -> dict[str, torch.Tensor]:
    """One file per layout, and the vectors each must give."""
    folder.mkdir(parents=True, exist_ok=True)
    files.write({"emb_params": VECTORS}, folder, "comfy.safetensors")
    files.write({"clip_g": torch.randn(2, 1280), "clip_l": VECTORS}, folder, "sdxl.safetensors")
    files.write({"anything": VECTORS[0]}, folder, "single.safetensors")
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.nn.Parameter(VECTORS.clone())},
        "name": "a1111",
        "step": 500,
        "sd_checkpoint": "abc123",
        "sd_checkpoint_name": "v1-5",
    }
    torch.save(a1111, folder / "a1111.pt")
    torch.save({"<cat-toy>": VECTORS.clone()}, folder / "diffusers.bin")
    files.write({"emb_params": torch.randn(2, 32)}, folder, "narrow.safetensors")
    files.write({"a": VECTORS, "b": -VECTORS}, folder, "puzzle.safetensors")
    return {"comfy": VECTORS, "sdxl": VECTORS, "single": VECTORS[:1], "a1111": VECTORS, "diffusers": VECTORS}


class Ctx:
    """The part of NodeContext embedding_lookup uses, on a server's model folders."""

    def __init__(self, folders: ModelFolders) -> None:
        self.models_dir = folders.models_dir
        self.model_path = folders.model_path


class Env:
    """The ValidationEnv a job gives validation, on the model folders alone."""

    def __init__(self, folders: ModelFolders) -> None:
        self.folders = folders

    def choices(self, source: str) -> list[str]:
        return self.folders.models(source)

    def fingerprint(self, source: str, name: str) -> str:
        return self.folders.model_fingerprint(source, name)


@pytest.fixture
def models(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    return tmp_path, write_layouts(tmp_path / "models" / "embeddings")


def folders(tmp_path: Path, allow_pickle: bool) -> ModelFolders:
    return ModelFolders(tmp_path / "models", tmp_path / "data", allow_pickle=allow_pickle)


def test_every_layout_loads_by_name_with_or_without_its_extension(models):
    root, expected = models
    lookup = embedding_lookup(Ctx(folders(root, allow_pickle=True)), WIDTH)
    for name, vectors in expected.items():
        assert torch.equal(lookup(name), vectors), name
    assert torch.equal(lookup("a1111.pt"), VECTORS) and torch.equal(lookup("comfy.safetensors"), VECTORS)
    assert lookup("absent") is None and lookup("../models/embeddings/comfy") is None


def test_pickled_embeddings_follow_allow_pickle(models):
    root, _ = models
    guarded = folders(root, allow_pickle=False)
    assert "a1111.pt" not in guarded.models("embeddings") and "diffusers.bin" not in guarded.models("embeddings")
    assert resolve("embedding:a1111", guarded.models("embeddings")) is None
    for name in ("a1111", "diffusers"):
        with pytest.raises(PickleRefused, match="allow_pickle"):
            embedding_lookup(Ctx(guarded), WIDTH)(name)
    assert not (root / "data" / "converted").exists()

    permissive = folders(root, allow_pickle=True)
    assert {"a1111.pt", "diffusers.bin"} <= set(permissive.models("embeddings"))
    assert resolve("embedding:a1111", permissive.models("embeddings")) == "a1111.pt"
    assert permissive.model_path("embeddings", "a1111.pt").suffix == ".safetensors"  # read as a converted copy


def test_a_wrong_width_or_an_unknown_layout_fails_naming_the_file(models):
    root, _ = models
    lookup = embedding_lookup(Ctx(folders(root, allow_pickle=False)), WIDTH)
    with pytest.raises(NodeInputError, match=r"embeddings/narrow\.safetensors holds vectors of width 32.* 64 wide"):
        lookup("narrow")
    with pytest.raises(NodeInputError, match=r"embeddings/puzzle\.safetensors .*tensors a, b"):
        lookup("puzzle")
    sdxl_only = root / "models" / "embeddings" / "sdxl-g.safetensors"
    files.write({"clip_g": torch.randn(2, 1280)}, sdxl_only.parent, sdxl_only.name)
    with pytest.raises(NodeInputError, match=r"sdxl-g\.safetensors holds vectors of width 1280"):
        lookup("sdxl-g")


def prompts(graph: dict) -> tuple:
    sampler = node_of(graph, "KSampler")
    return linked(graph, sampler, "positive"), linked(graph, sampler, "negative")


def test_an_unknown_embedding_is_a_validation_error_naming_node_and_name(models, txt2img):
    root, _ = models
    positive, negative = prompts(txt2img)
    positive.inputs["text"] = "a shoe, (embedding:comfy:1.2), embedding:sdxl.safetensors (embedding:single)"
    negative.inputs["text"] = "blurry, embedding:bad-hands-5, embedding:a1111, embedding:comfy"
    with pytest.raises(GraphValidationError) as info:
        validate(parse_graph(txt2img), NODES, Env(folders(root, allow_pickle=False)))
    (error,) = info.value.errors
    assert (error.node_id, error.input, error.code) == (negative.id, "text", "unknown_embedding")
    assert "'bad-hands-5'" in error.message and "'a1111'" in error.message and "allow_pickle" in error.message
    assert "'comfy'" not in error.message.split("; embeddings:")[0]

    negative.inputs["text"] = "blurry, embedding:a1111, embedding:comfy"
    with pytest.raises(GraphValidationError, match="unknown embedding 'a1111'"):
        validate(parse_graph(txt2img), NODES, Env(folders(root, allow_pickle=False)))
    plan = validate(parse_graph(txt2img), NODES, Env(folders(root, allow_pickle=True)))
    assert negative.id in {n.id for n in plan.nodes}


def test_the_embedding_files_are_part_of_the_cache_key(models, txt2img):
    root, _ = models
    env = Env(folders(root, allow_pickle=False))
    positive, negative = prompts(txt2img)
    positive.inputs["text"] = "a shoe, embedding:comfy"

    def keys() -> dict[str, str]:
        return {n.id: n.key for n in validate(parse_graph(txt2img), NODES, env).nodes}

    before = keys()
    path = root / "models" / "embeddings" / "comfy.safetensors"
    stat = path.stat()
    files.write({"emb_params": -VECTORS}, path.parent, path.name)  # same size, new vectors
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = keys()
    assert after[positive.id] != before[positive.id]
    assert after[negative.id] == before[negative.id]
    sampler = node_of(txt2img, "KSampler").id
    assert after[sampler] != before[sampler]  # and so everything downstream
