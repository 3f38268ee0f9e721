"""Stages 4-5: degradations of the conditioning image, and the upsampler module end to end."""

from __future__ import annotations

import random

import pytest
import torch
from hydra.errors import InstantiationException

from data.degrade import bsr_degrade, gaussian_kernel, jpeg, light_blur
from tests.conftest import compose_config
from train.modules.upsampler import psnr
from train.run import train


def test_gaussian_kernel_and_blur():
    k = gaussian_kernel(3, 0.6)
    assert k.shape == (3, 3) and abs(k.sum().item() - 1) < 1e-6 and k[1, 1] == k.max()
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(light_blur(flat), flat)  # a constant image is unchanged
    edge = torch.zeros(1, 3, 8, 8)
    edge[..., 4:] = 1.0
    out = light_blur(edge)
    assert 0 < out[0, 0, 0, 3].item() < 1 and out[0, 0, 0, 0].item() == 0.0  # only the edge softens
    aniso = gaussian_kernel(7, 2.0, 0.3)
    # sigma 2 along x, 0.3 along y: the x profile (summed over rows) is flatter than the y profile
    assert aniso.sum(0).max() < 0.3 < 0.9 < aniso.sum(1).max()


def test_bsr_degrade_is_random_sized_and_bounded():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    outs = [bsr_degrade(x, 8, random.Random(s)) for s in range(6)]
    assert all(o.shape == (2, 3, 8, 8) and o.min() >= -1 and o.max() <= 1 for o in outs)
    assert len({round(o.sum().item(), 3) for o in outs}) == 6  # different chains
    torch.testing.assert_close(bsr_degrade(x, 8, random.Random(3)), outs[3])  # seeded
    q = jpeg(x, 50)
    assert q.shape == x.shape and 0 < (q - x).abs().mean() < 0.5


