"""Shard specs and raw shard reading.

A *shard spec* names the tar files of a dataset. Accepted forms (and any mix, joined with ``::``):

- a brace pattern: ``/data/laion/{00000..41407}.tar`` (expanded in memory: no file is opened or listed,
  so 100,000 shards expand in well under a second);
- a glob: ``/data/shards/*.tar``;
- a directory: every ``*.tar`` directly inside it (one listing);
- a ``pipe:`` command whose stdout is a tar stream, e.g. ``pipe:aws s3 cp s3://b/{00000..00099}.tar -``
  (brace-expanded like a path; this is how object stores are read);
- a URL that webdataset's ``gopen`` opens: ``https://host/shards/{00000..00099}.tar`` (read through
  ``curl``), ``gs://``, ``sftp://``...; brace-expanded, never globbed (``?`` starts a query) nor checked
  to exist before training. ``file:///data/shards/*.tar`` is a local spec;
- a Python list / Hydra list of any of the above.

:func:`read_tar` streams one shard and yields its members, grouping is done by :func:`group_samples`.
It is a deliberately small ustar/pax/GNU reader instead of :mod:`tarfile` because it must tell a
*truncated* shard from a complete one: a tar cut at a member boundary looks complete to ``tarfile``
(and to webdataset), silently dropping the rest of the shard. Here a stream that ends without the
end-of-archive block raises :class:`TruncatedShard` after yielding every complete member.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand

log = logging.getLogger(__name__)

BLOCK = 512


class ShardSpecError(ValueError):
    """A shard spec that cannot be used (matches nothing, malformed)."""


class ShardError(Exception):
    """A shard that cannot be read to its end. ``reason`` is the skip-counter name."""

    reason = "unreadable_shard"


class TruncatedShard(ShardError):
    reason = "truncated_shard"


class CorruptShard(ShardError):
    reason = "corrupt_shard"


def expand_shards(spec: str | Sequence[str], *, check_exists: bool = True) -> list[str]:
    """Expand a shard spec into an ordered list of shard URLs (local paths or ``pipe:`` commands).

    Raises ShardSpecError naming the spec when it matches nothing. Local brace patterns are not
    stat'ed shard by shard: the expanded paths are checked up to the first that exists (usually the
    first; img2dataset leaves gaps where a shard failed, the first one included), and a missing shard
    is counted as ``unreadable_shard`` while training, never a crash.
    """
    parts = _split_spec(spec)
    if not parts:
        raise ShardSpecError(
            f"empty shard spec {spec!r}: expected a path, brace pattern, glob, directory or pipe:"
        )
    urls: list[str] = []
    missing: list[str] = []
    for part in parts:
        expanded = _expand_one(part)
        local = not part.startswith("pipe:") and _remote_scheme(part) is None
        if check_exists and local and not any(map(os.path.exists, expanded)):
            missing.append(f"{part!r} (first path {expanded[0]!r} does not exist, nor any after it)")
        urls.extend(expanded)
    if missing and len(missing) == len(parts):
        raise ShardSpecError(f"shard spec {spec!r} matches no file: " + "; ".join(missing))
    for m in missing:  # other parts exist: these shards are counted as unreadable while training
        log.warning("shard spec part %s; continuing with the rest", m)
    return urls


def _split_spec(spec: str | Sequence[str]) -> list[str]:
    items = [spec] if isinstance(spec, str) else list(spec)
    parts: list[str] = []
    for item in items:
        parts.extend(p.strip() for p in str(item).split("::") if p.strip())
    return parts


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _remote_scheme(part: str) -> str | None:
    """The URL scheme of a spec part read through webdataset's gopen; None for local paths and file://."""
    m = _URL.match(part)
    return None if m is None or m.group(1).lower() == "file" else m.group(1).lower()


def _expand_one(part: str) -> list[str]:
    if part.startswith("pipe:"):
        return list(braceexpand.braceexpand(part))
    scheme = _remote_scheme(part)
    if scheme is not None:
        import importlib

        schemes = sorted(
            set(importlib.import_module("webdataset.gopen").gopen_schemes) - {"__default__", "pipe"}
        )
        if scheme not in schemes:
            raise ShardSpecError(
                f"shard spec {part!r}: webdataset cannot open {scheme}:// URLs (it opens {', '.join(schemes)}); "
                f"stream them through a command instead, e.g. 'pipe:aws s3 cp {part} -' for S3"
            )
        return list(braceexpand.braceexpand(part))
    if _URL.match(part):  # file:// URL: a local path from here on
        part = part.split("://", 1)[1]
    expanded = list(braceexpand.braceexpand(os.path.expanduser(part)))
    if len(expanded) == 1 and os.path.isdir(expanded[0]):
        found = sorted(str(p) for p in Path(expanded[0]).glob("*.tar"))
        if not found:
            raise ShardSpecError(f"shard spec {part!r}: directory contains no *.tar files")
        return found
    if any(ch in part for ch in "*?["):
        found = sorted(f for pat in expanded for f in glob.glob(pat))
        if not found:
            raise ShardSpecError(f"shard spec {part!r} matches no file")
        return found
    return expanded


def open_shard(url: str) -> io.BufferedIOBase:
    """Open a shard for streaming: a local path, or a ``pipe:`` command or URL (via webdataset's gopen)."""
    if url.startswith("pipe:") or "://" in url:
        import webdataset as wds  # only for pipes/URLs: its gopen handles subprocess lifetime and errors

        return wds.gopen(url, "rb")
    return open(url, "rb", buffering=1 << 20)  # noqa: SIM115 (caller closes)


