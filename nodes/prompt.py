"""Prompt text to CLIP embeddings, reading emphasis as ComfyUI reads it.

Emphasis: `(word)` multiplies the weight by 1.1 (nested: 1.21, ...), `(word:1.3)` sets it, and
`\\(` `\\)` are literal parentheses. Square brackets carry no meaning in ComfyUI (`[word]` is
text, weight 1), and so here. A weight w moves a token's embedding away from the empty prompt's
embedding at the same position: e' = e_empty + w * (e - e_empty), ComfyUI's formula.

Prompts longer than one window are split into windows of 75 tokens (each with its start and end
token, padded to 77), keeping a word's tokens in one window where it fits, and the windows'
embeddings are concatenated: nothing is truncated.

`embedding:NAME` is ComfyUI's syntax for a textual-inversion embedding from models/embeddings.
Plinth has no textual-inversion support, so such a prompt fails with a NodeInputError naming
the embedding, rather than being encoded as the words "embedding", "NAME" (or the embedding
silently dropped, which is what ComfyUI does with one it cannot find).
"""

from __future__ import annotations

from typing import Any

import torch

from plinth.nodes.core.context import NodeInputError

CHUNK = 75
# ComfyUI's prefix for a textual-inversion embedding in a prompt (case-sensitive, as there).
EMBEDDING = "embedding:"
ESCAPED = {"\\(": "\0open\0", "\\)": "\0close\0"}


def parse_emphasis(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """Split `text` into (segment, weight) pairs."""
    for escaped, marker in ESCAPED.items():
        text = text.replace(escaped, marker)
    return [(_unescape(s), w) for s, w in _weights(text, weight) if s]


def _unescape(text: str) -> str:
    return text.replace(ESCAPED["\\("], "(").replace(ESCAPED["\\)"], ")")


def _weights(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for segment in _top_level(text):
        if len(segment) >= 2 and segment[0] == "(" and segment[-1] == ")":
            inner, inner_weight = segment[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out.extend(_weights(inner, inner_weight))
        else:
            out.append((segment, weight))
    return out


def _top_level(text: str) -> list[str]:
    """Split into plain runs and balanced top-level parenthesised groups."""
    parts, current, depth = [], "", 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                parts.append(current)
                current = ""
            depth += 1
            current += char
        elif char == ")" and depth > 0:
            depth -= 1
            current += char
            if depth == 0:
                parts.append(current)
                current = ""
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def weighted_tokens(tokenizer: Any, text: str) -> list[list[tuple[int, float]]]:
    """Token windows of (id, weight), each without its start/end tokens, at most CHUNK long."""
    words: list[list[tuple[int, float]]] = []
    for segment, weight in parse_emphasis(text):
        for word in segment.split():
            if word.startswith(EMBEDDING) and embedding_name(word):
                raise NodeInputError(
                    f"the prompt asks for the textual-inversion embedding {embedding_name(word)!r} ({word!r}); "
                    f"textual-inversion embeddings are not supported: remove it from the prompt"
                )
            ids = tokenizer(word, add_special_tokens=False, truncation=False).input_ids
            if ids:
                words.append([(i, weight) for i in ids])
    windows: list[list[tuple[int, float]]] = [[]]
    for word_tokens in words:
        if len(windows[-1]) + len(word_tokens) > CHUNK and len(word_tokens) <= CHUNK and windows[-1]:
            windows.append([])
        for token in word_tokens:
            if len(windows[-1]) == CHUNK:
                windows.append([])
            windows[-1].append(token)
    return windows


def embedding_name(word: str) -> str:
    """The NAME of an `embedding:NAME` word, without trailing punctuation ("" for none)."""
    return word[len(EMBEDDING) :].rstrip(",.;:")


def encode(tokenizer: Any, encoder: Any, text: str, stop_at_layer: int, device: torch.device) -> torch.Tensor:
    """Embeddings [1, 77*k, D] of `text` (called with any model patches already applied)."""
    windows = weighted_tokens(tokenizer, text)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def row(window: list[tuple[int, float]]) -> list[int]:
        return [bos] + [t for t, _ in window] + [eos] + [pad] * (CHUNK - len(window))

    rows = [row(w) for w in windows]
    weighted = any(w != 1.0 for window in windows for _, w in window)
    if weighted:
        rows.append(row([]))  # the empty prompt, the origin weights scale from
    hidden = _hidden(encoder, torch.tensor(rows, dtype=torch.long, device=device), stop_at_layer).float()
    if weighted:
        empty, hidden = hidden[-1], hidden[:-1]
        weights = torch.ones(hidden.shape[:2], device=hidden.device)
        for i, window in enumerate(windows):
            weights[i, 1 : 1 + len(window)] = torch.tensor([w for _, w in window], device=hidden.device)
        hidden = empty + weights.unsqueeze(-1) * (hidden - empty)
    return hidden.reshape(1, -1, hidden.shape[-1])


def _hidden(encoder: Any, tokens: torch.Tensor, stop_at_layer: int) -> torch.Tensor:
    if stop_at_layer == -1:
        return encoder(tokens).last_hidden_state
    states = encoder(tokens, output_hidden_states=True).hidden_states
    return getattr(encoder, "text_model", encoder).final_layer_norm(states[stop_at_layer])
