"""Score generated images of the synthetic shapes by program: the compositional benchmark.

The synthetic scenes (data/synthetic.py) are flat saturated objects on a grey background, so the
objects in an image can be recovered from its pixels, whether rendered or generated:

1. object pixels are the saturated ones (max - min channel > ``min_saturation``; the background
   is grey, every palette colour is saturated);
2. connected components of the object mask (8-connected) are the objects; components smaller than
   ``min_area`` of the image are noise;
3. each object's colour is the palette colour most of its pixels are nearest to;
4. its shape is the nearest template: the component's bounding-box crop, resampled to 16x16 (soft,
   area-averaged), is compared with each shape drawn by the renderer itself and resampled the same way
   (mean squared difference), so the scorer and the dataset cannot drift apart.

:func:`benchmark_prompts` gives prompts in the dataset's caption grammar, by category (the failure
modes the DALL-E 2 paper names): ``single`` (one object: colour and shape), ``binding`` (two objects of
different colours and shapes: both bindings right), ``counting`` (1-4 objects of one kind), ``spatial``
(two objects and a relation). :func:`evaluate` scores images against them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from data.synthetic import COLOURS, COUNT_WORDS, RELATIONS, SHAPES, _draw, describe_group

CATEGORIES = ("single", "binding", "counting", "spatial")
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3)
NAMES = list(COLOURS)
TEMPLATE_SIZE = 16


# ------------------------------------------------------------------------------------------- detection


def _crop_features(mask: np.ndarray) -> torch.Tensor:
    """A bool mask cropped to its bounding box -> (TEMPLATE_SIZE^2,) soft occupancy on a square grid
    (the crop is padded to a square around its centre first, so aspect ratio is kept)."""
    h, w = mask.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = mask
    x = torch.from_numpy(square)[None, None]
    x = F.interpolate(x, size=(TEMPLATE_SIZE * 4, TEMPLATE_SIZE * 4), mode="nearest")
    return F.adaptive_avg_pool2d(x, TEMPLATE_SIZE).flatten()


@lru_cache(maxsize=1)
def _templates() -> tuple[list[str], torch.Tensor]:
    """Every shape drawn by the dataset's renderer at a few sizes: (names, (N, TEMPLATE_SIZE^2))."""
    names, feats = [], []
    for shape in SHAPES:
        for half in (4.5, 6.5, 9.5, 14.5, 24.5):
            size = int(2 * half + 8)
            img = Image.new("L", (size, size), 0)
            _draw(ImageDraw.Draw(img), shape, size / 2 - 0.5, size / 2 - 0.5, half, 255)
            mask = np.asarray(img) > 127
            ys, xs = np.nonzero(mask)
            names.append(shape)
            feats.append(_crop_features(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
    return names, torch.stack(feats)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool (H, W) mask, each as an (n, 2) array of (y, x) in raster order,
    ordered by their first pixel in raster order. Every object pixel starts labelled with its own index;
    labels spread as the minimum over each 3x3 neighbourhood (background never wins), and a pixel then
    takes its label's label (pointer jumping), until nothing changes: a component ends labelled with its
    first pixel's index. Tensor operations, not a per-pixel loop: a noisy 256 px sample has ~30,000
    object pixels."""
    h, w = mask.shape
    fg = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
    if not bool(fg.any()):
        return []
    dtype = torch.float32 if h * w < 2**24 else torch.float64  # indices exact in the float type
    background = torch.tensor(float(h * w), dtype=dtype)
    labels = torch.where(fg, torch.arange(h * w, dtype=dtype).view(h, w), background)
    while True:
        spread = -F.max_pool2d(-labels[None, None], 3, stride=1, padding=1)[0, 0]
        new = torch.where(fg, torch.minimum(labels, spread), background)
        jumped = new.flatten()[new.flatten().long().clamp(max=h * w - 1)].view(h, w)
        new = torch.where(fg, jumped, background)
        if torch.equal(new, labels):
            break
        labels = new
    where = torch.nonzero(fg.flatten()).squeeze(1)  # object pixels in raster order
    component = labels.flatten()[where].long()
    order = torch.argsort(component, stable=True)  # by component, raster order within
    counts = torch.unique_consecutive(component[order], return_counts=True)[1]
    return [
        torch.stack([pixels // w, pixels % w], 1).numpy()
        for pixels in torch.split(where[order], counts.tolist())
    ]


def _as_hwc(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 image tensor (3, H, W), got shape {tuple(image.shape)}")
        return image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    return np.asarray(image, dtype=np.float32)


def detect_objects(image, min_saturation: float = 60.0, min_area: float = 0.003) -> list[dict]:
    """The objects in one image (uint8 (3, H, W) tensor, PIL image or HWC array): per object its
    ``colour``, ``shape``, centre ``x``, ``y`` and bounding-box ``size`` (fractions of the image side,
    y downwards, like the scene json) and ``area`` (pixels); largest first."""
    x = _as_hwc(image)
    side = x.shape[0]
    saturated = (x.max(-1) - x.min(-1)) > min_saturation
    names, templates = _templates()
    objects = []
    for pixels in _components(saturated):
        if len(pixels) < max(3, min_area * x.shape[0] * x.shape[1]):
            continue
        ys, xs = pixels[:, 0], pixels[:, 1]
        colours = x[ys, xs]  # (n, 3)
        nearest = ((colours[:, None] - PALETTE[None]) ** 2).sum(-1).argmin(1)
        colour = NAMES[int(np.bincount(nearest, minlength=len(NAMES)).argmax())]
        y0, x0 = ys.min(), xs.min()
        crop = np.zeros((ys.max() - y0 + 1, xs.max() - x0 + 1), dtype=bool)
        crop[ys - y0, xs - x0] = True
        distance = ((templates - _crop_features(crop)[None]) ** 2).mean(1)
        objects.append(
            {
                "colour": colour,
                "shape": names[int(distance.argmin())],
                "x": float((xs.min() + xs.max() + 1) / 2 / side),
                "y": float((ys.min() + ys.max() + 1) / 2 / side),
                "size": float(max(crop.shape) / side),
                "area": int(len(pixels)),
            }
        )
    return sorted(objects, key=lambda o: -o["area"])


# ------------------------------------------------------------------------------------------ benchmark


def _group(rng: random.Random, count: int = 1, avoid: tuple[str, str] | None = None) -> dict:
    while True:
        colour, shape = rng.choice(NAMES), rng.choice(SHAPES)
        if avoid is None or (colour != avoid[0] and shape != avoid[1]):
            return {"colour": colour, "shape": shape, "count": count}


def benchmark_prompts(per_category: int, seed: int = 0) -> list[dict]:
    """``per_category`` prompts of each category, in CATEGORIES order: ``{"category", "prompt",
    "spec": {"groups": [...], "relation": None | {"subject": 0, "relation", "object": 1}}}``. Prompts
    use the dataset's grammar (data/synthetic.py caption_for, bare template). Counting cycles 1-4."""
    rng = random.Random(f"composition-benchmark:{seed}")
    items = []
    for category in CATEGORIES:
        for k in range(per_category):
            relation = None
            if category == "single":
                groups = [_group(rng)]
            elif category == "counting":
                groups = [_group(rng, count=1 + k % len(COUNT_WORDS))]
            else:  # binding and spatial: two single objects differing in colour and in shape
                first = _group(rng)
                groups = [first, _group(rng, avoid=(first["colour"], first["shape"]))]
                if category == "spatial":
                    relation = {"subject": 0, "relation": rng.choice(RELATIONS), "object": 1}
            spec = {"groups": groups, "relation": relation}
            items.append({"category": category, "prompt": prompt_for(spec), "spec": spec})
    return items


def prompt_for(spec: dict) -> str:
    """A spec's prompt in the dataset's grammar (bare template): "a red circle and two blue squares",
    "a red circle left of a blue square"."""
    parts = [describe_group(g) for g in spec["groups"]]
    relation = spec.get("relation")
    if relation:
        return f"{parts[relation['subject']]} {relation['relation']} {parts[relation['object']]}"
    return " and ".join(parts)


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def contrast(item: dict) -> dict:
    """The two-object prompt that differs from ``item`` only where its category is tested: binding, the
    two colours exchanged ("a red circle and a blue square" -> "a blue circle and a red square");
    spatial, the relation reversed ("... left of ..." -> "... right of ...")."""
    spec = {"groups": [dict(g) for g in item["spec"]["groups"]], "relation": item["spec"].get("relation")}
    if item["category"] == "binding" and len(spec["groups"]) == 2:
        a, b = spec["groups"]
        a["colour"], b["colour"] = b["colour"], a["colour"]
    elif item["category"] == "spatial" and spec["relation"]:
        spec["relation"] = {**spec["relation"], "relation": OPPOSITE[spec["relation"]["relation"]]}
    else:
        raise ValueError(
            f"contrast: {item['prompt']!r} ({item['category']}): expected a binding prompt of two groups "
            "or a spatial prompt with a relation"
        )
    return {"category": item["category"], "prompt": prompt_for(spec), "spec": spec}


def _holds(a: dict, relation: str, b: dict) -> bool:
    """Object ``a`` is ``relation`` object ``b`` (by centres; y grows downwards)."""
    if relation == "left of":
        return a["x"] < b["x"]
    if relation == "right of":
        return a["x"] > b["x"]
    if relation == "above":
        return a["y"] < b["y"]
    if relation == "below":
        return a["y"] > b["y"]
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def score(objects: Sequence[dict], spec: dict) -> dict[str, bool | float]:
    """Criteria met by the detected ``objects`` for one prompt's ``spec``. Prompts of two objects also get
    ``objects_bound`` (the fraction of the two whose colour is drawn with its shape) and
    ``objects_swapped`` (whose colour is drawn with the other object's shape and not its own)."""
    groups, relation = spec["groups"], spec.get("relation")
    total = sum(g["count"] for g in groups)

    def matching(g: dict, colour: bool = True, shape: bool = True) -> list[dict]:
        return [
            o
            for o in objects
            if (not colour or o["colour"] == g["colour"]) and (not shape or o["shape"] == g["shape"])
        ]

    out = {
        "count": len(objects) == total,
        "colour": all(len(matching(g, shape=False)) == g["count"] for g in groups),
        "shape": all(len(matching(g, colour=False)) == g["count"] for g in groups),
        "colour_shape": all(len(matching(g)) == g["count"] for g in groups),
    }
    out["correct"] = out["colour_shape"] and out["count"]
    if len(groups) == 2:  # the paper's binding failure: an object's colour drawn with the other's shape
        bound = swapped = 0
        for g, other in ((groups[0], groups[1]), (groups[1], groups[0])):
            shapes = {o["shape"] for o in matching(g, shape=False)}  # of the objects in g's colour
            bound += g["shape"] in shapes
            swapped += g["shape"] not in shapes and other["shape"] in shapes
        out["objects_bound"], out["objects_swapped"] = bound / 2, swapped / 2
    if relation:
        subj, obj = matching(groups[relation["subject"]]), matching(groups[relation["object"]])
        out["relation"] = bool(subj and obj and _holds(subj[0], relation["relation"], obj[0]))
        out["correct"] = out["correct"] and out["relation"]
    return out


def evaluate(images: Sequence | torch.Tensor, items_or_specs: Sequence[dict]) -> dict[str, float]:
    """Accuracy per category and criterion, e.g. ``single/colour_shape``, ``counting/correct``,
    ``spatial/relation``, plus ``overall/correct`` (mean over categories). ``items_or_specs``: the
    items of :func:`benchmark_prompts` (or bare specs: category ``all``)."""
    if len(images) != len(items_or_specs):
        raise ValueError(f"evaluate: {len(images)} images for {len(items_or_specs)} prompts")
    sums: dict[str, list[float]] = {}
    for image, item in zip(images, items_or_specs):
        spec, category = item.get("spec", item), item.get("category", "all")
        for key, ok in score(detect_objects(image), spec).items():
            sums.setdefault(f"{category}/{key}", []).append(float(ok))
    metrics = {k: sum(v) / len(v) for k, v in sums.items()}
    cats = sorted({k.split("/")[0] for k in metrics})
    metrics["overall/correct"] = sum(metrics[f"{c}/correct"] for c in cats) / len(cats)
    return metrics


def render_spec(spec: dict, image_size: int = 64, seed: int = 0) -> Image.Image:
    """A scene that satisfies ``spec``, drawn by the dataset's renderer (tests and calibration)."""
    from data.synthetic import GREY_RANGE, render

    rng = random.Random(f"render-spec:{seed}")
    n = sum(g["count"] for g in spec["groups"])
    size = {1: 0.4, 2: 0.3, 3: 0.24, 4: 0.22}[n]
    relation = spec.get("relation")
    slots = [(0.25, 0.25), (0.75, 0.75), (0.75, 0.25), (0.25, 0.75)]
    if relation:  # subject and object on the sides the relation names
        a, b = {
            "left of": ((0.25, 0.5), (0.75, 0.5)),
            "right of": ((0.75, 0.5), (0.25, 0.5)),
            "above": ((0.5, 0.25), (0.5, 0.75)),
            "below": ((0.5, 0.75), (0.5, 0.25)),
        }[relation["relation"]]
        slots = [a, b] if relation["subject"] == 0 else [b, a]
    elif n == 1:
        slots = [(0.5, 0.5)]
    objects = []
    for g_index, g in enumerate(spec["groups"]):
        for _ in range(g["count"]):
            x, y = slots[len(objects)]
            objects.append(
                {
                    "shape": g["shape"],
                    "colour": g["colour"],
                    "rgb": list(COLOURS[g["colour"]]),
                    "x": x,
                    "y": y,
                    "size": size,
                    "group": g_index,
                }
            )
    grey = rng.randint(*GREY_RANGE)
    return render({"background": [grey] * 3, "objects": objects}, image_size)
