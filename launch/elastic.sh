#!/usr/bin/env bash
# Elastic training with PyTorch's own agent (torchrun): run this same command on every node, at least MIN
# and at most MAX of them. When a node dies (or one joins), the surviving agents restart their workers with
# the new world size; flowerdist resumes from the newest checkpoint of train.output_dir and keeps the global
# batch by deriving train.grad_accum_steps. Tested on one machine with two agents over loopback
# (tests/test_elastic.py).
#
#   HEAD=node1 MIN=1 MAX=4 GPUS=8 bash launch/elastic.sh configs/flowers/resnet50_gpu.yaml train.output_dir=runs/elastic
#
# - train.output_dir must be on storage every node sees, and the same on every node; train.resume=auto is added.
# - train.checkpoint_every bounds the work a lost node costs (steps since the last checkpoint); a ResNet-50
#   checkpoint (270 MiB with AdamW state) took 0.35 s to write here, so every few minutes is cheap.
# - train.dist_timeout_s bounds how long the survivors wait in a collective for a peer that will not answer;
#   a peer that died breaks its sockets, and the survivors notice at once.
# - The node at HEAD hosts the rendezvous store: it must outlive the job (prefer a stable login or head node).
# - LAST_CALL (torchrun's last_call_timeout, default 30 s): how long a rendezvous that has MIN nodes waits for more
#   before it starts. HEARTBEAT (torchrun's keep_alive_interval, default 5 s): a node that misses 3 heartbeats is
#   dropped from the rendezvous. Together they are most of the time from a node's death to training again
#   (measured here: 25 s with LAST_CALL=10 and the default heartbeat, 11.5 s with LAST_CALL=5 HEARTBEAT=1).
# - CPUs only: set ACCELERATE_USE_CPU=1 (gloo) and GPUS to the processes per node.
set -euo pipefail
config=${1:?usage: launch/elastic.sh CONFIG [KEY=VALUE ...]}; shift
exec torchrun --nnodes="${MIN:-1}:${MAX:-2}" --nproc-per-node="${GPUS:-1}" --max-restarts="${RESTARTS:-3}" \
    --rdzv-backend=c10d --rdzv-endpoint="${HEAD:-127.0.0.1}:${PORT:-29400}" --rdzv-id="${JOB:-flowerdist}" \
    --rdzv-conf="last_call_timeout=${LAST_CALL:-30},keep_alive_interval=${HEARTBEAT:-5}" \
    -m flowerdist train -c "$config" train.resume=auto "$@"
