"""Evaluate a trained cascade on the compositional benchmark, with CLIP score and FID.

    python -m eval.benchmark --cascade outputs/pipeline [--per-category 32] [--out DIR]
        [--prior-guidance 4] [--best-of 2] [--decoder-guidance 3] [--upsampler-steps 15,10] ...

Prompts come from :func:`eval.composition.benchmark_prompts` (single object, colour-shape binding,
counting, spatial relation; the dataset's caption grammar); each generated image is scored by program
from its pixels (eval/composition.py). Also: CLIP score of the images against their prompts and
CLIP-FID against held-out images (both with the cascade's own CLIP: no downloaded weights).
Writes ``samples.png`` (a labelled grid, a few prompts per category), ``all.png`` (every image, in
prompt order) and ``benchmark.json`` (metrics and, per prompt, what the scorer found).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont

from data.images import save_grid, to_unit_range
from data.pipeline import ShardDataset
from eval import composition
from eval.cli import at_least, default_device, device
from eval.sample import PRECISION_HELP, add_sampling_arguments, settings
from train.cascade import PRECISIONS, Cascade, StageSettings

log = logging.getLogger(__name__)


def labelled_grid(
    images: torch.Tensor, labels: Sequence[str], path: Path, columns: int, scale: int = 2
) -> Path:
    """uint8 (N, 3, H, W) images in a grid of ``columns``, each with its label wrapped underneath."""
    font = ImageFont.load_default()
    n, _, h, w = images.shape
    cell_w = w * scale
    chars = max(8, cell_w // 6)  # the default bitmap font is ~6 px per character
    wrapped = [textwrap.wrap(label, chars)[:3] for label in labels]
    text_h = 11 * max(len(lines) for lines in wrapped) + 4
    rows = -(-n // columns)
    gap = 4
    grid = Image.new(
        "RGB", (columns * (cell_w + gap) + gap, rows * (h * scale + text_h + gap) + gap), "white"
    )
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, columns)
        x, y = gap + c * (cell_w + gap), gap + r * (h * scale + text_h + gap)
        tile = Image.fromarray(images[i].permute(1, 2, 0).cpu().numpy()).resize(
            (cell_w, h * scale), Image.NEAREST
        )
        grid.paste(tile, (x, y))
        for k, line in enumerate(wrapped[i]):
            draw.text((x, y + h * scale + 2 + 11 * k), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


@torch.no_grad()
def generate(
    cascade: Cascade,
    prompts: Sequence[str],
    *,
    batch: int = 64,
    seed: int = 0,
    prior: StageSettings | None = None,
    decoder: StageSettings | None = None,
    upsamplers: Sequence[StageSettings] | None = None,
) -> torch.Tensor:
    """The cascade's final uint8 images for ``prompts``, in batches (batch k seeded ``seed + k``)."""
    from tqdm.auto import tqdm

    out = []
    for k in tqdm(range(0, len(prompts), batch), desc="benchmark: text -> image", unit="batch"):
        result = cascade.text_to_image(
            prompts[k : k + batch],
            prior=prior,
            decoder=decoder,
            upsamplers=upsamplers,
            seed=seed + k // batch,
        )
        out.append(result.images)
    return torch.cat(out)


