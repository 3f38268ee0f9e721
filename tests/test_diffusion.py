"""The diffusion process against closed forms (train/diffusion/)."""

import math

import pytest
import torch

from train.diffusion import GaussianDiffusion, dynamic_threshold, make_betas, space_timesteps
from train.diffusion.gaussian import discretized_gaussian_log_likelihood


def oracle(diffusion: GaussianDiffusion, x0: torch.Tensor):
    """A model that knows the clean sample: outputs the exact eps / x0 / v for any x_t."""

    def model(x_t, t_orig, **kwargs):
        # Map original step indices back to this process's indices.
        t = torch.searchsorted(diffusion.timestep_map.to(t_orig.device), t_orig)
        abar = diffusion._at(diffusion.alphas_cumprod, t, x_t)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        if diffusion.prediction == "eps":
            return eps
        if diffusion.prediction == "x0":
            return x0.expand_as(x_t)
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    return model


def gaussian_data_model(diffusion: GaussianDiffusion, mu: float, sigma: float):
    """The exact eps predictor E[eps | x_t] when the data is N(mu, sigma^2) per dimension."""

    def model(x_t, t_orig, **kwargs):
        t = torch.searchsorted(diffusion.timestep_map, t_orig)
        abar = diffusion._at(diffusion.alphas_cumprod, t, x_t)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * mu) / (abar * sigma**2 + 1 - abar)

    return model


