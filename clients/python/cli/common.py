"""What every client command shares: the connection flags, the client they give, and how
refusals and usage errors are printed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from plinth.clients import TLS, Client, PlinthError

# Starts a server in this process for one command and yields a Client of it (set by the command
# line's main as `args.in_process`; absent, a command needs --server).
InProcess = Callable[[argparse.Namespace], AbstractContextManager[Client]]


def add_remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="HOST:PORT of a running server (default: an in-process server)")
    p.add_argument("--token", help="bearer token for --server (default: $PLINTH_TOKEN)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate to check a TLS --server with")
    p.add_argument("--tls-cert", type=Path, help="client certificate, for a server that wants mutual TLS")
    p.add_argument("--tls-key", type=Path, help="client private key, with --tls-cert")


@contextmanager
def connect(args: argparse.Namespace) -> Iterator[Client]:
    """A client of --server (with --token / $PLINTH_TOKEN and the TLS flags), or of a server
    started in this process for the command."""
    if getattr(args, "server", None):
        tls = TLS(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca or args.tls_cert else None
        with Client(args.server, token=args.token, tls=tls) as client:
            yield client
        return
    in_process: InProcess | None = getattr(args, "in_process", None)
    if in_process is None:
        raise PlinthError("INVALID_ARGUMENT", "--server HOST:PORT is needed")
    with in_process(args) as client:
        yield client


def usage(message: str) -> int:
    print(f"plinth: {message}", file=sys.stderr)
    return 2


def refused(exc: PlinthError) -> int:
    """Print a refusal (its gRPC code, first line, and every node error) and return 1."""
    print(f"plinth: {exc.code}: {exc.message.splitlines()[0] if exc.message else ''}", file=sys.stderr)
    for e in exc.errors:
        where = f"node {e.node_id} ({e.class_type})" if e.node_id else "graph"
        if e.input:
            where += f" input {e.input!r}"
        print(f"  {where}: [{e.code}] {e.message}", file=sys.stderr)
    return 1


def error_json(error: Any) -> dict[str, str]:
    return {
        "node_id": error.node_id,
        "class_type": error.class_type,
        "input": error.input,
        "code": error.code,
        "message": error.message,
    }


def size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""
