"""The project's Slurm scripts on a real local Slurm cluster (2 nodes on this machine, 8 GPUs each as Slurm sees
them; torch finds none, so training jobs run on CPUs with --gpus-per-node=0, as on a CPU cluster).

Needs root and `.ci/install_slurm.sh`; skipped otherwise. The cluster comes up once for
the module (well under 10 s). Jobs are submitted from the repo root, as users do, with
`--output` redirected to a temp folder so the repo gets no logs/.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import on_one_worker, run_cli  # noqa: E402
from slurm_cluster import ClusterInfo, can_run_slurm, slurm_cluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_OK, _WHY = can_run_slurm()
if not _OK and os.environ.get("FLOWERDIST_REQUIRE_SLURM"):  # .ci/run installed Slurm: a missing piece is a failure
    pytest.fail(f"FLOWERDIST_REQUIRE_SLURM is set but {_WHY}", pytrace=False)
# one cluster, on one pytest-xdist worker (`make test` runs two; --dist loadgroup keeps the group together)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _OK, reason=_WHY), pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pytestconfig) -> ClusterInfo:
    on_one_worker(tmp_path_factory, pytestconfig, "slurm")
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=2) as info:
        yield info


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "flowers"
    run_cli("data", "synth", "--out", out, "--per-class", "8", "--size", "64", "--seed", "0")
    return out


SCRIPT = "slurm/train.sbatch"
CPUS = "--gpus-per-node=0"  # what a CPU cluster's user adds to the sbatch line


def _run_job(cluster: ClusterInfo, tmp: Path, script: str, args: list[str], env: dict[str, str],
             sbatch_args: list[str] = (), timeout: float = 600) -> tuple[dict[str, str], str]:
    job = cluster.submit(script, args, env=env, cwd=REPO,
                         sbatch_args=[f"--output={tmp}/%x-%j.out", *sbatch_args])
    try:
        info = cluster.wait_job(job, timeout)
    except TimeoutError:
        subprocess.run(["scancel", job], env=cluster.env)
        raise
    log = Path(info["StdOut"]).read_text(errors="replace") if Path(info.get("StdOut", "")).is_file() else ""
    return info, log


def _describe(info: dict[str, str], log: str, cluster: ClusterInfo) -> str:
    return (f"JobState={info.get('JobState')} ExitCode={info.get('ExitCode')} Reason={info.get('Reason')}\n"
            f"--- job log (tail) ---\n{log[-6000:]}\n{cluster.logs(20)}")


def test_cluster_two_node_job(cluster: ClusterInfo, tmp_path: Path) -> None:
    """No training: separates cluster problems from training problems."""
    script = tmp_path / "nodes.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo \"node=$SLURMD_NODENAME nodeid=$SLURM_NODEID\"'\n")
    info, log = _run_job(cluster, tmp_path, str(script), [], {},
                         ["--nodes=2", "--ntasks-per-node=1", "--job-name=nodes"], timeout=60)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _describe(info, log, cluster)
    assert set(re.findall(r"nodeid=(\d)", log)) == {"0", "1"}, log
    assert set(re.findall(r"node=(node\d)", log)) == {"node1", "node2"}, log


def _listen(port: int = 0) -> socket.socket:
    """Hold a port the way another job's rendezvous would."""
    s = socket.socket()
    s.bind(("", port))
    s.listen()
    return s


def test_busy_rendezvous_port_fails_fast_in_one_line(cluster: ClusterInfo, synth_data: Path, tmp_path: Path) -> None:
    with _listen() as busy:
        port = busy.getsockname()[1]
        env = {"FLOWERDIST_PROCS_PER_NODE": "2", "FLOWERDIST_PORT": str(port)}
        info, log = _run_job(cluster, tmp_path, SCRIPT, ["configs/quickstart.yaml", f"data.root={synth_data}"], env, [CPUS], timeout=60)
    why = _describe(info, log, cluster)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", why
    assert f"rendezvous port FLOWERDIST_PORT={port} on " in log and "is busy; choose a free port" in log, why
    assert "accelerate launch" not in log and "Traceback" not in log, why