def test_linear_and_cosine_schedules():
    lin = make_betas("linear", 1000)
    assert torch.allclose(lin, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert torch.allclose(make_betas("linear", 500), torch.linspace(2e-4, 0.04, 500, dtype=torch.float64))
    d = GaussianDiffusion(make_betas("cosine", 1000))
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(torch.zeros(1, dtype=torch.float64))
    # Identical until the beta clip at 0.999 bites at the very last step.
    assert torch.allclose(d.alphas_cumprod[:-1], expected[:-1], rtol=1e-9, atol=1e-12)
    assert d.betas.max() <= 0.999 and d.alphas_cumprod[-1] < 1e-4
    with pytest.raises(ValueError, match="at least 21 steps"):
        make_betas("linear", 10)
    with pytest.raises(ValueError, match="schedule='sigmoid'"):
        make_betas("sigmoid", 10)


def test_schedule_shift_multiplies_every_steps_snr():
    base, shifted = make_betas("cosine", 1000), make_betas("cosine", 1000, shift=4.0)
    snr = lambda b: (a := torch.cumprod(1 - b, 0)) / (1 - a)  # noqa: E731
    ratio = snr(shifted)[:-1] / snr(base)[:-1]  # the last step is the beta clip's (SNR ~ 0 in both)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 16.0), rtol=1e-6, atol=0)
    assert shifted.max() <= 0.999 and torch.cumprod(1 - shifted, 0)[-1] < 1e-3  # still ends in noise
    assert torch.equal(make_betas("cosine", 1000, shift=1.0), base)
    # from a stage config: module.diffusion.schedule_shift
    d = GaussianDiffusion.from_config(schedule="cosine", num_timesteps=1000, schedule_shift=4.0)
    torch.testing.assert_close(d.betas, shifted)
    lin = snr(make_betas("linear", 1000, shift=0.5)) / snr(make_betas("linear", 1000))
    torch.testing.assert_close(lin, torch.full_like(lin, 0.25), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="schedule_shift=0"):
        make_betas("cosine", 10, shift=0)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from multiplying the two Gaussians, not from the implemented formula."""
    d = GaussianDiffusion(make_betas("linear", 100))
    t = torch.arange(1, 100)
    beta, abar_prev = d.betas[t], d.alphas_cumprod_prev[t]
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    assert torch.allclose(d.posterior_variance[t], 1 / precision, rtol=1e-10)
    x0, xt = torch.randn(99, 1, dtype=torch.float64), torch.randn(99, 1, dtype=torch.float64)
    mean = (
        abar_prev.sqrt()[:, None] * x0 / (1 - abar_prev)[:, None]
        + (1 - beta).sqrt()[:, None] * xt / beta[:, None]
    ) / precision[:, None]
    got, var, logvar = d.q_posterior(x0, xt, t)
    assert torch.allclose(got.double(), mean, atol=1e-5)
    assert torch.allclose(var.squeeze(1).double(), d.posterior_variance[t].double(), rtol=1e-6)
    assert d.posterior_variance[0] == 0 and torch.isfinite(d.posterior_log_variance_clipped).all()


def test_q_sample_moments():
    d = GaussianDiffusion(make_betas("cosine", 1000))
    x0 = torch.full((200_000, 1), 0.7)
    t = torch.full((200_000,), 400)
    xt = d.q_sample(x0, t, torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0)))
    abar = d.alphas_cumprod[400].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - abar, rel=1e-2)


def test_respacing_keeps_alpha_bar_at_kept_steps():
    d = GaussianDiffusion(make_betas("cosine", 1000))
    steps = space_timesteps(1000, 64)
    assert len(steps) == 64 and steps[0] == 0 and steps[-1] == 999
    r = d.respace(64)
    assert r.num_timesteps == 64 and r.timestep_map.tolist() == steps
    assert torch.allclose(r.alphas_cumprod, d.alphas_cumprod[steps], rtol=1e-12)
    rr = r.respace([0, 10, 63])  # respacing a respaced process maps to the original steps
    assert rr.timestep_map.tolist() == [steps[0], steps[10], steps[63]]
    assert torch.allclose(rr.alphas_cumprod, d.alphas_cumprod[rr.timestep_map], rtol=1e-12)
    assert space_timesteps(1000, "27") == space_timesteps(1000, 27)
    with pytest.raises(ValueError, match="1..1000"):
        space_timesteps(1000, 2000)
    with pytest.raises(ValueError, match="number of steps"):
        space_timesteps(1000, "ddim")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_oracle_model_recovers_x0(prediction, sampler):
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction=prediction).respace(50)
    x0 = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = d.sample(
        oracle(d, x0), x0.shape, sampler=sampler, eta=0.5, generator=torch.Generator().manual_seed(2)
    )
    assert torch.allclose(out, x0, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_loss_is_zero_for_the_oracle_and_positive_otherwise(prediction):
    d = GaussianDiffusion(make_betas("linear", 1000), prediction=prediction)
    x0 = torch.randn(16, 8)
    t = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(16, 8)
    exact = d.training_losses(oracle(d, x0), x0, t, noise)
    assert exact["loss"].shape == (16,) and exact["loss"].max().item() < 1e-8
    wrong = d.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise)
    assert wrong["loss"].min().item() > 1e-3


def test_ddim_eta0_is_deterministic_and_inverts():
    mu, sigma = 0.3, 0.5
    d = GaussianDiffusion(make_betas("cosine", 1000)).respace(200)
    model = gaussian_data_model(d, mu, sigma)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    a = d.ddim_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample_loop(model, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    x0 = mu + sigma * torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    latent = d.ddim_encode(model, x0)
    assert latent.std().item() == pytest.approx(1.0, abs=0.2)  # data mapped to (about) unit noise
    back = d.ddim_sample_loop(model, x0.shape, noise=latent)
    err = (back - x0).abs()
    assert err.mean().item() < 1e-2 and err.max().item() < 5e-2  # ODE discretisation error only


def test_ddim_inversion_under_guidance_maps_back_with_the_same_guidance():
    """Variations' --invert: the decoder decodes with classifier-free guidance, so the inversion runs the
    same guided ODE backwards; an unguided inversion does not map back (the decoding's default scale 3)."""
    d = GaussianDiffusion(make_betas("cosine", 1000)).respace(100)
    conditional, unconditional = gaussian_data_model(d, 0.3, 0.5), gaussian_data_model(d, -0.3, 0.5)

    def model(x, t, cond):  # cond: (B,) which rows are the conditional branch's
        return torch.where(cond[:, None], conditional(x, t), unconditional(x, t))

    x0 = 0.3 + 0.5 * torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    yes, no = torch.ones(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool)
    guided = {"model_kwargs": {"cond": yes}, "guidance_scale": 3.0, "uncond_kwargs": {"cond": no}}
    back = d.ddim_sample_loop(model, x0.shape, noise=d.ddim_encode(model, x0, **guided), **guided)
    unguided = d.ddim_encode(model, x0, model_kwargs={"cond": yes})
    off = d.ddim_sample_loop(model, x0.shape, noise=unguided, **guided)
    err, err_off = (back - x0).abs().mean().item(), (off - x0).abs().mean().item()
    assert err < 0.06 and err_off > 10 * err, (err, err_off)  # measured: 0.037 and 1.2


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 400)])
def test_sampling_gaussian_data_gives_its_distribution(sampler, steps):
    """With the exact score of N(mu, sigma^2) data, samples have that mean and spread. (Ancestral
    sampling needs all the steps: with few, the fixed posterior variance under-disperses; DDIM's
    first-order steps under-disperse too, 3% at 100 steps, 1.4% at 400.)"""
    mu, sigma = -0.4, 0.25
    d = GaussianDiffusion(make_betas("cosine", 1000)).respace(steps)
    out = d.sample(
        gaussian_data_model(d, mu, sigma),
        (4000, 1),
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.mean().item() == pytest.approx(mu, abs=0.015)
    assert out.std().item() == pytest.approx(sigma, rel=0.03)


def test_dpm_solver_pp_takes_ddims_steps_when_the_x0_prediction_is_constant():
    """With the same x0 predicted at every step, DPM-Solver++(2M)'s extrapolation is zero and each
    of its steps is DDIM's (eta 0), step by step; otherwise they differ."""
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction="x0").respace(12)
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    paths = {}
    for sampler in ("ddim", "dpmpp_2m"):
        seen = []
        d.sample(
            oracle(d, x0),
            x0.shape,
            sampler=sampler,
            noise=noise,
            step_callback=lambda i, x, seen=seen: seen.append(x) or x,
        )
        paths[sampler] = torch.stack(seen)
    assert paths["ddim"].shape == (12, 4, 6)
    torch.testing.assert_close(paths["dpmpp_2m"], paths["ddim"], atol=1e-5, rtol=1e-5)
    model = gaussian_data_model(d, 0.3, 0.5)  # (an eps model: its x0 prediction moves)
    assert not torch.allclose(
        d.sample(model, x0.shape, sampler="ddim", noise=noise),
        d.sample(model, x0.shape, sampler="dpmpp_2m", noise=noise),
        atol=1e-3,
    )
    with pytest.raises(ValueError, match=r"sampler='euler': expected one of \['ddim', 'ddpm', 'dpmpp_2m'\]"):
        d.sample(model, x0.shape, sampler="euler", noise=noise)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("mu,sigma", [(0.3, 0.5), (0.0, 1.0)])
