"""Config checks at start: a wrong type or an impossible value fails before anything is built, naming
the key, instead of deep inside the trainer minutes later.

Hydra already refuses a key that does not exist (``trainer.max_stpes=5``: "Key 'max_stpes' is not in
struct"; ``+key=`` adds one on purpose) and an unknown group option (``net=nope`` lists the available
ones); keys passed to a ``_target_`` that does not take them fail at instantiation naming the keyword.
This module covers what composition cannot: types and ranges of the options every stage has. Each
rule applies when its key is present, so a stage without EMA or without a module key is fine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data.manifest import LEVELS
from train.perf import MATMUL_PRECISIONS


class ConfigError(ValueError):
    pass


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dhms(v: Any) -> bool:
    from train.callbacks.time_limit import seconds

    if not isinstance(v, str):
        return False
    try:
        seconds(v)
    except ValueError:
        return False
    return True


# key -> (accepts the value, what is expected)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_integer, "an integer"),
    "trainer.max_steps": (lambda v: _integer(v) and (v > 0 or v == -1), "a positive integer (or -1)"),
    "trainer.max_time": (lambda v: v is None or _dhms(v), "null or 'DD:HH:MM:SS' (e.g. '00:00:05:00')"),
    "trainer.val_check_interval": (lambda v: v is None or (_number(v) and v > 0), "a number > 0"),
    "trainer.accumulate_grad_batches": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "trainer.gradient_clip_val": (lambda v: v is None or (_number(v) and v >= 0), "a number >= 0 or null"),
    "trainer.enable_progress_bar": (lambda v: v in (True, False, "auto"), "true, false or auto"),
    "trainer.log_every_n_steps": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "trainer.num_nodes": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "trainer.compile": (
        lambda v: v in (None, False, True, "none", "full", "regional"),
        "false, true (the whole net) or regional (each block)",
    ),
    "trainer.float32_matmul_precision": (
        lambda v: v in (None, *MATMUL_PRECISIONS),
        " or ".join(repr(p) for p in MATMUL_PRECISIONS),
    ),
    "data.global_batch_size": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "data.val_batch_size": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 or null"),
    "data.num_workers": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "data.shuffle_buffer": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "data.image_size": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 or null"),
    "data.mode": (lambda v: v in ("epoch", "resampled"), "'epoch' or 'resampled'"),
    "data.on_layout_change": (lambda v: v in ("error", "restart_epoch"), "'error' or 'restart_epoch'"),
    "data.max_bad_fraction": (
        lambda v: v is None or (_number(v) and 0 <= v <= 1),
        "a fraction in [0, 1] or null",
    ),
    "data.manifest_check": (lambda v: v in LEVELS, " or ".join(repr(level) for level in LEVELS)),
    "data.crop_size": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 or null"),
    "data.train_crop": (lambda v: v in ("random", "center"), "'random' or 'center'"),
    "data.normalize": (
        lambda v: v in (None, "none", "clip", "minus_one_one", "unit"),
        "'clip', 'minus_one_one', 'unit' or 'none'",
    ),
    "module.accum_freq": (
        lambda v: _integer(v) and v >= 1,
        "an integer >= 1 (chunks of each device's batch)",
    ),
    "module.ema_decay": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    # classifier-free guidance dropout: a probability (2 dropped the conditioning at every step)
    "module.cond_drop_prob": (lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "module.drop_image_prob": (lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "module.drop_text_prob": (lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    # sampling at validation: wrong values failed there, after the training before the first validation
    "module.guidance_scale": (lambda v: _number(v) and v >= 0, "a number >= 0 (1: no guidance)"),
    "module.best_of": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "module.sample_steps": (lambda v: _integer(v) and v >= 1, "an integer >= 1 (DDIM steps)"),
    "module.eta": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "init_from_ema": (lambda v: isinstance(v, bool), "true or false"),
}
# module.optimizer (lr, betas, eps, ...) has its rules where it is read: train/modules/optim.py


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every key whose value breaks its rule."""
    problems = []
    for key, (ok, expected) in RULES.items():
        node = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
        if node is _MISSING:
            continue
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if not ok(value):
            problems.append(f"{key}={value!r}: expected {expected}")
    problems += _optimizer_problems(cfg) + _normalize_problems(cfg) + _checkpoint_dir_problems(cfg)
    problems += _diffusion_problems(cfg) + _accum_freq_problems(cfg) + _siglip_problems(cfg)
    if cfg.get("init_from") and cfg.get("init_from_open_clip"):
        problems.append(
            f"init_from={cfg.init_from} and init_from_open_clip={cfg.init_from_open_clip}: one start, "
            "not two (the first's weights would be overwritten by the second's)"
        )
    problems += [p for p in argument_problems(cfg) if p.split("=", 1)[0] not in RULES]  # (said once)
    if not problems:
        problems += _batch_problems(cfg) + _image_size_problems(cfg) + _shard_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _image_size_problems(cfg: DictConfig) -> list[str]:
    """The crop must fit the resize, and the CLIP sees images of its ViT's size (else the first batch fails
    inside the net, after the trainer has started)."""
    size = OmegaConf.select(cfg, "data.image_size", default=None)
    crop = OmegaConf.select(cfg, "data.crop_size", default=None)
    if _integer(size) and _integer(crop) and crop > size:
        return [f"data.crop_size={crop} is larger than data.image_size={size} (the resize it crops from)"]
    vit = OmegaConf.select(cfg, "net.vision.image_size", default=None)
    seen = crop if _integer(crop) else size
    if cfg.get("stage_name") == "clip" and _integer(vit) and _integer(seen) and seen != vit:
        what = f"data.crop_size={crop}" if _integer(crop) else f"data.image_size={size} (data.crop_size null)"
        return [f"{what}: the CLIP sees {seen} px images, net.vision.image_size={vit}: set them equal"]
    return []


