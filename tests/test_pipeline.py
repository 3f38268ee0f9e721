"""The streaming pipeline: partitioning, modes, bad data, filters, determinism, resume positions."""

from __future__ import annotations

import io
import random
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.filters import Filters
from data.pipeline import ShardDataset, dataset_size
from data.shards import ShardSpecError, expand_shards, read_tar
from data.transforms import Crop, resize_crop
from eval.bench_data import photo_like
from tests.conftest import image_bytes, simple_sample, write_tar


def run_epoch(ds: ShardDataset, workers: int) -> tuple[list[str], dict[str, int]]:
    """All keys one rank sees in an epoch, and its skip counts summed over workers."""
    keys: list[str] = []
    last: dict[int, dict] = {}
    for batch in DataLoader(ds, batch_size=None, num_workers=workers):
        keys += batch["__key__"]
        last[batch["__state__"]["worker"]] = batch["__state__"]["skips"]
    skips = Counter()
    for s in last.values():
        skips.update(s)
    return keys, {k: v for k, v in skips.items() if v}


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_epoch_mode_every_key_exactly_once_across_ranks(make_shards, world_size, workers):
    # Uneven shards, including an empty one, and more shard slots than shards for 3 ranks x 3 workers.
    directory, keys = make_shards([5, 3, 0, 7, 2, 4, 1])
    seen: list[str] = []
    for rank in range(world_size):
        ds = ShardDataset(str(directory), batch_size=3, image_size=8, shuffle_buffer=4, seed=7)
        ds.rank, ds.world_size = rank, world_size
        rank_keys, _ = run_epoch(ds, workers)
        seen += rank_keys
    assert Counter(seen) == Counter(keys)


def test_epoch_shuffle_is_seeded_and_changes_with_epoch(make_shards):
    directory, keys = make_shards([6, 6, 6, 6])
    ds = ShardDataset(str(directory), batch_size=4, image_size=8, shuffle_buffer=5, seed=3)
    first, _ = run_epoch(ds, 0)
    again, _ = run_epoch(ds, 0)
    assert first == again
    assert sorted(first) == sorted(keys) and first != sorted(keys)
    ds.epoch = 1
    other_epoch, _ = run_epoch(ds, 0)
    assert sorted(other_epoch) == sorted(keys) and other_epoch != first


