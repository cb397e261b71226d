"""AssetService: images in and out in chunks, past gRPC's per-message size.

Upload streams into a hidden file in data/inputs while hashing, refuses as soon as the bytes
pass limits.max_upload_bytes, then checks the file by the same rules as images sent inline
(plinth.server.api.uploads.check_image) and moves it to data/inputs/<sha256>.<png|jpg|webp>. A
graph's LoadImage names it by that sha256 (the asset id); see AssetStore.input_names and
JobResources.input_image. Download streams a stored output image or an uploaded asset.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

import grpc
from PIL import Image

from plinth.clients.v1 import asset_service_pb2 as asp
from plinth.clients.v1 import asset_service_pb2_grpc as asp_grpc
from plinth.server.api.uploads import ImageRefused, check_image
from plinth.server.config import Limits
from plinth.server.storage.assets import ASSET_FORMATS, AssetStore, is_sha256

log = logging.getLogger("plinth.assets")

CHUNK_BYTES = 1 << 20  # per Download message, or less when max_message_bytes is smaller
MAX_NAME_CHARS = 1024


class AssetServicer(asp_grpc.AssetServiceServicer):
    def __init__(self, assets: AssetStore, limits: Limits) -> None:
        self.assets = assets
        self.limits = limits

    def Upload(self, request_iterator: Iterator[asp.UploadChunk], context: grpc.ServicerContext) -> asp.Asset:
        limits = self.limits
        partial = self.assets.upload_file()
        digest, size, name = hashlib.sha256(), 0, None
        try:
            with open(partial, "wb") as out:
                for chunk in request_iterator:
                    if name is None:
                        if not chunk.name:
                            context.abort(
                                grpc.StatusCode.INVALID_ARGUMENT, "the first upload chunk must carry the file name"
                            )
                        if len(chunk.name) > MAX_NAME_CHARS:
                            context.abort(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"file name of {len(chunk.name)} characters; at most {MAX_NAME_CHARS}",
                            )
                        name = chunk.name
                    elif chunk.name:
                        context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "only the first upload chunk carries a file name; later ones carry data only",
                        )
                    size += len(chunk.data)
                    if size > limits.max_upload_bytes:
                        context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"upload {name!r} passed the limit of {limits.max_upload_bytes} bytes "
                            f"(limits.max_upload_bytes) at {size} bytes; refused",
                        )
                    digest.update(chunk.data)
                    out.write(chunk.data)
            if name is None:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "an upload needs at least one chunk, with the file name"
                )
            if size == 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"upload {name!r} is empty")
            try:
                info = check_image(partial, name, limits)
            except ImageRefused as exc:
                code = (
                    grpc.StatusCode.RESOURCE_EXHAUSTED
                    if exc.code == "limit_exceeded"
                    else grpc.StatusCode.INVALID_ARGUMENT
                )
                context.abort(code, str(exc))
                raise  # abort raises; this line only satisfies type checkers
            asset_id = digest.hexdigest()
            self.assets.keep_asset(partial, asset_id, info.format)
        finally:
            partial.unlink(missing_ok=True)
        log.info(
            "stored upload %r as asset %s (%d bytes, %s %dx%d)",
            name,
            asset_id,
            size,
            info.format,
            info.width,
            info.height,
        )
        return asp.Asset(
            id=asset_id, name=name, size=size, width=info.width, height=info.height, format=info.format, kind="input"
        )

    def Download(self, request: asp.DownloadRequest, context: grpc.ServicerContext) -> Iterator[asp.DownloadChunk]:
        if not is_sha256(request.id):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"asset id {request.id[:80]!r} is not a sha256 (64 lower-case hex digits)",
            )
        found = self.assets.stored_file(request.id)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no stored image or uploaded asset {request.id!r}")
        path, kind = found
        with open(path, "rb") as source:
            with Image.open(source) as picture:  # the header only
                width, height = picture.size
            source.seek(0, 2)
            size = source.tell()
            source.seek(0)
            asset = asp.Asset(
                id=request.id,
                name=path.name,
                size=size,
                width=width,
                height=height,
                format=ASSET_FORMATS.get(path.suffix, "PNG"),
                kind=kind,
            )
            first = True
            chunk = max(1 << 12, min(CHUNK_BYTES, self.limits.max_message_bytes - (1 << 12)))
            while True:
                data = source.read(chunk)
                if not data and not first:
                    return
                yield asp.DownloadChunk(asset=asset, data=data) if first else asp.DownloadChunk(data=data)
                first = False
