"""Image transforms with PIL + torch (no torchvision: it does not work with the CPU torch build here).

Workers produce uint8 tensors (4x less inter-process traffic than float32); normalisation runs on the
training device, batched, in the DataModule's ``on_after_batch_transfer`` (see :class:`Normalize`).
Random crops draw their offsets from a generator the caller seeds per sample, so a sample gets the
same crop whatever the number of ranks or workers, and after a resume.
"""

from __future__ import annotations

import io
import random
from enum import Enum

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP's statistics (what open_clip checkpoints expect).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Crop(str, Enum):
    RANDOM = "random"
    CENTER = "center"


MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a header claiming more is refused before decoding (decompression bombs)


class ImageTooLarge(ValueError):
    pass


def decode_image(data: bytes, min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes to an RGB PIL image; returns it and the stored (width, height).

    Transparent pixels are matted onto white (what img2dataset writes for such images); 16-bit grey is
    scaled to 8 bits. EXIF orientation is not applied, as neither img2dataset nor open_clip applies it.

    Raises on undecodable data, and ``ImageTooLarge`` when the header claims more than
    ``MAX_IMAGE_PIXELS`` (checked before any pixel is decoded; PIL's own guard only warns below 2x its limit).

    ``min_side``: for JPEG, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) as long as the
    shorter side stays >= min_side: a large speed-up when shards hold images much bigger than the
    training resolution.
    """
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own limit (2x its MAX_IMAGE_PIXELS)
        raise ImageTooLarge(str(e)) from e
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"{w}x{h} pixels > {MAX_IMAGE_PIXELS}")
    if min_side is not None and img.format == "JPEG":
        scale = min_side / min(w, h)
        if scale < 1:
            img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
    img.load()  # force the decode here so corrupt data raises inside the caller's try
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey (PNG): PIL's convert clips it to white
        img = Image.fromarray(
            (np.asarray(img, dtype=np.float64).clip(0, 65535) / 257).round().astype(np.uint8)
        )
    elif img.mode == "F":
        raise ValueError("floating-point pixels (mode F): no known range to map to 8 bits")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        # matted onto white, as img2dataset does when it writes shards: PIL's convert("RGB") drops alpha
        # and keeps whatever colour the transparent pixels hold (mostly black), so a logo on a transparent
        # background would train as a different image than the same file downloaded by img2dataset
        matte = Image.new("RGBA", img.size, (255, 255, 255, 255))
        matte.alpha_composite(img.convert("RGBA"))
        img = matte
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, (w, h)


def resize_crop(
    img: Image.Image,
    size: int,
    crop_size: int | None = None,
    *,
    crop: Crop = Crop.CENTER,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic) and crop ``crop_size`` (default ``size``) square.

    Only the kept square is resampled (PIL's ``resize(box=...)`` over the source region it comes from),
    not the whole image and then a crop of it: the same pixels (at most 1 of 255 apart, from rounding),
    20-30% less resampling time for a 4:3 photo. Returns a uint8 tensor (3, crop_size, crop_size).
    """
    crop_size = crop_size or size
    if crop_size > size:
        raise ValueError(f"crop_size {crop_size} is larger than the resize target {size}")
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if crop == Crop.RANDOM:
        if rng is None:
            raise ValueError("random crop needs a seeded rng")
        left, top = rng.randint(0, new_w - crop_size), rng.randint(0, new_h - crop_size)
    else:
        left, top = (new_w - crop_size) // 2, (new_h - crop_size) // 2
    if (new_w, new_h) != (w, h):  # resample the source region of the crop, at the full resize's scale
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + crop_size) * sx, (top + crop_size) * sy)
        gap = None if scale > 0.5 else 3.0
        img = img.resize((crop_size, crop_size), Image.BICUBIC, box=box, reducing_gap=gap)
    elif (left, top, crop_size, crop_size) != (0, 0, w, h):
        img = img.crop((left, top, left + crop_size, top + crop_size))
    array = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)


class Normalize:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W), applied on the device.

    ``kind``: "clip" (OpenAI mean/std, for CLIP), "minus_one_one" (diffusion models), "unit" ([0, 1]).
    """

    KINDS = ("clip", "minus_one_one", "unit")

    def __init__(self, kind: str = "clip") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"data.normalize={kind!r}: expected one of {self.KINDS}")
        self.kind = kind
        if kind == "clip":
            self.mean, self.std = torch.tensor(CLIP_MEAN) * 255, torch.tensor(CLIP_STD) * 255
        elif kind == "minus_one_one":
            self.mean, self.std = torch.full((3,), 127.5), torch.full((3,), 127.5)
        else:
            self.mean, self.std = torch.zeros(3), torch.full((3,), 255.0)
        self._on_device: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (1, 3, 1, 1) on ``device``, copied there once: a copy from host memory at every
        batch would block the host until the GPU has caught up (twice a step)."""
        key = (device, dtype)
        if key not in self._on_device:
            self._on_device[key] = tuple(t.to(device, dtype).view(1, 3, 1, 1) for t in (self.mean, self.std))
        return self._on_device[key]

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mean, std = self._constants(images.device, dtype)
        return (images.to(dtype) - mean) / std

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """float normalised -> uint8, for saving sample grids."""
        mean, std = self._constants(images.device, torch.float32)
        return (images.float() * std + mean).round().clamp(0, 255).to(torch.uint8)
