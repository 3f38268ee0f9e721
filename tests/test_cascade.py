"""Inference through the cascade (train/cascade.py) and its CLI (eval/sample.py), on a tiny trained cascade."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from eval import benchmark
from eval import sample as sample_cli
from tests.conftest import PicklePayload, clip_trained_on, compose_config
from train.cascade import Cascade, StageSettings, slerp
from train.checkpoint import export_stage, load_stage
from train.run import train

pytestmark = pytest.mark.slow


def _train(stage: str, data_dir, out, *overrides: str) -> None:
    cfg = compose_config(
        [
            f"stage={stage}",
            "debug=fast",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={out}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            *overrides,
        ]
    )
    train(cfg)


@pytest.fixture(scope="module")
def cascade_dir(clip_run, tmp_path_factory):
    """A pipeline-shaped directory: prior, decoder (16 px), upsamplers 16->32 and 32->64, 2 steps each."""
    run, _ = clip_run
    data_dir, root = run.parent / "datasets", tmp_path_factory.mktemp("cascade")
    small = ["module.sample_steps=2", "module.val_max_samples=4"]
    _train("prior", data_dir, root / "prior", f"clip_ckpt={run}", *small)
    _train(
        "decoder", data_dir, root / "decoder", f"clip_ckpt={run}", "net.model_channels=16",
        "net.head_channels=16", "module.grid_size=2", *small,
    )  # fmt: skip
    for stage in ("upsampler_256", "upsampler_1024"):
        _train(stage, data_dir, root / stage, "net.model_channels=16", "module.grid_size=2", *small)
    return root


@pytest.fixture(scope="module")
def cascade(cascade_dir):
    return Cascade.load(
        cascade_dir / "decoder",
        prior=cascade_dir / "prior",
        upsamplers=[cascade_dir / "upsampler_256", cascade_dir / "upsampler_1024"],
    )


FAST = {
    "prior": StageSettings(steps=3, best_of=2),
    "decoder": StageSettings(steps=3),
    "upsamplers": [StageSettings(steps=2), StageSettings(steps=2)],
}


def test_text_to_image_runs_every_stage_and_is_seeded(cascade, caplog):
    with caplog.at_level(logging.INFO, logger="train.cascade"):
        out = cascade.text_to_image(["a red circle", "two blue squares"], seed=3, **FAST)
    progress = [r.getMessage().split(",")[0] for r in caplog.records if r.name == "train.cascade"]
    assert progress == [  # a line per stage, with the time left (where users wait)
        "text to image (2 images): 1/4 stages (prior)",
        "text to image (2 images): 2/4 stages (decoder at 16 px)",
        "text to image (2 images): 3/4 stages (upsampler to 32 px)",
        "text to image (2 images): 4/4 stages (upsampler to 64 px)",
    ]
    assert [s.shape for s in out.stages] == [(2, 3, 16, 16), (2, 3, 32, 32), (2, 3, 64, 64)]
    assert out.images.dtype == torch.uint8 and torch.equal(out.images, out.stages[-1])
    assert out.image_emb.shape == (2, cascade.clip.embed_dim)
    torch.testing.assert_close(out.image_emb.norm(dim=-1), torch.ones(2))
    again = cascade.text_to_image(["a red circle", "two blue squares"], seed=3, **FAST)
    other = cascade.text_to_image(["a red circle", "two blue squares"], seed=4, **FAST)
    assert torch.equal(out.images, again.images) and not torch.equal(out.images, other.images)


def test_every_stage_samples_with_dpm_solver_and_unknown_samplers_are_refused(cascade):
    """DPM-Solver++(2M) through the whole cascade: from its third step on (5 steps here) it is not DDIM."""
    settings = {
        "prior": StageSettings(steps=5, best_of=1, sampler="dpmpp_2m"),
        "decoder": StageSettings(steps=5, sampler="dpmpp_2m"),
        "upsamplers": [StageSettings(steps=4, sampler="dpmpp_2m")] * 2,
    }
    out = cascade.text_to_image(["a red circle", "two blue squares"], seed=3, **settings)
    assert [s.shape for s in out.stages] == [(2, 3, 16, 16), (2, 3, 32, 32), (2, 3, 64, 64)]
    again = cascade.text_to_image(["a red circle", "two blue squares"], seed=3, **settings)
    assert torch.equal(out.images, again.images)
    ddim = {
        k: [replace(u, sampler="ddim") for u in v] if k == "upsamplers" else replace(v, sampler="ddim")
        for k, v in settings.items()
    }
    other = cascade.text_to_image(["a red circle", "two blue squares"], seed=3, **ddim)
    assert not torch.allclose(out.image_emb, other.image_emb, atol=1e-4)  # the prior's 5 steps differ
    assert not torch.equal(out.stages[0], other.stages[0])
    with pytest.raises(ValueError, match=r"sampler='euler': expected one of \['ddim', 'ddpm', 'dpmpp_2m'\]"):
        StageSettings(sampler="euler")
    for sampler in ("dpmpp_2m", "ddpm"):  # DDIM's eta: refused elsewhere (it was ignored), 0 or unset taken
        with pytest.raises(ValueError, match=f"eta=0.5: the noise of a DDIM step, which sampler='{sampler}'"):
            StageSettings(sampler=sampler, eta=0.5)
        assert StageSettings(sampler=sampler, eta=0.0).eta == 0.0


def test_the_diffusion_nets_sample_under_bf16_autocast_when_asked(cascade, monkeypatch):
    """precision=auto is bf16 on a GPU (as the stages trained, bf16-mixed) and fp32 on the CPU; bf16 runs
    the prior, decoder and upsamplers' layers in bf16 while the images come out as before."""
    from train.cascade import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32" and cascade.precision == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda:1")) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda:1")) == "fp32"
    with pytest.raises(ValueError, match=r"precision='fp16': expected one of \['auto', 'bf16', 'fp32'\]"):
        resolve_precision("fp16", torch.device("cpu"))
    seen = []
    nets = [cascade.prior.ema.shadow, cascade.decoder.ema.shadow, *(u.ema.shadow for u in cascade.upsamplers)]
    linears = [
        next(m for m in net.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)) for net in nets
    ]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in linears]
    try:
        bf16 = Cascade(cascade.decoder, cascade.prior, cascade.upsamplers, precision="bf16")
        out = bf16.text_to_image(["a red circle"], seed=3, **FAST)
        assert set(seen) == {torch.bfloat16} and len(seen) > 4, seen
        seen.clear()
        ref = cascade.text_to_image(["a red circle"], seed=3, **FAST)
        assert set(seen) == {torch.float32}
    finally:
        for h in hooks:
            h.remove()
    assert [s.shape for s in out.stages] == [s.shape for s in ref.stages] and out.images.dtype == torch.uint8
    assert out.image_emb.dtype == torch.float32
    # the same samples up to bf16 rounding (8 bits of mantissa through 3+3+2+2 tiny-net steps)
    assert (out.stages[0].float() - ref.stages[0].float()).abs().mean() < 12


