"""`plinth models list|load|unload --server`: a server's models, which are loaded, and loading
or unloading one. (`models init` and `models list` without --server read the local models
directory: the server side of the command line answers those.)"""

from __future__ import annotations

import argparse
import json
from typing import Any

from plinth.clients import PlinthError
from plinth.clients.cli.common import add_remote_flags, connect, refused, size, usage


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "models",
        help="list the models (of --server: which are loaded), load or unload one "
        "on a server, or make the embedded tiny-sd",
    )
    p.add_argument("action", choices=["list", "init", "load", "unload"])
    p.add_argument(
        "model",
        nargs="?",
        metavar="FOLDER/NAME",
        help="for load and unload, e.g. checkpoints/tiny-sd or loras/style.safetensors",
    )
    p.add_argument("--folder", default="", help="list: only this folder (checkpoints, vae, loras, ...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_remote_flags(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """list, load or unload on --server."""
    if args.action in ("load", "unload"):
        folder, _, name = (args.model or "").partition("/")
        if not folder or not name:
            return usage(f"models {args.action}: expected FOLDER/NAME, e.g. checkpoints/tiny-sd")
        if not args.server:
            return usage(f"models {args.action}: --server HOST:PORT is needed (models load into a running server)")
    try:
        with connect(args) as client:
            if args.action == "list":
                models = client.list_models(args.folder)
            elif args.action == "load":
                models = [client.load_model(folder, name)]
            else:
                models = [client.unload_model(folder, name)]
    except PlinthError as exc:
        return refused(exc)
    rows = [
        {
            "folder": m.folder,
            "name": m.name,
            "size_bytes": m.size_bytes,
            "loaded": m.loaded,
            "loaded_bytes": m.loaded_bytes,
            "load_seconds": round(m.load_seconds, 3),
        }
        for m in models
    ]
    if args.json:
        print(json.dumps(rows if args.action == "list" else rows[0]))
        return 0
    for row in rows:
        state = f"loaded ({size(row['loaded_bytes'])} in memory)" if row["loaded"] else "not loaded"
        print(f"{row['folder']}/{row['name']}  {size(row['size_bytes'])}  {state}")
    return 0
