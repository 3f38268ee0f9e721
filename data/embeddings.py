"""Precomputed CLIP embeddings in clip-retrieval's layout (e.g. the released LAION embeddings).

    DIR/img_emb/img_emb_0000.npy          (N_0, D) float16, L2-normalised
    DIR/text_emb/text_emb_0000.npy        (N_0, D) float16, L2-normalised
    DIR/metadata/metadata_0000.parquet    N_0 rows: caption (and url, key, ...), aligned with the arrays

:class:`ClipRetrievalDataset` streams them in the same batch format as embedding shards written by
``python -m data.embed`` (``img_emb.npy``, ``txt_emb.npy``, ``caption``, ``__key__``; ``tokens`` when
given a tokenizer), so the prior reads either; :class:`ClipRetrievalDataModule` is ``data=clip_retrieval``
(conf/data/clip_retrieval.yaml). There are no per-token text features (``txt_feat.npy``): the prior trains
with ``net.use_text_tokens=false``, or computes them from the captions with ``clip_ckpt`` (the CLIP that
made the embeddings; train/modules/prior.py checks that it is).

Split and position (the protocol of data/pipeline.py's ShardDataset, so data/loader.py's
RankSyncedLoader and the DataModule's checkpointed position work unchanged):

- A stream is one (data rank, worker). The parts are shuffled by (seed, epoch) and dealt out like shards
  (``data.pipeline.shards_for``): every part exactly once per epoch over ranks x workers. Within a part the
  rows are permuted by (seed, epoch, part). A stream is the concatenation of its parts' permuted rows;
  batches run across part boundaries, so only a stream's last batch can be short (dropped in training,
  counted as ``partial_batch_dropped``).
- A stream's position is the number of rows it has drawn this epoch. Row counts come from the .npy
  headers, so a resume at position p goes straight to the part and row of p: it opens that part's
  memory maps and reads that part's captions only, whatever p is.
- ``data_ranks``: a rank that continues k saved data ranks (a resume on fewer ranks) builds each batch
  from one chunk of batch_size / k of each, in data-rank order, as ShardDataset does.

The whole layout is checked when the dataset is built (headers and parquet footers only): a missing file,
rows that do not line up, a missing caption column or embeddings of other dimensions are errors naming
the file. Reading the parquet metadata needs pyarrow (``pip install "unclip-train[laion]"``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from data.datamodule import ShardDataModule
from data.pipeline import StreamPosition, _seed, interleave, open_npy, snapshot

_PART = re.compile(r"img_emb_(\d+)\.npy$")


class LayoutError(ValueError):
    """The clip-retrieval directory is not usable as it stands (the message names the file)."""


def find_parts(root: str | Path) -> list[tuple[Path, Path, Path]]:
    """(img_emb, text_emb, metadata) paths of every part, in part order; clear errors for gaps."""
    root = Path(root)
    img_dir = root / "img_emb"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{root}: no img_emb/ directory (expected clip-retrieval's layout)")
    found = []
    for path in img_dir.glob("img_emb_*.npy"):
        match = _PART.search(path.name)
        if match:
            found.append((int(match.group(1)), match.group(1), path))
    parts = []
    for _, index, path in sorted(found):  # numeric order: img_emb_10 after img_emb_9
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


def _pyarrow_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'unclip-train[laion]'") from e
    return pq


def read_captions(path: Path, column: str = "caption") -> list[str]:
    """The ``column`` of one metadata parquet (that column only), missing captions as ''."""
    pq = _pyarrow_parquet(path)
    names = pq.read_schema(path).names
    if column not in names:
        raise LayoutError(f"{path}: no {column!r} column (columns: {names}); set data.caption_column")
    table = pq.read_table(path, columns=[column])
    return [c if c is not None else "" for c in table.column(column).to_pylist()]


def _array_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file from its header (a memory map: nothing is read)."""
    try:
        array = open_npy(path)
    except (ValueError, OSError, EOFError) as e:
        raise LayoutError(f"{path}: not a readable .npy array ({e})") from e
    return tuple(array.shape), array.dtype


