"""`flowerdist` command line: parse, build, run, close. User mistakes end as one line on stderr (exit 2)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from flowerdist.errors import EXIT_PREEMPTED, FlowerdistError, Preempted


def _train(args) -> None:
    from flowerdist.config import load_config

    cfg = load_config(args.config, args.overrides)  # config mistakes fail before torch is even imported (~5 s here)
    from flowerdist.train import train

    train(cfg)


def _config(args) -> None:
    from flowerdist.config import keys_table, load_config

    if args.keys:
        print(keys_table())
        return
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")


def _eval(args) -> None:
    from flowerdist.inference import run_eval

    result = run_eval(args.checkpoint, args.overrides)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"checkpoint {result['checkpoint']}\n{result['scope']}: {result['count']} images")
    print(f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}")
    width = max(len(c) for c in result["classes"])
    header = "actual/predicted"
    width = max(width, len(header))
    print(f"{header:>{width}}  " + " ".join(f"{c[:6]:>6}" for c in result["classes"]) + "  accuracy")
    for name, row, acc in zip(result["classes"], result["confusion"], result["per_class_accuracy"]):
        print(f"{name:>{width}}  " + " ".join(f"{n:>6}" for n in row) + f"  {acc:.4f}")
    if result["recorded"]:
        print(f"recorded in {result['recorded']} (`flowerdist report` shows it)")


def _predict(args) -> int:
    from flowerdist.data.images import shown
    from flowerdist.inference import run_predict

    results = run_predict(args.checkpoint, args.images, topk=args.topk)
    if args.plot:
        from flowerdist.inference import plot_predictions

        out, drawn, predicted = plot_predictions(results, args.plot)
        which = "" if drawn == predicted else f" (the first {drawn} of {predicted} images; the printed results have all)"
        print(f"predictions plotted in {out}{which}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1))
    for r in results:
        if "skipped" in r:
            print(f"flowerdist: skipped {shown(r['image'])}: {r['skipped']}", file=sys.stderr)
        elif not args.json:
            preds = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
            print(f"{r['image']}: {preds}")
    skipped = sum("skipped" in r for r in results)
    if skipped:  # every good image was predicted; the status says that not all were
        print(f"flowerdist: {skipped} of {len(results)} images skipped", file=sys.stderr)
        return 1
    return 0


def _synth(args) -> None:
    from flowerdist.data.synth import generate

    out = generate(args.out, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {args.per_class} images per class ({args.size} px) to {out}")


def _check(args) -> None:
    from flowerdist.data.check import check_folder, usable_index
    from flowerdist.data.folder import scan_folder

    index = scan_folder(args.root)
    report = check_folder(index)
    if args.json:
        print(json.dumps({"root": str(report.root), "total": report.total, "skipped": report.skipped,
                          "converted": report.converted, "counts": report.counts}, indent=1))
    else:
        print("\n".join(report.lines()))
    usable_index(index, report.skipped)  # a class left without images: the one-line error training would give


def _download(args) -> None:
    from flowerdist.data.download import download

    print(f"flower_photos in {download(args.out)}")


def _report(args) -> None:
    from flowerdist.report import write_report

    write_report(args.runs, args.out, baseline=args.baseline, per_run=args.per_run, records=args.save_records, flat_margin=args.flat_margin)


def _export(args) -> None:
    from flowerdist.export import export

    export(args.checkpoint, args.format, args.out)


def _sweep(args) -> None:
    from flowerdist.sweep import run_sweep

    run_sweep(args.file, args.variant, args.overrides, dry_run=args.dry_run, slurm=args.slurm, cell=args.cell, reuse_from=args.reuse_from)


def _bench(args) -> None:
    from flowerdist.bench import run_bench

    run_bench(args)


def _rendezvous_store(args) -> None:
    from flowerdist.rendezvous import serve

    serve(args.host, args.port)


def _models(args) -> None:
    from flowerdist.models import list_models

    print("\n".join(list_models()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowerdist", description="Train residual networks on flower photos, from one CPU to many GPU nodes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (a single process; use `accelerate launch -m flowerdist train` for several)")
    p.add_argument("-c", "--config", help="YAML config (see configs/); defaults apply without one")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.lr=0.01")
    p.set_defaults(func=_train)

    p = sub.add_parser("config", help="print the resolved config (defaults < YAML < KEY=VALUE), or every key with --keys")
    p.add_argument("-c", "--config", help="YAML config (see configs/)")
    p.add_argument("--keys", action="store_true", help="the markdown table of every key: default and meaning")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_config)

    p = sub.add_parser("eval", help="accuracy, per-class accuracy and confusion matrix of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a run directory (its best checkpoint) or a checkpoint path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.root=FOLDER to evaluate all of another folder")
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="classify images")
    p.add_argument("--checkpoint", required=True, help="a run directory (its best checkpoint) or a checkpoint path")
    p.add_argument("--topk", type=int, default=1, help="how many classes to show per image")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="OUT.png", help="also save a picture: each image (the first 24) with its top class and a bar of the top-k")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.set_defaults(func=_predict)

    p = sub.add_parser("report", help="a table and figures (report.md + PNGs) from run directories, offline")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output folder (default RUN_DIR/report for one run, reports/<time>/ for several)")
    p.add_argument("--baseline", help="the row the others are compared with (paired CI): text in its runs' directory names (default: the first row)")
    p.add_argument("--per-run", dest="per_run", action=argparse.BooleanOptionalAction, default=None,
                   help="each run's confusion matrix and mistakes grid (default: with at most 6 runs)")
    p.add_argument("--save-records", metavar="DIR", help="also copy each run's record (config, metrics, result: no weights) "
                   "to DIR/<run folder>, to keep or commit; report reads a record like a run directory")
    p.add_argument("--flat-margin", dest="flat_margin", type=float, default=0.02, metavar="LOSS",
                   help="a step to the next budget (a doubling, say) that is shown to lower the final training loss by less than this has "
                   "flattened it (default 0.02)")
    p.set_defaults(func=_report)

    p = sub.add_parser("export", help="the run's best weights as ONNX or TorchScript, with its preprocessing and a parity check")
    p.add_argument("--checkpoint", required=True, help="a run directory (its best checkpoint) or a checkpoint path")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True, help="the model file to write; FILE.json gets the preprocessing")
    p.set_defaults(func=_export)

    data = sub.add_parser("data", help="make or fetch flower data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate a procedural five-class flower set (JPEGs)")
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)
    p = data.add_parser("check", help="report unreadable, converted and skipped images of a folder, without training")
    p.add_argument("root")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_check)
    p = data.add_parser("download", help="fetch TensorFlow's flower_photos (3,670 photos), verified and extracted")
    p.add_argument("--out", default="data")
    p.set_defaults(func=_download)

    p = sub.add_parser("sweep", help="train every cell of a grid (configs/experiments/), skipping finished cells and resuming partial ones")
    p.add_argument("file", help="sweep file: config, overrides, grid, output_dir, variants")
    p.add_argument("--variant", help="a variant of the sweep file, e.g. cpu (its overrides are added to every cell)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their state, train nothing")
    p.add_argument("--slurm", action="store_true", help="submit one Slurm job array (a task per unfinished cell) instead of training here")
    p.add_argument("--reuse-from", action="append", default=[], metavar="DIR",
                   help="also reuse finished runs under DIR (repeatable; ./runs and the sweep's own folder are always searched)")
    p.add_argument("--cell", type=int, help=argparse.SUPPRESS)  # slurm/launch.sh: print cell N's train arguments
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every cell, e.g. data.root=PHOTOS")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("bench", help="images/s of the model step, a plain PyTorch loop, the flowerdist loop and the data pipeline")
    from flowerdist.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("rendezvous-store", help="host elastic training's rendezvous store on a machine that outlives the nodes")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=29400)
    p.set_defaults(func=_rendezvous_store)

    p = sub.add_parser("models", help="list the model names")
    p.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides given after an option (`sweep FILE --dry-run a.b=1`) land here
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        code = args.func(args) or 0
    except Preempted:
        return EXIT_PREEMPTED
    except FlowerdistError as err:
        print(f"flowerdist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowerdist: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flowerdist sweep ... --dry-run | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would raise again
        return 141
    return code


def run() -> None:
    """The process entry point (`flowerdist`, `python -m flowerdist`, every rank of a launcher)."""
    code = main()
    # Python's last collections at exit walk every object that importing torch, torchvision and timm
    # made: ~1.2 s of CPU per process here. Frozen objects are skipped; everything is still freed.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
