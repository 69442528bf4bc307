"""Shared fixtures: generated data and one short real training run, made once per session."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never touch the network or a user's W&B account, and never read a user's accelerate config.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
os.environ["HF_HUB_OFFLINE"] = "1"


def run_cli(*args: str, check: bool = True, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run `flowerdist ARGS` in this process (`cli.main`, from the repo root) with its output captured.

    A fresh process would cost ~4 s of importing torch and exiting; tests start one only where the
    process is the point (several ranks, a kill, a launcher, an environment read at import).
    `threads`: torch's intra-op threads meanwhile, as OMP_NUM_THREADS gives a fresh process (the layout
    tests compare with ranks of one thread each).
    """
    from flowerdist.cli import main

    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch_threads(threads):
            code = main([str(a) for a in args])
    finally:
        os.chdir(cwd)
        # W&B publishes its service socket here; a process started later would inherit it and share our
        # service (a run it leaves behind when killed then stays "in use" for the resumed one).
        os.environ.pop("WANDB_SERVICE", None)
    done = subprocess.CompletedProcess(["flowerdist", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"flowerdist {' '.join(map(str, args))} exited {code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to `n` meanwhile (None: unchanged)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """5 classes x 40 generated flowers at 64 px."""
    out = tmp_path_factory.mktemp("data") / "flowers"
    run_cli("data", "synth", "--out", str(out), "--per-class", "40", "--size", "64", "--seed", "0")
    return out


#: overrides that make a real but small run on `tiny_data`
TINY = ["data.synthetic=false", "data.image_size=64", "data.batch_size=16", "data.num_workers=0", "log.wandb=disabled", "log.progress=false"]


@pytest.fixture(scope="session")
def e2e_data(tmp_path_factory) -> Path:
    """5 classes x 80 generated flowers at 64 px: enough for the seed network to learn in seconds."""
    out = tmp_path_factory.mktemp("data") / "flowers80"
    run_cli("data", "synth", "--out", str(out), "--per-class", "80", "--size", "64", "--seed", "0")
    return out


@pytest.fixture(scope="session")
def trained_run(e2e_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    run_cli(
        "train", "-c", "configs/quickstart.yaml", f"data.root={e2e_data}", f"train.output_dir={run_dir}",
        *TINY, "log.wandb=offline", "train.epochs=8", "optim.warmup_steps=10", "optim.lr=0.001", "train.log_every=5",
    )
    return run_dir


def process_tree(pid: int) -> list[int]:
    """A process and its descendants."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for c in children for p in process_tree(int(c))]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every rank under it, as a lost machine would. torch's launcher starts each rank in
    a session of its own: killing the launcher's process group alone leaves the ranks training to the end.
    All are stopped first, so that no launcher sees a rank die and signals the others to checkpoint."""
    pids = process_tree(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(nprocs: int, *train_args: str, num_machines: int = 1, machine_rank: int = 0, port: int | None = None) -> list[str]:
    """The working CPU multi-process form of `accelerate launch` (see launch/cpu_multi_process.yaml).

    Its launcher module, as `flowerdist bench` and slurm/launch.sh run it: the `accelerate` command also
    imports every other subcommand (timm and torchvision among them): 4.9 s against 1.75 s here. The
    `accelerate` command itself is tested where the README types it (test_distributed's 3-process run).
    """
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(nprocs), "--num_machines", str(num_machines),
        "--mixed_precision", "no", "--dynamo_backend", "no",
    ]
    if num_machines > 1 or port:
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port or free_port())]
    return cmd + ["-m", "flowerdist", "train", *train_args]


def launch_many(*runs: tuple, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run several trainings `(nprocs, train_args[, port])` side by side and return their results in order.

    The multi-process ones start first as real `accelerate launch` runs; the 1-process ones then
    run in this process while those import torch and train. Results do not change: each
    process keeps its own thread count.
    """
    started = {}
    for i, (nprocs, train_args, *port) in enumerate(runs):
        if nprocs > 1:
            cmd, env = accelerate_cmd(nprocs, *train_args, port=port[0] if port else free_port()), {**os.environ, "ACCELERATE_USE_CPU": "1"}
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            started[i] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True), out, err)
    results = {i: run_cli("train", *train_args) for i, (nprocs, train_args, *_) in enumerate(runs) if nprocs == 1}
    for i, (proc, out, err) in started.items():
        proc.wait(timeout=timeout)
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, proc.args[:4]))} ... exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        results[i] = done
    return [results[i] for i in range(len(runs))]


def launch(nprocs: int, *train_args: str, timeout: float = 600, port: int | None = None) -> subprocess.CompletedProcess:
    """Train with `nprocs` real CPU processes (gloo) through accelerate launch; 1 means plain `flowerdist train`."""
    if nprocs == 1:
        return run_cli("train", *train_args)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(accelerate_cmd(nprocs, *train_args, port=port or free_port()), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"accelerate launch exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def resume_args(data, run_dir, *extra):
    """The resume tests' run: 2 epochs of 20 steps (global batch 8), checkpoints every 7 steps, W&B offline,
    the samples of every step recorded."""
    return (
        "-c", "configs/quickstart.yaml", f"data.root={data}", f"train.output_dir={run_dir}", *TINY, "log.wandb=offline",
        "data.batch_size=8", "train.epochs=2", "train.checkpoint_every=7", "train.log_every=3", "train.keep_last=2",
        "train.record_samples=true", *extra,
    )


def batch(nprocs):
    return f"data.batch_size={8 // nprocs}"


@pytest.fixture(scope="session")
def uninterrupted(tiny_data, tmp_path_factory):
    """One uninterrupted `resume_args` run per process count, shared by the resume and Slurm requeue tests.

    Without W&B (~2 s a run here): the interrupted runs log to W&B offline, so their equality with these
    references also shows that logging changes nothing in training."""
    runs = {}

    def get(nprocs):
        if nprocs not in runs:
            runs[nprocs] = tmp_path_factory.mktemp(f"ref{nprocs}")
            launch(nprocs, *resume_args(tiny_data, runs[nprocs], batch(nprocs), "log.wandb=disabled"))
        return runs[nprocs]

    return get
