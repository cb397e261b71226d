"""Plinth against the plain diffusers pipeline: latency, throughput and memory (issue 5).

    python bench/compare.py [--runs 3] [--tiny-runs 30] [--size 256] [--steps 4] [--models DIR]
                            [--only a,b,c,paired,tiny] [--batch-jobs-list 1,8] [--precision float32]
                            [--paired 3] [--paired-with c] [--json bench/results/compare.json] [--quick]
    python bench/compare.py --compare-precision [--runs 3] [--quick]
    python bench/compare.py --model sdxl --only paired [--paired 3]   # SDXL's layout, reduced widths
    python bench/compare.py --model flux --only paired [--paired 3]   # FLUX.1-dev's layout, reduced size
    python bench/compare.py --device cuda --precision float16 --size 512 --steps 20   # on a GPU

One SD1.5-shaped model with seeded random weights (built once under --models, see
common.build_sd15_random), --size x --size, --steps steps, euler, scheduler normal, cfg 7,
batch 1, CPU, three ways:

  (a) diffusers: StableDiffusionPipeline loaded from the same diffusers folder (Euler with
      timestep_spacing "linspace", which is Plinth's "normal"), output_type "pil";
  (b) Plinth in-process: JobManager.submit(graph), then the job followed to its end;
  (c) Plinth over gRPC: PlinthServer on 127.0.0.1 and Client.run(graph).

For each: the first run (model load included), one untimed run (two with --quick; a pipeline's
second call is still slow), the median of --runs runs with only the seed changed, the median of
max(--runs, 5) fully cached re-runs (n/a for (a): a pipeline has no cache, an identical re-run
is a full run), throughput with 1, 4 and 8 concurrent clients (each submits one job with its
own seed at once; jobs / wall time; (a)'s clients share one pipeline behind a lock, served one
at a time, as a plain pipeline serves), and the peak RSS of the process. Plinth runs with
batch_jobs=1; (c) is measured again at 8 clients for every other value of --batch-jobs-list,
each in a process of its own. Then the ratios (b)/(a) and (c)/(a), the tiny model's
per-request overhead (graphs/txt2img.json as it is: tiny-sd, 64x64, 2 steps, batch 2, over
gRPC; median of --tiny-runs seed-changed runs, end to end minus the seconds inside nodes), its
cached re-run and 8-client throughput at each batch_jobs, and the targets with PASS/FAIL.
The (c)/(a) seed-changed target is checked on the paired run: (a) and (c) each in a fresh
process, in turn for --paired rounds, the median of the rounds' ratios (see compare_paired:
the table's paths run minutes apart, and this machine drifts by 10% over minutes).
Prints tables and writes the figures as JSON to --json. About 35 minutes on 2 cores.

--quick uses tiny-sd at 64x64 for every path, to check the script itself in a minute or two.
--compare-precision runs only (c) in float32 and in bfloat16: seed-changed medians of each and
the mean and max absolute difference of the two images for the same seed (0..255).

Every path runs in a process of its own, one after the other: peak RSS is then the path's own,
and torch is only ever used from one thread of a process (two threads each using torch slow
each other down about 2x on a 2-core machine; see bench/latency.py). For the same reason (a)'s
pipeline is loaded and called on one worker thread only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common import build_flux_reduced, build_sd15_random, build_sdxl_reduced, quiet, rss_peak_mb, timed, write_json

PATHS = {"a": "(a) diffusers pipeline", "b": "(b) Plinth in-process", "c": "(c) Plinth gRPC"}
CLIENTS = (1, 4, 8)
TARGETS = {  # what must hold
    "warm_ratio": "(c)/(a) seed changed <= 1.03",
    "cached": "cached re-run end to end < 20 ms",
    "overhead": "per-request overhead (tiny, gRPC) < 5 ms",
    "rss": "peak RSS (c) within 10% of (a)",
}


# ---------------------------------------------------------------- in a child process


@dataclass
class Outcome:
    node_seconds: float | None  # time inside node execution (Plinth only)
    image: object | None  # the first output image (PIL)
    sampler_seconds: float | None = None  # the KSampler node's time (Plinth only)


Call = Callable[[int], Outcome]  # one request with this seed, returned when it has ended


@contextlib.contextmanager
def open_diffusers(spec: dict) -> Iterator[Call]:
    """(a): the pipeline, loaded on the first call (so the first run includes the load) and
    called on one worker thread: concurrent callers queue for it, as behind a lock."""
    import torch
    from diffusers import EulerDiscreteScheduler, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    graph = spec["graph"]
    sampler, latent = graph["3"]["inputs"], graph["5"]["inputs"]
    flux = graph["4"]["inputs"]["ckpt_name"].startswith("flux-")
    assert (sampler["sampler_name"], sampler["scheduler"]) == ("euler", "simple" if flux else "normal"), sampler
    folder = Path(spec["models"]) / "checkpoints" / graph["4"]["inputs"]["ckpt_name"]
    dtype = getattr(torch, spec["precision"])
    loaded = {}

    def generate(seed: int) -> Outcome:
        if flux:  # FluxPipeline on the diffusers folder made from the same modules
            if "pipe" not in loaded:
                name = graph["4"]["inputs"]["ckpt_name"].removesuffix(".safetensors")
                pipe = FluxPipeline.from_pretrained(Path(spec["models"]) / "diffusers" / name, dtype=dtype)
                pipe.set_progress_bar_config(disable=True)
                pipe.to(spec["device"])
                loaded["pipe"] = pipe
            images = loaded["pipe"](
                graph["6"]["inputs"]["text"],
                width=latent["width"],
                height=latent["height"],
                num_images_per_prompt=latent["batch_size"],
                num_inference_steps=sampler["steps"],
                guidance_scale=graph["10"]["inputs"]["guidance"],
                generator=torch.Generator("cpu").manual_seed(seed),
                max_sequence_length=256,
                output_type="pil",
            ).images
            return Outcome(None, images[0])
        if "pipe" not in loaded:
            scheduler = EulerDiscreteScheduler.from_pretrained(
                folder, subfolder="scheduler", local_files_only=True, timestep_spacing="linspace"
            )
            if (folder / "text_encoder_2").is_dir():  # SDXL
                pipe = StableDiffusionXLPipeline.from_pretrained(
                    folder, scheduler=scheduler, local_files_only=True, dtype=dtype
                )
            else:
                pipe = StableDiffusionPipeline.from_pretrained(
                    folder,
                    scheduler=scheduler,
                    safety_checker=None,
                    requires_safety_checker=False,
                    local_files_only=True,
                    dtype=dtype,
                )
            pipe.set_progress_bar_config(disable=True)
            pipe.to(spec["device"])
            loaded["pipe"] = pipe
        images = loaded["pipe"](
            graph["6"]["inputs"]["text"],
            negative_prompt=graph["7"]["inputs"]["text"],
            width=latent["width"],
            height=latent["height"],
            num_images_per_prompt=latent["batch_size"],
            num_inference_steps=sampler["steps"],
            guidance_scale=sampler["cfg"],
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        ).images
        return Outcome(None, images[0])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline") as worker:
        yield lambda seed: worker.submit(generate, seed).result()


def plinth_config(spec: dict, **extra):
    from plinth.server.config import Config

    return Config(
        models_dir=Path(spec["models"]),
        data_dir=Path(spec["data"]),
        device=spec["device"],
        precision=spec["precision"],
        batch_jobs=spec["batch_jobs"],
        **extra,
    )


def with_seed(graph: dict, seed: int) -> dict:
    graph = copy.deepcopy(graph)
    graph["3"]["inputs"]["seed"] = seed
    return graph


@contextlib.contextmanager
def open_in_process(spec: dict) -> Iterator[Call]:
    """(b): the server's components in this process, no gRPC: submit, then follow the job's events."""
    from PIL import Image

    from plinth.server.components import build_components
    from plinth.server.jobs.job import JobStatus

    jobs = build_components(plinth_config(spec)).jobs
    jobs.start()

    def call(seed: int) -> Outcome:
        job = jobs.submit(with_seed(spec["graph"], seed))
        for _ in job.watch():  # returns after the terminal event
            pass
        assert job.status == JobStatus.COMPLETED, f"{job.status.value}: {job.error}"
        seconds = sum(n.seconds for n in job.nodes.values() if n.status == "executed")
        return Outcome(seconds, Image.open(io.BytesIO(job.outputs[0].png)), sampler_seconds(job.nodes))

    try:
        yield call
    finally:
        jobs.stop()
        jobs.close()


@contextlib.contextmanager
def open_grpc(spec: dict) -> Iterator[Call]:
    """(c): a server on 127.0.0.1 and one client whose channel the concurrent callers share."""
    from plinth.clients import Client
    from plinth.server.app import PlinthServer

    with PlinthServer(plinth_config(spec, port=0)) as server, Client(server.address) as client:

        def call(seed: int) -> Outcome:
            result = client.run(with_seed(spec["graph"], seed))
            seconds = sum(n.seconds for n in result.nodes.values() if n.status == "executed")
            return Outcome(seconds, result.images[0], sampler_seconds(result.nodes))

        yield call


def sampler_seconds(nodes: dict) -> float | None:
    """The KSampler's own time in a run where it executed (node "3" of the txt2img graph)."""
    node = nodes.get("3")
    return node.seconds if node is not None and node.status == "executed" else None