def test_bench_sampler_compares_samplers_to_a_many_step_reference(cascade_dir, tmp_path, capsys):
    from eval import bench_sampler

    out = tmp_path / "sampler.json"
    argv = [
        "--cascade",
        str(cascade_dir),
        "--steps",
        "3,6",
        "--reference",
        "6",
        "--n",
        "4",
        "--device",
        "cpu",
    ]
    assert bench_sampler.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        ("ddim", 3), ("ddim", 6), ("dpmpp_2m", 3), ("dpmpp_2m", 6), ("ddim", 6)
    ]  # fmt: skip
    assert (
        rows[1]["mean_abs_diff"] == 0.0
    )  # DDIM at the reference's steps, from the same noise, is the reference
    assert (
        rows[0]["mean_abs_diff"] > 0 and rows[3]["mean_abs_diff"] > 0
    )  # (DPM-Solver++ is not DDIM from step 3)
    assert all(0 <= r["shape"] <= 1 and r["seconds"] > 0 for r in rows)
    assert "| dpmpp_2m | 6 |" in capsys.readouterr().out
    assert bench_sampler.main([*argv[:-4], "--samplers", "ddim,euler", "--device", "cpu"]) == 2
    assert "--samplers ddim,euler: expected some of ddim, ddpm, dpmpp_2m" in capsys.readouterr().err
    assert bench_sampler.main(["--cascade", str(cascade_dir), "--steps", "0,x"]) == 2
    assert "--steps 0,x: expected positive integers" in capsys.readouterr().err


def test_inpainting_keeps_the_known_region(cascade):
    image = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    image[:, 0] = 200  # a red input
    image[:, 1] = torch.arange(64, dtype=torch.uint8)[None] * 3  # with a gradient, to catch misplacement
    mask = torch.zeros(2, 64, 64)
    mask[:, :, :32] = 1  # keep the left half
    for resample in (0, 1):
        out = cascade.inpaint(image, mask, ["a blue square"] * 2, resample=resample, **FAST)
        kept = (out.images[..., :32].int() - image[..., :32].int()).abs()
        assert kept.max() <= 1, f"resample={resample}: the known region changed by {kept.max()}"
        # the unknown half is generated, not copied
        assert (out.images[..., 40:].int() - image[..., 40:].int()).abs().float().mean() > 5


