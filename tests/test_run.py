"""train.run / train.pipeline as a user runs them: config composition, a short real run, resume, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from eval.zeroshot import evaluate_run
from tests.conftest import REPO, cli_env, clip_trained_on, compose_config, free_port, run_python
from train.run import train

CONF = str(REPO / "conf")


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_python(["-m", "train.run", "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["stage_name"] == "clip"
    assert cfg["net"]["_target_"] == "train.models.clip.CLIP"
    assert cfg["data"]["_target_"] == "data.datamodule.ShardDataModule"
    assert cfg["data"]["global_batch_size"] == 128
    assert cfg["trainer"]["_target_"] == "pytorch_lightning.Trainer"


def test_overrides_and_named_architectures_compose(tmp_path):
    cfg = compose_config(["net=clip_vit_b16", "data.global_batch_size=256", "strategy=ddp"])
    assert cfg.net.vision.patch_size == 16 and cfg.net.vision.width == 768
    assert cfg.data.image_size == 224, "the data resolution follows the architecture"
    assert cfg.data.tokenizer.context_length == 77
    assert cfg.strategy._target_.endswith("DDPStrategy")


def _fast_cfg(tmp_path: Path, out: Path, *extra: str):
    return compose_config(
        [
            "debug=fast",
            f"paths.data_dir={tmp_path / 'datasets'}",
            f"paths.output_dir={out}",
            *extra,
        ]
    )


TB = ("logger=tensorboard", "trainer.log_every_n_steps=1")


def test_last_checkpoint_is_the_final_step_when_max_steps_is_not_a_multiple_of_the_interval(tmp_path):
    """7 steps, a checkpoint every 5: last.ckpt holds step 7 (Lightning's own kept step 5), so resume and
    the export take the weights the run's metrics describe."""
    out = tmp_path / "run"
    cfg = _fast_cfg(tmp_path, out, "trainer.max_steps=7", "trainer.val_check_interval=7",
                    "callbacks.checkpoint.every_n_train_steps=5")  # fmt: skip
    assert train(cfg)["trainer/global_step"] == 7
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt", "step0000005.ckpt"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 7
    # A second run launched into the same directory (launch/torchrun.sh named it by the day) would resume
    # this one: it replaced the CLIP's config.yaml and tokenizer, then failed to load the checkpoint. It is
    # refused first, and the directory keeps what it held.
    saved = {name: (out / name).read_bytes() for name in ("config.yaml", "tokenizer.json")}
    from train.config import ConfigError

    stale = out / "checkpoints" / ".last.ckpt.tmp-999999999"  # a killed save's (deleted by this run's resume)
    stale.write_bytes(b"0")
    os.utime(stale, (time.time() - 600, time.time() - 600))
    with pytest.raises(
        ConfigError, match=r"holds another run \(stage_name: 'clip' there, 'upsampler_256' here"
    ):
        train(_fast_cfg(tmp_path, out, "stage=upsampler_256"))
    assert {name: (out / name).read_bytes() for name in saved} == saved and stale.exists()
    # The same stage with a net of another width fails to load the checkpoint, and its config.yaml used to
    # replace the saved one first: the run then no longer loaded anywhere (export, evaluation). Written
    # only once the checkpoint has loaded now.
    with pytest.raises(RuntimeError, match="size mismatch"):
        train(_fast_cfg(tmp_path, out, "trainer.max_steps=9", "net.vision.width=64"))
    assert {name: (out / name).read_bytes() for name in saved} == saved
    # Another tower lock: the saved optimizer state is for other parameters (it failed in Lightning's
    # optimizer restore, "a parameter group that doesn't match", after config.yaml was replaced)
    with pytest.raises(
        ConfigError, match=r"module.lock_image=True \(saved: False\): its checkpoint's optimizer"
    ):
        train(_fast_cfg(tmp_path, out, "trainer.max_steps=9", "module.lock_image=true"))
    assert {name: (out / name).read_bytes() for name in saved} == saved
    # a run saved before locks existed (no such keys in its config.yaml) had nothing locked
    (out / "config.yaml").write_text(
        "\n".join(ln for ln in saved["config.yaml"].decode().splitlines() if "lock_" not in ln) + "\n"
    )
    with pytest.raises(
        ConfigError, match=r"module.lock_text=True \(saved: False\).*its weights \(init_from="
    ):
        train(_fast_cfg(tmp_path, out, "trainer.max_steps=9", "module.lock_text=true"))
    (out / "config.yaml").write_bytes(saved["config.yaml"])
    # Whatever fails in the restore of the optimizer and loops (which Lightning runs after on_fit_start):
    # here a checkpoint whose optimizer state lost a parameter. config.yaml is written after it.
    last = out / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    state["optimizer_states"][0]["param_groups"][0]["params"].pop()
    torch.save(state, last)
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        train(_fast_cfg(tmp_path, out, "trainer.max_steps=9", "module.optimizer.lr=1e-4"))
    assert {name: (out / name).read_bytes() for name in saved} == saved
    from train.checkpoint import load_stage

    load_stage(out)  # still the run it was


def test_a_resumed_run_steps_with_its_configured_optimizer_settings_not_the_checkpoints(tmp_path):
    """Restoring a checkpoint put back its param groups' lr, betas, eps and weight decay and its schedule's
    base learning rate: a run resumed with other ``module.optimizer`` values trained on with the saved
    ones, while config.yaml recorded the new ones. The Adam moments and step count stay the checkpoint's."""
    out = tmp_path / "run"
    steps = ("callbacks.checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2")
    train(_fast_cfg(tmp_path, out, "trainer.max_steps=2", *steps, "module.optimizer.lr=2e-3"))
    new = ("module.optimizer.lr=1e-5", "module.optimizer.weight_decay=0.5", "module.optimizer.betas=[0.5,0.6]",
           "module.optimizer.eps=1e-3")  # fmt: skip
    assert train(_fast_cfg(tmp_path, out, "trainer.max_steps=3", *steps, *new))["trainer/global_step"] == 3
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]  # (the exempt group stays undecayed)
    assert [(tuple(g["betas"]), g["eps"]) for g in groups] == [((0.5, 0.6), 1e-3)] * 2
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [1e-5, 1e-5]
    assert all(0 < g["lr"] <= 1e-5 for g in groups), [g["lr"] for g in groups]
    assert {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {3}  # moments kept


@pytest.mark.slow
def test_fast_run_trains_checkpoints_resumes_and_continues_its_tensorboard_curves(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="train.callbacks.val_log"):
        # validation on the whole held-out set (64), as the standalone evaluation below reads it
        metrics = train(_fast_cfg(tmp_path, out, *TB, "callbacks.checkpoint.every_n_train_steps=5",
                                  "data.val_batch_size=64"))  # fmt: skip
    assert metrics["trainer/global_step"] == 5
    # a text-log line per validation: step, then the val/ metrics without their prefix
    line = next(r.getMessage() for r in caplog.records if r.name == "train.callbacks.val_log")
    assert line.startswith("step 5 (") and "zeroshot_colour_top1=" in line and "val/" not in line
    assert (out / "config.yaml").exists() and (out / "tokenizer.json").exists()
    assert (out / "checkpoints" / "last.ckpt").exists()
    saved = json.loads((out / "metrics.json").read_text())
    for key in (
        "train/loss",
        "train/logit_scale",
        "val/loss",
        "val/zeroshot_colour_top1",
        "val/i2t_r1",
        "data/skipped_decode_error",
    ):
        assert key in saved, key
    assert saved["data/skipped_decode_error"] == 0
    # the standalone evaluation of the checkpoint reproduces the in-training validation
    evaluated = evaluate_run(str(out))
    for key in ("zeroshot_colour_top1", "zeroshot_shape_top1", "i2t_r1", "t2i_r5"):
        assert evaluated[key] == pytest.approx(saved[f"val/{key}"], abs=1e-6), key
    # resume=auto: a second run in the same directory continues from last.ckpt to the new max_steps
    metrics = train(
        _fast_cfg(tmp_path, out, *TB, "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=5")
    )
    assert metrics["trainer/global_step"] == 8
    # TensorBoard: one directory across the resume, every optimizer step once. The first run ended with
    # validation at step 5; Lightning alone logs the resumed steps one late (train/callbacks/log_step.py).
    scalars = _tensorboard_scalars(out / "tensorboard" / "run")
    assert sorted(scalars["train/loss"]) == list(range(8)), scalars["train/loss"]
    assert all(math.isfinite(v) for v in scalars["train/loss"].values())
    assert "val/zeroshot_colour_top1" in scalars and "perf/samples_per_sec" in scalars
    assert "stage_name" in (out / "tensorboard" / "run" / "hparams.yaml").read_text()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8


def _tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value from every TensorBoard event file under ``directory`` (TFRecord framing:
    length u64, its crc u32, an Event protobuf, its crc u32)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.mark.slow
def test_cli_keeps_a_paths_output_dir_override(tmp_path):
    out, hydra_dir = tmp_path / "out", tmp_path / "hydra"
    args = ["-m", "train.run", "debug=fast", f"paths.output_dir={out}", f"hydra.run.dir={hydra_dir}"]
    result = run_python(args, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "metrics.json").exists() and (out / "checkpoints" / "last.ckpt").exists()
    assert not (hydra_dir / "metrics.json").exists()  # Hydra's directory keeps only its own logs


@pytest.mark.slow
def test_the_pipeline_trains_the_cascade_on_a_clip_trained_elsewhere(tmp_path):
    """``clip_ckpt=`` an open_clip model imported by ``from-open-clip`` (here our CLIP through
    ``to-open-clip``: no weights can be downloaded), which names no data: the clip stage is not run, embed
    embeds the decoder's shards with that CLIP, the prior and the decoder train on it, and the sample stage
    scores with it (CLIP-FID against the decoder's held-out shards)."""
    from omegaconf import OmegaConf

    from train import pipeline
    from train.checkpoint import main as checkpoint_cli

    clip = compose_config(
        ["debug=fast", "trainer.max_steps=2", f"paths.data_dir={tmp_path / 'clip_data'}",
         f"paths.output_dir={tmp_path / 'run'}", "net.vision.stem=patch", "net.vision.pool=tok"]
    )  # fmt: skip
    train(clip)
    checkpoint_cli(["to-open-clip", str(tmp_path / "run"), str(tmp_path / "hub")])
    imported = tmp_path / "imported"
    tokenizer = str(tmp_path / "run" / "tokenizer.json")
    checkpoint_cli(["from-open-clip", str(tmp_path / "hub"), str(imported), "--tokenizer", tokenizer])
    out = tmp_path / "pipeline"
    tiny = ["trainer.max_steps=2", "trainer.val_check_interval=2", "module.val_max_samples=4"]
    args = [
        "-m", "train.pipeline", f"out_dir={out}", f"clip_ckpt={imported}",
        "stages=[clip,embed,prior,decoder,sample]",
        "+prior.data.global_batch_size=16", "+prior.data.num_workers=0", "+prior.module.sample_steps=2",
        *[f"prior.{o}" for o in tiny[:2]], "+decoder.debug=fast", *[f"decoder.{o}" for o in tiny],
        "+decoder.net.model_channels=16", "+decoder.net.head_channels=16",
        "sample.per_category=1", "sample.batch=4", "sample.grid_per_category=1", "sample.fid_reference=8",
        "sample.prior.steps=2", "sample.decoder.steps=2", "sample.upsamplers=[]", "sample.probe=0",
    ]  # fmt: skip
    result = run_python(args, tmp_path)
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-4000:]
    assert "stage clip: not trained; the cascade takes clip_ckpt=" in printed and not (out / "clip").exists()
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"embed", "prior", "decoder", "sample"}
    assert report["embed"]["embed/train_samples"] == 256 and report["embed"]["embed/val_samples"] == 64
    made_by = json.loads((out / "embed" / "train" / "embed_info.json").read_text())["checkpoint"]
    assert made_by == str(imported.resolve() / "model.safetensors")
    for stage in ("prior", "decoder"):
        assert yaml.safe_load((out / stage / "config.yaml").read_text())["clip_ckpt"] == str(
            imported.resolve()
        )
    assert "bench/clip_fid" in report["sample"] and (out / "samples.png").exists()
    # a run of another stage is refused before anything runs, naming the option
    with pytest.raises(SystemExit, match=r"clip_ckpt=.*prior.*expected a CLIP run"):
        pipeline.external_clip(OmegaConf.create({"clip_ckpt": str(out / "prior")}))
    # a rerun into this out_dir takes the same CLIP, or stops before any stage: without clip_ckpt it trained a
    # clip stage and sampled the finished stages with it; with another, it mixed two CLIPs
    pipeline.check_one_clip(out, imported.resolve())
    other = clip_trained_on(shutil.copytree(tmp_path / "run", tmp_path / "other"))  # other weights
    with pytest.raises(SystemExit, match=r"prior was made with .* this run takes prior.clip_ckpt=.*other:"):
        pipeline.check_one_clip(out, imported, {"prior": str(other), "decoder": None})
    for given in (None, other):
        with pytest.raises(
            SystemExit, match=r"embed was made with the CLIP .*imported.* Rerun with clip_ckpt=.*imported, or"
        ):
            pipeline.check_one_clip(out, given)
    # The same weights from elsewhere are the same CLIP: a copy, and the run they were imported from (to and
    # from open_clip). The CLIP exported again over the import after it trained on was taken (one path):
    # the embed and prior stages were skipped as finished, and the decoder trained on the new weights before
    # the sample stage refused the cascade.
    pipeline.check_one_clip(out, shutil.copytree(imported, tmp_path / "copy"))
    pipeline.check_one_clip(out, tmp_path / "run")
    weights = load_file(imported / "model.safetensors")
    save_file(
        {k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()},
        imported / "model.safetensors",
    )
    redo = ", ".join(str(out / s) for s in ("embed", "prior", "decoder", "sample"))
    with pytest.raises(
        SystemExit,
        match=rf"embed was made with the CLIP weights of {made_by} \(step 0\), but clip_ckpt={imported.resolve()} "
        rf"loads {made_by} \(step 0\) now, other weights: .* Remove {redo} to make them again",
    ):
        pipeline.check_one_clip(out, imported.resolve())
    # The CLIP moved away and no clip_ckpt given: the rerun trained a new clip stage, skipped the finished
    # stages, and only the sample stage refused the cascade.
    shutil.move(imported, tmp_path / "moved")
    with pytest.raises(SystemExit, match=rf"embed was made with the CLIP weights of {made_by} \(step 0\), which "
                       rf"is not there now \(moved\?\), and this run would train a new clip stage in {out}/clip"):  # fmt: skip
        pipeline.check_one_clip(out, None)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pipeline_runs_every_stage_on_two_ranks_reports_once_and_skips_finished_stages(tmp_path):
    """The whole cascade under torchrun on 2 processes: each stage trains on both (devices from the
    launcher), each rank embeds half of the shards and the stage's counts are the sum, the prior starts
    only when both have written theirs, and rank 0 alone exports, reports and samples (each rank used to
    train on its own here, devices=auto being one CPU process, into the same directories; and on any
    machine each rank wrote its own done.json, export and report, with no wait between stages). Then, on
    one process, a rerun skips every finished stage, and a run that fails in a stage keeps the report of
    those before it."""
    out = tmp_path / "pipeline"
    tiny = ["trainer.max_steps=3", "trainer.val_check_interval=3", "module.val_max_samples=4"]
    args = [
        "-m",
        "train.pipeline",
        f"out_dir={out}",
        "+clip.debug=fast",
        "clip.trainer.max_steps=5",
        "clip.trainer.val_check_interval=5",
        "+prior.data.global_batch_size=16",
        "+prior.data.num_workers=0",
        "prior.trainer.max_steps=4",
        "prior.trainer.val_check_interval=4",
        "+prior.module.sample_steps=4",
        *[f"+{stage}.debug=fast" for stage in ("decoder", "upsampler_256", "upsampler_1024")],
        *[f"{stage}.{o}" for stage in ("decoder", "upsampler_256", "upsampler_1024") for o in tiny],
        "+decoder.net.model_channels=16",
        "+decoder.net.head_channels=16",
        "sample.per_category=2",
        "sample.batch=8",
        "sample.grid_per_category=2",
        "sample.fid_reference=16",
        "sample.prior.steps=3",
        "sample.decoder.steps=3",
        "sample.upsamplers=[{steps:2},{steps:2}]",
        "sample.probe=4",
    ]
    first = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         *args],
        cwd=tmp_path, env={**cli_env(tmp_path), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    printed = first.stdout + first.stderr
    assert first.returncode == 0, printed[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["clip"]["trainer/global_step"] == 5
    assert report["embed"]["embed/train_samples"] == 256 and report["embed"]["embed/val_samples"] == 64
    sizes = json.loads((out / "embed" / "train" / "sizes.json").read_text())
    assert sum(sizes.values()) == 256 and len(sizes) == 4, sizes  # each rank's shards, written once
    assert printed.count("global batch 16 = 8 per device x 2 ranks") >= 2  # the clip and the prior
    assert printed.count("pipeline finished:") == 1  # rank 0's summary only
    for log in ("pipeline.log", "pipeline.rank1.log"):  # each rank its own log file
        assert (out / log).read_text().count("stage clip: python -m train.run") == 1, log
    assert report["prior"]["trainer/global_step"] == 4 and "val/cos_pred_image" in report["prior"]
    for stage in ("decoder", "upsampler_256", "upsampler_1024"):
        assert report[stage]["trainer/global_step"] == 3, stage
        assert (out / stage / "export" / "model.safetensors").exists(), stage
    assert "val/colour_match" in report["decoder"] and "val/psnr_bicubic" in report["upsampler_1024"]
    bench = report["sample"]  # on rank 0 while rank 1 waits, its CLIP-FID included (it synced over the group)
    assert bench["bench/n"] == 8 and 0 <= bench["bench/single/colour_shape"] <= 1
    assert "bench/clip_fid" in bench and "bench/clip_score" in bench
    assert (
        bench["bench/clip_fid_reference_n"] > 0 and bench["bench/clip_fid_dim"] > 0
    )  # what its bias hangs on
    assert Image.open(out / "samples.png").size[0] > 2 * 128
    for stage in ("embed", "sample"):  # where they ran (no GPU here)
        assert json.loads((out / stage / "done.json").read_text())["device"] == "cpu", stage
    assert (out / "clip" / "checkpoints" / "last.ckpt").exists()
    md = (out / "report.md").read_text()
    assert "| val/zeroshot_colour_top1 |" in md and "bench/single/colour_shape" in md and "samples.png" in md
    assert "## benchmark, per category (program-scored)" in md and "| binding | " in md and "vs single" in md
    # the probe: ground-truth renders through each stage, in report.json and report.md
    assert bench["probe/renders_at_16_px/shape"] >= 0.75 and "probe/decoder_caption_only/colour" in bench
    assert "| renders -> upsampler 2 (64 px) |" in md
    assert 0 <= bench["probe/binding/prior"] <= 1 and "probe/spatial/decoder_image_caption/relation" in bench
    assert "| probe | binding | spatial |" in md
    second = run_python(args, tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert (second.stderr + second.stdout).count("already finished") == 7
    # a run that fails in a stage leaves the report of the stages before it
    (out / "prior" / "done.json").unlink()
    third = run_python([*args, "stages=[clip,embed,prior]", "+prior.module.optimizer.lr=-1"], tmp_path)
    assert third.returncode != 0 and "module.optimizer.lr=-1" in third.stderr
    assert set(json.loads((out / "report.json").read_text())) == {"clip", "embed"}


class _FakeClip:
    """What eval.metrics.fid reads of a FrozenClip: an embedding per image."""

    embed_dim = 3

    def embed(self, images, tokens):
        return {"img_emb": images.float().mean((2, 3))}


def _share_on_two_ranks(rank: int, port: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from eval.metrics import fid
    from train.pipeline import Ranks

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=20)
    )
    ranks = Ranks(rank, 2)
    ranks.group = dist.new_group(backend="gloo")
    record = {"shared": ranks.share(lambda x: x + rank, 40), "gathered": ranks.gather(rank * 10)}
    images = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (8, 3, 4, 4), generator=images, dtype=torch.uint8) for _ in range(2))
    try:  # the sample stage's CLIP-FID, on rank 0 alone: no collective on the default group
        record["fid"] = ranks.share(fid, a, b, clip=_FakeClip())
    except SystemExit as e:
        record["fid"] = str(e)
    try:
        ranks.share(lambda: 1 / 0)
    except SystemExit as e:
        record["failed"] = str(e)
    except ZeroDivisionError as e:
        record["failed"] = f"raised {type(e).__name__}"
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_pipeline_ranks_take_rank_zeros_result_and_its_failure(tmp_path):
    """Ranks.share: rank 0 runs it, every rank returns its result; its exception ends rank 0 as raised and
    the others with a message that names it (not a wait until the group's timeout)."""
    import torch.multiprocessing as mp

    mp.spawn(_share_on_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["shared"] for r in records] == [40, 40] and [r["gathered"] for r in records] == [[0, 10]] * 2
    # torchmetrics' FID synced its states over the default group when there was one: rank 0 waited there
    # for ranks that were waiting for it (here until the group's 20 s timeout)
    assert isinstance(records[0]["fid"], float) and records[1]["fid"] == records[0]["fid"], records
    assert records[0]["failed"] == "raised ZeroDivisionError"
    assert records[1]["failed"] == "rank 1: rank 0 failed: ZeroDivisionError: division by zero"


