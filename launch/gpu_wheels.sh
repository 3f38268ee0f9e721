#!/usr/bin/env bash
# Fill .whl/ with what the lent GPU machine lacks (Python 3.12, no network there; it already has torch,
# lightning, torchmetrics, pytest, safetensors, tokenizers, torchvision, timm, transformers, pyarrow).
# Run here, from the repository root, before `bash launch/gpu_check.sh` goes to the GPU with carry [".whl"]:
#   bash launch/gpu_wheels.sh            # the framework's wheels + the benchmark anchors' (~25 MB)
# W&B is left out: the GPU check logs with logger=csv.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
fetch=../shared/device/wheels.sh
[ -x "$fetch" ] || fetch=/work/shared/device/wheels.sh
# the framework (setup.cfg's pins) and their missing dependencies
"$fetch" webdataset==1.0.2 braceexpand==0.1.7 hydra-core==1.3.8 omegaconf==2.3.1 tensorboardX==2.6.5 \
  ftfy==6.3.1 wcwidth pydantic pydantic-core annotated-types typing-inspection hjson py-cpuinfo nvidia-ml-py
# sdist-only: built here (deepspeed without its ops: they JIT-compile on the GPU when used)
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
# the anchors of eval.bench_train (open_clip, diffusers, DALLE2-pytorch) and their dependency chain
"$fetch" open_clip_torch==3.3.0 diffusers==0.42.1 dalle2-pytorch==1.15.6 importlib_metadata \
  lazy_loader kornia kornia_rs resize-right rotary-embedding-torch x-clip CoCa-pytorch vector-quantize-pytorch \
  einx frozendict loguru torch-einops-utils beartype pytorch-warmup ema-pytorch
du -sh .whl
