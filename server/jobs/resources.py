"""One job's view of the server's storage and models: the model folders, the asset store, the
model manager and the images sent with the request.

Serves both validation (plinth.nodes.core.context.ValidationEnv) and execution
(plinth.server.engine.executor.Resources); ModelService and NodeService use one without
request images for the same listings.
"""

from __future__ import annotations

import hashlib
from typing import Any

from plinth.nodes.core.context import ModelHandle, NodeInputError
from plinth.server.model_manager import ModelManager
from plinth.server.storage.assets import AssetStore
from plinth.server.storage.model_folders import MODEL_FOLDERS, ModelFolders


class JobResources:
    def __init__(
        self, folders: ModelFolders, assets: AssetStore, models: ModelManager, inputs: dict[str, bytes] | None = None
    ) -> None:
        self.folders = folders
        self.assets = assets
        self.models = models
        self.inputs = {} if inputs is None else inputs
        self.models_dir = folders.models_dir
        self.model_path = folders.model_path
        self.save_image = assets.save_image

    def model(self, handle: ModelHandle) -> Any:
        return self.models.get(handle)

    def choices(self, source: str) -> list[str]:
        """Names for a dynamic choice list: a model folder's models, or for "input_images" the
        stored input images and those sent with the request."""
        if source in MODEL_FOLDERS:
            return self.folders.models(source)
        if source == "input_images":
            return sorted(set(self.assets.input_names()) | set(self.inputs))
        raise KeyError(f"unknown choice source {source!r}")

    def fingerprint(self, source: str, name: str) -> str:
        if source == "input_images":
            try:
                return hashlib.sha256(self.input_image(name)).hexdigest()
            except NodeInputError:
                return ""
        return self.folders.model_fingerprint(source, name)

    def input_image(self, name: str) -> bytes:
        """An image sent with the request, an uploaded asset by its id, or a file in data/inputs."""
        if name in self.inputs:
            return self.inputs[name]
        return self.assets.read_input(name)
