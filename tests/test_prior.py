"""Stage 2: the diffusion prior (net, module, the two data paths, the stage end to end)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from data.embed import embed_shards
from data.pipeline import ShardDataset
from tests.conftest import cli_env, clip_trained_on, compose_config, free_port, write_tar
from train.checkpoint import export_stage, load_stage, resolve_run
from train.ema import EMA
from train.models.prior import DiffusionPrior
from train.modules.prior import PriorModule
from train.run import CONF_DIR, train

D, W, L = 16, 24, 8


def tiny_prior(**kw) -> DiffusionPrior:
    torch.manual_seed(0)
    return DiffusionPrior(embed_dim=D, text_width=W, context_length=L, width=32, layers=2, heads=4, **kw)


def inputs(b=3):
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(L)[None] <= torch.tensor([2, 5, 7])[:, None]  # caption lengths 3, 6, 8 tokens
    return {
        "x": torch.randn(b, D, generator=g),
        "t": torch.tensor([0, 500, 999]),
        "text_emb": torch.randn(b, D, generator=g),
        "text_feat": torch.randn(b, L, W, generator=g),
        "text_mask": mask,
    }


def test_prior_shapes_padding_and_dropout():
    net = tiny_prior().eval()
    a = inputs()
    out = net(a["x"], a["t"], text_emb=a["text_emb"], text_feat=a["text_feat"], text_mask=a["text_mask"])
    assert out.shape == (3, D)
    # padding (tokens past the caption's end) does not reach the output
    feat = a["text_feat"].clone()
    feat[~a["text_mask"]] = 100.0
    padded = net(a["x"], a["t"], text_emb=a["text_emb"], text_feat=feat, text_mask=a["text_mask"])
    torch.testing.assert_close(padded, out)
    feat[0, 1] += 1.0  # a real token does
    assert not torch.allclose(
        net(a["x"], a["t"], text_emb=a["text_emb"], text_feat=feat, text_mask=a["text_mask"]), out
    )
    # dropped conditioning: the output ignores the text entirely
    drop = torch.ones(3, dtype=torch.bool)
    d1 = net(
        a["x"], a["t"], text_emb=a["text_emb"], text_feat=a["text_feat"], text_mask=a["text_mask"], drop=drop
    )
    d2 = net(a["x"], a["t"], text_emb=-a["text_emb"], text_feat=feat * 3, text_mask=a["text_mask"], drop=drop)
    torch.testing.assert_close(d1, d2)
    assert not torch.allclose(d1, out)
    with pytest.raises(ValueError, match=r"text_feat must be \(B, 8, 24\)"):
        net(a["x"], a["t"], text_emb=a["text_emb"], text_feat=a["text_feat"][:, :4])


def test_prior_grad_checkpointing_matches():
    a = inputs()
    net = tiny_prior().train()
    runs = []  # forward runs of the first block (hooks do not fire in a recompute: wrap forward)
    block = net.transformer.resblocks[0]
    forward = block.forward
    block.forward = lambda *args, **kwargs: runs.append(1) or forward(*args, **kwargs)
    kw = dict(text_emb=a["text_emb"], text_feat=a["text_feat"], text_mask=a["text_mask"])
    ref = net(a["x"], a["t"], **kw)
    ref.square().sum().backward()
    assert len(runs) == 1
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.set_grad_checkpointing(True)
    out = net(a["x"], a["t"], **kw)
    out.square().sum().backward()
    assert len(runs) == 3, "checkpointing recomputes the block's forward in backward"
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_paper_prior_has_one_billion_parameters():
    cfg = OmegaConf.load(f"{CONF_DIR}/net/prior_paper.yaml")
    cfg.embed_dim, cfg.text_width, cfg.context_length = 1024, 1024, 256  # CLIP ViT-H/16, 256 text tokens
    args = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    with torch.device("meta"):
        net = DiffusionPrior(**args)
    n = sum(p.numel() for p in net.parameters())
    assert 0.95e9 <= n <= 1.05e9, n


def test_ema_tracks_with_warmup_and_is_not_trained():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9)
    assert not any(p.requires_grad for p in ema.parameters())
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # first update: decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow.weight, 0.1 * w0 + 0.9)
    assert int(ema.num_updates) == 1
    for _ in range(200):
        ema.update(net)
    assert ema.current_decay() == 0.9
    torch.testing.assert_close(ema.shadow.weight, torch.ones(2, 2), atol=1e-6, rtol=0)


def test_ema_updates_never_read_the_device_and_a_restore_brings_back_the_count():
    """On the meta device every read of a value raises, like the host sync it would be on a GPU."""
    with torch.device("meta"):
        net = torch.nn.Linear(2, 2)
        ema = EMA(net, decay=0.9)
    assert ema.num_updates.is_meta
    for _ in range(3):
        ema.update(net)  # before: int(num_updates) at every update, "cannot be called on meta tensors"
    assert ema.current_decay() == 4 / 13
    # A restore, through load_state_dict or straight into the buffer (DeepSpeed's resharding load), is read
    # back once: the decay continues from the restored count, not from this object's.
    cpu = EMA(torch.nn.Linear(2, 2), decay=0.9)
    cpu.load_state_dict({**cpu.state_dict(), "num_updates": torch.tensor(20)})
    assert cpu.current_decay() == 21 / 30
    cpu.update(torch.nn.Linear(2, 2))
    assert cpu.current_decay() == 22 / 31 and int(cpu.num_updates) == 21
    cpu.num_updates.fill_(5)
    cpu.resync()  # what the diffusion stages do at the start of every fit
    assert cpu.current_decay() == 6 / 15


def test_ema_updates_walk_no_module_tree_and_follow_parameters_a_strategy_swaps(monkeypatch):
    """An update finds the weights where it found them the first time (walking parameters() at every step
    cost more host time than its kernels for a net of a thousand tensors: 5.3 -> 1.0 ms per update on this
    CPU), reading each from its module, so a parameter object swapped in (FSDP2 does between its sharded and
    gathered forms) is the one averaged."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.9, warmup=False)
    ema.update(net)
    walks, named_modules = [], torch.nn.Module.named_modules
    monkeypatch.setattr(
        torch.nn.Module,
        "named_modules",
        lambda self, *a, **k: walks.append(1) or named_modules(self, *a, **k),
    )
    before = ema.shadow[0].weight.clone()
    net[0].weight = torch.nn.Parameter(torch.full((2, 2), 5.0))
    net[1].running_mean.fill_(3.0)
    for _ in range(3):
        ema.update(net)
    assert walks == []
    torch.testing.assert_close(ema.shadow[0].weight, 0.729 * before + 0.271 * 5.0)
    assert torch.equal(ema.shadow[1].running_mean, torch.full((2,), 3.0))  # buffers copied as they are


