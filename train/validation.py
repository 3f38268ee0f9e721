"""Validation metrics of the stages: zero-shot classification and retrieval (CLIP, prior), dominant colours
(decoder).

On the synthetic shapes data the class sets come from each sample's json scene (data/synthetic.py):
- colour and shape: single-object images, 8 colours / 6 shapes;
- count: every image, 1–4 objects.
Class prompts are written in the captions' own grammar ("a red circle", "three blue squares"), put
into each of the dataset's caption templates ("a picture of {}", "{} on a grey background", …: open_clip
ensembles its ImageNet templates the same way) and ensembled over the attribute that is not being
classified (the colour classifier averages "a red circle", "a picture of a red square", …).

Hard-negative picks (any captions): an image's own caption against the same caption with two colour
words exchanged or its spatial word reversed (data/negatives.py), chance 50%: whether the CLIP binds
colours to objects and reads relations, or matches captions as bags of words.

Retrieval recall@k in both directions; a retrieved caption counts as correct when it is the query's
own caption or an identical string (synthetic captions repeat: "a red circle" describes many images).

The decoder's colour check: the dominant colour of an image of the synthetic shapes, scored by program.
Object pixels are the saturated ones (the background is grey, every palette colour is saturated); each
is assigned to the nearest palette colour (data/synthetic.py COLOURS) and the most frequent one wins.

What the stages compute during validation; eval/zeroshot.py runs the same on a trained run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from data import synthetic
from data.negatives import KINDS, hard_negatives
from data.synthetic import COLOURS

EncodeText = Callable[[torch.Tensor], torch.Tensor]


def scene_labels(scene: dict) -> dict[str, str | None]:
    """Ground-truth classes of one synthetic scene: colour/shape only for single-object scenes."""
    objects = scene["objects"]
    single = len(objects) == 1
    return {
        "colour": objects[0]["colour"] if single else None,
        "shape": objects[0]["shape"] if single else None,
        "count": str(len(objects)),
    }


def synthetic_prompts() -> dict[str, dict[str, list[str]]]:
    """task -> class name -> prompts."""
    colours, shapes = list(synthetic.COLOURS), list(synthetic.SHAPES)

    def one(group: dict) -> list[str]:
        desc = synthetic.describe_group(group)
        return [template.format(desc=desc) for template in synthetic.TEMPLATES]

    return {
        "colour": {
            c: [p for s in shapes for p in one({"colour": c, "shape": s, "count": 1})] for c in colours
        },
        "shape": {
            s: [p for c in colours for p in one({"colour": c, "shape": s, "count": 1})] for s in shapes
        },
        "count": {
            str(n): [p for c in colours for s in shapes for p in one({"colour": c, "shape": s, "count": n})]
            for n in synthetic.COUNT_WORDS
        },
    }


@torch.no_grad()
def build_classifier(
    encode_text: EncodeText, tokenizer, prompts: dict[str, list[str]], device: torch.device | str = "cpu"
) -> tuple[list[str], torch.Tensor]:
    """Class names and a (C, D) matrix of L2-normalised mean prompt embeddings."""
    names, rows = [], []
    for name, texts in prompts.items():
        emb = F.normalize(encode_text(tokenizer(texts).to(device)).float(), dim=-1)  # (P, D)
        rows.append(F.normalize(emb.mean(0), dim=-1))
        names.append(name)
    return names, torch.stack(rows)  # (C, D)


@torch.no_grad()
def zeroshot_synthetic(
    image_features: torch.Tensor,
    scenes: Sequence[dict],
    encode_text: EncodeText,
    tokenizer,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Top-1 accuracy per task; ``zeroshot_top1`` is the mean of colour and shape."""
    image_features = F.normalize(image_features.float(), dim=-1)
    labels = [scene_labels(s) for s in scenes]
    metrics: dict[str, float] = {}
    for task, prompts in synthetic_prompts().items():
        names, classifier = build_classifier(encode_text, tokenizer, prompts, device)
        rows = [i for i, lab in enumerate(labels) if lab[task] is not None]
        if not rows:
            continue
        target = torch.tensor([names.index(labels[i][task]) for i in rows])
        pred = (image_features[rows].to(classifier.device) @ classifier.T).argmax(-1).cpu()  # (N,)
        metrics[f"zeroshot_{task}_top1"] = (pred == target).float().mean().item()
        metrics[f"zeroshot_{task}_n"] = float(len(rows))
    if "zeroshot_colour_top1" in metrics and "zeroshot_shape_top1" in metrics:
        metrics["zeroshot_top1"] = (metrics["zeroshot_colour_top1"] + metrics["zeroshot_shape_top1"]) / 2
    return metrics


