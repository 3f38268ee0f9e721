"""Train one stage of the cascade.

    python -m train.run stage=clip [net=clip_vit_b16] [data=shards data.train_shards=...] [key=value ...]
    python -m train.run --cfg job          # print the composed config and exit

Seed -> data -> tokenizer -> net -> module -> callbacks, loggers -> trainer -> fit. Writes into the run
directory (``hydra.run.dir``): the resolved config, the tokenizer, checkpoints/, logs and metrics.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def resolve_precision(precision: str | int) -> str | int:
    """Precision "auto" means bf16 mixed precision on a GPU that supports it, else full float32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def resolve_checkpoint(resume: str | None, output_dir: Path) -> str | None:
    """resume=auto: the run directory's last.ckpt if it exists; a path: that file (must exist)."""
    if resume in (None, "null", False):
        return None
    if resume == "auto":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    if not Path(resume).exists():
        raise FileNotFoundError(f"resume={resume!r}: no such checkpoint")
    return str(resume)


def build_net(cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """Instantiate the architecture, wiring tokenizer-dependent fields (eot id, vocabulary size)."""
    net_cfg = cfg.net.copy()
    if tokenizer is not None and "eot_id" in net_cfg:
        with open_dict(net_cfg):
            net_cfg.eot_id = tokenizer.eot_id
        vocab = OmegaConf.select(net_cfg, "text.vocab_size")
        if vocab is not None and vocab < tokenizer.vocab_size:
            raise ValueError(
                f"net.text.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size}); "
                f"set net.text.vocab_size>={tokenizer.vocab_size}"
            )
    net = instantiate(net_cfg)
    if cfg.get("init_from_open_clip"):
        load_open_clip_weights(net, cfg.init_from_open_clip)
    return net


def load_open_clip_weights(net: torch.nn.Module, path: str) -> None:
    """init_from_open_clip=PATH: start from an open_clip checkpoint whose shapes match ``net``."""
    from train.models.clip import from_open_clip_state_dict
    from train.models.openclip_import import read_state_dict

    state = from_open_clip_state_dict(read_state_dict(path))
    ours = net.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs net {tuple(ours[k].shape)}"
        for k, v in state.items()
        if k in ours and ours[k].shape != v.shape
    ]
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if wrong or missing or unexpected:
        raise ValueError(
            f"init_from_open_clip={path} does not fit the configured net (pick the matching net=...): "
            f"shape mismatches {wrong[:4]}, missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    net.load_state_dict(state)
    log.info("initialised %s from the open_clip checkpoint %s", type(net).__name__, path)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]


def build_trainer(cfg: DictConfig, callbacks, loggers) -> pl.Trainer:
    strategy_cfg = cfg.strategy
    strategy = instantiate(strategy_cfg) if "_target_" in strategy_cfg else strategy_cfg.get("name", "auto")
    return instantiate(
        cfg.trainer,
        strategy=strategy,
        precision=resolve_precision(cfg.trainer.precision),
        callbacks=callbacks,
        logger=loggers or False,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one stage from a composed config; returns the final metrics."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    tokenizer = datamodule.build_tokenizer()
    net = build_net(cfg, tokenizer)
    module = instantiate(cfg.module, net=net, tokenizer=tokenizer, _convert_="all")  # plain hparams in ckpts
    n_params = sum(p.numel() for p in net.parameters())
    log.info("stage %s: %s with %.2fM parameters", cfg.stage_name, type(net).__name__, n_params / 1e6)

    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    if trainer.is_global_zero:
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        if tokenizer is not None:
            tokenizer.save(output_dir / "tokenizer.json")
    ckpt = resolve_checkpoint(cfg.get("resume"), output_dir)
    if ckpt:
        log.info("resuming from %s", ckpt)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)

    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    metrics["trainer/global_step"] = trainer.global_step
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("final metrics: %s", json.dumps({k: round(v, 4) for k, v in sorted(metrics.items())}))
        log.info("run directory: %s", output_dir)
    return metrics


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    metrics = train(cfg)
    return metrics.get("train/loss")  # for Hydra sweepers


if __name__ == "__main__":
    main()