def _next_job_id(cluster: ClusterInfo, tmp: Path) -> int:
    script = tmp / "true.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    job = cluster.submit(str(script), [], env={}, cwd=REPO, sbatch_args=[f"--output={tmp}/true-%j.out"])
    cluster.wait_job(job, 60)
    return int(job) + 1


@pytest.mark.parametrize("procs_per_node, nodes", [(2, 1), (1, 2)], ids=["1node-x-2procs", "2nodes-x-1proc"])
def test_training_job(cluster: ClusterInfo, synth_data: Path, tmp_path: Path, procs_per_node: int, nodes: int) -> None:
    """CPU jobs (--gpus-per-node=0 picks the CPU path) on one node and on two. FLOWERDIST_MIXED_PRECISION is an
    override before the user's own words: bf16 on one node, and on two the user's train.mixed_precision=no wins."""
    run_dir = tmp_path / "run"
    env = {"FLOWERDIST_PROCS_PER_NODE": str(procs_per_node), "WANDB_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "FLOWERDIST_MIXED_PRECISION": "bf16"}
    precision = "bf16" if nodes == 1 else "no"
    script, sbatch = SCRIPT, [CPUS, f"--nodes={nodes}"]
    # 40 images: small batches so each of the 2 ranks gets whole optimizer steps.
    args = ["configs/quickstart.yaml", "train.epochs=1", f"data.root={synth_data}",
            f"train.output_dir={run_dir}", "log.wandb=offline",
            "data.batch_size=4", "data.image_size=64", "data.num_workers=0", *(["train.mixed_precision=no"] if nodes > 1 else [])]
    if nodes == 1:  # another job holds the port this job derives from its id: it must move to a free one
        derived = 20000 + _next_job_id(cluster, tmp_path) % 20000
        with _listen(derived):
            info, log = _run_job(cluster, tmp_path, script, args, env, sbatch)
        assert f"rendezvous port {derived} on " in log and "is busy; using port" in log, _describe(info, log, cluster)
    else:
        info, log = _run_job(cluster, tmp_path, script, args, env, sbatch)
    why = _describe(info, log, cluster)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", why
    assert info["NumNodes"] == str(nodes), why
    assert "world_size=2" in log and f"{nodes} node(s) x {procs_per_node} process(es) (cpu)" in log, why
    # Each node's launcher must get its own rank (all-rank-0 is the classic trap).
    assert set(re.findall(r"machine_rank=(\d+)", log)) == {str(r) for r in range(nodes)}, why
    assert run_dir.is_dir(), why
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").is_file(), why
    assert f"train.mixed_precision={precision}, run " in log and f"mixed_precision={precision} " in log, why
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["mixed_precision"] == precision, why
    # One W&B run for the job, written by rank 0, grouped by the Slurm job and knowing its shape.
    from wandb_offline import read_run

    run = read_run(run_dir)
    assert run["config"]["slurm_job_id"] == info["JobId"] and run["group"] == f"slurm-{info['JobId']}", run
    assert run["config"]["world_size"] == 2 and run["config"]["num_machines"] == nodes, run["config"]


def test_preempted_job_requeues_resumes_and_matches(cluster: ClusterInfo, tiny_data: Path, tmp_path: Path, uninterrupted) -> None:
    """USR1 to the batch shell (what --signal=B:USR1@120 sends before a limit): the ranks checkpoint,
    the job is requeued, resumes by itself and ends with the uninterrupted run's weights."""
    import json
    import time

    import torch
    from safetensors.torch import load_file

    from conftest import batch, resume_args

    ref = uninterrupted(2)  # the resume tests' 2-process reference run
    run_dir = tmp_path / "run"
    _, config, *overrides = resume_args(tiny_data, run_dir, batch(2))
    env = {"FLOWERDIST_PROCS_PER_NODE": "2", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_DIR": str(tmp_path)}
    job = cluster.submit(SCRIPT, [config, *overrides], env=env, cwd=REPO, sbatch_args=[f"--output={tmp_path}/%x-%j.out", CPUS])
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.is_file() and max((json.loads(l)["step"] for l in metrics.read_text().splitlines() if l), default=0) >= 6:
            break
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True)
    info = cluster.wait_job(job, 400)
    log = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("*.out"))
    why = _describe(info, log, cluster)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, why
    assert "requeueing job" in log and "stopped by a signal at step" in log and "resuming from" in log, why
    assert "(epoch 0, step" in log or "(epoch 1, step" in log or "(epoch 2, step" in log, why  # resumed mid-run
    a = load_file(ref / "checkpoints" / "last" / "model.safetensors")
    b = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), why


