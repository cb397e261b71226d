"""Per-sampler cost of the sampling core: model calls per step and wall time per step, against
the diffusers scheduler path it replaced (same UNet, same steps, same CFG batch of two).

    python bench/sampler_cost.py                      # tiny-sd, every sampler; SD1.5-shaped, 5
    python bench/sampler_cost.py --only tiny          # tiny-sd only (about a minute)
    python bench/sampler_cost.py --sd15-samplers euler,heun --steps 4 --runs 3

Each sampler runs txt2img from one latent with cfg 7.5 and the "normal" schedule (diffusers'
timestep_spacing "linspace", the spacing its classes share with it). The core runs through
plinth.nodes.sampling.run.sample, as KSampler does; the diffusers path is the loop Plinth ran
before the core (set_timesteps, scale_model_input, one UNet call on [negative, positive],
guidance, step). Both paths alternate run by run and the medians are compared; the ratio is
core / diffusers wall time per step (target <= 1.02).
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from pathlib import Path

import torch
from common import build_sd15_random, quiet, report

# sampler -> (diffusers class, config): the table the core replaced.
DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "deis": ("DEISMultistepScheduler", {}),
    "ddim": ("EulerDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "uni_pc": ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    "uni_pc_bh2": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
}


class Context:
    """The NodeContext the sampling run needs, over one loaded model."""

    def __init__(self, sd) -> None:
        self.sd, self.device, self.dtype, self.unet_forward = sd, torch.device("cpu"), torch.float32, None

    def model(self, handle):
        return self.sd

    def progress(self, step, total):
        pass

    def check_cancelled(self):
        pass


class CountingUnet:
    """Counts UNet forwards (the diffusers path calls it directly)."""

    def __init__(self, unet) -> None:
        self.unet, self.calls = unet, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


def core_run(ctx, model, cond, uncond, sampler: str, steps: int, latent) -> tuple[float, int]:
    from plinth.nodes.core.types import ConditioningEntry
    from plinth.nodes.sampling.guidance import Guider
    from plinth.nodes.sampling.run import Noise, model_sampling_of, sample
    from plinth.nodes.sampling.samplers import SAMPLERS
    from plinth.nodes.sampling.schedulers import calculate_sigmas

    start = time.perf_counter()
    sigmas = calculate_sigmas(model_sampling_of(ctx, model), "normal", steps)
    guider = Guider(model, [ConditioningEntry(cond)], [ConditioningEntry(uncond)], 7.5)
    result = sample(ctx, guider, SAMPLERS[sampler], sigmas, Noise(5), latent)
    return time.perf_counter() - start, result.model_calls


def diffusers_run(sd, cond, uncond, sampler: str, steps: int, latent) -> tuple[float, int]:
    import diffusers

    from plinth.nodes.sampling.run import initial_noise

    class_name, extra = DIFFUSERS[sampler]
    cls = getattr(diffusers, class_name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in sd.scheduler_config.items() if not k.startswith("_") and k in accepted}
    config.update({k: v for k, v in {**extra, "timestep_spacing": "linspace"}.items() if k in accepted})
    unet = CountingUnet(sd.unet)
    start = time.perf_counter()
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    noise = initial_noise(tuple(latent.samples.shape), 5)
    x = noise * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])
    generator = torch.Generator("cpu").manual_seed(6)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            out = unet(torch.cat([x_in] * 2), t, encoder_hidden_states=context).sample
            eps_neg, eps_pos = out.chunk(2)
            x = scheduler.step(eps_neg + 7.5 * (eps_pos - eps_neg), t, x, **step_kwargs).prev_sample
    return time.perf_counter() - start, unet.calls


def measure(name: str, path: Path, samplers: list[str], steps: int, size: int, runs: int) -> list[dict]:
    from plinth.nodes.core.context import ModelHandle
    from plinth.nodes.core.types import DiffusionModel, Latent
    from plinth.nodes.models.checkpoint import load_checkpoint

    sd = load_checkpoint(path, path.parent.parent, torch.device("cpu"), torch.float32)
    ctx = Context(sd)
    model = DiffusionModel(ModelHandle(name, lambda: None))
    width = sd.text_encoder.config.hidden_size
    cond = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(1))
    uncond = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(2))
    latent = Latent(torch.zeros(1, sd.latent_channels, size // 8, size // 8))
    rows = []
    for sampler in samplers:
        core_run(ctx, model, cond, uncond, sampler, steps, latent)  # warm-up
        core_times, diff_times, calls, diff_calls = [], [], 0, None
        for _ in range(runs):
            seconds, calls = core_run(ctx, model, cond, uncond, sampler, steps, latent)
            core_times.append(seconds / steps)
            if sampler in DIFFUSERS:
                seconds, diff_calls = diffusers_run(sd, cond, uncond, sampler, steps, latent)
                diff_times.append(seconds / steps)
        core = sorted(core_times)[len(core_times) // 2]
        row = {"model": name, "sampler": sampler, "calls_per_step": calls / steps, "core_ms_per_step": core * 1e3}
        if diff_times:
            diff = sorted(diff_times)[len(diff_times) // 2]
            row.update(
                diffusers_calls_per_step=diff_calls / steps,
                diffusers_ms_per_step=diff * 1e3,
                ratio=core / diff,
            )
        rows.append(row)
        print(
            f"{name:10} {sampler:32} calls/step {row['calls_per_step']:.2f}"
            f"  core {row['core_ms_per_step']:8.1f} ms/step"
            + (
                f"  diffusers {row['diffusers_calls_per_step']:.2f} calls, {row['diffusers_ms_per_step']:8.1f} ms/step"
                f"  ratio {row['ratio']:.3f}"
                if diff_times
                else ""
            ),
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("tiny", "sd15"))
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "plinth-bench-models")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sd15-samplers", default="euler,heun,dpmpp_2m,dpmpp_2m_sde,uni_pc")
    parser.add_argument("--sd15-steps", type=int, default=3)
    parser.add_argument("--sd15-runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet()
    torch.set_grad_enabled(False)

    from plinth.nodes.models.tiny_sd import ensure_tiny_sd
    from plinth.nodes.sampling.samplers import SAMPLERS

    rows = []
    if args.only in (None, "tiny"):
        tiny = ensure_tiny_sd(args.models)
        rows += measure("tiny-sd", tiny, list(SAMPLERS), args.steps, 64, args.runs)
    if args.only in (None, "sd15"):
        sd15 = build_sd15_random(args.models)
        chosen = args.sd15_samplers.split(",")
        rows += measure("sd15-256", sd15, chosen, args.sd15_steps, 256, args.sd15_runs)
    compared = [r["ratio"] for r in rows if "ratio" in r]
    summary = {"rows": rows, "median_ratio": sorted(compared)[len(compared) // 2] if compared else None}
    print(f"median core/diffusers ratio over {len(compared)} pairs: {summary['median_ratio']}")
    report(summary, args.json)


if __name__ == "__main__":
    main()
