"""Stages 4 and 5: the upsamplers (64 -> 256 and 256 -> 1024 in the paper) as a LightningModule.

Batches are image shards (uint8, ``data.normalize=none``) at the output size; the conditioning image is
derived from each random crop (train/modules/upsampler.py ``UpsamplerModule`` docstring). Logged:
``train/loss``, ``train/lr``, ``val/psnr``, ``val/psnr_bicubic``, ``val/psnr_gain`` and a grid (bicubic,
ours, ground truth) in ``<run>/samples/step<N>.png``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from data.images import to_uint8, to_unit_range
from train.diffusion import GaussianDiffusion
from train.modules.base import DiffusionStageModule


def random_crops(
    images: torch.Tensor, size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` x ``size`` crop at its own random position for each image of (B, C, H, W): the crops
    (B, C, size, size) and their top-left corners (B, 2). One gather, no per-sample loop."""
    b, _, h, w = images.shape
    u = torch.rand(b, 2, device=images.device, generator=generator)
    # scaled by host numbers: a tensor of them copied to the GPU would make the host wait there every step
    corners = torch.stack([u[:, 0] * (h - size + 1), u[:, 1] * (w - size + 1)], dim=1).long()  # (B, 2)
    offsets = torch.arange(size, device=images.device)
    rows = (corners[:, 0, None] + offsets)[:, None, :, None]  # (B, 1, size, 1)
    cols = (corners[:, 1, None] + offsets)[:, None, None, :]  # (B, 1, 1, size)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[batch, channels, rows, cols], corners


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(4.0 / mse)


