"""Stage 3: the decoder (CLIP image embedding + caption -> image) as a LightningModule.

Batches are image-text shards (uint8 images at the CLIP's input size, ``data.normalize=none``); a frozen
CLIP (``clip_ckpt``) computes the image embedding and the caption's token features on the fly, and the
training target is the image resized to the net's resolution, scaled to [-1, 1].

The image embedding is L2-normalised and scaled by sqrt(D), as for the prior. Classifier-free guidance
dropout: the image embedding with probability ``drop_image_prob`` (paper: 10%), the caption with
``drop_text_prob`` (paper: 50%), independently. Evaluation (EMA weights): DDIM with ``sample_steps``,
guidance ``guidance_scale`` (both conditionings dropped for the unconditional branch), from held-out
images' embeddings. ``val/loss`` is the training objective (``train/loss``: the noise MSE, plus the
weighted variational bound when the net learns its variance) at seeded timesteps, ``val/mse`` its MSE term. ``val/colour_match``: fraction of generated images whose dominant palette colour
equals the source image's (train/validation.py; chance about 1/8); ``val/colour_match_source``: the same
for the source images resized to the decoder's size (the ceiling). A grid (source row over generated
row) is written to ``<run>/samples/step<N>.png`` and to W&B when it logs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from data.images import to_uint8, to_unit_range
from train.callbacks.log_step import logs_this_step
from train.frozen_clip import FrozenClip, text_mask
from train.modules.base import DiffusionStageModule
from train.validation import dominant_colours


class DecoderModule(DiffusionStageModule):
    def __init__(
        self,
        net: torch.nn.Module,
        *,
        diffusion: Mapping[str, Any],
        tokenizer=None,
        clip_ckpt: str | None = None,
        optimizer: Mapping[str, Any] | None = None,
        ema_decay: float = 0.9999,
        drop_image_prob: float = 0.1,
        drop_text_prob: float = 0.5,
        sample_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 3.0,
        val_max_samples: int | None = 256,
        grid_size: int = 16,
        **old_keys: Any,
    ) -> None:
        super().__init__()
        optimizer, diffusion = self.settle_blocks(old_keys, optimizer, diffusion)
        # saved as the arguments are now: the settled blocks, not the old keys
        self.save_hyperparameters(ignore=["net", "tokenizer", *old_keys])
        if not clip_ckpt:
            raise ValueError(
                "the decoder needs clip_ckpt=<CLIP run directory> (it embeds the images on the fly)"
            )
        self.setup_diffusion(net, diffusion, ema_decay, sample_steps)
        self._clip = FrozenClip(clip_ckpt)
        self.tokenizer = tokenizer or self._clip.tokenizer
        self.scale = math.sqrt(self._clip.embed_dim)

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
        self.log("train/loss", loss)  # (not prog_bar: train/callbacks/progress_bar.py)
        if logs_this_step(self.trainer):
            self.log("train/mse", terms["mse"].mean())
            if "vlb" in terms:
                self.log("train/vlb", terms["vlb"].mean())
        self.log_lr()
        return loss

    # ---- sampling ---------------------------------------------------------------------------------
    def guided(
        self, cond: Mapping[str, torch.Tensor], *, drop_image: bool = False, drop_text: bool = False
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The net's keyword arguments for guided sampling: ``cond`` with every row's dropout flags set
        (``drop_image``/``drop_text``: that conditioning replaced by its null token), and the
        unconditional branch's flags (both dropped)."""
        b = cond["image_emb"].shape[0]
        kwargs = dict(cond)
        for key, drop in (("drop_image", drop_image), ("drop_text", drop_text)):
            kwargs[key] = torch.full((b,), drop, dtype=torch.bool, device=self.device)
        uncond = {k: torch.ones(b, dtype=torch.bool, device=self.device) for k in ("drop_image", "drop_text")}
        return kwargs, uncond

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
        (``eta``, default ``module.eta``), ddpm or dpmpp_2m (DPM-Solver++(2M)); ``noise``: the starting
        x_T (e.g. a DDIM inversion); ``drop_text``: condition on the image embedding alone (variations);
        ``drop_image``: on the caption alone (guidance then amplifies the caption only);
        ``step_callback(i, x)``: see GaussianDiffusion.ddim_sample_loop (inpainting).
        """
        net = self.ema.shadow if use_ema else self.net
        b = cond["image_emb"].shape[0]
        kwargs, uncond = self.guided(cond, drop_image=drop_image, drop_text=drop_text)
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
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        room = self.val_room("source")
        if room == 0:
            return
        x0, cond = self.inputs(batch)
        x0, cond = x0[:room], {k: v[:room] for k, v in cond.items()}
        t, noise, g = self.seeded_noise(x0, 2000 + batch_idx)
        terms = self.diffusion.training_losses(self.ema.shadow, x0, t, noise, model_kwargs=cond)
        samples = self.sample(cond, generator=g)
        self._val.append(
            {
                "loss": terms["loss"]
                .float()
                .cpu(),  # the training objective (mse + weighted vlb when learned)
                "mse": terms["mse"].float().cpu(),
                "source": to_uint8(x0).cpu(),
                "sample": to_uint8(samples).cpu(),
            }
        )

    def on_validation_epoch_end(self) -> None:
        parts = self.validation_parts()
        if not parts:
            return
        source = torch.cat([p["source"] for p in parts])
        sample = torch.cat([p["sample"] for p in parts])
        src_col, gen_col = dominant_colours(source), dominant_colours(sample)
        metrics = {
            "val/loss": torch.cat([p["loss"] for p in parts]).mean().item(),
            "val/mse": torch.cat([p["mse"] for p in parts]).mean().item(),
            "val/colour_match": sum(a is not None and a == b for a, b in zip(gen_col, src_col))
            / len(src_col),
            "val/colour_match_source": sum(c is not None for c in src_col) / len(src_col),
            "val/n": float(len(source)),
        }
        self.log_dict(metrics, sync_dist=False)
        n = min(self.hparams.grid_size, len(source))
        self.log_grid([source[:n], sample[:n]], scale=max(1, 64 // source.shape[-1]))


# Old run configs name the upsampler's module here (module._target_: train.modules.decoder.UpsamplerModule).
from train.modules.upsampler import UpsamplerModule  # noqa: E402, F401
