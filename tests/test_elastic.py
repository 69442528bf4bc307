"""Elastic training with PyTorch's own agent: two torchrun "nodes" on this machine (c10d rendezvous over
loopback); one node dies mid-epoch, the other restarts its worker at world size 1, resumes from the
newest checkpoint with the derived accumulation, and finishes with the uninterrupted run's weights.

Two ways to host the rendezvous store, two nodes that may be lost: by default the HEAD agent hosts it and the
other node is lost; with a separate store (`flowerdist rendezvous-store`, STORE=...) the head itself, the agent of
rank 0, is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_same_weights, free_port, kill_tree, resume_args, samples_per_step, weights_of

pytestmark = pytest.mark.slow


def agent(port: int, train_args, log: Path, store: bool) -> subprocess.Popen:
    """One "node": the shipped launch/elastic.sh (torchrun, c10d rendezvous, 1 to 2 nodes of 1 process)."""
    where = {"STORE": f"127.0.0.1:{port}"} if store else {"HEAD": "127.0.0.1", "PORT": str(port)}
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **where, "MIN": "1", "MAX": "2", "GPUS": "1", "JOB": "flowerdist-elastic", "LAST_CALL": "5", "HEARTBEAT": "1"}
    assert train_args[0] == "-c"
    return subprocess.Popen(["bash", "launch/elastic.sh", *train_args[1:]], cwd=REPO, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def host_of(port: int, agents: list[subprocess.Popen]) -> subprocess.Popen:
    """The agent hosting the rendezvous store (the survivor must be that one)."""
    listening = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return next(a for a in agents if f"pid={a.pid}," in listening)


def steps_logged(run: Path) -> list[int]:
    """Logged steps; a line still being written (or rewritten by the resume) is skipped."""
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def start_store(port: int) -> subprocess.Popen:
    store = subprocess.Popen([sys.executable, "-m", "flowerdist", "rendezvous-store", "--host", "127.0.0.1", "--port", str(port)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert "rendezvous store on" in store.stdout.readline()
    return store


def rank0_agent(agents: list[subprocess.Popen], logs: list[Path]) -> subprocess.Popen:
    """The agent whose worker is rank 0 (only the main process prints the world line)."""
    return next(a for a, log in zip(agents, logs) if "flowerdist: world_size=2" in log.read_text())


@pytest.mark.parametrize("store", [False, True], ids=["head-hosts-the-store-other-node-lost", "separate-store-head-lost"])
def test_a_lost_node_restarts_at_world_size_one_and_finishes(tiny_data, tmp_path, uninterrupted, store):
    run, port = tmp_path / "elastic", free_port()
    args = resume_args(tiny_data, run, "data.batch_size=4", "train.dist_timeout_s=30", "log.wandb=disabled")
    server = start_store(port) if store else None
    logs = [tmp_path / f"agent{i}.log" for i in (0, 1)]
    agents = [agent(port, args, log, store) for log in logs]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (list((run / "checkpoints").glob("step-*")) and max(steps_logged(run) or [0]) >= 9):
            assert all(a.poll() is None for a in agents), "an agent ended before the node was lost"
            time.sleep(0.05)
        if store:  # the head: the node of rank 0, which also hosts the workers' own store
            lost = rank0_agent(agents, logs)
            survivor = next(a for a in agents if a is not lost)
        else:  # the store's host must survive: lose the other node
            survivor = host_of(port, agents)
            lost = next(a for a in agents if a is not survivor)
        survivor_log = tmp_path / f"agent{agents.index(survivor)}.log"
        killed = time.time()
        kill_tree(lost.pid)
        while time.time() < killed + 180 and "resuming from" not in survivor_log.read_text():  # printed as training restarts
            time.sleep(0.05)
        back_after = time.time() - killed
        assert survivor.wait(timeout=300) == 0, (tmp_path / "agent0.log").read_text()[-3000:] + (tmp_path / "agent1.log").read_text()[-3000:]
    finally:
        for a in agents + ([server] if server else []):
            kill_tree(a.pid)
    log = (tmp_path / f"agent{agents.index(survivor)}.log").read_text()
    first = (tmp_path / f"agent{agents.index(lost)}.log").read_text() + log  # rank 0 of the first round may be the lost node
    assert "world_size=2" in first and "world_size=1" in log and "resuming from" in log
    assert "train.grad_accum_steps=2 keeps the global batch 8 = 4 per device x 1 processes x 2" in log
    assert back_after < 30, back_after  # measured 11.5 s: 3 missed heartbeats of 1 s, a last call of 5 s, then the resume
    ref = uninterrupted(2)
    assert samples_per_step(run) == samples_per_step(ref)  # no image skipped or repeated
    assert_same_weights(weights_of(run), weights_of(ref))
    print(f"elastic: training again {back_after:.1f} s after the node was lost")


def test_without_gpus_the_default_process_count_is_refused_in_one_line(tmp_path):
    """GPUS defaults to every GPU torch sees; where it sees none, one line says what to set (not torchrun's traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "GPUS"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(["bash", "launch/elastic.sh", "configs/quickstart.yaml"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "torch sees no GPU" in proc.stderr and "set GPUS=N" in proc.stderr
