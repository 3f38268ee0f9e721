"""Sample from the trained cascade (train/cascade.py) from the command line.

    python -m eval.sample text "a red circle" "two blue squares" --cascade outputs/pipeline --out samples/
    python -m eval.sample text --prompts prompts.txt --n 4 --decoder-guidance 3 --seed 1 --cascade ...
    python -m eval.sample variations photo.png --n 8 --eta 0.8 [--invert] --cascade ...
    python -m eval.sample inpaint photo.png --mask mask.png --prompt "a red circle" [--resample 2] --cascade ...
    python -m eval.sample interpolate a.png b.png --n 7 [--invert] --cascade ...
    python -m eval.sample text-diff photo.png --from "a red circle" --to "a blue circle" --cascade ...

Stages: ``--cascade DIR`` takes a pipeline output directory (train/pipeline.py: DIR/{prior,decoder,
upsampler_256,upsampler_1024}, each a run directory or its ``export/``); or name them one by one with
``--prior``, ``--decoder``, ``--upsampler`` (repeat, in order) and ``--clip`` (default: the decoder's).
Each stage's sampling settings default to its training config and can be set per stage.

Writes ``OUT/grid.png`` (one row per prompt or input, the last stage's images) and
``OUT/<row>_<i>.png`` single files; ``--all-stages`` adds ``OUT/stage<k>_grid.png`` per stage. Masks:
white (>= 128) = keep the input's pixel, black = fill.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.images import save_grid
from eval.cli import at_least, default_device, device
from train.cascade import DECODER_CONDITIONS, PRECISIONS, Cascade, CascadeOutput, StageSettings
from train.diffusion import SAMPLERS

log = logging.getLogger(__name__)


def load_cascade(args: argparse.Namespace) -> Cascade:
    return Cascade.from_dir(
        args.cascade,
        prior=args.prior,
        decoder=args.decoder,
        upsamplers=args.upsampler or (),
        clip=args.clip,
        device=args.device,
        precision=args.precision,
    )


def centre_square(img: Image.Image) -> Image.Image:
    """The largest centred square of ``img``: what the stages were trained on (data/transforms.py crops
    the centre after resizing the shorter side), where resizing the whole image would squash it."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def read_image(path: str) -> torch.Tensor:
    """uint8 (3, S, S): the image's centred square (its CLIP embedding and the inpainting canvas come
    from it, as in training)."""
    try:
        img = Image.open(path).convert("RGB")
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"{path}: cannot read the image ({e})") from e
    if img.size[0] != img.size[1]:
        log.info("%s: %dx%d, its centred %d px square is used", path, *img.size, min(img.size))
        img = centre_square(img)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def read_mask(path: str, image_path: str) -> torch.Tensor:
    """(1, S, S) float, 1 where ``image_path``'s pixels are kept: the mask at the image's size (or its
    shape, resized), cropped as ``read_image`` crops the image."""
    try:
        img = Image.open(path).convert("L")
        size = Image.open(image_path).size
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"--mask {path}: cannot read the mask image ({e})") from e
    if img.size != size:
        (mw, mh), (w, h) = img.size, size
        if abs(mw * h - mh * w) > 0.01 * w * mh:  # a mask for another image: stretching it would misplace it
            raise ValueError(
                f"--mask {path}: {mw}x{mh}, the image {image_path} is {w}x{h}: expected a mask of the "
                "image's size (or of its shape)"
            )
        img = img.resize(size, Image.NEAREST)
    return torch.from_numpy((np.asarray(centre_square(img)) >= 128).astype(np.float32))[None]


PRECISION_HELP = "what the diffusion nets sample in (auto: bf16 on a GPU, fp32 on the CPU)"


