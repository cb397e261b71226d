"""SAMPLERS: ComfyUI's 42 sampler names, in the order its KSampler lists them, each a Sampler
of the family modules beside this one.

The flags ComfyUI keeps in lists of names live on the Sampler here: ddim holds a masked
latent's kept area at fresh noise (random_inpaint_noise); the CFG++ samplers make the guider
compute the negative even at cfg 1 (needs_uncond, ComfyUI's disable_cfg1_optimization); dpm_2,
dpm_2_ancestral, uni_pc and uni_pc_bh2 get a schedule one step longer with its second-to-last
sigma dropped (discard_penultimate_sigma, ComfyUI's DISCARD_PENULTIMATE_SIGMA_SAMPLERS).
"""

from __future__ import annotations

from dataclasses import replace

from plinth.nodes.sampling import (
    samplers_dpmpp,
    samplers_k,
    samplers_multistep,
    samplers_sa_solver,
    samplers_sde,
    samplers_seeds,
    samplers_unipc,
)
from plinth.nodes.sampling.base import Sampler

NAMES = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)

DISCARD_PENULTIMATE_SIGMA = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def _registry() -> dict[str, Sampler]:
    families = (
        samplers_k,
        samplers_dpmpp,
        samplers_sde,
        samplers_seeds,
        samplers_sa_solver,
        samplers_multistep,
        samplers_unipc,
    )
    found: dict[str, Sampler] = {}
    for module in families:
        for name, sampler in module.SAMPLERS.items():
            if name in found:
                raise RuntimeError(f"sampler {name!r} is defined twice ({module.__name__})")
            found[name] = sampler
    if set(found) != set(NAMES):
        raise RuntimeError(f"sampler modules and NAMES differ: {sorted(set(found) ^ set(NAMES))}")
    return {
        name: replace(
            found[name],
            random_inpaint_noise=name == "ddim",
            needs_uncond=name.endswith("_cfg_pp"),
            discard_penultimate_sigma=name in DISCARD_PENULTIMATE_SIGMA,
        )
        for name in NAMES
    }


SAMPLERS: dict[str, Sampler] = _registry()
