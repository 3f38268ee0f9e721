"""Contrastive loss over the global batch ("local loss, gather with grad").

Each rank holds B image and B text features. They are all-gathered so every rank sees the global
batch of N = world x B pairs. With ``local_loss`` a rank computes only its own B rows of the logits
against all N columns (labels ``rank * B + arange(B)``): O(B x N) memory instead of O(N x N).

Gradient scaling (why it is exact). The single-process loss over the global batch is
``L = (1/N) sum_i l_i`` (image and text directions averaged). Rank r's local loss is
``L_r = (1/B) sum_{i in r} l_i``, so ``L = (1/world) sum_r L_r``. ``dL_r/df`` reaches features of every
rank through the gather; the gather's backward sums, over ranks, the gradients with respect to each
gathered slice (all_reduce SUM, then each rank keeps its slice), so rank r's features receive
``sum_s dL_s/df_r``. DDP then averages parameter gradients over ranks: ``(1/world) sum_s dL_s/dtheta``
= ``dL/dtheta``. Loss and gradients therefore equal the single-process run exactly (up to float
summation order). Without ``local_loss`` each rank computes the full N x N logits and its loss is L
itself; the gather backward sums ``world`` identical copies of dL/df_r and DDP's mean divides by
``world``: exact again, at O(N x N) memory per rank. ``gather_with_grad=False`` treats other ranks'
features as constants: cheaper, but rank r's features then get only its own loss's gradient, so the
gradients differ from the global loss (the 2-process test checks both facts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the summed gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        # all_reduce + slice rather than reduce_scatter: gloo (CPU) has no reduce_scatter.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.chunk(ctx.world, dim=0)[ctx.rank], None


def gather_features(x: torch.Tensor, *, with_grad: bool, group=None) -> torch.Tensor:
    """(B, D) per rank -> (world x B, D), ranks in order; with_grad keeps this rank's slice differentiable."""
    if with_grad:
        return _GatherWithGrad.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = x  # own features keep their gradient
    return torch.cat(parts, dim=0)


class ClipLoss(nn.Module):
    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def _targets(self, device: torch.device, n: int, offset: int) -> torch.Tensor:
        key = (device, n, offset)
        if key not in self._labels:
            self._labels[key] = torch.arange(offset, offset + n, device=device)
        return self._labels[key]

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            logits = logit_scale * image_features @ text_features.T
            labels = self._targets(logits.device, logits.shape[0], 0)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

        size = torch.tensor([image_features.shape[0]], device=image_features.device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        if any(int(s) != image_features.shape[0] for s in sizes):
            raise ValueError(f"ClipLoss needs the same per-device batch on every rank, got {[int(s) for s in sizes]} "
                             "(the training loader drops short batches: keep drop_last)")
        rank = dist.get_rank()
        all_img = gather_features(image_features, with_grad=self.gather_with_grad)
        all_txt = gather_features(text_features, with_grad=self.gather_with_grad)
        b = image_features.shape[0]
        if self.local_loss:
            logits_i = logit_scale * image_features @ all_txt.T  # (B, N): my images vs every text
            logits_t = logit_scale * text_features @ all_img.T  # (B, N): my texts vs every image
            labels = self._targets(logits_i.device, b, rank * b)
            return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
        logits = logit_scale * all_img @ all_txt.T  # (N, N)
        labels = self._targets(logits.device, logits.shape[0], 0)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
