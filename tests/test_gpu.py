"""The GPU tier (``pytest -m gpu``): what only a GPU exercises. Skipped without CUDA, with the reason.

``UNCLIP_TEST_DEVICE=cpu pytest -m gpu`` runs the device-agnostic tests of this tier on the CPU
(launch/gpu_check.sh --cpu does, so this code is never untested); the CUDA-only ones (flash attention,
DeepSpeed and FSDP2 on a GPU) skip there with their reason.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from eval import bench_train
from tests.conftest import compose_config, run_python
from train.run import train

# cuBLAS is deterministic only with a fixed workspace, set before CUDA starts (exact-resume test).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
DEVICE = torch.device(os.environ.get("UNCLIP_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.gpu
cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA only (UNCLIP_TEST_DEVICE is not cuda)")
TINY = {c.name: c for c in bench_train.SIZES["tiny"]}


def _accelerator() -> list[str]:
    precision = "bf16-mixed" if DEVICE.type == "cuda" else "32-true"
    return [f"trainer.accelerator={'gpu' if DEVICE.type == 'cuda' else 'cpu'}", "trainer.devices=1",
            f"trainer.precision={precision}"]  # fmt: skip


def _cfg(tmp_path: Path, out: Path, *overrides: str):
    return compose_config(
        [
            "debug=fast",
            f"paths.data_dir={tmp_path.parent / 'datasets'}",
            f"paths.output_dir={out}",
            "data.global_batch_size=32",
            *_accelerator(),
            *overrides,
        ]
    )


@pytest.mark.skipif(
    DEVICE.type != "cuda", reason="on a CPU, launch/gpu_check.sh --cpu's cascade step runs this preset"
)
def test_the_smoke_cascade_trains_embeds_and_samples_on_the_device(tmp_path):
    """preset=gpu_smoke end to end: each stage trains on the GPU, and embed and sample, which run outside
    a Trainer, run there too. A device mix-up in the sampling code shows here, in the first device call,
    and not at the end of preset=gpu's 7 minutes (gpu_check's cascade step). First in this file, so that a
    tests step cut at its time limit has run it."""
    out = tmp_path / "cascade"
    # 150 s: well inside gpu_check's tests step (200 s), so a stalled cascade fails here, with its output,
    # and the tests after it still run
    result = run_python(["-m", "train.pipeline", "preset=gpu_smoke", f"out_dir={out}"], tmp_path, timeout=150)
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("embed", "sample"):
        assert json.loads((out / stage / "done.json").read_text())["device"].startswith(DEVICE.type), stage
    assert (
        json.loads((out / "sample" / "done.json").read_text())["precision"] == "bf16"
    )  # sample.precision=auto
    sample = json.loads((out / "report.json").read_text())["sample"]
    assert (
        sample["bench/n"] == 8 and "lever/bench/n" in sample and "probe/decoder_caption_only/colour" in sample
    )
    assert (out / "samples.png").is_file()


@pytest.mark.parametrize("case", list(TINY), ids=str)
def test_bf16_steps_of_every_stage_are_finite_and_decrease(case):
    """Each stage's real step (bench_train's workload) under bf16 autocast learns its fixed batch. On a CPU
    (gpu_check --cpu runs the CLIP's) a quarter of the batch, and for the CLIP a third of the steps (it
    learns 8 pairs in 20; the diffusion losses, noisier, need the 60): a CPU without AVX-512 emulates bf16
    matmuls, 16x slower than fp32 (1.8 s a CLIP step at batch 32 on this project's AVX2 AMD EPYC dev machine)."""
    from dataclasses import replace

    torch.manual_seed(0)
    on_gpu = DEVICE.type == "cuda"
    work = bench_train.build_stage(
        TINY[case] if on_gpu else replace(TINY[case], batch=TINY[case].batch // 4), DEVICE
    )
    from train.modules.optim import adamw, param_groups

    optimizer = adamw(param_groups(work.model, 0.0), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    losses = []
    for _ in range(20 if not on_gpu and case == "clip" else 60):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = work.loss()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (case, first, last)


@cuda_only
def test_attention_runs_on_the_fused_kernels():
    """No math path (a mask or a layout the fused kernels cannot take would raise): the CLIP towers and the
    token-free prior on the flash kernel alone; the prior over caption tokens and the decoder (their
    masks, which flash does not take) on flash or the memory-efficient kernel (the upsamplers' tiny nets
    have no attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    token_free = bench_train.Case("prior_token_free", "prior", 8, "prior_tiny")
    for case in (TINY["clip"], token_free, TINY["prior"], TINY["decoder"]):
        work = bench_train.build_stage(case, DEVICE)
        backends = fused[:1] if case.name in ("clip", "prior_token_free") else fused
        with sdpa_kernel(backends), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = work.loss()
        loss.backward()
        assert torch.isfinite(loss), case.name


@cuda_only
@pytest.mark.parametrize(
    "strategy", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"], ids=["zero2", "zero3", "fsdp2"]
)
def test_sharded_strategies_train_resume_and_export_on_one_gpu(tmp_path, strategy):
    """DeepSpeed ZeRO-2/3 (torch's fused AdamW inside the ZeRO optimizer: fused for the strategy's device,
    train.modules.optim.adamw) and FSDP2, bf16, one GPU: train,
    write a sharded checkpoint, resume from it, export."""
    from train.checkpoint import export_stage, load_stage

    run = tmp_path / "run"
    metrics = train(_cfg(tmp_path, run, f"strategy={strategy}", "trainer.max_steps=4"))
    assert metrics["trainer/global_step"] == 4 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    # a GPU run's process settings, as eval.bench_train measures with (train.run.build_trainer)
    assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    assert (run / "checkpoints" / "last.ckpt" / "COMMITTED").is_file()
    metrics = train(_cfg(tmp_path, run, f"strategy={strategy}", "trainer.max_steps=6"))
    assert metrics["trainer/global_step"] == 6
    assert load_stage(export_stage(run)).global_step == 6


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_exact_resume_on_the_device_is_bitwise(tmp_path):
    """A run resumed from its step-3 checkpoint ends with the same weights, bit for bit, as the run that
    never stopped (device RNG states restored). Control: two uninterrupted runs agree (deterministic
    kernels), so a difference is the resume's."""
    common = (
        "trainer.max_steps=6",
        "trainer.deterministic=true",
        "callbacks.checkpoint.every_n_train_steps=3",
    )
    whole, again, resumed = tmp_path / "whole", tmp_path / "again", tmp_path / "resumed"
    train(_cfg(tmp_path, whole, *common))
    train(_cfg(tmp_path, again, *common))
    a, b = _final_weights(whole), _final_weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a), "two identical runs differ: kernels not deterministic"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "checkpoints" / "step0000003.ckpt", resumed / "checkpoints" / "step0000003.ckpt")
    train(_cfg(tmp_path, resumed, *common))
    c = _final_weights(resumed)
    different = [k for k in a if not torch.equal(a[k], c[k])]
    assert not different, f"resumed run differs in {different[:5]}"


def test_clip_accum_freq_on_the_device_trains_like_the_whole_batch(tmp_path):
    """module.accum_freq=4 under bf16 autocast on the device: the step-by-step losses of the unchunked run
    (bf16 matmuls of a chunk round apart from the whole batch's: 2% on CUDA, float32's 1e-5 on a CPU)."""
    import csv

    def losses(name: str, *extra: str) -> list[float]:
        out = tmp_path / name
        train(_cfg(tmp_path, out, "trainer.max_steps=4", "trainer.log_every_n_steps=1", "logger=csv", *extra))
        with open(out / "csv" / "run" / "metrics.csv") as f:
            return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]

    whole, chunked = losses("whole"), losses("chunked", "module.accum_freq=4")
    assert len(whole) == 4 and chunked == pytest.approx(whole, rel=2e-2 if DEVICE.type == "cuda" else 1e-5)