def test_dpm_solver_pp_solves_the_ode_in_fewer_steps_than_ddim(schedule, mu, sigma):
    """Data N(mu, sigma^2) with its exact eps model: the probability-flow ODE that both samplers solve
    keeps (x - alpha mu) / sqrt(alpha^2 sigma^2 + 1 - alpha^2) fixed, so x_T's end point is known. DDIM
    is first order: its error halves when the steps double. DPM-Solver++(2M) lands 3x to 200x closer in
    the same steps, and with the cosine schedule closer in 20 steps than DDIM in 100 (worst of 7 starts:
    5e-3 against 2.3e-2 for (0.3, 0.5))."""
    full = GaussianDiffusion(make_betas(schedule, 1000))
    noise = torch.linspace(-3, 3, 7)[:, None]
    abar_t = full.alphas_cumprod[-1].item()
    exact = mu + sigma * (noise - abar_t**0.5 * mu) / (abar_t * sigma**2 + 1 - abar_t) ** 0.5
    err = {}
    for sampler in ("ddim", "dpmpp_2m"):
        for steps in (20, 100):
            d = full.respace(steps)
            out = d.sample(gaussian_data_model(d, mu, sigma), noise.shape, sampler=sampler, noise=noise)
            err[sampler, steps] = (out - exact).abs().max().item()
    assert err["ddim", 20] == pytest.approx(5 * err["ddim", 100], rel=0.1)  # first order
    assert err["dpmpp_2m", 20] < err["ddim", 20] / 2.5, err  # measured: 3x (linear, 0.5) to 200x
    assert err["dpmpp_2m", 100] < err["ddim", 100] / 5, err  # 12x to 85x
    if schedule == "cosine":  # (the linear schedule's 20 steps: 0.07 against DDIM's 100: 0.04)
        assert err["dpmpp_2m", 20] < err["ddim", 100], err


