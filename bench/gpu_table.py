"""The one table of bench/gpu_check.sh, from what it left in its folder: the bench JSONs, the training run and
its resume. Prints markdown (the README's GPU section holds it) and writes gpu_check.md and gpu_check.json there.

    python bench/gpu_table.py runs/gpu_check-<time>
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ANCHORS = (
    "Anchors: NVIDIA's ResNet-50 v1.5 reference trains at about 2,500 images/s on one A100 with AMP; an H100/H200 "
    "should pass 3,000 end to end. Goals: flowerdist loop >= 0.95x the model step, data wait < 2%."
)


def bench_rows(folder: Path) -> tuple[list[dict], dict, dict]:
    """(rows of every bench JSON, the environment, the stage costs of the first bench that measured them)."""
    rows, env, stages = [], {}, {}
    for path in sorted(folder.glob("*/bench.json")):
        report = json.loads(path.read_text())
        env = env or report["env"]
        stages = stages or report.get("stages_ms", {})
        for row in report["rows"]:
            rows.append({**row, "model": report["spec"]["model"], "compile": report["spec"]["compile"], "batch": report["spec"]["batch"],
                         "image_size": report["spec"]["image_size"]})
    return rows, env, stages


def memory(row: dict | None) -> str:
    return f"{row['peak_memory_mib'] / 1024:.1f} ({row['peak_memory_of']})" if row and "peak_memory_mib" in row else ""


def throughput_table(rows: list[dict]) -> list[str]:
    lines = ["| model | precision | data path | flowerdist loop, images/s | model step, images/s | loop / model step | "
             "plain loop, images/s | data wait | peak memory, GiB |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    loops = [r for r in rows if r["part"] == "flowerdist"]
    for loop in loops:
        same = lambda part: next((r for r in rows if r["part"] == part and r["model"] == loop["model"] and not r["compile"]  # noqa: E731
                                  and r["precision"] == loop["precision"] and r.get("data_path", loop["data_path"]) == loop["data_path"]), None)
        model, plain = same("model"), same("plain")
        rate = lambda row: f"{row['images_per_s']:,.0f}" if row else ""  # noqa: E731 (a part not run)
        ratio = f"{loop['images_per_s'] / model['images_per_s']:.3f}" if model else ""
        lines.append(f"| {loop['model']} | {loop['precision']} | {loop['data_path']} | {rate(loop)} | {rate(model)} | {ratio} | "
                     f"{rate(plain)} | {loop['data_wait']:.1%} | {memory(loop)} |")
    for row in (r for r in rows if r["part"] == "model" and r["compile"]):
        eager = next((r for r in rows if r["part"] == "model" and r["model"] == row["model"] and not r["compile"]
                      and r["precision"] == row["precision"]), None)
        speedup = f", {row['images_per_s'] / eager['images_per_s']:.2f}x eager" if eager else ""
        lines.append(f"| {row['model']}, torch.compile | {row['precision']} | tensors | | {row['images_per_s']:,.0f}{speedup} | | | | "
                     f"{memory(row)} |")
        lines.append(f"|  | compilation: first step {row.get('first_step_s', float('nan')):.0f} s | | | | | | | |")
    return lines


def training(folder: Path) -> list[str]:
    """The end-to-end run on photos: its images/s and data wait from metrics.jsonl, and the resume check."""
    metrics = folder / "train" / "metrics.jsonl"
    resume = json.loads((folder / "resume.json").read_text()) if (folder / "resume.json").is_file() else {}
    if not metrics.is_file():
        return ["End-to-end run: no metrics (see train.log)."]
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    windows = [e for e in events if "train/images_per_s" in e][1:]  # the first window holds start-up
    import yaml

    path = folder / "train" / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    what = f"{config['name']}.yaml, {config['model']['name']}, {config['train']['mixed_precision']}" if config else "?"
    peaks = [e["epoch/peak_memory_mib"] for e in events if "epoch/peak_memory_mib" in e]
    rate = statistics.median(e["train/images_per_s"] for e in windows) if windows else float("nan")
    wait = statistics.median(e["train/data_wait"] for e in windows) if windows else float("nan")
    ok = resume.get("stopped_at") not in (None, "none") and resume.get("stopped_at") == resume.get("resumed_at")
    accuracy = [e["val/accuracy"] for e in events if "val/accuracy" in e]
    return [
        f"End-to-end ({what}, {len(windows)} log windows): "
        f"{rate:,.0f} images/s (median window), data wait {wait:.1%}, peak memory {max(peaks, default=0) / 1024:.1f} GiB, "
        f"{len(accuracy)} epochs (last val accuracy {accuracy[-1] if accuracy else float('nan'):.3f}).",
        f"SIGTERM and resume: checkpoint at step {resume.get('stopped_at')}, resumed at step {resume.get('resumed_at')}: "
        f"{'same step' if ok else 'NOT the same step'}.",
    ]


def main(folder: Path) -> str:
    rows, env, stages = bench_rows(folder)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flowerdist.bench import stage_table

    head = (f"GPU check: {env.get('device_name', '?')}, torch {env.get('torch', '?')}, {env.get('cpu_capability', '')} host, "
            f"batch {rows[0]['batch'] if rows else '?'} per device at {rows[0]['image_size'] if rows else '?'} px, channels_last")
    text = "\n".join([head, "", *throughput_table(rows), "", *stage_table(stages), *training(folder), "", ANCHORS])
    (folder / "gpu_check.md").write_text(text + "\n")
    (folder / "gpu_check.json").write_text(json.dumps({"env": env, "rows": rows, "stages_ms": stages}, indent=1))
    return text


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
