"""Prompt text to CLIP embeddings, reading emphasis as ComfyUI reads it.

Emphasis: `(word)` multiplies the weight by 1.1 (nested: 1.21, ...), `(word:1.3)` sets it, and
`\\(` `\\)` are literal parentheses. Square brackets carry no meaning in ComfyUI (`[word]` is
text, weight 1), and so here. A weight w moves a token's embedding away from the empty prompt's
embedding at the same position: e' = e_empty + w * (e - e_empty), ComfyUI's formula.

Prompts longer than one window are split into windows of 75 tokens (each with its start and end
token, padded to 77), and the windows' embeddings are concatenated: nothing is truncated. As in
ComfyUI, a word (or embedding) of fewer than 8 tokens that does not fit in what is left of a
window moves whole to the next one; a longer one fills the window and goes on in the next.

`embedding:NAME` is ComfyUI's syntax for a textual-inversion embedding (a word of the prompt,
inside emphasis too: `(embedding:NAME:1.2)`). Its k vectors take k token positions, with the
word's weight, and count as k tokens when the prompt is cut into windows: the text model gets
them in place of those tokens' token embeddings (position embeddings are added as for any
token). Which file a NAME stands for is the caller's lookup (plinth.nodes.textual_inversion);
one it cannot find is a NodeInputError naming it, where ComfyUI drops it with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from plinth.nodes.core.context import NodeInputError

CHUNK = 75
# Words (and embeddings) this many tokens long or longer are cut at a window's edge (ComfyUI's
# max_word_length); shorter ones move whole to the next window.
LONG_WORD = 8
# ComfyUI's prefix for a textual-inversion embedding in a prompt (case-sensitive, as there).
EMBEDDING = "embedding:"
ESCAPED = {"\\(": "\0open\0", "\\)": "\0close\0"}
# A token: its id, or one vector of an embedding in a token's place.
Token = int | torch.Tensor
# An embedding's name -> its [k, D] vectors, or None when there is no such embedding.
EmbeddingLookup = Callable[[str], torch.Tensor | None]
# The token id written where an embedding vector goes; the vector replaces its token embedding.
PLACEHOLDER = 0


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


def prompt_words(text: str) -> list[tuple[str, float]]:
    """The prompt's words (split at whitespace) with their emphasis weights."""
    return [(word, weight) for segment, weight in parse_emphasis(text) for word in segment.split()]


def embedding_names(word: str) -> list[str]:
    """The names an `embedding:NAME` word may stand for, in the order ComfyUI tries them: NAME
    whole, then without trailing commas (which stay prompt text). [] for any other word, and
    for one with no name before its commas ("embedding:," is text)."""
    name = word[len(EMBEDDING) :] if word.startswith(EMBEDDING) else ""
    stripped = name.rstrip(",")
    return list(dict.fromkeys((name, stripped))) if stripped else []


def embedding_words(text: str) -> list[str]:
    """The `embedding:NAME` words of a prompt, as weighted_tokens reads them."""
    return [word for word, _ in prompt_words(text) if embedding_names(word)]


def _no_embeddings(name: str) -> torch.Tensor | None:
    return None


def _embedding(word: str, embeddings: EmbeddingLookup) -> tuple[torch.Tensor, str]:
    """The vectors of an `embedding:NAME` word and the name they were found under."""
    names = embedding_names(word)
    for name in names:
        vectors = embeddings(name)
        if vectors is not None:
            return vectors, name
    raise NodeInputError(f"unknown embedding {names[-1]!r} ({word!r}): no such file in models/embeddings")


def weighted_tokens(
    tokenizer: Any, text: str, embeddings: EmbeddingLookup = _no_embeddings
) -> list[list[tuple[Token, float]]]:
    """Token windows of (token, weight), each without its start/end tokens, at most CHUNK long;
    an embedding's vectors stand in the windows as tokens."""
    words: list[list[tuple[Token, float]]] = []
    for word, weight in prompt_words(text):
        if embedding_names(word):
            vectors, name = _embedding(word, embeddings)
            words.append([(v, weight) for v in vectors])
            word = word[len(EMBEDDING) + len(name) :]  # commas after the name are text, as in ComfyUI
        ids = tokenizer(word, add_special_tokens=False, truncation=False).input_ids if word else []
        if ids:
            words.append([(i, weight) for i in ids])
    windows: list[list[tuple[Token, float]]] = [[]]
    for word_tokens in words:
        if len(windows[-1]) + len(word_tokens) > CHUNK and len(word_tokens) < LONG_WORD:
            windows.append([])
        for token in word_tokens:
            if len(windows[-1]) == CHUNK:
                windows.append([])
            windows[-1].append(token)
    return windows