def test_random_crop_depends_on_key_not_on_worker_layout(make_shards, tmp_path):
    out = tmp_path / "big"
    for s in range(2):  # images with horizontal gradients so crops differ
        samples = []
        for i in range(4):
            img = Image.linear_gradient("L").resize((64, 32)).convert("RGB")
            buf = io.BytesIO()
            img.save(buf, "PNG")
            samples.append({"__key__": f"{s}{i}", "png": buf.getvalue(), "txt": "x"})
        write_tar(out / f"{s}.tar", samples)

    def crops(workers):
        ds = ShardDataset(str(out), batch_size=2, image_size=32, crop_size=16, shuffle_buffer=0, seed=1)
        result = {}
        for b in DataLoader(ds, batch_size=None, num_workers=workers):
            result.update(zip(b["__key__"], b["image"], strict=True))
        return result

    a, b = crops(0), crops(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len({tuple(v[0, 0].tolist()) for v in a.values()}) > 1  # crops really differ between samples


def test_resampled_mode_is_infinite_with_declared_length(make_shards):
    directory, keys = make_shards([4, 4])
    ds = ShardDataset(str(directory), batch_size=3, image_size=8, mode="resampled", num_samples=12, seed=0)
    assert len(ds) == 4
    it = iter(DataLoader(ds, batch_size=None, num_workers=0))
    got = [k for _ in range(10) for k in next(it)["__key__"]]  # more than one epoch's worth: never ends
    assert len(got) == 30 and set(got) <= set(keys)


def test_resampled_mode_reads_length_from_sizes_json(make_shards):
    directory, _ = make_shards([4, 6])
    with pytest.raises(ValueError, match="train_num_samples"):
        ShardDataset(str(directory), batch_size=2, mode="resampled")
    (directory / "sizes.json").write_text('{"00000.tar": 4, "00001.tar": 6}')
    assert dataset_size(expand_shards(str(directory))) == 10
    assert len(ShardDataset(str(directory), batch_size=2, mode="resampled")) == 5


# ---- shard specs --------------------------------------------------------------------------------


def test_shard_spec_forms(make_shards):
    directory, _ = make_shards([1, 1, 1])
    brace = expand_shards(f"{directory}/{{00000..00002}}.tar")
    assert brace == expand_shards(str(directory)) == expand_shards(f"{directory}/*.tar")
    assert expand_shards([brace[0], brace[1]]) == brace[:2]
    assert expand_shards(f"{brace[0]}::{brace[2]}") == [brace[0], brace[2]]
    assert expand_shards("pipe:cat /x/{0..2}.tar") == [f"pipe:cat /x/{i}.tar" for i in range(3)]


def test_brace_pattern_expands_without_touching_files(make_shards):
    directory, _ = make_shards([1])
    urls = expand_shards(f"{directory}/{{00000..99999}}.tar")  # 100,000 shards, only the first exists
    assert len(urls) == 100_000


def test_a_brace_pattern_whose_first_shard_is_missing_is_accepted(make_shards):
    """img2dataset leaves a gap where a shard failed: a gap at the first shard refused the whole dataset
    ("matches no file"), while the same gap anywhere else is counted while training."""
    directory, _ = make_shards([1, 1, 1])
    (directory / "00000.tar").unlink()
    urls = expand_shards(f"{directory}/{{00000..00002}}.tar")
    assert urls == [f"{directory}/{i:05d}.tar" for i in range(3)]


@pytest.mark.parametrize("spec", ["/nonexistent/{000..009}.tar", "/nonexistent/*.tar", ""])
def test_spec_matching_nothing_is_an_error_naming_it(spec):
    with pytest.raises(ShardSpecError) as err:
        expand_shards(spec)
    assert repr(spec) in str(err.value)


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(ShardSpecError, match="no \\*.tar"):
        expand_shards(str(tmp_path))


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) shards through curl")
def test_http_and_file_url_shards_are_read(make_shards):
    """A spec of https:// (or file://) URLs was refused before training ("matches no file": it was checked
    as a local path) though the reader opens URLs; a query string's '?' made it a glob. Read through a
    local HTTP server here; a scheme webdataset cannot open (s3://) is refused naming the pipe: form."""
    import functools
    import http.server
    import threading

    directory, keys = make_shards([3, 2])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = f"http://127.0.0.1:{server.server_port}/{{00000..00001}}.tar?download=1"
        assert len(expand_shards(spec)) == 2
        ds = ShardDataset(spec, batch_size=2, image_size=8, shuffle_buffer=0)
        got, skips = run_epoch(ds, 0)
        assert sorted(got) == sorted(keys) and not skips
    finally:
        server.shutdown()
    assert expand_shards(f"file://{directory}/*.tar") == expand_shards(str(directory))
    with pytest.raises(ShardSpecError, match="pipe:aws s3 cp s3://b/0.tar -"):
        expand_shards("s3://b/0.tar")


def test_pipe_shards_are_read(make_shards):
    directory, keys = make_shards([3, 2])
    ds = ShardDataset(
        f"pipe:cat {directory}/{{00000..00001}}.tar", batch_size=2, image_size=8, shuffle_buffer=0
    )
    got, skips = run_epoch(ds, 0)
    assert sorted(got) == sorted(keys) and not skips


# ---- what img2dataset writes --------------------------------------------------------------------


def test_reads_png_webp_unsorted_keys_and_gaps(tmp_path):
    samples = [
        {
            "__key__": "000000017",
            "png": image_bytes(fmt="PNG"),
            "txt": "png one",
            "json": {"status": "success"},
        },
        {"__key__": "000000003", "webp": image_bytes(fmt="WEBP"), "txt": "webp one"},
        {"__key__": "000000009", "jpg": image_bytes(), "txt": "jpg one"},
    ]
    write_tar(tmp_path / "00000.tar", samples)
    ds = ShardDataset(str(tmp_path), batch_size=8, image_size=16, shuffle_buffer=0, keep_json=True)
    (batch,) = list(DataLoader(ds, batch_size=None))
    assert batch["__key__"] == ["000000017", "000000003", "000000009"]
    assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["json"][0] == {"status": "success"} and batch["json"][1] == {}


