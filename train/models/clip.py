"""CLIP: a ViT image encoder and a causal text transformer projected into one embedding space.

    net = CLIP(embed_dim=512, vision=dict(image_size=224, patch_size=32, width=768, layers=12, heads=12),
               text=dict(context_length=77, vocab_size=49408, width=512, layers=12, heads=8), eot_id=49407)
    out = net(images, tokens)   # image_features, text_features (L2-normalised), logit_scale

- Vision: patchify (conv, no bias) -> class token + learned positions -> (in training, with
  ``patch_dropout``, a random subset of the patch tokens, FLIP) -> ``ln_pre`` -> transformer ->
  ``ln_post`` on the class token -> ``proj``.
- Text: token embedding + learned positions -> causal transformer -> ``ln_final`` -> the hidden state at
  the first end-of-text token (``eot_id``, set from the tokenizer; a row without one pools its last
  position) -> ``text_projection``. open_clip pools at ``argmax(token id)``, the same position when
  eot has the largest id, as in CLIP's vocabulary; a BPE trained on our captions puts eot elsewhere.
- ``logit_scale`` is learned in log space, initialised to log(1/0.07); ``forward`` returns its exp
  clamped at ``max_logit_scale`` (100), and the stage clamps the parameter after each optimizer step
  (``clamp_logit_scale_``). It is a 1-element vector, where open_clip's is 0-dim: DeepSpeed
  (0.19) broadcasts and partitions parameters through byte views, which 0-dim tensors do not have.
  0-dim values (open_clip weights, older checkpoints) load unchanged (``_load_from_state_dict``).
  With ``init_logit_bias`` (SigLIP's loss, ``module.loss=siglip``) the net also learns ``logit_bias``,
  laid out alike.
- Initialisation follows CLIP: token embedding std 0.02, text positions 0.01, transformer weights scaled
  by width and depth (``Transformer.init_weights``), projections width^-0.5.

Names and shapes follow open_clip (but for the logit scale's): our ``visual.*`` and ``logit_scale`` are its keys verbatim, our
``text.*`` is its top-level text tower (``token_embedding``, ``positional_embedding``, ``transformer``,
``ln_final``, ``text_projection``), so its state dicts load after ``from_open_clip_state_dict``.
``flops_per_sample`` gives the forward FLOPs of one image-text pair, for MFU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from train.models.layers import LayerNorm, Transformer, first_eot_index, transformer_flops

VISION_KEYS = {
    "image_size",
    "patch_size",
    "width",
    "layers",
    "heads",
    "mlp_ratio",
    "stem",
    "pool",
    "patch_dropout",
}
OPTIONAL_KEYS = {"mlp_ratio", "stem", "pool", "patch_dropout"}
TEXT_KEYS = {"context_length", "vocab_size", "width", "layers", "heads", "mlp_ratio"}
TEXT_TOWER = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _plain(cfg: Mapping[str, Any] | Any, option: str, allowed: set[str]) -> dict[str, Any]:
    """A plain dict from a dict or an omegaconf DictConfig (Hydra passes nested configs as DictConfig),
    with unknown or missing keys reported by their config path."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but the model does not need it
        pass
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{option} must be a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(f'{option}.{k}' for k in unknown)}; "
            f"valid: {', '.join(sorted(allowed))}"
        )
    missing = sorted(allowed - OPTIONAL_KEYS - set(cfg))
    if missing:
        raise ValueError(f"missing option(s) {', '.join(f'{option}.{k}' for k in missing)}")
    return cfg


