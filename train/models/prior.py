"""The diffusion prior (DALL-E 2 section 2.2): CLIP text -> CLIP image embedding.

A decoder-only (causal) transformer over the sequence

    [text token features (L), CLIP text embedding, timestep embedding, noised image embedding, query]

whose last position (the learned query) is projected to the prediction: the clean image embedding
(x0) in the paper. Text tokens past the end-of-text are masked out of attention. Classifier-free
guidance: ``drop`` (B,) bool replaces a sample's text embedding and token features by learned null
ones (the same for every dropped sample), so ``drop=True`` is the unconditional model.

Embedding scale: the net works on L2-normalised CLIP embeddings multiplied by sqrt(D), so every
entry has unit variance on average, like the diffusion noise; ``train/modules/prior.py`` does the
scaling and undoes it. Plain nn.Module, single device, no trainer imports.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from train.models.layers import LayerNorm, Transformer, transformer_flops


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) integer or float steps -> (B, dim) (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class DiffusionPrior(nn.Module):
    def __init__(
        self,
        *,
        embed_dim: int,
        text_width: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        use_text_tokens: bool = True,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim, self.text_width, self.context_length = embed_dim, text_width, context_length
        self.width, self.layers, self.mlp_ratio = width, layers, mlp_ratio
        self.use_text_tokens = use_text_tokens
        n_text = context_length if use_text_tokens else 0
        self.seq_len = n_text + 4
        if use_text_tokens:
            self.text_proj = nn.Linear(text_width, width)
            self.null_text_tokens = nn.Parameter(torch.randn(context_length, text_width) * 0.02)
        self.text_emb_proj = nn.Linear(embed_dim, width)
        self.null_text_emb = nn.Parameter(torch.randn(embed_dim))  # the scale of sqrt(D) x unit vectors
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.x_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn(self.seq_len, width) * 0.01)
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio, causal=True, grad_checkpointing=grad_checkpointing
        )
        self.transformer.init_weights()
        self.ln_final = LayerNorm(width)
        self.out_proj = nn.Linear(width, embed_dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        text_emb: torch.Tensor,
        text_feat: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, D) noised scaled image embedding, t (B,) steps, text_emb (B, D) scaled text embedding,
        text_feat (B, L, W_text) CLIP token features, text_mask (B, L) bool (True = a real token),
        drop (B,) bool (True = drop the text conditioning) -> (B, D) prediction."""
        b = x.shape[0]
        if x.shape != (b, self.embed_dim) or text_emb.shape != (b, self.embed_dim):
            raise ValueError(
                f"prior: expected x and text_emb of shape (B, {self.embed_dim}), got {tuple(x.shape)} and "
                f"{tuple(text_emb.shape)}"
            )
        dtype = self.x_proj.weight.dtype
        drop = torch.zeros(b, dtype=torch.bool, device=x.device) if drop is None else drop.bool()
        text_emb = torch.where(drop[:, None], self.null_text_emb.to(text_emb.dtype), text_emb)
        parts = []
        key_valid = torch.ones(b, self.seq_len, dtype=torch.bool, device=x.device)
        if self.use_text_tokens:
            if text_feat is None:
                raise ValueError("prior: use_text_tokens=True needs text_feat (B, L, W) token features")
            if text_feat.shape[1:] != (self.context_length, self.text_width):
                raise ValueError(
                    f"prior: text_feat must be (B, {self.context_length}, {self.text_width}) (net.context_length, "
                    f"net.text_width from the CLIP), got {tuple(text_feat.shape)}"
                )
            text_feat = torch.where(drop[:, None, None], self.null_text_tokens.to(text_feat.dtype), text_feat)
            parts.append(self.text_proj(text_feat.to(dtype)))
            if text_mask is not None:  # dropped samples attend to all null tokens
                key_valid[:, : self.context_length] = text_mask.bool() | drop[:, None]
        time = self.time_mlp(timestep_embedding(t, self.width).to(dtype))
        parts += [
            self.text_emb_proj(text_emb.to(dtype))[:, None],
            time[:, None],
            self.x_proj(x.to(dtype))[:, None],
            self.query.to(dtype).expand(b, 1, -1),
        ]
        h = torch.cat(parts, dim=1) + self.positional_embedding.to(dtype)
        if self.use_text_tokens and text_mask is not None:
            causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool, device=x.device).tril()
            # (B, 1, S, S): causal and key not padding. Row 0 (start token) always sees itself.
            h = self.transformer(h, attn_mask=(causal[None] & key_valid[:, None, :])[:, None])
        else:
            h = self.transformer(h)
        return self.out_proj(self.ln_final(h[:, -1]))

    def flops_per_sample(self) -> float:
        """Forward FLOPs of one (noised embedding, text) pair, as in transformer_flops (for MFU): the
        transformer, the text tokens' projection (when it has them), the three embedding projections and
        the timestep MLP."""
        text_tokens = self.context_length if self.use_text_tokens else 0
        return transformer_flops(self.width, self.layers, self.seq_len, self.mlp_ratio, causal=True) + 2 * (
            text_tokens * self.width * self.text_width + 3 * self.embed_dim * self.width + 2 * self.width**2
        )
