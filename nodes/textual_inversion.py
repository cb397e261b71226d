"""Which file an `embedding:NAME` in a prompt stands for, at validation and when the text
encoder runs.

At validation, a prompt input (PromptText) refuses an embedding that is not in
models/embeddings, so the job fails at submit naming the node and the embedding, and hands the
files it names to the cache key, so an embedding replaced under the same name is read anew.
At run time, embedding_lookup reads the vectors for plinth.nodes.prompt.encode.

NAME is a path inside models/embeddings, with or without its extension: a name ending in a
model-file suffix is taken as written, otherwise NAME.safetensors, NAME.pt and NAME.bin are
tried in that order (ComfyUI's order). Pickled files (.pt, .bin) are listed and read only where
the server allows pickles, as in every model folder. ComfyUI also searches every subfolder for
a bare NAME; here a file in a subfolder is named by its path (embedding:styles/NAME), as every
model name is, so one name never stands for two files.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from plinth.nodes.core.context import NodeContext, ValidationEnv
from plinth.nodes.core.schema import String
from plinth.nodes.models.embedding import read_embedding
from plinth.nodes.prompt import EMBEDDING, EmbeddingLookup, embedding_names, embedding_words

FOLDER = "embeddings"
# Tried after a NAME without extension, in this order.
TRIED_SUFFIXES = (".safetensors", ".pt", ".bin")
# A NAME ending in one of these names its file as written.
FILE_SUFFIXES = (*TRIED_SUFFIXES, ".ckpt", ".pth")
PICKLE_NOTE = "(.pt and .bin embeddings are listed only where the server's allow_pickle is set)"


def candidates(name: str) -> list[str]:
    """The file names `embedding:NAME` may mean, in the order they are tried."""
    if name.lower().endswith(FILE_SUFFIXES):
        return [name]
    return [name + suffix for suffix in TRIED_SUFFIXES]


def resolve(word: str, available: Collection[str]) -> str | None:
    """The file among `available` (models/embeddings' listing) an `embedding:NAME` word stands for."""
    for name in embedding_names(word):
        found = next((c for c in candidates(name) if c in available), None)
        if found is not None:
            return found
    return None


class PromptText(String):
    """A prompt: a STRING whose `embedding:NAME` words must name files in models/embeddings."""

    def check(self, value: Any, env: ValidationEnv) -> tuple[str, str] | None:
        problem = super().check(value, env)
        if problem or EMBEDDING not in value:
            return problem
        available = env.choices(FOLDER)
        unknown = [w for w in dict.fromkeys(embedding_words(value)) if resolve(w, available) is None]
        if not unknown:
            return None
        shown = ", ".join(available[:20]) + (f", ... ({len(available)} in all)" if len(available) > 20 else "")
        missing = "; ".join(
            f"unknown embedding {embedding_names(w)[-1]!r} ({w!r}): no "
            f"{' or '.join(candidates(embedding_names(w)[-1]))} in models/{FOLDER}"
            for w in unknown
        )
        return "unknown_embedding", f"{missing}; embeddings: {shown or '(none)'} {PICKLE_NOTE}"

    def files(self, value: Any, env: ValidationEnv) -> list[tuple[str, str]]:
        if not isinstance(value, str) or EMBEDDING not in value:
            return []
        available = env.choices(FOLDER)
        found = (resolve(word, available) for word in embedding_words(value))
        return [(FOLDER, name) for name in dict.fromkeys(found) if name is not None]


def embedding_lookup(ctx: NodeContext, width: int, key: str = "clip_l") -> EmbeddingLookup:
    """Finds an embedding's [k, width] vectors for a text encoder whose tokens are `width` wide
    (`key`: its entry in files made for several encoders); None where no candidate file exists.
    The file is read through ctx.model_path, so the models folder's rules (names inside it,
    pickles only where allowed, read as their .safetensors copy) hold."""
    root = (ctx.models_dir / FOLDER).resolve()

    def lookup(name: str) -> torch.Tensor | None:
        for candidate in candidates(name):
            probe = (root / candidate).resolve()
            if probe.is_relative_to(root) and probe.is_file():
                return read_embedding(ctx.model_path(FOLDER, candidate), f"{FOLDER}/{candidate}", width, key)
        return None

    return lookup
