"""Precomputed CLIP embeddings in clip-retrieval's layout (e.g. the released LAION embeddings).

    DIR/img_emb/img_emb_0000.npy          (N_0, D) float16, L2-normalised
    DIR/text_emb/text_emb_0000.npy        (N_0, D) float16, L2-normalised
    DIR/metadata/metadata_0000.parquet    N_0 rows: caption (and url, key, ...), aligned with the arrays

:class:`ClipRetrievalDataset` streams them in the same batch format as embedding shards written by
``python -m data.embed`` (``img_emb.npy``, ``txt_emb.npy``, ``caption``, ``__key__``), so the prior and
decoder read either. Parts are split over ranks and loader workers (each part once per epoch);
within a part, rows are shuffled with a seed from (seed, epoch, part). Arrays are memory-mapped.
Reading the parquet metadata needs pyarrow (``pip install "unclip-train[laion]"``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

_PART = re.compile(r"img_emb_(\d+)\.npy$")


def find_parts(root: str | Path) -> list[tuple[Path, Path, Path]]:
    """(img_emb, text_emb, metadata) paths of every part, in part order; clear errors for gaps."""
    root = Path(root)
    img_dir = root / "img_emb"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{root}: no img_emb/ directory (expected clip-retrieval's layout)")
    parts = []
    for path in sorted(img_dir.glob("img_emb_*.npy")):
        match = _PART.search(path.name)
        if not match:
            continue
        index = match.group(1)
        txt = root / "text_emb" / f"text_emb_{index}.npy"
        meta = root / "metadata" / f"metadata_{index}.parquet"
        for needed in (txt, meta):
            if not needed.exists():
                raise FileNotFoundError(
                    f"{needed}: missing (every img_emb part needs its text_emb and metadata)"
                )
        parts.append((path, txt, meta))
    if not parts:
        raise FileNotFoundError(f"{img_dir}: no img_emb_NNNN.npy files")
    return parts


def read_captions(path: Path, column: str = "caption") -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'unclip-train[laion]'") from e
    table = pq.read_table(path, columns=None)
    if column not in table.column_names:
        raise KeyError(f"{path}: no {column!r} column (columns: {table.column_names})")
    return [c if c is not None else "" for c in table.column(column).to_pylist()]


class ClipRetrievalDataset(IterableDataset):
    def __init__(
        self,
        root: str | Path,
        *,
        batch_size: int,
        tokenizer=None,
        seed: int = 0,
        shuffle: bool = True,
        caption_column: str = "caption",
    ) -> None:
        self.parts = find_parts(root)
        self.batch_size, self.tokenizer, self.seed, self.shuffle = batch_size, tokenizer, seed, shuffle
        self.caption_column = caption_column
        self.rank, self.world_size, self.epoch = 0, 1, 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        for index in range(slot, len(self.parts), slots):
            yield from self._part(index)

    def _part(self, index: int) -> Iterator[dict]:
        img_path, txt_path, meta_path = self.parts[index]
        img = np.load(img_path, mmap_mode="r")
        txt = np.load(txt_path, mmap_mode="r")
        captions = read_captions(meta_path, self.caption_column)
        if not (len(img) == len(txt) == len(captions)) or img.shape[1:] != txt.shape[1:]:
            raise ValueError(
                f"part {index}: rows not aligned: {img_path} {img.shape}, {txt_path} {txt.shape}, "
                f"{meta_path} {len(captions)} rows"
            )
        order = list(range(len(img)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}:{index}").shuffle(order)
        for start in range(0, len(order), self.batch_size):
            rows = sorted(order[start : start + self.batch_size])  # sorted: sequential reads of the mmap
            batch = {
                "__key__": [f"{index:04d}{row:09d}" for row in rows],
                "caption": [captions[row] for row in rows],
                "img_emb.npy": torch.from_numpy(np.asarray(img[rows], dtype=np.float32)),
                "txt_emb.npy": torch.from_numpy(np.asarray(txt[rows], dtype=np.float32)),
            }
            if self.tokenizer is not None:
                batch["tokens"] = self.tokenizer(batch["caption"])
            yield batch
