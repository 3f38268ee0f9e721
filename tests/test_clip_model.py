"""CLIP model: shapes, pooling, causality, checkpointing, named architectures, attention layout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from train.models.clip import CLIP
from train.models.layers import SelfAttention

CONF = Path(__file__).resolve().parents[1] / "conf" / "net"
EOT = 2


def tiny(**kw) -> CLIP:
    torch.manual_seed(0)
    return CLIP(embed_dim=16, vision=dict(image_size=16, patch_size=4, width=32, layers=2, heads=4),
                text=dict(context_length=8, vocab_size=50, width=32, layers=2, heads=4), eot_id=EOT, **kw)


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
    with torch.no_grad():
        net.logit_scale.fill_(math.log(500))
    assert net(torch.randn(1, 3, 16, 16), tokens(1))["logit_scale"].item() == pytest.approx(100)


def test_text_pools_at_first_eot_and_ignores_what_follows():
    net = tiny().eval()
    t = tokens()
    base = net.encode_text(t)
    after = t.clone()
    after[:, 6:] = 7  # after the eot: causal attention means no influence on the pooled state
    after[:, 7] = EOT  # a second eot does not move the pooling position
    torch.testing.assert_close(net.encode_text(after), base)
    before = t.clone()
    before[:, 3] = 9 if before[0, 3] != 9 else 10
    assert not torch.allclose(net.encode_text(before)[0], base[0])
    no_eot = t.clone()
    no_eot[no_eot == EOT] = 5
    assert (net.text.pool_index(no_eot) == 7).all(), "a row without eot pools its last position"


def test_text_transformer_is_causal():
    net = tiny().eval()
    t = tokens(1)
    h = net.text.hidden_states(t)
    t2 = t.clone()
    t2[0, 4] = 11 if t[0, 4] != 11 else 12
    h2 = net.text.hidden_states(t2)
    torch.testing.assert_close(h2[0, :4], h[0, :4])
    assert not torch.allclose(h2[0, 4:], h[0, 4:])


def test_grad_checkpointing_gives_identical_loss_and_gradients():
    images, toks = torch.randn(4, 3, 16, 16), tokens(4)
    grads = []
    for ckpt in (False, True):
        net = tiny(grad_checkpointing=ckpt).train()
        out = net(images, toks)
        loss = (out["logit_scale"] * out["image_features"] @ out["text_features"].T).logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_wrong_inputs_name_the_option():
    net = tiny()
    with pytest.raises(ValueError, match=r"net.vision.image_size=16: expected images \(B, 3, 16, 16\), got \(2, 3, 32, 32\)"):
        net.encode_image(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"net.text.context_length=8.*data.tokenizer.context_length"):
        net.encode_text(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by net.vision.patch_size"):
        CLIP(8, dict(image_size=30, patch_size=4, width=8, layers=1, heads=1),
             dict(context_length=4, vocab_size=10, width=8, layers=1, heads=1))
    with pytest.raises(ValueError, match="net.eot_id=99 is outside the vocabulary"):
        CLIP(8, dict(image_size=8, patch_size=4, width=8, layers=1, heads=1),
             dict(context_length=4, vocab_size=10, width=8, layers=1, heads=1), eot_id=99)


@pytest.mark.parametrize(("name", "params"), [("clip_vit_b32", 151_277_313), ("clip_vit_b16", 149_620_737),
                                              ("clip_vit_l14", 427_616_513), ("clip_vit_h16_256", 986_339_841)])
def test_named_architectures_match_open_clip_parameter_counts(name, params):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    with torch.device("meta"):
        net = instantiate(cfg)
    assert sum(p.numel() for p in net.parameters()) == params
    assert net.text.eot_id == 49407, "CLIP's vocabulary: eot is the last id when the config leaves it null"


def test_tiny_config_instantiates_and_runs():
    net = instantiate(OmegaConf.load(CONF / "clip_tiny.yaml"), eot_id=2)
    out = net(torch.randn(2, 3, 64, 64), torch.full((2, 32), 2))
    assert out["image_features"].shape == (2, 128)


def test_sdpa_attention_equals_torch_multihead_attention_with_the_same_weights():
    torch.manual_seed(0)
    ours = SelfAttention(32, 4)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict(), strict=True)  # identical parameter names and shapes
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    mask = torch.triu(torch.full((7, 7), float("-inf")), diagonal=1)
    torch.testing.assert_close(ours(x, causal=True), ref(x, x, x, attn_mask=mask, need_weights=False)[0],
                               rtol=1e-5, atol=1e-6)
