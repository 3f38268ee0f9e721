"""Noise schedules and timestep respacing.

A schedule is the sequence beta_1..beta_T of per-step noise variances; everything else follows from
alpha_bar_t = prod_{s<=t} (1 - beta_s), the fraction of signal variance left at step t:
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise. Steps are 0-indexed here (t = 0 .. T-1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule, rescaled so that any T covers the same range as T=1000 (Nichol & Dhariwal)."""
    scale = 1000 / num_timesteps
    if scale * beta_end >= 1:
        raise ValueError(
            f"linear schedule with num_timesteps={num_timesteps}: beta_end would reach {scale * beta_end:.2f} "
            f"(>= 1); use at least {int(1000 * beta_end) + 1} steps or the cosine schedule"
        )
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """alpha_bar at continuous time t in [0, 1] of the cosine schedule (improved DDPM, eq. 17)."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose alpha_bar follows cos^2; each beta clipped at ``max_beta`` (the last step would be 1)."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = cosine_alpha_bar(t)
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def shift_betas(betas: torch.Tensor, shift: float, max_beta: float = 0.999) -> torch.Tensor:
    """The schedule with every step's signal-to-noise ratio alpha_bar / (1 - alpha_bar) multiplied by
    ``shift`` ** 2 (Hoogeboom et al. 2023, "simple diffusion": a schedule tuned at side d0 suits side d
    with shift = d0 / d, since averaging over (d0 / d)^2 pixels divides the noise variance by that).
    shift > 1 means less noise at every step (smaller images), < 1 more (larger images)."""
    if shift <= 0:
        raise ValueError(f"diffusion schedule_shift={shift}: must be > 0")
    if shift == 1:
        return betas
    abar = torch.cumprod(1.0 - betas, 0)
    snr = abar / (1.0 - abar).clamp(min=1e-20) * shift**2
    shifted = snr / (1.0 + snr)
    prev = torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    return (1.0 - shifted / prev).clamp(min=1e-12, max=max_beta)


def make_betas(schedule: str, num_timesteps: int, shift: float = 1.0) -> torch.Tensor:
    """The betas of ``schedule`` (linear | cosine) over ``num_timesteps``, SNR-shifted by ``shift``."""
    if num_timesteps < 1:
        raise ValueError(f"diffusion num_timesteps={num_timesteps}: must be >= 1")
    if schedule == "linear":
        return shift_betas(linear_betas(num_timesteps), shift)
    if schedule == "cosine":
        return shift_betas(cosine_betas(num_timesteps), shift)
    raise ValueError(f"diffusion schedule={schedule!r}: expected 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, spacing: int | str | Sequence[int]) -> list[int]:
    """The steps a respaced sampler visits, ascending, always including 0 and T-1.

    ``spacing``: an int N (N steps spread evenly over 0..T-1, e.g. the paper's 64 of 1000 for the prior),
    the same as a string ("64"), or an explicit list of step indices.
    """
    if isinstance(spacing, str):
        if not spacing.strip().isdigit():
            raise ValueError(f"timestep spacing {spacing!r}: expected a number of steps such as '64'")
        spacing = int(spacing)
    if isinstance(spacing, int):
        if not 1 <= spacing <= num_timesteps:
            raise ValueError(f"timestep spacing {spacing}: expected 1..{num_timesteps} steps")
        if spacing == 1:
            return [num_timesteps - 1]
        steps = torch.linspace(0, num_timesteps - 1, spacing, dtype=torch.float64).round().long().tolist()
        return sorted(set(steps))
    steps = sorted({int(s) for s in spacing})
    if not steps or steps[0] < 0 or steps[-1] >= num_timesteps:
        raise ValueError(f"timestep spacing {list(spacing)}: steps must lie in 0..{num_timesteps - 1}")
    return steps
