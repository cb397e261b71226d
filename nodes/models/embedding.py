"""Textual-inversion embedding files: the vectors one holds, whichever tool saved it.

An embedding is k learned vectors in the text encoder's token-embedding space; a prompt's
`embedding:NAME` puts them in k token positions. The layouts users download (ComfyUI reads the
same ones):

- A1111 and ComfyUI .safetensors: the vectors under "emb_params".
- SDXL-style .safetensors: "clip_l" and "clip_g", one per text encoder; an SD1.x encoder takes
  "clip_l".
- A1111 .pt: {"string_to_param": {"*": vectors}, "name": ..., "step": ...}.
- diffusers .bin (textual_inversion training script): {"<token>": vectors}, one tensor.

Pickled files (.pt, .bin) reach this module as the .safetensors copies the server makes under
its pickle rules (plinth.server.storage.model_folders.convert_pickle keeps A1111's nested
dict as "string_to_param.*"), so only .safetensors is read here and no pickle ever runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from plinth.nodes.core.context import NodeInputError

A1111_PREFIX = "string_to_param."
EMB_PARAMS = "emb_params"


def read_embedding(path: Path, name: str, width: int, key: str = "clip_l") -> torch.Tensor:
    """The [k, width] float32 vectors of the embedding file at `path`. `name` is the file as the
    user knows it (e.g. "embeddings/bad-hands.pt"), for messages; `key` is the text encoder's
    entry in a file made for several ("clip_l" for SD1.x). A file whose vectors are not `width`
    wide (made for another model family) is a NodeInputError naming the file and both widths."""
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # not a safetensors file at all, or a damaged one
        raise NodeInputError(f"embedding file {name} could not be read: {exc}") from None
    vectors = _pick(tensors, name, key)
    if vectors.ndim == 1:
        vectors = vectors[None]
    vectors = vectors.reshape(-1, vectors.shape[-1]).float()
    if vectors.shape[0] == 0:
        raise NodeInputError(f"embedding file {name} holds no vectors")
    if vectors.shape[-1] != width:
        raise NodeInputError(
            f"embedding file {name} holds vectors of width {vectors.shape[-1]}, but this text encoder's "
            f"tokens are {width} wide: the embedding was made for another model family (SD1.x: 768, "
            f"SD2.x: 1024, SDXL's clip_g: 1280)"
        )
    return vectors


def _pick(tensors: dict[str, torch.Tensor], name: str, key: str) -> torch.Tensor:
    """The one tensor of the vectors: A1111's string_to_param, the encoder's key, emb_params,
    or a file's only tensor. More than one otherwise is an error, not a guess."""
    a1111 = sorted(k for k in tensors if k.startswith(A1111_PREFIX))
    if a1111:
        return tensors[a1111[0]]
    for wanted in (key, EMB_PARAMS):
        if wanted in tensors:
            return tensors[wanted]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    shown = ", ".join(sorted(tensors)[:8]) or "none"
    raise NodeInputError(
        f"embedding file {name} is not a textual-inversion layout Plinth reads: it holds the tensors "
        f"{shown}; expected {EMB_PARAMS!r}, {key!r}, A1111's string_to_param or a single tensor"
    )
