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
        self._plan: _Plan | None = None  # where the net's and the shadow's parameters are, built once
        self.register_load_state_dict_post_hook(_resync_after_load)

    def current_decay(self) -> float:
        if self._count is None:  # restored: read the buffer once
            self._count = int(self.num_updates)
        n = self._count
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        decay = self.current_decay()
        if self._plan is None or self._plan.net is not net:
            self._plan = _Plan(net, self.shadow)
        plan = self._plan
        ema_params, params = plan.local(plan.shadow_slots), plan.local(plan.net_slots)
        low, high = plan.low, plan.high
        if high:
            sources = [params[i] for i in high]
            if plan.cast:  # a net in another dtype than its fp32 copy
                sources = [p.to(ema_params[i].dtype) for i, p in zip(high, sources)]
            torch._foreach_lerp_([ema_params[i] for i in high], sources, 1.0 - decay)
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
            for part in plan.chunks:
                torch._foreach_lerp_(
                    [self._master[j] for j in part], [params[low[j]].float() for j in part], 1.0 - decay
                )
            torch._foreach_copy_(shadow, self._master)
        if plan.buffers:
            torch._foreach_copy_(plan.get(plan.buffers, 0), plan.get(plan.buffers, 1))
        self.num_updates += 1
        self._count += 1

    def resync(self) -> None:
        """Rebuild what is kept outside the module (the host count, the fp32 copy) from the buffer and
        the shadow at the next update: after a restore by any route (a ``load_state_dict``, or
        DeepSpeed's resharding load, which copies into them directly)."""
        self._count, self._master, self._plan = None, None, None

    def train(self, mode: bool = True) -> EMA:  # the shadow stays in eval mode (no dropout)
        super().train(mode)
        self.shadow.eval()
        return self


class EMAUpdateAfterStep:
    """LightningModule mixin: ``self.ema.update(self.net)`` right after each optimizer step.

    Not in ``on_train_batch_end``: Lightning runs the callbacks' ``on_train_batch_end`` (periodic and
    preemption checkpoints) before the module's, so a checkpoint would hold the weights after step k with
    the EMA of step k-1, and a resumed run would lose one EMA update per restart. Once per optimizer
    step also keeps the decay per step under gradient accumulation: DeepSpeed accumulates itself, and
    Lightning calls ``optimizer_step`` for each of its micro-batches, while the weights change at the
    last only (an update per micro-batch made the EMA's window k times shorter).
    """

    def on_train_start(self) -> None:  # whatever restored the checkpoint is done by now
        super().on_train_start()
        self.ema.resync()

    def optimizer_step(self, *args, **kwargs):
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)  # (None: not DeepSpeed)
        steps = engine is None or engine.is_gradient_accumulation_boundary()  # asked before its step
        result = super().optimizer_step(*args, **kwargs)
        if steps:
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


class _Plan:
    """Where the net's and the shadow's parameters live (module, name), and which of them average in an
    fp32 copy: what an update needs, found once (walking ``parameters()`` at every step cost more host
    time than the update's kernels for a net of a thousand tensors). The parameters themselves are read
    from their modules at every update, so a strategy that swaps a module's parameter objects (FSDP2
    between its sharded and gathered forms) is followed. Rebuilt after a restore (``EMA.resync``)."""

    def __init__(self, net: nn.Module, shadow: nn.Module) -> None:
        self.net = net
        self.net_slots, self.shadow_slots = _slots(net), _slots(shadow)
        params, ema_params = self.local(self.net_slots), self.local(self.shadow_slots)
        if len(params) != len(ema_params):
            raise RuntimeError(f"EMA: the net has {len(params)} weights, its EMA copy {len(ema_params)}")
        for p, e in zip(params, ema_params):
            if p.shape != e.shape:
                raise RuntimeError(
                    f"EMA: a weight's local shard is {tuple(p.shape)} in the net but {tuple(e.shape)} in the EMA "
                    "copy; the two must be sharded identically (shard ema.shadow like net)"
                )
        self.low = [i for i, e in enumerate(ema_params) if e.dtype in (torch.bfloat16, torch.float16)]
        self.high = sorted(set(range(len(ema_params))) - set(self.low))
        self.cast = any(params[i].dtype != ema_params[i].dtype for i in self.high)
        self.chunks = _chunks([params[i].numel() for i in self.low], CHUNK_ELEMENTS)
        # buffers (normalisation statistics) are copied as they are: (shadow slot, net slot) pairs
        self.buffers = list(zip(_slots(shadow, "_buffers"), _slots(net, "_buffers")))

    @staticmethod
    def local(slots: list[tuple[nn.Module, str]]) -> list[torch.Tensor]:
        """This rank's part of each parameter (an update runs under no_grad: no detach needed)."""
        return [local_shard(module._parameters[name]) for module, name in slots]

    @staticmethod
    def get(pairs: list, side: int) -> list[torch.Tensor]:
        return [pair[side][0]._buffers[pair[side][1]] for pair in pairs]


def _slots(module: nn.Module, kind: str = "_parameters") -> list[tuple[nn.Module, str]]:
    """(submodule, name) of each parameter (``kind="_buffers"``: buffer) of ``module``, in
    ``parameters()`` (``buffers()``) order, shared ones once."""
    seen, slots = set(), []
    for sub in module.modules():
        for name, t in getattr(sub, kind).items():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                slots.append((sub, name))
    return slots


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the ZeRO-3 partition, the FSDP2 (DTensor) local shard, or itself."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t