def test_resampled_inpainting_follows_the_decoder_settings_and_masks_of_any_shape(cascade):
    """With resample > 0 the decoder's condition was ignored (caption and embedding always both) and so
    was its sampler (always DDIM, silently); a non-square image whose width is a stage's size crashed
    (the mask's size was checked by its width alone)."""
    from train.cascade import resize_mask

    assert resize_mask(torch.ones(1, 1, 12, 16), 16).shape == (1, 1, 16, 16)
    image = torch.full((1, 3, 64, 64), 120, dtype=torch.uint8)
    mask = torch.zeros(1, 64, 64)
    mask[..., :32] = 1
    seen: set = set()  # (drop_text, drop_image) of each half of the guided batch

    def record(net, args, kwargs):
        seen.update(zip(kwargs["drop_text"].tolist(), kwargs["drop_image"].tolist(), strict=True))

    def flags(condition: str, sampler: str = "ddim") -> set:
        seen.clear()
        hook = cascade.decoder.ema.shadow.register_forward_pre_hook(record, with_kwargs=True)
        try:
            settings = StageSettings(steps=2, condition=condition, sampler=sampler)
            cascade.inpaint(
                image, mask, ["a red circle"], resample=1, decoder=settings, upsamplers=FAST["upsamplers"]
            )
        finally:
            hook.remove()
        return seen - {(True, True)}  # (the unconditional half drops both)

    assert flags("both") == {(False, False)}
    assert flags("image") == {(True, False)}  # the caption dropped: it was always read
    assert flags("caption") == {(False, True)}  # the image embedding dropped
    with pytest.raises(ValueError, match=r"resample=1 steps the decoder with DDIM; sampler='ddpm'"):
        flags("both", sampler="ddpm")
    wide = cascade.inpaint(image[..., 16:, :], mask[:, 16:], ["a red circle"], **FAST)  # 48 x 64
    assert wide.images.shape == (1, 3, 64, 64)


def test_variations_and_interpolation(cascade):
    image = Image.new("RGB", (64, 64), (120, 120, 120))
    image.paste((30, 175, 45), (16, 16, 48, 48))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    y = torch.flip(x, dims=[0])  # channels swapped: another colour
    dec, ups = FAST["decoder"], FAST["upsamplers"]
    var = cascade.variations(torch.stack([x, y]), n=3, eta=1.0, decoder=dec, upsamplers=ups)
    assert var.images.shape == (6, 3, 64, 64)
    assert not torch.equal(var.images[0], var.images[1])  # eta > 0: the variations differ
    emb = cascade.image_embedding(torch.stack([x, y]))
    torch.testing.assert_close(var.image_emb[:3], emb[:1].expand(3, -1).cpu())  # grouped per input
    inv = cascade.variations(x[None], n=2, eta=0.0, invert=True, decoder=dec, upsamplers=ups)
    assert torch.equal(inv.stages[0][0], inv.stages[0][1])  # decoder, eta 0 from one inversion: the same
    path = cascade.interpolate(x, y[:, 8:], n=4, decoder=dec, upsamplers=ups)  # any two sizes
    emb[1] = cascade.image_embedding(y[None, :, 8:])[0]
    assert path.images.shape == (4, 3, 64, 64)
    torch.testing.assert_close(path.image_emb[0], emb[0].cpu(), atol=1e-4, rtol=0)
    torch.testing.assert_close(path.image_emb[-1], emb[1].cpu(), atol=1e-4, rtol=0)
    other = StageSettings(steps=3, sampler="dpmpp_2m")  # was ignored: both step the decoder with DDIM
    with pytest.raises(
        ValueError, match=r"variations: the decoder samples with DDIM here; sampler='dpmpp_2m'"
    ):
        cascade.variations(x[None], n=1, decoder=other, upsamplers=ups)
    with pytest.raises(ValueError, match=r"interpolation: the decoder samples with DDIM here"):
        cascade.interpolate(x, y, n=2, decoder=other, upsamplers=ups)
    # settings these modes would ignore are refused: the condition (they decode from the embedding
    # alone), interpolation's eta (one DDIM path), variations' eta given twice
    caption = StageSettings(steps=3, condition="caption")
    with pytest.raises(ValueError, match=r"variations: the decoder sees the image embedding alone"):
        cascade.variations(x[None], n=1, decoder=caption, upsamplers=ups)
    with pytest.raises(ValueError, match=r"interpolation: the decoder sees the image embedding alone"):
        cascade.interpolate(x, y, n=2, decoder=caption, upsamplers=ups)
    with pytest.raises(ValueError, match=r"interpolation: the decoder steps by DDIM at eta 0"):
        cascade.interpolate(x, y, n=2, decoder=StageSettings(steps=3, eta=0.5), upsamplers=ups)
    with pytest.raises(ValueError, match=r"variations: eta=0.8 and the decoder settings' eta=0.3"):
        cascade.variations(x[None], n=1, decoder=StageSettings(steps=3, eta=0.3), upsamplers=ups)


