"""``trainer.compile``: torch.compile the stage's net when fitting starts (train/parallel.py compile_net).

At ``on_fit_start`` the net is already sharded (FSDP2 in ``configure_model``) and wrapped (DDP,
DeepSpeed), so the compiled regions are the blocks that run, and the compile is in place: state-dict
keys, checkpoints and the EMA copy (never compiled: it only samples) are unchanged.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl

from train.parallel import compile_mode, compile_net

log = logging.getLogger(__name__)


class CompileNet(pl.Callback):
    def __init__(self, mode: str | bool, backend: str = "inductor") -> None:
        self.mode = compile_mode(mode)
        self.backend = backend

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        compiled = compile_net(pl_module.net, self.mode, self.backend)
        log.info("torch.compile (%s, %s): %d module(s) of the net", self.mode, self.backend, len(compiled))