EMA_UNDER_ACCUMULATION = """
import json, os, sys
import pytorch_lightning as pl, torch
from train.ema import EMA, EMAUpdateAfterStep
from train.strategies import CPUDeepSpeedStrategy

class Stage(EMAUpdateAfterStep, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.ema = EMA(self.net, decay=0.9999)
        self.changed = []

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=0.1)

    def optimizer_step(self, *args, **kwargs):
        before = self.net.weight.detach().clone()
        result = super().optimizer_step(*args, **kwargs)
        self.changed.append(not torch.equal(self.net.weight, before))
        return result

stage = Stage()
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 2)), batch_size=2)
trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=4, strategy=CPUDeepSpeedStrategy(stage=1),
                     accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
trainer.fit(stage, data)
print(json.dumps({"changed": stage.changed, "steps": trainer.global_step, "ema": int(stage.ema.num_updates)}))
"""


def test_the_ema_updates_once_per_optimizer_step_when_deepspeed_accumulates(tmp_path):
    """DeepSpeed accumulates gradients itself, and Lightning calls the module's optimizer_step for every
    micro-batch: the EMA updated 12 times in 3 steps of 4 micro-batches (9 of them with unchanged
    weights), a window 4 times shorter than configured. It updates where the weights change. (In a
    process of its own: DeepSpeed keeps its process groups in module state, which a later in-process
    DeepSpeed run of this test process would find stale.)"""
    env = {**cli_env(tmp_path), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", EMA_UNDER_ACCUMULATION], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["changed"] == [False, False, False, True] * 3  # the weights change every 4th call
    assert seen["steps"] == 3 and seen["ema"] == 3


def test_both_data_paths_give_the_same_batches(clip_run, tmp_path):
    """Embedding shards (data.embed) and on-the-fly embedding with the frozen CLIP: identical tensors."""
    run, val = clip_run
    out = tmp_path / "emb"
    embed_shards(str(run), val, out, batch_size=16)
    module = PriorModule(tiny_prior(), diffusion={"num_timesteps": 100}, clip_ckpt=str(run))
    tok = module.tokenizer
    common = dict(batch_size=16, shuffle_buffer=0, shuffle_shards=False)
    shards = ShardDataset(
        str(out),
        image_size=None,
        npy_fields=["img_emb.npy", "txt_emb.npy", "txt_feat.npy", "tokens.npy"],
        **common,
    )
    images = ShardDataset(val, image_size=64, crop="center", tokenizer=tok, **common)
    n = 0
    for a, b in zip(shards, images):
        if not a["__key__"]:
            continue
        assert a["__key__"] == b["__key__"]
        ea, eb = module.embeddings(a), module.embeddings(b)
        for k in ("img_emb", "txt_emb", "txt_feat", "tokens"):
            assert torch.equal(ea[k], eb[k]), k
        n += len(a["__key__"])
    assert n == 64


def test_a_deepspeed_bf16_run_hands_the_step_its_batch_as_loaded(tmp_path):
    """Under DeepSpeed, Lightning's precision plugin casts every float tensor of a batch to bf16 before
    the step: token ids read as floats round (49407 -> 49408, and the caption mask finds no end of text)
    and stored embeddings lose bits. build_trainer's plugin hands the step the batch as loaded, and
    embedding shards load token ids as int64."""
    from pytorch_lightning.plugins.precision import DeepSpeedPrecision

    from train.run import build_trainer

    ids = torch.tensor([[49406, 320, 49407, 0]])
    batch = {"tokens.npy": ids, "img_emb.npy": torch.randn(1, 8), "txt_feat.npy": torch.randn(1, 4, 8)}
    assert (
        DeepSpeedPrecision("bf16-mixed").convert_input({"t": ids.float()})["t"][0, 2] == 49408
    )  # the defect
    cfg = _prior_cfg([f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=1",
                      "trainer.precision=bf16-mixed", "strategy=deepspeed_zero2",
                      "strategy._target_=train.strategies.CPUDeepSpeedStrategy"])  # fmt: skip
    trainer = build_trainer(cfg, [], [])
    assert trainer.precision == "bf16-mixed"
    out = trainer.precision_plugin.convert_input(batch)
    for key, value in batch.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value), key
    # the "true" precisions cast the module whole, and their inputs with it
    cfg.trainer.precision = "bf16-true"
    assert (
        build_trainer(cfg, [], []).precision_plugin.convert_input(batch)["img_emb.npy"].dtype
        == torch.bfloat16
    )

    def npy(array) -> bytes:
        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()

    sample = {"__key__": "k0", "txt": "a red square", "img_emb.npy": npy(np.ones(8, np.float16)),
              "tokens.npy": npy(ids[0].numpy().astype(np.int32))}  # fmt: skip
    write_tar(tmp_path / "emb.tar", [sample])  # data.embed's layout: int32 token ids
    loaded = next(iter(ShardDataset(str(tmp_path / "emb.tar"), batch_size=1, image_size=None,
                                    npy_fields=["img_emb.npy", "tokens.npy"], shuffle_buffer=0)))  # fmt: skip
    assert loaded["tokens.npy"].dtype == torch.int64 and torch.equal(loaded["tokens.npy"], ids)
    assert loaded["img_emb.npy"].dtype == torch.float32