def test_interpolation_from_inverted_latents_ends_at_each_images_reconstruction(cascade):
    """``invert``: the decoder's noise is slerped from one image's DDIM inversion to the other's, so the end
    frames are what variations(invert, eta 0) reconstructs from each image, and the middle frame starts
    from neither (its latent's norm halfway between theirs)."""
    from eval.sample import _parser
    from train.cascade import _slerp_latent

    image = Image.new("RGB", (64, 64), (120, 120, 120))
    image.paste((30, 175, 45), (16, 16, 48, 48))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    y = torch.flip(x, dims=[1])  # the square moved to the other side
    dec, ups = FAST["decoder"], FAST["upsamplers"]
    path = cascade.interpolate(x, y, n=3, invert=True, decoder=dec, upsamplers=ups)
    for frame, end in ((0, x), (2, y)):
        same = cascade.variations(end[None], n=1, eta=0.0, invert=True, decoder=dec, upsamplers=ups)
        assert torch.equal(path.stages[0][frame], same.stages[0][0]), frame
    plain = cascade.interpolate(x, y, n=3, decoder=dec, upsamplers=ups)  # from one noise for every frame
    assert not torch.equal(path.stages[0][1], plain.stages[0][1])
    a, b = torch.randn(3, 8, 8), 2 * torch.randn(3, 8, 8)
    mid = _slerp_latent(a, b, 1, 3)
    torch.testing.assert_close(mid.norm(), (a.norm() + b.norm()) / 2)
    assert _slerp_latent(a, b, 0, 3) is a and _slerp_latent(a, b, 2, 3) is b
    assert _parser().parse_args(["interpolate", "a.png", "b.png", "--invert"]).invert


def test_interpolation_frames_share_every_stages_noise(cascade):
    """The frames of an interpolation differ by their embeddings only: an image with itself gives one
    frame n times at every stage (the upsamplers drew new noise per frame: the rows differed above the
    decoder)."""
    x = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = cascade.interpolate(x, x, n=3, decoder=FAST["decoder"], upsamplers=FAST["upsamplers"])
    for stage in path.stages:
        assert torch.equal(stage[0], stage[1]) and torch.equal(stage[0], stage[2])
    up = cascade.upsamplers[0]
    low = (
        torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        .mul(2)
        .sub(1)
        .expand(2, -1, -1, -1)
    )
    g = torch.Generator().manual_seed(2)
    shared = up.upsample(low, g, steps=2, shared_noise=True)
    separate = up.upsample(low, g, steps=2)
    assert torch.equal(shared[0], shared[1]) and not torch.equal(separate[0], separate[1])


def test_slerp_stays_on_the_sphere():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([0.5**0.5, 0.5**0.5]))
    torch.testing.assert_close(slerp(a, b, 0.0), a)


def test_upsamplers_out_of_order_and_stages_in_the_wrong_place_are_refused(cascade_dir):
    with pytest.raises(ValueError, match="takes 32 px inputs but decoder .* outputs 16 px"):
        Cascade.load(cascade_dir / "decoder", upsamplers=[cascade_dir / "upsampler_1024"])
    # another stage's run where one is expected gave AttributeErrors and TypeErrors deep in the loading
    with pytest.raises(ValueError, match=r"decoder=.*prior: a prior run, expected a decoder run"):
        Cascade.load(cascade_dir / "prior")
    with pytest.raises(ValueError, match=r"prior=.*upsampler_256: an upsampler run, expected a prior run"):
        Cascade.load(cascade_dir / "decoder", prior=cascade_dir / "upsampler_256")
    with pytest.raises(ValueError, match=r"upsampler=.*decoder: a decoder run, expected an upsampler run"):
        Cascade.load(cascade_dir / "decoder", upsamplers=[cascade_dir / "decoder"])


def test_a_prior_or_decoder_trained_with_other_clip_weights_than_the_cascade_reads_is_refused(
    cascade_dir, clip_run, tmp_path, caplog
):
    """Only the embedding size was compared, then the CLIP's run directory (a warning): a decoder whose
    CLIP run had trained on since was taken without a word, and a prior's embeddings meant nothing to
    the CLIP that read them; a copy of the same weights was warned about. The stages record the weights
    they trained with (clip_weights in their config), and the cascade compares them."""
    import shutil

    from train.frozen_clip import FrozenClip

    run, _ = clip_run
    copy, clip = tmp_path / "copy", tmp_path / "clip"
    shutil.copytree(run, copy)
    with caplog.at_level("WARNING", logger="train.cascade"):  # the same weights elsewhere: a copy, an export
        Cascade.load(cascade_dir / "decoder", prior=cascade_dir / "prior", clip=copy)
    assert "was trained with the CLIP" not in caplog.text
    clip_trained_on(shutil.copytree(run, clip))
    trained = load_stage(run).checkpoint
    with pytest.raises(
        ValueError,
        match=rf"decoder {cascade_dir / 'decoder'} was trained with the CLIP weights of {trained} \(step 2\), "
        rf"and reads other weights, {clip}/checkpoints/step0000012.ckpt \(step 12\)",
    ):
        Cascade.load(cascade_dir / "decoder", prior=cascade_dir / "prior", clip=clip)
    prior = tmp_path / "prior"  # a prior trained with the CLIP that trained on
    shutil.copytree(cascade_dir / "prior", prior)
    cfg = OmegaConf.load(prior / "config.yaml")
    cfg.clip_weights = FrozenClip(clip).weights()
    OmegaConf.save(cfg, prior / "config.yaml")
    with pytest.raises(ValueError, match=rf"prior {prior} was trained with the CLIP weights of {clip}/checkpoints/"
                       rf"step0000012.ckpt \(step 12\), and the decoder reads other weights, {trained}"):  # fmt: skip
        Cascade.load(cascade_dir / "decoder", prior=prior)
    # A stage trained before weights were recorded: its clip_ckpt's run directory decides (a warning).
    del cfg.clip_weights
    OmegaConf.save(cfg, prior / "config.yaml")
    with caplog.at_level("WARNING", logger="train.cascade"):
        Cascade.load(cascade_dir / "decoder", prior=prior, clip=copy)
    assert f"prior {prior} was trained with the CLIP {run}, and the decoder reads {copy}" in caplog.text


