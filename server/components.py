"""The parts a Plinth server is made of, built in one place from its config.

PlinthServer (server/app.py) puts the gRPC servicers in front of them; tests and
bench/compare.py use them in-process, without gRPC:

    parts = build_components(config)
    parts.jobs.start()
    job = parts.jobs.submit(graph)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from plinth.nodes.core.context import ModelOptions
from plinth.nodes.core.registry import NODES
from plinth.nodes.core.schema import Node
from plinth.server.config import Config, batch_jobs, model_budget, offload_budget, pick_device
from plinth.server.engine.batching import Lockstep
from plinth.server.engine.cache import OutputCache
from plinth.server.engine.executor import Executor
from plinth.server.jobs.manager import JobManager
from plinth.server.jobs.pool import WorkerPool
from plinth.server.jobs.queue import JobQueue
from plinth.server.jobs.resources import JobResources
from plinth.server.jobs.runner import JobRunner
from plinth.server.jobs.store import JobStore
from plinth.server.model_manager import ModelManager
from plinth.server.storage.assets import AssetStore
from plinth.server.storage.model_folders import ModelFolders


@dataclass
class Components:
    config: Config
    device: torch.device
    dtype: torch.dtype
    registry: dict[str, type[Node]]
    folders: ModelFolders
    assets: AssetStore
    models: ModelManager
    cache: OutputCache
    executor: Executor
    lockstep: Lockstep | None  # jobs side by side (batch_jobs > 1) batch their sampler steps here
    jobs: JobManager

    def resources(self, inputs: dict[str, bytes] | None = None) -> JobResources:
        """A view of storage and models like a job's, with the images sent with it (if any)."""
        return JobResources(self.folders, self.assets, self.models, inputs)


def build_components(config: Config) -> Components:
    """Every part, wired; raises ConfigError for a device, precision or batch_jobs setting that
    does not hold. Jobs are taken at once but run only after components.jobs.start()."""
    device, dtype = pick_device(config.device, config.precision)
    slots = batch_jobs(config, device)
    folders = ModelFolders(config.models_dir, config.data_dir, allow_pickle=config.allow_pickle)
    assets = AssetStore(config.data_dir)
    models = ModelManager(
        model_budget(config, device), device=device, offload_budget_bytes=offload_budget(config, device)
    )
    cache = OutputCache(config.cache_bytes)
    options = ModelOptions(
        attention=config.attention,
        channels_last=config.channels_last,
        compile=config.compile,
        warm_up=config.warm_up,
    )
    executor = Executor(cache, device, dtype, options)
    lockstep = Lockstep() if slots > 1 else None
    queue = JobQueue()
    pool = WorkerPool(queue, JobRunner(models, executor, lockstep), slots)
    store = JobStore(assets.data_dir / "jobs.sqlite3")
    jobs = JobManager(config.limits, NODES, partial(JobResources, folders, assets, models), store, queue, pool)
    return Components(config, device, dtype, NODES, folders, assets, models, cache, executor, lockstep, jobs)
