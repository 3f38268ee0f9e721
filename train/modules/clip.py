"""Stage 1: CLIP contrastive pretraining as a LightningModule.

The net (train/models/clip.py) is injected; this module wires the global-batch contrastive loss
(train/losses.py), AdamW with decay only on matrices, warm-up + cosine schedule, and evaluation:
zero-shot accuracy and retrieval recall on the held-out shards (eval/zeroshot.py).

``hard_negatives`` (any of ``colour``, ``binding``, ``relation``; data/negatives.py): each caption with
two colour words exchanged, or its spatial word reversed, is one more negative for its image (NegCLIP's
recipe against bag-of-words matching, which the DALL-E 2 paper names as the cause of unCLIP's binding
failures). The negatives go through the text tower in the same call as the captions; a caption without
one is masked.

``loss``: ``clip`` (the softmax above) or ``siglip``, SigLIP's pairwise sigmoid loss with a learned bias
(train/losses.py ``SigLipLoss``; the net needs ``init_logit_bias``). ``val/loss`` is the training loss's
kind, over every held-out pair.

``lock_image`` / ``lock_text`` (open_clip's ``--lock-image`` / ``--lock-text``, LiT): a tower frozen but its
last ``lock_*_unlocked_layers`` blocks (``CLIP.lock``), e.g. the image tower of imported open_clip weights
while the text tower learns a domain's captions: its image embeddings, on which a prior and a decoder
trained, do not move.

Logged: ``train/loss``, ``train/logit_scale`` (and ``train/logit_bias``), ``train/lr``, ``val/loss``, ``val/zeroshot_{colour,shape,count}_top1``,
``val/zeroshot_top1``, ``val/{i2t,t2i}_r{1,5,10}``, ``val/pick_{colour,binding,relation}`` (an image's caption
preferred to its hard negative; chance 50%); learning rate and throughput come from callbacks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from data.negatives import check_kinds, negative_tokens
from train.callbacks.log_step import logs_this_step
from train.losses import ClipLoss, SigLipLoss, sigmoid_loss
from train.modules.base import StageModule
from train.perf import not_model_flops
from train.validation import clip_metrics

log = logging.getLogger(__name__)


def accum_freq_problems(
    k: int, strategy: str, *, supported: bool, accumulate: int, precision: Any
) -> list[str]:
    """What ``module.accum_freq=k`` cannot run beside, checked from the config at start (train/config.py,
    before a DeepSpeed engine is built for nothing) and from the trainer at fit start."""
    problems = []
    if not supported:
        problems.append(
            f"module.accum_freq={k} with {strategy}: it runs a backward pass per chunk inside the training "
            "step, and DeepSpeed's ZeRO reduces each gradient once a step: use strategy=ddp, fsdp or one device"
        )
    if accumulate > 1:
        problems.append(
            f"module.accum_freq={k} with trainer.accumulate_grad_batches={accumulate}: use one of them "
            "(accum_freq keeps the whole batch's negatives)"
        )
    if str(precision) in ("16-mixed", "16", "16-true"):
        problems.append(f"module.accum_freq={k} with trainer.precision={precision}: use bf16-mixed")
    return problems


class ClipModule(StageModule):
    eval_gathers = ("net",)  # evaluation reads encode_text, encode_image and the logit scale (ZeRO-3/FSDP)
    optimizer_defaults = {
        "lr": 5e-4,
        "weight_decay": 0.1,
        "betas": [0.9, 0.98],
        "eps": 1e-6,
        "warmup_steps": 1000,
        "min_lr_ratio": 0.0,
    }

    def __init__(
        self,
        net: torch.nn.Module,
        *,
        tokenizer=None,
        optimizer: Mapping[str, Any] | None = None,
        zeroshot: bool = True,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        hard_negatives: list[str] | tuple[str, ...] = (),
        accum_freq: int = 1,
        lock_image: bool = False,
        lock_image_unlocked_layers: int = 0,
        lock_text: bool = False,
        lock_text_unlocked_layers: int = 0,
        loss: str = "clip",
        **old_keys: Any,
    ) -> None:
        super().__init__()
        if loss not in ("clip", "siglip"):
            raise ValueError(
                f"module.loss={loss!r}: expected clip (softmax, InfoNCE) or siglip (pairwise sigmoid)"
            )
        if loss == "siglip" and not hasattr(net, "logit_bias"):
            raise ValueError(
                "module.loss=siglip needs a learned bias: set net.init_logit_bias (SigLIP: -10, with "
                "net.init_logit_scale=2.302585, log 10)"
            )
        self.kinds = check_kinds(hard_negatives, "module.hard_negatives")
        if self.kinds and tokenizer is None:
            raise ValueError("module.hard_negatives needs the tokenizer (the negatives are captions)")
        if not isinstance(accum_freq, int) or isinstance(accum_freq, bool) or accum_freq < 1:
            raise ValueError(f"module.accum_freq={accum_freq!r}: expected an integer >= 1")
        if accum_freq > 1 and self.kinds:
            raise ValueError(
                "module.accum_freq > 1 with module.hard_negatives is not implemented: use one of them"
            )
        if loss == "siglip" and self.kinds:
            raise ValueError(
                "module.loss=siglip with module.hard_negatives is not implemented: use one of them"
            )
        optimizer, _ = self.settle_blocks(old_keys, optimizer)
        # saved as the arguments are now: the settled blocks, not the old keys
        self.save_hyperparameters(ignore=["net", "tokenizer", *old_keys])
        self.net = net
        self.tokenizer = tokenizer
        loss_class = SigLipLoss if loss == "siglip" else ClipLoss
        self.loss = loss_class(local_loss=local_loss, gather_with_grad=gather_with_grad)
        for tower, locked, unlocked in (
            ("image", lock_image, lock_image_unlocked_layers),
            ("text", lock_text, lock_text_unlocked_layers),
        ):
            if locked:
                frozen = net.lock(tower, unlocked)
                log.info(
                    "module.lock_%s: %d parameters frozen, its last %d blocks train", tower, frozen, unlocked
                )
            elif unlocked:
                raise ValueError(
                    f"module.lock_{tower}_unlocked_layers={unlocked} without module.lock_{tower}=true: "
                    "nothing is locked"
                )

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(images, tokens)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.hparams.accum_freq > 1:
            # zeroed here, not between this step and its backward pass (see optimizer_zero_grad)
            self.zero_grad(set_to_none=True)
            loss, out = self.cached_loss(batch["image"], batch["tokens"], self.hparams.accum_freq)
        elif not self.kinds:
            out = self.net(batch["image"], batch["tokens"])
            loss = self.contrastive(out["image_features"], out["text_features"], out)
        else:
            if "negative_tokens" in batch:  # made in the loader workers (data/pipeline.py)
                tokens, mask = batch["negative_tokens"], batch["negative_mask"]
            else:  # here on the host: a batch from elsewhere
                tokens, mask = negative_tokens(batch["caption"], self.kinds, self.tokenizer)
                tokens, mask = tokens.to(batch["tokens"].device), mask.to(batch["tokens"].device)
            b = batch["tokens"].shape[0]
            out = self.net(batch["image"], torch.cat([batch["tokens"], tokens]))  # one pass of the text tower
            txt = out["text_features"]
            loss = self.loss(out["image_features"], txt[:b], out["logit_scale"], txt[b:], mask)
            if logs_this_step(self.trainer):
                self.log("train/negatives_frac", mask.float().mean())
        self.log("train/loss", loss)  # (not prog_bar: train/callbacks/progress_bar.py)
        if logs_this_step(self.trainer):
            self.log("train/logit_scale", out["logit_scale"].detach())
            if "logit_bias" in out:
                self.log("train/logit_bias", out["logit_bias"].detach().reshape(-1)[0])
        self.log_lr()
        return loss

    def contrastive(
        self, image_features: torch.Tensor, text_features: torch.Tensor, out: dict, *, constants: bool = False
    ) -> torch.Tensor:
        """``module.loss`` of the features, with the net's learned scale (and SigLIP's bias) from ``out``;
        ``constants``: those as constants (the chunks of ``cached_loss`` but the last)."""
        scalars = [out["logit_scale"], *([out["logit_bias"]] if self.hparams.loss == "siglip" else [])]
        if constants:
            scalars = [x.detach() for x in scalars]
        return self.loss(image_features, text_features, *scalars)

    def cached_loss(
        self, images: torch.Tensor, tokens: torch.Tensor, chunks: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The contrastive loss of the whole batch with the activations of 1/``chunks`` of it at a time
        (``module.accum_freq``, open_clip's ``--accum-freq``): every chunk's features without gradients
        first; then, chunk by chunk, its features again with gradients, put among the others' and the loss
        of the whole batch backpropagated through them. The gradients summed over the chunks are the whole
        batch's (the loss reaches the other chunks' features as constants); ``logit_scale`` takes its
        gradient in the last chunk only, which is returned for Lightning to backpropagate (the others are
        here). The loss is the whole batch's, as are the negatives: what k times the batch of one pass
        would have, at the memory of one chunk and one more forward pass.

        Under DDP the chunks' own backward passes run inside DDP's forward, before it expects gradients:
        they accumulate unsynchronised, and the returned one's synchronises the sums (as in Lightning's
        ``no_sync`` accumulation). FSDP2 reduce-scatters each chunk's gradients into the sharded sums;
        under HSDP the replicas all-reduce once, in the last chunk's backward.
        DeepSpeed's ZeRO reduces each parameter's gradient once a step: refused at fit start.

        With ``net.vision.patch_dropout``, the kept patches are drawn once for the batch, and each chunk's
        two passes keep the same ones: its features with gradients are the cached ones."""
        visual = getattr(self.net, "visual", None)
        keep = None
        if self.net.training and getattr(visual, "patch_dropout", 0.0) > 0:
            keep = visual.kept_patches(images.shape[0], images.device)
        image_parts = images.chunk(chunks)  # (fewer than ``chunks`` when they do not divide the batch)
        keeps = [None] * len(image_parts) if keep is None else list(keep.chunk(chunks))
        parts = list(zip(image_parts, tokens.chunk(chunks), keeps, strict=True))
        with torch.no_grad(), not_model_flops():  # (MFU counts the model's FLOPs: this pass is on top)
            cached = [self.net(i, t, k) for i, t, k in parts]
        img = [c["image_features"] for c in cached]
        txt = [c["text_features"] for c in cached]
        for j, (i, t, k) in enumerate(parts):
            out = self.net(i, t, k)
            last = j == len(parts) - 1
            loss = self.contrastive(
                torch.cat([*img[:j], out["image_features"], *img[j + 1 :]]),
                torch.cat([*txt[:j], out["text_features"], *txt[j + 1 :]]),
                out,
                constants=not last,
            )
            if not last:
                # the learned scale (and bias) as zero-gradient terms: every chunk's backward then gives
                # gradients to the same parameters, which FSDP2's deferred all-reduce (HSDP) needs to add
                # the chunks' reduced gradients up (else a size mismatch in the last chunk's backward)
                scalars = [v for key, v in out.items() if key in ("logit_scale", "logit_bias")]
                with self._replica_sync_deferred():
                    (loss + sum(0.0 * v.sum() for v in scalars)).backward()
        return loss, out

    def _replica_sync_deferred(self):
        """Under FSDP's HSDP the chunks' backward passes but the last skip the replicas' all-reduce (the one
        that crosses nodes); the last one all-reduces the step's sum (train/strategies.py
        ``block_backward_sync``). A no-op elsewhere."""
        from contextlib import nullcontext

        from train.strategies import FSDPStrategy

        trainer = self._trainer
        strategy = trainer.strategy if trainer is not None else None
        return strategy.block_backward_sync() if isinstance(strategy, FSDPStrategy) else nullcontext()

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        """Lightning zeroes the gradients after the training step, before its backward pass: with
        ``accum_freq`` that would drop every chunk's but the last's, so they are zeroed at the step's start."""
        if self.hparams.accum_freq > 1:
            return
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        k = self.trainer.accumulate_grad_batches
        if k > 1 and self.trainer.is_global_zero:
            log.warning(
                "trainer.accumulate_grad_batches=%d: each micro-batch's contrastive loss contrasts its own "
                "1/%d of data.global_batch_size, not the whole step's batch (fewer negatives than the global "
                "batch says): module.accum_freq=%d keeps them, at the memory of one micro-batch",
                k,
                k,
                k,
            )
        if self.hparams.accum_freq > 1:
            self._check_accum_freq()

    def _check_accum_freq(self) -> None:
        from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

        from train.strategies import FSDPStrategy

        k, trainer = self.hparams.accum_freq, self.trainer
        strategy = trainer.strategy
        supported = not isinstance(strategy, DeepSpeedStrategy) and isinstance(
            strategy, DDPStrategy | FSDPStrategy | SingleDeviceStrategy
        )
        problems = accum_freq_problems(
            k, type(strategy).__name__, supported=supported, accumulate=trainer.accumulate_grad_batches,
            precision=trainer.precision,
        )  # fmt: skip
        batch = getattr(trainer.datamodule, "batch_size", None)
        if batch is not None and batch % k:
            problems.append(
                f"module.accum_freq={k} does not divide the per-device batch of {batch} "
                f"(data.global_batch_size / ranks / trainer.accumulate_grad_batches)"
            )
        if problems:
            raise ValueError("\n".join(problems))

    def optimizer_step(self, *args, **kwargs):
        result = super().optimizer_step(*args, **kwargs)
        self.net.clamp_logit_scale_()
        return result

    # ---- evaluation -------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.net(batch["image"], batch["tokens"])
        self._val.append(
            {
                "image": out["image_features"].float().cpu(),  # (B, D) normalised
                "text": out["text_features"].float().cpu(),
                "caption": batch["caption"],
                "scene": [j.get("scene") for j in batch.get("json", [{}] * len(batch["caption"]))],
            }
        )

    def on_validation_epoch_end(self) -> None:
        parts = self.validation_parts()  # every rank evaluated its own shards
        if not parts:
            return
        img = torch.cat([p["image"] for p in parts])
        txt = torch.cat([p["text"] for p in parts])
        captions = [c for p in parts for c in p["caption"]]
        scenes = [s for p in parts for s in p["scene"]]
        scale = self.net.logit_scale.exp().clamp(max=100).item() if hasattr(self.net, "logit_scale") else 1.0
        logits = scale * img @ txt.T
        target = torch.arange(len(img))
        if self.hparams.loss == "siglip":  # the training objective over every held-out pair
            bias = float(self.net.logit_bias.detach().float().reshape(-1)[0])
            loss = sigmoid_loss(img, txt, torch.tensor(scale), torch.tensor(bias), 0)
        else:
            loss = (
                torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)
            ) / 2
        metrics = {"val/loss": loss.item(), "val/n": float(len(img))}
        held_out = clip_metrics(
            img, txt, captions, scenes, self.net.encode_text, self.tokenizer,
            device=self.device, zeroshot=self.hparams.zeroshot,
        )  # fmt: skip
        metrics.update({f"val/{k}": v for k, v in held_out.items()})
        # Identical on every rank (computed from the gathered set): no further reduction needed.
        self.log_dict(metrics, prog_bar=False, sync_dist=False)