@pytest.mark.parametrize("variance", ["learned", "fixed_large"])
def test_each_per_step_table_is_copied_to_the_device_once(variance):
    """A copy from host memory to a GPU blocks the host until the GPU has caught up; the schedule's tables
    were copied at every use, 10-20 times per training or sampling step. Now each goes to a device once,
    however many steps follow, and a table computed per call (log beta, the fixed_large variance) is
    not among them (a cache of those would grow at every step)."""
    d = GaussianDiffusion(make_betas("cosine", 100), variance=variance).respace(10)
    channels = 2 if variance == "learned" else 1

    def model(x, t, **kw):
        return torch.cat([x * 0.1] * channels, dim=1)

    x0 = torch.randn(4, 3, 4, 4)
    for sampler in ("ddpm", "ddim", "dpmpp_2m"):
        d.sample(model, x0.shape, sampler=sampler, generator=torch.Generator().manual_seed(0))
    d.training_losses(model, x0)
    tables = {id(v) for v in vars(d).values() if torch.is_tensor(v)}
    cached = dict(d._on_device)
    assert cached and {key[0] for key in cached} <= tables and len(cached) == len({k[0] for k in cached})
    for _ in range(2):
        d.sample(model, x0.shape, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert d._on_device.keys() == cached.keys()


def test_classifier_free_guidance_combines_cond_and_uncond():
    d = GaussianDiffusion(make_betas("linear", 100))

    def model(x, t, cond, drop):
        return torch.where(drop[:, None], torch.zeros_like(x), cond[:, None].expand_as(x))

    x, t = torch.randn(4, 3), torch.full((4,), 5)
    kw = {"cond": torch.arange(4.0), "drop": torch.zeros(4, dtype=torch.bool)}
    unc = {"drop": torch.ones(4, dtype=torch.bool)}
    for scale in (0.0, 1.0, 3.0):
        out = d.model_output(model, x, t, kw, guidance_scale=scale, uncond_kwargs=unc)
        assert torch.allclose(out, scale * torch.arange(4.0)[:, None].expand(4, 3))
    with pytest.raises(ValueError, match="uncond_kwargs"):
        d.model_output(model, x, t, kw, guidance_scale=2.0)


def test_learned_variance_bound_is_zero_at_the_true_posterior():
    d = GaussianDiffusion(make_betas("linear", 1000), variance="learned", prediction="x0")
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    t = torch.tensor([1, 5, 100, 500, 900, 999])
    # prediction x0 exact, v = -1: the posterior variance itself -> KL = 0 for t > 0
    model = lambda x, tt: torch.cat([x0, -torch.ones_like(x0)], dim=1)  # noqa: E731
    losses = d.training_losses(model, x0, t)
    assert losses["vlb"].abs().max().item() < 1e-4 and losses["loss"].abs().max().item() < 1e-4
    bad = lambda x, tt: torch.cat([x0 + 0.5, torch.ones_like(x0)], dim=1)  # noqa: E731
    # A wrong mean costs bits where x0 still shapes the posterior (small t); at t ~ T it barely matters.
    assert (d.training_losses(bad, x0, t)["vlb"][:3] > 0.01).all()


def test_learned_variance_extremes_stay_finite():
    d = GaussianDiffusion(make_betas("cosine", 1000), variance="learned")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    for value in (-1e4, 0.0, 1e4):
        model = lambda x, tt, v=value: torch.full((x.shape[0], 6, 8, 8), v)  # noqa: E731
        t = torch.tensor([0, 1, 500, 999])
        losses = d.training_losses(model, x0, t)
        assert torch.isfinite(losses["loss"]).all(), value
    # log-likelihood of 8-bit data: finite even for a far-off mean and a tiny scale
    ll = discretized_gaussian_log_likelihood(x0, x0 + 100, torch.full_like(x0, -20.0))
    assert torch.isfinite(ll).all() and ll.max() <= 0


def test_learned_variance_training_stays_finite():
    """100 optimiser steps of the hybrid loss on a tiny decoder UNet: no NaN or inf. (Without the floor
    under the likelihood's logs, the loss is infinite at the second step.)"""
    from train.models.unet import UNet

    torch.manual_seed(0)
    d = GaussianDiffusion(make_betas("cosine", 1000), variance="learned")
    net = UNet(
        image_size=8,
        model_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        head_channels=16,
        learned_variance=True,
    )
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x0 = (torch.rand(16, 3, 8, 8) > 0.5).float() * 2 - 1  # saturated pixels: the edge bins of the likelihood
    for _ in range(100):
        terms = d.training_losses(net, x0)
        assert torch.isfinite(terms["loss"]).all() and torch.isfinite(terms["vlb"]).all()
        opt.zero_grad()
        terms["loss"].mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_dynamic_threshold_and_clip_options():
    x = torch.tensor([[0.5, -0.2, 0.1, 0.3], [4.0, -2.0, 1.0, 0.5]])
    out = dynamic_threshold(x, quantile=1.0)
    assert torch.allclose(out[0], x[0])  # |x| <= 1: untouched
    assert torch.allclose(out[1], x[1] / 4.0)
    static = GaussianDiffusion(make_betas("linear", 100), clip_denoised="static")
    assert static.clip_x0(torch.tensor([3.0, -3.0, 0.5])).tolist() == [1.0, -1.0, 0.5]
    l2 = GaussianDiffusion(make_betas("linear", 100), clip_denoised="l2").clip_x0(torch.randn(5, 16) * 7)
    assert torch.allclose(l2.norm(dim=1), torch.full((5,), 4.0))
    with pytest.raises(ValueError, match="clip_denoised='soft'"):
        GaussianDiffusion(make_betas("linear", 100), clip_denoised="soft")
    with pytest.raises(ValueError, match="must output 6 channels"):
        GaussianDiffusion(make_betas("linear", 100), variance="learned").p_mean_variance(
            lambda x, t: x, torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
        )


# ---- Pinned values: each fails when one term of the maths changes (mutants that survived the tests above;
# docs/notes/reviews.md). References are independent of the code: torch.distributions, the normal CDF,
# the posterior (tested above against Bayes' rule).


def test_training_draws_every_step_from_the_first_to_the_last():
    """t = 0 (the last denoising step) and t = T-1 (where sampling starts) must be trained too."""
    d = GaussianDiffusion(make_betas("cosine", 10))
    t = d.sample_timesteps(20000, "cpu", generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10)
    assert len(counts) == 10 and counts.min() > 1800, counts


def test_the_bound_is_the_kl_in_bits_at_t_above_0_and_the_discretised_nll_in_bits_at_0():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 500, generator=g)
    lv1, lv2 = torch.randn(2, 500, generator=g)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    from train.diffusion.gaussian import normal_kl

    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), kl, atol=1e-5)

    def exact_log_likelihood(x, mean, std):  # 256 bins over [-1, 1]; the edge bins take the tails
        cdf = lambda z: torch.special.ndtr((z - mean) / std)  # noqa: E731
        upper, lower = cdf(x + 1 / 255), cdf(x - 1 / 255)
        return torch.where(
            x < -0.999, upper.log(), torch.where(x > 0.999, (1 - lower).log(), (upper - lower).log())
        )

    x = torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    mean = torch.tensor([-0.98, -0.9, 0.01, -0.02, 0.97, 0.9, 0.45])
    std = torch.tensor([0.05, 0.1, 0.02, 0.1, 0.05, 0.1, 0.05])
    got = discretized_gaussian_log_likelihood(x, mean, std.log())
    assert torch.allclose(got, exact_log_likelihood(x, mean, std), atol=2e-3), (
        got,
        exact_log_likelihood(x, mean, std),
    )

    # the bound's two cases, per sample: KL(posterior || model) / ln 2 at t > 0, -log p(x0) / ln 2 at t = 0,
    # the model's std being exp(log_variance / 2)
    d = GaussianDiffusion(make_betas("linear", 100), variance="learned", prediction="x0")
    x0 = torch.rand(3, 1, 2, 2, generator=g) * 2 - 1
    t = torch.tensor([0, 7, 60])
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    out = torch.cat(
        [(x0 + 0.01 * torch.randn(x0.shape, generator=g)).clamp(-1, 1), torch.rand(x0.shape) * 2 - 1], 1
    )
    p = d._p_from_output(out, x_t, t)
    true_mean, true_var, _ = d.q_posterior(x0, x_t, t)
    std = (0.5 * p["log_variance"]).exp()
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(true_mean, true_var.sqrt().expand_as(true_mean), validate_args=False),
        torch.distributions.Normal(p["mean"], std),
    )  # (at t = 0 the posterior has no variance: the likelihood is taken there)
    nll = -exact_log_likelihood(x0, p["mean"], std)
    expected = torch.where(t == 0, nll.mean((1, 2, 3)), kl.mean((1, 2, 3))) / math.log(2)
    assert torch.allclose(d._vlb_terms(out, x0, x_t, t), expected, rtol=2e-3, atol=2e-3)


