"""Where a trained cascade loses the shapes: each stage probed on ground-truth renders.

    python -m eval.probe --cascade outputs/pipeline [--n 48] [--steps 25] [--upsampler-steps 15,10]
        [--prior-guidance G] [--json F]

The pipeline's ``sample`` stage runs it too (``sample.probe``: prompts, 0 to skip) into
``<out_dir>/sample/probe.md`` and report.md.

The compositional benchmark (eval/benchmark.py) scores the whole chain text -> prior -> decoder ->
upsamplers; when single-object shape accuracy is low it does not say which stage is to blame. This
probe feeds each stage the ground truth instead of the previous stage's output, on the benchmark's
single-object prompts rendered by the dataset's own renderer (eval/composition.py ``render_spec``),
and scores every result with the same program scorer:

- ``renders``: the renders at the decoder's size, upsampled bicubically to the scorer's 64 px: the
  ceiling any decoder of that size can reach.
- ``upsampler k``: those renders through the upsamplers, one stage after another.
- ``decoder (image + caption | caption only | image only)``: the decoder sampled from the renders'
  own CLIP image embeddings and captions, with one of the two dropped (as its classifier-free guidance
  dropout does); a conditioning the decoder ignores gives near-chance figures when alone.
- ``denoise t=N``: the decoder's predicted x0 from the renders noised to step N of its schedule,
  next to the noised render itself: whether the decoder keeps a shape it can see.
- ``clip``: how far the CLIP separates captions that differ only in shape (cosine between the text
  embeddings of "a red circle", "a red square", ...): a decoder cannot be told what its
  conditioning does not distinguish.

Chance is 1/6 for shape, 1/8 for colour.

``pairs``: where two-object prompts lose what the benchmark's binding and spatial categories test.
Each prompt is set against its contrast (composition.contrast: binding, the two colours exchanged;
spatial, the relation reversed), both rendered with the same layout and background:

- ``clip_image``: the render's CLIP image embedding is closer to its caption's text embedding than to
  the contrast's; ``clip_text``: the caption's is closer to the render's than to the contrast render's
  (chance 50%: the DALL-E 2 paper's explanation of unCLIP's binding failures is that CLIP's
  embeddings do not tell the two apart);
- ``prior``: the prior's image embedding sampled from the caption is closer to the render's than to
  the contrast render's;
- ``text_cos``, ``image_cos``: mean cosine between the two captions' and the two renders' embeddings;
- the decoder sampled from the render's own embedding and caption (each, and both), scored by the
  benchmark's criteria (all correct; binding: objects bound and swapped; spatial: relation), next to
  the renders at the decoder's size (the ceiling).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.images import to_uint8, to_unit_range
from data.synthetic import SHAPES
from eval import composition
from eval.cli import at_least, default_device, device
from eval.sample import PRECISION_HELP
from train.cascade import PRECISIONS, Cascade, StageSettings
from train.validation import closer_rate

SCORER_SIZE = 64
CRITERIA = ("colour", "shape", "count")
PAIRS = ("binding", "spatial")
DECODER_PROBES = (  # name, drop the image embedding, drop the caption
    ("image + caption", False, False),
    ("caption only", True, False),
    ("image only", False, True),
)


def single_object_items(n: int, seed: int = 0) -> list[dict]:
    """The first ``n`` single-object prompts of the benchmark (composition.benchmark_prompts)."""
    return [i for i in composition.benchmark_prompts(n, seed=seed) if i["category"] == "single"]


def renders(items: Sequence[dict]) -> torch.Tensor:
    """uint8 (N, 3, 64, 64): each item's scene drawn by the dataset's renderer."""
    return torch.stack(
        [
            torch.from_numpy(np.array(composition.render_spec(it["spec"], SCORER_SIZE, seed=k))).permute(
                2, 0, 1
            )
            for k, it in enumerate(items)
        ]
    )


def at_scorer_size(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] at any size -> uint8 at the scorer's 64 px (bicubic)."""
    x = images.float().clamp(-1, 1)
    if x.shape[-1] != SCORER_SIZE:
        x = F.interpolate(x, size=(SCORER_SIZE, SCORER_SIZE), mode="bicubic", align_corners=False)
    return to_uint8(x)


