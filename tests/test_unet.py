"""The diffusion UNet family (train/models/unet.py): decoder and upsampler configurations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from train.models.unet import UNet
from train.run import CONF_DIR


def decoder(**kw) -> UNet:
    torch.manual_seed(0)
    args = dict(
        image_size=16,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[8],
        head_channels=16,
        cond_dim=12,
        text_encoder="clip",
        text_dim=20,
        learned_variance=True,
    )
    return UNet(**{**args, **kw})


def randomise(net: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised output layers make a fresh UNet output 0: perturb every weight to test routing."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def cond(b=3):
    g = torch.Generator().manual_seed(0)
    return {
        "image_emb": torch.randn(b, 12, generator=g),
        "text_feat": torch.randn(b, 6, 20, generator=g),
        "text_mask": torch.arange(6)[None] <= torch.tensor([1, 3, 5])[:, None],
    }


def test_decoder_output_shape_and_zero_init():
    net = decoder()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 999])
    out = net(x, t, **cond())
    assert out.shape == (3, 6, 16, 16)  # prediction + variance interpolation
    assert out.abs().max().item() == 0.0  # zero-initialised output conv


def test_decoder_conditioning_routes_and_dropout_removes_it():
    net = randomise(decoder()).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 900])
    c = cond()
    ref = net(x, t, **c)
    other_img = {**c, "image_emb": c["image_emb"] + 1.0}
    assert not torch.allclose(net(x, t, **other_img), ref)
    padded = {**c, "text_feat": torch.where(c["text_mask"][..., None], c["text_feat"], 50.0)}
    torch.testing.assert_close(net(x, t, **padded), ref, atol=1e-5, rtol=1e-5)  # padding is masked
    ones = torch.ones(3, dtype=torch.bool)
    a = net(x, t, **c, drop_image=ones, drop_text=ones)
    b = net(
        x,
        t,
        image_emb=-c["image_emb"],
        text_feat=c["text_feat"] * 2,
        text_mask=c["text_mask"],
        drop_image=ones,
        drop_text=ones,
    )
    torch.testing.assert_close(a, b)
    # dropping only the caption keeps the image embedding's influence
    a = net(x, t, **c, drop_text=ones)
    assert not torch.allclose(a, net(x, t, **other_img, drop_text=ones))


def test_text_pooled_adds_the_end_of_text_feature_to_the_embedding():
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 900])
    c = cond()
    eot = c["text_mask"].long().cumsum(1).argmax(1)  # each caption's last visible token: 1, 3, 5
    rows = torch.arange(3)
    other_eot = c["text_feat"].clone()
    other_eot[rows, eot] += 1.0
    other_word = c["text_feat"].clone()
    other_word[:, 0] += 1.0  # a visible token, not the end of text
    # Without attention the caption reaches the net only through the pooled feature.
    plain = randomise(decoder(attention_resolutions=[])).eval()
    torch.testing.assert_close(plain(x, t, **{**c, "text_feat": other_eot}), plain(x, t, **c))
    net = randomise(decoder(attention_resolutions=[], text_pooled=True)).eval()
    ref = net(x, t, **c)
    changed = net(x, t, **{**c, "text_feat": other_eot})
    assert all(not torch.allclose(changed[i], ref[i]) for i in range(3))
    torch.testing.assert_close(net(x, t, **{**c, "text_feat": other_word}), ref)
    ones = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(
        net(x, t, **c, drop_text=ones), net(x, t, **{**c, "text_feat": other_eot}, drop_text=ones)
    )
    with pytest.raises(ValueError, match="text_pooled needs a caption"):
        decoder(text_encoder=None, text_dim=None, text_pooled=True)


def test_trainable_text_encoder_and_grad_checkpointing():
    net = randomise(
        decoder(
            text_encoder="trainable",
            text_dim=None,
            text_vocab_size=50,
            text_context_length=6,
            text_width=32,
            text_layers=2,
            text_heads=4,
            text_eot_id=2,
        )
    ).train()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    tokens = torch.tensor([[1, 7, 8, 2, 0, 0], [1, 9, 2, 0, 0, 0]])
    emb = torch.randn(2, 12)
    calls = {"text": 0, "unet": 0}  # forward runs of a text block and a UNet block per training step

    def count(name: str, module: torch.nn.Module) -> None:  # (module hooks do not fire in a recompute)
        forward = module.forward

        def counted(*args, **kwargs):
            calls[name] += 1
            return forward(*args, **kwargs)

        module.forward = counted

    count("text", net.text_transformer.resblocks[0])
    count("unet", net.down[0])
    ref = net(x, t, image_emb=emb, tokens=tokens)
    ref.square().mean().backward()
    assert calls == {"text": 1, "unet": 1}
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert any(n.startswith("text_transformer") for n in grads)
    net.zero_grad()
    net.set_grad_checkpointing(True)
    out = net(x, t, image_emb=emb, tokens=tokens)
    out.square().mean().backward()
    assert calls == {"text": 3, "unet": 3}, "each checkpointed block recomputes its forward in backward"
    torch.testing.assert_close(out, ref)
    for n, p in net.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4)


def test_upsampler_is_fully_convolutional_on_crops():
    torch.manual_seed(0)
    net = randomise(
        UNet(image_size=32, model_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, low_res_channels=3)
    )
    for size in (8, 16, 32):  # trained on quarter-size crops, sampled at full size
        x = torch.randn(2, 3, size, size)
        low = torch.randn(2, 3, size // 2, size // 2)
        assert net(x, torch.tensor([1, 2]), low_res=low).shape == (2, 3, size, size)
    with pytest.raises(ValueError, match="pass low_res"):
        net(torch.randn(1, 3, 8, 8), torch.tensor([1]))


def test_low_res_noise_level_reaches_the_net():
    """Noise-conditioning augmentation: the low-res image's noise step is embedded; None means clean."""
    torch.manual_seed(0)
    net = randomise(
        UNet(
            image_size=16,
            model_channels=16,
            channel_mult=[1, 2],
            num_res_blocks=1,
            low_res_channels=3,
            low_res_noise_cond=True,
        )
    )
    x, low, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.tensor([5, 9])
    clean = net(x, t, low_res=low)
    torch.testing.assert_close(clean, net(x, t, low_res=low, low_res_noise=torch.zeros(2, dtype=torch.long)))
    assert not torch.allclose(clean, net(x, t, low_res=low, low_res_noise=torch.tensor([100, 100])))
    with pytest.raises(ValueError, match="low_res_noise_cond needs low_res_channels"):
        UNet(image_size=16, model_channels=16, channel_mult=[1], num_res_blocks=1, low_res_noise_cond=True)


