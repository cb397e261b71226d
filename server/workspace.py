"""The server's directories: models to load, images to keep, and what one job may see of them.

models/        checkpoints/ (diffusers folders, .safetensors), vae/, loras/, upscale_models/,
               controlnet/, ipadapter/, clip_vision/ (.safetensors), rembg/ (.onnx cutout models)
data/images/   output PNGs, content-addressed (sha256 of the file)
data/inputs/   images a LoadImage may name besides those sent with the request
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

from plinth.nodes.context import ImageRef, ModelHandle, NodeInputError
from plinth.nodes.models.tiny_sd import NAME as TINY_SD, ensure_tiny_sd
from plinth.server.models.manager import ModelManager

MODEL_SUFFIXES = (".safetensors",)
# Model folders and the file types each holds (ComfyUI's folder names where it has them).
MODEL_FOLDERS = {
    "checkpoints": MODEL_SUFFIXES,
    "vae": MODEL_SUFFIXES,
    "loras": MODEL_SUFFIXES,
    "upscale_models": MODEL_SUFFIXES,
    "controlnet": MODEL_SUFFIXES,
    "ipadapter": MODEL_SUFFIXES,
    "clip_vision": MODEL_SUFFIXES,
    "rembg": (".onnx",),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class Workspace:
    def __init__(self, models_dir: Path, data_dir: Path) -> None:
        self.models_dir = Path(models_dir).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.images_dir = self.data_dir / "images"
        self.inputs_dir = self.data_dir / "inputs"
        for folder in (*(self.models_dir / f for f in MODEL_FOLDERS), self.images_dir, self.inputs_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # models

    def models(self, source: str) -> list[str]:
        """Model names in one folder: files of its types, and diffusers folders (marked by
        model_index.json among checkpoints, config.json elsewhere); tiny-sd is always a checkpoint."""
        root = self.models_dir / source
        names = {TINY_SD} if source == "checkpoints" else set()
        marker = "model_index.json" if source == "checkpoints" else "config.json"
        for folder, subfolders, files in os.walk(root):
            here = Path(folder)
            if here != root and (here / marker).exists():
                names.add(here.relative_to(root).as_posix())
                subfolders.clear()  # its weight files belong to the folder model
                continue
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            names.update((here / f).relative_to(root).as_posix() for f in files
                         if not f.startswith(".") and Path(f).suffix in MODEL_FOLDERS[source])
        return sorted(names)

    def model_path(self, source: str, name: str) -> Path:
        """The file or folder for a model name, resolved inside the models directory only."""
        if source == "checkpoints" and name == TINY_SD:
            return ensure_tiny_sd(self.models_dir)
        root = (self.models_dir / source).resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or name not in self.choices(source):
            raise NodeInputError(f"unknown model {name!r} in {source}")
        return path

    def model_fingerprint(self, source: str, name: str) -> str:
        if source == "checkpoints" and name == TINY_SD:
            return f"embedded:{TINY_SD}"  # made deterministically; same before and after it exists
        try:
            path = self.model_path(source, name)
        except NodeInputError:
            return ""
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stats = [(p.relative_to(path).as_posix() if p != path else "", p.stat().st_size, p.stat().st_mtime_ns)
                 for p in files]
        return hashlib.sha256(repr(stats).encode()).hexdigest()

    def choices(self, source: str) -> list[str]:
        if source in MODEL_FOLDERS:
            return self.models(source)
        if source == "input_images":
            return sorted(p.name for p in self.inputs_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        raise KeyError(f"unknown choice source {source!r}")

    # images

    def save_image(self, png: bytes, width: int, height: int, prefix: str, kind: str) -> ImageRef:
        """Keep an output PNG under its content hash; previews are not written to disk."""
        digest = hashlib.sha256(png).hexdigest()
        if kind == "output":
            path = self.images_dir / f"{digest}.png"
            if not path.exists():
                tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex}")
                tmp.write_bytes(png)
                os.replace(tmp, path)
        safe_prefix = "".join(c if c.isalnum() or c in "-_" else "_" for c in prefix)[:64] or "image"
        return ImageRef(digest, f"{safe_prefix}_{digest[:12]}.png", width, height, png, kind)

    def read_image(self, image_id: str) -> bytes | None:
        if len(image_id) != 64 or any(c not in "0123456789abcdef" for c in image_id):
            return None
        path = self.images_dir / f"{image_id}.png"
        return path.read_bytes() if path.exists() else None


class JobResources:
    """One job's view: the workspace, the model manager and the images sent with the request.

    Serves both validation (plinth.nodes.context.ValidationEnv) and execution (Resources).
    """

    def __init__(self, workspace: Workspace, models: ModelManager, inputs: dict[str, bytes]) -> None:
        self.workspace = workspace
        self.models = models
        self.inputs = inputs
        self.models_dir = workspace.models_dir
        self.model_path = workspace.model_path
        self.save_image = workspace.save_image

    def model(self, handle: ModelHandle) -> Any:
        return self.models.get(handle)

    def choices(self, source: str) -> list[str]:
        names = self.workspace.choices(source)
        if source == "input_images":
            names = sorted(set(names) | set(self.inputs))
        return names

    def fingerprint(self, source: str, name: str) -> str:
        if source == "input_images":
            try:
                return hashlib.sha256(self.input_image(name)).hexdigest()
            except NodeInputError:
                return ""
        return self.workspace.model_fingerprint(source, name)

    def input_image(self, name: str) -> bytes:
        if name in self.inputs:
            return self.inputs[name]
        path = self.workspace.inputs_dir / name
        if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
            raise NodeInputError(f"unknown input image {name!r}")
        return path.read_bytes()
