"""Tests for data/synthetic.py: determinism, shard layout, scene invariants, rendering and the CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data.synthetic import (
    COLOURS,
    COUNT_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    caption_for,
    main,
    make_sample,
    make_scene,
    render,
    write_shards,
)

N = 500  # scenes checked by the invariant tests (about 25 ms of scene generation)


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard in ``out``."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("*.tar")):
        for name, data in _members(tar_path):
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    return samples


def _boxes_apart(a: dict, b: dict) -> bool:
    gap = (a["size"] + b["size"]) / 2
    return abs(a["x"] - b["x"]) > gap or abs(a["y"] - b["y"]) > gap


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_byte_identical_tars(tmp_path):
    a = write_shards(tmp_path / "a", 7, seed=3, shard_size=4)
    b = write_shards(tmp_path / "b", 7, seed=3, shard_size=4)
    assert [p.name for p in a] == ["00000.tar", "00001.tar"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()


def test_samples_do_not_depend_on_shard_size_or_workers(tmp_path):
    one = _samples(tmp_path / "one") if write_shards(tmp_path / "one", 9, shard_size=9) else None
    three = _samples(tmp_path / "three") if write_shards(tmp_path / "three", 9, shard_size=3) else None
    par = _samples(tmp_path / "par") if write_shards(tmp_path / "par", 9, shard_size=2, workers=2) else None
    assert one == three == par
    assert len(one) == 9


def test_start_index_continues_the_same_dataset(tmp_path):
    write_shards(tmp_path / "whole", 6, shard_size=3)
    write_shards(tmp_path / "parts", 3, shard_size=3)
    write_shards(tmp_path / "parts", 3, shard_size=3, start_index=3)
    assert _samples(tmp_path / "whole") == _samples(tmp_path / "parts")
    assert json.loads((tmp_path / "parts" / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3}
    with pytest.raises(ValueError, match="start_index"):
        write_shards(tmp_path / "bad", 3, shard_size=3, start_index=2)


def test_different_seeds_give_different_samples():
    for i in range(20):
        assert make_sample(0, i, 32) == make_sample(0, i, 32)
    assert sum(make_scene(0, i) != make_scene(1, i) for i in range(20)) == 20


# --------------------------------------------------------------------------------------------- layout


def test_shard_layout_stats_and_sizes(tmp_path):
    paths = write_shards(tmp_path, 5, shard_size=2, seed=4, image_size=16)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    names = [name for p in paths for name, _ in _members(p)]
    expected = [f"{i:09d}.{ext}" for i in range(5) for ext in ("jpg", "txt", "json")]
    assert names == expected  # contiguous, in order jpg, txt, json
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "00000.tar": 2,
        "00001.tar": 2,
        "00002.tar": 1,
    }
    stats = json.loads((tmp_path / "00002_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 1
    assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
    assert stats["seed"] == 4 and stats["image_size"] == 16
    assert {"start_time", "end_time", "duration"} <= stats.keys()
    assert not list(tmp_path.glob("*.tmp"))


def test_json_schema_and_image(tmp_path):
    write_shards(tmp_path, 3, seed=2, image_size=24, fmt="png")
    for key, sample in _samples(tmp_path).items():
        assert set(sample) == {"png", "txt", "json"}
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["index"] == int(key) and meta["seed"] == 2
        assert meta["caption"] == sample["txt"].decode("utf-8")
        assert meta["status"] == "success" and meta["url"] is None
        assert meta["width"] == meta["height"] == meta["original_width"] == meta["original_height"] == 24
        scene = meta["scene"]
        assert set(scene) >= {"background", "objects", "groups", "relation"}
        for o in scene["objects"]:
            assert {"shape", "colour", "rgb", "x", "y", "size"} <= o.keys()
            assert o["rgb"] == list(COLOURS[o["colour"]])
        assert Image.open(io.BytesIO(sample["png"])).size == (24, 24)


# --------------------------------------------------------------------------------------- scene invariants


def test_caption_states_every_group():
    for i in range(N):
        scene = make_scene(0, i)
        caption = caption_for(scene, 0, i)
        for g in scene["groups"]:
            noun = g["shape"] if g["count"] == 1 else PLURALS[g["shape"]]
            word = ("an" if g["colour"] == "orange" else "a") if g["count"] == 1 else COUNT_WORDS[g["count"]]
            assert f"{word} {g['colour']} {noun}" in caption, (caption, g)
        rel = scene["relation"]
        if len(scene["groups"]) == 2:
            assert (" and " in caption) == (rel is None), caption
        if rel is not None:
            assert rel["relation"] in RELATIONS and f" {rel['relation']} " in caption


def test_groups_and_counts():
    for i in range(N):
        scene = make_scene(0, i)
        groups = scene["groups"]
        assert 1 <= len(groups) <= 2 and 1 <= len(scene["objects"]) <= 4
        assert sum(g["count"] for g in groups) == len(scene["objects"])
        if len(groups) == 2:
            assert (groups[0]["colour"], groups[0]["shape"]) != (groups[1]["colour"], groups[1]["shape"])
        for o in scene["objects"]:
            g = groups[o["group"]]
            assert (o["colour"], o["shape"]) == (g["colour"], g["shape"])


def test_stated_relation_holds_for_every_cross_group_pair():
    stated = 0
    for i in range(N):
        scene = make_scene(0, i)
        rel = scene["relation"]
        if rel is None:
            continue
        stated += 1
        subs = [o for o in scene["objects"] if o["group"] == rel["subject"]]
        objs = [o for o in scene["objects"] if o["group"] == rel["object"]]
        for a in subs:
            for b in objs:
                holds = {
                    "left of": a["x"] < b["x"],
                    "right of": a["x"] > b["x"],
                    "above": a["y"] < b["y"],  # y grows downwards, as in the image
                    "below": a["y"] > b["y"],
                }[rel["relation"]]
                assert holds, (i, rel, a, b)
    assert stated > N // 5  # relations are common, not a corner case


def test_objects_do_not_overlap_and_stay_inside():
    for i in range(N):
        objects = make_scene(0, i)["objects"]
        for k, a in enumerate(objects):
            assert 0.14 <= a["size"] and (len(objects) > 1 or a["size"] >= 0.18)
            for c in (a["x"], a["y"]):
                assert a["size"] / 2 <= c <= 1 - a["size"] / 2
            for b in objects[k + 1 :]:
                assert _boxes_apart(a, b), (i, a, b)


def test_variety_over_many_samples():
    scenes = [make_scene(0, i) for i in range(N)]
    objects = [o for s in scenes for o in s["objects"]]
    counts = [len(s["objects"]) for s in scenes]
    assert set(counts) == {1, 2, 3, 4}
    assert 0.25 < counts.count(1) / N < 0.45  # single-object scenes for zero-shot eval
    assert len({o["shape"] for o in objects}) >= 6 == len(SHAPES)
    assert len({o["colour"] for o in objects}) >= 8 <= len(COLOURS)
    assert len({s["background"][0] for s in scenes}) > 10
    assert {s["relation"]["relation"] for s in scenes if s["relation"]} == set(RELATIONS)


def test_background_never_collides_with_object_colours():
    for i in range(N):
        bg = make_scene(0, i)["background"]
        assert bg[0] == bg[1] == bg[2]
        assert all(max(abs(c - g) for c, g in zip(rgb, bg)) > 60 for rgb in COLOURS.values())


# -------------------------------------------------------------------------------------------- rendering


def test_centre_pixel_is_object_colour_png():
    for i in range(100):
        meta = json.loads(make_sample(0, i, 64, fmt="png")["json"])
        img = Image.open(io.BytesIO(make_sample(0, i, 64, fmt="png")["png"])).convert("RGB")
        bg = tuple(meta["scene"]["background"])
        assert img.getpixel((0, 0)) == bg or any(
            o["x"] - o["size"] / 2 < 0.02 and o["y"] - o["size"] / 2 < 0.02 for o in meta["scene"]["objects"]
        )
        for o in meta["scene"]["objects"]:
            assert img.getpixel((int(o["x"] * 64), int(o["y"] * 64))) == tuple(o["rgb"]), (i, o)


def test_render_is_exact_flat_colours():
    scene = make_scene(0, 3)
    img = render(scene, 48)
    allowed = {tuple(scene["background"])} | {tuple(o["rgb"]) for o in scene["objects"]}
    assert {c for _, c in img.getcolors(48 * 48)} == allowed  # no anti-aliasing, every object visible


def test_jpg_centre_is_close_to_rgb():
    sample = make_sample(0, 5, 64)
    img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    for o in json.loads(sample["json"])["scene"]["objects"]:
        pixel = img.getpixel((int(o["x"] * 64), int(o["y"] * 64)))
        assert max(abs(p - c) for p, c in zip(pixel, o["rgb"])) < 24


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_shards_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["--out", str(out), "--samples", "5", "--shard-size", "2", "--image-size", "16"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "5 samples" in line and "3 shards" in line and "samples/s" in line


@pytest.mark.parametrize(
    "args, option",
    [
        (["--samples", "0"], "--samples"),
        (["--samples", "2", "--image-size", "4"], "--image-size"),
        (["--samples", "2", "--format", "gif"], "--format"),
        (["--samples", "2", "--shard-size", "0"], "--shard-size"),
        (["--samples", "2", "--quality", "101"], "--quality"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, option):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "x"), *args])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_directory_that_holds_other_files(tmp_path, capsys):
    """--out into a directory of the user's shards overwrote 00000.tar, kept the others and wrote a
    sizes.json and marker over all of them (exit 0)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "00003.tar").write_bytes(b"user data")
    for out, said in ((mine, "not empty (00003.tar"), (mine / "00003.tar", "a file, expected a directory")):
        with pytest.raises(SystemExit) as exc:
            main(["--out", str(out), "--samples", "2"])
        assert exc.value.code == 2 and f"--out {out}: {said}" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["00003.tar"]


