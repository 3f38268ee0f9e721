"""Image tensors between the data and the nets: uint8 <-> [-1, 1] at a size, and labelled grids as PNG.

Used by the stages (training targets, validation grids), the cascade and eval/ alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


def to_unit_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in [-1, 1] (bicubic, antialiased when shrinking)."""
    if images.dtype != torch.uint8:  # float images were scaled a second time (to about -1: black)
        raise TypeError(
            f"expected uint8 images (0-255), got {images.dtype}: data.normalize=none for this stage"
        )
    x = images.float() / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (clamped) -> uint8 in [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(rows: list[torch.Tensor], path: Path, scale: int = 1) -> Path:
    """Rows of uint8 (N, 3, H, W) images (same N, H, W) -> one PNG, 2 px gaps."""
    n, _, h, w = rows[0].shape
    gap = 2
    grid = torch.full((3, len(rows) * (h + gap) - gap, n * (w + gap) - gap), 255, dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c in range(n):
            grid[:, r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = row[c].cpu()
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
