"""clip-retrieval embedding layout: aligned rows, each once per epoch over ranks and workers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.embeddings import ClipRetrievalDataset

ROWS = [5, 7, 4]


@pytest.fixture
def layout(tmp_path):
    for d in ("img_emb", "text_emb", "metadata"):
        (tmp_path / d).mkdir()
    for part, n in enumerate(ROWS):
        ids = np.arange(n) + 100 * part
        img = np.zeros((n, 8), np.float16)
        img[:, 0] = ids  # small integers are exact in float16: the row identity
        np.save(tmp_path / "img_emb" / f"img_emb_{part}.npy", img)
        np.save(tmp_path / "text_emb" / f"text_emb_{part}.npy", -img)
        pq.write_table(
            pa.table({"caption": [f"row {i}" for i in ids], "url": ["u"] * n}),
            tmp_path / "metadata" / f"metadata_{part}.parquet",
        )
    return tmp_path


@pytest.mark.parametrize("workers", [0, 2])
def test_rows_stay_aligned_and_each_is_seen_once_across_ranks(layout, workers):
    seen = []
    for rank in range(2):
        ds = ClipRetrievalDataset(layout, batch_size=3, seed=1)
        ds.rank, ds.world_size = rank, 2
        for batch in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers):
            ids = batch["img_emb.npy"][:, 0].long().tolist()
            assert batch["caption"] == [f"row {i}" for i in ids]
            assert torch.equal(batch["txt_emb.npy"], -batch["img_emb.npy"])
            seen += ids
    assert sorted(seen) == sorted(i + 100 * p for p, n in enumerate(ROWS) for i in range(n))


def test_shuffle_is_seeded_per_epoch(layout):
    def order(seed, epoch):
        ds = ClipRetrievalDataset(layout, batch_size=2, seed=seed)
        ds.epoch = epoch
        return [k for b in ds for k in b["__key__"]]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)


def test_missing_or_misaligned_parts_fail_clearly(layout):
    (layout / "text_emb" / "text_emb_1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"text_emb_1.npy: missing"):
        ClipRetrievalDataset(layout, batch_size=2)
    np.save(layout / "text_emb" / "text_emb_1.npy", np.zeros((3, 8), np.float16))
    with pytest.raises(ValueError, match="rows not aligned"):
        list(ClipRetrievalDataset(layout, batch_size=2, shuffle=False))
    with pytest.raises(FileNotFoundError, match="no img_emb/ directory"):
        ClipRetrievalDataset(layout / "nothing", batch_size=2)