OPENERS = {"a": open_diffusers, "b": open_in_process, "c": open_grpc}


def one_client(call: Call, seed: int, barrier: threading.Barrier, errors: list[Exception]) -> None:
    barrier.wait()
    try:
        call(seed)
    except Exception as exc:  # noqa: BLE001 - re-raised by throughput()
        errors.append(exc)


def throughput(call: Call, clients: int, seeds: Iterator[int], rounds: int) -> float:
    """Jobs per second with `clients` threads each sending one request at once (median of rounds)."""
    rates = []
    for _ in range(rounds):
        barrier = threading.Barrier(clients + 1)
        errors: list[Exception] = []
        threads = [
            threading.Thread(target=one_client, args=(call, next(seeds), barrier, errors)) for _ in range(clients)
        ]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if errors:
            raise errors[0]
        rates.append(clients / wall)
    return statistics.median(rates)


def clocked(call: Call, seed: int) -> tuple[float, Outcome]:
    start = time.perf_counter()
    outcome = call(seed)
    return time.perf_counter() - start, outcome


def measure(spec: dict) -> dict:
    """One path in this process: the figures spec asks for, in seconds and MB."""
    quiet()
    seeds = itertools.count(1)
    out: dict = {}
    with (
        tempfile.TemporaryDirectory(prefix="plinth-bench-data-") as data,
        OPENERS[spec["path"]]({**spec, "data": data}) as call,
    ):
        out["first_s"], first = clocked(call, next(seeds))
        if spec.get("image"):
            first.image.save(spec["image"])
        for _ in range(spec["warmup"]):  # not timed: the first calls after a load run slow
            call(next(seeds))
        if spec["runs"]:
            warm_seeds = [next(seeds) for _ in range(spec["runs"])]
            warm = [clocked(call, seed) for seed in warm_seeds]
            out["seed_changed_runs_s"] = [t for t, _ in warm]
            out["seed_changed_s"] = statistics.median(out["seed_changed_runs_s"])
            if spec["path"] != "a":
                out["overhead_s"] = statistics.median([t - o.node_seconds for t, o in warm])
                steps = spec["graph"]["3"]["inputs"]["steps"]
                out["sampler_it_per_s"] = statistics.median([steps / o.sampler_seconds for _, o in warm])
            if spec["path"] != "a" and spec["cached_runs"]:  # the last graph again: all cached
                out["cached_s"] = statistics.median(timed(lambda: call(warm_seeds[-1]), spec["cached_runs"]))
        out["throughput_per_s"] = {str(n): throughput(call, n, seeds, spec["rounds"]) for n in spec["clients"]}
    out["peak_rss_mb"] = rss_peak_mb()
    return out


