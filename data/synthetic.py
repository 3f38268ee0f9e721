"""Synthetic shapes: the embedded default dataset, test fixture and compositional benchmark.

Each sample is a small image of 1-4 flat-coloured geometric objects on a plain grey background, with
a caption that states count, colour, shape and (where it holds) relative position::

    "a red circle"      "three blue squares"      "two green stars left of an orange triangle"

Because the images are drawn by program, generated images can be scored by program: the ``scene``
stored in every sample's json (groups, objects with centre/size as fractions of the image side, the
stated relation) is the ground truth that eval/ compares against.

Layout written by :func:`write_shards` (img2dataset's)::

    DIR/00000.tar            000000000.jpg 000000000.txt 000000000.json 000000001.jpg ...
    DIR/00000_stats.json     count, successes, failed_to_download, ..., seed, image_size
    DIR/sizes.json           {"00000.tar": 1000, ...}  (epoch length without opening a shard)
    DIR/unclip_synthetic.json  the marker: written by this module (data=synthetic never writes elsewhere)

Shard ``k`` holds the global indices ``[k * shard_size, (k + 1) * shard_size)``; the key is the
global index zero-padded to 9 digits.

Determinism: sample ``i`` depends only on ``(seed, i)`` (its own ``random.Random`` seeded with the
string ``"synthetic-shapes:{seed}:{i}"``), never on the shard size, the number of workers or the
samples drawn before it. The same seed therefore gives identical samples whatever the sharding, and
tar members have fixed mtime/owner so identical arguments give byte-identical tars. Different seeds
give independent splits: seed 0 is the train split, seed 1 the held-out split.

Rendering is PIL ``ImageDraw`` at the target resolution, without anti-aliasing, so every object is
a single exact colour (the pixel at its centre equals its ``rgb`` in png; jpg is close) and objects
never touch (rejection sampling with a margin): colour connected components recover them.

CLI::

    python -m data.synthetic --out DIR --samples N [--seed 0] [--image-size 64] [--shard-size 1000]
                             [--format jpg|png] [--quality 95] [--workers 1]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

# Shapes chosen to stay distinguishable at low resolution (no hexagon: it is a circle at 16 px).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}

# Saturated, mutually distant colours; none is grey, so none collides with the background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 175, 45),
    "blue": (35, 70, 235),
    "yellow": (245, 220, 25),
    "purple": (140, 45, 200),
    "orange": (250, 135, 15),
    "cyan": (25, 210, 225),
    "pink": (250, 105, 190),
}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TEMPLATES: tuple[str, ...] = (
    "{desc}",
    "a picture of {desc}",
    "an image showing {desc}",
    "{desc} on a grey background",
    "a drawing of {desc}",
    "a simple illustration of {desc}",
)
FORMATS: tuple[str, ...] = ("jpg", "png")

# Scene statistics. Sizes are bounding-box sides as fractions of the image side.
COUNT_WEIGHTS = {1: 0.35, 2: 0.25, 3: 0.20, 4: 0.20}  # total objects per scene
SIZE_RANGE = {1: (0.25, 0.50), 2: (0.20, 0.36), 3: (0.16, 0.30), 4: (0.14, 0.26)}  # by total count
P_TWO_GROUPS = 0.65  # given >= 2 objects
P_SPLIT = 0.7  # given two groups: place them in opposite halves, so a relation holds
GAP = 0.05  # minimum gap between two objects' bounding boxes (3 px at 64 px)
BORDER = 0.03  # minimum gap between an object and the image edge
GREY_RANGE = (100, 170)  # background grey level, r = g = b
TAR_MTIME = 946684800  # 2000-01-01: fixed so identical inputs give byte-identical tars


def _rng(seed: int, index: int, stream: str = "scene") -> random.Random:
    # String seeds are hashed with sha512 (stable across runs and Python versions, unlike hash()).
    return random.Random(f"synthetic-shapes:{seed}:{index}:{stream}")


# ----------------------------------------------------------------------------------------------- scene


def _sample_groups(rng: random.Random) -> list[dict]:
    """1 or 2 groups of (colour, shape, count); two groups differ in colour or shape."""
    n = rng.choices(list(COUNT_WEIGHTS), weights=list(COUNT_WEIGHTS.values()))[0]
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if n == 1 or rng.random() >= P_TWO_GROUPS:
        return [{"colour": colour, "shape": shape, "count": n}]
    c0 = rng.randint(1, n - 1)
    while True:
        colour1, shape1 = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if (colour1, shape1) != (colour, shape):
            break
    return [
        {"colour": colour, "shape": shape, "count": c0},
        {"colour": colour1, "shape": shape1, "count": n - c0},
    ]


def _place(
    rng: random.Random, sizes: list[float], regions: list[tuple[float, float, float, float]]
) -> list[tuple[float, float]] | None:
    """Centres for boxes of side ``sizes[k]`` inside ``regions[k]`` (x0, y0, x1, y1), no two closer
    than GAP; None when rejection sampling gives up."""
    centres: list[tuple[float, float]] = []
    for size, (x0, y0, x1, y1) in zip(sizes, regions):
        h = size / 2
        if x1 - x0 < size or y1 - y0 < size:
            return None
        for _ in range(100):
            x, y = rng.uniform(x0 + h, x1 - h), rng.uniform(y0 + h, y1 - h)
            if all(
                abs(x - cx) >= h + s / 2 + GAP or abs(y - cy) >= h + s / 2 + GAP
                for (cx, cy), s in zip(centres, sizes)
            ):
                centres.append((x, y))
                break
        else:
            return None
    return centres


def _split_regions(rng: random.Random) -> tuple[str, tuple, tuple]:
    """A relation and the two half-image regions (subject's, object's) that make it hold."""
    relation = rng.choice(RELATIONS)
    lo, hi, mid = BORDER, 1 - BORDER, 0.5
    first, second = (lo, lo, mid - GAP / 2, hi), (mid + GAP / 2, lo, hi, hi)  # left, right halves
    if relation in ("above", "below"):
        first, second = (lo, lo, hi, mid - GAP / 2), (lo, mid + GAP / 2, hi, hi)  # top, bottom
    if relation in ("right of", "below"):
        first, second = second, first
    return relation, first, second


def relation_holds(scene: dict, subject: int, relation: str, obj: int) -> bool:
    """True when every object of group ``subject`` lies strictly ``relation`` every object of group
    ``obj`` (bounding boxes disjoint along that axis; y grows downwards)."""
    subs = [o for o in scene["objects"] if o["group"] == subject]
    objs = [o for o in scene["objects"] if o["group"] == obj]
    axis = "x" if relation in ("left of", "right of") else "y"
    sign = 1 if relation in ("left of", "above") else -1
    return all(sign * (b[axis] - a[axis]) > (a["size"] + b["size"]) / 2 for a in subs for b in objs)


def make_scene(seed: int, index: int) -> dict:
    """The scene of sample ``index`` under ``seed`` (pure function of both).

    Returns ``{"background": [r, g, b], "groups": [{"colour", "shape", "count"}, ...],
    "objects": [{"shape", "colour", "rgb", "x", "y", "size", "group"}, ...],
    "relation": None | {"subject": 0, "relation": "left of", "object": 1}}`` where x, y are the
    object's centre and size its bounding-box side, as fractions of the image side (y downwards).
    """
    rng = _rng(seed, index)
    grey = rng.randint(*GREY_RANGE)
    groups = _sample_groups(rng)
    owner = [g for g, group in enumerate(groups) for _ in range(group["count"])]
    n = len(owner)
    lo, hi = SIZE_RANGE[n]
    split = len(groups) == 2 and rng.random() < P_SPLIT
    relation = None
    full = (BORDER, BORDER, 1 - BORDER, 1 - BORDER)
    for attempt in range(50):
        if split and attempt < 25:
            relation, first, second = _split_regions(rng)
            regions = [first if g == 0 else second for g in owner]
        else:
            relation, regions = None, [full] * n
        top = max(lo, hi * 0.95**attempt)  # shrink the largest allowed size after each failure
        sizes = [rng.uniform(lo, top) for _ in owner]
        centres = _place(rng, sizes, regions)
        if centres is not None:
            break
    else:  # unreachable in practice: 4 boxes of side <= 0.26 always fit in the free layout
        raise RuntimeError(f"could not place scene {seed}:{index}")
    objects = [
        {
            "shape": groups[g]["shape"],
            "colour": groups[g]["colour"],
            "rgb": list(COLOURS[groups[g]["colour"]]),
            "x": round(x, 4),
            "y": round(y, 4),
            "size": round(s, 4),
            "group": g,
        }
        for g, (x, y), s in zip(owner, centres, sizes)
    ]
    scene = {"background": [grey] * 3, "groups": groups, "objects": objects, "relation": None}
    if len(groups) == 2:
        # A split layout states its relation; a free layout states one if it happens to hold.
        candidates = [relation] if relation else rng.sample(RELATIONS, len(RELATIONS))
        for rel in candidates:
            if relation_holds(scene, 0, rel, 1):
                scene["relation"] = {"subject": 0, "relation": rel, "object": 1}
                break
    return scene


# --------------------------------------------------------------------------------------------- caption


def describe_group(group: dict) -> str:
    """``{"colour": "red", "shape": "circle", "count": 2}`` -> ``"two red circles"``."""
    count, colour, shape = group["count"], group["colour"], group["shape"]
    if count == 1:
        article = "an" if colour[0] in "aeiou" else COUNT_WORDS[1]
        return f"{article} {colour} {shape}"
    return f"{COUNT_WORDS[count]} {colour} {PLURALS[shape]}"


def caption_for(scene: dict, seed: int, index: int) -> str:
    """Caption stating count, colour, shape of every group and the scene's relation (if any); the
    template is drawn from its own (seed, index) stream, so it does not disturb the scene."""
    parts = [describe_group(g) for g in scene["groups"]]
    rel = scene.get("relation")
    if rel:
        desc = f"{parts[rel['subject']]} {rel['relation']} {parts[rel['object']]}"
    else:
        desc = " and ".join(parts)
    return _rng(seed, index, "caption").choice(TEMPLATES).format(desc=desc)


# -------------------------------------------------------------------------------------------- render


_SIN = [math.sin(k * math.pi / 5) for k in range(10)]
_COS = [math.cos(k * math.pi / 5) for k in range(10)]


def _star(cx: float, cy: float, h: float) -> list[tuple[float, float]]:
    cy += 0.095 * h  # a 5-point star spans [-h, 0.81h] vertically: centre it in its box
    radii = [h if k % 2 == 0 else 0.45 * h for k in range(10)]  # outer tips, inner corners
    return [(cx + r * _SIN[k], cy - r * _COS[k]) for k, r in enumerate(radii)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, h: float, fill: tuple) -> None:
    """Draw one object of half-side ``h`` pixels centred on (cx, cy) pixels."""
    if shape == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    elif shape == "cross":
        w = 0.36 * h  # arm half-width: chunky, so the cross survives downsampling
        draw.rectangle((cx - h, cy - w, cx + h, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - h, cx + w, cy + h), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: dict, image_size: int) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels (no anti-aliasing)."""
    img = Image.new("RGB", (image_size, image_size), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    # Boxes are inset by half a pixel so an object of side s covers about s * image_size pixels.
    for o in scene["objects"]:
        h = o["size"] * image_size / 2 - 0.5
        _draw(draw, o["shape"], o["x"] * image_size - 0.5, o["y"] * image_size - 0.5, h, tuple(o["rgb"]))
    return img


# -------------------------------------------------------------------------------------------- samples


def make_sample(seed: int, index: int, image_size: int, fmt: str = "jpg", quality: int = 95) -> dict:
    """One webdataset sample: ``{"__key__": "000001234", fmt: image bytes, "txt": caption bytes,
    "json": metadata bytes}`` (the key is a str, every other value bytes)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {FORMATS}")
    scene = make_scene(seed, index)
    caption = caption_for(scene, seed, index)
    buf = io.BytesIO()
    if fmt == "jpg":  # 4:4:4 chroma: 4:2:0 would smear colours across a 9-pixel object
        render(scene, image_size).save(buf, "JPEG", quality=quality, subsampling=0)
    else:
        render(scene, image_size).save(buf, "PNG", compress_level=1)
    key = f"{index:09d}"
    meta = {
        "key": key,
        "caption": caption,
        "status": "success",
        "url": None,
        "width": image_size,
        "height": image_size,
        "original_width": image_size,
        "original_height": image_size,
        "seed": seed,
        "index": index,
        "scene": scene,
    }
    return {"__key__": key, fmt: buf.getvalue(), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with fixed mtime and mode (identical arguments give identical tars)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, indices: range, seed: int, image_size: int, fmt: str, quality: int) -> dict:
    """Write one tar (atomically, via a temporary name) and its img2dataset-style stats file."""
    start = time.time()
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in indices:
            sample = make_sample(seed, i, image_size, fmt, quality)
            for ext in (fmt, "txt", "json"):
                add_member(tar, f"{sample['__key__']}.{ext}", sample[ext])
    os.replace(tmp, path)
    end = time.time()
    stats = {
        "count": len(indices),
        "successes": len(indices),
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": end - start,
        "start_time": start,
        "end_time": end,
        "status_dict": {"success": len(indices)},
        "seed": seed,
        "image_size": image_size,
    }
    path.with_name(path.stem + "_stats.json").write_text(json.dumps(stats, indent=4))
    return stats


MARKER = "unclip_synthetic.json"  # in every directory write_shards fills: "this data is ours to (re)write"


def is_synthetic_dir(path: str | Path) -> bool:
    """A dataset this module wrote: its marker, or (written before markers existed) sizes.json beside a
    shard stats file that records the generator's seed and image size."""
    path = Path(path)
    if (path / MARKER).exists():
        return True
    stats = path / "00000_stats.json"
    try:
        return (path / "sizes.json").exists() and {"seed", "image_size"} <= set(json.loads(stats.read_text()))
    except (OSError, ValueError):
        return False


def write_shards(
    out: str | Path,
    samples: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    shard_size: int = 1000,
    fmt: str = "jpg",
    quality: int = 95,
    start_index: int = 0,
    workers: int = 1,
) -> list[Path]:
    """Write global indices ``[start_index, start_index + samples)`` into ``out`` and return the tar
    paths. Shard ``k`` holds indices ``[k * shard_size, (k + 1) * shard_size)``, so ``start_index``
    must be a multiple of ``shard_size``. ``sizes.json`` is updated (merged with an existing one), so
    a dataset can be written in several calls, though not by concurrent calls into one directory.
    ``workers > 1`` writes shards in parallel processes; the bytes are the same."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if shard_size < 1 or start_index < 0 or start_index % shard_size:
        raise ValueError(f"need shard_size >= 1 dividing start_index >= 0, got {shard_size}, {start_index}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {FORMATS}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(
        json.dumps({"generator": "data.synthetic", "seed": seed, "image_size": image_size})
    )
    end = start_index + samples
    jobs = [
        (out / f"{k:05d}.tar", range(k * shard_size, min((k + 1) * shard_size, end)))
        for k in range(start_index // shard_size, math.ceil(end / shard_size))
    ]
    args = [(path, idx, seed, image_size, fmt, quality) for path, idx in jobs]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            list(pool.map(_write_shard, *zip(*args)))
    else:
        for a in args:
            _write_shard(*a)
    sizes_path = out / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    sizes.update({path.name: len(idx) for path, idx in jobs})
    tmp = out / "sizes.json.tmp"
    tmp.write_text(json.dumps(dict(sorted(sizes.items())), indent=1))
    os.replace(tmp, sizes_path)
    return [path for path, _ in jobs]


# ------------------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Write the synthetic shapes dataset as img2dataset-style shards "
        "(seed 0 = train split, seed 1 = held-out split).",
    )
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--samples", type=int, required=True, help="number of samples to write (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="split seed: sample i depends only on (seed, i)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (>= 8)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar (>= 1)")
    p.add_argument("--format", default="jpg", help="image format: jpg or png")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality, 1..100")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (one shard each)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.samples < 1:
        p.error(f"--samples must be >= 1, got {a.samples}")
    if a.image_size < 8:
        p.error(f"--image-size must be >= 8, got {a.image_size}")
    if a.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {a.shard_size}")
    if a.format not in FORMATS:
        p.error(f"--format must be one of {', '.join(FORMATS)}, got {a.format!r}")
    if not 1 <= a.quality <= 100:
        p.error(f"--quality must be in 1..100, got {a.quality}")
    if a.workers < 1:
        p.error(f"--workers must be >= 1, got {a.workers}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {a.out}: a file, expected a directory")
    if out.is_dir() and any(out.iterdir()):  # its shards would mix with what is there, under one sizes.json
        held = ", ".join(sorted(x.name for x in out.iterdir())[:4])
        p.error(
            f"--out {a.out}: not empty ({held}, ...); data.synthetic writes into a new or empty directory"
        )
    start = time.perf_counter()
    paths = write_shards(
        a.out,
        a.samples,
        seed=a.seed,
        image_size=a.image_size,
        shard_size=a.shard_size,
        fmt=a.format,
        quality=a.quality,
        workers=a.workers,
    )
    secs = time.perf_counter() - start
    print(
        f"synthetic shapes: {a.samples} samples, {len(paths)} shards, {a.image_size}px {a.format}, "
        f"seed {a.seed} -> {a.out} in {secs:.2f} s ({a.samples / secs:,.0f} samples/s)"
    )
    return 0


PARALLEL_FROM = 10_000  # samples in a split from which ensure_synthetic writes with one process per core


def _generated(out: Path) -> bool:
    return is_synthetic_dir(out) and (out / "sizes.json").exists()


def _check_sharding(out: Path, key: str, samples: int, size: int, shard_size: int) -> None:
    """A dataset written before is kept as it is: one of another sharding (``data.synthetic.shard_size``
    is not in its directory's name) is refused, naming both, not trained on as if it had the asked one."""
    written = list(json.loads((out / "sizes.json").read_text()).values())
    wanted = [size] * (samples // size) + ([samples % size] if samples % size else [])
    if written != wanted:
        raise ValueError(
            f"data.{key}={out} was written with {len(written)} shards of up to {max(written, default=0)} "
            f"samples; data.synthetic.shard_size={shard_size} asks for {len(wanted)} of up to {size}: delete "
            "that directory (it is written again, in seconds) or set paths.data_dir to another"
        )


def ensure_synthetic(
    train_shards,
    val_shards,
    *,
    train_samples: int,
    val_samples: int,
    image_size: int = 64,
    shard_size: int = 1000,
    train_seed: int = 0,
    val_seed: int = 1,
    workers: int | None = None,
) -> None:
    """Generate the embedded default dataset (data/synthetic.py) into the configured directories, which
    must be new, empty or a dataset it wrote before (its marker file): never into anything else.

    ``workers``: processes writing shards in parallel (the bytes do not change). Default: one per core
    (at most 16) for a split of ``PARALLEL_FROM`` samples or more, else one (starting processes costs
    more than a small split takes)."""
    for spec, samples, seed in (
        (train_shards, train_samples, train_seed),
        (val_shards, val_samples, val_seed),
    ):
        if not spec or not isinstance(spec, str | os.PathLike):
            continue
        out = Path(spec)
        # At least 4 shards (a small held-out split still feeds every loader worker); the samples do not
        # depend on the sharding.
        size = min(shard_size, max(1, -(-samples // 4)))
        key = "train_shards" if spec == train_shards else "val_shards"
        if _generated(out):
            _check_sharding(out, key, samples, size, shard_size)
            continue
        if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never write into the user's data
            if _generated(out):
                continue  # another process (a rank of this launch) finished it between the two looks
            raise ValueError(
                f"data.{key}={spec} is not a synthetic dataset written by data/synthetic.py (no "
                f"{MARKER}): data=synthetic generates its shards only into a new or empty directory. "
                f"To train on your own shards select data=shards (python -m train.run data=shards "
                f"data.{key}=...)"
            )
        log.info("writing %d synthetic samples (seed %d, %d px) to %s", samples, seed, image_size, out)
        # its own directory beside the target: named by a process id, ranks on nodes that each number
        # their processes from 1 (containers) wrote into the same one
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}.tmp"))
        tmp.chmod(0o755)  # (mkdtemp's is 0o700)
        procs = workers or (min(os.cpu_count() or 1, 16) if samples >= PARALLEL_FROM else 1)
        if procs > 1:  # a fresh process forks the writers, not the caller (threads, CUDA, a training run)
            cmd = [sys.executable, "-m", "data.synthetic", "--out", str(tmp), "--samples", str(samples),
                   "--seed", str(seed), "--image-size", str(image_size), "--shard-size", str(size),
                   "--workers", str(procs)]  # fmt: skip
            root = str(Path(__file__).resolve().parents[1])  # this checkout, installed or not
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
            }
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"writing {out} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        else:
            write_shards(tmp, samples, seed=seed, image_size=image_size, shard_size=size)
        try:
            os.replace(tmp, out)  # atomic: a half-written dataset is never picked up
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "sizes.json").exists():  # not a concurrent writer that finished first
                raise


if __name__ == "__main__":
    sys.exit(main())
