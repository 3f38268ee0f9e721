"""Parallelism helpers that live outside the models: the nets' repeated blocks, which are the units of
FSDP sharding and of regional compilation, and ``torch.compile`` applied to them; one rank's long work
that the others wait for (:func:`on_rank_zero`); a value the ranks agree on (:func:`agree_max`). (The batch arithmetic, global batch -> per-device
batch, is data.datamodule.per_device_batch_size.)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


def world_size() -> int:
    """The default process group's size; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks in one all-reduce (as they are, in one process)."""
    if world_size() == 1:
        return [float(v) for v in values]
    totals = torch.tensor([float(v) for v in values], device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def agree_max(value: float, device: torch.device) -> float:
    """The largest of the ranks' ``value`` (this rank's alone in one process): what a callback that the
    numerics guard does not carry agrees on by itself, a small all-reduce read at once."""
    if world_size() == 1:
        return value
    flag = torch.tensor([value], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag.item())


def waiting_group(hours: float) -> Any:
    """A gloo group whose collectives wait up to ``hours`` (called by every rank, as ``new_group`` is): for
    ranks that wait on one rank's long work, which the default group's timeout (30 minutes; under NCCL
    the watchdog then aborts the job) would cut short."""
    return dist.new_group(backend="gloo", timeout=timedelta(hours=hours))


def on_rank_zero(fn: Callable[..., Any], *args: Any, group: Any = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on global rank 0 while the other ranks of ``group`` wait; its result on
    every rank. Its exception is raised on rank 0 as it is, and on the others as a SystemExit that names
    it (rather than a wait until the group's timeout). Without a process group: ``fn`` here."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return fn(*args, **kwargs)
    rank = dist.get_rank()
    outcome: list[Any] = [None]
    error = None
    if rank == 0:
        try:
            outcome = [("ok", fn(*args, **kwargs))]
        except BaseException as e:  # re-raised below, after the others are told
            outcome, error = [("error", f"{type(e).__name__}: {e}")], e
    dist.broadcast_object_list(outcome, src=0, group=group)
    if error is not None:
        raise error
    kind, value = outcome[0]
    if kind == "error":
        raise SystemExit(f"rank {rank}: rank 0 failed: {value}")
    return value


def fsdp_units(net: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a net: the entries of its outermost ``nn.ModuleList``s (transformer blocks,
    UNet blocks). They are FSDP's units (each unit's parameters are gathered together, just before it
    runs) and the regions of ``compile=regional``."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                units.extend(m for m in child if any(True for _ in m.parameters()))
            else:
                visit(child)

    visit(net)
    return units


def compile_mode(value: str | bool | None) -> str:
    """``trainer.compile``: false/null/none, true/full or regional -> "none", "full" or "regional"."""
    if value in (None, False, "none", "false"):
        return "none"
    if value in (True, "full", "true"):
        return "full"
    if value == "regional":
        return "regional"
    raise ValueError(
        f"trainer.compile={value!r}: expected false, true (the whole net) or regional (per block)"
    )


def compile_net(net: nn.Module, mode: str | bool | None, backend: str = "inductor") -> list[nn.Module]:
    """``torch.compile`` a net in place, keeping its state-dict keys (checkpoints load either way).

    ``full``: the whole forward, one graph (fastest steady state; a first step of minutes at paper
    size). ``regional``: each block of :func:`fsdp_units` on its own; blocks of one shape share the
    compiled code, so the first step compiles a handful of graphs (under a minute) and the glue between
    blocks runs eagerly. Apply after FSDP sharding (the blocks are then the FSDP units). Returns the
    compiled modules.

    Training (gradients on) compiles for its exact shapes: one graph per block shape, built at the first
    step and reused by every later one. Evaluation (gradients off: validation, its last smaller batch,
    zero-shot prompts) compiles with dynamic shapes, one graph per block shape for every batch size but 1
    (which dynamo specialises). Static shapes throughout gave each evaluation batch size its own graph, and
    dynamo's recompile limit (8 per code object) was reached in the tiny CLIP's first validation: the rest
    ran eagerly.
    """
    import torch._dynamo.config

    mode = compile_mode(mode)
    if mode == "none":
        return []
    targets = [net] if mode == "full" else fsdp_units(net)
    # One code object (Block.forward) serves every block: each distinct block (its weights' shapes, and
    # which train: a locked tower's frozen blocks are graphs of their own) is one more compiled entry of it
    # in each mode: training, a no-grad pass in training (module.accum_freq's), evaluation, and a batch of
    # one (dynamic shapes still specialise size 1). A paper UNet has ~20 distinct blocks. Past the limit
    # dynamo would fall back to eager for the rest without an error. (ZeRO-3 empties a weight outside
    # forward: its shape is ds_shape.)
    kinds = {
        tuple((tuple(getattr(p, "ds_shape", p.shape)), p.requires_grad) for p in m.parameters())
        for m in targets
    }
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(kinds) + 8)
    for module in targets:
        _compile_by_grad_mode(module, backend)
    return targets


def _compile_by_grad_mode(module: nn.Module, backend: str) -> None:
    """``module.compile`` (its ``__call__``, hooks included), static shapes with gradients on and dynamic
    shapes without."""
    static = torch.compile(module._call_impl, backend=backend, dynamic=False)
    dynamic = torch.compile(module._call_impl, backend=backend, dynamic=True)

    def call(*args, **kwargs):
        return (static if torch.is_grad_enabled() else dynamic)(*args, **kwargs)

    module._compiled_call_impl = call
