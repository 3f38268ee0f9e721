"""Stage 1: CLIP contrastive pretraining as a LightningModule.

The net (train/models/clip.py) is injected; this module wires the global-batch contrastive loss
(train/losses.py), AdamW with decay only on matrices, warm-up + cosine schedule, and evaluation:
zero-shot accuracy and retrieval recall on the held-out shards (eval/zeroshot.py).

Logged: ``train/loss``, ``train/logit_scale``, ``train/lr``, ``val/loss``, ``val/zeroshot_{colour,shape,count}_top1``,
``val/zeroshot_top1``, ``val/{i2t,t2i}_r{1,5,10}``; learning rate and throughput come from callbacks.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from eval.zeroshot import retrieval_recall, zeroshot_synthetic
from train.losses import ClipLoss


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases, embeddings, the class token and the logit scale are not weight-decayed."""
    keys = ("embedding", "class_embedding", "logit_scale", "ln_", "norm", "bias")
    return param.ndim < 2 or any(k in name for k in keys)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ClipModule(pl.LightningModule):
    def __init__(
        self,
        net: torch.nn.Module,
        *,
        tokenizer=None,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.0,
        zeroshot: bool = True,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "tokenizer"])
        self.net = net
        self.tokenizer = tokenizer
        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
        self._val: list[dict] = []

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(images, tokens)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.net(batch["image"], batch["tokens"])
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", out["logit_scale"].detach())
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    # ---- evaluation -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.net(batch["image"], batch["tokens"])
        self._val.append(
            {
                "image": out["image_features"].float().cpu(),  # (B, D) normalised
                "text": out["text_features"].float().cpu(),
                "caption": batch["caption"],
                "scene": [j.get("scene") for j in batch.get("json", [{}] * len(batch["caption"]))],
            }
        )

    def on_validation_epoch_end(self) -> None:
        parts = self._val
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank evaluated its own shards; retrieval needs the whole held-out set.
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = [p for rank_parts in gathered for p in rank_parts]
        self._val = []
        if not parts:
            return
        img = torch.cat([p["image"] for p in parts])
        txt = torch.cat([p["text"] for p in parts])
        captions = [c for p in parts for c in p["caption"]]
        scenes = [s for p in parts for s in p["scene"]]
        scale = self.net.logit_scale.exp().clamp(max=100).item() if hasattr(self.net, "logit_scale") else 1.0
        logits = scale * img @ txt.T
        target = torch.arange(len(img))
        loss = (
            torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)
        ) / 2
        metrics = {"val/loss": loss.item(), "val/n": float(len(img))}
        metrics.update({f"val/{k}": v for k, v in retrieval_recall(img, txt, captions).items()})
        if self.hparams.zeroshot and self.tokenizer is not None and all(s is not None for s in scenes):
            zs = zeroshot_synthetic(img, scenes, self.net.encode_text, self.tokenizer, device=self.device)
            metrics.update({f"val/{k}": v for k, v in zs.items()})
        # Identical on every rank (computed from the gathered set): no further reduction needed.
        self.log_dict(metrics, prog_bar=False, sync_dist=False)

    # ---- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, skip = [], []
        for name, param in self.net.named_parameters():
            if param.requires_grad:
                (skip if no_decay(name, param) else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": skip, "weight_decay": 0.0},
        ]
        fused = torch.cuda.is_available() and all(p.is_cuda for p in self.net.parameters())
        optimizer = torch.optim.AdamW(
            groups,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            eps=self.hparams.eps,
            fused=fused or None,
        )
        total = (
            self.trainer.max_steps
            if self.trainer.max_steps > 0
            else int(self.trainer.estimated_stepping_batches)
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step,
                warmup_steps=self.hparams.warmup_steps,
                total_steps=total,
                min_ratio=self.hparams.min_lr_ratio,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
