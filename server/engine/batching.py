"""Cross-request batching: the UNet calls of jobs running side by side, as one forward.

Up to `batch_jobs` jobs run at once, each on a thread of its own, but only one of those threads
runs at any moment: they pass a baton. A job's sampler asks for each plain UNet call through
`Lockstep.forward`; the call waits there and the baton passes on. Once every member job is
waiting at a UNet call (or has ended), the waiting calls run, those that fit together (same
UNet, same sample and context shapes and dtypes) as one batched forward, and each job takes
its own rows back and goes on with its scheduler step. Jobs step in lockstep while they
sample; seeds, prompts, cfg, denoise, sampler and scheduler may all differ, since each job
keeps its own noise, timesteps and guidance.

Because no two threads ever run torch at the same moment, a lone job runs exactly as it would
without batching, and batched rows differ from lone ones only by the float rounding of kernels
that block their work by batch size (tests/test_batching.py checks the tolerance).

Calls that cannot join a batch never come here: a sampler whose UNet carries patches (LoRA
hooks, IP-Adapter processors, which are put on the shared weights for the whole loop) or
ControlNet residuals calls the UNet itself while it holds the baton, so no other job's forward
can run under its patches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("plinth.batching")


@dataclass(eq=False)
class _Call:
    unet: Any
    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False

    def group_key(self) -> tuple:
        return (
            id(self.unet),
            tuple(self.sample.shape[1:]),
            self.sample.dtype,
            self.sample.device,
            tuple(self.context.shape[1:]),
            self.context.dtype,
            self.timestep.dtype,
        )


@dataclass
class BatchStats:
    forwards: int = 0  # UNet forwards run here
    calls: int = 0  # sampler calls they served
    largest: int = 0  # most calls in one forward


class Lockstep:
    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._members = 0
        self._holder: int | None = None  # thread holding the baton
        self._waiting: list[_Call] = []
        self.stats = BatchStats()

    @contextmanager
    def member(self) -> Iterator[None]:
        """Run the body as one of the jobs side by side: it holds the baton whenever it runs."""
        with self._cv:
            self._members += 1
            self._take()
        try:
            yield
        finally:
            with self._cv:
                self._members -= 1
                self._holder = None
                self._fire_if_ready()
                self._cv.notify_all()

    def forward(self, unet: Any, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """unet(sample, timestep, encoder_hidden_states=context).sample, batched with the
        calls other member jobs make at the same point. Call only from inside member()."""
        timestep = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        call = _Call(unet, sample, timestep, context)
        with self._cv:
            if self._holder != threading.get_ident():
                raise RuntimeError("Lockstep.forward called from a thread that is not a running member")
            self._waiting.append(call)
            self._holder = None
            self._fire_if_ready()
            self._cv.notify_all()
            while not call.done:
                self._cv.wait()
            self._take()
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    # with self._cv held

    def _take(self) -> None:
        while self._holder is not None:
            self._cv.wait()
        self._holder = threading.get_ident()

    def _fire_if_ready(self) -> None:
        """Run the waiting calls once every member waits at one (the baton is free)."""
        if not self._waiting or len(self._waiting) < self._members or self._holder is not None:
            return
        calls, self._waiting = self._waiting, []
        self._holder = threading.get_ident()  # nobody else runs while the batch does
        self._cv.release()
        try:
            groups: dict[tuple, list[_Call]] = {}
            for call in calls:
                groups.setdefault(call.group_key(), []).append(call)
            for group in groups.values():
                self._run(group)
        finally:
            self._cv.acquire()
            for call in calls:
                call.done = True
            self._holder = None

    def _run(self, group: list[_Call]) -> None:
        try:
            with torch.inference_mode():  # the firing thread may be outside the sampler's own mode
                if len(group) == 1:
                    one = group[0]
                    outputs = [one.unet(one.sample, one.timestep, encoder_hidden_states=one.context).sample]
                else:
                    rows = [c.sample.shape[0] for c in group]
                    timesteps = torch.cat([c.timestep.reshape(-1).expand(n) for c, n in zip(group, rows, strict=False)])
                    out = (
                        group[0]
                        .unet(
                            torch.cat([c.sample for c in group]),
                            timesteps.to(group[0].sample.device),
                            encoder_hidden_states=torch.cat([c.context for c in group]),
                        )
                        .sample
                    )
                    outputs = list(out.split(rows))
            for call, output in zip(group, outputs, strict=False):
                call.result = output
        except BaseException as exc:  # every job in the batch fails with the same cause
            log.exception("batched UNet forward over %d call(s) failed", len(group))
            for call in group:
                call.error = exc
        stats = self.stats
        stats.forwards += 1
        stats.calls += len(group)
        stats.largest = max(stats.largest, len(group))
