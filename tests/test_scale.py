"""Defects that only show at scale (issue: scale correctness), each checked for real on CPU processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config, free_port
from train.callbacks import rng
from train.callbacks.rng import seed_rank

REPO = Path(__file__).resolve().parents[1]


def _train_run(
    tmp_path: Path, run_dir: Path, *args: str, timeout: int = 400, torchrun: bool = False
) -> subprocess.CompletedProcess:
    """``python -m train.run debug=fast ARGS``; ``torchrun``: under torchrun's 2 processes (whose ranks start
    together, where Lightning's launcher starts rank 1 once rank 0 has set up: 2-3 s more a launch here)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "UNCLIP_DATA_DIR": str(tmp_path / "datasets"),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd = [sys.executable, *(launcher if torchrun else []), "-m", "train.run", "debug=fast",
           f"hydra.run.dir={run_dir}", *args]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_seed_rank_gives_each_rank_and_step_its_own_stream():
    draws = {}
    for rank in (0, 1):
        for step in (0, 500):
            seed_rank(0, rank, step)
            draws[rank, step] = torch.rand(4)
    assert len({tuple(d.tolist()) for d in draws.values()}) == 4
    seed_rank(0, 1, 500)
    assert torch.equal(torch.rand(4), draws[1, 500]), "deterministic"


class FakeCUDA:
    """torch.cuda's generator functions for ``visible`` devices, the process on ``current``: each device's
    state a distinct tensor; what is set is recorded."""

    def __init__(self, visible: int, current: int) -> None:
        self.states = [torch.full((16,), d, dtype=torch.uint8) for d in range(visible)]
        self.current, self.set = current, {}

    def install(self, monkeypatch) -> None:
        def set_all(states):
            self.set.update(enumerate(states))

        for name, fn in {
            "is_available": lambda: True,
            "is_initialized": lambda: True,
            "device_count": lambda: len(self.states),
            "current_device": lambda: self.current,
            "get_rng_state": lambda device="cuda": self.states[device].clone(),
            "get_rng_state_all": lambda: [s.clone() for s in self.states],
            "set_rng_state": lambda state, device="cuda": self.set.__setitem__(device, state.clone()),
            "set_rng_state_all": set_all,
        }.items():
            monkeypatch.setattr(torch.cuda, name, fn)


def test_a_ranks_cuda_generator_state_is_its_own_devices_and_restores_with_other_visible_gpus(
    monkeypatch, caplog
):
    """The launchers show every task all of a node's GPUs. A checkpoint held every visible GPU's CUDA state
    per rank, and restoring it set all of them: resumed with one visible GPU per task (or on another node
    shape), the first batch failed on a device that does not exist. Now each rank saves and restores its own
    device's state; an older checkpoint's list restores where the visible GPUs match, else warns."""
    saving = FakeCUDA(visible=8, current=5)
    saving.install(monkeypatch)
    state = rng.capture()
    assert torch.equal(state["cuda"], torch.full((16,), 5, dtype=torch.uint8))  # device 5's, not a list

    resuming = FakeCUDA(visible=1, current=0)  # the same rank, now one visible GPU per task
    resuming.install(monkeypatch)
    rng.apply(state)
    assert list(resuming.set) == [0] and torch.equal(resuming.set[0], state["cuda"])

    legacy = {**state, "cuda": [torch.full((16,), d, dtype=torch.uint8) for d in range(8)]}
    with caplog.at_level(logging.WARNING, logger="train.callbacks.rng"):
        rng.apply(legacy)
    assert list(resuming.set) == [0] and "CUDA generator states of 8 visible GPUs" in caplog.text
    same = FakeCUDA(visible=8, current=5)
    same.install(monkeypatch)
    rng.apply(legacy)
    assert list(same.set) == [5] and torch.equal(same.set[5], legacy["cuda"][5])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_draw_differently_from_identical_weights_and_a_smaller_world_draws_anew(tmp_path):
    """2 DDP processes: the same initial weights, different random generators (before the fix every rank
    drew the same timesteps, noise, guidance dropout and crops). Resumed on 1 process (no saved state maps
    to it), the rank is reseeded for its step instead of replaying the draws of step 0."""
    run, probe = tmp_path / "run", tmp_path / "probe"
    probe_args = [
        "+callbacks.rank_probe._target_=tests.rank_probe.RankProbe",
        f"+callbacks.rank_probe.out={probe}",
    ]
    _train_run(
        tmp_path, run, "stage=upsampler_256", "trainer.devices=2", "trainer.accelerator=cpu", "strategy=ddp",
        *probe_args, torchrun=True,
    )  # fmt: skip
    r0, r1 = (json.loads((probe / f"rank{r}_step0.json").read_text()) for r in (0, 1))
    assert r0["weights"] == r1["weights"], "model init must stay identical on every rank"
    for gen in ("torch", "numpy", "python"):
        assert r0[gen] != r1[gen], f"{gen}: every rank draws the same numbers"
    _train_run(tmp_path, run, "stage=upsampler_256", "trainer.max_steps=7", *probe_args)
    resumed = json.loads((probe / "rank0_step5.json").read_text())
    assert resumed["torch"] not in (r0["torch"], r1["torch"])


