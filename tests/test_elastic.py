"""Elastic training with PyTorch's own agent: two torchrun "nodes" on this machine (c10d rendezvous over
loopback); one node dies mid-epoch, the other restarts its worker at world size 1, resumes from the
newest checkpoint with the derived accumulation, and finishes with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, kill_tree, resume_args
from test_distributed import assert_same_weights
from test_layouts import samples_per_step, weights

pytestmark = pytest.mark.slow


def agent(port: int, train_args, log: Path) -> subprocess.Popen:
    """One "node": the shipped launch/elastic.sh (torchrun, c10d rendezvous, 1 to 2 nodes of 1 process)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HEAD": "127.0.0.1", "PORT": str(port), "MIN": "1", "MAX": "2", "GPUS": "1", "JOB": "flowerdist-elastic",
           "LAST_CALL": "5", "HEARTBEAT": "1"}
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


def test_a_lost_node_restarts_at_world_size_one_and_finishes(tiny_data, tmp_path, uninterrupted):
    run, port = tmp_path / "elastic", free_port()
    args = resume_args(tiny_data, run, "data.batch_size=4", "train.dist_timeout_s=30", "log.wandb=disabled")
    agents = [agent(port, args, tmp_path / f"agent{i}.log") for i in (0, 1)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (list((run / "checkpoints").glob("step-*")) and max(steps_logged(run) or [0]) >= 9):
            assert all(a.poll() is None for a in agents), "an agent ended before the node was lost"
            time.sleep(0.05)
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
        for a in agents:
            kill_tree(a.pid)
    log = (tmp_path / f"agent{agents.index(survivor)}.log").read_text()
    first = (tmp_path / f"agent{agents.index(lost)}.log").read_text() + log  # rank 0 of the first round may be the lost node
    assert "world_size=2" in first and "world_size=1" in log and "resuming from" in log
    assert "train.grad_accum_steps=2 keeps the global batch 8 = 4 per device x 1 processes x 2" in log
    assert back_after < 120, back_after  # bounded: a dead peer breaks the collective at once, the agent re-rendezvouses
    ref = uninterrupted(2)
    assert samples_per_step(run) == samples_per_step(ref)  # no image skipped or repeated
    assert_same_weights(weights(run), weights(ref))
    print(f"elastic: training again {back_after:.1f} s after the node was lost")
