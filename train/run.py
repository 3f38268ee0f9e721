"""Train one stage of the cascade.

    python -m train.run stage=clip [net=clip_vit_b16] [data=shards data.train_shards=...] [key=value ...]
    python -m train.run --cfg job          # print the composed config and exit

Seed -> data -> tokenizer -> net -> module -> callbacks, loggers -> trainer -> fit. Writes into the run
directory (``hydra.run.dir``): the resolved config, the tokenizer, checkpoints/, logs and metrics.json.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
# EMA copies (train/ema.py) stay in eval mode by design; Lightning warns about any eval-mode module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def resolve_precision(precision: str | int) -> str | int:
    """Precision "auto" means bf16 mixed precision on a GPU that supports it, else full float32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


# which CLIP parameters train: another value on resume would not match the saved optimizer state
LOCK_KEYS = tuple(f"module.lock_{t}{s}" for t in ("image", "text") for s in ("", "_unlocked_layers"))


def check_same_run(cfg: DictConfig, output_dir: Path, checkpoint: str | None = None) -> None:
    """Resuming in a run directory that holds another run (another stage, or another net class: e.g. a
    second launch into the same directory) is refused before anything is written there: it would have
    replaced that run's config.yaml and tokenizer, and only then failed to load its checkpoint. Other
    differences are logged, key by key (a net shape that changed fails at the load, naming the weight;
    another CLIP tower lock is refused: the saved optimizer state is for the parameters that trained; so
    is a ``clip_ckpt`` that now loads other weights than the run trained with, its ``clip_weights``),
    except in a sweep point's directory, where another ``module``, ``data`` or ``net`` value means another
    point's run (the sweep rerun with its values in another order: points are numbered) and is refused.
    ``checkpoint``: an explicit resume=<path> of the run in ``output_dir`` (its own directory elsewhere)."""
    from train.checkpoint import same_weights
    from train.config import ConfigError

    path = output_dir / "config.yaml"
    if not path.exists():
        return
    saved = OmegaConf.to_container(OmegaConf.load(path))
    net = OmegaConf.to_container(cfg.net, resolve=True) if "net" in cfg else {}
    saved_net = saved.get("net") or {}
    problems = [
        f"{key}: {theirs!r} there, {ours!r} here"
        for key, theirs, ours in (
            ("stage_name", saved.get("stage_name"), cfg.get("stage_name")),
            ("net._target_", saved_net.get("_target_"), net.get("_target_")),
        )
        if theirs != ours
    ]
    if problems and checkpoint is not None:
        raise ConfigError(
            f"resume={checkpoint}: a checkpoint of another run ({'; '.join(problems)}): give a checkpoint "
            f"of a {cfg.get('stage_name')} run, or resume=null to start this one fresh"
        )
    if problems:
        raise ConfigError(
            f"{output_dir} holds another run ({'; '.join(problems)}), and resume={cfg.get('resume')} would "
            "continue it: give this run a directory of its own (hydra.run.dir=..., or RUN_ID/RUN_DIR for "
            "launch/torchrun.sh), or resume=null to start over there"
        )
    trained_with, loads = saved.get("clip_weights") or {}, cfg.get("clip_weights") or {}
    if (
        checkpoint is None
        and trained_with.get("digest")
        and loads
        and not same_weights(loads["digest"], trained_with["digest"])
    ):
        raise ConfigError(_not_the_run_clip(cfg, output_dir, path, trained_with, loads))
    ours = _flat(OmegaConf.to_container(cfg, resolve=True))
    theirs = _flat(saved)
    was = theirs.get("paths.output_dir")
    if was and checkpoint is None and Path(was) != output_dir:  # the run directory moved (or was copied):
        now = str(ours.get("paths.output_dir", output_dir))  # paths under it moved with it, not changed
        theirs = {
            k: now + v[len(was) :] if isinstance(v, str) and (v == was or v.startswith(was + "/")) else v
            for k, v in theirs.items()
        }
    changed = sorted(
        k
        for k in ours.keys() & theirs.keys()
        if ours[k] != theirs[k]
        and not k.startswith(("paths.", "resume"))
        # (a digest recorded before the whole weights were hashed: the same weights, in fewer digits)
        and not (k.endswith(".digest") and same_weights(str(ours[k]), str(theirs[k])))
    )
    # (a key the saved config lacks, from before locks existed, had its default: nothing locked)
    saved_locks = {k: theirs.get(k, 0 if k.endswith("layers") else False) for k in LOCK_KEYS if k in ours}
    locks = [k for k, v in saved_locks.items() if ours[k] != v]
    if locks:
        raise ConfigError(
            f"resuming {path.parent} with "
            + ", ".join(f"{k}={ours[k]!r} (saved: {saved_locks[k]!r})" for k in locks)
            + ": its checkpoint's optimizer state is for the parameters that trained under the saved lock. "
            f"Keep the saved values, or start a new run from its weights (init_from={path.parent} "
            "hydra.run.dir=<a new directory>)"
        )
    if changed and checkpoint is None and _sweep_name() is not None:
        swept = [k for k in changed if k.startswith(("module.", "data.", "net."))]
        if swept:  # the point's directory is named by its number: values reordered, another point's run
            raise ConfigError(
                f"{output_dir} holds a sweep point with other settings ("
                + "; ".join(f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in swept[:5])
                + "): a sweep rerun into its hydra.sweep.dir must list each swept option's values in the "
                "same order (points are numbered by it), or use a new hydra.sweep.dir"
            )
    if changed:
        log.warning(
            "resuming with settings other than those saved in %s: %s",
            path,
            ", ".join(f"{k}: {theirs[k]!r} -> {ours[k]!r}" for k in changed),
        )


def _not_the_run_clip(cfg: DictConfig, output_dir: Path, path: Path, trained_with: dict, loads: dict) -> str:
    """Why a resume whose CLIP now loads other weights than the run trained with is refused, and what can
    be done (``clip_ckpt`` names a run, which may have trained on since this one started)."""
    then = f"{trained_with.get('checkpoint')}, step {trained_with.get('global_step')}"
    head = (
        f"resuming {output_dir} with clip_ckpt={cfg.get('clip_ckpt')}: it loads {loads['checkpoint']} (step "
        f"{loads['global_step']}), other weights than the CLIP this run has trained with ({then}; clip_weights "
        f"in {path})"
    )
    alone = (
        "; a prior on embedding shards can go on without a CLIP (clip_from_shards=false clip_ckpt=null: no "
        "zero-shot metrics)"
        if cfg.get("stage_name") == "prior"
        else ""
    )
    if Path(str(trained_with.get("checkpoint"))).resolve() == Path(loads["checkpoint"]).resolve():
        return (
            f"{head}. That file was overwritten as its run trained on: those weights are gone, and this run "
            f"cannot go on with the CLIP it learned. Start a new run in another directory{alone}"
        )
    where = (
        f"clip_ckpt={trained_with['checkpoint']}"
        if Path(str(trained_with.get("checkpoint"))).exists()
        else "clip_ckpt=<a checkpoint of those weights>"
    )
    return f"{head}. Give {where}, or start a new run in another directory{alone}"