def build(spec: dict) -> None:
    quiet()
    name = spec["graph"]["4"]["inputs"]["ckpt_name"]
    if name == "tiny-sd":
        from plinth.nodes.models.tiny_sd import ensure_tiny_sd

        ensure_tiny_sd(Path(spec["models"]))
    elif name.startswith("sdxl-"):
        build_sdxl_reduced(Path(spec["models"]), name)
    elif name.startswith("flux-"):
        build_flux_reduced(Path(spec["models"]), name.removesuffix(".safetensors"))
    else:
        build_sd15_random(Path(spec["models"]), name)


# ---------------------------------------------------------------- in the parent


def in_child(spec: dict) -> dict:
    """Run `spec` in a fresh process and return its figures (its stderr passes through)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child"], input=json.dumps(spec), stdout=subprocess.PIPE, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_spec(args, graph: dict, path: str, **changes) -> dict:
    """What one child measures; by default every figure of the paths table."""
    return {
        "path": path,
        "models": str(args.models),
        "graph": graph,
        "precision": args.precision,
        "device": args.device,
        "batch_jobs": 1,
        "runs": args.runs,
        "cached_runs": max(args.runs, 5),
        "warmup": 2 if args.quick else 1,
        "clients": list(CLIENTS),
        "rounds": 3 if args.quick else 1,
        **changes,
    }


def flux_txt2img(ckpt: str, size: int, steps: int) -> dict:
    """FLUX.1-dev txt2img as ComfyUI's templates run it, under the node ids the paths read: 4
    checkpoint, 6 prompt, 7 its zeroed negative, 5 latent, 3 KSampler (euler, simple, cfg 1),
    10 FluxGuidance 3.5, 11 ModelSamplingFlux at the image size (FluxPipeline's dynamic shift)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red handbag on a marble plinth", "clip": ["4", 1]}},
        "10": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "11": {
            "class_type": "ModelSamplingFlux",
            "inputs": {"model": ["4", 0], "max_shift": 1.15, "base_shift": 0.5, "width": size, "height": size},
        },
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["11", 0],
                "positive": ["10", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                "seed": 1,
                "steps": steps,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },  # fmt: skip
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bench"}},
    }


