"""Global-batch contrastive loss: its value, and exact gradients across 2 real processes (gloo + DDP).

The 2-process runs use torch.multiprocessing (spawn) with a gloo process group and real
DistributedDataParallel, which averages gradients over ranks as in training; one spawn runs every
variant (local/full loss, gather with/without grad) so the module costs a single process start-up.
"""

from __future__ import annotations

import functools
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from train.losses import ClipLoss, SigLipLoss
from train.models.clip import CLIP

BATCH = 8  # global; 4 per rank
WORLD = 2
VARIANTS = [(local, with_grad) for local in (True, False) for with_grad in (True, False)]


def tiny(**kw) -> CLIP:
    torch.manual_seed(0)
    return CLIP(
        embed_dim=16,
        vision=dict(image_size=16, patch_size=8, width=32, layers=2, heads=4),
        text=dict(context_length=6, vocab_size=40, width=32, layers=2, heads=4),
        eot_id=3,
        **kw,
    )


SIGLIP = {"init_logit_scale": math.log(10), "init_logit_bias": -3.0}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 16, 16, generator=g)
    tokens = torch.randint(4, 40, (BATCH, 6), generator=g)
    tokens[:, 4] = 3
    return images, tokens


def negative_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Hard-negative tokens for the batch (its tokens with two positions exchanged) and their mask."""
    tokens = data()[1][:, [1, 0, 2, 3, 4, 5]]
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    return tokens, mask


@functools.cache
def reference(negatives: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process over the whole batch of 8 (computed once per test session)."""
    net = tiny()
    out = net(*data())
    extra = {}
    if negatives:
        tokens, mask = negative_data()
        extra = {"negatives": net.encode_text(tokens), "negative_mask": mask}
    loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"], **extra)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@functools.cache
def siglip_reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SigLIP's loss over the whole batch of 8 in one process, and its gradients."""
    net = tiny(**SIGLIP)
    out = net(*data())
    loss = SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def manual_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ---- single process ----------------------------------------------------------------------------------


def test_single_process_loss_is_symmetric_cross_entropy():
    img = F.normalize(torch.randn(5, 8), dim=-1)
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    torch.testing.assert_close(ClipLoss()(img, txt, scale), manual_loss(img, txt, scale))
    torch.testing.assert_close(ClipLoss(local_loss=False)(img, txt, scale), manual_loss(img, txt, scale))
    # by hand for row 0 of the image direction: -log softmax(logits[0])[0]
    logits = scale * img @ txt.T
    row0 = -(logits[0, 0] - logits[0].logsumexp(0))
    torch.testing.assert_close(F.cross_entropy(logits[:1], torch.tensor([0])), row0)
    assert ClipLoss()(img, img, torch.tensor(100.0)) < ClipLoss()(img, txt, torch.tensor(100.0))


def test_sigmoid_loss_is_each_pairs_binary_log_loss_per_image():
    """SigLIP: -(1/n) sum over every (image, text) pair of log sigmoid(+-(t x.y + b)), + for the pair."""
    g = torch.Generator().manual_seed(4)
    img, txt = (F.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(2))
    t, b = torch.tensor(10.0), torch.tensor(-3.0)
    by_hand = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            by_hand -= math.log(1 / (1 + math.exp(-z * (t.item() * float(img[i] @ txt[j]) + b.item()))))
    got = SigLipLoss()(img, txt, t, b)
    torch.testing.assert_close(got, torch.tensor(by_hand / 5), rtol=1e-5, atol=0)
    torch.testing.assert_close(SigLipLoss(local_loss=False)(img, txt, t, b), got)
    # matching pairs score lower
    assert SigLipLoss()(img, img, t, b) < got
    with pytest.raises(ValueError, match=r"image features \(5, 8\) and text features \(4, 8\)"):
        SigLipLoss()(img, txt[:4], t, b)


