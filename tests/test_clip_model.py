"""CLIP model: shapes, pooling, causality, checkpointing, named architectures, attention layout, FLOPs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from train.models.clip import CLIP, flops_per_sample, from_open_clip_state_dict
from train.models.layers import SelfAttention, Transformer

CONF = Path(__file__).resolve().parents[1] / "conf" / "net"
EOT = 2
VISION = dict(image_size=16, patch_size=4, width=32, layers=2, heads=4)
TEXT = dict(context_length=8, vocab_size=50, width=32, layers=2, heads=4)


def tiny(**kw) -> CLIP:
    torch.manual_seed(0)
    return CLIP(**{"embed_dim": 16, "vision": VISION, "text": TEXT, "eot_id": EOT, **kw})


def tokens(batch: int = 3) -> torch.Tensor:
    t = torch.randint(4, 50, (batch, 8))
    t[:, 0] = 1
    t[:, 5] = EOT
    t[:, 6:] = 0
    return t


def test_forward_shapes_unit_norm_and_logit_scale():
    net = tiny()
    out = net(torch.randn(3, 3, 16, 16), tokens())
    assert out["image_features"].shape == (3, 16) and out["text_features"].shape == (3, 16)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    out["logit_scale"].backward()
    assert net.logit_scale.grad.item() == pytest.approx(1 / 0.07, rel=1e-5), (
        "d exp(s)/ds = exp(s) below the clamp"
    )
    with torch.no_grad():
        net.logit_scale.fill_(math.log(500))
    net.logit_scale.grad = None
    scale = net(torch.randn(1, 3, 16, 16), tokens(1))["logit_scale"]
    assert scale.item() == pytest.approx(100)
    scale.backward()
    assert net.logit_scale.grad.item() == 0, "clamped: no gradient pushes the scale further"
    unnormalised = net.encode_image(torch.randn(2, 3, 16, 16), normalize=False)
    assert not torch.allclose(unnormalised.norm(dim=-1), torch.ones(2))


def test_clip_initialisation_scales():
    torch.manual_seed(0)
    net = CLIP(
        embed_dim=64, vision=dict(VISION, width=256), text=dict(TEXT, vocab_size=4000, width=256), eot_id=3
    )
    std = lambda p: p.detach().std().item()  # noqa: E731
    assert std(net.text.token_embedding.weight) == pytest.approx(0.02, rel=0.05)
    assert std(net.text.positional_embedding) == pytest.approx(0.01, rel=0.15)
    assert std(net.text.text_projection) == pytest.approx(256**-0.5, rel=0.05)
    assert std(net.visual.proj) == pytest.approx(256**-0.5, rel=0.05)
    block = net.text.transformer.resblocks[0]
    assert std(block.attn.in_proj_weight) == pytest.approx(256**-0.5, rel=0.05)
    assert std(block.mlp.c_proj.weight) == pytest.approx(256**-0.5 * 4**-0.5, rel=0.05)  # 2 x 2 layers


def test_text_pools_at_first_eot_and_ignores_what_follows():
    net = tiny().eval()
    t = tokens()
    base = net.encode_text(t)
    after = t.clone()
    after[:, 6:] = 7  # after the eot: causal attention means no influence on the pooled state
    after[:, 7] = EOT  # a second eot does not move the pooling position
    torch.testing.assert_close(net.encode_text(after), base)
    before = t.clone()
    before[:, 3] = torch.where(before[:, 3] == 9, 10, 9)
    changed = net.encode_text(before)
    assert all(not torch.allclose(changed[i], base[i]) for i in range(3))
    no_eot = t.clone()
    no_eot[no_eot == EOT] = 5
    assert (net.text.pool_index(no_eot) == 7).all(), "a row without eot pools its last position"
    mixed = torch.tensor([[1, EOT, 4, 4, 4, 4, 4, 4], [1, 4, 4, 4, 4, 4, 4, 49], [EOT] * 8])
    assert net.text.pool_index(mixed).tolist() == [1, 7, 0], "eot need not be the largest id"


def test_eot_defaults_to_the_last_vocabulary_id():
    net = CLIP(embed_dim=8, vision=VISION, text=TEXT)
    assert net.text.eot_id == TEXT["vocab_size"] - 1


def test_text_transformer_is_causal():
    net = tiny().eval()
    t = tokens(1)
    h = net.text.hidden_states(t)
    for i in range(1, 8):
        t2 = t.clone()
        t2[0, i] = 11 if t[0, i] != 11 else 12
        h2 = net.text.hidden_states(t2)
        torch.testing.assert_close(h2[0, :i], h[0, :i], rtol=0, atol=1e-6)
        assert not torch.allclose(h2[0, i:], h[0, i:])


def test_vision_transformer_is_not_causal():
    net = tiny().eval()
    x = torch.randn(1, 3, 16, 16)
    y = x.clone()
    y[..., -4:, -4:] += 1  # only the last patch
    assert not torch.allclose(net.encode_image(x), net.encode_image(y)), "the class token sees every patch"


def test_grad_checkpointing_gives_identical_loss_and_gradients():
    images, toks = torch.randn(4, 3, 16, 16), tokens(4)
    results = []
    for ckpt in (False, True):
        net = tiny(grad_checkpointing=ckpt).train()
        out = net(images, toks)
        loss = (out["logit_scale"] * out["image_features"] @ out["text_features"].T).logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_grad_checkpointing_recomputes_blocks_only_in_training(monkeypatch):
    import train.models.layers as layers

    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    net = tiny()
    net.set_grad_checkpointing(True)
    net(torch.randn(2, 3, 16, 16), tokens(2))
    assert len(calls) == 4 and all(k == {"use_reentrant": False} for k in calls)  # 2 + 2 blocks
    net.eval()
    net(torch.randn(2, 3, 16, 16), tokens(2))
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 3, 16, 16), tokens(2))
    net.set_grad_checkpointing(False)
    net(torch.randn(2, 3, 16, 16), tokens(2))
    assert len(calls) == 4


def test_wrong_inputs_name_the_option():
    net = tiny()
    with pytest.raises(ValueError, match=r"net.vision.image_size=16 but images are 32x32 \(data.image_size"):
        net.encode_image(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 16, 16\), got \(2, 1, 16, 16\)"):
        net.encode_image(torch.randn(2, 1, 16, 16))
    with pytest.raises(
        ValueError, match=r"net.text.context_length=8 but tokens have length 9.*data.tokenizer"
    ):
        net.encode_text(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(
        ValueError, match="net.vision.image_size=30 is not divisible by net.vision.patch_size=4"
    ):
        CLIP(8, dict(VISION, image_size=30), TEXT)
    with pytest.raises(ValueError, match="net.eot_id=99 is outside the vocabulary"):
        CLIP(8, VISION, TEXT, eot_id=99)
    with pytest.raises(ValueError, match=r"unknown option\(s\) net.text.ctx_len"):
        CLIP(8, VISION, dict(TEXT, ctx_len=3))
    with pytest.raises(ValueError, match=r"missing option\(s\) net.vision.heads"):
        CLIP(8, {k: v for k, v in VISION.items() if k != "heads"}, TEXT)
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        CLIP(8, dict(VISION, heads=3), TEXT)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("clip_vit_b32", 151_277_313),  # open_clip ViT-B-32
        ("clip_vit_b16", 149_620_737),  # open_clip ViT-B-16
        ("clip_vit_l14", 427_616_513),  # open_clip ViT-L-14
        ("clip_vit_h16_256", 986_339_841),  # DALL-E 2's CLIP: ViT-H/16 at 256 px (pinned, no open_clip twin)
    ],
)
def test_named_architectures_match_open_clip_parameter_counts(name, params):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg.eot_id is None
    with torch.device("meta"):  # no memory, no initialisation cost
        net = instantiate(cfg)
    assert sum(p.numel() for p in net.parameters()) == params
    assert net.text.eot_id == 49407, "CLIP's vocabulary: eot is the last id when the config leaves it null"
    cfg.eot_id = 49407
    with torch.device("meta"):
        assert instantiate(cfg).text.eot_id == 49407


def test_h16_256_is_the_dalle2_clip():
    cfg = OmegaConf.load(CONF / "clip_vit_h16_256.yaml")
    assert (cfg.embed_dim, cfg.vision.image_size, cfg.vision.patch_size) == (1024, 256, 16)
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads) == (1280, 32, 16)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads) == (1024, 24, 16)


def test_tiny_config_instantiates_and_runs():
    cfg = OmegaConf.load(CONF / "clip_tiny.yaml")
    cfg.eot_id, cfg.text.vocab_size = 2, 1024  # what train/run.py sets from the (synthetic) tokenizer
    net = instantiate(cfg)
    assert net.text.eot_id == 2 and isinstance(net.vision_cfg, dict)
    out = net(torch.randn(2, 3, 64, 64), torch.full((2, cfg.text.context_length), 2))
    assert out["image_features"].shape == (2, 128)
    assert sum(p.numel() for p in net.parameters()) < 2_000_000, (
        "clip_tiny must train in minutes on 2 CPU cores"
    )


def test_sdpa_attention_equals_torch_multihead_attention_with_the_same_weights():
    torch.manual_seed(0)
    ours = SelfAttention(32, 4)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict(), strict=True)  # identical parameter names and shapes
    with torch.no_grad():
        ref.in_proj_bias.normal_()  # non-zero biases, copied into ours
        ours.in_proj_bias.copy_(ref.in_proj_bias)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    mask = torch.triu(torch.full((7, 7), float("-inf")), diagonal=1)
    torch.testing.assert_close(
        ours(x, causal=True), ref(x, x, x, attn_mask=mask, need_weights=False)[0], rtol=1e-5, atol=1e-6
    )


def test_state_dict_names_follow_open_clip():
    net = tiny()
    keys = set(net.state_dict())
    assert {
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.proj",
        "visual.transformer.resblocks.1.attn.in_proj_weight",
        "visual.transformer.resblocks.1.mlp.c_fc.weight",
        "text.token_embedding.weight",
        "text.text_projection",
        "text.ln_final.weight",
        "text.transformer.resblocks.0.ln_1.weight",
        "logit_scale",
    } <= keys
    # open_clip's CLIP keeps the text tower at the top level: strip our prefix, map back, load strictly.
    theirs = {k.removeprefix("text."): v for k, v in net.state_dict().items()}
    assert "token_embedding.weight" in theirs and "visual.conv1.weight" in theirs
    other = tiny()
    other.load_state_dict(from_open_clip_state_dict({**theirs, "attn_mask": torch.zeros(8, 8)}), strict=True)


def test_flops_per_sample_matches_torch_flop_counter():
    """The matmul FLOPs counted by torch (SDPA in its math form, which computes the full causal square)."""
    net = tiny()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 16, 16), tokens(1))
    text_attention = TEXT["layers"] * 4 * TEXT["context_length"] ** 2 * TEXT["width"]  # full square
    assert flops_per_sample(net) == counter.get_total_flops() - text_attention / 2  # we count the causal half
    assert flops_per_sample(net) == net.flops_per_sample()
    cfg = OmegaConf.load(CONF / "clip_vit_b16.yaml")
    # open_clip's model profile for ViT-B-16: 17.58 image + 2.91 text GMACs per sample (1 MAC = 2 FLOPs)
    assert flops_per_sample(cfg) == pytest.approx(2 * (17.58e9 + 2.91e9), rel=0.02)


def test_transformer_rejects_mask_and_causal_together():
    block = Transformer(8, 1, 2, causal=True)
    x = torch.randn(1, 3, 8)
    mask = torch.zeros(3, 3)
    assert block(x, attn_mask=mask).shape == x.shape  # an explicit mask replaces is_causal
    with pytest.raises(ValueError, match="either causal=True or an explicit attn_mask"):
        block.resblocks[0].attn(x, causal=True, attn_mask=mask)


def test_conv_stem_keeps_the_token_grid_and_counts_its_flops():
    torch.manual_seed(0)
    net = CLIP(embed_dim=16, vision={**VISION, "stem": "conv"}, text=TEXT, eot_id=EOT)
    assert [m.out_channels for m in net.visual.conv1 if isinstance(m, torch.nn.Conv2d)] == [16, 32, 32]
    assert net.visual.conv1(torch.randn(2, 3, 16, 16)).shape == (2, 32, 4, 4)  # same grid as 4x4 patches
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 16, 16), tokens(1))
    text_attention = TEXT["layers"] * 4 * TEXT["context_length"] ** 2 * TEXT["width"]
    assert flops_per_sample(net) == counter.get_total_flops() - text_attention / 2
    with pytest.raises(ValueError, match="net.vision.stem=conv needs a power-of-two net.vision.patch_size"):
        CLIP(8, {**VISION, "patch_size": 3, "image_size": 15, "stem": "conv"}, TEXT, eot_id=EOT)
    with pytest.raises(ValueError, match="net.vision.stem='cnn'"):
        CLIP(8, {**VISION, "stem": "cnn"}, TEXT, eot_id=EOT)


def test_a_logit_scale_past_its_bound_is_clamped_after_each_step(tmp_path):
    """open_clip clamps the parameter after each step; the forward's clamp alone gives no gradient above
    log(100), and without weight decay a scale stepped past it stayed there for good (a run here kept
    4.7 through its steps)."""
    from tests.conftest import compose_config
    from train.run import train

    net = tiny()
    with torch.no_grad():
        net.logit_scale.fill_(4.7)
    net.clamp_logit_scale_()
    assert net.logit_scale.item() == pytest.approx(math.log(100))
    cfg = compose_config(
        ["debug=fast", f"paths.data_dir={tmp_path / 'datasets'}", f"paths.output_dir={tmp_path / 'run'}",
         "trainer.max_steps=2", "net.init_logit_scale=4.7"]
    )  # fmt: skip
    train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["net.logit_scale"].item() <= math.log(100) + 1e-6


def test_gradient_accumulation_warns_that_the_contrastive_batch_is_the_micro_batch(tmp_path, caplog):
    """data.global_batch_size is the samples of an optimizer step, but each micro-batch's loss contrasts
    only its own: a CLIP with accumulate_grad_batches=2 trained on half the negatives without a word."""
    from tests.conftest import compose_config
    from train.run import train

    cfg = compose_config(
        ["debug=fast", f"paths.data_dir={tmp_path / 'datasets'}", f"paths.output_dir={tmp_path / 'run'}",
         "trainer.max_steps=1", "trainer.accumulate_grad_batches=2"]
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="train.modules.clip"):
        train(cfg)
    assert (
        "trainer.accumulate_grad_batches=2: each micro-batch's contrastive loss contrasts its own"
        in caplog.text
    )


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_accum_freq_trains_on_the_whole_batch_loss_and_gradients_a_chunk_at_a_time(tmp_path, patch_dropout):
    """module.accum_freq=4: the loss of the batch of 8 and its gradients, each chunk of 2 through the net
    with gradients once (and once without); logit_scale's gradient taken once, not once per chunk. With
    patch dropout, the kept patches are drawn once for the batch, as one pass draws them, and each chunk's
    two passes keep the same ones (each pass drawing its own, the loss was another batch's)."""
    from train.losses import ClipLoss
    from train.modules.clip import ClipModule

    images, toks = torch.randn(8, 3, 16, 16), tokens(8)
    vision = {**VISION, "patch_dropout": patch_dropout}
    whole = tiny(vision=vision).train()  # (each tiny() seeds the generator: both draw the same patches)
    out = whole(images, toks)
    want = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    want.backward()
    module = ClipModule(tiny(vision=vision).train(), accum_freq=4)
    calls = []
    module.net.register_forward_hook(
        lambda m, args, out: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    got, _ = module.cached_loss(images, toks, 4)
    got.backward()  # (Lightning's, for the last chunk)
    assert calls == [(2, False)] * 4 + [(2, True)] * 4
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # chunks that do not divide the batch (6 in 4: three of 2; the trainer refuses it, a direct call may not)
    six = ClipModule(tiny(vision=vision).train(), accum_freq=4).cached_loss(images[:6], toks[:6], 4)[0]
    assert torch.isfinite(six)
    # the model's FLOPs, as perf/mfu counts them: the no-grad pass over the chunks is on top (it counted
    # a third more at k = 2)
    from train.perf import ModelFlopCounter

    with ModelFlopCounter(display=False) as plain:
        out = tiny().train()(images, toks)
        ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    with ModelFlopCounter(display=False) as chunked:
        ClipModule(tiny().train(), accum_freq=4).cached_loss(images, toks, 4)[0].backward()
    assert chunked.get_total_flops() == pytest.approx(plain.get_total_flops(), rel=0.01)
    # (float32 sums in another order: atol 1e-5 of the largest entry)
    for name, p in whole.named_parameters():
        torch.testing.assert_close(dict(module.net.named_parameters())[name].grad, p.grad, rtol=1e-5,
                                   atol=1e-5 * p.grad.abs().max().item(), msg=name)  # fmt: skip


def test_accum_freq_runs_in_a_training_run_and_refuses_what_it_cannot_do(tmp_path):
    from types import SimpleNamespace

    from pytorch_lightning.strategies import DeepSpeedStrategy, SingleDeviceStrategy

    from tests.conftest import compose_config
    from train.modules.clip import ClipModule
    from train.run import train

    def losses(name: str, *extra: str) -> list[float]:
        """train/loss of each step of a 4-step run, from its metrics.csv."""
        import csv

        cfg = compose_config(
            ["debug=fast", f"paths.data_dir={tmp_path / 'datasets'}", f"paths.output_dir={tmp_path / name}",
             "trainer.max_steps=4", "trainer.log_every_n_steps=1", "logger=csv", *extra]
        )  # fmt: skip
        train(cfg)
        with open(tmp_path / name / "csv" / "run" / "metrics.csv") as f:
            return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]

    # Lightning zeroes the gradients between the step and its backward: a run that let it kept only the
    # last chunk's, and from the second step on its losses were another run's
    whole, chunked = losses("whole"), losses("chunked", "module.accum_freq=2")
    assert len(whole) == 4 and chunked == pytest.approx(whole, rel=1e-5)
    # and SigLIP's sigmoid loss, whose learned bias takes its gradient in the last chunk as the scale does
    siglip = ("module.loss=siglip", "net.init_logit_bias=-10", "net.init_logit_scale=2.302585")
    whole, chunked = losses("siglip", *siglip), losses("siglip_chunked", *siglip, "module.accum_freq=2")
    assert len(whole) == 4 and chunked == pytest.approx(whole, rel=1e-5)
    state = torch.load(tmp_path / "siglip_chunked" / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    assert -10 < state["net.logit_bias"].item() < -9.9  # (it learns)

    with pytest.raises(ValueError, match=r"module.accum_freq=0: expected an integer >= 1"):
        ClipModule(tiny(), accum_freq=0)
    with pytest.raises(ValueError, match="module.accum_freq > 1 with module.hard_negatives"):
        ClipModule(tiny(), accum_freq=2, hard_negatives=["colour"], tokenizer=object())
    # at fit start, from the trainer: every problem named at once (the config's check: tests/test_config.py)
    module = ClipModule(tiny(), accum_freq=3)
    module._trainer = SimpleNamespace(
        strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy), precision="16-mixed", accumulate_grad_batches=2,
        datamodule=SimpleNamespace(batch_size=8),
    )  # fmt: skip
    with pytest.raises(ValueError) as refused:
        module._check_accum_freq()
    assert str(refused.value).splitlines() == [
        "module.accum_freq=3 with DeepSpeedStrategy: it runs a backward pass per chunk inside the training step, "
        "and DeepSpeed's ZeRO reduces each gradient once a step: use strategy=ddp, fsdp or one device",
        "module.accum_freq=3 with trainer.accumulate_grad_batches=2: use one of them (accum_freq keeps the whole "
        "batch's negatives)",
        "module.accum_freq=3 with trainer.precision=16-mixed: use bf16-mixed",
        "module.accum_freq=3 does not divide the per-device batch of 8 (data.global_batch_size / ranks / "
        "trainer.accumulate_grad_batches)",
    ]
    module._trainer = SimpleNamespace(
        strategy=SingleDeviceStrategy("cpu"), precision="bf16-mixed", accumulate_grad_batches=1,
        datamodule=SimpleNamespace(batch_size=9),
    )  # fmt: skip
    module._check_accum_freq()


def test_patch_dropout_keeps_a_random_part_of_the_positioned_patches_in_training_only():
    """net.vision.patch_dropout (FLIP): in training the transformer sees the class token and
    int(16 x 0.75) = 12 of the 16 patch tokens, each image its own, chosen after the positions are added;
    evaluation sees all 16. Given ``keep``, the tower computes exactly that subset."""
    net = tiny(vision={**VISION, "patch_dropout": 0.25})
    seen = []
    net.visual.transformer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    images = torch.randn(3, 3, 16, 16)
    net.train()
    keep = net.visual.kept_patches(3)
    assert keep.shape == (3, 12) and all(len(set(row.tolist())) == 12 for row in keep)
    assert len({tuple(sorted(row.tolist())) for row in keep}) == 3  # drawn for each image
    a, b = net.encode_image(images), net.encode_image(images)
    assert seen == [13, 13] and not torch.allclose(a, b)  # a new draw each pass
    v = net.visual  # the subset by hand: patch tokens + their own positions, then the kept ones
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(3, 1, -1), x], 1) + v.positional_embedding
    x = torch.cat([x[:, :1], x[torch.arange(3)[:, None], 1 + keep]], 1)
    by_hand = torch.nn.functional.normalize(v.ln_post(v.transformer(v.ln_pre(x))[:, 0]) @ v.proj, dim=-1)
    torch.testing.assert_close(net.encode_image(images, keep=keep), by_hand)
    net.eval()
    c, d = net.encode_image(images), net.encode_image(images)
    assert seen[-2:] == [17, 17] and torch.equal(c, d)
    assert tiny().visual.kept_patches(3) is None  # (0: every patch, no draw)
    for bad in (1.0, -0.1, True, "half"):
        with pytest.raises(ValueError, match=rf"net.vision.patch_dropout={bad!r}: expected the fraction"):
            tiny(vision={**VISION, "patch_dropout": bad})


