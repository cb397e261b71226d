"""Noise for SDE samplers: one seeded Brownian motion over the sigma range (torchsde's tree).

An SDE sampler needs the noise between two sigmas to be the increment of one Brownian path, so
that a step split in two (Heun-like stages, adaptive steps) sees the same path as the whole step.
torchsde's BrownianTree gives that path from a seed and answers any interval in O(log) time.
Each batch entry has its own tree, seeded seed + i, so an entry's noise does not depend on the
batch it is in. Draws are made on the CPU in float32 and moved to the sample's device, so a
seed gives the same noise everywhere.
"""

from __future__ import annotations

import torch


class BrownianTreeNoise:
    """noise(sigma, sigma_next): the normalised Brownian increment over [sigma_next, sigma]."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int) -> None:
        import torchsde

        self.device, self.dtype = x.device, x.dtype
        # torchsde rounds an interval's ends to its tolerance (6 digits at tol 1e-6) but checks
        # queries unrounded: bounds rounded here, and queries clamped to them, stay inside.
        self.t0, self.t1 = round(float(sigma_min), 6), round(float(sigma_max), 6)
        if not self.t0 < self.t1:
            self.t1 = self.t0 + 1e-6
        w0 = torch.zeros(x.shape[1:], dtype=torch.float32)
        self.trees = [
            torchsde.BrownianTree(self.t0, w0, self.t1, entropy=(seed + i) % 2**63, tol=1e-6, pool_size=24)
            for i in range(x.shape[0])
        ]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        low, high = sorted((float(sigma), float(sigma_next)))
        low, high = max(low, self.t0), min(high, self.t1)
        if high <= low:
            return torch.zeros((len(self.trees), *self.trees[0](self.t0, self.t0).shape), device=self.device)
        sign = 1.0 if float(sigma_next) > float(sigma) else -1.0
        draws = torch.stack([tree(low, high) for tree in self.trees]) * sign / (high - low) ** 0.5
        return draws.to(self.device, self.dtype)