class BatchDtypes(pl.Callback):
    """Writes the dtypes of the batch a training step receives, and of the net's weights, to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        seen = {k: str(batch[k].dtype) for k in ("tokens.npy", "img_emb.npy")}
        seen["weights"] = str(next(pl_module.net.parameters()).dtype)
        Path(self.out).write_text(json.dumps(seen))


def test_a_deepspeed_bf16_engine_trains_the_prior_on_exact_embedding_batches(clip_run, tmp_path, monkeypatch):
    """A real DeepSpeed ZeRO-2 bf16 engine (on CPU processes here): the net's weights are bf16, the step
    gets the shards' token ids as int64 and their embeddings in float32, and the nets cast them.

    What ``init_from`` of that run starts from: its EMA copy, read whole from the module state (ZeRO-2
    does not partition frozen weights), memory-mapped, without consolidating the optimizer shards (each
    rank of a fine-tuning run did that for the whole net, and held it all); the net's own weights still
    from the shards' fp32 copy, not the module state's bf16 one."""
    run, val = clip_run
    emb = tmp_path / "emb"
    embed_shards(str(run), val, emb, batch_size=32)
    seen = tmp_path / "seen.json"
    cfg = _on_embedding_shards(
        emb,
        tmp_path / "prior",
        "module.val_max_samples=16",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        "strategy=deepspeed_zero2",
        "strategy._target_=train.strategies.CPUDeepSpeedStrategy",
        "+callbacks.batch_dtypes._target_=tests.test_prior.BatchDtypes",
        f"+callbacks.batch_dtypes.out={seen}",
    )
    metrics = train(cfg)
    want = {"tokens.npy": "torch.int64", "img_emb.npy": "torch.float32", "weights": "torch.bfloat16"}
    assert json.loads(seen.read_text()) == want
    assert metrics["trainer/global_step"] == 4 and torch.isfinite(torch.tensor(metrics["train/loss"]))

    from train import checkpoint

    _, last = checkpoint.resolve_run(tmp_path / "prior")
    assert checkpoint.checkpoint_format(last) == "deepspeed"
    saved = checkpoint.consolidate(last)
    net = checkpoint.stage_weights(tmp_path / "prior", use_ema=False)
    assert not net.ema and net.weights.keys() == {k[4:] for k in saved if k.startswith("net.")}
    assert all(v.dtype == torch.float32 and torch.equal(v, saved["net." + k]) for k, v in net.weights.items())
    monkeypatch.setattr(checkpoint, "_consolidated", lambda path: pytest.fail(f"{path} consolidated"))
    ema = checkpoint.stage_weights(tmp_path / "prior")
    assert ema.ema and ema.global_step == 4 and ema.checkpoint.is_dir()
    assert ema.weights.keys() == net.weights.keys()
    assert all(torch.equal(v, saved["ema.shadow." + k]) for k, v in ema.weights.items())


def _prior_cfg(overrides):
    return compose_config(["stage=prior", "logger=none", *overrides])


def _on_embedding_shards(emb, out, *overrides):
    """The prior stage on data.embed's shards in ``emb`` (training and validation), writing to ``out``."""
    return _prior_cfg(
        [
            "data=embeddings",
            f"data.train_shards={emb}",
            f"data.val_shards={emb}",
            "data.num_workers=0",
            "data.global_batch_size=16",
            "net.use_text_tokens=true",
            "module.sample_steps=4",
            "trainer.enable_progress_bar=false",
            f"paths.output_dir={out}",
            *overrides,
        ]
    )