def test_a_pipeline_directory_moved_whole_samples_with_its_own_clip(cascade_dir, clip_run, tmp_path):
    """A pipeline directory moved (its clip stage with it) failed to load: the decoder's recorded
    clip_ckpt was gone, and Hydra's error came from deep in instantiating the module, without a word of
    --clip. The moved directory's clip stage is taken (its weights checked); a decoder alone names the
    option."""
    import shutil

    run, _ = clip_run
    root = tmp_path / "moved"
    for stage in ("prior", "decoder", "upsampler_256"):
        shutil.copytree(cascade_dir / stage, root / stage)
    shutil.copytree(run, root / "clip")
    cfg = OmegaConf.load(root / "decoder" / "config.yaml")
    cfg.clip_ckpt = str(tmp_path / "gone" / "clip")  # where the CLIP was before the move
    OmegaConf.save(cfg, root / "decoder" / "config.yaml")
    cascade = Cascade.from_dir(root)
    assert cascade.clip.run == root / "clip" and len(cascade.upsamplers) == 1
    with pytest.raises(FileNotFoundError, match=rf"trained with the CLIP {tmp_path}/gone/clip, which is not "
                       r"there \(moved\?\): give its path now, clip= \(--clip\)"):  # fmt: skip
        Cascade.load(root / "decoder")


def test_a_stage_resumed_with_a_clip_run_that_trained_on_since_is_refused(cascade_dir, clip_run, tmp_path):
    """clip_ckpt names a CLIP run, which may train on while a decoder trains: a resume loaded the newer
    weights and went on from a checkpoint that had learned the older ones' embeddings. The same weights
    from elsewhere (a copy, an export) resume."""
    import shutil

    from train.config import ConfigError

    run, _ = clip_run
    copy, clip, decoder = tmp_path / "copy", tmp_path / "clip", tmp_path / "decoder"
    shutil.copytree(run, copy)
    clip_trained_on(shutil.copytree(run, clip))
    shutil.copytree(cascade_dir / "decoder", decoder)
    args = ["net.model_channels=16", "net.head_channels=16", "module.grid_size=2", "module.sample_steps=2",
            "module.val_max_samples=4", "trainer.max_steps=3", "resume=auto"]  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=rf"resuming {decoder} with clip_ckpt={clip}: it loads {clip}/checkpoints/step0000012.ckpt "
        r"\(step 12\), other weights than the CLIP this run has trained with",
    ):
        _train("decoder", run.parent / "datasets", decoder, f"clip_ckpt={clip}", *args)
    _train("decoder", run.parent / "datasets", decoder, f"clip_ckpt={copy}", *args)
    assert json.loads((decoder / "metrics.json").read_text())["trainer/global_step"] == 3


def test_export_round_trips_and_the_cli_samples_from_it(cascade_dir, cascade, tmp_path, capsys):
    for stage in ("prior", "decoder", "upsampler_256", "upsampler_1024"):
        export = export_stage(cascade_dir / stage)
        assert (export / "model.safetensors").exists() and (export / "config.yaml").exists()
        ema = load_stage(cascade_dir / stage).net.state_dict()
        weights = load_file(export / "model.safetensors")
        assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    out = tmp_path / "samples"
    argv = [
        "text",
        "a red circle",
        "a blue square",
        "--cascade",
        str(cascade_dir),
        "--n",
        "2",
        "--out",
        str(out),
    ]
    argv += [
        "--prior-steps",
        "3",
        "--decoder-steps",
        "3",
        "--upsampler-steps",
        "2",
        "--seed",
        "3",
        "--all-stages",
    ]
    assert sample_cli.main(argv) == 0
    # the printed grid is the final one (with --all-stages it named the first stage's)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["grid"] == str(out / "grid.png")
    assert (out / "stage0_grid.png").exists() and (out / "stage1_grid.png").exists()
    grid = Image.open(out / "grid.png")
    assert grid.size[1] > 2 * 64 and len(list(out.glob("0*_0*.png"))) == 4
    # the exports (which the CLI prefers) sample exactly what the run directories do
    ref = cascade.text_to_image(["a red circle"] * 2 + ["a blue square"] * 2, seed=3, **FAST)
    written = torch.from_numpy(np.asarray(Image.open(out / "001_01.png")).copy()).permute(2, 0, 1)
    assert torch.equal(written, ref.images[3])


