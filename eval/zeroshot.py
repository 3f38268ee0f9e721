"""Zero-shot classification and retrieval for CLIP models.

On the synthetic shapes data the class sets come from each sample's json scene (data/synthetic.py):
- colour and shape: single-object images, 8 colours / 6 shapes;
- count: every image, 1–4 objects.
Class prompts are written in the captions' own grammar ("a red circle", "three blue squares"), put
into each of the dataset's caption templates ("a picture of {}", "{} on a grey background", …: open_clip
ensembles its ImageNet templates the same way) and ensembled over the attribute that is not being
classified (the colour classifier averages "a red circle", "a picture of a red square", …).

Retrieval recall@k in both directions; a retrieved caption counts as correct when it is the query's
own caption or an identical string (synthetic captions repeat: "a red circle" describes many images).

Standalone, on a trained run (evaluated every ``trainer.val_check_interval`` steps during training too)::

    python -m eval.zeroshot RUN_DIR_OR_CKPT [--shards SPEC] [--batch 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
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


@torch.no_grad()
def evaluate_run(
    path: str, shards: str | None = None, batch_size: int = 256, device: str = "cpu"
) -> dict[str, float]:
    """Retrieval (and zero-shot where the shards carry synthetic scenes) of a CLIP run on held-out shards."""
    from data.pipeline import ShardDataset
    from data.transforms import Normalize
    from train.checkpoint import load_stage

    stage = load_stage(path, map_location=device)
    shards = shards or stage.cfg.data.get("val_shards")
    if not shards:
        raise ValueError(f"{path}: the run has no data.val_shards; pass --shards")
    normalize = Normalize(stage.cfg.data.normalize)
    ds = ShardDataset(
        shards,
        batch_size=batch_size,
        mode="epoch",
        image_size=stage.cfg.data.image_size,
        crop="center",
        tokenizer=stage.tokenizer,
        keep_json=True,
        shuffle_buffer=0,
        shuffle_shards=False,
        seed=0,
    )
    net = stage.net.to(device)
    img, txt, captions, scenes = [], [], [], []
    for batch in ds:
        if not batch["__key__"]:
            continue
        out = net(normalize(batch["image"].to(device)), batch["tokens"].to(device))
        img.append(out["image_features"].float().cpu())
        txt.append(out["text_features"].float().cpu())
        captions += batch["caption"]
        scenes += [j.get("scene") for j in batch["json"]]
    if not img:
        raise ValueError(f"shards {shards!r}: no usable sample to evaluate")
    img_t, txt_t = torch.cat(img), torch.cat(txt)
    metrics = {"n": float(len(img_t)), "step": float(stage.global_step)}
    metrics.update(retrieval_recall(img_t, txt_t, captions))
    if stage.tokenizer is not None and all(s is not None for s in scenes):
        metrics.update(zeroshot_synthetic(img_t, scenes, net.encode_text, stage.tokenizer, device=device))
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.zeroshot", description="Zero-shot and retrieval of a CLIP run"
    )
    p.add_argument("run", help="run directory (outputs/clip/<time>) or a checkpoint inside its checkpoints/")
    p.add_argument("--shards", default=None, help="held-out shards (default: the run's data.val_shards)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = p.parse_args(argv)
    try:
        metrics = evaluate_run(args.run, args.shards, args.batch, args.device)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        print(f"{'metric':<24} {'value':>8}")
        for key, value in sorted(metrics.items()):
            count = key in ("n", "step") or key.endswith("_n")
            print(f"{key:<24} {value:>8.0f}" if count else f"{key:<24} {value:>8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
