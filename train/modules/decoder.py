"""Stage 3: the decoder (CLIP image embedding + caption -> image) as a LightningModule.

Batches are image-text shards (uint8 images at the CLIP's input size, ``data.normalize=none``); a frozen
CLIP (``clip_ckpt``) computes the image embedding and the caption's token features on the fly, and the
training target is the image resized to the net's resolution, scaled to [-1, 1].

The image embedding is L2-normalised and scaled by sqrt(D), as for the prior. Classifier-free guidance
dropout: the image embedding with probability ``drop_image_prob`` (paper: 10%), the caption with
``drop_text_prob`` (paper: 50%), independently. Evaluation (EMA weights): DDIM with ``sample_steps``,
guidance ``guidance_scale`` (both conditionings dropped for the unconditional branch), from held-out
images' embeddings. ``val/colour_match``: fraction of generated images whose dominant palette colour
equals the source image's (train/validation.py; chance about 1/8); ``val/colour_match_source``: the same
for the source images resized to the decoder's size (the ceiling). A grid (source row over generated
row) is written to ``<run>/samples/step<N>.png`` and to W&B when it logs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.images import save_grid, to_uint8, to_unit_range
from train.diffusion import GaussianDiffusion
from train.ema import EMA, EMAUpdateAfterStep
from train.frozen_clip import FrozenClip, text_mask
from train.modules.optim import configure_adamw
from train.strategies import configure_sharding
from train.validation import dominant_colours


def random_crops(
    images: torch.Tensor, size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` x ``size`` crop at its own random position for each image of (B, C, H, W): the crops
    (B, C, size, size) and their top-left corners (B, 2). One gather, no per-sample loop."""
    b, _, h, w = images.shape
    limit = torch.tensor([h - size + 1, w - size + 1], device=images.device)
    corners = (torch.rand(b, 2, device=images.device, generator=generator) * limit).long()  # (B, 2)
    offsets = torch.arange(size, device=images.device)
    rows = (corners[:, 0, None] + offsets)[:, None, :, None]  # (B, 1, size, 1)
    cols = (corners[:, 1, None] + offsets)[:, None, None, :]  # (B, 1, 1, size)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[batch, channels, rows, cols], corners