@pytest.mark.parametrize(
    "name,expected,tolerance",
    [
        ("decoder_paper", 3.5e9, 0.05),
        ("upsampler_256_paper", 700e6, 0.05),
        # Table 3's hyperparameters (192 ch, 2 blocks, 1,1,2,2,4,4, no attention) give 282M with ADM's
        # blocks; the paper's "300M" is rounded to one significant figure (like 3.5B, 700M, 1B), so
        # this one is held to its rounding interval rather than to 5% (conf/net/upsampler_1024_paper.yaml)
        ("upsampler_1024_paper", 300e6, 0.07),
    ],
)
def test_paper_sizes(name, expected, tolerance):
    cfg = OmegaConf.load(Path(CONF_DIR) / "net" / f"{name}.yaml")
    if cfg.get("cond_dim", "absent") is None:
        cfg.cond_dim = 1024  # the paper's CLIP (ViT-H/16) embedding width
    if cfg.get("text_eot_id", "absent") is None:
        cfg.text_eot_id = 49407  # CLIP's BPE end-of-text id
    with torch.device("meta"):
        net = instantiate(cfg)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / expected - 1) <= tolerance, n


# ---- UNet.__init__ is split into builders: state-dict keys, their order, shapes and init are pinned --
# (config file, overrides, sha256 of "key:shape" lines in state-dict order, sha256 of the weights built
# after torch.manual_seed(0), or None for a paper-size net built on the meta device). The overrides fill
# the fields train/run.py sets and reach every branch of __init__: CLIP token features with the image
# embedding, the trainable caption encoder, noise-conditioning augmentation, plain (non-residual)
# resampling. Recompute a constant only for an intended change of the parameters or their initialisation.
FINGERPRINTS = [
    (
        "decoder_tiny",
        {"cond_dim": 24, "text_dim": 40},
        240,
        "542c1ac7e341544e04871c1449c947d1e3283bc87a60098c596f373944c50f70",
        "0dcd9b51aabdca2ee24f7e54bbb93e95517d92e52cef31a6d2e34cc26fb7cf8e",
    ),
    (
        "decoder_tiny",
        {
            "cond_dim": 24,
            "text_encoder": "trainable",
            "text_vocab_size": 100,
            "text_context_length": 16,
            "text_eot_id": 99,
        },
        268,
        "ede82191ffe8b5d505f77cc6678c9e4719bbf7465ae8b1be787b0cb2086639e9",
        "3a180d48935b17ea4dd71309254d64d594aba44b2d01e2e273d7aee633898472",
    ),
    (
        "decoder_tiny",
        {"cond_dim": 24, "text_encoder": None, "text_pooled": False, "resblock_updown": False},
        205,
        "fc4ac8cbfae8a576696874dde720ed9ed9a637f54f02ee5726de7125f77f246c",
        "bfde7e4c1b21a742a34ca16a6f6c48aabf49bb3d468a11ee9a6083993ae61241",
    ),
    (
        "upsampler_256_tiny",
        {},
        174,
        "9a2c4e64475d9ea559482c0c74d3030a6d3f2c80451c441e2e8106cb450b0203",
        "68bf70a1ab31d372e9fe1346d549e3413d76a76582aa6b2b699d9205660b392a",
    ),
    (
        "upsampler_256_tiny",
        {"low_res_noise_cond": True, "resblock_updown": False},
        146,
        "526d4e9dcc49b6485343b0065563871679dc232e7cfa306b0a8dca981513228d",
        "e8a1b7f1079eb0aa9993219c552b1b280848796fc939fdb7c7c694fcd1eaa6e4",
    ),
    (
        "upsampler_1024_tiny",
        {},
        174,
        "3c34e65a37176b19b2eed503b1f5b1bd9dd6840f4aa7723c82b908641f22bf8b",
        "e4492aa26db05ee54b4d770a91ac4ed0dc03e19bc81c11dc854268a3ca303582",
    ),
    (
        "decoder_paper",
        {"cond_dim": 1024, "text_eot_id": 49407},
        886,  # 3.56B parameters: meta device
        "e95b6e6bedcc669a49b56bc845c975f563767808614844d97f582da80f5a94e1",
        None,
    ),
    (
        "upsampler_256_paper",
        {},
        408,
        "3de6e77a5371907feaf795243e047802d104b1b15c54f5851fef5f6ce6caf86b",
        None,
    ),
    (
        "upsampler_1024_paper",
        {},
        470,
        "682319325f5956a599d56454313b38e9da3d6a12c79d2ff3d39c22de3b7a837c",
        None,
    ),
]


