"""open_clip ViT checkpoints load into our CLIP and give the same embeddings (reference in a subprocess)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from reference import MODEL_PACKAGES, TORCHVISION_SHIM, ensure_reference_env, reference_dir, run_reference

from tests.conftest import compose_config
from train.models.clip import CLIP
from train.models.openclip_import import (
    config_from_open_clip,
    load_open_clip,
    open_clip_config,
    read_state_dict,
    shapes_of,
)

REFERENCE = (
    TORCHVISION_SHIM
    + """
import json, os
import open_clip
from safetensors.torch import save_file
torch.manual_seed(0)

def tiny(quick_gelu):  # small open_clip CLIPs built from its config classes: head widths 32/40, mlp 2.6/3.3
    vision = dict(layers=2, width=80, head_width=40, mlp_ratio=2.6, patch_size=8, image_size=32) if quick_gelu \
        else dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    text = dict(context_length=12, vocab_size=300, width=48, heads=3, layers=2, mlp_ratio=3.3 if quick_gelu else 4.0)
    cfg = {"embed_dim": 24, "quick_gelu": quick_gelu, "vision_cfg": vision, "text_cfg": text}
    model = open_clip.model.CLIP(embed_dim=24, quick_gelu=quick_gelu, vision_cfg=open_clip.model.CLIPVisionCfg(**vision),
                                 text_cfg=open_clip.model.CLIPTextCfg(**text))
    return model, cfg

for name, spec in inputs["models"].items():
    cfg = None
    if spec in ("tiny", "tiny_quickgelu"):
        model, cfg = tiny(spec == "tiny_quickgelu")
    else:  # a named architecture, randomly initialised (no download)
        model = open_clip.create_model(spec, pretrained=None)
    model.eval()
    image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, image_size, image_size, generator=g)
    vocab, length = model.vocab_size, model.context_length
    tokens = torch.randint(1, vocab - 1, (2, length), generator=g)
    tokens[0, 5:] = 0
    tokens[0, 4] = vocab - 1  # eot: the largest id, where open_clip pools (argmax)
    tokens[1, -1] = vocab - 1
    with torch.no_grad():
        image = model.encode_image(images, normalize=True)
        text = model.encode_text(tokens, normalize=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = inputs["dir"] + f"/{name}"
    if spec == "tiny_quickgelu":  # the hub layout: a directory with the config and the weights
        os.makedirs(path)
        save_file(state, path + "/open_clip_model.safetensors")
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, open(path + "/open_clip_config.json", "w"))
        # and OpenAI's distribution format: a TorchScript archive with its scalar attributes
        for scalar, value in (("input_resolution", image_size), ("context_length", length), ("vocab_size", vocab)):
            if hasattr(model, scalar):
                delattr(model, scalar)  # open_clip keeps them as plain attributes
            model.register_buffer(scalar, torch.tensor(value))
        torch.jit.save(torch.jit.trace_module(model, {"encode_image": images}, check_trace=False), inputs["dir"] + "/openai.pt")
    elif spec == "tiny":
        path += ".pt"
        torch.save({"state_dict": state}, path)
    else:
        path += ".safetensors"
        save_file(state, path)
    outputs[name] = {"path": path, "images": images, "tokens": tokens, "image": image, "text": text, "cfg": cfg}