def _normalize_problems(cfg: DictConfig) -> list[str]:
    """Only the CLIP stage normalises its images in the data pipeline: the others take uint8 (their frozen
    CLIP normalises its own way, their diffusion targets scale to [-1, 1] themselves). A float batch there
    was scaled a second time: ``data.normalize=minus_one_one`` trained an upsampler on black images."""
    stage = cfg.get("stage_name")
    value = OmegaConf.select(cfg, "data.normalize", default=None)
    if stage is None or stage == "clip" or value in (None, "none"):
        return []
    return [
        f"data.normalize={value!r}: the {stage} stage takes uint8 images (it normalises them itself): none"
    ]


def _checkpoint_dir_problems(cfg: DictConfig) -> list[str]:
    """Checkpoints go inside the run directory, where resume=auto looks for them (and evaluation, exports):
    with ``callbacks.checkpoint.dirpath`` elsewhere, the next launch started from step 0 and overwrote
    them. Other storage is had by putting the whole run there (``paths.log_dir``, ``hydra.run.dir``)."""
    try:
        run = Path(str(OmegaConf.select(cfg, "paths.output_dir"))).resolve()
    except Exception:  # ${hydra:...} outside a Hydra launch: nothing to compare with
        return []
    problems = []
    for key in ("callbacks.checkpoint.dirpath", "callbacks.preemption.dirpath"):
        try:
            where = OmegaConf.select(cfg, key, default=None)
        except Exception:
            continue
        if where and not Path(str(where)).resolve().is_relative_to(run):
            problems.append(
                f"{key}={where}: checkpoints go inside the run directory ({run}), where resume=auto finds "
                "them; to keep a run on other storage, put the run there (paths.log_dir=..., hydra.run.dir=...)"
            )
    return problems


def _accum_freq_problems(cfg: DictConfig) -> list[str]:
    """The CLIP's ``module.accum_freq`` beside what it cannot run with (train/modules/clip.py
    ``accum_freq_problems``; the module checks the trainer again at fit start)."""
    k = OmegaConf.select(cfg, "module.accum_freq", default=1)
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
    if not _integer(k) or k <= 1 or not _integer(accumulate):
        return []
    from train.modules.clip import accum_freq_problems

    target = str(OmegaConf.select(cfg, "strategy._target_", default="") or "")
    return accum_freq_problems(
        k, target, supported="deepspeed" not in target.lower(), accumulate=accumulate,
        precision=OmegaConf.select(cfg, "trainer.precision", default=None),
    )  # fmt: skip


def _siglip_problems(cfg: DictConfig) -> list[str]:
    """``module.loss=siglip`` learns a bias the net has only with ``net.init_logit_bias`` (the module says
    so too, but only once the data and the net are built)."""
    loss = OmegaConf.select(cfg, "module.loss", default=None)
    if cfg.get("stage_name") == "clip" and loss not in (None, "clip", "siglip"):
        return [f"module.loss={loss!r}: expected clip (softmax, InfoNCE) or siglip (pairwise sigmoid)"]
    if loss != "siglip":
        return []
    if OmegaConf.select(cfg, "net.init_logit_bias", default=None) is None:
        return [
            "module.loss=siglip needs net.init_logit_bias (SigLIP: -10, with net.init_logit_scale=2.302585)"
        ]
    return []


def _diffusion_problems(cfg: DictConfig) -> list[str]:
    """``module.diffusion`` is a plain block (train/diffusion ``GaussianDiffusion.from_config``): a key it
    does not take, or a value of the wrong type, failed at build naming only the module; and
    ``sampling_steps`` (conf/diffusion/'s, which is gone) was taken and ignored: the samplers read
    ``module.sample_steps``."""
    import typing

    from train.diffusion import GaussianDiffusion

    block = OmegaConf.select(cfg, "module.diffusion", default=None)
    if not OmegaConf.is_dict(block):
        return []
    hints = {
        **typing.get_type_hints(GaussianDiffusion.__init__),
        **typing.get_type_hints(GaussianDiffusion.from_config),
    }
    known = sorted(k for k in hints if k not in ("return", "betas", "timestep_map", "sampling_steps"))
    problems = []
    for key in block:
        if key == "sampling_steps":
            problems.append(
                "module.diffusion.sampling_steps: not read; the number of sampling steps is module.sample_steps"
            )
        elif key not in known:
            problems.append(
                f"module.diffusion.{key}: not a diffusion setting (expected one of {', '.join(known)})"
            )
        else:
            types_ = _plain_types(hints[key])
            value = block[key]
            if types_ is not None and not _admits(types_, value):
                problems.append(f"module.diffusion.{key}={value!r}: expected {_expected(types_)}")
    return problems


