"""Train the cascade stage after stage on the embedded default, then sample it (the README's main job).

    python -m train.pipeline [stages=[clip,embed,prior,decoder,upsampler_256,upsampler_1024,sample]]
                             [clip.trainer.max_steps=100] [sample.per_category=32] [out_dir=DIR]

Each training stage is a ``train.run`` config (conf/train.yaml) with ``stage=<name>`` plus the overrides
under ``<name>:`` in conf/pipeline.yaml, writes into ``<out_dir>/<name>/`` and is exported to
``<out_dir>/<name>/export/`` (safetensors) when it finishes. ``embed`` runs ``data.embed`` with the CLIP
of ``<out_dir>/clip`` over its train and val shards into ``<out_dir>/embed/{train,val}``; the prior
trains on those (``data=embeddings``), the decoder embeds on the fly with that CLIP. ``sample`` runs the
compositional benchmark through the exported cascade (eval/benchmark.py) and copies its labelled grid
to ``<out_dir>/samples.png``. With ``clip_ckpt=PATH`` (a CLIP trained elsewhere, e.g. an open_clip model
through ``python -m train.checkpoint from-open-clip``) the clip stage is not run and the later stages take
that CLIP; embed then reads the decoder stage's shards. A stage with a ``done.json`` is skipped on rerun;
an interrupted one resumes from its ``checkpoints/last.ckpt``. ``report.json`` and ``report.md`` in
``out_dir`` hold every finished stage's metrics and seconds, rewritten after each stage (a run cut short
reports what finished).

On several processes (``torchrun --nproc_per_node=8 -m train.pipeline``, or ``srun``): every rank trains
each stage (``trainer.devices`` and ``trainer.num_nodes`` from the launcher unless set) and embeds its
share of the shards; rank 0 alone samples and writes the pipeline's files (done.json, the exports, the
report), and a stage starts on every rank only when the one before it has finished on all (:class:`Ranks`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from data.embed import resolve_device
from data.ranks import launch_environment
from train.checkpoint import export_stage
from train.modules.compat import upgrade_overrides
from train.parallel import on_rank_zero, waiting_group
from train.run import end_process, route_library_logs, train

log = logging.getLogger(__name__)
UPSAMPLERS = ("upsampler_256", "upsampler_1024")
STAGES = ("clip", "embed", "prior", "decoder", *UPSAMPLERS, "sample")


class Ranks:
    """The processes of a pipeline, one unless a launcher (torchrun, srun) started several.

    Every rank trains each stage together (one Lightning run over all of them) and embeds its share of the
    shards. What reads or writes the pipeline's own files (done.json, the exports, the report) and the
    sampling run on rank 0 alone, through :meth:`share`: the other ranks wait for its outcome on a gloo
    group, so that no stage starts on a rank before the one it reads has finished everywhere, and every rank
    takes rank 0's decisions (a stage finished or not, its seconds allotted) rather than its own view of a
    shared filesystem or clock. A failure on rank 0 ends every rank with its message."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world
        self.group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls) -> Ranks:
        """The ranks of this process's launch, connected when there are several: the default process group
        as Lightning would make it (NCCL on GPUs, else gloo; the stages' Trainers reuse it), and a gloo
        group for the waits."""
        environment = launch_environment()
        if environment is None:
            return cls()
        ranks = cls(environment.global_rank(), environment.world_size())
        if ranks.world > 1:
            if not dist.is_initialized():
                _connect(environment, ranks.rank, ranks.world)
            ranks.group = waiting_group(hours=12)  # sampling the cascade; a launcher ends the others
            # sooner when rank 0 dies
            if not ranks.main:
                _own_log_file(ranks.rank)
            log.info("pipeline: rank %d of %d", ranks.rank, ranks.world)
        return ranks

    def share(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on rank 0; its result on every rank. Its exception is raised on rank 0,
        and on the others as a SystemExit that names it (one process: ``fn`` here)."""
        return on_rank_zero(fn, *args, group=self.group, **kwargs)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        return values

    def launched(self, name: str, stage_overrides: dict[str, Any]) -> None:
        """A training stage's ``trainer.devices`` and ``trainer.num_nodes``: what the launcher started
        (processes per node: torchrun's LOCAL_WORLD_SIZE, SLURM's SLURM_NTASKS_PER_NODE), unless set.

        In one process, one device: with ``devices=auto`` on a host of several GPUs, Lightning would start
        a copy of this script per extra GPU, each running the whole pipeline (and none of them a rank of
        it); the launcher's processes are the way to use them all."""
        if name in ("embed", "sample"):
            return
        trainer = stage_overrides.setdefault("trainer", {})
        if self.world == 1:
            devices = trainer.get("devices")
            if devices in (None, "auto"):
                trainer["devices"] = devices = 1
            if devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1):
                gpus = torch.cuda.device_count()
                if gpus > 1:
                    log.info(
                        "stage %s: 1 of this host's %d GPUs; torchrun --nproc_per_node=%d -m train.pipeline "
                        "trains on all of them",
                        name,
                        gpus,
                        gpus,
                    )
                return
            raise SystemExit(
                f"{name}.trainer.devices={devices} in one pipeline process: Lightning would start a copy of "
                "the whole pipeline per extra device; launch the processes instead (torchrun "
                "--nproc_per_node=N -m train.pipeline, or srun) and leave devices unset"
            )
        if trainer.get("devices") is not None and trainer.get("num_nodes") is not None:
            return
        per_node = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
        if not (per_node or "").isdigit() or self.world % int(per_node):
            raise SystemExit(
                f"{name}: {self.world} processes, but their number per node is unknown (LOCAL_WORLD_SIZE="
                f"{os.environ.get('LOCAL_WORLD_SIZE')}, SLURM_NTASKS_PER_NODE="
                f"{os.environ.get('SLURM_NTASKS_PER_NODE')}); set {name}.trainer.devices (per node) and "
                f"{name}.trainer.num_nodes"
            )
        for key, value in (("devices", int(per_node)), ("num_nodes", self.world // int(per_node))):
            if trainer.get(key) is None:
                trainer[key] = value


def _connect(environment: Any, rank: int, world: int) -> None:
    """The default process group, as Lightning's strategies make it for the launcher's environment
    (its backend, device and 30-minute timeout: the strategies, finding it made, skip their own)."""
    from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
    from lightning_fabric.utilities.distributed import _init_dist_connection

    kwargs: dict[str, Any] = {"timeout": default_pg_timeout}
    backend = "gloo"
    if torch.cuda.is_available():
        device = torch.device("cuda", environment.local_rank())
        torch.cuda.set_device(device)
        backend, kwargs["device_id"] = "nccl", device
    _init_dist_connection(environment, backend, global_rank=rank, world_size=world, **kwargs)


def _own_log_file(rank: int) -> None:
    """A rank other than 0 logs to ``<name>.rank<N>.log`` beside Hydra's job log, not into it (16
    processes appending to one file on a shared filesystem interleave and lose lines)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        path = Path(handler.baseFilename)
        own = logging.FileHandler(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))
        own.setFormatter(handler.formatter)
        own.setLevel(handler.level)
        root.removeHandler(handler)
        handler.close()
        root.addHandler(own)


def read_done(done: Path) -> dict[str, float] | None:
    """A finished stage's metrics (its done.json), else None."""
    return json.loads(done.read_text())["metrics"] if done.exists() else None


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    """{"trainer": {"max_steps": 5}, "net": "clip_tiny"} -> ["trainer.max_steps=5", "net=clip_tiny"]: a
    stage's block as train.run's command line, each value written so that Hydra reads it back as it is
    (a null is a null: leave a key out for the stage's own default; a string Hydra would read otherwise,
    a brace pattern, ``1e-4``, ``a,b``, is quoted)."""
    out = []
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += flatten(value, prefix=f"{name}.")
        else:
            out.append(f"{name}={override_value(value)}")
    return out


def override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, read back as the same value and type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        if OverridesParser.create().parse_override(f"k={text}").value() == text:
            return text  # plain: a path, a group option
    except Exception:  # a character the grammar does not take bare
        pass
    # quoted: a backslash before a quote (or the closing one) is doubled, a quote escaped
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def wiring(name: str, out_dir: Path, clip: Path | None = None) -> list[str]:
    """Overrides that connect a stage to the outputs of earlier ones (``clip``: the pipeline's
    ``clip_ckpt``, a CLIP trained elsewhere; None: its clip stage's, ``<out_dir>/clip``)."""
    clip = (clip or out_dir / "clip").resolve()
    if name == "decoder":
        return [f"clip_ckpt={clip}"]
    if name == "prior":
        emb = (out_dir / "embed").resolve()
        return [
            "data=embeddings",
            f"data.train_shards={emb / 'train'}",
            f"data.val_shards={emb / 'val'}",
            f"clip_ckpt={clip}",
        ]
    return []


def external_clip(cfg: DictConfig) -> Path | None:
    """The pipeline's ``clip_ckpt`` (a CLIP trained elsewhere: a run, a checkpoint in one, an export, or
    ``python -m train.checkpoint from-open-clip``'s OUT) as a path, checked before any stage runs; None when
    the cascade trains its own (the clip stage)."""
    path = cfg.get("clip_ckpt")
    if not path:
        return None
    from train.config import ConfigError
    from train.run import clip_run

    try:
        clip_run(str(path))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(
            f"clip_ckpt={path}: {e} (an open_clip model is imported first: python -m train.checkpoint "
            "from-open-clip SRC OUT, then clip_ckpt=OUT)"
        ) from e
    return Path(path).resolve()


def check_one_clip(out_dir: Path, clip: Path | None, stage_clips: Mapping[str, Any] | None = None) -> None:
    """Stop before any stage runs when ``out_dir`` holds stages made with another CLIP than the one this run
    gives them (``clip``, else the clip stage's; ``stage_clips``: a stage's own ``<stage>.clip_ckpt``
    override): the embeddings (their ``embed_info.json``), the prior and the decoder (their ``config.yaml``),
    finished or not. A rerun that changed or dropped ``clip_ckpt``, or whose ``clip_ckpt`` run has trained
    on since, would otherwise skip the finished stages and sample a cascade of two CLIPs. Where a stage
    recorded the CLIP's weights (their digest) the weights decide, else the CLIP's run directory (one that
    no longer exists, moved, is not judged)."""
    from train.checkpoint import owner_of
    from train.frozen_clip import FrozenClip

    own = owner_of(out_dir / "clip")
    default = owner_of(clip) if clip else own
    given = {k: owner_of(v) for k, v in (stage_clips or {}).items() if v}
    recorded: dict[str, tuple[Any, dict]] = {}  # stage -> (its clip_ckpt, its CLIP's weights)
    info = out_dir / "embed" / "train" / "embed_info.json"
    if info.exists():
        made = json.loads(info.read_text())
        recorded["embed"] = (made.get("checkpoint"), {**made, "digest": made.get("clip_digest")})
    for stage in ("prior", "decoder"):
        if (out_dir / stage / "config.yaml").exists():
            saved = OmegaConf.load(out_dir / stage / "config.yaml")
            recorded[stage] = (
                saved.get("clip_ckpt"),
                OmegaConf.to_container(saved.get("clip_weights") or {}),
            )
    loaded: dict[str, FrozenClip | None] = {}

    def loads(path: Path) -> FrozenClip | None:  # what the stage would load now; None: nothing yet
        if str(path) not in loaded:
            try:
                loaded[str(path)] = FrozenClip(path)
            except (FileNotFoundError, ValueError):  # (the clip stage not trained yet)
                loaded[str(path)] = None
        return loaded[str(path)]

    for stage, (made_with, weights) in recorded.items():
        takes = (
            f"{stage}.clip_ckpt={stage_clips[stage]}"
            if stage in given
            else (f"clip_ckpt={clip}" if clip else f"the clip stage of {out_dir}")
        )
        other_run = (
            bool(made_with) and Path(made_with).exists() and owner_of(made_with) != given.get(stage, default)
        )
        if weights.get("digest"):
            now = loads(Path(stage_clips[stage]) if stage in given else (clip or out_dir / "clip"))
            if now is not None and now.has_weights(weights["digest"]):
                continue  # (the same weights from another path: a copy, an export)
            if now is None and not other_run:  # a CLIP moved away, and this run would train a new one
                raise SystemExit(
                    f"{out_dir / stage} was made with the CLIP weights of {weights.get('checkpoint')} (step "
                    f"{weights.get('global_step')}), which is not there now (moved?), and this run would train "
                    f"a new clip stage in {out_dir / 'clip'} for the stages after it: give clip_ckpt=<that CLIP's "
                    "path now> (checked by its weights), or give the new CLIP another out_dir"
                )
            if now is not None and not other_run:  # the same CLIP run, trained on since
                redo = [
                    str(out_dir / s)
                    for s in ("embed", "prior", "decoder", "sample")
                    if (out_dir / s).exists()
                ]
                raise SystemExit(
                    f"{out_dir / stage} was made with the CLIP weights of {weights.get('checkpoint')} (step "
                    f"{weights.get('global_step')}), but {takes} loads {now.checkpoint} (step {now.global_step}) "
                    f"now, other weights: a cascade on two CLIPs samples poorly. Remove {', '.join(redo)} to make "
                    "them again with these weights, or give this CLIP another out_dir"
                )
        if not other_run:
            continue
        same = (
            "no clip_ckpt (the clip stage's)"
            if owner_of(made_with) == own
            else f"clip_ckpt={owner_of(made_with)}"
        )
        raise SystemExit(
            f"{out_dir / stage} was made with the CLIP {made_with}, but this run takes {takes}: a cascade on "
            f"two CLIPs samples poorly. Rerun with {same}, or give this CLIP another out_dir"
        )


def needs_shards(cfg: DictConfig, stages: Sequence[str], out_dir: Path) -> bool:
    """Whether this run embeds, or samples with CLIP-FID (the shards of :func:`cascade_shards`)."""
    fid = int((cfg.get("sample") or {}).get("fid_reference", 256) or 0) > 0
    return any(
        name in stages and not (out_dir / name / "done.json").exists()
        for name in ("embed", *(["sample"] if fid else []))
    )


def cascade_shards(cfg: DictConfig, out_dir: Path, clip: Path) -> tuple[str, str | None]:
    """The train and val shards the cascade trains on, for a CLIP trained elsewhere (which names none, or
    other data): the decoder stage's, as its options in this pipeline compose; the embedded default is
    written first if missing, as a training stage would."""
    from data.synthetic import ensure_synthetic

    options = OmegaConf.to_container(cfg.get("decoder") or {}, resolve=True)
    stage = compose(config_name="train", overrides=stage_overrides_list("decoder", options, out_dir, clip))
    synthetic = OmegaConf.to_container(stage.data.get("synthetic") or {}, resolve=True)
    if synthetic.pop("generate", False):
        ensure_synthetic(stage.data.train_shards, stage.data.val_shards, **synthetic)
    return str(stage.data.train_shards), stage.data.get("val_shards")


def write_done(done: Path, metrics: dict[str, float], seconds: float, **extra: Any) -> None:
    """A finished stage's done.json (its metrics and seconds; ``extra``, e.g. the device it ran on): a
    rerun skips the stage and reports these."""
    done.write_text(json.dumps({"metrics": metrics, "seconds": seconds, **extra}, indent=2))


def run_embed(
    options: Mapping[str, Any],
    out_dir: Path,
    ranks: Ranks | None = None,
    clip: Path | None = None,
    shards: tuple[str, str | None] | None = None,
) -> dict[str, float]:
    """Embedding shards of the CLIP stage's train and val shards (with its trained weights); on several
    ranks each embeds its share of the shards, and the stage is done when all are. With ``clip`` (a CLIP
    trained elsewhere), ``shards`` (:func:`cascade_shards`) are embedded with it."""
    from data.embed import embed_shards

    ranks = ranks or Ranks()
    stage_dir = out_dir / "embed"
    done = stage_dir / "done.json"
    previous = ranks.share(read_done, done)
    if previous is not None:
        log.info("stage embed: already finished (%s), skipping", done)
        return previous
    clip_dir = clip or out_dir / "clip"
    if clip is None and not ranks.share((clip_dir / "done.json").exists):
        raise FileNotFoundError(
            f"stage embed needs a finished CLIP stage in {clip_dir} (stages=[clip,embed,...]), or a CLIP "
            "trained elsewhere: clip_ckpt=PATH"
        )
    if shards is None:
        data = OmegaConf.load(clip_dir / "config.yaml").data
        shards = (data.get("train_shards"), data.get("val_shards"))
    device = resolve_device(options.get("device"))
    log.info("stage embed: on %s", device)
    start, metrics = time.time(), {}
    for split, spec in zip(("train", "val"), shards):
        if spec:
            result = embed_shards(
                str(clip_dir),
                spec,
                stage_dir / split,
                batch_size=int(options.get("batch", 256)),
                device=device,
                workers=int(options.get("workers") or 0),
                rank=ranks.rank,
                world_size=ranks.world,
            )
            metrics[f"embed/{split}_samples"] = float(sum(ranks.gather(result["samples"])))
    metrics["embed/seconds"] = time.time() - start
    ranks.share(write_done, done, metrics, metrics["embed/seconds"], device=device)
    return metrics


def _benchmark_options(options: Mapping) -> dict[str, int]:
    """The sample stage's benchmark settings, shared by the benchmark and the lever's rerun of it
    (defaults as conf/pipeline.yaml's ``sample`` block)."""
    return {
        "per_category": int(options.get("per_category", 16)),
        "batch": int(options.get("batch", 64)),
        "seed": int(options.get("seed", 0)),
        "grid_per_category": int(options.get("grid_per_category", 6)),
    }


def run_sample(
    options: Mapping[str, Any],
    out_dir: Path,
    upsamplers: tuple[str, ...] = UPSAMPLERS,
    clip: Path | None = None,
    fid_shards: str | None = None,
) -> dict[str, float]:
    """Text -> image through the trained cascade on the compositional benchmark; samples.png, scores.
    ``upsamplers``: the upsampler stages of this run, in order (preset=gpu stops at 256 px). ``clip``: a
    CLIP trained elsewhere (else the clip stage's); ``fid_shards``: CLIP-FID's held-out images (else the
    CLIP run's val shards)."""
    from eval.benchmark import evaluate_cascade, reference_images
    from train.cascade import Cascade

    stage_dir = out_dir / "sample"
    done = stage_dir / "done.json"
    if done.exists():
        log.info("stage sample: already finished (%s), skipping", done)
        return json.loads(done.read_text())["metrics"]
    found = {n: out_dir / n / "export" for n in ("prior", "decoder", *UPSAMPLERS)}
    missing = [n for n in ("decoder", *upsamplers) if not (found[n] / "config.yaml").exists()]
    if missing:
        raise FileNotFoundError(
            f"stage sample needs the finished stages {missing} in {out_dir} (their export/ directories)"
        )
    device = resolve_device(options.get("device"))
    log.info("stage sample: on %s", device)
    cascade = Cascade.load(
        found["decoder"],
        prior=found["prior"] if (found["prior"] / "config.yaml").exists() else None,
        upsamplers=[found[n] for n in upsamplers],
        clip=clip or out_dir / "clip",
        device=device,
        precision=str(options.get("precision") or "auto"),
    )
    log.info("stage sample: the diffusion nets sample in %s", cascade.precision)
    settings, ups = sample_settings(options)
    metrics = evaluate_cascade(
        cascade,
        stage_dir,
        **_benchmark_options(options),
        reference=reference_images(
            clip or out_dir / "clip", int(options.get("fid_reference", 256)), fid_shards
        ),
        upsamplers=ups,
        **settings,
    )
    shutil.copy(stage_dir / "samples.png", out_dir / "samples.png")
    if options.get("lever"):  # the same benchmark with one setting changed: does it move binding, counting?
        start = time.time()
        metrics.update(_lever(cascade, options, settings, ups, stage_dir))
        metrics["bench/seconds"] += time.time() - start
    if int(options.get("probe", 48) or 0) > 0:  # each stage on ground-truth renders: where shapes are lost
        start = time.time()
        metrics.update(_probe(cascade, options, settings, ups, stage_dir))
        metrics["bench/seconds"] += time.time() - start
    write_done(done, metrics, metrics["bench/seconds"], device=device, precision=cascade.precision)
    return metrics


def sample_settings(options: Mapping[str, Any]) -> tuple[dict, list]:
    """The ``sample`` stage's prior and decoder StageSettings and the upsamplers', from its options."""
    import dataclasses

    from train.cascade import StageSettings

    def make(key: str, values: Mapping[str, Any]) -> StageSettings:
        try:
            return StageSettings(**{k: v for k, v in values.items() if v is not None})
        except TypeError as e:
            names = [f.name for f in dataclasses.fields(StageSettings)]
            raise ValueError(f"sample.{key}: {e} (settings: {names})") from e
        except ValueError as e:
            raise ValueError(f"sample.{key}.{e}") from e

    settings = {k: make(k, options.get(k) or {}) for k in ("prior", "decoder")}
    ups = [make(f"upsamplers[{i}]", u) for i, u in enumerate(options.get("upsamplers") or [])]
    return settings, ups


def lever_settings(lever: Mapping[str, Any], settings: dict) -> dict:
    """``settings`` with ``sample.lever``'s changes; a ValueError names a key or value it cannot take."""
    import dataclasses

    unknown = sorted(set(lever) - set(settings))
    if unknown:
        raise ValueError(f"sample.lever.{unknown[0]}: expected a stage among {sorted(settings)}")
    changed = {}
    for stage, base in settings.items():
        try:
            changed[stage] = dataclasses.replace(base, **dict(lever.get(stage) or {}))
        except TypeError as e:
            raise ValueError(
                f"sample.lever.{stage}: {e} (settings: {[f.name for f in dataclasses.fields(base)]})"
            ) from e
        except ValueError as e:
            raise ValueError(f"sample.lever.{stage}.{e}") from e
    return changed


def check_sample(cfg: DictConfig) -> None:
    """Stop before any stage runs when ``sample``'s settings or ``sample.lever`` cannot be taken: they are
    read only after every stage has trained."""
    if "sample" not in cfg.stages:
        return
    from train.cascade import PRECISIONS

    options = OmegaConf.to_container(cfg.get("sample") or {}, resolve=True)
    try:
        settings, ups = sample_settings(options)
        if options.get("lever"):
            lever_settings(dict(options["lever"]), settings)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    precision = str(options.get("precision") or "auto")
    if precision not in PRECISIONS:
        raise SystemExit(f"sample.precision={precision!r}: expected one of {list(PRECISIONS)}")
    listed = [n for n in UPSAMPLERS if n in cfg.stages]
    if listed and len(ups) > len(listed):
        raise SystemExit(
            f"sample.upsamplers: {len(ups)} settings for the {len(listed)} upsampler(s) of stages "
            f"({', '.join(listed)}); give one per upsampler, in order"
        )


def _lever(
    cascade, options: Mapping[str, Any], settings: dict, ups: list, stage_dir: Path
) -> dict[str, float]:
    """``sample.lever`` (e.g. ``{prior: {guidance_scale: 4.0}}``): the benchmark again, same prompts and
    seed, with those sampling settings changed; its figures as ``lever/bench/...`` (images: sample/lever/)."""
    from eval.benchmark import evaluate_cascade

    lever = dict(options["lever"])
    changed = lever_settings(lever, settings)
    log.info("stage sample: lever %s", lever)
    result = evaluate_cascade(
        cascade,
        stage_dir / "lever",
        **_benchmark_options(options),
        upsamplers=ups,
        **changed,
    )
    return {f"lever/{k}": v for k, v in result.items() if k.startswith("bench/") and k != "bench/seconds"}


def _probe(
    cascade, options: Mapping[str, Any], settings: dict, ups: list, stage_dir: Path
) -> dict[str, float]:
    """eval/probe.py on the trained cascade: probe.json, probe.md and its metrics."""
    from eval import probe

    result = probe.probe(
        cascade,
        n=int(options["probe"]),
        steps=settings["decoder"].steps,
        guidance_scale=settings["decoder"].guidance_scale,
        upsampler_steps=[u.steps for u in ups],
        seed=int(options.get("seed", 0)),
        prior=settings["prior"],
    )
    (stage_dir / "probe.json").write_text(json.dumps(result, indent=1))
    (stage_dir / "probe.md").write_text(probe.table(result) + "\n")
    return probe.metrics(result)


def stage_overrides_list(
    name: str, stage_overrides: Mapping[str, Any], out_dir: Path, clip: Path | None = None
) -> list[str]:
    """The ``train.run`` overrides of training stage ``name`` in this pipeline (``clip``: as :func:`wiring`)."""
    return [
        f"stage={name}",
        f"paths.output_dir={(out_dir / name).resolve()}",
        "resume=auto",
        *wiring(name, out_dir, clip),
        *upgrade_overrides(flatten(stage_overrides)),  # a pipeline config with old key names (module.lr)
    ]


def check_image_sizes(cfg: DictConfig, out_dir: Path) -> None:
    """Stop before any stage runs when the decoder and the upsamplers this run trains do not chain (each
    upsampler's ``module.low_res_size`` is the side of the stage before it): the cascade would otherwise
    fail only when ``sample`` loads it, after every stage has trained."""
    chain = [n for n in ("decoder", *UPSAMPLERS) if n in cfg.stages]
    if len(chain) < 2:
        return
    sizes = {}
    for name in chain:
        options = OmegaConf.to_container(cfg.get(name) or {}, resolve=True)
        stage = compose(config_name="train", overrides=stage_overrides_list(name, options, out_dir))
        sizes[name] = (stage.net.image_size, stage.module.get("low_res_size"))
    for before, after in zip(chain, chain[1:]):
        side, takes = sizes[before][0], sizes[after][1]
        if side != takes:
            raise SystemExit(
                f"{after}.module.low_res_size={takes}, but {before} outputs {side} px "
                f"({before}.net.image_size): in a cascade each upsampler takes the side of the stage "
                f"before it; set {after}.module.low_res_size={side} or leave {after} out of stages"
            )


def run_stage(
    name: str,
    stage_overrides: Mapping[str, Any],
    out_dir: Path,
    stages: tuple[str, ...] = UPSAMPLERS,
    ranks: Ranks | None = None,
    clip: Path | None = None,
    shards: tuple[str, str | None] | None = None,
) -> dict[str, float]:
    """One stage of the pipeline on every rank. ``clip``: a CLIP trained elsewhere (the pipeline's
    ``clip_ckpt``), with ``shards`` (:func:`cascade_shards`) for embed and sample; None: the clip stage's."""
    ranks = ranks or Ranks()
    if name == "embed":
        return run_embed(stage_overrides, out_dir, ranks, clip, shards)
    if name == "sample":  # the upsamplers this run trains, else (stages=[sample]) those it has exported
        listed = tuple(n for n in UPSAMPLERS if n in stages) or tuple(
            n for n in UPSAMPLERS if (out_dir / n / "export" / "config.yaml").exists()
        )
        return ranks.share(run_sample, stage_overrides, out_dir, listed, clip, shards[1] if shards else None)
    stage_dir = out_dir / name
    done = stage_dir / "done.json"
    previous = ranks.share(read_done, done)
    if previous is not None:
        log.info("stage %s: already finished (%s), skipping", name, done)
        return previous
    overrides = stage_overrides_list(name, stage_overrides, out_dir, clip)
    log.info("stage %s: python -m train.run %s", name, " ".join(overrides))
    cfg = compose(config_name="train", overrides=overrides)
    for needed, used in (
        ("clip", OmegaConf.select(cfg, "clip_ckpt", default=None, throw_on_missing=False)),
        ("embed", OmegaConf.select(cfg, "data.train_shards", default=None, throw_on_missing=False)),
    ):  # the earlier stage of this pipeline it reads, unless an override points elsewhere
        where = (out_dir / needed).resolve()
        inside = used and Path(str(used)).resolve().is_relative_to(where)  # (not <out_dir>/clip_other)
        if inside and not ranks.share((where / "done.json").exists):
            raise SystemExit(
                f"stage {name} needs the finished {needed} stage in {where} (stages=[..., {needed}, {name}, ...]), "
                f"or {name}.{'clip_ckpt' if needed == 'clip' else 'data.train_shards'}=<elsewhere>"
            )
    start = time.time()
    metrics = train(cfg)

    def finish() -> dict[str, float]:
        if metrics.get("trainer/preempted"):
            raise SystemExit(
                f"stage {name} was preempted at step {metrics['trainer/global_step']}; rerun to resume it"
            )
        export_stage(stage_dir)  # <stage>/export: EMA weights as safetensors, config, tokenizer
        metrics[f"{name}/seconds"] = time.time() - start
        write_done(done, metrics, metrics[f"{name}/seconds"])
        return metrics

    return ranks.share(finish)


def write_report(out_dir: Path, results: dict[str, dict[str, float]]) -> None:
    (out_dir / "report.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    lines = ["# Cascade report", ""]
    if (out_dir / "samples.png").exists():
        lines += ["Text -> image samples (prompts under each image): ", "", "![samples](samples.png)", ""]
    seconds = {s: m[f"{s}/seconds"] for s, m in results.items() if f"{s}/seconds" in m}
    seconds.update(
        {s: m[k] for s, m in results.items() for k in ("embed/seconds", "bench/seconds") if k in m}
    )
    if seconds:  # steps: where a training stage stopped; allotted: its share of time_budget
        lines += ["| stage | seconds | steps | seconds allotted |", "|---|---|---|---|"]
        for s, v in seconds.items():
            steps = results[s].get("trainer/global_step")
            allotted = results[s].get(f"{s}/seconds_allotted")
            lines.append(
                f"| {s} | {v:.0f} | {'-' if steps is None else f'{steps:.0f}'} | "
                f"{'-' if allotted is None else f'{allotted:.0f}'} |"
            )
        lines += [""]
    if "sample" in results:  # the compositional benchmark per category (and with sample.lever's settings)
        from eval.benchmark import category_table

        for prefix, title in (("bench/", "benchmark"), ("lever/bench/", "benchmark with sample.lever")):
            table = category_table(results["sample"], prefix)
            lines += [f"## {title}, per category (program-scored)", "", *table, ""] if table else []
    for stage, metrics in results.items():
        lines += [f"## {stage}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
        where = out_dir / stage / ("checkpoints" if stage not in ("embed", "sample") else "")
        lines += ["", f"outputs: `{where}`", ""]
    lever = {k[len("lever/") :]: v for k, v in results.get("sample", {}).items() if k.startswith("lever/")}
    if lever:
        base = results["sample"]
        lines += ["## lever: the benchmark with sample.lever's settings, same prompts and seed", ""]
        lines += ["| metric | base | lever | change |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {base[k]:.3f} | {v:.3f} | {v - base[k]:+.3f} |"
            for k, v in sorted(lever.items())
            if k in base
        ]
        lines += [""]
    probe = out_dir / "sample" / "probe.md"
    if "sample" in results and probe.exists():
        lines += ["## probe: each stage on ground-truth renders (eval/probe.py)", "", probe.read_text()]
    (out_dir / "report.md").write_text("\n".join(lines))


def time_allotment(
    budget: float, elapsed: float, stages: Sequence[str], shares: Mapping[str, float]
) -> float:
    """Seconds for ``stages[0]`` when ``elapsed`` of ``budget`` seconds are spent and ``stages`` are still
    to run: the time left split by ``shares`` (a stage not listed has none), at least one second."""
    weights = [float(shares.get(name) or 0) for name in stages]
    left = max(float(budget) - elapsed, 0.0)
    share = left * weights[0] / sum(weights) if sum(weights) > 0 else left
    return max(share, 1.0)


def dhms(seconds: float) -> str:
    """Whole seconds as Lightning's ``max_time`` string: 754.2 -> '00:00:12:34'."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def check_time_budget(cfg: DictConfig) -> None:
    """time_budget and time_shares: numbers, and shares only of stages this pipeline has."""
    budget, shares = cfg.get("time_budget"), cfg.get("time_shares") or {}
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0
    ):
        raise SystemExit(f"time_budget: expected seconds > 0 or null, got {budget!r}")
    for name, share in shares.items():
        if name not in STAGES:
            raise SystemExit(f"time_shares.{name}: unknown stage; expected names from {list(STAGES)}")
        if isinstance(share, bool) or not isinstance(share, int | float) or share < 0:
            raise SystemExit(f"time_shares.{name}: expected a number >= 0, got {share!r}")


def check_stages(stages) -> None:
    """Stop before any stage runs when ``stages`` names one this pipeline does not have."""
    unknown = [name for name in stages if name not in STAGES]
    if unknown:
        raise SystemExit(f"stages: unknown {unknown}; expected names from {list(STAGES)}")


@hydra.main(version_base=None, config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    route_library_logs()
    check_stages(cfg.stages)
    check_time_budget(cfg)
    start = time.monotonic()
    out_dir = Path(cfg.out_dir)
    check_image_sizes(cfg, out_dir)
    check_sample(cfg)
    clip = external_clip(cfg)
    check_one_clip(out_dir, clip, {n: OmegaConf.select(cfg, f"{n}.clip_ckpt") for n in ("prior", "decoder")})
    stages = [name for name in cfg.stages if clip is None or name != "clip"]
    if len(stages) < len(cfg.stages):
        log.info("stage clip: not trained; the cascade takes clip_ckpt=%s", clip)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = Ranks.start()
    shards = None
    if clip is not None and ranks.share(needs_shards, cfg, stages, out_dir):
        shards = ranks.share(cascade_shards, cfg, out_dir, clip)
        log.info("embedding and CLIP-FID shards (the decoder's data): %s, %s", *shards)
    results = {}
    budget, shares = cfg.get("time_budget"), cfg.get("time_shares") or {}
    for i, name in enumerate(stages):
        stage_overrides = OmegaConf.to_container(cfg.get(name) or {}, resolve=True)
        ranks.launched(name, stage_overrides)
        allotted = None
        finished = ranks.share((out_dir / name / "done.json").exists)  # skipped below: nothing to allot
        if budget is not None and name not in ("embed", "sample") and not finished:
            allotted = ranks.share(  # rank 0's clock
                lambda left: time_allotment(budget, time.monotonic() - start, left, shares), stages[i:]
            )
            trainer = stage_overrides.setdefault("trainer", {})
            if trainer.get("max_time") is None:  # a stage's own max_time wins
                trainer["max_time"] = dhms(allotted)
            log.info("stage %s: stops at %s (time_budget %s s)", name, trainer["max_time"], budget)
        results[name] = run_stage(name, stage_overrides, out_dir, tuple(stages), ranks, clip, shards)
        if allotted is not None:
            results[name][f"{name}/seconds_allotted"] = allotted
        if ranks.main:  # after every stage: a run cut short still reports what finished
            write_report(out_dir, results)
    if not ranks.main:
        return
    elapsed = time.monotonic() - start
    print(f"\npipeline finished: {', '.join(stages)} in {elapsed:.0f} s"
          + (f" (time_budget {budget} s)" if budget is not None else ""))  # fmt: skip
    for name, metrics in results.items():
        shown = {
            k: round(v, 4)
            for k, v in sorted(metrics.items())
            if k.startswith(
                ("val/zeroshot", "val/i2t_r1", "val/t2i_r1", "val/cos_", "val/colour_match", "val/psnr")
            )
            or k.startswith(("embed/", "bench/"))
            or k.endswith("/seconds")
        }
        print(f"  {name}: {shown}  ->  {out_dir / name}")
    if (out_dir / "samples.png").exists():
        print(f"  samples: {out_dir / 'samples.png'}")
    print(f"  report: {out_dir / 'report.md'}")


if __name__ == "__main__":
    main()
    end_process()