def encode(
    tokenizer: Any,
    encoder: Any,
    text: str,
    stop_at_layer: int,
    device: torch.device,
    embeddings: EmbeddingLookup = _no_embeddings,
) -> torch.Tensor:
    """Embeddings [1, 77*k, D] of `text` (called with any model patches already applied);
    `embeddings` finds the vectors of the prompt's `embedding:NAME` words."""
    return encode_with_pooled(tokenizer, encoder, text, stop_at_layer, device, embeddings)[0]


def encode_with_pooled(
    tokenizer: Any,
    encoder: Any,
    text: str,
    stop_at_layer: int,
    device: torch.device,
    embeddings: EmbeddingLookup = _no_embeddings,
    final_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeddings [1, 77*k, D], pooled [1, P] or None) of `text`. The pooled vector is the
    projected end-token state of the first window, unweighted, where the encoder projects one
    (CLIPTextModelWithProjection: SDXL's CLIP-G), as ComfyUI takes it. `final_norm` False takes
    layer `stop_at_layer` as it is (SDXL's text models), True through the final layer norm."""
    windows = weighted_tokens(tokenizer, text, embeddings)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def row(window: list[tuple[Token, float]]) -> list[Token]:
        return [bos] + [t for t, _ in window] + [eos] + [pad] * (CHUNK - len(window))

    rows = [row(w) for w in windows]
    weighted = any(w != 1.0 for window in windows for _, w in window)
    if weighted:
        rows.append(row([]))  # the empty prompt, the origin weights scale from
    vectors = {(i, j): t for i, r in enumerate(rows) for j, t in enumerate(r) if isinstance(t, torch.Tensor)}
    ids = [[PLACEHOLDER if isinstance(t, torch.Tensor) else t for t in r] for r in rows]
    with _token_vectors(encoder, vectors):
        hidden, pooled = _hidden(encoder, torch.tensor(ids, dtype=torch.long, device=device), stop_at_layer, final_norm)
    hidden = hidden.float()
    if weighted:
        empty, hidden = hidden[-1], hidden[:-1]
        weights = torch.ones(hidden.shape[:2], device=hidden.device)
        for i, window in enumerate(windows):
            weights[i, 1 : 1 + len(window)] = torch.tensor([w for _, w in window], device=hidden.device)
        hidden = empty + weights.unsqueeze(-1) * (hidden - empty)
    return hidden.reshape(1, -1, hidden.shape[-1]), None if pooled is None else pooled[:1].float()


@contextmanager
def _token_vectors(encoder: Any, vectors: dict[tuple[int, int], torch.Tensor]) -> Iterator[None]:
    """While inside, the encoder's token-embedding layer puts vectors[(row, position)] in place
    of the token embedding there (a forward hook, removed on exit)."""
    if not vectors:
        yield
        return

    rows, positions = (list(axis) for axis in zip(*vectors, strict=True))
    stacked = torch.stack(list(vectors.values()))

    def replace(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[rows, positions] = stacked.to(output.device, output.dtype)
        return output

    hook = encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        hook.remove()


def _hidden(
    encoder: Any, tokens: torch.Tensor, stop_at_layer: int, final_norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states of layer `stop_at_layer`, projected pooled output or None)."""
    if stop_at_layer == -1 and final_norm:
        out = encoder(tokens)
        return out.last_hidden_state, getattr(out, "text_embeds", None)
    out = encoder(tokens, output_hidden_states=True)
    hidden = out.hidden_states[stop_at_layer]
    if final_norm:
        hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    return hidden, getattr(out, "text_embeds", None)