def test_benchmark_cli_samples_with_the_settings_it_is_given(cascade_dir, tmp_path, monkeypatch, capsys):
    """eval.benchmark takes eval.sample's sampling options (a lever measured without the pipeline)."""
    seen = []
    original = Cascade.text_to_image
    monkeypatch.setattr(
        Cascade, "text_to_image", lambda self, prompts, **kw: seen.append(kw) or original(self, prompts, **kw)
    )
    out = tmp_path / "bench"
    argv = ["--cascade", str(cascade_dir), "--per-category", "1", "--fid-reference", "0", "--out", str(out)]
    argv += ["--prior-steps", "2", "--prior-guidance", "2.5", "--best-of", "1", "--decoder-steps", "2"]
    argv += ["--decoder-guidance", "1.5", "--eta", "0.5", "--upsampler-steps", "2,3", "--device", "cpu"]
    argv += ["--decoder-condition", "caption", "--prior-sampler", "dpmpp_2m", "--upsampler-sampler", "ddpm"]
    assert benchmark.main(argv) == 0
    assert len(seen) == 1  # the 4 prompts (a category each) in one batch
    assert seen[0]["prior"] == StageSettings(steps=2, guidance_scale=2.5, best_of=1, sampler="dpmpp_2m")
    assert seen[0]["decoder"] == StageSettings(steps=2, guidance_scale=1.5, eta=0.5, condition="caption")
    assert [(u.steps, u.sampler) for u in seen[0]["upsamplers"]] == [(2, "ddpm"), (3, "ddpm")]
    report = json.loads((out / "benchmark.json").read_text())
    assert report["metrics"]["bench/n"] == 4 and len(report["samples"]) == 4
    assert report["settings"]["prior"]["guidance_scale"] == 2.5
    assert [u["steps"] for u in report["settings"]["upsamplers"]] == [2, 3]
    assert (out / "samples.png").exists() and (out / "all.png").exists()
    for bad, expected in (("2,3,4", "expected 1 or 2 comma-separated values"), ("2,x", "expected integers")):
        argv[argv.index("--upsampler-steps") + 1] = bad
        assert benchmark.main(argv) == 2
        assert f"--upsampler-steps {bad}: {expected}" in capsys.readouterr().err


def test_cli_takes_an_images_centred_square_and_refuses_a_mask_of_another_shape(tmp_path):
    """A 4:3 photo was squashed to a square (the stages were trained on centre crops), and a mask of
    another shape was stretched onto it without a word."""
    photo = np.zeros((48, 64, 3), np.uint8)
    photo[:, 8:56] = 200  # the centred 48 px square is all 200
    Image.fromarray(photo).save(tmp_path / "photo.png")
    image = sample_cli.read_image(str(tmp_path / "photo.png"))
    assert image.shape == (3, 48, 48) and int(image.min()) == 200
    half = np.zeros((24, 32), np.uint8)  # the photo's shape at half size
    half[:, 16:] = 255  # keep the right half
    Image.fromarray(half).save(tmp_path / "mask.png")
    mask = sample_cli.read_mask(str(tmp_path / "mask.png"), str(tmp_path / "photo.png"))
    assert mask.shape == (1, 48, 48)
    assert mask[0, :, :24].sum() == 0 and mask[0, :, 24:].min() == 1  # cropped as the photo is
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "square.png")
    with pytest.raises(ValueError, match=r"--mask .*square.png: 64x64, the image .*photo.png is 64x48"):
        sample_cli.read_mask(str(tmp_path / "square.png"), str(tmp_path / "photo.png"))


