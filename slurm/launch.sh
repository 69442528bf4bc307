#!/usr/bin/env bash
# The body of slurm/train.sbatch.
#
#   launch.sh CONFIG [KEY=VALUE ...]            (in the batch step, on the head node)
#   launch.sh --sweep FILE [--variant V]        (a task of `flowerdist sweep FILE --slurm`'s job array)
#   launch.sh --on-node CONFIG [KEY=VALUE ...]  (what srun runs, once per node)
#
# The batch step works out what is the same on every node (head address, port,
# process counts) and exports it; srun then starts this script once per node, and
# each copy reads its OWN $SLURM_NODEID as --machine_rank. Evaluating the rank in
# the batch step instead would start every node as rank 0 (accelerate #2816).
#
# Environment knobs (sbatch passes the submitter's environment, --export=ALL):
#   FLOWERDIST_RUN=NAME|PATH         the run directory: runs/NAME (or PATH). Default runs/<config>-slurm-<job id>,
#                                    which a requeue keeps; name the run to resubmit it on another node count
#   FLOWERDIST_DEVICE=gpu|cpu        default gpu, or cpu when the job asked for no GPUs (--gpus-per-node=0);
#                                    cpu sets ACCELERATE_USE_CPU=1
#   FLOWERDIST_PROCS_PER_NODE=N      default: the GPUs the job was given on each node (cpu: 1)
#   FLOWERDIST_MIXED_PRECISION=P     train.mixed_precision=P (auto, no, fp16, bf16) before your KEY=VALUE
#                                    words, which win; default: the config's (auto picks per device)
#   FLOWERDIST_PORT=N                rendezvous port on the head node (default: derived
#                                    from the job id; moved to a free port if busy)
#   FLOWERDIST_ACCELERATE_CONFIG=F   accelerate config file (default: a minimal one
#                                    per node, so ~/.cache/huggingface/accelerate/
#                                    default_config.yaml is never picked up silently)
set -euo pipefail

die() { echo "flowerdist/slurm: $*" >&2; exit 2; }