def _pil_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """The reference: each image saved by PIL (libjpeg) at ``quality`` and decoded again."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for img in ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy()
        out.append(torch.from_numpy(decoded).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1


@pytest.mark.parametrize("quality", [30, 60, 95])
@pytest.mark.parametrize("size", [(64, 64), (50, 45)])
def test_jpeg_in_torch_matches_pils_codec(quality, size):
    """The BSR chain's JPEG step runs JPEG's lossy steps in torch (on the GPU in training): its output is
    within 38 dB of PIL's round trip (about 1-2 of 255 RMS; measured 40-45 dB), and it degrades the image as
    much as PIL does (the same PSNR to the input within 0.5 dB; measured within 0.1), at any size."""
    torch.manual_seed(quality)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8), size=size, mode="bicubic")
    x = (smooth * 2 - 1 + 0.05 * torch.randn(4, 3, *size)).clamp(-1, 1)
    x[:, 0, 10:30, 5:25] = 0.8  # an edge: ringing
    ours, reference = jpeg(x, quality), _pil_jpeg(x, quality)
    assert ours.shape == x.shape and ours.min() >= -1 and ours.max() <= 1
    assert psnr(ours, reference).min() > 38
    assert (psnr(ours, x) - psnr(reference, x)).abs().max() < 0.5


def test_jpeg_quantisation_tables_are_libjpegs_at_every_quality():
    """The tables PIL writes into its JPEGs, quality 1-100 (a float 5000 / quality made 34 of them one
    step coarser in places, q=30 among them)."""
    import io

    import numpy as np
    from PIL import Image

    from data.degrade import _quantisation

    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for quality in range(1, 101):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        tables = Image.open(io.BytesIO(buf.getvalue())).quantization
        pils = torch.tensor([tables[0], tables[1]], dtype=torch.float32).view(2, 8, 8)
        assert torch.equal(_quantisation(quality, torch.device("cpu")), pils), quality


def test_jpeg_does_not_depend_on_tf32_matmuls(monkeypatch):
    """On a GPU the stages set fp32 matmuls to TF32 (10-bit mantissas), which moved 5-8% of the JPEG step's
    pixels by up to 19 levels: emulated here by rounding fp32 matmul inputs as TF32 does."""

    def tf32(t: torch.Tensor) -> torch.Tensor:
        return (t.view(torch.int32) & ~((1 << 13) - 1)).view(torch.float32) if t.dtype == torch.float32 else t

    torch.manual_seed(0)
    x = (torch.rand(2, 3, 48, 48) * 2 - 1).clamp(-1, 1)
    exact = jpeg(x, 60)
    matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: matmul(tf32(a), tf32(b)))
    assert torch.equal(jpeg(x, 60), exact)


def test_psnr():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[1] += 0.2  # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    out = psnr(b, a)
    assert out[0] > 90 and out[1].item() == pytest.approx(20.0, abs=1e-4)


def _cfg(stage: str, data_dir, output_dir, *overrides: str):
    return compose_config(
        [
            f"stage={stage}",
            "debug=fast",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={output_dir}",
            *overrides,
        ]
    )


@pytest.mark.parametrize(
    "stage,extra",
    [
        ("upsampler_256", []),
        (
            "upsampler_1024",
            ["net.low_res_noise_cond=true", "module.noise_aug=0.2", "module.noise_aug_sample=0.05"],
        ),
    ],
)
def test_upsampler_stage_trains_on_crops_and_reports_psnr(stage, extra, clip_run, tmp_path):
    run, _ = clip_run  # only for its small synthetic shards
    cfg = _cfg(
        stage,
        run.parent / "datasets",
        tmp_path / "up",
        "net.model_channels=16",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "module.sample_steps=2",
        "module.val_max_samples=4",
        *extra,
    )
    metrics = train(cfg)
    assert metrics["val/n"] == 4 and metrics["val/psnr_bicubic"] > 15
    assert metrics["val/psnr_gain"] == pytest.approx(
        metrics["val/psnr"] - metrics["val/psnr_bicubic"], abs=1e-4
    )
    assert (tmp_path / "up" / "samples" / "step0000002.png").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["module.low_res_size=12"], "low_res_size=12 must divide net.image_size=32"),
        (["module.noise_aug=0.2"], "set net.low_res_noise_cond=true"),
        (["net.low_res_noise_cond=true", "module.noise_aug=1.5"], "noise_aug=1.5: expected a fraction"),
    ],
)
def test_upsampler_rejects_bad_options(overrides, message, tmp_path):
    cfg = _cfg("upsampler_256", tmp_path, tmp_path / "run", *overrides)
    with pytest.raises(InstantiationException, match=message):
        train(cfg)


def test_training_crops_are_drawn_per_sample():
    """Each image gets its own crop position (one position per batch made every sample of a step, and of
    a 1,024-image global batch, the same region of its image)."""
    from train.modules.upsampler import random_crops

    images = torch.randn(64, 3, 32, 32)
    crops, corners = random_crops(images, 8, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 3, 8, 8) and corners.shape == (64, 2)
    assert len({tuple(c.tolist()) for c in corners}) > 32, "positions differ between samples"
    assert int(corners.min()) >= 0 and int(corners.max()) <= 32 - 8
    for k in (0, 17, 63):
        i, j = corners[k].tolist()
        assert torch.equal(crops[k], images[k, :, i : i + 8, j : j + 8])


def test_the_conditioning_image_is_float32_under_autocast_as_at_sampling():
    """Autocast would run the blur's convolution in bf16 (on a GPU too), rounding the image the net is
    conditioned on in training; the cascade conditions it on a float32 image."""
    from hydra.utils import instantiate

    from train.modules.upsampler import UpsamplerModule

    unet = instantiate(compose_config(["stage=upsampler_256", "net.model_channels=8"]).net)
    module = UpsamplerModule(unet, low_res_size=8, sample_steps=2, diffusion={"num_timesteps": 10})
    hi = torch.rand(2, 3, 32, 32) * 2 - 1
    want = module.low_res(hi, degrade=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module.low_res(hi, degrade=True)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_old_run_configs_still_name_the_module_where_it_was():
    """Runs written before the upsampler had its own file say train.modules.decoder.UpsamplerModule."""
    from hydra.utils import get_class

    from train.modules.upsampler import UpsamplerModule

    assert get_class("train.modules.decoder.UpsamplerModule") is UpsamplerModule


def test_noise_augmentation_noises_on_the_plain_schedule_and_a_residual_is_clipped_as_an_image():
    """Two things the upsampler's shifted schedule (made for the residual's small range) got wrong: the
    conditioning image was noised on it, so noise_aug=0.2 added noise of std 0.028, not the plain
    schedule's 0.32 at step 200; and sampling clipped the predicted residual to [-1, 1], not the image it
    makes with the bicubic base (a residual of 1.5 on a base of -0.8 is the valid pixel 0.7)."""
    from hydra.utils import instantiate

    from train.diffusion import GaussianDiffusion
    from train.modules.upsampler import UpsamplerModule

    shifted = {"schedule": "cosine", "num_timesteps": 1000, "schedule_shift": 12.0}
    unet = instantiate(
        compose_config(["stage=upsampler_256", "net.model_channels=8", "net.low_res_noise_cond=true"]).net
    )
    module = UpsamplerModule(unet, low_res_size=8, sample_steps=2, noise_aug=0.2, diffusion=shifted)
    level = torch.full((64,), 200)
    noised = module.noised_low_res(torch.zeros(64, 3, 8, 8), level, torch.Generator().manual_seed(0))
    plain = GaussianDiffusion.from_config(schedule="cosine", num_timesteps=1000)
    assert noised["low_res"].std().item() == pytest.approx(
        plain.sqrt_one_minus_alphas_cumprod[200].item(), rel=0.05
    )  # 0.32
    assert torch.equal(noised["low_res_noise"], level)

    unet = instantiate(compose_config(["stage=upsampler_256", "net.model_channels=8"]).net)
    clipped = {**shifted, "prediction": "x0", "clip_denoised": "static"}
    module = UpsamplerModule(unet, low_res_size=8, sample_steps=2, residual=True, diffusion=clipped)
    module.net.forward = lambda x, t, **kw: torch.full_like(x, 1.5)  # the residual it predicts
    low = torch.tensor([-0.8, 0.3]).view(2, 1, 1, 1).expand(2, 3, 8, 8).contiguous()
    out = module.upsample(low, use_ema=False, steps=2)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[0], torch.full_like(out[0], 0.7), atol=1e-5)  # was 0.2
    assert torch.allclose(out[1], torch.ones_like(out[1]), atol=1e-5)  # 1.8 clipped to 1


def test_a_residual_upsampler_targets_the_image_minus_the_bicubic_base_of_its_conditioning():
    """The residual target (a mutant adding the base passed every test): target + base(low) is the
    training crop, with the conditioning image the crop's own downsampling."""
    from hydra.utils import instantiate

    from train.modules.upsampler import UpsamplerModule

    unet = instantiate(compose_config(["stage=upsampler_256", "net.model_channels=8"]).net)
    module = UpsamplerModule(unet, low_res_size=8, residual=True, degradation="none", crop_fraction=1.0, sample_steps=2,
                             diffusion={"num_timesteps": 10})  # fmt: skip
    ramp = torch.linspace(-0.9, 0.9, 32)
    hi = (ramp[:, None] * ramp.flip(0)[None, :]).expand(2, 3, 32, 32).contiguous()  # smooth: a small residual
    target, cond = module.training_inputs(hi)
    assert cond["low_res"].shape == (2, 3, 8, 8)
    assert torch.allclose(cond["low_res"], module.low_res(hi, degrade=False))
    assert torch.allclose(target + module.base(cond["low_res"], 32), hi, atol=1e-6)
    assert target.abs().mean() < 0.8 * hi.abs().mean()  # a residual, smaller than the image


