"""Exponential moving average of a net's weights (the prior, decoder and upsamplers evaluate and export it).

``EMA`` is an ``nn.Module`` holding a frozen copy (``shadow``) of the net, so it is saved in and restored
from Lightning checkpoints with the rest of the module (exact resume) and moves with it between devices.
Its parameters never require grad, so DDP and the optimizer ignore them.

Sharded training: under FSDP2 (DTensor parameters) and DeepSpeed ZeRO-3 (``ds_tensor`` partitions) the
shadow is sharded exactly like the net (same shapes, same partitioning), so each rank averages only its
own slice of every weight: the EMA costs 1/world of the model per rank and needs no communication.

Low-precision shadows: DeepSpeed casts the whole module, EMA included, to bf16/fp16. A 0.9999 average
updated in bf16 (8 significant bits) loses every update smaller than half a unit in the last place,
so it would stay frozen at its start. When the shadow is bf16/fp16 the average is kept in an fp32
copy of this rank's shards (outside the module, so nothing casts it; 4 bytes per local parameter) and
the shadow is rounded from it after every update. The net's weights, bf16 too under DeepSpeed, are
converted to float32 for the average a chunk at a time (``CHUNK_ELEMENTS``). The copy is rebuilt from
the shadow after a restore (one rounding per resume, not one per step).

The update count is a buffer (saved, restored) with a copy on the host, so that the decay of a step
never reads the device (on a GPU that read blocks the host until the step has run); the host copy is
read back from the buffer once after a restore.

Decay warm-up: the effective decay at update n is min(decay, (1 + n) / (10 + n)), so early, random
weights are forgotten quickly (a 0.9999 average would otherwise remember them for ~10^4 steps).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


class EMA(nn.Module):
    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay}: expected 0 <= decay < 1")
        self.decay, self.warmup = decay, warmup
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # the count on the host too: reading the buffer on a GPU would block the host at every step
        self._count: int | None = 0
        self._master: list[torch.Tensor] | None = None  # fp32 accumulator for a bf16/fp16 shadow
        self.register_load_state_dict_post_hook(_resync_after_load)

    def current_decay(self) -> float:
        if self._count is None:  # restored: read the buffer once
            self._count = int(self.num_updates)
        n = self._count
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = [local_shard(e) for e in self.shadow.parameters()]
        params = [local_shard(p).detach() for p in net.parameters()]
        for p, e in zip(params, ema_params):
            if p.shape != e.shape:
                raise RuntimeError(
                    f"EMA: a weight's local shard is {tuple(p.shape)} in the net but {tuple(e.shape)} in the EMA "
                    "copy; the two must be sharded identically (shard ema.shadow like net)"
                )
        low = [i for i, e in enumerate(ema_params) if e.dtype in (torch.bfloat16, torch.float16)]
        high = sorted(set(range(len(ema_params))) - set(low))
        if high:
            torch._foreach_lerp_(
                [ema_params[i] for i in high], [params[i].to(ema_params[i].dtype) for i in high], 1.0 - decay
            )
        if low:
            shadow = [ema_params[i] for i in low]
            if (
                self._master is None
                or len(self._master) != len(low)
                or self._master[0].device != shadow[0].device
            ):
                if self._master is None:
                    log.info("EMA: %s shadow weights; averaging in an fp32 copy of them", shadow[0].dtype)
                self._master = [e.float() for e in shadow]
            # the net's weights in float32 a chunk at a time: all at once would be a transient 4 bytes per
            # local weight on top of the copy (14 GB for a 3.5B decoder under ZeRO-1/2)
            for part in _chunks([params[i].numel() for i in low], CHUNK_ELEMENTS):
                torch._foreach_lerp_(
                    [self._master[j] for j in part], [params[low[j]].float() for j in part], 1.0 - decay
                )
            for e, m in zip(shadow, self._master):
                e.copy_(m)
        for e, b in zip(self.shadow.buffers(), net.buffers()):
            e.copy_(b)
        self.num_updates += 1
        self._count += 1

    def resync(self) -> None:
        """Rebuild what is kept outside the module (the host count, the fp32 copy) from the buffer and
        the shadow at the next update: after a restore by any route (a ``load_state_dict``, or
        DeepSpeed's resharding load, which copies into them directly)."""
        self._count, self._master = None, None

    def train(self, mode: bool = True) -> EMA:  # the shadow stays in eval mode (no dropout)
        super().train(mode)
        self.shadow.eval()
        return self


class EMAUpdateAfterStep:
    """LightningModule mixin: ``self.ema.update(self.net)`` right after each optimizer step.

    Not in ``on_train_batch_end``: Lightning runs the callbacks' ``on_train_batch_end`` (periodic and
    preemption checkpoints) before the module's, so a checkpoint would hold the weights after step k with
    the EMA of step k-1, and a resumed run would lose one EMA update per restart. Once per optimizer
    step also keeps the decay per step under gradient accumulation.
    """

    def on_train_start(self) -> None:  # whatever restored the checkpoint is done by now
        super().on_train_start()
        self.ema.resync()

    def optimizer_step(self, *args, **kwargs):
        result = super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)
        return result


def _resync_after_load(module: EMA, _incompatible_keys) -> None:
    """After a restore the shadow and the buffer hold the truth."""
    module.resync()


CHUNK_ELEMENTS = 1 << 26  # the low-precision path's float32 copies of the net's weights: 256 MiB at a time


def _chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive index groups of ``sizes`` whose sum stays within ``limit`` (a larger size alone)."""
    groups: list[list[int]] = []
    total = limit
    for i, n in enumerate(sizes):
        if total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the ZeRO-3 partition, the FSDP2 (DTensor) local shard, or itself."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t
