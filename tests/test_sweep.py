"""`flowerdist sweep`: every cell a run directory; finished cells are skipped and a killed sweep resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, run_cli, sweep_file
from flowerdist.errors import FlowerdistError
from flowerdist.sweep import load_sweep


def test_cells_are_the_grid_product_with_their_own_run_directories(tiny_data, tmp_path):
    path = sweep_file(tmp_path, tiny_data)
    cells = load_sweep(path)
    assert [c.name for c in cells] == ["seed=0,lr=0.002", "seed=1,lr=0.002"]
    assert cells[1].run_dir == tmp_path / "sweep" / "seed=1,lr=0.002"
    assert "train.seed=1" in cells[1].overrides and "train.resume=auto" in cells[1].overrides
    short = load_sweep(path, "short")
    assert short[0].run_dir == tmp_path / "sweep" / "short" / "seed=0,lr=0.002" and "train.epochs=1" in short[0].overrides
    one = load_sweep(path, "one")
    assert [c.name for c in one] == ["seed=5,lr=0.002"] and "train.epochs=1" in one[0].overrides
    out = run_cli("sweep", str(path), "--dry-run").stdout
    assert "cell 0 seed=0,lr=0.002: to run" in out and "cell 1 seed=1,lr=0.002: to run" in out
    assert run_cli("sweep", str(path), "--cell", "1").stdout.split() == ["configs/quickstart.yaml", *cells[1].overrides]


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"grid": {"train.seed": []}}, "non-empty lists"),
        ({"grid": {"optim.lrr": [1]}}, "unknown config key 'optim.lrr'"),
        ({"colour": 1}, "needs `config:` and `grid:`"),
    ],
)
def test_bad_sweep_files_fail_in_one_line_before_any_cell_runs(tiny_data, tmp_path, change, needle):
    proc = run_cli("sweep", str(sweep_file(tmp_path, tiny_data, **change)), check=False)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("text, needle", [("grid: [1, 2\n", "is not valid YAML at line 2"), ("- just\n- a list\n", "got list")])
def test_a_sweep_file_that_is_not_a_sweep_is_one_line(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = run_cli("sweep", str(path), check=False)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unknown_variant_names_the_choices(tiny_data, tmp_path):
    with pytest.raises(FlowerdistError, match=r"no variant 'cpu'; choose one of \['one', 'short'\]"):
        load_sweep(sweep_file(tmp_path, tiny_data), "cpu")


@pytest.mark.slow
def test_a_killed_sweep_skips_finished_cells_and_resumes_the_partial_one(tiny_data, tmp_path):
    path = sweep_file(tmp_path, tiny_data)
    first, second = (c.run_dir for c in load_sweep(path))
    proc = subprocess.Popen([sys.executable, "-m", "flowerdist", "sweep", str(path)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((second / "checkpoints").glob("step-*")):
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (first / "result.json").is_file() and not (second / "result.json").exists()
    finished = (first / "result.json").stat().st_mtime_ns
    out = run_cli("sweep", str(path)).stdout
    assert "cell 0 seed=0,lr=0.002: done" in out and "cell 1 seed=1,lr=0.002: partial" in out
    assert "training cell 0" not in out and "training cell 1" in out and "resuming from" in out
    assert (first / "result.json").stat().st_mtime_ns == finished  # the finished cell was not touched
    result = json.loads((second / "result.json").read_text())
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert steps == list(range(1, result["global_step"] + 1))  # resumed: no step lost or repeated


@pytest.mark.slow
def test_a_cell_identical_to_a_finished_run_elsewhere_is_reused(tiny_data, tmp_path, monkeypatch):
    """Two sweeps sharing a cell (the ResNet-18 row of several experiment tables): the second links to the first's
    finished run instead of training it again; a cell that differs trains."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    config = str(REPO / "configs" / "quickstart.yaml")  # the second sweep runs from another folder
    first = sweep_file(tmp_path / "a", tiny_data, grid={"train.seed": [0]}, output_dir=str(tmp_path / "runs" / "a"), config=config)
    run_cli("sweep", str(first))
    second = sweep_file(tmp_path / "b", tiny_data, grid={"train.seed": [0, 3]}, output_dir=str(tmp_path / "runs" / "b"), config=config,
                        overrides=[f"data.root={tiny_data}", "data.synthetic=false", "data.image_size=64", "data.batch_size=16",
                                   "data.num_workers=1", "log.wandb=disabled", "log.progress=false", "train.epochs=2",
                                   "train.checkpoint_every=5", "train.log_every=2"])  # differs only in what is not trained
    out = subprocess.run([sys.executable, "-m", "flowerdist", "sweep", str(second)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout  # finds runs/ here
    reused, trained = tmp_path / "runs" / "b" / "seed=0", tmp_path / "runs" / "b" / "seed=3"
    assert "seed=0: the same config finished in" in out and "reused" in out
    assert "training cell 1 seed=3" in out and "training cell 0" not in out
    assert reused.is_symlink() and reused.resolve() == (tmp_path / "runs" / "a" / "seed=0").resolve()
    assert (trained / "result.json").is_file() and not trained.is_symlink()
    # from a folder whose runs/ does not hold them, finished runs are found where --reuse-from says
    (tmp_path / "c").mkdir()
    third = sweep_file(tmp_path / "c", tiny_data, grid={"train.seed": [0]}, output_dir=str(tmp_path / "c" / "out"), config=config)
    plain, told = (subprocess.run([sys.executable, "-m", "flowerdist", "sweep", str(third), "--dry-run", *flag], cwd=tmp_path / "c",
                                  capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
                   for flag in ([], ["--reuse-from", str(tmp_path / "runs" / "a")]))
    assert "seed=0: to run" in plain.stdout and "reused" in told.stdout and str(tmp_path / "runs" / "a" / "seed=0") in told.stdout
    wrong = run_cli("sweep", str(third), "--dry-run", "--reuse-from", str(tmp_path / "nowhere"), check=False)
    assert wrong.returncode == 2 and "--reuse-from" in wrong.stderr and "Traceback" not in wrong.stderr
    # a cell with train.mixed_precision=auto is the run it would train here: fp32 on a CPU without AMX, bf16 with AMX
    # (the finished run trained in fp32); a Slurm node may be another kind of machine, so under --slurm it trains
    import flowerdist.distributed

    (tmp_path / "d").mkdir()
    auto = sweep_file(tmp_path / "d", tiny_data, grid={"train.seed": [0]}, output_dir=str(tmp_path / "d" / "out"), config=config,
                      overrides=[f"data.root={tiny_data}", *TINY, "train.epochs=2", "train.checkpoint_every=5", "train.log_every=1",
                                 "train.mixed_precision=auto"])
    monkeypatch.setattr(flowerdist.distributed, "cuda_visible", lambda: False)
    said = {}
    for amx, slurm in ((False, []), (True, []), (False, ["--slurm"])):
        monkeypatch.setattr(flowerdist.distributed, "cpu_has_amx", lambda amx=amx: amx)
        said[amx, bool(slurm)] = run_cli("sweep", str(auto), "--dry-run", *slurm, "--reuse-from", str(tmp_path / "runs" / "a")).stdout
    assert "reused" in said[False, False] and str(tmp_path / "runs" / "a" / "seed=0") in said[False, False]
    assert "seed=0: to run" in said[True, False] and "seed=0: to run" in said[False, True]
    # ... unless the Slurm tasks are told their precision (slurm/launch.sh applies FLOWERDIST_MIXED_PRECISION)
    for value, state in (("no", "reused"), ("bf16", "seed=0: to run")):
        monkeypatch.setenv("FLOWERDIST_MIXED_PRECISION", value)
        assert state in run_cli("sweep", str(auto), "--dry-run", "--slurm", "--reuse-from", str(tmp_path / "runs" / "a")).stdout


def test_a_dry_run_piped_into_head_ends_without_a_traceback(tiny_data, tmp_path):
    deep = tmp_path.joinpath(*["d" * 200] * 3)  # 150 lines of 700 characters: more than a pipe holds
    path = sweep_file(tmp_path, tiny_data, grid={"train.seed": list(range(150))}, output_dir=str(deep))
    out = subprocess.run(f"{sys.executable} -m flowerdist sweep {path} --dry-run | head -n 1", shell=True, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("sweep: cell 0 "), out.stdout
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