class _RunFiles(pl.Callback):
    """The run directory's config.yaml and tokenizer.json (what exports and evaluation rebuild the run
    from), written by global rank 0: before a fresh run starts, or once a resumed run's checkpoint has
    loaded whole (``on_train_start``: Lightning restores the weights before ``on_fit_start`` but the
    optimizer and loops after it, and a failure there had replaced the saved config). A resumed run that
    had already finished trains no step and keeps the saved files."""

    def __init__(self, cfg: DictConfig, tokenizer, output_dir: Path) -> None:
        self.cfg, self.tokenizer, self.output_dir = cfg, tokenizer, output_dir

    def save(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            OmegaConf.save(self.cfg, self.output_dir / "config.yaml", resolve=True)
            if self.tokenizer is not None:
                self.tokenizer.save(self.output_dir / "tokenizer.json")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": leaf}``."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def resolve_checkpoint(resume: str | None, output_dir: Path, *, rank: int = 0, world: int = 1) -> str | None:
    """resume=auto: the newest checkpoint of the run directory, whichever kind wrote it (periodic
    ``checkpoints/step*.ckpt``, ``checkpoints/last.ckpt``, or ``hpc_ckpt_<n>.ckpt`` that Lightning saves
    when SLURM signals a preemption); resume=<path>: that checkpoint (must exist); null: start fresh.

    Lightning on its own prefers an ``hpc_ckpt`` whenever one exists, even an older one than the last
    periodic checkpoint: the newest wins here. Only finished checkpoints count (train/checkpoint_io.py):
    files appear whole by rename; sharded (DeepSpeed, FSDP) directories carry a commit marker. A
    checkpoint damaged since (train/checkpoint_io.py ``damage``) is skipped with a warning naming it and
    the next newest is taken; when every one is damaged the error lists them.

    Of the ``world`` processes of a run (each calls this before the Trainer starts them talking), only
    rank 0 reads a single-file checkpoint whole for its CRC-32s; the others read its zip directory, which
    finds truncation (every rank reads the file when it loads it: a CRC read on every rank doubled what a
    restart read from shared storage). So the ranks agree on truncated files, and a flipped bit only rank
    0 finds cannot be skipped there (the others would load the file): rank 0 moves that file aside
    (``<name>.damaged``) and stops the launch, and the next launch takes the next newest.
    """
    if resume in (None, "null", False):
        return None
    from train.checkpoint_io import damage, later_than_newest, run_checkpoints

    crc = rank == 0
    if resume == "auto":
        candidates, unfinished = run_checkpoints(output_dir)  # newest first
        if unfinished:
            log.warning(
                "ignoring unfinished checkpoints (a save was interrupted; delete them if no run is writing "
                "there): %s",
                ", ".join(map(str, unfinished)),
            )
        damaged = []
        for i, candidate in enumerate(candidates):
            problem = damage(candidate, crc=crc)
            if problem is None:
                later = later_than_newest(candidates, candidate) if rank == 0 else None
                if later is not None:
                    log.warning(
                        "resume=auto continues from %s (step %d), the newest written; %s holds step %d: a copy "
                        "that reset the files' times (cp -r, rsync without -t)? Then give resume=%s. (Or the "
                        "run was rewound to an older checkpoint, and that one is from the branch left)",
                        candidate, later[2], later[0], later[1], later[0],
                    )  # fmt: skip
                return str(candidate)
            if world > 1 and crc and damage(candidate, crc=False) is None:  # found by the CRC read alone
                aside = candidate.with_name(candidate.name + ".damaged")
                candidate.rename(aside)
                after = candidates[i + 1] if i + 1 < len(candidates) else None  # (checked at that launch)
                raise CheckpointDamagedError(
                    f"resume=auto: {problem}. The other {world - 1} ranks do not read checkpoints whole, and "
                    f"would load it: moved it to {aside}; launch again, and resume=auto continues from "
                    + (f"the next newest, {after}" if after else "the start (no other checkpoint)")
                )
            log.warning("skipping damaged checkpoint %s: %s", candidate, problem)
            damaged.append(problem)
        if damaged:
            raise CheckpointDamagedError(
                f"resume=auto: every checkpoint in {output_dir} is damaged:\n  "
                + "\n  ".join(damaged)
                + "\nrestore one from a copy and pass resume=<path>, or start over with resume=null"
            )
        return None
    if not Path(resume).exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint")
    if (
        Path(resume).is_dir() and Path(resume).suffix != ".ckpt"
    ):  # (a sharded checkpoint is a *.ckpt directory)
        raise FileNotFoundError(
            f"resume={resume}: a directory, not a checkpoint: give a .ckpt file (such as "
            f"{Path(resume) / 'checkpoints' / 'last.ckpt'}), or resume=auto with hydra.run.dir={resume}"
        )
    problem = damage(resume, crc=crc)
    if problem is not None:
        raise CheckpointDamagedError(f"resume={resume}: {problem}")
    return str(resume)


class CheckpointDamagedError(RuntimeError):
    pass


def remove_leftovers(output_dir: Path) -> None:
    """Delete, naming them, the stale temporaries of killed checkpoint saves in this run's directory
    (train/checkpoint_io.py ``remove_interrupted_saves``)."""
    from train.checkpoint_io import remove_interrupted_saves

    removed = remove_interrupted_saves(Path(output_dir))
    if removed:
        log.warning(
            "removed what %d killed checkpoint saves left (%.2f GB): %s",
            len(removed),
            sum(size for _, size in removed) / 1e9,
            ", ".join(str(path) for path, _ in removed),
        )


def clip_run(path: str) -> tuple[Path, DictConfig]:
    """The run (or export) directory and saved config of ``clip_ckpt=path``; another stage's run is
    refused, naming it (its config lacked the CLIP's keys: an OmegaConf error about ``net.text``)."""
    from train.checkpoint import export_dir_of, resolve_run
    from train.config import ConfigError

    run = export_dir_of(path) or resolve_run(path)[0]  # a run, or an export (ours, or from-open-clip's)
    clip_cfg = OmegaConf.load(run / "config.yaml")
    if clip_cfg.get("stage_name", "clip") != "clip":
        raise ConfigError(f"clip_ckpt={path}: a {clip_cfg.stage_name} run; expected a CLIP run (stage=clip)")
    return run, clip_cfg


def build_net(cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """Instantiate the architecture, wiring tokenizer-dependent fields (eot id, vocabulary size)."""
    from train.checkpoint import wire_net_config

    net_cfg = wire_net_config(cfg.net, tokenizer)
    if tokenizer is not None and "eot_id" in net_cfg:
        vocab = OmegaConf.select(net_cfg, "text.vocab_size")
        if vocab is not None and vocab < tokenizer.vocab_size:
            raise ValueError(
                f"net.text.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size}); "
                f"set net.text.vocab_size>={tokenizer.vocab_size}"
            )
    if tokenizer is not None and net_cfg.get("text_encoder") == "trainable":
        if net_cfg.text_vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"net.text_vocab_size={net_cfg.text_vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer.vocab_size}); set net.text_vocab_size>={tokenizer.vocab_size} or null (the tokenizer's)"
            )
        if net_cfg.text_context_length < tokenizer.context_length:
            raise ValueError(
                f"net.text_context_length={net_cfg.text_context_length} is shorter than the tokenizer's "
                f"context ({tokenizer.context_length} tokens); set net.text_context_length>="
                f"{tokenizer.context_length} or null (the tokenizer's)"
            )
    net = instantiate(net_cfg)
    if cfg.get("init_from_open_clip"):
        load_open_clip_weights(net, cfg.init_from_open_clip, cfg.get("init_from_open_clip_config"))
    return net


def load_open_clip_weights(net: torch.nn.Module, path: str, config=None) -> None:
    """init_from_open_clip=PATH: start from an open_clip checkpoint (file or hub directory) whose shapes
    match ``net``. Where the source says its architecture (a hub directory's config, OpenAI's archive,
    or ``init_from_open_clip_config``: as train/models/openclip_import.py reads it), the net's heads and
    activation must agree with it: the same tensors under another activation give other embeddings."""
    from train.models.clip import from_open_clip_state_dict
    from train.models.openclip_import import read_state_dict, resolve_config

    raw = read_state_dict(path)
    ours = {"quick_gelu": net.quick_gelu, "heads": (net.vision_cfg["heads"], net.text_cfg["heads"])}
    try:  # the source's own statement of its architecture, when it has one
        source = resolve_config(path, raw, config)
    except (ValueError, KeyError):
        source = None  # a bare file: the net's config (net.quick_gelu, net.*.heads) states what it is
    if source is not None:
        theirs = {
            "quick_gelu": source["quick_gelu"],
            "heads": (source["vision"]["heads"], source["text"]["heads"]),
        }
        if theirs != ours:
            raise ValueError(
                f"init_from_open_clip={path}: the checkpoint is {theirs}, the configured net {ours}; set "
                f"net.quick_gelu={str(theirs['quick_gelu']).lower()} and net.vision.heads / net.text.heads "
                "to match (or pick the net=... of that architecture)"
            )
    state = from_open_clip_state_dict(raw)
    ours = net.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs net {tuple(ours[k].shape)}"
        for k, v in state.items()
        if k in ours and ours[k].shape != v.shape
    ]
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    # a softmax CLIP's weights for a SigLIP run (module.loss=siglip): the bias starts at net.init_logit_bias
    keep_bias = "logit_bias" in missing
    missing = [k for k in missing if k != "logit_bias"]
    if wrong or missing or unexpected:
        raise ValueError(
            f"init_from_open_clip={path} does not fit the configured net (pick the matching net=...): "
            f"shape mismatches {wrong[:4]}, missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    net.load_state_dict(state, strict=not keep_bias)
    log.info("initialised %s from the open_clip checkpoint %s", type(net).__name__, path)


def _embedding_dirs(cfg: DictConfig, splits: tuple[str, ...] = ("train_shards", "val_shards")) -> list[Path]:
    """Every local directory of embedding shards the run reads, training and held-out (data=embeddings;
    ``DIR1::DIR2`` reads several)."""
    if "img_emb.npy" not in (cfg.data.get("npy_fields") or []):
        return []
    from data.shards import expand_shards

    dirs: list[Path] = []
    for spec in (cfg.data.get(split) for split in splits):
        for url in expand_shards(spec) if spec else []:
            if not url.startswith("pipe:") and "://" not in url and Path(url).parent not in dirs:
                dirs.append(Path(url).parent)
    return dirs


def _embedding_dir(cfg: DictConfig) -> Path | None:
    """The directory of the first training shard when the data is embedding shards (data=embeddings)."""
    return next(iter(_embedding_dirs(cfg, ("train_shards",))), None)


def wire_clip(cfg: DictConfig):
    """Stages after CLIP (prior, decoder): fill the net's CLIP-dependent sizes, the CLIP's image size and
    the tokenizer from ``clip_ckpt`` (a CLIP run) or the embedding shards' ``embed_info.json``.

    Returns the CLIP's tokenizer, or None for stages without ``clip_ckpt``. Edits ``cfg`` in place.
    """
    if "clip_ckpt" not in cfg.keys():  # a stage without a CLIP ("in" is False for a ??? value too)
        return None
    if OmegaConf.is_missing(cfg, "clip_ckpt"):
        with open_dict(cfg):
            cfg.clip_ckpt = None  # the error below names the option
    from data.tokenizer import Tokenizer

    if _clip_retrieval_root(cfg) is not None:
        return _wire_clip_retrieval(cfg)
    emb_dir = _embedding_dir(cfg)
    info = None
    if emb_dir is not None:
        info_path = emb_dir / "embed_info.json"
        if not info_path.exists():
            raise FileNotFoundError(
                f"{info_path}: data=embeddings expects the directory written by `python -m data.embed` "
                "(embed_info.json, tokenizer.json next to the shards)"
            )
        info = json.loads(info_path.read_text())
        # (shards with the CLIP's digest are checked by weights once it has loaded: record_clip)
        if cfg.clip_ckpt and not info.get("clip_digest") and Path(info["checkpoint"]).exists():
            _check_embedded_by(cfg.clip_ckpt, Path(info["checkpoint"]), emb_dir)
        if not cfg.clip_ckpt and cfg.get("clip_from_shards", True):
            if not Path(info["checkpoint"]).exists():  # (a moved CLIP was dropped without a word)
                from train.config import ConfigError

                raise ConfigError(
                    f"{info_path} names the CLIP that made these embeddings, {info['checkpoint']}, and it is not "
                    "there (moved, or made on another machine): give clip_ckpt=<its path now> (checked by its "
                    "weights), or clip_from_shards=false to train on the shards alone (no zero-shot metrics)"
                )
            with open_dict(cfg):
                cfg.clip_ckpt = info["checkpoint"]
    if cfg.clip_ckpt:
        run, clip_cfg = clip_run(cfg.clip_ckpt)
        tokenizer = Tokenizer.load(run / "tokenizer.json")
        sizes = {
            "embed_dim": clip_cfg.net.embed_dim,
            "text_width": clip_cfg.net.text.width,
            "context_length": tokenizer.context_length,
        }
        image_size = clip_cfg.data.image_size
    elif info is not None:
        tokenizer = Tokenizer.load(emb_dir / "tokenizer.json")
        sizes = {k: info[k] for k in ("embed_dim", "text_width", "context_length")}
        image_size = info["image_size"]
    else:
        raise ValueError(
            f"stage={cfg.stage_name} needs a CLIP: set clip_ckpt=<CLIP run directory> (image-text shards are "
            "embedded on the fly) or train on embedding shards (data=embeddings data.train_shards=...)"
        )
    _fill_net_sizes(cfg, sizes)
    with open_dict(cfg):
        if emb_dir is None and cfg.data.get("image_size") is None:
            cfg.data.image_size = int(image_size)  # the frozen CLIP embeds the shards at its own size
    return tokenizer


def _check_embedded_by(clip_ckpt: str, made_by: Path, emb_dir: Path) -> None:
    """``clip_ckpt`` must be the CLIP run that embedded ``emb_dir`` (its embed_info.json names it): with
    another one, the prior learned one CLIP's embeddings while its tokenizer, token features and
    zero-shot metrics came from the other, and its config named the other. (Embeddings moved from another
    machine, whose CLIP path does not exist here, are not checked.)"""
    from train.checkpoint import owner_of
    from train.config import ConfigError

    run, _ = clip_run(clip_ckpt)
    if owner_of(run) != owner_of(made_by):  # (a run and its export are one CLIP)
        raise ConfigError(
            f"clip_ckpt={clip_ckpt} (the run {run}) is not the CLIP that made the embeddings in {emb_dir} "
            f"({made_by}, its embed_info.json): leave clip_ckpt unset to take that one, or embed the shards "
            "with this CLIP (python -m data.embed)"
        )


def record_clip(cfg: DictConfig, module) -> None:
    """The CLIP weights a prior or decoder trains with, into its config as ``clip_weights`` (checkpoint,
    step, :func:`~train.checkpoint.weights_digest`): the frozen CLIP it loaded (``clip_ckpt``), else the
    one that made its embedding shards. A resume and the cascade compare them with the CLIP they load
    (``clip_ckpt`` names a run, which may have trained on since). Refused: embedding shards (training and
    held-out, every directory) made by different CLIP weights, and a ``clip_ckpt`` that loads other
    weights than those that made them (a CLIP run that trained on after embedding, another run): the
    prior would learn one CLIP's embeddings while its token features and zero-shot metrics came from the
    other's."""
    from train.checkpoint import same_weights
    from train.config import ConfigError

    frozen = getattr(module, "frozen_clip", None)
    made = [
        (d, info)
        for d in (_embedding_dirs(cfg) if "clip_ckpt" in cfg.keys() else [])
        if (d / "embed_info.json").is_file()
        and (info := json.loads((d / "embed_info.json").read_text())).get("clip_digest")
    ]
    for i, (d, info) in enumerate(made):  # every pair: a digest recorded before the whole bytes were
        for first, info0 in made[:i]:  # hashed matches two that differ there (same_weights)
            if same_weights(info["clip_digest"], info0["clip_digest"]):
                continue
            raise ConfigError(
                f"the embedding shards in {first} and {d} were made by different CLIP weights "
                f"({info0['checkpoint']}, step {info0['global_step']}; {info['checkpoint']}, step "
                f"{info['global_step']}; their embed_info.json): the prior would learn a mix of two CLIPs' "
                "embeddings. Embed them all with one CLIP (python -m data.embed)"
            )
    if frozen is not None:
        for d, info in made:
            if not frozen.has_weights(info["clip_digest"]):
                raise ConfigError(_not_the_embedding_clip(cfg, frozen, d, info))
        weights = frozen.weights()
    elif made:
        # the whole digest where a directory has one (one recorded before has the strided part only)
        info = max((info for _, info in made), key=lambda info: "." in info["clip_digest"])
        weights = {
            "checkpoint": info["checkpoint"],
            "global_step": int(info["global_step"]),
            "digest": info["clip_digest"],
        }
    else:
        return
    with open_dict(cfg):
        cfg.clip_weights = weights


def _saved_config(output_dir: Path) -> DictConfig:
    """The config.yaml a run directory holds (empty where none)."""
    path = output_dir / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else OmegaConf.create()


def check_init_from(cfg: DictConfig, output_dir: Path) -> None:
    """``init_from`` refused where it would not start the run: the run's own directory (to continue it:
    resume=auto), beside ``resume=<checkpoint>`` (which continues that checkpoint's run), and into a
    directory whose run did not start from it and that ``resume=auto`` would continue. (A run that did
    start from it resumes from its own checkpoint, with or without ``init_from`` given again.)"""
    from train.checkpoint import owner_of
    from train.checkpoint_io import run_checkpoints
    from train.config import ConfigError

    if not cfg.get("init_from"):
        return
    where = f"init_from={cfg.init_from}"
    source = Path(cfg.init_from)
    if source.exists() and owner_of(source) == output_dir.resolve():
        raise ConfigError(
            f"{where}: that is this run's own directory ({output_dir}). To continue it: resume=auto without "
            "init_from; to start a new run from its weights: hydra.run.dir=<a new directory>"
        )
    resume = cfg.get("resume")
    if resume not in (None, "null", False, "auto"):
        raise ConfigError(
            f"{where} and resume={resume}: resume continues that checkpoint's run (optimizer, step, data), "
            "init_from starts a new one from its weights: give one of them"
        )
    if (
        resume == "auto"
        and run_checkpoints(output_dir)[0]
        and not _saved_config(output_dir).get("init_weights")
    ):
        raise ConfigError(
            f"{where}: {output_dir} holds a run that did not start from it, and resume=auto would continue "
            "that run: give a new directory (hydra.run.dir=...), or resume=null to start over there"
        )


def tokenizer_to_init_with(cfg: DictConfig, output_dir: Path):
    """The tokenizer of a run that starts from ``init_from`` (its source's tokenizer.json), or None (no
    init_from, a source without one). A run that started so resumes with its own copy, whether or not
    init_from is given again or the source still exists."""
    from data.tokenizer import Tokenizer
    from train.checkpoint import config_dir_of

    own = output_dir / "tokenizer.json"
    if (
        cfg.get("resume") not in (None, "null", False)
        and own.is_file()
        and _saved_config(output_dir).get("init_weights")
    ):
        return Tokenizer.load(own)
    if not cfg.get("init_from") or not Path(cfg.init_from).exists():
        return None  # (a source that is not there is refused, naming it, when the weights load)
    path = config_dir_of(cfg.init_from) / "tokenizer.json"
    return Tokenizer.load(path) if path.is_file() else None


def _init_checkpoint(path: str) -> Path:
    """What ``init_from=path`` loads, checked whole for damage (CRC-32s, as resume=auto checks): a run
    directory's newest checkpoint (:func:`~train.checkpoint.resolve_run`, as exports take it, with its
    warning when another holds a later step), a named checkpoint, or an export (read as it is)."""
    from train.checkpoint import export_dir_of, resolve_run
    from train.checkpoint_io import damage
    from train.config import ConfigError

    if export_dir_of(path) is not None:
        return Path(path)
    try:
        _, checkpoint = resolve_run(path)
    except FileNotFoundError as e:
        raise ConfigError(f"init_from={path}: {e}") from e
    problem = damage(checkpoint, crc=True)
    if problem is not None:
        raise ConfigError(f"init_from={path}: {problem}; name an older checkpoint of that run")
    return checkpoint


def init_weights(cfg: DictConfig, module, tokenizer, source_tokenizer) -> None:
    """``init_from=PATH``: a new run starts from the weights of another run of this stage (its directory,
    a checkpoint in it: file, DeepSpeed or FSDP; or its export), the EMA copy's where it has one and
    ``init_from_ema``, into the net and its EMA copy. Optimizer, schedule, step and data position start
    fresh. Refused, naming the differences: another net class, weights of other names or shapes, a
    tokenizer of another vocabulary for a net with token embeddings. A prior or decoder made with another
    CLIP than the one it now trains with is a warning (fine-tuning to a new CLIP is a choice). What was
    loaded is recorded as ``init_weights`` (checkpoint, step, EMA, digest) in the run's config.yaml."""
    from train.checkpoint import same_weights, stage_weights, weights_digest
    from train.config import ConfigError

    where = f"init_from={cfg.init_from}"
    try:
        saved = stage_weights(
            _init_checkpoint(cfg.init_from), use_ema=cfg.get("init_from_ema", True), mmap=True
        )
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e
    theirs, ours = saved.cfg.get("net", {}).get("_target_"), cfg.net.get("_target_")
    if theirs != ours:
        raise ConfigError(
            f"{where}: a {saved.cfg.get('stage_name')} run of net {theirs}; this {cfg.stage_name} run's net is "
            f"{ours}: give a run (or export) of this stage"
        )
    keyed_by_vocabulary = "eot_id" in cfg.net or cfg.net.get("text_encoder") == "trainable"
    if (
        keyed_by_vocabulary
        and source_tokenizer is not None
        and tokenizer is not None
        and not source_tokenizer.same_vocabulary(tokenizer)
    ):
        fix = (
            f"give data.tokenizer.path={saved.tokenizer_path} (a CLIP takes init_from's tokenizer when "
            "data.tokenizer.path is unset)"
            if OmegaConf.select(cfg, "data.tokenizer") is not None
            else f"captions are tokenised by the CLIP's tokenizer: give a clip_ckpt with that vocabulary (that "
            f"run's was clip_ckpt={saved.cfg.get('clip_ckpt')})"
        )
        raise ConfigError(
            f"{where}: its token embeddings are for the vocabulary of {saved.tokenizer_path} ({source_tokenizer!r}), "
            f"and this run tokenises with another ({tokenizer!r}): {fix}"
        )
    own = module.net.state_dict()
    missing = sorted(own.keys() - saved.weights.keys())
    unexpected = sorted(saved.weights.keys() - own.keys())
    shapes = [
        f"{k} {tuple(v.shape)} there, {tuple(own[k].shape)} here"
        for k, v in saved.weights.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    net_keys = _flat(OmegaConf.to_container(cfg.net, resolve=True))
    saved_keys = _flat(OmegaConf.to_container(saved.cfg.net, resolve=True))
    wired = ("eot_id", "text.vocab_size", "text_eot_id", "text_vocab_size", "text_context_length")
    settings = [  # (null here: filled from the tokenizer, as an export's config has it written in)
        f"net.{k}: {saved_keys.get(k)!r} there, {net_keys.get(k)!r} here"
        for k in sorted(net_keys.keys() | saved_keys.keys())
        if saved_keys.get(k) != net_keys.get(k) and not (k in wired and net_keys.get(k) is None)
    ]
    if missing or unexpected or shapes:
        found = [
            f"{name} {items[:4]}"
            for name, items in (("missing", missing), ("unexpected", unexpected))
            if items
        ] + shapes[:4]
        raise ConfigError(
            f"{where}: {saved.checkpoint} holds other weights than this run's net ({'; '.join(found)})"
            + (f". The nets' settings differ: {'; '.join(settings[:6])}" if settings else "")
        )
    if settings:  # the same weights, computed otherwise (an activation, heads, dropout): a choice, or a slip
        log.warning("%s: the net's settings differ from that run's: %s", where, "; ".join(settings))
    trained_with = (saved.cfg.get("clip_weights") or {}).get("digest")
    clip_now = (cfg.get("clip_weights") or {}).get("digest")
    if trained_with and clip_now and not same_weights(trained_with, clip_now):
        log.warning(
            "%s was trained with the CLIP of %s (step %s); this run conditions on %s (step %s): it starts "
            "from another CLIP's embeddings",
            where, saved.cfg.clip_weights.checkpoint, saved.cfg.clip_weights.global_step,
            cfg.clip_weights.checkpoint, cfg.clip_weights.global_step,
        )  # fmt: skip
    with torch.no_grad():
        module.net.load_state_dict(saved.weights)
        ema = getattr(module, "ema", None)
        if ema is not None:
            ema.shadow.load_state_dict(saved.weights)
    digest = weights_digest(module.net.state_dict())
    with open_dict(cfg):
        cfg.init_from = str(Path(cfg.init_from).resolve())  # (a resume may run from another directory)
        cfg.init_weights = {
            "checkpoint": str(Path(saved.checkpoint).resolve()),
            "global_step": saved.global_step,
            "ema": saved.ema,
            "digest": digest,
        }
    log.info(
        "init_from: the %s weights of %s (step %d)%s", "EMA" if saved.ema else "net", saved.checkpoint,
        saved.global_step, " into the net and its EMA copy" if getattr(module, "ema", None) is not None else "",
    )  # fmt: skip


def _not_the_embedding_clip(cfg: DictConfig, frozen, emb_dir: Path, info: dict) -> str:
    """Why ``frozen`` is refused beside the embedding shards in ``emb_dir``, and what can be done."""
    named = str(cfg.clip_ckpt) == str(info["checkpoint"])  # (clip_ckpt unset takes embed_info.json's)
    what = (
        f"the CLIP that made the embeddings in {emb_dir}, {info['checkpoint']} (their embed_info.json; "
        f"clip_ckpt={cfg.clip_ckpt})"
        if named
        else f"clip_ckpt={cfg.clip_ckpt}"
    )
    loads = f"loads {frozen.checkpoint} (step {frozen.global_step})"
    alone = (
        "or train on the shards alone with clip_from_shards=false and clip_ckpt=null (no zero-shot metrics)"
    )
    again = "embed the shards again with this CLIP (python -m data.embed, a new out=) for a new run"
    if Path(frozen.checkpoint).resolve() == Path(info["checkpoint"]).resolve():
        return (
            f"{what} {loads} now: it held step {info['global_step']} when the shards were embedded, and was "
            f"overwritten as its run trained on, so those weights are gone. {again.capitalize()}, {alone}. "
            "(Pin a CLIP before embedding: python -m train.checkpoint export RUN --out DIR, then ckpt=DIR)"
        )
    where = (
        f"clip_ckpt={info['checkpoint']}"
        if Path(info["checkpoint"]).exists()
        else "a checkpoint of those weights"
    )
    return (
        f"{what} {loads}, other weights than those that made the embeddings in {emb_dir} "
        f"({info['checkpoint']}, step {info['global_step']}, their embed_info.json): give {where}, "
        f"{again}, {alone}"
    )


def _fill_net_sizes(cfg: DictConfig, sizes: dict[str, int]) -> None:
    """The net's CLIP-dependent sizes that are null in the config."""
    with open_dict(cfg):
        aliases = {"embed_dim": ("embed_dim", "cond_dim"), "text_width": ("text_width", "text_dim")}
        for key, value in sizes.items():
            for name in aliases.get(key, (key,)):
                if name in cfg.net and cfg.net[name] is None:
                    cfg.net[name] = int(value)


def _clip_retrieval_root(cfg: DictConfig) -> str | None:
    """data.root when the data is precomputed embeddings in clip-retrieval's layout (data=clip_retrieval)."""
    if str(cfg.data.get("_target_", "")).endswith("ClipRetrievalDataModule"):
        return cfg.data.root
    return None


def _wire_clip_retrieval(cfg: DictConfig):
    """data=clip_retrieval: embed_dim from the arrays. Without clip_ckpt there is no tokenizer and no
    token features (net.use_text_tokens=false; text_width and context_length 0: the net has no token
    inputs); with it, the CLIP's tokenizer tokenises the captions and the prior computes the features
    (train/modules/prior.py, which checks the CLIP made the embeddings)."""
    from data.embeddings import embedding_dim
    from data.tokenizer import Tokenizer

    root = _clip_retrieval_root(cfg)
    if cfg.stage_name != "prior":
        raise ValueError(
            f"data=clip_retrieval holds embeddings and captions but no images: it feeds stage=prior, not "
            f"stage={cfg.stage_name}"
        )
    dim = embedding_dim(root)
    tokenizer = None
    if cfg.clip_ckpt:
        run, clip_cfg = clip_run(cfg.clip_ckpt)
        if int(clip_cfg.net.embed_dim) != dim:
            raise ValueError(
                f"clip_ckpt={cfg.clip_ckpt} embeds into {clip_cfg.net.embed_dim} dimensions, data.root={root} "
                f"holds {dim}-d embeddings: clip_ckpt must be the CLIP that made them (or null, with "
                "net.use_text_tokens=false)"
            )
        tokenizer = Tokenizer.load(run / "tokenizer.json")
        sizes = {"text_width": clip_cfg.net.text.width, "context_length": tokenizer.context_length}
    elif cfg.net.get("use_text_tokens"):
        raise ValueError(
            f"data=clip_retrieval (data.root={root}) has no per-token text features: set "
            "net.use_text_tokens=false, or clip_ckpt=<the CLIP run that made these embeddings> to compute "
            "them from the captions"
        )
    else:
        sizes = {"text_width": 0, "context_length": 0}
    _fill_net_sizes(cfg, {"embed_dim": dim, **sizes})
    return tokenizer


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The configured callbacks, and LoggerStepSync, which is not optional (it fixes logged steps). The
    progress bar redraws at the logging steps (``trainer.log_every_n_steps``): each redraw reads the
    logged loss from the device, which makes the host wait for the GPU, and only then
    (train/callbacks/progress_bar.py)."""
    from pytorch_lightning.callbacks import ProgressBar

    from train.callbacks.log_step import LoggerStepSync
    from train.callbacks.progress_bar import LossProgressBar

    configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    bar = progress_bar_on(cfg) and not any(isinstance(c, ProgressBar) for c in configured)
    every = int(cfg.trainer.get("log_every_n_steps") or 50)
    return [*configured, *([LossProgressBar(refresh_rate=every)] if bar else []), LoggerStepSync()]


def progress_bar_on(cfg: DictConfig) -> bool:
    """``trainer.enable_progress_bar``: true, false, or auto (the default): on when stdout is a terminal.
    Redrawn into a file (a SLURM job's .out, a redirected launch) the bar's carriage-return frames were
    interleaved with the log lines."""
    import sys

    value = cfg.trainer.get("enable_progress_bar", "auto")
    return sys.stdout.isatty() if value == "auto" else bool(value)


def build_loggers(cfg: DictConfig) -> list:
    """The configured loggers. W&B gets a run id kept in the run directory, so a resumed run (same
    directory) continues the same W&B run instead of starting a new one."""
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if c is None:
            continue
        if str(c.get("_target_", "")).endswith("WandbLogger") and not c.get("id"):
            c = c.copy()
            output_dir = Path(cfg.paths.output_dir)
            with open_dict(c):
                c.id = wandb_run_id(output_dir)
                c.resume = c.get("resume") or "allow"
                if c.get("name") == cfg.get(
                    "stage_name"
                ):  # every run was "clip": runs told apart by directory
                    c.name = f"{c.name}-{output_dir.name}"
                sweep = _sweep_name()
                if sweep and not c.get("group"):
                    c.group = sweep
        loggers.append(instantiate(c))
    return loggers


def _sweep_name() -> str | None:
    """The sweep directory's name under ``--multirun`` (W&B groups its points by it); None otherwise."""
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None


def finish_loggers(trainer: pl.Trainer, failed: bool) -> None:
    """End this run's W&B run: Lightning's WandbLogger leaves it open, and the next run of the process (a
    sweep's next point, the pipeline's next stage) took it over, its steps and config written into it."""
    import sys

    if "wandb" not in sys.modules:  # (never imported: no W&B run to end)
        return
    import wandb

    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and wandb.run is not None:
            wandb.finish(exit_code=1 if failed else 0)


def wandb_run_id(output_dir: Path) -> str:
    """``<run>/wandb_id``: created by the first process of the first start, read by every later one."""
    import uuid

    path = output_dir / "wandb_id"
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    from data.ranks import is_global_zero

    if is_global_zero():  # other ranks never log to W&B (Lightning loggers act on rank 0 only)
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id)
    return run_id


def build_trainer(cfg: DictConfig, callbacks, loggers) -> pl.Trainer:
    """The Trainer from ``cfg.trainer``. Its ``compile`` keys are ours (a CompileNet callback), not
    Lightning's; ``max_time`` goes to our TimeLimit rather than Lightning's Timer, which has the ranks agree
    in a broadcast at every step (train/callbacks/time_limit.py); ``float32_matmul_precision`` is set for
    the process on a GPU (train.perf.set_matmul_precision); ``benchmark`` (cuDNN's autotuner) left null is
    on unless ``deterministic``, as eval.bench_train measures the stages."""
    from train.perf import set_matmul_precision

    trainer_cfg = cfg.trainer.copy()
    with open_dict(trainer_cfg):
        mode, backend = trainer_cfg.pop("compile", False), trainer_cfg.pop("compile_backend", "inductor")
        max_time = trainer_cfg.pop("max_time", None)
        set_matmul_precision(trainer_cfg.pop("float32_matmul_precision", None) or "high")
        trainer_cfg.enable_progress_bar = progress_bar_on(cfg)
        # val_check_interval counts optimizer steps, as checkpoints' every_n_train_steps and max_steps do;
        # Lightning counts batches, so with accumulation it validated accumulate_grad_batches times as often
        accumulate, every = (
            trainer_cfg.get("accumulate_grad_batches") or 1,
            trainer_cfg.get("val_check_interval"),
        )
        if isinstance(every, int) and not isinstance(every, bool) and accumulate > 1:
            trainer_cfg.val_check_interval = every * accumulate
        if trainer_cfg.get("benchmark") is None:  # autotuned convolutions, unless every kernel is pinned
            trainer_cfg.benchmark = not trainer_cfg.get("deterministic")
    if mode not in (None, False, "none", "false"):
        from train.callbacks.compile import CompileNet

        callbacks = [*callbacks, CompileNet(mode, backend)]
    if max_time is not None:
        from train.callbacks.time_limit import TimeLimit

        callbacks = [*callbacks, TimeLimit(max_time)]
    strategy_cfg = cfg.strategy
    strategy = instantiate(strategy_cfg) if "_target_" in strategy_cfg else strategy_cfg.get("name", "auto")
    from pytorch_lightning.strategies import DeepSpeedStrategy, ModelParallelStrategy

    from train.checkpoint_io import AtomicCheckpointIO

    sharded = isinstance(strategy, (DeepSpeedStrategy, ModelParallelStrategy))  # they write directories
    plugins, precision = [] if sharded else [AtomicCheckpointIO()], resolve_precision(trainer_cfg.precision)
    if isinstance(strategy, DeepSpeedStrategy):  # the batch reaches the step uncast (DeepSpeedMixedPrecision)
        from lightning_fabric.connector import _convert_precision_to_unified_args

        from train.strategies import DeepSpeedMixedPrecision

        plugins, precision = [DeepSpeedMixedPrecision(_convert_precision_to_unified_args(precision))], None
    return instantiate(
        trainer_cfg,
        plugins=plugins,
        strategy=strategy,
        precision=precision,
        callbacks=callbacks,
        logger=loggers or False,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one stage from a composed config; returns the final metrics."""
    from train.config import validate
    from train.modules.compat import upgrade_config

    upgrade_config(cfg)  # renamed keys (module.lr -> module.optimizer.lr, ...) from old experiment files
    validate(cfg)  # wrong types and impossible values fail here, naming the key
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    clip_tokenizer = wire_clip(cfg)
    datamodule = instantiate(cfg.data)
    if clip_tokenizer is not None:
        datamodule.tokenizer = clip_tokenizer  # captions are tokenised as the CLIP did
    check_init_from(cfg, output_dir)
    init_tokenizer = tokenizer_to_init_with(cfg, output_dir)
    if (
        init_tokenizer is not None
        and clip_tokenizer is None
        and OmegaConf.select(cfg, "data.tokenizer") is not None
        and not OmegaConf.select(cfg, "data.tokenizer.path")
    ):
        # a CLIP fine-tuned from init_from's weights reads captions as those weights learned them
        context = OmegaConf.select(cfg, "data.tokenizer.context_length") or init_tokenizer.context_length
        datamodule.tokenizer = init_tokenizer.with_context_length(int(context))
        if OmegaConf.select(cfg, "data.tokenizer.kind") != init_tokenizer.kind.value:
            log.info(
                "data.tokenizer.kind=%s: init_from's tokenizer (%r)",
                init_tokenizer.kind.value,
                init_tokenizer,
            )
            cfg.data.tokenizer.kind = init_tokenizer.kind.value  # (what config.yaml records)
    tokenizer = datamodule.build_tokenizer()
    net = build_net(cfg, tokenizer)
    module = instantiate(cfg.module, net=net, tokenizer=tokenizer, _convert_="all")  # plain hparams in ckpts
    record_clip(cfg, module)
    if getattr(module, "kinds", None) and hasattr(datamodule, "hard_negatives"):
        datamodule.hard_negatives = tuple(module.kinds)  # the CLIP's negatives, made in the loader workers
    n_params = sum(p.numel() for p in net.parameters())
    log.info("stage %s: %s with %.2fM parameters", cfg.stage_name, type(net).__name__, n_params / 1e6)

    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    ckpt = resolve_checkpoint(
        cfg.get("resume"), output_dir, rank=trainer.global_rank, world=trainer.world_size
    )
    saved = _saved_config(output_dir) if ckpt else None
    if saved is not None and saved.get("init_weights"):  # a fine-tuning run resumed: its checkpoint holds
        with open_dict(cfg):  # the weights; the config keeps what it started from
            cfg.init_from, cfg.init_weights = saved.get("init_from"), saved.init_weights
        log.info("resuming from %s (the run started from init_from=%s)", ckpt, cfg.init_from)
    elif cfg.get("init_from") and not ckpt:
        init_weights(cfg, module, tokenizer, init_tokenizer)
    run_files = _RunFiles(cfg, tokenizer, output_dir)
    if ckpt:
        check_same_run(cfg, output_dir)  # before this run's config replaces the one saved there
        from train.checkpoint import run_dir_of

        if run_dir_of(Path(ckpt)).resolve() != output_dir.resolve():  # resume=<another run's checkpoint>
            check_same_run(cfg, run_dir_of(Path(ckpt)), checkpoint=ckpt)
        log.info("resuming from %s", ckpt)
        # saved once the checkpoint has loaded: a net of another shape (net.* changed) failed to load
        # after this run's config.yaml had replaced the saved one, and the run no longer loaded at all
        trainer.callbacks.append(run_files)
    else:
        run_files.save(trainer)
    if cfg.get("resume") == "auto" and trainer.global_rank == 0:
        remove_leftovers(output_dir)  # (once the directory is known to be this run's)
    # logged once the run is known to be this directory's (a refused launch wrote its config into the W&B
    # run of the run it would have replaced): the whole resolved config, next to the module's hparams
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})
    try:
        metrics = _fit(trainer, module, datamodule, ckpt, output_dir)
    except BaseException:
        finish_loggers(trainer, failed=True)
        raise
    finish_loggers(trainer, failed=False)  # (after _fit's final log lines: W&B keeps the console's output)
    return metrics


def _fit(trainer: pl.Trainer, module, datamodule, ckpt: str | None, output_dir: Path) -> dict[str, Any]:
    """``trainer.fit``, then the run's final metrics (metrics.json, the log's last lines)."""
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    metrics["trainer/global_step"] = trainer.global_step
    saved = output_dir / "metrics.json"
    if ckpt and trainer.is_global_zero and saved.exists():  # a resumed run keeps the keys it did not log
        # again (resumed at max_steps it takes no step and logs nothing: the file was left with the step
        # alone, and a rerun sweep returned no loss)
        before = {k: v for k, v in json.loads(saved.read_text()).items() if k != "trainer/preempted"}
        metrics = {**before, **metrics}
    preempted = [
        c.checkpoint for c in trainer.callbacks if getattr(c, "checkpoint", None) and hasattr(c, "received")
    ]
    if preempted:
        metrics["trainer/preempted"] = 1.0
        log.warning("stopped early by a preemption signal; %s holds the state: rerun to resume", preempted[0])
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("final metrics: %s", json.dumps({k: round(v, 4) for k, v in sorted(metrics.items())}))
        log.info("run directory: %s", output_dir)
    return metrics


def route_library_logs() -> None:
    """Lightning's messages ("`Trainer.fit` stopped...", its rank-zero warnings) and Python warnings into
    the run's log (run.log, pipeline.log) beside ours: Lightning gives its loggers their own stderr handler
    and stops them there, and warnings.warn went to stderr only; a SLURM job's .out was the only record."""
    import warnings

    logging.captureWarnings(True)
    # the stages log val/* computed from every rank's gathered samples, identical on each: Lightning's advice
    # to reduce them again (one warning per key, ~20 under DDP) does not apply
    warnings.filterwarnings(
        "ignore", message=r".*sync_dist=True.* when logging on epoch level in distributed"
    )
    for name in ("pytorch_lightning", "lightning_fabric"):
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    route_library_logs()
    check_run_dir_given()
    if OmegaConf.is_interpolation(cfg.paths, "output_dir"):  # a paths.output_dir=... override is kept
        with open_dict(cfg):
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    metrics = train(cfg)
    if metrics.get("trainer/preempted") and _sweep_name() is not None:
        # a sweep's point that stopped for a preemption has not finished: its loss is not its result, and
        # returning would end the job (submitit then reports the unfinished value, and the client moves on
        # while the requeued job trains; a local sweep started its next point after a SIGTERM)
        raise SystemExit(
            f"preempted at step {int(metrics['trainer/global_step'])}; the point resumes when rerun"
        )
    return metrics.get("train/loss")  # for Hydra sweepers


def check_run_dir_given() -> None:
    """Under a launcher's processes (torchrun, srun) every process composes the config itself, and the
    default run directory holds its start time: launched either side of a second's boundary, ranks wrote
    into two directories, and a rerun of the same command started a new run instead of resuming. Refused
    unless the directory is given (``hydra.run.dir`` or ``paths.output_dir``; launch/torchrun.sh and
    launch/slurm.sbatch give it). Lightning's own launcher passes its children the parent's directory."""
    from hydra.types import RunMode

    from data.ranks import launch_environment
    from train.config import ConfigError

    hydra_cfg = HydraConfig.get()
    environment = launch_environment()
    if hydra_cfg.mode == RunMode.MULTIRUN or environment is None or environment.world_size() < 2:
        return
    given = [*hydra_cfg.overrides.hydra, *hydra_cfg.overrides.task]
    if not any(o.lstrip("+").startswith(("hydra.run.dir=", "paths.output_dir=")) for o in given):
        raise ConfigError(
            f"{environment.world_size()} processes, each composing its own run directory from its start time: "
            "give them one (hydra.run.dir=outputs/<name>, the same on every rank; rerunning with it resumes), "
            "or launch with launch/torchrun.sh or launch/slurm.sbatch, which do"
        )


def end_process() -> None:
    """For a CLI whose run has ended well (loggers finalised, files closed, workers stopped; atexit handlers
    still run). It leaves the process group, which Lightning keeps: left to the interpreter's exit, gloo's
    threads can abort the process ("terminate called without an active exception", exit code -6: a
    finished run reported failed), and NCCL warns. Then the interpreter's last garbage collections skip
    every object torch and Lightning made, which took 0.7 s of each process's exit."""
    import gc

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.freeze()


if __name__ == "__main__":
    import sys

    from train.modules.compat import upgrade_overrides

    sys.argv[1:] = upgrade_overrides(sys.argv[1:])  # old key names on the command line (module.lr=...)
    main()
    end_process()
