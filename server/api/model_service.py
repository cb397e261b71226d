"""ModelService: list the models directory, load a model ahead of the graphs that use it, and
release it.

LoadModel loads exactly what a graph would: it runs the folder's loader node (the node with a
choice input listing that folder, one without links preferred: CheckpointLoaderSimple,
VAELoader, LoraLoader, UpscaleModelLoader, ControlNetLoader, IPAdapterModelLoader,
CLIPVisionLoader, RemoveBackground) in a context whose model() hands back the ModelHandle the
node asks for instead of loading it, and collects handles from the node's outputs too. Those
handles, made by plinth.nodes.core.context.file_model, carry the node's own load function and key
(folder/name@fingerprint), and go to the model manager, so a later graph finds the model loaded.
No per-folder table to keep in step with the nodes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from plinth.clients.v1 import model_service_pb2 as ms
from plinth.clients.v1 import model_service_pb2_grpc as ms_grpc
from plinth.nodes.core.context import ImageRef, ModelHandle, NodeInputError
from plinth.nodes.core.schema import Choice, Node
from plinth.server.components import Components
from plinth.server.model_manager import ModelTooLarge
from plinth.server.storage.model_folders import MODEL_FOLDERS, PickleRefused, UnknownModel, UnsafeModelName

log = logging.getLogger("plinth.models")


class _Asked(BaseException):
    """Raised by _CaptureContext.model() to stop the node at the handle it asked for. A
    BaseException, so a node's `except Exception` cannot swallow it."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle


class _CaptureContext:
    """The NodeContext a loader node runs in for LoadModel: paths and fingerprints as in a job,
    but model() stops the node and hands back the handle instead of loading."""

    def __init__(self, components: Components) -> None:
        resources = components.resources()
        self.device, self.dtype = components.device, components.dtype
        self.model_options = components.executor.model_options
        self.graph: dict[str, Any] = {}
        self.extra_pnginfo: dict[str, Any] = {}
        self.node_id = ""
        self.unet_forward = None
        self.models_dir = resources.models_dir
        self._resources = resources

    def model(self, handle: ModelHandle) -> Any:
        raise _Asked(handle)

    def model_path(self, source: str, name: str) -> Path:
        return self._resources.model_path(source, name)

    def model_fingerprint(self, source: str, name: str) -> str:
        return self._resources.fingerprint(source, name)

    def check_cancelled(self) -> None:
        pass

    def progress(self, step: int, total: int) -> None:
        pass

    def input_image(self, name: str) -> bytes:
        raise NodeInputError("a loader node run for LoadModel has no images")

    def save_image(self, png: bytes, width: int, height: int, prefix: str, kind: str) -> ImageRef:
        raise NodeInputError("a loader node run for LoadModel stores no images")


def loader_node(registry: dict[str, type[Node]], folder: str) -> tuple[type[Node], str] | None:
    """The node that loads models of `folder` and its input naming the model: among the nodes
    with a choice input of that source, the one with the fewest links, then by class_type."""
    found = []
    for cls in registry.values():
        for spec in cls.schema.inputs:
            if isinstance(spec, Choice) and spec.source == folder:
                links = sum(1 for i in cls.schema.inputs if i.is_link)
                found.append((links, cls.schema.class_type, cls, spec.name))
    if not found:
        return None
    _, _, cls, input_name = min(found, key=lambda f: f[:2])
    return cls, input_name


def _node_inputs(cls: type[Node], input_name: str, name: str) -> dict[str, Any]:
    """Inputs for one run of a loader: the model's name, defaults for widgets and None for
    links (the model is asked for before a link is used, or comes out of the outputs)."""
    inputs: dict[str, Any] = {}
    for spec in cls.schema.inputs:
        if spec.name == input_name:
            inputs[spec.name] = name
        elif spec.is_link:
            if not spec.optional:
                inputs[spec.name] = None
        elif spec.has_default:
            inputs[spec.name] = spec.coerce(spec.default)
        elif isinstance(spec, Choice) and spec.options:
            inputs[spec.name] = spec.options[0]
        elif not spec.optional:
            inputs[spec.name] = None
    return inputs