def test_library_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="samples"):
        write_shards(tmp_path, 0)
    with pytest.raises(ValueError, match="image_size"):
        write_shards(tmp_path, 1, image_size=4)
    with pytest.raises(ValueError, match="format"):
        make_sample(0, 0, 16, fmt="gif")


def test_zeroshot_prompts_ensemble_templates_and_the_other_attribute():
    from data import synthetic
    from train.validation import synthetic_prompts

    prompts = synthetic_prompts()
    shapes, colours = len(synthetic.SHAPES), len(synthetic.COLOURS)
    assert set(prompts["shape"]) == set(synthetic.SHAPES) and set(prompts["count"]) == {"1", "2", "3", "4"}
    circle = prompts["shape"]["circle"]
    assert len(circle) == colours * len(synthetic.TEMPLATES)
    assert "a picture of a red circle" in circle and "a red circle on a grey background" in circle
    assert len(prompts["count"]["3"]) == colours * shapes * len(synthetic.TEMPLATES)
    assert "three blue squares" in prompts["count"]["3"]


def test_data_synthetic_never_writes_into_a_users_directory(tmp_path):
    """data=synthetic with data.train_shards pointing at the user's own shards (data=shards forgotten):
    an error naming data=shards, and the directory untouched (nothing written beside it either)."""
    from data.synthetic import MARKER, ensure_synthetic

    laion = tmp_path / "laion"
    laion.mkdir()
    (laion / "00000.tar").write_bytes(b"user data")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(
        ValueError, match="data.train_shards=.*laion is not a synthetic dataset.*select data=shards"
    ):
        ensure_synthetic(str(laion), None, train_samples=8, val_samples=0)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # a new directory is generated (with the marker), then reused; an empty one is filled
    ours = tmp_path / "ours"
    ensure_synthetic(str(ours), str(tmp_path / "empty"), train_samples=8, val_samples=4)
    assert (ours / MARKER).exists() and (ours / "sizes.json").exists()
    (tmp_path / "empty2").mkdir()
    ensure_synthetic(str(ours), str(tmp_path / "empty2"), train_samples=8, val_samples=4)
    assert (tmp_path / "empty2" / "sizes.json").exists()
    # reused only with the sharding asked for (data.synthetic.shard_size is not in the directory's name)
    ensure_synthetic(str(ours), None, train_samples=8, val_samples=0, shard_size=2)  # the 4 shards it has
    with pytest.raises(ValueError, match=r"ours was written with 4 shards of up to 2 samples; "
                       r"data.synthetic.shard_size=1 asks for 8 of up to 1: delete that directory"):  # fmt: skip
        ensure_synthetic(str(ours), None, train_samples=8, val_samples=0, shard_size=1)