def txt2img(ckpt: str | None = None, size: int | None = None, steps: int | None = None) -> dict:
    """graphs/txt2img.json, as it is or set to one image of `size` with euler/normal at cfg 7."""
    from plinth.graphs import read

    graph = json.loads(read("txt2img.json"))
    if ckpt is not None:
        graph["4"]["inputs"]["ckpt_name"] = ckpt
        graph["5"]["inputs"].update(width=size, height=size, batch_size=1)
        graph["3"]["inputs"].update(steps=steps, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    return graph


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.3g}/s"


def print_table(header: list[str], widths: list[int], rows: list[list[str]]) -> None:
    for cells in [header, *rows]:
        print(
            "".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False)))
        )


def compare_paths(args, graph: dict, case: str) -> dict:
    """(a), (b), (c) and (c) at the other batch_jobs values, each in its own process."""
    rows: dict[str, dict] = {}
    for path in (p for p in "abc" if p in args.only):
        rows[PATHS[path]] = in_child(child_spec(args, graph, path))
    if "c" in args.only:
        for jobs in (j for j in args.batch_jobs_list if j != 1):
            rows[f"(c) batch_jobs={jobs}"] = in_child(
                child_spec(args, graph, "c", batch_jobs=jobs, runs=0, clients=[8])
            )
    print(f"{case}, median of {args.runs} (cached: {max(args.runs, 5)})")
    print_table(
        [
            "path",
            "first run*",
            "seed changed",
            "cached re-run",
            "overhead",
            "sampler",
            "peak RSS",
            *(f"{n} client{'s' * (n > 1)}" for n in CLIENTS),
        ],
        [30, 11, 13, 15, 10, 12, 10, 10, 10, 10],
        [
            [
                label,
                fmt_time(row.get("first_s")),
                fmt_time(row.get("seed_changed_s")),
                "n/a (no cache)" if label == PATHS["a"] else fmt_time(row.get("cached_s")),
                fmt_time(row.get("overhead_s")),
                f"{row['sampler_it_per_s']:.2f} it/s" if row.get("sampler_it_per_s") else "-",
                f"{row['peak_rss_mb']:.0f} MB",
                *(fmt_rate(row["throughput_per_s"].get(str(n))) for n in CLIENTS),
            ]
            for label, row in rows.items()
        ],
    )
    print(
        "  * the first run includes the model load.\n"
        "  (a) has no output cache: an identical re-run is a full run, the same as 'seed changed'; n/a.\n"
        "  (a)'s concurrent clients share one pipeline behind a lock: served one at a time.\n"
        "  Plinth runs with batch_jobs=1 (off) unless named; overhead = end to end minus time inside nodes;\n"
        "  sampler = steps / the KSampler node's seconds (UNet calls at batch 2 for cfg).\n"
    )

    def ratio(label: str, figure: Callable[[dict], float | None]) -> float | None:
        if label not in rows or PATHS["a"] not in rows:
            return None
        mine, theirs = figure(rows[label]), figure(rows[PATHS["a"]])
        return None if mine is None or theirs is None else mine / theirs

    ratios = {f"{PATHS[p]} / (a), seed changed": ratio(PATHS[p], lambda row: row.get("seed_changed_s")) for p in "bc"}
    for label in rows:
        if label != PATHS["a"]:
            ratios[f"{label} / (a), throughput at 8 clients"] = ratio(
                label, lambda row: row["throughput_per_s"].get("8")
            )
    print("ratios (time: lower is better for Plinth; throughput: higher is better)")
    for name, value in ratios.items():
        print(f"  {name:<60} {'-' if value is None else f'{value:.3f}'}")
    print()
    return {"rows": rows, "ratios": ratios}