def test_preempted_on_two_nodes_resumes_on_one(cluster: ClusterInfo, tiny_data: Path, tmp_path: Path) -> None:
    """2 nodes x 1 process, preempted (USR1), then resubmitted on 1 node x 1 process under the same FLOWERDIST_RUN
    (nothing else names the run directory): the resubmission continues the run, the accumulation keeps the global
    batch, and the run ends with the uninterrupted 2-process run's weights."""
    import json
    import time

    from safetensors.torch import load_file

    from conftest import LAYOUT_RUN, assert_same_weights, finished, samples_per_step, start, train_args

    run_dir, ref = tmp_path / "run", tmp_path / "ref"
    args = [a for a in train_args(tiny_data, run_dir, *LAYOUT_RUN, "train.max_steps=30", "train.checkpoint_every=0")[1:]  # drop -c
            if not a.startswith("train.output_dir=")]
    env = {"FLOWERDIST_RUN": str(run_dir), "FLOWERDIST_PROCS_PER_NODE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    job = cluster.submit(SCRIPT, args, env=env, cwd=REPO, sbatch_args=["--nodes=2", CPUS, f"--output={tmp_path}/%x-%j.out"])
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and max((json.loads(l)["step"] for l in metrics.read_text().splitlines() if l) if metrics.is_file() else [0], default=0) < 3:
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True)
    while time.monotonic() < deadline and not list((run_dir / "checkpoints").glob("step-*")):
        time.sleep(0.1)
    while time.monotonic() < deadline:  # the ranks exit after their checkpoint and the batch shell requeues the job
        state = subprocess.run(["scontrol", "show", "job", "-o", job], env=cluster.env, capture_output=True, text=True).stdout
        if "Restarts=1" in state or "JobState=PENDING" in state:
            break
        time.sleep(0.1)
    subprocess.run(["scancel", job], env=cluster.env, check=True)  # ...which this test resubmits on 1 node instead
    (stopped,) = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    assert 3 <= stopped < 30
    end = f"train.max_steps={stopped + 2}"
    reference = start(2, train_args(tiny_data, ref, *LAYOUT_RUN, end, "train.checkpoint_every=0"), threads=1)
    info, log = _run_job(cluster, tmp_path, SCRIPT, [*args, end], env, [CPUS])
    finished(reference)
    why = _describe(info, log, cluster)
    assert info["JobState"] == "COMPLETED", why
    assert f"run {run_dir}" in log and "resuming from" in log, why
    assert "world_size=1" in log and "train.grad_accum_steps=2 keeps the global batch 8 = 4 per device x 1 processes x 2" in log, why
    assert samples_per_step(run_dir) == samples_per_step(ref)
    assert_same_weights(load_file(run_dir / "checkpoints" / "last" / "model.safetensors"),
                        load_file(ref / "checkpoints" / "last" / "model.safetensors"))


