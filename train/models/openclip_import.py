"""Load open_clip ViT checkpoints into our CLIP without importing open_clip.

    net = load_open_clip("ViT-L-14.safetensors", config="ViT-L-14-quickgelu")   # OpenAI's L/14 weights
    net = load_open_clip("hub-dir/")              # open_clip_config.json + open_clip_model.safetensors
    net = load_open_clip("ViT-B-32.pt")           # OpenAI's TorchScript archive (QuickGELU, 64-wide heads)
    tok = clip_tokenizer("bpe_simple_vocab_16e6.txt.gz")  # its vocabulary (data/tokenizer.py)

The architecture comes from open_clip's own config, never from a guess:
- ``config=``: a name from ``open_clip_configs.json`` beside this file (open_clip's ViT model configs,
  ``ViT-B-32`` ... ``ViT-bigG-14-quickgelu``), a model-config JSON file as in open_clip's
  ``model_configs/``, a hub ``open_clip_config.json`` (its ``model_cfg``), or the dict itself;
- a directory in the hub layout is read with its ``open_clip_config.json``;
- OpenAI's original ``.pt`` archives (TorchScript, as openai/CLIP distributes them) are QuickGELU models
  with 64-wide heads by construction.
Otherwise the shapes give every size, but not the attention heads nor the activation (GELU or
QuickGELU: OpenAI's weights were trained with QuickGELU, open_clip's own with GELU): the load is refused,
naming the named configs whose shapes match, unless ``heads=`` and ``quick_gelu=`` are given. Every
tensor must map onto ours (strict): layer scale, attentional pooling and non-ViT towers are refused.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from train.models.clip import CLIP, from_open_clip_state_dict

CONFIGS_FILE = Path(__file__).with_name("open_clip_configs.json")
HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
VISION_CFG = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "patch_dropout"}
TEXT_CFG = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")


def named_configs() -> dict[str, dict]:
    """open_clip's ViT model configs by name (``ViT-L-14``, ``ViT-L-14-quickgelu``, ...)."""
    return {k: v for k, v in json.loads(CONFIGS_FILE.read_text()).items() if not k.startswith("_")}