def score(images: torch.Tensor, items: Sequence[dict]) -> dict[str, float]:
    """Colour, shape and count accuracy of float images in [-1, 1] at any size (bicubic to 64 px)."""
    metrics = composition.evaluate(at_scorer_size(images), items)
    return {c: metrics[f"single/{c}"] for c in CRITERIA}


def caption_separation(cascade: Cascade) -> dict[str, float]:
    """Mean and max cosine between the CLIP text embeddings of captions that differ only in shape."""
    tokens = cascade.tokens([f"a red {s}" for s in SHAPES])
    emb = F.normalize(cascade.clip.embed(None, tokens)["txt_emb"].float(), dim=-1)
    cos = emb @ emb.T
    off = cos[~torch.eye(len(SHAPES), dtype=torch.bool, device=cos.device)]
    return {"mean_cos": float(off.mean()), "max_cos": float(off.max())}


@torch.no_grad()
def probe(
    cascade: Cascade,
    n: int = 48,
    steps: int | None = None,
    guidance_scale: float | None = None,
    noise_steps: Sequence[int] = (20, 50, 100, 200, 300),
    upsampler_steps: Sequence[int | None] = (),
    seed: int = 0,
    prior: StageSettings | None = None,
) -> dict:
    """Every probe of the module docstring: ``{"rows": [{"probe", "colour", "shape", "count"}], "clip": ...,
    "pairs": {"binding": ..., "spatial": ...}}``. ``n``: prompts per benchmark category (the
    single-object, binding and spatial ones are used); ``steps``: decoder DDIM steps and
    ``upsampler_steps`` per upsampler (None or missing: the stage's training config); ``prior``: the
    prior's sampling settings for the pairs (default: its training config)."""
    dec = cascade.decoder
    for step in noise_steps:
        if not 0 <= step < dec.diffusion.num_timesteps:
            raise ValueError(f"noise step {step}: expected 0..{dec.diffusion.num_timesteps - 1}")
    items = single_object_items(n, seed)
    device = cascade.device
    size = dec.net.image_size
    truth = renders(items)
    x0 = to_unit_range(truth.to(device), size)
    rows: list[dict] = [{"probe": f"renders at {size} px", **score(x0, items)}]

    g = torch.Generator(device).manual_seed(seed)
    x = x0
    for k, up in enumerate(cascade.upsamplers):
        s = upsampler_steps[k] if k < len(upsampler_steps) else None
        with cascade.autocast():
            x = up.upsample(x.clamp(-1, 1), g, steps=s).clamp(-1, 1)
        rows.append({"probe": f"renders -> upsampler {k + 1} ({x.shape[-1]} px)", **score(x, items)})

    tokens = cascade.tokens([it["prompt"] for it in items])
    emb = cascade.clip.embed(truth.to(device), tokens)
    cond = dec.conditioning(emb["img_emb"], tokens, emb.get("txt_feat"))
    with cascade.autocast():  # the nets as the cascade runs them (bf16 on a GPU)
        rows += [
            {"probe": f"decoder ({name})", **score(out, items)}
            for name, out in _decoder_samples(dec, cond, steps, guidance_scale, seed)
        ]
        rows += _denoise_probes(dec, cond, x0, items, noise_steps, seed)
    all_items = composition.benchmark_prompts(n, seed=seed)
    return {
        "n": len(items),
        "decoder_steps": int(dec.hparams.sample_steps if steps is None else steps),
        "rows": rows,
        "clip": caption_separation(cascade),
        "pairs": {
            category: pairs(
                cascade,
                [i for i in all_items if i["category"] == category],
                prior or StageSettings(),
                steps,
                guidance_scale,
                seed,
            )
            for category in PAIRS
        },
    }


def _decoder_samples(dec, cond: dict, steps, guidance_scale, seed: int):
    """(name, images in [-1, 1]) of the decoder sampled from ``cond`` with each of DECODER_PROBES."""
    for name, drop_image, drop_text in DECODER_PROBES:
        g = torch.Generator(dec.device).manual_seed(seed)
        out = dec.sample(
            cond,
            guidance_scale=guidance_scale,
            generator=g,
            steps=steps,
            eta=0.0,
            drop_image=drop_image,
            drop_text=drop_text,
        )
        yield name, out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def pair_score(images: torch.Tensor, items: Sequence[dict]) -> dict[str, float]:
    """The benchmark's criteria of two-object prompts of one category: ``correct`` (all of them),
    ``objects_bound``, ``objects_swapped`` and, for spatial prompts, ``relation``."""
    category = items[0]["category"]
    metrics = composition.evaluate(at_scorer_size(images), items)
    keys = ("correct", "objects_bound", "objects_swapped", "relation")
    return {k: metrics[f"{category}/{k}"] for k in keys if f"{category}/{k}" in metrics}


