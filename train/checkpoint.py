"""Load a trained stage back from its run directory, for evaluation, embedding export and sampling.

A run directory (written by train/run.py) holds ``config.yaml`` (resolved), ``tokenizer.json`` and
``checkpoints/*.ckpt``. Given the directory or one checkpoint inside ``<run>/checkpoints/``, this
rebuilds the net from the config, loads the weights and the tokenizer. No Lightning module is built,
so no optimizer or data pipeline is touched.

An inference export (:func:`export_stage`, ``<run>/export/``) holds the net's weights (the EMA's where
the stage has one) as ``model.safetensors`` (no pickle: safe to load from anywhere), next to
``config.yaml``, ``tokenizer.json`` and ``export.json`` (source checkpoint, step). :func:`load_stage`
reads it like a run directory. ``to-open-clip`` writes a CLIP run as an open_clip hub directory;
``from-open-clip`` writes an open_clip checkpoint as an export, which every consumer of a CLIP run takes
(``clip_ckpt=``, ``python -m data.embed ckpt=``, ``eval.zeroshot``, ``eval.classify``, the cascade's ``--clip``).

    python -m train.checkpoint export RUN [--out DIR]            # <run>/export: safetensors + config
    python -m train.checkpoint consolidate CKPT OUT              # a sharded checkpoint -> one file
    python -m train.checkpoint to-open-clip RUN OUT_DIR          # open_clip.create_model("local-dir:OUT_DIR")
    python -m train.checkpoint from-open-clip SRC OUT_DIR [--config ViT-L-14-quickgelu] [--tokenizer BPE]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from data.tokenizer import Tokenizer
from data.transforms import CLIP_MEAN, CLIP_STD, Normalize
from train.modules.compat import upgrade_config

log = logging.getLogger(__name__)


@dataclass
class LoadedStage:
    cfg: DictConfig
    net: torch.nn.Module
    tokenizer: Tokenizer | None
    checkpoint: Path
    global_step: int
    ema: bool = False  # the weights are the EMA copy's (the CLIP has none)


def weights_digest(state: dict[str, torch.Tensor], per_tensor: int = 1024) -> str:
    """A short hex digest of a net's weights, ``SAMPLED.WHOLE``: each tensor's name, dtype and shape with
    up to ``per_tensor`` of its values, evenly strided (SAMPLED), and with all of its bytes (WHOLE; SHA-256,
    1.4 GB/s on a CPU core with SHA instructions, 0.4 without). Two steps of one run differ, and so do weights that differ in a few rows
    only (new tokens' embeddings learnt with the rest frozen), which the strided values can miss; a copy,
    an export or another machine's file of the same weights, on any device, do not. Compare digests with
    :func:`same_weights`: a digest recorded before the whole bytes were hashed is its SAMPLED part alone."""
    import hashlib

    sampled, whole = hashlib.blake2b(digest_size=8), hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        header = f"{name}|{t.dtype}|{tuple(t.shape)}|".encode()
        sampled.update(header)
        if t.is_meta:  # (no values: a net placed on the meta device)
            continue
        flat = t.reshape(-1).to("cpu").contiguous()  # (one copy from the device, where it is on one)
        sample = flat[:: max(1, flat.numel() // per_tensor)].contiguous()
        sampled.update(sample.view(torch.uint8).numpy().tobytes())
        whole.update(header)
        whole.update(flat.view(torch.uint8).numpy())
    return f"{sampled.hexdigest()}.{whole.hexdigest()[:16]}"


def same_weights(digest: str, other: str) -> bool:
    """Whether two :func:`weights_digest` values are of the same weights. A digest recorded before the
    whole bytes were hashed (``embed_info.json``, a stage's ``clip_weights`` of an earlier version) is
    compared by the part both have."""
    sampled, _, whole = digest.partition(".")
    other_sampled, _, other_whole = other.partition(".")
    return sampled == other_sampled and (not whole or not other_whole or whole == other_whole)


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint (file or sharded directory) or an export belongs to."""
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint file) from either of them; clear errors for anything else."""
    path = Path(path)
    if path.is_dir() and path.suffix == ".ckpt":  # a sharded (DeepSpeed / FSDP) checkpoint directory
        return run_dir_of(path), path
    if path.is_dir():
        from train.checkpoint_io import run_checkpoints

        finished, _ = run_checkpoints(path)  # the newest, as resume=auto takes it (last.ckpt was preferred:
        if not finished:  # a run preempted after its last periodic checkpoint exported that one)
            raise FileNotFoundError(
                f"{path}: no finished checkpoint in this run directory (checkpoints/*.ckpt, hpc_ckpt_*.ckpt)"
            )
        from train.checkpoint_io import later_than_newest

        later = later_than_newest(finished, finished[0])
        if later is not None:
            log.warning(
                "%s: taking %s (step %d), the newest written; %s holds step %d: a copy that reset the files' "
                "times? Then name that checkpoint",
                path, finished[0], later[2], later[0], later[1],
            )  # fmt: skip
        return path, finished[0]
    if path.is_file():
        return run_dir_of(path), path
    raise FileNotFoundError(f"{path}: expected a run directory or a .ckpt file inside <run>/checkpoints/")


EXPORT_WEIGHTS = "model.safetensors"


def owner_of(path: str | Path) -> Path:
    """Whose weights ``path`` holds, as one directory: a run for the run, its checkpoints and its export
    (``<run>/export``, or its weights file); an export made elsewhere (``from-open-clip``) for itself. Two
    paths with one owner are one CLIP (the embedding shards' and the cascade's checks)."""
    path = Path(path).resolve()
    path = export_dir_of(path) or path
    if path.suffix == ".ckpt" or (path.name == "export" and (path.parent / "config.yaml").is_file()):
        return run_dir_of(path)
    return path


def config_dir_of(path: str | Path) -> Path:
    """The directory holding the ``config.yaml`` of a run directory, a checkpoint in one, an export or an
    export's weights file."""
    path = Path(path)
    export = export_dir_of(path)
    if export is not None:
        return export
    return path if path.is_dir() and path.suffix != ".ckpt" else run_dir_of(path)


def export_dir_of(path: str | Path) -> Path | None:
    """The export directory ``path`` is, or whose weights file it is (``embed_info.json`` names the
    weights of the CLIP that embedded); None for anything else."""
    path = Path(path)
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        return path
    if path.name == EXPORT_WEIGHTS and path.is_file() and (path.parent / "config.yaml").is_file():
        return path.parent
    return None


def wire_net_config(net_cfg: DictConfig, tokenizer: Tokenizer | None) -> DictConfig:
    """A copy of a ``net`` config with the fields that come from the tokenizer filled in: the CLIP's
    ``eot_id`` (its text pooling position) and ``text.vocab_size`` where null, and, for a trainable caption encoder (the decoder's
    ``net.text_encoder=trainable``), ``text_eot_id``, ``text_vocab_size`` and ``text_context_length``
    where they are null. Training (train/run.py), loading and
    exporting a run all build the net through it, so they agree."""
    net_cfg = net_cfg.copy()
    if tokenizer is None:
        return net_cfg
    with open_dict(net_cfg):
        if "eot_id" in net_cfg:  # a CLIP: pools at the end-of-text id; its vocabulary by default
            net_cfg.eot_id = tokenizer.eot_id
            if OmegaConf.select(net_cfg, "text.vocab_size") is None and "text" in net_cfg:
                net_cfg.text.vocab_size = int(tokenizer.vocab_size)
        if net_cfg.get("text_encoder") == "trainable":
            for key, value in (
                ("text_eot_id", tokenizer.eot_id),
                ("text_vocab_size", tokenizer.vocab_size),
                ("text_context_length", tokenizer.context_length),
            ):
                if net_cfg.get(key) is None:
                    net_cfg[key] = int(value)
    return net_cfg


def read_json(path: Path) -> Any:
    """A JSON file's content; a file that is not JSON is an error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _load_weights(net: torch.nn.Module, weights: dict, where: Path, tokenizer: Path | None) -> None:
    """``weights`` into ``net`` (built from the run's config.yaml and tokenizer), or an error naming the
    file, the tensors that differ and, for the text embedding, the tokenizer the net's vocabulary came from."""
    own = net.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} there, {tuple(own[k].shape)} here"
        for k, v in weights.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if shapes:
        hint = ""
        if tokenizer is not None and any("token_embedding" in s or "vocab" in s for s in shapes):
            hint = f"; the net's vocabulary comes from {tokenizer}: a tokenizer.json of another run?"
        raise ValueError(
            f"{where}: weights of other shapes than config.yaml's net: {'; '.join(shapes[:3])}{hint}"
        )
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"{where}: weights do not match config.yaml's net: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def export_stage(path: str | Path, out: str | Path | None = None, use_ema: bool = True) -> Path:
    """Write the inference export of a run (default ``<run>/export``); returns its directory."""
    from safetensors.torch import save_file

    stage = load_stage(path, use_ema=use_ema)
    run, _ = resolve_run(path)
    out = Path(out) if out is not None else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    cfg = stage.cfg.copy()
    with open_dict(cfg):  # what load_stage filled in from the tokenizer: the export needs no tokenizer wiring
        cfg.net = wire_net_config(cfg.net, stage.tokenizer)
    state = {k: v.detach().contiguous().cpu() for k, v in stage.net.state_dict().items()}
    save_file(state, str(out / EXPORT_WEIGHTS))
    OmegaConf.save(cfg, out / "config.yaml")
    if stage.tokenizer is not None:
        stage.tokenizer.save(out / "tokenizer.json")
    info = {"checkpoint": str(stage.checkpoint), "global_step": stage.global_step, "ema": stage.ema}
    (out / "export.json").write_text(json.dumps(info, indent=2))
    return out


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A checkpoint file, unpickled with ``weights_only=True``: tensors, numbers, strings and plain
    containers only. A file that holds any other pickled object (code could run while it loads) is
    refused before that object is built."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: refused to load: it contains pickled objects other than tensors and plain "
            f"containers ({first[:200]}); only load checkpoints you trust with torch.load(weights_only=False)"
        ) from None