_PLAIN = (bool, int, float, str, type(None))


def _plain_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types an annotation admits (``int``, ``bool``, ``float | None``, ...); None for anything
    else (containers, Literal, Any, classes), which is not checked."""
    import types
    import typing

    if hint in _PLAIN:
        return (hint,)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        return members if all(m in _PLAIN for m in members) else None
    return None


def _admits(types_: tuple[type, ...], value: Any) -> bool:
    if isinstance(value, bool):
        return bool in types_
    if isinstance(value, int):
        return int in types_ or float in types_
    if isinstance(value, float):
        return float in types_
    if value is None:  # also where the run fills a value in before building (the prior's net.embed_dim)
        return True
    if isinstance(value, str):
        return str in types_
    return True  # lists, dicts: not a plain value


def _expected(types_: tuple[type, ...]) -> str:
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if float in types_:
        types_ = tuple(t for t in types_ if t is not int)
    return " or ".join(words[t] for t in types_)


def argument_problems(cfg: DictConfig, where: str = "") -> list[str]:
    """Every key given to a ``_target_`` whose value is not of the type its parameter is annotated with
    (plain types only: bool, int, float, str, their unions with None; null is left to the build, as the
    run fills some keys in first). Hydra keeps ``no``, ``off``,
    ``yes`` and ``on`` as text, and any text counts as true: ``module.residual=no`` kept residual
    diffusion on, ``net.learned_variance=off`` built the 6-channel net. A value of the wrong type
    elsewhere (``callbacks.checkpoint.every_n_train_steps=abc``) failed at build time naming only the
    group. Recurses into nested nodes."""
    import typing

    from hydra.utils import get_object

    problems: list[str] = []
    if not OmegaConf.is_dict(cfg):
        return problems
    hints: dict[str, Any] = {}
    target = cfg.get("_target_") if "_target_" in cfg else None
    if isinstance(target, str):
        try:
            obj = get_object(target)
            hints = typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj)
        except Exception:  # an unknown target or unevaluable annotations: instantiate reports what it can
            hints = {}
    for key in cfg:
        name = f"{where}{key}"
        try:
            value = cfg[key]
        except Exception:  # an interpolation that resolves only at run time (${hydra:...})
            continue
        if OmegaConf.is_config(value):
            problems += argument_problems(value, f"{name}.") if OmegaConf.is_dict(value) else []
            continue
        types_ = _plain_types(hints.get(key)) if isinstance(key, str) and not key.startswith("_") else None
        if types_ is not None and not _admits(types_, value):
            note = (
                " (Hydra keeps it as text, which counts as true)"
                if bool in types_ and isinstance(value, str)
                else ""
            )
            problems.append(f"{name}={value!r}: expected {_expected(types_)}{note}")
    return problems


def _optimizer_problems(cfg: DictConfig) -> list[str]:
    block = OmegaConf.select(cfg, "module.optimizer", default=None)
    if not OmegaConf.is_config(block):
        return []
    from train.modules.optim import optimizer_problems

    return optimizer_problems(OmegaConf.to_container(block, resolve=True), where="module.optimizer")


_MISSING = object()


def launched_world_size(cfg: DictConfig) -> int | None:
    """The number of training processes, when it is known before the trainer exists: from the launcher
    (torchrun's WORLD_SIZE, SLURM's task count) or from integer ``trainer.devices`` x ``num_nodes``."""
    from data.ranks import launch_environment

    environment = launch_environment()  # as the Trainer will read it (an allocation's shell is no launch)
    if environment is not None:
        return environment.world_size()
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"])
    devices = OmegaConf.select(cfg, "trainer.devices", default=None)
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
    if _integer(devices) and devices > 0 and _integer(nodes):
        return devices * nodes
    return None  # "auto": known once Lightning has looked at the machine (the DataModule checks again)


def _batch_problems(cfg: DictConfig) -> list[str]:
    from data.datamodule import per_device_batch_size

    batch = OmegaConf.select(cfg, "data.global_batch_size", default=None)
    world = launched_world_size(cfg)
    if batch is None or world is None:
        return []
    try:
        per_device_batch_size(
            batch, world, OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
        )
    except ValueError as e:
        return [str(e)]
    return []


def _shard_problems(cfg: DictConfig) -> list[str]:
    """FSDP's ``strategy.shard_size`` (HSDP): a positive divisor of the world size, when that is known."""
    shard = OmegaConf.select(cfg, "strategy.shard_size", default=None)
    if not _integer(shard):
        return []  # null, or a wrong type (said by the argument checks)
    world = launched_world_size(cfg)
    if shard < 1 or (world is not None and world % shard):
        known = f", {world}" if world is not None else ""
        return [
            f"strategy.shard_size={shard}: expected a positive divisor of the world size{known} (e.g. the ranks of one node)"
        ]
    return []
