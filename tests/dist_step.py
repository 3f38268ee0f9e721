"""Train a tiny CLIP for a few SGD steps over a fixed sequence of global batches under one strategy, with a
checkpoint round trip in the middle: train 2 steps, save (sharded under ZeRO/FSDP), rebuild everything
from a different initialisation, resume from the checkpoint, train the last step, save, consolidate to
one state dict and write the weights. tests/test_strategies.py runs it with 1 process (the reference)
and with 2 processes under torchrun (DDP, DeepSpeed ZeRO 1/2/3, FSDP2), 4 for HSDP, and compares.

    torchrun --nproc_per_node=2 tests/dist_step.py --strategy zero3 --out DIR

Rank r of W gets rows [r*B, (r+1)*B) of each global batch (B = global / W): the order the contrastive
loss's all-gather assumes. ``--split wrong`` gives every rank the same rows (the negative control).
SGD keeps the comparison sensitive to the gradient's scale (Adam's first steps are not); its momentum
buffer makes the resumed step depend on the optimizer state restored from the checkpoint. Each batch is
picked by the global step, so the data order cannot differ between a resumed and an uninterrupted run.
Each rank also writes what it holds of the weights (``shards_rank<r>.json``): under ZeRO-3 and FSDP a
rank keeps only its partition outside forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.callbacks.numerics import NumericalGuard  # noqa: E402
from train.checkpoint import consolidate  # noqa: E402
from train.ema import EMA, EMAUpdateAfterStep  # noqa: E402
from train.models.clip import CLIP  # noqa: E402
from train.modules.clip import ClipModule  # noqa: E402

GLOBAL_BATCH, STEPS, VOCAB, CONTEXT = 8, 3, 64, 8


class Batches(Dataset):
    def __init__(self, rank: int, world: int, split: str) -> None:
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randn(STEPS, GLOBAL_BATCH, 3, 16, 16, generator=g)
        self.tokens = torch.randint(1, VOCAB - 1, (STEPS, GLOBAL_BATCH, CONTEXT), generator=g)
        self.tokens[..., -1] = VOCAB - 1  # end of text
        b = GLOBAL_BATCH // world
        self.rows = slice(rank * b, (rank + 1) * b) if split == "right" else slice(0, b)

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i, self.rows], "tokens": self.tokens[i, self.rows]}


class SGDClip(EMAUpdateAfterStep, ClipModule):
    """The CLIP stage's module with SGD, an EMA (sharded like the net under ZeRO-3 / FSDP) and its own
    validation, which reads weights outside forward (the logit scale): gathered under sharding."""

    data: Batches  # set after construction: not a hyper-parameter (checkpoints hold plain values only)

    def __init__(self, net, accum_freq: int = 1) -> None:
        super().__init__(net, zeroshot=False, accum_freq=accum_freq)
        self.ema = EMA(net, decay=0.5, warmup=False)

    nan_at: tuple[int, int] | None = None  # (rank, step): that rank's loss is NaN at that step

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(self.data[self.global_step], batch_idx)
        if self.nan_at == (self.global_rank, self.global_step):
            loss = loss * float("nan")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch = self.data[0]
        super().validation_step(
            {**batch, "caption": [str(i) for i in range(len(batch["tokens"]))]}, batch_idx
        )

    fused: bool = False  # --fused: a fused AdamW (--deferred: the guard skips its NaN steps on the device)

    def configure_optimizers(self):
        if self.fused:
            return torch.optim.AdamW(self.net.parameters(), lr=0.01, fused=True)
        return torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)


def held_numel(net: torch.nn.Module) -> dict[str, int]:
    """Elements of each weight this rank holds outside forward (its ZeRO-3 partition / FSDP shard)."""
    out = {}
    for name, p in net.named_parameters():
        if hasattr(p, "ds_tensor"):
            out[name] = [p.data.numel(), p.ds_tensor.numel(), p.ds_numel]
        elif hasattr(p, "to_local"):
            out[name] = [p.to_local().numel(), p.to_local().numel(), p.numel()]
        else:
            out[name] = [p.numel(), p.numel(), p.numel()]
    return out


def build(seed: int, data: Batches, accum_freq: int = 1) -> SGDClip:
    torch.manual_seed(seed)
    net = CLIP(
        embed_dim=16,
        vision={"image_size": 16, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
        text={"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "layers": 2, "heads": 2},
    )
    module = SGDClip(net, accum_freq)
    module.data = data
    return module


class ReplicaAllReduces(pl.Callback):
    """How many all-reduces over a process group other than the world's each training batch (a micro-batch
    under accumulation) issued: under HSDP, FSDP2's gradient all-reduce across the replicas (its
    reduce-scatters are other collectives)."""

    counts: list[int] = []  # one per training batch, both fits of the run

    def __init__(self) -> None:
        import torch.distributed as dist

        self._calls, original = [0], dist.all_reduce

        def counting(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            if group is not None and group is not dist.group.WORLD:
                self._calls[0] += 1
            return original(tensor, *args, **kwargs)

        dist.all_reduce = counting

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._calls[0] = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counts.append(self._calls[0])


def trainer(name: str, world: int, steps: int, defer: bool = False, accumulate: int = 1) -> pl.Trainer:
    return pl.Trainer(
        callbacks=[NumericalGuard(max_consecutive=2, defer=defer), ReplicaAllReduces()],
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=world,
        strategy=strategy(name),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        val_check_interval=1,  # after every training batch: the last step validates, wherever its epoch is
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )


def strategy(name: str):
    from pytorch_lightning.strategies import DDPStrategy

    from train.strategies import CPUDeepSpeedStrategy, FSDPStrategy

    if name == "single":
        return "auto"
    if name == "ddp":
        return DDPStrategy()
    if name.startswith("zero"):
        return CPUDeepSpeedStrategy(stage=int(name[-1]), logging_level=40, logging_batch_size_per_gpu=1)
    if name == "fsdp":
        return FSDPStrategy()
    if name == "hsdp":  # 4 processes: 2 replicas, each weight sharded over 2 ranks
        return FSDPStrategy(shard_size=2)
    raise SystemExit(f"unknown --strategy {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="right", choices=["right", "wrong"])
    parser.add_argument("--nan-at", default=None, help="RANK,STEP: that rank's loss is NaN at that step")
    parser.add_argument("--fused", action="store_true", help="a fused AdamW in place of SGD")
    parser.add_argument("--deferred", action="store_true", help="with --fused: the guard's verdict deferred")
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="the first fit's micro-batches per step (each the step's whole batch)",
    )
    parser.add_argument("--accum-freq", type=int, default=1, help="module.accum_freq of the resumed fit")
    args = parser.parse_args()
    out = Path(args.out)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    data = Batches(rank, world, args.split)
    # the batch is picked by the global step: each micro-batch of a step is the step's batch, and the
    # gradient (the micro-batches' mean) the same as without accumulation
    loader = DataLoader(range(STEPS * args.accumulate), batch_size=None, shuffle=False)

    SGDClip.nan_at = tuple(int(v) for v in args.nan_at.split(",")) if args.nan_at else None
    SGDClip.fused = args.fused
    first = trainer(args.strategy, world, STEPS - 1, defer=args.deferred, accumulate=args.accumulate)
    val_loader = DataLoader(range(1), batch_size=None)
    first.fit(build(0, data), train_dataloaders=loader, val_dataloaders=val_loader)
    first.save_checkpoint(out / "mid.ckpt")
    first.strategy.barrier()

    second = trainer(args.strategy, world, STEPS, defer=args.deferred)
    module = build(
        1, data, args.accum_freq
    )  # another initialisation: everything must come from the checkpoint
    second.fit(module, train_dataloaders=loader, val_dataloaders=val_loader, ckpt_path=out / "mid.ckpt")
    val_loss = float(second.callback_metrics["val/loss"])
    (out / f"shards_rank{rank}.json").write_text(json.dumps(held_numel(module.net)))
    second.save_checkpoint(out / "final.ckpt")
    second.strategy.barrier()
    if rank == 0:
        state = consolidate(out / "final.ckpt", out / "consolidated.pt")
        torch.save(state, out / "weights.pt")
        info = {
            "world": world,
            "strategy": args.strategy,
            "global_step": second.global_step,
            "val_loss": val_loss,
            # NaN steps skipped, counted across the checkpoint round trip
            "skipped": next(c for c in second.callbacks if isinstance(c, NumericalGuard)).skipped,
            "replica_all_reduces": ReplicaAllReduces.counts,
        }
        (out / "info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    from train.run import end_process

    main()
    end_process()  # leaves the process group: gloo's threads can abort an exit without it
