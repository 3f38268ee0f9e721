#!/usr/bin/env bash
# The prepared GPU command: what a session lent a GPU runs, most valuable first, each step under its own
# timeout so one failure does not eat the rest. Writes $OUT/report.md (a section per step),
# $OUT/samples.png (the cascade's) and $OUT/check.tar.gz (logs/<step>.log with everything each step printed,
# the JSON rows, the cascade's report and probe): the device tool brings back at most 8 files from $OUT, so
# everything else travels in the archive, refreshed after every step. From the repository root:
#
#   bash launch/gpu_wheels.sh                      # here, first: fills .whl/ (carried to the GPU machine)
#   bash launch/gpu_check.sh                       # on the GPU machine (device tool: carry [".whl"])
#   bash launch/gpu_check.sh --steps bench,runs    # a subset (e.g. the second call of a session)
#   bash launch/gpu_check.sh --cpu                 # every step at tiny size on this CPU (CI runs this)
#   bash launch/gpu_check.sh --budget 440          # finish within 440 s of starting: each step's timeout is
#                                                  # cut to what is left (30 s kept for the report), a step
#                                                  # with under 5 s left is skipped (the device call's
#                                                  # timeout_s: ~20 s more than the budget)
#
# Steps (default order = value order; a session runs them in two calls, see launch/README.md):
#   tests     pytest -m gpu: preset=gpu_smoke end to end on the GPU, bf16 steps of every stage, flash
#             attention, ZeRO-2/3 and FSDP2 on one GPU, bitwise resume, data.embed, the EMA under a bf16
#             DeepSpeed engine, no host sync in the step (compiled vs eager is the compiled step's)
#   bench     python -m eval.bench_train: our stages at the anchors' shapes, eager
#   sync      python -m eval.bench_sync: the per-step agreement (all-reduce + host read, gradient check)
#   anchors   the same table for open_clip / diffusers / DALLE2-pytorch (eager), next to ours
#   layout    the UNet stages (decoder, 64 -> 256 upsampler) in channels_last, against bench's rows: whether
#             the memory format pays for our convolutions and GroupNorms (issue 28; training does not use it)
#   data      python -m eval.bench_data on the machine's cores: photo-like 256 px JPEGs -> 224 crops, ours and
#             plain webdataset + PIL, 1 and 12 workers, and the workers needed to feed bench's fastest CLIP
#   compiled  pytest's compiled vs eager test (its first compiles are the tier's slowest), then ours (regional)
#             and open_clip B/16 under torch.compile in bench_train: first step 1-3 min each
#   runs      a short real run of every stage from shards (bf16-mixed, GPU batch sizes), perf metrics
#   cascade   python -m train.pipeline preset=gpu: the one-GPU recipe end to end (<= 7 min), its benchmark
#             per category, samples.png (256 px) and the stage probe
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=0
steps="tests,bench,sync,anchors,layout,data,compiled,runs,cascade"
budget=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1 ;;
    --steps) steps="$2"; shift ;;
    --budget) budget="$2"; shift
      [[ "$budget" =~ ^[0-9]+$ ]] || { echo "--budget: expected whole seconds, got '$budget'" >&2; exit 2; } ;;
    *) echo "usage: bash launch/gpu_check.sh [--cpu] [--budget SECONDS] [--steps tests,bench,sync,anchors,layout,data,compiled,runs,cascade]" >&2; exit 2 ;;
  esac
  shift
done
for step in ${steps//,/ }; do
  case "$step" in
    tests|bench|sync|anchors|layout|data|compiled|runs|cascade) ;;
    *) echo "--steps: unknown step '$step' (expected tests, bench, sync, anchors, layout, data, compiled, runs, cascade)" >&2
       exit 2 ;;
  esac
done
OUT=${OUT:-outputs/gpu_check}
py=${PYTHON:-python3}   # the interpreter (the GPU image's python3; tests pass their own)

