"""init_from=PATH: a new run (fine-tuning) starts from another run's weights (train/run.py init_weights)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from data.tokenizer import Tokenizer, train_bpe
from tests.conftest import compose_config
from train.checkpoint import load_checkpoint, resolve_run, stage_weights, weights_digest
from train.config import ConfigError
from train.run import train

STILL = ["module.optimizer.lr=1e-30"]  # a step that moves no weight by 1e-12: the run's end shows its start


def _run(stage: str, data_dir, out, *overrides: str) -> dict:
    cfg = compose_config(
        [
            f"stage={stage}",
            "debug=fast",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={out}",
            "trainer.max_steps=1",
            *overrides,
        ]
    )
    return train(cfg)


def _net(run, prefix: str = "net.") -> dict[str, torch.Tensor]:
    state = load_checkpoint(resolve_run(run)[1])["state_dict"]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)


@pytest.fixture(scope="module")
def upsampler_run(tmp_path_factory):
    """A tiny 16 -> 32 upsampler, 3 steps: its EMA copy and its net differ."""
    root = tmp_path_factory.mktemp("up")
    _run("upsampler_256", root / "datasets", root / "run", "trainer.max_steps=3", "net.model_channels=16")
    return root


@pytest.mark.slow
def test_a_diffusion_stage_starts_from_the_ema_weights_of_another_run(upsampler_run, tmp_path, caplog):
    source = upsampler_run / "run"
    ema, net = _net(source, "ema.shadow."), _net(source)
    assert not _equal(ema, net)
    data = upsampler_run / "datasets"
    _run("upsampler_256", data, tmp_path / "ft", f"init_from={source}", "net.model_channels=16", *STILL)
    assert _equal(_net(tmp_path / "ft"), ema) and _equal(_net(tmp_path / "ft", "ema.shadow."), ema)
    ckpt = load_checkpoint(resolve_run(tmp_path / "ft")[1])
    assert ckpt["global_step"] == 1  # a new run: its own step count, optimizer and schedule
    saved = OmegaConf.load(tmp_path / "ft" / "config.yaml").init_weights
    assert saved.global_step == 3 and saved.ema and saved.digest == weights_digest(ema)
    assert saved.checkpoint == str(resolve_run(source)[1])

    # the net's own weights; and a net computed otherwise with the same weights (dropout) says so
    with caplog.at_level(logging.WARNING, logger="train.run"):
        _run("upsampler_256", data, tmp_path / "raw", f"init_from={source}", "init_from_ema=false",
             "net.model_channels=16", "net.dropout=0.1", *STILL)  # fmt: skip
    assert _equal(_net(tmp_path / "raw"), net)
    assert "the net's settings differ from that run's: net.dropout: 0.0 there, 0.1 here" in caplog.text

    # a resume loads its own checkpoint, not init_from (gone by now, and not given again), and keeps what
    # the run started from
    moved = tmp_path / "source"
    shutil.copytree(source, moved)
    _run("upsampler_256", data, tmp_path / "ft2", f"init_from={moved}", "net.model_channels=16", *STILL)
    shutil.rmtree(moved)
    _run("upsampler_256", data, tmp_path / "ft2", "net.model_channels=16", "trainer.max_steps=2", *STILL)
    assert load_checkpoint(resolve_run(tmp_path / "ft2")[1])["global_step"] == 2
    resumed = OmegaConf.load(tmp_path / "ft2" / "config.yaml")
    assert resumed.init_weights.digest == weights_digest(ema) and resumed.init_from == str(moved)

    # refused: the run's own directory; beside resume=<checkpoint>; into a run that did not start from it
    own = f"init_from={tmp_path / 'ft2'}"
    with pytest.raises(ConfigError, match=r"that is this run's own directory"):
        _run("upsampler_256", data, tmp_path / "ft2", own, "net.model_channels=16", "trainer.max_steps=3")
    with pytest.raises(ConfigError, match=r"resume continues that checkpoint's run .*: give one of them"):
        _run("upsampler_256", data, tmp_path / "new", f"init_from={source}", "net.model_channels=16",
             f"resume={resolve_run(tmp_path / 'raw')[1]}")  # fmt: skip
    with pytest.raises(ConfigError, match=r"holds a run that did not start from it, and resume=auto"):
        _run("upsampler_256", data, source, f"init_from={tmp_path / 'ft2'}", "net.model_channels=16")


@pytest.mark.slow
def test_a_damaged_source_checkpoint_is_refused_naming_it(upsampler_run, tmp_path):
    """init_from reads its checkpoint whole for its CRC-32s, as resume=auto does: a flipped bit loaded
    other weights without a word."""
    source = tmp_path / "source"
    shutil.copytree(upsampler_run / "run", source)
    last = source / "checkpoints" / "last.ckpt"
    raw = bytearray(last.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    last.write_bytes(bytes(raw))
    data = upsampler_run / "datasets"
    for given in (source, last):  # the run (its newest checkpoint), and the checkpoint named
        with pytest.raises(ConfigError, match=r"init_from=.*: .*last.ckpt.*CRC.*; name an older checkpoint"):
            _run("upsampler_256", data, tmp_path / "a", f"init_from={given}", "net.model_channels=16")


def test_init_from_settings_are_checked_before_anything_runs():
    from train.config import validate

    with pytest.raises(ConfigError, match=r"init_from_ema='no': expected true or false"):
        validate(compose_config(["init_from=/a", "init_from_ema=no"]))
    with pytest.raises(ConfigError, match=r"init_from=/a and init_from_open_clip=/b: one start, not two"):
        validate(compose_config(["init_from=/a", "init_from_open_clip=/b"]))


@pytest.mark.slow
def test_init_from_refuses_another_net_naming_the_settings_that_differ(upsampler_run, clip_run, tmp_path):
    source, data = upsampler_run / "run", upsampler_run / "datasets"
    with pytest.raises(ConfigError, match=r"net.model_channels: 16 there, 32 here") as e:
        _run("upsampler_256", data, tmp_path / "a", f"init_from={source}", "net.model_channels=32")
    assert f"init_from={source}" in str(e.value) and "other weights than this run's net" in str(e.value)
    with pytest.raises(ConfigError, match=r"a clip run of net .*; this upsampler_256 run's net is"):
        _run("upsampler_256", data, tmp_path / "b", f"init_from={clip_run[0]}", "net.model_channels=16")
    with pytest.raises(ConfigError, match=r"init_from=.*nowhere: .*expected a run directory"):
        _run(
            "upsampler_256",
            data,
            tmp_path / "c",
            f"init_from={tmp_path / 'nowhere'}",
            "net.model_channels=16",
        )


@pytest.mark.slow
def test_a_clip_starts_from_another_run_with_its_tokenizer(clip_run, tmp_path):
    source, _ = clip_run
    data = source.parent / "datasets"
    # another vocabulary size would train another BPE: the run reads captions as the weights learned them
    _run("clip", data, tmp_path / "ft", f"init_from={source}", "data.tokenizer.vocab_size=600", *STILL)
    assert Tokenizer.load(tmp_path / "ft" / "tokenizer.json").same_vocabulary(
        Tokenizer.load(source / "tokenizer.json")
    )
    assert _equal(_net(tmp_path / "ft"), stage_weights(source).weights)
    # resumed without init_from: its own tokenizer.json, not a BPE of 600 trained again (a size mismatch,
    # or with another vocabulary of the same size, other token ids without a word)
    _run("clip", data, tmp_path / "ft", "data.tokenizer.vocab_size=600", "trainer.max_steps=2", *STILL)
    assert Tokenizer.load(tmp_path / "ft" / "tokenizer.json").same_vocabulary(
        Tokenizer.load(source / "tokenizer.json")
    )
    assert OmegaConf.load(tmp_path / "ft" / "config.yaml").init_weights.global_step == 2

    other = train_bpe(["a red circle", "two blue squares left of a green triangle"], vocab_size=600)
    other.save(tmp_path / "other.json")
    with pytest.raises(ConfigError, match=r"token embeddings are for the vocabulary of .*tokenizer.json"):
        _run(
            "clip",
            data,
            tmp_path / "b",
            f"init_from={source}",
            f"data.tokenizer.path={tmp_path / 'other.json'}",
        )