def test_hard_negatives_are_extra_columns_of_the_image_rows_only():
    g = torch.Generator().manual_seed(3)
    img, txt, neg = (F.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(3))
    scale = torch.tensor(10.0)
    mask = torch.tensor([True, False, True, False, True])
    logits = scale * img @ txt.T
    extra = (scale * img @ neg.T)[:, mask]  # the masked negatives are no column at all
    labels = torch.arange(5)
    want = (F.cross_entropy(torch.cat([logits, extra], 1), labels) + F.cross_entropy(logits.T, labels)) / 2
    for local_loss in (True, False):
        got = ClipLoss(local_loss=local_loss)(img, txt, scale, negatives=neg, negative_mask=mask)
        torch.testing.assert_close(got, want)
    # no negative unmasked: the plain loss; a negative equal to its own caption: a harder task
    none = torch.zeros(5, dtype=torch.bool)
    torch.testing.assert_close(ClipLoss()(img, txt, scale, neg, none), manual_loss(img, txt, scale))
    assert ClipLoss()(img, txt, scale, txt, ~none) > manual_loss(img, txt, scale) + 0.1
    with pytest.raises(
        ValueError, match=r"hard negatives \(5, 8\) need a bool mask of shape \(5,\), got \(4,\)"
    ):
        ClipLoss()(img, txt, scale, neg, mask[:4])


def test_bf16_features_give_a_float32_cross_entropy():
    """DeepSpeed's bf16 engine runs the CLIP without autocast: the features and logits are bf16, and the
    softmax over them runs in float32, as autocast runs cross-entropy on a GPU."""
    img, txt = (F.normalize(torch.randn(64, 8), dim=-1).bfloat16() for _ in range(2))
    scale = torch.tensor(100.0, dtype=torch.bfloat16)
    loss = ClipLoss()(img, txt, scale)
    logits, labels = (scale * img @ txt.T).float(), torch.arange(64)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert loss.dtype == torch.float32 and torch.allclose(loss, want, rtol=1e-6, atol=0)


def test_labels_are_cached_and_shapes_checked():
    loss = ClipLoss()
    img = F.normalize(torch.randn(4, 8), dim=-1)
    loss(img, img, torch.tensor(1.0))
    loss(img, img, torch.tensor(1.0))
    assert list(loss._labels) == [(img.device, 4, 0)]
    with pytest.raises(ValueError, match="same shape"):
        loss(img, img[:3], torch.tensor(1.0))