def test_data_embed_on_the_device_matches_the_cpu(clip_run, tmp_path):
    from data.embed import embed_shards
    from data.pipeline import ShardDataset
    from train.frozen_clip import FrozenClip

    run, val = clip_run
    assert FrozenClip(run, map_location=DEVICE).device.type == DEVICE.type  # (it stayed on the CPU)
    fields = ["img_emb.npy", "txt_emb.npy"]
    out = {}
    for device in ("cpu", str(DEVICE)):
        embed_shards(str(run), val, tmp_path / device, batch_size=16, device=device)
        ds = ShardDataset(str(tmp_path / device), batch_size=1000, image_size=None, npy_fields=fields,
                          shuffle_buffer=0, shuffle_shards=False)  # fmt: skip
        out[device] = {k: b[f][i] for b in ds for i, k in enumerate(b["__key__"]) for f in fields[:1]}
    assert out["cpu"].keys() == out[str(DEVICE)].keys() and len(out["cpu"]) == 64
    for key, emb in out["cpu"].items():
        torch.testing.assert_close(out[str(DEVICE)][key].float(), emb.float(), atol=5e-3, rtol=0)


@cuda_only
def test_ema_keeps_an_fp32_average_under_a_real_deepspeed_bf16_engine(tmp_path, clip_run):
    """The prior under DeepSpeed ZeRO-2 in bf16 on the GPU: the engine casts the module, EMA copy
    included, to bf16; the average is kept in fp32 outside it (train/ema.py), updated every step."""
    clip, _ = clip_run
    probe = tmp_path / "ema.json"
    cfg = _cfg(
        tmp_path,
        tmp_path / "prior",
        "stage=prior",
        f"clip_ckpt={clip}",
        "strategy=deepspeed_zero2",
        "trainer.max_steps=4",
        "+callbacks.ema_probe._target_=tests.rank_probe.EMAProbe",
        f"+callbacks.ema_probe.out={probe}",
    )
    train(cfg)
    assert json.loads(probe.read_text()) == {
        "shadow": "torch.bfloat16",
        "master": "torch.float32",
        "updates": 4,
    }