def conv_stem_channels(patch_size: int, width: int) -> list[int]:
    """Output channels of the conv stem's stride-2 layers: doubling up to ``width`` (e.g. 8 -> 32, 64, 128)."""
    steps = patch_size.bit_length() - 1
    if patch_size < 2 or 2**steps != patch_size:
        raise ValueError(f"net.vision.stem=conv needs a power-of-two net.vision.patch_size, got {patch_size}")
    return [max(width // 2 ** (steps - 1 - i), 8) for i in range(steps)]


class ConvStem(nn.Sequential):
    """Patchify with stride-2 3x3 convolutions (+ GroupNorm, GELU) and a 1x1 projection to ``width``.

    The same token grid as a ``patch_size`` patch embedding, but with a small convolutional receptive
    field before the transformer: "early convolutions help transformers see better" (Xiao et al.,
    2021). Much faster to learn shape on small data than a linear patch embedding; the named
    open_clip architectures keep the linear one (``stem: patch``) so their weights load.
    """

    def __init__(self, patch_size: int, width: int) -> None:
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in conv_stem_channels(patch_size, width):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.GELU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 1))
        super().__init__(*layers)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        mlp_ratio: float = 4.0,
        stem: str = "patch",
        pool: str = "tok",
        patch_dropout: float = 0.0,
        grad_checkpointing: bool = False,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        if (
            isinstance(patch_dropout, bool)
            or not isinstance(patch_dropout, int | float)
            or not 0 <= patch_dropout < 1
        ):
            raise ValueError(
                f"net.vision.patch_dropout={patch_dropout!r}: expected the fraction of patch tokens dropped in "
                "training, in [0, 1) (FLIP: 0.5)"
            )
        self.patch_dropout = float(patch_dropout)
        if pool not in ("tok", "avg"):
            raise ValueError(
                f"net.vision.pool={pool!r}: expected 'tok' (class token, OpenAI/open_clip) or 'avg'"
            )
        self.pool = pool
        if stem not in ("patch", "conv"):
            raise ValueError(f"net.vision.stem={stem!r}: expected 'patch' (linear, open_clip) or 'conv'")
        if image_size % patch_size:
            raise ValueError(
                f"net.vision.image_size={image_size} is not divisible by net.vision.patch_size={patch_size}"
            )
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.grid = image_size // patch_size
        scale = width**-0.5
        self.stem = stem
        if stem == "patch":
            self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        else:
            self.conv1 = ConvStem(patch_size, width)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio, grad_checkpointing=grad_checkpointing, quick_gelu=quick_gelu
        )
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.transformer.init_weights()

    def kept_patches(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor | None:
        """(B, keep) indices of the patch tokens that a training pass keeps under ``patch_dropout``, drawn
        independently for each image from the default generator (the run's, different on every rank and
        restored on resume); None when every patch is kept. ``keep`` = int(patches x (1 - patch_dropout)),
        at least 1; the class token is always kept."""
        patches = self.grid**2
        keep = max(1, int(patches * (1.0 - self.patch_dropout)))
        if keep == patches:
            return None
        return torch.rand(batch, patches, device=device).topk(keep, dim=1).indices

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D) unnormalised embeddings.

        Patch dropout (FLIP, Li et al. 2023, "Scaling Language-Image Pre-training via Masking"): in
        training, with ``patch_dropout`` p > 0, each image keeps a random (1 - p) of its patch tokens
        after the positions are added, and the transformer runs on those and the class token alone: about
        1/(1 - p) times the images a second. Evaluation sees every patch. ``keep`` gives the kept indices
        (``kept_patches``) instead of drawing them, in training or not: the chunked loss
        (``module.accum_freq``) passes each chunk the same ones in its two passes."""
        s = self.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (s, s):
            h, w = images.shape[-2:]
            raise ValueError(f"net.vision.image_size={s} but images are {h}x{w} (data.image_size must match)")
        x = self.conv1(images.to(self.class_embedding.dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+g*g, W)
        if keep is None and self.training and self.patch_dropout > 0:
            keep = self.kept_patches(x.shape[0], x.device)
        if keep is not None:
            if keep.shape[0] != x.shape[0] or keep.ndim != 2:
                raise ValueError(
                    f"keep: expected ({x.shape[0]}, kept patches) indices, got {tuple(keep.shape)}"
                )
            kept = x[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], kept], dim=1)  # (B, 1+keep, W)
        x = self.transformer(self.ln_pre(x))
        pooled = x[:, 0] if self.pool == "tok" else x[:, 1:].mean(dim=1)  # class token | mean of patch tokens
        return self.ln_post(pooled) @ self.proj  # (B, D)


class TextTransformer(nn.Module):
    def __init__(
        self,
        *,
        context_length: int,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        eot_id: int,
        mlp_ratio: float = 4.0,
        grad_checkpointing: bool = False,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= eot_id < vocab_size:
            raise ValueError(
                f"net.eot_id={eot_id} is outside the vocabulary (net.text.vocab_size={vocab_size})"
            )
        self.context_length, self.vocab_size, self.eot_id = context_length, vocab_size, eot_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(
            width,
            layers,
            heads,
            mlp_ratio,
            causal=True,
            grad_checkpointing=grad_checkpointing,
            quick_gelu=quick_gelu,
        )
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        self.transformer.init_weights()

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) position of the first eot token per row; the last position where a row has none."""
        return first_eot_index(tokens, self.eot_id)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, W) per-token features after ``ln_final`` (the prior and decoder consume these)."""
        if tokens.ndim != 2:
            raise ValueError(f"expected tokens (B, {self.context_length}), got {tuple(tokens.shape)}")
        if tokens.shape[1] != self.context_length:
            raise ValueError(
                f"net.text.context_length={self.context_length} but tokens have length {tokens.shape[1]} "
                "(data.tokenizer.context_length must match)"
            )
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        return self.ln_final(self.transformer(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) unnormalised embeddings."""
        return self.embed_and_states(tokens)[0]

    def embed_and_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unnormalised embeddings (B, D) and the per-token features (B, L, W) of one pass (what the
        frozen CLIP gives the prior and the decoder)."""
        x = self.hidden_states(tokens)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.pool_index(tokens)]  # (B, W)
        return pooled @ self.text_projection, x  # (B, D), (B, L, W)


class CLIP(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        eot_id: int | None = None,
        grad_checkpointing: bool = False,
        quick_gelu: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        vision = _plain(vision, "net.vision", VISION_KEYS)
        text = _plain(text, "net.text", TEXT_KEYS)
        self.embed_dim = embed_dim
        if text.get("vocab_size") is None:  # set from the tokenizer by train/run.py; alone: CLIP's BPE
            text = {**text, "vocab_size": 49408}
        self.vision_cfg, self.text_cfg = vision, text
        if eot_id is None:
            eot_id = text["vocab_size"] - 1  # CLIP's vocabulary: <|endoftext|> is the last id
        self.quick_gelu = bool(
            quick_gelu
        )  # OpenAI's weights were trained with QuickGELU (open_clip *-quickgelu)
        self.visual = VisionTransformer(
            **vision, output_dim=embed_dim, grad_checkpointing=grad_checkpointing, quick_gelu=self.quick_gelu
        )
        self.text = TextTransformer(
            **text,
            output_dim=embed_dim,
            eot_id=int(eot_id),
            grad_checkpointing=grad_checkpointing,
            quick_gelu=self.quick_gelu,
        )
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))
        self.max_logit_scale = max_logit_scale
        # SigLIP's learned bias (module.loss=siglip; open_clip's init_logit_bias): absent by default, as in
        # open_clip, so a softmax CLIP's state dict has no such key
        if init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for key in (prefix + "logit_scale", prefix + "logit_bias"):
            if key in state_dict and state_dict[key].dim() == 0:  # open_clip's (and our former) 0-dim layout
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable

    def lock(self, tower: str, unlocked_layers: int = 0) -> int:
        """Freeze a tower (``"image"`` or ``"text"``) but its last ``unlocked_layers`` transformer blocks,
        which train with its final norm and projection (open_clip's ``--lock-image`` /
        ``--lock-text``, LiT: Zhai et al. 2022). The logit scale always trains. Returns the parameters
        frozen. A frozen tower's embeddings stay those of the weights it started from, so a prior and
        decoder trained on them stay valid while the other tower learns."""
        option = f"module.lock_{tower}_unlocked_layers"
        if tower == "image":
            module, head = self.visual, [self.visual.ln_post, self.visual.proj]
        elif tower == "text":
            module, head = self.text, [self.text.ln_final, self.text.text_projection]
        else:
            raise ValueError(f"lock: expected the tower 'image' or 'text', got {tower!r}")
        blocks = module.transformer.resblocks
        if isinstance(unlocked_layers, bool) or not isinstance(unlocked_layers, int):
            raise ValueError(f"{option}={unlocked_layers!r}: expected an integer")
        if not 0 <= unlocked_layers <= len(blocks):
            raise ValueError(f"{option}={unlocked_layers}: expected 0 to the tower's {len(blocks)} blocks")
        module.requires_grad_(False)
        if unlocked_layers:
            for part in [*blocks[len(blocks) - unlocked_layers :], *head]:
                part.requires_grad_(True)
        return sum(p.numel() for p in module.parameters() if not p.requires_grad)

    def encode_image(
        self, images: torch.Tensor, normalize: bool = True, *, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.visual(images, keep)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``keep``: the image tower's kept patch indices (``visual.kept_patches``), else its own draw.
        ``logit_bias`` is there when the net has one (``init_logit_bias``)."""
        out = {
            "image_features": self.encode_image(images, keep=keep),
            "text_features": self.encode_text(tokens),
            "logit_scale": self.logit_scale.exp().clamp(max=self.max_logit_scale),
        }
        if hasattr(self, "logit_bias"):  # a copy made here: FSDP2 frees the gathered parameter after forward
            out["logit_bias"] = self.logit_bias.clone()
        return out

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """The learned log scale kept in [0, log(max_logit_scale)] after each optimizer step, as open_clip
        does. The forward's clamp alone passes no gradient above the bound: one step past log(100) left
        the scale there for good (it gets no weight decay). ZeRO-3 partitions the parameter (this rank's
        part in ``ds_tensor``); FSDP2 shards it as a DTensor."""
        for part in (getattr(self.logit_scale, "ds_tensor", None), self.logit_scale.data):
            if part is not None and part.numel():
                part.clamp_(0.0, math.log(self.max_logit_scale))

    def flops_per_sample(self) -> float:
        """Forward FLOPs for one image-text pair (see the module-level ``flops_per_sample``)."""
        return flops_per_sample(
            {"embed_dim": self.embed_dim, "vision": self.vision_cfg, "text": self.text_cfg}
        )


