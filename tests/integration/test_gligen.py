"""GLIGENLoader and GLIGENTextBoxApply, through the real server where a graph can show it.

The GLIGEN models are random-weight ones in the pruned file's layout (tests/support/gligen_files.py)
for the small SD1.5-layout checkpoint (16 transformer blocks, as SD1.5 has), so a wrong block
pairing, a missed box or a box on the wrong rows shows in the pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import files, gligen_files, small_sd15

from plinth.clients import JobFailed
from plinth.nodes.core.context import ModelHandle, NodeInputError
from plinth.nodes.core.registry import NODES
from plinth.nodes.core.types import ConditioningEntry, TextEncoder
from plinth.nodes.gligen import pooled_text
from plinth.nodes.models.checkpoint import load_checkpoint
from plinth.nodes.models.gligen import MAX_BOXES, Box, build_gligen, load_gligen
from plinth.nodes.models.tiny_sd import UNET as TINY_UNET
from plinth.nodes.patches.gligen_attention import GligenBoxes, gligen_fusers, transformer_blocks

CPU = torch.device("cpu")
GLIGEN = "gligen_sd14_textbox_pruned.safetensors"
PREFIXED = "gligen-prefixed.safetensors"
ZERO = "gligen-zero-gates.safetensors"
BROKEN, FOREIGN, TRUNCATED, MISFIT = (
    "gligen-broken.safetensors",
    "gligen-foreign.safetensors",
    "gligen-truncated.safetensors",
    "gligen-for-tiny-sd.safetensors",
)


class FakeContext:
    """What the GLIGEN code uses of a NodeContext: models straight from their handles, the CPU."""

    device = CPU

    def model(self, handle: ModelHandle):
        return handle.load()


@pytest.fixture(scope="module")
def sd15(models_dir):
    return small_sd15.small_sd15(models_dir)


@pytest.fixture(scope="module")
def states(models_dir, sd15) -> dict[str, dict[str, torch.Tensor]]:
    """Every GLIGEN file the tests use, written under models/gligen; returns the states written."""
    from diffusers import UNet2DConditionModel

    unet, _, text = sd15
    width = text.config.hidden_size
    folder = models_dir / "gligen"
    written = {
        GLIGEN: gligen_files.gligen_state(unet, width, seed=1),
        ZERO: gligen_files.gligen_state(unet, width, gated=False),
    }
    written[PREFIXED] = {f"model.diffusion_model.{k}": v for k, v in written[GLIGEN].items()}
    truncated = dict(written[GLIGEN])
    del truncated["output_blocks.11.1.transformer_blocks.0.fuser.attn.to_k.weight"]
    written[TRUNCATED] = truncated
    written[FOREIGN] = {"encoder.layer.0.weight": torch.ones(4, 4)}
    written[MISFIT] = gligen_files.gligen_state(UNet2DConditionModel(**TINY_UNET), width, seed=2)
    for name, state in written.items():
        files.write(state, folder, name)
    (folder / BROKEN).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return written


def graph_with_boxes(gligen: str | None, boxes=(), on: str = "positive") -> dict:
    """The small checkpoint's txt2img with GLIGENTextBoxApply for each (text, width, height, x, y)
    box chained onto the `on` prompt."""
    graph, nodes = small_sd15.txt2img()
    if gligen is not None:
        loader = graph.add("GLIGENLoader", gligen_name=gligen)
        cond = nodes[on].out(0)
        for text, width, height, x, y in boxes:
            apply = graph.add(
                "GLIGENTextBoxApply",
                conditioning_to=cond,
                clip=nodes["checkpoint"].out(1),
                gligen_textbox_model=loader.out(0),
                text=text,
                width=width,
                height=height,
                x=x,
                y=y,
            )
            cond = apply.out(0)
        nodes["sampler"].inputs[on] = cond
    return graph.build()


def images(client, graph: dict) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in client.run(graph).images]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def baseline(client, states) -> list[np.ndarray]:
    return images(client, graph_with_boxes(None))


def test_a_box_changes_the_image_and_where_it_is_matters(client, baseline):
    left = images(client, graph_with_boxes(GLIGEN, [("a red sneaker", 32, 32, 0, 0)]))
    right = images(client, graph_with_boxes(GLIGEN, [("a red sneaker", 32, 32, 32, 32)]))
    both = images(client, graph_with_boxes(GLIGEN, [("a red sneaker", 32, 32, 0, 0), ("a cat", 32, 32, 32, 32)]))
    assert not same(left, baseline) and not same(left, right) and not same(both, left)


def test_the_box_acts_on_the_prompt_it_is_applied_to(client, baseline):
    box = [("a red sneaker", 32, 32, 0, 0)]
    positive = images(client, graph_with_boxes(GLIGEN, box, on="positive"))
    negative = images(client, graph_with_boxes(GLIGEN, box, on="negative"))
    assert not same(negative, baseline) and not same(negative, positive)


def test_a_zero_gated_gligen_is_exactly_no_gligen(client, baseline):
    assert same(images(client, graph_with_boxes(ZERO, [("a red sneaker", 32, 32, 0, 0)])), baseline)


def test_rows_without_boxes_are_exactly_the_plain_models(sd15, states):
    """One UNet call over an entry with boxes and one without: the second entry's rows are
    bit-identical to the plain UNet's, the first entry's are not; the UNet is as before afterwards."""
    unet = sd15[0]
    gligen = build_gligen(states[GLIGEN], GLIGEN)
    handle = ModelHandle("gligen/x@0", lambda: gligen)
    boxes = GligenBoxes(handle, (Box(torch.randn(64), 4, 4, 0, 0),))
    sample, t, context = torch.randn(4, 4, 8, 8), torch.tensor(500), torch.randn(4, 77, 64)
    with torch.inference_mode():
        plain = unet(sample, t, encoder_hidden_states=context).sample
        with gligen_fusers(FakeContext(), unet, [boxes, None], 2, (8, 8), {}) as kwargs:
            grounded = unet(sample, t, encoder_hidden_states=context, **kwargs).sample
        again = unet(sample, t, encoder_hidden_states=context).sample
    assert torch.equal(grounded[2:], plain[2:]) and not torch.allclose(grounded[:2], plain[:2])
    assert torch.equal(again, plain)
    assert not hasattr(unet, "position_net") and not any(hasattr(b, "fuser") for b in transformer_blocks(unet))


def test_grounding_tokens_place_boxes_over_the_latent(states):
    """The projection sees (x1, y1, x2, y2) over the latent's size and the null features in
    unused slots, as ComfyUI's set_position builds them."""
    gligen = build_gligen(states[GLIGEN], GLIGEN)
    phrase = torch.randn(64)
    tokens = gligen.grounding_tokens([Box(phrase, 2, 4, 1, 3)], 8, 16)
    corners = torch.zeros(1, MAX_BOXES, 4)
    corners[0, 0] = torch.tensor([3 / 16, 1 / 8, 7 / 16, 3 / 8])
    masks = torch.zeros(1, MAX_BOXES)
    masks[0, 0] = 1
    phrases = torch.zeros(1, MAX_BOXES, 64)
    phrases[0, 0] = phrase
    with torch.no_grad():
        assert torch.allclose(tokens, gligen.position_net(corners, masks, phrases))


