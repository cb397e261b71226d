"""The real CLIP BPE tokenizer, built offline from the vocabulary a registry package ships.

openai-clip ships `bpe_simple_vocab_16e6.txt.gz`. CLIP's vocabulary is derived from it: the 256
byte-to-unicode symbols, the same with `</w>`, one entry per merge (merge lines 1..48894), then
the two special tokens: 49,408 entries. We write vocab.json and merges.txt once and load
transformers' CLIPTokenizer from that folder, so nothing is fetched from a hub.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

VOCAB_SIZE = 49408
MERGE_LINES = 49152 - 256 - 2  # the merges CLIP uses: 48,894 lines after the header
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("clip")  # locating, not importing: clip imports torchvision
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the openai-clip package is not installed; it ships the CLIP vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise RuntimeError(f"CLIP vocabulary not found at {path}")
    return path


def _bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) reversible map of the 256 byte values to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    # Order as CLIP does: the printable bytes first, then the remapped ones.
    ordered = [chr(b) for b in printable] + [c for b, c in enumerate(chars) if b not in printable]
    return ordered


def write_tokenizer_files(folder: Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into `folder` (idempotent)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return folder
    lines = gzip.open(_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGE_LINES + 1]]
    base = _bytes_to_unicode()
    vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    tmp = folder / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tmp / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    )
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "do_lower_case": True,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
            }
        )
    )
    for f in tmp.iterdir():
        os.replace(f, folder / f.name)
    tmp.rmdir()
    return folder


def load_tokenizer(folder: Path):
    """A CLIPTokenizer from a folder written by write_tokenizer_files."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
