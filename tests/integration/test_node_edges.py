"""Node edge cases from review: odd image sizes, batches that do not match, files that decode
to something else than they look like. Nodes are run as functions with a small context on
tiny-sd, except where the server's behaviour (a job failing with a clear message) is the point."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support.graph_builder import GraphBuilder, linked

from plinth.nodes.conditioning import area_in_latent
from plinth.nodes.core.context import ModelHandle, NodeInputError
from plinth.nodes.core.types import Vae
from plinth.nodes.inpaint import InpaintModelConditioning, VAEEncodeForInpaint, grey_out
from plinth.nodes.io import decode_image
from plinth.nodes.latent import VAEEncode
from plinth.nodes.models.checkpoint import load_checkpoint
from plinth.nodes.models.tiny_sd import ensure_tiny_sd

CPU = torch.device("cpu")


class Ctx:
    """The part of NodeContext the VAE nodes use."""

    device = CPU
    dtype = torch.float32

    def model(self, handle: ModelHandle):
        return handle.load()

    def check_cancelled(self) -> None:
        pass


@pytest.fixture(scope="module")
def tiny(models_dir):
    return load_checkpoint(ensure_tiny_sd(models_dir), models_dir, CPU, torch.float32)


@pytest.fixture(scope="module")
def vae(tiny):
    return Vae(ModelHandle("tiny-sd", lambda: tiny))


def inpaint(node: str, vae: Vae, pixels: torch.Tensor, mask: torch.Tensor):
    """The latent (with its noise mask) of VAEEncodeForInpaint (grow 0) or InpaintModelConditioning."""
    if node == "VAEEncodeForInpaint":
        return VAEEncodeForInpaint().run(Ctx(), pixels=pixels, vae=vae, mask=mask, grow_mask_by=0)[0]
    return InpaintModelConditioning().run(
        Ctx(), positive=[], negative=[], vae=vae, pixels=pixels, mask=mask, noise_mask=True
    )[2]


# inpainting on pixels that are not a multiple of 8: mask and pixels cropped together

NODES = ["VAEEncodeForInpaint", "InpaintModelConditioning"]


@pytest.mark.parametrize("node", NODES)
def test_inpaint_crops_the_mask_with_the_pixels(vae, node):
    pixels = torch.rand(1, 70, 70, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 70, 70)
    mask[:, :, 60:] = 1.0  # repaint the photo's columns 60..69
    # both are cropped to 64x64 from (3, 3): the photo's column 60 is column 57 there
    noise_mask = inpaint(node, vae, pixels, mask).noise_mask[0, 0]
    assert noise_mask.shape == (64, 64)
    assert (noise_mask[:, :57] == 0).all() and (noise_mask[:, 57:] == 1).all()
    greyed, _ = grey_out(Ctx(), vae, pixels, mask)
    assert torch.equal(greyed[0, :, :57], pixels[0, 3:67, 3:60])
    assert (greyed[0, :, 57:] == 0.5).all()


def test_inpaint_resizes_the_mask_to_the_uncropped_pixels_first(vae):
    """ComfyUI: the mask is resized (bilinear) to the whole image, then cropped with it."""
    pixels = torch.rand(1, 70, 70, 3)
    mask = torch.zeros(1, 35, 35)
    mask[:, :, 30:] = 1.0
    comfyui = F.interpolate(mask[:, None], size=(70, 70), mode="bilinear")[:, :, 3:67, 3:67]
    for node in NODES:
        assert torch.equal(
            inpaint(node, vae, pixels, mask).noise_mask, comfyui.round() if node == NODES[0] else comfyui
        )


@pytest.mark.parametrize("node", NODES)
def test_inpaint_pairs_a_mask_batch_with_the_pixel_batch(vae, node):
    masks = torch.zeros(3, 64, 64)
    for i in range(3):
        masks[i, :, i * 16 : (i + 1) * 16] = 1.0
    latent = inpaint(node, vae, torch.rand(2, 64, 64, 3), masks)  # more masks than images: cut
    assert latent.samples.shape[0] == 2 and torch.equal(latent.noise_mask[:, 0], masks[:2])
    latent = inpaint(node, vae, torch.rand(3, 64, 64, 3), masks[:2])  # fewer: repeated in turn
    assert torch.equal(latent.noise_mask[:, 0], masks[[0, 1, 0]])


@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("size", [(7, 64), (64, 1)])
def test_inpaint_refuses_images_smaller_than_the_vae_cell(vae, node, size):
    with pytest.raises(NodeInputError, match=rf"{size[1]}x{size[0]} pixels; the VAE needs at least 8x8"):
        inpaint(node, vae, torch.rand(1, *size, 3), torch.ones(1, *size))


def test_vae_encode_refuses_images_smaller_than_the_vae_cell(vae):
    with pytest.raises(NodeInputError, match=r"64x7 pixels; the VAE needs at least 8x8"):
        VAEEncode().run(Ctx(), pixels=torch.rand(1, 7, 64, 3), vae=vae)


# ConditioningSetArea outside the latent


def test_an_area_reaching_past_the_latent_is_clipped_to_it():
    assert area_in_latent((8, 8, 0, 0), 8, 8) == (8, 8, 0, 0)
    assert area_in_latent((8, 8, 4, 7), 8, 8) == (4, 1, 4, 7)  # as ComfyUI narrows it
    assert area_in_latent((8, 8, 0, 4), 8, 16) == (8, 8, 0, 4)


@pytest.mark.parametrize("area", [(8, 8, 0, 8), (8, 8, 9, 0)])
def test_an_area_wholly_outside_the_latent_is_an_error(area):
    with pytest.raises(NodeInputError, match=r"lies outside the 64x64-pixel image"):
        area_in_latent(area, 8, 8)


def test_sampling_with_an_area_outside_the_image_fails_clearly(client, txt2img):
    from plinth.clients import JobFailed

    b = GraphBuilder(txt2img)
    sampler = b.find("KSampler")
    prompt = linked(sampler.graph, sampler, "positive").out(0)
    area = b.add("ConditioningSetArea", conditioning=prompt, width=64, height=64, x=64, y=0, strength=1.0)
    sampler.inputs["positive"] = b.add("ConditioningCombine", conditioning_1=prompt, conditioning_2=area.out(0)).out(0)
    with pytest.raises(JobFailed, match=r"area \(x=64, y=0, 64x64 pixels\) lies outside the 64x64-pixel image"):
        client.run(b.build())


# image files


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_an_mpo_photo_loads_as_its_first_frame():
    first = Image.fromarray(np.full((16, 24, 3), (200, 30, 30), np.uint8))
    depth = Image.fromarray(np.full((16, 24, 3), (0, 0, 250), np.uint8))
    data = encoded(first, "MPO", save_all=True, append_images=[depth])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    pixels, mask = decode_image(data, "phone.jpg")
    assert pixels.shape == (1, 16, 24, 3) and mask.shape == (1, 16, 24)
    assert pixels[0, 8, 12, 0] > 0.6 and pixels[0, 8, 12, 2] < 0.3  # the red first frame


def test_frames_of_another_size_are_skipped_not_the_end_of_the_batch():
    frames = [
        Image.new("RGB", (8, 6), (10, 10, 10)),
        Image.new("RGB", (4, 4), (99, 99, 99)),
        Image.new("RGB", (8, 6), (250, 250, 250)),
    ]
    data = encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    pixels, mask = decode_image(data, "pages.tiff")
    assert pixels.shape == (2, 6, 8, 3) and mask.shape == (2, 6, 8)
    assert torch.allclose(pixels[:, 0, 0, 0], torch.tensor([10 / 255, 250 / 255]))


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_16_bit_greyscale_keeps_its_levels(mode, fmt):
    levels = np.array([[0, 257 * 64, 257 * 128, 65535], [1000, 20000, 40000, 60000]], np.uint16)
    image = Image.frombytes(mode, (4, 2), levels.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    data = encoded(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    pixels, _ = decode_image(data, f"scan.{fmt.lower()}")
    expected = torch.from_numpy(levels.astype(np.float32) / 65535)
    assert pixels.shape == (1, 2, 4, 3)
    for channel in range(3):
        assert torch.allclose(pixels[0, ..., channel], expected, atol=1e-6)