"""
)


def _check(result: dict, net) -> None:
    with torch.no_grad():
        image = net.encode_image(result["images"])
        text = net.encode_text(result["tokens"])
    torch.testing.assert_close(image, result["image"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, result["text"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    env = ensure_reference_env(MODEL_PACKAGES)
    out = tmp_path_factory.mktemp("open_clip")
    models = {"tiny": "tiny", "quick": "tiny_quickgelu", "b32": "ViT-B-32"}
    return {**run_reference(env, REFERENCE, {"dir": str(out), "models": models}), "dir": out}


@pytest.mark.slow
def test_open_clip_models_load_from_their_configs_and_give_the_same_embeddings(reference):
    tiny = reference["tiny"]  # GELU, 32-wide heads: a model-config dict
    net = load_open_clip(tiny["path"], tiny["cfg"])
    assert (net.visual.transformer.resblocks[0].attn.heads, net.text.transformer.resblocks[0].attn.heads) == (
        2,
        3,
    )
    _check(tiny, net)

    quick = reference["quick"]  # QuickGELU, 40-wide heads, mlp ratios 2.6 and 3.3: a hub directory
    net = load_open_clip(quick["path"])
    assert net.quick_gelu and net.visual.transformer.resblocks[0].attn.heads == 2
    assert net.text.transformer.resblocks[0].mlp.c_fc.out_features == 158  # int(48 x 3.3), as open_clip
    _check(quick, net)
    with pytest.raises(AssertionError):  # negative control: the same weights read as GELU differ
        _check(quick, load_open_clip(quick["path"], {**quick["cfg"], "quick_gelu": False}))

    openai = load_open_clip(reference["dir"] / "openai.pt", heads=(2, 3))  # TorchScript: QuickGELU implied
    assert openai.quick_gelu
    _check(quick, openai)

    b32 = reference["b32"]  # a named config
    net = load_open_clip(b32["path"], "ViT-B-32")
    assert sum(p.numel() for p in net.parameters()) == 151_277_313
    _check(b32, net)


@pytest.mark.slow
def test_shapes_alone_are_refused_naming_the_configs_that_fit(reference):
    b32 = reference["b32"]["path"]
    with pytest.raises(ValueError, match=r"pass config= one of \['ViT-B-32', 'ViT-B-32-quickgelu'\]"):
        load_open_clip(b32)
    shapes = shapes_of(read_state_dict(b32))
    assert shapes["vision"] == {"image_size": 224, "patch_size": 32, "width": 768, "layers": 12, "heads": None,
                                "mlp_ratio": 4.0}  # fmt: skip
    net = load_open_clip(b32, heads=(12, 8), quick_gelu=False)  # stated explicitly: accepted
    _check(reference["b32"], net)


def test_reference_environments_are_per_interpreter():
    """Python 3.11's compiled packages (regex) in a Python 3.12 run fail to import: one cache each."""
    packages = ("regex==2026.11.19",)
    py311, py312 = reference_dir(packages, "cpython-311"), reference_dir(packages, "cpython-312")
    assert py311 != py312 and py311.parent == py312.parent
    assert reference_dir(packages) == reference_dir(packages, sys.implementation.cache_tag)


def test_named_configs_cover_the_big_vits_exactly():
    """Head widths 80 / 88 / 104 and mlp ratios that give no integer (g, bigG) come from the table."""
    h14 = config_from_open_clip(open_clip_config("ViT-H-14"))
    assert h14["vision"]["heads"] == 16 and h14["text"]["heads"] == 16 and not h14["quick_gelu"]
    g14 = config_from_open_clip(open_clip_config("ViT-g-14"))
    assert g14["vision"]["heads"] == 16 and int(1408 * g14["vision"]["mlp_ratio"] + 1e-6) == 6144
    big = config_from_open_clip(open_clip_config("ViT-bigG-14-quickgelu"))
    assert (
        big["vision"]["heads"] == 16
        and big["quick_gelu"]
        and int(1664 * big["vision"]["mlp_ratio"] + 1e-6) == 8192
    )
    with torch.device("meta"):
        assert sum(p.numel() for p in CLIP(**big).parameters()) == pytest.approx(2.54e9, rel=0.01)
    with pytest.raises(ValueError, match=r"\['vision_cfg.timm_model_name'\] are not implemented"):
        config_from_open_clip({"embed_dim": 512, "vision_cfg": {"timm_model_name": "vit"}, "text_cfg": {}})


def test_unsupported_or_missing_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such open_clip checkpoint"):
        load_open_clip(tmp_path / "missing.pt")
    bad = tmp_path / "resnet.pt"
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(KeyError, match="not an open_clip ViT CLIP state dict"):
        load_open_clip(bad)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(ValueError, match="expected a state dict of tensors"):
        load_open_clip(notdict)