export WANDB_MODE=offline TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
# Datasets, checkpoints and run directories stay out of $OUT (it travels back from the device machine).
WORK=${WORK:-/tmp/unclip-gpu-check}
export UNCLIP_DATA_DIR="$WORK/datasets"
# Datasets are reused from call to call; run directories are new for each call, or a rerun (after a fix,
# on a machine still warm) would find the stages "already finished" and report the old results.
stamp=$(date -u +%Y%m%dT%H%M%S)
RUNS="$WORK/runs-$stamp" CASCADE="$WORK/cascade-$stamp"
# RES: everything this call writes (report.md, logs/, the JSON rows, cascade/); publish() puts the report,
# the samples and an archive of RES into $OUT.
RES="$WORK/check-$stamp"
mkdir -p "$OUT" "$RES/logs"
rows=$(mktemp) sections=$(mktemp)   # the report's two parts, joined by publish()

# ---- install what the machine lacks (carried wheels), into a private site dir
if ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/unclip-site .whl/*.whl \
    > "$RES/logs/install.log" 2>&1 || echo "wheel install failed: $RES/logs/install.log" >&2
  export PYTHONPATH="$PWD:/tmp/unclip-site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ $cpu = 1 ]; then
  export UNCLIP_TEST_DEVICE=cpu CUDA_VISIBLE_DEVICES=""
  bench_env=()
  T_TESTS=300 T_SYNC=60 SYNC_PARAMS=1e6 T_BENCH=120 T_ANCHORS=240 T_COMPILED=120 T_COMPILED_TESTS=120 T_RUNS=300 T_CASCADE=300 PRESET=gpu_smoke
  TB_CASCADE=240
  T_DATA=60 data_args=(--samples 96 --sizes 48 --crop 32 --workers 0 2 --batch 8)
  # the CLIP's bf16 steps (a transformer) stand for the five (each is 4-9 s of CI; the bench step steps all
  # five in bf16 here, the GPU runs all five tests); the compiled step's test runs with aot_eager (no
  # inductor C++ build)
  test_args=(-m gpu -k "not compiled_step and not decrease[prior] and not decrease[upsampler and not decrease[decoder]")
  bench_args=(--device cpu --size tiny --iters 2)
  T_LAYOUT=120 layout_cases=(--cases decoder)
  # every anchor at batch 2: "not installed" here (no torchvision); built and stepped by gpu_rehearse.sh
  anchor_cases=(--cases open_clip_b16,open_clip_l14,diffusers_unet64,dalle2_prior --batch 2)
  S=3 B_CLIP=16 B_PRIOR=16 B_DEC=8 B_UP=8 WORKERS=0
  RUN_STAGES='[clip,upsampler_1024]'  # a transformer and a UNet stage (the cascade step runs them all here)
  run_extra=(+clip.debug=fast +decoder.debug=fast +upsampler_256.debug=fast +upsampler_1024.debug=fast
    +prior.data.num_workers=0 +decoder.net.model_channels=16 +decoder.net.head_channels=16
    decoder.module.val_max_samples=4 upsampler_256.module.val_max_samples=4
    upsampler_1024.module.val_max_samples=4 +prior.module.sample_steps=4)
else
  T_TESTS=200 T_SYNC=30 SYNC_PARAMS=400e6 T_BENCH=90 T_ANCHORS=120 T_COMPILED=300 T_COMPILED_TESTS=150 T_RUNS=240 T_CASCADE=540 PRESET=gpu
  TB_CASCADE=420   # issue 26: the cascade in at most 7 minutes
  # the bench steps build case after case in one process: grow the allocator's segments rather than cut
  # new ones, so a case near the card's memory (ViT-L/14 at 256 needs ~76 GB by launch/plan.py; an H100
  # has 80) does not fail on what the cases before it left fragmented. Those steps only: the setting maps
  # memory through the driver's virtual-memory calls, untried on these machines, and the tests, the
  # cascade and the data step do not need it.
  bench_env=(env "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}")
  T_DATA=60 data_args=(--samples 16000 --sizes 256 --crop 224 --workers 1 12 --seconds 6)
  test_args=(-m gpu -k "not compiled_step")   # the compiled step runs that one
  bench_args=(--size anchor)
  T_LAYOUT=90 layout_cases=(--cases decoder,upsampler_256)
  anchor_cases=(--cases open_clip_b16,open_clip_l14,diffusers_unet64,dalle2_prior)
  S=100 B_CLIP=512 B_PRIOR=1024 B_DEC=256 B_UP=128 WORKERS=8
  RUN_STAGES='[clip,embed,prior,decoder,upsampler_256,upsampler_1024]'
  run_extra=()
fi

{
  echo "# GPU check: $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  BENCH_ALLOC="${bench_env[1]:-}" $py - <<'EOF' 2>&1
import os, platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU mode)"
alloc = os.environ["BENCH_ALLOC"].partition("=")[2] or "default"
memory = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal:")), "0")
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {gpu}, "
      f"allocator of the bench, anchors, layout and compiled steps: {alloc}, host memory now {int(memory) / 2**20:.0f} GiB")
EOF
  echo
  echo "| step | exit | seconds | host memory in use, peak GiB | disk free, least GiB |"
  echo "|---|---|---|---|---|"
} > "$rows"

# ---- host watch: every 2 s, the machine's memory in use (MemTotal - MemAvailable) and the disk free under
# $WORK go to logs/host.log (epoch s, kB in use, kB available, kB free), and each step's row gets its peak
# and least. A step that uses all but HOST_MIN_MEM_GIB of the machine's HOST_MEM_GIB, or leaves under
# HOST_MIN_DISK_GIB of disk free, is interrupted as its timeout would (INT to its process group, KILL 20 s
# later), its row says so, and the next step runs: one step must not take the device machine down with the
# other steps' results (the first device call of 2026-12-05 "stopped answering" and brought nothing back,
# cause unknown). HOST_MEM_GIB: the device kinds' 128 GiB, or MemTotal where larger; not MemTotal itself,
# which on a Firecracker machine starts far lower and grows as memory is used (the device library's H200.md).
HOST_MIN_MEM_GIB=${HOST_MIN_MEM_GIB:-4} HOST_MIN_DISK_GIB=${HOST_MIN_DISK_GIB:-2}
HOST_MEM_GIB=${HOST_MEM_GIB:-$(awk '/^MemTotal:/ {g = int($2 / 1048576); print (g > 128 ? g : 128)}' /proc/meminfo 2>/dev/null)}
HOST_MEM_GIB=${HOST_MEM_GIB:-128}
host_sample() {
  local total avail disk
  total=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null) total=${total:-0}
  avail=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null) avail=${avail:-$total}   # kB
  disk=$(df -Pk "$WORK" 2>/dev/null | awk 'NR == 2 {print $4}') disk=${disk:-0}
  [ "$total" -gt 0 ] && [ "$disk" -gt 0 ] || return 0   # a machine without these: no watch, no figures
  echo "$(date +%s) $((total - avail)) $avail $disk" >> "$RES/logs/host.log"
  if [ -f "$RES/.step" ] && { { [ "$avail" -lt $((HOST_MIN_MEM_GIB * 1048576)) ] &&
                                [ $((total - avail)) -ge $(((HOST_MEM_GIB - HOST_MIN_MEM_GIB) * 1048576)) ]; } ||
                              [ "$disk" -lt $((HOST_MIN_DISK_GIB * 1048576)) ]; }; then
    local pid step; read -r pid step < "$RES/.step"; rm -f "$RES/.step"
    echo "host: $((avail / 1048576)) GiB of memory available, $((disk / 1048576)) GiB of disk free" > "$RES/.interrupted"
    kill -INT "$pid" 2>/dev/null   # timeout passes it to the step's process group, and KILLs 20 s later
  fi
}
# the watcher stops with this script, killed or not (it holds no pipe of ours: a caller waiting for our
# output would otherwise wait for it too)
( while kill -0 $$ 2>/dev/null; do host_sample; sleep 2; done ) > /dev/null 2>&1 &
watcher=$!
trap 'kill $watcher 2>/dev/null' EXIT
# host_peak EPOCH: "peak GiB in use | least GiB free" since EPOCH
host_peak() {
  [ -f "$RES/logs/host.log" ] || { echo "- | -"; return; }
  awk -v t0="$1" '$1 >= t0 { if ($2 > m) m = $2; if (d == "" || $4 < d) d = $4 }
    END { if (d == "") print "- | -"; else printf "%.1f | %.1f\n", m / 1048576, d / 1048576 }' "$RES/logs/host.log"
}

# earlier: the results directories of this machine's earlier calls, newest first
earlier() { ls -dt "$WORK"/check-* 2>/dev/null | grep -vxF "$RES"; }

# publish: RES/report.md = the step rows, each finished step's section and issue 28's targets from the rows
# so far (python -m eval.targets, with the rows of this machine's earlier calls behind this call's: a
# session's second call is judged with its first call's benchmark); then $OUT gets report.md, samples.png
# and check.tar.gz (all of RES).
# Run after every step, so a call cut short still brings back what its finished steps measured.
publish() {
  { cat "$rows" "$sections"; echo; echo "## Targets"; echo; $py -m eval.targets "$RES" $(earlier) 2>&1
    echo; echo "Everything: check.tar.gz beside this report (logs/<step>.log, the JSON rows, cascade/); here: $RES"
  } > "$RES/report.md"
  cp "$RES/report.md" "$OUT/report.md"
  [ -f "$RES/cascade/samples.png" ] && cp "$RES/cascade/samples.png" "$OUT/samples.png"
  tar -czf "$OUT/check.tar.gz.part" -C "$RES" . && mv "$OUT/check.tar.gz.part" "$OUT/check.tar.gz"
}

# step_limit TIMEOUT: the step's timeout, cut with --budget to what the budget leaves (less 30 s: the INT -> KILL
# grace of 20 s, copying and the report)
step_limit() {
  local t=$1
  [ -n "$budget" ] && [ $((budget - SECONDS - 30)) -lt "$t" ] && t=$((budget - SECONDS - 30))
  echo "$t"
}

# run STEP TIMEOUT CMD...: log to $RES/logs/STEP.log, a status row in the report, keep going. A step with
# under 5 s left of the budget does not start.
run() {
  local step=$1 limit; limit=$(step_limit "$2"); shift 2
  local start=$SECONDS rc
  if [ -n "$budget" ]; then
    if [ "$limit" -lt 5 ]; then
      echo "| $step | skipped (budget: ${budget} s) | 0 | - | - |" >> "$rows"
      echo "skipped: $((budget - SECONDS)) s of the ${budget} s budget left" > "$RES/logs/$step.log"
      echo "== $step: skipped, $((budget - SECONDS)) s of the ${budget} s budget left" >&2
      return 0
    fi
  fi
  echo "== $step (timeout ${limit}s): $*" >&2
  local t0 pid; t0=$(date +%s)
  host_sample
  # in the background, so that the host watch can interrupt it (the shell makes a background command ignore
  # SIGINT; timeout handles it, so the step it starts gets the default back)
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$RES/logs/$step.log" 2>&1 &
  pid=$!
  echo "$pid $step" > "$RES/.step"
  wait $pid
  rc=$?
  rm -f "$RES/.step"
  host_sample
  [ $rc = 124 ] && rc="124 (timed out)"
  if [ -f "$RES/.interrupted" ]; then
    rc="$rc (interrupted: $(cat "$RES/.interrupted"))"
    rm -f "$RES/.interrupted"
  fi
  echo "| $step | $rc | $((SECONDS - start)) | $(host_peak "$t0") |" >> "$rows"
  echo "== $step: exit $rc after $((SECONDS - start)) s" >&2
}

# section TITLE STEP PATTERN: the lines of a step's log that match PATTERN, under a heading
section() {
  { echo; echo "## $1"; echo; grep -E "$3" "$RES/logs/$2.log" || echo "(nothing: see logs/$2.log)"; } >> "$sections"
}

for step in ${steps//,/ }; do
  case "$step" in
    tests)
      # -v: a line per test as it ends, so a step cut at its limit still says which tests passed
      run tests "$T_TESTS" $py -m pytest -p no:cacheprovider -v -rfEs "${test_args[@]}" tests/test_gpu.py
      section "GPU tests (pytest -m gpu)" tests '(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|error' ;;
    bench)
      # ours only: the anchors are the anchors step's (without --cases, --size anchor runs them here too)
      run bench "$T_BENCH" "${bench_env[@]}" $py -m eval.bench_train "${bench_args[@]}" --cases ours --json "$RES/bench.json"
      section "Training step, ours (python -m eval.bench_train ${bench_args[*]} --cases ours)" bench '^[#|]' ;;
    sync)
      run sync "$T_SYNC" $py -m eval.bench_sync --params "$SYNC_PARAMS"
      section "Per-step agreement cost (python -m eval.bench_sync --params $SYNC_PARAMS)" sync '^[#|]' ;;
    anchors)
      run anchors "$T_ANCHORS" "${bench_env[@]}" $py -m eval.bench_train "${bench_args[@]}" "${anchor_cases[@]}" \
        --json "$RES/anchors.json"
      section "Training step, what users run instead" anchors '^[#|]' ;;
    layout)
      run layout "$T_LAYOUT" "${bench_env[@]}" $py -m eval.bench_train "${bench_args[@]}" "${layout_cases[@]}" --channels-last \
        --json "$RES/layout.json"
      section "Training step, UNets in channels_last (against the bench step's rows)" layout '^[#|]' ;;
    data)
      # the target: bench's fastest CLIP case (samples/s of one GPU), else issue 28's 1.2x open_clip compiled
      target=$($py -m eval.targets --data-target "$RES" $(earlier))
      run data "$T_DATA" $py -m eval.bench_data --content photo "${data_args[@]}" --baseline \
        --target "${target:-3348}" --dir "$WORK/bench_data" --json "$RES/data.json"
      section "Data loading on this machine's cores (python -m eval.bench_data --content photo ${data_args[*]})" \
        data '^\||workers ->' ;;
    compiled)
      # on CPU without inductor: its C++ build is ~30 s of CI and says nothing of the GPU's Triton kernels
      # (and the test's CLIP case only: the decoder's is 7 s of CI, and its UNet compiles regionally in
      # tests/test_perf.py's aot_eager test)
      if [ $cpu = 1 ]; then cases=(--cases clip --compile-backend aot_eager); compiled_k="compiled_step and clip"
      else cases=(--cases clip_b16,decoder,prior,open_clip_b16); compiled_k=compiled_step; fi
      [ $cpu = 1 ] && export UNCLIP_TEST_COMPILE_BACKEND=aot_eager
      run compiled-tests "$T_COMPILED_TESTS" $py -m pytest -p no:cacheprovider -v -rfEs -m gpu -k "$compiled_k" \
        tests/test_gpu.py
      section "Compiled vs eager (pytest -m gpu -k compiled_step)" compiled-tests '(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|error'
      run compiled "$T_COMPILED" "${bench_env[@]}" $py -m eval.bench_train "${bench_args[@]}" "${cases[@]}" --compile regional \
        --json "$RES/compiled.json"
      section "Training step, torch.compile regional" compiled '^[#|]' ;;
    runs)
      run runs "$T_RUNS" $py -m train.pipeline "out_dir=$RUNS" \
        "stages=$RUN_STAGES" \
        +clip.data.global_batch_size=$B_CLIP +prior.data.global_batch_size=$B_PRIOR \
        +decoder.data.global_batch_size=$B_DEC +upsampler_256.data.global_batch_size=$B_UP \
        +upsampler_1024.data.global_batch_size=$B_UP \
        "+clip.data.num_workers=$WORKERS" "+decoder.data.num_workers=$WORKERS" \
        "+upsampler_256.data.num_workers=$WORKERS" "+upsampler_1024.data.num_workers=$WORKERS" \
        clip.trainer.max_steps=$S clip.trainer.val_check_interval=$S \
        prior.trainer.max_steps=$S prior.trainer.val_check_interval=$S \
        decoder.trainer.max_steps=$S decoder.trainer.val_check_interval=$S \
        upsampler_256.trainer.max_steps=$S upsampler_256.trainer.val_check_interval=$S \
        upsampler_1024.trainer.max_steps=$S upsampler_1024.trainer.val_check_interval=$S \
        "${run_extra[@]}"
      cp "$RUNS/report.json" "$RES/runs_report.json" 2>/dev/null
      [ -f "$RUNS/report.json" ] && $py - "$RUNS/report.json" >> "$RES/logs/runs.log" 2>&1 <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
keys = ("trainer/global_step", "seconds", "perf/samples_per_sec", "perf/tflops_per_device", "perf/mfu",
        "perf/data_wait_frac", "perf/max_memory_gb", "train/loss")
print("RUNS | stage | " + " | ".join(keys) + " |")
print("RUNS |---|" + "---|" * len(keys))
for stage in ("clip", "prior", "decoder", "upsampler_256", "upsampler_1024"):
    m = dict(report.get(stage, {}))
    m["seconds"] = m.get(f"{stage}/seconds")
    cells = [f"{m[k]:.4g}" if isinstance(m.get(k), (int, float)) else "-" for k in keys]
    print(f"RUNS | {stage} | " + " | ".join(cells) + " |")
EOF
      sed -i 's/^RUNS //' "$RES/logs/runs.log"
      section "Short real runs from shards (python -m train.pipeline, $S steps per stage)" runs '^\|' ;;
    cascade)
      # the pipeline's time_budget (preset=gpu: 420 s) cut to fit this step's limit, less 40 s for the process
      # start and the sample stage's overrun, so the cascade reaches `sample` inside the device call
      tb=$(($(step_limit "$T_CASCADE") - 40)); [ $tb -gt $TB_CASCADE ] && tb=$TB_CASCADE; [ $tb -lt 1 ] && tb=1
      run cascade "$T_CASCADE" $py -m train.pipeline preset=$PRESET "out_dir=$CASCADE" time_budget=$tb
      mkdir -p "$RES/cascade"
      for f in report.md report.json samples.png sample/probe.md sample/benchmark.json; do
        [ -f "$CASCADE/$f" ] && cp "$CASCADE/$f" "$RES/cascade/"
      done
      if [ -f "$RES/cascade/report.json" ]; then
        $py - "$RES/cascade/report.json" >> "$RES/logs/cascade.log" 2>&1 <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
print("CASCADE | stage | seconds | steps (allotted s) | key figures |")
print("CASCADE |---|---|---|---|")
keys = {"clip": ("val/zeroshot_shape_top1", "val/zeroshot_colour_top1", "val/zeroshot_count_top1"),
        "prior": ("val/cos_pred_image", "val/cos_text_image"), "decoder": ("val/colour_match",),
        "upsampler_256": ("val/psnr", "val/psnr_bicubic")}
for stage in ("clip", "embed", "prior", "decoder", "upsampler_256", "sample"):
    m = report.get(stage, {})
    secs = m.get(f"{stage}/seconds", m.get("embed/seconds", m.get("bench/seconds")))
    shown = [f"{k.split('/')[-1]} {m[k]:.3f}" for k in keys.get(stage, ()) if k in m]
    if stage == "sample":
        shown = [f"{k[6:]} {v:.3f}" for k, v in sorted(m.items())
                 if k.startswith("bench/") and k.endswith(("colour_shape", "/count", "/correct", "objects_swapped", "clip_score"))]
    steps = m.get("trainer/global_step")
    allotted = m.get(f"{stage}/seconds_allotted")
    ran = "-" if steps is None else f"{steps:.0f}" + ("" if allotted is None else f" ({allotted:.0f})")
    print(f"CASCADE | {stage} | {'-' if secs is None else round(secs)} | {ran} | {', '.join(shown)} |")
lever = {k[6:]: v for k, v in report.get("sample", {}).items() if k.startswith("lever/")}
if lever:  # sample.lever: the same benchmark with one setting changed
    shown = [f"{k[6:]} {v:.3f}" for k, v in sorted(lever.items()) if k.endswith(("colour_shape", "/count", "/correct", "objects_swapped"))]
    print(f"CASCADE | lever (sample.lever) | - | - | {', '.join(shown)} |")
EOF
        sed -i 's/^CASCADE //' "$RES/logs/cascade.log"
      fi
      section "The one-GPU cascade (python -m train.pipeline preset=$PRESET; samples: cascade/samples.png)" \
        cascade '^\|' ;;
  esac
  publish
done
publish
rm -f "$rows" "$sections"
cat "$OUT/report.md"
