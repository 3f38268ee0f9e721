"""How many decoder steps each sampler needs: the decoder's samples against a many-step reference.

    python -m eval.bench_sampler --cascade outputs/pipeline_cpu_shapes [--samplers ddim,dpmpp_2m]
        [--steps 5,10,15,25] [--reference 200] [--n 64] [--json out.json]

The decoder is conditioned as in eval.probe's decoder rows: each single-object prompt of the benchmark,
with the CLIP embedding of its ground-truth render and its caption, so the prior and the upsamplers play
no part. Every setting starts from the same noise. Both samplers solve the same probability-flow ODE
(DDIM with eta 0, DPM-Solver++(2M)), so the reference is DDIM with ``--reference`` steps, and a
setting's error is the mean absolute difference from it, in levels of 255. Each setting's samples are
also scored by program (colour, shape, count; eval/composition.py) and timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from eval.cli import at_least, default_device, device
from eval.probe import renders, score, single_object_items
from eval.sample import PRECISION_HELP
from train.cascade import PRECISIONS, Cascade
from train.diffusion import SAMPLERS


@torch.no_grad()
def sweep(
    cascade: Cascade,
    samplers: list[str],
    steps: list[int],
    reference: int = 200,
    n: int = 64,
    seed: int = 0,
) -> list[dict]:
    """One row per (sampler, steps), then the reference's: ``sampler``, ``steps``, ``mean_abs_diff`` (levels
    of 255 from the reference), ``colour``, ``shape``, ``count`` (program scores), ``seconds``."""
    dec = cascade.decoder
    items = single_object_items(n, seed)
    tokens = cascade.tokens([it["prompt"] for it in items])
    emb = cascade.clip.embed(renders(items).to(cascade.device), tokens)
    cond = dec.conditioning(emb["img_emb"], tokens, emb.get("txt_feat"))
    size = dec.net.image_size
    noise = torch.randn(
        (len(items), 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.float32
    ).to(cascade.device)

    def synchronize() -> None:  # the sampling loop never reads the GPU: time it to its last kernel
        if cascade.device.type == "cuda":
            torch.cuda.synchronize(cascade.device)

    def run(sampler: str, k: int) -> tuple[torch.Tensor, float]:
        synchronize()
        start = time.perf_counter()
        with cascade.autocast():
            out = dec.sample(cond, steps=k, sampler=sampler, eta=0.0, noise=noise.clone())
        synchronize()
        return out.clamp(-1, 1), time.perf_counter() - start

    ref, ref_seconds = run("ddim", reference)
    rows = []
    for sampler in samplers:
        for k in steps:
            out, seconds = run(sampler, k)
            diff = float((out - ref).abs().mean()) * 127.5
            rows.append(
                {
                    "sampler": sampler,
                    "steps": k,
                    "mean_abs_diff": diff,
                    **score(out, items),
                    "seconds": seconds,
                }
            )
    rows.append(
        {
            "sampler": "ddim",
            "steps": reference,
            "mean_abs_diff": 0.0,
            **score(ref, items),
            "seconds": ref_seconds,
        }
    )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| sampler | steps | mean abs diff from the reference (of 255) | colour | shape | count | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['mean_abs_diff']:.2f} | {r['colour']:.0%} | {r['shape']:.0%} "
            f"| {r['count']:.0%} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{option} {text}: expected positive integers separated by commas")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m eval.bench_sampler",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cascade", required=True, help="a train.pipeline output directory (its decoder and CLIP)"
    )
    p.add_argument("--samplers", default="ddim,dpmpp_2m", help=f"comma-separated, of {', '.join(SAMPLERS)}")
    p.add_argument("--steps", default="5,10,15,25", help="decoder steps to compare, comma-separated")
    p.add_argument("--reference", type=at_least(1), default=200, help="DDIM steps of the reference")
    p.add_argument(
        "--n", type=at_least(1), default=64, help="prompts per benchmark category (its single objects)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--device", type=device, default=default_device())
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    args = p.parse_args(argv)
    try:
        samplers = [s for s in args.samplers.split(",") if s.strip()]
        unknown = [s for s in samplers if s not in SAMPLERS]
        if unknown or not samplers:
            raise ValueError(f"--samplers {args.samplers}: expected some of {', '.join(SAMPLERS)}")
        steps = _ints(args.steps, "--steps")
        if args.reference < 1:
            raise ValueError(f"--reference {args.reference}: expected a number of steps >= 1")
        cascade = Cascade.from_dir(args.cascade, device=args.device, precision=args.precision)
        rows = sweep(cascade, samplers, steps, reference=args.reference, n=args.n, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"decoder of {args.cascade}: {len(single_object_items(args.n, args.seed))} single-object prompts, "
          f"from the renders' embeddings and captions; reference DDIM {args.reference} steps")  # fmt: skip
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
