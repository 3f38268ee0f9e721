"""A frozen CLIP for the later stages: embeddings on the fly, and the text classifier for evaluation.

The prior and decoder read precomputed embedding shards (``python -m data.embed``) or compute the
same tensors here from image-text batches. Both paths go through :meth:`FrozenClip.embed` and round
to float16 as the shards store them, so a batch is identical whichever path produced it (tested).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from data.transforms import Normalize
from train.models.layers import first_eot_index
from train.perf import matmul_precision


class FrozenClip:
    """CLIP from a run directory (or checkpoint), in eval mode, without gradients.

    Deliberately not an ``nn.Module``: a stage that holds one does not save it in its checkpoints nor
    hand it to DDP/DeepSpeed (it is inference-only and identical on every rank); call :meth:`to`.
    """

    def __init__(self, run: str | Path, map_location: str | torch.device = "cpu") -> None:
        from train.checkpoint import load_stage, weights_digest

        stage = load_stage(run, map_location=map_location)
        if not hasattr(stage.net, "encode_image") or stage.tokenizer is None:
            if hasattr(stage.net, "encode_image"):
                raise ValueError(f"{run}: a CLIP run without its tokenizer.json")
            kind = stage.cfg.get("stage_name") or type(stage.net).__name__
            raise ValueError(f"{run}: a {kind} run; expected a CLIP run directory (stage=clip)")
        self.run, self.checkpoint, self.global_step = Path(run), stage.checkpoint, stage.global_step
        # which weights these are, wherever they were loaded from (a run, its export, a copy): what the
        # embedding shards, the later stages' configs and the cascade compare
        self.digest = weights_digest(stage.net.state_dict())
        self.net = stage.net.eval().requires_grad_(False)
        self.tokenizer = stage.tokenizer
        self.normalize = Normalize(stage.cfg.data.normalize)
        # the net's input size (data.crop_size when the run trained on crops), and the size shards are
        # resized to before their centre crop, as the run's validation read them (data.image_size)
        self.image_size = int(stage.net.vision_cfg["image_size"])
        self.resize_size = int(stage.cfg.data.image_size)

    def weights(self) -> dict[str, str | int]:
        """What was loaded, as a later stage's config records it (``clip_weights``) and the embedding
        shards' ``embed_info.json`` does: the file, its step and the weights' digest."""
        return {
            "checkpoint": str(self.checkpoint.resolve()),
            "global_step": int(self.global_step),
            "digest": self.digest,
        }

    def has_weights(self, digest: str) -> bool:
        """Whether ``digest`` (recorded by an earlier version too) is of these weights."""
        from train.checkpoint import same_weights

        return same_weights(self.digest, digest)

    @property
    def embed_dim(self) -> int:
        return int(self.net.embed_dim)

    @property
    def text_width(self) -> int:
        return int(self.net.text.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: torch.device | str) -> FrozenClip:
        self.net.to(device)
        return self

    @torch.no_grad()
    def embed(self, images: torch.Tensor | None, tokens: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """uint8 images (B, 3, H, W) and/or tokens (B, L) -> ``img_emb`` (B, D), ``txt_emb`` (B, D),
        ``txt_feat`` (B, L, W): L2-normalised embeddings and per-token features, float16-rounded,
        returned as float32 on the CLIP's device. Images of another size are resized (bicubic).
        Always in fp32, also under a caller's autocast (a stage's bf16-mixed training step), and on a GPU
        with TF32 matmuls whatever the process set: the embedding shards, the cascade and the decoder's
        training step compute them alike, and the decoder must be conditioned on the same embeddings in
        training as in sampling."""
        with torch.autocast(self.device.type, enabled=False), matmul_precision(self.device, "high"):
            return self._embed(images, tokens)

    def _embed(self, images: torch.Tensor | None, tokens: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        device = self.device
        if images is not None:
            if images.dtype != torch.uint8:
                raise TypeError("FrozenClip.embed expects uint8 images (set data.normalize=none)")
            x = self.normalize(images.to(device))
            if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
            out["img_emb"] = self.net.encode_image(x).float().half().float()
        if tokens is not None:
            tokens = tokens.to(device).long()
            emb, states = self.net.text.embed_and_states(tokens)  # one pass of the text tower for both
            out["txt_emb"] = F.normalize(emb, dim=-1).float().half().float()
            out["txt_feat"] = states.float().half().float()
        return out

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net.encode_text(tokens.to(self.device))


def text_mask(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, L) bool: True up to and including each caption's first end-of-text token (the rest is padding)."""
    first = first_eot_index(tokens, eot_id)  # a row without one is all caption
    return torch.arange(tokens.shape[1], device=tokens.device)[None] <= first[:, None]
