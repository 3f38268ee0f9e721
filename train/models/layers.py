"""Transformer building blocks shared by CLIP and the diffusion prior.

Design:

- Pre-norm residual blocks, ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``, as in CLIP / open_clip.
- Parameter names and shapes follow open_clip (``resblocks.N.ln_1``, ``attn.in_proj_weight`` (3W, W),
  ``attn.in_proj_bias``, ``attn.out_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``). ``SelfAttention`` has
  exactly ``nn.MultiheadAttention``'s state-dict layout, so open_clip checkpoints load by name, but it
  computes with ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
  GPU). The text tower's causal mask is ``is_causal=True``, never a materialised (L, L) tensor.
- ``LayerNorm`` computes in float32 and casts back, so half-precision weights or activations do not lose
  precision in the normalisation statistics.
- ``Transformer(grad_checkpointing=True)`` recomputes each block in backward
  (``torch.utils.checkpoint.checkpoint(use_reentrant=False)``), only in training mode with grad enabled.
- ``first_eot_index``: where a caption ends (the one place that decides it): CLIP's text tower pools
  there, the decoder's own caption encoder too, and the caption masks of the prior and decoder stop there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters, computed with SDPA.

    Input and output are batch-first (B, N, W). ``causal=True`` lets position i attend to 0..i only.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by heads={heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's own initialisation (CLIP re-initialises the weights, see Transformer).
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, *, causal: bool = False, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3W)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, W/H)
        if causal and attn_mask is not None:
            raise ValueError("pass either causal=True or an explicit attn_mask, not both")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIPs were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    """Linear -> GELU (or QuickGELU) -> Linear (open_clip's ``c_fc`` / ``c_proj``)."""

    def __init__(self, width: int, hidden: int, quick_gelu: bool = False) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        # open_clip's hidden width, int(width x ratio); the epsilon only absorbs float error (8192 - 1e-12)
        self.mlp = MLP(width, int(width * mlp_ratio + 1e-6), quick_gelu)

    def forward(
        self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ``layers`` residual blocks on (B, N, W) tensors (``resblocks``, as in open_clip)."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        *,
        causal: bool = False,
        grad_checkpointing: bool = False,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.grad_checkpointing = grad_checkpointing
        self.resblocks = nn.ModuleList(
            [ResidualBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        causal = self.causal and attn_mask is None
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, attn_mask, use_reentrant=False)
            else:
                x = block(x, causal, attn_mask)
        return x

    def init_weights(self) -> None:
        """CLIP's scheme: attention input std width^-0.5, MLP input (2 width)^-0.5, and the two output
        projections (which write into the residual stream) width^-0.5 x (2 layers)^-0.5."""
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


def first_eot_index(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, L) token ids -> (B,) int64: the position of each row's first end-of-text token (later ones
    are padding or noise). A row without one (cut without its end-of-text) gets the last position, L - 1:
    the whole row is caption."""
    is_eot = tokens == eot_id
    first = is_eot.int().argmax(dim=1)  # argmax returns the first maximal index
    return torch.where(is_eot.any(dim=1), first, torch.full_like(first, tokens.shape[1] - 1))


def transformer_flops(
    width: int, layers: int, tokens: int, mlp_ratio: float = 4.0, causal: bool = False
) -> float:
    """Forward FLOPs (a multiply-add counts 2) of a ``Transformer`` on one sequence of ``tokens``.

    Dense: qkv (3W^2), out_proj (W^2) and the MLP (2 W hidden) per token. Attention: QK^T and AV,
    2 x 2 x N^2 x W per layer, halved when causal (the causal kernels skip the masked half).
    Norms, GELU and softmax are not counted (as usual for MFU).
    """
    hidden = int(width * mlp_ratio)
    dense = 2 * tokens * (3 * width * width + width * width + 2 * width * hidden)
    attn = 2 * 2 * tokens * tokens * width * (0.5 if causal else 1.0)
    return float(layers * (dense + attn))