def validate_deepspeed_checkpoint(path: str | Path) -> None:
    """Refuse a DeepSpeed checkpoint directory whose files hold pickled objects beyond tensors, plain
    containers and the three DeepSpeed types its own files use. DeepSpeed loads its files with
    ``weights_only=False`` (code in a crafted file would run); every file is checked here first with
    ``weights_only=True`` (memory-mapped: the tensors are not read)."""
    import pickle

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = Path(path)
    files = sorted(path.rglob("*.pt"))
    if not files:
        raise FileNotFoundError(f"{path}: a DeepSpeed checkpoint directory without any .pt file")
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
        for f in files:
            try:
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as e:
                first = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e)[:200])
                raise ValueError(
                    f"{f}: refused to load: it contains pickled objects other than tensors, plain containers "
                    f"and DeepSpeed's checkpoint types ({first[:200]})"
                ) from None


def checkpoint_format(path: str | Path) -> str:
    """``file`` (one torch.save file), ``deepspeed`` (a ZeRO checkpoint directory: one shard of weights
    and optimizer state per rank) or ``dcp`` (an FSDP2 distributed checkpoint directory)."""
    path = Path(path)
    if path.is_file():
        return "file"
    if path.is_dir() and (path / "latest").is_file():
        return "deepspeed"
    if path.is_dir() and (path / ".metadata").is_file():
        return "dcp"
    raise FileNotFoundError(
        f"{path}: not a checkpoint (expected a .ckpt file, a DeepSpeed checkpoint directory with a "
        "'latest' file, or a distributed (FSDP) checkpoint directory with '.metadata')"
    )


