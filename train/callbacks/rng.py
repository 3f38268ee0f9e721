"""Random-number state for exact resume: every rank's generators travel in the checkpoint.

Lightning saves no RNG state. Dropout, diffusion noise and timesteps, classifier-free-guidance
dropout, random crops and degradations all draw from the global generators (Python, numpy, torch
CPU, CUDA) of each rank, so a resumed run diverges from the uninterrupted one at its first step.

- Saving: each rank's generator states are gathered into the checkpoint (``rng_states``, one entry
  per rank; Lightning writes rank 0's file only). Called on every rank, as checkpoints are. A rank's
  CUDA state is that of its own device only: the launchers show every task all of a node's GPUs, and a
  run may resume with one visible GPU per task (or the other way round).
- Loading: each rank keeps its own entry and sets it just before its first training step after the
  resume (not at load time: Lightning's setup and a sanity check would consume numbers in between).
  A checkpoint from another number of ranks has no entry to map: a warning, and the generators keep
  their seeded state.
- Every rank draws differently: ``pl.seed_everything`` seeds all ranks alike (so that weights start
  identical), which would give every rank the same diffusion timesteps, noise, guidance dropout and
  crops. When training starts without states to restore, each rank's generators are reseeded from
  (seed, rank, step) (:func:`seed_rank`): distinct per rank, and after a resume on another number of
  ranks distinct from the draws of the run's first steps.
- Validation draws from the same generators (sampling, seeded noise). It runs between training steps
  and is skipped or repeated around a resume, so its draws are isolated: the states are put back
  after every validation, and validation cadence never changes what training sees.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def capture() -> dict[str, Any]:
    """The calling process's generator states, as tensors and numbers only (checkpoints load with
    ``weights_only=True``, which refuses numpy arrays)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's device only
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device()).cpu()
    return state


def apply(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        device = torch.cuda.current_device()
        if isinstance(cuda, list | tuple):  # an older checkpoint: every visible device's state
            if len(cuda) != torch.cuda.device_count():
                log.warning(
                    "the checkpoint holds the CUDA generator states of %d visible GPUs; this process sees "
                    "%d: its CUDA generator is not restored (its random draws after the resume differ)",
                    len(cuda),
                    torch.cuda.device_count(),
                )
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda.cpu(), device)


def seed_rank(seed: int, rank: int, step: int = 0) -> int:
    """Seed Python, numpy and torch (CPU and every CUDA device) of this process from (seed, rank, step),
    mixed by numpy's SeedSequence (nearby inputs give unrelated streams). Returns the 32-bit seed."""
    value = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


class RNGState(pl.Callback):
    def __init__(self, isolate_validation: bool = True, seed: int | None = None) -> None:
        self.isolate_validation = isolate_validation
        self.seed = seed
        self._to_apply: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    # ---- checkpoint --------------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        local = self._outside_validation or capture()  # a save from inside validation: training's state
        states = [local]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            states = [None] * trainer.world_size
            dist.all_gather_object(states, local)
        checkpoint["rng_states"] = states

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            log.warning("the checkpoint holds no RNG states: random draws after the resume differ")
            return
        if len(states) != trainer.world_size:
            log.warning(
                "the checkpoint holds RNG states of %d ranks; this run has %d: not restored (random "
                "draws after the resume differ from an uninterrupted run)",
                len(states),
                trainer.world_size,
            )
            return
        self._to_apply = states[trainer.global_rank]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._to_apply is None and self.seed is not None:  # no saved states for this rank: its own stream
            value = seed_rank(self.seed, trainer.global_rank, trainer.global_step)
            log.info("rank %d: training draws seeded with %d", trainer.global_rank, value)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        if self._to_apply is not None:
            apply(self._to_apply)
            self._to_apply = None

    # ---- validation draws do not touch training's stream -------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.isolate_validation:
            self._outside_validation = capture()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.isolate_validation and self._outside_validation is not None:
            apply(self._outside_validation)
            self._outside_validation = None
