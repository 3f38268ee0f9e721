"""Strategies with real processes (2 CPU processes over gloo, launched by torchrun): DDP, DeepSpeed
ZeRO 1/2/3 and FSDP2 each train the same tiny CLIP as one process over the same global batches, through a
sharded checkpoint round trip, and end with the same weights (tests/dist_step.py does the training)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from train.checkpoint import checkpoint_format

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "dist_step.py"
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, strategy: str, nproc: int, *extra: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(SCRIPT),
        ]
    result = subprocess.run(
        [*cmd, "--strategy", strategy, "--out", str(out), *extra],
        env=env,
        cwd=out,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = _run(tmp_path_factory.mktemp("single"), "single", 1)
    info = json.loads((out / "info.json").read_text())
    return {**torch.load(out / "weights.pt", weights_only=True), "val_loss": info["val_loss"]}


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(over all weights, worst single tensor) relative L2 difference, over the net's and its EMA's
    weights (both trained or updated under the strategy)."""
    keys = sorted(k for k in b if k != "val_loss")
    assert sorted(a) == keys and any(k.startswith("ema.shadow.") for k in keys)
    diff = {k: float((a[k].double() - b[k].double()).norm()) for k in keys}
    norm = {k: float(b[k].double().norm()) for k in keys}
    overall = sum(d * d for d in diff.values()) ** 0.5 / sum(n * n for n in norm.values()) ** 0.5
    return overall, max(diff[k] / max(norm[k], 1e-12) for k in keys)


