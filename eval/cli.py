"""Argument types shared by the command-line tools: a value out of range is argparse's usage error naming
the option (``argument --n: expected an integer >= 1, got 0``), not an error deep inside the sampler."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type``: ``kind(text)``, refused below ``low``."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what} >= {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # (argparse names the type in its own messages)
    return parse


def device(text: str) -> str:
    """An argparse ``type`` for ``--device``: a device torch knows (cpu, cuda, cuda:N, ...)."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a torch device (cpu, cuda, cuda:N), got {text!r}"
        ) from None
    return text


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