def test_sweep_submits_one_job_array_and_skips_done_cells(cluster: ClusterInfo, tiny_data: Path, tmp_path: Path) -> None:
    """`flowerdist sweep FILE --slurm`: one array, a task per cell, each an ordinary run directory; a second
    submission finds every cell done and submits nothing."""
    import json
    import time

    import yaml
    from conftest import sweep_file

    path = sweep_file(tmp_path, tiny_data, overrides=[f"data.root={tiny_data}", "data.synthetic=false", "data.image_size=32",
                                                       "data.batch_size=16", "log.wandb=disabled", "log.progress=false", "train.epochs=1",
                                                       "train.cpu=true"])  # CPU cells: the array asks for no GPUs
    env = {**cluster.env, "FLOWERDIST_PROCS_PER_NODE": "1", "HF_HUB_OFFLINE": "1"}
    sweep = [sys.executable, "-m", "flowerdist", "sweep", str(path), "--slurm"]
    out = subprocess.run(sweep, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    submitted = json.loads(out.stdout.strip().splitlines()[-1])
    assert submitted["cells"] == ["0", "1"], out.stdout
    cells = [tmp_path / "sweep" / name for name in ("seed=0,lr=0.002", "seed=1,lr=0.002")]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all((c / "result.json").is_file() for c in cells):
        time.sleep(0.5)
    logs = sorted((tmp_path / "sweep" / "slurm-logs").glob("*.out"))
    why = "\n".join(p.read_text(errors="replace")[-3000:] for p in logs) + cluster.logs(20)
    assert all((c / "result.json").is_file() for c in cells), why
    assert len(logs) == 2 and all(f"_{i}.out" in p.name for i, p in enumerate(logs)), why  # task i = cell i
    assert [yaml.safe_load((c / "config.yaml").read_text())["train"]["seed"] for c in cells] == [0, 1], why
    again = subprocess.run(sweep, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to submit, every cell is done" in again.stdout, again.stdout + again.stderr
    assert not list((REPO / "logs").glob(f"*-{submitted['job']}_*"))  # the logs stay beside the cells, not in the repo
    state = subprocess.run(["scontrol", "show", "job", "-o", submitted["job"]], env=cluster.env, capture_output=True, text=True).stdout
    assert "gres:gpu:0" in state or "TresPerNode" not in state, state  # no GPUs asked for


def test_gpu_jobs_ask_for_the_gpus_they_start_a_process_for(cluster: ClusterInfo, tiny_data: Path, tmp_path: Path) -> None:
    """A GPU sweep's array asks for the GPUs of slurm/train.sbatch (8, its one --gpus-per-node line), read back from
    slurmctld; the job starts one process per GPU it was given, and a command-line count replaces the default.
    This cluster's GPUs exist only for Slurm, so each job then stops in one line: torch sees none."""
    import json

    from conftest import sweep_file

    path = sweep_file(tmp_path, tiny_data, grid={"train.seed": [0]})
    env = {**cluster.env, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "flowerdist", "sweep", str(path), "--slurm"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    array = json.loads(out.stdout.strip().splitlines()[-1])["job"]
    jobs = [(array, tmp_path / "sweep" / "slurm-logs", 8)]
    other = cluster.submit(SCRIPT, ["configs/quickstart.yaml"], cwd=REPO, sbatch_args=[f"--output={tmp_path}/%x-%j.out", "--gpus-per-node=2"])
    jobs.append((other, tmp_path, 2))
    for job, logs, gpus in jobs:
        state = subprocess.run(["scontrol", "show", "job", "-o", job], env=cluster.env, capture_output=True, text=True).stdout
        assert f"TresPerNode=gres:gpu:{gpus}" in state, state
        info = cluster.wait_job(job, 120)
        log = "".join(p.read_text(errors="replace") for p in logs.glob(f"*{job}*.out"))
        why = _describe(info, log, cluster)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", why
        assert f"1 node(s) x {gpus} process(es) (gpu)" not in log  # it stops before launching anything...
        assert f"was given {gpus} GPU(s) on " in log and "but torch sees 0" in log and "Traceback" not in log, why
