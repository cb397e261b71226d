"""`plinth`: the parser, built from each command module's add_parser, and the dispatch.

Importing this module and running a client command imports neither torch, diffusers nor the
node library: the client commands (plinth.clients.cli) never import them, and the server-side
modules here import them only inside the functions that start a server or read the local install.
"""

from __future__ import annotations

import argparse

from plinth.clients.cli import jobs, models, nodes, run, upload
from plinth.server.cli import demo, local, serve


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="plinth", description="gRPC server for ComfyUI API-format image graphs")
    # A client command without --server runs against a server started in this process, which the
    # settings flags (--models, --data, ...) describe.
    root.set_defaults(in_process=local.in_process_client)
    sub = root.add_subparsers(required=True, metavar="COMMAND")
    serve.add_parser(sub)
    local.add_local_flags(run.add_parser(sub))
    local.add_local_flags(nodes.add_parser(sub)).set_defaults(func=_nodes)
    jobs.add_parser(sub)
    local.add_local_flags(models.add_parser(sub)).set_defaults(func=_models)
    local.add_local_flags(upload.add_parser(sub))
    demo.add_parser(sub)
    return root


def _nodes(args: argparse.Namespace) -> int:
    """--markdown reads this install's registry; the listings ask a server."""
    return local.nodes_markdown() if args.markdown else nodes.main(args)


def _models(args: argparse.Namespace) -> int:
    """init makes the embedded models here and list without --server reads the local models directory;
    the rest asks a server."""
    if args.action == "init":
        return local.init_models(args)
    if args.action == "list" and not args.server:
        return local.list_models(args)
    return models.main(args)