@torch.no_grad()
def contrast_picks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    captions: Sequence[str],
    encode_text: EncodeText,
    tokenizer,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """``pick_<kind>``: the fraction of images closer to their own caption than to its hard negative of
    that kind (data/negatives.py: two colour words exchanged, between single objects only for
    ``binding``; the spatial word reversed), over the captions that have one (``pick_<kind>_n``); chance
    50%, a tie counts half. A CLIP that matches captions as bags of words stays near 50% on ``binding``."""
    img, txt = image_features.float(), text_features.float()
    out: dict[str, float] = {}
    for kind, negatives in zip(KINDS, hard_negatives(captions, KINDS)):
        rows = [i for i, c in enumerate(negatives) if c is not None]
        if not rows:
            continue
        neg = torch.cat(
            [
                encode_text(tokenizer([negatives[i] for i in rows[k : k + batch_size]]).to(device))
                .float()
                .cpu()
                for k in range(0, len(rows), batch_size)
            ]
        )
        out[f"pick_{kind}"] = closer_rate(img[rows], txt[rows], neg)
        out[f"pick_{kind}_n"] = float(len(rows))
    return out


def closer_rate(query: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows whose ``query`` is closer (cosine) to ``a`` than to ``b``; a tie counts half."""
    query, a, b = (F.normalize(t.float(), dim=-1) for t in (query, a, b))
    sim_a, sim_b = (query * a).sum(-1), (query * b).sum(-1)
    return float(((sim_a > sim_b).float() + 0.5 * (sim_a == sim_b).float()).mean())


@torch.no_grad()
def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    captions: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """i2t_r{k} and t2i_r{k}: fraction of queries with a correct match among the top k."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    sim = img @ txt.T  # (N images, N texts)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])
    same = caption_id[:, None] == caption_id[None, :]  # (N, N): pair i, j share a caption
    out = {}
    for k in ks:
        k_eff = min(k, sim.shape[0])
        top_t = sim.topk(k_eff, dim=1).indices  # (N, k) texts per image
        top_i = sim.T.topk(k_eff, dim=1).indices  # (N, k) images per text
        out[f"i2t_r{k}"] = same.gather(1, top_t).any(1).float().mean().item()
        out[f"t2i_r{k}"] = same.gather(1, top_i).any(1).float().mean().item()
    return out


def clip_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    captions: Sequence[str],
    scenes: Sequence[dict | None],
    encode_text,
    tokenizer,
    *,
    device,
    zeroshot: bool = True,
) -> dict[str, float]:
    """A CLIP's held-out metrics, as in-training validation and eval.zeroshot report them: retrieval
    recall; zero-shot colour/shape/count when every sample has its synthetic scene (and ``zeroshot``);
    the contrast picks when a tokenizer is given."""
    metrics = retrieval_recall(image_features, text_features, captions)
    if tokenizer is None:
        return metrics
    if zeroshot and all(s is not None for s in scenes):
        metrics.update(zeroshot_synthetic(image_features, scenes, encode_text, tokenizer, device=device))
    metrics.update(
        contrast_picks(image_features, text_features, captions, encode_text, tokenizer, device=device)
    )
    return metrics


PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (8, 3)
NAMES = list(COLOURS)


def dominant_colours(images: torch.Tensor, min_saturation: float = 60.0, min_fraction: float = 0.01) -> list:
    """uint8 (B, 3, H, W) -> per image the dominant palette colour name, or None when fewer than
    ``min_fraction`` of the pixels are saturated (no object drawn)."""
    x = images.float().flatten(2).transpose(1, 2)  # (B, HW, 3)
    saturation = x.max(-1).values - x.min(-1).values  # (B, HW)
    nearest = torch.cdist(x, PALETTE.to(x.device)[None].expand(x.shape[0], -1, -1)).argmin(-1)  # (B, HW)
    out = []
    for i in range(x.shape[0]):
        keep = saturation[i] > min_saturation
        if keep.float().mean() < min_fraction:
            out.append(None)
            continue
        out.append(NAMES[int(torch.bincount(nearest[i][keep], minlength=len(NAMES)).argmax())])
    return out


def colour_match(generated: torch.Tensor, source: torch.Tensor) -> float:
    """Fraction of pairs whose dominant colours agree (chance: about 1/8)."""
    a, b = dominant_colours(generated), dominant_colours(source)
    return sum(x is not None and x == y for x, y in zip(a, b)) / max(1, len(a))
