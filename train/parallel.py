"""Parallelism arithmetic and helpers that live outside the models.

Configs state the *global* batch (samples per optimizer step over all ranks). The per-device batch
is derived from the world size and gradient accumulation, so a config means the same optimisation
on 1 GPU or 512.
"""

from __future__ import annotations


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """global = per_device x world_size x accumulation; error if it does not divide."""
    if global_batch_size < 1 or world_size < 1 or accumulate_grad_batches < 1:
        raise ValueError(
            f"data.global_batch_size={global_batch_size}, world size {world_size}, "
            f"trainer.accumulate_grad_batches={accumulate_grad_batches}: all must be >= 1"
        )
    per_step = world_size * accumulate_grad_batches
    if global_batch_size % per_step:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by world size {world_size} x "
            f"trainer.accumulate_grad_batches={accumulate_grad_batches} = {per_step}; choose a global batch "
            f"that is a multiple of {per_step}"
        )
    return global_batch_size // per_step
