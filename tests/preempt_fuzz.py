"""Preemption fuzzing: N trials, each a short DDP fit in which SIGUSR1 or SIGTERM reaches one rank or
every rank at a random point of a random step (from inside a hook of the step, or from a timer thread
while the rank may be inside a collective). Run by tests/test_preemption.py under torchrun:

    SLURM_JOB_ID=4242 torchrun --nproc_per_node=2 tests/preempt_fuzz.py --trials 20 --out DIR [--deferred]

With a recording ``scontrol`` first on PATH. Rank 0 writes DIR/results.json: per trial the plan, the step
each rank stopped at, the files of the checkpoint directory, the checkpoint's step and whether its
weights equal every rank's live weights. ``--deferred``: the numerics guard carries the preemption flag
in its all-reduce, read a step later (its way on CUDA, with a fused AdamW here on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.callbacks.numerics import NumericalGuard  # noqa: E402
from train.callbacks.preemption import Preemption  # noqa: E402

MAX_STEPS = 1_000_000  # never reached: every trial's signal stops it
HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step")


class Rows(IterableDataset):
    """Endless (a trial ends by its signal); no sampler, so nothing is sized by the dataset."""

    def __iter__(self):
        i = 0
        while True:
            yield torch.full((8,), float(i % 17))
            i += 1


class Tiny(pl.LightningModule):
    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.fused = fused
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        if self.fused:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class Signaller(pl.Callback):
    """Delivers the trial's signal to this rank: in ``hook`` of step ``step``, or from a thread after
    ``delay`` seconds of training."""

    def __init__(self, plan: dict, rank: int) -> None:
        self.plan, self.rank = plan, rank
        self.targeted = plan["target"] in ("all", f"rank{rank}")
        self.sent_at: int | None = None
        self.lock, self.training = threading.Lock(), False

    def _send(self, trainer: pl.Trainer) -> None:
        with self.lock:  # never after training: the default SIGUSR1 action would kill the process
            if self.training and self.sent_at is None:
                self.sent_at = trainer.global_step
                os.kill(os.getpid(), getattr(signal, self.plan["signal"]))

    def on_train_end(self, trainer, pl_module) -> None:  # runs before Preemption restores the handlers
        with self.lock:
            self.training = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.training = True
        if self.targeted and self.plan["hook"] == "thread":

            def later() -> None:
                time.sleep(self.plan["delay"])
                self._send(trainer)

            threading.Thread(target=later, daemon=True).start()

    def _maybe(self, hook: str, trainer: pl.Trainer) -> None:
        if self.targeted and self.plan["hook"] == hook and trainer.global_step == self.plan["step"]:
            self._send(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe("on_train_batch_start", trainer)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._maybe("on_before_backward", trainer)

    def on_after_backward(self, trainer, pl_module) -> None:
        self._maybe("on_after_backward", trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._maybe("on_before_optimizer_step", trainer)


def plans(trials: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "signal": rng.choice(["SIGUSR1", "SIGUSR2", "SIGTERM"]),
            "target": rng.choice(["rank0", "rank1", "all"]),
            "hook": rng.choice([*HOOKS, "thread"]),
            "step": rng.randrange(1, 6),
            "delay": round(rng.uniform(0.05, 0.6), 3),
        }
        for _ in range(trials)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--deferred", action="store_true", help="the flag travels in the deferred guard's check"
    )
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(args.out)
    results = []
    for i, plan in enumerate(plans(args.trials, args.seed)):
        pl.seed_everything(i, verbose=False)
        directory = out / f"trial{i:02d}"
        preemption = Preemption(dirpath=str(directory), requeue="auto")
        signaller = Signaller(plan, rank)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=pl.strategies.DDPStrategy(process_group_backend="gloo"),
            max_steps=MAX_STEPS,
            callbacks=[signaller, preemption, *([NumericalGuard(defer=True)] if args.deferred else [])],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module = Tiny(fused=args.deferred)
        trainer.fit(module, DataLoader(Rows(), batch_size=4))
        live = {k: v.clone() for k, v in module.state_dict().items()}
        ckpt = directory / "preempt.ckpt"
        saved = torch.load(ckpt, map_location="cpu", weights_only=True) if ckpt.exists() else None
        local = {
            "stopped_at": trainer.global_step,
            "sent_at": signaller.sent_at,
            "weights_match_checkpoint": bool(
                saved is not None and all(torch.equal(saved["state_dict"][k], v) for k, v in live.items())
            ),
        }
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        if rank == 0:
            results.append(
                {
                    "plan": plan,
                    "ranks": gathered,
                    "files": sorted(p.name for p in directory.iterdir()) if directory.exists() else [],
                    "checkpoint_step": saved["global_step"] if saved else None,
                }
            )
        dist.barrier()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    from train.run import end_process

    main()
    end_process()  # leaves the process group: gloo's threads can abort an exit without it