def _build(name: str, overrides: dict, meta: bool) -> UNet:
    cfg = OmegaConf.merge(OmegaConf.load(Path(CONF_DIR) / "net" / f"{name}.yaml"), overrides)
    if meta:
        with torch.device("meta"):
            return instantiate(cfg)
    torch.manual_seed(0)
    return instantiate(cfg)


def _fingerprint(net: UNet, weights: bool) -> tuple[int, str, str | None]:
    import hashlib

    state = net.state_dict()
    keys = "".join(f"{k}:{tuple(v.shape)}\n" for k, v in state.items())
    digest = None
    if weights:
        h = hashlib.sha256()
        for v in state.values():
            h.update(v.detach().contiguous().numpy().tobytes())
        digest = h.hexdigest()
    return len(state), hashlib.sha256(keys.encode()).hexdigest(), digest


@pytest.mark.parametrize(
    "name,overrides,n_keys,keys_sha,weights_sha",
    FINGERPRINTS,
    ids=[f"{f[0]}-{i}" for i, f in enumerate(FINGERPRINTS)],
)
def test_builders_keep_state_dict_keys_and_init(name, overrides, n_keys, keys_sha, weights_sha):
    """Checkpoints load by key (and DeepSpeed/FSDP shard by registration order), and a seeded run must
    start from the same weights: the builders register the same modules in the same order, drawing the
    same random numbers."""
    net = _build(name, overrides, meta=weights_sha is None)
    assert _fingerprint(net, weights=weights_sha is not None) == (n_keys, keys_sha, weights_sha)


