"""The models directory: which names stand for which files, and what is listed in each folder.

models/        checkpoints/ (diffusers folders, .safetensors), vae/, loras/, embeddings/
               (textual inversion, named in prompts as embedding:NAME), upscale_models/,
               controlnet/ (ControlNets and T2I-Adapters), ipadapter/, clip_vision/, gligen/,
               diffusion_models/ (UNet-only files; also read from the older unet/) (.safetensors),
               rembg/ (.onnx cutout models)
data/converted/  .safetensors copies of pickled model files (only with allow_pickle)

Model names are paths relative to their folder and resolve inside it only: absolute paths,
".." and symlinks that lead outside are refused (UnsafeModelName), as are pickled files
(.ckpt, .pt, .pth, .bin: PickleRefused) unless allow_pickle is set. With allow_pickle, a
pickled file in any folder but rembg/ is listed, read once with torch.load(weights_only=True)
(plain tensors only: no code runs) and kept as a .safetensors copy under data/converted/,
which the folder's loader then reads like any .safetensors file; a diffusers or transformers
folder whose weights are only .bin files loads them itself, also with weights_only=True.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from plinth.nodes.core.context import NodeInputError
from plinth.nodes.models.embedded import EMBEDDED, ensure_embedded

MODEL_SUFFIXES = (".safetensors",)
# Model folders and the file types each holds (ComfyUI's folder names where it has them).
MODEL_FOLDERS = {
    "checkpoints": MODEL_SUFFIXES,
    "vae": MODEL_SUFFIXES,
    "loras": MODEL_SUFFIXES,
    "embeddings": MODEL_SUFFIXES,
    "upscale_models": MODEL_SUFFIXES,
    "controlnet": MODEL_SUFFIXES,
    "ipadapter": MODEL_SUFFIXES,
    "clip_vision": MODEL_SUFFIXES,
    "gligen": MODEL_SUFFIXES,
    "diffusion_models": MODEL_SUFFIXES,
    "text_encoders": MODEL_SUFFIXES,
    "rembg": (".onnx",),
}
# Folders ComfyUI also reads under an older name: their files are listed under the newer one
# (a name found in both resolves to the newer folder's file). The older folder is not created.
LEGACY_FOLDERS = {"diffusion_models": "unet", "text_encoders": "clip"}
# Files torch.load reads with pickle, which can run code: refused unless allow_pickle is set.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Folders whose loaders read single .safetensors files, so a converted pickle loads there.
PICKLE_FOLDERS = frozenset(f for f, suffixes in MODEL_FOLDERS.items() if ".safetensors" in suffixes)


class UnsafeModelName(NodeInputError):
    """A model name that is not a plain relative path inside its folder (gRPC INVALID_ARGUMENT)."""


class UnknownModel(NodeInputError):
    """No such model in the folder, or no such folder (gRPC NOT_FOUND)."""


class PickleRefused(NodeInputError):
    """A pickled model file, and allow_pickle is not set (gRPC FAILED_PRECONDITION)."""


class ModelFolders:
    """Model names resolved inside the models directory, the folders' listings, and the
    fingerprints and sizes the model manager and ModelService report."""

    def __init__(self, models_dir: Path, data_dir: Path, allow_pickle: bool = False) -> None:
        self.models_dir = Path(models_dir).resolve()
        self.converted_dir = Path(data_dir).resolve() / "converted"
        self.allow_pickle = allow_pickle
        for folder in MODEL_FOLDERS:
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)

    def suffixes(self, source: str) -> tuple[str, ...]:
        """The file types listed in a model folder: its own, plus pickles with allow_pickle."""
        extra = PICKLE_SUFFIXES if self.allow_pickle and source in PICKLE_FOLDERS else ()
        return (*MODEL_FOLDERS[source], *extra)

    def models(self, source: str) -> list[str]:
        """Model names in one folder: files of its types, and diffusers folders (marked by
        model_index.json among checkpoints, config.json elsewhere); the embedded models are always checkpoints.
        Symlinks that lead outside the folder are left out (they would be refused)."""
        names = set(EMBEDDED) if source == "checkpoints" else set()
        marker = "model_index.json" if source == "checkpoints" else "config.json"
        suffixes = self.suffixes(source)
        for root in self._roots(source):
            for folder, subfolders, files in os.walk(root):
                here = Path(folder)
                if here != root and (here / marker).exists():
                    names.add(here.relative_to(root).as_posix())
                    subfolders.clear()  # its weight files belong to the folder model
                    continue
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]
                names.update(
                    (here / f).relative_to(root).as_posix()
                    for f in files
                    if not f.startswith(".")
                    and Path(f).suffix in suffixes
                    and (here / f).resolve().is_relative_to(root)
                )
        return sorted(names)

    def _roots(self, source: str) -> list[Path]:
        """The folders a source's models are read from: its own, then its older name where that
        folder exists (LEGACY_FOLDERS)."""
        roots = [(self.models_dir / source).resolve()]
        legacy = LEGACY_FOLDERS.get(source)
        if legacy is not None and (self.models_dir / legacy).is_dir():
            roots.append((self.models_dir / legacy).resolve())
        return roots

    def find_model(self, source: str, name: str) -> Path:
        """The file or folder a model name stands for, resolved inside its folder only (an embedded model:
        where it is or will be made). Raises UnknownModel, UnsafeModelName or PickleRefused."""
        if source not in MODEL_FOLDERS:
            raise UnknownModel(f"unknown model folder {source!r}; the folders are {', '.join(MODEL_FOLDERS)}")
        if source == "checkpoints" and name in EMBEDDED:
            return self.models_dir / "checkpoints" / name
        parts = name.replace("\\", "/").split("/")
        if (
            not name
            or "\0" in name
            or name.startswith(("/", "\\"))
            or (len(name) > 1 and name[1] == ":")
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise UnsafeModelName(
                f"model name {name!r} is not a path inside models/{source}: names are relative "
                "to the folder, without '..', '.', empty parts or a leading '/'"
            )
        for root in self._roots(source):
            path = (root / name).resolve()
            if not path.is_relative_to(root):
                raise UnsafeModelName(
                    f"model {name!r} in {source} leads outside models/{root.name} (a symlink to "
                    f"{path}?); only files inside the models directory load"
                )
            if path.exists():
                break
        else:
            raise UnknownModel(f"unknown model {name!r} in {source}")
        pickled = self._pickled(path)
        if pickled and source not in PICKLE_FOLDERS:
            raise PickleRefused(
                f"model {name!r} in {source} is a pickled file; {source} models load from "
                f"{', '.join(MODEL_FOLDERS[source])} files only, whatever allow_pickle says"
            )
        if pickled and not self.allow_pickle:
            where = (
                "" if pickled == [path] else f" (its {', '.join(p.relative_to(path).as_posix() for p in pickled[:3])})"
            )
            raise PickleRefused(
                f"model {name!r} in {source} is a pickled file{where}, which can run code when "
                "loaded; it is refused unless the server's config sets allow_pickle (allow_pickle = "
                "true in plinth.toml, or PLINTH_ALLOW_PICKLE=1); better, convert it to .safetensors"
            )
        if name not in self.models(source):
            raise UnknownModel(
                f"unknown model {name!r} in {source}: not a model file of this folder "
                f"({', '.join(self.suffixes(source))}, or a diffusers folder)"
            )
        return path

    @staticmethod
    def _pickled(path: Path) -> list[Path]:
        """The pickled weight files a model would be read from: the file itself, or in a folder
        model those beside which no .safetensors file lies (diffusers and transformers read a
        .bin only where no .safetensors is)."""
        if path.is_file():
            return [path] if path.suffix in PICKLE_SUFFIXES else []
        found = []
        for folder, _, files in os.walk(path):
            if not any(f.endswith(".safetensors") for f in files):
                found.extend(Path(folder) / f for f in sorted(files) if Path(f).suffix in PICKLE_SUFFIXES)
        return found

    def model_path(self, source: str, name: str) -> Path:
        """The file or folder for a model name, resolved inside the models directory only (see
        find_model); for a pickled file (allow_pickle), its converted .safetensors copy."""
        if source == "checkpoints" and name in EMBEDDED:
            return ensure_embedded(self.models_dir, name)
        path = self.find_model(source, name)
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            return self._converted(source, name, path)
        return path

    def _converted(self, source: str, name: str, path: Path) -> Path:
        """The .safetensors copy of a pickled model file, made on first use (keyed by the file's
        fingerprint, so a replaced file is converted anew and the old copy removed)."""
        stem = f"{Path(name).stem[:48]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        target = self.converted_dir / source / f"{stem}-{self.model_fingerprint(source, name)[:16]}.safetensors"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            convert_pickle(path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        for old in target.parent.glob(f"{stem}-*.safetensors"):
            if old != target:
                old.unlink(missing_ok=True)
        return target

    def model_fingerprint(self, source: str, name: str) -> str:
        if source == "checkpoints" and name in EMBEDDED:
            return f"embedded:{name}"  # made deterministically; same before and after it exists
        try:
            path = self.find_model(source, name)
        except NodeInputError:
            return ""
        return _fingerprint(path)

    def model_key(self, source: str, name: str) -> str:
        """The model manager's key for a model, as plinth.nodes.core.context.file_model makes it."""
        return f"{source}/{name}@{self.model_fingerprint(source, name)[:16]}"

    def model_size(self, source: str, name: str) -> int:
        """Bytes on disk: the file, or every file of a folder model (0 for tiny-sd not made yet)."""
        return _size(self.find_model(source, name))

    def describe_models(self, source: str) -> list[tuple[str, int, str]]:
        """(name, bytes on disk, model manager key) of every model in a folder, in one walk."""
        roots = self._roots(source)
        out = []
        for name in self.models(source):
            if source == "checkpoints" and name in EMBEDDED:
                out.append((name, _size(roots[0] / name), self.model_key(source, name)))
                continue
            path = next(p for p in ((root / name).resolve() for root in roots) if p.exists())
            out.append((name, _size(path), f"{source}/{name}@{_fingerprint(path)[:16]}"))
        return out


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def _fingerprint(path: Path) -> str:
    """Changes when a model file, or any file of a folder model, is replaced (size, mtime)."""
    stats = [
        (p.relative_to(path).as_posix() if p != path else "", p.stat().st_size, p.stat().st_mtime_ns)
        for p in _files(path)
    ]
    return hashlib.sha256(repr(stats).encode()).hexdigest()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path))