@pytest.mark.parametrize(
    "strategy, ckpt_format, world",
    [
        ("ddp", "file", 2),
        ("zero1", "deepspeed", 2),
        ("zero2", "deepspeed", 2),
        ("zero3", "deepspeed", 2),
        ("fsdp", "dcp", 2),
        # strategy.shard_size=2: 2 replicas of 2 shards; 2 micro-batches a step before the checkpoint, the
        # resumed step's batch through the net in 2 chunks (module.accum_freq=2)
        ("hsdp", "dcp", 4),
    ],
)
def test_two_processes_match_one_process_through_a_checkpoint_round_trip(
    tmp_path, reference, strategy, ckpt_format, world
):
    extra = ["--accumulate", "2", "--accum-freq", "2"] if strategy == "hsdp" else []
    out = _run(tmp_path, strategy, world, *extra)
    info = json.loads((out / "info.json").read_text())
    if strategy == "hsdp":  # the replicas all-reduce once a step, in its last backward: k tensors each time
        counts = info["replica_all_reduces"]  # per micro-batch, then the resumed step's (2 chunks)
        k = counts[1]
        assert k > 0 and counts == [0, k, 0, k, k], counts
    assert {k: info[k] for k in ("world", "strategy", "global_step")} == {
        "world": world,
        "strategy": strategy,
        "global_step": 3,
    }
    # validation (after the resumed step) read the gathered weights: the same loss as one process
    assert info["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert checkpoint_format(out / "final.ckpt") == ckpt_format
    weights = torch.load(out / "weights.pt", weights_only=True)
    overall, worst = _rel_diff(weights, reference)
    assert overall <= 1e-6 and worst <= 1e-5, (overall, worst)  # float32 summation order only
    # the consolidated file is a plain checkpoint: loads with weights_only=True, has the step
    plain = torch.load(out / "consolidated.pt", weights_only=True)
    assert plain["global_step"] == 3 and set(plain["state_dict"]) == set(weights)

    shards = [json.loads((out / f"shards_rank{r}.json").read_text()) for r in range(world)]
    for name, (held, part, full) in shards[0].items():
        if strategy == "hsdp":
            # ranks 0 and 1 hold one replica's two shards, ranks 2 and 3 the other's, alike
            assert part + shards[1][name][1] == full, (name, part, shards[1][name][1], full)
            assert [s[name][1] for s in shards[2:]] == [part, shards[1][name][1]], name
        elif strategy in ("zero3", "fsdp"):
            # outside forward a rank holds only its partition: about half of every matrix
            if strategy == "zero3":
                assert held == 0, f"{name}: ZeRO-3 left {held} elements gathered outside forward"
            if full >= 64:
                assert part <= full // 2 + 64, f"{name}: rank 0 holds {part} of {full} elements"
                assert part + shards[1][name][1] >= full
        else:
            assert held == full, f"{name}: {strategy} should replicate weights"


@pytest.fixture(scope="module")
def nan_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """One process whose loss is NaN at step 1."""
    single = _run(tmp_path_factory.mktemp("single_nan"), "single", 1, "--nan-at", "0,1")
    assert json.loads((single / "info.json").read_text())["skipped"] == 1
    return torch.load(single / "weights.pt", weights_only=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nan_loss_on_one_rank_skips_that_step_on_every_rank(tmp_path, nan_reference, strategy):
    """Rank 1's loss is NaN at step 1: every rank skips step 1 and the run equals one process that
    skipped it (its loss NaN at step 1), through the checkpoint round trip."""
    reference = nan_reference
    out = _run(tmp_path / strategy, strategy, 2, "--nan-at", "1,1")
    assert json.loads((out / "info.json").read_text())["skipped"] == 1
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())
    overall, worst = _rel_diff(weights, reference)
    assert overall <= 1e-6 and worst <= 1e-5, (overall, worst)


def test_a_nan_step_skipped_on_the_device_under_ddp_equals_one_skipped_on_the_host(tmp_path):
    """The guard's way on CUDA (a fused AdamW skips on the agreed flag; the host counts it a step later) on
    2 DDP processes, rank 1's loss NaN at step 1: the same weights, bit for bit, as the host's way (the
    gradients dropped), and the skip counted once through the checkpoint round trip. (Adam's update is
    not compared with one process's: it amplifies reduction-order differences of near-zero gradients.)"""
    runs = {}
    for way in ("host", "deferred"):
        extra = ["--deferred"] if way == "deferred" else []
        out = _run(tmp_path / way, "ddp", 2, "--nan-at", "1,1", "--fused", *extra)
        assert json.loads((out / "info.json").read_text())["skipped"] == 1, way
        runs[way] = torch.load(out / "weights.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in runs["deferred"].values())
    assert all(torch.equal(runs["deferred"][k], runs["host"][k]) for k in runs["host"])


def test_negative_control_wrong_data_split_is_caught(tmp_path, reference):
    """Both ranks train on the same half of every global batch: the comparison above must fail."""
    out = _run(tmp_path, "ddp", 2, "--split", "wrong")
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert _rel_diff(weights, reference)[0] > 1e-3


def _train_run(
    tmp_path: Path, run_dir: Path, strategy: list[str], *overrides: str, nproc: int = 2, timeout: int = 400
) -> dict:
    """``python -m train.run`` as a user launches it on ``nproc`` CPU processes: under torchrun, whose
    ranks start together (Lightning's own launcher, which starts rank 1 only once rank 0 has set up, is
    tested in tests/test_scale.py)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "UNCLIP_DATA_DIR": str(tmp_path / "datasets"),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    args = [
        *(launcher if nproc > 1 else []),
        "-m",
        "train.run",
        "debug=fast",
        f"trainer.devices={nproc}",
        "trainer.accelerator=cpu",
        *strategy,
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    result = subprocess.run(
        [sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize(
    "strategy, ckpt_format",
    [
        (
            ["strategy=deepspeed_zero3", "strategy._target_=train.strategies.CPUDeepSpeedStrategy"],
            "deepspeed",
        ),
        (["strategy=fsdp"], "dcp"),
    ],
    ids=["zero3", "fsdp"],
)
def test_the_clip_trains_validates_and_exports_from_a_sharded_checkpoint_under(
    tmp_path, strategy, ckpt_format
):
    """train.run as a user runs it (real shards, validation with zero-shot, periodic checkpoints); a sharded
    stage resuming from its checkpoint: the diffusion stages below, and tests/test_resume.py (the CLIP on
    another number of processes). Under FSDP the CLIP gathers its net for validation (evaluation reads
    encode_text); a diffusion stage keeps its net sharded (below)."""
    from eval.zeroshot import evaluate_run
    from train.checkpoint import export_stage, load_stage

    run, probe = tmp_path / "run", tmp_path / "probe"
    whole = "data.val_batch_size=64"  # validation on the whole held-out set, as evaluate_run reads it
    gather = [
        "+callbacks.gather_probe._target_=tests.rank_probe.GatherProbe",
        f"+callbacks.gather_probe.out={probe}",
    ]
    metrics = _train_run(tmp_path, run, strategy, whole, *gather)
    assert metrics["trainer/global_step"] == 5 and "val/zeroshot_shape_top1" in metrics
    if ckpt_format == "dcp":
        for rank in (0, 1):
            assert json.loads((probe / f"gather_rank{rank}.json").read_text()) == {"net": 1.0}
    assert checkpoint_format(run / "checkpoints" / "last.ckpt") == ckpt_format
    assert (run / "checkpoints" / "last.ckpt" / "COMMITTED").is_file()  # every rank finished writing
    # the sharded checkpoint holds the weights validation saw: a standalone evaluation reproduces it
    evaluated = evaluate_run(str(run))
    for key in ("zeroshot_colour_top1", "zeroshot_shape_top1", "i2t_r1"):
        assert evaluated[key] == pytest.approx(metrics[f"val/{key}"], abs=1e-6), key
    assert load_stage(export_stage(run)).global_step == 5


@pytest.mark.parametrize(
    "stage, experiment, strategy, global_batch, params",
    [
        ("clip", "clip_paper", "DeepSpeedStrategy", 32768, 986e6),
        ("prior", "prior_paper", "DDPStrategy", 4096, None),
        ("decoder", "decoder_paper", "FSDPStrategy", 2048, None),
        ("upsampler_256", "upsampler_256_paper", "DDPStrategy", 1024, 730e6),
        ("upsampler_1024", "upsampler_1024_paper", "DDPStrategy", 512, 300e6),
    ],
)
def test_paper_scale_experiments_name_their_strategy_and_batch(
    stage, experiment, strategy, global_batch, params
):
    from hydra.utils import instantiate

    wiring = ["clip_ckpt=x"] if stage in ("prior", "decoder") else []
    cfg = compose_config([f"stage={stage}", f"experiment={experiment}", *wiring])
    assert cfg.strategy._target_.endswith(strategy)
    assert cfg.data.global_batch_size == global_batch
    if params:  # the paper's size, on the meta device (no memory)
        with torch.device("meta"):
            net = instantiate(cfg.net)
        n = sum(p.numel() for p in net.parameters())
        assert abs(n - params) / params < 0.07, n


def test_memory_plan_counts_attention_as_a_gpus_fused_kernels_keep_it():
    """Training activations: flash / memory-efficient SDPA keep q, k, v, the output and a log-sum-exp,
    linear in the sequence; the meta device's math path would keep the N x N weights as well."""
    sys.path.insert(0, str(REPO / "launch"))
    import plan

    from train.models.layers import SelfAttention

    b, w, heads = 2, 64, 4
    with torch.device("meta"):
        attn = SelfAttention(w, heads).to(torch.bfloat16)

    def saved(n: int) -> int:
        x = torch.empty(b, n, w, device="meta", dtype=torch.bfloat16)
        return plan.activation_bytes(attn, (x,), {})

    bf16_token = b * w * 2  # one (B, N, W) bf16 activation, per token
    # the input (for in_proj's weight gradient), q, k and v (one storage), SDPA's output (its backward),
    # the output as out_proj reads it, and a float32 log-sum-exp per query and head
    assert saved(128) == 128 * (6 * bf16_token + b * heads * 4)
    assert saved(256) == 2 * saved(128)


@pytest.mark.parametrize("stage", ["clip", "decoder", "upsampler_256"])
def test_memory_plan_activations_agree_with_a_real_forward(stage):
    """plan.py's meta-device count against the tensors autograd saves in a real bf16-autocast forward on
    the CPU (whose SDPA, like a GPU's, is a flash kernel), per sample: batches 4 and 2, differenced."""
    sys.path.insert(0, str(REPO / "launch"))
    import plan
    from hydra.utils import instantiate

    cfg = plan.compose_cfg([f"stage={stage}"])
    with torch.device("meta"):
        meta_net = instantiate(cfg.net).to(torch.bfloat16)
    planned = plan.activation_bytes(meta_net, *plan.example_batch(cfg, meta_net, 2)) / 2

    torch.manual_seed(0)
    net = instantiate(cfg.net).train()
    weights = {p.untyped_storage()._cdata for p in net.parameters()}

    def real(b: int) -> int:
        def on_cpu(t):
            if t.dtype == torch.bool:
                return torch.ones(t.shape, dtype=torch.bool)
            return torch.randn(t.shape) if t.is_floating_point() else torch.zeros(t.shape, dtype=t.dtype)

        args, kwargs = plan.example_batch(cfg, meta_net, b)
        saved = {}

        def pack(t):
            if t.untyped_storage()._cdata not in weights:
                saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(*map(on_cpu, args), **{k: on_cpu(v) for k, v in kwargs.items()})
        del out
        return sum(saved.values())

    per_sample = (real(4) - real(2)) / 2
    assert planned == pytest.approx(per_sample, rel=0.1)


def test_memory_plan_counts_model_states_and_measures_activations(capsys):
    sys.path.insert(0, str(REPO / "launch"))
    import plan

    cfg = plan.compose_cfg(["stage=clip", "experiment=clip_paper"])
    rows, info = plan.plan(cfg, gpus=16, batch_per_gpu=8)
    n = info["trainable"]
    assert abs(n - 986e6) / 986e6 < 0.01 and info["ema"] == 0 and info["clip"] == 0
    by_name = {r[0]: r[1:] for r in rows}
    assert set(by_name) == {
        "ddp",
        "deepspeed_zero1",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "deepspeed_zero3_offload",
        "fsdp",
    }
    weights, grads, optim, ema, act, cpu, val = by_name["ddp"]
    assert (weights, grads, optim) == (4 * n, 4 * n, 8 * n)
    weights, grads, optim, ema, act, cpu, val = by_name["deepspeed_zero2"]
    assert (weights, grads, optim) == (2 * n, 2 * n / 16, 12 * n / 16)
    # validation: the states, plus the CLIP gathered whole under FSDP (evaluation reads encode_text), plus
    # a no-grad forward at data.val_batch_size
    assert val == pytest.approx(weights + grads + optim + ema + info["inference"])
    fsdp = by_name["fsdp"]
    assert fsdp[6] == pytest.approx(sum(fsdp[:4]) + 4 * n + info["inference"])
    assert info["val_batch"] == cfg.data.val_batch_size and info["inference"] > 0
    assert by_name["deepspeed_zero3"][0] < by_name["deepspeed_zero2"][0] / 4  # weights sharded
    # HSDP (strategy.shard_size=8 on 16 GPUs): FSDP's states over 8, not 16; the rest as FSDP's
    hsdp = {r[0]: r[1:] for r in plan.plan(cfg, gpus=16, batch_per_gpu=8, shard_size=8)[0]}
    assert set(hsdp) == {*by_name, "fsdp shard_size=8"} and hsdp["fsdp"] == fsdp
    assert hsdp["fsdp shard_size=8"][1:3] == (4 * n / 8, 8 * n / 8) and hsdp["fsdp shard_size=8"][4] == act
    assert hsdp["fsdp shard_size=8"][6] - sum(hsdp["fsdp shard_size=8"][:4]) == pytest.approx(
        fsdp[6] - sum(fsdp[:4])
    )
    # activations are measured: linear in the batch, and activation checkpointing keeps far fewer
    rows_16, _ = plan.plan(cfg, gpus=16, batch_per_gpu=16)
    assert rows_16[0][5] == pytest.approx(2 * act)
    # module.accum_freq=4: a quarter of the device's batch through the net at a time
    chunked = plan.compose_cfg(["stage=clip", "experiment=clip_paper", "module.accum_freq=4", "strategy=ddp"])
    assert plan.plan(chunked, gpus=16, batch_per_gpu=16)[1]["activations"] == pytest.approx(act / 2)
    # with gradient accumulation the activations are a micro-batch's (the whole step's were planned)
    plan.main(["experiment=clip_paper", "--nodes", "32", "trainer.accumulate_grad_batches=2"])
    assert "global batch 32768 -> 64 per GPU and micro-batch" in capsys.readouterr().out
    no_ckpt = plan.compose_cfg(["stage=clip", "experiment=clip_paper", "net.grad_checkpointing=false"])
    assert plan.plan(no_ckpt, gpus=16, batch_per_gpu=8)[1]["activations"] > 5 * info["activations"]
    # the decoder validates with its EMA copy gathered whole under FSDP (fp32), so that validation runs no
    # collective until its end, and partitioned under ZeRO-3 (its forwards gather anyway); guidance
    # doubles the validation batch
    decoder = plan.compose_cfg(["stage=decoder", "experiment=decoder_paper", "data.val_batch_size=8"])
    rows, info = plan.plan(decoder, gpus=32, batch_per_gpu=8)
    fsdp, zero3 = ({r[0]: r[1:] for r in rows}[name] for name in ("fsdp", "deepspeed_zero3"))
    assert info["val_batch"] == 16 and info["ema"] == info["trainable"]
    assert fsdp[6] == pytest.approx(sum(fsdp[:4]) + 4 * info["ema"] + info["inference"])
    assert zero3[6] == pytest.approx(sum(zero3[:4]) + info["inference"])
    # a decoder on the frozen CLIP's token features (decoder_tiny, preset=gpu's) reads them at the CLIP's
    # context: the paper's width when no CLIP is named, or the one given
    for overrides, text_dim in (([], 1024), (["net.text_dim=64"], 64)):
        cfg = plan.compose_cfg(["stage=decoder", *overrides])
        assert cfg.net.text_encoder == "clip" and cfg.net.text_dim == text_dim
        assert plan.plan(cfg, gpus=8, batch_per_gpu=8)[1]["activations"] > 0
    paper_clip = plan.compose_cfg(["stage=decoder", "experiment=decoder_paper", "net.text_encoder=clip"])
    assert (
        paper_clip.net.text_dim == 1024 and plan.plan(paper_clip, gpus=32, batch_per_gpu=2)[1]["activations"]
    )


def _ema_after_validation(rank: int, world: int, port: int, reshard_after_forward: bool, out: str) -> None:
    """One rank of the FSDP2 EMA check below: configure_sharding as a stage's configure_model calls it,
    an EMA forward without gradients (validation), a training step, then the EMA update."""
    import gc
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from train.ema import EMA
    from train.strategies import configure_sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:

        class Net(nn.Module):  # an input layer, a block (an FSDP unit of its own), an output layer
            def __init__(self) -> None:
                super().__init__()
                self.a, self.blocks, self.b = (
                    nn.Linear(8, 8),
                    nn.ModuleList([nn.Linear(8, 8)]),
                    nn.Linear(8, 8),
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.b(self.blocks[0](self.a(x)))

        torch.manual_seed(0)
        stage = nn.Module()
        stage.net = Net()
        stage.ema = EMA(stage.net, decay=0.5, warmup=False)
        stage._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        strategy = SimpleNamespace(
            reshard_after_forward=reshard_after_forward, param_dtype=None, reduce_dtype=None
        )
        stage.trainer = SimpleNamespace(strategy=strategy)
        configure_sharding(stage)
        with torch.no_grad():
            stage.ema.shadow(torch.randn(2, 8))  # validation evaluates the EMA weights
        stage.net(torch.randn(2, 8)).sum().backward()
        stage.ema.update(stage.net)
        shapes = [tuple(p.to_local().shape) for p in stage.ema.shadow.parameters()]
        Path(out, f"rank{rank}.json").write_text(json.dumps(shapes))
        # FSDP2's modules and the mesh freed before the group is left: left to the interpreter's exit, they
        # aborted 4 processes in 40 ("terminate called without an active exception"; 0 in 40 freed first)
        del stage
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_fsdp_ema_copy_stays_sharded_like_the_net_after_validation(tmp_path, reshard_after_forward):
    """strategy=fsdp with reshard_after_forward=false (the ZeRO-2-like variant): the EMA copy runs forward
    only (validation) and nothing would reshard it, so the first EMA update after a validation raised a
    shard-shape mismatch on every diffusion stage. The copy now reshards after its forwards."""
    import torch.multiprocessing as mp

    mp.spawn(_ema_after_validation, args=(2, _free_port(), reshard_after_forward, str(tmp_path)), nprocs=2)
    for rank in (0, 1):  # each rank keeps half of every (8, 8) weight and (8,) bias
        shapes = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert shapes == [[4, 8], [4]] * 3, shapes


ZERO3 = [
    "strategy=deepspeed_zero3",
    "strategy._target_=train.strategies.CPUDeepSpeedStrategy",
    "strategy.param_persistence_threshold=0",  # (tiny weights would stay whole by default)
]


@pytest.mark.parametrize(
    "strategy, shards, evaluated",
    [(["strategy=ddp"], 1, 16), (["strategy=fsdp"], 3, 48), (ZERO3, 3, 32)],
    ids=["ddp", "fsdp", "zero3"],
)
def test_a_diffusion_stage_validates_on_unequal_shards_and_continues_on_another_world_size(
    tmp_path, strategy, shards, evaluated
):
    """Validation shards of 16 samples on 2 ranks, split by shard: with 1, rank 1 has none; with 3, it has
    16 and rank 0 32. A rank done with its shards went on to gather the results while the other was still
    in a validation forward, where DDP broadcast its buffers (the EMA's count; its first forward) and FSDP
    and ZeRO-3 gathered weights: each hung. Now DDP and FSDP validate without collectives (every sample);
    ZeRO-3, whose forwards gather weights whatever is done, stops every rank where the first runs out,
    with a warning (16 per rank).

    Sharded, each rank validates and samples with its net still sharded, and under FSDP its EMA copy
    gathered whole (so that its validation forwards are no collectives: train/modules/base.py); under
    ZeRO-3, whose forwards gather anyway, the copy stays partitioned too (it was gathered whole for
    nothing). The CLIP gathers its net (above).

    Then the sharded checkpoint continues on 1 process (below)."""
    from data.synthetic import ensure_synthetic

    data = tmp_path / "datasets"
    ensure_synthetic(data / "train", data / "val", train_samples=64, val_samples=64, shard_size=16)
    val = "::".join(str(data / "val" / f"{i:05d}.tar") for i in range(shards))
    overrides = ["stage=upsampler_256", "data.synthetic=null", f"data.train_shards={data / 'train'}",
                 f"data.val_shards={val}", "trainer.limit_val_batches=1.0", "module.val_max_samples=64",
                 "module.sample_steps=2"]  # fmt: skip
    probe = tmp_path / "probe"
    overrides += ["+callbacks.gather_probe._target_=tests.rank_probe.GatherProbe",
                  f"+callbacks.gather_probe.out={probe}"]  # fmt: skip
    run = tmp_path / "run"
    metrics = _train_run(tmp_path, run, strategy, *overrides, timeout=180)
    assert metrics["trainer/global_step"] == 5 and metrics["val/n"] == evaluated
    if strategy == ["strategy=ddp"]:
        return
    ema = 1.0 if strategy == ["strategy=fsdp"] else 0.0  # FSDP gathers the EMA copy; ZeRO-3 leaves it
    for rank in (0, 1):
        assert json.loads((probe / f"gather_rank{rank}.json").read_text()) == {"net": 0.0, "ema": ema}

    # The sharded checkpoint (net, EMA copy and its count) continues on 1 process for a step: a ZeRO-3 one
    # through DeepSpeed's universal checkpoint, which leaves out the EMA (frozen weights and a buffer;
    # train/strategies.py restores them). The EMA must be the saved one moved toward the new net by one
    # update, decay (1 + n) / (10 + n) after n = 5 updates: the count restored too. (The net itself is
    # not compared: a diffusion stage's random draws differ on another number of processes.)
    from train.checkpoint import consolidate, export_stage, load_stage

    saved, moved = run / "checkpoints" / "last.ckpt", tmp_path / "moved"
    shutil.copytree(saved, moved / "checkpoints" / "step0000005.ckpt")
    _train_run(tmp_path, moved, strategy, *overrides, "trainer.max_steps=6", nproc=1, timeout=180)
    before, after = consolidate(saved), consolidate(moved / "checkpoints" / "last.ckpt")
    assert int(before["ema.num_updates"]) == 5 and int(after["ema.num_updates"]) == 6
    decay = 6 / 15
    shadow = [k for k in before if k.startswith("ema.shadow.")]
    assert shadow
    for key in shadow:
        net = after["net." + key.removeprefix("ema.shadow.")]
        assert torch.allclose(after[key], decay * before[key] + (1 - decay) * net, rtol=0, atol=1e-6), key
    assert load_stage(export_stage(moved)).global_step == 6
    # what init_from=<the sharded checkpoint> starts a fine-tuning run from: the EMA copy, consolidated
    from train.checkpoint import stage_weights

    start = stage_weights(saved)
    assert start.ema and start.global_step == 5 and sorted(start.weights) == sorted(k[11:] for k in shadow)
    assert all(torch.equal(start.weights[k[11:]], before[k]) for k in shadow)


@pytest.mark.parametrize(("world", "share"), [(1, 10), (2, 5), (3, 4)])
def test_val_max_samples_is_the_runs_all_ranks_together(world, share):
    """module.val_max_samples was each rank's: 2 GPUs evaluated twice the samples of 1, and the metrics
    that depend on the set's size (recall@1 among its images) changed with the number of GPUs."""
    from types import SimpleNamespace

    from train.modules.base import StageModule

    class Stage(StageModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"val_max_samples": 10})

    stage = Stage()
    stage._trainer = SimpleNamespace(world_size=world)
    stage.on_validation_epoch_start()
    assert stage.val_room("img") == share
    stage._val.append({"img": [0, 1, 2]})
    assert stage.val_room("img") == share - 3
