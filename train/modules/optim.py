"""AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay (every stage)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from train.strategies import offloads_optimizer


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases, embeddings, class/query tokens, null (guidance) embeddings and the logit scale
    are not weight-decayed."""
    keys = ("embedding", "class_embedding", "logit_scale", "ln_", "norm", "bias", "null_", "query")
    return param.ndim < 2 or any(k in name for k in keys)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """``net``'s trainable parameters in two AdamW groups: decayed matrices, and the rest (:func:`no_decay`)."""
    decay, skip = [], []
    for name, param in net.named_parameters():
        if param.requires_grad:
            (skip if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def adamw(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel for all tensors) when every parameter is on a CUDA device."""
    params = [p for g in groups for p in g["params"]]
    fused = torch.cuda.is_available() and bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def configure_adamw(module: pl.LightningModule, net: torch.nn.Module) -> dict:
    """The optimizer and per-step schedule from ``module.hparams`` (lr, weight_decay, betas, eps,
    warmup_steps, min_lr_ratio) for ``net``'s trainable parameters."""
    hp = module.hparams
    groups = param_groups(net, hp.weight_decay)
    trainer = module.trainer
    if offloads_optimizer(trainer.strategy):  # ZeRO-Offload steps on the CPU with DeepSpeed's Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, adamw_mode=True)
    else:
        optimizer = adamw(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
    total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, warmup_steps=hp.warmup_steps, total_steps=total, min_ratio=hp.min_lr_ratio
        ),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