def test_a_bf16_shadow_still_averages_small_updates_and_restores():
    """DeepSpeed casts the EMA to bf16: updates of 0.001 x the gap are far below bf16's resolution."""
    net = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = EMA(net, decay=0.999, warmup=False)
    ema.shadow.bfloat16()  # what DeepSpeed's bf16 engine does to the whole module
    with torch.no_grad():
        net.weight.fill_(1.5)
    for _ in range(2000):
        ema.update(net)
    expected = 1.5 - 0.5 * 0.999**2000  # 1.432
    assert ema.shadow.weight.dtype == torch.bfloat16
    torch.testing.assert_close(ema.shadow.weight.float(), torch.full((4, 4), expected), atol=8e-3, rtol=0)
    # Negative control: the same average kept in bf16 never moves from its start.
    naive = torch.ones(4, 4, dtype=torch.bfloat16)
    for _ in range(2000):
        naive.lerp_(torch.full((4, 4), 1.5, dtype=torch.bfloat16), 0.001)
    assert torch.all(naive == 1.0)
    # A restore replaces the fp32 copy with the restored shadow.
    restored = EMA(net, decay=0.999, warmup=False)
    restored.shadow.bfloat16()
    restored.update(net)
    restored.load_state_dict(ema.state_dict())
    assert restored._master is None
    restored.update(net)
    assert restored._master[0].dtype == torch.float32
    torch.testing.assert_close(restored._master[0], ema.shadow.weight.float() * 0.999 + 1.5 * 0.001)


