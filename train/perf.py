"""Model FLOPs, device peaks and the measured matmul ceiling: what MFU is computed from, in training
(train/callbacks/data_stats.py, ``perf/mfu``) and in the benchmark (eval/bench_train.py) alike.

MFU counts the *model's* FLOPs: one forward and one backward. Activation checkpointing runs parts of the
forward a second time inside the backward; that recompute is work the hardware does, not work the
model needs, so :class:`ModelFlopCounter` leaves it out (as the PaLM paper's MFU does).
"""

from __future__ import annotations

import contextlib
import os
import re
import time

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's


# Dense peak TFLOP/s per GPU: (bf16/fp16, tf32) by model name (datasheets, without sparsity), and the
# variants whose name adds a word to the model's.
PEAK_TFLOPS = {
    "H200": (989.0, 494.0),
    "H100": (989.0, 494.0),  # SXM
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L40": (181.0, 90.5),
    "A10G": (70.0, 35.0),
    "L4": (121.0, 60.0),
}
PEAK_VARIANTS = {("H100", "PCIe"): (756.0, 378.0), ("H100", "NVL"): (835.0, 418.0)}


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that is not known."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def peak_tflops(precision: str, device_name: str | None = None) -> float | None:
    """The CUDA device's datasheet dense peak for ``precision`` (None on CPU or for unknown devices).
    The name's words are matched whole ("NVIDIA L40" took the L4's figure, a substring of it)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    words = set(re.split(r"[\s_-]+", device_name))
    model = next((m for m in PEAK_TFLOPS if m in words), None)
    if model is None:
        return None
    half, tf32 = next(
        (v for (m, w), v in PEAK_VARIANTS.items() if m == model and w in words), PEAK_TFLOPS[model]
    )
    return half if "16" in str(precision) else tf32


_outside_model_flops = 0


@contextlib.contextmanager
def not_model_flops():
    """Work a step does on top of the model's forward and backward, which :class:`ModelFlopCounter` leaves
    out as it leaves out checkpointing's recompute: the CLIP's no-grad pass over every chunk under
    ``module.accum_freq`` (train/modules/clip.py), so that MFU stays model FLOPs per second."""
    global _outside_model_flops
    _outside_model_flops += 1
    try:
        yield
    finally:
        _outside_model_flops -= 1


def in_recompute() -> bool:
    """True while autograd's engine runs a checkpointed region's forward again: ops dispatched inside a
    backward pass with grad mode on (a plain backward runs with grad mode off; we never use create_graph)."""
    return torch._C._current_graph_task_id() != -1 and torch.is_grad_enabled()


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)  # q @ k^T and weights @ v


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * flop_counter.sdpa_flop_count(query, key, value)  # two matmuls back through each forward one


_aten = torch.ops.aten
# Attention counts the same on every SDPA kernel: the forward's two matmuls and the backward's four, as the
# math path runs them. torch's counter does not know the CPU's flash kernel (it counted nothing there), and
# counts five matmuls in the fused GPU kernels' backward: the fifth computes the scores again, recompute
# like activation checkpointing's, which model FLOPs leave out.
_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
    _aten._scaled_dot_product_flash_attention_backward: _attention_backward_flops,
    _aten._scaled_dot_product_efficient_attention_backward: _attention_backward_flops,
    _aten._scaled_dot_product_cudnn_attention_backward: _attention_backward_flops,
}


class ModelFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that does not count activation-checkpoint recompute (see the module docstring):
    a step with ``grad_checkpointing`` counts exactly the FLOPs of the same step without it, and attention
    counts the same on every kernel (:data:`_ATTENTION`)."""

    def __init__(self, custom_mapping: dict | None = None, **kwargs) -> None:
        super().__init__(custom_mapping={**_ATTENTION, **(custom_mapping or {})}, **kwargs)

    def _count_flops(self, func_packet, out, args, kwargs):
        if in_recompute() or _outside_model_flops:
            return out
        return super()._count_flops(func_packet, out, args, kwargs)


def set_matmul_precision(precision: str) -> None:
    """``torch.set_float32_matmul_precision`` on a CUDA machine: ``high`` lets the fp32 matmuls outside
    bf16 autocast's reach (regions that turn it off, code outside the training step) run on TF32 tensor
    cores, as convolutions already do by torch's default. Without CUDA nothing changes, so CPU numerics
    stay exact.
    torch's per-backend setting (``torch.backends.cuda.matmul.fp32_precision``) is not used: mixed with
    this one, Lightning's own check of the precision raises."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"float32 matmul precision {precision!r}: expected one of {MATMUL_PRECISIONS}")
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(precision)


@contextlib.contextmanager
def matmul_precision(device: torch.device, precision: str = "high"):
    """``precision`` for fp32 matmuls on ``device`` while inside, then the process's setting again (CPU: a
    no-op). For code whose numbers must not depend on the calling process's setting."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None, iters: int = 20) -> float:
    """Measured dense matmul TFLOP/s of ``device`` at ``dtype``: the fastest of ``iters`` (n x n) @ (n x n)
    products (n: 8192 on a GPU, 1024 on a CPU). MFU divides by this rather than a datasheet figure that
    the card may never reach (clocks, power limits). The fastest, not the median: a ceiling, which a
    moment of contention for the CPU's cores (another process) would lower and so inflate every MFU."""
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = []
    for i in range(iters + 3):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        if i >= 3:  # warm-up: kernel selection, clocks
            times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e12