def test_long_member_names_pax_and_gnu(tmp_path):
    key = "d/" + "k" * 150
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for ext, data in (("jpg", image_bytes()), ("txt", b"caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with open(path, "rb") as f:
            names = [m.name for m in read_tar(f)]
        assert names == [f"{key}.jpg", f"{key}.txt"]


# ---- bad data: skipped, counted by reason, never a crash ----------------------------------------


def _dataset(path, **kw) -> ShardDataset:
    spec = path if isinstance(path, list) else str(path)
    return ShardDataset(spec, batch_size=4, image_size=8, shuffle_buffer=0, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, workers):
    good = [simple_sample(f"g{i}") for i in range(5)]
    bad = [
        {"__key__": "b0", "jpg": b"\xff\xd8 this is not a jpeg", "txt": "x"},  # undecodable
        {"__key__": "b1", "jpg": image_bytes()},  # caption missing
        {"__key__": "b2", "txt": "no image"},  # image missing
        {"__key__": "b3", "jpg": image_bytes(), "txt": "x", "json": "{not json"},
        {"__key__": "b4", "jpg": image_bytes(), "txt": b"\xff\xfe bad utf8"},
    ]
    write_tar(tmp_path / "0.tar", good[:2] + bad + good[2:])
    write_tar(tmp_path / "1.tar", [])  # empty shard
    keys, skips = run_epoch(_dataset(tmp_path), workers)
    assert sorted(keys) == sorted(s["__key__"] for s in good)
    assert skips == {
        "decode_error": 1,
        "missing_caption": 1,
        "missing_image": 1,
        "bad_json": 1,
        "bad_field": 1,
        "empty_shard": 1,
    }


def _truncate(path, keep_bytes):
    data = path.read_bytes()[:keep_bytes]
    path.write_bytes(data)


def test_truncated_shard_mid_member_keeps_complete_samples(tmp_path):
    samples = [simple_sample(f"k{i}", size=(64, 64)) for i in range(4)]
    path = write_tar(tmp_path / "0.tar", samples)
    with tarfile.open(path) as tar:
        jpg = tar.getmember("k2.jpg")
    _truncate(path, jpg.offset_data + jpg.size // 2)  # inside the third sample's image
    write_tar(tmp_path / "1.tar", [simple_sample("other")])
    keys, skips = run_epoch(_dataset(tmp_path), 0)
    assert sorted(keys) == ["k0", "k1", "other"]
    assert skips == {"truncated_shard": 1}


def test_truncated_at_member_boundary_is_detected_and_incomplete_sample_dropped(tmp_path):
    samples = [simple_sample(f"k{i}") for i in range(3)]
    path = write_tar(tmp_path / "0.tar", samples)
    # Cut right after the last sample's jpg member: tarfile/webdataset would read this as complete.
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    jpg = next(m for m in members if m.name == "k2.jpg")
    _truncate(path, jpg.offset_data + (jpg.size + 511) // 512 * 512)
    keys, skips = run_epoch(_dataset(tmp_path), 0)
    assert keys == ["k0", "k1"]
    assert skips == {"truncated_shard": 1, "missing_caption": 1}


def test_corrupt_and_unreadable_shards(tmp_path):
    write_tar(tmp_path / "0.tar", [simple_sample("good")])
    (tmp_path / "1.tar").write_bytes(b"garbage" * 200)  # not a tar at all
    urls = [str(tmp_path / "0.tar"), str(tmp_path / "1.tar"), str(tmp_path / "missing.tar")]
    keys, skips = run_epoch(_dataset(urls), 0)
    assert keys == ["good"]
    assert skips == {"corrupt_shard": 1, "unreadable_shard": 1}


def test_failing_pipe_is_an_unreadable_shard(make_shards):
    directory, keys = make_shards([2])
    ds = _dataset([f"{directory}/00000.tar", "pipe:false"])
    got, skips = run_epoch(ds, 0)
    assert sorted(got) == sorted(keys)
    assert skips in ({"unreadable_shard": 1}, {"truncated_shard": 1})


# ---- filters ------------------------------------------------------------------------------------


def test_metadata_filters_drop_and_count(tmp_path):
    samples = [
        simple_sample("ok", punsafe=0.01, pwatermark=0.1),
        simple_sample("small", size=(8, 8)),
        simple_sample("wide", size=(96, 16)),
        simple_sample("short", caption=""),
        simple_sample("unsafe", punsafe=0.9),
        simple_sample("watermark", pwatermark=0.95),
        simple_sample("nofield"),  # kept: the field is absent
    ]
    write_tar(tmp_path / "0.tar", samples)
    filters = Filters(
        min_width=16,
        min_height=16,
        max_aspect_ratio=3.0,
        min_caption_chars=1,
        fields={"punsafe": "< 0.1", "pwatermark": "<0.8"},
    )
    keys, skips = run_epoch(_dataset(tmp_path, filters=filters), 0)
    assert sorted(keys) == ["nofield", "ok"]
    assert skips == {
        "filter_min_size": 1,
        "filter_aspect_ratio": 1,
        "filter_caption_length": 1,
        "filter_punsafe": 1,
        "filter_pwatermark": 1,
    }


def test_size_filter_uses_image_when_json_has_no_size(tmp_path):
    write_tar(
        tmp_path / "0.tar",
        [
            {"__key__": "a", "jpg": image_bytes(8, 8), "txt": "x"},
            {"__key__": "b", "jpg": image_bytes(40, 40), "txt": "x"},
        ],
    )
    keys, skips = run_epoch(_dataset(tmp_path, filters=Filters(min_width=16)), 0)
    assert keys == ["b"] and skips == {"filter_min_size": 1}


def test_size_filters_read_the_source_size_img2dataset_records_not_the_resized_one(tmp_path):
    """img2dataset stores resized images (border mode: 256 x 256 by default) and writes that size in
    width/height, the source's in original_width/original_height: the filters read width/height, so a
    20 px thumbnail and a 4000 x 300 panorama passed min_width and max_aspect_ratio."""

    def resized(key, original, **extra):  # as img2dataset's default border resize stores them
        sample = simple_sample(key, size=(32, 32))
        sample["json"].update(original_width=original[0], original_height=original[1], **extra)
        return sample

    bad = simple_sample("bad_size")
    bad["json"]["original_width"], bad["json"]["original_height"] = "wide", 5
    write_tar(
        tmp_path / "0.tar",
        [resized("thumb", (20, 20)), resized("panorama", (4000, 300)), resized("photo", (640, 480)), bad],
    )
    filters = Filters(min_width=128, min_height=128, max_aspect_ratio=3.0)
    keys, skips = run_epoch(_dataset(tmp_path, filters=filters), 0)
    assert keys == ["photo"] and skips == {"filter_min_size": 1, "filter_aspect_ratio": 1, "bad_json": 1}


def test_bad_filter_config_names_the_option():
    with pytest.raises(ValueError, match="data.filters.fields.punsafe"):
        Filters(fields={"punsafe": "less than 0.1"})


# ---- data position ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_restoring_worker_positions_continues_exactly(make_shards, workers):
    directory, keys = make_shards([5, 4, 6, 3])

    def make():
        return ShardDataset(str(directory), batch_size=2, image_size=8, shuffle_buffer=3, seed=5)

    full = list(DataLoader(make(), batch_size=None, num_workers=workers))
    cut = len(full) // 2
    positions = {}
    for b in full[:cut]:
        for v, st in b["__state__"]["streams"].items():
            positions[(v, b["__state__"]["worker"])] = st["position"]
    resumed = make()
    resumed.start_positions = positions
    rest = list(DataLoader(resumed, batch_size=None, num_workers=workers))
    # Per worker, the resumed stream is exactly the remainder of the uninterrupted one.
    for w in range(max(workers, 1)):
        expect = [b["__key__"] for b in full[cut:] if b["__state__"]["worker"] == w]
        got = [b["__key__"] for b in rest if b["__state__"]["worker"] == w]
        assert got == expect
    done = [k for b in full[:cut] for k in b["__key__"]] + [k for b in rest for k in b["__key__"]]
    assert sorted(done) == sorted(keys)


# ---- broken input of every kind (issue: reliability) ----------------------------------------------


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header (valid CRC) claims width x height: a decompression bomb's calling card."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat) - 4)
        + idat
        + struct.pack(">I", zlib.crc32(idat))
    )


class _Boom:
    """Unpickling this would create a file: proof that a .pyd member was never unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_broken_samples_of_every_kind_are_dropped_counted_and_every_good_key_kept(tmp_path):
    import pickle

    good = [simple_sample(f"g{i}") for i in range(6)]
    jpeg = image_bytes(64, 64)
    canary = tmp_path / "unpickled"
    bad = [
        {"__key__": "html", "jpg": b"<!DOCTYPE html><html><body>Not Found</body></html>", "txt": "x"},
        {"__key__": "bomb", "png": _png_header_claiming(20000, 20000), "txt": "x"},
        {"__key__": "cut", "jpg": jpeg[: len(jpeg) // 2], "txt": "x"},
        {"__key__": "nocap", "jpg": image_bytes()},
        {"__key__": "emptycap", "jpg": image_bytes(), "txt": "   "},
        {"__key__": "latin1", "jpg": image_bytes(), "txt": "caf\xe9".encode("latin-1")},
        {"__key__": "g1", "jpg": image_bytes(), "txt": "the same key again, later in the shard"},
        {"__key__": "../escape", "jpg": image_bytes(), "txt": "x"},
    ]
    adjacent_duplicate = {"__key__": "g5", "jpg": image_bytes(), "txt": "directly after the first g5"}
    pyd = {**simple_sample("pyd"), "pyd": pickle.dumps(_Boom(str(canary)))}
    write_tar(tmp_path / "0.tar", [*good[:3], *bad, *good[3:], adjacent_duplicate, pyd])
    keys, skips = run_epoch(_dataset(tmp_path), 0)
    assert sorted(keys) == sorted([s["__key__"] for s in good] + ["pyd"])  # exactly the good ones
    assert skips == {
        "decode_error": 2,  # HTML bytes named .jpg, a JPEG cut in half
        "image_too_large": 1,  # refused from the header, nothing decoded
        "missing_caption": 1,
        "filter_caption_length": 1,  # an empty caption
        "bad_field": 1,  # a caption that is not UTF-8
        "duplicate_key": 2,  # later in the shard, and directly after the first
        "unsafe_key": 1,
    }
    assert not canary.exists(), "a .pyd member was unpickled"


def test_zero_byte_shard_and_a_cut_inside_a_member_header(tmp_path):
    samples = [simple_sample(f"k{i}") for i in range(3)]
    path = write_tar(tmp_path / "0.tar", samples)
    with tarfile.open(path) as tar:
        header = next(m for m in tar.getmembers() if m.name == "k2.jpg").offset
    _truncate(path, header + 100)  # inside k2's first header block
    (tmp_path / "1.tar").write_bytes(b"")
    keys, skips = run_epoch(_dataset(tmp_path), 0)
    assert keys == ["k0", "k1"]
    assert skips == {"truncated_shard": 2}  # a zero-byte file is a tar cut before its first header


@pytest.mark.parametrize("drop_last", [False, True])
def test_playing_two_data_ranks_keeps_batches_whole_and_every_sample_once(make_shards, drop_last):
    directory, keys = make_shards([5, 4, 6, 3, 7])
    ds = ShardDataset(
        str(directory), batch_size=4, image_size=8, shuffle_buffer=3, seed=2, drop_last=drop_last
    )
    ds.data_ranks, ds.data_world_size = [0, 1], 2
    seen, dropped = [], 0
    for batch in DataLoader(ds, batch_size=None, num_workers=0):
        assert len(batch["__key__"]) <= 4 and (not drop_last or len(batch["__key__"]) in (0, 4))
        seen += batch["__key__"]
        dropped = batch["__state__"]["skips"]["partial_batch_dropped"]
    assert len(seen) == len(set(seen))
    assert len(seen) + dropped == len(keys) and (dropped > 0) == drop_last


@pytest.mark.parametrize(
    "size, image_size, crop_size, crop",
    [
        ((341, 256), 224, 224, Crop.RANDOM),  # 4:3 photo, shrink 0.875
        ((200, 300), 64, 48, Crop.RANDOM),  # portrait, shrink < 0.5 (reducing_gap)
        ((40, 30), 64, 64, Crop.CENTER),  # enlarged
        ((64, 64), 64, 32, Crop.RANDOM),  # no resize: a plain crop
    ],
)
def test_resize_crop_resamples_only_the_crop_with_the_full_resizes_pixels(size, image_size, crop_size, crop):
    """resize_crop resamples the crop's source box; the reference resizes the whole image, then crops."""
    w, h = size
    img = Image.fromarray(photo_like(np.random.default_rng(0), h, w))
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    for seed in range(4):
        rng = random.Random(seed)
        if crop == Crop.RANDOM:
            left, top = rng.randint(0, new_w - crop_size), rng.randint(0, new_h - crop_size)
        else:
            left, top = (new_w - crop_size) // 2, (new_h - crop_size) // 2
        full = img.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None if scale > 0.5 else 3.0)
        reference = torch.from_numpy(
            np.asarray(full.crop((left, top, left + crop_size, top + crop_size))).copy()
        )
        out = resize_crop(img, image_size, crop_size, crop=crop, rng=random.Random(seed))
        assert out.shape == (3, crop_size, crop_size) and out.dtype == torch.uint8
        diff = (out.permute(1, 2, 0).int() - reference.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.01, (seed, diff.max(), diff.float().mean())


def test_npy_fields_load_as_numpy_loads_them_parsing_each_header_once():
    """Embedding shards repeat one header per field: parsed once, the arrays equal np.load's."""
    from data import pipeline

    def npy(array, version=None):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, array, version=version, allow_pickle=True)
        return buf.getvalue()

    arrays = [
        np.arange(12, dtype=np.float16).reshape(3, 4),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.arange(6, dtype=">i4"),
        np.array(7, dtype=np.int32),
        np.zeros((0, 5), dtype=np.float32),
    ]
    pipeline._NPY_HEADERS.clear()
    for version in (None, (2, 0)):
        for array in arrays:
            for _ in range(3):
                out = pipeline._load_npy(npy(array, version))
                assert out.dtype == array.dtype and out.shape == array.shape and np.array_equal(out, array)
    assert len(pipeline._NPY_HEADERS) == len(arrays)  # version 1 headers only; version 2 goes to np.load
    for bad, match in [
        (npy(np.arange(4.0))[:-3], "29 bytes, its header says 32"),  # truncated, with its header cached
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'", "EOF"),
        (npy(np.array([{}], dtype=object)), "Python objects"),
        (b"not an npy file at all", "pickled|magic"),
        (npy(np.arange(4.0)).replace(b"'<f8'", b"'<f5'"), "descr"),  # a flipped bit: no such dtype
    ]:
        with pytest.raises(ValueError, match=match):
            pipeline._load_npy(bad)


def test_tar_headers_with_a_bad_checksum_are_corrupt_and_signed_checksums_are_accepted(tmp_path):
    from data.shards import CorruptShard, read_tar

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("caf\u00e9.txt")  # bytes above 127: the signed and unsigned sums differ
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    data = bytearray(buf.getvalue())
    assert [(m.name, m.data) for m in read_tar(io.BytesIO(bytes(data)))] == [("caf\u00e9.txt", b"abc")]
    header = bytes(data[:512])
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])
    data[148:156] = b"%06o\0 " % signed  # what old writers that sum signed chars store
    assert [m.data for m in read_tar(io.BytesIO(bytes(data)))] == [b"abc"]
    data[148:156] = b"%06o\0 " % (signed + 1)
    with pytest.raises(CorruptShard, match="bad tar header checksum"):
        list(read_tar(io.BytesIO(bytes(data))))


