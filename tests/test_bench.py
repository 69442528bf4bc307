"""`flowerdist bench` and bench/gpu_check.sh run end to end (tiny sizes, CPU) and report what they claim."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_cli


CPU_FORM = {  # bench/gpu_check.sh's own header gives this form
    "DEVICE": "cpu", "MODELS": "seed_resnet resnet18", "PRECISIONS": "bf16", "DATA_PATHS": "cache", "IMAGE_SIZE": "32", "BATCH": "8", "WINDOW": "2",
    "WINDOWS": "2", "PER_CLASS": "20", "SYNTH_SIZE": "48", "WORKERS": "1", "TRAIN_SECONDS": "4", "RESUME_SECONDS": "3",
    "TRAIN_ARGS": "model.name=seed_resnet data.image_size=32 data.eval_image_size=0 data.batch_size=8 train.epochs=1000",
}


@pytest.mark.slow
@pytest.mark.long
def test_gpu_check_runs_every_step_in_its_cpu_form(tmp_path):
    """Every step of the GPU check at a tiny size, into a folder a previous check left behind (a rerun): the bench
    parts, the compiled model step, the recipe stopped by SIGTERM and resumed at its checkpoint's step, one table."""
    out = tmp_path / "check"
    (out / "train").mkdir(parents=True)
    (out / "train" / "config.yaml").write_text("left: by an earlier check\n")
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(out), **CPU_FORM}
    assert all(f"{k}=" in (REPO / "bench/gpu_check.sh").read_text() for k in CPU_FORM)
    proc = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed" not in (out / "steps.log").read_text(), (out / "steps.log").read_text()
    table = (out / "gpu_check.md").read_text()
    assert table.strip() in proc.stdout  # the one table, printed
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]): line for line in table.splitlines() if line.startswith("| ")}
    for key in [("seed_resnet", "bf16", "cache"), ("resnet18", "bf16", "cache")]:  # the folder path: test_bench's pipeline and test_cache
        assert key in rows and "host RSS" in rows[key], key  # loop, model step, ratio, data wait, peak memory
    assert ("seed_resnet, torch.compile", "bf16", "tensors") in rows and "compilation: first step" in table
    assert "| crop + resize |" in table and "| cores per GPU at 3,000 images/s |" in table
    resume = json.loads((out / "resume.json").read_text())
    assert resume["stopped_at"] == resume["resumed_at"] != "none" and "same step" in table
    first = (out / "train.log").read_text()
    assert "stopped by a signal at step" in first  # SIGTERM landed mid-run: checkpoint, exit 3
    assert list(out.glob("train.replaced-*"))  # the earlier check's run was moved aside, not refused
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["env"]["device"] == "cpu" and {r["part"] for r in report["rows"]} >= {"model", "plain", "flowerdist", "pipeline"}


def test_bench_rejects_unknown_parts_in_one_line(tmp_path):
    proc = run_cli("bench", "--parts", "model,speed", "--out-dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "unknown value(s) ['speed']" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_the_race_against_timm_runs_and_reports_the_ratio(tiny_data, tmp_path):
    """bench/vs_timm.py end to end, with a stand-in for timm's train.py that takes the same flags (the real one is a
    checkout of pytorch-image-models, not a dependency): both sides run, alternate, and the ratio is theirs."""
    standin = REPO / "tests" / "standin_timm_train.py"
    proc = subprocess.run([sys.executable, str(REPO / "bench/vs_timm.py"), "--timm-train", str(standin), "--data", str(tiny_data),
                           "--rounds", "2", "--workers", "0", "--flowerdist-args", "model.name=seed_resnet data.image_size=32"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rates = {(int(r), side): float(v) for r, side, v in re.findall(r"round (\d) (timm|flowerdist): ([\d.]+) img/s", proc.stdout)}
    assert len(rates) == 4 and all(v > 0 for v in rates.values())
    ratios = [rates[(r, "flowerdist")] / rates[(r, "timm")] for r in (1, 2)]
    median = float(re.search(r"median flowerdist / timm: ([\d.]+)", proc.stdout).group(1))
    assert median == pytest.approx(sum(ratios) / 2, abs=2e-3)
    order = [side for _, side in re.findall(r"round (\d) (timm|flowerdist)", proc.stdout)]
    assert order == ["timm", "flowerdist", "flowerdist", "timm"]  # alternating, so a drift of the machine hits both


@pytest.mark.slow
def test_the_pipeline_part_alone_gives_the_stage_table(tmp_path):
    """`bench --parts pipeline` (no loop to alternate with): the loader at each worker count and the per-stage costs,
    with the cores a GPU would need."""
    out = run_cli("bench", "--device", "cpu", "--parts", "pipeline", "--data-path", "folder,cache", "--pipeline-workers", "0,1",
                  "--image-size", "32", "--batch", "4", "--window", "2", "--windows", "2", "--synthetic-per-class", "8",
                  "--synthetic-size", "48", "--config", "configs/flowers/resnet50_gpu.yaml", "--out-dir", str(tmp_path)).stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {(r["data_path"], r["workers"]) for r in report["rows"]} == {("folder", 0), ("folder", 1), ("cache", 0), ("cache", 1)}
    assert set(report["stages_ms"]) == {"folder", "cache"} and "trivialaugment" in report["stages_ms"]["folder"]  # the recipe's policy
    assert "| cores per GPU at 3,000 images/s |" in out


def test_timed_windows_leave_out_the_epochs_refills():
    """10 steps an epoch, windows of 4: the windows ending at 4, 12 and 24 hold steps 1, 11 and 21 (an epoch's first)."""
    from flowerdist.bench_parts import clean_windows

    logged = [{"step": s} for s in (4, 8, 12, 16, 20, 24)]
    assert [r["step"] for r in clean_windows(logged, 4, 10)] == [8, 16, 20]
