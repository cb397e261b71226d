"""Putting a file's weights into a module built on the meta device, strictly."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from plinth.nodes.core.context import NodeInputError


def assign_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], name: str, layout: str, unused: Iterable[str] = ()
) -> None:
    """Assign `state` to `module` (the tensors themselves, as from_config on the meta device
    wants) when every weight is present, used and of its shape; else a NodeInputError naming the
    file `name` and the first few missing, unexpected (including the file's `unused` keys) and
    misshapen keys, so a truncated or foreign file never leaves a layer random."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted([*(state.keys() - expected.keys()), *unused])
    misshapen = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshapen:
        raise NodeInputError(
            f"{name}: the weights do not match {layout} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {misshapen[:5]})"
        )
    module.load_state_dict(state, assign=True)