def compare_paired(args, graph: dict) -> dict:
    """The seed-changed ratio the target is checked on: (a) and the --paired-with paths, each
    in a fresh process, in turn for --paired rounds (the order reversed every other round);
    each round's ratio is the Plinth path's seed-changed median over (a)'s in that round, and
    the figure is the median of the rounds. The table measures the paths minutes apart, and a
    shared machine drifts by more than the 3% the target allows over that time; in one
    process the paths slow each other (diffusers ran 15-20% slower beside two Plinths)."""
    paths = ["a", *args.paired_with]
    times: dict[str, list[float]] = {path: [] for path in paths}
    rss: dict[str, list[float]] = {path: [] for path in paths}
    for round_ in range(args.paired):
        for path in paths if round_ % 2 == 0 else reversed(paths):
            row = in_child(child_spec(args, graph, path, cached_runs=0, clients=[]))
            times[path].append(row["seed_changed_s"])
            rss[path].append(row["peak_rss_mb"])
    ratios = {
        f"{path}/a": statistics.median(t / a for t, a in zip(times[path], times["a"], strict=False))
        for path in paths[1:]
    }
    print(
        f"paired: {', '.join(PATHS[p] for p in paths)}, each in a fresh process, in turn for {args.paired} "
        f"rounds (each figure a process's seed-changed median of {args.runs})"
    )
    for path in paths:
        print(f"  {PATHS[path]:<28} {' '.join(f'{t:6.2f} s' for t in times[path])}")
    for name, value in ratios.items():
        print(f"  ({name[0]})/(a), median of the rounds' ratios   {value:.3f}")
    for path in paths:
        print(f"  {PATHS[path]:<28} peak RSS median {statistics.median(rss[path]):7.0f} MB")
    print()
    return {"seed_changed_s": times, "ratios": ratios, "peak_rss_mb": rss}


