"""Race flowerdist's loop against timm's own train.py: one epoch each on the same photos, alternating.

    python bench/vs_timm.py --timm-train PATH/TO/pytorch-image-models/train.py --data PHOTOS [--rounds 3]

timm's train.py is not part of flowerdist: pass the path of a checkout that matches the installed
timm. Both train ResNet-18 at 128 px, batch 32, AdamW, channels_last, on the CPU, with the same
number of DataLoader workers (flowerdist: --flowerdist-args to change its data path), and
crops of scale 0.08-1 (timm's default). Each side's rate is its own epoch average, from the
first batch request to the last step (timm: the running average of its last log line;
flowerdist: `epoch/images_per_s`). Prints a table with the rounds and the median ratio.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def timm_rate(train_py: str, data: Path, workers: int, out: Path) -> float:
    """One timm epoch; its data dir must hold `train/<class>/...` (made of symlinks here)."""
    cmd = [
        sys.executable, train_py, "--data-dir", str(data), "--train-split", "train", "--val-split", "",
        "--model", "resnet18", "--num-classes", "5", "--img-size", "128", "-b", "32", "--opt", "adamw", "--lr", "2e-3",
        "--weight-decay", "0.05", "--workers", str(workers), "--channels-last", "--device", "cpu", "--no-prefetcher",
        "--color-jitter", "0", "--epochs", "1", "--log-interval", "1000", "--sched", "cosine", "--warmup-epochs", "0",
        "--output", str(out),
    ]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    last = [line for line in log.splitlines() if "Train:" in line][-1]
    return float(re.findall(r"\(\s*[\d.]+s,\s*([\d.]+)/s\)", last)[-1])


def flowerdist_rate(photos: Path, workers: int, out: Path, extra: list[str]) -> float:
    cmd = [
        sys.executable, "-m", "flowerdist", "train", "model.name=resnet18", f"data.root={photos}", "data.image_size=128",
        "data.batch_size=32", "data.min_scale=0.08", f"data.num_workers={workers}", "data.val_fraction=0.02", "optim.name=adamw",
        "optim.lr=2e-3", "optim.weight_decay=0.05", "train.epochs=1", "train.cpu=true", "log.wandb=disabled",
        "log.progress=false", f"train.output_dir={out}", *extra,
    ]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "epoch/images_per_s" in r][-1]["epoch/images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-train", required=True, help="timm's train.py (from a pytorch-image-models checkout)")
    p.add_argument("--data", required=True, help="photos laid out ROOT/<class>/<image>")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--flowerdist-args", default="", help="extra flowerdist overrides, e.g. 'data.cache=true data.num_workers=0'")
    args = p.parse_args()
    photos = Path(args.data).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "timm" / "train").mkdir(parents=True)
        for cls in sorted(d for d in photos.iterdir() if d.is_dir() and not d.name.startswith(".")):
            (tmp / "timm" / "train" / cls.name).symlink_to(cls)
        rows = []
        for r in range(args.rounds):
            order = ("timm", "flowerdist") if r % 2 == 0 else ("flowerdist", "timm")
            rates = {}
            for side in order:
                out = tmp / f"{side}-{r}"
                rates[side] = (timm_rate(args.timm_train, tmp / "timm", args.workers, out) if side == "timm"
                               else flowerdist_rate(photos, args.workers, out, args.flowerdist_args.split()))
                print(f"round {r + 1} {side}: {rates[side]:.2f} img/s", flush=True)
            rows.append(rates)
    print("\n| round | timm train.py img/s | flowerdist img/s | flowerdist / timm |\n| ---: | ---: | ---: | ---: |")
    for i, r in enumerate(rows):
        print(f"| {i + 1} | {r['timm']:.2f} | {r['flowerdist']:.2f} | {r['flowerdist'] / r['timm']:.3f} |")
    ratio = statistics.median(r["flowerdist"] / r["timm"] for r in rows)
    print(f"\nmedian flowerdist / timm: {ratio:.3f} over {len(rows)} alternating rounds")


if __name__ == "__main__":
    main()
