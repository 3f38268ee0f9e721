"""CLIP: a ViT image encoder and a causal text transformer projected into one embedding space.

    net = CLIP(embed_dim=512, vision=dict(image_size=224, patch_size=32, width=768, layers=12, heads=12),
               text=dict(context_length=77, vocab_size=49408, width=512, layers=12, heads=8), eot_id=49407)
    out = net(images, tokens)   # image_features, text_features (L2-normalised), logit_scale

- Vision: patchify (conv, no bias) -> class token + learned positions -> ``ln_pre`` -> transformer ->
  ``ln_post`` on the class token -> ``proj``.
- Text: token embedding + learned positions -> causal transformer -> ``ln_final`` -> the hidden state at
  the first end-of-text token (``eot_id``, set from the tokenizer; a row without one pools its last
  position) -> ``text_projection``. open_clip pools at ``argmax(token id)``, the same position when
  eot has the largest id, as in CLIP's vocabulary; a BPE trained on our captions puts eot elsewhere.
- ``logit_scale`` is learned in log space, initialised to log(1/0.07) and clamped at 100 after exp.

Names follow open_clip (``visual.*`` = its ``visual.*``; ``text.*`` = its top-level text tower), so its
state dicts map onto ours by a fixed rename (train/models/openclip_import.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.models.layers import LayerNorm, Transformer, transformer_flops


def _plain(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A plain dict from a dict or an omegaconf DictConfig (Hydra passes nested configs as DictConfig)."""
    if hasattr(cfg, "items"):
        return {k: v for k, v in cfg.items()}
    raise TypeError(f"expected a mapping, got {type(cfg).__name__}")


class VisionTransformer(nn.Module):
    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 mlp_ratio: float = 4.0, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"net.vision.image_size={image_size} is not divisible by net.vision.patch_size={patch_size}")
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.grid = image_size // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, grad_checkpointing=grad_checkpointing)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.transformer.init_weights()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"net.vision.image_size={self.image_size}: expected images (B, 3, {self.image_size}, "
                             f"{self.image_size}), got {tuple(images.shape)}")
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+g*g, W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, D)


class TextTransformer(nn.Module):
    def __init__(self, *, context_length: int, vocab_size: int, width: int, layers: int, heads: int, output_dim: int,
                 eot_id: int, mlp_ratio: float = 4.0, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if not 0 <= eot_id < vocab_size:
            raise ValueError(f"net.eot_id={eot_id} is outside the vocabulary (net.text.vocab_size={vocab_size})")
        self.context_length, self.vocab_size, self.eot_id = context_length, vocab_size, eot_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, causal=True,
                                       grad_checkpointing=grad_checkpointing)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        self.transformer.init_weights()

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) position of the first eot token per row; the last position where a row has none."""
        is_eot = tokens == self.eot_id
        first = is_eot.int().argmax(dim=1)
        return torch.where(is_eot.any(dim=1), first, torch.full_like(first, tokens.shape[1] - 1))

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, W) per-token features after ``ln_final`` (the prior and decoder consume these)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"net.text.context_length={self.context_length}: expected tokens (B, "
                             f"{self.context_length}), got {tuple(tokens.shape)} (set data.tokenizer.context_length)")
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        return self.ln_final(self.transformer(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.hidden_states(tokens)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.pool_index(tokens)]  # (B, W)
        return pooled @ self.text_projection  # (B, D)


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, vision: Mapping[str, Any], text: Mapping[str, Any], eot_id: int | None = None,
                 grad_checkpointing: bool = False, init_logit_scale: float = math.log(1 / 0.07),
                 max_logit_scale: float = 100.0) -> None:
        super().__init__()
        vision, text = _plain(vision), _plain(text)
        self.embed_dim = embed_dim
        self.vision_cfg, self.text_cfg = vision, text
        if eot_id is None:
            eot_id = text["vocab_size"] - 1  # CLIP's vocabulary: <|endoftext|> is the last id
        self.visual = VisionTransformer(**vision, output_dim=embed_dim, grad_checkpointing=grad_checkpointing)
        self.text = TextTransformer(**text, output_dim=embed_dim, eot_id=eot_id, grad_checkpointing=grad_checkpointing)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.max_logit_scale = max_logit_scale

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(tokens),
            "logit_scale": self.logit_scale.exp().clamp(max=self.max_logit_scale),
        }

    def flops_per_sample(self) -> float:
        """Forward FLOPs for one image-text pair (matmuls and attention; x3 for a training step)."""
        v, t = self.vision_cfg, self.text_cfg
        patches = (v["image_size"] // v["patch_size"]) ** 2
        vision = (2 * patches * 3 * v["patch_size"] ** 2 * v["width"]
                  + transformer_flops(v["width"], v["layers"], patches + 1, v.get("mlp_ratio", 4.0))
                  + 2 * v["width"] * self.embed_dim)
        text = (transformer_flops(t["width"], t["layers"], t["context_length"], t.get("mlp_ratio", 4.0), causal=True)
                + 2 * t["width"] * self.embed_dim)
        return float(vision + text)