def test_a_bf16_ema_averages_the_net_in_float32_a_chunk_at_a_time(monkeypatch):
    """Under DeepSpeed's bf16 the net's weights are bf16 too: the update converts them to float32 a chunk
    at a time (all at once was a transient 4 bytes per weight), with the same result."""
    import copy

    from train import ema as ema_module

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])  # 4 x 72 weights
    ema = EMA(net, decay=0.9, warmup=False)
    ema.shadow.bfloat16()
    net.bfloat16()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    chunked = copy.deepcopy(ema)
    ema.update(net)  # the default chunk holds them all
    calls, lerp = [], torch._foreach_lerp_
    monkeypatch.setattr(ema_module, "CHUNK_ELEMENTS", 150)
    monkeypatch.setattr(
        torch, "_foreach_lerp_", lambda a, b, w: calls.append(sum(t.numel() for t in b)) or lerp(a, b, w)
    )
    chunked.update(net)
    assert calls == [144, 144], calls  # two layers (2 x 72 weights) at a time: at most 150 converted at once
    for a, b in zip(ema.shadow.parameters(), chunked.shadow.parameters(), strict=True):
        assert torch.equal(a, b)


def test_prior_stage_trains_on_embedding_shards_and_exports_ema(clip_run, tmp_path):
    run, val = clip_run
    emb = tmp_path / "emb"
    embed_shards(str(run), val, emb, batch_size=32)
    cfg = _on_embedding_shards(
        emb,
        tmp_path / "prior",
        "module.optimizer.warmup_steps=2",
        "module.optimizer.lr=1e-3",
        "module.val_max_samples=64",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
    )
    metrics = train(cfg)
    # clip_ckpt came from embed_info.json; the net's sizes from the CLIP
    saved = OmegaConf.load(tmp_path / "prior" / "config.yaml")
    info = json.loads((emb / "embed_info.json").read_text())
    assert saved.clip_ckpt == info["checkpoint"]
    assert saved.clip_weights == {  # the weights it trained with, for a resume and the cascade to compare
        "checkpoint": info["checkpoint"], "global_step": 2, "digest": info["clip_digest"]
    }  # fmt: skip
    assert (saved.net.embed_dim, saved.net.text_width, saved.net.context_length) == (128, 128, 16)
    for key in (
        "train/loss",
        "val/loss",
        "val/cos_pred_image",
        "val/cos_text_image",
        "val/r1_pred",
        "val/r1_text",
        "val/zeroshot_top1_pred",
    ):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert -1 <= metrics["val/cos_pred_image"] <= 1 and metrics["val/n"] == 64  # the whole val set
    # R@1 of the text embedding, computed here from the shards: the true image is the nearest one
    rows = list(
        ShardDataset(str(emb), image_size=None, npy_fields=["img_emb.npy", "txt_emb.npy"], batch_size=64)
    )
    img = torch.nn.functional.normalize(torch.cat([b["img_emb.npy"] for b in rows]).float(), dim=-1)
    txt = torch.nn.functional.normalize(torch.cat([b["txt_emb.npy"] for b in rows]).float(), dim=-1)
    expected = ((txt @ img.T).argmax(1) == torch.arange(len(img))).float().mean().item()
    assert len(img) == 64 and metrics["val/r1_text"] == pytest.approx(expected, abs=1e-6)
    assert 0 <= metrics["val/r1_pred"] <= 1
    stage = load_stage(tmp_path / "prior")
    ckpt = torch.load(tmp_path / "prior" / "checkpoints" / "last.ckpt", weights_only=False)
    ema = {k[len("ema.shadow.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.shadow.")}
    for k, v in stage.net.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert stage.tokenizer is not None and stage.tokenizer.eot_id == load_stage(run).tokenizer.eot_id


def test_a_clip_other_than_the_one_that_embedded_the_shards_is_refused(clip_run, tmp_path):
    """clip_ckpt beside data=embeddings was compared with embed_info.json by run directory alone: a CLIP
    run that had trained on since it embedded the shards was taken, and the prior learned one CLIP's
    embeddings while its token features and zero-shot metrics came from the other's weights (and a copy
    of the same weights elsewhere was refused). The weights decide now (embed_info.json's clip_digest),
    in every directory of shards, and the prior's config records those it trained with."""
    import shutil
    import types

    from train.config import ConfigError
    from train.frozen_clip import FrozenClip
    from train.run import record_clip, wire_clip

    run, val = clip_run
    source, copy, emb, later = tmp_path / "clip", tmp_path / "copy", tmp_path / "emb", tmp_path / "later"
    shutil.copytree(run, source)  # (the session's run must not train on)
    embed_shards(str(source), val, emb, batch_size=32)
    shutil.copytree(source, copy)
    info = json.loads((emb / "embed_info.json").read_text())

    def recorded(*overrides: str, shards=emb):
        cfg = _on_embedding_shards(shards, tmp_path / "prior", *overrides)
        wire_clip(cfg)
        record_clip(
            cfg, types.SimpleNamespace(frozen_clip=FrozenClip(cfg.clip_ckpt) if cfg.clip_ckpt else None)
        )
        return OmegaConf.to_container(cfg.clip_weights)

    assert recorded(f"clip_ckpt={copy}") == {"checkpoint": str(resolve_run(copy)[1].resolve()), "global_step": 2,
                                             "digest": info["clip_digest"]}  # fmt: skip
    assert FrozenClip(export_stage(copy)).digest == info["clip_digest"]  # and its export's
    # shards embedded when the digest was the strided values alone: still the same weights. Beside shards
    # whose whole digests differ, it matches both, and every pair is compared (each with the CLIP too)
    sampled = info["clip_digest"].split(".")[0]
    for name, digest in (("emb_old", sampled), ("emb_other", sampled + ".0123456789abcdef")):
        shutil.copytree(emb, tmp_path / name)
        (tmp_path / name / "embed_info.json").write_text(json.dumps({**info, "clip_digest": digest}))
    old, other = tmp_path / "emb_old", tmp_path / "emb_other"
    assert recorded(f"clip_ckpt={copy}", shards=old)["digest"] == info["clip_digest"]
    alone = recorded("clip_from_shards=false", f"data.train_shards={old}::{emb}", shards=old)
    assert alone["digest"] == info["clip_digest"]  # (the whole digest, where one directory has it)
    with pytest.raises(
        ConfigError, match=rf"shards in {emb} and {other} were made by different CLIP weights"
    ):
        recorded("clip_from_shards=false", f"data.train_shards={old}::{emb}", shards=other)
    with pytest.raises(ConfigError, match=rf"other weights than those that made the embeddings in {other}"):
        recorded(f"clip_ckpt={copy}", f"data.train_shards={old}::{other}", shards=old)
    clip_trained_on(source)
    with pytest.raises(
        ConfigError,
        match=rf"clip_ckpt={source} loads {source}/checkpoints/step0000012.ckpt \(step 12\), other weights "
        rf"than those that made the embeddings in {emb} \({info['checkpoint']}, step 2, their embed_info.json\): "
        rf"give clip_ckpt={info['checkpoint']},",
    ):
        recorded(f"clip_ckpt={source}")
    # training and held-out shards of two CLIPs' weights (the held-out ones were not read)
    embed_shards(str(source), val, later, batch_size=32)
    with pytest.raises(
        ConfigError, match=rf"shards in {emb} and {later} were made by different CLIP weights"
    ):
        recorded(f"data.val_shards={later}")
    # The checkpoint that embedded them rewritten as its run trained on (clip_ckpt unset: embed_info.json's):
    # those weights are gone, and the shards alone still train, without zero-shot metrics.
    clip_trained_on(copy, in_place=True)
    (emb / "embed_info.json").write_text(
        json.dumps({**info, "checkpoint": str(resolve_run(copy)[1].resolve())})
    )
    with pytest.raises(ConfigError, match=r"step 2 when the shards were embedded, and was overwritten .* gone\. "
                       r"Embed the shards again .* or train on the shards alone with clip_from_shards=false"):  # fmt: skip
        recorded()
    alone = recorded("clip_from_shards=false")
    assert alone["digest"] == info["clip_digest"] and alone["global_step"] == 2
    # The CLIP that made them moved away: it was dropped without a word (no zero-shot metrics).
    (emb / "embed_info.json").write_text(json.dumps({**info, "checkpoint": str(tmp_path / "gone.ckpt")}))
    with pytest.raises(ConfigError, match=rf"names the CLIP that made these embeddings, {tmp_path}/gone.ckpt, and "
                       r"it is not there \(moved, .* clip_from_shards=false"):  # fmt: skip
        recorded()
    # Shards embedded before digests were recorded: the run directory decides, as before.
    del info["clip_digest"]
    (emb / "embed_info.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=rf"clip_ckpt={copy} \(the run {copy}\) is not the CLIP that made"):
        wire_clip(_on_embedding_shards(emb, tmp_path / "prior", f"clip_ckpt={copy}"))


def test_prior_stage_needs_a_clip(tmp_path):
    cfg = _prior_cfg([f"paths.data_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", "debug=fast"])
    with pytest.raises(ValueError, match="needs a CLIP: set clip_ckpt"):
        train(cfg)


def test_paper_experiment_composes():
    cfg = _prior_cfg(["experiment=prior_paper"])
    assert cfg.net.width == 2048 and cfg.net.layers == 24 and cfg.net.heads == 32
    assert cfg.module.optimizer.lr == 1.1e-4 and cfg.data.global_batch_size == 4096


def test_best_of_keeps_each_captions_candidate_nearest_its_text(monkeypatch):
    """best_of=n samples n candidates per caption and keeps the one nearest its text embedding. Mutants
    that kept the farthest one (argmin) or grouped the candidates of different captions together
    (repeat for repeat_interleave) passed every test: the prior's output quietly got worse."""
    module = PriorModule(tiny_prior(use_text_tokens=False), diffusion={"num_timesteps": 100}, best_of=3)
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, D, generator=g), dim=-1)

    def sample(net, shape, *, model_kwargs, **kw):  # candidate k of each caption: its text, then far off
        rows = model_kwargs["text_emb"]
        far = (torch.arange(len(rows)) % 3 != 0).float()[:, None] * 5 * torch.randn(rows.shape, generator=g)
        return rows + far

    monkeypatch.setattr(module.sampler, "sample", sample)
    picked = module.sample({"txt_emb": text})
    assert torch.allclose(picked, text, atol=1e-5)


