"""Never lose a run: SIGKILL after a checkpoint, `train.resume=auto`, and the result is the
uninterrupted run's, bit for bit; metrics and W&B continue the same run."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, batch, launch, process_tree, resume_args as args, run_cli, running, start
from wandb_offline import history

pytestmark = pytest.mark.slow


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(l)["step"] for l in path.read_text().splitlines() if l.strip()]


def kill_after_a_checkpoint(proc, run_dir, rng):
    """SIGKILL the run at a random step after the first mid-epoch checkpoint: the process itself, or on several
    processes only the launcher (`kill -9` of accelerate launch), whose ranks must die with it."""
    target = rng.randint(8, 30)  # steps: the first checkpoint is at 7, an epoch has 20, the run 40
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
        if done and max(logged_steps(run_dir) or [0]) >= target:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    ranks = process_tree(proc.pid)[1:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while any(map(running, ranks)) and time.time() < deadline:
        time.sleep(0.02)
    assert not any(map(running, ranks)), "ranks went on training after their launcher was killed"
    return target


@pytest.mark.parametrize("nprocs", [2])  # one process: killed in test_layouts (1proc-then-2), resumed exactly in the SIGTERM test
def test_sigkill_then_resume_is_bit_identical(tiny_data, tmp_path, nprocs, uninterrupted):
    rng = random.Random(nprocs)
    ref, cut = uninterrupted(nprocs), tmp_path / "killed"
    extra = batch(nprocs)
    proc = start(nprocs, args(tiny_data, cut, extra))
    kill_after_a_checkpoint(proc, cut, rng)
    assert json.loads((cut / "checkpoints" / "last" / "meta.json").read_text())["step"] < 40  # killed mid-run
    out = launch(nprocs, *args(tiny_data, cut, extra, "train.resume=auto"))
    resumed_at = int(re.search(r"resuming from \S+ \(epoch \d+, step (\d+)\)", out.stdout).group(1))
    assert 7 <= resumed_at < 40  # from a mid-run checkpoint: every rank died with the kill, none trained on

    a = load_file(ref / "checkpoints" / "last" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    # metrics.jsonl: the same events, no gap, no duplicate step
    ref_lines = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
    cut_lines = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
    measured = ("per_s", "seconds", "data_wait", "peak_memory")  # timings and memory: measurements, not training
    strip = lambda rows: [{k: v for k, v in r.items() if not any(m in k for m in measured)} for r in rows]
    assert strip(cut_lines) == strip(ref_lines)
    # W&B: one run id over both segments; together they log every step, equal values where they overlap
    runs = sorted(cut.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and len({p.name for p in runs}) == 1, runs
    seen = {}
    for path in runs:
        for row in history(path):
            if "train/loss" in row:
                assert seen.setdefault(row["_step"], row["train/loss"]) == row["train/loss"]
    assert sorted(seen) == [r["step"] for r in ref_lines if "train/loss" in r]
    # keep_last: old training checkpoints were pruned
    assert len(list((cut / "checkpoints").glob("step-*"))) == 2


@pytest.mark.parametrize("nprocs, signum", [(1, signal.SIGTERM), (2, signal.SIGUSR1)], ids=["1proc-SIGTERM", "2procs-SIGUSR1"])
def test_signal_checkpoints_exits_3_and_resumes_exactly(tiny_data, tmp_path, nprocs, signum, uninterrupted):
    extra = batch(nprocs)
    ref, cut = uninterrupted(nprocs), tmp_path / "cut"
    proc = start(nprocs, args(tiny_data, cut, extra, "train.checkpoint_every=0"))
    deadline = time.time() + 300
    while max(logged_steps(cut) or [0]) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if nprocs == 1:
        os.kill(proc.pid, signum)
    else:  # every training process gets the signal (the workers are the launcher's children)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        for child in children:
            os.kill(int(child), signum)
    # one process exits with EXIT_PREEMPTED (3); under accelerate launch the workers do, and the
    # launcher reports their failure as 1
    assert proc.wait(timeout=120) == (3 if nprocs == 1 else 1)
    steps = sorted(int(p.name.split("-")[1]) for p in (cut / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < 40 and steps[-1] % 3 == 0  # saved at a log step mid-run
    launch(nprocs, *args(tiny_data, cut, extra, "train.checkpoint_every=0", "train.resume=auto"))
    a = load_file(ref / "checkpoints" / "last" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_hung_rank_ends_the_run_within_the_collective_timeout(tiny_data, tmp_path):
    """One of two ranks stops answering (SIGSTOP: a hung GPU or node, which torch's launcher cannot see as a failure):
    the other fails its next collective after train.dist_timeout_s (10 s here), not torch's default 30 minutes, and
    the run ends; nothing is left running. (A rank that dies outright is ended by the launcher itself.)"""
    run = tmp_path / "hangs"
    proc = start(2, args(tiny_data, run, "data.batch_size=4", "train.dist_timeout_s=10", "train.log_every=1"))
    deadline = time.time() + 300
    while max(logged_steps(run) or [0]) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    ranks = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGSTOP)
    hung = time.time()
    try:
        while running(ranks[0]) and time.time() < hung + 60:
            time.sleep(0.05)
        waited = time.time() - hung
        assert not running(ranks[0]), "the other rank is still waiting for the hung one"
        assert 8 < waited < 40, waited  # the 10 s timeout (with gloo's own slack), far below 30 minutes
    finally:
        for pid in [proc.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    left = process_tree(ranks[0]) + [ranks[1]]
    deadline = time.time() + 5
    while any(map(running, left)) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(map(running, left)), f"left running: {[p for p in left if running(p)]}"


def test_kill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tiny_data, tmp_path):
    """SIGKILL a process while it writes a checkpoint: `last` and resume=auto still use the previous one.

    The writer is stopped at two points of a real `write_checkpoint` (a weights file cut short;
    weights complete but no metadata yet) and killed there, so the kill lands mid-save every time.
    """
    run = tmp_path / "run"
    run_cli("train", *args(tiny_data, run, "train.epochs=1", "train.max_steps=7"))
    root = run / "checkpoints"
    before = (root / "last").resolve()
    writer = (
        "import sys, time, torch; from pathlib import Path; import flowerdist.checkpoint as ckpt\n"
        "real = ckpt.save_file\n"
        "def stalled(tensors, path):\n"
        "    Path(path).write_bytes(b'\\0' * 4096) if sys.argv[2] == 'cut' else real(tensors, path)\n"
        "    print('stalled', flush=True); time.sleep(600)\n"
        "ckpt.save_file = stalled\n"
        "ckpt.write_checkpoint(Path(sys.argv[1]), 'step-00000099', {'w': torch.ones(1000)}, {'step': 99}, {'x': 1}, link='last')\n"
    )
    for point in ("cut", "weights-only"):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(root), point], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "stalled"
        proc.kill()
        proc.wait()
        partial = root / f".tmp-step-00000099-{proc.pid}"  # the writer's temporary folder, left by the kill
        assert not (root / "step-00000099").exists() and (partial / "model.safetensors").is_file()
        assert not (partial / "meta.json").exists()  # killed mid-save
        assert (root / "last").resolve() == before
    out = run_cli("train", *args(tiny_data, run, "train.epochs=1", "train.max_steps=9", "train.resume=auto")).stdout
    assert f"resuming from {before}" in out
    assert not list(root.glob(".tmp-*"))  # the resumed run cleared what the killed writers left


def test_every_ingredient_and_the_ema_resume_bit_identical(tiny_data, tmp_path):
    """Augmentation, MixUp/CutMix and the EMA across a SIGKILL: the resumed run ends where the uninterrupted one does."""
    ingredients = (
        "augment.color_jitter=0.3", "augment.auto_augment=randaugment", "augment.random_erasing=0.5",
        "augment.mixup_alpha=0.4", "augment.cutmix_alpha=1.0", "augment.mix_prob=0.9", "train.ema_decay=0.99",
        "train.best_of=ema", "data.batch_size=8",
    )
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    launch(1, *args(tiny_data, ref, *ingredients, "log.wandb=disabled"))
    proc = start(1, args(tiny_data, cut, *ingredients))
    kill_after_a_checkpoint(proc, cut, random.Random(5))
    launch(1, *args(tiny_data, cut, *ingredients, "train.resume=auto"))
    for name in ("last", "best"):
        a = load_file(ref / "checkpoints" / name / "model.safetensors")
        b = load_file(cut / "checkpoints" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ema = [torch.load(r / "checkpoints" / "last" / "train_state.pt", weights_only=True)["ema"] for r in (ref, cut)]
    assert ema[0] and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    # best follows the EMA: its weights are the EMA's at the best epoch, not the raw model's
    metrics = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    best = max((m for m in metrics if "val_ema/accuracy" in m), key=lambda m: m["val_ema/accuracy"])
    meta = json.loads((ref / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["step"] == best["step"] and meta["val_accuracy"] == best["val_ema/accuracy"]


def test_a_signal_stops_a_run_whose_epochs_are_shorter_than_a_log_window(tiny_data, tmp_path):
    """log_every larger than an epoch (small data, many GPUs): no log step inside an epoch ever checks the signal, so
    the run stops at the next epoch end, after that epoch's checkpoint, exits 3, and resumes to the end."""
    run = tmp_path / "run"
    extra = ("data.batch_size=8", "train.epochs=4", "train.log_every=50", "train.checkpoint_every=0")  # 20 steps an epoch
    proc = start(1, args(tiny_data, run, *extra))
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and "val/accuracy" in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be signalled"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, out[-2000:]
    stopped = json.loads((run / "checkpoints" / "last" / "meta.json").read_text())["step"]
    assert stopped % 20 == 0 and stopped < 80 and f"stopped by a signal at step {stopped}" in out
    resumed = launch(1, *args(tiny_data, run, *extra, "train.resume=auto")).stdout
    assert f"step {stopped})" in resumed and json.loads((run / "result.json").read_text())["global_step"] == 80