def test_cli_errors_name_what_is_missing(tmp_path, capsys):
    assert sample_cli.main(["text", "a red circle", "--cascade", str(tmp_path)]) == 2
    assert "no decoder" in capsys.readouterr().err
    assert sample_cli.main(["text", "a red circle", "--cascade", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_checkpoints_with_pickled_objects_are_refused(cascade_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((cascade_dir / "upsampler_256" / "config.yaml").read_text())
    good = torch.load(cascade_dir / "upsampler_256" / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({**good, "extra": PicklePayload()}, run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="last.ckpt: refused to load: it contains pickled objects"):
        load_stage(run)
    assert not PicklePayload.ran
    torch.save(good, run / "checkpoints" / "last.ckpt")  # the same checkpoint without it loads
    assert load_stage(run).global_step == 2


def test_a_run_from_before_the_key_renames_still_loads(cascade_dir, tmp_path):
    """A run directory whose config.yaml has the old keys (the optimizer's loose in module, module.eps
    beside prediction: eps; diffusion.clip) loads as the same module, with a warning naming them."""
    import shutil

    import yaml

    from train.cascade import load_module

    old = tmp_path / "upsampler_256"
    shutil.copytree(cascade_dir / "upsampler_256", old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    cfg["module"].update(cfg["module"].pop("optimizer"))
    cfg["module"]["diffusion"]["clip"] = cfg["module"]["diffusion"].pop("clip_denoised")
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.warns(FutureWarning, match="module.lr -> module.optimizer.lr, .*module.diffusion.clip ->"):
        stage = load_stage(old)
    assert stage.cfg.module == load_stage(cascade_dir / "upsampler_256").cfg.module
    with pytest.warns(FutureWarning, match="module.eps -> module.optimizer.eps"):
        up = load_module(old)  # as Cascade.load builds each stage
    assert up.hparams == load_module(cascade_dir / "upsampler_256").hparams
    assert up.sampler.clip_denoised == "static"


def test_decoder_sample_can_drop_the_image_embedding(cascade):
    dec, text = cascade.decoder, cascade.text(["a red circle", "a blue square"])
    emb = cascade.clip.embed(None, text["tokens"])["txt_emb"]
    cond = dec.conditioning(emb, text["tokens"], text["txt_feat"])
    other = dec.conditioning(-emb, text["tokens"], text["txt_feat"])

    def run(c, **kw):
        return dec.sample(c, steps=3, generator=torch.Generator().manual_seed(0), **kw)

    # dropped, the embedding is replaced by the null tokens: any embedding gives the same images
    assert torch.equal(run(cond, drop_image=True), run(other, drop_image=True))
    assert not torch.equal(run(cond), run(other))


def test_decoder_condition_setting_chooses_what_the_decoder_sees(cascade):
    """StageSettings(condition=...): caption alone (a lever: the prior's embedding is not used), the image
    embedding alone (the caption is not used), or both (the default)."""
    a, b = cascade.text(["a red circle", "a red circle"]), cascade.text(["two blue squares", "a green star"])
    emb = cascade.clip.embed(None, a["tokens"])["txt_emb"]

    def decode(e, text, condition):
        settings = StageSettings(steps=2, condition=condition)
        return cascade.decode(e, text, settings, torch.Generator().manual_seed(0))

    assert torch.equal(decode(emb, a, "caption"), decode(-emb, a, "caption"))
    assert not torch.equal(decode(emb, a, "both"), decode(-emb, a, "both"))
    assert torch.equal(decode(emb, a, "image"), decode(emb, b, "image"))
    assert not torch.equal(decode(emb, a, "both"), decode(emb, b, "both"))
    with pytest.raises(ValueError, match=r"condition='text': expected one of \['both', 'caption', 'image'\]"):
        StageSettings(condition="text")


def test_probe_scores_every_stage_on_ground_truth_renders(cascade, cascade_dir, tmp_path, capsys):
    from eval import probe

    result = probe.probe(cascade, n=6, steps=2, noise_steps=(0, 300), upsampler_steps=(2, 2))
    rows = {r["probe"]: r for r in result["rows"]}
    assert list(rows) == [
        "renders at 16 px",
        "renders -> upsampler 1 (32 px)",
        "renders -> upsampler 2 (64 px)",
        "decoder (image + caption)",
        "decoder (caption only)",
        "decoder (image only)",
        "denoise t=0: decoder x0",
        "denoise t=0: noised render",
        "denoise t=300: decoder x0",
        "denoise t=300: noised render",
    ]
    assert result["n"] == 6 and all(0.0 <= r[c] <= 1.0 for r in rows.values() for c in probe.CRITERIA)
    # the renders are the ceiling: one object of the prompted colour each, the shape nearly always found
    ceiling = rows["renders at 16 px"]
    assert ceiling["colour"] == 1.0 and ceiling["count"] == 1.0 and ceiling["shape"] >= 5 / 6
    # at step 0 the noised render is the render (noise std 0.01): the same scores
    assert rows["denoise t=0: noised render"] == {**ceiling, "probe": "denoise t=0: noised render"}
    # at step 300 (noise std 0.46) the saturation threshold no longer finds one clean object
    assert rows["denoise t=300: noised render"]["count"] < 1.0
    sep = result["clip"]
    assert -1.0 <= sep["mean_cos"] <= sep["max_cos"] <= 1.0 + 1e-6
    # the pairs: each two-object prompt against its contrast, through CLIP, the prior and the decoder
    assert list(result["pairs"]) == ["binding", "spatial"]
    for category, pair in result["pairs"].items():
        assert pair["n"] == 6 and all(0.0 <= pair[k] <= 1.0 for k in ("clip_image", "clip_text", "prior"))
        assert -1.0 <= pair["image_cos"] <= 1.0 + 1e-6 and -1.0 <= pair["text_cos"] <= 1.0 + 1e-6
        names = [r["probe"] for r in pair["rows"]]
        assert names == ["renders at 16 px"] + [f"decoder ({n})" for n, _, _ in probe.DECODER_PROBES]
        extra = {"objects_bound", "objects_swapped"} | ({"relation"} if category == "spatial" else set())
        assert all(set(r) == {"probe", "correct"} | extra for r in pair["rows"]), pair["rows"]
    flat = probe.metrics(result)
    assert flat["probe/binding/prior"] == result["pairs"]["binding"]["prior"]
    assert (
        flat["probe/spatial/decoder_caption_only/relation"]
        == result["pairs"]["spatial"]["rows"][2]["relation"]
    )
    table = probe.table(result)
    assert "| probe | binding | spatial |" in table and "| decoder (image only): all correct | " in table
    assert "| CLIP: a render's embedding is closer to its caption than to the contrast's | " in table

    out = tmp_path / "probe.json"
    argv = ["--cascade", str(cascade_dir), "--n", "6", "--steps", "2", "--noise-steps", "0"]
    assert probe.main(argv + ["--upsampler-steps", "2,2", "--json", str(out)]) == 0
    assert "| renders at 16 px | 100% |" in capsys.readouterr().out
    assert [r["probe"] for r in json.loads(out.read_text())["rows"]][-1] == "denoise t=0: noised render"
    assert probe.main(argv[:-1] + ["1000"]) == 2
    assert "noise step 1000: expected 0..999" in capsys.readouterr().err
    assert probe.main(argv[:-1] + ["a"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_probe_picks_count_the_closer_of_two_and_ties_half():
    from train.validation import closer_rate

    query = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    a = torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 0.0]])  # closer, farther, tie
    b = torch.tensor([[0.0, 1.0], [3.0, 0.1], [-1.0, 0.0]])
    assert closer_rate(query, a, b) == pytest.approx(0.5)
    assert (
        closer_rate(query[:2], a[:2], b[:2]) == pytest.approx(0.5)
        and closer_rate(query[:1], a[:1], b[:1]) == 1.0
    )


def test_the_cli_offers_each_mode_only_the_options_it_uses(capsys):
    """variations and interpolate decode from the image embedding alone (no prior, no caption), and
    interpolate steps at eta 0: those options were accepted and ignored."""
    from eval.sample import _parser

    p = _parser()
    assert p.parse_args(
        ["text", "a", "--prior-guidance", "2", "--decoder-condition", "caption", "--eta", "0.5"]
    )
    assert p.parse_args(["variations", "a.png", "--eta", "0.5"]).eta == 0.5
    for mode, option in [("variations", "--prior-guidance"), ("variations", "--decoder-condition"),
                         ("interpolate", "--best-of"), ("interpolate", "--eta")]:  # fmt: skip
        images = ["a.png", "b.png"] if mode == "interpolate" else ["a.png"]
        with pytest.raises(SystemExit):
            p.parse_args([mode, *images, option, "2"])
        assert f"unrecognized arguments: {option} 2" in capsys.readouterr().err


def test_text_diffs_move_the_images_embedding_toward_the_caption_difference(
    cascade, cascade_dir, capsys, tmp_path
):
    """The paper's text diffs: frame 0 is the image's own embedding decoded from its inversion (what
    variations(invert, eta 0) gives), the last is slerped max_theta of the way toward the normalised
    difference of the two captions' text embeddings, and every frame starts from that inversion."""
    image = Image.new("RGB", (64, 64), (120, 120, 120))
    image.paste((200, 30, 30), (16, 16, 48, 48))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    dec, ups = FAST["decoder"], FAST["upsamplers"]
    diff = cascade.text_diff(
        x, "a red square", "a blue square", n=3, max_theta=0.5, decoder=dec, upsamplers=ups
    )
    assert diff.images.shape == (3, 3, 64, 64)
    z = cascade.image_embedding(x[None])[0].cpu()
    texts = cascade.text(["a red square", "a blue square"])["txt_emb"].cpu()
    d = torch.nn.functional.normalize(texts[1] - texts[0], dim=-1)
    torch.testing.assert_close(diff.image_emb[0], z, atol=1e-5, rtol=0)
    angle = torch.arccos((z * d).sum())
    torch.testing.assert_close((diff.image_emb[2] * z).sum(), torch.cos(0.5 * angle), atol=1e-4, rtol=0)
    torch.testing.assert_close((diff.image_emb[2] * d).sum(), torch.cos(0.5 * angle), atol=1e-4, rtol=0)
    same = cascade.variations(x[None], n=1, eta=0.0, invert=True, decoder=dec, upsamplers=ups)
    assert torch.equal(diff.stages[0][0], same.stages[0][0])  # the decoder's frame 0: the reconstruction
    with pytest.raises(ValueError, match=r"text diffs: max_theta=0: expected a fraction"):
        cascade.text_diff(x, "a", "b", max_theta=0, decoder=dec, upsamplers=ups)
    with pytest.raises(ValueError, match=r"'a red square' and 'a red square' have one text embedding"):
        cascade.text_diff(x, "a red square", "a red square", decoder=dec, upsamplers=ups)
    from eval.sample import _parser

    args = _parser().parse_args(["text-diff", "p.png", "--from", "a red square", "--to", "a blue square"])
    assert (args.source, args.target, args.max_theta, args.n) == ("a red square", "a blue square", 0.5, 5)
    with pytest.raises(SystemExit):
        _parser().parse_args(["text-diff", "p.png", "--from", "a", "--to", "b", "--eta", "0.3"])
    image.save(tmp_path / "p.png")
    argv = [
        "text-diff",
        str(tmp_path / "p.png"),
        "--from",
        "a red square",
        "--to",
        "a blue square",
        "--n",
        "2",
    ]
    argv += [
        "--cascade",
        str(cascade_dir),
        "--decoder-steps",
        "3",
        "--upsampler-steps",
        "2",
        "--out",
        str(tmp_path / "o"),
    ]
    assert sample_cli.main(argv) == 0 and len(list((tmp_path / "o").glob("000_0*.png"))) == 2
