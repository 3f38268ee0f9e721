"""Shared fixtures: tiny shards written on the fly into tmp_path."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

# Tests must never reach W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")


def image_bytes(width: int = 32, height: int = 32, color=(200, 30, 30), fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes | str | dict]]) -> Path:
    """Write samples {"__key__": key, ext: payload} in img2dataset's layout (members in dict order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, payload in sample.items():
                if ext == "__key__":
                    continue
                if isinstance(payload, dict):
                    payload = json.dumps(payload)
                if isinstance(payload, str):
                    payload = payload.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(payload))
    return path


def simple_sample(key: str, caption: str = "a red square", size=(32, 32), **meta) -> dict:
    return {
        "__key__": key,
        "jpg": image_bytes(*size),
        "txt": caption,
        "json": {"key": key, "caption": caption, "width": size[0], "height": size[1], **meta},
    }


@pytest.fixture
def make_shards(tmp_path):
    """make_shards(sizes=[3, 5, 0]) -> (directory, list of all keys). Keys are globally unique."""

    def make(sizes: list[int], name: str = "shards", image_size=(32, 32)) -> tuple[Path, list[str]]:
        out = tmp_path / name
        keys: list[str] = []
        for s, n in enumerate(sizes):
            samples = [simple_sample(f"{s:05d}{i:04d}", size=image_size) for i in range(n)]
            keys += [x["__key__"] for x in samples]
            write_tar(out / f"{s:05d}.tar", samples)
        return out, keys

    return make


def first_batch(shards, tokenizer, batch_size: int, image_size: int = 64) -> dict:
    """The first non-empty batch of ``shards``, centre-cropped and tokenised (e.g. clip_run's held-out
    shards through its FrozenClip's tokenizer)."""
    from data.pipeline import ShardDataset

    ds = ShardDataset(
        shards, batch_size=batch_size, image_size=image_size, crop="center", tokenizer=tokenizer
    )
    return next(b for b in ds if b["__key__"])


def compose_config(overrides=()):
    """The run config exactly as ``python -m train.run OVERRIDES`` composes it (conf/train.yaml): the one way
    tests build configs, so what they check is what users run."""
    from hydra import compose, initialize_config_dir

    from train.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose("train", overrides=list(overrides))


# what Lightning and torch.distributed leave in the environment of a process that ran a distributed strategy
_DIST_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
)


@contextlib.contextmanager
def distributed_state_restored():
    """Leaves no process group and the distributed environment variables as they were. A run in this
    process under DeepSpeed or FSDP (train(), the GPU tier's sharded tests) leaves Lightning's process
    group, whose store keeps listening on MASTER_PORT, and MASTER_PORT in the environment: a later test's
    subprocesses inherited that port, the SLURM sweep's jobs failed to bind it (EADDRINUSE) and their
    other ranks waited forever."""
    saved = {key: os.environ.get(key) for key in _DIST_ENV}
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def _no_process_group_outlives_its_test():
    with distributed_state_restored():
        yield


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory):
    """A tiny CLIP run directory (2 steps on tiny synthetic shards) and its val shard spec."""
    from train.run import train

    root = tmp_path_factory.mktemp("clip")
    cfg = compose_config(
        [
            "debug=fast",
            f"paths.data_dir={root / 'datasets'}",
            f"paths.output_dir={root / 'run'}",
            "trainer.max_steps=2",
        ]
    )
    train(cfg)
    return root / "run", cfg.data.val_shards


def clip_trained_on(run: Path, steps: int = 10, in_place: bool = False) -> Path:
    """The CLIP run directory ``run``, as after it trained on: a newer checkpoint, ``steps`` later, whose
    weights have all moved a little (what ``clip_ckpt=run`` loads from then on); ``in_place``: written
    over its newest checkpoint (a ``last.ckpt`` rewritten). Give it a copy of a fixture's run."""
    import torch

    from train.checkpoint import resolve_run

    _, newest = resolve_run(run)
    state = torch.load(newest, map_location="cpu", weights_only=True)
    state["global_step"] += steps
    state["state_dict"] = {
        k: v + 1e-3 if v.is_floating_point() else v for k, v in state["state_dict"].items()
    }
    later = newest if in_place else run / "checkpoints" / f"step{state['global_step']:07d}.ckpt"
    mtime = newest.stat().st_mtime
    torch.save(state, later)
    os.utime(later, (mtime + 1,) * 2)  # the newest, whatever the clock's resolution
    return run


REPO = Path(__file__).resolve().parents[1]


def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI run in a test: datasets and logs under tmp_path, W&B offline, this checkout
    first on the path. The path inherited stays after it: on the GPU machine the carried wheels are there
    (launch/gpu_check.sh installs them with --target)."""
    inherited = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "UNCLIP_DATA_DIR": str(tmp_path / "datasets"),
        "UNCLIP_LOG_DIR": str(tmp_path / "outputs"),
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(REPO), *([inherited] if inherited else [])]),
    }


def run_python(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` in tmp_path with :func:`cli_env`; output captured. Past ``timeout`` the test fails
    with the end of what the command printed, so a run that stalls says where."""
    try:
        return subprocess.run(
            [sys.executable, *args],
            cwd=tmp_path,
            env=cli_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        printed = b"".join(part or b"" for part in (e.stdout, e.stderr)).decode(errors="replace")
        raise AssertionError(
            f"python {' '.join(args)} ran past {timeout} s; it printed:\n{printed[-4000:]}"
        ) from None


def free_port() -> int:
    """A TCP port free on localhost now (for MASTER_PORT of a test's process group)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PicklePayload:
    """Unpickling this runs ``_mark`` (what a crafted checkpoint would do with worse code): tests assert
    ``PicklePayload.ran`` stays False."""

    ran = False

    def __reduce__(self):
        return (PicklePayload._mark, ())

    @staticmethod
    def _mark():
        PicklePayload.ran = True
        return "ran"


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA (or ``UNCLIP_TEST_DEVICE=cpu`` for the device-agnostic ones): skip them
    with the reason on a machine without it, so the CPU suite still collects and reports them."""
    import torch

    if os.environ.get("UNCLIP_TEST_DEVICE", "cuda") != "cuda" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bash launch/gpu_check.sh runs this tier on one)")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not the keyword: a parameter named gpu is none
            item.add_marker(skip)