@dataclass
class Member:
    name: str
    data: bytes


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").strip()
    if not field:
        return 0
    if field[0] & 0x80:  # GNU base-256 encoding for large sizes
        value = int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
        return value
    try:
        return int(field, 8)
    except ValueError:
        raise CorruptShard(f"not a tar header (numeric field {field[:12]!r})") from None


def _read_exact(f, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = f.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _parse_pax(data: bytes) -> dict[str, str]:
    """A pax extended header's "<length> <key>=<value>\\n" records (values undecodable as UTF-8 replaced,
    as in short names); a record that does not parse is a corrupt shard, not a crashed loader."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        try:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
        except ValueError:
            raise CorruptShard(f"bad pax record at byte {pos}: {data[pos : pos + 20]!r}") from None
        if length <= space - pos:
            raise CorruptShard(f"bad pax record length {length} at byte {pos}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    if "size" in out and not out["size"].isdigit():
        raise CorruptShard(f"bad pax size {out['size']!r}")
    return out


def read_tar(stream, *, skip_data_of: frozenset[str] | None = None) -> Iterator[Member]:
    """Yield regular-file members of a tar stream in order.

    Raises TruncatedShard if the stream ends before the end-of-archive block (after yielding every
    complete member) and CorruptShard on a header with a bad checksum. ``skip_data_of``: extensions
    whose payload is skipped (seeked over on local files) and yielded as empty bytes.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(stream, BLOCK)
        if len(header) == 0:
            raise TruncatedShard("stream ended without the tar end-of-archive block")
        if len(header) < BLOCK:
            raise TruncatedShard("stream ended inside a tar header")
        if header == b"\0" * BLOCK:
            return  # end-of-archive: the shard is complete
        stored = _octal(header[148:156])
        computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
        # some old writers sum signed bytes, -256 for each byte above 127 (a Python loop over the
        # block: only when the unsigned sum disagrees)
        if stored != computed and stored != computed - 256 * sum(b > 127 for b in header):
            raise CorruptShard(f"bad tar header checksum (stored {stored}, computed {computed})")
        size = _octal(header[124:136])
        typeflag = header[156:157]
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and prefix:
            name = f"{prefix}/{name}"
        if "size" in pax:
            size = int(pax["size"])
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if typeflag in (b"L", b"x", b"g"):
            data = _read_exact(stream, padded)
            if len(data) < padded:
                raise TruncatedShard("stream ended inside an extended header")
            if typeflag == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
            elif typeflag == b"x":
                pax = _parse_pax(data[:size])
            continue
        if long_name is not None:
            name, long_name = long_name, None
        if "path" in pax:
            name = pax["path"]
        pax = {}
        if typeflag not in (b"0", b"\0", b"7"):
            _skip(stream, padded)  # directories, links, devices: no payload we use
            continue
        ext = name.rsplit("/", 1)[-1].partition(".")[2].lower()
        if skip_data_of is not None and ext in skip_data_of:
            _skip(stream, padded)
            yield Member(name, b"")
            continue
        data = _read_exact(stream, padded)
        if len(data) < size:
            raise TruncatedShard(f"stream ended inside member {name!r}")
        yield Member(name, data[:size])


def _skip(stream, n: int) -> None:
    if n == 0:
        return
    try:
        start = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        if start + n > end:
            raise TruncatedShard("stream ended inside a member")
        stream.seek(start + n)
    except (AttributeError, OSError, io.UnsupportedOperation):
        if len(_read_exact(stream, n)) < n:
            raise TruncatedShard("stream ended inside a member") from None


def split_name(name: str) -> tuple[str, str]:
    """webdataset's key convention: the key is the path up to the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower()


def group_samples(members: Iterator[Member]) -> Iterator[dict[str, bytes | str]]:
    """Group consecutive members sharing a key into samples ``{"__key__": key, ext: bytes, ...}``.

    A ShardError raised by ``members`` propagates after the sample in progress was yielded; that
    sample may be incomplete, so callers check that every field they need is present.
    """
    current: dict[str, bytes | str] | None = None
    try:
        for member in members:
            key, ext = split_name(member.name)
            if not ext:
                continue
            # A new key, or a field the sample already has (the same key again: a duplicate, which the
            # dataset drops as such instead of letting it overwrite the first one's bytes).
            if current is None or current["__key__"] != key or ext in current:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = member.data
    except ShardError:
        if current is not None:
            yield current  # may be incomplete (e.g. lost its caption): the caller checks completeness
        raise
    if current is not None:
        yield current


def iter_captions(shards: str | Sequence[str], limit: int) -> Iterator[str]:
    """Captions of the first ``limit`` samples, reading only the txt members' bytes."""
    n = 0
    for url in expand_shards(shards):
        try:
            with open_shard(url) as stream:
                members = read_tar(stream, skip_data_of=frozenset(("jpg", "jpeg", "png", "webp", "npy")))
                for sample in group_samples(members):
                    if "txt" in sample:
                        yield sample["txt"].decode("utf-8", "replace").strip()
                        n += 1
                        if n >= limit:
                            return
        except Exception as e:  # noqa: BLE001 - a bad shard only shortens the tokenizer corpus
            log.warning("tokenizer corpus: shard %s: %s", url, e)