@torch.no_grad()
def pairs(
    cascade: Cascade,
    items: Sequence[dict],
    prior: StageSettings,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
) -> dict:
    """The ``pairs`` probes of the module docstring for the benchmark ``items`` of one two-object category."""
    contrasts = [composition.contrast(it) for it in items]
    device, dec = cascade.device, cascade.decoder
    truth, other = renders(items), renders(contrasts)
    text, text_other = (
        cascade.text([it["prompt"] for it in items]),
        cascade.text([c["prompt"] for c in contrasts]),
    )
    img, img_other = cascade.image_embedding(truth), cascade.image_embedding(other)
    result: dict = {
        "n": len(items),
        "clip_image": closer_rate(img, text["txt_emb"], text_other["txt_emb"]),
        "clip_text": closer_rate(text["txt_emb"], img, img_other),
        "text_cos": _cosine(text["txt_emb"], text_other["txt_emb"]),
        "image_cos": _cosine(img, img_other),
    }
    if cascade.prior is not None:
        sampled = cascade.prior_sample(text, prior, torch.Generator(device).manual_seed(seed))
        result["prior"] = closer_rate(sampled, img, img_other)
    size = dec.net.image_size
    rows = [{"probe": f"renders at {size} px", **pair_score(to_unit_range(truth.to(device), size), items)}]
    cond = dec.conditioning(img, text["tokens"], text["txt_feat"])
    with cascade.autocast():
        rows += [
            {"probe": f"decoder ({name})", **pair_score(out, items)}
            for name, out in _decoder_samples(dec, cond, steps, guidance_scale, seed)
        ]
    result["rows"] = rows
    return result


