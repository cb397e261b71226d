"""`plinth run GRAPH`: run a graph file and write its images. `run_graph` is the one run path,
shared with `plinth demo`."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from plinth.clients import Client, PlinthError, RunResult
from plinth.clients.cli.common import add_remote_flags, connect, error_json, refused


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run a graph file and write its images")
    p.add_argument("graph", type=Path, help="graph in ComfyUI API format (.json)")
    add_remote_flags(p)
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="NODE_ID.INPUT=VALUE",
        help="override an input; VALUE is read as JSON when it parses, else as text",
    )
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="upload FILE as NAME, for LoadImage",
    )
    p.add_argument("-o", "--output", type=Path, default=Path("out"), help="directory for the PNGs (default: out)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    try:
        graph = apply_sets(load_graph(args.graph.read_text(), str(args.graph)), args.sets)
        inputs = parse_inputs(args.inputs)
    except (OSError, ValueError) as exc:
        print(f"plinth run: {exc}", file=sys.stderr)
        return 2
    return run_graph(connect(args), graph, inputs, args.output, as_json=args.json)


def run_graph(
    client: AbstractContextManager[Client],
    graph: dict[str, Any],
    inputs: dict[str, bytes],
    output: Path,
    *,
    as_json: bool,
) -> int:
    """Run `graph` on the client that entering `client` gives (only then is a server reached, or
    started), write its output PNGs to `output`, print their paths (or with `as_json` one JSON
    object), and return the exit code: 0 completed, 1 failed, cancelled or refused.

    `plinth run` and `plinth demo` both come here, each with its own graph and client."""
    bar = ProgressBar() if sys.stderr.isatty() and not as_json else None
    try:
        with client as connected:
            result = connected.run(graph, inputs=inputs, on_event=bar.update if bar else None, check=False)
    except PlinthError as exc:
        if bar:
            bar.close()
        code = refused(exc)
        if as_json:
            print(
                json.dumps(
                    {
                        "job_id": "",
                        "status": "refused",
                        "code": exc.code,
                        "error": exc.message,
                        "errors": [error_json(e) for e in exc.errors],
                        "outputs": [],
                        "nodes": {},
                    }
                )
            )
        return code
    if bar:
        bar.close()
    paths = write_images(result, output)
    if not as_json:
        for path in paths:
            print(path)
        if paths:
            print(f"wrote {len(paths)} image(s) to {output.resolve()}", file=sys.stderr)
    if result.status != "completed":
        print(f"plinth run: job {result.job_id} {result.status}: {result.error}", file=sys.stderr)
    if as_json:
        print(
            json.dumps(
                {
                    "job_id": result.job_id,
                    "status": result.status,
                    "outputs": [str(p) for p in paths],
                    "nodes": {
                        k: {"class_type": v.class_type, "status": v.status, "seconds": round(v.seconds, 6)}
                        for k, v in result.nodes.items()
                    },
                    **({"error": result.error} if result.error else {}),
                }
            )
        )
    return 0 if result.status == "completed" else 1


def load_graph(text: str, source: str) -> dict[str, Any]:
    """The graph JSON `text` (read from `source`, named in errors) as an object."""
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(graph, dict):
        raise ValueError(f"{source}: a graph is a JSON object of node id -> node")
    return graph


def apply_sets(graph: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply each --set NODE_ID.INPUT=VALUE (VALUE read as JSON when it parses, else as text)."""
    for item in sets:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot or not node_id or not name:
            raise ValueError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE")
        if node_id not in graph or not isinstance(graph[node_id], dict):
            raise ValueError(f"--set {item!r}: the graph has no node {node_id!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        graph[node_id].setdefault("inputs", {})[name] = value
    return graph


def parse_inputs(items: list[str]) -> dict[str, bytes]:
    """Each --input NAME=FILE as NAME -> the file's bytes."""
    inputs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--input {item!r}: expected NAME=FILE")
        inputs[name] = Path(path).read_bytes()
    return inputs


def write_images(result: RunResult, outdir: Path) -> list[Path]:
    refs = [r for r in result.image_refs if r.kind == "output" and r.png]
    if not refs:
        return []
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ref in refs:
        path = outdir / ref.filename
        path.write_bytes(ref.png)
        paths.append(path)
    return paths


class ProgressBar:
    """One line on stderr: the node that runs and its sampler steps."""

    WIDTH = 30

    def __init__(self) -> None:
        self.line = ""

    def update(self, event: Any) -> None:
        kind = event.WhichOneof("kind")
        if kind == "node_started":
            self._show(f"node {event.node_started.node_id} {event.node_started.class_type}")
        elif kind == "progress":
            p = event.progress
            done = int(self.WIDTH * p.step / max(p.total, 1))
            self._show(f"node {p.node_id} [{'#' * done}{'.' * (self.WIDTH - done)}] {p.step}/{p.total}")

    def _show(self, text: str) -> None:
        sys.stderr.write("\r" + text.ljust(len(self.line)))
        sys.stderr.flush()
        self.line = text

    def close(self) -> None:
        if self.line:
            sys.stderr.write("\r" + " " * len(self.line) + "\r")
            sys.stderr.flush()