def flops_per_sample(net: CLIP | Mapping[str, Any]) -> float:
    """Approximate forward FLOPs (multiply-add = 2) of one image-text pair, from a CLIP or its config.

    Counts the patch embedding, every matmul of both towers (``transformer_flops``: dense layers plus
    attention, the text tower's causal attention halved) and the two output projections; not norms,
    softmax, GELU, or the B x B logits of the loss. A training step costs about 3x this (forward +
    backward), plus one more forward per checkpointed block with ``grad_checkpointing``. For MFU:
    ``3 * flops_per_sample(cfg) * samples_per_second / peak_flops``. With ``net.vision.patch_dropout``
    the image transformer counts the patches a training pass keeps (evaluation runs every patch).
    """
    if isinstance(net, CLIP):
        return net.flops_per_sample()
    embed_dim = net["embed_dim"]
    v = _plain(net["vision"], "net.vision", VISION_KEYS)
    t = _plain(net["text"], "net.text", TEXT_KEYS)
    patches = (v["image_size"] // v["patch_size"]) ** 2
    kept = max(1, int(patches * (1.0 - v.get("patch_dropout", 0.0))))  # (as VisionTransformer.kept_patches)
    if v.get("stem", "patch") == "conv":
        stem, c_in, side = 0, 3, v["image_size"]
        for c_out in conv_stem_channels(v["patch_size"], v["width"]):
            side //= 2
            stem += 2 * side * side * 9 * c_in * c_out
            c_in = c_out
        stem += 2 * patches * c_in * v["width"]
    else:
        stem = 2 * patches * 3 * v["patch_size"] ** 2 * v["width"]
    vision = (
        stem
        + transformer_flops(v["width"], v["layers"], kept + 1, v.get("mlp_ratio", 4.0))
        + 2 * v["width"] * embed_dim
    )
    text = (
        transformer_flops(t["width"], t["layers"], t["context_length"], t.get("mlp_ratio", 4.0), causal=True)
        + 2 * t["width"] * embed_dim
    )
    return float(vision + text)


def from_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ``CLIP`` state dict (ViT towers without layer scale) to ours: its top-level
    text-tower keys gain the ``text.`` prefix; ``visual.*`` is unchanged, ``logit_scale`` becomes (1,). Load the
    result with ``net.load_state_dict(..., strict=True)`` to check shapes and completeness. The text
    pooling position differs only if the tokenizer's eot id is not its largest id (see the module doc)."""
    out = {}
    for key, value in state_dict.items():
        if key == "attn_mask":  # a buffer in older open_clip versions; we use is_causal instead
            continue
        if key in ("logit_scale", "logit_bias") and value.dim() == 0:  # open_clip's are 0-dim, ours (1,)
            value = value.reshape(1)
        out[f"text.{key}" if key.startswith(TEXT_TOWER) else key] = value
    return out
