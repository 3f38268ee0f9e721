"""Config mistakes fail at start with the key named: a typo, an unknown group option, a wrong type, an
impossible value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

from train.config import ConfigError, validate
from train.run import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("train", overrides=list(overrides))


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
        ("module.lr=-0.001", "module.lr=-0.001: expected a learning rate > 0"),
        ("data.global_batch_size=0", "data.global_batch_size=0: expected an integer >= 1"),
        ("data.num_workers=1.5", "data.num_workers=1.5: expected an integer >= 0"),
        ("module.betas=[0.9]", "module.betas=[0.9]: expected two numbers"),
        ("data.mode=random", "data.mode='random': expected 'epoch' or 'resampled'"),
        ("data.on_layout_change=continue", "data.on_layout_change='continue': expected 'error' or"),
        ("data.manifest_check=md5", "data.manifest_check='md5': expected 'size' or 'sha256'"),
        ("data.max_bad_fraction=2", "data.max_bad_fraction=2: expected a fraction in [0, 1]"),
    ],
)
def test_wrong_types_and_impossible_values_name_the_key(override, named):
    with pytest.raises(ConfigError, match=None) as err:
        validate(_compose(override))
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


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        validate(
            _compose(
                "stage=decoder", "module.lr=0", "module.ema_decay=1.0", "trainer.accumulate_grad_batches=0"
            )
        )
    text = str(err.value)
    assert (
        "module.lr=0" in text
        and "module.ema_decay=1.0" in text
        and "trainer.accumulate_grad_batches=0" in text
    )


def test_the_cli_fails_before_building_anything(tmp_path):
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
    assert "module.lr=-1: expected a learning rate > 0" in result.stderr
    assert not (tmp_path / "d").exists()  # failed before the dataset was generated
