"""Load open_clip ViT checkpoints into our CLIP without importing open_clip.

    net = load_open_clip("ViT-B-32.safetensors")          # architecture read from the tensors
    tok = clip_tokenizer("bpe_simple_vocab_16e6.txt.gz")  # its vocabulary (data/tokenizer.py)

The file is a ``.safetensors`` or a torch pickle (``.pt``/``.bin``; a bare state dict or one under
``state_dict``/``model``, with or without DDP's ``module.`` prefix). The architecture is inferred
from tensor shapes; attention heads are not visible in shapes, so they follow open_clip's convention
of 64-wide heads unless given. Every tensor must map onto ours (strict load): a model with layer
scale, attentional pooling or a non-ViT tower is refused with the keys that do not fit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from train.models.clip import CLIP, from_open_clip_state_dict


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such open_clip checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (open_clip checkpoint)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if not found:
        raise KeyError(f"no {prefix}N.* tensors: not an open_clip ViT CLIP state dict")
    return max(found) + 1


def config_from_state_dict(state: dict[str, torch.Tensor], head_width: int = 64) -> dict[str, Any]:
    """CLIP(**config) arguments that fit an open_clip ViT state dict."""
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
            "heads": width // head_width,
            "mlp_ratio": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        },
        "text": {
            "context_length": state["positional_embedding"].shape[0],
            "vocab_size": state["token_embedding.weight"].shape[0],
            "width": text_width,
            "layers": _layers(state, "transformer.resblocks."),
            "heads": text_width // head_width,
            "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        },
    }


def load_open_clip(
    path: str | Path, *, eot_id: int | None = None, head_width: int = 64, heads: tuple[int, int] | None = None
) -> CLIP:
    """Our CLIP with an open_clip checkpoint's weights. ``heads=(vision, text)`` overrides the 64-wide default."""
    state = read_state_dict(path)
    config = config_from_state_dict(state, head_width)
    if heads is not None:
        config["vision"]["heads"], config["text"]["heads"] = heads
    net = CLIP(**config, eot_id=eot_id)
    result = net.load_state_dict(from_open_clip_state_dict(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"{path}: tensors that do not fit our ViT CLIP: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]} (layer scale, attention pooling and non-ViT "
            "towers are not supported)"
        )
    return net.eval()