def test_ranks_come_from_the_launcher_as_lightning_reads_it_and_not_from_an_allocation(monkeypatch):
    """data/ranks.py, for the pipeline, data.embed, the config's batch check and the W&B id: torchrun's
    variables give the ranks; a SLURM allocation named bash or interactive is no launch (Lightning ignores it
    too: each rank would have met its peers on a port of its own), and a several-task sbatch script's own
    process is refused; the pipeline's default group is made with Lightning's 30-minute timeout, which the
    strategies would have passed (NCCL's own default is 10)."""
    from datetime import timedelta

    import lightning_fabric.utilities.distributed as fabric_distributed

    from data.ranks import LaunchError, is_global_zero, launch_environment, rank_and_world
    from train import pipeline

    for name in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC"))] + [
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT", "NODE_RANK",
    ]:  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert launch_environment() is None and pipeline.Ranks.start().world == 1
    assert rank_and_world() == (0, 1) and is_global_zero()
    for name, value in {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": "3"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    # data.embed took the allocation's task count: in an salloc shell it embedded 1 shard in 16 and exited 0
    assert launch_environment() is None and rank_and_world() == (0, 1)
    monkeypatch.setenv("SLURM_JOB_NAME", "embed.sbatch")  # the batch script itself: not started by srun
    with pytest.raises(LaunchError, match="SLURM_NTASKS=16 .* srun did not start this process"):
        rank_and_world()
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # srun's task
    assert rank_and_world() == (3, 16) and not is_global_zero()
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "2")  # a split by hand (a job array)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_environment() is None and rank_and_world() == (2, 4)
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("NODE_RANK", "1")  # Lightning's launcher on the second node: its parent process
    assert rank_and_world() == (0, 1) and not is_global_zero()  # wrote the W&B id as if it were rank 0
    monkeypatch.delenv("NODE_RANK")
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "x", "MASTER_PORT": "29999"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    environment = launch_environment()
    assert (environment.global_rank(), environment.world_size(), environment.local_rank()) == (1, 2, 1)
    made = {}
    monkeypatch.setattr(fabric_distributed, "_init_dist_connection", lambda *a, **k: made.update(k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipeline._connect(environment, 1, 2)
    assert made["timeout"] == timedelta(minutes=30) and made["world_size"] == 2 and made["global_rank"] == 1


def test_one_pipeline_process_trains_each_stage_on_one_device(monkeypatch):
    """Without a launcher, devices=auto on a host of 8 GPUs made Lightning start 7 more copies of the whole
    pipeline, none of them a rank of it (each failed to join rank 0's port); one process is one device, and
    more devices in one process are refused with the launch to use instead."""
    from train import pipeline

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    one = pipeline.Ranks()
    for given in ({}, {"trainer": {"devices": None}}, {"trainer": {"devices": "auto"}}):
        one.launched("decoder", given)
        assert given["trainer"]["devices"] == 1
    kept = {"trainer": {"devices": [3]}}
    one.launched("decoder", kept)
    assert kept["trainer"]["devices"] == [3]
    for devices in (2, -1, [0, 1]):
        with pytest.raises(SystemExit, match=r"prior.trainer.devices=.* one pipeline process.*torchrun"):
            one.launched("prior", {"trainer": {"devices": devices}})
    untouched: dict = {}
    one.launched("embed", untouched)
    assert untouched == {}


def test_pipeline_embeds_and_samples_on_the_gpu_when_there_is_one(tmp_path, monkeypatch):
    """embed and sample run in the pipeline's own process, not under a Trainer: with a GPU they must ask
    for it (they used to embed and sample preset=gpu's cascade on the CPU); embed.device overrides."""
    import data.embed
    import train.cascade
    from train import pipeline

    class Called(Exception):
        pass

    def record(*args, **kwargs):
        seen.append(kwargs.get("device"))
        raise Called

    seen: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(train.cascade.Cascade, "load", record)
    monkeypatch.setattr(data.embed, "embed_shards", record)
    for stage in ("decoder", "upsampler_256"):
        (tmp_path / stage / "export").mkdir(parents=True)
        (tmp_path / stage / "export" / "config.yaml").write_text("{}")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "done.json").write_text("{}")
    (tmp_path / "clip" / "config.yaml").write_text("data: {train_shards: x, val_shards: y}")
    with pytest.raises(Called):
        pipeline.run_sample({}, tmp_path, ("upsampler_256",))
    for options in ({}, {"device": "cpu"}):
        with pytest.raises(Called):
            pipeline.run_embed(options, tmp_path)
    assert seen == ["cuda:1", "cuda:1", "cpu"]


def test_pipeline_refuses_unknown_stage_names_before_running_any():
    from train.pipeline import check_stages

    check_stages(["clip", "embed", "prior", "decoder", "upsampler_256", "upsampler_1024", "sample"])
    with pytest.raises(SystemExit, match=r"stages: unknown \['upsampler'\]; expected names from \['clip'"):
        check_stages(["clip", "upsampler"])


def test_pipeline_checks_sample_settings_and_the_lever_before_any_stage_runs():
    """`sample` and `sample.lever` are read after every stage has trained: a key or value they cannot take
    stops the run at its start, named."""
    from hydra import compose, initialize_config_dir

    from train.pipeline import check_sample
    from train.run import CONF_DIR

    def check(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            check_sample(compose("pipeline", overrides=list(overrides)))

    check()
    check("preset=gpu")  # its lever: guidance on the prior
    check("+sample.lever={decoder: {condition: caption}}")
    check("stages=[clip]", "+sample.lever={decodr: {}}")  # no sample stage: nothing to check
    with pytest.raises(
        SystemExit, match=r"sample.lever.decodr: expected a stage among \['decoder', 'prior'\]"
    ):
        check("+sample.lever={decodr: {steps: 2}}")
    with pytest.raises(SystemExit, match=r"sample.lever.decoder: .*'guidance'.* \(settings: \['steps'"):
        check("+sample.lever={decoder: {guidance: 2}}")
    with pytest.raises(SystemExit, match=r"sample.lever.decoder.condition='text': expected one of \['both'"):
        check("+sample.lever={decoder: {condition: text}}")
    with pytest.raises(
        SystemExit, match=r"sample.precision='fp8': expected one of \['auto', 'bf16', 'fp32'\]"
    ):
        check("sample.precision=fp8")
    with pytest.raises(SystemExit, match=r"sample.decoder.sampler='euler': expected one of \['ddim', 'ddpm'"):
        check("+sample.decoder.sampler=euler")
    with pytest.raises(SystemExit, match=r"sample.decoder.condition='captions': expected one of \['both'"):
        check("+sample.decoder.condition=captions")
    with pytest.raises(SystemExit, match=r"sample.upsamplers\[1\]: .*'step'"):
        check("sample.upsamplers=[{steps: 2},{step: 2}]")
    with pytest.raises(
        SystemExit, match=r"sample.upsamplers: 2 settings for the 1 upsampler\(s\) of stages "
    ):
        check("stages=[clip,embed,prior,decoder,upsampler_256,sample]")  # the default lists two
    check("stages=[clip,embed,prior,decoder,upsampler_256,sample]", "sample.upsamplers=[{steps: 27}]")


@pytest.mark.parametrize("preset", [None, "gpu", "gpu_smoke", "cpu_shapes"])
def test_pipeline_checks_that_decoder_and_upsamplers_chain_before_any_stage_runs(preset, tmp_path):
    """A 32 px decoder before the default 16 -> 32 upsampler would train every stage, then fail when
    `sample` loads the cascade; the check stops it at the start and names the keys."""
    from hydra import compose, initialize_config_dir

    from train.pipeline import check_image_sizes
    from train.run import CONF_DIR

    def pipeline(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose("pipeline", overrides=[*([f"preset={preset}"] if preset else []), *overrides])
            check_image_sizes(cfg, tmp_path)

    pipeline()  # the shipped configs chain
    pipeline("stages=[clip,decoder,sample]")  # nothing to chain
    first = "upsampler_1024" if preset == "cpu_shapes" else "upsampler_256"  # its decoder is 32 px
    with pytest.raises(SystemExit, match=rf"{first}.module.low_res_size=\d+, but decoder outputs 40 px"):
        pipeline("++decoder.net.image_size=40")
    if preset is None:  # the 32 px cascade of docs/results.md: the decoder straight into the 32 -> 64 stage
        pipeline("stages=[clip,embed,prior,decoder,upsampler_1024,sample]", "++decoder.net.image_size=32")
        with pytest.raises(SystemExit, match=r"upsampler_1024.module.low_res_size=32, but upsampler_256 "):
            pipeline("++upsampler_256.net.image_size=64")


def test_time_budget_splits_the_time_left_by_shares_and_refuses_bad_values():
    from omegaconf import OmegaConf

    from train.pipeline import check_time_budget, dhms, time_allotment

    shares = {"clip": 1, "prior": 1, "decoder": 5, "upsampler_256": 1, "sample": 2}
    stages = ["clip", "embed", "prior", "decoder", "upsampler_256", "sample"]
    assert time_allotment(420, 20, stages, shares) == pytest.approx(40)  # 400 s left, 1 of 10 shares
    assert time_allotment(420, 100, stages[3:], shares) == pytest.approx(320 * 5 / 8)
    assert time_allotment(420, 500, stages[3:], shares) == 1.0  # over budget: one second, not zero
    assert time_allotment(60, 0, ["clip"], {}) == 60.0  # no shares: all that is left
    assert dhms(754.9) == "00:00:12:34" and dhms(90061) == "01:01:01:01"  # Lightning's max_time format
    check_time_budget(OmegaConf.create({"time_budget": 420, "time_shares": shares}))
    check_time_budget(OmegaConf.create({"time_budget": None}))
    with pytest.raises(SystemExit, match=r"time_budget: expected seconds > 0 or null, got '7min'"):
        check_time_budget(OmegaConf.create({"time_budget": "7min"}))
    with pytest.raises(SystemExit, match=r"time_shares.decodr: unknown stage"):
        check_time_budget(OmegaConf.create({"time_budget": 60, "time_shares": {"decodr": 1}}))
    with pytest.raises(SystemExit, match=r"time_shares.clip: expected a number >= 0, got -1"):
        check_time_budget(OmegaConf.create({"time_budget": 60, "time_shares": {"clip": -1}}))


@pytest.mark.slow
def test_time_budget_stops_a_stage_early_validated_checkpointed_and_exported(tmp_path):
    """time_budget=5: the CLIP stage's 100,000 steps are cut at its 5 s (trainer.max_time); it still
    validates, checkpoints and exports the step where it stopped, and the report says so."""
    out = tmp_path / "pipeline"
    args = ["-m", "train.pipeline", f"out_dir={out}", "stages=[clip]", "time_budget=5", "+clip.debug=fast",
            "clip.trainer.max_steps=100000", "clip.trainer.val_check_interval=100000"]  # fmt: skip
    result = run_python(args, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    clip = json.loads((out / "report.json").read_text())["clip"]
    assert 0 < clip["trainer/global_step"] < 100000 and clip["clip/seconds_allotted"] <= 5
    assert "val/zeroshot_colour_top1" in clip  # validated at the step it stopped
    assert clip["clip/seconds"] < 5 + 45  # setup, the final validation and the export are not cut
    export = json.loads((out / "clip" / "export" / "export.json").read_text())
    assert export["global_step"] == clip["trainer/global_step"]
    steps = int(clip["trainer/global_step"])
    assert f"| clip | {clip['clip/seconds']:.0f} | {steps} | " in (out / "report.md").read_text()
    again = run_python(args, tmp_path)  # a finished stage is skipped: no time allotted to it
    printed = again.stdout + again.stderr
    assert again.returncode == 0 and "already finished" in printed and "stops at" not in printed
    bad = run_python(["-m", "train.pipeline", f"out_dir={tmp_path / 'bad'}", "stages=[clip]",
                      "+clip.trainer.max_time=5min"], tmp_path)  # fmt: skip
    assert bad.returncode != 0 and "trainer.max_time" in bad.stderr and "DD:HH:MM:SS" in bad.stderr


@pytest.mark.slow
def test_wandb_offline_logs_config_and_perf_resumes_the_same_run_and_keeps_no_secret(tmp_path):
    run_dir = tmp_path / "run"
    canary = "canary-7d1e0c5a9b3f4e21"
    # (no console capture: the final metrics line holds every key, so the keys below must be W&B history's)
    env = {**cli_env(tmp_path), "WANDB_API_KEY": canary, "WANDB_CONSOLE": "off"}
    for steps in (5, 7):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "train.run",
                "debug=fast",
                "logger=wandb",
                "trainer.log_every_n_steps=2",
                f"trainer.max_steps={steps}",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-4000:]
    run_id = (run_dir / "wandb_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs), runs  # one W&B run, resumed
    logged = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
    for key in (b"stage_name", b"perf/samples_per_sec", b"perf/data_wait_frac", b"perf/tflops_per_device"):
        assert key in logged, key
    # the API key never lands in the run directory (Hydra's .hydra/, W&B files, logs, checkpoints)
    leaked = [str(f) for f in tmp_path.rglob("*") if f.is_file() and canary.encode() in f.read_bytes()]
    assert not leaked, leaked


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ranks_of_a_launch_must_be_given_their_run_directory(monkeypatch):
    """`torchrun -m train.run ...` without hydra.run.dir: each rank named its directory by its own start
    time (two directories when launched either side of a second), and a rerun never resumed. Refused
    before anything is written; one process, a sweep, or a given directory pass."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    import train.run
    from train.config import ConfigError

    given: list[str] = []
    hydra_cfg = SimpleNamespace(mode=RunMode.RUN, overrides=SimpleNamespace(hydra=given, task=["debug=fast"]))
    monkeypatch.setattr(train.run.HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    for name in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC"))]:
        monkeypatch.delenv(name)
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    train.run.check_run_dir_given()  # one process
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                "TORCHELASTIC_RUN_ID": "x", "MASTER_PORT": "29999"}  # fmt: skip
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(
        ConfigError, match=r"2 processes, each composing its own run directory.*hydra.run.dir="
    ):
        train.run.check_run_dir_given()
    given.append("hydra.run.dir=outputs/clip-a")
    train.run.check_run_dir_given()
    given.clear()
    hydra_cfg.overrides.task.append("paths.output_dir=/shared/runs/clip-a")
    train.run.check_run_dir_given()
    hydra_cfg.overrides.task.pop()
    hydra_cfg.mode = RunMode.MULTIRUN  # the sweep's launcher names each job's directory
    train.run.check_run_dir_given()


def test_launch_torchrun_wrapper_starts_two_ranks(tmp_path):
    """On one node without MASTER_PORT the wrapper takes a free port (torchrun --standalone: a second launch
    on the machine joined the first one's rendezvous on 29500); several nodes need a RUN_ID they share."""
    run_dir = tmp_path / "run"
    env = {
        **{k: v for k, v in cli_env(tmp_path).items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RUN_ID")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "NPROC_PER_NODE": "2",
        "RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
    }
    several = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh")], env={**env, "NNODES": "2"},
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert several.returncode == 2 and "NNODES=2 needs RUN_ID" in several.stderr, several.stderr
    import socket

    with socket.socket() as other:  # another job's rendezvous where the old default port was
        try:
            other.bind(("127.0.0.1", 29500))
            other.listen()
        except OSError:
            pass  # (taken already: as good)
        result = subprocess.run(
            [
                "bash",
                str(REPO / "launch" / "torchrun.sh"),
                "debug=fast",
                "trainer.accelerator=cpu",
                "strategy=ddp",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((run_dir / "metrics.json").read_text())["trainer/global_step"] == 5
    assert "global batch 16 = 8 per device x 2 ranks" in result.stdout + result.stderr
    assert f"run directory {run_dir}" in result.stderr
    # Lightning's own messages reach the run's log too (they went to stderr only: its handler, no propagation)
    log = (run_dir / "run.log").read_text()
    assert "`Trainer.fit` stopped: `max_steps=5` reached" in log
    assert "sync_dist=True" not in log  # (Lightning's advice for val/* keys, which are gathered already)


@pytest.mark.slow
def test_local_multirun_sweep_gives_each_point_its_run_directory(tmp_path):
    sweep = tmp_path / "sweep"
    sweep_lr = "module.optimizer.lr=1e-3,2e-3"
    result = run_python(
        ["-m", "train.run", "--multirun", "debug=fast", sweep_lr, f"hydra.sweep.dir={sweep}"],
        tmp_path,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for point, lr in (("0", 1e-3), ("1", 2e-3)):
        assert json.loads((sweep / point / "metrics.json").read_text())["trainer/global_step"] == 5
        assert yaml.safe_load((sweep / point / "config.yaml").read_text())["module"]["optimizer"]["lr"] == lr


def test_a_cli_that_ended_well_leaves_its_process_group(tmp_path):
    """train.run and train.pipeline end with train.run.end_process: the process group is destroyed
    (Lightning keeps it; left to the interpreter's exit, gloo's threads can abort the process), and the
    objects made so far are out of the last garbage collections."""
    import gc

    import torch.distributed as dist

    from train.run import end_process

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        end_process()
        assert not dist.is_initialized() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_cli_run_past_its_timeout_fails_with_what_it_printed(tmp_path):
    """tests' run_python: a stalled command (on the GPU tier, the smoke cascade) fails the test with the
    end of its output, rather than a bare TimeoutExpired, so the report says where it stalled."""
    script = "import sys, time; print('reached the sample stage', flush=True); time.sleep(60)"
    with pytest.raises(AssertionError, match=r"(?s)ran past 3 s.*reached the sample stage"):
        run_python(["-c", script], tmp_path, timeout=3)


def test_a_process_group_made_in_a_test_ends_with_it():
    """tests/conftest.py ends every test with no process group and its MASTER_PORT gone, so that a later
    test's subprocesses neither inherit the port nor find it still held by this process's store."""
    import socket

    import torch.distributed as dist

    from tests.conftest import distributed_state_restored

    port = free_port()
    with distributed_state_restored():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    assert not dist.is_initialized() and "MASTER_PORT" not in os.environ
    with socket.socket() as sock:  # the store no longer listens there
        sock.bind(("127.0.0.1", port))


def test_runs_of_another_stage_are_refused_where_a_clip_or_a_checkpoint_is_expected(tmp_path):
    """clip_ckpt=<a prior or upsampler run> failed on a missing config key (net.text); resume=<another
    stage's checkpoint> in Lightning's state-dict load (a page of missing keys); resume=<a run directory>
    in fsspec (IsADirectoryError); a CLIP tool given another run said "expected a CLIP run directory
    (with tokenizer.json)" of a run that has one. Each names what it was given now."""
    from eval.zeroshot import evaluate_run
    from train.config import ConfigError
    from train.frozen_clip import FrozenClip

    ups = tmp_path / "ups"
    train(
        _fast_cfg(tmp_path, ups, "stage=upsampler_256", "trainer.max_steps=2", "trainer.val_check_interval=2")
    )
    with pytest.raises(ConfigError, match=f"clip_ckpt={ups}: a upsampler_256 run; expected a CLIP run"):
        train(_fast_cfg(tmp_path, tmp_path / "dec", "stage=decoder", f"clip_ckpt={ups}"))
    last = ups / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"a checkpoint of another run \(stage_name: 'upsampler_256' there"):
        train(_fast_cfg(tmp_path, tmp_path / "clip", f"resume={last}"))
    with pytest.raises(FileNotFoundError, match=f"resume={ups}: a directory, not a checkpoint"):
        train(_fast_cfg(tmp_path, tmp_path / "clip", f"resume={ups}"))
    for load in (FrozenClip, evaluate_run):
        with pytest.raises(ValueError, match=f"{ups}: a upsampler_256 run; expected a CLIP run"):
            load(str(ups))
    from train.checkpoint import export_stage

    assert json.loads((export_stage(ups) / "export.json").read_text())["ema"] is True


def test_damaged_or_mismatched_run_files_are_errors_naming_the_file(clip_run, tmp_path):
    """A truncated model.safetensors raised safetensors' "incomplete metadata" naming no file; an
    export.json or tokenizer.json that is not JSON a bare JSONDecodeError; a tokenizer.json of another
    run (another vocabulary) a page of size mismatches."""
    import shutil

    from data.tokenizer import Tokenizer, train_bpe
    from train.checkpoint import export_stage, load_stage

    run, _ = clip_run
    export = export_stage(run, tmp_path / "export")
    assert (
        json.loads((export / "export.json").read_text())["ema"] is False
    )  # a CLIP has no EMA (it said true)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{weights}: damaged or truncated"):
        load_stage(export)
    export = export_stage(run, tmp_path / "export2")
    (export / "export.json").write_text("{global_step: 3")
    with pytest.raises(ValueError, match=f"{export / 'export.json'}: not valid JSON"):
        load_stage(export)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "tokenizer.json").write_text("not json")
    with pytest.raises(ValueError, match=f"{copy / 'tokenizer.json'}: not valid JSON"):
        Tokenizer.load(copy / "tokenizer.json")
    other = train_bpe(["a blue cat", "two green dogs on a mat"], vocab_size=530, context_length=16)
    other.save(copy / "tokenizer.json")
    with pytest.raises(
        ValueError, match=r"text.token_embedding.weight \(\d+, 128\) there, \(\d+, 128\) here"
    ) as err:
        load_stage(copy)
    assert f"the net's vocabulary comes from {copy / 'tokenizer.json'}" in str(err.value)


def test_a_pipeline_stage_whose_earlier_stage_is_missing_names_it(tmp_path):
    """stages=[prior] in a fresh directory failed on "shard spec .../embed/train matches no file" (and a
    decoder on a missing CLIP run): the stage it needs is named, before anything trains."""
    from hydra import initialize_config_dir

    from train import pipeline
    from train.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        with pytest.raises(
            SystemExit, match=r"stage prior needs the finished clip stage in .*/clip \(stages="
        ):
            pipeline.run_stage("prior", {}, tmp_path)
        (tmp_path / "clip").mkdir()
        (tmp_path / "clip" / "done.json").write_text("{}")
        with pytest.raises(
            SystemExit, match=r"stage prior needs the finished embed stage in .*/embed \(stages="
        ):
            pipeline.run_stage("prior", {}, tmp_path)
        (tmp_path / "clip" / "done.json").unlink()
        with pytest.raises(SystemExit, match=r"stage decoder needs the finished clip stage"):
            pipeline.run_stage("decoder", {}, tmp_path)
        # a CLIP trained elsewhere, kept next to the stages (not inside <out_dir>/clip): no clip stage needed
        with pytest.raises(SystemExit, match=r"stage prior needs the finished embed stage"):
            pipeline.run_stage("prior", {}, tmp_path, clip=tmp_path / "clip_openai")


@pytest.mark.slow
def test_each_run_of_a_process_gets_its_own_wandb_run(tmp_path, monkeypatch):
    """A sweep's points (and the pipeline's stages) train in one process: Lightning left the first W&B run
    open and the second run reused it ("a wandb run already in progress"), writing its steps and config
    into the first one's run and none of its own."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = [tmp_path / "point0", tmp_path / "point1"]
    for out in runs:
        train(_fast_cfg(tmp_path, out, "logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=2"))
    for out in runs:
        run_id = (out / "wandb_id").read_text().strip()
        assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 1, out
    # a launch refused as another stage's (check_same_run) no longer opens the run's W&B run first, its
    # config logged under that run's id
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="holds another run"):
        train(_fast_cfg(tmp_path, runs[0], "logger=wandb", "stage=upsampler_256"))
    assert len(list((runs[0] / "wandb").glob("offline-run-*"))) == 1


def test_the_progress_bar_draws_only_on_a_terminal_by_default(monkeypatch, tmp_path):
    """The bar was on whenever enable_progress_bar was (the default): redirected to a file, a SLURM job's
    .out got its carriage-return frames glued to the log lines."""
    import sys

    from train.callbacks.progress_bar import LossProgressBar
    from train.run import build_callbacks, build_trainer

    def has_bar(*overrides: str) -> bool:
        cfg = compose_config(["logger=none", f"paths.output_dir={tmp_path}", *overrides])
        return any(isinstance(c, LossProgressBar) for c in build_callbacks(cfg))

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert not has_bar() and has_bar("trainer.enable_progress_bar=true")
    cfg = compose_config(["logger=none", f"paths.output_dir={tmp_path}"])
    assert build_trainer(cfg, [], []).progress_bar_callback is None
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert has_bar() and not has_bar("trainer.enable_progress_bar=false")


def test_wandb_runs_are_named_by_their_directory_and_grouped_by_sweep(tmp_path, monkeypatch):
    """Every run, sweep point and stage was named after its stage alone ("clip")."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from train.run import build_loggers

    cfg = compose_config(["logger=wandb", f"paths.output_dir={tmp_path / 'clip-a'}"])
    monkeypatch.setenv("WANDB_SILENT", "true")
    (logger,) = build_loggers(cfg)
    assert logger._wandb_init["name"] == "clip-clip-a" and "group" not in logger._wandb_init
    launched = SimpleNamespace(mode=RunMode.MULTIRUN, sweep=SimpleNamespace(dir="/runs/lr_sweep"))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: launched))  # as under --multirun
    (logger,) = build_loggers(cfg)
    assert logger._wandb_init["group"] == "lr_sweep"


def test_a_run_resumed_at_its_last_step_keeps_its_metrics(tmp_path):
    """Rerunning a finished run (a sweep rerun to complete its failed points) resumed at max_steps, took no
    step, and wrote metrics.json with the step alone: the sweep got no loss back."""
    out = tmp_path / "run"
    first = train(_fast_cfg(tmp_path, out, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    again = train(_fast_cfg(tmp_path, out, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert again["train/loss"] == first["train/loss"] and again["val/loss"] == first["val/loss"]
    assert json.loads((out / "metrics.json").read_text())["train/loss"] == first["train/loss"]


def test_a_preempted_sweep_point_ends_its_job_instead_of_returning_a_result(monkeypatch):
    """A point stopped by a preemption returned its unfinished loss: submitit reported it as the point's
    result (the client moved on while the requeued job trained), and a local sweep went on to its next
    point after a SIGTERM."""
    import train.run

    monkeypatch.setattr(
        train.run,
        "train",
        lambda cfg: {"trainer/global_step": 21, "trainer/preempted": 1.0, "train/loss": 2.5},
    )
    monkeypatch.setattr(train.run, "check_run_dir_given", lambda: None)
    monkeypatch.setattr(train.run, "_sweep_name", lambda: "lr_sweep")
    cfg = compose_config(["paths.output_dir=/tmp/unused"])
    with pytest.raises(SystemExit, match="preempted at step 21; the point resumes when rerun"):
        train.run.main.__wrapped__(cfg)
    monkeypatch.setattr(train.run, "_sweep_name", lambda: None)  # a single run returns as before
    assert train.run.main.__wrapped__(cfg) == 2.5


def test_a_sweep_rerun_with_its_values_reordered_is_refused_not_resumed_as_another_point(
    tmp_path, monkeypatch, caplog
):
    """Points are numbered by the order of the swept values: rerun with `lr=2e-3,1e-3` into the same
    hydra.sweep.dir, point 0 resumed the 1e-3 run's checkpoint and labelled it 2e-3. Outside a sweep a
    changed setting is logged, key by key."""
    from train import run as run_module
    from train.config import ConfigError

    out = tmp_path / "0"
    train(_fast_cfg(tmp_path, out, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    monkeypatch.setattr(run_module, "_sweep_name", lambda: "lr_sweep")
    changed = ("module.optimizer.lr=0.003", "trainer.max_steps=4", "trainer.val_check_interval=2")
    with pytest.raises(
        ConfigError,
        match=r"holds a sweep point with other settings \(module.optimizer.lr: 0.002 there, 0.003 here",
    ):
        train(_fast_cfg(tmp_path, out, *changed))
    monkeypatch.setattr(run_module, "_sweep_name", lambda: None)
    with caplog.at_level("WARNING", logger="train.run"):
        train(_fast_cfg(tmp_path, out, *changed))
    assert "module.optimizer.lr: 0.002 -> 0.003" in caplog.text and "trainer.max_steps: 2 -> 4" in caplog.text


def _tfrecords(path: Path):
    """The records of a TensorBoard event file (TFRecord framing: length, its CRC, data, its CRC)."""
    import struct

    data, at = path.read_bytes(), 0
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at : at + 8])
        yield data[at + 12 : at + 12 + n]
        at += 12 + n + 4


def test_a_run_resumed_from_an_older_checkpoint_logs_each_step_once(tmp_path):
    """A crash between checkpoints: the relaunch resumes at step 6 of a run that logged up to step 7.
    CSV began a version_1/metrics.csv per launch (and its steps 6-7 twice over the two files), TensorBoard
    showed steps 6 and 7 twice. Now one metrics.csv, each step once, and a purge marker at step 6 in the
    relaunch's event file, the one TensorBoard drops the earlier files' later steps by."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out = tmp_path / "run"
    common = (
        "logger=[csv,tensorboard]",
        "trainer.log_every_n_steps=1",
        "callbacks.checkpoint.every_n_train_steps=3",
    )
    train(_fast_cfg(tmp_path, out, *common, "trainer.max_steps=8", "trainer.val_check_interval=8"))
    (out / "checkpoints" / "last.ckpt").unlink()  # (the crash: the newest checkpoint is step 6's)
    train(_fast_cfg(tmp_path, out, *common, "trainer.max_steps=10", "trainer.val_check_interval=10"))
    with open(out / "csv" / "run" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(10)), steps
    first, second = sorted((out / "tensorboard" / "run").glob("events.out.tfevents*"))
    marks = [
        e.step for e in map(Event.FromString, _tfrecords(second)) if e.session_log.status == SessionLog.START
    ]
    assert marks == [6]
    assert not [
        e for e in map(Event.FromString, _tfrecords(first)) if e.session_log.status == SessionLog.START
    ]


def test_a_resume_compares_the_clip_weights_by_digest_also_one_recorded_before_whole_hashes(tmp_path, caplog):
    """A prior or decoder records the CLIP weights it trained with (``clip_weights``); a resume whose CLIP
    loads others is refused. A digest recorded before the digest hashed every byte (its strided part only)
    is the same weights, neither refused nor listed as a changed setting; another digest is refused."""
    from omegaconf import OmegaConf, open_dict

    from train.config import ConfigError
    from train.run import check_same_run

    cfg = compose_config(["stage=prior", f"paths.output_dir={tmp_path}", "clip_ckpt=/clips/a"])
    with open_dict(cfg):
        cfg.clip_weights = {
            "checkpoint": "/clips/a/last.ckpt",
            "global_step": 2,
            "digest": "0123abcd.feed5678",
        }
    saved = OmegaConf.to_container(cfg, resolve=True)
    for recorded, refused in (("0123abcd", False), ("0123abcd.feed5678", False), ("0123abcd.0000ffff", True),
                              ("9999abcd", True)):  # fmt: skip
        saved["clip_weights"]["digest"] = recorded
        OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
        caplog.clear()
        if refused:
            with pytest.raises(ConfigError, match="other weights than the CLIP this run has trained with"):
                check_same_run(cfg, tmp_path)
        else:
            check_same_run(cfg, tmp_path)
            assert "clip_weights" not in caplog.text, recorded
