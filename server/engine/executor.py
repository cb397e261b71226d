"""Running an execution plan: node by node in topological order, through the output cache.

The executor is a plain object with no gRPC inside, so it runs in-process (tests, bench), in
the server's worker thread, or anywhere else a job can be handed to it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from plinth.nodes.core.context import ImageRef, JobCancelled, ModelHandle, ModelOptions, UnetForward
from plinth.server.engine import events as ev
from plinth.server.engine.batching import Lockstep
from plinth.server.engine.cache import OutputCache
from plinth.server.engine.validate import ExecutionPlan, PlannedNode

log = logging.getLogger("plinth.executor")


class JobControl(Protocol):
    """The job side of a run: where events go and whether to stop."""

    def emit(self, payload: ev.EventPayload) -> None: ...

    def is_cancelled(self) -> bool: ...


class Resources(Protocol):
    """What the server lends a run: models, files and the image store."""

    models_dir: Path

    def model(self, handle: ModelHandle) -> Any: ...

    def model_path(self, source: str, name: str) -> Path: ...

    def fingerprint(self, source: str, name: str) -> str: ...

    def input_image(self, name: str) -> bytes: ...

    def save_image(self, png: bytes, width: int, height: int, prefix: str, kind: str) -> ImageRef: ...


@dataclass
class RunResult:
    status: str  # "completed", "failed" or "cancelled"
    nodes: dict[str, ev.NodeRun] = field(default_factory=dict)
    images: list[ImageRef] = field(default_factory=list)
    failure: ev.Failed | None = None


class RunContext:
    """The NodeContext a node sees while it runs (plinth.nodes.core.context.NodeContext)."""

    def __init__(
        self,
        resources: Resources,
        control: JobControl,
        graph: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        model_options: ModelOptions,
        unet_forward: UnetForward | None = None,
    ) -> None:
        self._resources = resources
        self._control = control
        self.graph = graph
        self.extra_pnginfo: dict[str, Any] = {}
        self.device = device
        self.dtype = dtype
        self.model_options = model_options
        self.unet_forward = unet_forward
        self.models_dir = resources.models_dir
        self.node_id = ""

    def model(self, handle: ModelHandle) -> Any:
        return self._resources.model(handle)

    def model_path(self, source: str, name: str) -> Path:
        return self._resources.model_path(source, name)

    def model_fingerprint(self, source: str, name: str) -> str:
        return self._resources.fingerprint(source, name)

    def input_image(self, name: str) -> bytes:
        return self._resources.input_image(name)

    def save_image(self, png: bytes, width: int, height: int, prefix: str, kind: str) -> ImageRef:
        return self._resources.save_image(png, width, height, prefix, kind)

    def check_cancelled(self) -> None:
        if self._control.is_cancelled():
            raise JobCancelled()

    def progress(self, step: int, total: int) -> None:
        self._control.emit(ev.Progress(self.node_id, step, total))
        self.check_cancelled()


def out_of_memory_message(device: torch.device, class_type: str, exc: BaseException) -> str:
    """What a job that ran out of memory is told: where, in which node, and what to change."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return (
        f"out of memory on {device} in {class_type}: {first} "
        "(use a smaller image or batch, VAEDecodeTiled for large decodes, or fewer jobs side by side: batch_jobs)"
    )


class Executor:
    def __init__(
        self, cache: OutputCache, device: torch.device, dtype: torch.dtype, model_options: ModelOptions | None = None
    ) -> None:
        self.cache = cache
        self.device = device
        self.dtype = dtype
        self.model_options = model_options or ModelOptions()

    def run(
        self, plan: ExecutionPlan, resources: Resources, control: JobControl, lockstep: Lockstep | None = None
    ) -> RunResult:
        """Run the plan; emits Started, per-node and Output events but not the terminal event,
        which the caller sends once it has recorded the result. With `lockstep` the run is one
        of several side by side (inside lockstep.member()) and its UNet calls are batched."""
        ctx = RunContext(
            resources,
            control,
            plan.graph.raw,
            self.device,
            self.dtype,
            self.model_options,
            lockstep.forward if lockstep is not None else None,
        )
        if plan.graph.workflow is not None:
            ctx.extra_pnginfo["workflow"] = plan.graph.workflow
        result = RunResult("completed")
        outputs: dict[str, Any] = {}
        control.emit(ev.Started([n.id for n in plan.nodes]))
        node: PlannedNode | None = None
        try:
            for node in plan.nodes:
                ctx.check_cancelled()
                ctx.node_id = node.id
                value = self.cache.get(node.key)
                if value is not None:
                    control.emit(ev.NodeCached(node.id, node.class_type))
                    result.nodes[node.id] = ev.NodeRun(node.class_type, "cached", 0.0)
                else:
                    control.emit(ev.NodeStarted(node.id, node.class_type))
                    start = time.perf_counter()
                    value = self._run_node(node, outputs, ctx)
                    seconds = time.perf_counter() - start
                    self.cache.put(node.key, value)
                    control.emit(ev.NodeFinished(node.id, node.class_type, seconds))
                    result.nodes[node.id] = ev.NodeRun(node.class_type, "executed", seconds)
                outputs[node.id] = value
                if node.output_node:  # one event per image, so a big batch never makes one huge message
                    images = list(value.get("images", []))
                    result.images.extend(images)
                    for image in images:
                        control.emit(ev.Output(node.id, [image]))
        except JobCancelled:
            result.status = "cancelled"
        except Exception as exc:  # a node failed: the job fails, the server keeps serving
            node_id, class_type = (node.id, node.class_type) if node else ("", "")
            log.exception("node %s (%s) failed", node_id, class_type)
            result.status = "failed"
            message = str(exc) or type(exc).__name__
            if isinstance(exc, torch.OutOfMemoryError):
                message = out_of_memory_message(self.device, class_type, exc)
            result.failure = ev.Failed(message, node_id, class_type, type(exc).__name__)
        return result

    @staticmethod
    def _run_node(node: PlannedNode, outputs: dict[str, Any], ctx: RunContext) -> Any:
        inputs = dict(node.literals)
        for name, link in node.links.items():
            inputs[name] = outputs[link.node_id][link.index]
        value = node.node_cls().run(ctx, **inputs)
        if node.output_node:
            if not isinstance(value, dict):
                raise TypeError(f"{node.class_type}.run must return a dict of UI results")
        elif not isinstance(value, tuple) or len(value) != len(node.node_cls.schema.outputs):
            raise TypeError(f"{node.class_type}.run must return a tuple of {len(node.node_cls.schema.outputs)} outputs")
        return value
