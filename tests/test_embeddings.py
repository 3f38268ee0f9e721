"""clip-retrieval embedding layout (data=clip_retrieval): aligned rows, each once per epoch over ranks and
workers, exact resume through the DataModule's checkpointed position, layout errors, the prior end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

import data.embeddings as embeddings
from data.embeddings import ClipRetrievalDataModule, ClipRetrievalDataset, LayoutError
from data.loader import RankSyncedLoader
from tests.conftest import compose_config, first_batch, run_python
from train.run import train

ROWS = [5, 7, 4, 9, 6]  # parts of different sizes
D = 8


def write_layout(root: Path, rows=ROWS, dim: int = D, seed: int = 0) -> Path:
    """clip-retrieval's layout: random L2-normalised float16 embeddings and a parquet with captions."""
    rng = np.random.default_rng(seed)
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for part, n in enumerate(rows):
        for d, name in (("img_emb", "img_emb"), ("text_emb", "text_emb")):
            x = rng.standard_normal((n, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            np.save(root / d / f"{name}_{part:04d}.npy", x.astype(np.float16))
        pq.write_table(
            pa.table({"caption": [f"caption {part:04d}_{i}" for i in range(n)], "url": ["u"] * n}),
            root / "metadata" / f"metadata_{part:04d}.parquet",
        )
    return root


@pytest.fixture
def layout(tmp_path):
    return write_layout(tmp_path / "laion")


def _all_keys(rows=ROWS) -> list[str]:
    return [f"{p:04d}_{i}" for p, n in enumerate(rows) for i in range(n)]


def _check_aligned(root: Path, batch: dict) -> None:
    """Each row's caption and both embeddings are those of its key's part and row."""
    for i, key in enumerate(batch["__key__"]):
        part, row = key.split("_")
        assert batch["caption"][i] == f"caption {part}_{row}"
        for name, d in (("img_emb.npy", "img_emb"), ("txt_emb.npy", "text_emb")):
            stored = np.load(root / d / f"{d}_{part}.npy")[int(row)].astype(np.float32)
            assert torch.equal(batch[name][i], torch.from_numpy(stored)), (key, name)


def _loader(root, *, rank=0, world=1, workers=0, batch=3, drop_last=False, seed=1, epoch=0, persistent=False):
    ds = ClipRetrievalDataset(root, batch_size=batch, seed=seed, drop_last=drop_last)
    ds.rank, ds.world_size, ds.epoch = rank, world, epoch
    loader = DataLoader(
        ds, batch_size=None, num_workers=workers, generator=torch.Generator(), persistent_workers=persistent
    )
    return RankSyncedLoader(loader)


def test_every_row_once_per_epoch_across_two_ranks_and_two_workers(layout):
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            for batch in _loader(layout, rank=rank, world=2, workers=2, epoch=epoch):
                _check_aligned(layout, batch)
                assert batch["img_emb.npy"].dtype == torch.float32 and batch["img_emb.npy"].shape[1] == D
                seen += batch["__key__"]
        assert sorted(seen) == sorted(_all_keys()) and len(seen) == len(set(seen))
        orders.append(seen)
    assert orders[0] != orders[1], "parts and rows are reshuffled every epoch"
    # workers that persist across epochs (the DataModule's train loader) play each epoch's order too
    persistent = _loader(layout, rank=1, world=2, workers=2, persistent=True)
    for epoch in (0, 1):
        persistent.epoch_fn = lambda epoch=epoch: epoch
        expected = [b["__key__"] for b in _loader(layout, rank=1, world=2, workers=2, epoch=epoch)]
        assert [b["__key__"] for b in persistent] == expected
    persistent.close()
    # the order is a function of (seed, epoch) only
    again = [k for b in _loader(layout, epoch=1, workers=0) for k in b["__key__"]]
    assert again == [k for b in _loader(layout, epoch=1, workers=0) for k in b["__key__"]]
    # drop_last (training): only each stream's last short batch is left out, and counted
    loader = _loader(layout, batch=4, drop_last=True)
    kept = [k for b in loader for k in b["__key__"]]
    assert (
        len(kept) == 4 * (sum(ROWS) // 4) and loader.skip_counts()["partial_batch_dropped"] == sum(ROWS) % 4
    )
    with pytest.raises(TypeError):
        len(ClipRetrievalDataset(layout, batch_size=2))


def _dm(root, workers: int, batch: int = 4) -> ClipRetrievalDataModule:
    dm = ClipRetrievalDataModule(root=str(root), global_batch_size=batch, num_workers=workers, seed=3)
    dm.setup("fit")
    return dm


def _as_lists(batch: dict) -> tuple:
    return batch["__key__"], batch["img_emb.npy"].tolist(), batch["txt_emb.npy"].tolist(), batch["caption"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_the_datamodule_state_gives_the_uninterrupted_batches(layout, workers, monkeypatch):
    uninterrupted = [_as_lists(b) for b in _dm(layout, workers).train_dataloader()]
    assert len(uninterrupted) >= 6
    trained, state = [], None
    for stop_after in (2, 3, None):  # killed twice in the epoch, each time with a batch prefetched
        dm = _dm(layout, workers)
        if state is not None:
            dm.load_state_dict(torch.load(_roundtrip(state), weights_only=True))  # as a checkpoint holds it
        loader = dm.train_dataloader()
        iterator = iter(loader)
        for n, batch in enumerate(iterator, start=1):
            loader.mark_consumed()  # what on_before_batch_transfer does as the batch enters a step
            trained.append(_as_lists(batch))
            if n == stop_after:
                next(iterator)  # fetched ahead, never trained
                state = dm.state_dict()
                break
    assert trained == uninterrupted  # bitwise: keys, both embeddings, captions, in the same order
    # A resume goes straight to its row: it opens the part holding the saved position and those after
    # it, never an earlier one (the cost of a resume does not grow with the position).
    opened = []
    real = embeddings._Part.__init__
    monkeypatch.setattr(
        embeddings._Part, "__init__", lambda self, lay, i: opened.append(i) or real(self, lay, i)
    )
    dm = _dm(layout, 0, batch=2)
    loader = dm.train_dataloader()
    iterator = iter(loader)
    for _ in range(7):  # 14 rows
        next(iterator)
        loader.mark_consumed()
    state = dm.state_dict()
    rest = [b["__key__"] for b in iterator]
    order = loader.loader.dataset.stream_parts(0, 0, 1)
    ends = np.cumsum([ROWS[p] for p in order])
    opened.clear()
    resumed = _dm(layout, 0, batch=2)
    resumed.load_state_dict(state)
    assert [b["__key__"] for b in resumed.train_dataloader()] == rest
    assert opened == order[int(np.searchsorted(ends, 14, side="right")) :]


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _two_ranks_then_one(root: Path, steps: int) -> tuple[list, list, list, RankSyncedLoader]:
    """Train ``steps`` steps on 2 ranks x 2 workers (batch 2 each), stopped with a batch prefetched; continue
    on 1 rank (batch 4) from the DataModule's checkpoint state. The 2-rank global batches of the whole
    epoch, those trained before and after the stop, and the 1-rank loader."""

    def rank_loader(rank, world, batch):
        return _loader(root, rank=rank, world=world, workers=2, batch=batch, drop_last=True, seed=3)

    reference = [a["__key__"] + b["__key__"] for a, b in zip(rank_loader(0, 2, 2), rank_loader(1, 2, 2))]
    loaders = [rank_loader(r, 2, 2) for r in range(2)]
    iterators = [iter(loader) for loader in loaders]
    before = []
    for _ in range(steps):
        batches = [next(it) for it in iterators]
        for loader in loaders:
            loader.mark_consumed()
        before.append(batches[0]["__key__"] + batches[1]["__key__"])
    for it in iterators:
        next(it)
    assert before == reference[:steps]
    state = {
        "version": 2,
        "world_size": 2,
        "data_world_size": 2,
        "batch_per_data_rank": 2,
        "num_workers": 2,
        "mode": "epoch",
        "seed": 3,
        "ranks": [loader.position_state() for loader in loaders],
    }
    dm = ClipRetrievalDataModule(root=str(root), global_batch_size=4, num_workers=2, seed=3)
    dm.load_state_dict(state)  # 1 rank, per-device batch 4 = 2 data ranks x 2
    assert dm._resume_state["data_ranks"] == [0, 1]
    one = rank_loader(0, 1, 4)
    one.restore(dm._resume_state)
    after = []
    for batch in one:
        one.mark_consumed()
        after.append(batch["__key__"])
    return reference, before, after, one


def test_saved_on_two_ranks_the_epoch_continues_on_one_with_the_same_global_batches(tmp_path, layout):
    even = write_layout(tmp_path / "even", rows=[6, 6, 6, 6])  # one part per (rank, worker)
    reference, before, after, _ = _two_ranks_then_one(even, steps=2)
    assert after == reference[2:]  # every later step trains the global batch the 2-rank run would have
    # Uneven parts: once a stream runs dry the layouts differ, but the epoch is still read exactly once.
    _, before, after, one = _two_ranks_then_one(layout, steps=2)
    flat = [k for b in before + after for k in b]
    assert len(flat) == len(set(flat)) and len(flat) + one.skip_counts()["partial_batch_dropped"] == sum(ROWS)


def test_layout_errors_name_the_file(layout):
    (layout / "text_emb" / "text_emb_0001.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"text_emb_0001.npy: missing"):
        ClipRetrievalDataset(layout, batch_size=2)
    np.save(layout / "text_emb" / "text_emb_0001.npy", np.zeros((3, D), np.float16))
    with pytest.raises(LayoutError, match=r"rows not aligned: \S*img_emb_0001.npy has 7 rows, \S+ 3"):
        ClipRetrievalDataset(layout, batch_size=2)
    np.save(layout / "text_emb" / "text_emb_0001.npy", np.zeros((7, D + 1), np.float16))
    with pytest.raises(LayoutError, match=r"wrong dims: \S*text_emb_0001.npy holds 9-d"):
        ClipRetrievalDataset(layout, batch_size=2)
    np.save(layout / "text_emb" / "text_emb_0001.npy", np.zeros((7, D), np.float16))
    pq.write_table(pa.table({"text": ["x"] * 7}), layout / "metadata" / "metadata_0001.parquet")
    with pytest.raises(
        LayoutError, match=r"metadata_0001.parquet: no 'caption' column \(columns: \['text'\]\)"
    ):
        ClipRetrievalDataModule(root=str(layout), global_batch_size=2).setup("fit")
    pq.write_table(pa.table({"caption": ["x"] * 7}), layout / "metadata" / "metadata_0001.parquet")
    assert ClipRetrievalDataset(layout, batch_size=2).layout.total_rows == sum(ROWS)  # repaired
    with pytest.raises(FileNotFoundError, match="no img_emb/ directory"):
        ClipRetrievalDataset(layout / "nothing", batch_size=2)


def _prior_cfg(root: Path, out: Path, *extra: str):
    return compose_config(
        [
            "stage=prior",
            "data=clip_retrieval",
            f"data.root={root}",
            *TINY,
            f"paths.output_dir={out}",
            *extra,
        ]
    )


TINY = [  # a 2-layer prior, 8 steps of 8 rows, 2 loader workers, validation and a checkpoint every 4 steps
    "logger=none",
    "net.width=32",
    "net.layers=2",
    "data.global_batch_size=8",
    "data.num_workers=2",
    "module.optimizer.warmup_steps=2",
    "module.sample_steps=2",
    "module.val_max_samples=16",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "callbacks.checkpoint.every_n_train_steps=4",
]


def test_token_features_are_refused_clearly_without_a_clip(tmp_path):
    root = write_layout(tmp_path / "laion", rows=[4])
    with pytest.raises(ValueError, match="no per-token text features: set net.use_text_tokens=false"):
        train(_prior_cfg(root, tmp_path / "run", "net.use_text_tokens=true"))
    from train.models.prior import DiffusionPrior
    from train.modules.prior import PriorModule

    net = DiffusionPrior(embed_dim=D, text_width=4, context_length=3, width=16, layers=1, heads=2)
    module = PriorModule(net, diffusion={"num_timesteps": 10}, sample_steps=2)
    batch = next(b for b in ClipRetrievalDataset(root, batch_size=4) if b["__key__"])
    with pytest.raises(ValueError, match=r"net.use_text_tokens=true needs .* set net.use_text_tokens=false"):
        module.training_step(batch, 0)


def test_token_features_from_the_clip_that_made_the_embeddings(clip_run, tmp_path):
    """clip_ckpt with data=clip_retrieval: the captions are tokenised with the CLIP's tokenizer and the
    prior's token features computed by that CLIP; a CLIP that did not make the embeddings is refused."""
    from train.frozen_clip import FrozenClip
    from train.models.prior import DiffusionPrior
    from train.modules.prior import PriorModule
    from train.run import wire_clip

    run, val = clip_run
    clip = FrozenClip(run)
    batch = first_batch(val, clip.tokenizer, 16)
    emb = clip.embed(batch["image"], batch["tokens"])
    root = tmp_path / "made_by_clip"
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True)
    np.save(root / "img_emb" / "img_emb_0.npy", emb["img_emb"].half().numpy())
    np.save(root / "text_emb" / "text_emb_0.npy", emb["txt_emb"].half().numpy())
    pq.write_table(pa.table({"caption": batch["caption"]}), root / "metadata" / "metadata_0.parquet")
    cfg = _prior_cfg(root, tmp_path / "run", f"clip_ckpt={run}", "net.use_text_tokens=true")
    tokenizer = wire_clip(cfg)  # sizes from the arrays and the CLIP; the CLIP's tokenizer for the captions
    assert (cfg.net.embed_dim, cfg.net.text_width, cfg.net.context_length) == (
        clip.embed_dim,
        clip.text_width,
        clip.context_length,
    )
    net = DiffusionPrior(
        **{k: v for k, v in cfg.net.items() if k not in ("_target_", "width", "layers")}, width=32, layers=1
    )
    module = PriorModule(net, diffusion={"num_timesteps": 10}, sample_steps=2, clip_ckpt=str(run))
    rows = next(b for b in ClipRetrievalDataset(root, batch_size=16, tokenizer=tokenizer, shuffle=False))
    assert torch.equal(rows["tokens"], batch["tokens"])
    features = module.embeddings(rows)
    assert torch.equal(features["txt_feat"], emb["txt_feat"])
    x0 = torch.nn.functional.normalize(features["img_emb"], dim=-1) * module.scale
    loss = module.diffusion.training_losses(module.net, x0, model_kwargs=module.conditioning(features))[
        "loss"
    ]
    assert torch.isfinite(loss).all()
    # embeddings of another model (random ones of the same size) are not the CLIP's: refused
    other = write_layout(tmp_path / "other", rows=[16], dim=clip.embed_dim)
    rows = next(b for b in ClipRetrievalDataset(other, batch_size=16, tokenizer=tokenizer))
    with pytest.raises(ValueError, match=r"did not make these embeddings: .* mean cosine of"):
        module.embeddings(rows)
    with pytest.raises(ValueError, match="embeds into 128 dimensions, data.root=.* holds 8-d"):
        wire_clip(_prior_cfg(write_layout(tmp_path / "small"), tmp_path / "run", f"clip_ckpt={run}"))


def test_the_prior_trains_on_clip_retrieval_embeddings_from_the_cli_and_resumes_exactly(tmp_path):
    """python -m train.run stage=prior data=clip_retrieval ...: trains, validates, checkpoints; resuming its
    step-4 checkpoint (mid-epoch) ends with the very same weights."""
    root = write_layout(tmp_path / "train", rows=[40, 56, 32, 72, 48, 30], dim=16)
    val = write_layout(tmp_path / "val", rows=[10, 6], dim=16, seed=1)
    out = tmp_path / "run"
    args = ["stage=prior", "data=clip_retrieval", f"data.root={root}", f"data.val_root={val}", *TINY]
    result = run_python(["-m", "train.run", *args, f"paths.output_dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainer/global_step"] == 8 and math.isfinite(metrics["train/loss"])
    assert metrics["val/n"] == 16 and 0 <= metrics["val/r1_pred"] <= 1
    assert metrics["data/skipped_epoch_tail_dropped"] == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["net"]["embed_dim"], saved["net"]["use_text_tokens"]) == (16, False)
    step4 = out / "checkpoints" / "step0000004.ckpt"
    ckpt = torch.load(step4, map_location="cpu", weights_only=False)
    position = ckpt["ClipRetrievalDataModule"]["ranks"][0]
    assert sum(st["position"] for st in position["streams"].values()) == 4 * 8  # 4 steps of 8 rows trained
    resumed = train(_prior_cfg(root, tmp_path / "resumed", f"data.val_root={val}", f"resume={step4}"))
    assert resumed["trainer/global_step"] == 8
    final = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    again = torch.load(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    for key, value in final.items():
        assert torch.equal(value, again["state_dict"][key]), key


def test_token_features_check_their_clip_without_a_host_read_at_every_step(monkeypatch):
    """The cosine check of token_features read the device at every training step (the host waiting for
    the GPU after the frozen CLIP's text pass); now at the first batch and then at the logging steps, on
    the lowest cosine since, so a CLIP that did not make the embeddings is still refused."""
    from types import SimpleNamespace

    from train.models.prior import DiffusionPrior
    from train.modules.prior import PriorModule

    class Stub:  # a frozen CLIP whose text embeddings are the stored ones, or not
        device = torch.device("cpu")

        def __init__(self) -> None:
            self.txt_emb = None

        def embed(self, images, tokens):
            return {"txt_emb": self.txt_emb, "txt_feat": torch.zeros(len(tokens), 3, 4)}

    net = DiffusionPrior(embed_dim=D, text_width=4, context_length=3, width=16, layers=1, heads=2)
    module = PriorModule(net, diffusion={"num_timesteps": 10}, sample_steps=2)
    module._clip = stub = Stub()
    reads, to_float, item = [], torch.Tensor.__float__, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or to_float(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or item(t))
    txt = torch.nn.functional.normalize(torch.randn(4, D), dim=-1)
    emb = {"tokens": torch.ones(4, 3, dtype=torch.long), "txt_emb": txt}
    trainer = SimpleNamespace(training=True, global_step=1)
    module._trainer = trainer  # its logging steps: every 50th (train/callbacks/log_step.py decides in a run)
    monkeypatch.setattr("train.modules.prior.logs_this_step", lambda t: t.global_step % 50 == 0)
    per_step = []
    for step in range(1, 6):
        trainer.global_step, before = step, len(reads)
        stub.txt_emb = txt if step < 4 else -txt  # another CLIP's embeddings from step 4 on
        module.token_features(emb)
        per_step.append(len(reads) - before)
    assert per_step == [1, 0, 0, 0, 0], per_step  # before: a read at every step
    trainer.global_step = 50
    stub.txt_emb = txt  # this batch fits: the lowest cosine since the last check (steps 4, 5) does not
    with pytest.raises(ValueError, match="did not make these embeddings"):
        module.token_features(emb)
