"""The sampling core: every model is a denoiser in sigma space; samplers and schedulers work on it.

base.py is the sampler contract, model_sampling.py the parameterisations (epsilon, v, flow, EDM),
schedulers.py the sigma schedules, samplers_*.py the samplers, guidance.py the guided model call
and run.py one sampling run as KSampler and SamplerCustomAdvanced start it.
"""