# ---- two processes -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CachedStep(torch.nn.Module):
    """The CLIP stage's training step with ``module.accum_freq=2`` as Lightning runs it under DDP: inside
    DDP's forward, which its chunks' own backward passes precede."""

    def __init__(self, net: CLIP, local_loss: bool, loss: str = "clip") -> None:
        super().__init__()
        from train.modules.clip import ClipModule

        self.module = ClipModule(net, local_loss=local_loss, accum_freq=2, loss=loss)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.cached_loss(images, tokens, 2)[0]


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        images, tokens = data()
        part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        for local_loss, with_grad in VARIANTS:
            net = torch.nn.parallel.DistributedDataParallel(tiny())  # averages gradients over ranks
            res = net(images[part], tokens[part])
            loss = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad)(
                res["image_features"], res["text_features"], res["logit_scale"]
            )
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # what Lightning logs with sync_dist: the mean of the rank losses
            results[(local_loss, with_grad)] = {
                "loss": mean_loss / world,
                "grads": {n: p.grad.clone() for n, p in net.module.named_parameters()},
            }
        for local_loss in (True, False):  # module.accum_freq=2: 2 chunks of 2 per rank, inside DDP's forward
            step = _CachedStep(tiny(), local_loss)
            net = torch.nn.parallel.DistributedDataParallel(step)
            loss = net(images[part], tokens[part])
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[("accum_freq", local_loss)] = {
                "loss": mean_loss / world,
                "grads": {n: p.grad.clone() for n, p in step.module.net.named_parameters()},
            }
        for local_loss in (True, False):  # SigLIP's sigmoid loss: one pass, and 2 chunks of 2 per rank
            net = torch.nn.parallel.DistributedDataParallel(tiny(**SIGLIP))
            res = net(images[part], tokens[part])
            loss = SigLipLoss(local_loss=local_loss)(
                res["image_features"], res["text_features"], res["logit_scale"], res["logit_bias"]
            )
            loss.backward()
            grads = {n: p.grad.clone() for n, p in net.module.named_parameters()}
            step = _CachedStep(tiny(**SIGLIP), local_loss, loss="siglip")
            chunked = torch.nn.parallel.DistributedDataParallel(step)
            loss_chunked = chunked(images[part], tokens[part])
            loss_chunked.backward()
            for key, value, g in (
                (("siglip", local_loss), loss, grads),
                (("siglip_accum_freq", local_loss), loss_chunked,
                 {n: p.grad.clone() for n, p in step.module.net.named_parameters()}),
            ):  # fmt: skip
                mean_loss = value.detach().clone()
                dist.all_reduce(mean_loss)
                results[key] = {"loss": mean_loss / world, "grads": g}
        # and under FSDP2 (train/strategies.py shard_module: every block, then the module), as strategy=fsdp
        from torch.distributed.device_mesh import init_device_mesh

        from train.modules.clip import ClipModule
        from train.strategies import shard_module

        # SigLIP too: its bias was returned as the gathered parameter, which FSDP2 frees after the forward
        # (a segmentation fault in the loss); a copy now
        for key, net_kw, loss_kind in ((("accum_freq", "fsdp"), {}, "clip"),
                                       (("siglip_accum_freq", "fsdp"), SIGLIP, "siglip")):  # fmt: skip
            module = ClipModule(tiny(**net_kw), accum_freq=2, loss=loss_kind)
            shard_module(module, init_device_mesh("cpu", (world,)))
            loss = module.cached_loss(images[part], tokens[part], 2)[0]
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[key] = {
                "loss": mean_loss / world,
                "grads": {n: p.grad.full_tensor() for n, p in module.net.named_parameters()},
            }
            del module  # (FSDP2's modules freed before the process group: tests/test_strategies.py)
        neg_tokens, neg_mask = negative_data()
        for local_loss in (True, False):  # hard negatives: gathered like the texts
            net = torch.nn.parallel.DistributedDataParallel(tiny())
            res = net(images[part], tokens[part])
            negatives = net.module.encode_text(neg_tokens[part])
            loss = ClipLoss(local_loss=local_loss)(
                res["image_features"], res["text_features"], res["logit_scale"], negatives, neg_mask[part]
            )
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[("negatives", local_loss)] = {
                "loss": mean_loss / world,
                "grads": {n: p.grad.clone() for n, p in net.module.named_parameters()},
            }
        # Unequal per-rank batches are refused on every rank with a clear error (not a hang).
        try:
            b = 4 if rank == 0 else 3
            f = F.normalize(torch.randn(b, 16), dim=-1)
            ClipLoss()(f, f, torch.tensor(1.0))
            results["unequal"] = None
        except ValueError as e:
            results["unequal"] = str(e)
        # the sizes are gathered at a training loss's first call only, and at every evaluation call
        loss, checks = ClipLoss(), []
        gather_sizes = loss._batch_sizes
        loss._batch_sizes = lambda *a: checks.append(1) or gather_sizes(*a)
        f = F.normalize(torch.randn(4, 16), dim=-1)
        for mode in ("train", "train", "train", "eval", "eval"):
            loss.train(mode == "train")(f, f, torch.tensor(1.0))
        results["size_checks"] = len(checks)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("clip_loss_ddp")
    mp.start_processes(
        _rank, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn"
    )
    return {r: torch.load(out / f"rank{r}.pt") for r in range(WORLD)}


RTOL = 1e-5


def tolerance(want: torch.Tensor) -> dict[str, float]:
    """Elementwise rtol 1e-5, plus an atol of 1e-5 x the tensor's largest entry: float32 sums run in a
    different order in 1 and 2 processes, and an entry that is ~0 after cancellation has no meaningful
    relative error. (Observed: differences <= 6e-7 of the largest entry with grad, >= 0.3 without.)"""
    return {"rtol": RTOL, "atol": RTOL * want.abs().max().item()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, **tolerance(g), msg=lambda m, n=name: f"{n}: {m}")


def mismatched(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, g in want.items() if not torch.allclose(got[n], g, **tolerance(g))]


@pytest.mark.multiprocess
@pytest.mark.parametrize("local_loss", [True, False], ids=["local_loss", "full_loss"])
def test_two_processes_match_one_process_over_the_concatenated_batch(two_process, local_loss):
    ref_loss, ref_grads = reference()
    for rank in range(WORLD):  # DDP leaves identical averaged gradients on every rank
        got = two_process[rank][(local_loss, True)]
        torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-6, atol=0)
        assert_same(got["grads"], ref_grads)