def evaluate_cascade(
    cascade: Cascade,
    out_dir: Path,
    *,
    per_category: int = 32,
    batch: int = 64,
    seed: int = 0,
    grid_per_category: int = 6,
    reference: torch.Tensor | None = None,
    prior: StageSettings | None = None,
    decoder: StageSettings | None = None,
    upsamplers: Sequence[StageSettings] | None = None,
) -> dict[str, float]:
    """Generate the benchmark, score it, write samples.png / all.png / benchmark.json into ``out_dir``.
    ``reference``: uint8 held-out images for CLIP-FID (skipped when None)."""
    from eval.metrics import clip_score, fid

    start = time.time()
    items = composition.benchmark_prompts(per_category, seed=seed)
    prompts = [item["prompt"] for item in items]
    images = generate(
        cascade, prompts, batch=batch, seed=seed, prior=prior, decoder=decoder, upsamplers=upsamplers
    )
    metrics = {f"bench/{k}": float(v) for k, v in composition.evaluate(images, items).items()}
    metrics["bench/clip_score"] = float(clip_score(images, prompts, cascade.clip))
    if reference is not None:
        metrics["bench/clip_fid"] = float(fid(images, reference, features="clip", clip=cascade.clip))
        # what the number depends on besides the images: its bias grows as the sets shrink against the
        # feature size (identical sets of 64 and 256 at 128 dimensions read ~0.13), so compare it only at
        # the same sizes (docs/evaluation.md)
        metrics["bench/clip_fid_reference_n"] = float(len(reference))
        metrics["bench/clip_fid_dim"] = float(cascade.clip.embed_dim)
        if min(len(images), len(reference)) < 5 * cascade.clip.embed_dim:
            log.warning(
                "CLIP-FID from %d generated and %d held-out images of %d-dim features: at these sizes its "
                "bias (~0.1 between identical sets of 64 and 256 at 128 dims) is as large as most "
                "differences; compare it only at the same sizes",
                len(images),
                len(reference),
                cascade.clip.embed_dim,
            )
    metrics["bench/n"] = float(len(images))
    metrics["bench/seconds"] = time.time() - start

    out_dir.mkdir(parents=True, exist_ok=True)
    shown = [
        i
        for c in composition.CATEGORIES
        for i in [j for j, it in enumerate(items) if it["category"] == c][:grid_per_category]
    ]
    labelled_grid(
        images[shown], [prompts[i] for i in shown], out_dir / "samples.png", columns=grid_per_category
    )
    save_grid(
        [images[k : k + per_category] for k in range(0, len(images), per_category)], out_dir / "all.png"
    )
    asked = {  # the sampling settings as given; null: the stage's training config (module.*)
        "prior": dataclasses.asdict(prior) if prior else None,
        "decoder": dataclasses.asdict(decoder) if decoder else None,
        "upsamplers": [dataclasses.asdict(u) for u in upsamplers or []],
    }
    details = [{**item, "found": composition.detect_objects(img)} for item, img in zip(items, images)]
    (out_dir / "benchmark.json").write_text(
        json.dumps({"metrics": metrics, "settings": asked, "samples": details}, indent=1, default=str)
    )
    return metrics


CATEGORY_COLUMNS = (  # (metric, header) of category_table
    ("colour", "colour"),
    ("shape", "shape"),
    ("colour_shape", "colour+shape"),
    ("count", "count"),
    ("relation", "relation"),
    ("objects_bound", "objects bound"),
    ("objects_swapped", "objects swapped"),
    ("correct", "all correct"),
)


def category_table(metrics: dict[str, float], prefix: str = "bench/") -> list[str]:
    """The benchmark's figures as a markdown table, a row per category, with each category's gap in
    "all correct" to single objects (the paper's failure modes: binding, counting, spatial relations)."""
    cats = [c for c in composition.CATEGORIES if f"{prefix}{c}/correct" in metrics]
    if not cats:
        return []
    lines = [
        "| category | " + " | ".join(h for _, h in CATEGORY_COLUMNS) + " | vs single |",
        "|---" * (len(CATEGORY_COLUMNS) + 2) + "|",
    ]
    single = metrics.get(f"{prefix}single/correct")
    for c in cats:
        cells = [metrics.get(f"{prefix}{c}/{k}") for k, _ in CATEGORY_COLUMNS]
        gap = (
            "-"
            if single is None or c == "single"
            else f"{100 * (metrics[f'{prefix}{c}/correct'] - single):+.0f} pts"
        )
        lines.append(
            f"| {c} | " + " | ".join("-" if v is None else f"{100 * v:.0f}%" for v in cells) + f" | {gap} |"
        )
    return lines


def ceiling(per_category: int, base: int, seed: int = 0) -> dict[str, float]:
    """The benchmark's scores of its own prompts' ground-truth renders brought to ``base`` px and back to
    the scorer's size, as eval.probe's "renders at N px" row: what a cascade whose decoder draws ``base``
    px can reach at best."""
    from eval import probe

    items = composition.benchmark_prompts(per_category, seed=seed)
    images = probe.at_scorer_size(to_unit_range(probe.renders(items), base))
    return {f"bench/{k}": v for k, v in composition.evaluate(images, items).items()}