def test_bsr_takes_each_corruption_with_the_drawn_settings(monkeypatch):
    """A chain whose every draw is scripted: blur with an anisotropic rotated kernel of the drawn size and
    sigmas, noise of the drawn std (25 of 255), JPEG at the drawn quality. Mutants that never blurred,
    kept the kernel isotropic, halved the noise or never compressed passed every test."""
    import data.degrade as degrade

    class Scripted(random.Random):
        def __init__(self):
            super().__init__(0)
            self.draws = iter([0.0, 0.7, 0.0, 0.0])  # blur yes, anisotropic, noise yes, JPEG yes
            self.spans = iter([2.0, 0.5, 1.0, 25.0])  # sigma x, sigma y, angle, noise std (of 255)

        def random(self):
            return next(self.draws)

        def uniform(self, a, b):
            return next(self.spans)

        def choice(self, seq):
            return seq[0]

        def randint(self, a, b):
            return a

    kernels, compressed = [], []
    make_kernel, compress = degrade.gaussian_kernel, degrade.jpeg
    monkeypatch.setattr(degrade, "gaussian_kernel", lambda *a, **k: kernels.append(a) or make_kernel(*a, **k))
    monkeypatch.setattr(degrade, "jpeg", lambda x, q: compressed.append((x.clone(), q)) or compress(x, q))
    out = bsr_degrade(torch.zeros(2, 3, 32, 32), 16, Scripted())
    assert kernels == [(3, 2.0, 0.5, 1.0)]
    ((before_jpeg, quality),) = compressed
    assert quality == 30 and out.shape == (2, 3, 16, 16)
    assert before_jpeg.std().item() == pytest.approx(25 / 127.5, rel=0.05)  # the grey image's noise


def test_sampling_conditions_on_noise_aug_sample_and_validation_on_the_degraded_input():
    """What the net is told at sampling (the conditioning noise level ``noise_aug_sample`` x T, on every
    call) and what validation upsamples (the held-out image degraded as in training, or clean)."""
    from hydra.utils import instantiate

    from train.modules.upsampler import UpsamplerModule

    unet = instantiate(
        compose_config(["stage=upsampler_256", "net.model_channels=8", "net.low_res_noise_cond=true"]).net
    )
    module = UpsamplerModule(unet, low_res_size=8, sample_steps=2, noise_aug_sample=0.25, val_max_samples=None,
                             diffusion={"num_timesteps": 100})  # fmt: skip
    levels = []
    module.net.forward = lambda x, t, **kw: levels.append(kw["low_res_noise"].tolist()) or torch.zeros_like(x)
    module.upsample(torch.zeros(2, 3, 8, 8), use_ema=False, steps=2)
    assert levels == [[25, 25], [25, 25]]

    asked, plain_low_res = [], module.low_res
    module.low_res = lambda hi, degrade, rng=None: asked.append(degrade) or plain_low_res(hi, degrade, rng)
    module.upsample = lambda low, generator=None: torch.zeros(low.shape[0], 3, 32, 32)
    for val_degraded in (True, False):
        module.hparams.val_degraded = val_degraded
        module._val = []
        module.validation_step({"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, 0)
        assert asked[-1] is val_degraded and len(module._val) == 1
    assert len(asked) == 2