def consolidate(path: str | Path, out: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 ``state_dict`` of any checkpoint (single file, DeepSpeed ZeRO 1/2/3 or FSDP2
    directory), on CPU; with ``out``, also written there as a plain single-file checkpoint
    (``{"state_dict": ..., "global_step": ...}``, loadable with ``weights_only=True`` and by ``load_stage``)."""
    from train.checkpoint_io import atomic_torch_save

    ckpt = _consolidated(path)
    if out is not None:
        atomic_torch_save(ckpt, out)
    return ckpt["state_dict"]


def _consolidated(path: str | Path) -> dict:
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == "file":
        ckpt = load_checkpoint(path)
    elif kind == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = (path / "latest").read_text().strip()
        validate_deepspeed_checkpoint(path)  # DeepSpeed's loader unpickles freely: check first
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
        # DeepSpeed names the module's weights as the LightningModule does, under the engine's "module.".
        ckpt = {"state_dict": {k.removeprefix("module."): v for k, v in state.items()}}
        client = _deepspeed_client_file(path)
        if client is not None:
            meta = load_checkpoint(client)
            ckpt.update({k: meta[k] for k in ("global_step", "epoch") if k in meta})
            # zero_to_fp32 rebuilds the trained weights from the optimizer shards; under ZeRO-1 it drops
            # frozen ones (an EMA copy). Stages 1-2 keep every weight whole in the module state.
            for key, value in (meta.get("module") or {}).items():
                if key not in ckpt["state_dict"] and torch.is_tensor(value) and value.numel() > 0:
                    ckpt["state_dict"][key] = value
    else:
        ckpt = {"state_dict": _dcp_state_dict(path)}
        meta_path = path / "meta.pt"
        if meta_path.exists():
            meta = load_checkpoint(meta_path)
            ckpt.update({k: meta[k] for k in ("global_step", "epoch") if k in meta})
    state = {
        k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
        for k, v in ckpt["state_dict"].items()
        if torch.is_tensor(v)
    }
    return {**{k: v for k, v in ckpt.items() if k in ("global_step", "epoch")}, "state_dict": state}


def _deepspeed_client_file(path: Path) -> Path | None:
    """The file of a DeepSpeed checkpoint directory that holds the Lightning state (step, epoch) and the
    module's state (whole under ZeRO-1/2; placeholders for partitioned weights under ZeRO-3): one file,
    named per ZeRO stage."""
    tag = (path / "latest").read_text().strip()
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    return next((path / tag / n for n in names if (path / tag / n).exists()), None)


def _deepspeed_whole_ema(path: Path) -> dict | None:
    """``{"state_dict": the EMA copy's tensors, "global_step": ...}`` of a DeepSpeed checkpoint whose module
    state holds the copy whole (ZeRO-1/2: its frozen weights are not partitioned), memory-mapped: no
    optimizer shard is read and no weight consolidated (what zero_to_fp32 would give for these tensors,
    which it copies from the same file). None where it does not (ZeRO-3, or no EMA)."""
    client = _deepspeed_client_file(path)
    if client is None:
        return None
    meta = load_checkpoint(client, mmap=True)  # (weights_only: DeepSpeed's own loader is not used here)
    module = meta.get("module") or {}
    shadow = {k: v for k, v in module.items() if k.startswith("ema.shadow.") and torch.is_tensor(v)}
    if not shadow or any(v.numel() == 0 for v in shadow.values()):
        return None
    return {
        "state_dict": {k: v.float() if v.is_floating_point() else v for k, v in shadow.items()},
        "global_step": meta.get("global_step", 0),
    }


@dataclass
class StageWeights:
    """A stage's saved weights with what rebuilds its net: the run's (or export's) config and tokenizer."""

    cfg: DictConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    tokenizer_path: Path | None
    checkpoint: Path
    global_step: int
    ema: bool


def stage_weights(
    path: str | Path, map_location: str | torch.device = "cpu", use_ema: bool = True, mmap: bool = False
) -> StageWeights:
    """The net's weights of a run directory, a checkpoint in one (file, DeepSpeed or FSDP directory) or an
    export, without building the net: the EMA copy's where the stage has one and ``use_ema``. ``mmap``: a
    checkpoint file is mapped, not read whole (its optimizer state is never read)."""
    export = export_dir_of(path)
    if export is not None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        cfg = upgrade_config(OmegaConf.load(export / "config.yaml"))  # an export from before key renames
        tok_path = export / "tokenizer.json"
        try:
            weights = load_file(export / EXPORT_WEIGHTS, device=str(map_location))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{export / EXPORT_WEIGHTS}: damaged or truncated ({e})") from e
        info = read_json(export / "export.json") if (export / "export.json").exists() else {}
        return StageWeights(
            cfg=cfg,
            weights=weights,
            tokenizer=Tokenizer.load(tok_path) if tok_path.exists() else None,
            tokenizer_path=tok_path if tok_path.exists() else None,
            checkpoint=export / EXPORT_WEIGHTS,
            global_step=int(info.get("global_step", 0)),
            ema=bool(info.get("ema", False)),
        )
    run, ckpt_path = resolve_run(path)
    cfg_path = run / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{cfg_path}: the run's resolved config is missing (written by train.run at start)"
        )
    cfg = upgrade_config(OmegaConf.load(cfg_path))  # a run from before key renames (module.lr, ...)
    tok_path = run / "tokenizer.json"
    kind = checkpoint_format(ckpt_path)
    if kind == "file":
        ckpt = load_checkpoint(ckpt_path, map_location, mmap=mmap)
    else:  # a sharded one: the EMA copy read whole where DeepSpeed saved it so, else consolidated
        whole = _deepspeed_whole_ema(ckpt_path) if kind == "deepspeed" and use_ema else None
        ckpt = whole if whole is not None else _consolidated(ckpt_path)
    state = ckpt.get("state_dict", ckpt)
    # Stages with an EMA (prior, decoder, upsamplers) are evaluated and exported with its weights.
    prefix = "ema.shadow." if use_ema and any(k.startswith("ema.shadow.") for k in state) else "net."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise KeyError(f"{ckpt_path}: no '{prefix}*' tensors in the checkpoint's state_dict")
    return StageWeights(
        cfg=cfg,
        weights=weights,
        tokenizer=Tokenizer.load(tok_path) if tok_path.exists() else None,
        tokenizer_path=tok_path if tok_path.exists() else None,
        checkpoint=ckpt_path,
        global_step=int(ckpt.get("global_step", 0)),
        ema=prefix == "ema.shadow.",
    )


def _dcp_state_dict(path: Path) -> dict:
    """The module's weights of an FSDP distributed checkpoint, in this process alone (no collective,
    whatever process group is up), without its optimizer state (twice the weights again, under Adam):
    the loader :func:`~torch.distributed.checkpoint.format_utils.dcp_to_torch_save` uses, asked for the
    ``state_dict`` entry only. Where torch moved that private loader: the whole checkpoint, written out
    and read back."""
    import tempfile
    import warnings

    try:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        planner = _EmptyStateDictLoadPlanner(keys={"state_dict"})
    except (ImportError, TypeError):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(path, Path(tmp) / "full.pt")
            return torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)["state_dict"]
    state: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _load_state_dict(
            state_dict=state, storage_reader=FileSystemReader(path), planner=planner, no_dist=True
        )
    return state["state_dict"]


def load_stage(
    path: str | Path, map_location: str | torch.device = "cpu", use_ema: bool = True
) -> LoadedStage:
    """The net of a run directory, a checkpoint in one or an export, built from its config and tokenizer
    with its weights loaded (:func:`stage_weights`), in eval mode."""
    saved = stage_weights(path, map_location, use_ema=use_ema)
    # (an export's config has the tokenizer's fields written in: export_stage wired them)
    net_cfg = saved.cfg.net if export_dir_of(path) else wire_net_config(saved.cfg.net, saved.tokenizer)
    # the net on map_location before its weights are loaded: load_state_dict copies into it in place
    net = instantiate(net_cfg).to(map_location)
    _load_weights(net, saved.weights, saved.checkpoint, saved.tokenizer_path)
    return LoadedStage(
        cfg=saved.cfg,
        net=net.eval(),
        tokenizer=saved.tokenizer,
        checkpoint=saved.checkpoint,
        global_step=saved.global_step,
        ema=saved.ema,
    )


def export_open_clip(path: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """A CLIP run as an open_clip hub directory (train/models/openclip_import.py save_open_clip), with
    the run's image normalisation as its preprocess config."""
    from train.models.clip import CLIP
    from train.models.openclip_import import save_open_clip

    stage = load_stage(path, use_ema=use_ema)
    if not isinstance(stage.net, CLIP):
        raise ValueError(f"{path}: a {type(stage.net).__name__} run; to-open-clip exports CLIP runs")
    if stage.tokenizer is not None and stage.tokenizer.vocab_size != 49408:
        log.warning(
            "%s: the run's tokenizer (%d ids) is not CLIP's BPE: open_clip loads the weights, but its own "
            "tokenizer will not give this net's ids (tokenize with the run's tokenizer.json), and it pools the "
            "text at the largest id, not this tokenizer's end-of-text id %d (our load_open_clip(OUT, eot_id=%d) "
            "pools as the run did)",
            path,
            stage.tokenizer.vocab_size,
            stage.tokenizer.eot_id,
            stage.tokenizer.eot_id,
        )
    preprocess = {"size": stage.net.vision_cfg["image_size"], "mode": "RGB", "interpolation": "bicubic"}
    # always written: open_clip fills what the config leaves out with OpenAI's mean and std, which would
    # preprocess a CLIP trained on [-1, 1] or [0, 1] images wrongly, without a word. The run's Normalize
    # works on 0-255 pixels, open_clip's on [0, 1]
    normalize = Normalize(stage.cfg.data.get("normalize", "clip"))
    preprocess.update(mean=(normalize.mean / 255).tolist(), std=(normalize.std / 255).tolist())
    return save_open_clip(stage.net, out, preprocess)


NORMALIZE_KINDS = {  # data.normalize -> open_clip's preprocess mean and std (of [0, 1] pixels)
    "clip": (CLIP_MEAN, CLIP_STD),
    "minus_one_one": ((0.5,) * 3, (0.5,) * 3),
    "unit": ((0.0,) * 3, (1.0,) * 3),
}


def import_open_clip(
    source: str | Path,
    out: str | Path,
    *,
    config: str | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """An open_clip checkpoint (a file, a hub directory or OpenAI's archive; architecture as
    :func:`train.models.openclip_import.resolve_config` reads it, ``config`` naming it where the source does
    not) as an inference export of ours: ``model.safetensors``, ``config.yaml`` (the net, the image size
    and normalisation), ``tokenizer.json`` and ``export.json`` (the source). ``tokenizer``: CLIP's BPE
    merges file (default: open_clip's, when installed) or a ``tokenizer.json`` of ours. The prior and the
    decoder then train on that CLIP with ``clip_ckpt=OUT``, as DALL-E 2 trained on OpenAI's."""
    from safetensors.torch import save_file

    from data.tokenizer import clip_tokenizer
    from train.models.clip import CLIP
    from train.models.openclip_import import HUB_CONFIG, load_open_clip, read_state_dict, resolve_config

    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out}: not empty; from-open-clip writes a new directory (delete it to replace it)"
        )
    state = read_state_dict(source)
    arch = resolve_config(source, state, config)
    context = int(arch["text"]["context_length"])
    if tokenizer is not None and str(tokenizer).endswith(".json"):
        tok = Tokenizer.load(tokenizer)
        if tok.context_length != context:
            raise ValueError(
                f"--tokenizer {tokenizer}: {tok.context_length} tokens of context, the checkpoint's text tower "
                f"takes {context}"
            )
    else:
        try:
            tok = clip_tokenizer(tokenizer, context_length=context)
        except FileNotFoundError as e:
            if tokenizer is not None:
                raise
            raise FileNotFoundError(
                "CLIP's BPE vocabulary was not found (open_clip is not installed here): pass --tokenizer "
                "bpe_simple_vocab_16e6.txt.gz (it ships in the open_clip_torch wheel) or a tokenizer.json"
            ) from e
    vocab = int(arch["text"]["vocab_size"])
    if tok.vocab_size > vocab:
        raise ValueError(
            f"--tokenizer {tokenizer or 'CLIP BPE'}: {tok.vocab_size} ids, the checkpoint embeds {vocab}"
        )
    net = load_open_clip(source, config, eot_id=tok.eot_id, state=state)
    # the preprocessing: a hub directory's, or that of the config file or hub directory named (a named
    # config has none: open_clip's defaults, as for a checkpoint whose pretrained tag asks for others)
    hub = source if source.is_dir() else Path(config) if config is not None else None
    hub = hub / HUB_CONFIG if hub is not None and hub.is_dir() else hub
    preprocess = read_json(hub).get("preprocess_cfg", {}) if hub is not None and hub.is_file() else {}
    resize = {"resize_mode": ("shortest",), "interpolation": ("bicubic",)}  # ours: the shorter side, bicubic
    for key, ours in resize.items():
        if preprocess.get(key) not in (None, *ours):
            raise ValueError(
                f"{source}: its preprocess {key} is {preprocess[key]!r}; the data pipeline resizes the shorter "
                "side with bicubic interpolation, then centre-crops (open_clip's default): the embeddings "
                "would differ from open_clip's"
            )
    mean = tuple(preprocess.get("mean", CLIP_MEAN))  # what open_clip takes when the config is silent
    std = tuple(preprocess.get("std", CLIP_STD))
    kind = next((k for k, (m, d) in NORMALIZE_KINDS.items() if _close(mean, m) and _close(std, d)), None)
    if kind is None:
        raise ValueError(
            f"{source}: its preprocess mean {list(mean)} and std {list(std)} are none of data.normalize's "
            f"({', '.join(f'{k}: {m}, {d}' for k, (m, d) in NORMALIZE_KINDS.items())})"
        )
    size = int(arch["vision"]["image_size"])
    wanted = preprocess.get("size", size)  # an int, or [height, width]
    if (wanted[0] if isinstance(wanted, (list, tuple)) else wanted) != size:
        raise ValueError(f"{source}: its preprocess size {wanted} is not its ViT's input, {size}")
    cfg = OmegaConf.create(
        {
            "stage_name": "clip",
            "net": {"_target_": f"{CLIP.__module__}.{CLIP.__qualname__}", **arch, "eot_id": tok.eot_id},
            "data": {
                "image_size": size,
                "normalize": kind,
                "tokenizer": {"context_length": context},
            },
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(out / EXPORT_WEIGHTS))
    OmegaConf.save(cfg, out / "config.yaml")
    tok.save(out / "tokenizer.json")
    info = {"open_clip": str(source), "config": config, "global_step": 0, "ema": False}
    (out / "export.json").write_text(json.dumps(info, indent=2))
    return out


def _close(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-4 for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "consolidate", help="any checkpoint (file, DeepSpeed or FSDP directory) -> one plain file"
    )
    c.add_argument("checkpoint")
    c.add_argument("out")
    e = sub.add_parser("export", help="a run directory or checkpoint -> <run>/export (safetensors)")
    e.add_argument("run")
    e.add_argument("--out", default=None)
    e.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    o = sub.add_parser("to-open-clip", help="a CLIP run -> an open_clip hub directory (local-dir:OUT)")
    o.add_argument("run")
    o.add_argument("out")
    f = sub.add_parser(
        "from-open-clip", help="an open_clip checkpoint (file, hub directory) -> an export (clip_ckpt=OUT)"
    )
    f.add_argument("source")
    f.add_argument("out")
    f.add_argument("--config", default=None,
                   help="the open_clip architecture of a checkpoint that does not carry it (ViT-L-14-quickgelu, ...)")  # fmt: skip
    f.add_argument("--tokenizer", default=None,
                   help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: open_clip's, when installed) or a tokenizer.json")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.command == "consolidate":
            state = consolidate(args.checkpoint, args.out)
            n = sum(v.numel() for v in state.values())
            print(f"{args.out}: {len(state)} tensors, {n / 1e6:.2f}M values")
        elif args.command == "to-open-clip":
            print(export_open_clip(args.run, args.out))
        elif args.command == "from-open-clip":
            print(import_open_clip(args.source, args.out, config=args.config, tokenizer=args.tokenizer))
        else:
            print(export_stage(args.run, args.out, use_ema=not args.no_ema))
    except (FileNotFoundError, KeyError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
