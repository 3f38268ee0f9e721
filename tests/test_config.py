"""Config mistakes fail at start with the key named: a typo, an unknown group option, a wrong type, an
impossible value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from data.ranks import LaunchError
from tests.conftest import compose_config
from train.config import ConfigError, validate
from train.modules.compat import upgrade_config, upgrade_overrides

REPO = Path(__file__).resolve().parents[1]


def _compose(*overrides: str):
    return compose_config(list(overrides))


@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler_256", "upsampler_1024"])
def test_every_stage_default_passes(stage):
    validate(_compose(f"stage={stage}"))


def test_a_typo_in_a_key_is_refused_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("trainer.max_stpes=5")
    assert "max_stpes" in str(err.value.__cause__ or err.value)


def test_an_unknown_group_option_lists_the_available_ones():
    with pytest.raises(MissingConfigException) as err:
        _compose("net=clip_vit_nope")
    assert "clip_vit_nope" in str(err.value) and "clip_vit_b16" in str(err.value)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc': expected a positive integer"),
        ("module.optimizer.lr=-0.001", "module.optimizer.lr=-0.001: expected a learning rate > 0"),
        ("data.global_batch_size=0", "data.global_batch_size=0: expected an integer >= 1"),
        ("data.num_workers=1.5", "data.num_workers=1.5: expected an integer >= 0"),
        ("module.optimizer.betas=[0.9]", "module.optimizer.betas=[0.9]: expected two numbers"),
        ("module.optimizer.eps=0", "module.optimizer.eps=0: expected a number > 0"),
        ("module.optimizer.warmup_steps=1.5", "module.optimizer.warmup_steps=1.5: expected an integer >= 0"),
        ("module.optimizer.min_lr_ratio=2", "module.optimizer.min_lr_ratio=2: expected a number in [0, 1]"),
        ("module.optimizer.weight_decay=-1", "module.optimizer.weight_decay=-1: expected a number >= 0"),
        ("+module.optimizer.momentum=0.9", "module.optimizer.momentum: not an optimizer setting"),
        ("data.mode=random", "data.mode='random': expected 'epoch' or 'resampled'"),
        ("data.on_layout_change=continue", "data.on_layout_change='continue': expected 'error' or"),
        ("data.manifest_check=md5", "data.manifest_check='md5': expected 'size' or 'sha256'"),
        ("data.max_bad_fraction=2", "data.max_bad_fraction=2: expected a fraction in [0, 1]"),
        ("trainer.max_time=300", "trainer.max_time=300: expected null or 'DD:HH:MM:SS'"),
        ("trainer.max_time=5min", "trainer.max_time='5min': expected null or 'DD:HH:MM:SS'"),
        ("data.train_crop=left", "data.train_crop='left': expected 'random' or 'center'"),
        ("data.normalize=foo", "data.normalize='foo': expected 'clip', 'minus_one_one', 'unit' or 'none'"),
        (
            "data.image_size=60",
            "data.image_size=60 (data.crop_size null): the CLIP sees 60 px images, net.vision",
        ),
        ("data.crop_size=96", "data.crop_size=96 is larger than data.image_size=64"),
        (
            "stage=prior module.cond_drop_prob=2",
            "module.cond_drop_prob=2: expected a probability in [0, 1]",
        ),
        (
            "stage=prior module.guidance_scale=strong",
            "module.guidance_scale='strong': expected a number >= 0",
        ),
        ("stage=prior module.best_of=0", "module.best_of=0: expected an integer >= 1"),
        (
            "module.accum_freq=0",
            "module.accum_freq=0: expected an integer >= 1 (chunks of each device's batch)",
        ),
        (
            "module.accum_freq=2 strategy=deepspeed_zero2",
            "module.accum_freq=2 with train.strategies.DeepSpeedStrategy: it runs a backward pass per chunk",
        ),
        (
            "module.accum_freq=2 trainer.accumulate_grad_batches=2",
            "module.accum_freq=2 with trainer.accumulate_grad_batches=2: use one of them",
        ),
        (
            "module.accum_freq=2 trainer.precision=16-mixed",
            "module.accum_freq=2 with trainer.precision=16-mixed",
        ),
        ("module.loss=siglip", "module.loss=siglip needs net.init_logit_bias (SigLIP: -10"),
        ("module.loss=sigmoid", "module.loss='sigmoid': expected clip (softmax, InfoNCE) or siglip"),
        ("stage=prior module.sample_steps=0", "module.sample_steps=0: expected an integer >= 1"),
        ("stage=decoder module.drop_text_prob=1.5", "module.drop_text_prob=1.5: expected a probability"),
        # a word Hydra keeps as text for a boolean parameter: any text counts as true (it trained with the
        # option on); a wrong type for a parameter no rule covers (it failed at build, naming the group)
        (
            "stage=upsampler_256 module.residual=no",
            "module.residual='no': expected true or false (Hydra keeps it as text, which counts as true)",
        ),
        ("stage=decoder net.learned_variance=off", "net.learned_variance='off': expected true or false"),
        ("callbacks.checkpoint.every_n_train_steps=abc", "every_n_train_steps='abc': expected an integer"),
        ("trainer.limit_val_batches=all", "trainer.limit_val_batches='all': expected a number"),
        # outside the run directory, resume=auto did not find them: the next launch started from step 0
        (
            "paths.output_dir=/data/run callbacks.checkpoint.dirpath=/scratch/ckpt",
            "callbacks.checkpoint.dirpath=/scratch/ckpt: checkpoints go inside the run directory (/data/run)",
        ),
        # only the CLIP normalises in the data pipeline: the upsampler scaled float images again (black)
        (
            "stage=upsampler_256 data.normalize=minus_one_one",
            "data.normalize='minus_one_one': the upsampler_256 stage takes uint8 images",
        ),
        # module.diffusion is a plain block: unknown keys, wrong types, and the old, ignored sampling_steps
        (
            "stage=decoder +module.diffusion.sampling_steps=50",
            "module.diffusion.sampling_steps: not read; the number of sampling steps is module.sample_steps",
        ),
        (
            "stage=decoder +module.diffusion.schedul=linear",
            "module.diffusion.schedul: not a diffusion setting",
        ),
        (
            "stage=prior module.diffusion.num_timesteps=many",
            "module.diffusion.num_timesteps='many': expected an",
        ),
        (
            "trainer.float32_matmul_precision=tf32",
            "trainer.float32_matmul_precision='tf32': expected 'highest' or 'high' or 'medium'",
        ),
    ],
)
def test_wrong_types_and_impossible_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=None) as err:
        validate(_compose(*override.split()))
    assert named in str(err.value)


def test_a_global_batch_the_processes_cannot_split_is_refused_at_start(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    cfg = _compose("data.global_batch_size=100", "trainer.devices=3")
    with pytest.raises(ConfigError, match=r"data.global_batch_size=100 is not divisible by world size 3"):
        validate(cfg)
    validate(_compose("data.global_batch_size=100", "trainer.devices=2", "trainer.num_nodes=2"))
    with pytest.raises(ConfigError, match=r"world size 2 x trainer.accumulate_grad_batches=4 = 8"):
        validate(
            _compose("data.global_batch_size=100", "trainer.devices=2", "trainer.accumulate_grad_batches=4")
        )
    # under a launcher the process count comes from it; with devices=auto and no launcher, the
    # DataModule checks once Lightning knows the machine
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match=r"not divisible by world size 8"):
        validate(_compose("data.global_batch_size=100"))
    monkeypatch.delenv("WORLD_SIZE")
    validate(_compose("data.global_batch_size=100"))
    # SLURM: srun's tasks are the processes; an allocation's shell (job named bash or interactive) is one
    # process, as Lightning reads it (its task count used to be taken for the world size); a process of a
    # several-task sbatch script that srun did not start is refused, naming srun
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    validate(_compose("data.global_batch_size=100", "trainer.devices=1"))
    monkeypatch.setenv("SLURM_JOB_NAME", "train.sbatch")
    with pytest.raises(LaunchError, match=r"SLURM_NTASKS=8 .* srun did not start this process.*srun python"):
        validate(_compose("data.global_batch_size=100", "trainer.devices=1"))
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(ConfigError, match=r"not divisible by world size 8"):
        validate(_compose("data.global_batch_size=100", "trainer.devices=1"))


def test_an_hsdp_shard_size_that_does_not_divide_the_world_is_refused_at_start(monkeypatch):
    """FSDP's ``strategy.shard_size`` (HSDP groups of that many ranks): a divisor of the world size; the
    strategy refuses again once Lightning knows the world (devices=auto)."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    validate(_compose("strategy=fsdp", "strategy.shard_size=4", "trainer.devices=4", "trainer.num_nodes=2"))
    with pytest.raises(
        ConfigError, match=r"strategy.shard_size=3: expected a positive divisor of the world size, 8"
    ):
        validate(
            _compose("strategy=fsdp", "strategy.shard_size=3", "trainer.devices=4", "trainer.num_nodes=2")
        )
    with pytest.raises(
        ConfigError, match=r"strategy.shard_size=0: expected a positive divisor of the world size "
    ):
        validate(_compose("strategy=fsdp", "strategy.shard_size=0"))
    with pytest.raises(ConfigError, match=r"strategy.shard_size='node': expected an integer or null"):
        validate(_compose("strategy=fsdp", "strategy.shard_size=node"))
    from train.strategies import FSDPStrategy

    with pytest.raises(
        ValueError, match=r"strategy.shard_size=True: expected null \(every rank\) or a positive"
    ):
        FSDPStrategy(shard_size=True)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        validate(
            _compose(
                "stage=decoder",
                "module.optimizer.lr=0",
                "module.ema_decay=1.0",
                "trainer.accumulate_grad_batches=0",
            )
        )
    text = str(err.value)
    assert (
        "module.optimizer.lr=0" in text
        and "module.ema_decay=1.0" in text
        and "trainer.accumulate_grad_batches=0" in text
    )