def _compose(*overrides: str):
    return compose_config(["logger=none", *overrides])


def test_decoder_without_clip_ckpt_names_the_option(tmp_path):
    from train.run import train

    cfg = _compose("stage=decoder", "debug=fast", f"paths.output_dir={tmp_path}")
    with pytest.raises(ValueError, match="stage=decoder needs a CLIP: set clip_ckpt="):
        train(cfg)


def test_the_tiny_clip_takes_its_vocabulary_from_the_tokenizer():
    """data=shards with CLIP's tokenizer and the tiny CLIP: no net.text.vocab_size=49408 by hand."""
    from types import SimpleNamespace

    from train.run import build_net

    clip_bpe = SimpleNamespace(vocab_size=49408, eot_id=49407, context_length=16)
    net = build_net(_compose("stage=clip"), clip_bpe)
    assert net.text.token_embedding.num_embeddings == 49408 and net.text.eot_id == 49407
    synthetic = SimpleNamespace(vocab_size=1024, eot_id=3, context_length=16)
    assert build_net(_compose("stage=clip"), synthetic).text.token_embedding.num_embeddings == 1024
    with pytest.raises(ValueError, match="net.text.vocab_size=1000 is smaller than the tokenizer's"):
        build_net(_compose("stage=clip", "net.text.vocab_size=1000"), clip_bpe)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_per_step_checks_share_one_all_reduce(tmp_path):
    """The numerics guard, the preemption flag and the time limit agree in one all-reduce per step (with
    the data vote: two; DDP's gradient buckets do not go through torch.distributed.all_reduce), where each
    made its own; and no broadcast: Lightning's Timer, which trainer.max_time used to start, made one a step,
    and Lightning 2.6 broadcast its SIGTERM flag at every step (our Preemption handles SIGTERM). Launched by
    Lightning itself (trainer.devices=2, no launcher), as a user on one machine may."""
    run, probe = tmp_path / "run", tmp_path / "probe"
    _train_run(
        tmp_path, run, "stage=upsampler_256", "module.val_max_samples=4", "module.sample_steps=2",
        "trainer.devices=2", "trainer.accelerator=cpu", "strategy=ddp", "trainer.max_steps=8",
        "trainer.val_check_interval=8", "trainer.log_every_n_steps=4", "trainer.max_time=00:01:00:00",
        "+callbacks.collective_probe._target_=tests.rank_probe.CollectiveProbe",
        f"+callbacks.collective_probe.out={probe}",
    )  # fmt: skip
    counts = json.loads((probe / "collectives_rank0.json").read_text())
    steady = [c for step, c in enumerate(counts[1:], start=2) if step % 4]  # steps that log no metrics
    assert steady and set(steady) == {2}, counts
    # a logging step adds one: the skip counts summed in one all-reduce (a sync_dist log per reason was 17)
    assert [c for step, c in enumerate(counts, start=1) if step % 4 == 0] == [3, 3], counts
    broadcasts = json.loads((probe / "broadcasts_rank0.json").read_text())
    assert set(broadcasts[1:]) == {0}, broadcasts