def test_first_end_of_text_is_decided_in_one_place():
    """``first_eot_index`` (train/models/layers.py) is where every caption ends: the first end-of-text
    token (a later one is padding); a row without one is all caption (its last position). CLIP's text
    pooling, the caption masks (train/frozen_clip.py) and the UNet's own caption encoder all use it."""
    from train.frozen_clip import text_mask
    from train.models.clip import CLIP
    from train.models.layers import first_eot_index

    eot = 2
    tokens = torch.tensor([[1, 7, 2, 5, 2, 0], [1, 7, 8, 9, 4, 5], [2, 2, 2, 2, 2, 2], [1, 9, 8, 7, 6, 2]])
    first = first_eot_index(tokens, eot)
    assert first.tolist() == [2, 5, 0, 5] and first.dtype == torch.int64
    assert text_mask(tokens, eot).sum(1).tolist() == [3, 6, 1, 6]
    clip = CLIP(
        embed_dim=8,
        vision=dict(image_size=8, patch_size=4, width=16, layers=1, heads=2),
        text=dict(context_length=6, vocab_size=10, width=16, layers=1, heads=2),
        eot_id=eot,
    )
    assert clip.text.pool_index(tokens).tolist() == [2, 5, 0, 5]
    # the UNet's caption encoder pools at, and masks after, the first end-of-text: what follows is unseen
    net = randomise(
        decoder(
            text_encoder="trainable",
            text_dim=None,
            text_vocab_size=10,
            text_context_length=6,
            text_width=32,
            text_layers=1,
            text_heads=4,
            text_eot_id=eot,
        )
    ).eval()
    x, t, emb = torch.randn(4, 3, 16, 16), torch.tensor([3, 700, 50, 9]), torch.randn(4, 12)
    after = torch.arange(6)[None] > first[:, None]
    ref = net(x, t, image_emb=emb, tokens=tokens)
    torch.testing.assert_close(net(x, t, image_emb=emb, tokens=torch.where(after, 3, tokens)), ref)
    changed = net(x, t, image_emb=emb, tokens=torch.where(after, 3, 4))  # every row: its caption changes
    assert all(not torch.allclose(changed[i], ref[i]) for i in range(4))