def test_the_cli_fails_before_building_anything(tmp_path):
    """And reads an old key name on the command line (module.lr) as its new one, with a warning."""
    env = {**os.environ, "UNCLIP_DATA_DIR": str(tmp_path / "d"), "UNCLIP_LOG_DIR": str(tmp_path / "o")}
    result = subprocess.run(
        [sys.executable, "-m", "train.run", "module.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert (
        "renamed config keys, read under their new names: module.lr -> module.optimizer.lr" in result.stderr
    )
    assert "module.optimizer.lr=-1: expected a learning rate > 0" in result.stderr
    assert not (tmp_path / "d").exists()  # failed before the dataset was generated


# ---- renamed keys: old configs, checkpoints and command lines still load (train/modules/compat.py) ------
OLD_OPTIMIZER = {
    "lr": 3e-4,
    "weight_decay": 0.01,
    "betas": [0.8, 0.9],
    "eps": 1e-7,
    "warmup_steps": 3,
    "min_lr_ratio": 0.2,
}


def test_old_override_names_compose_the_same_config():
    new = [f"module.optimizer.{k}={v}" for k, v in OLD_OPTIMIZER.items()]
    old = [f"module.{k}={v}" for k, v in OLD_OPTIMIZER.items()]
    new.append("module.diffusion.clip_denoised=dynamic")
    old.append("module.diffusion.clip=dynamic")
    with pytest.warns(FutureWarning, match=r"module.lr -> module.optimizer.lr, .*clip -> .*clip_denoised"):
        upgraded = upgrade_overrides(old)
    assert upgraded == new
    assert _compose("stage=upsampler_256", *upgraded).module == _compose("stage=upsampler_256", *new).module
    assert _compose("stage=upsampler_256", *new).module.optimizer.lr == 3e-4
    # add / delete / sweep syntax; other keys (new names, look-alikes) untouched
    with pytest.warns(FutureWarning):
        assert upgrade_overrides(["+module.eps=1e-8", "~module.lr", "module.lr=1e-4,3e-4"]) == [
            "+module.optimizer.eps=1e-8",
            "~module.optimizer.lr",
            "module.optimizer.lr=1e-4,3e-4",
        ]
    same = ["module.optimizer.lr=1", "module.lr_scale=2", "module.diffusion.prediction=eps", "trainer.lr=1"]
    assert upgrade_overrides(same) == same


def test_an_old_experiment_file_is_read_into_the_new_block():
    """Keys an old experiment file sets (added to the composed config, here with +) move into their new
    places and win over the stage's defaults there."""
    cfg = _compose("stage=prior", "+module.lr=5e-4", "+module.eps=1e-5", "+module.diffusion.clip=none")
    with pytest.warns(FutureWarning, match="module.lr -> .*module.eps -> .*module.diffusion.clip ->"):
        upgrade_config(cfg)
    assert "lr" not in cfg.module and "eps" not in cfg.module and "clip" not in cfg.module.diffusion
    assert cfg.module.optimizer.lr == 5e-4 and cfg.module.optimizer.eps == 1e-5
    assert cfg.module.optimizer.betas == [0.9, 0.96]  # the stage's, untouched
    assert cfg.module.diffusion.clip_denoised == "none"
    validate(cfg)


def _tiny_unet():
    from hydra.utils import instantiate

    return instantiate(_compose("stage=upsampler_256", "net.model_channels=8").net)


def _upsampler(**kwargs):
    from train.modules.upsampler import UpsamplerModule

    return UpsamplerModule(_tiny_unet(), low_res_size=16, sample_steps=2, **kwargs)


def _optimizer_and_schedule(module) -> tuple[list, list]:
    from types import SimpleNamespace

    from train.modules.optim import configure_adamw

    module._trainer = SimpleNamespace(strategy=None, max_steps=20)  # what configure_adamw reads of it
    out = configure_adamw(module, module.net)
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "n": len(g["params"])}
        for g in out["optimizer"].param_groups
    ]
    schedule = [out["lr_scheduler"]["scheduler"].lr_lambdas[0](step) for step in range(20)]
    return groups, schedule