def tiny_overhead(args) -> dict:
    """The demo graph as it is over gRPC: what a request costs beyond the nodes' own work."""
    spec = child_spec(
        args,
        txt2img(),
        "c",
        precision="float32",
        runs=args.tiny_runs,
        cached_runs=args.tiny_runs,
        warmup=3,
        clients=[8],
        rounds=5,
    )
    out = {"batch_jobs=1": in_child(spec)}
    for jobs in (j for j in args.batch_jobs_list if j != 1):
        out[f"batch_jobs={jobs}"] = in_child({**spec, "batch_jobs": jobs, "runs": 0})
    row = out["batch_jobs=1"]
    print(f"tiny-sd, graphs/txt2img.json as is (64x64, 2 steps, batch 2), gRPC, median of {args.tiny_runs}")
    print(f"  seed changed, end to end      {fmt_time(row['seed_changed_s'])}")
    print(f"  per-request overhead          {fmt_time(row['overhead_s'])}   (end to end minus time inside nodes)")
    print(f"  fully cached re-run           {fmt_time(row['cached_s'])}")
    for label, figures in out.items():
        print(f"  8 clients, {label:<18} {fmt_rate(figures['throughput_per_s']['8'])}")
    print()
    return out


def targets(paths: dict | None, tiny: dict | None, pairs: dict | None = None) -> dict:
    """Each target: its figure, PASS or FAIL, or "not run" when a path it needs was left out.
    The seed-changed ratio is the paired run's when there is one (the paths measured minutes
    apart drift by more than the 3% the target allows)."""
    rows = paths["rows"] if paths else {}
    a, c, tiny = rows.get(PATHS["a"], {}), rows.get(PATHS["c"], {}), (tiny or {}).get("batch_jobs=1", {})
    warm = paths["ratios"].get(f"{PATHS['c']} / (a), seed changed") if paths else None
    if pairs and "c/a" in pairs["ratios"]:
        warm = pairs["ratios"]["c/a"]
    cached = [x for x in (c.get("cached_s"), tiny.get("cached_s")) if x is not None]
    overhead = tiny.get("overhead_s")
    rss = c["peak_rss_mb"] / a["peak_rss_mb"] if a and c else None
    checks = {  # target: (figure, passed, as shown)
        TARGETS["warm_ratio"]: (warm, warm <= 1.03 if warm else None, f"{warm:.3f}" if warm else "-"),
        TARGETS["cached"]: (
            max(cached, default=None),
            max(cached) < 0.020 if cached else None,
            " / ".join(fmt_time(x) for x in cached) + " ((c) / tiny)" if cached else "-",
        ),
        TARGETS["overhead"]: (overhead, overhead < 0.005 if overhead else None, fmt_time(overhead)),
        TARGETS["rss"]: (rss, rss <= 1.10 if rss else None, f"{rss:.3f} x (a)" if rss else "-"),
    }
    print("targets")
    for name, (_, ok, shown) in checks.items():
        print(f"  {name:<45} {shown:>30}   {'not run' if ok is None else ('PASS' if ok else 'FAIL')}")
    return {name: {"value": value, "pass": ok} for name, (value, ok, _) in checks.items()}


