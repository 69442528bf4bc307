"""Shared fixtures: generated data and one short real training run, made once per session."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from slurm_cluster import alive

REPO = Path(__file__).resolve().parent.parent

# Tests never touch the network or a user's W&B account, and never read a user's accelerate config.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("WANDB_API_KEY", None)
os.environ["HF_HUB_OFFLINE"] = "1"

# `make test` runs the suite in two pytest-xdist workers, one per core of the 2-core CI machine: a torch of one
# thread in each (and in every process they start) rather than two threads each, which would contend for the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items) -> None:
    """The tests marked `long` first. `--dist loadgroup` hands out the groups, then single tests in this order; the
    README's commands (about 160 s) last in line left the other worker idle for a minute and a half at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


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
        if "wandb" in sys.modules:  # W&B's service may still be writing an offline run's file after finish() returns
            sys.modules["wandb"].teardown()  # (seen: a test read 4 of its 6 images); this waits for it, then stops it
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
    """5 classes x 40 generated flowers at 64 px, one folder for both workers (trainings on it build their image
    caches in it, atomically: copy it with `copy_flowers`)."""
    return built_once(tmp_path_factory, "flowers", lambda out: run_cli(
        "data", "synth", "--out", str(out), "--per-class", "40", "--size", "64", "--seed", "0"))


