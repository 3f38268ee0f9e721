"""Per-GPU memory of a stage under each strategy, before any cluster hour is spent.

    python launch/plan.py stage=decoder experiment=decoder_paper --nodes 4
    python launch/plan.py stage=clip experiment=clip_paper --nodes 32 --batch-per-gpu 64

Takes the same overrides as ``python -m train.run``. The net is built on the meta device (no memory, no
weights): parameter counts are exact. Activations are measured, not guessed: one training forward of
the net at the per-GPU batch runs on the meta device in bf16 and every tensor autograd saves for
backward is added up (with the configured activation checkpointing, only what checkpointing keeps;
attention as a GPU's fused kernels keep it, not as the meta device's math path would).
Model states follow the strategies' layouts with N parameters over W GPUs (Adam: two fp32 moments):

    ddp            weights 4N, grads 4N, Adam 8N, EMA 4N       (fp32 weights, bf16 autocast)
    deepspeed_zero1  weights 2N, grads 2N, master+Adam 12N/W, EMA 6N   (DeepSpeed holds the module in bf16;
    deepspeed_zero2  weights 2N, grads 2N/W, master+Adam 12N/W, EMA 6N   the EMA: bf16 copy + fp32 average)
    deepspeed_zero3  weights 2N/W, grads 2N/W, master+Adam 12N/W, EMA 6N/W, + the largest units gathered
    zero3_offload    on the GPU only the gathered units; weights, master and Adam in CPU memory
    fsdp             weights 4N/W, grads 4N/W, Adam 8N/W, EMA 4N/W, + the largest units gathered in bf16
    fsdp shard_size=S  as fsdp over S GPUs (HSDP, replicated across the groups; S: --gpus-per-node)

Validation keeps the model states (gradients included: they live until the next step zeroes them) and
adds what evaluation gathers whole under ZeRO-3/FSDP (a stage's ``eval_gathers``: the CLIP's net; under
FSDP also the diffusion stages' EMA copy, which validation runs without collectives: train/modules/base.py)
plus the
peak of one no-grad forward at the validation batch per GPU (``data.val_batch_size``), doubled by classifier-free
guidance (both branches in one batch), measured on the meta device.

Not counted: the CUDA context and allocator slack (~1-3 GB), communication buckets, temporary buffers
of the optimizer step. A frozen CLIP used for on-the-fly embeddings is counted as bf16 weights.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.modules.compat import upgrade_config, upgrade_overrides  # noqa: E402
from train.parallel import fsdp_units  # noqa: E402

GB = 1e9
# The paper's CLIP (ViT-H/16): what later stages need from it when no clip_ckpt is given.
CLIP_DEFAULTS = {
    "embed_dim": 1024,
    "cond_dim": 1024,
    "text_width": 1024,
    "text_dim": 1024,
    "context_length": 77,
}


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = upgrade_config(compose("train", overrides=upgrade_overrides(overrides)))
    with open_dict(cfg):
        for key, value in CLIP_DEFAULTS.items():
            if key in cfg.net and cfg.net[key] is None:
                cfg.net[key] = value
        for key in ("eot_id", "text_eot_id"):
            if key in cfg.net and cfg.net[key] is None:
                cfg.net[key] = 1
        # a net on the frozen CLIP's token features with no width given (a paper net switched to them)
        if cfg.net.get("text_encoder") == "clip" and not cfg.net.get("text_dim"):
            cfg.net.text_dim = CLIP_DEFAULTS["text_dim"]
    return cfg


def example_batch(cfg, net, b: int) -> tuple[tuple, dict]:
    """The net's training inputs for ``b`` samples, on the meta device."""
    meta = {"device": "meta"}
    stage = cfg.stage_name
    bf16 = {"device": "meta", "dtype": torch.bfloat16}
    if stage == "clip":
        size, ctx = cfg.net.vision.image_size, cfg.net.text.context_length
        return (torch.empty(b, 3, size, size, **bf16), torch.zeros(b, ctx, dtype=torch.long, **meta)), {}
    t = torch.zeros(b, dtype=torch.long, **meta)
    if stage == "prior":
        d, ctx, w = cfg.net.embed_dim, cfg.net.context_length, cfg.net.text_width
        kwargs = {
            "text_emb": torch.empty(b, d, **bf16),
            "text_feat": torch.empty(b, ctx, w, **bf16),
            "text_mask": torch.ones(b, ctx, dtype=torch.bool, **meta),
        }
        return (torch.empty(b, d, **bf16), t), kwargs
    size = cfg.net.image_size
    if stage == "decoder":
        kwargs = {"image_emb": torch.empty(b, cfg.net.cond_dim, **bf16)}
        if cfg.net.get("text_encoder") == "trainable":
            ctx = cfg.net.text_context_length
            kwargs["tokens"] = torch.zeros(b, ctx, dtype=torch.long, **meta)
            kwargs["text_mask"] = torch.ones(b, ctx, dtype=torch.bool, **meta)
        elif cfg.net.get("text_encoder") == "clip":  # the frozen CLIP's token features, at its context
            ctx = CLIP_DEFAULTS["context_length"]  # (the decoder tokenises with its CLIP's tokenizer)
            kwargs["text_feat"] = torch.empty(b, ctx, cfg.net.text_dim, **bf16)
            kwargs["text_mask"] = torch.ones(b, ctx, dtype=torch.bool, **meta)
        return (torch.empty(b, 3, size, size, **bf16), t), kwargs
    crop = int(size * cfg.module.get("crop_fraction", 1.0))  # upsamplers train on crops
    return (torch.empty(b, 3, crop, crop, **bf16), t), {"low_res": torch.empty(b, 3, crop, crop, **bf16)}