def test_every_layout_loads_the_exact_weights(models_dir, states):
    for name in (GLIGEN, PREFIXED):
        loaded = load_gligen(models_dir / "gligen" / name, CPU, torch.float32)
        assert len(loaded.fusers) == 16 and loaded.blocks[6] == "middle_block.1.transformer_blocks.0"
        got = {f"position_net.{k}": v for k, v in loaded.position_net.state_dict().items()}
        for block, fuser in zip(loaded.blocks, loaded.fusers, strict=True):
            got.update({f"{block}.fuser.{k}": v for k, v in fuser.state_dict().items()})
        assert got.keys() == states[GLIGEN].keys(), name
        assert all(torch.equal(got[k], states[GLIGEN][k]) for k in got), name


@pytest.fixture(scope="module")
def tiny_clip(models_dir) -> TextEncoder:
    """tiny-sd's CLIP (64 wide, as the small checkpoint's GLIGEN phrases are), with CLIP skip set."""
    model = load_checkpoint(models_dir / "checkpoints" / "tiny-sd", models_dir, CPU, torch.float32)
    return TextEncoder(ModelHandle("checkpoints/tiny-sd", lambda: model), stop_at_layer=-2)


def test_pooled_text_is_clips_pooled_output(tiny_clip):
    """The phrase embedding is the text model's own pooled output (transformers computes it
    independently) of the prompt's tokens: emphasis weights and CLIP skip do not enter it."""
    model = tiny_clip.load(FakeContext())
    ids = model.tokenizer("a red sneaker", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.text_encoder(ids).pooler_output[0]
    assert torch.allclose(pooled_text(tiny_clip, FakeContext(), "a (red:1.3) sneaker"), expected, atol=1e-6)


def test_bad_files_fail_the_job_clearly(client, states):
    expected = {
        BROKEN: "not a readable .safetensors file",
        FOREIGN: "not a GLIGEN text-box model",
        TRUNCATED: "missing ['attn.to_k.weight']",
        MISFIT: "does not fit this model",
    }
    for name, message in expected.items():
        with pytest.raises(JobFailed) as info:
            client.run(graph_with_boxes(name, [("a red sneaker", 32, 32, 0, 0)]))
        error = info.value.result.error
        assert message in error and name in error, error


def test_boxes_add_up_to_thirty_and_no_more(tiny_clip, states):
    gligen = build_gligen(states[GLIGEN], GLIGEN)
    handle = ModelHandle("gligen/g@0", lambda: gligen)
    node = NODES["GLIGENTextBoxApply"]()
    cond = [ConditioningEntry(torch.zeros(1, 77, 64), {"strength": 0.5})]
    for _ in range(MAX_BOXES):
        (cond,) = node.run(FakeContext(), cond, tiny_clip, handle, "a box", 64, 32, 16, 8)
    boxes = cond[0].options["gligen"].boxes
    assert len(boxes) == MAX_BOXES and cond[0].options["strength"] == 0.5
    assert (boxes[0].height, boxes[0].width, boxes[0].y, boxes[0].x) == (4, 8, 1, 2)
    with pytest.raises(NodeInputError, match="at most 30 boxes"):
        node.run(FakeContext(), cond, tiny_clip, handle, "a box", 64, 64, 0, 0)


def test_schemas_are_comfyuis():
    """Input names, order, types, defaults and ranges of ComfyUI 0.3.75's nodes.py."""
    loader, apply = NODES["GLIGENLoader"].schema, NODES["GLIGENTextBoxApply"].schema
    assert [(i.name, i.type) for i in loader.inputs] == [("gligen_name", "COMBO")]
    assert [o.type for o in loader.outputs] == ["GLIGEN"] and loader.category == "loaders"
    assert [(i.name, i.type) for i in apply.inputs] == [
        ("conditioning_to", "CONDITIONING"),
        ("clip", "CLIP"),
        ("gligen_textbox_model", "GLIGEN"),
        ("text", "STRING"),
        ("width", "INT"),
        ("height", "INT"),
        ("x", "INT"),
        ("y", "INT"),
    ]
    ints = {i.name: (i.default, i.min, i.max, i.step) for i in apply.inputs if i.type == "INT"}
    assert ints == {
        "width": (64, 8, 16384, 8),
        "height": (64, 8, 16384, 8),
        "x": (0, 0, 16384, 8),
        "y": (0, 0, 16384, 8),
    }
    assert [o.type for o in apply.outputs] == ["CONDITIONING"] and apply.category == "conditioning/gligen"
