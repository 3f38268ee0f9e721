"""An isolated environment with open_clip for reference outputs, run in a subprocess.

The framework must not import open_clip (it needs torchvision, which has no CPU build for our torch
and breaks Lightning's imports when installed; see ../shared/ENVIRONMENT.md). Tests that compare
against open_clip install it once with ``pip install --target`` into a cache directory and run the
reference code in a subprocess with that directory on ``PYTHONPATH``. Inputs and outputs travel as
``torch.save`` files.

Cache: ``$UNCLIP_REFERENCE_DIR`` or ``~/.cache/unclip/reference-<hash>`` (of the interpreter and the
package list); written to a temporary directory and renamed, so a failed or concurrent install never
leaves a half environment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

# open_clip's tokenizer module needs ftfy and regex; wcwidth is ftfy's dependency.
TOKENIZER_PACKAGES = ("open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.4", "regex==2026.11.19")


def reference_dir(packages: tuple[str, ...], abi: str = sys.implementation.cache_tag) -> Path:
    """One directory per package list and interpreter (``cpython-311``): the packages hold compiled
    extensions (regex), so another Python must not reuse them."""
    digest = hashlib.sha256("\n".join((abi, *packages)).encode()).hexdigest()[:12]
    root = os.environ.get("UNCLIP_REFERENCE_DIR") or Path.home() / ".cache" / "unclip"
    return Path(root) / f"reference-{digest}"


def ensure_reference_env(packages: tuple[str, ...] = TOKENIZER_PACKAGES) -> Path:
    """Install ``packages`` (no dependencies resolved: the list is complete) once; skip the test without a registry."""
    target = reference_dir(packages)
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-compile",
        "--target",
        str(tmp),
        *packages,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(
            f"could not install the open_clip reference environment ({' '.join(packages)}): "
            f"{result.stderr.strip()[-500:]}"
        )
    (tmp / ".complete").write_text("\n".join(packages))
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def openclip_file(env: Path, name: str) -> Path:
    path = env / "open_clip" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: not in the installed open_clip_torch")
    return path


def run_reference(env: Path, script: str, inputs: dict[str, Any], timeout: int = 600) -> dict[str, Any]:
    """Run ``script`` in a subprocess with ``env`` on PYTHONPATH. The script sees ``inputs`` (a dict) and
    ``ENV`` (the directory) and must fill the dict ``outputs``."""
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save(inputs, in_path)
        program = (
            textwrap.dedent(f"""
            import torch
            ENV = {str(env)!r}
            inputs = torch.load({str(in_path)!r}, weights_only=False)
            outputs = {{}}
        """)
            + textwrap.dedent(script)
            + f"\ntorch.save(outputs, {str(out_path)!r})\n"
        )
        run_env = {**os.environ, "PYTHONPATH": str(env)}
        result = subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=run_env,
            cwd=tmp,
        )
        if result.returncode != 0:
            raise RuntimeError(f"reference subprocess failed:\n{result.stderr[-3000:]}")
        return torch.load(out_path, weights_only=False)


# open_clip models (weight-import tests) also need torchvision, whose only build for torch 2.13.0 is a
# CUDA one: with --no-deps only its own 7.7 MB wheel is installed, and the subprocess defines the two
# operator schemas its missing C++ library would have registered (TORCHVISION_SHIM) before importing it.
MODEL_PACKAGES = (*TOKENIZER_PACKAGES, "torchvision==0.28.0")
TORCHVISION_SHIM = """
import torch
_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
"""