def compare_precision(args, graph: dict, case: str) -> dict:
    """(c) in float32 and in bfloat16: speed, and how far apart the images for one seed are."""
    import numpy as np
    from PIL import Image

    rows, pixels = {}, []
    with tempfile.TemporaryDirectory(prefix="plinth-bench-precision-") as folder:
        for precision in ("float32", "bfloat16"):
            image = Path(folder) / f"{precision}.png"
            rows[precision] = in_child(
                child_spec(args, graph, "c", precision=precision, cached_runs=0, clients=[], image=str(image))
            )
            pixels.append(np.asarray(Image.open(image).convert("RGB"), dtype=np.int16))
    diff = np.abs(pixels[0] - pixels[1])
    print(f"{case}, (c) Plinth gRPC, median of {args.runs}; images for seed 1")
    for precision, row in rows.items():
        print(
            f"  {precision:<9} first {fmt_time(row['first_s']):>10}   "
            f"seed changed {fmt_time(row['seed_changed_s']):>10}"
        )
    speed = rows["bfloat16"]["seed_changed_s"] / rows["float32"]["seed_changed_s"]
    print(f"  bfloat16 / float32 seed changed: {speed:.3f}")
    print(f"  image difference (0..255): mean {diff.mean():.2f}, max {diff.max()}")
    return {"rows": rows, "image_abs_diff": {"mean": float(diff.mean()), "max": int(diff.max())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tiny-runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "plinth-bench-models")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "compare.json")
    parser.add_argument(
        "--only",
        type=lambda s: set(s.split(",")),
        default={"a", "b", "c", "paired", "tiny"},
        help="a subset of a,b,c (the table), paired, tiny",
    )
    parser.add_argument("--batch-jobs-list", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="float16 is for --device cuda",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--quick", action="store_true", help="tiny-sd at 64x64 for every path")
    parser.add_argument(
        "--model",
        choices=("sd15", "sdxl", "flux"),
        default="sd15",
        help="sd15: SD1.5's real shapes (sd15-random); sdxl: SDXL's layout at reduced widths (sdxl-reduced, "
        "common.build_sdxl_reduced) against StableDiffusionXLPipeline; flux: FLUX.1-dev's layout at reduced size "
        "(flux-reduced, common.build_flux_reduced) against FluxPipeline",
    )
    parser.add_argument(
        "--paired",
        type=int,
        default=3,
        metavar="ROUNDS",
        help="rounds of the paired run ((a) and --paired-with, fresh processes in turn)",
    )
    parser.add_argument(
        "--paired-with",
        type=lambda s: [p for p in "bc" if p in s.split(",")],
        default=["c"],
        help="the Plinth paths the paired run sets beside (a): b, c or b,c",
    )
    parser.add_argument("--compare-precision", action="store_true", help="only (c) in float32 against bfloat16")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one spec from stdin, here
    args = parser.parse_args()
    if not args.only <= {"a", "b", "c", "paired", "tiny"}:
        parser.error(f"--only takes a,b,c,paired,tiny, not {','.join(sorted(args.only))}")
    if args.child:
        spec = json.load(sys.stdin)
        if spec["path"] == "build":
            build(spec)
            print("{}")
        else:
            print(json.dumps(measure(spec)))
        return

    if args.quick:
        ckpt, size = "tiny-sd", 64
    else:
        ckpt, size = (
            {"sd15": "sd15-random", "sdxl": "sdxl-reduced", "flux": "flux-reduced.safetensors"}[args.model],
            args.size,
        )
    graph = flux_txt2img(ckpt, size, args.steps) if args.model == "flux" else txt2img(ckpt, size, args.steps)
    case = (
        f"{ckpt}, {size}x{size}, {args.steps} steps, euler/normal, cfg 7, batch 1, {args.device} "
        f"{'float32 vs bfloat16' if args.compare_precision else args.precision}"
    )
    start = time.perf_counter()
    in_child({"path": "build", "models": str(args.models), "graph": graph})
    print(f"model {ckpt} ready under {args.models} in {time.perf_counter() - start:.1f} s\n")

    results: dict = {"case": case, "runs": args.runs, "tiny_runs": args.tiny_runs}
    if args.compare_precision:
        results["precision"] = compare_precision(args, graph, case)
    else:
        paths = compare_paths(args, graph, case) if args.only & set("abc") else None
        pairs = compare_paired(args, graph) if "paired" in args.only and args.paired_with else None
        tiny = tiny_overhead(args) if "tiny" in args.only else None
        results.update(paths=paths, paired=pairs, tiny=tiny, targets=targets(paths, tiny, pairs))
    write_json(results, args.json)
    print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
