"""python -m data.inspect: what a user sees about their shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import image_bytes, simple_sample, write_tar

from data.inspect import main

REPO = Path(__file__).resolve().parents[1]


def _shards(tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    good = [
        simple_sample(f"a{i}", caption="a red square " * (i + 1), size=(64, 48), punsafe=0.01 * i)
        for i in range(5)
    ]
    bad = [
        {"__key__": "b0", "jpg": b"not a jpeg", "txt": "broken image"},
        {"__key__": "b1", "txt": "no image at all"},
        {"__key__": "b2", "jpg": image_bytes(300, 300)},
        simple_sample("b3", size=(16, 16)),
        simple_sample("b4", punsafe=0.9),
    ]
    write_tar(out / "00000.tar", good)
    write_tar(out / "00001.tar", bad)
    write_tar(out / "00002.tar", [])
    return out


def test_inspect_reports_counts_skips_sizes_captions_and_fields(tmp_path, capsys):
    shards = _shards(tmp_path)
    assert (
        main([str(shards / "{00000..00002}.tar"), "--min-width", "20", "--field", "punsafe<0.5", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 3
    assert report["samples"] == 10
    assert report["kept"] == 5
    assert report["skipped"] == {
        "decode_error": 1,
        "missing_image": 1,
        "missing_caption": 1,
        "filter_min_size": 1,
        "filter_punsafe": 1,
        "empty_shard": 1,
    }
    assert report["image_size_hist"] == {"<=64": 5}  # the shorter side of 64x48 images
    assert report["caption_words"]["min"] == 2 and report["caption_words"]["max"] == 15
    assert report["fields"]["txt"] == 9 and report["fields"]["jpg"] == 9 and report["fields"]["json"] == 7
    assert {"key", "caption", "width", "height", "punsafe"} <= set(report["json_fields"])


def test_inspect_cli_text_output_and_no_match_exit_status(tmp_path):
    shards = _shards(tmp_path)
    ok = subprocess.run(
        [sys.executable, "-m", "data.inspect", str(shards)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "samples       10  (kept 7)" in ok.stdout
    assert "decode_error=1" in ok.stdout and "empty_shard=1" in ok.stdout
    missing = str(tmp_path / "nothing-{000..009}.tar")
    bad = subprocess.run(
        [sys.executable, "-m", "data.inspect", missing], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert "matches no file" in bad.stderr and "nothing-{000..009}.tar" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_inspect_rejects_a_malformed_field_condition(tmp_path, capsys):
    assert main([str(_shards(tmp_path)), "--field", "punsafe"]) == 2
    assert "--field 'punsafe'" in capsys.readouterr().err
    assert (
        main([str(_shards(tmp_path)), "--field", "punsafe<<0.1"]) == 2
    )  # (named data.filters.fields.punsafe)
    assert "--field 'punsafe<<0.1': expected NAME followed by a comparison" in capsys.readouterr().err


def test_inspect_skips_duplicate_and_unsafe_keys_as_training_does(tmp_path):
    """It reported every such sample kept, while training skips (and counts toward max_bad_fraction) a key
    seen before in its shard and a key that is absolute or climbs out with '..'."""
    from data.inspect import inspect_shards
    from data.pipeline import ShardDataset

    samples = [simple_sample("a"), simple_sample("a"), simple_sample("../b"), simple_sample("c")]
    write_tar(tmp_path / "00000.tar", samples)
    report = inspect_shards(str(tmp_path / "00000.tar"))
    assert report["kept"] == 2 and report["skipped"] == {"duplicate_key": 1, "unsafe_key": 1}
    ds = ShardDataset(str(tmp_path / "00000.tar"), batch_size=1, image_size=8, shuffle_buffer=0)
    batches = list(ds)
    assert [k for b in batches for k in b["__key__"]] == ["a", "c"]
    assert {k: v for k, v in batches[-1]["__state__"]["skips"].items() if v} == report["skipped"]