def test_non_utf8_long_names_and_damaged_pax_records_are_read_or_counted_not_raised():
    """Extended headers are outside the header checksum: a GNU long name in Latin-1 (tar of scraped files)
    raised UnicodeDecodeError and a damaged pax record ValueError, each out of the loader worker, ending
    the run. The name is read with the undecodable bytes replaced, as short names are; the record makes
    the shard corrupt (counted, the rest of it skipped)."""
    from data.shards import CorruptShard, _parse_pax

    long = "caf\xe9_" * 30 + ".txt"  # > 100 bytes: a GNU long-name record
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo(long)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    members = list(read_tar(io.BytesIO(buf.getvalue())))
    assert [m.data for m in members] == [b"abc"] and members[0].name.startswith("caf\ufffd_")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k" * 120 + ".txt")  # > 100 characters: a pax path record
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    data = buf.getvalue()
    at = data.index(b" path=kkk")
    with pytest.raises(CorruptShard, match="bad pax record at byte 0"):
        list(read_tar(io.BytesIO(data[: at - 3] + b"x9z" + data[at:])))  # its length digits damaged
    with pytest.raises(CorruptShard, match="bad pax size '3x'"):
        _parse_pax(b"11 size=3x\n")
    with pytest.raises(CorruptShard, match="bad pax record length 1"):
        _parse_pax(b"1 size=3\n")