on_node=0
if [ "${1:-}" = "--on-node" ]; then on_node=1; shift; fi
[ $# -ge 1 ] || die "usage: sbatch slurm/<script>.sbatch CONFIG [KEY=VALUE ...] (submit from the repo root)"
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job; submit with sbatch"

# sbatch runs a spooled copy of the batch script: the repo is found through the
# submit directory, which must be on a file system every node sees.
cd "$SLURM_SUBMIT_DIR"
[ -f .venv/bin/activate ] && source .venv/bin/activate

if [ "$on_node" = 0 ]; then
    if [ "$1" = "--sweep" ]; then
        # A task of the job array `flowerdist sweep FILE --slurm` submits: task i trains cell i
        # (its config and overrides, including its own run directory and train.resume=auto).
        [ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "--sweep runs as a job array task; submit with: flowerdist sweep FILE --slurm"
        shift
        cell=$(python -m flowerdist sweep "$@" --cell "$SLURM_ARRAY_TASK_ID") || exit 2
        read -ra cell_args <<<"$cell"
        set -- "${cell_args[@]}"
        echo "flowerdist/slurm: sweep cell $SLURM_ARRAY_TASK_ID: $*"
    fi
    config=$1; shift
    # --gpus-per-node=0 (or SBATCH_GPUS_PER_NODE=0) asks for no GPUs: the CPU path, unless told otherwise
    [ "${SLURM_GPUS_PER_NODE:-}" = 0 ] && default_device=cpu || default_device=gpu
    device=${FLOWERDIST_DEVICE:-$default_device}
    nnodes=${SLURM_NNODES:-1}

    # FLOWERDIST_MIXED_PRECISION is an override like any other, placed before the user's own.
    [ -n "${FLOWERDIST_MIXED_PRECISION:-}" ] && set -- "train.mixed_precision=$FLOWERDIST_MIXED_PRECISION" "$@"
    # Validate the config and overrides once, before any process starts, and read
    # the precision from it (for the log: flowerdist passes it to Accelerate itself). Only KEY=VALUE words are config overrides.
    overrides=()
    for a in "$@"; do [[ $a == *=* && $a != -* ]] && overrides+=("$a"); done
    mp=$(python - "$config" "${overrides[@]}" <<'PY'
import sys
try:
    from flowerdist.config import load_config
    print(load_config(sys.argv[1], sys.argv[2:]).train.mixed_precision)
except Exception as err:  # FlowerdistError carries the fix in its message
    sys.exit(f"flowerdist/slurm: {err}")
PY
) || exit 2

    case "$device" in
    cpu)
        export ACCELERATE_USE_CPU=1
        per_node=${FLOWERDIST_PROCS_PER_NODE:-1}
        ;;
    gpu)
        # The count asked for (--gpus-per-node); an --exclusive job may be given all of the node's, which
        # SLURM_GPUS_ON_NODE then counts: the user's count wins.
        given=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
        given=${given##*:}   # --gpus-per-node=a100:4 gives "a100:4"
        [ "${given:-0}" -ge 1 ] 2>/dev/null \
            || die "job $SLURM_JOB_ID was given no GPUs; slurm/train.sbatch asks for them with #SBATCH --gpus-per-node, so check that your sbatch line does not replace it with 0 (or run on CPUs: sbatch --gpus-per-node=0 with FLOWERDIST_PROCS_PER_NODE=N)"
        per_node=${FLOWERDIST_PROCS_PER_NODE:-$given}
        # The GPUs must also be usable by torch here, or every rank would fail later with a CUDA traceback.
        seen=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
        [ "$seen" -ge "$per_node" ] \
            || die "job $SLURM_JOB_ID was given $given GPU(s) on $(hostname) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}) but torch sees $seen; check the node's driver and that .venv has a CUDA build of torch"
        ;;
    *) die "FLOWERDIST_DEVICE must be gpu or cpu, not '$device'" ;;
    esac
    [[ $per_node =~ ^[1-9][0-9]*$ ]] || die "FLOWERDIST_PROCS_PER_NODE must be a positive integer, not '$per_node'"

    export FLOWERDIST_DEVICE=$device
    export FLOWERDIST_PROCS_PER_NODE=$per_node
    export FLOWERDIST_NUM_PROCESSES=$((per_node * nnodes))
    export FLOWERDIST_NUM_MACHINES=$nnodes
    export FLOWERDIST_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    # One port per job, so two jobs sharing a head node do not collide. This batch step runs on
    # the head node, so it can check the port: a busy one would otherwise fail every launcher with
    # torch's EADDRINUSE traceback. A port the user chose is theirs to fix; a derived one moves.
    port_free() { python -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", int(sys.argv[1])))' "$1" 2>/dev/null; }
    if [ -n "${FLOWERDIST_PORT:-}" ]; then
        port_free "$FLOWERDIST_PORT" \
            || die "rendezvous port FLOWERDIST_PORT=$FLOWERDIST_PORT on $(hostname) is busy; choose a free port or unset FLOWERDIST_PORT to derive one"
    else
        FLOWERDIST_PORT=$((20000 + SLURM_JOB_ID % 20000))
        if ! port_free "$FLOWERDIST_PORT"; then
            busy=$FLOWERDIST_PORT
            FLOWERDIST_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
            echo "flowerdist/slurm: rendezvous port $busy on $(hostname) is busy; using port $FLOWERDIST_PORT"
        fi
    fi
    export FLOWERDIST_PORT

    # The run directory: named after the job (a requeue keeps its id), or FLOWERDIST_RUN, which a resubmission on
    # another number of nodes names again to continue the same run.
    run=${FLOWERDIST_RUN:-$(basename "${config%.*}")-slurm-$SLURM_JOB_ID}
    [[ $run == */* ]] || run=runs/$run
    echo "flowerdist/slurm: job $SLURM_JOB_ID: $nnodes node(s) x $per_node process(es) ($device)," \
         "head $FLOWERDIST_HEAD:$FLOWERDIST_PORT, train.mixed_precision=$mp, run $run"
    # Preemption and time limits: `#SBATCH --signal=B:USR1@120` warns this batch shell; we pass
    # USR1 to every process of the job step (the training ranks checkpoint at their next log
    # step and exit), then requeue the job. The requeued job runs this script again with the
    # same arguments; `train.resume=auto` and the same run directory make it continue from that
    # checkpoint. (A user's own train.output_dir/train.resume come later on the command line and win.)
    preempted=0
    trap 'preempted=1; echo "flowerdist/slurm: signal received, asking the ranks to checkpoint"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1 TERM
    # One task per node; if one node's launcher dies, end the others instead of
    # leaving them waiting at the rendezvous until the time limit.
    srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash "$SLURM_SUBMIT_DIR/slurm/launch.sh" --on-node "$config" \
        "train.output_dir=$run" train.resume=auto "$@" &
    srun_pid=$!
    status=0
    # `wait` returns early when a trapped signal arrives: keep waiting for srun itself.
    while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" || status=$?; done
    if [ "$preempted" = 1 ]; then
        echo "flowerdist/slurm: requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1))); it resumes from its checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$status"
fi

# ---- from here on: once per node, under srun ----
rank=$SLURM_NODEID
total=$FLOWERDIST_NUM_PROCESSES

cfg=${FLOWERDIST_ACCELERATE_CONFIG:-}
if [ -z "$cfg" ]; then
    cfg=$(mktemp "${TMPDIR:-/tmp}/flowerdist-accelerate-XXXXXX.yaml")
    trap 'rm -f "$cfg"' EXIT
    # Precision is flowerdist's (train.mixed_precision, passed to its Accelerator); quoted 'no': YAML reads a bare no as false.
    printf "compute_environment: LOCAL_MACHINE\ndistributed_type: '%s'\nmixed_precision: 'no'\nuse_cpu: false\ndebug: false\n" \
        "$([ "$total" -gt 1 ] && echo MULTI_GPU || echo 'NO')" >"$cfg"
fi

args=(--config_file "$cfg" --num_processes "$total" --num_machines "$FLOWERDIST_NUM_MACHINES"
      --mixed_precision no --dynamo_backend no)
# --multi_gpu is also the CPU multi-process form: with ACCELERATE_USE_CPU=1 it runs
# gloo over torch's launcher. (--cpu --num_processes N silently starts ONE process.)
if [ "$total" -gt 1 ]; then
    args+=(--multi_gpu --machine_rank "$rank"
           --main_process_ip "$FLOWERDIST_HEAD" --main_process_port "$FLOWERDIST_PORT")
elif [ "$FLOWERDIST_DEVICE" = cpu ]; then
    args+=(--cpu)   # one process: accelerate's simple launcher resets ACCELERATE_USE_CPU from this flag
fi
# Share the node's CPUs among its processes (accelerate would otherwise use 1 thread each).
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then
    threads=$((SLURM_CPUS_ON_NODE / FLOWERDIST_PROCS_PER_NODE))
    args+=(--num_cpu_threads_per_process "$((threads > 0 ? threads : 1))")
fi

echo "flowerdist/slurm: $(hostname) node $SLURMD_NODENAME machine_rank=$rank: accelerate launch ${args[*]}"
# USR1 from the batch step reaches every process of this step: the training ranks handle it;
# this shell and the launcher must not die of it (the children re-install their own handler).
trap '' USR1
# Not exec: the EXIT trap removes the temporary accelerate config afterwards.
# Multi-node: an "Error waiting on exit barrier ... Failed to recv" traceback at the very
# end is torch's launcher noticing that the head's launcher (it hosts the store) exited
# first; torch logs it and exits 0. Real failures show up in the job's exit code.
# `python -m accelerate.commands.launch` is `accelerate launch` without the CLI's import of every other
# subcommand (its `estimate` imports timm and torchvision): 1.75 s to start instead of 4.9 s (measured on 2 cores).
python -m accelerate.commands.launch "${args[@]}" -m flowerdist train -c "$@"
