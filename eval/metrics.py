"""Image-generation metrics without downloads: FID (CLIP or Inception features) and CLIP score.

- :func:`fid` computes the Fréchet distance with torchmetrics' ``FrechetInceptionDistance`` and a
  feature extractor passed in as a module:

  - ``features="clip"`` (reported as **CLIP-FID**): the image embedding of our own trained CLIP
    (:class:`ClipFeatures`), so it works on any machine and needs nothing but the CLIP run.
  - ``features="inception"``: the FID Inception-v3 from a TorchScript file the user gives
    (``inception_path``), the ``inception-2015-12-05.pt`` that StyleGAN2-ADA, StyleGAN3 and clean-fid
    distribute: called as ``model(images, return_features=True)`` on float images in [0, 255] of any
    size (it resizes to 299 itself) and returning (B, 2048) pool features. Numbers with it are
    comparable to published FIDs; we never download it (torch-fidelity, torchmetrics' default
    extractor, needs torchvision, which has no build for this CPU torch).

- :func:`clip_score`: 100 x the mean cosine between each image's CLIP embedding and its prompt's,
  at least 0 (torchmetrics' CLIPScore: its scale, and the clamp of the mean), with our CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from train.frozen_clip import FrozenClip


class ClipFeatures(nn.Module):
    """uint8 (B, 3, H, W) -> the CLIP's L2-normalised image embeddings (B, D), as FID features."""

    def __init__(self, clip: FrozenClip) -> None:
        super().__init__()
        self.clip = clip
        self.num_features = clip.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # on the CPU, where the metric keeps its sums, whichever device the CLIP runs on
        return self.clip.embed(images.to(torch.uint8), None)["img_emb"].double().cpu()


class InceptionFeatures(nn.Module):
    """The FID Inception-v3 from a TorchScript file (see the module docstring)."""

    num_features = 2048

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"inception_path={path}: no such file (a TorchScript FID Inception, e.g. inception-2015-12-05.pt)"
            )
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise ValueError(
                f"inception_path={path}: not a TorchScript model ({str(e).splitlines()[0]})"
            ) from e

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net(images.float(), return_features=True)
        if out.ndim != 2 or out.shape[1] != self.num_features:
            raise ValueError(
                f"the Inception model returned features of shape {tuple(out.shape)}; expected (B, 2048)"
            )
        return out.double()


def _batches(images: torch.Tensor, batch_size: int):
    for k in range(0, len(images), batch_size):
        yield images[k : k + batch_size]


@torch.no_grad()
def fid(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    features: str = "clip",
    clip: FrozenClip | None = None,
    inception_path: str | Path | None = None,
    batch_size: int = 256,
) -> float:
    """Fréchet distance between uint8 image sets (N, 3, H, W) (sizes may differ between the sets)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if features == "clip":
        if clip is None:
            raise ValueError("fid(features='clip') needs clip=FrozenClip(<CLIP run>)")
        extractor: nn.Module = ClipFeatures(clip)
    elif features == "inception":
        if inception_path is None:
            raise ValueError(
                "fid(features='inception') needs inception_path=<TorchScript FID Inception file>"
            )
        extractor = InceptionFeatures(inception_path)
    else:
        raise ValueError(f"fid features={features!r}: expected 'clip' or 'inception'")
    if min(len(generated), len(reference)) < 2:
        raise ValueError(f"fid needs at least 2 images per set (got {len(generated)} and {len(reference)})")
    # sync_on_compute=False: these image sets are this process's own. torchmetrics would otherwise sync
    # its states over the default process group whenever one exists, e.g. on rank 0 of train.pipeline
    # sampling alone while the other ranks wait on a gloo group: a collective they never enter.
    metric = FrechetInceptionDistance(
        feature=extractor, reset_real_features=True, normalize=False, sync_on_compute=False
    )
    for batch in _batches(reference, batch_size):
        metric.update(batch, real=True)
    for batch in _batches(generated, batch_size):
        metric.update(batch, real=False)
    return float(metric.compute())


@torch.no_grad()
def clip_score(
    images: torch.Tensor, prompts: Sequence[str], clip: FrozenClip, batch_size: int = 256
) -> float:
    """100 x mean cosine(CLIP image embedding, CLIP text embedding of its prompt), at least 0: the mean is
    clamped, as torchmetrics' CLIPScore does (clamping each image's cosine, Hessel et al.'s form, read
    higher for a weak CLIP: cosines 0.3 and -0.2 gave 15, not 5)."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images for {len(prompts)} prompts")
    total = 0.0
    for k in range(0, len(images), batch_size):
        emb = clip.embed(images[k : k + batch_size], clip.tokenizer(list(prompts[k : k + batch_size])))
        total += (emb["img_emb"] * emb["txt_emb"]).sum(-1).sum().item()
    return max(100.0 * total / len(images), 0.0)
