"""Gaussian diffusion, shared by the prior, the decoder and the upsamplers (the process, never the net)."""

from train.diffusion.gaussian import (
    SAMPLERS,
    GaussianDiffusion,
    dynamic_threshold,
    mean_flat,
    normal_kl,
)
from train.diffusion.schedules import cosine_betas, linear_betas, make_betas, space_timesteps

__all__ = [
    "SAMPLERS",
    "GaussianDiffusion",
    "cosine_betas",
    "dynamic_threshold",
    "linear_betas",
    "make_betas",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
