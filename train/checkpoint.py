"""Load a trained stage back from its run directory, for evaluation, embedding export and sampling.

A run directory (written by train/run.py) holds ``config.yaml`` (resolved), ``tokenizer.json`` and
``checkpoints/*.ckpt``. Given the directory or one checkpoint inside ``<run>/checkpoints/``, this
rebuilds the net from the config, loads the weights and the tokenizer. No Lightning module is built,
so no optimizer or data pipeline is touched.

An inference export (:func:`export_stage`, ``<run>/export/``) holds the net's weights (the EMA's where
the stage has one) as ``model.safetensors`` (no pickle: safe to load from anywhere), next to
``config.yaml``, ``tokenizer.json`` and ``export.json`` (source checkpoint, step). :func:`load_stage`
reads it like a run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from data.tokenizer import Tokenizer


@dataclass
class LoadedStage:
    cfg: DictConfig
    net: torch.nn.Module
    tokenizer: Tokenizer | None
    checkpoint: Path
    global_step: int


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint file) from either of them; clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            found = sorted((path / "checkpoints").glob("*.ckpt")) if (path / "checkpoints").is_dir() else []
            if not found:
                raise FileNotFoundError(
                    f"{path}: no checkpoints/last.ckpt or checkpoints/*.ckpt in this run directory"
                )
            ckpt = found[-1]
        return path, ckpt
    if path.is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run, path
    raise FileNotFoundError(f"{path}: expected a run directory or a .ckpt file inside <run>/checkpoints/")


EXPORT_WEIGHTS = "model.safetensors"


def _load_export(path: Path, map_location) -> LoadedStage:
    from safetensors.torch import load_file

    cfg = OmegaConf.load(path / "config.yaml")
    tok_path = path / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path) if tok_path.exists() else None
    net = instantiate(cfg.net)
    weights = load_file(path / EXPORT_WEIGHTS, device=str(map_location))
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"{path / EXPORT_WEIGHTS}: weights do not match its config.yaml's net: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    info = json.loads((path / "export.json").read_text()) if (path / "export.json").exists() else {}
    return LoadedStage(
        cfg=cfg,
        net=net.eval(),
        tokenizer=tokenizer,
        checkpoint=path / EXPORT_WEIGHTS,
        global_step=int(info.get("global_step", 0)),
    )


def export_stage(path: str | Path, out: str | Path | None = None, use_ema: bool = True) -> Path:
    """Write the inference export of a run (default ``<run>/export``); returns its directory."""
    from safetensors.torch import save_file

    stage = load_stage(path, use_ema=use_ema)
    run, _ = resolve_run(path)
    out = Path(out) if out is not None else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    cfg = stage.cfg.copy()
    if "eot_id" in cfg.net and stage.tokenizer is not None:  # what load_stage filled in from the tokenizer
        with open_dict(cfg):
            cfg.net.eot_id = stage.tokenizer.eot_id
    state = {k: v.detach().contiguous().cpu() for k, v in stage.net.state_dict().items()}
    save_file(state, str(out / EXPORT_WEIGHTS))
    OmegaConf.save(cfg, out / "config.yaml")
    if stage.tokenizer is not None:
        stage.tokenizer.save(out / "tokenizer.json")
    info = {"checkpoint": str(stage.checkpoint), "global_step": stage.global_step, "ema": use_ema}
    (out / "export.json").write_text(json.dumps(info, indent=2))
    return out


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint file, unpickled with ``weights_only=True``: tensors, numbers, strings and plain
    containers only. A file that holds any other pickled object (code could run while it loads) is
    refused before that object is built."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: refused to load: it contains pickled objects other than tensors and plain "
            f"containers ({first[:200]}); only load checkpoints you trust with torch.load(weights_only=False)"
        ) from None


def load_stage(
    path: str | Path, map_location: str | torch.device = "cpu", use_ema: bool = True
) -> LoadedStage:
    if Path(path).is_dir() and (Path(path) / EXPORT_WEIGHTS).exists():
        return _load_export(Path(path), map_location)
    run, ckpt_path = resolve_run(path)
    cfg_path = run / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{cfg_path}: the run's resolved config is missing (written by train.run at start)"
        )
    cfg = OmegaConf.load(cfg_path)
    tok_path = run / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path) if tok_path.exists() else None
    net_cfg = cfg.net.copy()
    if tokenizer is not None and "eot_id" in net_cfg:
        with open_dict(net_cfg):
            net_cfg.eot_id = tokenizer.eot_id
    net = instantiate(net_cfg)
    ckpt = load_checkpoint(ckpt_path, map_location)
    state = ckpt.get("state_dict", ckpt)
    # Stages with an EMA (prior, decoder, upsamplers) are evaluated and exported with its weights.
    prefix = "ema.shadow." if use_ema and any(k.startswith("ema.shadow.") for k in state) else "net."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise KeyError(f"{ckpt_path}: no '{prefix}*' tensors in the checkpoint's state_dict")
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"{ckpt_path}: checkpoint does not match config.yaml's net: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    net.eval()
    return LoadedStage(
        cfg=cfg,
        net=net,
        tokenizer=tokenizer,
        checkpoint=ckpt_path,
        global_step=int(ckpt.get("global_step", 0)),
    )
