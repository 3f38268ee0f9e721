"""Dominant colour of an image of the synthetic shapes, scored by program.

Object pixels are the saturated ones (the background is grey, every palette colour is saturated);
each is assigned to the nearest palette colour (data/synthetic.py COLOURS) and the most frequent one
wins. Used to check that the decoder reproduces the colour content of the image embedding it is given.
"""

from __future__ import annotations

import torch

from data.synthetic import COLOURS

PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (8, 3)
NAMES = list(COLOURS)


def dominant_colours(images: torch.Tensor, min_saturation: float = 60.0, min_fraction: float = 0.01) -> list:
    """uint8 (B, 3, H, W) -> per image the dominant palette colour name, or None when fewer than
    ``min_fraction`` of the pixels are saturated (no object drawn)."""
    x = images.float().flatten(2).transpose(1, 2)  # (B, HW, 3)
    saturation = x.max(-1).values - x.min(-1).values  # (B, HW)
    nearest = torch.cdist(x, PALETTE.to(x.device)[None].expand(x.shape[0], -1, -1)).argmin(-1)  # (B, HW)
    out = []
    for i in range(x.shape[0]):
        keep = saturation[i] > min_saturation
        if keep.float().mean() < min_fraction:
            out.append(None)
            continue
        out.append(NAMES[int(torch.bincount(nearest[i][keep], minlength=len(NAMES)).argmax())])
    return out


def colour_match(generated: torch.Tensor, source: torch.Tensor) -> float:
    """Fraction of pairs whose dominant colours agree (chance: about 1/8)."""
    a, b = dominant_colours(generated), dominant_colours(source)
    return sum(x is not None and x == y for x, y in zip(a, b)) / max(1, len(a))
