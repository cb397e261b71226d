"""Load on loopback: N concurrent clients each running the tiny demo graph with its own seed.

    python bench/load.py [--clients 50] [--jobs-per-client 4] [--max-queue 256] [--json FILE]

Every job must complete or be refused explicitly (RESOURCE_EXHAUSTED); the table gives the
jobs, the concurrency, p50/p99 end-to-end latency of the completed ones and the refusals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import quiet, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--jobs-per-client", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet()

    from plinth.clients import Client, PlinthError
    from plinth.graphs import read
    from plinth.server.app import PlinthServer
    from plinth.server.config import Config, Limits

    base = json.loads(read("txt2img.json"))
    base["5"]["inputs"]["batch_size"] = 1
    root = Path(tempfile.mkdtemp(prefix="plinth-bench-load-"))
    config = Config(
        models_dir=root / "models",
        data_dir=root / "data",
        device="cpu",
        port=0,
        limits=Limits(max_queue=args.max_queue),
    )
    latencies: list[float] = []
    refused: list[str] = []
    lost: list[str] = []
    lock = threading.Lock()
    with PlinthServer(config) as server:
        with Client(server.address) as warm:
            warm.run(base)
        barrier = threading.Barrier(args.clients)

        def client_loop(index: int) -> None:
            with Client(server.address, timeout=600) as client:
                barrier.wait()
                for k in range(args.jobs_per_client):
                    graph = json.loads(json.dumps(base))
                    graph["3"]["inputs"]["seed"] = 10_000 * index + k
                    start = time.perf_counter()
                    try:
                        result = client.run(graph, check=False)
                    except PlinthError as exc:
                        with lock:
                            (refused if exc.code == "RESOURCE_EXHAUSTED" else lost).append(exc.code)
                        continue
                    with lock:
                        if result.status == "completed":
                            latencies.append(time.perf_counter() - start)
                        else:
                            lost.append(result.status)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
    latencies.sort()
    figures = {
        "jobs": args.clients * args.jobs_per_client,
        "concurrency": args.clients,
        "completed": len(latencies),
        "refused": len(refused),
        "lost_or_failed": len(lost),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, 1)
        if latencies
        else None,
        "throughput_jobs_per_s": round(len(latencies) / wall, 1),
    }
    report(figures, args.json)


if __name__ == "__main__":
    main()