def test_train_run_initialises_the_net_from_an_open_clip_file(tmp_path):
    from train.run import build_net

    cfg = compose_config(["net.text.vocab_size=300"])
    source = build_net(cfg, None)
    # written the way open_clip names and shapes it: the text tower at the top level, a 0-dim logit scale
    open_clip_state = {k.removeprefix("text."): v for k, v in source.state_dict().items()}
    open_clip_state["logit_scale"] = open_clip_state["logit_scale"].reshape(())
    torch.save(open_clip_state, tmp_path / "ckpt.pt")
    cfg = compose_config(["net.text.vocab_size=300", f"init_from_open_clip={tmp_path / 'ckpt.pt'}"])
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = build_net(cfg, None)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    cfg = compose_config([f"init_from_open_clip={tmp_path / 'ckpt.pt'}"])
    with pytest.raises(
        ValueError, match=r"does not fit the configured net.*text.token_embedding.weight \(300, 128\)"
    ):
        build_net(cfg, None)


def test_init_from_open_clip_refuses_a_net_of_another_activation(tmp_path):
    """A hub directory states QuickGELU; the configured net (GELU by default) must say the same."""
    import json

    from safetensors.torch import save_file

    from train.run import build_net

    overrides = ["net.text.vocab_size=300", "net.vision.heads=4", "net.text.heads=4", "net.vision.stem=patch",
                 "net.vision.pool=tok"]  # fmt: skip
    source = build_net(compose_config([*overrides, "net.quick_gelu=true"]), None)
    hub = tmp_path / "hub"
    hub.mkdir()
    state = {k.removeprefix("text."): v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(hub / "open_clip_model.safetensors"))
    v, t = source.vision_cfg, source.text_cfg
    model_cfg = {
        "embed_dim": source.embed_dim,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 64,
            "layers": v["layers"],
            "width": v["width"],
            "patch_size": 8,
            "head_width": 32,
        },
        "text_cfg": {k: t[k] for k in ("context_length", "vocab_size", "width", "heads", "layers")},
    }
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    gelu = compose_config([*overrides, f"init_from_open_clip={hub}", "net.vision.stem=patch"])
    quick = compose_config(
        [*overrides, f"init_from_open_clip={hub}", "net.vision.stem=patch", "net.quick_gelu=true"]
    )
    with pytest.raises(ValueError, match="set net.quick_gelu=true"):
        build_net(gelu, None)
    assert build_net(quick, None).quick_gelu


