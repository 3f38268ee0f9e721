"""Corruptions of the upsamplers' low-resolution conditioning image (DALL-E 2 appendix C).

At sampling time the upsamplers see the previous stage's output, not a clean downsample, so during
training the conditioning image is corrupted: a light gaussian blur for 64->256 (kernel 3, sigma 0.6)
and a BSR-style random degradation for 256->1024 (Zhang et al. 2021, simplified): random isotropic or
anisotropic gaussian blur, downsampling with a random interpolation mode, gaussian noise, and JPEG
compression, in random order of blur/noise. All functions take and return float (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, angle: float = 0.0, device=None
) -> torch.Tensor:
    """A normalised (size, size) gaussian kernel, anisotropic when sigma_y differs (rotated by ``angle``).
    Made on ``device``: a kernel copied there from host memory would make the host wait for the GPU at
    every training step of an upsampler."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    r = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise convolution with reflect padding (the image size is kept)."""
    k = kernel.to(x.device, x.dtype)[None, None].expand(x.shape[1], 1, -1, -1)
    pad = kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), k, groups=x.shape[1])


def resize(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)
    if mode == "area":
        return F.interpolate(x, size=(size, size), mode="area")
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    raise ValueError(f"resize mode={mode!r}: expected bilinear, bicubic, area or nearest")


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip every image through JPEG at ``quality`` (PIL, on the CPU)."""
    from PIL import Image

    out = []
    for img in ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu():
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=int(quality))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        out.append(torch.from_numpy(dec.copy()).permute(2, 0, 1))
    return (torch.stack(out).to(x.device, x.dtype) / 127.5 - 1).clamp(-1, 1)


def light_blur(x: torch.Tensor, size: int = 3, sigma: float = 0.6) -> torch.Tensor:
    """The 64->256 corruption: gaussian blur, kernel 3, sigma 0.6 (applied to the low-res image)."""
    return blur(x, gaussian_kernel(size, sigma, device=x.device))


def bsr_degrade(x: torch.Tensor, out_size: int, rng: random.Random) -> torch.Tensor:
    """The 256->1024 corruption. ``x``: the clean image at full size -> (B, 3, out_size, out_size).

    One random chain per call (shared by the batch; batches differ): random gaussian blur (p=0.9,
    kernel 3/5/7, sigma 0.2-2, isotropic or anisotropic and rotated), downsampling with a random mode
    (bilinear, bicubic, area), gaussian noise (p=0.8, sigma 1-25 of 255), JPEG (p=0.75, quality 30-95).
    """
    if rng.random() < 0.9:
        size = rng.choice([3, 5, 7])
        sx = rng.uniform(0.2, 2.0)
        sy = sx if rng.random() < 0.5 else rng.uniform(0.2, 2.0)
        x = blur(x, gaussian_kernel(size, sx, sy, rng.uniform(0, math.pi), device=x.device))
    x = resize(x, out_size, rng.choice(["bilinear", "bicubic", "area"]))
    if rng.random() < 0.8:
        gen = torch.Generator().manual_seed(rng.getrandbits(31))
        x = x + torch.randn(x.shape, generator=gen).to(x.device, x.dtype) * (rng.uniform(1, 25) / 127.5)
    x = x.clamp(-1, 1)
    if rng.random() < 0.75:
        x = jpeg(x, rng.randint(30, 95))
    return x