class UpsamplerModule(DiffusionStageModule):
    """Stages 4 and 5: low-resolution image -> image at ``net.image_size`` (not conditioned on text).

    Training: a random crop of ``crop_fraction`` of the target size is cut from the (resized) image;
    its low-resolution version (``low_res_size / net.image_size`` of it) is corrupted by
    ``degradation`` (``blur``: gaussian, kernel 3, sigma 0.6, for 64->256 (the paper names the blur, not its settings); ``bsr``: the
    BSR-style chain of data/degrade.py, the paper's 256->1024; ``none``). The net is fully
    convolutional, so it samples at full size. Evaluation on held-out images: their downsample,
    degraded as in training (``val_degraded``, seeded) or clean, is upsampled by DDIM (``sample_steps``,
    paper: 27 and 15) and compared by PSNR with the ground truth, next to bicubic upsampling of the same
    input (``val/psnr`` vs ``val/psnr_bicubic``).

    Noise-conditioning augmentation (optional, needs ``net.low_res_noise_cond``): in training the
    degraded low-res image is further noised by the forward process at a random step in
    [0, ``noise_aug`` x T] and the net is told the step; sampling conditions on step
    ``noise_aug_sample`` x T (0: the clean input).

    ``residual``: diffuse the difference between the image and the bicubic upsampling of its
    conditioning image, and add the upsampling back after sampling (SRDiff's formulation): the
    untrained net already gives bicubic, and training only has to learn the missing detail.
    """

    optimizer_defaults = {**DiffusionStageModule.optimizer_defaults, "lr": 1e-3}

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        diffusion: Mapping[str, Any],
        tokenizer=None,
        low_res_size: int,
        degradation: str = "blur",
        crop_fraction: float = 0.25,
        noise_aug: float = 0.0,
        noise_aug_sample: float = 0.0,
        residual: bool = False,  # (conf/stage says true; false here loads runs from before the key as they were)
        val_degraded: bool = True,
        optimizer: Mapping[str, Any] | None = None,
        ema_decay: float = 0.9999,
        sample_steps: int = 27,
        eta: float = 0.0,
        val_max_samples: int | None = 128,
        grid_size: int = 8,
        seed: int = 0,
        **old_keys: Any,
    ) -> None:
        super().__init__()
        optimizer, diffusion = self.settle_blocks(old_keys, optimizer, diffusion)
        # saved as the arguments are now: the settled blocks, not the old keys
        self.save_hyperparameters(ignore=["net", "tokenizer", *old_keys])
        if degradation not in ("none", "blur", "bsr"):
            raise ValueError(f"module.degradation={degradation!r}: expected none, blur or bsr")
        size = net.image_size
        if low_res_size >= size or size % low_res_size:
            raise ValueError(
                f"module.low_res_size={low_res_size} must divide net.image_size={size} and be smaller"
            )
        for name, value in (("noise_aug", noise_aug), ("noise_aug_sample", noise_aug_sample)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"module.{name}={value}: expected a fraction of the steps in [0, 1)")
        if (noise_aug or noise_aug_sample) and not getattr(net, "low_res_noise_cond", False):
            raise ValueError(
                "module.noise_aug / noise_aug_sample need a net told the noise level: set net.low_res_noise_cond=true"
            )
        crop = int(round(size * crop_fraction))
        factor = size // low_res_size
        if crop < factor or crop % factor:
            raise ValueError(
                f"module.crop_fraction={crop_fraction}: a {crop} px crop is not a multiple of {factor}"
            )
        self.setup_diffusion(net, diffusion, ema_decay, sample_steps)
        # Noise-conditioning augmentation noises the conditioning image on the plain schedule: the process's
        # schedule_shift (the residual's small range) would make each level's noise far weaker on a
        # full-range image (x12 shift: std 0.028 instead of 0.32 at noise_aug=0.2)
        self.augmentation = GaussianDiffusion.from_config(**{**dict(diffusion), "schedule_shift": 1.0})
        self._rng = None

    def low_res(self, hi: torch.Tensor, degrade: bool, rng=None) -> torch.Tensor:
        """The conditioning image for ``hi`` (float [-1, 1] at a multiple of the scale factor): a
        bicubic downsample, corrupted by ``degradation`` when ``degrade`` (``rng``: a random.Random
        for the BSR chain; default: the module's own stream)."""
        from data.degrade import bsr_degrade, light_blur, resize

        out = hi.shape[-1] * self.hparams.low_res_size // self.net.image_size
        # in float32 under autocast too (it would run the blur's convolution in bf16): the cascade hands the
        # net a float32 image at sampling, so training conditions on the same precision
        with torch.autocast(hi.device.type, enabled=False):
            hi = hi.float()
            if not degrade or self.hparams.degradation == "none":
                return resize(hi, out, "bicubic")
            if self.hparams.degradation == "blur":
                return light_blur(resize(hi, out, "bicubic"))
            if rng is None:
                if self._rng is None:
                    self._rng = random.Random(self.hparams.seed * 1000 + self.global_rank)
                rng = self._rng
            return bsr_degrade(hi, out, rng)

    def training_inputs(self, hi: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What the net trains on for images ``hi`` (float [-1, 1] at the output size): a random crop's
        diffusion target (the crop, or its residual over the bicubic upsampling of the conditioning image)
        and conditioning (the degraded low-res crop, noised when ``noise_aug``). On ``hi``'s device
        (eval.bench_train times the same inputs)."""
        crop = int(round(self.net.image_size * self.hparams.crop_fraction))
        if crop < hi.shape[-1]:
            hi, _ = random_crops(hi, crop)
        low = self.low_res(hi, degrade=True)
        cond = {"low_res": low}
        if self.hparams.noise_aug:
            top = int(self.hparams.noise_aug * self.diffusion.num_timesteps)
            level = torch.randint(0, top + 1, (low.shape[0],), device=hi.device)
            cond = self.noised_low_res(low, level)
        target = hi - self.base(low, hi.shape[-1]) if self.hparams.residual else hi
        return target, cond

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hi = to_unit_range(batch["image"].to(self.device), self.net.image_size)
        target, cond = self.training_inputs(hi)
        loss = self.diffusion.training_losses(self.net, target, model_kwargs=cond)["loss"].mean()
        self.log("train/loss", loss)  # (not prog_bar: train/callbacks/progress_bar.py)
        self.log_lr()
        return loss

    @staticmethod
    def base(low: torch.Tensor, size: int) -> torch.Tensor:
        """Bicubic upsampling of the conditioning image to ``size`` (the residual's reference)."""
        return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)

    def noised_low_res(
        self,
        low: torch.Tensor,
        level: torch.Tensor,
        generator: torch.Generator | None = None,
        shared: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The net's conditioning for ``low`` noised at steps ``level`` (B,) of the unshifted schedule
        (``shared``: one noise for every row)."""
        shape = (1, *low.shape[1:]) if shared else low.shape
        noise = torch.randn(shape, device=low.device, generator=generator, dtype=low.dtype).expand_as(low)
        noised = torch.where(
            (level > 0).view(-1, 1, 1, 1), self.augmentation.q_sample(low, level, noise), low
        )
        return {"low_res": noised, "low_res_noise": level}

    @torch.no_grad()
    def upsample(
        self,
        low: torch.Tensor,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        *,
        steps: int | None = None,
        sampler: str = "ddim",
        eta: float | None = None,
        step_callback=None,
        shared_noise: bool = False,
    ) -> torch.Tensor:
        """Low-resolution images in [-1, 1] (B, 3, s, s) -> (B, 3, s * factor, s * factor) in [-1, 1].

        ``steps`` (default ``module.sample_steps``), ``sampler`` and ``eta`` as in DecoderModule.sample;
        ``step_callback(i, x)`` sees the diffused variable: the image, or with ``residual`` the image
        minus :meth:`base` of ``low``. ``shared_noise``: every row starts from the same noise and has its
        input noised alike (interpolation: the rows then differ by their inputs only)."""
        net = self.ema.shadow if use_ema else self.net
        size = low.shape[-1] * self.net.image_size // self.hparams.low_res_size
        cond = {"low_res": low}
        if getattr(net, "low_res_noise_cond", False):
            step = int(self.hparams.noise_aug_sample * self.diffusion.num_timesteps)
            level = torch.full((low.shape[0],), step, dtype=torch.long, device=low.device)
            cond = self.noised_low_res(low, level, generator, shared=shared_noise)
        process = self.sampler if steps is None else self.diffusion.respace(steps)
        base = self.base(low, size) if self.hparams.residual else None
        shape = (low.shape[0], 3, size, size)
        noise = None
        if shared_noise:
            noise = (
                GaussianDiffusion._noise((1, *shape[1:]), self.device, generator).expand(shape).contiguous()
            )
        out = process.sample(
            net,
            shape,
            sampler=sampler,
            eta=self.hparams.eta if eta is None else eta,
            noise=noise,
            device=self.device,
            generator=generator,
            model_kwargs=cond,
            step_callback=step_callback,
            x0_offset=base,  # the residual's x0 is clipped as an image: base + x0 in [-1, 1]
        )
        return out if base is None else out + base

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        room = self.val_room("psnr")
        if room == 0:
            return
        hi = to_unit_range(batch["image"].to(self.device), self.net.image_size)[:room]
        # the held-out inputs are degraded like the training ones (seeded: the same inputs every
        # validation), as the previous stage's outputs would be; bicubic upsamples the same inputs
        low = self.low_res(hi, degrade=self.hparams.val_degraded, rng=random.Random(3000 + batch_idx))
        g = torch.Generator(self.device).manual_seed(3000 + batch_idx)
        out = self.upsample(low, generator=g).clamp(-1, 1)
        bicubic = F.interpolate(low, size=hi.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        self._val.append(
            {
                "psnr": psnr(out, hi).cpu(),
                "psnr_bicubic": psnr(bicubic, hi).cpu(),
                "grid": [to_uint8(t[:8]).cpu() for t in (bicubic, out, hi)],
            }
        )

    def on_validation_epoch_end(self) -> None:
        parts = self.validation_parts()
        if not parts:
            return
        ours, base = torch.cat([p["psnr"] for p in parts]), torch.cat([p["psnr_bicubic"] for p in parts])
        metrics = {
            "val/psnr": ours.mean().item(),
            "val/psnr_bicubic": base.mean().item(),
            "val/psnr_gain": (ours - base).mean().item(),
            "val/n": float(len(ours)),
        }
        self.log_dict(metrics, sync_dist=False)
        n = min(self.hparams.grid_size, len(parts[0]["grid"][0]))
        rows = [row[:n] for row in parts[0]["grid"]]  # bicubic, ours, ground truth
        self.log_grid(rows, scale=max(1, 128 // self.net.image_size))
