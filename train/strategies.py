"""Distributed strategies beyond plain DDP: DeepSpeed ZeRO and FSDP2, one config choice each (conf/strategy/).

- DeepSpeed ZeRO 1/2/3 (+ CPU offload) is Lightning's ``DeepSpeedStrategy`` plus what evaluation needs
  under ZeRO-3 (``DeepSpeedStrategy`` here). ``CPUDeepSpeedStrategy`` runs the same ZeRO code on CPU processes over gloo; it exists for tests and
  for debugging a config on a laptop, and is only ever used when a config names it
  (``strategy=deepspeed_zero3 strategy._target_=train.strategies.CPUDeepSpeedStrategy``).
- FSDP is PyTorch's FSDP2 (``fully_shard``, DTensor parameters) through Lightning's
  ``ModelParallelStrategy``: ``FSDPStrategy`` here fixes its mesh to pure data parallelism (every rank a
  shard, no tensor parallelism) and each stage's LightningModule shards itself in ``configure_model``
  with :func:`shard_module`. FSDP2 works on CPU (gloo) as well as on GPUs, so the same path is tested
  here and used on clusters. (Lightning's older ``FSDPStrategy`` wraps FSDP1 and refuses CPU.)
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from pytorch_lightning.plugins.precision import DeepSpeedPrecision
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
from pytorch_lightning.strategies import DeepSpeedStrategy as _LightningDeepSpeed

from train.parallel import fsdp_units, on_rank_zero, waiting_group

log = logging.getLogger(__name__)
CONVERSION_HOURS = 6  # how long the other ranks wait for rank 0's conversion of a resharded ZeRO-3 checkpoint


class DeepSpeedStrategy(_LightningDeepSpeed):
    """Lightning's DeepSpeed strategy, with what every stage here needs on top:

    - ZeRO-3 keeps each rank's slice of a weight only; evaluation that reads weights outside ``forward``
      (``encode_text``, the logit scale) needs them gathered: the modules of :func:`eval_gathered` are
      gathered for the whole validation and partitioned again after it. The rest stays partitioned
      (sampling calls only ``forward``, which gathers each module as it runs).
    - ``offload_optimizer`` needs DeepSpeed's CPU Adam; :func:`train.modules.optim.configure_adamw` picks
      it from :func:`offloads_optimizer`.
    """

    def __init__(self, *args: Any, param_persistence_threshold: int | None = None, **kwargs: Any) -> None:
        """``param_persistence_threshold``: ZeRO-3 keeps weights with fewer elements than this whole on
        every rank instead of partitioning them (DeepSpeed's default: 100,000)."""
        super().__init__(*args, **kwargs)
        if param_persistence_threshold is not None:
            self.config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = int(
                param_persistence_threshold
            )

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._gathered = None
        if self.zero_stage_3:
            import deepspeed

            params = [p for m in eval_gathered(self.lightning_module) for p in m.parameters()]
            self._gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            self._gathered.__enter__()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        _committed_save(self, super().save_checkpoint, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        from pathlib import Path

        from train.checkpoint import validate_deepspeed_checkpoint

        path = Path(checkpoint_path)
        if path.is_dir():  # DeepSpeed unpickles its files freely: check them first
            validate_deepspeed_checkpoint(path)
            saved = saved_dp_world_size(path)
            if saved not in (None, self.world_size):
                if not self.zero_stage_3:
                    raise ValueError(
                        f"{path}: a ZeRO-{self.config['zero_optimization']['stage']} checkpoint saved on {saved} "
                        f"ranks cannot resume on {self.world_size} (DeepSpeed partitions the optimizer state per "
                        f"rank; only ZeRO-3 and FSDP checkpoints are resharded on load): resume on {saved} ranks"
                    )
                return self._load_resharded(path, saved)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def _load_resharded(self, path, saved: int) -> dict:
        """A ZeRO-3 checkpoint saved on another number of ranks: DeepSpeed refuses to load its optimizer
        partitions directly. Rank 0 converts it to DeepSpeed's universal checkpoint (one file per weight
        and optimizer state, ``deepspeed.checkpoint.ds_to_universal``) in a hidden directory next to it,
        every rank loads its new partition from there, and the directory is removed. The universal load
        restores the trained weights and Adam moments only: frozen weights (an EMA copy) and buffers are
        restored here from the saved per-rank files."""
        import shutil
        from pathlib import Path

        from pytorch_lightning.trainer.states import TrainerFn

        path = Path(path)
        tag = (path / "latest").read_text().strip()
        universal = path.parent / f".{path.name}.universal"

        def convert() -> None:
            log.info("%s: saved on %d ranks, resumed on %d: converting to a universal checkpoint", path, saved,
                     self.world_size)  # fmt: skip
            shutil.rmtree(universal, ignore_errors=True)
            _to_universal(path / tag, universal / tag)

        # The others wait on a gloo group of their own, not in a barrier of the default group: a paper-size
        # conversion on one process can outlast its 30 minutes, and a failed one ends them with its message.
        on_rank_zero(convert, group=waiting_group(hours=CONVERSION_HOURS))
        engine = self.deepspeed_engine
        engine._config.load_universal_checkpoint = True
        try:
            _, client_state = engine.load_checkpoint(
                str(universal),
                tag=tag,
                load_optimizer_states=self.lightning_module.trainer.state.fn == TrainerFn.FITTING,
                load_lr_scheduler_states=False,
                load_module_strict=self.lightning_module.strict_loading,
            )
        finally:
            engine._config.load_universal_checkpoint = False
        _restore_what_universal_skips(engine, path / tag)
        self.barrier("universal checkpoint loaded")
        if self.is_global_zero:
            shutil.rmtree(universal, ignore_errors=True)
        if client_state is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load its universal conversion")
        return client_state

    def on_validation_end(self) -> None:
        if getattr(self, "_gathered", None) is not None:
            self._gathered.__exit__(None, None, None)
            self._gathered = None
        super().on_validation_end()


def saved_dp_world_size(path) -> int | None:
    """The number of data-parallel ranks a DeepSpeed checkpoint directory was saved on (one ZeRO
    optimizer partition file per rank), or None when it holds none."""
    from pathlib import Path

    path = Path(path)
    latest = path / "latest"
    if not latest.is_file():
        return None
    files = list((path / latest.read_text().strip()).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(files) or None


def _to_universal(src, dst) -> None:
    """DeepSpeed's ``ds_to_universal`` conversion of one checkpoint tag, in this process (no worker pool)."""
    import contextlib
    import io
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(
        input_folder=str(src),
        output_folder=str(dst),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(args)


def _restore_what_universal_skips(engine, tag_dir) -> None:
    """What DeepSpeed's universal load leaves out or gets wrong under ZeRO-3: the frozen weights (each
    saved rank holds a fragment of each: reassembled and repartitioned for this rank), the module's
    buffers (whole in every rank's file), and the hyper-parameters of each optimizer parameter group
    (it sets every group's from the first: the no-weight-decay group would get weight decay) and their
    step counts."""
    from pathlib import Path

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(f):  # the types validate_deepspeed_checkpoint allows, no others; tensors read lazily
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            return torch.load(f, map_location="cpu", weights_only=True, mmap=True)

    tag_dir = Path(tag_dir)
    files = sorted(
        tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=lambda f: int(f.name.split("_")[3])
    )
    states = [load(f) for f in files]
    restored = _restore_frozen(engine, states)
    buffers = dict(engine.module.named_buffers())
    saved = {k: v for k, v in (states[0].get("module") or {}).items() if k in buffers}
    for key, value in saved.items():
        buffers[key].copy_(value.to(buffers[key].dtype))
    optim_file = next(tag_dir.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"), None)  # bf16_ or not
    if optim_file is not None:
        _restore_groups(engine, load(optim_file), tag_dir)
    log.info("resharded ZeRO-3 checkpoint: %d frozen weights and %d buffers restored", restored, len(saved))


def _restore_frozen(engine, states: list[dict]) -> int:
    """Frozen weights from the saved ranks' fragments, repartitioned for this rank; returns how many."""
    fragments = [s.get("frozen_param_fragments") or {} for s in states]
    shapes = states[0].get("frozen_param_shapes") or {}
    rank = engine.global_rank
    restored = 0
    for param in engine.module.parameters():
        name = engine.param_names.get(param)
        if name not in shapes:
            continue
        full = torch.cat([f[name].reshape(-1) for f in fragments])[: shapes[name].numel()]
        if hasattr(param, "ds_id"):
            part = param.ds_tensor.numel()
            mine = full[rank * part : (rank + 1) * part]
            param.ds_tensor.data.zero_()
            param.ds_tensor.data[: mine.numel()].copy_(mine.to(param.ds_tensor.dtype))
            if param.data.numel() == full.numel():  # a persistent (small) weight, whole on every rank
                param.data.copy_(full.view_as(param.data).to(param.dtype))
        else:
            param.data.copy_(full.view_as(param.data).to(param.dtype))
        restored += 1
    return restored


def _restore_groups(engine, optim_state: dict, tag_dir) -> None:
    """Each optimizer parameter group's saved hyper-parameters, and a step counter of its own."""
    optimizer = getattr(engine.optimizer, "optimizer", None)
    if optimizer is None:
        return
    groups = optim_state["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(
            f"{tag_dir}: {len(groups)} optimizer parameter groups saved, {len(optimizer.param_groups)} now"
        )
    for group, was in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in was.items() if k != "params"})
    # It also gives every group's state the same ``step`` tensor, which Adam increments in place
    # once per group and step: the second group's bias correction would run ahead.
    for flat in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []):
        state = optimizer.state.get(flat, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _committed_save(strategy, save, checkpoint: dict, filepath, storage_options) -> None:
    """A sharded save that is only valid once every rank finished: unmark, save, wait, mark (rank 0)."""
    from pathlib import Path

    from train.checkpoint_io import commit, uncommit

    path = Path(strategy.broadcast(str(filepath)))
    if strategy.is_global_zero and path.is_dir():
        uncommit(path)  # overwriting (last.ckpt): invalid until rewritten
    strategy.barrier("uncommit checkpoint")
    save(checkpoint, filepath, storage_options)
    strategy.barrier("checkpoint written")
    if strategy.is_global_zero:
        if path.is_dir():
            commit(path, checkpoint.get("global_step"))
        else:  # a strategy configured to consolidate into one file (written by rank 0, complete here)
            log.debug("%s is a single file: nothing to mark", path)


def offloads_optimizer(strategy) -> bool:
    config = getattr(strategy, "config", None) or {}
    return bool((config.get("zero_optimization") or {}).get("offload_optimizer"))


class DeepSpeedMixedPrecision(DeepSpeedPrecision):
    """Lightning's DeepSpeed precision plugin, without its cast of every batch under mixed precision.

    Lightning casts each floating tensor of a batch to the run's dtype before the step, since DeepSpeed's
    bf16 mode holds the module's weights in bf16. Our nets cast their inputs to their weights' dtype
    themselves, and the cast rounds what must stay exact: stored embeddings (fp16 -> bf16, so a
    DeepSpeed step saw other inputs than a DDP or FSDP step of the same batch) and token ids read as
    floats (49407 -> 49408 in bf16: the prior's caption mask then found no end-of-text token).
    ``train.run.build_trainer`` gives it to every DeepSpeed strategy; the "true" precisions, whose
    modules are cast whole, keep Lightning's cast."""

    def convert_input(self, data: Any) -> Any:
        return data if "mixed" in str(self.precision) else super().convert_input(data)


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO on CPU processes (gloo). Tests and debugging only: name it explicitly.

    Lightning's DeepSpeedStrategy refuses anything but CUDA. On CPU three things differ: the CUDA check
    is skipped, each rank's root device is ``cpu:<local rank>`` (DeepSpeed indexes devices by rank), and
    the device-index validation (meaningless for CPU) is skipped. DeepSpeed's shared-memory collective,
    which it JIT-compiles at every start on CPU (about a minute on 2 cores), is replaced by plain gloo.
    """

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_distributed(self) -> None:
        from lightning_fabric.utilities.seed import reset_seed

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class FSDPStrategy(ModelParallelStrategy):
    """FSDP2: parameters, gradients and optimizer state sharded over all ranks (pure data parallel mesh),
    or over groups of ``shard_size`` ranks with the groups replicas of each other (HSDP).

    The LightningModule applies the sharding in ``configure_model`` (see :func:`shard_module`); options
    reach it through the strategy: ``reshard_after_forward`` (True: ZeRO-3-like, free gathered weights
    after forward; False: ZeRO-2-like, keep them until backward), ``param_dtype``/``reduce_dtype``
    (mixed precision of the sharded compute, e.g. bf16 params with fp32 gradient reduction),
    ``shard_size`` (HSDP: each weight sharded over ``shard_size`` consecutive ranks, e.g. the 8 GPUs of a
    node, so the per-unit all-gathers and reduce-scatters stay inside a node and only the gradients'
    all-reduce crosses nodes; null: over every rank).
    Checkpoints are distributed (a directory with one shard per rank) unless
    ``save_distributed_checkpoint=False``; ``python -m train.checkpoint consolidate`` makes one file.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        save_distributed_checkpoint: bool = True,
        shard_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )
        if shard_size is not None and (
            isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1
        ):
            raise ValueError(
                f"strategy.shard_size={shard_size!r}: expected null (every rank) or a positive integer"
            )
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = _dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.shard_size = shard_size
        self.shard_mesh = None  # the mesh the net is sharded over: set up with the process group

    def setup_environment(self) -> None:
        # "auto" would mean one data-parallel group per node; FSDP here shards over every rank.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        self.shard_mesh = self._device_mesh["data_parallel"]
        world, size = self.world_size, self.shard_size
        if size is None or size == world:
            return
        if world % size:
            raise ValueError(
                f"strategy.shard_size={size}: expected a divisor of the world size, {world} "
                f"({self.num_nodes} node(s) x {self.num_processes} process(es)), e.g. the ranks of one node"
            )
        from torch.distributed.device_mesh import init_device_mesh

        # rank = replica * size + position: a replica is `size` consecutive ranks (one node's, as
        # torchrun and SLURM number them)
        self.shard_mesh = init_device_mesh(
            self.root_device.type, (world // size, size), mesh_dim_names=("replicate", "shard")
        )
        log.info("FSDP2: HSDP, %d replicas of %d shards", world // size, size)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        _committed_save(self, super().save_checkpoint, checkpoint, filepath, storage_options)

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning's gradient accumulation runs every micro-batch but an optimizer step's last in here.
        Under HSDP the replicas' all-reduce (the one collective that crosses nodes) then waits for the
        last micro-batch, which all-reduces the sum of the step's reduce-scattered gradients once. Each
        micro-batch still reduce-scatters inside its group, so gradients stay sharded (FSDP2's
        ``set_requires_all_reduce``). FSDP2 adds the micro-batches' reduced gradients up only when each
        gave gradients to the same parameters: the stages' null embeddings take theirs through
        ``torch.where`` (zero where unused), and the CLIP's chunked loss gives its scale a zero gradient.
        Plain FSDP has nothing to defer: it syncs every micro-batch."""
        from torch.distributed.fsdp import FSDPModule

        hsdp = self.shard_mesh is not None and self.shard_mesh.ndim == 2
        units = [m for m in self.lightning_module.modules() if isinstance(m, FSDPModule)] if hsdp else []
        for unit in units:
            unit.set_requires_all_reduce(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_all_reduce(True, recurse=False)

    # Evaluation that calls more than ``forward`` (encode_text, the logit scale) reads weights between
    # forwards: the modules of eval_gathered() are gathered for the whole validation. The others stay
    # sharded; their forward calls (sampling loops) gather one unit at a time, in the policy's dtype.
    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._gather(True)

    def on_validation_end(self) -> None:
        self._gather(False)
        super().on_validation_end()

    def _gather(self, full: bool) -> None:
        from torch.distributed.fsdp import FSDPModule

        roots = eval_gathered(self.lightning_module, fsdp=True)
        units = list({id(m): m for r in roots for m in r.modules() if isinstance(m, FSDPModule)}.values())
        inner = {id(m) for u in units for m in u.modules() if m is not u and isinstance(m, FSDPModule)}
        for unit in units:
            # FSDP keeps a root's weights gathered from forward to backward by default; restore that.
            after_forward = self.reshard_after_forward and id(unit) in inner
            unit.set_reshard_after_forward(not full and after_forward, recurse=False)
            unit.unshard() if full else unit.reshard()


def eval_gathered(pl_module: nn.Module, fsdp: bool = False) -> list[nn.Module]:
    """The modules a stage's evaluation reads outside their ``forward``, named by its ``eval_gathers``
    (e.g. ``("net",)``: CLIP's encode_text and logit scale); all of it when a stage does not say.
    Under ZeRO-3 and FSDP these are gathered for the whole validation, the rest stays sharded. Under FSDP
    (``fsdp``) also its ``eval_gathers_fsdp`` (the diffusion stages' EMA copy: forwards without
    collectives)."""
    names = getattr(pl_module, "eval_gathers", None)
    if names is None:
        return [pl_module]
    extra = tuple(getattr(pl_module, "eval_gathers_fsdp", ())) if fsdp else ()
    return [pl_module.get_submodule(name) for name in dict.fromkeys((*names, *extra))]


def _dtype(name: str | None, option: str) -> torch.dtype | None:
    if name is None:
        return None
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if name not in table:
        raise ValueError(f"strategy.{option}={name!r}: expected one of {sorted(table)}")
    return table[name]


def shard_module(
    module: nn.Module,
    mesh,
    *,
    reshard_after_forward: bool = True,
    param_dtype=None,
    reduce_dtype=None,
    roots: list[str] | None = None,
) -> None:
    """Apply FSDP2 to ``module``'s children named in ``roots`` (default: every child with parameters):
    each unit of :func:`fsdp_units` first, then the child itself. Frozen weights (an EMA copy) are
    sharded like trained ones: every rank holds a 1/world slice of every weight (1/shard size on a 2-D HSDP
    mesh, whose first dimension replicates)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    names = (
        roots
        if roots is not None
        else [n for n, c in module.named_children() if any(True for _ in c.parameters())]
    )
    for name in names:
        child = module.get_submodule(name)
        for unit in fsdp_units(child):
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        fully_shard(child, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    log.info("FSDP2: sharded %s over %d ranks", ", ".join(names), mesh.size(mesh.ndim - 1))


def configure_sharding(pl_module) -> None:
    """The shared ``configure_model`` of every stage: shard under ``FSDPStrategy``, nothing otherwise."""
    mesh = getattr(pl_module, "_device_mesh", None)
    if mesh is None:
        return
    strategy = pl_module.trainer.strategy
    if getattr(pl_module, "_sharded", False):
        return
    dp_mesh = getattr(strategy, "shard_mesh", None) or mesh["data_parallel"]  # 2-D under HSDP
    # The trained net and its EMA copy. A frozen CLIP (train/frozen_clip.py) is not a module: replicated.
    # The copy only ever runs forward, under no_grad (validation, sampling): with reshard_after_forward
    # false nothing would reshard it afterwards (that happens after backward), and its full weights would
    # stay gathered and no longer match the net's shards at the next EMA update. So it reshards after
    # every forward, whatever the strategy says for the net.
    for root, reshard in (("net", getattr(strategy, "reshard_after_forward", True)), ("ema.shadow", True)):
        if _has_submodule(pl_module, root):
            shard_module(
                pl_module,
                dp_mesh,
                roots=[root],
                reshard_after_forward=reshard,
                param_dtype=getattr(strategy, "param_dtype", None),
                reduce_dtype=getattr(strategy, "reduce_dtype", None),
            )
    pl_module._sharded = True


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
