"""The Gaussian diffusion process: forward noising, posterior, training losses and samplers.

The network is never part of this object: every method takes ``model``, a callable
``model(x_t, t, **model_kwargs) -> output`` where ``t`` holds the *original* step indices (0..T-1 of the
training schedule, also after respacing) and ``output`` has the shape of ``x_t`` - or twice its
channels (dim 1) with ``learned_variance``: the prediction, then an interpolation value v in [-1, 1]
between the log of beta_t and of the posterior variance (improved DDPM).

What the prediction means is ``prediction``: ``eps`` (the noise), ``x0`` (the clean sample: the paper's
prior) or ``v`` (sqrt(abar) eps - sqrt(1 - abar) x0). Losses are per sample (B,) so callers can weight
or mask them; every internal computation runs in float32/float64 whatever the model's dtype.

Samplers: ancestral DDPM (``p_sample_loop``), DDIM with eta (``ddim_sample_loop``; eta=0 is
deterministic and invertible with ``ddim_encode``) and DPM-Solver++(2M) (``dpmpp_2m_sample_loop``: the
same ODE as DDIM at second order, for fewer steps at one model call each). For fewer steps,
``respace(64)`` returns the same process restricted to 64 of the T steps (alpha_bar kept at those
steps). Classifier-free guidance is an argument of every sampler: ``guidance_scale`` with
``uncond_kwargs`` (the model kwargs that drop the conditioning); cond and uncond run as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from train.diffusion.schedules import make_betas, space_timesteps

Model = Callable[..., torch.Tensor]
PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned")
CLIP_DENOISED = ("none", "static", "dynamic", "l2")  # what sampling does to each predicted x0
SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")  # GaussianDiffusion.sample


def dynamic_threshold(x0: torch.Tensor, quantile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding: per sample s = max(1, quantile of |x0|), clamp to [-s, s], divide by s."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, quantile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)); elementwise, nats.

    Clamped away from log(0) so extreme predictions give a large finite loss, never inf or NaN.
    """
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


