"""Inspect shards: counts, skips by reason, image sizes, caption lengths, json fields.

    python -m data.inspect SHARDS [--limit N] [--json] [--min-width W ...]

SHARDS is any shard spec (brace pattern, glob, directory, ``pipe:``; see data/shards.py). Applies the
same completeness checks and filters as the training pipeline (data/pipeline.py) and decodes every
image, so what it reports as skipped is what training would skip. Exit status 2 when the spec
matches no shard.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from typing import Any

from data.filters import Filters
from data.pipeline import check_sample, key_problem
from data.shards import ShardError, ShardSpecError, expand_shards, group_samples, open_shard, read_tar
from data.transforms import decode_image

SIZE_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


def _bucket(side: int) -> str:
    for edge in SIZE_BUCKETS:
        if side <= edge:
            return f"<={edge}"
    return f">{SIZE_BUCKETS[-1]}"


def inspect_shards(
    spec: str, *, filters: Filters | None = None, limit: int | None = None, decode: bool = True
) -> dict[str, Any]:
    """Scan shards and return the report as a dict (what the CLI prints)."""
    filters = filters or Filters()
    urls = expand_shards(spec)
    report: dict[str, Any] = {"spec": spec, "shards": len(urls), "samples": 0, "kept": 0}
    skips: Counter = Counter()
    sizes: Counter = Counter()
    fields: Counter = Counter()
    json_fields: Counter = Counter()
    caption_chars: list[int] = []
    caption_words: list[int] = []
    for url in urls[:limit] if limit else urls:
        n, failed = 0, False
        seen: set[str] = set()
        try:
            with open_shard(url) as stream:
                for sample in group_samples(read_tar(stream)):
                    n += 1
                    reason = key_problem(sample["__key__"], seen) or _inspect_sample(
                        sample, filters, decode, sizes, fields, json_fields, caption_chars, caption_words
                    )
                    if reason:
                        skips[reason] += 1
        except ShardError as e:
            skips[e.reason] += 1
            failed = True
        except OSError:
            skips["unreadable_shard"] += 1
            failed = True
        if n == 0 and not failed:
            skips["empty_shard"] += 1
        report["samples"] += n
    sample_skips = sum(v for k, v in skips.items() if not k.endswith("_shard"))
    report["kept"] = report["samples"] - sample_skips
    report["skipped"] = dict(sorted(skips.items()))
    report["image_size_hist"] = {
        b: sizes[b] for b in [f"<={e}" for e in SIZE_BUCKETS] + [f">{SIZE_BUCKETS[-1]}"] if sizes[b]
    }
    report["caption_chars"] = _stats(caption_chars)
    report["caption_words"] = _stats(caption_words)
    report["fields"] = dict(fields.most_common())
    report["json_fields"] = dict(json_fields.most_common())
    return report


def _inspect_sample(sample, filters, decode, sizes, fields, json_fields, caption_chars, caption_words):
    fields.update(k for k in sample if not k.startswith("__"))
    reason, item = check_sample(sample, filters)
    json_fields.update(item.get("json", {}).keys())
    if item.get("caption") is not None:
        caption_chars.append(len(item["caption"]))
        caption_words.append(len(item["caption"].split()))
    if reason:
        return reason
    if decode:
        try:
            img, _ = decode_image(sample[item["image_ext"]])
        except Exception:  # noqa: BLE001 - an undecodable image is a counted skip
            return "decode_error"
        sizes[_bucket(min(img.size))] += 1
        return filters.check_size(*img.size)
    return None


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": min(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "max": max(values),
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"spec          {r['spec']}",
        f"shards        {r['shards']}",
        f"samples       {r['samples']}  (kept {r['kept']})",
        "skipped       " + (", ".join(f"{k}={v}" for k, v in r["skipped"].items()) or "none"),
        "image sizes   " + (", ".join(f"{k}: {v}" for k, v in r["image_size_hist"].items()) or "-"),
        "caption chars " + ", ".join(f"{k} {v}" for k, v in r["caption_chars"].items()),
        "caption words " + ", ".join(f"{k} {v}" for k, v in r["caption_words"].items()),
        "fields        " + ", ".join(f"{k} ({v})" for k, v in r["fields"].items()),
        "json fields   " + ", ".join(f"{k} ({v})" for k, v in r["json_fields"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.split("\n")[0])
    p.add_argument("shards", help="shard spec: brace pattern, glob, directory, list joined by '::', or pipe:")
    p.add_argument("--limit", type=int, default=None, help="inspect only the first N shards")
    p.add_argument("--no-decode", action="store_true", help="skip image decoding (faster; no size histogram)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--min-width", type=int, default=0)
    p.add_argument("--min-height", type=int, default=0)
    p.add_argument("--max-aspect-ratio", type=float, default=None)
    p.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="NAME<COND",
        help="json threshold that keeps a sample, e.g. 'punsafe<0.1' (repeatable)",
    )
    args = p.parse_args(argv)
    try:
        conditions = dict(_split_field(f) for f in args.field)
        filters = Filters(
            min_width=args.min_width,
            min_height=args.min_height,
            max_aspect_ratio=args.max_aspect_ratio,
            fields=conditions,
        )
        report = inspect_shards(args.shards, filters=filters, limit=args.limit, decode=not args.no_decode)
    except (ShardSpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _split_field(text: str) -> tuple[str, str]:
    for i, ch in enumerate(text):
        if ch in "<>=!":
            name, cond = text[:i].strip(), text[i:]
            try:  # checked here, so that the error names the option given, not the config key it becomes
                Filters(fields={name: cond})
            except ValueError:
                raise ValueError(
                    f"--field {text!r}: expected NAME followed by a comparison, e.g. 'punsafe<0.1'"
                ) from None
            return name, cond
    raise ValueError(f"--field {text!r}: expected NAME followed by a comparison, e.g. 'punsafe<0.1'")


if __name__ == "__main__":
    sys.exit(main())