def add_sampling_arguments(
    parser: argparse.ArgumentParser,
    eta: float | None = None,
    *,
    prior: bool = True,
    condition: bool = True,
    with_eta: bool = True,
):
    """The cascade's sampling options (``settings`` reads them back); also eval.benchmark's. A mode that
    does not use the prior (variations, interpolation), the decoder's condition (both decode from the
    image embedding alone) or eta (interpolation: eta 0) does not take those options."""
    s = parser.add_argument_group("sampling (default: each stage's training config)")
    if prior:
        s.add_argument(
            "--prior-guidance", type=at_least(0, float), help="classifier-free guidance scale of the prior"
        )
        s.add_argument("--prior-steps", type=at_least(1))
        s.add_argument("--prior-sampler", choices=SAMPLERS, default="ddim")
        s.add_argument(
            "--best-of", type=at_least(1), help="prior samples per prompt; the closest to the text is kept"
        )
    s.add_argument(
        "--decoder-guidance", type=at_least(0, float), help="classifier-free guidance scale of the decoder"
    )
    s.add_argument("--decoder-steps", type=at_least(1))
    s.add_argument("--decoder-sampler", choices=SAMPLERS, default="ddim")
    if condition:
        s.add_argument(
            "--decoder-condition",
            choices=DECODER_CONDITIONS,
            default="both",
            help="what the decoder sees: the image embedding and the caption, the caption alone, or the embedding alone",
        )
    if with_eta:
        s.add_argument(
            "--eta",
            type=at_least(0, float),
            default=eta,
            help="the decoder's DDIM eta (--decoder-sampler ddim only)",
        )
    s.add_argument("--upsampler-steps", help="sampling steps per upsampler: N or N1,N2 (paper: 27,15)")
    s.add_argument("--upsampler-sampler", choices=SAMPLERS, default="ddim")
    return s


def settings(args: argparse.Namespace, n_up: int) -> dict:
    """``prior``, ``decoder`` and ``upsamplers`` StageSettings from ``add_sampling_arguments``' options."""
    try:
        up_steps = [int(s) for s in args.upsampler_steps.split(",")] if args.upsampler_steps else []
    except ValueError:
        raise ValueError(
            f"--upsampler-steps {args.upsampler_steps}: expected integers separated by commas"
        ) from None
    if len(up_steps) == 1:
        up_steps *= n_up
    if up_steps and len(up_steps) != n_up:
        raise ValueError(
            f"--upsampler-steps {args.upsampler_steps}: expected 1 or {n_up} comma-separated values"
        )
    option = lambda name, default=None: getattr(args, name, default)  # noqa: E731 (a mode's absent options)
    return {
        "prior": StageSettings(
            steps=option("prior_steps"),
            sampler=option("prior_sampler", "ddim"),
            guidance_scale=option("prior_guidance"),
            best_of=option("best_of"),
        ),
        "decoder": StageSettings(
            steps=args.decoder_steps,
            sampler=args.decoder_sampler,
            eta=option("eta"),
            guidance_scale=args.decoder_guidance,
            condition=option("decoder_condition", "both"),
        ),
        "upsamplers": [
            StageSettings(steps=up_steps[k] if up_steps else None, sampler=args.upsampler_sampler)
            for k in range(n_up)
        ],
    }