@pytest.mark.multiprocess
@pytest.mark.parametrize("local_loss", [True, False, "fsdp"], ids=["local_loss", "full_loss", "fsdp"])
def test_two_processes_accumulating_chunks_with_cached_features_match_one_process(two_process, local_loss):
    """module.accum_freq=2 on each of 2 ranks under DDP: the loss and gradients of the global batch of 8 in
    one pass (the chunks' backward passes accumulate unsynchronised; the last synchronises the sums); and
    under FSDP2 (each chunk's gradients reduce-scattered into the sharded sums; local loss)."""
    ref_loss, ref_grads = reference()
    for rank in range(WORLD):
        got = two_process[rank][("accum_freq", local_loss)]
        torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-6, atol=0)
        assert_same(got["grads"], ref_grads)


@pytest.mark.multiprocess
@pytest.mark.parametrize("local_loss", [True, False], ids=["local_loss", "full_loss"])
def test_two_processes_with_the_sigmoid_loss_match_one_process(two_process, local_loss):
    """SigLIP's loss on 2 ranks (each rank's images against the gathered texts, or every pair on every
    rank), in one pass and in 2 chunks per rank (module.accum_freq=2): the loss and the gradients, the
    learned bias's included, of one process over the batch of 8."""
    ref_loss, ref_grads = siglip_reference()
    assert "logit_bias" in ref_grads and ref_grads["logit_bias"].abs().item() > 0
    kinds = [("siglip", local_loss), ("siglip_accum_freq", local_loss)]
    kinds += [("siglip_accum_freq", "fsdp")] if local_loss else []  # (FSDP2, local loss)
    for rank in range(WORLD):
        for kind in kinds:
            got = two_process[rank][kind]
            torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-6, atol=0, msg=str(kind))
            assert_same(got["grads"], ref_grads)


@pytest.mark.multiprocess
@pytest.mark.parametrize("local_loss", [True, False], ids=["local_loss", "full_loss"])
def test_two_processes_with_hard_negatives_match_one_process(two_process, local_loss):
    ref_loss, ref_grads = reference(negatives=True)
    assert not torch.allclose(ref_loss, reference()[0])  # the negatives change the loss
    for rank in range(WORLD):
        got = two_process[rank][("negatives", local_loss)]
        torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-6, atol=0)
        assert_same(got["grads"], ref_grads)


@pytest.mark.multiprocess
@pytest.mark.parametrize("local_loss", [True, False], ids=["local_loss", "full_loss"])
def test_negative_control_gather_without_grad_gives_different_gradients(two_process, local_loss):
    """Same loss value, but the comparison above fails without gradients through the gather."""
    ref_loss, ref_grads = reference()
    got = two_process[0][(local_loss, False)]
    torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-6, atol=0)
    towers = [n for n in ref_grads if n != "logit_scale"]
    assert set(mismatched(got["grads"], ref_grads)) == set(towers), "every tower gradient must differ"
    with pytest.raises(AssertionError):
        assert_same(got["grads"], ref_grads)
    if local_loss:
        # Not a uniform rescaling: the cross-rank negative terms are missing.
        ratios = [(got["grads"][n].norm() / ref_grads[n].norm()).item() for n in towers]
        assert max(ratios) - min(ratios) > 1e-3
    else:
        # Full loss without grad: each rank gets dL/d(own features) exactly, so DDP's mean leaves exactly
        # 1/world of every tower gradient; logit_scale is used on every rank and stays exact.
        assert_same({n: got["grads"][n] * WORLD for n in towers}, {n: ref_grads[n] for n in towers})
        assert_same({"logit_scale": got["grads"]["logit_scale"]}, {"logit_scale": ref_grads["logit_scale"]})


@pytest.mark.multiprocess
def test_unequal_per_rank_batches_raise_on_every_rank(two_process):
    for rank in range(WORLD):
        assert "same per-device batch size on every rank, got [4, 3]" in two_process[rank]["unequal"]


@pytest.mark.multiprocess
def test_training_checks_the_ranks_batch_sizes_once_and_evaluation_every_call(two_process):
    """The check is a collective and a host read (on a GPU it waits for the step so far): a training
    batch is equal on every rank by construction, so training checks at the first call only."""
    for rank in range(WORLD):
        assert two_process[rank]["size_checks"] == 3  # the first training call, then both evaluation calls
