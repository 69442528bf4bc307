"""`flowerdist bench` and bench/gpu_check.sh run end to end (tiny sizes, CPU) and report what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_cli


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_path(tmp_path):
    env = {
        **os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "MODEL": "seed_resnet", "IMAGE_SIZE": "32", "BATCH": "8",
        "WINDOW": "2", "WINDOWS": "2", "WORKERS": "1", "PER_CLASS": "12", "SYNTH_SIZE": "48", "WANDB": "disabled", "DATA_PATHS": "cache", "OUT": str(tmp_path / "out"),
    }
    proc = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["env"]["device"] == "cpu" and report["env"]["torch"]
    assert report["skipped"] == ["fp16: needs CUDA (flowerdist refuses fp16 on the CPU; its gradient scaler is a CUDA path)"]
    rows = {(r["part"], r.get("data_path"), r.get("processes"), r.get("sync")): r for r in report["rows"]}
    for key in [("model", None, None, None), ("plain", "cache", None, None), ("flowerdist", "cache", None, None),
                ("pipeline", "cache", None, None), ("ddp", None, 2, None), ("ddp", None, 2, "no_sync")]:
        row = rows[key]
        assert len(row["windows"]) == 2 and row["min"] <= row["images_per_s"] <= row["max"] and row["min"] > 0
    assert 0 <= rows[("flowerdist", "cache", None, None)]["data_wait"] < 1
    assert rows[("ddp", None, 2, None)]["threads"] == 1 and rows[("ddp", None, 1, None)]["threads"] == 2
    assert report["ddp"]["processes"] == 2
    assert report["ddp"]["allreduce_ms"] > 0 and report["ddp"]["gradient_mib"] > 0
    ratio = report["ratios"]["flowerdist/plain (bf16, cache)"]
    assert ratio == pytest.approx(rows[("flowerdist", "cache", None, None)]["images_per_s"] / rows[("plain", "cache", None, None)]["images_per_s"])
    assert "| flowerdist loop, bf16, cache" in proc.stdout and "flowerdist/plain (bf16, cache):" in proc.stdout
    # each flowerdist part was a real training run, reading the decoded cache
    run = tmp_path / "out" / "flowerdist-bf16-cache-r0"
    assert (run / "checkpoints" / "last" / "meta.json").is_file() and yaml.safe_load((run / "config.yaml").read_text())["data"]["cache"] is True


def test_bench_rejects_unknown_parts_in_one_line(tmp_path):
    proc = run_cli("bench", "--parts", "model,speed", "--out-dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "unknown value(s) ['speed']" in proc.stderr and "Traceback" not in proc.stderr