def test_npy_headers_are_read_without_ast_and_as_numpy_reads_them(tmp_path, monkeypatch):
    """Loader workers read .npy headers (embedding shards, clip-retrieval parts) without ast.literal_eval,
    which numpy uses: in a forked worker of CPython 3.11 before 3.11.8 it failed once in CI with "AST
    constructor recursion depth mismatch" (gh-106905). Headers numpy writes otherwise (structured dtypes)
    still go to numpy."""
    import ast
    import io

    from data.pipeline import _NPY_HEADERS, _load_npy, open_npy

    arrays = {
        "f16": np.zeros((4, 8), np.float16), "i64": np.arange(5), "fortran": np.ones((2, 3), np.float32, order="F"),
        "scalar": np.array(3.5), "big_endian": np.arange(4, dtype=">f8").reshape(2, 2), "bool": np.array([True, False]),
    }  # fmt: skip
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    _NPY_HEADERS.clear()

    def refuse(*args, **kwargs):
        raise AssertionError("ast.literal_eval called")

    monkeypatch.setattr(ast, "literal_eval", refuse)
    for name, array in arrays.items():
        buf = io.BytesIO()
        np.save(buf, array)
        for loaded in (open_npy(tmp_path / f"{name}.npy"), _load_npy(buf.getvalue())):
            assert loaded.dtype == array.dtype and loaded.shape == array.shape, name
            assert np.array_equal(np.asarray(loaded), array), name
    monkeypatch.undo()
    good = (tmp_path / "f16.npy").read_bytes()
    (tmp_path / "flipped.npy").write_bytes(good.replace(b"'<f2'", b"'<f3'"))  # a TypeError escaped before
    with pytest.raises(ValueError, match="descr"):
        open_npy(tmp_path / "flipped.npy")
    (tmp_path / "magic.npy").write_bytes(good[:6])
    with pytest.raises(ValueError):
        open_npy(tmp_path / "magic.npy")
    structured = np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")])
    np.save(tmp_path / "structured.npy", structured)
    assert open_npy(tmp_path / "structured.npy").dtype == structured.dtype