def test_a_locked_tower_keeps_its_weights_through_training_and_its_last_blocks_learn():
    """module.lock_image (open_clip's --lock-image, LiT): after 3 AdamW steps with weight decay 0.1 the
    image tower is bitwise its starting self but for its last block, ln_post and proj
    (lock_image_unlocked_layers=1); the text tower and the logit scale learn. lock_text alike."""
    import pytorch_lightning as pl

    from train.modules.clip import ClipModule

    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 16, 16, generator=g), "tokens": tokens(4)} for _ in range(3)]
    for tower, prefix, head in (
        ("image", "visual.", ("ln_post", "proj")),
        ("text", "text.", ("ln_final", "text_projection")),
    ):
        module = ClipModule(
            tiny(), zeroshot=False, **{f"lock_{tower}": True, f"lock_{tower}_unlocked_layers": 1}
        )
        before = {k: v.clone() for k, v in module.net.state_dict().items()}
        trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
        after = module.net.state_dict()
        trained = {k for k in before if not torch.equal(before[k], after[k])}
        last = f"{prefix}transformer.resblocks.1."
        mine = {k for k in before if k.startswith(prefix)}
        learns = {k for k in mine if k.startswith(last) or k.removeprefix(prefix).startswith(head)}
        assert trained & mine == learns, sorted((trained & mine) ^ learns)
        assert "logit_scale" in trained and any(
            k.startswith("visual." if tower == "text" else "text.") for k in trained
        )
    with pytest.raises(
        ValueError, match=r"module.lock_image_unlocked_layers=3: expected 0 to the tower's 2 blocks"
    ):
        ClipModule(tiny(), lock_image=True, lock_image_unlocked_layers=3)
    with pytest.raises(ValueError, match=r"module.lock_text_unlocked_layers=1 without module.lock_text=true"):
        ClipModule(tiny(), lock_text_unlocked_layers=1)
