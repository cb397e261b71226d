"""An SD1.5-shaped random model through the server: 256x256, 4 steps, euler, cfg 7, batch 1.

    python bench/sd15_server.py [--runs 3] [--models DIR] [--json FILE]

Builds the model once (SD1.5's real shapes, seeded random weights, about 4 GB in fp32) as a
diffusers folder under --models/checkpoints/sd15-random, starts a server on 127.0.0.1 and runs
the demo graph on it: the first run (model load included), warm runs with only the seed changed
(median of --runs), and the fully cached re-run. Prints the process's peak RSS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from common import build_sd15_random, median_ms, quiet, report, rss_peak_mb, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "plinth-bench-models")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet()

    from plinth.clients import Client
    from plinth.graphs import read
    from plinth.server.app import PlinthServer
    from plinth.server.config import Config

    start = time.perf_counter()
    build_sd15_random(args.models)
    print(f"model ready in {time.perf_counter() - start:.1f} s")

    graph = json.loads(read("txt2img.json"))
    graph["4"]["inputs"]["ckpt_name"] = "sd15-random"
    graph["5"]["inputs"].update(width=args.size, height=args.size, batch_size=1)
    graph["3"]["inputs"].update(steps=args.steps, cfg=7.0, sampler_name="euler", scheduler="normal")
    seeds = itertools.count(1)
    data = Path(tempfile.mkdtemp(prefix="plinth-bench-data-"))
    with (
        PlinthServer(Config(models_dir=args.models, data_dir=data, device="cpu", port=0)) as server,
        Client(server.address) as client,
    ):

        def run(seed: int | None):
            if seed is not None:
                graph["3"]["inputs"]["seed"] = seed
            return client.run(graph)

        first = timed(lambda: run(next(seeds)), 1)[0]
        warm = timed(lambda: run(next(seeds)), args.runs)
        cached = timed(lambda: run(None), max(args.runs, 5))
        last = run(next(seeds))
    per_node = {n.class_type: round(n.seconds, 3) for n in last.nodes.values() if n.status == "executed"}
    figures = {
        "shape": f"{args.size}x{args.size}, {args.steps} steps, euler, cfg 7, batch 1, CPU fp32",
        "first_run_s": round(first, 2),
        "seed_changed_median_s": round(median_ms(warm) / 1000, 2),
        "seed_changed_runs_s": [round(t, 2) for t in warm],
        "cached_median_ms": round(median_ms(cached), 2),
        "nodes_s": per_node,
        "peak_rss_mb": round(rss_peak_mb()),
    }
    report(figures, args.json)


if __name__ == "__main__":
    main()