def copy_flowers(src: Path, dst: Path) -> Path:
    """A copy of a shared flower folder without its image caches, which another worker may be building meanwhile."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".flowerdist-cache"))
    return dst


#: overrides that make a real but small run on `tiny_data`
TINY = ["data.synthetic=false", "data.image_size=64", "data.batch_size=16", "data.num_workers=0", "log.wandb=disabled", "log.progress=false"]


def session_root(tmp_path_factory) -> Path:
    """The temporary folder of this test session: above each pytest-xdist worker's own, which all of them share."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test session, across the pytest-xdist workers too (the pattern pytest-xdist
    documents): the first worker to ask builds under a file lock, the others wait for it and share the folder.
    Only for what tests read or append to; two workers' tests may use it at the same time."""
    from filelock import FileLock

    root = session_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.built"
    with FileLock(root / f"{name}.lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            build(folder)
            done.touch()
    return folder


def on_one_worker(tmp_path_factory, config, group: str) -> None:
    """Fail when a second pytest-xdist worker reaches this for the `xdist_group` mark `group`, which `--dist loadgroup`
    keeps on one worker (one Slurm cluster; a module fixture built once): pytest 9.2 with pytest-xdist 3.8 ignores
    the mark without a word (pytest-xdist#1386), and the tests then pass on two clusters, each paid for."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or not config.getvalue("loadgroup"):
        return
    from filelock import FileLock

    root = session_root(tmp_path_factory)
    claim = root / f"group-{group}.worker"
    with FileLock(root / f"group-{group}.lock"):
        first = claim.read_text() if claim.is_file() else worker
        claim.write_text(first)
    if first != worker:
        pytest.fail(f"the xdist_group {group!r} tests ran on workers {first} and {worker}: --dist loadgroup ignored the mark "
                    "(pytest-xdist#1386, with pytest 9.2); `make setup` installs the pytest that pyproject.toml allows", pytrace=False)


@pytest.fixture(scope="session")
def e2e_data(tmp_path_factory) -> Path:
    """5 classes x 80 generated flowers at 64 px: enough for the seed network to learn in seconds."""
    return built_once(tmp_path_factory, "flowers80", lambda out: run_cli(
        "data", "synth", "--out", str(out), "--per-class", "80", "--size", "64", "--seed", "0"))


@pytest.fixture(scope="session")
def trained_run(e2e_data, tmp_path_factory) -> Path:
    """8 epochs on `e2e_data` with W&B offline, trained once for both workers (about 20 s of a core each time)."""
    return built_once(tmp_path_factory, "quick", lambda run_dir: run_cli(
        "train", "-c", "configs/quickstart.yaml", f"data.root={e2e_data}", f"train.output_dir={run_dir}",
        *TINY, "log.wandb=offline", "train.epochs=8", "optim.warmup_steps=10", "optim.lr=0.001", "train.log_every=5",
    ))


def children_of(pid: int) -> list[int]:
    """A process's children, from /proc: microseconds, where a `pgrep` forks this torch-sized process each time."""
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += map(int, path.read_text().split())
    return found


def process_tree(pid: int, visit=lambda p: None) -> list[int]:
    """A process and its descendants; `visit` is called on each before its children are listed."""
    visit(pid)
    return [pid] + [p for c in children_of(pid) for p in process_tree(c, visit)]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every rank under it, as a lost machine would. torch's launcher starts each rank in
    a session of its own: killing the launcher's process group alone leaves the ranks training to the end.
    Each process is stopped as it is found, before its children are listed (a rank stopped mid-step holds the
    others at their next all-reduce), so no launcher sees a rank die and signals the others to checkpoint, and
    a run killed right after a checkpoint is not a few steps past it (with a `pgrep` per process it once was
    7 steps past, at the next checkpoint)."""
    def stop(p: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)

    for p in process_tree(pid, visit=stop):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


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
    def get(nprocs):  # one run for both workers: tests copy it or read it
        return built_once(tmp_path_factory, f"ref{nprocs}", lambda run: launch(nprocs, *resume_args(tiny_data, run, batch(nprocs), "log.wandb=disabled")))

    return get


# ---- helpers shared by several test modules -----------------------------------------------------------------


def weights_of(run_dir, name="last"):
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / name / "model.safetensors")


def relative_difference(a, b):
    """||a - b|| / ||a|| over all floating-point tensors; integer buffers must match exactly."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point())
    den = sum(float(a[k].double().pow(2).sum()) for k in a if a[k].is_floating_point())
    return (num / den) ** 0.5


def assert_same_weights(a, b, rtol=1e-5):
    diff = relative_difference(a, b)
    assert diff <= rtol, f"relative difference {diff:.2e}"


def initial_weights(model="seed_resnet", image_size=64, seed=42):
    """The weights a run starts from: `flowerdist train` seeds, then builds the model (train.build_model)."""
    from accelerate.utils import set_seed

    from flowerdist.models import create_model

    set_seed(seed)
    return create_model(model, num_classes=5, image_size=image_size).state_dict()


def update_difference(a, b, init):
    """||(a - init) - (b - init)|| / ||b - init|| over the floating-point tensors: how far two runs' updates differ,
    relative to the update itself (weights alone hide a wrong update under the untouched initialisation)."""
    updates = lambda w: {k: w[k].double() - init[k].double() for k in init if init[k].is_floating_point()}  # noqa: E731
    ua, ub = updates(a), updates(b)
    num = sum(float((ua[k] - ub[k]).pow(2).sum()) for k in ua)
    den = sum(float(ub[k].pow(2).sum()) for k in ub)
    return (num / den) ** 0.5


def assert_same_updates(a, b, init, rtol=1e-5):
    diff = update_difference(a, b, init)
    assert diff <= rtol, f"the updates differ by {diff:.2e} of the update"


#: Optimizer steps of the DDP-vs-big-batch runs. Measured on the generated flowers: the updates of 2 processes x b and
#: 1 process x 2b differ by 1e-6 of the update after 2 and after 8 steps (seed_resnet, SGD lr 1e-3), while another
#: batch size or a wrong accumulation moves them by 0.4 or more.
DDP_STEPS = 8


def train_args(data, run_dir, *extra):
    return (
        "-c", "configs/quickstart.yaml", f"data.root={data}", f"train.output_dir={run_dir}", *TINY,
        "log.wandb=disabled", "optim.name=sgd", "optim.lr=0.001", "optim.warmup_steps=2",
        f"train.max_steps={DDP_STEPS}", "train.epochs=1", *extra,
    )


def samples_per_step(run_dir):
    """step -> sorted dataset indices of the global batch, over every rank's samples file."""
    steps: dict[int, list[int]] = {}
    for path in (run_dir / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["indices"])
    return {step: sorted(indices) for step, indices in steps.items()}


def finished(proc) -> str:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


# A short run at a constant learning rate after 2 warm-up steps: killed after its step-7 checkpoint, resumed on
# another layout until step 9, compared with an uninterrupted run of 9 steps. The killed run is given steps to
# spare (max_steps 20, free to change on resume; the constant rate does not depend on it): with 9 it could end
# before the kill lands. One thread per process everywhere and a per-device batch of 4 (the accumulation makes
# up the global batch of 8), so every forward pass computes the same 4 images the same way on either layout;
# over many more steps the generated flowers' max-pool and ReLU ties would amplify even float rounding (see
# test_layouts.BN_RUN).
LAYOUT_RUN = ("train.record_samples=true", "train.checkpoint_every=7", "train.max_steps=9", "optim.schedule=constant",
              "train.log_every=1", "data.batch_size=4")


def start(nprocs, train_args, threads=None):
    """A training in processes of its own; `threads`: OMP_NUM_THREADS per process (accelerate sets 1 for several)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "flowerdist", "train", *train_args] if nprocs == 1 else accelerate_cmd(nprocs, *train_args, port=free_port())
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


running = alive  # a process that exits between opening and reading its /proc entry counts as gone


def sweep_file(tmp_path, data, **extra):
    spec = {
        "config": "configs/quickstart.yaml",
        "overrides": [f"data.root={data}", *TINY, "train.epochs=2", "train.checkpoint_every=5", "train.log_every=1"],
        "grid": {"train.seed": [0, 1], "optim.lr": [0.002]},
        "output_dir": str(tmp_path / "sweep"),
        "variants": {"short": ["train.epochs=1"], "one": {"overrides": ["train.epochs=1"], "grid": {"train.seed": [5]}}},
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
