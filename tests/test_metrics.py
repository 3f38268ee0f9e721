"""FID (CLIP features or a TorchScript Inception from a path) and CLIP score (eval/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.synthetic import caption_for, make_scene, render
from eval.metrics import clip_score, fid
from train.frozen_clip import FrozenClip


def _renders(seed: int, n: int) -> torch.Tensor:
    return torch.stack(
        [
            torch.from_numpy(np.asarray(render(make_scene(seed, i), 64)).copy()).permute(2, 0, 1)
            for i in range(n)
        ]
    )


@pytest.fixture(scope="module")
def clip(clip_run):
    return FrozenClip(clip_run[0])


def test_clip_fid_separates_distributions(clip):
    a, b = _renders(5, 64), _renders(6, 64)
    noise = torch.randint(
        0, 256, (64, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    assert abs(fid(a, a, clip=clip)) < 1e-6
    same, different = fid(a, b, clip=clip), fid(a, noise, clip=clip)
    assert 0 < same < different / 5, (same, different)
    assert fid(a, b[:, :, ::2, ::2], clip=clip) > 0  # another size is resized to the CLIP's input


class _FakeInception(torch.nn.Module):
    """The calling convention of the FID Inception TorchScript file: float [0, 255] -> (B, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3)) / 255.0)


def test_inception_from_a_torchscript_path(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    a, b = _renders(5, 32), _renders(6, 32)
    red = torch.zeros_like(a)
    red[:, 0] = 230
    value = fid(a, b, features="inception", inception_path=path)
    assert 0 <= value < fid(a, red, features="inception", inception_path=path)
    with pytest.raises(FileNotFoundError, match="missing.pt: no such file"):
        fid(a, b, features="inception", inception_path=tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.pt: not a TorchScript model"):
        fid(a, b, features="inception", inception_path=tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="expected 'clip' or 'inception'"):
        fid(a, b, features="vgg")
    with pytest.raises(ValueError, match="at least 2 images"):
        fid(a[:1], b, features="inception", inception_path=path)


def test_clip_score_is_the_scaled_cosine(clip):
    images = _renders(5, 8)
    prompts = [caption_for(make_scene(5, i), 5, i) for i in range(8)]
    emb = clip.embed(images, clip.tokenizer(prompts))
    cosines = (emb["img_emb"] * emb["txt_emb"]).sum(-1)
    expected = max(100 * cosines.mean().item(), 0.0)  # torchmetrics': the mean clamped, not each cosine
    assert clip_score(images, prompts, clip, batch_size=3) == pytest.approx(
        expected, rel=1e-3
    )  # batching: float16 rounding
    swapped = prompts[1:] + prompts[:1]  # most pairs mismatched: some cosines below 0
    cosines = (emb["img_emb"] * clip.embed(images, clip.tokenizer(swapped))["txt_emb"]).sum(-1)
    assert clip_score(images, swapped, clip) == pytest.approx(max(100 * cosines.mean().item(), 0.0), abs=0.05)
    with pytest.raises(ValueError, match="8 images for 7 prompts"):
        clip_score(images, prompts[:7], clip)