def _handles_in(value: Any, depth: int = 0) -> Iterator[ModelHandle]:
    """ModelHandles inside a node's outputs: directly, in containers or in dataclass fields."""
    if depth > 4:
        return
    if isinstance(value, ModelHandle):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _handles_in(item, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _handles_in(item, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _handles_in(getattr(value, f.name), depth + 1)


def model_handles(components: Components, folder: str, name: str) -> list[ModelHandle]:
    """The handles the folder's loader node makes for `name`, as in a graph (same keys, same
    load functions). Raises LookupError when no node loads the folder."""
    loader = loader_node(components.registry, folder)
    if loader is None:
        raise LookupError(f"no node loads models from {folder}/")
    cls, input_name = loader
    found: list[ModelHandle] = []
    try:
        found.extend(_handles_in(cls().run(_CaptureContext(components), **_node_inputs(cls, input_name, name))))
    except _Asked as asked:
        found.append(asked.handle)
    prefix = f"{folder}/{name}@"
    unique = {h.key: h for h in found if h.key.startswith(prefix)}
    if not unique:
        raise LookupError(f"{cls.schema.class_type} gave no model handle for {folder}/{name}")
    return list(unique.values())


class ModelServicer(ms_grpc.ModelServiceServicer):
    def __init__(self, components: Components) -> None:
        self.components = components

    def _describe(self, folder: str, name: str) -> ms.Model:
        folders = self.components.folders
        entry = {e.key: e for e in self.components.models.loaded()}.get(folders.model_key(folder, name))
        return ms.Model(
            folder=folder,
            name=name,
            size_bytes=folders.model_size(folder, name),
            loaded=entry is not None,
            loaded_bytes=entry.nbytes if entry else 0,
            load_seconds=entry.load_seconds if entry else 0.0,
        )

    def _folder(self, folder: str, context: grpc.ServicerContext) -> str:
        if folder not in MODEL_FOLDERS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown model folder {folder!r}; the folders are {', '.join(MODEL_FOLDERS)}",
            )
        return folder

    def _find(self, folder: str, name: str, context: grpc.ServicerContext) -> None:
        """Abort unless `name` is a loadable model of `folder`."""
        self._folder(folder, context)
        try:
            self.components.folders.find_model(folder, name)
        except UnsafeModelName as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UnknownModel as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except PickleRefused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    def ListModels(self, request, context):
        folders = [self._folder(request.folder, context)] if request.folder else list(MODEL_FOLDERS)
        model_folders = self.components.folders
        loaded = {e.key: e for e in self.components.models.loaded()}
        models = []
        for folder in folders:
            for name, size, key in model_folders.describe_models(folder):
                entry = loaded.get(key)
                models.append(
                    ms.Model(
                        folder=folder,
                        name=name,
                        size_bytes=size,
                        loaded=entry is not None,
                        loaded_bytes=entry.nbytes if entry else 0,
                        load_seconds=entry.load_seconds if entry else 0.0,
                    )
                )
        return ms.ListModelsResponse(models=models)

    def LoadModel(self, request, context):
        folder, name = request.folder, request.name
        self._find(folder, name, context)
        try:
            handles = model_handles(self.components, folder, name)
            for handle in handles:
                self.components.models.get(handle)
        except ModelTooLarge as exc:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{exc} (model_budget_bytes = {self.components.models.budget_bytes} bytes)",
            )
        except torch.OutOfMemoryError as exc:
            self.components.models.free_memory()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory loading {folder}/{name}: {exc}")
        except LookupError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # a damaged file, or one that is not a model of this folder
            log.warning("LoadModel %s/%s failed: %s", folder, name, exc)
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{folder}/{name} did not load: {type(exc).__name__}: {exc}"
            )
        log.info("LoadModel %s/%s: %s", folder, name, ", ".join(h.key for h in handles))
        return self._describe(folder, name)

    def UnloadModel(self, request, context):
        folder, name = request.folder, request.name
        self._folder(folder, context)
        prefix = f"{folder}/{name}@"
        keys = [e.key for e in self.components.models.loaded() if e.key.startswith(prefix)]
        try:
            self.components.folders.find_model(folder, name)
        except UnsafeModelName as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (UnknownModel, PickleRefused) as exc:
            if not keys:  # a file removed or replaced since it was loaded may still be released
                code = (
                    grpc.StatusCode.NOT_FOUND if isinstance(exc, UnknownModel) else grpc.StatusCode.FAILED_PRECONDITION
                )
                context.abort(code, str(exc))
            for key in keys:
                self.components.models.unload(key)
            return ms.Model(folder=folder, name=name)
        for key in keys:
            self.components.models.unload(key)
        log.info("UnloadModel %s/%s: released %s", folder, name, ", ".join(keys) or "nothing (not loaded)")
        return self._describe(folder, name)