def reference_images(clip: Path, n: int, shards: str | None = None) -> torch.Tensor | None:
    """Up to ``n`` uint8 held-out images for FID, centre-cropped at the CLIP's size: from ``shards``, else
    the CLIP run's val shards, in order. ``clip``: its run directory, a checkpoint in it, or an export.
    None (said in the log) when neither names any: an imported CLIP (from-open-clip) has no shards."""
    from train.checkpoint import config_dir_of

    if n <= 0:
        return None
    from data.shards import ShardSpecError, expand_shards

    directory = config_dir_of(clip)
    data = OmegaConf.load(directory / "config.yaml").data
    given, shards = bool(shards), shards or data.get("val_shards")
    if not shards:
        log.warning("no CLIP-FID: the CLIP %s names no held-out shards (pass --fid-shards)", directory)
        return None
    if not given:  # (recorded when the CLIP trained: the data may have moved since, after hours of stages)
        try:
            expand_shards(str(shards))
        except ShardSpecError as e:
            log.warning("no CLIP-FID: the held-out shards the CLIP %s names are not there (moved?): %s; pass "
                        "--fid-shards", directory, e)  # fmt: skip
            return None
    ds = ShardDataset(
        str(shards),
        batch_size=min(n, 256),
        image_size=int(data.image_size),
        crop="center",  # the reader's default is a random crop: a non-square image's side, not its centre
        shuffle_buffer=0,
        shuffle_shards=False,
        seed=0,
    )
    images: list[torch.Tensor] = []
    for batch in ds:
        images.append(batch["image"])
        if sum(len(x) for x in images) >= n:
            break
    return torch.cat(images)[:n] if images else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    p = argparse.ArgumentParser(prog="python -m eval.benchmark", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--cascade", help="a train.pipeline output directory")
    what.add_argument(
        "--ceiling",
        type=int,
        metavar="BASE",
        help="no cascade: score the prompts' ground-truth renders at 64 px, resampled through BASE px "
        "(the best a cascade whose decoder draws BASE px can score)",
    )
    p.add_argument("--per-category", type=at_least(1), default=32)
    p.add_argument("--batch", type=at_least(1), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fid-reference", type=at_least(0), default=512, help="held-out images for CLIP-FID (0: skip)"
    )
    p.add_argument(
        "--fid-shards", default=None, help="shards of those images (default: the CLIP run's data.val_shards)"
    )
    p.add_argument("--grid-per-category", type=at_least(1), default=6, help="columns of samples.png")
    p.add_argument("--out", help="output directory (default: <cascade>/benchmark)")
    p.add_argument("--device", type=device, default=default_device())
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    add_sampling_arguments(p)  # the same options as eval.sample's
    args = p.parse_args(argv)
    if args.ceiling is not None:
        if args.ceiling < 1:
            print(
                f"error: --ceiling {args.ceiling}: expected a side in pixels of at least 1", file=sys.stderr
            )
            return 2
        metrics = ceiling(args.per_category, args.ceiling, seed=args.seed)
        print(f"ground-truth renders through {args.ceiling} px, {args.per_category} prompts per category")
        print("\n".join(category_table(metrics)))
        return 0
    try:
        cascade = Cascade.from_dir(args.cascade, device=args.device, precision=args.precision)
        metrics = evaluate_cascade(
            cascade,
            Path(args.out or Path(args.cascade) / "benchmark"),
            per_category=args.per_category,
            batch=args.batch,
            seed=args.seed,
            grid_per_category=args.grid_per_category,
            reference=reference_images(Path(cascade.clip.run), args.fid_reference, args.fid_shards),
            **settings(args, len(cascade.upsamplers)),
        )
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'metric':<28} {'value':>8}")
    for key, value in sorted(metrics.items()):
        print(f"{key:<28} {value:>8.4f}")
    print("\n" + "\n".join(category_table(metrics)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
