"""Global-batch contrastive loss: value, and exact gradients across 2 real processes (gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from train.losses import ClipLoss
from train.models.clip import CLIP

BATCH = 8  # global; 4 per rank


def tiny() -> CLIP:
    torch.manual_seed(0)
    return CLIP(embed_dim=16, vision=dict(image_size=16, patch_size=8, width=32, layers=2, heads=4),
                text=dict(context_length=6, vocab_size=40, width=32, layers=2, heads=4), eot_id=3)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 16, 16, generator=g)
    tokens = torch.randint(4, 40, (BATCH, 6), generator=g)
    tokens[:, 4] = 3
    return images, tokens


def reference() -> tuple[float, dict[str, torch.Tensor]]:
    net = tiny()
    out = net(*data())
    loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters()}


def test_single_process_loss_is_symmetric_cross_entropy():
    img = F.normalize(torch.randn(5, 8), dim=-1)
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(ClipLoss()(img, txt, scale), expected)
    perfect = ClipLoss()(img, img, torch.tensor(100.0))
    assert perfect < ClipLoss()(img, txt, torch.tensor(100.0))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: float32 summation order differs between 1 and 2 processes, so compare
    tensors, not elements (an element that is ~0 has no meaningful relative error)."""
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, local_loss: bool, with_grad: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = tiny()
        images, tokens = data()
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        res = net(images[part], tokens[part])
        loss = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad)(
            res["image_features"], res["text_features"], res["logit_scale"])
        loss.backward()
        # What DDP does: average every gradient (and we report the mean loss) over ranks.
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        grads = {}
        for name, p in net.named_parameters():
            dist.all_reduce(p.grad)
            grads[name] = p.grad / world
        if rank == 0:
            out["loss"] = reported.item() / world
            out["grads"] = grads
    finally:
        dist.destroy_process_group()


def _two_process(local_loss: bool, with_grad: bool) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(2, _free_port(), local_loss, with_grad, out), nprocs=2, join=True,
                           start_method="spawn")
        return dict(out)


@pytest.mark.multiprocess
@pytest.mark.parametrize("local_loss", [True, False])
def test_two_processes_match_one_process_over_the_concatenated_batch(local_loss):
    ref_loss, ref_grads = reference()
    got = _two_process(local_loss, with_grad=True)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert set(got["grads"]) == set(ref_grads)
    for name, g in ref_grads.items():
        assert relative_error(got["grads"][name], g) <= 1e-5, name


@pytest.mark.multiprocess
def test_negative_control_gather_without_grad_gives_different_gradients():
    ref_loss, ref_grads = reference()
    got = _two_process(local_loss=True, with_grad=False)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-6), "the loss value is the same..."
    differing = [n for n, g in ref_grads.items() if relative_error(got["grads"][n], g) > 1e-3]
    assert len(differing) > len(ref_grads) // 2, "...but without gradients through the gather most grads differ"
