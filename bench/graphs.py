"""Time of each saved graph in graphs/ on the embedded tiny-sd model, through the server.

    python bench/graphs.py [--runs 5] [--json FILE]

The model files the graphs name (upscaler, ControlNet, IP-Adapter, CLIP vision, LoRA) are
made with random weights by the same writers the tests use (tests/support), in a temporary
models directory. For each graph: the first run (model loads included), the median of --runs
runs with every KSampler's seed changed (what a new variant costs), and a fully cached re-run.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet()

    from support.saved_graphs import INPUTS  # the photos the tests use

    from plinth.clients import Client
    from plinth.server.app import PlinthServer
    from plinth.server.config import Config

    root = Path(tempfile.mkdtemp(prefix="plinth-bench-graphs-"))
    # Made in a child process: once this process's main thread has used torch, the server's
    # worker thread runs about 2x slower on this 2-core machine (see bench/latency.py).
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from support.saved_graphs import write_graph_models as w; from pathlib import Path; "
            "w(Path(sys.argv[2]))",
            str(REPO / "tests"),
            str(root / "models"),
        ],
        check=True,
    )
    seeds = itertools.count(1000)
    rows = {}
    config = Config(models_dir=root / "models", data_dir=root / "data", device="cpu", port=0)
    with PlinthServer(config) as server, Client(server.address) as client:
        for name in sorted(p.name for p in (REPO / "graphs").glob("*.json")):
            graph = json.loads((REPO / "graphs" / name).read_text())
            wanted = {n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"}
            inputs = {k: v for k, v in INPUTS.items() if k in wanted}
            samplers = [n for n in graph.values() if n["class_type"] == "KSampler"]

            def run(new_seed: bool, graph=graph, inputs=inputs, samplers=samplers) -> None:
                if new_seed:
                    seed = next(seeds)
                    for node in samplers:
                        node["inputs"]["seed"] = seed
                client.run(graph, inputs=inputs)

            first = timed(lambda: run(True), 1)[0]
            changed = timed(lambda: run(True), args.runs) if samplers else []
            cached = timed(lambda: run(False), args.runs)
            rows[name] = {
                "first_ms": round(first * 1000, 1),
                "seed_changed_ms": round(median_ms(changed), 1) if changed else None,
                "cached_ms": round(median_ms(cached), 2),
            }
    print(f"saved graphs on tiny-sd, CPU, through gRPC; medians of {args.runs} runs")
    print(f"{'graph':<28} {'first':>10} {'new seed':>10} {'cached':>10}")
    for name, row in rows.items():
        changed = f"{row['seed_changed_ms']:.1f}" if row["seed_changed_ms"] is not None else "-"
        print(f"{name:<28} {row['first_ms']:>7.1f} ms {changed:>7} ms {row['cached_ms']:>7.2f} ms")
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
