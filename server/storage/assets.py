"""Images kept on disk: outputs the jobs made, and images clients uploaded.

data/images/   output PNGs, content-addressed: <sha256 of the file>.png
data/inputs/   images a LoadImage may name besides those sent with the request: files put there
               by hand, named by their file name, and uploaded assets (AssetService.Upload),
               stored as <sha256>.png|.jpg|.webp and named by their id, the bare 64-hex sha256
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

from plinth.nodes.core.context import ImageRef, NodeInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# How an uploaded asset of each format is stored in data/inputs (<sha256><suffix>).
ASSET_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}
ASSET_FORMATS = {suffix: kind for kind, suffix in ASSET_SUFFIXES.items()}
UPLOAD_PREFIX = ".upload-"  # partial uploads in data/inputs, never listed
STALE_UPLOAD_SECONDS = 3600.0


def is_sha256(value: str) -> bool:
    """Whether `value` is a sha256 in lower-case hex: an output image's or an asset's id."""
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class AssetStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.images_dir = self.data_dir / "images"
        self.inputs_dir = self.data_dir / "inputs"
        for folder in (self.images_dir, self.inputs_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def input_names(self) -> list[str]:
        """Names a LoadImage may give for images in data/inputs: uploaded assets by id, other
        files by file name."""
        names = set()
        for path in self.inputs_dir.iterdir():
            suffix = path.suffix.lower()
            if path.name.startswith(".") or suffix not in IMAGE_SUFFIXES:
                continue
            names.add(path.stem if is_sha256(path.stem) and path.suffix in ASSET_FORMATS else path.name)
        return sorted(names)

    def read_input(self, name: str) -> bytes:
        """An uploaded asset by its id, or a file in data/inputs by its name; NodeInputError if none."""
        asset = self.asset_path(name)
        if asset is not None:
            return asset.read_bytes()
        path = self.inputs_dir / name
        if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
            raise NodeInputError(f"unknown input image {name!r}")
        return path.read_bytes()

    def upload_file(self) -> Path:
        """A fresh path for an upload in progress: hidden, never listed. Partial uploads a
        crashed process left, untouched for STALE_UPLOAD_SECONDS, are removed here."""
        cutoff = time.time() - STALE_UPLOAD_SECONDS
        for stale in self.inputs_dir.glob(f"{UPLOAD_PREFIX}*"):
            try:
                if stale.stat().st_mtime < cutoff:
                    stale.unlink(missing_ok=True)
            except OSError:
                pass
        return self.inputs_dir / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}"

    def keep_asset(self, upload: Path, digest: str, kind: str) -> Path:
        """Move a finished, checked upload to its content address; the same bytes twice are one file."""
        path = self.inputs_dir / f"{digest}{ASSET_SUFFIXES[kind]}"
        if path.exists():
            upload.unlink(missing_ok=True)
        else:
            os.replace(upload, path)
        return path

    def asset_path(self, asset_id: str) -> Path | None:
        """The stored file of an uploaded asset, by id (its sha256), or None."""
        if not is_sha256(asset_id):
            return None
        return next((p for s in ASSET_SUFFIXES.values() if (p := self.inputs_dir / f"{asset_id}{s}").is_file()), None)

    def stored_file(self, image_id: str) -> tuple[Path, str] | None:
        """An output image ("output") or an uploaded asset ("input") by id, or None."""
        if not is_sha256(image_id):
            return None
        output = self.images_dir / f"{image_id}.png"
        if output.is_file():
            return output, "output"
        asset = self.asset_path(image_id)
        return (asset, "input") if asset is not None else None

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
        if not is_sha256(image_id):
            return None
        path = self.images_dir / f"{image_id}.png"
        return path.read_bytes() if path.exists() else None