def is_openai_archive(path: str | Path) -> bool:
    """A TorchScript archive (OpenAI's ``ViT-B-32.pt`` ...), not a pickled state dict."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in HUB_WEIGHTS:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {' or '.join(HUB_WEIGHTS)} in this open_clip hub directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such open_clip checkpoint")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, a torch pickle (a bare state dict or one under
    ``state_dict``/``model``, DDP's ``module.`` prefix removed), OpenAI's TorchScript archive, or a hub
    directory's weights file."""
    path = _weights_file(Path(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif is_openai_archive(path):  # TorchScript: code and tensors, no pickled Python objects
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        state = {k: v for k, v in state.items() if k not in OPENAI_SCALARS}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (open_clip checkpoint)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def open_clip_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """open_clip's model config (``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``) from a dict, a
    name of :func:`named_configs`, a model-config or hub JSON file, or a hub directory."""
    if isinstance(source, Mapping):
        cfg = dict(source)
    elif (named := named_configs()).get(str(source)) is not None:
        cfg = named[str(source)]
    else:
        path = Path(source)
        path = path / HUB_CONFIG if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"open_clip config {source!r}: not a file, a hub directory or one of the named configs "
                f"({', '.join(sorted(named))})"
            )
        cfg = json.loads(path.read_text())
    return dict(cfg.get("model_cfg", cfg))  # a hub file nests it under model_cfg


def config_from_open_clip(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """CLIP(**config) arguments for an open_clip model config; what our CLIP does not implement (a timm or
    HF tower, layer scale, attentional pooling, ...) is refused, naming the key."""
    unsupported = sorted(
        set(model_cfg) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_bias"}
    )
    vision, text = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    unsupported += [f"vision_cfg.{k}" for k in sorted(set(vision) - VISION_CFG)]
    unsupported += [f"text_cfg.{k}" for k in sorted(set(text) - TEXT_CFG)]
    if unsupported:
        raise ValueError(f"open_clip config: {unsupported} are not implemented by our ViT CLIP")
    image_size = vision.get("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, list | tuple) else image_size
    vision_width, text_width = vision.get("width", 768), text.get("width", 512)
    bias = model_cfg.get("init_logit_bias")
    return {
        "embed_dim": model_cfg["embed_dim"],
        "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
        **({} if bias is None else {"init_logit_bias": float(bias)}),  # a SigLIP-trained model's bias
        "vision": {
            "image_size": image_size,
            "patch_size": vision.get("patch_size", 16),
            "width": vision_width,
            "layers": vision.get("layers", 12),
            "heads": vision_width // vision.get("head_width", 64),
            "mlp_ratio": vision.get("mlp_ratio", 4.0),
            "patch_dropout": float(vision.get("patch_dropout", 0.0)),
        },
        "text": {
            "context_length": text.get("context_length", 77),
            "vocab_size": text.get("vocab_size", 49408),
            "width": text_width,
            "layers": text.get("layers", 12),
            "heads": text.get("heads", 8),
            "mlp_ratio": text.get("mlp_ratio", 4.0),
        },
    }


def _layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not found:
        raise KeyError(f"no {prefix}N.* tensors: not an open_clip ViT CLIP state dict")
    return max(found) + 1


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every size an open_clip ViT state dict shows: CLIP(**config) arguments but ``heads`` (None) and
    the activation, which tensors do not reveal."""
    required = (
        "visual.conv1.weight",
        "visual.positional_embedding",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "text_projection",
    )
    missing = [k for k in required if k not in state]
    if missing:
        raise KeyError(f"not an open_clip ViT CLIP state dict: missing {missing}")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["token_embedding.weight"].shape[1]
    return {
        "embed_dim": state["visual.proj"].shape[1],
        "vision": {
            "image_size": grid * patch,
            "patch_size": patch,
            "width": width,
            "layers": _layers(state, "visual.transformer.resblocks."),
            "heads": None,
            "mlp_ratio": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        },
        "text": {
            "context_length": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0],
            "width": text_width,
            "layers": _layers(state, "transformer.resblocks."),
            "heads": None,
            "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        },
    }


def _same_shapes(config: dict[str, Any], shapes: dict[str, Any]) -> bool:
    def sizes(c: dict) -> tuple:
        towers = [
            {k: v for k, v in c[t].items() if k not in ("heads", "mlp_ratio", "patch_dropout")}
            for t in ("vision", "text")
        ]
        hidden = [int(c[t]["width"] * c[t]["mlp_ratio"] + 1e-6) for t in ("vision", "text")]
        return c["embed_dim"], towers, hidden

    return sizes(config) == sizes(shapes)


def matching_configs(state: dict[str, torch.Tensor]) -> list[str]:
    """The named configs whose every size equals this state dict's."""
    shapes = shapes_of(state)
    return [n for n, c in named_configs().items() if _same_shapes(config_from_open_clip(c), shapes)]


def resolve_config(
    path: str | Path,
    state: dict[str, torch.Tensor],
    config: str | Path | Mapping[str, Any] | None = None,
    heads: tuple[int, int] | None = None,
    quick_gelu: bool | None = None,
) -> dict[str, Any]:
    """CLIP(**config) arguments for the checkpoint at ``path`` (see the module docstring for the order),
    with SigLIP's bias when the checkpoint has one (its value is a weight: it loads with the others)."""
    arch = _stated_config(path, state, config, heads, quick_gelu)
    if "logit_bias" in state and "init_logit_bias" not in arch:
        arch["init_logit_bias"] = 0.0
    return arch


def _stated_config(path, state, config, heads, quick_gelu) -> dict[str, Any]:
    path = Path(path)
    if config is None and path.is_dir() and (path / HUB_CONFIG).is_file():
        config = path
    if config is not None:
        return config_from_open_clip(open_clip_config(config))
    arch = shapes_of(state)
    if is_openai_archive(path):  # every OpenAI CLIP: QuickGELU, 64-wide heads
        heads = heads or (arch["vision"]["width"] // 64, arch["text"]["width"] // 64)
        quick_gelu = True if quick_gelu is None else quick_gelu
    if heads is None or quick_gelu is None:
        names = matching_configs(state)
        hint = f"config= one of {names}" if names else "config=<an open_clip model-config JSON>"
        raise ValueError(
            f"{path}: the tensors do not say how many attention heads, nor GELU or QuickGELU "
            f"(OpenAI's weights: QuickGELU): pass {hint}, or heads=(vision, text) and quick_gelu="
        )
    arch["vision"]["heads"], arch["text"]["heads"] = heads
    return {**arch, "quick_gelu": quick_gelu}


def load_open_clip(
    path: str | Path,
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    eot_id: int | None = None,
    heads: tuple[int, int] | None = None,
    quick_gelu: bool | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> CLIP:
    """Our CLIP with an open_clip checkpoint's weights (file or hub directory), architecture as
    :func:`resolve_config` reads it. ``state``: the checkpoint's tensors, when already read."""
    state = read_state_dict(path) if state is None else state
    arch = resolve_config(path, state, config, heads, quick_gelu)
    net = CLIP(**arch, eot_id=eot_id)
    ours = from_open_clip_state_dict(state)
    expected = net.state_dict()
    wrong = [k for k, v in ours.items() if k in expected and expected[k].numel() != v.numel()]
    if wrong:
        raise ValueError(f"{path}: its tensors do not have the config's shapes: {wrong[:6]}")
    result = net.load_state_dict(ours, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"{path}: tensors that do not fit our ViT CLIP: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]} (layer scale, attention pooling and non-ViT "
            "towers are not supported)"
        )
    return net.eval()


# ---- the other way: our CLIP as an open_clip hub directory ------------------------------------------------
def to_open_clip_config(net: CLIP) -> dict[str, Any]:
    """open_clip's model config for ``net``; a net open_clip cannot build (conv stem, mean pooling) is
    refused naming the option."""
    v, t = net.vision_cfg, net.text_cfg
    if v.get("stem", "patch") != "patch" or v.get("pool", "tok") != "tok":
        raise ValueError(
            f"net.vision.stem={v.get('stem')!r}, net.vision.pool={v.get('pool')!r}: open_clip's ViT has a linear "
            "patch stem and class-token pooling (net.vision.stem=patch net.vision.pool=tok)"
        )
    bias = getattr(net, "logit_bias", None)  # SigLIP's: open_clip makes the parameter when the key is there
    return {
        "embed_dim": net.embed_dim,
        "quick_gelu": net.quick_gelu,
        **({} if bias is None else {"init_logit_bias": float(bias.detach().reshape(-1)[0])}),
        "vision_cfg": {
            "image_size": v["image_size"],
            "layers": v["layers"],
            "width": v["width"],
            "patch_size": v["patch_size"],
            "head_width": v["width"] // v["heads"],
            "mlp_ratio": v.get("mlp_ratio", 4.0),
            **({"patch_dropout": v["patch_dropout"]} if v.get("patch_dropout") else {}),
        },
        "text_cfg": {k: t.get(k, 4.0 if k == "mlp_ratio" else None) for k in sorted(TEXT_CFG)},
    }


def to_open_clip_state_dict(net: CLIP) -> dict[str, torch.Tensor]:
    """Our state dict under open_clip's names: the text tower at the top level, a 0-dim logit scale."""
    out = {}
    for key, value in net.state_dict().items():
        value = value.detach().contiguous().cpu()
        if key in ("logit_scale", "logit_bias"):
            value = value.reshape(())
        out[key.removeprefix("text.")] = value
    return out


def save_open_clip(net: CLIP, out: str | Path, preprocess: Mapping[str, Any] | None = None) -> Path:
    """``out/open_clip_config.json`` + ``out/open_clip_model.safetensors``: a directory that
    ``open_clip.create_model_and_transforms("local-dir:" + out)`` loads (and clip_benchmark through it)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": to_open_clip_config(net), "preprocess_cfg": dict(preprocess or {})}
    save_file(to_open_clip_state_dict(net), str(out / HUB_WEIGHTS[0]))
    (out / HUB_CONFIG).write_text(json.dumps(config, indent=2))
    return out