def test_16_bit_grey_pngs_decode_to_their_grey_and_float_images_are_refused():
    """PIL's convert("RGB") clips 16-bit grey to 8 bits: every such PNG (mid-grey 32768 too) was trained on
    as a white image under its caption. They are scaled to 8 bits now; float images (mode F, TIFF), whose
    range is unknown, are a decode error."""
    from data.transforms import decode_image

    for value, want in ((32768, 128), (1000, 4), (65535, 255)):
        buf = io.BytesIO()
        Image.fromarray(np.full((4, 6), value, np.uint16)).save(buf, format="PNG")
        img, size = decode_image(buf.getvalue())
        assert img.mode == "RGB" and size == (6, 4)
        assert np.asarray(img)[0, 0].tolist() == [want] * 3, value
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(buf, format="TIFF")
    with pytest.raises(ValueError, match="floating-point pixels"):
        decode_image(buf.getvalue())


def test_transparent_images_are_matted_onto_white_as_img2dataset_writes_them():
    """convert("RGB") dropped alpha: a red square on a transparent background trained as red on black
    (the colour stored under transparent pixels) where img2dataset's shards hold it on white."""
    from data.transforms import decode_image

    rgba = np.zeros((4, 4, 4), np.uint8)  # transparent black
    rgba[1:3, 1:3] = (255, 0, 0, 255)  # an opaque red square
    rgba[0, 0] = (0, 0, 255, 128)  # half-transparent blue
    for mode in ("RGBA", "P", "LA"):
        source = Image.fromarray(rgba, "RGBA")
        if mode == "P":
            source = source.convert("P")  # keeps a transparent palette entry
        elif mode == "LA":
            source = source.convert("LA")
        buf = io.BytesIO()
        source.save(buf, format="PNG")
        img, size = decode_image(buf.getvalue())
        pixels = np.asarray(img).astype(int)
        assert img.mode == "RGB" and size == (4, 4)
        assert pixels[3, 3].tolist() == [255, 255, 255], mode  # fully transparent: white
        if mode == "RGBA":
            assert pixels[1, 1].tolist() == [255, 0, 0]
            assert np.abs(pixels[0, 0] - [127, 127, 255]).max() <= 1  # half blue, half white


