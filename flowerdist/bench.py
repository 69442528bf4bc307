"""`flowerdist bench`: the model step, a plain PyTorch loop, the flowerdist loop and the data
pipeline, measured side by side in one run; prints a table and writes JSON.

The headline is three ratios, because absolute images/s on a shared machine drift:
- flowerdist loop / model step: what the whole loop (data path, Accelerate, logging, metric
  syncs) costs against the bare training step on tensors in memory (goal: at least 0.95 on the
  CPU with flowerdist's default data path);
- flowerdist loop / plain loop: against a hand-written PyTorch loop that reads the folder with
  `--plain-workers` DataLoader workers, as most scripts do (goal: at least 0.98);
- data pipeline / model step: how far the loader is from starving the model (goal: at least 5x).

Each part runs in a fresh process (`flowerdist.bench_parts`); plain and flowerdist alternate for
`--rounds` rounds so a drift of the machine hits both. Medians over windows after warm-up.

    flowerdist bench --model resnet18 --image-size 128 --batch 32
    flowerdist bench --model seed_resnet --image-size 224 --data data/flower_photos      # after `flowerdist data download`
    flowerdist bench --parts ddp --model resnet18 --image-size 128      # 2 processes vs 1, same threads
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from flowerdist.errors import FlowerdistError

LABELS = {
    "model": "model step (tensors in memory)",
    "plain": "plain PyTorch loop",
    "flowerdist": "flowerdist loop",
    "pipeline": "data pipeline",
    "ddp": "DDP model step",
}
PARTS = tuple(LABELS)  # each one is run by `flowerdist.bench_parts.RUNNERS[part]` in a process of its own


def _csv(text: str, allowed=None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad or not items:
        raise FlowerdistError(f"unknown value(s) {bad or text!r}; choose from {', '.join(allowed)}")
    return items


def add_arguments(p) -> None:
    p.add_argument("--model", default="resnet18", help="model name (see `flowerdist models`)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="images per step per device (the ddp part splits it over its processes, "
                   "so both of its runs train the same global batch)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="no", help="comma list of no, bf16, fp16 (fp16 on the CPU runs the GPU's scaler path, slowly)")
    p.add_argument("--config", help="a recipe whose augmentation (and MixUp/CutMix, EMA) the loops and the pipeline use, "
                   "e.g. configs/flowers/resnet50_gpu.yaml (default: crop + flip)")
    p.add_argument("--data", help="image folder ROOT/<class>/<image> (default: a generated set, made once under data/)")
    p.add_argument("--data-path", default="auto", help="comma list of auto (flowerdist's default for the device), folder, cache")
    p.add_argument("--synthetic-per-class", type=int, default=400)
    p.add_argument("--synthetic-size", type=int, default=256, help="side of the generated images (real photos: 240-500)")
    p.add_argument("--workers", default="auto", help="DataLoader workers of the flowerdist loop (data.num_workers; auto: its default)")
    p.add_argument("--plain-workers", type=int, default=2, help="DataLoader workers of the plain loop (it reads the folder unless --data-path cache)")
    p.add_argument("--pipeline-workers", default="0,1,2", help="worker counts the pipeline part measures")
    p.add_argument("--window", type=int, default=5, help="steps per timed window")
    p.add_argument("--windows", type=int, default=4, help="timed windows per part, after one warm-up window")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the plain and flowerdist loops")
    p.add_argument("--parts", default="model,plain,flowerdist,pipeline", help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--bucket-cap-mb", type=int, default=25, help="DDP gradient bucket size of the ddp part (DDP's default: 25)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (all parts)")
    p.add_argument("--wandb", default="offline", choices=["offline", "disabled"], help="W&B in the flowerdist loop")
    p.add_argument("--out-dir", help="where the JSON, the specs and each part's log go (default runs/bench-<time>)")


def bench_data(args) -> str:
    """The folder to read: --data, or a generated set kept under data/ and reused by later runs."""
    if args.data:
        from flowerdist.data.folder import scan_folder

        return str(scan_folder(args.data).root)
    from flowerdist.data.synth import generate

    root = Path("data") / f"bench_flowers_{args.synthetic_size}px_{args.synthetic_per_class}"
    if not root.is_dir():
        print(f"bench: generating {5 * args.synthetic_per_class} flowers at {args.synthetic_size} px in {root} (once)", flush=True)
        generate(root, per_class=args.synthetic_per_class, size=args.synthetic_size, seed=0, workers=os.cpu_count() or 1)
    return str(root)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_part(part: str, spec: dict, out_dir: Path, tag: str, nprocs: int = 1) -> dict:
    """Run one part in a fresh process (`nprocs` > 1: through `accelerate launch`); its output goes to <tag>.log."""
    spec_file, out, log = (out_dir / f"{tag}{ext}" for ext in (".spec.json", ".json", ".log"))
    spec_file.write_text(json.dumps(spec, indent=1))
    worker = ["-m", "flowerdist.bench_parts", "--part", part, "--spec", str(spec_file), "--out", str(out)]
    env = dict(os.environ)
    if nprocs == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nprocs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *worker]
        if spec["device"] == "cpu":
            env["ACCELERATE_USE_CPU"] = "1"  # several CPU processes: see launch/cpu_multi_process.yaml
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not out.is_file():
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise FlowerdistError(f"bench part '{part}' failed (exit {code}): {tail[0][:300]}; full output in {log}")
    return json.loads(out.read_text())


def _row(part: str, rates: list[float], **extra) -> dict:
    return {"part": part, "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "windows": rates, **extra}


def environment(device: str) -> dict:
    """The machine and the versions. Those of torchvision, accelerate and timm come from the installed packages'
    metadata: importing timm here would cost this process 3 s (torchvision and torch._dynamo with it), paid again
    by each part in its own process."""
    from importlib.metadata import version

    from flowerdist.distributed import describe_machine

    return {**describe_machine(device), "python": platform.python_version(),
            **{name: version(name) for name in ("torchvision", "accelerate", "timm")}}


def run_bench(args) -> dict:
    parts = _csv(args.parts, PARTS)
    precisions = _csv(args.precision, ("no", "bf16", "fp16"))
    data_paths = _csv(args.data_path, ("auto", "folder", "cache"))
    pipeline_workers = [int(w) for w in _csv(args.pipeline_workers)]
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise FlowerdistError("--device cuda but torch sees no GPU; use --device cpu")
    out_dir = Path(args.out_dir or f"runs/bench-{datetime.now():%Y%m%d-%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = bench_data(args)
    base = {
        "model": args.model, "image_size": args.image_size, "batch": args.batch, "device": device, "data": data,
        "workers": args.workers, "plain_workers": args.plain_workers, "workers_list": pipeline_workers, "window": args.window, "windows": args.windows,
        "channels_last": args.channels_last, "compile": args.compile, "bucket_cap_mb": args.bucket_cap_mb, "wandb": args.wandb, "threads": args.threads or None,
        "config": args.config,
    }
    report = {"command": "flowerdist bench " + " ".join(sys.argv[2:]), "env": environment(device), "spec": base, "rows": [], "skipped": []}
    rows = report["rows"]

    def note(row: dict) -> None:
        rows.append(row)
        wait = f", data wait {row['data_wait']:.0%}" if "data_wait" in row else ""
        print(f"bench: {_label(row)}: {row['images_per_s']:.1f} images/s{wait}", flush=True)

    started = time.perf_counter()
    pipelines_measured: set[str] = set()
    for precision in precisions:
        for i, path in enumerate(data_paths):
            spec = {**base, "precision": precision, "cache": {"auto": "auto", "folder": False, "cache": True}[path]}
            # the model step joins the rounds of the first data path, so drift hits it like the loops
            loops = [p for p in ("model", "plain", "flowerdist") if p in parts and (p != "model" or i == 0)]
            pooled: dict[str, list[float]] = {p: [] for p in loops}
            waits: dict[str, list[float]] = {p: [] for p in loops}
            medians: dict[str, list[float]] = {p: [] for p in loops}
            kept: dict[str, dict] = {p: {} for p in loops}  # peak memory (largest over rounds), the first step's seconds
            for rnd in range(args.rounds if loops else 0):  # `--parts pipeline` alone has no loops to alternate
                for part in loops[rnd % len(loops):] + loops[: rnd % len(loops)]:  # rotate the order
                    tag = f"{part}-{precision}-{path}-r{rnd}"
                    r = run_part(part, {**spec, "run_dir": str(out_dir / tag)}, out_dir, tag)
                    pooled[part] += r["rates"]
                    waits[part].append(r.get("data_wait", 0.0))
                    medians[part].append(statistics.median(r["rates"]))
                    if r.get("peak_memory_mib", 0) >= kept[part].get("peak_memory_mib", 0):
                        kept[part].update({k: r[k] for k in ("peak_memory_mib", "peak_memory_of") if k in r})
                    kept[part].setdefault("first_step_s", r.get("first_step_s"))
            for part in loops:
                extra = {"precision": precision} if part == "model" else {"precision": precision, "data_path": path, "data_wait": statistics.mean(waits[part])}
                more = {k: v for k, v in kept[part].items() if v is not None}
                note(_row(part, pooled[part], round_medians=medians[part], **extra, **more))
            if "pipeline" in parts and path not in pipelines_measured:  # no model in it: once per data path
                pipelines_measured.add(path)
                r = run_part("pipeline", spec, out_dir, f"pipeline-{path}")
                for workers, rates in r["rates_by_workers"].items():
                    note(_row("pipeline", rates, data_path=path, workers=int(workers)))
                report.setdefault("stages_ms", {})[path] = r["stages_ms"]
    if "ddp" in parts:
        report["ddp"] = run_ddp({**base, "precision": precisions[0], "cache": False}, out_dir, note)
    report["ratios"] = ratios(rows, args.plain_workers)
    report["seconds"] = time.perf_counter() - started
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    print(format_report(report))
    print(f"bench: JSON in {out_dir / 'bench.json'}")
    return report


def run_ddp(spec: dict, out_dir: Path, note) -> dict:
    """N processes (1 thread each on CPU, 1 GPU each on CUDA) against 1 process with all the threads."""
    import torch

    if spec["device"] == "cuda":
        n, threads = torch.cuda.device_count(), None
        if n < 2:
            return {"skipped": "one GPU: the 2-process step needs two"}
    else:
        threads = spec["threads"] or torch.get_num_threads()
        n = 2
    one = run_part("ddp", {**spec, "threads": threads}, out_dir, "ddp-1proc")
    many = run_part("ddp", {**spec, "threads": threads // n if threads else None}, out_dir, f"ddp-{n}proc", nprocs=n)
    if many.get("world") != n:
        raise FlowerdistError(f"the {n}-process DDP launch formed a world of {many.get('world')}; see {out_dir / f'ddp-{n}proc.log'}")
    note(_row("ddp", one["rates"], processes=one["world"], threads=one["threads"]))
    note(_row("ddp", many["rates"], processes=many["world"], threads=many["threads"]))
    note(_row("ddp", many["no_sync_rates"], processes=many["world"], threads=many["threads"], sync="no_sync"))
    step_s = spec["batch"] / statistics.median(many["rates"])
    local_s = spec["batch"] / statistics.median(many["no_sync_rates"])
    return {
        "processes": many["world"],
        "speedup": statistics.median(many["rates"]) / statistics.median(one["rates"]),
        "step_ms": step_s * 1000,
        "sync_cost_ms": (step_s - local_s) * 1000,
        "allreduce_ms": many["allreduce_ms"],
        "gradient_mib": many["gradient_mib"],
    }


def ratios(rows: list[dict], plain_workers: int) -> dict:
    """Median-of-pooled-windows ratios, and the same ratio round by round (both sides ran in each round)."""
    out = {}
    models = [r for r in rows if r["part"] == "model"]
    for r in rows:
        if r["part"] != "flowerdist":
            continue
        key = f"({r['precision']}, {r['data_path']})"
        for other, name in (("model", "model step"), ("plain", "plain")):
            match = [p for p in rows if p["part"] == other and p["precision"] == r["precision"] and p.get("data_path", r["data_path"]) == r["data_path"]]
            if match:
                out[f"flowerdist/{name} {key}"] = r["images_per_s"] / match[0]["images_per_s"]
                out[f"flowerdist/{name} per round {key}"] = [f / p for f, p in zip(r["round_medians"], match[0]["round_medians"])]
    for r in rows:
        if r["part"] == "pipeline" and r["workers"] == plain_workers and models:
            out[f"pipeline/model ({r['data_path']}, {plain_workers} workers, vs {models[0]['precision']})"] = r["images_per_s"] / models[0]["images_per_s"]
    return out


def stage_table(stages: dict[str, dict[str, float]]) -> list[str]:
    """Per-image cost of each pipeline stage on one core, by data path, and the cores that feed a GPU at each rate."""
    if not stages:
        return []
    from flowerdist.data.costs import RATES, cores_needed

    paths = list(stages)
    names = list(dict.fromkeys(name for path in paths for name in stages[path]))
    lines = [f"| stage, ms per image on one core | {' | '.join(paths)} |", f"| --- |{' ---: |' * len(paths)}"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{stages[p][name]:.3f}" if name in stages[p] else "" for p in paths) + " |")
    totals = {p: sum(stages[p].values()) for p in paths}
    lines.append("| **total** | " + " | ".join(f"**{totals[p]:.2f}**" for p in paths) + " |")
    for rate in RATES:
        lines.append(f"| cores per GPU at {rate:,} images/s | " + " | ".join(f"{cores_needed(totals[p], rate):.1f}" for p in paths) + " |")
    return lines + [""]


def _label(row: dict) -> str:
    text = LABELS[row["part"]]
    if row["part"] == "pipeline":
        return f"{text}, {row['data_path']}, {row['workers']} worker{'s' * (row['workers'] != 1)}"
    if row["part"] == "ddp":
        return f"{text}, {row['processes']} process{'es' * (row['processes'] > 1)} x {row['threads']} threads{', no_sync' if row.get('sync') else ''}"
    return text + (f", {row['precision']}" if row.get("precision") else "") + (f", {row['data_path']}" if row.get("data_path") else "")


def format_report(report: dict) -> str:
    env, spec = report["env"], report["spec"]
    lines = [
        f"flowerdist bench: {spec['model']} at {spec['image_size']} px, batch {spec['batch']}, "
        f"{'channels_last' if spec['channels_last'] else 'NCHW'}{', compiled' if spec['compile'] else ''}, data {spec['data']}",
        f"device {env['device_name']}, {spec['threads'] or env['threads']} torch threads per process, torch {env['torch']}, torchvision {env['torchvision']}, accelerate {env['accelerate']}, "
        f"timm {env['timm']}, python {env['python']}",
        "",
        f"| {'part':<58} | images/s | min-max        | data wait | peak memory (MiB) |",
        f"| {'-' * 58} | -------: | -------------- | --------: | ----------------: |",
    ]
    for r in report["rows"]:
        wait = f"{r['data_wait']:.1%}" if "data_wait" in r else ""
        memory = f"{r['peak_memory_mib']:,.0f} {r['peak_memory_of']}" if "peak_memory_mib" in r else ""
        lines.append(f"| {_label(r):<58} | {r['images_per_s']:8.1f} | {r['min']:6.1f}-{r['max']:<7.1f} | {wait:>9} | {memory:>17} |")
    compiled = [r for r in report["rows"] if r["part"] == "model" and spec["compile"] and "first_step_s" in r]
    lines += [f"first step (compilation): {r['first_step_s']:.1f} s ({r['precision']}), not in the images/s" for r in compiled]
    lines += ["", *stage_table(report.get("stages_ms", {}))]
    ratios_ = report["ratios"]
    for name, value in ratios_.items():
        if " per round " in name:
            continue
        goal = {"flowerdist/model": "goal >= 0.95", "flowerdist/plain": "goal >= 0.98"}.get(name.split(" ")[0], "goal >= 5")
        rounds = ratios_.get(name.replace(" (", " per round (", 1)) if name.startswith("flowerdist/") else None
        if rounds and len(rounds) > 1:  # both sides ran in every round: the median of the rounds resists drift best
            value, goal = statistics.median(rounds), f"median of {len(rounds)} alternating rounds {', '.join(f'{v:.3f}' for v in rounds)}; {goal}"
        lines.append(f"{name}: {value:.3f} ({goal})")
    ddp = report.get("ddp")
    if ddp and "skipped" not in ddp:
        lines.append(
            f"DDP: {ddp['processes']} processes / 1 process at the same total threads: {ddp['speedup']:.2f}x; step {ddp['step_ms']:.0f} ms, "
            f"of which gradient sync {ddp['sync_cost_ms']:.0f} ms; one all-reduce of {ddp['gradient_mib']:.0f} MiB: {ddp['allreduce_ms']:.0f} ms"
        )
    elif ddp:
        lines.append(f"DDP: skipped, {ddp['skipped']}")
    lines += [f"skipped {s}" for s in report["skipped"]]
    lines.append(f"({report['seconds']:.0f} s)")
    return "\n".join(lines)
