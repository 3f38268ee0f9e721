"""open_clip ViT checkpoints load into our CLIP and give the same embeddings (reference in a subprocess)."""

from __future__ import annotations

import pytest
import torch
from reference import MODEL_PACKAGES, TORCHVISION_SHIM, ensure_reference_env, run_reference

from train.models.openclip_import import config_from_state_dict, load_open_clip, read_state_dict

REFERENCE = (
    TORCHVISION_SHIM
    + """
import open_clip
from safetensors.torch import save_file
torch.manual_seed(0)
for name, spec in inputs["models"].items():
    if spec == "tiny":  # a small open_clip CLIP built from its config classes
        model = open_clip.model.CLIP(
            embed_dim=24,
            vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
            text_cfg=open_clip.model.CLIPTextCfg(context_length=12, vocab_size=300, width=48, heads=3, layers=2),
        )
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
    path = inputs["dir"] + f"/{name}" + (".safetensors" if spec != "tiny" else ".pt")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path) if path.endswith(".safetensors") else torch.save({"state_dict": state}, path)
    outputs[name] = {"path": path, "images": images, "tokens": tokens, "image": image, "text": text,
                     "heads": (model.visual.transformer.resblocks[0].attn.num_heads,
                               model.transformer.resblocks[0].attn.num_heads)}
"""
)


def _check(result: dict, net) -> None:
    with torch.no_grad():
        image = net.encode_image(result["images"])
        text = net.encode_text(result["tokens"])
    torch.testing.assert_close(image, result["image"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, result["text"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_open_clip_models_load_and_give_the_same_embeddings(tmp_path):
    env = ensure_reference_env(MODEL_PACKAGES)
    out = run_reference(env, REFERENCE, {"dir": str(tmp_path), "models": {"tiny": "tiny", "b32": "ViT-B-32"}})

    tiny = out["tiny"]
    net = load_open_clip(tiny["path"], heads=tiny["heads"])  # .pt, state dict under "state_dict"
    assert (net.visual.transformer.resblocks[0].attn.heads, net.text.transformer.resblocks[0].attn.heads) == (
        2,
        3,
    )
    _check(tiny, net)

    b32 = out["b32"]
    net = load_open_clip(b32["path"])  # .safetensors; heads follow open_clip's 64-wide convention
    assert sum(p.numel() for p in net.parameters()) == 151_277_313
    assert config_from_state_dict(read_state_dict(b32["path"]))["vision"] == {
        "image_size": 224,
        "patch_size": 32,
        "width": 768,
        "layers": 12,
        "heads": 12,
        "mlp_ratio": 4.0,
    }
    _check(b32, net)


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
    from hydra import compose, initialize_config_dir

    from train.run import CONF_DIR, build_net

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("train", overrides=["net.text.vocab_size=300"])
    source = build_net(cfg, None)
    # written the way open_clip names it: the text tower at the top level
    open_clip_state = {k.removeprefix("text."): v for k, v in source.state_dict().items()}
    torch.save(open_clip_state, tmp_path / "ckpt.pt")
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(
            "train", overrides=["net.text.vocab_size=300", f"init_from_open_clip={tmp_path / 'ckpt.pt'}"]
        )
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = build_net(cfg, None)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("train", overrides=[f"init_from_open_clip={tmp_path / 'ckpt.pt'}"])
    with pytest.raises(
        ValueError, match=r"does not fit the configured net.*text.token_embedding.weight \(300, 128\)"
    ):
        build_net(cfg, None)
