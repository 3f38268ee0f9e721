"""Zero-shot classification and retrieval for CLIP models.

On the synthetic shapes data the class sets come from each sample's json scene (data/synthetic.py):
- colour and shape: single-object images, 8 colours / 6 shapes;
- count: every image, 1–4 objects.
Class prompts are written in the captions' own grammar ("a red circle", "three blue squares") and
ensembled over the attribute that is not being classified (the colour classifier averages "a red
circle", "a red square", …), the same prompt-ensembling open_clip applies with its templates.

Retrieval recall@k in both directions; a retrieved caption counts as correct when it is the query's
own caption or an identical string (synthetic captions repeat: "a red circle" describes many images).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from data import synthetic

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
    one = synthetic.describe_group
    return {
        "colour": {c: [one({"colour": c, "shape": s, "count": 1}) for s in shapes] for c in colours},
        "shape": {s: [one({"colour": c, "shape": s, "count": 1}) for c in colours] for s in shapes},
        "count": {str(n): [one({"colour": c, "shape": s, "count": n}) for c in colours for s in shapes]
                  for n in synthetic.COUNT_WORDS},
    }


@torch.no_grad()
def build_classifier(encode_text: EncodeText, tokenizer, prompts: dict[str, list[str]],
                     device: torch.device | str = "cpu") -> tuple[list[str], torch.Tensor]:
    """Class names and a (C, D) matrix of L2-normalised mean prompt embeddings."""
    names, rows = [], []
    for name, texts in prompts.items():
        emb = F.normalize(encode_text(tokenizer(texts).to(device)).float(), dim=-1)  # (P, D)
        rows.append(F.normalize(emb.mean(0), dim=-1))
        names.append(name)
    return names, torch.stack(rows)  # (C, D)


@torch.no_grad()
def zeroshot_synthetic(image_features: torch.Tensor, scenes: Sequence[dict], encode_text: EncodeText,
                       tokenizer, device: torch.device | str = "cpu") -> dict[str, float]:
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
def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, captions: Sequence[str],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
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
