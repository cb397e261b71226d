"""The `plinth` command line.

Client commands (run, nodes, jobs, upload, and models list|load|unload with --server) import
neither torch nor diffusers, so they start fast; the server and in-process modes import them
only when they start a server.
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

from plinth.server.config import DEFAULT_HOME


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plinth", description="gRPC server for ComfyUI API-format image graphs")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def dirs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML settings file (flags and PLINTH_* variables override it)")
        p.add_argument("--models", type=Path, help=f"models directory (default: {DEFAULT_HOME / 'models'})")
        p.add_argument("--data", type=Path, help=f"data directory: images, inputs (default: {DEFAULT_HOME / 'data'})")
        p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: auto)")
        p.add_argument(
            "--precision",
            choices=("auto", "float32", "bfloat16", "float16"),
            help="dtype models run in (default: auto = float16 on CUDA, float32 on the CPU)",
        )

    def remote(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", help="HOST:PORT of a running server (default: an in-process server)")
        p.add_argument("--token", help="bearer token for --server (default: $PLINTH_TOKEN)")
        p.add_argument("--tls-ca", type=Path, help="CA certificate to check a TLS --server with")
        p.add_argument("--tls-cert", type=Path, help="client certificate, for a server that wants mutual TLS")
        p.add_argument("--tls-key", type=Path, help="client private key, with --tls-cert")

    p = sub.add_parser("serve", help="run the gRPC server")
    p.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: 50051; 0 picks one)")
    p.add_argument("--token-file", type=Path, help="bearer tokens, one per line (required off loopback)")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); with --tls-key serves TLS only")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="CA that client certificates must be signed by (mutual TLS)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    p.add_argument(
        "--batch-jobs",
        type=int,
        metavar="N",
        help="run up to N jobs side by side, their sampler steps batched (default: 0 = 8 on CUDA, 1 on the CPU)",
    )
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile each UNet as it loads")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line, with the job id")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error (default: info)")
    dirs(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="run a graph file and write its images")
    p.add_argument("graph", type=Path, help="graph in ComfyUI API format (.json)")
    remote(p)
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
    dirs(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("nodes", help="list the nodes and their schemas")
    remote(p)
    p.add_argument("--json", action="store_true", help="an object keyed by class_type")
    p.add_argument("--markdown", action="store_true", help="the docs/nodes.md table, from this install's registry")
    dirs(p)
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("jobs", help="list, show or cancel jobs on a server")
    p.add_argument("action", choices=["list", "get", "cancel"])
    p.add_argument("job_id", nargs="?", help="for get and cancel")
    p.add_argument("--status", action="append", default=[], help="list: only these statuses (repeatable)")
    p.add_argument("--limit", type=int, default=20, help="list: how many, newest first (default: 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    remote(p)
    p.set_defaults(func=cmd_jobs)

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
    remote(p)
    dirs(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "upload",
        help="upload an image to a server in chunks and print its asset id, the name a graph's LoadImage uses for it",
    )
    p.add_argument("file", type=Path, help="PNG, JPEG or WebP")
    p.add_argument("--name", help="file name sent with it (default: FILE's name)")
    p.add_argument(
        "--json", action="store_true", help="print the asset as JSON (id, name, size, width, height, format)"
    )
    remote(p)
    dirs(p)
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("demo", help="start a server, run graphs/txt2img.json on tiny-sd, write PNGs to ./out")
    p.add_argument("-o", "--output", type=Path, default=Path("out"))
    dirs(p)
    p.set_defaults(func=cmd_demo)
    return parser


# server side


def _quiet_libraries() -> None:
    """diffusers and transformers print progress bars and advice on every load; a server logs instead."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _config(args: argparse.Namespace, **flags: object):
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


