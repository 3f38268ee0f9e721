"""Symmetric contrastive (InfoNCE) loss over the GLOBAL batch, for CLIP pretraining (and SigLIP's
pairwise sigmoid loss, :class:`SigLipLoss`, at the end).

Each of ``world`` ranks holds B image and B text features (L2-normalised, same B on every rank). They
are all-gathered so every rank sees the global batch of N = world x B pairs, ranks in order. The loss is
``(CE(logits, labels) + CE(logits^T, labels)) / 2`` with ``logits = logit_scale * img @ txt^T``.

- ``local_loss=True``: rank r computes only its own B rows against all N columns, for images
  (``img_r @ txt_all^T``) and for texts (``txt_r @ img_all^T``), labels ``r * B + arange(B)``:
  O(B x N) memory per rank instead of O(N x N).
- ``local_loss=False``: every rank computes the full N x N logits (the same loss value on every rank).
- ``gather_with_grad=True``: the gather is differentiable (``_GatherWithGrad``): its backward sums the
  gradient of the gathered tensor over ranks (all_reduce SUM; gloo has no reduce_scatter) and each rank
  keeps its own slice. With False, other ranks' features are constants.

Gradient scaling, derived. Let l_i be pair i's loss (its image row and text row, averaged) so the
single-process loss over the concatenated batch is ``L = (1/N) sum_i l_i``. Lightning/DDP backpropagates
each rank's loss and then AVERAGES parameter gradients over ranks.

* local loss, with grad: ``L_r = (1/B) sum_{i in r} l_i``, so ``L = (1/world) sum_r L_r`` (the logged
  mean of the rank losses equals L). ``L_r`` depends on rank s's features through the gather; the gather
  backward hands rank s ``sum_r dL_r/df_s``, so rank s's parameter gradient is ``sum_r dL_r/dtheta``
  restricted to the path through f_s. DDP's mean gives
  ``(1/world) sum_s sum_r dL_r/dtheta|f_s = (1/world) sum_r dL_r/dtheta = dL/dtheta``. ``logit_scale``
  is used directly on every rank: ``(1/world) sum_r dL_r/ds = dL/ds``. Exact, no extra factor.
* full loss, with grad: every rank's loss IS L; rank s receives ``sum_r dL/df_s = world x dL/df_s``
  and DDP's mean divides by world: exact again (``logit_scale``: mean of world equal copies of dL/ds).
* without grad, the loss value is unchanged but rank r's features receive only the gradient of its own
  loss. Local loss: ``(1/world) sum_r dL_r/dtheta|f_r`` loses every cross-rank term (how rank r's
  features act as negatives for other ranks' rows): a different, not just rescaled, gradient. Full loss:
  rank r gets ``dL/df_r`` exactly, so after DDP's mean the tower gradients are exactly ``1/world`` of
  the global-batch gradient while ``logit_scale``'s is exact (tests/test_losses.py checks all four).

Hard negatives (``negatives``, M text features per rank, and a bool ``negative_mask``; optional):
extra text columns for the image rows only, gathered like the texts, masked out (-inf) where a caption
has none; the text rows are unchanged (a negative caption has no image). The same scaling argument holds
for them as for the texts: they are one more gathered input of each rank's loss.

Exact means up to float32 summation order; tests/test_losses.py compares 2 gloo processes under DDP
with one process over the concatenated batch. A single process (or world size 1) needs no gathering.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the gradients summed over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # A copy: the all_reduce is in place and autograd's incoming gradient must not be modified.
        grad = grad.clone(memory_format=torch.contiguous_format)
        # all_reduce + slice rather than reduce_scatter: gloo (CPU) has no reduce_scatter.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.chunk(ctx.world, dim=0)[ctx.rank], None


def gather_features(x: torch.Tensor, *, with_grad: bool, group=None) -> torch.Tensor:
    """(B, D) per rank -> (world x B, D), ranks in order.

    ``with_grad``: differentiable through every rank (``_GatherWithGrad``); otherwise only this rank's
    own slice (the input tensor itself) carries a gradient.
    """
    if with_grad:
        return _GatherWithGrad.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    parts[dist.get_rank(group)] = x
    return torch.cat(parts, dim=0)


def _symmetric_ce(logits_img: torch.Tensor, logits_txt: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """In float32, as autocast runs cross-entropy on a GPU: under DeepSpeed's bf16 (weights cast whole, no
    autocast) the logits arrive in bf16, and a softmax over thousands of them in bf16 would round."""
    logits_img, logits_txt = logits_img.float(), logits_txt.float()
    return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2


class ClipLoss(nn.Module):
    """CLIP's symmetric cross-entropy over the global batch; see the module docstring for the scaling."""

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}
        self._sizes_checked = False

    def _targets(self, device: torch.device, n: int, offset: int) -> torch.Tensor:
        """arange(offset, offset + n), cached per (device, size, offset)."""
        key = (device, n, offset)
        if key not in self._labels:
            self._labels[key] = torch.arange(offset, offset + n, device=device)
        return self._labels[key]

    def _batch_sizes(self, b: int, device: torch.device, world: int) -> list[int]:
        """Every rank's batch size: a collective, and a host read (on a GPU, a wait for the step so far)."""
        size = torch.tensor([b], device=device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        return [int(s) for s in sizes]

    @staticmethod
    def _world_and_batch(image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[int, int]:
        """The world size and this rank's batch, once the features are checked to be pairs."""
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image features {tuple(image_features.shape)} and text features "
                f"{tuple(text_features.shape)} must have the same shape (B, D)"
            )
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return world, image_features.shape[0]

    def _check_equal_batches(self, b: int, device: torch.device, world: int) -> None:
        """Unequal batches would make the feature gathers mismatch (a hang or garbage on NCCL): refused.
        In training mode only the first call checks, since every training batch has the same size on
        every rank by construction (both data paths drop a short last batch), and a check at every step
        would stall the GPU's queue once a step; evaluation (a short last batch) checks every call."""
        if self.training and self._sizes_checked:
            return
        sizes_list = self._batch_sizes(b, device, world)
        self._sizes_checked = self.training
        if any(s != b for s in sizes_list):
            raise ValueError(
                f"ClipLoss needs the same per-device batch size on every rank, got {sizes_list} "
                "(keep drop_last=True for training so no rank sees a short final batch)"
            )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        world, b = self._world_and_batch(image_features, text_features)
        if negatives is not None and (
            negative_mask is None or negative_mask.shape != negatives.shape[:1] or negatives.ndim != 2
        ):
            raise ValueError(
                f"hard negatives {tuple(negatives.shape)} need a bool mask of shape ({negatives.shape[0]},), "
                f"got {None if negative_mask is None else tuple(negative_mask.shape)}"
            )
        if world == 1:
            logits = logit_scale * image_features @ text_features.T
            logits_img = self._with_negatives(logits, image_features, negatives, negative_mask, logit_scale)
            return _symmetric_ce(logits_img, logits.T, self._targets(logits.device, b, 0))

        self._check_equal_batches(b, image_features.device, world)
        all_img = gather_features(image_features, with_grad=self.gather_with_grad)
        all_txt = gather_features(text_features, with_grad=self.gather_with_grad)
        if negatives is not None:
            negatives = gather_features(negatives, with_grad=self.gather_with_grad)
            mask = negative_mask.to(torch.uint8).contiguous()  # gloo gathers no bool tensors
            masks = [torch.empty_like(mask) for _ in range(world)]
            dist.all_gather(masks, mask)
            negative_mask = torch.cat(masks).bool()
        if self.local_loss:
            logits_img = logit_scale * image_features @ all_txt.T  # (B, N): my images vs every text
            logits_txt = logit_scale * text_features @ all_img.T  # (B, N): my texts vs every image
            logits_img = self._with_negatives(
                logits_img, image_features, negatives, negative_mask, logit_scale
            )
            labels = self._targets(logits_img.device, b, dist.get_rank() * b)
            return _symmetric_ce(logits_img, logits_txt, labels)
        logits = logit_scale * all_img @ all_txt.T  # (N, N)
        logits_img = self._with_negatives(logits, all_img, negatives, negative_mask, logit_scale)
        return _symmetric_ce(logits_img, logits.T, self._targets(logits.device, logits.shape[0], 0))

    @staticmethod
    def _with_negatives(logits, images, negatives, mask, logit_scale) -> torch.Tensor:
        """The image rows' logits with one more column per hard negative (-inf where there is none)."""
        if negatives is None:
            return logits
        extra = (logit_scale * images @ negatives.T).masked_fill(~mask.bool()[None], float("-inf"))
        return torch.cat([logits, extra], dim=1)


def sigmoid_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, offset: int
) -> torch.Tensor:
    """``-(1/n) sum_ij log sigmoid(z_ij (t img_i . txt_j + b))`` of n image rows against every text column,
    z = +1 for the pair (column ``offset + i``) and -1 otherwise; in float32, as ``_symmetric_ce``."""
    logits = (logit_scale * img @ txt.T + logit_bias).float()
    n = img.shape[0]
    signs = torch.full_like(logits, -1.0)
    rows = torch.arange(n, device=logits.device)
    signs[rows, offset + rows] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n


