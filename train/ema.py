"""Exponential moving average of a net's weights (the prior, decoder and upsamplers evaluate and export it).

``EMA`` is an ``nn.Module`` holding a frozen copy (``shadow``) of the net, so it is saved in and restored
from Lightning checkpoints with the rest of the module (exact resume) and moves with it between devices.
Its parameters never require grad, so DDP and the optimizer ignore them.

Decay warm-up: the effective decay at update n is min(decay, (1 + n) / (10 + n)), so early, random
weights are forgotten quickly (a 0.9999 average would otherwise remember them for ~10^4 steps).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA(nn.Module):
    def __init__(self, net: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay}: expected 0 <= decay < 1")
        self.decay, self.warmup = decay, warmup
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.shadow.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(net.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for e, b in zip(self.shadow.buffers(), net.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:  # the shadow stays in eval mode (no dropout)
        super().train(mode)
        self.shadow.eval()
        return self
