"""The command line's local side: the settings flags, a server started in this process for one
command, and what reads the local install (the models directory, the node registry).

Everything heavy (torch, diffusers, the server, the nodes) is imported inside the functions, so
building the parser stays fast for the client commands.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plinth.clients import Client
from plinth.clients.cli.common import size, usage
from plinth.server.config import DEFAULT_HOME


def add_local_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The settings of a server this command starts (or, for serve, is); returns `p`."""
    p.add_argument("--config", type=Path, help="TOML settings file (flags and PLINTH_* variables override it)")
    p.add_argument("--models", type=Path, help=f"models directory (default: {DEFAULT_HOME / 'models'})")
    p.add_argument("--data", type=Path, help=f"data directory: images, inputs (default: {DEFAULT_HOME / 'data'})")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype models run in (default: auto = float16 on CUDA, float32 on the CPU)",
    )
    return p


def quiet_libraries() -> None:
    """diffusers and transformers print progress bars and advice on every load; a server logs instead."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def config(args: argparse.Namespace, **flags: object) -> Any:
    """Settings: the --config file, then PLINTH_* variables, then this command's flags."""
    from plinth.server.config import load

    return load(
        args.config,
        flags={
            "models_dir": args.models,
            "data_dir": args.data,
            "device": args.device,
            "precision": args.precision,
            **flags,
        },
    )


def command_server(args: argparse.Namespace) -> Any:
    """A server of this command's own: on 127.0.0.1, a free port, no tokens or TLS (only this
    process talks to it), and its own data directory unless --data names one (a `plinth serve`
    may hold the default)."""
    quiet_libraries()
    from dataclasses import replace

    from plinth.server.app import PlinthServer
    from plinth.server.config import Auth

    settings = replace(config(args), host="127.0.0.1", port=0, auth=Auth(), metrics_port=0)
    if args.data is None:
        settings = replace(settings, data_dir=Path(tempfile.mkdtemp(prefix="plinth-run-")))
    return PlinthServer(settings)


@contextmanager
def in_process_client(args: argparse.Namespace) -> Iterator[Client]:
    """A client of a server started for this one command, stopped (and its temporary data
    directory removed) when the command ends."""
    server = command_server(args).start()
    try:
        with Client(server.address, token="") as client:
            yield client
    finally:
        server.stop(grace=0)
        if args.data is None:  # the temporary data directory command_server made
            shutil.rmtree(server.config.data_dir, ignore_errors=True)


def init_models(args: argparse.Namespace) -> int:
    """`plinth models init`: make the embedded models (tiny-sd, tiny-sdxl, tiny-sdxl-refiner,
    tiny-flux) in the models directory."""
    from plinth.nodes.models.embedded import EMBEDDED, ensure_embedded

    quiet_libraries()
    models_dir = config(args).models_dir.resolve()
    for name in EMBEDDED:
        print(f"{name} is at {ensure_embedded(models_dir, name)}")
    return 0


def list_models(args: argparse.Namespace) -> int:
    """`plinth models list` without --server: the local models directory, without torch."""
    from plinth.server.storage.model_folders import MODEL_FOLDERS, ModelFolders

    settings = config(args)
    if args.folder and args.folder not in MODEL_FOLDERS:
        return usage(f"models list: unknown folder {args.folder!r}; the folders are {', '.join(MODEL_FOLDERS)}")
    folders = ModelFolders(settings.models_dir, settings.data_dir, allow_pickle=settings.allow_pickle)
    rows = [
        {"folder": folder, "name": name, "size_bytes": nbytes}
        for folder in ([args.folder] if args.folder else MODEL_FOLDERS)
        for name, nbytes, _ in folders.describe_models(folder)
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        print(f"{row['folder']}/{row['name']}  {size(row['size_bytes'])}")
    return 0


def nodes_markdown() -> int:
    """`plinth nodes --markdown`: the docs/nodes.md table from this install's registry."""
    from plinth.nodes.core.registry import NODES
    from plinth.server.docs import nodes_markdown as markdown

    sys.stdout.write(markdown(NODES))
    return 0