def embedding_dim(root: str | Path) -> int:
    """D of the embeddings under ``root`` (the first part's header)."""
    img, _, _ = find_parts(root)[0]
    shape, _ = _array_header(img)
    if len(shape) != 2:
        raise LayoutError(f"{img}: shape {shape}, expected (rows, dim)")
    return int(shape[1])


@dataclass(frozen=True)
class Layout:
    """A checked clip-retrieval directory: its parts, each part's row count, the embedding size."""

    root: str
    parts: tuple[tuple[Path, Path, Path], ...]
    rows: tuple[int, ...]
    dim: int
    caption_column: str

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def scan_layout(root: str | Path, caption_column: str = "caption") -> Layout:
    """Check every part (npy headers, parquet footers; no data is read) and count its rows."""
    parts = find_parts(root)
    rows, dim, first = [], None, None
    for img, txt, meta in parts:
        shapes = {}
        for path in (img, txt):
            shape, dtype = _array_header(path)
            if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
                raise LayoutError(f"{path}: {dtype} array of shape {shape}, expected float (rows, dim)")
            shapes[path] = shape
        (n, d), (n_txt, d_txt) = shapes[img], shapes[txt]
        if d_txt != d:
            raise LayoutError(
                f"wrong dims: {txt} holds {d_txt}-d embeddings, {img} {d}-d (image and text embeddings "
                "must come from one CLIP)"
            )
        if dim is None:
            dim, first = d, img
        elif d != dim:
            raise LayoutError(f"wrong dims: {img} holds {d}-d embeddings, {first} {dim}-d")
        pq = _pyarrow_parquet(meta)
        try:
            footer = pq.ParquetFile(meta)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise LayoutError(f"{meta}: not a readable parquet file ({e})") from e
        names, n_meta = footer.schema_arrow.names, footer.metadata.num_rows
        footer.close()
        if caption_column not in names:
            raise LayoutError(
                f"{meta}: no {caption_column!r} column (columns: {names}); set data.caption_column"
            )
        if not n == n_txt == n_meta:
            raise LayoutError(
                f"rows not aligned: {img} has {n} rows, {txt} {n_txt}, {meta} {n_meta} (row i of each "
                "must be the same sample)"
            )
        rows.append(int(n))
    return Layout(str(root), tuple(parts), tuple(rows), int(dim), caption_column)