@pytest.mark.parametrize(("p", "dropped"), [(0.0, 0), (1.0, 64), (0.25, (6, 26))])
def test_the_conditioning_is_dropped_with_the_configured_probability(p, dropped):
    """module.cond_drop_prob is the fraction of training rows without their text (classifier-free
    guidance's unconditional rows); a mutant that dropped 1 - p of them passed every test."""
    module = PriorModule(
        tiny_prior(use_text_tokens=False), diffusion={"num_timesteps": 100}, cond_drop_prob=p
    )
    seen = []
    forward = module.net.forward
    module.net.forward = lambda *a, **kw: seen.append(kw["drop"]) or forward(*a, **kw)
    module.log = module.log_lr = lambda *a, **kw: None  # no trainer
    torch.manual_seed(0)
    batch = {"img_emb.npy": torch.randn(64, D), "txt_emb.npy": torch.randn(64, D)}
    module.training_step(batch, 0)
    count = int(seen[0].sum())
    assert count == dropped if isinstance(dropped, int) else dropped[0] <= count <= dropped[1]


@pytest.mark.parametrize("use_text_tokens", [True, False])
def test_analytic_flops_agree_with_the_counted_forward(use_text_tokens):
    """flops_per_sample against the counted forward (train.perf.ModelFlopCounter, as perf/mfu counts): the
    text tokens' projection over the text tokens alone, and none without them (it was counted over the
    whole sequence: 2.5% over the counted FLOPs without text tokens)."""
    from train.perf import ModelFlopCounter

    torch.manual_seed(0)
    net = DiffusionPrior(embed_dim=32, text_width=48, context_length=16, width=64, layers=2, heads=4,
                         use_text_tokens=use_text_tokens)  # fmt: skip
    b = 4
    kwargs = {"text_emb": torch.randn(b, 32)}
    if use_text_tokens:
        kwargs |= {"text_feat": torch.randn(b, 16, 48), "text_mask": torch.ones(b, 16, dtype=torch.bool)}
    with ModelFlopCounter(display=False) as counted:
        net(torch.randn(b, 32), torch.zeros(b, dtype=torch.long), **kwargs)
    # (the rest: transformer_flops halves the causal attention, the counter counts the masked kernel whole)
    ratio = net.flops_per_sample() / (counted.get_total_flops() / b)
    assert 0.97 < ratio <= 1.0, ratio
