"""Zero-shot classification of a labelled image folder by a CLIP: ours (a run, checkpoint or export) or an
open_clip checkpoint, the way open_clip and CLIP_benchmark evaluate ImageNet::

    python -m eval.classify outputs/clip/<run> --images val/              # DIR/<class>/*.jpg
    python -m eval.classify ViT-B-32.safetensors --open-clip-config ViT-B-32 \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --images imagenet/val --classnames classnames.txt

Each class's text classifier is the mean of its prompts' unit embeddings (``--templates``: one prompt a
line with ``{}`` for the class name), normalised; each image goes to the class of the largest cosine.
Images are resized on the shorter side to the net's input size and centre-cropped (bicubic), as the run's
validation, data.embed and open_clip's evaluation transform do; an image that does not decode is skipped,
counted and named. Printed: top-1, top-5 and the mean of the per-class recalls (balanced accuracy), and
the worst classes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.cli import at_least, default_device, device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# A few generic prompts (ours); a dataset's own captions make better ones (--templates FILE).
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.")


def image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The classes (sorted subdirectory names, torchvision's ImageFolder order) and (image, class index)
    pairs of a ``root/<class>/<image>`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a directory (expected {root}/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"--images {root}: no class subdirectories (expected {root}/<class>/<image>)")
    items = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not items:
        raise ValueError(
            f"--images {root}: no image ({', '.join(IMAGE_SUFFIXES)}) under its {len(classes)} classes"
        )
    return classes, items


def read_lines(path: str | Path, option: str) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{option} {path}: no lines")
    return lines


@torch.no_grad()
def classifier(net, tokenizer, classnames: list[str], templates: list[str], device: str) -> torch.Tensor:
    """(D, C): each class's mean unit prompt embedding, normalised."""
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"--templates: each prompt needs one '{{}}' for the class name, got {bad[:3]}")
    weights = []
    for name in classnames:
        tokens = tokenizer([t.replace("{}", name) for t in templates]).to(device)
        emb = F.normalize(net.encode_text(tokens).float(), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=0))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def classify(
    net,
    tokenizer,
    items: list[tuple[Path, int]],
    classnames: list[str],
    *,
    image_size: int,
    crop_size: int | None = None,
    normalize: str = "clip",
    templates: list[str] | tuple[str, ...] = TEMPLATES,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict:
    """Top-1, top-5 and per-class recall of ``net`` on ``items`` (image path, class index)."""
    from data.transforms import Normalize, decode_image, resize_crop

    net = net.to(device).eval()
    weights = classifier(net, tokenizer, classnames, list(templates), device)
    norm = Normalize(normalize)
    k = min(5, len(classnames))
    top1 = torch.zeros(len(classnames))
    top5 = torch.zeros(len(classnames))
    seen = torch.zeros(len(classnames))
    skipped: list[str] = []

    def run(images: list[torch.Tensor], labels: list[int]) -> None:
        x = norm(torch.stack(images).to(device))
        logits = F.normalize(net.encode_image(x).float(), dim=-1) @ weights
        best = logits.topk(k, dim=1).indices.cpu()
        target = torch.tensor(labels)
        hit1 = (best[:, 0] == target).float()
        hit5 = (best == target[:, None]).any(dim=1).float()
        for counts, hits in ((top1, hit1), (top5, hit5), (seen, torch.ones_like(hit1))):
            counts.index_add_(0, target, hits)

    images, labels = [], []
    for path, label in items:
        try:
            img, _ = decode_image(path.read_bytes())
        except (OSError, ValueError) as e:  # a file that is no image: counted and named, the rest go on
            skipped.append(f"{path}: {type(e).__name__}: {e}")
            continue
        images.append(resize_crop(img, image_size, crop_size))
        labels.append(label)
        if len(images) == batch_size:
            run(images, labels)
            images, labels = [], []
    if images:
        run(images, labels)
    n = int(seen.sum())
    if n == 0:
        raise ValueError(f"no image could be read ({len(skipped)} skipped: {skipped[:3]})")
    present = seen > 0
    recall = top1[present] / seen[present]
    per_class = {name: float(top1[i] / seen[i]) for i, name in enumerate(classnames) if seen[i] > 0}
    return {
        "top1": float(top1.sum() / n),
        "top5": float(top5.sum() / n),
        "mean_per_class_recall": float(recall.mean()),
        "n": n,
        "classes": len(classnames),
        "skipped": len(skipped),
        "skipped_files": skipped[:20],
        "per_class": per_class,
    }


def load_model(path: str, *, open_clip_config: str | None, tokenizer_path: str | None, device: str):
    """(net, tokenizer, image_size, crop_size, normalize) of a run of ours, or of an open_clip checkpoint
    (file or hub directory: needs CLIP's BPE file, ``--tokenizer``)."""
    from train.checkpoint import export_dir_of, load_stage

    source = Path(path)
    open_clip = open_clip_config is not None or tokenizer_path is not None
    open_clip = open_clip or (source.is_dir() and (source / "open_clip_config.json").exists())
    open_clip = open_clip or source.suffix in (".safetensors", ".bin", ".pt", ".pth")
    if export_dir_of(source) is not None:  # an export of ours (or its weights file): from-open-clip's too
        if open_clip_config is not None or tokenizer_path is not None:
            raise ValueError(
                f"{path}: an export of ours, with its own net config and tokenizer.json: --open-clip-config "
                "and --tokenizer are for open_clip checkpoints"
            )
        open_clip = False
    if not open_clip:
        stage = load_stage(path, map_location=device)
        if not hasattr(stage.net, "encode_image"):
            raise ValueError(f"{path}: a {stage.cfg.get('stage_name')} run; expected a CLIP")
        data = stage.cfg.data
        return stage.net, stage.tokenizer, data.image_size, data.get("crop_size"), data.normalize
    from data.tokenizer import clip_tokenizer
    from train.models.openclip_import import load_open_clip

    tokenizer = clip_tokenizer(tokenizer_path)
    net = load_open_clip(path, open_clip_config, eot_id=tokenizer.eot_id)
    tokenizer = clip_tokenizer(tokenizer_path, context_length=net.text.context_length)
    return net, tokenizer, net.visual.image_size, None, "clip"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.classify", description=__doc__.split("\n")[0])
    p.add_argument(
        "model", help="a CLIP run directory, checkpoint or export of ours, or an open_clip checkpoint"
    )
    p.add_argument("--images", required=True, help="an image folder: DIR/<class>/<image>")
    p.add_argument("--classnames", default=None,
                   help="the classes' names, a line each in the sorted order of the subdirectories (default: "
                   "the subdirectory names, '_' read as a space)")  # fmt: skip
    p.add_argument("--templates", default=None, help="prompts, a line each with {} for the class name")
    p.add_argument("--open-clip-config", default=None,
                   help="the open_clip architecture of a checkpoint that does not carry it (ViT-B-32, ...)")  # fmt: skip
    p.add_argument("--tokenizer", default=None,
                   help="CLIP's bpe_simple_vocab_16e6.txt.gz, for an open_clip checkpoint (default: open_clip's, "
                   "when installed)")  # fmt: skip
    p.add_argument("--batch", type=at_least(1), default=256)
    p.add_argument("--device", type=device, default=default_device())
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        classes, items = image_folder(args.images)
        names = [c.replace("_", " ") for c in classes]
        if args.classnames:
            names = read_lines(args.classnames, "--classnames")
            if len(names) != len(classes):
                raise ValueError(
                    f"--classnames {args.classnames}: {len(names)} names for the {len(classes)} class "
                    f"subdirectories of {args.images}"
                )
        templates = read_lines(args.templates, "--templates") if args.templates else TEMPLATES
        net, tokenizer, size, crop, normalize = load_model(
            args.model,
            open_clip_config=args.open_clip_config,
            tokenizer_path=args.tokenizer,
            device=args.device,
        )
        result = classify(net, tokenizer, items, names, image_size=size, crop_size=crop, normalize=normalize,
                          templates=templates, batch_size=args.batch, device=args.device)  # fmt: skip
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in result["skipped_files"]:
        print(f"skipped {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"| images | classes | top-1 | top-5 | mean per-class recall | skipped |\n|---|---|---|---|---|---|\n"
          f"| {result['n']} | {result['classes']} | {result['top1']:.2%} | {result['top5']:.2%} | "
          f"{result['mean_per_class_recall']:.2%} | {result['skipped']} |")  # fmt: skip
    worst = sorted(result["per_class"].items(), key=lambda kv: kv[1])[:5]
    print("worst classes: " + ", ".join(f"{name} {value:.0%}" for name, value in worst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