class GaussianDiffusion:
    """See the module docstring. Build with :meth:`from_config` or from explicit ``betas``."""

    def __init__(
        self,
        betas: torch.Tensor | Sequence[float],
        *,
        prediction: str = "eps",
        variance: str = "fixed_small",
        clip_denoised: str = "none",
        dynamic_quantile: float = 0.995,
        vlb_weight: float = 0.001,
        nll: str = "discretized",
        timestep_map: Sequence[int] | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"diffusion prediction={prediction!r}: expected one of {PREDICTIONS}")
        if variance not in VARIANCES:
            raise ValueError(f"diffusion variance={variance!r}: expected one of {VARIANCES}")
        if clip_denoised not in CLIP_DENOISED:
            raise ValueError(f"diffusion clip_denoised={clip_denoised!r}: expected one of {CLIP_DENOISED}")
        if nll not in ("discretized", "gaussian"):
            raise ValueError(f"diffusion nll={nll!r}: expected 'discretized' (8-bit images) or 'gaussian'")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("diffusion betas must be a 1-d sequence in (0, 1]")
        self.prediction, self.variance, self.clip_denoised = prediction, variance, clip_denoised
        self.dynamic_quantile, self.vlb_weight, self.nll = dynamic_quantile, vlb_weight, nll
        self.num_timesteps = len(betas)
        self.timestep_map = torch.as_tensor(
            list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map), dtype=torch.long
        )
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per step")

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], torch.zeros(1, dtype=torch.float64)])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at t=0: its log uses the t=1 value there (as the sampler adds no noise at t=0).
        floor = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([floor.view(1), self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = torch.log(betas)
        # fixed_large: beta_t, with the posterior variance at t=0 (DDPM)
        self.large_variance = (
            torch.cat([self.posterior_variance[1:2], betas[1:]]) if self.num_timesteps > 1 else betas
        )
        self.large_log_variance = torch.log(self.large_variance)
        # Each table above, copied once to each device it is read on (_table).
        self._on_device: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(
        cls,
        schedule: str = "cosine",
        num_timesteps: int = 1000,
        sampling_steps: Any = None,
        schedule_shift: float = 1.0,
        **kwargs,
    ) -> GaussianDiffusion:
        """``schedule_shift``: multiply every step's SNR by its square (schedules.shift_betas).
        ``sampling_steps`` is accepted (and ignored) so a whole conf/diffusion/ block can be passed."""
        return cls(make_betas(schedule, num_timesteps, schedule_shift), **kwargs)

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned"

    def respace(self, spacing: int | str | Sequence[int]) -> GaussianDiffusion:
        """The process restricted to a subset of steps (alpha_bar unchanged at the kept steps)."""
        use = space_timesteps(self.num_timesteps, spacing)
        abar = self.alphas_cumprod[use]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(
            1.0 - abar / prev,
            prediction=self.prediction,
            variance=self.variance,
            clip_denoised=self.clip_denoised,
            dynamic_quantile=self.dynamic_quantile,
            vlb_weight=self.vlb_weight,
            nll=self.nll,
            timestep_map=self.timestep_map[use].tolist(),
        )

    # ---- helpers ----------------------------------------------------------------------------------
    def _table(self, arr: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``arr`` (one of this process's per-step tables) on ``device``, copied there once: a copy from
        host memory at every call would make the host wait for the GPU at every one (a blocking copy
        synchronises), 10-20 times per training or sampling step."""
        key = (id(arr), device)
        hit = self._on_device.get(key)
        if hit is None or hit[0] is not arr:
            hit = self._on_device[key] = (arr, arr.to(device))
        return hit[1]

    def _at(self, arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] shaped (B, 1, ..., 1) for broadcasting against x, in float32 on x's device."""
        out = self._table(arr, t.device).index_select(0, t).to(x.device, torch.float32)
        return out.view(-1, *([1] * (x.ndim - 1)))

    def _call(self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: Mapping) -> torch.Tensor:
        return model(x, self._table(self.timestep_map, t.device)[t], **model_kwargs)

    def sample_timesteps(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    # ---- forward process --------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._at(self.posterior_mean_coef1, t, x_t) * x0
            + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            self._at(self.posterior_variance, t, x_t),
            self._at(self.posterior_log_variance_clipped, t, x_t),
        )

    def x0_from_eps(self, x_t, t, eps):
        return (
            self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def eps_from_x0(self, x_t, t, x0):
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def v_target(self, x0, t, noise):
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * noise
            - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def training_target(self, x0, t, noise):
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.v_target(x0, t, noise)

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """A predicted x0 as ``clip_denoised`` says: ``static`` clamped to [-1, 1], ``dynamic`` Imagen's
        thresholding, ``l2`` rescaled to norm sqrt(numel), ``none`` unchanged."""
        if self.clip_denoised == "static":
            return x0.clamp(-1, 1)
        if self.clip_denoised == "dynamic":
            return dynamic_threshold(x0, self.dynamic_quantile)
        if self.clip_denoised == "l2":  # each sample to norm sqrt(numel): unit vectors x sqrt(D) (the prior)
            flat = x0.reshape(x0.shape[0], -1)
            return (flat * (flat.shape[1] ** 0.5 / flat.norm(dim=1, keepdim=True).clamp(min=1e-12))).view_as(
                x0
            )
        return x0

    # ---- the model's reverse step ---------------------------------------------------------------
    def model_output(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Mapping | None = None,
        guidance_scale: float = 1.0,
        uncond_kwargs: Mapping | None = None,
    ) -> torch.Tensor:
        """The raw model output in float32, with classifier-free guidance when ``guidance_scale != 1``:
        uncond + scale (cond - uncond) on the prediction channels (learned variance is taken from cond)."""
        model_kwargs = dict(model_kwargs or {})
        if guidance_scale == 1.0:
            return self._call(model, x, t, model_kwargs).float()
        if uncond_kwargs is None:
            raise ValueError(
                "guidance_scale != 1 needs uncond_kwargs (the model kwargs that drop the conditioning)"
            )
        both = {}
        for key in set(model_kwargs) | set(uncond_kwargs):
            cond = model_kwargs.get(key)
            uncond = uncond_kwargs.get(key, cond)
            if torch.is_tensor(cond) and torch.is_tensor(uncond):
                both[key] = torch.cat([cond, uncond])
            elif not torch.is_tensor(cond) and not torch.is_tensor(uncond) and cond == uncond:
                both[key] = cond
            else:
                raise ValueError(
                    f"guidance: model kwarg {key!r} must be a batch tensor in both model_kwargs and uncond_kwargs"
                )
        out = self._call(model, torch.cat([x, x]), torch.cat([t, t]), both).float()
        cond, uncond = out.chunk(2)
        channels = x.shape[1]
        guided = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([guided, cond[:, channels:]], dim=1)

    def p_mean_variance(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, x0_offset: torch.Tensor | None = None, **kw
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): mean, variance, log variance, and the (clipped) predicted x0 and eps.
        ``x0_offset``: what the diffused variable is relative to (a residual upsampler's bicubic base): the
        predicted x0 is clipped as ``x0 + x0_offset``, the image, not as the residual itself."""
        out = self.model_output(model, x, t, **kw)
        return self._p_from_output(out, x, t, x0_offset)

    def _p_from_output(
        self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, x0_offset: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        x = x.float()
        channels = x.shape[1]
        if self.learned_variance:
            if out.shape[1] != 2 * channels:
                raise ValueError(
                    f"learned variance: the model must output {2 * channels} channels (prediction, v), got {out.shape[1]}"
                )
            out, v = out[:, :channels], out[:, channels:]
            frac = (v.clamp(-1, 1) + 1) / 2
            min_log = self._at(self.posterior_log_variance_clipped, t, x)
            max_log = self._at(self.log_betas, t, x)
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if out.shape != x.shape:
                raise ValueError(f"the model output {tuple(out.shape)} must match x_t {tuple(x.shape)}")
            if self.variance == "fixed_small":
                variance = self._at(self.posterior_variance, t, x).expand_as(x)
                log_variance = self._at(self.posterior_log_variance_clipped, t, x).expand_as(x)
            else:  # fixed_large
                variance = self._at(self.large_variance, t, x).expand_as(x)
                log_variance = self._at(self.large_log_variance, t, x).expand_as(x)
        if self.prediction == "eps":
            x0 = self.x0_from_eps(x, t, out)
        elif self.prediction == "x0":
            x0 = out
        else:
            x0 = (
                self._at(self.sqrt_alphas_cumprod, t, x) * x
                - self._at(self.sqrt_one_minus_alphas_cumprod, t, x) * out
            )
        x0 = self.clip_x0(x0) if x0_offset is None else self.clip_x0(x0 + x0_offset) - x0_offset
        eps = self.eps_from_x0(x, t, x0)
        mean, _, _ = self.q_posterior(x0, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": x0, "eps": eps}

    # ---- training ---------------------------------------------------------------------------------
    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        model_kwargs: Mapping | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,): ``loss`` = ``mse`` on the prediction (+ ``vlb_weight`` x T x ``vlb``, the
        variational bound term in bits per dimension, with learned variance: the hybrid loss)."""
        x0 = x0.float()
        t = self.sample_timesteps(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = self._call(model, x_t, t, dict(model_kwargs or {})).float()
        channels = x0.shape[1]
        pred = out[:, :channels] if self.learned_variance else out
        if pred.shape != x0.shape:
            raise ValueError(f"the model output {tuple(out.shape)} does not match the data {tuple(x0.shape)}")
        terms = {"mse": mean_flat((self.training_target(x0, t, noise) - pred) ** 2)}
        if self.learned_variance:
            # The bound trains only the variance: the mean comes from a detached prediction.
            frozen = torch.cat([pred.detach(), out[:, channels:]], dim=1)
            terms["vlb"] = self._vlb_terms(frozen, x0, x_t, t)
            terms["loss"] = terms["mse"] + self.vlb_weight * self.num_timesteps * terms["vlb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _vlb_terms(
        self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L_t in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t>0, -log p(x_0|x_1) at t=0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        p = self._p_from_output(out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        if self.nll == "discretized":
            nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        else:
            nll = 0.5 * (
                math.log(2 * math.pi)
                + p["log_variance"]
                + (x0 - p["mean"]) ** 2 * torch.exp(-p["log_variance"])
            )
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ---- samplers ---------------------------------------------------------------------------------
    @staticmethod
    def _noise(shape, device, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            return torch.randn(shape, device=device)
        return torch.randn(shape, generator=generator, device=generator.device).to(device)

    def _steps(self, progress: bool, desc: str):
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            return tqdm(steps, desc=desc, leave=False)
        return steps

    def p_sample(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, generator=None, **kw
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} (no noise at t=0): the sampling step of Algorithm 2 in Ho et
        al. (2020), "Denoising Diffusion Probabilistic Models", with the learned variance of Nichol &
        Dhariwal (2021), "Improved DDPM", when the net predicts one."""
        p = self.p_mean_variance(model, x, t, **kw)
        noise = self._noise(x.shape, x.device, generator)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {
            "sample": p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise,
            "pred_x0": p["pred_x0"],
        }

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        *,
        noise: torch.Tensor | None = None,
        device=None,
        generator: torch.Generator | None = None,
        model_kwargs: Mapping | None = None,
        guidance_scale: float = 1.0,
        uncond_kwargs: Mapping | None = None,
        progress: bool = False,
        step_callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        x0_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling from pure noise through every step of this (possibly respaced) process
        (Algorithm 2 of Ho et al. 2020; respacing as in Nichol & Dhariwal 2021, section 4).

        ``step_callback(i, x)`` may replace x after each step (inpainting keeps the known region there);
        ``x0_offset`` as in :meth:`p_mean_variance`.
        """
        x = noise if noise is not None else self._noise(tuple(shape), device, generator)
        kw = dict(
            model_kwargs=model_kwargs,
            guidance_scale=guidance_scale,
            uncond_kwargs=uncond_kwargs,
            x0_offset=x0_offset,
        )
        for i in self._steps(progress, "ddpm"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.p_sample(model, x, t, generator=generator, **kw)["sample"]
            if step_callback is not None:
                x = step_callback(i, x)
        return x

    def ddim_step(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, eta: float = 0.0, generator=None, **kw
    ) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12,
        sigma from eq. 16); eta=0 deterministic, eta=1 matches DDPM's posterior variance."""
        p = self.p_mean_variance(model, x, t, **kw)
        x = x.float()
        abar = self._at(self.alphas_cumprod, t, x)
        abar_prev = self._at(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = (
            abar_prev.sqrt() * p["pred_x0"] + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * p["eps"]
        )
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = mean + nonzero * sigma * self._noise(x.shape, x.device, generator) if eta > 0 else mean
        return {"sample": sample, "pred_x0": p["pred_x0"]}

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        *,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        device=None,
        generator: torch.Generator | None = None,
        model_kwargs: Mapping | None = None,
        guidance_scale: float = 1.0,
        uncond_kwargs: Mapping | None = None,
        progress: bool = False,
        step_callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        x0_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DDIM sampling (Song et al. 2021) from pure noise, or from ``noise`` (e.g. :meth:`ddim_encode`'s),
        through every step of this (possibly respaced) process; ``step_callback`` as in p_sample_loop."""
        x = noise if noise is not None else self._noise(tuple(shape), device, generator)
        kw = dict(
            model_kwargs=model_kwargs,
            guidance_scale=guidance_scale,
            uncond_kwargs=uncond_kwargs,
            x0_offset=x0_offset,
        )
        for i in self._steps(progress, "ddim"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.ddim_step(model, x, t, eta=eta, generator=generator, **kw)["sample"]
            if step_callback is not None:
                x = step_callback(i, x)
        return x

    @torch.no_grad()
    def dpmpp_2m_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        *,
        noise: torch.Tensor | None = None,
        device=None,
        generator: torch.Generator | None = None,
        model_kwargs: Mapping | None = None,
        guidance_scale: float = 1.0,
        uncond_kwargs: Mapping | None = None,
        progress: bool = False,
        step_callback: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        x0_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
        Probabilistic Models", section 4 and algorithm 2): the probability-flow ODE that DDIM (eta=0)
        follows, integrated exactly in its linear part over the log-SNR lambda, and to second order in the
        data prediction, which is extrapolated from this step's x0 and the previous step's. One model call
        per step, as DDIM; with a constant x0 prediction the two are identical. Each x0 is clipped as
        ``clip_denoised`` says, which is why the data-prediction form suits guidance. The first step is
        first order (no previous x0), and so is the last, to x_0, which lands on the predicted x0 as
        DDIM's last step does. ``step_callback`` as in p_sample_loop."""
        x = noise if noise is not None else self._noise(tuple(shape), device, generator)
        x = x.float()
        kw = dict(
            model_kwargs=model_kwargs,
            guidance_scale=guidance_scale,
            uncond_kwargs=uncond_kwargs,
            x0_offset=x0_offset,
        )
        alpha = self.sqrt_alphas_cumprod.tolist()  # python floats in float64: per-step scalars
        sigma = self.sqrt_one_minus_alphas_cumprod.tolist()
        lam = [math.log(a / s) for a, s in zip(alpha, sigma)]  # log SNR / 2, rising as i falls
        prev_x0 = prev_h = None
        for i in self._steps(progress, "dpm++2m"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x0 = self.p_mean_variance(model, x, t, **kw)["pred_x0"]
            if i == 0:
                x = x0
            else:
                h = lam[i - 1] - lam[i]
                d = x0
                if prev_x0 is not None and i > 1:  # (1 + 1/2r) x0 - (1/2r) prev_x0, r = h_{i+1} / h_i
                    d = x0 + (x0 - prev_x0) * (h / (2 * prev_h))
                x = (sigma[i - 1] / sigma[i]) * x - alpha[i - 1] * math.expm1(-h) * d
                prev_x0, prev_h = x0, h
            if step_callback is not None:
                x = step_callback(i, x)
        return x

    @torch.no_grad()
    def ddim_encode(
        self,
        model: Model,
        x0: torch.Tensor,
        *,
        model_kwargs: Mapping | None = None,
        guidance_scale: float = 1.0,
        uncond_kwargs: Mapping | None = None,
    ) -> torch.Tensor:
        """Deterministic DDIM inversion x_0 -> x_{T-1} (eq. 13 of Song et al. 2021 run forward, the ODE view):
        ``ddim_sample_loop(noise=encoded, eta=0)`` with the same guidance maps back."""
        x = x0.float()
        steps = range(self.num_timesteps - 1)
        guidance = {"guidance_scale": guidance_scale, "uncond_kwargs": uncond_kwargs}
        for i in steps:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(model, x, t, model_kwargs=model_kwargs, **guidance)
            abar_next = self._at(self.alphas_cumprod_next, t, x)
            x = abar_next.sqrt() * p["pred_x0"] + (1 - abar_next).sqrt() * p["eps"]
        # x_0 stands at the level of step 0 (alpha_bar_0 ~ 1); the result at that of step T-1, where
        # the samplers start.
        return x

    def sample(
        self, model: Model, shape: Sequence[int], *, sampler: str = "ddim", eta: float = 0.0, **kw
    ) -> torch.Tensor:
        """``sampler``: ddim (with ``eta``), ddpm or dpmpp_2m (DPM-Solver++(2M); eta is DDIM's only)."""
        if sampler == "ddim":
            return self.ddim_sample_loop(model, shape, eta=eta, **kw)
        if sampler == "ddpm":
            return self.p_sample_loop(model, shape, **kw)
        if sampler == "dpmpp_2m":
            return self.dpmpp_2m_sample_loop(model, shape, **kw)
        raise ValueError(f"sampler={sampler!r}: expected one of {list(SAMPLERS)}")
