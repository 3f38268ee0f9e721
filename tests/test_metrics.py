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


class _Posed:
    """A stand-in for FrozenClip whose image and text embeddings meet at a chosen cosine."""

    def __init__(self, cosine: float):
        self.cosine = cosine
        self.tokenizer = list

    def embed(self, images, prompts):
        n = len(prompts)
        angle = torch.full((n,), float(np.arccos(self.cosine)))
        img = torch.tensor([[1.0, 0.0]]).expand(n, 2)
        txt = torch.stack([angle.cos(), angle.sin()], dim=-1)
        return {"img_emb": img, "txt_emb": txt}


@pytest.mark.parametrize("cosine, expected", [(0.3, 30.0), (-0.4, 0.0)])
def test_clip_score_of_posed_embeddings_is_100_cosine_and_never_below_0(cosine, expected):
    assert clip_score(torch.zeros(3, 3, 4, 4), ["a", "b", "c"], _Posed(cosine)) == pytest.approx(
        expected, abs=1e-4
    )


def test_retrieval_recall_counts_each_direction_from_its_own_ranking():
    from train.validation import retrieval_recall

    img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    # images: 0 -> text 0 (cosine 1 against 0.994), 1 -> text 1, 2 -> text 2: all right.
    # texts: 0 -> image 0, 1 -> image 0 (0.994 against 0.110): wrong, 2 -> image 2.
    out = retrieval_recall(img, txt, ["a", "b", "c"], ks=(1, 2))
    assert out == {"i2t_r1": 1.0, "t2i_r1": pytest.approx(2 / 3), "i2t_r2": 1.0, "t2i_r2": 1.0}
    # two pairs of one caption: image 0 is as right for text 1 as image 1 is
    assert retrieval_recall(img, txt, ["a", "a", "c"], ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}


def test_the_zero_shot_classifier_rows_are_unit_mean_prompt_embeddings():
    from train.validation import build_classifier

    table = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # the prompts' embeddings, by token

    def tokenizer(texts):
        return torch.tensor(["abc".index(t) for t in texts])

    names, rows = build_classifier(table.__getitem__, tokenizer, {"first": ["a", "b"], "second": ["c"]})
    assert names == ["first", "second"]
    # each prompt normalised, then their mean normalised: (1, 0) and (0, 1) -> (1, 1) / sqrt 2
    assert torch.allclose(rows, torch.tensor([[1.0, 1.0], [1.0, 1.0]]) / 2**0.5)
