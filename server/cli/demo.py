"""`plinth demo`: start a server in this process and run graphs/txt2img.json on the embedded
tiny-sd, through the same run path as `plinth run`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from plinth.clients.cli.run import run_graph
from plinth.graphs import read
from plinth.server.cli.local import add_local_flags, in_process_client


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="start a server, run graphs/txt2img.json on tiny-sd, write PNGs to ./out")
    p.add_argument("-o", "--output", type=Path, default=Path("out"))
    add_local_flags(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    graph = json.loads(read("txt2img.json"))
    print("plinth demo: starting a server on 127.0.0.1 and running graphs/txt2img.json on tiny-sd", file=sys.stderr)
    return run_graph(in_process_client(args), graph, {}, args.output, as_json=False)
