"""Two DDP processes whose clocks disagree about the time limit: rank 1's runs twice as fast, so it finds
the time up two steps before rank 0 does. Run by tests/test_time_limit.py under torchrun:

    torchrun --nproc_per_node=2 tests/time_limit_ranks.py --out DIR

For the guard's two ways of agreeing (read at once; deferred, a fused AdamW), each rank writes the step it
stopped at to DIR/<way>_rank<r>.json. A rank that stopped alone would leave the other in a collective.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_numerics import Poisoned  # noqa: E402
from tests.test_time_limit import Clock  # noqa: E402
from train.callbacks.numerics import NumericalGuard  # noqa: E402
from train.callbacks.time_limit import TimeLimit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for way, guard in (("host", {}), ("deferred", {"defer": True})):
        clock = Clock(step=10.0 * (rank + 1))  # up after 35 s: rank 1 at step 1, rank 0 at step 3
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=pl.strategies.DDPStrategy(process_group_backend="gloo"),
            max_steps=10,
            callbacks=[clock, TimeLimit("00:00:00:35", clock=clock), NumericalGuard(**guard)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        data = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(10)]
        trainer.fit(Poisoned(bad=set(), fused=way == "deferred"), DataLoader(data, batch_size=None))
        (Path(args.out) / f"{way}_rank{rank}.json").write_text(json.dumps(trainer.global_step))


if __name__ == "__main__":
    from train.run import end_process

    main()
    end_process()  # leaves the process group: gloo's threads can abort an exit without it