def _denoise_probes(
    dec, cond: dict, x0: torch.Tensor, items: list[dict], noise_steps, seed: int
) -> list[dict]:
    """One denoising step from the noised renders at each of ``noise_steps``: the decoder's x0 against
    the noised render itself (what the noise alone leaves)."""
    b, device, diffusion = len(items), x0.device, dec.diffusion
    kwargs, _ = dec.guided(cond)
    g = torch.Generator(device).manual_seed(seed)
    rows = []
    for step in noise_steps:
        t = torch.full((b,), step, dtype=torch.long, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        x_t = diffusion.q_sample(x0, t, noise)
        pred = diffusion.p_mean_variance(dec.ema.shadow, x_t, t, model_kwargs=kwargs)["pred_x0"]
        abar = float(diffusion.alphas_cumprod[step])
        rows.append({"probe": f"denoise t={step}: decoder x0", **score(pred, items)})
        rows.append({"probe": f"denoise t={step}: noised render", **score(x_t / math.sqrt(abar), items)})
    return rows


def _slug(name: str) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    while "__" in slug:
        slug = slug.replace("__", "_")
    return slug


def metrics(result: dict) -> dict[str, float]:
    """Flat ``probe/<row>/shape`` figures (and the decoder rows' colour) for reports, and the pairs'
    ``probe/<category>/<probe>`` (``probe/binding/clip_image``, ``probe/binding/decoder_image_caption/
    objects_bound``, ...)."""
    out = {}
    for r in result["rows"]:
        slug = _slug(r["probe"])
        out[f"probe/{slug}/shape"] = r["shape"]
        if r["probe"].startswith("decoder"):
            out[f"probe/{slug}/colour"] = r["colour"]
    out["probe/clip_shape_caption_max_cos"] = result["clip"]["max_cos"]
    for category, pair in result.get("pairs", {}).items():
        for key in PAIR_PROBES:
            if key in pair:
                out[f"probe/{category}/{key}"] = pair[key]
        for r in pair["rows"]:
            for key, value in r.items():
                if key != "probe":
                    out[f"probe/{category}/{_slug(r['probe'])}/{key}"] = value
    return out


PAIR_PROBES = {  # key -> the table's words
    "clip_image": "CLIP: a render's embedding is closer to its caption than to the contrast's",
    "clip_text": "CLIP: a caption's embedding is closer to its render than to the contrast's render",
    "prior": "prior: its embedding from the caption is closer to the render than to the contrast's",
    "text_cos": "cosine between the caption's and the contrast's text embeddings",
    "image_cos": "cosine between the render's and the contrast render's image embeddings",
}


def pairs_table(result: dict) -> str:
    """Markdown: one column per two-object category, the picks (chance 50%) and the decoder rows."""
    cats = list(result)
    n = ", ".join(f"{c} {result[c]['n']}" for c in cats)
    lines = [
        f"Two-object prompts ({n}) against their contrast (binding: the two colours exchanged; spatial: the "
        "relation reversed), rendered with the same layout; chance for the picks: 50%",
        "",
        "| probe | " + " | ".join(cats) + " |",
        "|---|" + "---|" * len(cats),
    ]
    for key, words in PAIR_PROBES.items():
        if all(key in result[c] for c in cats):
            fmt = "{:.3f}" if key.endswith("_cos") else "{:.0%}"
            lines.append(f"| {words} | " + " | ".join(fmt.format(result[c][key]) for c in cats) + " |")

    def cell(r: dict) -> str:
        extra = [
            f"{k.split('_')[-1]} {r[k]:.0%}"
            for k in ("objects_bound", "objects_swapped", "relation")
            if k in r
        ]
        return f"{r['correct']:.0%}" + (f" ({', '.join(extra)})" if extra else "")

    for i, r in enumerate(result[cats[0]]["rows"]):
        lines.append(
            f"| {r['probe']}: all correct | " + " | ".join(cell(result[c]["rows"][i]) for c in cats) + " |"
        )
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = [
        f"{result['n']} single-object prompts, decoder DDIM steps {result['decoder_steps']}; "
        "chance: shape 17%, colour 12.5%",
        "",
        "| probe | colour | shape | count |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['probe']} | {r['colour']:.0%} | {r['shape']:.0%} | {r['count']:.0%} |")
    c = result["clip"]
    lines += [
        "",
        f"CLIP text embeddings of captions differing only in shape: cosine mean {c['mean_cos']:.3f}, "
        f"max {c['max_cos']:.3f}",
    ]
    if result.get("pairs"):
        lines += ["", pairs_table(result["pairs"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--cascade", required=True, help="a train.pipeline output directory")
    p.add_argument("--n", type=at_least(1), default=48, help="single-object prompts")
    p.add_argument("--steps", type=at_least(1), help="decoder DDIM steps (default: its training config)")
    p.add_argument(
        "--guidance", type=at_least(0, float), help="decoder guidance (default: its training config)"
    )
    p.add_argument("--noise-steps", default="20,50,100,200,300", help="steps of the denoising probe")
    p.add_argument(
        "--upsampler-steps", default="", help="DDIM steps per upsampler, e.g. 15,10 (default: their configs)"
    )
    p.add_argument(
        "--prior-guidance",
        type=at_least(0, float),
        help="the prior's guidance for the pairs (default: its config)",
    )
    p.add_argument("--prior-steps", type=at_least(1), help="the prior's sampling steps (default: its config)")
    p.add_argument(
        "--best-of", type=at_least(1), help="prior samples per prompt, the closest to the text kept"
    )
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--device", type=device, default=default_device())
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    args = p.parse_args(argv)
    try:
        noise_steps = [int(s) for s in args.noise_steps.split(",") if s.strip()]
        up_steps = [int(s) for s in args.upsampler_steps.split(",") if s.strip()]
    except ValueError:
        print("error: --noise-steps and --upsampler-steps take comma-separated integers", file=sys.stderr)
        return 2
    try:
        result = probe(
            Cascade.from_dir(args.cascade, device=args.device, precision=args.precision),
            n=args.n,
            steps=args.steps,
            guidance_scale=args.guidance,
            noise_steps=noise_steps,
            upsampler_steps=up_steps,
            prior=StageSettings(
                steps=args.prior_steps, guidance_scale=args.prior_guidance, best_of=args.best_of
            ),
        )
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
