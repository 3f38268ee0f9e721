"""A callback for multi-process tests: each rank writes, at its first training batch, a digest of its
random generators' states and of its weights (``+callbacks.rank_probe._target_=tests.rank_probe.RankProbe``)."""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


class RankProbe(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done:
            return
        self.done = True
        weights = torch.cat([p.detach().float().flatten().cpu() for p in pl_module.net.parameters()])
        record = {
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "torch": _digest(torch.get_rng_state().numpy().tobytes()),
            "numpy": _digest(np.random.get_state()[1].tobytes()),
            "python": _digest(repr(random.getstate()).encode()),
            "weights": _digest(weights.numpy().tobytes()),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}_step{trainer.global_step}.json").write_text(
            json.dumps(record)
        )


def gathered_fraction(module: torch.nn.Module) -> float:
    """Fraction of ``module``'s parameters held whole on this rank right now (not a ZeRO-3 partition,
    not an FSDP2 DTensor shard)."""
    params = list(module.parameters())
    whole = [
        p
        for p in params
        if not hasattr(p, "to_local") and not (hasattr(p, "ds_tensor") and p.data.numel() == 0)
    ]
    return len(whole) / max(len(params), 1)


class GatherProbe(pl.Callback):
    """Records, at the first validation batch, how much of the net and of its EMA copy is gathered."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx:
            return
        record = {"net": gathered_fraction(pl_module.net)}
        if hasattr(pl_module, "ema"):
            record["ema"] = gathered_fraction(pl_module.ema.shadow)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"gather_rank{trainer.global_rank}.json").write_text(json.dumps(record))


class CollectiveProbe(pl.Callback):
    """Counts ``torch.distributed.all_reduce`` calls per training step (from one step's end to the next:
    the data vote, the numerics and preemption flags, metric syncs), and broadcasts (Lightning's Timer made
    one a step, and its SIGTERM flag another), and writes them at the end."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.counts: list[int] = []
        self.broadcasts: list[int] = []
        self._n = {"all_reduce": 0, "broadcast": 0}

    def setup(self, trainer, pl_module, stage) -> None:
        import torch.distributed as dist

        def counting(name: str, kind: str):
            real = getattr(dist, name)

            def counted(*args, **kwargs):
                self._n[kind] += 1
                return real(*args, **kwargs)

            setattr(dist, name, counted)

        counting("all_reduce", "all_reduce")
        counting("broadcast", "broadcast")  # Lightning's SIGTERM flag
        counting("broadcast_object_list", "broadcast")  # Lightning's Timer (its own broadcasts are not seen)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counts.append(self._n["all_reduce"])
        self.broadcasts.append(self._n["broadcast"])
        self._n = {"all_reduce": 0, "broadcast": 0}

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"collectives_rank{trainer.global_rank}.json").write_text(json.dumps(self.counts))
        (self.out / f"broadcasts_rank{trainer.global_rank}.json").write_text(json.dumps(self.broadcasts))


class EMAProbe(pl.Callback):
    """Writes ``out`` (JSON) at the end of training: the dtypes of the EMA shadow and of its fp32 average,
    and the update count. (A file, not a class attribute: Hydra imports this module as ``tests.rank_probe``,
    and a test module imported by pytest under another name would be a second copy with its own class.)"""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:
        ema = pl_module.ema
        record = {
            "shadow": str(next(ema.shadow.parameters()).dtype),
            "master": None if ema._master is None else str(ema._master[0].dtype),
            "updates": int(ema.num_updates),
        }
        self.out.write_text(json.dumps(record))


class SyncWatch(pl.Callback):
    """Records where the host waits for the GPU (``torch.cuda.set_sync_debug_mode("warn")``) from the start
    of training step ``first`` to the start of step ``last``: every hook, the optimizer step and the next
    batches' fetch and transfer between them. Writes ``{"places": ["file:line", ...]}`` to ``out`` at the
    end of training (``+callbacks.sync_watch._target_=tests.rank_probe.SyncWatch``)."""

    def __init__(self, out: str, first: int = 2, last: int = 5) -> None:
        self.out, self.first, self.last = Path(out), first, last
        self._catch = None
        self.places: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first and self._catch is None:
            torch.cuda.synchronize()
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif trainer.global_step == self.last:
            self._stop()

    def _stop(self) -> None:
        if self._catch is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        self._catch = None
        messages = [w for w in self._caught if "synchroniz" in str(w.message)]
        self.places = sorted({f"{w.filename}:{w.lineno}" for w in messages})

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop()
        self.out.write_text(json.dumps({"places": self.places}))
