"""Module config keys that were renamed, still read under their old names with a one-line warning.

Before ``module.optimizer`` the AdamW settings were loose in ``module`` (``module.lr``, ``module.eps``
next to ``module.diffusion.prediction: eps``), and the x0 clipping of sampling was ``diffusion.clip``
(next to CLIP the model). Old run configs (``<run>/config.yaml``), checkpoints' saved hyper-parameters,
old experiment files and old command lines still load: :func:`upgrade_module_config` moves each old key
to its new place. It is applied where configs are composed and read (train/run.py, train/pipeline.py,
train/checkpoint.py, launch/plan.py) and in the modules' constructors (hyper-parameters given to
``load_from_checkpoint``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import MutableMapping, Sequence
from contextlib import nullcontext
from typing import Any

from omegaconf import DictConfig, open_dict

# old key -> new key, both under ``module``
RENAMED: dict[str, str] = {
    **{
        key: f"optimizer.{key}"
        for key in ("lr", "weight_decay", "betas", "eps", "warmup_steps", "min_lr_ratio")
    },
    "diffusion.clip": "diffusion.clip_denoised",
}


def _warn(moved: list[tuple[str, str]], prefix: str) -> None:
    pairs = ", ".join(f"{prefix}{old} -> {prefix}{new}" for old, new in moved)
    warnings.warn(f"renamed config keys, read under their new names: {pairs}", FutureWarning, stacklevel=3)


def upgrade_module_config(
    module: MutableMapping[str, Any], prefix: str = "module."
) -> MutableMapping[str, Any]:
    """``module`` (a module's config or saved hyper-parameters: a dict or DictConfig) with every old key
    of :data:`RENAMED` moved to its new place, in place, with one warning naming them; returns it. An
    old key wins over the new one: an old file that sets it means it (the stage's default fills the new)."""
    moved = []
    for old, new in RENAMED.items():
        *old_parents, old_leaf = old.split(".")
        holder = module
        for part in old_parents:
            holder = holder.get(part) if isinstance(holder, MutableMapping) else None
        if not isinstance(holder, MutableMapping) or old_leaf not in holder:
            continue
        *new_parents, new_leaf = new.split(".")
        target = module
        with open_dict(module) if isinstance(module, DictConfig) else nullcontext():  # struct mode
            value = holder.pop(old_leaf)
            for part in new_parents:
                if not isinstance(target.get(part), MutableMapping):
                    target[part] = {}
                target = target[part]
            target[new_leaf] = value
        moved.append((old, new))
    if moved:
        _warn(moved, prefix)
    return module


def upgrade_config(cfg: DictConfig) -> DictConfig:
    """A whole run config (composed, or a run's config.yaml) with its ``module`` upgraded, in place."""
    if isinstance(cfg.get("module"), MutableMapping):
        upgrade_module_config(cfg.module)
    return cfg


_OVERRIDE = re.compile(r"^(?P<op>\+\+|\+|~)?module\.(?P<key>[\w.]+?)(?P<rest>=.*)?$", re.DOTALL)


def upgrade_overrides(overrides: Sequence[str]) -> list[str]:
    """Command-line overrides (``module.lr=1e-4``, ``+module.eps=1e-8``, ``~module.lr``, sweeps as
    ``module.lr=1e-4,3e-4``) with the old keys renamed, one warning naming them; others unchanged."""
    out, moved = [], []
    for override in overrides:
        match = _OVERRIDE.match(override)
        if match and match["key"] in RENAMED:
            new = RENAMED[match["key"]]
            moved.append((match["key"], new))
            override = f"{match['op'] or ''}module.{new}{match['rest'] or ''}"
        out.append(override)
    if moved:
        _warn(moved, "module.")
    return out