def _server(args: argparse.Namespace, **flags: object):
    """`plinth serve`'s server, or for another command one of its own: on 127.0.0.1, a free
    port, no tokens or TLS (only this process talks to it)."""
    _quiet_libraries()
    from dataclasses import replace

    from plinth.server.app import PlinthServer
    from plinth.server.config import Auth

    if flags:
        return PlinthServer(_config(args, **flags))
    # Its own data directory unless --data names one: a `plinth serve` may hold the default.
    config = replace(_config(args), host="127.0.0.1", port=0, auth=Auth(), metrics_port=0)
    if args.data is None:
        config = replace(config, data_dir=Path(tempfile.mkdtemp(prefix="plinth-run-")))
    return PlinthServer(config)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from plinth.server import logs
    from plinth.server.config import ConfigError
    from plinth.server.jobs.store import StoreError

    logs.configure(json=args.log_json, level=args.log_level)
    try:
        server = _server(
            args,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            batch_jobs=args.batch_jobs,
            compile=args.compile,
            **{
                "auth.token_file": args.token_file,
                "auth.tls_cert": args.tls_cert,
                "auth.tls_key": args.tls_key,
                "auth.tls_client_ca": args.tls_client_ca,
            },
        ).start()
    except (ConfigError, StoreError) as exc:
        print(f"plinth serve: {exc}", file=sys.stderr)
        return 2
    print(f"plinth serving on {server.address}", file=sys.stderr, flush=True)
    stopping = threading.Event()

    def stop(*_: object) -> None:  # SIGTERM or Ctrl-C: finish the running job within the grace period
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.stop, name="plinth-shutdown").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait()
    return 0


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    """A client of --server (with --token / $PLINTH_TOKEN and the TLS flags), or of a server
    started in this process for the command."""
    from plinth.clients import TLS, Client

    if getattr(args, "server", None):
        tls = TLS(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca or args.tls_cert else None
        with Client(args.server, token=args.token, tls=tls) as client:
            yield client
        return
    server = _server(args).start()
    try:
        with Client(server.address, token="") as client:
            yield client
    finally:
        server.stop(grace=0)
        if args.data is None:  # the temporary data directory _server made
            shutil.rmtree(server.config.data_dir, ignore_errors=True)


# client side


def cmd_models(args: argparse.Namespace) -> int:
    """`list` reads the local models directory (no torch), or with --server asks the server,
    which also says what is loaded; `load` and `unload` act on --server; `init` makes tiny-sd."""
    from plinth.clients import PlinthError

    if args.action == "init":
        from plinth.nodes.models.tiny_sd import ensure_tiny_sd

        _quiet_libraries()
        print(f"tiny-sd is at {ensure_tiny_sd(_config(args).models_dir.resolve())}")
        return 0
    if args.action in ("load", "unload"):
        folder, _, name = (args.model or "").partition("/")
        if not folder or not name:
            return _usage(f"models {args.action}: expected FOLDER/NAME, e.g. checkpoints/tiny-sd")
        if not args.server:
            return _usage(f"models {args.action}: --server HOST:PORT is needed (models load into a running server)")
    elif not args.server:
        return _list_local_models(args)
    try:
        with _client(args) as client:
            if args.action == "list":
                models = client.list_models(args.folder)
            else:
                models = [getattr(client, f"{args.action}_model")(folder, name)]
    except PlinthError as exc:
        return _refused(exc)
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
        state = f"loaded ({_size(row['loaded_bytes'])} in memory)" if row["loaded"] else "not loaded"
        print(f"{row['folder']}/{row['name']}  {_size(row['size_bytes'])}  {state}")
    return 0


def _list_local_models(args: argparse.Namespace) -> int:
    from plinth.server.workspace import MODEL_FOLDERS, Workspace

    config = _config(args)
    if args.folder and args.folder not in MODEL_FOLDERS:
        return _usage(f"models list: unknown folder {args.folder!r}; the folders are {', '.join(MODEL_FOLDERS)}")
    workspace = Workspace(config.models_dir, config.data_dir, allow_pickle=config.allow_pickle)
    rows = [
        {"folder": folder, "name": name, "size_bytes": size}
        for folder in ([args.folder] if args.folder else MODEL_FOLDERS)
        for name, size, _ in workspace.describe_models(folder)
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        print(f"{row['folder']}/{row['name']}  {_size(row['size_bytes'])}")
    return 0


def _size(nbytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def cmd_upload(args: argparse.Namespace) -> int:
    from plinth.clients import PlinthError

    if not args.server and args.data is None:
        return _usage("upload: --server HOST:PORT is needed (or --data DIR, to store it in a local data directory)")
    if not args.file.is_file():
        return _usage(f"upload: {args.file}: no such file")
    try:
        with _client(args) as client:
            asset = client.upload_asset(args.file, name=args.name)
    except PlinthError as exc:
        return _refused(exc)
    except OSError as exc:
        return _usage(f"upload: {exc}")
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


def cmd_nodes(args: argparse.Namespace) -> int:
    from plinth.clients import PlinthError

    if args.markdown:
        from plinth.nodes.core.registry import NODES
        from plinth.server.docs import nodes_markdown

        sys.stdout.write(nodes_markdown(NODES))
        return 0
    try:
        with _client(args) as client:
            schemas = client.list_nodes()
    except PlinthError as exc:
        return _refused(exc)
    if args.json:
        print(json.dumps({s.class_type: _schema_json(s) for s in schemas}, indent=1))
        return 0
    for s in sorted(schemas, key=lambda s: (s.category, s.class_type)):
        ins = ", ".join(i.name for i in s.inputs)
        outs = ", ".join(o.type for o in s.outputs) or "(output node)"
        print(f"{s.category:<14} {s.class_type:<24} ({ins}) -> {outs}")
    return 0


def _schema_json(schema: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(schema, preserving_proto_field_name=True)
    for item in data.get("inputs", []):
        if "default_json" in item:
            item["default"] = json.loads(item.pop("default_json"))
    return data


def cmd_jobs(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from plinth.clients import PlinthError

    if args.action != "list" and not args.job_id:
        print(f"plinth jobs {args.action}: a job id is needed", file=sys.stderr)
        return 2
    if not args.server:
        print("plinth jobs: --server HOST:PORT is needed (jobs live in a running server)", file=sys.stderr)
        return 2
    try:
        with _client(args) as client:
            if args.action == "list":
                jobs = list(client.list_jobs(statuses=args.status, page_size=args.limit).jobs)
            elif args.action == "get":
                jobs = [client.get_job(args.job_id)]
            else:
                jobs = [client.cancel(args.job_id)]
    except (PlinthError, KeyError) as exc:
        return _refused(exc) if isinstance(exc, PlinthError) else _usage(f"unknown status {exc}")
    if args.json:
        found = [MessageToDict(j, preserving_proto_field_name=True) for j in jobs]
        print(json.dumps(found if args.action == "list" else found[0]))
        return 0
    for job in jobs:
        status = job.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[job.status].name
        status = status.removeprefix("JOB_STATUS_").lower()
        print(f"{job.job_id}  {status:<9}  {len(job.outputs)} output(s)  {job.error}".rstrip())
    return 0


def _usage(message: str) -> int:
    print(f"plinth: {message}", file=sys.stderr)
    return 2


def cmd_demo(args: argparse.Namespace) -> int:
    from plinth.graphs import read

    graph = read("txt2img.json")
    args.graph, args.graph_text, args.sets, args.inputs, args.json = None, graph, [], [], False
    args.server = args.token = args.tls_ca = args.tls_cert = args.tls_key = None
    print("plinth demo: starting a server on 127.0.0.1 and running graphs/txt2img.json on tiny-sd", file=sys.stderr)
    return cmd_run(args)


def cmd_run(args: argparse.Namespace) -> int:
    from plinth.clients import PlinthError

    try:
        graph = _apply_sets(_load_graph(args), args.sets)
        inputs = _parse_inputs(args.inputs)
    except (OSError, ValueError) as exc:
        print(f"plinth run: {exc}", file=sys.stderr)
        return 2
    bar = _ProgressBar() if sys.stderr.isatty() and not args.json else None
    try:
        with _client(args) as client:
            result = client.run(graph, inputs=inputs, on_event=bar.update if bar else None, check=False)
    except PlinthError as exc:
        if bar:
            bar.close()
        code = _refused(exc)
        if args.json:
            print(
                json.dumps(
                    {
                        "job_id": "",
                        "status": "refused",
                        "code": exc.code,
                        "error": exc.message,
                        "errors": [_error_json(e) for e in exc.errors],
                        "outputs": [],
                        "nodes": {},
                    }
                )
            )
        return code
    if bar:
        bar.close()
    paths = _write_images(result, args.output)
    if not args.json:
        for path in paths:
            print(path)
        if paths:
            print(f"wrote {len(paths)} image(s) to {args.output.resolve()}", file=sys.stderr)
    if result.status != "completed":
        print(f"plinth run: job {result.job_id} {result.status}: {result.error}", file=sys.stderr)
    if args.json:
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


def _load_graph(args: argparse.Namespace) -> dict[str, Any]:
    text = getattr(args, "graph_text", None) or args.graph.read_text()
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{args.graph}: not valid JSON ({exc})") from None
    if not isinstance(graph, dict):
        raise ValueError(f"{args.graph}: a graph is a JSON object of node id -> node")
    return graph


def _apply_sets(graph: dict[str, Any], sets: list[str]) -> dict[str, Any]:
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


def _parse_inputs(items: list[str]) -> dict[str, bytes]:
    inputs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--input {item!r}: expected NAME=FILE")
        inputs[name] = Path(path).read_bytes()
    return inputs


def _write_images(result: Any, outdir: Path) -> list[Path]:
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


def _error_json(error: Any) -> dict[str, str]:
    return {
        "node_id": error.node_id,
        "class_type": error.class_type,
        "input": error.input,
        "code": error.code,
        "message": error.message,
    }


def _refused(exc: Any) -> int:
    print(f"plinth: {exc.code}: {exc.message.splitlines()[0] if exc.message else ''}", file=sys.stderr)
    for e in exc.errors:
        where = f"node {e.node_id} ({e.class_type})" if e.node_id else "graph"
        if e.input:
            where += f" input {e.input!r}"
        print(f"  {where}: [{e.code}] {e.message}", file=sys.stderr)
    return 1


class _ProgressBar:
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


if __name__ == "__main__":
    sys.exit(main())
