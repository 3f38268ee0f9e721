"""What every stage's LightningModule shares; each stage file (clip.py, prior.py, decoder.py, upsampler.py)
holds only what is its own: inputs, the training step, sampling and its validation metrics.

- Optimisation: AdamW over the net's parameter groups with warm-up + cosine (train/modules/optim.py),
  set by the ``optimizer`` block (:attr:`StageModule.optimizer_defaults`, which a stage may override,
  fill what it leaves out); the net (and its EMA copy) sharded by FSDP2 under ``strategy=fsdp`` (train/strategies.py).
- Validation in parts: each ``validation_step`` appends a dict of CPU tensors to ``self._val``;
  :meth:`StageModule.validation_parts` returns every rank's parts at the epoch end (each rank
  evaluated its own held-out shards; the metrics need the whole set).
- :meth:`StageModule.log_grid`: rank 0 writes ``<run>/samples/step<N>.png`` and hands it to every logger
  that takes images (W&B).
- :class:`DiffusionStageModule`: a net trained as a diffusion model, with the EMA copy that evaluates
  and is exported, the process and its respaced sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from data.images import save_grid
from train.callbacks.log_step import logs_this_step
from train.diffusion import GaussianDiffusion
from train.ema import EMA, EMAUpdateAfterStep
from train.modules.compat import upgrade_module_config
from train.modules.optim import apply_settings, configure_adamw, optimizer_settings
from train.strategies import configure_sharding

log = logging.getLogger(__name__)


class StageModule(pl.LightningModule):
    net: torch.nn.Module
    # What evaluation reads outside forward, gathered whole for validation under ZeRO-3/FSDP
    # (train/strategies.py eval_gathered); None: the whole module.
    eval_gathers: tuple[str, ...] | None = None
    # What validation only runs forward, gathered whole for it under FSDP as well, so that those forwards
    # are no collectives (DiffusionStageModule). Not under ZeRO-3, whose forwards gather anyway.
    eval_gathers_fsdp: tuple[str, ...] = ()
    # AdamW settings where ``module.optimizer`` leaves one out (train/modules/optim.py); a stage states
    # only where its own differ (conf/stage/*.yaml holds every value a run uses).
    optimizer_defaults: dict[str, Any] = {
        "lr": 3e-4,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "warmup_steps": 100,
        "min_lr_ratio": 0.1,
    }

    def settle_blocks(
        self,
        old_keys: dict[str, Any],
        optimizer: Mapping[str, Any] | None,
        diffusion: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The constructor's ``optimizer`` block, completed with :attr:`optimizer_defaults` and checked,
        and its ``diffusion`` block, once the old flat keyword arguments (``lr``, ``eps``, ...,
        ``diffusion.clip``: a checkpoint's hyper-parameters or a call from before ``module.optimizer``)
        are moved into them (train/modules/compat.py). Any other unknown keyword is a TypeError."""
        given: dict[str, Any] = {**old_keys, "optimizer": dict(optimizer or {})}
        if diffusion is not None:
            given["diffusion"] = dict(diffusion)
        upgrade_module_config(given)
        unexpected = sorted(set(given) - {"optimizer", "diffusion"})
        if unexpected:
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword arguments: {', '.join(unexpected)}"
            )
        return optimizer_settings(given["optimizer"], self.optimizer_defaults), given.get("diffusion")

    def on_validation_epoch_start(self) -> None:
        self._val: list[dict] = []

    def val_room(self, counted: str) -> int | None:
        """How many more held-out samples this rank's validation takes, counted in its parts' ``counted``
        entries; None: no limit (``x[:None]`` keeps everything). ``module.val_max_samples`` is the run's,
        all ranks together: each rank takes its share (the limit was per rank, so the set evaluated and
        the metrics that depend on its size, recall@1 among them, changed with the number of GPUs)."""
        limit = self.hparams.get("val_max_samples")
        if limit is None:
            return None
        share = -(-limit // max(1, self.trainer.world_size))
        return max(0, share - sum(len(p[counted]) for p in getattr(self, "_val", [])))

    def validation_parts(self) -> list[dict]:
        """This validation's parts from every rank (rank order), and a fresh list for the next one."""
        parts, self._val = getattr(self, "_val", []), []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)  # a collective: every rank calls it, even with no parts
            parts = [p for rank_parts in gathered for p in rank_parts]
        return parts

    def log_lr(self) -> None:
        if logs_this_step(self.trainer):
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def log_grid(self, rows: list[torch.Tensor], scale: int = 1) -> None:
        """Rows of uint8 (N, 3, H, W) images as ``<run>/samples/step<N>.png`` and ``val/samples`` (rank 0)."""
        if not self.trainer.is_global_zero:
            return
        path = Path(self.trainer.default_root_dir) / "samples" / f"step{self.global_step:07d}.png"
        save_grid(rows, path, scale=scale)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="val/samples", images=[str(path)], step=self.global_step)

    def configure_model(self) -> None:
        configure_sharding(self)  # FSDP2 under strategy=fsdp; nothing under DDP or DeepSpeed

    def configure_optimizers(self):
        return configure_adamw(self, self.net)

    def on_train_start(self) -> None:  # after a checkpoint's optimizer and schedule have been restored
        if getattr(self, "adamw", None) is None:  # a subclass with an optimizer of its own
            return
        changed = apply_settings(*self.adamw, self.hparams.optimizer)
        if changed:
            log.info("module.optimizer from the config, not the checkpoint: %s", ", ".join(changed))

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """``trainer.gradient_clip_val`` under bf16-mixed with the fused AdamW (ours on CUDA). Lightning's
        mixed-precision plugin refuses to clip for an optimizer that unscales gradients in its own step,
        as a fused one does under a GradScaler; bf16 has no scaler, so the gradients are the true ones and
        are clipped as at full precision (the base plugin's clipping). fp16 keeps Lightning's refusal."""
        from pytorch_lightning.plugins.precision import MixedPrecision, Precision
        from pytorch_lightning.utilities.enums import GradClipAlgorithmType

        plugin = self.trainer.precision_plugin
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None and fused:
            val = self.trainer.gradient_clip_val if gradient_clip_val is None else gradient_clip_val
            algorithm = gradient_clip_algorithm or self.trainer.gradient_clip_algorithm or "norm"
            Precision.clip_gradients(plugin, optimizer, float(val or 0.0), GradClipAlgorithmType(algorithm))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