def test_the_hybrid_loss_weights_the_bound_by_T_and_trains_the_mean_by_the_mse_alone():
    """Improved DDPM's hybrid loss: L_simple + 0.001 x T x L_t, the bound's gradient reaching only the
    variance channels (the mean is detached in it)."""
    d = GaussianDiffusion(make_betas("linear", 200), variance="learned")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(4, 2, 3, 3, generator=g) * 2 - 1, torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 3, 90, 199])
    out = torch.randn(4, 4, 3, 3, generator=g, requires_grad=True)
    terms = d.training_losses(lambda x, tt: out, x0, t, noise)
    assert torch.allclose(terms["loss"], terms["mse"] + 0.001 * 200 * terms["vlb"])
    terms["loss"].sum().backward()
    from_loss = out.grad.clone()
    out.grad = None
    d.training_losses(lambda x, tt: out, x0, t, noise)["mse"].sum().backward()
    assert torch.allclose(from_loss[:, :2], out.grad[:, :2])  # the mean: the MSE's gradient only
    assert from_loss[:, 2:].abs().sum() > 0 and out.grad[:, 2:].abs().sum() == 0  # the variance: the bound's


def test_the_fixed_variances_and_the_floor_at_t_0():
    d = GaussianDiffusion(make_betas("linear", 50))
    assert d.posterior_log_variance_clipped[0] == torch.log(d.posterior_variance[1])  # (0 at t = 0 itself)
    x = torch.randn(2, 1, 2, 2)
    t = torch.tensor([0, 30])
    for variance, table in (("fixed_small", d.posterior_log_variance_clipped), ("fixed_large", d.log_betas)):
        dv = GaussianDiffusion(make_betas("linear", 50), variance=variance)
        got = dv._p_from_output(torch.zeros_like(x), x, t)["log_variance"][:, 0, 0, 0]
        assert torch.allclose(got[1], table[30].float()), variance  # posterior variance vs beta_t
    assert space_timesteps(1000, 1) == [999]  # one step starts from noise at T-1


