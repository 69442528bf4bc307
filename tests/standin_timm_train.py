"""A stand-in for timm's train.py in the test of bench/vs_timm.py: it takes exactly the flags vs_timm.py passes
(an unknown or missing one fails, as timm's parser would), counts the images of --data-dir/--train-split as timm's
ImageFolder would, and prints timm's last training log line with a rate it measured by reading every image."""

import argparse
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser()
for flag in ("--data-dir", "--train-split", "--val-split", "--model", "--num-classes", "--img-size", "-b", "--opt", "--lr",
             "--weight-decay", "--workers", "--device", "--color-jitter", "--epochs", "--log-interval", "--sched",
             "--warmup-epochs", "--output"):
    p.add_argument(flag, required=True)
p.add_argument("--channels-last", action="store_true", required=True)
p.add_argument("--no-prefetcher", action="store_true", required=True)
args = p.parse_args()
assert args.model == "resnet18" and args.num_classes == "5" and args.val_split == ""
start = time.perf_counter()
images = [f for f in (Path(args.data_dir) / args.train_split).glob("*/*") if f.is_file()]
for f in images:
    f.read_bytes()
seconds = time.perf_counter() - start + 0.5  # a pretend half second of training
rate = len(images) / seconds
print(f"Train: 0 [{len(images):>4d}/{len(images)} (100%)]  Loss: 1.6 (1.6)  Time: {seconds:.3f}s, {rate:.2f}/s  "
      f"({seconds:.3f}s, {rate:.2f}/s)  LR: 2.000e-03  Data: 0.01 (0.01)", file=sys.stderr)