def test_the_optimizer_is_fused_for_the_device_it_will_step_on(monkeypatch):
    """Under DeepSpeed, Lightning builds the optimizer while the module is still on the CPU: whether AdamW
    is fused (one kernel for all tensors) follows the strategy's device, not where the weights are now."""
    from types import SimpleNamespace

    import torch

    from train.modules.optim import configure_adamw

    monkeypatch.setattr(
        torch.cuda, "is_available", lambda: True
    )  # a GPU machine; the weights stay on the CPU
    module = _upsampler(diffusion={"num_timesteps": 10})
    for device, fused in (("cuda", True), ("cpu", None)):
        module._trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device(device)), max_steps=20
        )
        assert configure_adamw(module, module.net)["optimizer"].defaults["fused"] is fused, device


def test_old_hparams_give_the_same_module_and_optimizer(tmp_path):
    """A checkpoint's saved hyper-parameters from before module.optimizer (flat lr, eps, ...,
    diffusion.clip): the module, its saved hparams and its optimizer are those of the new keys."""
    import pytorch_lightning as pl
    import torch

    from train.modules.upsampler import UpsamplerModule

    new = _upsampler(diffusion={"num_timesteps": 10, "clip_denoised": "dynamic"}, optimizer=OLD_OPTIMIZER)
    old_hparams = {
        "low_res_size": 16,
        "sample_steps": 2,
        "diffusion": {"num_timesteps": 10, "clip": "dynamic"},
        **OLD_OPTIMIZER,
    }
    with pytest.warns(FutureWarning, match="module.lr -> module.optimizer.lr, .*module.diffusion.clip ->"):
        old = UpsamplerModule(_tiny_unet(), **old_hparams)
    assert old.hparams == new.hparams and old.hparams.optimizer == OLD_OPTIMIZER
    assert "lr" not in old.hparams and old.hparams.diffusion == {
        "num_timesteps": 10,
        "clip_denoised": "dynamic",
    }
    assert old.sampler.clip_denoised == "dynamic"
    assert _optimizer_and_schedule(old) == _optimizer_and_schedule(new)

    # through Lightning's load_from_checkpoint, from a file that holds the old hparams
    ckpt = tmp_path / "old.ckpt"
    saved = {
        "state_dict": new.state_dict(),
        "hyper_parameters": old_hparams,
        "pytorch-lightning_version": pl.__version__,
    }
    torch.save(saved, ckpt)
    with pytest.warns(FutureWarning, match="module.lr -> module.optimizer.lr"):
        loaded = UpsamplerModule.load_from_checkpoint(ckpt, net=_tiny_unet())
    assert loaded.hparams == new.hparams
    assert _optimizer_and_schedule(loaded) == _optimizer_and_schedule(new)


