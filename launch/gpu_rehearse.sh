#!/usr/bin/env bash
# Rehearse the GPU session here, on the CPU, before spending device minutes: an environment like the lent
# H200's image (Python 3.12, torch 2.11, Lightning 2.6.6 and the image's other packages at its versions,
# none of setup.cfg's other pins), the carried wheels installed the way gpu_check.sh installs them there,
# then `gpu_check.sh --cpu`. It fails where the GPU machine would on a package missing from .whl/, an API
# newer than torch 2.11 or a Python 3.12 difference; only what needs CUDA is left to the GPU.
#
#   bash launch/gpu_rehearse.sh                   # first time: builds the environment (~700 MB download)
#   bash launch/gpu_rehearse.sh --steps tests,data
#
# REHEARSAL_ENV (default ~/.cache/unclip-gpu-image) holds the environment; PY312 names a Python 3.12.
# The image's package list: the device library's KINDS.md (a session's pip list on the H200, 2026-11).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
env_dir=${REHEARSAL_ENV:-$HOME/.cache/unclip-gpu-image}
py312=${PY312:-python3.12}
if [ ! -f "$env_dir/.complete" ]; then
  $py312 -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
    || { echo "PY312=$py312 is not a Python 3.12 (the GPU image's)" >&2; exit 2; }
  rm -rf "$env_dir" && $py312 -m venv "$env_dir"
  # PyPI's torch 2.11.0 is the CUDA 13 build, as on the H200; without CUDA libraries it imports and runs on CPU
  "$env_dir/bin/python" -m pip install -q --no-deps torch==2.11.0 torchvision==0.26.0
  "$env_dir/bin/python" -m pip install -q lightning==2.6.6 pytorch-lightning==2.6.6 torchmetrics==1.9.0 \
    tokenizers==0.23.2 safetensors==0.8.0 numpy==2.5.2 pillow pyyaml pytest pytest-timeout pyarrow psutil \
    py-cpuinfo nvidia-ml-py packaging typing-extensions sympy networkx jinja2 fsspec filelock tqdm rich regex \
    requests protobuf six einops timm huggingface_hub==1.33.0 accelerate==1.15.0 click httpx
  "$env_dir/bin/python" -c 'import torch; assert torch.__version__.startswith("2.11"), torch.__version__'
  touch "$env_dir/.complete"
fi
ls .whl/*.whl >/dev/null 2>&1 || bash launch/gpu_wheels.sh
export OUT=${OUT:-outputs/gpu_rehearsal} WORK=${WORK:-/tmp/unclip-gpu-rehearsal} PYTHON="$env_dir/bin/python"
exec bash launch/gpu_check.sh --cpu "$@"