class DecoderModule(EMAUpdateAfterStep, pl.LightningModule):
    eval_gathers = ()  # evaluation calls only the EMA net's forward: stays sharded under ZeRO-3/FSDP

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        diffusion: Mapping[str, Any],
        tokenizer=None,
        clip_ckpt: str | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.9999,
        drop_image_prob: float = 0.1,
        drop_text_prob: float = 0.5,
        sample_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 3.0,
        val_max_samples: int | None = 256,
        grid_size: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "tokenizer"])
        if not clip_ckpt:
            raise ValueError(
                "the decoder needs clip_ckpt=<CLIP run directory> (it embeds the images on the fly)"
            )
        self.net = net
        self.ema = EMA(net, decay=ema_decay)
        self._clip = FrozenClip(clip_ckpt)
        self.tokenizer = tokenizer or self._clip.tokenizer
        self.diffusion = GaussianDiffusion.from_config(**diffusion)
        self.sampler = self.diffusion.respace(sample_steps)
        self.scale = math.sqrt(self._clip.embed_dim)
        self._val: list[dict] = []

    def clip(self) -> FrozenClip:
        if self._clip.device != self.device:
            self._clip.to(self.device)
        return self._clip

    # ---- inputs -------------------------------------------------------------------------------
    def inputs(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(x0 in [-1, 1] at the net's size, the net's conditioning kwargs) from an image-text batch."""
        emb = self.clip().embed(batch["image"], batch["tokens"])
        x0 = to_unit_range(batch["image"].to(self.device), self.net.image_size)
        return x0, self.conditioning(emb["img_emb"], batch["tokens"], emb["txt_feat"])

    def conditioning(
        self, image_emb: torch.Tensor, tokens: torch.Tensor, text_feat: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The net's conditioning kwargs: a CLIP image embedding (B, D) (any norm: it is normalised and
        scaled), the caption's tokens (B, L) and, for ``net.text_encoder=clip``, their frozen CLIP
        features (B, L, W) (computed from the tokens when not given)."""
        cond: dict[str, torch.Tensor] = {"image_emb": F.normalize(image_emb.float(), dim=-1) * self.scale}
        tokens = tokens.to(self.device).long()
        if self.net.text_encoder == "clip":
            if text_feat is None:
                text_feat = self.clip().embed(None, tokens)["txt_feat"]
            cond["text_feat"] = text_feat.to(self.device)
            cond["text_mask"] = text_mask(tokens, self.tokenizer.eot_id)
        elif self.net.text_encoder == "trainable":
            cond["tokens"] = tokens
        return cond

    # ---- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0, cond = self.inputs(batch)
        b = x0.shape[0]
        cond["drop_image"] = torch.rand(b, device=self.device) < self.hparams.drop_image_prob
        cond["drop_text"] = torch.rand(b, device=self.device) < self.hparams.drop_text_prob
        terms = self.diffusion.training_losses(self.net, x0, model_kwargs=cond)
        loss = terms["loss"].mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", terms["mse"].mean())
        if "vlb" in terms:
            self.log("train/vlb", terms["vlb"].mean())
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    # ---- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        cond: Mapping[str, torch.Tensor],
        *,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        steps: int | None = None,
        sampler: str = "ddim",
        eta: float | None = None,
        noise: torch.Tensor | None = None,
        drop_text: bool = False,
        drop_image: bool = False,
        step_callback=None,
    ) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, S, S) for conditioning ``cond`` (as from :meth:`conditioning`).

        ``steps``: respace to this many steps (default ``module.sample_steps``); ``sampler``: ddim
        (``eta``, default ``module.eta``) or ddpm; ``noise``: the starting x_T (e.g. a DDIM inversion);
        ``drop_text``: condition on the image embedding alone (variations); ``drop_image``: on the
        caption alone (guidance then amplifies the caption only); ``step_callback(i, x)``: see
        GaussianDiffusion.ddim_sample_loop (inpainting).
        """
        net = self.ema.shadow if use_ema else self.net
        b = cond["image_emb"].shape[0]
        kwargs = dict(cond)
        kwargs["drop_image"] = torch.full((b,), drop_image, dtype=torch.bool, device=self.device)
        kwargs["drop_text"] = torch.full((b,), drop_text, dtype=torch.bool, device=self.device)
        uncond = {k: torch.ones(b, dtype=torch.bool, device=self.device) for k in ("drop_image", "drop_text")}
        process = self.sampler if steps is None else self.diffusion.respace(steps)
        return process.sample(
            net,
            (b, 3, net.image_size, net.image_size),
            sampler=sampler,
            eta=self.hparams.eta if eta is None else eta,
            noise=noise,
            device=self.device,
            generator=generator,
            model_kwargs=kwargs,
            guidance_scale=self.hparams.guidance_scale if guidance_scale is None else guidance_scale,
            uncond_kwargs=uncond,
            step_callback=step_callback,
        )

    # ---- evaluation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        seen = sum(len(p["source"]) for p in self._val)
        limit = self.hparams.val_max_samples
        if limit is not None and seen >= limit:
            return
        x0, cond = self.inputs(batch)
        keep = x0.shape[0] if limit is None else min(x0.shape[0], limit - seen)
        x0, cond = x0[:keep], {k: v[:keep] for k, v in cond.items()}
        g = torch.Generator(self.device).manual_seed(2000 + batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (keep,), device=self.device, generator=g)
        noise = torch.randn(x0.shape, device=self.device, generator=g)
        loss = self.diffusion.training_losses(self.ema.shadow, x0, t, noise, model_kwargs=cond)["mse"]
        samples = self.sample(cond, generator=g)
        self._val.append(
            {"loss": loss.float().cpu(), "source": to_uint8(x0).cpu(), "sample": to_uint8(samples).cpu()}
        )

    def on_validation_epoch_end(self) -> None:
        parts = self._val
        self._val = []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = [p for rank_parts in gathered for p in rank_parts]
        if not parts:
            return
        source = torch.cat([p["source"] for p in parts])
        sample = torch.cat([p["sample"] for p in parts])
        src_col, gen_col = dominant_colours(source), dominant_colours(sample)
        metrics = {
            "val/loss": torch.cat([p["loss"] for p in parts]).mean().item(),
            "val/colour_match": sum(a is not None and a == b for a, b in zip(gen_col, src_col))
            / len(src_col),
            "val/colour_match_source": sum(c is not None for c in src_col) / len(src_col),
            "val/n": float(len(source)),
        }
        self.log_dict(metrics, sync_dist=False)
        if self.trainer.is_global_zero:
            n = min(self.hparams.grid_size, len(source))
            path = Path(self.trainer.default_root_dir) / "samples" / f"step{self.global_step:07d}.png"
            save_grid([source[:n], sample[:n]], path, scale=max(1, 64 // source.shape[-1]))
            for logger in self.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="val/samples", images=[str(path)], step=self.global_step)

    def configure_model(self) -> None:
        configure_sharding(self)  # FSDP2 under strategy=fsdp; nothing under DDP or DeepSpeed

    def configure_optimizers(self):
        return configure_adamw(self, self.net)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(4.0 / mse)


class UpsamplerModule(EMAUpdateAfterStep, pl.LightningModule):
    """Stages 4 and 5: low-resolution image -> image at ``net.image_size`` (not conditioned on text).

    Training: a random crop of ``crop_fraction`` of the target size is cut from the (resized) image;
    its low-resolution version (``low_res_size / net.image_size`` of it) is corrupted by
    ``degradation`` (``blur``: gaussian, kernel 3, sigma 0.6, the paper's 64->256; ``bsr``: the
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

    eval_gathers = ()  # evaluation calls only the EMA net's forward: stays sharded under ZeRO-3/FSDP

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
        residual: bool = False,
        val_degraded: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.9999,
        sample_steps: int = 27,
        eta: float = 0.0,
        val_max_samples: int | None = 128,
        grid_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "tokenizer"])
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
        self.net = net
        self.ema = EMA(net, decay=ema_decay)
        self.diffusion = GaussianDiffusion.from_config(**diffusion)
        self.sampler = self.diffusion.respace(sample_steps)
        self._rng = None

    def low_res(self, hi: torch.Tensor, degrade: bool, rng=None) -> torch.Tensor:
        """The conditioning image for ``hi`` (float [-1, 1] at a multiple of the scale factor): a
        bicubic downsample, corrupted by ``degradation`` when ``degrade`` (``rng``: a random.Random
        for the BSR chain; default: the module's own stream)."""
        from data.degrade import bsr_degrade, light_blur, resize

        out = hi.shape[-1] * self.hparams.low_res_size // self.net.image_size
        if not degrade or self.hparams.degradation == "none":
            return resize(hi, out, "bicubic")
        if self.hparams.degradation == "blur":
            return light_blur(resize(hi, out, "bicubic"))
        if rng is None:
            if self._rng is None:
                self._rng = random.Random(self.hparams.seed * 1000 + self.global_rank)
            rng = self._rng
        return bsr_degrade(hi, out, rng)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hi = to_unit_range(batch["image"].to(self.device), self.net.image_size)
        crop = int(round(self.net.image_size * self.hparams.crop_fraction))
        if crop < hi.shape[-1]:
            hi, _ = random_crops(hi, crop)
        low = self.low_res(hi, degrade=True)
        cond = {"low_res": low}
        if self.hparams.noise_aug:
            top = int(self.hparams.noise_aug * self.diffusion.num_timesteps)
            level = torch.randint(0, top + 1, (low.shape[0],), device=self.device)
            cond = self.noised_low_res(low, level)
        target = hi - self.base(low, hi.shape[-1]) if self.hparams.residual else hi
        loss = self.diffusion.training_losses(self.net, target, model_kwargs=cond)["loss"].mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    @staticmethod
    def base(low: torch.Tensor, size: int) -> torch.Tensor:
        """Bicubic upsampling of the conditioning image to ``size`` (the residual's reference)."""
        return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)

    def noised_low_res(
        self, low: torch.Tensor, level: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The net's conditioning for ``low`` noised by the forward process at steps ``level`` (B,)."""
        noise = torch.randn(low.shape, device=low.device, generator=generator, dtype=low.dtype)
        noised = torch.where((level > 0).view(-1, 1, 1, 1), self.diffusion.q_sample(low, level, noise), low)
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
    ) -> torch.Tensor:
        """Low-resolution images in [-1, 1] (B, 3, s, s) -> (B, 3, s * factor, s * factor) in [-1, 1].

        ``steps`` (default ``module.sample_steps``), ``sampler`` and ``eta`` as in DecoderModule.sample;
        ``step_callback(i, x)`` sees the diffused variable: the image, or with ``residual`` the image
        minus :meth:`base` of ``low``."""
        net = self.ema.shadow if use_ema else self.net
        size = low.shape[-1] * self.net.image_size // self.hparams.low_res_size
        cond = {"low_res": low}
        if getattr(net, "low_res_noise_cond", False):
            step = int(self.hparams.noise_aug_sample * self.diffusion.num_timesteps)
            level = torch.full((low.shape[0],), step, dtype=torch.long, device=low.device)
            cond = self.noised_low_res(low, level, generator)
        process = self.sampler if steps is None else self.diffusion.respace(steps)
        out = process.sample(
            net,
            (low.shape[0], 3, size, size),
            sampler=sampler,
            eta=self.hparams.eta if eta is None else eta,
            device=self.device,
            generator=generator,
            model_kwargs=cond,
            step_callback=step_callback,
        )
        return out + self.base(low, size) if self.hparams.residual else out

    def on_validation_epoch_start(self) -> None:
        self._val: list[dict] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        seen = sum(len(p["psnr"]) for p in self._val)
        limit = self.hparams.val_max_samples
        if limit is not None and seen >= limit:
            return
        hi = to_unit_range(batch["image"].to(self.device), self.net.image_size)
        hi = hi[: hi.shape[0] if limit is None else limit - seen]
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
        parts = self._val
        self._val = []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = [p for rank_parts in gathered for p in rank_parts]
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
        if self.trainer.is_global_zero:
            n = min(self.hparams.grid_size, len(parts[0]["grid"][0]))
            rows = [row[:n] for row in parts[0]["grid"]]  # bicubic, ours, ground truth
            path = Path(self.trainer.default_root_dir) / "samples" / f"step{self.global_step:07d}.png"
            save_grid(rows, path, scale=max(1, 128 // self.net.image_size))
            for logger in self.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="val/samples", images=[str(path)], step=self.global_step)

    def configure_model(self) -> None:
        configure_sharding(self)  # FSDP2 under strategy=fsdp; nothing under DDP or DeepSpeed

    def configure_optimizers(self):
        return configure_adamw(self, self.net)
