#!/usr/bin/env bash
# Run one stage under torchrun, on one node or several. Every node runs this same command.
#
#   launch/torchrun.sh stage=clip strategy=ddp [overrides...]                     # this machine, all GPUs
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=node0 launch/torchrun.sh stage=decoder strategy=deepspeed_zero2
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE  processes per node [the number of GPUs, or 1 without GPUs]
#   NNODES          nodes [1]
#   NODE_RANK       this node's index [0]
#   MASTER_ADDR     rendezvous host: node 0's address [127.0.0.1]
#   MASTER_PORT     rendezvous port [one node: a free port (torchrun --standalone); several: 29500]
#   RUN_ID          names the run directory and the rendezvous; identical on every node, so required
#                   with NNODES>1 [one node: unclip-<date>-<time>, a new run at each launch]
#   RUN_DIR         the run directory [outputs/torchrun/$RUN_ID]: rerunning with the same one resumes
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ "$NNODES" != 1 && -z "${RUN_ID:-}" ]]; then
    # a default made on each node (its clock) could differ between them: they would not meet
    echo "launch/torchrun.sh: NNODES=$NNODES needs RUN_ID, the same on every node (it names the rendezvous" \
         "and the run directory; rerunning with it resumes)" >&2
    exit 2
fi
# Each launch is a run of its own unless told otherwise (a name per day made a second launch that day
# resume the first one, another stage's checkpoint included).
RUN_ID=${RUN_ID:-unclip-$(date +%Y%m%d-%H%M%S)}
RUN_DIR=${RUN_DIR:-outputs/torchrun/$RUN_ID}
if [[ "$NNODES" == 1 && -z "${MASTER_PORT:-}" && -z "${MASTER_ADDR:-}" ]]; then
    # a free port: two launches on one machine (e.g. 4 GPUs each) never join each other's rendezvous
    rendezvous=(--standalone)
else
    rendezvous=(--rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
                --rdzv_id="$RUN_ID")
fi
echo "launch/torchrun.sh: run directory $RUN_DIR (RUN_DIR=$RUN_DIR resumes it)" >&2

# Every process composes the config itself: hydra.run.dir must be the same string everywhere (the
# default holds the start time). trainer.devices/num_nodes tell Lightning what torchrun started.
exec python -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK" "${rendezvous[@]}" \
    -m train.run trainer.devices="$NPROC_PER_NODE" trainer.num_nodes="$NNODES" \
    hydra.run.dir="$RUN_DIR" "$@"
