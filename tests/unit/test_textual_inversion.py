"""Textual-inversion embeddings in prompts (plinth.nodes.prompt): where an embedding's vectors
go and what the text model makes of them.

What "the embedding changes the conditioning exactly where its tokens are" means for CLIP: the
embedding's k vectors replace the token embeddings of k positions (the text model's input;
position embeddings are still added), and nothing else of the input changes. The output at
every later position changes too, because CLIP's causal attention lets each position see the
earlier ones; the positions before the embedding see none of it and stay bit-identical. The
whole output equals the text model run on the hand-built input: the same model with the
embedding's vectors added to its vocabulary as new tokens (how diffusers trains them).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.tiny_sd import TEXT
from plinth.nodes.models.tokenizer import load_tokenizer, write_tokenizer_files
from plinth.nodes.prompt import CHUNK, encode, weighted_tokens

CPU = torch.device("cpu")
WIDTH = TEXT["hidden_size"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tokenizer_files(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(3)
    return CLIPTextModel(CLIPTextConfig(**TEXT)).eval()


@pytest.fixture(scope="module")
def style():
    return torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def lookup(style):
    more = {
        name: torch.randn(k, WIDTH, generator=torch.Generator().manual_seed(k))
        for name, k in [("ten", 10), ("long", 100)]
    }
    return {"style": style, **more}.get


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def plain(window) -> list:
    """A window with each vector shown as "V"."""
    return [(t if isinstance(t, int) else "V", round(w, 6)) for t, w in window]


def test_an_embedding_takes_one_token_position_per_vector_with_its_words_weight(tokenizer, lookup):
    a, red, comma = ids(tokenizer, "a")[0], ids(tokenizer, "red")[0], ids(tokenizer, ",")[0]
    cases = {
        "a embedding:style red": [(a, 1.0)] + [("V", 1.0)] * 3 + [(red, 1.0)],
        "a (embedding:style:1.2) red": [(a, 1.0)] + [("V", 1.2)] * 3 + [(red, 1.0)],
        "a (embedding:style) red": [(a, 1.0)] + [("V", 1.1)] * 3 + [(red, 1.0)],
        "a embedding:style, red": [(a, 1.0)] + [("V", 1.0)] * 3 + [(comma, 1.0), (red, 1.0)],
        "(a embedding:style:0.5)": [(a, 0.5)] + [("V", 0.5)] * 3,
    }
    for text, expected in cases.items():
        (window,) = weighted_tokens(tokenizer, text, lookup)
        assert plain(window) == expected, text
    (window,) = weighted_tokens(tokenizer, "embedding:style", lookup)
    assert all(torch.equal(t, v) for (t, _), v in zip(window, lookup("style"), strict=True))


def test_windows_count_the_vectors(tokenizer, encoder, lookup):
    sneaker = ids(tokenizer, "sneaker")[0]
    windows = weighted_tokens(tokenizer, "sneaker " * 74 + "embedding:style", lookup)
    assert [len(w) for w in windows] == [74, 3]  # 74 + 3 > 75: under 8 tokens, it moves whole to the next window
    assert plain(windows[1]) == [("V", 1.0)] * 3
    windows = weighted_tokens(tokenizer, "sneaker " * 70 + "embedding:ten red", lookup)
    assert [len(w) for w in windows] == [75, 6]  # 8 tokens or more: cut at the window's edge, as ComfyUI does
    assert plain(windows[0][70:]) == [("V", 1.0)] * 5 and plain(windows[1])[:5] == [("V", 1.0)] * 5
    windows = weighted_tokens(tokenizer, "sneaker embedding:long", lookup)
    assert [len(w) for w in windows] == [CHUNK, 26]  # longer than a window: cut, as a long word is
    assert plain(windows[0])[0] == (sneaker, 1.0)
    with torch.inference_mode():
        assert encode(tokenizer, encoder, "sneaker embedding:long", -1, CPU, lookup).shape == (1, 2 * 77, WIDTH)


def test_an_unknown_embedding_names_itself(tokenizer, lookup):
    for text, name in [("a embedding:nothing here", "nothing"), ("(embedding:gone,:1.2)", "gone")]:
        with pytest.raises(NodeInputError, match=f"unknown embedding '{name}'"):
            weighted_tokens(tokenizer, text, lookup)
    with pytest.raises(NodeInputError, match="unknown embedding 'style'"):
        weighted_tokens(tokenizer, "embedding:style")  # no lookup: no embeddings at all


def test_words_that_only_look_like_embeddings_are_text(tokenizer, lookup):
    assert weighted_tokens(tokenizer, "an embedding: of light", lookup) == [
        [(t, 1.0) for t in ids(tokenizer, "an embedding: of light")]
    ]
    for text in ("red,embedding:style", "red embedding:, blue", "embedding:"):
        assert weighted_tokens(tokenizer, text, lookup) == [[(t, 1.0) for t in ids(tokenizer, text)]], text


def input_vectors(encoder, run) -> torch.Tensor:
    """The token-embedding rows the text model got while `run()` ran: what its embeddings
    layer passed on, less the position embeddings it added."""
    seen = []
    embeddings = getattr(encoder, "text_model", encoder).embeddings  # transformers 4 nests it
    hook = embeddings.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.inference_mode():
            run()
    finally:
        hook.remove()
    return seen[0] - embeddings.position_embedding.weight[: seen[0].shape[1]]


def test_the_vectors_replace_the_token_embeddings_at_their_positions_only(tokenizer, encoder, style, lookup):
    text = "a photo embedding:style red"
    got = input_vectors(encoder, lambda: encode(tokenizer, encoder, text, -1, CPU, lookup))
    tokens = tokenizer("a photo", add_special_tokens=True).input_ids[:-1] + [0] * 3 + ids(tokenizer, "red")
    tokens += [tokenizer.eos_token_id] * (77 - len(tokens))
    expected = encoder.get_input_embeddings().weight[tokens].clone()
    expected[3:6] = style
    assert torch.allclose(got[0], expected, atol=1e-6)
    assert not torch.allclose(got[0, 3:6], encoder.get_input_embeddings().weight[0], atol=1e-3)


@pytest.mark.parametrize("stop_at_layer", [-1, -2])
def test_the_conditioning_is_the_text_model_run_on_those_vectors(tokenizer, encoder, style, lookup, stop_at_layer):
    reference = copy.deepcopy(encoder)
    vocab = reference.get_input_embeddings().num_embeddings
    reference.resize_token_embeddings(vocab + len(style))
    with torch.no_grad():
        reference.get_input_embeddings().weight[vocab:] = style
    new_tokens = list(range(vocab, vocab + len(style)))
    tokens = [tokenizer.bos_token_id, *ids(tokenizer, "a photo"), *new_tokens, *ids(tokenizer, "red")]
    tokens += [tokenizer.eos_token_id] * (77 - len(tokens))

    with torch.inference_mode():
        states = reference(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        want = getattr(reference, "text_model", reference).final_layer_norm(states[stop_at_layer])[0]
        got = encode(tokenizer, encoder, "a photo embedding:style red", stop_at_layer, CPU, lookup)[0]
        without = encode(tokenizer, encoder, "a photo red", stop_at_layer, CPU, lookup)[0]
        empty = encode(tokenizer, encoder, "", stop_at_layer, CPU, lookup)[0]
        heavy = encode(tokenizer, encoder, "a photo (embedding:style:1.5) red", stop_at_layer, CPU, lookup)[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got[:3], without[:3])  # start token, "a", "photo": causal attention sees no embedding
    assert not torch.allclose(got[3:6], without[3:6], atol=1e-3)
    weighted = got.clone()
    weighted[3:6] = empty[3:6] + 1.5 * (got[3:6] - empty[3:6])  # ComfyUI's weight formula, per vector
    assert torch.allclose(heavy, weighted, atol=1e-5)