@pytest.mark.parametrize("with_context", [False, True], ids=["spatial", "context"])
def test_attention_reaches_sdpa_in_a_layout_its_fused_kernels_take(with_context):
    """q, k and v go to SDPA with their head dimension contiguous: with only the flash kernel allowed (the
    CPU's takes masks; a GPU's memory-efficient kernel the same layout), the block runs forward and
    backward, where the (B, C, N) layout fell back to the math path and its N x N weights. The result is
    attention over [spatial; context] keys, computed here by hand from the block's own weights."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from train.models.unet import AttentionBlock

    torch.manual_seed(0)
    c, heads, m = 64, 4, 5
    block = AttentionBlock(c, c // heads, 32)
    for p in block.parameters():  # the output projection starts at zero: make every path count
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, c, 4, 6, requires_grad=True)
    context = torch.randn(2, m, 32) if with_context else None
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool) if with_context else None
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = block(x, context, mask)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()

    def split(t):  # (B, L, C) -> (B, heads, L, C/heads)
        return t.unflatten(-1, (heads, c // heads)).transpose(1, 2)

    tokens = block.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = (tokens @ block.qkv.weight[:, :, 0].T + block.qkv.bias).chunk(3, dim=-1)
    bias = torch.zeros(2, 1, 1, 24 + (m if with_context else 0))
    if with_context:
        ck, cv = block.context_kv(context).chunk(2, dim=-1)
        k, v = torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        bias[..., 24:] = torch.where(mask, 0.0, float("-inf"))[:, None, None, :]
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (c // heads) ** 0.5 + bias, dim=-1)
    attended = (weights @ split(v)).transpose(1, 2).flatten(2)  # (B, N, C)
    expected = x + (attended @ block.proj.weight[:, :, 0].T + block.proj.bias).transpose(1, 2).reshape(
        x.shape
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("resblock_updown", [False, True], ids=["upsample_conv", "resblock_updown"])
def test_activations_stay_bf16_under_cudas_autocast_policy(monkeypatch, resblock_updown):
    """CUDA's autocast runs group_norm and nearest upsampling in float32 and returns float32 (the CPU's
    keeps bf16): emulated here on the CPU, a plain GroupNorm made the SiLU, scale-shift and what they keep
    for backward float32, and an upsample made the up path's residual stream float32. Block outputs stay
    bf16, and autograd keeps almost nothing in float32."""
    import torch.nn.functional as F

    from train.models.unet import Block

    group_norm, interpolate = F.group_norm, F.interpolate

    def cuda_policy(op):  # float32 in, float32 out, while autocast is on
        def run(x, *args, **kwargs):
            on = torch.is_autocast_enabled("cpu")
            args = [a.float() if on and torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            return op(x.float() if on else x, *args, **kwargs)

        return run

    monkeypatch.setattr(F, "group_norm", cuda_policy(group_norm))
    monkeypatch.setattr(F, "interpolate", cuda_policy(interpolate))
    net = randomise(decoder(channel_mult=[1, 2, 2], resblock_updown=resblock_updown))
    outputs, kept = [], {}
    for m in net.modules():
        if isinstance(m, Block):
            m.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))

    def keep(t):
        kept[t.untyped_storage()._cdata] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        out = net(torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3]), **cond())
    out.float().square().mean().backward()
    assert set(outputs) == {torch.bfloat16} and len(outputs) == len(net.down) + len(net.middle) + len(net.up)
    weights = {p.untyped_storage()._cdata for p in net.parameters()}
    activations = {k: v for k, v in kept.items() if k not in weights}
    fp32 = sum(n for n, dtype in activations.values() if dtype == torch.float32)
    assert fp32 < 0.02 * sum(n for n, _ in activations.values()), fp32


@pytest.mark.parametrize("case", ["clip", "prior", "decoder", "upsampler_256"])
def test_each_weight_is_read_inside_its_own_modules_call(case):
    """Sharding gathers a module's weights when the module is called: ZeRO-3 in each module's forward
    pre-hook, on its prefetch schedule. A weight read without calling its module (the decoder's attention
    once read its 1x1 convolutions' weights so) is gathered on access by DeepSpeed, synchronously, and
    registered to whatever module is running; a scheme without that fallback would read a shard. Every
    op's parameter arguments must belong to a module on the call stack."""
    from torch.overrides import TorchFunctionMode

    from eval import bench_train

    cases = {c.name: c for c in bench_train.SIZES["tiny"]}
    work = bench_train.build_stage(cases[case], torch.device("cpu"))
    owner = {id(p): m for m in work.model.modules() for p in m.parameters(recurse=False)}
    active: list[torch.nn.Module] = []
    outside: set[str] = set()
    names = {id(p): n for n, p in work.model.named_parameters()}

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if not getattr(func, "__name__", "").endswith("__get__"):  # .dtype, .shape: no data read
                for a in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                    if isinstance(a, torch.nn.Parameter) and owner.get(id(a)) not in active:
                        outside.add(names.get(id(a), "?"))
            return func(*args, **(kwargs or {}))

    def enter(module, args) -> None:
        active.append(module)

    def leave(module, args, out) -> None:
        active.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        with Watch():
            work.loss()
    finally:
        pre.remove()
        post.remove()
    assert not outside, sorted(outside)


def test_only_the_unets_weight_matrices_are_weight_decayed():
    """The trainable caption encoder's positional embedding (text_positional) fell in the decayed group,
    against no_decay's word: every decayed parameter is now a weight matrix of a layer."""
    from train.modules.optim import param_groups

    net = decoder(text_encoder="trainable", text_dim=None, text_vocab_size=50, text_context_length=6,
                  text_width=32, text_layers=2, text_heads=4, text_eot_id=2)  # fmt: skip
    decayed, _ = param_groups(net, 0.1)
    names = {id(p): n for n, p in net.named_parameters()}
    decayed = sorted(names[id(p)] for p in decayed["params"])
    assert decayed and all(n.endswith("weight") for n in decayed), decayed  # (text_positional was one)