def convert_pickle(path: Path, target: Path) -> None:
    """Write the tensors of a pickled model file to `target` as .safetensors, reading it with
    torch.load(weights_only=True): plain tensors and containers only, so no code in the file
    runs. Lightning-style files keep their weights under "state_dict" (ESRGAN-style ones under
    "params_ema" or "params"), which is unwrapped; a file whose top level holds no tensors but
    dicts of them (A1111's textual inversion: {"string_to_param": {"*": tensor}, "name": ...})
    keeps those as "outer.inner" keys. Raises NodeInputError naming the file."""
    import torch
    from safetensors.torch import save_file

    try:
        try:  # mapped, not read into memory: most files use torch.save's zip format, which allows it
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format
    except Exception as exc:  # refused by the weights-only unpickler, or not a torch file at all
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NodeInputError(
            f"{path.name}: torch.load(weights_only=True) could not read it, so it is not loaded ({reason})"
        ) from None
    state = loaded
    while isinstance(state, dict):
        inner = next((state[k] for k in ("state_dict", "params_ema", "params") if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    tensors = _named_tensors(state) if isinstance(state, dict) else {}
    if not tensors and isinstance(state, dict):
        tensors = {
            f"{outer}.{key}": tensor
            for outer, nested in state.items()
            if isinstance(outer, str) and isinstance(nested, dict)
            for key, tensor in _named_tensors(nested).items()
        }
    if not tensors:
        raise NodeInputError(f"{path.name}: no tensors by name in it (found {type(state).__name__})")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != tensor.nbytes:  # safetensors wants no sharing
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    save_file(out, str(target), metadata={"format": "pt", "converted_from": path.name})


def _named_tensors(state: dict) -> dict:
    """The tensors of a dict by their string keys (other entries: numbers, names, dicts, dropped)."""
    import torch

    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
