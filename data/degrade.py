"""Corruptions of the upsamplers' low-resolution conditioning image (DALL-E 2 appendix C).

At sampling time the upsamplers see the previous stage's output, not a clean downsample, so during
training the conditioning image is corrupted: a light gaussian blur for 64->256 (kernel 3, sigma 0.6)
and a BSR-style random degradation for 256->1024 (Zhang et al. 2021, simplified): random isotropic or
anisotropic gaussian blur, downsampling with a random interpolation mode, gaussian noise, and JPEG
compression, in random order of blur/noise. All functions take and return float (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import math
import random

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


# JPEG's example quantization tables (ITU-T T.81, Annex K.1 and K.2), in row-major order, which libjpeg
# scales by the quality setting
_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
_CHROMA = (17, 18, 24, 47, *[99] * 4, 18, 21, 26, 66, *[99] * 4, 24, 26, 56, *[99] * 5, 47, 66, *[99] * 38)
_TABLES: dict[torch.device, torch.Tensor] = {}  # (2, 8, 8) per device: copied there once
_DCT: dict[torch.device, torch.Tensor] = {}


def _dct_matrix(device) -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix D (coefficients of a block b: D b D^T), made on ``device``
    once, in float64: the stages set TF32 for fp32 matmuls on GPUs, whose rounding moved 5-8% of the
    pixels by up to 19 levels (the quantisation's roundings flip), and float64 matmuls never use it."""
    if device not in _DCT:
        n = torch.arange(8, dtype=torch.float64, device=device)
        d = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
        d[0] /= math.sqrt(2)
        _DCT[device] = d
    return _DCT[device]


def _quantisation(quality: int, device) -> torch.Tensor:
    """libjpeg's luminance and chrominance tables at ``quality`` (1-100), (2, 8, 8) on ``device``."""
    if device not in _TABLES:
        _TABLES[device] = torch.tensor([_LUMA, _CHROMA], dtype=torch.float32).view(2, 8, 8).to(device)
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality  # libjpeg's integer division
    return torch.floor((_TABLES[device] * scale + 50) / 100).clamp(1, 255)


def _blocks(plane: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` applied to every 8x8 block of (B, H, W) planes (H, W multiples of 8), as (..., 8, 8)."""
    b, h, w = plane.shape
    blocks = plane.view(b, h // 8, 8, w // 8, 8).transpose(2, 3)
    return fn(blocks).transpose(2, 3).reshape(b, h, w)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Every image of ``x`` through JPEG's lossy steps at ``quality``, as libjpeg's baseline encoder (what
    PIL saves with) and decoder take them: 8-bit pixels to YCbCr, chroma averaged over 2x2 (4:2:0), the
    8x8 DCT of each plane quantised with the quality-scaled tables, then back (chroma upsampled by the
    triangle filter, as libjpeg's). The entropy coding in between is lossless, so it is left out. On the
    tensor's device, with no host copy: PIL's round trip cost a transfer each way and the CPU's time at
    every step of the 256 -> 1024 upsampler. 40-45 dB from PIL's output (1-2 of 255 RMS) and as lossy
    (tests/test_upsampler.py)."""
    b, _, h, w = x.shape
    rgb = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    r, g, bl = rgb.unbind(1)
    planes = [
        0.299 * r + 0.587 * g + 0.114 * bl,
        -0.168736 * r - 0.331264 * g + 0.5 * bl + 128,
        0.5 * r - 0.418688 * g - 0.081312 * bl + 128,
    ]
    ph, pw = -h % 16, -w % 16  # whole 16 x 16 units, the edge pixels repeated (as libjpeg pads)
    ycc = F.pad(torch.stack(planes, 1).round(), (0, pw, 0, ph), mode="replicate")
    luma, chroma = ycc[:, :1], F.avg_pool2d(ycc[:, 1:], 2).round()
    d, q = _dct_matrix(x.device), _quantisation(quality, x.device)

    def lossy(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        def code(block: torch.Tensor) -> torch.Tensor:
            coeffs = d @ (block.double() - 128) @ d.T
            return (d.T @ (torch.round(coeffs / table) * table) @ d + 128).float()

        return _blocks(plane, code).round().clamp(0, 255)

    luma = lossy(luma.flatten(0, 1), q[0]).view(b, 1, h + ph, w + pw)
    chroma = lossy(chroma.flatten(0, 1), q[1]).view(b, 2, (h + ph) // 2, (w + pw) // 2)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    y, cb, cr = torch.cat([luma, chroma], 1)[..., :h, :w].unbind(1)
    cb, cr = cb - 128, cr - 128
    out = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (out.round().clamp(0, 255) / 127.5 - 1).to(x.dtype)


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
    if rng.random() < 0.8:  # drawn on the device (a CPU draw copied over made the host wait for the GPU)
        gen = torch.Generator(device=x.device).manual_seed(rng.getrandbits(31))
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x = x + noise * (rng.uniform(1, 25) / 127.5)
    x = x.clamp(-1, 1)
    if rng.random() < 0.75:
        x = jpeg(x, rng.randint(30, 95))
    return x