class _Part:
    """One part opened for reading: memory-mapped arrays and its captions."""

    def __init__(self, layout: Layout, index: int) -> None:
        img, txt, meta = layout.parts[index]
        self.label = _PART.search(img.name).group(1)
        self.img = open_npy(img)  # (headers read without ast: data/pipeline.py npy_header)
        self.txt = open_npy(txt)
        self.captions = read_captions(meta, layout.caption_column)
        if len(self.captions) != len(self.img):  # the file changed since the layout was checked
            raise LayoutError(
                f"rows not aligned: {meta} has {len(self.captions)} rows, {img} {len(self.img)}"
            )

    def take(self, rows: np.ndarray) -> dict:
        order = np.argsort(rows, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        ascending = rows[order]  # read the memory maps front to back, then restore the shuffled order
        return {
            "keys": [f"{self.label}_{r}" for r in rows.tolist()],
            "captions": [self.captions[r] for r in rows.tolist()],
            "img": np.asarray(self.img[ascending], dtype=np.float32)[inverse],
            "txt": np.asarray(self.txt[ascending], dtype=np.float32)[inverse],
        }


def _join(pieces: list[dict]) -> dict:
    if len(pieces) == 1:
        return pieces[0]
    return {
        "keys": [k for p in pieces for k in p["keys"]],
        "captions": [c for p in pieces for c in p["captions"]],
        "img": np.concatenate([p["img"] for p in pieces]),
        "txt": np.concatenate([p["txt"] for p in pieces]),
    }


def part_urls(layout: Layout) -> list[str]:
    """A layout's parts as the dataset's ``urls``: one per part (its image-embedding file)."""
    return [str(img) for img, _, _ in layout.parts]


class ClipRetrievalDataset(StreamPosition, IterableDataset):
    """Yields ready batches (dicts) of a clip-retrieval directory; use with ``DataLoader(batch_size=None)``.

    Batch keys: ``img_emb.npy``, ``txt_emb.npy`` float32 (B, D), ``caption`` list[str], ``__key__``
    list[str] (``<part>_<row>``), ``tokens`` (B, L) when a tokenizer is given, and ``__state__`` (as
    ShardDataset: ``streams`` {data rank: {position, skips}} after this batch, ``skips`` their sum).
    """

    mode = "epoch"  # each row once per epoch; no resampling
    num_samples = None

    def __init__(
        self,
        root: str | Path | Layout,
        *,
        batch_size: int,
        tokenizer=None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        caption_column: str = "caption",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.layout = root if isinstance(root, Layout) else scan_layout(root, caption_column)
        self.parts = list(self.layout.parts)
        self.spec = self.layout.root
        self.urls = part_urls(self.layout)  # one per part (as ShardDataset's shards)
        self.batch_size, self.tokenizer, self.seed = batch_size, tokenizer, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.caption_column = self.layout.caption_column
        self.reasons = ["partial_batch_dropped"]
        self.reset_position()  # set by the DataModule before iterating (data/pipeline.py StreamPosition)

    def __len__(self) -> int:
        raise TypeError("epoch mode has no declared length")

    def stream_parts(self, data_rank: int, worker: int, num_workers: int) -> list[int]:
        """The part indices of one stream this epoch, in reading order."""
        return self.share(range(len(self.parts)), data_rank, worker, num_workers, shuffle=self.shuffle)

    def row_order(self, part: int) -> np.ndarray:
        """The order in which a part's rows are read this epoch."""
        n = self.layout.rows[part]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng(_seed(self.seed, self.epoch, "rows", part)).permutation(n)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers, data_ranks = self.worker_streams()
        chunk = self.batch_size // len(data_ranks)
        states = {}
        for v in data_ranks:
            key = (v, worker)
            states[v] = {
                "position": int(self.start_positions.get(key, 0)),
                "skips": Counter(self.start_skips.get(key, {})),
            }
        streams = [(v, self._stream(v, worker, num_workers, chunk, states[v])) for v in data_ranks]
        reported = None
        for full, pieces in interleave(streams, chunk, self.batch_size, lambda piece: len(piece["keys"])):
            if full:
                state = snapshot(self, states, worker)
                reported = state["streams"]
                yield self._collate([p for _, p in pieces], state)
            elif self.drop_last:  # a short batch would break equal-size collectives (the global-batch loss)
                for v, piece in pieces:
                    states[v]["skips"]["partial_batch_dropped"] += len(piece["keys"])
            elif pieces:
                pool = _join([p for _, p in pieces])
                for start in range(0, len(pool["keys"]), self.batch_size):
                    state = snapshot(self, states, worker)
                    reported = state["streams"]
                    end = start + self.batch_size
                    yield self._collate([{name: col[start:end] for name, col in pool.items()}], state)
        final = snapshot(self, states, worker)
        if final["streams"] != reported:
            # state only (no rows): the position after the last batch, or of a worker without a batch
            yield {"__key__": [], "__state__": final}

    def _stream(
        self, data_rank: int, worker: int, num_workers: int, chunk: int, state: dict
    ) -> Iterator[dict]:
        """Chunks of ``chunk`` rows of one stream (the last may be shorter), from ``state["position"]``
        on; the position is advanced before each chunk is handed out."""
        skip = state["position"]
        pieces: list[dict] = []
        need = chunk
        for part in self.stream_parts(data_rank, worker, num_workers):
            n = self.layout.rows[part]
            if skip >= n:  # a resume: this part was read before the saved position
                skip -= n
                continue
            order, skip = self.row_order(part)[skip:], 0
            opened = _Part(self.layout, part)
            start = 0
            while start < len(order):
                rows = order[start : start + need]
                start += len(rows)
                pieces.append(opened.take(rows))
                need -= len(rows)
                if need == 0:
                    state["position"] += chunk
                    yield _join(pieces)
                    pieces, need = [], chunk
        if pieces:
            state["position"] += chunk - need
            yield _join(pieces)

    def _collate(self, pieces: Sequence[dict], state: dict) -> dict:
        rows = _join(list(pieces))
        batch: dict = {
            "__key__": rows["keys"],
            "caption": rows["captions"],
            "img_emb.npy": torch.from_numpy(rows["img"]),
            "txt_emb.npy": torch.from_numpy(rows["txt"]),
        }
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer(batch["caption"])
        batch["__state__"] = state
        return batch


class ClipRetrievalDataModule(ShardDataModule):
    """``data=clip_retrieval``: a clip-retrieval directory (``root``) for the prior, and optionally a
    held-out one of the same layout (``val_root``). Global batch, rank-synchronised epochs and the exact
    mid-epoch resume are ShardDataModule's (data/datamodule.py); only the dataset differs. There are no
    images: ``image_size`` must stay null (stage configs set it for image data), and ``normalize``,
    ``train_crop``, ``tokenizer`` (null: the prior's stage config) and ``synthetic`` (debug=fast sizes the
    synthetic default) are accepted for the same reason and unused. Captions are tokenised only when a
    tokenizer is set (train/run.py sets the CLIP's when ``clip_ckpt`` is given)."""

    def __init__(
        self,
        *,
        root: str,
        val_root: str | None = None,
        caption_column: str = "caption",
        global_batch_size: int = 256,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        persistent_workers: bool = True,
        seed: int = 0,
        prefetch_factor: int = 4,
        pin_memory: bool | None = None,
        on_layout_change: str = "error",
        image_size: int | None = None,
        normalize: str | None = None,
        train_crop: str | None = None,
        synthetic: Any = None,
        tokenizer: Any = None,
    ) -> None:
        if tokenizer is not None:  # (the prior's stage config sets it null: its CLIP's tokenizer is used)
            raise ValueError(
                "data=clip_retrieval tokenises captions with the CLIP's tokenizer (clip_ckpt): leave "
                f"data.tokenizer null (got {tokenizer})"
            )
        if image_size is not None:
            raise ValueError(
                f"data=clip_retrieval holds embeddings and captions, no images (data.image_size={image_size}): "
                "it feeds stage=prior only"
            )
        if not caption_column:
            raise ValueError("data.caption_column: name the parquet column of captions (e.g. caption)")
        super().__init__(
            train_shards=str(root),
            val_shards=str(val_root) if val_root else None,
            global_batch_size=global_batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            persistent_workers=persistent_workers,
            mode="epoch",
            image_size=None,
            normalize=None,
            seed=seed,
            prefetch_factor=prefetch_factor,
            pin_memory=pin_memory,
            on_layout_change=on_layout_change,
        )
        self.root, self.val_root, self.caption_column = str(root), val_root, caption_column
        self._layouts: dict[str, Layout] = {}

    def layout(self, root: str) -> Layout:
        """The checked layout of a directory (scanned once per DataModule)."""
        if root not in self._layouts:
            self._layouts[root] = scan_layout(root, self.caption_column)
        return self._layouts[root]

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for root in (self.root, self.val_root):  # layout errors before the first step, naming the file
            if root:
                self.layout(str(root))

    def train_urls(self) -> list[str]:
        return part_urls(self.layout(str(self.train_shards)))

    def _dataset(self, shards, *, train: bool) -> ClipRetrievalDataset:
        ds = ClipRetrievalDataset(
            self.layout(str(shards)),
            batch_size=self.batch_size if train else (self.val_batch_size or self.batch_size),
            tokenizer=self.tokenizer,
            seed=self.seed,
            shuffle=train,
            drop_last=train,  # every rank steps with the same per-device batch (all-gathered losses)
        )
        if self.trainer is not None:
            ds.rank, ds.world_size = self.trainer.global_rank, self.trainer.world_size
            ds.epoch = self.trainer.current_epoch
        return ds

    def skip_counts(self) -> dict[str, int]:
        """Rows left out on this rank so far this epoch (a fixed key set: logged as data/skipped_*)."""
        counts = self._train_loader.skip_counts() if self._train_loader is not None else {}
        return {k: counts.get(k, 0) for k in ("partial_batch_dropped", "epoch_tail_dropped")}