@cuda_only
def test_the_ema_update_and_the_batch_normalisation_never_block_the_host():
    """Both run at every step of a diffusion stage; a read of a value or a copy from host memory would make
    the host wait for the GPU (the EMA read its update count, Normalize copied its mean and std)."""
    from data.transforms import Normalize
    from train.ema import EMA

    net = torch.nn.Linear(8, 8, device=DEVICE)
    ema = EMA(net, decay=0.99).to(DEVICE)
    normalize = Normalize("minus_one_one")
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, device=DEVICE)
    normalize(images, torch.bfloat16)  # copies the constants to the device, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update(net)
            normalize(images, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(ema.num_updates) == 3


@cuda_only
def test_the_upsampler_crops_and_degradations_never_block_the_host():
    """Every 64 -> 256 upsampler step draws crop corners and blurs its conditioning image with a gaussian
    kernel, and every 256 -> 1024 step runs the BSR chain (blur, resize, noise, JPEG): a tensor of host
    numbers copied to the device (the corners' limits, the kernel, noise drawn on the CPU) or an image sent
    to the CPU (PIL's JPEG) would make the host wait for the GPU. (JPEG's tables are copied to a device
    once, at its first use.)"""
    import random

    from data.degrade import bsr_degrade, jpeg, light_blur, resize
    from train.modules.upsampler import random_crops

    images = torch.rand(4, 3, 64, 64, device=DEVICE) * 2 - 1
    jpeg(images, 50)  # the tables' one copy
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        crops, _ = random_crops(images, 32)
        low = light_blur(resize(crops, 8, "bicubic"))
        chains = [bsr_degrade(crops, 8, random.Random(seed)) for seed in range(8)]  # every branch taken
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert crops.shape == (4, 3, 32, 32) and low.shape == (4, 3, 8, 8)
    assert all(c.shape == (4, 3, 8, 8) for c in chains)


@cuda_only
def test_the_numerical_guard_skips_a_nan_step_without_blocking_the_host():
    """On CUDA the guard's check is deferred (the fused AdamW skips on the agreed flag; the host reads it a
    step later) and the loss is tracked on the device: a Lightning fit's steps 2-4 (bf16-mixed, a NaN at
    step 3) never wait for the GPU in our code, and the NaN step is still skipped and counted. On failure,
    the lines of ours that synchronise (and Lightning's, for the record)."""
    import warnings

    import pytorch_lightning as pl

    from tests.conftest import REPO
    from tests.test_numerics import Poisoned, _fit
    from train.callbacks.numerics import NumericalGuard

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if 2 <= trainer.global_step <= 4:  # the optimizer's state and the guard's buffers exist by then
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")

    module, guard = Poisoned(bad={3}, fused=True), NumericalGuard(max_consecutive=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _fit(module, [guard, Watch()], steps=6, accelerator="gpu", precision="bf16-mixed")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
    ours = [p for p in places if p.startswith(str(REPO)) and "/tests/" not in p]
    assert not ours, places
    assert guard.skipped == 1 and torch.equal(module.after[4], module.after[3])


@cuda_only
@pytest.mark.parametrize("case", list(TINY), ids=str)
def test_a_training_step_of_every_stage_never_blocks_the_host(case):
    """Forward, backward, gradient clipping and the fused AdamW step of each stage (bench_train's workload)
    queue their kernels without waiting for the GPU. On failure, the lines that synchronise."""
    import warnings

    from train.modules.optim import adamw, param_groups

    torch.manual_seed(0)
    work = bench_train.build_stage(TINY[case], DEVICE)
    optimizer = adamw(param_groups(work.model, 0.0), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = work.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(work.model.parameters(), 1.0, foreach=True)
        optimizer.step()

    step()  # the optimizer's state is created at its first step
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
    assert not places, places


@cuda_only
@pytest.mark.parametrize("stage", ["clip", "decoder"])
def test_a_training_run_never_blocks_the_host_between_logging_steps(tmp_path, clip_run, stage):
    """A whole Lightning run of the stage (bf16-mixed, our callbacks, the loader, the frozen CLIP of the
    decoder): from step 2 to step 5 no line of ours makes the host wait for the GPU (nothing is logged
    there). On failure, every place that synchronised, Lightning's included."""
    from tests.conftest import REPO

    watched = tmp_path / "sync.json"
    cfg = _cfg(
        tmp_path,
        tmp_path / stage,
        f"stage={stage}",
        *([f"clip_ckpt={clip_run[0]}"] if stage != "clip" else []),
        "trainer.max_steps=7",
        "trainer.log_every_n_steps=100",
        "trainer.limit_val_batches=0",
        "callbacks.checkpoint.every_n_train_steps=100",
        "+callbacks.sync_watch._target_=tests.rank_probe.SyncWatch",
        f"+callbacks.sync_watch.out={watched}",
    )
    train(cfg)
    places = json.loads(watched.read_text())["places"]
    ours = [p for p in places if p.startswith(str(REPO)) and f"{os.sep}tests{os.sep}" not in p]
    assert not ours, places
    if places:  # Lightning's or torch's own: in the warnings summary of the GPU report, for the record
        import warnings

        warnings.warn(f"{stage}: the host waited for the GPU outside our code at {places}", stacklevel=1)


@pytest.mark.parametrize("case", ["clip", "decoder"])
def test_compiled_step_matches_eager_within_bf16_tolerance(case):
    """torch.compile (inductor, regional) computes the same loss and gradients as eager, to bf16 rounding.
    Its first compiles are the slowest tests here, so launch/gpu_check.sh runs it in its `compiled` step,
    not in `tests`; with UNCLIP_TEST_COMPILE_BACKEND=aot_eager (gpu_check --cpu) it runs without
    inductor's C++ build."""
    from train.parallel import compile_net

    backend = os.environ.get("UNCLIP_TEST_COMPILE_BACKEND", "inductor")

    results = []
    for mode in ("none", "regional"):
        torch.manual_seed(0)
        work = bench_train.build_stage(TINY[case], DEVICE)
        compile_net(work.model, mode, backend=backend)
        torch.manual_seed(1)  # the same timesteps, noise and dropout draws in both
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = work.loss()
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in work.model.parameters() if p.grad is not None])
        results.append((float(loss), grad))
    (eager, g_eager), (compiled, g_compiled) = results
    assert compiled == pytest.approx(eager, rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(g_eager, g_compiled, dim=0)
    assert cosine > 0.99, float(cosine)
