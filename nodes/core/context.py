"""The interface a node reaches the server through, defined here and implemented by the server.

Nodes never import the server: models, progress, cancellation, uploaded images and the image
store all come through the context object handed to run(). That keeps the node library usable
in-process, in a worker process or in tests with a small fake context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


class JobCancelled(Exception):
    """Raised inside a node when the job was cancelled; the executor ends the job as cancelled."""


class NodeInputError(ValueError):
    """A node found its inputs unusable at run time (e.g. an image that does not decode).

    The job fails with this message; the message names what was wrong.
    """


@dataclass(frozen=True)
class ModelHandle:
    """A model by name: what loader nodes output instead of the weights themselves.

    The server's model manager keeps the weights (under a memory budget) and calls `load` on a
    miss, so the output cache never pins a model in memory.
    """

    key: str
    load: Callable[[], Any] = field(compare=False, repr=False)


@dataclass(frozen=True)
class ModelOptions:
    """How loader nodes set models up on the device, from the server's config (the dtype is
    NodeContext.dtype): attention kernel, memory format, torch.compile, warm-up at load."""

    attention: str = "auto"  # auto, sdpa, xformers
    channels_last: bool = True  # on CUDA only
    compile: bool = False
    warm_up: bool = True


@dataclass(frozen=True)
class ImageRef:
    """An image an output node stored."""

    id: str
    filename: str
    width: int
    height: int
    png: bytes = field(repr=False)
    kind: str = "output"


def file_model(ctx: NodeContext, source: str, name: str, load: Callable[[Path], Any]) -> ModelHandle:
    """A handle for the model file `name` in the models folder `source`, loaded by `load(path)`.

    The key carries the file's fingerprint, so a file replaced under the same name is loaded
    anew rather than served from the copy in memory (which the manager then releases).
    """
    path = ctx.model_path(source, name)
    return ModelHandle(f"{source}/{name}@{ctx.model_fingerprint(source, name)[:16]}", lambda: load(path))


class ValidationEnv(Protocol):
    """What validation needs from the server: dynamic choice lists and file fingerprints."""

    def choices(self, source: str) -> list[str]:
        """Names for a dynamic choice list: "checkpoints", "input_images", ..."""

    def fingerprint(self, source: str, name: str) -> str:
        """A string that changes when the named model file or input image changes."""


# A UNet call shared with other jobs: (unet, sample, timestep, encoder_hidden_states) -> noise
# prediction, as server/engine/batching.py's Lockstep.forward takes it.
UnetForward = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class NodeContext(Protocol):
    """What a running node may use: every attribute and method a node reads is declared here,
    so a context (the server's, LoadModel's capture context, a test's fake) knows what to give."""

    device: torch.device
    """Where models run and tensors are computed."""
    dtype: torch.dtype
    """The dtype models are loaded in."""
    graph: dict[str, Any]
    """The whole API-format graph being run (ComfyUI's hidden "prompt" input)."""
    extra_pnginfo: dict[str, Any]
    """More PNG text chunks for saved images: "workflow" holds the editor file a graph came from."""
    models_dir: Path
    """The models folder (loaders find shared files such as the tokenizer there)."""
    model_options: ModelOptions
    """How loader nodes set models up on the device, from the server's config."""
    unet_forward: UnetForward | None
    """Set when the job runs side by side with others (server/engine/batching.py): the sampler
    sends its plain UNet calls (no patches, no ControlNet residuals) through it, to be batched
    with the other jobs' calls. None: the sampler calls the UNet itself."""

    def model(self, handle: ModelHandle) -> Any:
        """The loaded model for `handle`, loading it through the model manager on a miss."""

    def model_path(self, source: str, name: str) -> Path:
        """The file or folder of a model named in a choice list (e.g. ("checkpoints", name))."""

    def model_fingerprint(self, source: str, name: str) -> str:
        """A string that changes when that model file or folder changes."""

    def progress(self, step: int, total: int) -> None:
        """Report sampler progress; also checks for cancellation."""

    def check_cancelled(self) -> None:
        """Raise JobCancelled if the job was cancelled."""

    def input_image(self, name: str) -> bytes:
        """The bytes of an image sent with the request (or stored in the inputs folder)."""

    def save_image(self, png: bytes, width: int, height: int, prefix: str, kind: str) -> ImageRef:
        """Store an encoded PNG and return its reference."""
