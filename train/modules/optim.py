"""AdamW with decoupled weight decay on matrices only, linear warm-up then cosine decay (every stage).

Its settings are one block, ``module.optimizer`` (conf/stage/*.yaml), read here and nowhere else:

    lr            peak learning rate, > 0
    weight_decay  decoupled weight decay of the matrices (:func:`no_decay` lists what is exempt), >= 0
    betas         AdamW's two moment decays, each in [0, 1)
    eps           AdamW's denominator epsilon, > 0 (not the diffusion's ``prediction: eps``)
    warmup_steps  linear warm-up steps, an integer >= 0
    min_lr_ratio  the cosine decay ends at min_lr_ratio x lr at trainer.max_steps, in [0, 1]

:func:`optimizer_problems` holds the rules; train/config.py applies them to the composed config at
start and :func:`optimizer_settings` to a module's block when the module is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from train.strategies import offloads_optimizer


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# key -> (accepts the value, what is expected)
OPTIMIZER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _number(v) and v > 0, "a learning rate > 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "betas": (
        lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9, 0.98]",
    ),
    "eps": (lambda v: _number(v) and v > 0, "a number > 0"),
    "warmup_steps": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "min_lr_ratio": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
}


def optimizer_problems(block: Mapping[str, Any], where: str = "module.optimizer") -> list[str]:
    """One line per key of an optimizer block that is not an optimizer setting or breaks its rule,
    named as ``<where>.<key>=<value>``. Keys left out are not checked (the stage's defaults fill them)."""
    problems = [
        f"{where}.{key}: not an optimizer setting (expected one of {', '.join(OPTIMIZER_RULES)})"
        for key in block
        if key not in OPTIMIZER_RULES
    ]
    for key, (ok, expected) in OPTIMIZER_RULES.items():
        if key in block and not ok(block[key]):
            problems.append(f"{where}.{key}={block[key]!r}: expected {expected}")
    return problems


def optimizer_settings(block: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The complete optimizer block of a module: ``defaults`` (the stage's) updated by ``block``, checked
    (ValueError naming each bad key). Plain values (``betas`` a list), as saved in the hyper-parameters."""
    settings = {**defaults, **(block or {})}
    problems = optimizer_problems(settings)
    if problems:
        raise ValueError("invalid optimizer settings:\n  " + "\n  ".join(problems))
    missing = [key for key in OPTIMIZER_RULES if key not in settings]
    if missing:
        raise ValueError(f"module.optimizer: no value for {', '.join(missing)}")
    settings["betas"] = [float(b) for b in settings["betas"]]
    return settings


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases, embeddings (positional ones too), class/query tokens, null (guidance) embeddings and
    the logit scale are not weight-decayed."""
    keys = ("embedding", "positional", "logit_scale", "ln_", "norm", "bias", "null_", "query")
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


def adamw(
    groups: list[dict],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device | None = None,
) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel for all tensors) when it will step on a CUDA device: ``device``
    when given (the strategy's: DeepSpeed has Lightning build the optimizer while the module is still on
    the CPU, and moves it to the GPU afterwards), else where the parameters are."""
    params = [p for g in groups for p in g["params"]]
    on_cuda = device.type == "cuda" if device is not None else bool(params) and all(p.is_cuda for p in params)
    fused = torch.cuda.is_available() and bool(params) and on_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def configure_adamw(module: pl.LightningModule, net: torch.nn.Module) -> dict:
    """The optimizer and per-step schedule from ``module.hparams.optimizer`` (the block above, completed
    and checked by :func:`optimizer_settings` when the module was built) for ``net``'s trainable parameters."""
    opt = module.hparams.optimizer
    groups = param_groups(net, opt["weight_decay"])
    betas = tuple(opt["betas"])
    trainer = module.trainer
    if offloads_optimizer(trainer.strategy):  # ZeRO-Offload steps on the CPU with DeepSpeed's Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=opt["lr"], betas=betas, eps=opt["eps"], adamw_mode=True)
    else:
        optimizer = adamw(
            groups,
            lr=opt["lr"],
            betas=betas,
            eps=opt["eps"],
            device=getattr(trainer.strategy, "root_device", None),
        )
    total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
    warmup, min_ratio = opt["warmup_steps"], opt["min_lr_ratio"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup_steps=warmup, total_steps=total, min_ratio=min_ratio),
    )
    module.adamw = (optimizer, schedule)  # for apply_settings once a checkpoint is restored into them
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def apply_settings(
    optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR, opt: Mapping[str, Any]
) -> list[str]:
    """Put ``opt`` (the run's ``module.optimizer``) into the optimizer and schedule that
    :func:`configure_adamw` built, once a checkpoint has been restored into them. Restoring puts back the
    saved param groups' lr, betas, eps and weight decay and the schedule's base learning rate, so a run
    resumed with other settings trained on with the saved ones while its config.yaml recorded the new
    ones. The Adam moments and the step count stay the checkpoint's; the learning rate of the next step is
    the schedule's at the restored step (warm-up, the cosine's length and floor as configured now).
    Values that are already right are not touched, so an unchanged resume stays bitwise. Returns one
    ``key: saved -> now`` line per setting that changed."""
    changed: dict[str, str] = {}
    betas = tuple(float(b) for b in opt["betas"])
    # param_groups() builds [decayed matrices, exempt]: the exempt group's decay stays 0. (Under DeepSpeed
    # the engine steps this same optimizer, whose groups hold its flat partitions.)
    for i, group in enumerate(optimizer.param_groups):
        wanted = {"betas": betas, "eps": float(opt["eps"])}
        if i == 0:
            wanted["weight_decay"] = float(opt["weight_decay"])
        for key, value in wanted.items():
            old = tuple(group[key]) if key == "betas" else group[key]
            if old != value:
                changed.setdefault(key, f"{key}: {old} -> {value}")
                group[key] = value
    lr = float(opt["lr"])
    if any(base != lr for base in schedule.base_lrs):
        changed["lr"] = f"lr: {schedule.base_lrs[0]} -> {lr}"
        schedule.base_lrs = [lr] * len(schedule.base_lrs)
    for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["initial_lr"] = base
        now = base * factor(schedule.last_epoch)
        if group["lr"] != now:
            group["lr"] = now
            schedule._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
    return list(changed.values())
