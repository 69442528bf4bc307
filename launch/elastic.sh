#!/usr/bin/env bash
# Elastic training with PyTorch's own agent (torchrun): run this same command on every node, at least MIN
# and at most MAX of them. When a node dies (or one joins), the surviving agents restart their workers with
# the new world size; flowerdist resumes from the newest checkpoint of train.output_dir and keeps the global
# batch by deriving train.grad_accum_steps. Tested on one machine with two agents over loopback
# (tests/test_elastic.py), losing either node.
#
#   HEAD=node1 MIN=1 MAX=4 bash launch/elastic.sh configs/flowers/resnet50_gpu.yaml train.output_dir=runs/elastic
#
# Which node may be lost:
# - By default the agent on HEAD hosts the rendezvous store: any node but HEAD may be lost; losing HEAD ends
#   the job (the store goes with it).
# - With STORE=HOST:PORT the store runs apart, on a machine that outlives the job (`flowerdist rendezvous-store
#   --port PORT` on a login or service node): then any node may be lost, HEAD included.
#       flowerdist rendezvous-store --port 29400                 # on the service node
#       STORE=service:29400 MIN=1 MAX=4 bash launch/elastic.sh CONFIG train.output_dir=runs/elastic   # every node
# Knobs:
# - GPUS: processes per node; default every GPU torch sees on the node. CPUs only: set ACCELERATE_USE_CPU=1
#   (gloo) and GPUS to the processes per node.
# - train.output_dir must be on storage every node sees, and the same on every node; train.resume=auto is added.
# - train.checkpoint_every bounds the work a lost node costs (steps since the last checkpoint); a ResNet-50
#   checkpoint (270 MiB with AdamW state) took 0.35 s to write here, so every few minutes is cheap.
# - train.dist_timeout_s bounds how long the survivors wait in a collective for a peer that will not answer;
#   a peer that died breaks its sockets, and the survivors notice at once.
# - LAST_CALL (torchrun's last_call_timeout, default 30 s): how long a rendezvous that has MIN nodes waits for more
#   before it starts. HEARTBEAT (torchrun's keep_alive_interval, default 5 s): a node that misses 3 heartbeats is
#   dropped from the rendezvous. Together they are most of the time from a node's death to training again
#   (measured here: 25 s with LAST_CALL=10 and the default heartbeat, 11.5 s with LAST_CALL=5 HEARTBEAT=1).
set -euo pipefail
config=${1:?usage: launch/elastic.sh CONFIG [KEY=VALUE ...]}; shift
gpus=${GPUS:-}
if [ -z "$gpus" ]; then
    gpus=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [ "$gpus" -lt 1 ]; then
        echo "launch/elastic.sh: torch sees no GPU on $(hostname); set GPUS=N processes per node (on CPUs also ACCELERATE_USE_CPU=1)" >&2
        exit 2
    fi
fi
if [ -n "${STORE:-}" ]; then
    endpoint=$STORE; host_store=is_host=false,   # every agent is a client of the separate store
else
    endpoint=${HEAD:-127.0.0.1}:${PORT:-29400}; host_store=
fi
exec torchrun --nnodes="${MIN:-1}:${MAX:-2}" --nproc-per-node="$gpus" --max-restarts="${RESTARTS:-3}" \
    --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="${JOB:-flowerdist}" \
    --rdzv-conf="${host_store}last_call_timeout=${LAST_CALL:-30},keep_alive_interval=${HEARTBEAT:-5}" \
    -m flowerdist train -c "$config" train.resume=auto "$@"