class DiffusionStageModule(EMAUpdateAfterStep, StageModule):
    """A stage trained as a diffusion model (prior, decoder, upsamplers).

    Validation runs no collective until its end, so that ranks may take different numbers of validation
    steps (a rank with fewer or no validation shards, or done at ``val_max_samples``): they meet at the
    gather of the results. A collective inside a step hung the ranks still evaluating, waiting for one
    that had gone to the gather. So the EMA copy, which validation runs (a loss and whole sampling loops),
    is gathered whole for the validation under FSDP (one gather, not one per unit per forward: the copy's
    weights in full on each rank meanwhile), and DDP leaves the buffers alone (the EMA's count, the same
    on every rank by construction), which it would otherwise broadcast before the first forward. ZeRO-3
    gathers weights at every module call whatever is gathered before, so there the ranks validate in
    step instead (data/datamodule.py val_dataloader), and the copy stays partitioned: gathered whole
    it only held the copy's weights in full on every rank, its forwards gathering them anyway."""

    eval_gathers: tuple[str, ...] | None = ()
    eval_gathers_fsdp: tuple[str, ...] = ("ema",)

    @property
    def frozen_clip(self):
        """The frozen CLIP this stage embeds with (the decoder's, a prior's with ``clip_ckpt``), as loaded
        (train/frozen_clip.py); None for the upsamplers and a prior on embedding shards alone."""
        return getattr(self, "_clip", None)

    def seeded_noise(self, x0: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Timesteps and noise for a held-out loss drawn from ``seed`` (the same at every validation), and
        the generator, which then seeds the validation's samples."""
        g = torch.Generator(self.device).manual_seed(seed)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.device, generator=g)
        noise = torch.randn(x0.shape, device=self.device, generator=g)
        return t, noise, g

    def setup_diffusion(
        self, net: torch.nn.Module, diffusion: Mapping[str, Any], ema_decay: float, sample_steps: int
    ) -> None:
        """``net`` with its EMA copy, the process (``module.diffusion``) and a sampler respaced to
        ``sample_steps``."""
        self.net = net
        self.ema = EMA(net, decay=ema_decay)
        self.diffusion = GaussianDiffusion.from_config(**diffusion)
        self.sampler = self.diffusion.respace(sample_steps)
        # read by DistributedDataParallel: no buffer broadcast before each forward (see the class docstring)
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]
