"""The ADM / GLIDE-style diffusion UNet: the 64 px decoder and the two upsamplers (one class, by config).

Residual blocks with scale-shift normalisation (the timestep embedding modulates GroupNorm), residual
up/down-sampling blocks, self-attention at chosen resolutions with a fixed head width, dropout, and
zero-initialised output layers (every residual branch starts as the identity).

Conditioning, all optional:
- ``cond_dim``: a CLIP image embedding (the decoder). Projected and added to the timestep embedding,
  and projected into ``num_cond_tokens`` extra context tokens that every attention layer attends to
  (DALL-E 2 section 2.1).
- ``text_encoder``: the caption. ``clip``: frozen CLIP per-token features (B, L, text_dim) are
  projected to context tokens (Karlo's choice); ``trainable``: token ids go through the net's own
  causal transformer (GLIDE, the paper), whose end-of-text feature is also added to the time embedding;
  ``text_pooled`` does the same with the CLIP features (the feature at the last unmasked token).
- ``low_res_channels``: a low-resolution image, upsampled to the output size and concatenated to the
  input channels (the upsamplers).
- Classifier-free guidance: ``drop_image`` / ``drop_text`` (B,) bool replace that conditioning by learned
  null tokens (and no embedding added), so the dropped model is the unconditional one.

Attention layers attend over [spatial tokens; context tokens] (GLIDE's encoder key/values). Plain
nn.Module, single device, no trainer imports; ``grad_checkpointing`` recomputes each block in backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from train.models.layers import LayerNorm, Transformer, first_eot_index
from train.models.prior import timestep_embedding


class GroupNorm(nn.GroupNorm):
    """GroupNorm in the input's dtype, also under autocast (the statistics accumulate in float32 inside
    the kernel either way). CUDA's autocast runs group_norm in float32 and returns float32, so under
    bf16-mixed a plain GroupNorm would make the SiLU, the scale-shift and every tensor they keep for
    backward float32 up to the next convolution: twice the bytes read, written and kept. The CPU's
    autocast already keeps bf16, and in fp32 this is a plain GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (None if p is None else p.to(x.dtype) for p in (self.weight, self.bias))
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def group_norm(channels: int) -> GroupNorm:
    groups = 32 if channels % 32 == 0 else next(g for g in (16, 8, 4, 2, 1) if channels % g == 0)
    return GroupNorm(groups, channels)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2, in x's dtype: CUDA's autocast returns float32 from it, which would turn the
    rest of the UNet's up path (its residual stream, the skip concatenations) float32. Nearest copies
    values, so casting back loses nothing."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest").to(x.dtype)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample(x))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then the embedding as scale and shift of the second norm, SiLU, dropout,
    zero-initialised conv; optionally resampling (``up``/``down``) inside the block (BigGAN style)."""

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        out_channels: int,
        dropout: float,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.in_norm = group_norm(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.up, self.down = up, down
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample(x)
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        scale, shift = self.emb(F.silu(emb)).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class TokenProjection(nn.Conv1d):
    """A 1x1 convolution's parameters (``nn.Conv1d(c_in, c_out, 1)``, the checkpoint layout) applied to
    token-major (B, N, c_in) input as a linear map. A module of its own, called rather than read from:
    ZeRO-3 gathers a module's weights, on its prefetch schedule, when the module is called."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.squeeze(-1), self.bias)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, keys/values extended with context tokens."""

    def __init__(self, channels: int, head_channels: int, context_dim: int | None) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(
                f"attention: {channels} channels are not a multiple of head_channels={head_channels}"
            )
        self.heads = channels // head_channels
        self.norm = group_norm(channels)
        self.qkv = TokenProjection(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj = zero(TokenProjection(channels, channels))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        # Token-major (B, N, C) so that q, k and v reach SDPA with their head dimension contiguous, as its
        # flash and memory-efficient kernels require (from (B, C, N) they would take the math path, which
        # holds the N x N weights).
        qkv = self.qkv(self.norm(x).flatten(2).transpose(1, 2))  # (B, N, 3C)
        q, k, v = qkv.unflatten(-1, (3, self.heads, c // self.heads)).permute(2, 0, 3, 1, 4)  # (B, h, N, c/h)
        mask = None
        if context is not None and self.context_kv is not None:
            ckv = self.context_kv(context.to(qkv.dtype))  # (B, M, 2C)
            ck, cv = ckv.unflatten(-1, (2, self.heads, c // self.heads)).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
            if context_mask is not None:  # spatial keys always visible: no empty attention rows
                visible = torch.ones(b, hgt * wid, dtype=torch.bool, device=x.device)
                mask = torch.cat([visible, context_mask.bool()], dim=1)[:, None, None, :]  # (B, 1, 1, N+M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, c/h)
        out = self.proj(out.transpose(1, 2).flatten(2))  # (B, N, C)
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


class Block(nn.Module):
    """A resblock (or resampling block) optionally followed by attention: one unit of the UNet."""

    def __init__(self, res: nn.Module, attn: AttentionBlock | None = None) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x, emb, context=None, context_mask=None):
        x = self.res(x, emb) if isinstance(self.res, ResBlock) else self.res(x)
        return self.attn(x, context, context_mask) if self.attn is not None else x


@dataclass(frozen=True)
class _Blocks:
    """What every block of one UNet shares; builds its resblocks, attention and resampling blocks."""

    emb_dim: int
    dropout: float
    head_channels: int
    context_dim: int | None
    attention_resolutions: frozenset[int]
    resblock_updown: bool

    def res(self, ch: int, out: int) -> ResBlock:
        return ResBlock(ch, self.emb_dim, out, self.dropout)

    def attention(self, ch: int, resolution: int | None = None) -> AttentionBlock | None:
        """Attention at ``attention_resolutions``; the middle (``resolution=None``) has it if any level does."""
        at = self.attention_resolutions
        wanted = bool(at) if resolution is None else resolution in at
        return AttentionBlock(ch, self.head_channels, self.context_dim) if wanted else None

    def down(self, ch: int) -> nn.Module:
        return (
            ResBlock(ch, self.emb_dim, ch, self.dropout, down=True)
            if self.resblock_updown
            else Downsample(ch)
        )

    def up(self, ch: int) -> nn.Module:
        return ResBlock(ch, self.emb_dim, ch, self.dropout, up=True) if self.resblock_updown else Upsample(ch)


def _embedding_mlp(model_channels: int, emb_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def _down_path(
    blocks: _Blocks, model_channels: int, channel_mult: Sequence[int], num_res_blocks: int, image_size: int
) -> tuple[nn.ModuleList, list[int]]:
    """Per level: resblocks (with attention where configured), then a downsampling block but at the
    deepest level. Returns the blocks and the channels of every skip (the input conv's first, the
    bottleneck's last)."""
    path, ch, skips, resolution = nn.ModuleList(), model_channels, [model_channels], image_size
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out = model_channels * mult
            path.append(Block(blocks.res(ch, out), blocks.attention(out, resolution)))
            ch = out
            skips.append(ch)
        if level != len(channel_mult) - 1:
            path.append(Block(blocks.down(ch)))
            skips.append(ch)
            resolution //= 2
    return path, skips


def _middle(blocks: _Blocks, ch: int) -> nn.ModuleList:
    return nn.ModuleList([Block(blocks.res(ch, ch), blocks.attention(ch)), Block(blocks.res(ch, ch))])


def _up_path(
    blocks: _Blocks,
    model_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    image_size: int,
    skips: Sequence[int],
) -> tuple[nn.ModuleList, int]:
    """Per level from the deepest: num_res_blocks + 1 resblocks, each on a skip concatenated (the down
    path's, last first), with attention where configured, then an upsampling block but at the top level.
    Returns the blocks and their output channels."""
    path, skips, ch = nn.ModuleList(), list(skips), skips[-1]
    resolution = image_size // 2 ** (len(channel_mult) - 1)
    for level, mult in reversed(list(enumerate(channel_mult))):
        for _ in range(num_res_blocks + 1):
            out = model_channels * mult
            path.append(Block(blocks.res(ch + skips.pop(), out), blocks.attention(out, resolution)))
            ch = out
        if level:
            path.append(Block(blocks.up(ch)))
            resolution *= 2
    return path, ch


def _output_head(ch: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(group_norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, out_channels, 3, padding=1)))


class UNet(nn.Module):
    """Builders register the parameters in a fixed order (state-dict keys, sharding order and the seeded
    initialisation depend on it; tests/test_unet.py pins them): time embeddings, caption, image
    embedding, context norm, input conv, down path, middle, up path, output head."""

    def __init__(
        self,
        *,
        image_size: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int] = (),
        head_channels: int = 64,
        in_channels: int = 3,
        out_channels: int = 3,
        learned_variance: bool = False,
        dropout: float = 0.0,
        resblock_updown: bool = True,
        cond_dim: int | None = None,
        num_cond_tokens: int = 4,
        text_encoder: str | None = None,
        text_dim: int | None = None,
        text_vocab_size: int | None = None,
        text_context_length: int | None = None,
        text_width: int | None = None,
        text_layers: int = 0,
        text_heads: int = 8,
        text_eot_id: int | None = None,
        text_pooled: bool = False,
        low_res_channels: int = 0,
        low_res_noise_cond: bool = False,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if text_encoder not in (None, "clip", "trainable"):
            raise ValueError(f"net.text_encoder={text_encoder!r}: expected null, 'clip' or 'trainable'")
        if low_res_noise_cond and not low_res_channels:
            raise ValueError("net.low_res_noise_cond needs low_res_channels (an upsampler)")
        self.image_size, self.in_channels = image_size, in_channels
        self.out_channels = out_channels * (2 if learned_variance else 1)
        self.learned_variance = learned_variance
        self.model_channels, self.channel_mult = model_channels, tuple(channel_mult)
        self.cond_dim, self.num_cond_tokens = cond_dim, num_cond_tokens
        self.text_encoder, self.low_res_channels = text_encoder, low_res_channels
        self.low_res_noise_cond = low_res_noise_cond
        self.grad_checkpointing = grad_checkpointing
        emb_dim = 4 * model_channels
        self._build_time_embeddings(emb_dim)
        tower = dict(vocab_size=text_vocab_size, context_length=text_context_length, width=text_width)
        tower.update(layers=text_layers, heads=text_heads, eot_id=text_eot_id)
        self._build_conditioning(emb_dim, text_dim, text_pooled, tower)
        attn_at = frozenset(attention_resolutions)
        blocks = _Blocks(emb_dim, dropout, head_channels, self.context_dim, attn_at, resblock_updown)
        mult = self.channel_mult
        self.input_conv = nn.Conv2d(in_channels + low_res_channels, model_channels, 3, padding=1)
        self.down, skips = _down_path(blocks, model_channels, mult, num_res_blocks, image_size)
        self.middle = _middle(blocks, skips[-1])
        self.up, ch = _up_path(blocks, model_channels, mult, num_res_blocks, image_size, skips)
        self.out = _output_head(ch, self.out_channels)

    # ---- builders (in registration order) -------------------------------------------------------
    def _build_time_embeddings(self, emb_dim: int) -> None:
        self.time_embed = _embedding_mlp(self.model_channels, emb_dim)
        if self.low_res_noise_cond:  # noise-conditioning augmentation: the low-res image's noise level
            self.aug_embed = _embedding_mlp(self.model_channels, emb_dim)

    def _build_conditioning(self, emb_dim: int, text_dim: int | None, text_pooled: bool, tower: dict) -> None:
        """Conditioning -> embedding additions and context tokens; sets ``context_dim`` (None: none)."""
        ctx_dim = self._build_caption(emb_dim, text_dim, text_pooled, tower)
        if self.cond_dim:
            self.image_to_emb = nn.Linear(self.cond_dim, emb_dim)
            ctx_dim = ctx_dim or emb_dim  # without a caption the image tokens are embedding-wide
            self.image_to_tokens = nn.Linear(self.cond_dim, self.num_cond_tokens * ctx_dim)
            self.null_image_tokens = nn.Parameter(torch.randn(self.num_cond_tokens, ctx_dim) * 0.02)
        self.context_dim = ctx_dim
        if ctx_dim:
            self.context_norm = LayerNorm(ctx_dim)

    def _build_caption(
        self, emb_dim: int, text_dim: int | None, text_pooled: bool, tower: dict
    ) -> int | None:
        """The caption's parameters; returns the width of its context tokens (None: no caption)."""
        if self.text_encoder == "trainable":
            text_dim = self._build_text_tower(emb_dim, **tower)
        elif self.text_encoder == "clip" and not text_dim:
            raise ValueError("net.text_encoder=clip needs text_dim (the CLIP text width)")
        elif self.text_encoder == "clip" and text_pooled:
            self.text_to_emb = nn.Linear(text_dim, emb_dim)
        elif text_pooled:
            raise ValueError("net.text_pooled needs a caption: set net.text_encoder to clip or trainable")
        self.text_pooled = self.text_encoder == "trainable" or bool(text_pooled)
        if self.text_encoder is None:
            return None
        self.null_text = nn.Parameter(torch.randn(text_dim) * 0.02)
        return text_dim

    def _build_text_tower(
        self,
        emb_dim: int,
        *,
        vocab_size: int | None,
        context_length: int | None,
        width: int | None,
        layers: int,
        heads: int,
        eot_id: int | None,
    ) -> int:
        """The net's own causal caption transformer (``text_encoder=trainable``); returns its width."""
        if not (vocab_size and context_length and width and layers and eot_id is not None):
            raise ValueError(
                "net.text_encoder=trainable needs text_vocab_size, text_context_length, text_width, "
                "text_layers and text_eot_id"
            )
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.text_positional = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.text_transformer = Transformer(
            width, layers, heads, causal=True, grad_checkpointing=self.grad_checkpointing
        )
        self.text_transformer.init_weights()
        self.text_ln = LayerNorm(width)
        self.text_to_emb = nn.Linear(width, emb_dim)
        self.text_eot_id = int(eot_id)
        return width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        if hasattr(self, "text_transformer"):  # the paper's 2048 x 24 caption encoder
            self.text_transformer.grad_checkpointing = enable

    # ---- conditioning ---------------------------------------------------------------------------
    def _conditioning(self, emb, b, device, image_emb, text_feat, tokens, text_mask, drop_image, drop_text):
        context, masks = [], []
        if self.text_encoder is not None:
            drop_text = (
                torch.zeros(b, dtype=torch.bool, device=device) if drop_text is None else drop_text.bool()
            )
            if self.text_encoder == "trainable":
                if tokens is None:
                    raise ValueError("net.text_encoder=trainable: pass tokens (B, L)")
                if tokens.shape[1] > self.text_positional.shape[0]:
                    raise ValueError(
                        f"tokens (B, {tokens.shape[1]}) are longer than net.text_context_length="
                        f"{self.text_positional.shape[0]}"
                    )
                h = self.token_embedding(tokens) + self.text_positional[: tokens.shape[1]].to(emb.dtype)
                h = self.text_ln(self.text_transformer(h))
                last = first_eot_index(tokens, self.text_eot_id)
                feat = h
                if text_mask is None:
                    text_mask = torch.arange(tokens.shape[1], device=device)[None] <= last[:, None]
            else:
                if text_feat is None:
                    raise ValueError(
                        "net.text_encoder=clip: pass text_feat (B, L, text_dim) CLIP token features"
                    )
                feat = text_feat.to(emb.dtype)
                if text_mask is None:
                    text_mask = torch.ones(feat.shape[:2], dtype=torch.bool, device=device)
                last = text_mask.long().cumsum(1).argmax(1)  # the caption's last visible token
            if self.text_pooled:  # its end-of-text feature joins the timestep embedding (GLIDE)
                pooled = feat[torch.arange(b, device=device), last]
                emb = emb + torch.where(drop_text[:, None], 0.0, self.text_to_emb(pooled))
            feat = torch.where(drop_text[:, None, None], self.null_text.to(feat.dtype), feat)
            # dropped captions: only the first (null) token stays visible
            first_only = torch.zeros_like(text_mask)
            first_only[:, 0] = True
            context.append(feat)
            masks.append(torch.where(drop_text[:, None], first_only, text_mask.bool()))
        if self.cond_dim:
            if image_emb is None:
                raise ValueError(
                    "net.cond_dim is set: pass image_emb (B, cond_dim), the CLIP image embedding"
                )
            drop_image = (
                torch.zeros(b, dtype=torch.bool, device=device) if drop_image is None else drop_image.bool()
            )
            image_emb = image_emb.to(emb.dtype)
            emb = emb + torch.where(drop_image[:, None], 0.0, self.image_to_emb(image_emb))
            tokens_ = self.image_to_tokens(image_emb).view(b, self.num_cond_tokens, -1)
            tokens_ = torch.where(
                drop_image[:, None, None], self.null_image_tokens.to(tokens_.dtype), tokens_
            )
            context.append(tokens_)
            masks.append(torch.ones(b, self.num_cond_tokens, dtype=torch.bool, device=device))
        if not context:
            return emb, None, None
        return emb, self.context_norm(torch.cat(context, dim=1)), torch.cat(masks, dim=1)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        image_emb: torch.Tensor | None = None,
        text_feat: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        low_res_noise: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W) noised image, t (B,) steps -> (B, C or 2C, H, W). H, W: any multiple of
        2^(levels-1) (fully convolutional without attention: the upsamplers train on crops).
        ``low_res_noise`` (B,): the diffusion step at which ``low_res`` was noised (noise-conditioning
        augmentation, ``low_res_noise_cond``); None means clean (step 0)."""
        b = x.shape[0]
        dtype = self.input_conv.weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        if self.low_res_noise_cond:
            level = torch.zeros_like(t) if low_res_noise is None else low_res_noise
            emb = emb + self.aug_embed(timestep_embedding(level, self.model_channels).to(dtype))
        elif low_res_noise is not None:
            raise ValueError("low_res_noise given but the net has low_res_noise_cond=false")
        emb, context, mask = self._conditioning(
            emb, b, x.device, image_emb, text_feat, tokens, text_mask, drop_image, drop_text
        )
        h = x.to(dtype)
        if self.low_res_channels:
            if low_res is None:
                raise ValueError(
                    "net.low_res_channels is set: pass low_res (B, C, h, w), the low-resolution image"
                )
            up = F.interpolate(low_res.to(dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
            h = torch.cat([h, up], dim=1)
        h = self.input_conv(h)
        hs = [h]

        def run(block: Block, h: torch.Tensor) -> torch.Tensor:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(block, h, emb, context, mask, use_reentrant=False)
            return block(h, emb, context, mask)

        for block in self.down:
            h = run(block, h)
            hs.append(h)
        for block in self.middle:
            h = run(block, h)
        for block in self.up:
            if isinstance(block.res, ResBlock) and not (block.res.up):
                h = torch.cat([h, hs.pop()], dim=1)
            h = run(block, h)
        return self.out(h).to(x.dtype if x.is_floating_point() else dtype)
