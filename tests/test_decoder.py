"""Stage 3: the decoder module end to end, and the colour score it reports."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from data.synthetic import COLOURS
from eval.colours import colour_match, dominant_colours
from train.checkpoint import load_stage
from train.run import CONF_DIR, train


def test_dominant_colours():
    grey = torch.full((3, 16, 16), 128, dtype=torch.uint8)
    red, blue = grey.clone(), grey.clone()
    red[:, 4:12, 4:12] = torch.tensor(COLOURS["red"], dtype=torch.uint8)[:, None, None]
    blue[:, 0:4, 0:4] = torch.tensor(COLOURS["red"], dtype=torch.uint8)[:, None, None]
    blue[:, 6:16, 6:16] = torch.tensor(COLOURS["blue"], dtype=torch.uint8)[:, None, None]
    assert dominant_colours(torch.stack([red, blue, grey])) == ["red", "blue", None]
    assert colour_match(torch.stack([red, blue]), torch.stack([red, red])) == 0.5


def test_decoder_stage_trains_samples_and_exports(clip_run, tmp_path):
    run, _ = clip_run
    data_dir = run.parent / "datasets"
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "stage=decoder",
                "debug=fast",
                f"clip_ckpt={run}",
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={tmp_path / 'dec'}",
                "net.model_channels=16",
                "net.head_channels=16",
                "trainer.max_steps=3",
                "trainer.val_check_interval=3",
                "module.sample_steps=3",
                "module.val_max_samples=8",
                "module.grid_size=4",
            ],
        )
    metrics = train(cfg)
    assert metrics["trainer/global_step"] == 3
    for key in ("train/loss", "train/vlb", "val/loss", "val/colour_match", "val/colour_match_source"):
        assert key in metrics and metrics[key] == metrics[key], key
    assert metrics["val/n"] == 8
    grid = Image.open(tmp_path / "dec" / "samples" / "step0000003.png")
    assert grid.size == (4 * 64 + 3 * 8, 2 * 64 + 8)  # 4 columns x (source, sample) at 4x scale
    stage = load_stage(tmp_path / "dec")  # EMA weights; cond/text sizes from the CLIP
    assert stage.net.cond_dim == 128 and stage.net.image_size == 16


def test_paper_experiment_composes():
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("train", overrides=["stage=decoder", "experiment=decoder_paper", "clip_ckpt=x"])
    assert cfg.net.model_channels == 512 and cfg.net.text_encoder == "trainable"
    assert cfg.module.diffusion.prediction == "eps" and cfg.module.diffusion.variance == "learned"
    assert cfg.module.lr == 1.2e-4 and cfg.data.global_batch_size == 2048