def test_the_optimizer_block_is_completed_and_checked_when_the_module_is_built():
    diffusion = {"num_timesteps": 10}
    module = _upsampler(diffusion=diffusion, optimizer={"lr": 5e-5})
    assert module.hparams.optimizer == {**module.optimizer_defaults, "lr": 5e-5}
    with pytest.raises(ValueError, match=r"module.optimizer.lr=-1: expected a learning rate > 0"):
        _upsampler(diffusion=diffusion, optimizer={"lr": -1})
    with pytest.raises(
        ValueError, match=r"module.optimizer.betas=\[0.9, 1.0\]: expected two numbers in \[0, 1\)"
    ):
        _upsampler(diffusion=diffusion, optimizer={"betas": [0.9, 1.0]})
    with pytest.raises(ValueError, match="module.optimizer.momentum: not an optimizer setting"):
        _upsampler(diffusion=diffusion, optimizer={"momentum": 0.9})
    with pytest.raises(TypeError, match="unexpected keyword arguments: lrr"):
        _upsampler(diffusion=diffusion, lrr=1e-3)


def test_a_pipeline_stage_block_reaches_train_run_as_written(tmp_path):
    """The pipeline passes each stage's block to train.run as overrides: a null was dropped (the stage
    kept its default: gradient clipping stayed 1.0), a brace pattern was refused by Hydra's grammar, and a
    string that reads as a number became one."""
    from train.pipeline import stage_overrides_list

    block = {
        "trainer": {"gradient_clip_val": None, "max_steps": 7},
        "data": {"val_shards": None, "train_shards": "/d/{00000..00003}.tar"},
        "module": {"optimizer": {"lr": 1e-4, "betas": [0.9, 0.95]}, "degradation": "none"},
        "logger": "csv",
        "paths": {"data_dir": "/runs/it's 1e-4"},
    }
    cfg = compose_config(stage_overrides_list("upsampler_256", block, tmp_path))
    assert cfg.trainer.gradient_clip_val is None and cfg.data.val_shards is None
    assert cfg.data.train_shards == "/d/{00000..00003}.tar" and cfg.paths.data_dir == "/runs/it's 1e-4"
    assert (cfg.trainer.max_steps, cfg.module.optimizer.lr, list(cfg.module.optimizer.betas)) == (
        7,
        1e-4,
        [0.9, 0.95],
    )
    assert cfg.module.degradation == "none" and "_target_" in cfg.logger.csv


