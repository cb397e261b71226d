"""Per-request latency of the tiny model: through gRPC against the same nodes in-process.

    python bench/latency.py [--runs 30] [--json bench/results/latency.json]

Cases, medians of --runs each: the demo graph (64x64, 2 steps, batch 2) with only the seed
changed (KSampler, VAEDecode and SaveImage run) and the fully cached re-run. "in-process" runs
the executor directly (no queue, no gRPC); "gRPC" is Client.run against a server on 127.0.0.1.
The difference is what the server adds per request.

Each path is measured in a process of its own, one after the other: torch gives every thread
that calls it its own OpenMP pool, and once two threads of a process have used torch, the
second runs about 2x slower on this 2-core machine, which would blame the server for the bench.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import median_ms, quiet, timed, write_json

PATHS = ("in-process", "gRPC")


class Sink:
    """JobControl for running the executor directly."""

    def emit(self, payload) -> None:
        pass

    def is_cancelled(self) -> bool:
        return False


def measure(path: str, runs: int) -> dict[str, float]:
    quiet()
    from plinth.clients import Client
    from plinth.graphs import read
    from plinth.server.app import PlinthServer
    from plinth.server.config import Config
    from plinth.server.engine.graph import parse_graph
    from plinth.server.engine.validate import validate

    graph = json.loads(read("txt2img.json"))
    seeds = itertools.count(1)
    root = Path(tempfile.mkdtemp(prefix="plinth-bench-"))
    config = Config(models_dir=root / "models", data_dir=root / "data", device="cpu", port=0)
    with PlinthServer(config) as server, Client(server.address) as client:
        parts = server.components

        def in_process(seed: int | None) -> None:
            if seed is not None:
                graph["3"]["inputs"]["seed"] = seed
            resources = parts.resources()
            plan = validate(parse_graph(graph), parts.registry, resources)
            assert parts.executor.run(plan, resources, Sink()).status == "completed"

        def over_grpc(seed: int | None) -> None:
            if seed is not None:
                graph["3"]["inputs"]["seed"] = seed
            client.run(graph)

        fn = in_process if path == "in-process" else over_grpc
        for _ in range(3):  # model load, the first UNet calls, the channel
            fn(next(seeds))
        return {
            "seed_changed_ms": median_ms(timed(lambda: fn(next(seeds)), runs)),
            "cached_ms": median_ms(timed(lambda: fn(None), runs)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args.path, args.runs)))
        return

    rows = {}
    for path in PATHS:
        proc = subprocess.run(
            [sys.executable, __file__, "--path", path, "--runs", str(args.runs)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    overhead = {k: rows["gRPC"][k] - rows["in-process"][k] for k in rows["gRPC"]}
    print(f"tiny-sd, demo graph (64x64, 2 steps, batch 2), CPU, median of {args.runs} runs")
    print(f"{'path':<12} {'seed changed':>14} {'fully cached':>14}")
    for label, row in rows.items():
        print(f"{label:<12} {row['seed_changed_ms']:>11.2f} ms {row['cached_ms']:>11.2f} ms")
    print(f"{'gRPC adds':<12} {overhead['seed_changed_ms']:>11.2f} ms {overhead['cached_ms']:>11.2f} ms")
    if args.json:
        write_json({"runs": args.runs, "rows": rows, "grpc_overhead_ms": overhead}, args.json)


if __name__ == "__main__":
    main()
