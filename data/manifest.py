"""Shard manifests: the sample count, byte size and sha256 of every shard, checked before training.

    python -m data.manifest write SHARDS [-o manifest.json]   # count, size, hash every shard
    python -m data.manifest check SHARDS manifest.json [--level size|sha256]

A manifest is JSON: ``{"version": 1, "shards": {name: {"samples", "bytes", "sha256"}}}``, keyed by the
shard's file name (so the dataset can move; names must be unique, as img2dataset's are). ``write``
reads every shard once (hash and tar walk in the same pass), refuses a broken shard (truncated, not a
tar) instead of recording it, and writes the file atomically. Its counts double as ``sizes.json`` for
resampled mode (``python -m data.manifest write SHARDS --sizes`` writes that too).

Training checks the shards against ``data.manifest`` before the first step (data/datamodule.py): every
shard of ``data.train_shards`` must be listed, present, and of the listed size (``size``, a stat per
shard) or also hash (``sha256``, reads every byte; each rank hashes its share). Any mismatch stops every
rank with one error naming each shard and what differs.

A restart does not hash again what it verified before: a local shard that matched is recorded, with its
size and modification time, in ``<manifest>.verified.<writer>.json`` beside the manifest (one file per
rank, all of them read back, so a restart on another number of ranks reuses them). It is hashed again
only when its size or modification time changed, or the manifest's sha256 did. Where the manifest's
directory is read-only the check works as before, without the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from data.progress import Progress
from data.shards import ShardError, ShardSpecError, expand_shards, group_samples, open_shard, read_tar

log = logging.getLogger(__name__)

LEVELS = ("size", "sha256")


class ManifestError(ValueError):
    """A manifest that cannot be read, or shards that do not match it."""


class _Hashing:
    """A read-through stream wrapper that hashes and counts every byte read."""

    def __init__(self, stream) -> None:
        self.stream, self.sha, self.bytes = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def shard_name(url: str) -> str:
    return (
        os.path.basename(url.rstrip("/").split(" ")[-1]) if url.startswith("pipe:") else os.path.basename(url)
    )


def describe_shard(url: str) -> dict:
    """{samples, bytes, sha256} of one shard; raises ManifestError when it is not a complete tar."""
    try:
        with open_shard(url) as raw:
            stream = _Hashing(raw)
            samples = sum(1 for _ in group_samples(read_tar(stream)))
            stream.drain()  # the end-of-archive padding belongs to the file too
    except ShardError as e:
        raise ManifestError(f"shard {url}: {e}; a manifest records complete shards only") from None
    except OSError as e:
        raise ManifestError(f"shard {url}: unreadable ({e})") from None
    return {"samples": samples, "bytes": stream.bytes, "sha256": stream.sha.hexdigest()}


def write_manifest(spec: str | Sequence[str], out: str | os.PathLike) -> dict:
    urls = expand_shards(spec)
    names: dict[str, str] = {}
    for url in urls:
        name = shard_name(url)
        if name in names:
            raise ManifestError(
                f"shards {names[name]} and {url} have the same file name {name!r}: a manifest needs unique names"
            )
        names[name] = url
    progress = Progress(len(names), "manifest: hashing", interval=10.0)
    shards = {}
    for name, url in names.items():
        shards[name] = describe_shard(url)
        progress.step()
    manifest = {"version": 1, "shards": shards}
    _write_json(Path(out), manifest)
    return manifest


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_manifest(path: str | os.PathLike) -> dict[str, dict]:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ManifestError(
            f"data.manifest={str(path)!r}: no such file (write one with `python -m data.manifest write`)"
        ) from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"data.manifest={str(path)!r}: not JSON ({e})") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, dict) or not all(
        isinstance(v, dict) and {"samples", "bytes", "sha256"} <= v.keys() for v in shards.values()
    ):
        raise ManifestError(
            f"data.manifest={str(path)!r}: expected {{'shards': {{name: {{'samples', 'bytes', 'sha256'}}}}}}"
        )
    return shards


def check_shards(
    urls: Sequence[str],
    manifest: dict[str, dict],
    *,
    level: str = "sha256",
    cache: VerifiedCache | None = None,
) -> list[str]:
    """One line per shard of ``urls`` that does not match ``manifest``; empty when all do. With ``cache``,
    a local shard verified before with the same size and modification time is not hashed again."""
    if level not in LEVELS:
        raise ValueError(f"data.manifest_check={level!r}: expected one of {LEVELS}")
    problems = []
    progress = Progress(len(urls), f"manifest: checking ({level})", interval=10.0)
    for url in urls:
        entry = manifest.get(shard_name(url))
        if cache is not None and level == "sha256" and entry is not None and cache.verified(url, entry):
            progress.step(detail="verified before")
            continue
        problem = _shard_problem(url, entry, level)
        if problem:
            problems.append(problem)
        elif cache is not None and level == "sha256":
            cache.record(url, entry)
        progress.step()
    if cache is not None:
        cache.save()
    return problems


class VerifiedCache:
    """Shards this dataset's manifest check already hashed: name -> size, mtime_ns and the sha256 they
    matched. ``writer`` names this process's file (a rank); every writer's file is read."""

    def __init__(self, manifest: str | os.PathLike, writer: str | int = 0) -> None:
        self.manifest = Path(manifest)
        self.path = self.manifest.with_name(f"{self.manifest.name}.verified.{writer}.json")
        self.known: dict[str, dict] = {}
        for part in sorted(self.manifest.parent.glob(f"{self.manifest.name}.verified.*.json")):
            try:
                self.known.update(json.loads(part.read_text()))
            except (OSError, ValueError):
                continue  # a damaged cache only costs a re-hash
        self.new: dict[str, dict] = {}

    @staticmethod
    def _stat(url: str) -> dict | None:
        if url.startswith("pipe:") or "://" in url:
            return None  # object stores: no modification time to trust
        try:
            st = os.stat(url)
        except OSError:
            return None
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}

    def verified(self, url: str, entry: dict) -> bool:
        seen, now = self.known.get(shard_name(url)), self._stat(url)
        return bool(seen and now and seen == {**now, "sha256": entry["sha256"]})

    def record(self, url: str, entry: dict) -> None:
        if (now := self._stat(url)) is not None:
            self.new[shard_name(url)] = {**now, "sha256": entry["sha256"]}

    def save(self) -> None:
        if not self.new:
            return
        mine = {}
        if self.path.exists():
            try:
                mine = json.loads(self.path.read_text())
            except (OSError, ValueError):
                mine = {}
        try:
            _write_json(self.path, {**mine, **self.new})
        except OSError as e:  # a read-only dataset directory: check without the cache
            log.warning("manifest: cannot record verified shards in %s (%s)", self.path, e.strerror)
        self.known.update(self.new)
        self.new = {}


def _shard_problem(url: str, entry: dict | None, level: str) -> str | None:
    if entry is None:
        return f"{url}: not in the manifest"
    if level == "size" and not url.startswith("pipe:") and "://" not in url:
        try:
            size = os.path.getsize(url)
        except OSError as e:
            return f"{url}: unreadable ({e.strerror})"
        return f"{url}: {size} bytes, the manifest says {entry['bytes']}" if size != entry["bytes"] else None
    try:
        found = describe_shard(url)  # a pipe's size is only known by reading it, at either level
    except ManifestError as e:
        return str(e).removeprefix("shard ")
    for key in ("bytes", "sha256", "samples") if level == "sha256" else ("bytes",):
        if found[key] != entry[key]:
            return f"{url}: {key} {found[key]}, the manifest says {entry[key]}"
    return None


def missing_shards(urls: Sequence[str], manifest: dict[str, dict]) -> list[str]:
    """Listed shards that are gone: a directory or glob spec silently matches fewer files when one is
    deleted. A listed shard the spec does not match but that exists is a subset chosen on purpose."""
    local = [u for u in urls if not u.startswith("pipe:") and "://" not in u]
    directories = sorted({os.path.dirname(u) for u in local})
    if len(directories) != 1 or len(local) != len(urls):
        return []  # shards spread over places (or streamed): only the matched ones can be checked
    matched = {shard_name(u) for u in urls}
    return [
        f"{os.path.join(directories[0], name)}: listed in the manifest, not found"
        for name in sorted(manifest)
        if name not in matched and not os.path.exists(os.path.join(directories[0], name))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.manifest", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="count, size and hash every shard of SHARDS")
    w.add_argument("shards")
    w.add_argument("-o", "--out", default=None, help="default: manifest.json next to the first shard")
    w.add_argument("--sizes", action="store_true", help="also write sizes.json (name -> samples) next to it")
    c = sub.add_parser("check", help="check SHARDS against a manifest")
    c.add_argument("shards")
    c.add_argument("manifest")
    c.add_argument("--level", choices=LEVELS, default="sha256")
    args = parser.parse_args(argv)
    try:
        urls = expand_shards(args.shards)
        if args.command == "write":
            out = Path(args.out or Path(urls[0]).parent / "manifest.json")
            manifest = write_manifest(urls, out)
            total = sum(e["samples"] for e in manifest["shards"].values())
            print(f"{out}: {len(manifest['shards'])} shards, {total} samples")
            if args.sizes:
                _write_json(
                    out.parent / "sizes.json", {n: e["samples"] for n, e in manifest["shards"].items()}
                )
            return 0
        manifest = load_manifest(args.manifest)
        problems = missing_shards(urls, manifest) + check_shards(urls, manifest, level=args.level)
    except (ShardSpecError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    print(f"{len(urls) - len(problems)} of {len(urls)} shards match {args.manifest} ({args.level})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
