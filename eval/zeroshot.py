"""Zero-shot classification and retrieval of a trained CLIP run, standalone (the same metrics the CLIP
stage logs during validation, train/validation.py)::

    python -m eval.zeroshot RUN_DIR_OR_CKPT [--shards SPEC] [--batch 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from data.pipeline import ShardDataset
from data.transforms import Normalize
from eval.cli import at_least, default_device, device
from train.checkpoint import load_stage
from train.validation import clip_metrics


@torch.no_grad()
def evaluate_run(
    path: str, shards: str | None = None, batch_size: int = 256, device: str = "cpu"
) -> dict[str, float]:
    """Retrieval (and zero-shot where the shards carry synthetic scenes) of a CLIP run on held-out shards."""
    stage = load_stage(path, map_location=device)
    if not hasattr(stage.net, "encode_image"):
        raise ValueError(
            f"{path}: a {stage.cfg.get('stage_name') or type(stage.net).__name__} run; expected a CLIP run"
        )
    shards = shards or stage.cfg.data.get("val_shards")
    if not shards:
        raise ValueError(f"{path}: the run has no data.val_shards; pass --shards")
    metrics = evaluate_net(
        stage.net,
        stage.tokenizer,
        shards,
        image_size=stage.cfg.data.image_size,
        crop_size=stage.cfg.data.get("crop_size"),  # the run trained on crops: its net takes their size
        normalize=stage.cfg.data.normalize,
        batch_size=batch_size,
        device=device,
    )
    return {**metrics, "step": float(stage.global_step)}


@torch.no_grad()
def evaluate_net(
    net: torch.nn.Module,
    tokenizer,
    shards: str,
    *,
    image_size: int,
    crop_size: int | None = None,
    normalize: str = "clip",
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, float]:
    """:func:`evaluate_run` for a net held in memory (an imported open_clip model, ...): its tokenizer
    tokenises the captions and prompts, images are resized to ``image_size``, centre-cropped to
    ``crop_size`` (default: ``image_size``) and normalised as ``data.normalize``."""
    normalize = Normalize(normalize)
    ds = ShardDataset(
        shards,
        batch_size=batch_size,
        mode="epoch",
        image_size=image_size,
        crop_size=crop_size,
        crop="center",
        tokenizer=tokenizer,
        keep_json=True,
        shuffle_buffer=0,
        shuffle_shards=False,
        seed=0,
    )
    net = net.to(device).eval()  # (a net in training mode would drop patches: net.vision.patch_dropout)
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
    metrics = {"n": float(len(img_t))}
    metrics.update(clip_metrics(img_t, txt_t, captions, scenes, net.encode_text, tokenizer, device=device))
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.zeroshot", description="Zero-shot and retrieval of a CLIP run"
    )
    p.add_argument("run", help="run directory (outputs/clip/<time>) or a checkpoint inside its checkpoints/")
    p.add_argument("--shards", default=None, help="held-out shards (default: the run's data.val_shards)")
    p.add_argument("--batch", type=at_least(1), default=256)
    p.add_argument("--device", type=device, default=default_device())
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
