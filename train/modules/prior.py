"""Stage 2: the diffusion prior as a LightningModule.

Batches come from embedding shards (``img_emb.npy``, ``txt_emb.npy``, ``txt_feat.npy``,
``tokens.npy``: ``data=embeddings``) or from image-text shards, embedded on the fly by a frozen CLIP
(``clip_ckpt``); :meth:`PriorModule.embeddings` turns either into the same tensors.

Scaling: embeddings are L2-normalised and multiplied by sqrt(D) (unit mean square per entry, like the
diffusion noise) before the net sees them; predictions are divided by sqrt(D) again. Loss: MSE on the
clean image embedding (x0 prediction, the paper's choice), text conditioning dropped with probability
``cond_drop_prob`` for classifier-free guidance. Evaluation uses the EMA weights: DDIM with
``sample_steps`` of the T steps, guidance, best-of-``best_of`` by dot product with the text embedding.

Logged: ``train/loss``, ``train/lr``, ``val/loss`` (EMA, fixed timesteps), ``val/cos_pred_image`` (mean
cosine between the sampled and the true image embedding), ``val/cos_text_image`` (the baseline: text
embedding vs image embedding), ``val/r1_pred`` / ``val/r1_text`` (the true image retrieved first
among the held-out images by the predicted / by the text embedding), ``val/zeroshot_*_top1_pred``
(the CLIP text classifier applied to the predicted embeddings; synthetic scenes) next to
``val/zeroshot_*_top1_image`` (applied to the true ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from train.callbacks.log_step import logs_this_step
from train.frozen_clip import FrozenClip, text_mask
from train.modules.base import DiffusionStageModule
from train.validation import retrieval_recall, zeroshot_synthetic


class PriorModule(DiffusionStageModule):
    optimizer_defaults = {
        "lr": 1.1e-4,
        "weight_decay": 6.0e-2,
        "betas": [0.9, 0.96],
        "eps": 1e-6,
        "warmup_steps": 500,
        "min_lr_ratio": 0.0,
    }

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        diffusion: Mapping[str, Any],
        tokenizer=None,
        clip_ckpt: str | None = None,
        optimizer: Mapping[str, Any] | None = None,
        ema_decay: float = 0.9999,
        cond_drop_prob: float = 0.1,
        sample_steps: int = 64,
        guidance_scale: float = 1.0,
        best_of: int = 2,
        val_max_samples: int | None = 1000,
        **old_keys: Any,
    ) -> None:
        super().__init__()
        optimizer, diffusion = self.settle_blocks(old_keys, optimizer, diffusion)
        # saved as the arguments are now: the settled blocks, not the old keys
        self.save_hyperparameters(ignore=["net", "tokenizer", *old_keys])
        self.setup_diffusion(net, diffusion, ema_decay, sample_steps)
        self.tokenizer = tokenizer
        self.scale = math.sqrt(net.embed_dim)
        self._clip: FrozenClip | None = FrozenClip(clip_ckpt) if clip_ckpt else None
        if tokenizer is None and self._clip is not None:
            self.tokenizer = self._clip.tokenizer
        self._lowest_cosine: torch.Tensor | None = None  # token_features' check, kept on the device
        self._cosine_checked = False

    # ---- inputs -----------------------------------------------------------------------------------
    def clip(self) -> FrozenClip:
        if self._clip is None:
            raise ValueError(
                "this batch has no embeddings (img_emb.npy, txt_emb.npy, ...): set clip_ckpt=<CLIP run> to "
                "compute them on the fly, or train on embedding shards (data=embeddings)"
            )
        if self._clip.device != self.device:
            self._clip.to(self.device)
        return self._clip

    def embeddings(self, batch: dict) -> dict[str, torch.Tensor]:
        """img_emb, txt_emb (B, D) and txt_feat (B, L, W) float32 + tokens (B, L) long, from either path.

        Precomputed embeddings without token features (clip-retrieval's LAION layout, data=clip_retrieval)
        give img_emb and txt_emb only (and the tokens of the captions when the data has a tokenizer);
        a net with ``use_text_tokens`` then gets the features from the frozen CLIP (``clip_ckpt``), which
        must be the CLIP that made the embeddings (checked on every batch)."""
        if "img_emb.npy" in batch:
            out = {"img_emb": batch["img_emb.npy"].float(), "txt_emb": batch["txt_emb.npy"].float()}
            if "txt_feat.npy" in batch:
                out["txt_feat"] = batch["txt_feat.npy"].float()
            tokens = batch.get("tokens.npy", batch.get("tokens"))
            if tokens is not None:
                out["tokens"] = tokens.long()
            if "txt_feat" not in out and getattr(self.net, "use_text_tokens", False):
                out["txt_feat"] = self.token_features(out)
        else:
            out = dict(self.clip().embed(batch["image"], batch["tokens"]))
            out["tokens"] = batch["tokens"].long()
        return out

    def token_features(self, emb: Mapping[str, torch.Tensor], min_cosine: float = 0.9) -> torch.Tensor:
        """Per-token text features of the batch's captions from the frozen CLIP, for precomputed
        embeddings that lack them; the CLIP's text embeddings of the captions must match the stored ones.
        Checked at once on the first batch; in training then at the logging steps, on the lowest cosine
        since (kept on the device: a read at every step made the host wait for the GPU)."""
        if self._clip is None or "tokens" not in emb:
            raise ValueError(
                "net.use_text_tokens=true needs per-token text features (txt_feat.npy), and these batches "
                "have only image and text embeddings (data=clip_retrieval): set net.use_text_tokens=false, or "
                "clip_ckpt=<the CLIP run that made these embeddings> to compute them from the captions"
            )
        out = self.clip().embed(None, emb["tokens"])
        cosine = (out["txt_emb"] * F.normalize(emb["txt_emb"], dim=-1)).sum(-1).mean().detach()
        lowest = self._lowest_cosine
        self._lowest_cosine = cosine if lowest is None else torch.minimum(lowest, cosine)
        trainer = self._trainer
        if self._cosine_checked and trainer is not None and trainer.training and not logs_this_step(trainer):
            return out["txt_feat"]
        self._cosine_checked = True
        cosine, self._lowest_cosine = float(self._lowest_cosine), None
        if cosine < min_cosine:
            raise ValueError(
                f"clip_ckpt={self.hparams.clip_ckpt} did not make these embeddings: its text embeddings of the "
                f"captions have a mean cosine of {cosine:.3f} with the stored ones (txt_emb). Token features "
                "from another CLIP do not fit them: set net.use_text_tokens=false and clip_ckpt=null"
            )
        return out["txt_feat"]

    def conditioning(self, emb: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The net's keyword arguments (scaled text embedding; token features and their mask for a net
        with ``use_text_tokens``)."""
        cond = {"text_emb": F.normalize(emb["txt_emb"], dim=-1) * self.scale}
        if getattr(self.net, "use_text_tokens", True):
            cond["text_feat"] = emb["txt_feat"]
            cond["text_mask"] = text_mask(emb["tokens"], self.tokenizer.eot_id)
        return cond

    # ---- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        emb = self.embeddings(batch)
        x0 = F.normalize(emb["img_emb"], dim=-1) * self.scale
        cond = self.conditioning(emb)
        cond["drop"] = torch.rand(x0.shape[0], device=self.device) < self.hparams.cond_drop_prob
        loss = self.diffusion.training_losses(self.net, x0, model_kwargs=cond)["loss"].mean()
        self.log("train/loss", loss)  # (not prog_bar: train/callbacks/progress_bar.py)
        self.log_lr()
        return loss

    # ---- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        emb: Mapping[str, torch.Tensor],
        *,
        guidance_scale: float | None = None,
        best_of: int | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        steps: int | None = None,
        sampler: str = "ddim",
    ) -> torch.Tensor:
        """L2-normalised predicted image embeddings (B, D) for text embeddings ``emb`` (see embeddings());
        ``steps``: sampling steps (default ``module.sample_steps``); ``sampler``: ddim (eta 0), ddpm or
        dpmpp_2m (GaussianDiffusion.sample)."""
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        n = self.hparams.best_of if best_of is None else best_of
        net = self.ema.shadow if use_ema else self.net
        cond = {k: v.repeat_interleave(n, 0) for k, v in self.conditioning(emb).items()}
        b = cond["text_emb"].shape[0]
        cond["drop"] = torch.zeros(b, dtype=torch.bool, device=self.device)
        uncond = {"drop": torch.ones(b, dtype=torch.bool, device=self.device)}
        process = self.sampler if steps is None else self.diffusion.respace(steps)
        x = process.sample(
            net,
            (b, net.embed_dim),
            sampler=sampler,
            device=self.device,
            generator=generator,
            model_kwargs=cond,
            guidance_scale=scale,
            uncond_kwargs=uncond,
        )
        x = F.normalize(x.float(), dim=-1).view(-1, n, x.shape[-1])  # (B, n, D)
        score = (x * F.normalize(emb["txt_emb"], dim=-1)[:, None]).sum(-1)  # (B, n)
        return x[torch.arange(x.shape[0], device=x.device), score.argmax(1)]

    # ---- evaluation -------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        room = self.val_room("img")
        if room == 0:
            return
        emb = {k: v[:room] for k, v in self.embeddings(batch).items()}
        b = emb["img_emb"].shape[0]
        x0 = F.normalize(emb["img_emb"], dim=-1) * self.scale
        cond = self.conditioning(emb)
        t, noise, g = self.seeded_noise(x0, 1000 + batch_idx)
        loss = self.diffusion.training_losses(self.ema.shadow, x0, t, noise, model_kwargs=cond)["loss"]
        pred = self.sample(emb, generator=g)
        img, txt = F.normalize(emb["img_emb"], dim=-1), F.normalize(emb["txt_emb"], dim=-1)
        n = len(batch.get("json", []))
        self._val.append(
            {
                "loss": loss.float().cpu(),
                "pred": pred.float().cpu(),
                "img": img.float().cpu(),
                "txt": txt.float().cpu(),
                "cos_pred": (pred * img).sum(-1).float().cpu(),
                "cos_text": (txt * img).sum(-1).float().cpu(),
                "scene": [j.get("scene") for j in batch["json"][:b]] if n else [None] * b,
            }
        )

    def on_validation_epoch_end(self) -> None:
        parts = self.validation_parts()
        if not parts:
            return
        cat = {
            k: torch.cat([p[k] for p in parts])
            for k in ("loss", "pred", "img", "txt", "cos_pred", "cos_text")
        }
        ids = [str(i) for i in range(len(cat["img"]))]  # distinct: only the pair's own image counts
        metrics = {
            "val/loss": cat["loss"].mean().item(),
            "val/cos_pred_image": cat["cos_pred"].mean().item(),
            "val/cos_text_image": cat["cos_text"].mean().item(),
            # retrieval of the true image among the held-out images, by the predicted embedding and
            # (baseline) by the text embedding
            "val/r1_pred": retrieval_recall(cat["img"], cat["pred"], ids, ks=(1,))["t2i_r1"],
            "val/r1_text": retrieval_recall(cat["img"], cat["txt"], ids, ks=(1,))["t2i_r1"],
            "val/n": float(len(cat["loss"])),
        }
        scenes = [s for p in parts for s in p["scene"]]
        if self._clip is not None and scenes and all(s is not None for s in scenes):
            clip = self.clip()
            for name, feats in (("pred", cat["pred"]), ("image", cat["img"])):
                zs = zeroshot_synthetic(feats, scenes, clip.encode_text, clip.tokenizer, device=self.device)
                metrics.update({f"val/{k}_{name}": v for k, v in zs.items() if k.endswith("top1")})
        self.log_dict(metrics, sync_dist=False)
