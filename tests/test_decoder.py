"""Stage 3: the decoder module end to end, and the colour score it reports."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from data.synthetic import COLOURS
from tests.conftest import compose_config
from train.checkpoint import export_stage, load_stage
from train.run import train
from train.validation import colour_match, dominant_colours


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
    cfg = compose_config(
        [
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
        ]
    )
    metrics = train(cfg)
    assert metrics["trainer/global_step"] == 3
    for key in (
        "train/loss",
        "train/vlb",
        "val/loss",
        "val/mse",
        "val/colour_match",
        "val/colour_match_source",
    ):
        assert key in metrics and metrics[key] == metrics[key], key
    # val/loss is train/loss's objective on held-out images, the learned variance's bound included (it
    # was the MSE alone, always below train/loss: a gap that looked like under-fitting)
    assert metrics["val/loss"] > metrics["val/mse"] > 0
    assert metrics["val/n"] == 8
    grid = Image.open(tmp_path / "dec" / "samples" / "step0000003.png")
    assert grid.size == (4 * 64 + 3 * 8, 2 * 64 + 8)  # 4 columns x (source, sample) at 4x scale
    stage = load_stage(tmp_path / "dec")  # EMA weights; cond/text sizes from the CLIP
    assert stage.net.cond_dim == 128 and stage.net.image_size == 16


def test_decoder_with_its_own_text_encoder_takes_the_tokenizer_and_exports(clip_run, tmp_path):
    """net.text_encoder=trainable (GLIDE, the paper): vocabulary, context length and end-of-text id come
    from the tokenizer, and the run and its export rebuild the same net without that wiring by hand."""
    run, _ = clip_run
    cfg = compose_config(
        [
            "stage=decoder",
            "debug=fast",
            f"clip_ckpt={run}",
            f"paths.data_dir={run.parent / 'datasets'}",
            f"paths.output_dir={tmp_path / 'dec'}",
            "net.model_channels=16",
            "net.head_channels=16",
            "net.text_encoder=trainable",
            "net.text_width=32",
            "net.text_layers=1",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "module.sample_steps=2",
            "module.val_max_samples=4",
        ]
    )
    assert train(cfg)["trainer/global_step"] == 2
    stage = load_stage(tmp_path / "dec")
    tok = stage.tokenizer
    assert stage.net.text_eot_id == tok.eot_id
    assert stage.net.token_embedding.num_embeddings == tok.vocab_size
    assert stage.net.text_positional.shape == (tok.context_length, 32)
    export = load_stage(export_stage(tmp_path / "dec"))
    tokens = torch.tensor([tok.encode("a red circle")])
    x, t, emb = torch.randn(1, 3, 16, 16), torch.tensor([500]), torch.randn(1, 128)
    with torch.no_grad():
        want = stage.net(x, t, image_emb=emb, tokens=tokens)
        assert torch.equal(export.net(x, t, image_emb=emb, tokens=tokens), want)
        with pytest.raises(ValueError, match="longer than net.text_context_length"):
            stage.net(x, t, image_emb=emb, tokens=torch.ones(1, tok.context_length + 1, dtype=torch.long))


def test_paper_experiment_composes():
    cfg = compose_config(["stage=decoder", "experiment=decoder_paper", "clip_ckpt=x"])
    assert cfg.net.model_channels == 512 and cfg.net.text_encoder == "trainable"
    assert cfg.module.diffusion.prediction == "eps" and cfg.module.diffusion.variance == "learned"
    assert cfg.module.optimizer.lr == 1.2e-4 and cfg.data.global_batch_size == 2048