@pytest.mark.slow
def test_a_clip_run_exports_to_an_open_clip_hub_directory_that_open_clip_loads(tmp_path, capsys):
    """python -m train.checkpoint to-open-clip RUN OUT: open_clip's own factory builds the model from the
    directory ("local-dir:OUT") and its embeddings equal ours to 1e-5 (in evaluation, with every patch)."""

    from train.checkpoint import load_stage, main
    from train.run import train

    run = tmp_path / "run"
    cfg = compose_config(
        [
            "debug=fast",
            "trainer.max_steps=2",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={run}",
            "net.vision.stem=patch",
            "net.vision.pool=tok",
            "net.quick_gelu=true",
            "net.vision.patch_dropout=0.5",  # trained with FLIP's patch dropout; open_clip takes the key
            "module.loss=siglip",  # and SigLIP's loss: open_clip makes and loads the learned bias
            "net.init_logit_bias=-10",
        ]
    )
    train(cfg)
    main(["to-open-clip", str(run), str(tmp_path / "hub")])
    exported = json.loads((tmp_path / "hub" / "open_clip_config.json").read_text())["model_cfg"]
    assert exported["vision_cfg"]["patch_dropout"] == 0.5
    assert config_from_open_clip(exported)["vision"]["patch_dropout"] == 0.5
    assert config_from_open_clip(exported)["init_logit_bias"] == pytest.approx(
        float(load_stage(run).net.logit_bias)
    )
    assert capsys.readouterr().out.strip().endswith("hub")
    net = load_stage(run).net
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=g)
    tokens = torch.randint(
        1, net.text_cfg["vocab_size"] - 1, (2, net.text_cfg["context_length"]), generator=g
    )
    tokens[:, -1] = net.text_cfg["vocab_size"] - 1  # eot: the largest id, where both pool
    theirs = run_reference(
        ensure_reference_env(MODEL_PACKAGES),
        TORCHVISION_SHIM
        + """
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + inputs["dir"])
model.eval()
with torch.no_grad():
    outputs["image"] = model.encode_image(inputs["images"], normalize=True)
    outputs["text"] = model.encode_text(inputs["tokens"], normalize=True)
outputs["logit_scale"] = float(model.logit_scale.exp())
outputs["logit_bias"] = float(model.logit_bias)
outputs["mean"] = [float(m) for m in preprocess.transforms[-1].mean]
""",
        {"dir": str(tmp_path / "hub"), "images": images, "tokens": tokens},
    )
    _check({**theirs, "images": images, "tokens": tokens}, net)
    assert theirs["logit_scale"] == pytest.approx(float(net.logit_scale.exp()), rel=1e-6)
    assert (
        theirs["logit_bias"] == pytest.approx(float(net.logit_bias), rel=1e-6) and theirs["logit_bias"] != -10
    )
    assert theirs["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # a CLIP trained on [-1, 1] images: open_clip filled the missing mean and std with OpenAI's
    config = (run / "config.yaml").read_text()
    assert "normalize: clip" in config
    (run / "config.yaml").write_text(config.replace("normalize: clip", "normalize: minus_one_one"))
    main(["to-open-clip", str(run), str(tmp_path / "hub2")])
    written = json.loads((tmp_path / "hub2" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert (written["mean"], written["std"]) == ([0.5] * 3, [0.5] * 3)


def test_to_open_clip_refuses_what_open_clip_cannot_build(clip_run, tmp_path):
    from train.checkpoint import export_open_clip

    run, _ = clip_run  # the tiny CLIP: a conv stem and mean pooling
    with pytest.raises(ValueError, match="net.vision.stem=patch net.vision.pool=tok"):
        export_open_clip(run, tmp_path / "hub")


@pytest.mark.slow
def test_fine_tuning_from_an_exported_model_keeps_its_zero_shot(tmp_path):
    """No downloadable weights offline, so the model with zero-shot ability is ours: a small open_clip-shaped
    CLIP (linear patch stem, class-token pooling) trained 40 steps on the synthetic shapes, exported with
    ``to-open-clip``, imported, then fine-tuned 20 steps with ``init_from_open_clip=`` +
    ``init_from_open_clip_config=``, the inputs load_open_clip takes. The import reproduces the zero-shot
    exactly; the fine-tune keeps colour zero-shot (chance 1/8) and the logit scale; reading the same
    weights with another tokenizer, or with open_clip's argmax pooling, loses it."""

    from data.shards import iter_captions
    from data.tokenizer import build_tokenizer
    from eval.zeroshot import evaluate_net, evaluate_run
    from train.checkpoint import load_stage, main
    from train.run import build_net, train

    common = [
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0",
        "data.num_workers=0",
        f"paths.data_dir={tmp_path / 'data'}",
        "data.synthetic.train_samples=512",
        "data.synthetic.val_samples=256",
        "data.synthetic.shard_size=256",
        "data.global_batch_size=32",
        "net.vision.stem=patch",  # what open_clip's ViT builds
        "net.vision.pool=tok",
        "net.vision.image_size=32",
        "net.vision.width=64",
        "net.text.width=64",
        "net.embed_dim=64",
    ]

    def compose_run(out, steps, *extra):
        overrides = [
            f"paths.output_dir={out}",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
        ]
        return compose_config([*common, *overrides, *extra])

    def colour(metrics):
        return metrics["zeroshot_colour_top1"]

    pre, hub = tmp_path / "pre", tmp_path / "hub"
    train(compose_run(pre, 40, "module.optimizer.warmup_steps=5"))
    before = evaluate_run(str(pre))
    assert colour(before) >= 0.75  # well above chance (0.125): something to keep

    main(["to-open-clip", str(pre), str(hub)])
    source = load_stage(pre)
    tokenizer, shards = source.tokenizer, source.cfg.data.val_shards

    def zeroshot(net, tok=tokenizer):
        return evaluate_net(net, tok, shards, image_size=32, normalize="clip")

    # the import: the hub directory read as open_clip's config states it, pooling at the run's eot id
    imported = load_open_clip(hub, eot_id=tokenizer.eot_id)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    tokens = tokenizer(["a red circle", "two blue squares", "a picture of a green triangle"])
    with torch.no_grad():
        ours, theirs = source.net.eval()(images, tokens), imported(images, tokens)
    for out in (ours, theirs):
        out["logits"] = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    torch.testing.assert_close(theirs["logits"], ours["logits"], rtol=0, atol=1e-6)
    assert zeroshot(imported) == zeroshot(source.net) and colour(zeroshot(imported)) == colour(before)

    # the fine-tune: the same inputs as the import (weights + open_clip config) and the run's tokenizer
    ft = tmp_path / "ft"
    cfg = compose_run(
        ft,
        20,
        f"init_from_open_clip={hub / 'open_clip_model.safetensors'}",
        f"init_from_open_clip_config={hub / 'open_clip_config.json'}",
        f"data.tokenizer.path={pre / 'tokenizer.json'}",
        "module.optimizer.lr=1e-4",
        "module.optimizer.warmup_steps=0",
    )
    start = build_net(cfg, tokenizer)
    for key, value in source.net.state_dict().items():
        assert torch.equal(start.state_dict()[key], value), key
    assert start.text.eot_id == tokenizer.eot_id
    train(cfg)
    after = evaluate_run(str(ft))
    assert colour(after) >= max(0.8 * colour(before), 0.5), (before, after)
    scale = load_stage(ft).net.logit_scale.detach().exp().item()
    assert scale == pytest.approx(source.net.logit_scale.detach().exp().item(), rel=0.02)

    # negative controls on the imported weights: what an inconsistent setup would start from
    argmax_pooling = zeroshot(load_open_clip(hub))  # open_clip pools at the largest id, not our BPE's eot
    captions = list(iter_captions(source.cfg.data.train_shards, 20000))
    other = build_tokenizer("bpe", context_length=16, vocab_size=580, captions=captions)  # fewer merges
    other_tokenizer = zeroshot(load_open_clip(hub, eot_id=other.eot_id), other)
    for control in (argmax_pooling, other_tokenizer):
        assert colour(control) < 0.8 * colour(before), (before, control)


def test_a_siglip_net_starts_from_a_softmax_clips_weights_with_its_own_bias(tmp_path):
    """init_from_open_clip of a CLIP without a bias into a net with one (module.loss=siglip): every weight
    is the checkpoint's and the bias stays net.init_logit_bias; the reverse (a bias the net lacks) is
    refused, naming it. A SigLIP-trained hub directory builds a net with its bias (load_open_clip)."""
    from train.models.openclip_import import save_open_clip
    from train.run import load_open_clip_weights

    def net(**kw) -> CLIP:
        torch.manual_seed(len(kw))
        return CLIP(embed_dim=16, vision={"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
                    text={"context_length": 8, "vocab_size": 50, "width": 32, "layers": 1, "heads": 2}, **kw)  # fmt: skip

    softmax, siglip = net(), net(init_logit_bias=-10.0)
    save_open_clip(softmax, tmp_path / "softmax")
    load_open_clip_weights(siglip, str(tmp_path / "softmax"))
    theirs = softmax.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in siglip.state_dict().items() if k != "logit_bias")
    assert siglip.logit_bias.item() == -10.0
    with torch.no_grad():
        siglip.logit_bias.fill_(-7.5)
    save_open_clip(siglip, tmp_path / "siglip")
    with pytest.raises(ValueError, match=r"unexpected \['logit_bias'\]"):
        load_open_clip_weights(net(), str(tmp_path / "siglip"))
    assert load_open_clip(tmp_path / "siglip").logit_bias.item() == -7.5


@pytest.mark.slow
def test_an_open_clip_checkpoint_becomes_the_clip_the_later_stages_train_on(tmp_path):
    """``from-open-clip SRC OUT``: an open_clip hub directory (here our CLIP's, written by ``to-open-clip``:
    no weights can be downloaded) as an export. As ``clip_ckpt=`` it embeds exactly as the run it came from,
    and the prior trains on it; its embedding shards name its weights file, which the prior on those shards
    takes as its CLIP; the cascade counts both as one CLIP."""
    from data.embed import embed_shards
    from train.cascade import _other_clip
    from train.checkpoint import import_open_clip, main
    from train.frozen_clip import FrozenClip
    from train.run import train, wire_clip

    data = [f"paths.data_dir={tmp_path / 'data'}"]
    clip = compose_config(
        ["debug=fast", "trainer.max_steps=2", *data, f"paths.output_dir={tmp_path / 'run'}"]
        + ["net.vision.stem=patch", "net.vision.pool=tok"]  # what open_clip's ViT builds
    )
    train(clip)
    main(["to-open-clip", str(tmp_path / "run"), str(tmp_path / "hub")])
    out = tmp_path / "imported"
    main(
        [
            "from-open-clip",
            str(tmp_path / "hub"),
            str(out),
            "--tokenizer",
            str(tmp_path / "run" / "tokenizer.json"),
        ]
    )
    ours, theirs = FrozenClip(tmp_path / "run"), FrozenClip(out)
    assert (theirs.image_size, theirs.resize_size, theirs.normalize.kind) == (64, 64, "clip")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    tokens = ours.tokenizer(["a red circle", "two blue squares", "a green triangle left of a red square"])
    assert torch.equal(
        tokens,
        theirs.tokenizer(["a red circle", "two blue squares", "a green triangle left of a red square"]),
    )
    a, b = ours.embed(images, tokens), theirs.embed(images, tokens)
    assert all(torch.equal(a[k], b[k]) for k in ("img_emb", "txt_emb", "txt_feat"))

    prior = compose_config(
        ["stage=prior", "debug=fast", "trainer.max_steps=2", *data, f"paths.output_dir={tmp_path / 'prior'}"]
        + [f"clip_ckpt={out}"]
    )
    assert train(prior)["trainer/global_step"] == 2
    # embedding shards made with it name its weights file; a prior on them takes that as its CLIP
    embed_shards(str(out), clip.data.val_shards, tmp_path / "emb")
    made_by = json.loads((tmp_path / "emb" / "embed_info.json").read_text())["checkpoint"]
    assert made_by == str(out / "model.safetensors")
    on_shards = compose_config(
        [
            "stage=prior",
            "data=embeddings",
            f"data.train_shards={tmp_path / 'emb'}",
            f"data.val_shards={tmp_path / 'emb'}",
        ]
    )
    assert wire_clip(on_shards).eot_id == ours.tokenizer.eot_id and on_shards.clip_ckpt == made_by
    assert not _other_clip(made_by, out) and _other_clip(made_by, tmp_path / "run")

    # a bare weights file, its architecture (and preprocessing) named by a config file
    bare = import_open_clip(
        tmp_path / "hub" / "open_clip_model.safetensors",
        tmp_path / "bare",
        config=str(tmp_path / "hub" / "open_clip_config.json"),
        tokenizer=tmp_path / "run" / "tokenizer.json",
    )
    assert torch.equal(FrozenClip(bare).embed(images, tokens)["img_emb"], a["img_emb"])

    # what does not fit is refused, naming it
    hub = json.loads((tmp_path / "hub" / "open_clip_config.json").read_text())
    hub["preprocess_cfg"]["mean"] = [0.4, 0.4, 0.4]
    (tmp_path / "hub" / "open_clip_config.json").write_text(json.dumps(hub))
    with pytest.raises(ValueError, match=r"preprocess mean \[0.4, 0.4, 0.4\] .* none of data.normalize's"):
        import_open_clip(tmp_path / "hub", tmp_path / "x", tokenizer=tmp_path / "run" / "tokenizer.json")
    prior_tok = tmp_path / "prior" / "tokenizer.json"  # (the CLIP's too: 16 tokens)
    short = ours.tokenizer.__class__.load(prior_tok)
    short.context_length = 8
    short.save(tmp_path / "short.json")
    with pytest.raises(
        ValueError,
        match=r"--tokenizer .*short.json: 8 tokens of context, the checkpoint's text tower takes 16",
    ):
        import_open_clip(tmp_path / "hub", tmp_path / "x", tokenizer=tmp_path / "short.json")


@pytest.mark.slow
def test_from_open_clip_refuses_what_it_cannot_carry_and_an_import_is_one_clip_everywhere(
    tmp_path, monkeypatch, caplog
):
    """The import's refusals (a directory in use, a resize open_clip's preprocessing does otherwise, no
    tokenizer), its preprocessing read from a hub directory named by --config, and the one-CLIP checks: a
    run, its checkpoints and its export are one CLIP (embedding shards made by the run, prior on its export);
    eval.classify takes an export's weights file as ours; CLIP-FID says when an import has no held-out
    shards and takes them from --fid-shards."""
    import data.tokenizer
    from eval.benchmark import reference_images
    from eval.classify import load_model
    from train.checkpoint import export_stage, import_open_clip, main, owner_of, resolve_run
    from train.run import _check_embedded_by, train

    run = tmp_path / "run"
    clip = compose_config(
        [
            "debug=fast",
            "trainer.max_steps=2",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={run}",
        ]
        + ["net.vision.stem=patch", "net.vision.pool=tok"]
    )
    train(clip)
    main(["to-open-clip", str(run), str(tmp_path / "hub")])
    tok = run / "tokenizer.json"
    with pytest.raises(FileExistsError, match=r"run: not empty; from-open-clip writes a new directory"):
        import_open_clip(tmp_path / "hub", run, tokenizer=tok)  # (a run directory: its config.yaml kept)
    # --config naming a hub directory: its preprocessing (here [-1, 1] pixels) with a bare weights file
    hub = json.loads((tmp_path / "hub" / "open_clip_config.json").read_text())
    hub["preprocess_cfg"].update(mean=[0.5] * 3, std=[0.5] * 3)
    (tmp_path / "hub" / "open_clip_config.json").write_text(json.dumps(hub))
    weights = tmp_path / "hub" / "open_clip_model.safetensors"
    out = import_open_clip(weights, tmp_path / "imported", config=str(tmp_path / "hub"), tokenizer=tok)
    assert "normalize: minus_one_one" in (out / "config.yaml").read_text()
    for key, value in (("resize_mode", "squash"), ("interpolation", "bilinear")):
        bad = json.loads(json.dumps(hub))
        bad["preprocess_cfg"][key] = value
        (tmp_path / "hub" / "open_clip_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"preprocess {key} is '{value}'; the data pipeline resizes"):
            import_open_clip(tmp_path / "hub", tmp_path / f"x_{key}", tokenizer=tok)
    (tmp_path / "hub" / "open_clip_config.json").write_text(json.dumps(hub))

    def no_vocab(path=None):
        raise FileNotFoundError("not installed")

    monkeypatch.setattr(data.tokenizer, "find_clip_vocab", no_vocab)
    with pytest.raises(FileNotFoundError, match=r"pass --tokenizer bpe_simple_vocab_16e6.txt.gz"):
        import_open_clip(tmp_path / "hub", tmp_path / "y")

    # one CLIP: a run, a checkpoint of it, its export and the export's weights file
    export = export_stage(run)
    owners = {owner_of(p) for p in (run, resolve_run(run)[1], export, export / "model.safetensors")}
    assert owners == {run.resolve()} and owner_of(out / "model.safetensors") == out.resolve()
    _check_embedded_by(
        str(export), resolve_run(run)[1], tmp_path / "emb"
    )  # shards by the run, prior on its export
    _check_embedded_by(str(run), export / "model.safetensors", tmp_path / "emb")
    with pytest.raises(ValueError, match=r"is not the CLIP that made the embeddings"):
        _check_embedded_by(str(out), export / "model.safetensors", tmp_path / "emb")

    assert load_model(
        str(out / "model.safetensors"), open_clip_config=None, tokenizer_path=None, device="cpu"
    )[4] == ("minus_one_one")
    with caplog.at_level("WARNING"):
        assert reference_images(out / "model.safetensors", 4) is None
    assert "names no held-out shards (pass --fid-shards)" in caplog.text
    assert reference_images(out, 4, clip.data.val_shards).shape == (4, 3, 64, 64)