def test_npy_fields_of_two_shapes_in_a_batch_are_an_error_naming_the_samples(tmp_path):
    """Embedding shards of two CLIPs (128-d and 256-d) in one spec failed in np.stack ("all input arrays
    must have the same shape"), naming no shard, key or field."""

    def npy(dim: int) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.zeros(dim, np.float16))
        return buf.getvalue()

    write_tar(tmp_path / "a.tar", [{"__key__": f"a{i}", "txt": "x", "img_emb.npy": npy(8)} for i in range(3)])
    write_tar(tmp_path / "b.tar", [{"__key__": "b0", "txt": "x", "img_emb.npy": npy(4)}])
    ds = ShardDataset(
        f"{tmp_path}/a.tar::{tmp_path}/b.tar",
        batch_size=4,
        image_size=None,
        npy_fields=["img_emb.npy"],
        shuffle_buffer=0,
        shuffle_shards=False,
    )
    with pytest.raises(ValueError) as err:
        run_epoch(ds, 0)
    said = str(err.value)
    assert "img_emb.npy: 1 of 4 samples of a batch have another shape than (8,)" in said
    assert f"{tmp_path}/b.tar: b0 (4,)" in said


def test_bmp_gif_and_tiff_images_are_read_not_counted_missing(tmp_path):
    """Only jpg/png/webp members counted as images: a shard of BMPs trained nothing, every sample skipped
    as missing_image."""
    samples = []
    for i, fmt in enumerate(("BMP", "GIF", "TIFF", "PPM")):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format=fmt)
        ext = {"TIFF": "tif"}.get(fmt, fmt.lower())
        samples.append({"__key__": f"{i:04d}", ext: buf.getvalue(), "txt": "a red square"})
    write_tar(tmp_path / "00000.tar", samples)
    ds = ShardDataset(str(tmp_path), batch_size=4, image_size=8, shuffle_buffer=0)
    batches = list(DataLoader(ds, batch_size=None))
    assert sum(len(b["__key__"]) for b in batches) == 4
    red = batches[0]["image"][:, 0].float().mean().item()
    assert red > 150