def test_ranks_writing_the_dataset_at_once_never_share_a_directory(tmp_path, monkeypatch):
    """Every rank of a launch generates the default dataset if it is missing. Their temporary directories
    were named by process id, which ranks on different nodes share when each node numbers its processes
    from 1 (containers): a second rank, starting while the first writes, wrote into the first's directory
    (one rank crashed on a shard the other had renamed, and a stray .tar.tmp was left in the dataset)."""
    from data import synthetic

    monkeypatch.setattr(synthetic.os, "getpid", lambda: 1)
    out, used = tmp_path / "train", []
    real = synthetic.write_shards

    def write(tmp, *args, **kwargs):
        used.append(Path(tmp))
        if len(used) == 1:  # another rank starts while this one writes, and finishes first
            synthetic.ensure_synthetic(str(out), None, train_samples=8, val_samples=0)
        real(tmp, *args, **kwargs)

    monkeypatch.setattr(synthetic, "write_shards", write)
    synthetic.ensure_synthetic(str(out), None, train_samples=8, val_samples=0)
    assert len(used) == 2 and used[0] != used[1], used
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # the later writer's copy removed
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == [f"{k:05d}.tar" for k in range(4)]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_ensure_synthetic_writes_a_large_split_with_a_process_per_core(tmp_path, monkeypatch):
    """The one-GPU preset writes 100,000 samples before its first step: with every core, not one. The
    writers are forked by a fresh `python -m data.synthetic`, never by the (training) caller."""
    from data import synthetic

    monkeypatch.setattr(synthetic, "PARALLEL_FROM", 40)
    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 2)
    writes = []
    real = synthetic.write_shards
    monkeypatch.setattr(synthetic, "write_shards", lambda *a, **kw: writes.append(a[1]) or real(*a, **kw))
    synthetic.ensure_synthetic(str(tmp_path / "t"), str(tmp_path / "v"), train_samples=48, val_samples=8)
    assert writes == [8]  # the small split in this process; the large one in a subprocess
    assert json.loads((tmp_path / "t" / "sizes.json").read_text()) == {f"{k:05d}.tar": 12 for k in range(4)}
    real(tmp_path / "ref", 48, seed=0, image_size=64, shard_size=12)
    for k in range(4):  # the same bytes as one process writes
        assert (tmp_path / "t" / f"{k:05d}.tar").read_bytes() == (
            tmp_path / "ref" / f"{k:05d}.tar"
        ).read_bytes()
    monkeypatch.setattr(
        synthetic.sys, "executable", "false"
    )  # a writer that fails: an error naming the split
    with pytest.raises(RuntimeError, match="writing .*t3 failed"):
        synthetic.ensure_synthetic(str(tmp_path / "t3"), None, train_samples=48, val_samples=0)
    assert not (tmp_path / "t3").exists()


def test_debug_fast_sizes_never_make_a_users_shard_paths_synthetic(tmp_path):
    """debug=fast's synthetic sizes merged into data=shards too, which then wrote synthetic shapes into a
    data.train_shards path that did not exist yet and trained on them (exit 0). Only data=synthetic
    generates; data=shards with a new path gets the spec error when it reads."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    mine = tmp_path / "my_new_shards"
    cfg = compose_config(
        ["debug=fast", "data=shards", f"data.train_shards={mine}", f"data.val_shards={mine}"]
    )
    dm = instantiate(cfg.data)
    dm.prepare_data()
    assert dm.synthetic is None and not mine.exists()
    cfg = compose_config(["debug=fast", f"paths.data_dir={tmp_path / 'data'}"])
    dm = instantiate(cfg.data)
    assert dm.synthetic["train_samples"] == 256 and "generate" not in dm.synthetic