class _FusedAttention(torch.autograd.Function):
    """What a GPU's flash or memory-efficient SDPA kernel keeps for its backward: q, k, v, the output and
    one float32 log-sum-exp per query and head (and the mask, where one is given), never the N x N
    weights that SDPA's math path, the only one on the meta device, saves."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out


@contextlib.contextmanager
def fused_attention(training: bool):
    """``F.scaled_dot_product_attention`` as a GPU runs it, for the meta device's measurements: in
    training, :class:`_FusedAttention`; without grad, the output alone (all those kernels allocate)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, *args, **kwargs):
        if training:
            return _FusedAttention.apply(q, k, v, attn_mask)
        return q.new_empty(*q.shape[:-1], v.shape[-1])

    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def activation_bytes(net, args, kwargs) -> int:
    """Bytes autograd saves for backward in one training forward (attention as a GPU's fused kernels
    save it, :func:`fused_attention`)."""
    saved: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in net.parameters()}  # saved for backward, not activations

    def pack(x):  # one entry per storage: a tensor saved by several ops, or its views, count once
        storage = x.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return x

    net.train()
    with fused_attention(training=True), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = net(*args, **kwargs)
    del out
    return sum(saved.values())


class LivePeak(TorchDispatchMode):
    """The most bytes of op outputs alive at once. A storage counts once, from its first tensor until the
    last tensor viewing it is freed (tensors die by reference count: the result is deterministic)."""

    def __init__(self, ignore=()) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.ignore = {t.untyped_storage()._cdata for t in ignore}
        self.views: dict[int, int] = {}  # storage -> tensors alive on it

    def _drop(self, key: int, nbytes: int) -> None:
        self.views[key] -= 1
        if not self.views[key]:
            del self.views[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key, nbytes = t.untyped_storage()._cdata, t.untyped_storage().nbytes()
            if key in self.ignore:
                continue
            if key not in self.views:
                self.views[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.views[key] += 1
            weakref.finalize(t, self._drop, key, nbytes)
        return out


def inference_peak_bytes(net, args, kwargs) -> int:
    """Peak activation bytes of one no-grad forward (validation, sampling) on the meta device. Attention
    runs as on a GPU, in a fused kernel that never holds the N x N matrix (:func:`fused_attention`)."""
    net.eval()
    with fused_attention(training=False), torch.no_grad():
        with LivePeak(ignore=[*net.parameters(), *net.buffers()]) as mode:
            net(*args, **kwargs)
    return mode.peak


def validation_batch(cfg, train_batch: int) -> int:
    """Samples per GPU in one validation forward: data.val_batch_size (or the training batch), x2 when
    classifier-free guidance runs both branches."""
    batch = cfg.data.get("val_batch_size") or train_batch
    guided = float(OmegaConf.select(cfg, "module.guidance_scale", default=1.0) or 1.0) != 1.0
    return batch * (2 if guided else 1)


def plan(cfg, gpus: int, batch_per_gpu: int, shard_size: int | None = None) -> tuple[list[tuple], dict]:
    """Rows of (strategy, weights, grads, optimizer, EMA, activations, CPU, validation peak) in bytes per
    GPU, and what they were made of. ``shard_size`` below ``gpus`` adds FSDP's HSDP row
    (``strategy.shard_size``): the states sharded over that many GPUs, replicated across the groups."""
    with torch.device("meta"):
        net = instantiate(cfg.net)
    net = net.to(torch.bfloat16)
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    ema = n + frozen if "ema_decay" in cfg.module else 0
    units = sorted((sum(p.numel() for p in u.parameters()) for u in fsdp_units(net)), reverse=True)
    gathered = 2 * sum(units[:2])  # bf16: the running unit and the prefetched next one
    clip = 0
    if cfg.stage_name == "decoder" or (
        cfg.stage_name == "prior" and "img_emb.npy" not in (cfg.data.get("npy_fields") or [])
    ):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            clip_cfg = compose("train", overrides=["net=clip_vit_h16_256"]).net
        with torch.device("meta"):
            clip = sum(p.numel() for p in instantiate(clip_cfg).parameters())
    args, kwargs = example_batch(cfg, net, 2)
    # the CLIP's module.accum_freq: the net runs a chunk of the device's batch at a time
    chunks = int(OmegaConf.select(cfg, "module.accum_freq", default=1) or 1)
    act = activation_bytes(net, args, kwargs) / 2 * batch_per_gpu / chunks
    val_batch = validation_batch(cfg, batch_per_gpu)
    infer = inference_peak_bytes(net, *example_batch(cfg, net, val_batch))
    module_cls = get_class(cfg.module._target_)
    # params gathered whole for the validation: the stage's eval_gathers (None: all of it), and under FSDP
    # its eval_gathers_fsdp too
    names = getattr(module_cls, "eval_gathers", None)
    fsdp_names = getattr(module_cls, "eval_gathers_fsdp", ())
    whole = {"net": n + frozen, "ema": ema}
    eval_whole = n + frozen + ema if names is None else sum(whole[name] for name in names)
    eval_whole_fsdp = (
        eval_whole if names is None else sum(whole[name] for name in dict.fromkeys((*names, *fsdp_names)))
    )
    w = gpus
    rows = [
        ("ddp", 4 * n + 4 * frozen, 4 * n, 8 * n, 4 * ema, 0),
        # DeepSpeed's EMA: the bf16 shadow (2 bytes) and train/ema.py's fp32 average of it (4 bytes)
        ("deepspeed_zero1", 2 * (n + frozen), 2 * n, 12 * n / w, 6 * ema, 0),
        ("deepspeed_zero2", 2 * (n + frozen), 2 * n / w, 12 * n / w, 6 * ema, 0),
        ("deepspeed_zero3", 2 * (n + frozen) / w + gathered, 2 * n / w, 12 * n / w, 6 * ema / w, 0),
        ("deepspeed_zero3_offload", gathered, 2 * n / w, 0, 0, (2 * (n + frozen) + 12 * n + 6 * ema) / w),
        ("fsdp", 4 * (n + frozen) / w + gathered, 4 * n / w, 8 * n / w, 4 * ema / w, 0),
    ]
    if shard_size is not None and shard_size < gpus:
        s = shard_size
        rows.append(
            (f"fsdp shard_size={s}", 4 * (n + frozen) / s + gathered, 4 * n / s, 8 * n / s, 4 * ema / s, 0)
        )
    # what validation gathers on top of the sharded states: fp32 under FSDP (no param_dtype), bf16 under ZeRO-3
    eval_extra = {
        "deepspeed_zero3": 2 * eval_whole,
        "deepspeed_zero3_offload": 2 * eval_whole,
        "fsdp": 4 * eval_whole_fsdp,
        f"fsdp shard_size={shard_size}": 4 * eval_whole_fsdp,
    }
    info = {
        "trainable": n,
        "frozen": frozen,
        "ema": ema,
        "clip": clip,
        "activations": act,
        "chunks": chunks,
        "gathered": gathered,
        "val_batch": val_batch,
        "inference": infer,
    }
    return [
        (name, wt + 2 * clip, g, o, e, act, cpu, wt + 2 * clip + g + o + e + eval_extra.get(name, 0) + infer)
        for name, wt, g, o, e, cpu in rows
    ], info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--batch-per-gpu",
        type=int,
        default=None,
        help="default: data.global_batch_size / GPUs / trainer.accumulate_grad_batches",
    )
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("overrides", nargs="*", help="train.run overrides: stage=... experiment=...")
    args = parser.parse_intermixed_args(argv)
    cfg = compose_cfg(args.overrides)
    gpus = args.nodes * args.gpus_per_node
    accumulate = int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1) or 1)
    batch = args.batch_per_gpu or max(1, cfg.data.global_batch_size // gpus // accumulate)
    rows, info = plan(cfg, gpus, batch, shard_size=args.gpus_per_node)  # + HSDP over a node, on several
    extras = [", with an EMA copy" if info["ema"] else ""]
    if info["clip"]:
        extras.append(f", frozen CLIP {info['clip'] / 1e6:,.0f}M (bf16)")
    checkpointing = "on" if OmegaConf.select(cfg, "net.grad_checkpointing") else "off"
    if accumulate > 1:
        extras.append(f"; trainer.accumulate_grad_batches={accumulate}")
    if info["chunks"] > 1:
        extras.append(
            f"; module.accum_freq={info['chunks']}: activations of {batch // info['chunks']} at a time"
        )
    print(
        f"{cfg.stage_name}: {info['trainable'] / 1e6:,.0f}M trainable + {info['frozen'] / 1e6:,.0f}M frozen parameters"
        f"{''.join(extras)}; {args.nodes} node(s) x {args.gpus_per_node} GPUs, global batch "
        f"{cfg.data.global_batch_size} -> {batch} per GPU{' and micro-batch' if accumulate > 1 else ''}; "
        f"activation checkpointing {checkpointing}"
    )
    print()
    print(
        f"| strategy | weights | grads | optimizer | EMA | activations | GPU total (GB) | validation peak "
        f"| fits {args.gpu_memory_gb:g} GB | CPU per GPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, wt, g, o, e, act, cpu, val in rows:
        total = wt + g + o + e + act
        fits = "yes" if max(total, val) / GB < args.gpu_memory_gb * 0.9 else "no"
        print(
            f"| {name} | {wt / GB:.1f} | {g / GB:.1f} | {o / GB:.1f} | {e / GB:.1f} | {act / GB:.1f} | "
            f"**{total / GB:.1f}** | {val / GB:.1f} | {fits} | {cpu / GB:.1f} |"
        )
    print()
    print(
        f"validation peak: the states above, what evaluation gathers whole under ZeRO-3/FSDP, and a no-grad "
        f"forward of {info['val_batch']} samples per GPU ({info['inference'] / GB:.1f} GB; data.val_batch_size, "
        "x2 with guidance)"
    )


if __name__ == "__main__":
    main()