def write(out: CascadeOutput, rows: int, out_dir: Path, all_stages: bool) -> list[Path]:
    """grid.png (``rows`` rows) and one PNG per image; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_row = out.images.shape[0] // rows
    written = []
    stages = list(enumerate(out.stages)) if all_stages else [(len(out.stages) - 1, out.images)]
    for k, images in stages:
        scale = max(1, out.images.shape[-1] // images.shape[-1])
        grid = [images[r * per_row : (r + 1) * per_row] for r in range(rows)]
        name = "grid.png" if k == len(out.stages) - 1 else f"stage{k}_grid.png"
        written.append(save_grid(grid, out_dir / name, scale=scale))
    for i, img in enumerate(out.images):
        path = out_dir / f"{i // per_row:03d}_{i % per_row:02d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
        written.append(path)
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.sample", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    modes = {
        "text": sub.add_parser("text", help="text -> image through prior, decoder, upsamplers"),
        "variations": sub.add_parser("variations", help="variations of input images (CLIP image embedding)"),
        "inpaint": sub.add_parser("inpaint", help="fill the masked region of an image following a prompt"),
        "interpolate": sub.add_parser("interpolate", help="slerp between two images' CLIP embeddings"),
        "text-diff": sub.add_parser(
            "text-diff", help="change an image toward a caption (the paper's text diffs)"
        ),
    }
    modes["text"].add_argument("prompts", nargs="*", help="prompts (or --prompts FILE, one per line)")
    modes["text"].add_argument("--prompts", dest="prompts_file", help="a text file with one prompt per line")
    modes["variations"].add_argument("images", nargs="+", help="input images (PNG/JPEG)")
    modes["variations"].add_argument(
        "--invert", action="store_true", help="start from the image's DDIM inversion"
    )
    modes["inpaint"].add_argument("image")
    modes["inpaint"].add_argument("--mask", required=True, help="white = keep, black = fill")
    modes["inpaint"].add_argument("--prompt", required=True)
    modes["inpaint"].add_argument(
        "--resample", type=at_least(0), default=0, help="extra renoise passes per step"
    )
    modes["interpolate"].add_argument("images", nargs=2, help="the two end images")
    modes["interpolate"].add_argument(
        "--invert", action="store_true", help="slerp the two images' DDIM inversions too (keeps layouts)"
    )
    modes["text-diff"].add_argument("image")
    modes["text-diff"].add_argument("--from", dest="source", required=True, help="a caption of the image")
    modes["text-diff"].add_argument("--to", dest="target", required=True, help="the caption to move toward")
    modes["text-diff"].add_argument(
        "--max-theta", type=float, default=0.5, help="the last frame's fraction of the angle (paper: 0.5)"
    )
    for name, m in modes.items():
        g = m.add_argument_group("stages")
        g.add_argument("--cascade", help="a train.pipeline output directory")
        g.add_argument("--prior", help="prior run directory (or export)")
        g.add_argument("--decoder", help="decoder run directory (or export)")
        g.add_argument("--upsampler", action="append", help="upsampler run directory, in order (repeat)")
        g.add_argument("--clip", help="CLIP run directory (default: the decoder's clip_ckpt)")
        decodes_embedding = name in ("variations", "interpolate", "text-diff")  # no prior, no caption
        s = add_sampling_arguments(
            m,
            eta=0.8 if name == "variations" else None,
            prior=not decodes_embedding,
            condition=not decodes_embedding,
            with_eta=name not in ("interpolate", "text-diff"),  # (DDIM at eta 0)
        )
        frames = name in ("interpolate", "text-diff")
        s.add_argument("--n", type=at_least(1), default=5 if frames else 4, help="images per row")
        s.add_argument("--seed", type=int, default=0)
        o = m.add_argument_group("output")
        o.add_argument("--out", default="samples", help="output directory")
        o.add_argument("--all-stages", action="store_true", help="also a grid per stage")
        o.add_argument("--device", type=device, default=default_device())
        o.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    return p


def run(args: argparse.Namespace) -> dict:
    cascade = load_cascade(args)
    st = settings(args, len(cascade.upsamplers))
    common = {"decoder": st["decoder"], "upsamplers": st["upsamplers"], "seed": args.seed}
    if args.mode == "text":
        prompts = list(args.prompts)
        if args.prompts_file:
            prompts += [
                line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()
            ]
        if not prompts:
            raise ValueError("text: no prompts (give them as arguments or with --prompts FILE)")
        rows = len(prompts)
        out = cascade.text_to_image([p for p in prompts for _ in range(args.n)], prior=st["prior"], **common)
    elif args.mode == "variations":
        images = [read_image(p) for p in args.images]
        rows = len(images)
        out = cascade.variations(
            _same_size(images, args.images), args.n, eta=st["decoder"].eta, invert=args.invert, **common
        )
    elif args.mode == "inpaint":
        image = read_image(args.image)
        mask = read_mask(args.mask, args.image)
        rows = 1
        out = cascade.inpaint(
            image[None].repeat(args.n, 1, 1, 1),
            mask[None].repeat(args.n, 1, 1, 1),
            [args.prompt] * args.n,
            resample=args.resample,
            prior=st["prior"],
            **common,
        )
    elif args.mode == "text-diff":
        rows = 1
        out = cascade.text_diff(
            read_image(args.image), args.source, args.target, args.n, max_theta=args.max_theta, **common
        )
    else:
        a, b = (read_image(p) for p in args.images)
        rows = 1
        out = cascade.interpolate(a, b, args.n, invert=args.invert, **common)
    written = write(out, rows, Path(args.out), args.all_stages)
    grid = next(p for p in written if p.name == "grid.png")  # (with --all-stages the stage grids come first)
    return {"grid": str(grid), "files": len(written), "image_size": int(out.images.shape[-1])}


def _same_size(images: list[torch.Tensor], paths: list[str]) -> torch.Tensor:
    sizes = {tuple(im.shape[1:]) for im in images}
    if len(sizes) > 1:
        raise ValueError(
            f"variations: the images differ in size {sorted(sizes)} ({paths}); give images of one size"
        )
    return torch.stack(images)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = _parser().parse_args(argv)
    try:
        result = run(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
