"""Every node class the server offers, keyed by class_type."""

from __future__ import annotations

from plinth.nodes import (
    clip_vision,
    color,
    conditioning,
    controlnet,
    custom_sampling,
    cutout,
    flux,
    gligen,
    image,
    inpaint,
    io,
    ipadapter,
    ksampler,
    latent,
    loaders,
    lora,
    mask,
    model_advanced,
    sdxl,
    sigmas,
    upscale,
)
from plinth.nodes.core.schema import Node

_MODULES = (
    loaders,
    lora,
    conditioning,
    sdxl,
    flux,
    controlnet,
    gligen,
    clip_vision,
    ipadapter,
    latent,
    inpaint,
    ksampler,
    custom_sampling,
    sigmas,
    model_advanced,
    io,
    image,
    mask,
    upscale,
    cutout,
    color,
)


def _collect() -> dict[str, type[Node]]:
    found: dict[str, type[Node]] = {}
    for module in _MODULES:
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Node) and value.__module__ == module.__name__:
                found[value.schema.class_type] = value
    return found


NODES: dict[str, type[Node]] = _collect()