@pytest.mark.parametrize("stage", ["prior", "decoder", "upsampler_256", "upsampler_1024"])
def test_a_tokenizer_setting_the_stage_does_not_use_is_refused(stage):
    """The prior and decoder tokenise with their CLIP's tokenizer and the upsamplers read no caption:
    ``data.tokenizer.context_length=8`` was accepted there and did nothing."""
    with pytest.raises(ConfigCompositionException):
        _compose(f"stage={stage}", "data.tokenizer.context_length=8")
    assert _compose(f"stage={stage}").data.tokenizer is None


def test_the_schedule_warms_up_then_decays_to_its_floor_and_only_matrices_decay():
    """Exact values (mutants of either survived every test: a zero learning rate at step 0, a cosine
    shifted by the warm-up, a floor of 0, norms and embeddings weight-decayed)."""
    import torch

    from train.modules.optim import param_groups, warmup_cosine

    lr = [warmup_cosine(s, warmup_steps=4, total_steps=10, min_ratio=0.1) for s in (0, 3, 4, 7, 10, 15)]
    assert lr == pytest.approx([0.25, 1.0, 1.0, 0.55, 0.1, 0.1])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = torch.nn.Embedding(5, 4)
            self.ln_final = torch.nn.LayerNorm(4)
            self.proj = torch.nn.Linear(4, 4)
            self.logit_scale = torch.nn.Parameter(torch.zeros(()))

    net = Net()
    decayed, exempt = param_groups(net, 0.1)
    assert [id(p) for p in decayed["params"]] == [id(net.proj.weight)] and decayed["weight_decay"] == 0.1
    assert len(exempt["params"]) == 5 and exempt["weight_decay"] == 0.0
