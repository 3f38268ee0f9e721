"""Training-step benchmark: each stage's step on one device, next to what users run instead.

    python -m eval.bench_train                                  # a GPU: every stage at the anchors' shapes
    python -m eval.bench_train --device cpu --size tiny         # the CPU smoke version (CI): same table
    python -m eval.bench_train --cases clip_b16,decoder --compile regional --json OUT.json

A case is one stage's net, composed from the real config (``conf/stage`` + ``conf/net`` + overrides,
so it is the net a run trains), its diffusion process or loss, and AdamW over its parameter groups
(fused on CUDA). Inputs are random tensors already on the device (the data path is measured by
eval/bench_data.py): a step is forward + loss + backward + optimizer step under autocast (bf16 on a GPU).
The decoder and prior take random CLIP features in place of a frozen CLIP's.

Method: ``--warmup`` steps, then ``--iters`` steps each timed by CUDA events (wall clock on a CPU); the
median is reported. FLOPs of one forward+backward are counted once on the eager net by
``train.perf.ModelFlopCounter`` (activation-checkpoint recompute excluded); MFU divides the achieved
FLOP/s by the dense matmul ceiling measured at the start of the same run (the fastest of 20 bf16 8192^3
products on a GPU; at the run's dtype on a CPU). Peak memory: ``torch.cuda.max_memory_allocated`` over the case.

Anchors (``open_clip_b16``, ``open_clip_l14``, ``diffusers_unet64``, ``dalle2_prior``) run when their
packages are installed (``pip install -e .[bench]``); otherwise their row says so. Each of our cases
names the anchor it is compared with (``vs anchor``: our samples/s over the anchor's, same run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.cli import at_least, default_device, device
from train.perf import ModelFlopCounter, matmul_ceiling, synchronize


@dataclass(frozen=True)
class Case:
    """One benchmarked step. ``clip``: the CLIP the stage is conditioned on: (embedding width, text
    width, context length, vocabulary)."""

    name: str
    stage: str  # clip | prior | decoder | upsampler_256 | upsampler_1024 | anchor
    batch: int
    net: str | None = None  # conf/net file
    overrides: tuple[str, ...] = ()
    clip: tuple[int, int, int, int] = (128, 128, 16, 1024)
    anchor: str | None = None
    notes: str = ""


TINY_CLIP = (128, 128, 16, 1024)
L14_CLIP = (768, 768, 77, 49408)  # ViT-L/14: what the anchors condition on (77 tokens x 768)
GLIDE64 = (
    "net.model_channels=192",
    "net.num_res_blocks=3",
    "net.channel_mult=[1,2,3,4]",
    "net.attention_resolutions=[32,16,8]",
    "net.head_channels=64",
    "net.text_encoder=clip",
    "++net.text_pooled=true",
    "net.dropout=0.0",
    "net.grad_checkpointing=false",
)

SIZES: dict[str, list[Case]] = {
    "tiny": [
        Case("clip", "clip", 32, "clip_tiny"),
        Case("prior", "prior", 64, "prior_tiny", ("net.use_text_tokens=true",)),
        Case("decoder", "decoder", 16, "decoder_tiny"),
        Case("upsampler_256", "upsampler_256", 16, "upsampler_256_tiny"),
        Case("upsampler_1024", "upsampler_1024", 8, "upsampler_1024_tiny"),
    ],
    "anchor": [
        Case("clip_b16", "clip", 256, "clip_vit_b16", clip=(512, 512, 77, 49408), anchor="open_clip_b16"),
        Case("clip_l14", "clip", 256, "clip_vit_l14", clip=L14_CLIP, anchor="open_clip_l14"),
        Case(
            "prior",
            "prior",
            512,
            "prior_paper",
            ("net.width=768", "net.layers=12", "net.heads=12", "net.mlp_ratio=4.0"),
            L14_CLIP,
            "dalle2_prior",
            "768 wide x 12 blocks over 77 text tokens",
        ),
        Case(
            "decoder",
            "decoder",
            64,
            "decoder_paper",
            GLIDE64,
            L14_CLIP,
            "diffusers_unet64",
            "GLIDE-64 widths",
        ),
        Case(
            "upsampler_256",
            "upsampler_256",
            32,
            "upsampler_256_paper",
            ("experiment=upsampler_256_paper", "net.grad_checkpointing=false"),
            notes="64 px crops of 256, as it trains",
        ),
        Case(
            "upsampler_1024",
            "upsampler_1024",
            16,
            "upsampler_1024_paper",
            ("experiment=upsampler_1024_paper", "net.grad_checkpointing=false"),
            notes="256 px crops of 1024",
        ),
    ],
}
ANCHORS = ("open_clip_b16", "open_clip_l14", "diffusers_unet64", "dalle2_prior")
ANCHOR_SIZES = {"anchor": ANCHORS, "tiny": ()}


@dataclass
class Workload:
    """A net, its loss on one random batch, and what to report about it."""

    model: torch.nn.Module
    loss: Callable[[], torch.Tensor]  # forward + loss on the batch (inside autocast)
    batch: int
    weight_decay: float = 0.0
    config: dict = field(default_factory=dict)


# ---- our stages --------------------------------------------------------------------------------------
def compose_stage(case: Case):
    """The composed run config of ``case`` with the CLIP-dependent sizes filled in (as train/run.py does)."""
    from hydra import compose, initialize_config_dir

    from train.run import CONF_DIR

    embed, text_width, context, vocab = case.clip
    fill = {
        "clip": [f"net.eot_id={vocab - 1}", f"net.text.vocab_size={vocab}"],
        "prior": [f"net.embed_dim={embed}", f"net.text_width={text_width}", f"net.context_length={context}"],
        "decoder": ["clip_ckpt=unused", f"net.cond_dim={embed}", f"++net.text_dim={text_width}"],
    }.get(case.stage, [])
    overrides = [f"stage={case.stage}", f"net={case.net}", "logger=none", *case.overrides, *fill]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("train", overrides=overrides)


class _Random:
    """Seeded random inputs on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.g = torch.Generator(device=device).manual_seed(0)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, generator=self.g)

    def images(self, b: int, size: int) -> torch.Tensor:
        """Smooth random images in [-1, 1] (a quarter-size field, upsampled): learnable, unlike white noise."""
        coarse = self.randn(b, 3, max(size // 4, 1), max(size // 4, 1))
        return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


def build_stage(case: Case, device: torch.device) -> Workload:
    """The stage's real net (composed config) and its training loss on one random batch."""
    from hydra.utils import instantiate

    cfg = compose_stage(case)
    net = instantiate(cfg.net).train()
    rand = _Random(device)
    if case.stage == "clip":
        return _clip_workload(cfg, net.to(device), case.batch, rand)
    if case.stage.startswith("upsampler"):
        return _upsampler_workload(cfg, net, case, rand)
    return _diffusion_workload(cfg, net.to(device), case, rand)


def _clip_workload(cfg, net: torch.nn.Module, b: int, rand: _Random) -> Workload:
    from train.losses import ClipLoss, SigLipLoss

    size, ctx, vocab = cfg.net.vision.image_size, cfg.net.text.context_length, cfg.net.text.vocab_size
    pixels = rand.randn(b, 3, size, size)
    tokens = torch.randint(0, vocab - 1, (b, ctx), device=rand.device, generator=rand.g)
    tokens[:, -1] = vocab - 1  # the end-of-text id pools the caption
    siglip = cfg.module.get("loss") == "siglip"  # (--override module.loss=siglip net.init_logit_bias=-10)
    clip_loss = SigLipLoss() if siglip else ClipLoss()

    def loss() -> torch.Tensor:
        out = net(pixels, tokens)
        scalars = [out["logit_scale"], *([out["logit_bias"]] if siglip else [])]
        return clip_loss(out["image_features"], out["text_features"], *scalars)

    return Workload(net, loss, b, cfg.module.optimizer.weight_decay, {"image": size, "context": ctx})


def _diffusion_workload(cfg, net: torch.nn.Module, case: Case, rand: _Random) -> Workload:
    """x0 and the conditioning each diffusion stage trains on (random CLIP features in place of a frozen
    CLIP's), with its classifier-free-guidance dropout drawn every step."""
    from train.diffusion import GaussianDiffusion

    b, device = case.batch, rand.device
    diffusion = GaussianDiffusion.from_config(**cfg.module.diffusion)
    embed, width, ctx, _ = case.clip
    scale = math.sqrt(embed)
    if case.stage == "prior":
        x0 = F.normalize(rand.randn(b, embed), dim=-1) * scale
        cond = {
            "text_emb": F.normalize(rand.randn(b, embed), dim=-1) * scale,
            "text_feat": rand.randn(b, ctx, width),
            "text_mask": torch.ones(b, ctx, dtype=torch.bool, device=device),
        }
        drop_keys = {"drop": cfg.module.cond_drop_prob}
    elif case.stage == "decoder":
        x0 = rand.images(b, net.image_size)
        cond = {"image_emb": F.normalize(rand.randn(b, embed), dim=-1) * scale}
        if net.text_encoder == "clip":
            cond["text_feat"] = rand.randn(b, ctx, width)
            cond["text_mask"] = torch.ones(b, ctx, dtype=torch.bool, device=device)
        drop_keys = {"drop_image": cfg.module.drop_image_prob, "drop_text": cfg.module.drop_text_prob}
    else:
        raise ValueError(f"no diffusion workload for stage {case.stage!r}")

    def loss() -> torch.Tensor:
        kwargs = dict(cond)
        for key, p in drop_keys.items():
            kwargs[key] = torch.rand(b, device=device) < p
        return diffusion.training_losses(net, x0, model_kwargs=kwargs)["loss"].mean()

    info = {"input": list(x0.shape[1:]), "prediction": diffusion.prediction}
    return Workload(net, loss, b, cfg.module.optimizer.weight_decay, info)


def _upsampler_workload(cfg, net: torch.nn.Module, case: Case, rand: _Random) -> Workload:
    """The upsampler's own training inputs (UpsamplerModule.training_inputs: random crop, degradation,
    noise augmentation, residual target) drawn every step from random images at the output size."""
    from hydra.utils import instantiate

    module = instantiate(cfg.module, net=net, _convert_="all")  # its EMA copy stays on the host, untimed
    net = net.to(rand.device)
    hi = rand.images(case.batch, net.image_size)

    def loss() -> torch.Tensor:
        target, cond = module.training_inputs(hi)
        return module.diffusion.training_losses(net, target, model_kwargs=cond)["loss"].mean()

    crop = int(round(net.image_size * cfg.module.crop_fraction))
    info = {
        "input": [3, crop, crop],
        "prediction": module.diffusion.prediction,
        "degradation": cfg.module.degradation,
        "residual": bool(cfg.module.residual),
        "noise_aug": float(cfg.module.noise_aug),
    }
    return Workload(net, loss, case.batch, cfg.module.optimizer.weight_decay, info)


# ---- anchors: what users run instead (the shapes of ../shared/device/README.md) -------------------------
def _open_clip(arch: str, rand: _Random, b: int | None = None) -> Workload:
    import open_clip
    from open_clip.loss import ClipLoss as OpenClipLoss

    b = b or 256
    model = open_clip.create_model(arch, pretrained=None, device=rand.device).train()
    images = rand.randn(b, 3, 224, 224)
    tokens = torch.randint(1, 49407, (b, 77), device=rand.device, generator=rand.g)
    clip_loss = OpenClipLoss()

    def loss() -> torch.Tensor:
        out = model(images, tokens)
        if isinstance(out, dict):
            return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        return clip_loss(*out[:3])

    return Workload(model, loss, b, 0.1, {"model": f"open_clip {open_clip.__version__} {arch}"})


def _diffusers_unet64(rand: _Random, b: int | None = None) -> Workload:
    """diffusers' UNet2DConditionModel at the GLIDE-64 widths, eps MSE on the cosine schedule."""
    import diffusers
    from diffusers import UNet2DConditionModel

    b = b or 64
    widths = (192, 384, 576, 768)
    model = UNet2DConditionModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=widths,
        layers_per_block=3,
        down_block_types=("DownBlock2D", *["CrossAttnDownBlock2D"] * 3),
        up_block_types=(*["CrossAttnUpBlock2D"] * 3, "UpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=tuple(w // 64 for w in widths),  # diffusers: heads per level (64 wide each)
        class_embed_type="projection",
        projection_class_embeddings_input_dim=768,
    ).to(rand.device)
    model.train()
    steps = torch.linspace(0, 1, 1001, device=rand.device)[:-1]
    abar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    x0, context, emb = rand.randn(b, 3, 64, 64).clamp(-1, 1), rand.randn(b, 81, 768), rand.randn(b, 768)

    def loss() -> torch.Tensor:
        t = torch.randint(0, 1000, (b,), device=rand.device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        pred = model(
            a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=context, class_labels=emb
        )
        return F.mse_loss(pred.sample.float(), noise)

    return Workload(model, loss, b, 0.0, {"model": f"diffusers {diffusers.__version__} UNet2DConditionModel"})


def _dalle2_prior(rand: _Random, b: int | None = None) -> Workload:
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    b = b or 512

    network = DiffusionPriorNetwork(
        dim=768,
        depth=12,
        dim_head=64,
        heads=12,
        num_timesteps=1000,
        max_text_len=77,
        rotary_emb=True,
        normformer=True,
    )
    model = DiffusionPrior(
        net=network, image_embed_dim=768, timesteps=1000, cond_drop_prob=0.1, condition_on_text_encodings=True
    ).to(rand.device)
    model.train()
    text, tokens = rand.randn(b, 768), rand.randn(b, 77, 768)
    image = F.normalize(rand.randn(b, 768), dim=-1)

    def loss() -> torch.Tensor:  # the library scales image_embed in place: hand it a copy
        return model(text_embed=text, image_embed=image.clone(), text_encodings=tokens)

    return Workload(model, loss, b, 0.0, {"model": "dalle2-pytorch DiffusionPrior"})


ANCHOR_BUILDERS = {  # (random source, batch or None for the anchor's own) -> Workload
    "open_clip_b16": lambda rand, b: _open_clip("ViT-B-16", rand, b),
    "open_clip_l14": lambda rand, b: _open_clip("ViT-L-14", rand, b),
    "diffusers_unet64": _diffusers_unet64,
    "dalle2_prior": _dalle2_prior,
}


def build_anchor(name: str, device: torch.device, batch: int | None = None) -> Workload:
    """An anchor at its own batch (the shapes measured in ../shared/device/README.md) or at ``batch``."""
    if name not in ANCHOR_BUILDERS:
        raise ValueError(f"unknown anchor {name!r}: expected one of {', '.join(ANCHORS)}")
    return ANCHOR_BUILDERS[name](_Random(device), batch)


# ---- measurement --------------------------------------------------------------------------------------
def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def measure(
    work: Workload,
    device: torch.device,
    *,
    dtype: torch.dtype | None,
    compile: str = "none",
    compile_backend: str = "inductor",
    channels_last: bool = False,
    warmup: int = 3,
    iters: int = 10,
    ceiling_tflops: float | None = None,
) -> dict:
    """Time ``work``'s training step; returns the row's numbers (see the module docstring)."""
    from train.modules.optim import adamw, param_groups
    from train.parallel import compile_net

    model = work.model
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = adamw(param_groups(model, work.weight_decay), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with ModelFlopCounter(display=False) as counter:
        with autocast(device, dtype):
            first_loss = work.loss()
        first_loss.backward()
    flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    compile_net(model, compile, backend=compile_backend)
    losses: list[torch.Tensor] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = work.loss()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    synchronize(device)
    start = time.perf_counter()
    step()  # the first step (the compile, when compiling)
    synchronize(device)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = _timed(step, device, iters)
    values = [float(first_loss.detach()), *(float(v) for v in losses)]
    return _row(work, model, device, flops, times, first_step_s, values, ceiling_tflops)


def _row(work, model, device, flops: float, times: list[float], first_step_s: float, values, ceiling) -> dict:
    """A table row from one measurement: throughput, achieved TFLOP/s and MFU from the median step."""
    median = statistics.median(times)
    return {
        "params_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "batch": work.batch,
        "gflop_per_sample": flops / work.batch / 1e9,
        "step_ms": median * 1e3,
        "step_ms_min": min(times) * 1e3,
        "step_ms_max": max(times) * 1e3,
        "samples_per_s": work.batch / median,
        "tflops": flops / median / 1e12,
        "mfu": flops / median / 1e12 / ceiling if ceiling else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "first_step_s": first_step_s,
        "loss_first": values[0],
        "loss_last": values[-1],
        "finite": all(math.isfinite(v) for v in values),
        **work.config,
    }


def _timed(step: Callable[[], None], device: torch.device, iters: int) -> list[float]:
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
    ]
    for begin, end in events:
        begin.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) / 1e3 for begin, end in events]


# ---- the table --------------------------------------------------------------------------------------
COLUMNS = (
    ("case", "case", "{}"),
    ("params_M", "params (M)", "{:.1f}"),
    ("batch", "batch", "{}"),
    ("gflop_per_sample", "GFLOP/sample", "{:.2f}"),
    ("step_ms", "step ms (median)", "{:.1f}"),
    ("samples_per_s", "samples/s", "{:.4g}"),
    ("tflops", "TFLOP/s", "{:.2f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_mem_gib", "peak GiB", "{:.1f}"),
    ("first_step_s", "first step s", "{:.1f}"),
    ("vs_anchor", "vs anchor", "{}"),
    ("status", "status", "{}"),
)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table (``-`` where a value does not apply)."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value).replace("|", "/").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(rows: list[dict]) -> None:
    """``vs_anchor``: our samples/s over the anchor's measured in the same run."""
    measured = {r["case"]: r for r in rows if r.get("samples_per_s")}
    for row in rows:
        anchor = measured.get(row.get("anchor") or "")
        if anchor and row.get("samples_per_s"):
            row["vs_anchor"] = f"{row['samples_per_s'] / anchor['samples_per_s']:.2f}x {anchor['case']}"


def select_cases(size: str, names: str | None) -> list[Case | str]:
    """The cases of ``size`` (ours, then its anchors), or those named in ``names`` (comma-separated; the
    anchors, at their fixed shapes, can be named at any size; ``ours`` is every case of ours at ``size``)."""
    if not names:
        return [*SIZES[size], *ANCHOR_SIZES[size]]
    by_name: dict[str, Case | str] = {c.name: c for c in SIZES[size]} | {a: a for a in ANCHORS}
    wanted = [
        m
        for n in names.split(",")
        if n.strip()
        for m in ([c.name for c in SIZES[size]] if n.strip() == "ours" else [n.strip()])
    ]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown} at --size {size}; known: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def run_case(case: Case | str, device: torch.device, args: argparse.Namespace, ceiling: float | None) -> dict:
    name = case.name if isinstance(case, Case) else case
    row = {"case": name, "anchor": case.anchor if isinstance(case, Case) else None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    work = None
    try:
        work = build_stage(case, device) if isinstance(case, Case) else build_anchor(case, device, args.batch)
    except ImportError as e:
        row["status"] = f"not installed ({e.name}): pip install -e .[bench]"
        return row
    except Exception as e:
        traceback.print_exc()
        row["status"] = f"error building: {type(e).__name__}: {str(e)[:200]}"
        return row
    try:
        row.update(
            measure(
                work,
                device,
                dtype=dtype,
                compile=args.compile,
                compile_backend=args.compile_backend,
                channels_last=args.channels_last,
                warmup=args.warmup,
                iters=args.iters,
                ceiling_tflops=ceiling,
            )
        )
        row["status"] = "ok" if row["finite"] else "NON-FINITE LOSS"
    except Exception as e:  # one failing case must not lose the others' rows
        traceback.print_exc()
        row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
    finally:
        del work
        if device.type == "cuda":
            torch._dynamo.reset()
    return row


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_train", description=__doc__.split("\n")[0])
    parser.add_argument("--device", type=device, default=default_device())
    parser.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="default: anchor on a GPU, tiny on CPU"
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated case names, `ours` for every stage of ours (default: all of --size, ours then the anchors)",
    )
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                        help="autocast dtype (default: bf16 on a GPU, fp32 on CPU)")  # fmt: skip
    parser.add_argument("--compile", choices=("none", "full", "regional"), default="none")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager: the graphs without inductor's code generation)")  # fmt: skip
    parser.add_argument("--channels-last", action="store_true", help="UNets: channels_last memory format")
    parser.add_argument(
        "--warmup", type=at_least(0), default=None, help="untimed steps after the first (default 5; CPU 1)"
    )
    parser.add_argument("--iters", type=at_least(1), default=None, help="timed steps (default 20; CPU 3)")
    parser.add_argument(
        "--batch",
        type=at_least(1),
        default=None,
        help="every case at this batch (a smoke test of big shapes)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every case of ours, repeatable (net.vision.patch_dropout=0.5 with "
        "--cases clip_b16)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --size tiny)")
    on_gpu = device.type == "cuda"
    args.size = args.size or ("anchor" if on_gpu else "tiny")
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    args.warmup = (5 if on_gpu else 1) if args.warmup is None else args.warmup
    args.iters = (20 if on_gpu else 3) if args.iters is None else args.iters
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cases = select_cases(args.size, args.cases)
    if args.batch:
        cases = [dataclasses.replace(c, batch=args.batch) if isinstance(c, Case) else c for c in cases]
    if args.override:
        cases = [
            dataclasses.replace(c, overrides=(*c.overrides, *args.override)) if isinstance(c, Case) else c
            for c in cases
        ]

    ceiling_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    ceiling = matmul_ceiling(device, ceiling_dtype)
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(
        f"# bench_train: {device_name}, torch {torch.__version__}, "
        f"{'fp32 (no autocast)' if args.precision == 'fp32' else args.precision + ' autocast'}, compile={args.compile}"
        f"{'' if args.compile == 'none' or args.compile_backend == 'inductor' else f' ({args.compile_backend})'}"
        f"{', channels_last' if args.channels_last else ''}{''.join(', ' + o for o in args.override)}; "
        f"measured {args.precision} matmul ceiling "
        f"{ceiling:.1f} TFLOP/s; median of {args.iters} steps after {args.warmup} + 1",
        flush=True,
    )
    meta = {"device": device_name, "torch": torch.__version__, "ceiling_tflops": ceiling, **vars(args)}
    rows = []
    for case in cases:
        rows.append(run_case(case, device, args, ceiling))
        print(f"  {rows[-1]['case']}: {rows[-1]['status']}", file=sys.stderr, flush=True)
        compare(rows)
        if args.json:  # after every case: a run stopped at its time limit keeps the rows it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"meta": {**meta, "json": str(args.json)}, "rows": rows},
                                            indent=2, default=str))  # fmt: skip
    print(table(rows))
    failed = [
        r["case"] for r in rows if r["status"] not in ("ok",) and not r["status"].startswith("not installed")
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
