"""`plinth upload FILE`: send an image to a server in chunks and print its asset id, the name a
graph's LoadImage uses for it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from plinth.clients import PlinthError
from plinth.clients.cli.common import add_remote_flags, connect, refused, usage


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "upload",
        help="upload an image to a server in chunks and print its asset id, the name a graph's LoadImage uses for it",
    )
    p.add_argument("file", type=Path, help="PNG, JPEG or WebP")
    p.add_argument("--name", help="file name sent with it (default: FILE's name)")
    p.add_argument(
        "--json", action="store_true", help="print the asset as JSON (id, name, size, width, height, format)"
    )
    add_remote_flags(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    # Without --server the asset goes to an in-process server's data directory, which only
    # outlives the command when --data names it.
    if not args.server and getattr(args, "data", None) is None:
        return usage("upload: --server HOST:PORT is needed (or --data DIR, to store it in a local data directory)")
    if not args.file.is_file():
        return usage(f"upload: {args.file}: no such file")
    try:
        with connect(args) as client:
            asset = client.upload_asset(args.file, name=args.name)
    except PlinthError as exc:
        return refused(exc)
    except OSError as exc:
        return usage(f"upload: {exc}")
    if args.json:
        print(
            json.dumps(
                {
                    "id": asset.id,
                    "name": asset.name,
                    "size": asset.size,
                    "width": asset.width,
                    "height": asset.height,
                    "format": asset.format,
                }
            )
        )
    else:
        print(asset.id)
    return 0