class SigLipLoss(ClipLoss):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training";
    open_clip's ``--siglip``): every image-text pair of the global batch is its own binary problem, the
    pair positive and every other negative, with a learned scale t and bias b (initialised log 10 and -10:
    ``net.init_logit_scale``, ``net.init_logit_bias``). No softmax over the batch, so no row needs the
    whole batch's normaliser.

    ``local_loss=True``: rank r's B images against the N gathered texts, divided by B; the mean of the
    rank losses is the single-process loss over the concatenated batch, and with ``gather_with_grad`` the
    gradients are exact after DDP's mean, by the argument of the module docstring. Only the texts are
    gathered. ``local_loss=False``: the N x N pairs on every rank, divided by N."""

    def forward(  # type: ignore[override]
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        world, b = self._world_and_batch(image_features, text_features)
        if world == 1:
            return sigmoid_loss(image_features, text_features, logit_scale, logit_bias, 0)
        self._check_equal_batches(b, image_features.device, world)
        all_txt = gather_features(text_features, with_grad=self.gather_with_grad)
        if self.local_loss:
            return sigmoid_loss(image_features, all_txt, logit_scale, logit_bias, dist.get_rank() * b)
        all_img = gather_features(image_features, with_grad=self.gather_with_grad)
        return sigmoid_loss(all_img, all_txt, logit_scale, logit_bias, 0)