def test_ddim_at_eta_1_is_the_ancestral_step():
    """sigma from eq. 16 at eta = 1 is the posterior's std, and the step is DDPM's: the posterior mean
    given the predicted x0, plus that std times the noise."""
    d = GaussianDiffusion(make_betas("cosine", 100), prediction="x0")
    g = torch.Generator().manual_seed(2)
    x, x0 = torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([1, 40, 99])
    step = d.ddim_step(lambda xx, tt: x0, x, t, eta=1.0, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    mean, variance, _ = d.q_posterior(x0, x, t)
    assert torch.allclose(step["sample"], mean + variance.sqrt() * noise, atol=1e-5)


def test_guidance_takes_the_learned_variance_from_the_conditional_branch_and_encoding_reaches_T_minus_1():
    d = GaussianDiffusion(make_betas("cosine", 4), variance="learned")
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([1, 3])

    def model(xx, tt, flag):  # prediction channel: flag; variance channel: 10 + flag
        f = flag.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).float()
        return torch.cat([f, 10 + f], 1)

    out = d.model_output(
        model, x, t, {"flag": torch.ones(2)}, guidance_scale=3.0, uncond_kwargs={"flag": torch.zeros(2)}
    )
    assert torch.equal(out[:, 0], torch.full((2, 2, 2), 3.0)) and torch.equal(
        out[:, 1], torch.full((2, 2, 2), 11.0)
    )

    steps = []
    d = GaussianDiffusion(make_betas("cosine", 4))
    d.ddim_encode(lambda xx, tt: steps.append(tt[0].item()) or torch.zeros_like(xx), torch.zeros(1, 1, 2, 2))
    assert steps == [0, 1, 2]  # x_0 -> x_3 = x_{T-1}, where the samplers start
