"""Results people look at: `flowerdist report` (table + figures, offline), pictures in W&B,
`predict --plot`, and `flowerdist export` with its parity check."""

from __future__ import annotations

import json
import shutil
import statistics
import sys

import pytest
import yaml
from PIL import Image

from conftest import TINY, on_one_worker, run_cli
from wandb_offline import history

# one worker for the module: `three_runs` (three trainings, about 12 s of a core) is then built once, not per worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("results")]


def short_run(data, run, *extra):
    run_cli("train", "-c", "configs/quickstart.yaml", f"data.root={data}", f"train.output_dir={run}", *TINY,
            "train.epochs=2", "log.wandb=disabled", *extra)
    return run


@pytest.fixture(scope="module")
def three_runs(tiny_data, tmp_path_factory, pytestconfig):
    """Two seeds of one config and one other config."""
    on_one_worker(tmp_path_factory, pytestconfig, "results")
    root = tmp_path_factory.mktemp("report_runs")
    return [short_run(tiny_data, root / "seed0", "train.seed=0"), short_run(tiny_data, root / "seed1", "train.seed=1"),
            short_run(tiny_data, root / "resnet", "model.name=resnet18", "data.image_size=32", "model.shortcut=A",
                      "train.ema_decay=0.9", "train.best_of=ema")]


def epochs(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val/accuracy" in line]


def table(report):
    """The report's first table (the rows of runs)."""
    text = report.read_text()
    first = text[text.index("\n| "):].split("\n\n")[0]
    lines = [line for line in first.strip().splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    keys = [k.strip() for k in lines[0].strip("|").split("|")]
    return [dict(zip(keys, (v.strip() for v in line.strip("|").split("|")))) for line in lines[1:]]


def test_report_of_one_run(three_runs):
    run = three_runs[0]
    proc = run_cli("report", str(run))
    report = run / "report" / "report.md"
    assert f"report: {report}" in proc.stdout
    (row,) = table(report)
    accs = [e["val/accuracy"] for e in epochs(run)]
    assert row["best val acc"] == f"{max(accs):.3f}" and row["final val acc"] == f"{accs[-1]:.3f}"
    assert row["model"] == "seed_resnet" and row["epochs"] == "2 of 2" and row["global batch"] == "16" and row["world size"] == "1"
    info = json.loads((run / "run.json").read_text())
    assert row["machine"] == f"cpu: {info['device_name']}, {info['cpu_capability']}" and "cores" in info["device_name"]
    assert row["status"] == "finished" and row["parameters"].endswith(" M")
    last = epochs(run)[-1]
    assert f"tulips {last['val/accuracy/tulips']:.2f}" in row["per-class acc (final)"]
    # training time from the log windows (steps x global batch / images/s; evaluation excluded), to 3 significant digits
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [e for e in logged if "train/images_per_s" in e]
    steps = [e["step"] - p["step"] for p, e in zip([{"step": 0}, *windows], windows)]
    minutes = sum(n * 16 / e["train/images_per_s"] for n, e in zip(steps, windows)) / 60
    assert row["training minutes"] == f"{minutes:.3g}" and minutes > 0, (row["training minutes"], minutes)
    for name in ("curves.png", "throughput.png", "per_class.png", "confusion-seed0.png", "mistakes-seed0.png"):
        assert (run / "report" / name).is_file() and f"({name})" in report.read_text(), name
        assert Image.open(run / "report" / name).size[0] > 300


def test_report_of_three_runs_groups_seeds(three_runs, tmp_path):
    out = tmp_path / "three"
    run_cli("report", *map(str, three_runs), "--out", str(out))
    rows = table(out / "report.md")
    assert len(rows) == 2
    seeds = next(r for r in rows if "n=2, seeds 0, 1" in r["run"])
    best = [max(e["val/accuracy"] for e in epochs(r)) for r in three_runs[:2]]
    assert seeds["best val acc"] == f"{statistics.mean(best):.3f} ± {statistics.stdev(best):.3f}"
    loss = [epochs(r)[-1]["train/epoch_loss"] for r in three_runs[:2]]  # the last epoch's: what flattens, or not
    assert seeds["final training loss"] == f"{statistics.mean(loss):.3f} ± {statistics.stdev(loss):.3f}"
    other = next(r for r in rows if r is not seeds)
    assert other["model"] == "resnet18" and other["shortcut"] == "A" and "±" not in other["best val acc"]
    ema = [e["val_ema/accuracy"] for e in epochs(three_runs[2])]  # best_of=ema: the row shows the EMA's accuracies
    assert other["weights"] == "EMA" and seeds["weights"] == "model"
    assert other["best val acc"] == f"{max(ema):.3f}" and other["final val acc"] == f"{ema[-1]:.3f}"
    assert len(list(out.glob("confusion-*.png"))) == 3


def test_report_marks_a_run_cut_short_and_refuses_a_folder_that_is_not_a_run(three_runs, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(three_runs[0], cut)
    (cut / "result.json").unlink()
    run_cli("report", str(cut))
    (row,) = table(cut / "report" / "report.md")
    assert row["status"].startswith("in progress or cut short")
    # the cells of two finished seeds rerun elsewhere, one epoch in: a row of their own, no interval, and no place in
    # the budget plot (their 1-epoch numbers are not their config's budget: they would make a second one)
    live = [cut, tmp_path / "cut1"]
    shutil.copytree(three_runs[1], live[1])
    (live[1] / "result.json").unlink()
    for run in live:
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        first_epoch = next(i for i, line in enumerate(lines) if "val/accuracy" in line)
        (run / "metrics.jsonl").write_text("".join(lines[:first_epoch + 1]))
    run_cli("report", str(three_runs[0]), str(three_runs[1]), *map(str, live), "--out", str(tmp_path / "live"))
    finished, rerun = table(tmp_path / "live" / "report.md")
    assert "seed0, seed1 (n=2" in finished["run"] and finished["status"] == "finished" and finished["epochs"] == "2 of 2"
    assert "cut, cut1 (n=2" in rerun["run"] and rerun["epochs"] == "1 of 2" and rerun["status"].startswith("in progress or cut short")
    difference = "final acc - seed0 (95% CI, paired by seed)"
    assert finished[difference] == "baseline" and rerun[difference] == "", rerun[difference]
    assert "Accuracy against the training budget" not in (tmp_path / "live" / "report.md").read_text()
    proc = run_cli("report", str(three_runs[0]), *map(str, live), "--out", str(tmp_path / "live"), "--baseline", "cut1", check=False)
    assert proc.returncode == 2 and "--baseline cut1: no finished row" in proc.stderr  # intervals against a partial run: refused
    proc = run_cli("report", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "is not a flowerdist run directory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_runs_record_reports_as_the_run_does(three_runs, tmp_path):
    """--save-records keeps what the table and curves read, without weights or the split's file list: reported from
    the records, the rows are the runs' rows (per-class accuracy from class_indices.json). Two runs of one folder
    name would overwrite each other's record: refused."""
    from flowerdist.report import RECORD_FILES

    records = tmp_path / "records"
    run_cli("report", *map(str, three_runs), "--out", str(tmp_path / "runs"), "--save-records", str(records))
    for run in three_runs:
        assert sorted(p.name for p in (records / run.name).iterdir()) == sorted(p.name for p in run.iterdir() if p.name in RECORD_FILES)
        assert {"config.yaml", "metrics.jsonl", "result.json"} <= {p.name for p in (records / run.name).iterdir()}
    out = run_cli("report", *(str(records / r.name) for r in three_runs), "--out", str(tmp_path / "recs")).stdout
    assert table(tmp_path / "recs" / "report.md") == table(tmp_path / "runs" / "report.md")
    assert (tmp_path / "recs" / "per_class.png").is_file() and "the run has no checkpoint (a record" in out
    twin = tmp_path / "elsewhere" / three_runs[0].name
    shutil.copytree(three_runs[0], twin)
    proc = run_cli("report", str(three_runs[0]), str(twin), "--save-records", str(records), check=False)
    assert proc.returncode == 2 and f"several runs are named {twin.name}" in proc.stderr
    (twin / "result.json").unlink()  # the same cell rerun, still in progress: its record is no longer finished
    run_cli("report", str(twin), "--out", str(tmp_path / "twin"), "--save-records", str(records))
    assert not (records / twin.name / "result.json").exists()
    (tmp_path / "a_file").write_text("not a folder")  # a mistyped DIR: one line naming it
    proc = run_cli("report", str(twin), "--out", str(tmp_path / "twin"), "--save-records", str(tmp_path / "a_file"), check=False)
    assert proc.returncode == 2 and f"--save-records {tmp_path / 'a_file'}: cannot write" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_results_stay_with_the_run_and_report_tabulates_them(three_runs, tmp_path):
    """`flowerdist eval` of a run's checkpoint at another size appends to RUN/evals.jsonl; report shows the latest
    result per checkpoint and overrides (mean ± std over seeds, naming them when not every seed ran it, and its
    paired 95% interval to the baseline), leaves out one a later epoch made stale, and a record keeps it. A file that cannot be written costs a note, not the result."""
    from flowerdist.report import load_run

    seeds = three_runs[:2]
    accs = []
    for run in seeds:
        out = json.loads(run_cli("eval", "--checkpoint", str(run / "checkpoints" / "last"), "eval.flip=true", "--json").stdout)
        assert out["recorded"] == str(run / "evals.jsonl")
        entry = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
        assert entry["checkpoint"] == "last" and entry["overrides"] == ["eval.flip=true"] and entry["accuracy"] == out["accuracy"]
        assert entry["step"] == epochs(run)[-1]["step"] and out["count"] == 40
        accs.append(out["accuracy"])
    text = run_cli("eval", "--checkpoint", str(seeds[0])).stdout  # the run directory: its best checkpoint
    assert f"recorded in {seeds[0] / 'evals.jsonl'}" in text
    assert json.loads((seeds[0] / "evals.jsonl").read_text().splitlines()[-1])["checkpoint"] == "best"
    # a second row with the same seeds: records of the two runs with another label smoothing and known eval results
    other = []
    for run, delta in zip(seeds, (0.1, 0.3)):
        copy = tmp_path / "other" / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
        config = yaml.safe_load((copy / "config.yaml").read_text())
        config["train"]["label_smoothing"] = 0.05
        (copy / "config.yaml").write_text(yaml.safe_dump(config))
        entry = {"checkpoint": "last", "step": epochs(run)[-1]["step"], "overrides": ["eval.flip=true"]}
        stale = {**entry, "step": 1, "accuracy": 0.0}  # an evaluation of an earlier `last`: not shown
        (copy / "evals.jsonl").write_text(json.dumps({**entry, "accuracy": accs[len(other)] + delta}) + "\n" + json.dumps(stale) + "\n")
        other.append(copy)
    run_cli("report", *map(str, seeds), *map(str, other), "--out", str(tmp_path / "r"))
    rows = table(tmp_path / "r" / "report.md")
    label = "eval last eval.flip=true"
    assert rows[0][label] == (f"{accs[0]:.3f}" if accs[0] == accs[1] else f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f}")
    assert rows[1][label] == f"{statistics.mean(accs) + 0.2:.3f} ± {statistics.stdev([accs[0] + 0.1, accs[1] + 0.3]):.3f}"
    assert rows[1][f"{label} - seed0 (95% CI)"] == "+0.200 [-1.071, +1.471] (n=2)"  # diffs 0.1, 0.3: t(1) 12.706 x 0.1
    best = max(e["val/accuracy"] for e in epochs(seeds[0]))
    assert load_run(seeds[0]).evals["best"] == best
    assert rows[0]["eval best"] == f"{best:.3f} (seed 0 of 2)"  # seed1's best was not evaluated: the cell says whose it is
    assert rows[1]["eval best"] == ""
    assert "eval best" not in load_run(other[0]).evals
    (other[0] / "evals.jsonl").write_text(json.dumps(stale) + "\n")
    assert load_run(other[0]).evals == {}  # only the stale one: nothing to show
    run_cli("report", *map(str, seeds), "--out", str(tmp_path / "s"), "--save-records", str(tmp_path / "records"))
    assert (tmp_path / "records" / seeds[0].name / "evals.jsonl").read_text() == (seeds[0] / "evals.jsonl").read_text()
    broken = tmp_path / "broken"
    shutil.copytree(seeds[1], broken, ignore=shutil.ignore_patterns("evals.jsonl", "wandb"))
    (broken / "evals.jsonl").mkdir()  # cannot be appended to
    proc = run_cli("eval", "--checkpoint", str(broken / "checkpoints" / "last"), "--json")
    assert json.loads(proc.stdout)["recorded"] is None and json.loads(proc.stdout)["count"] == 40
    assert f"the result was not recorded in {broken / 'evals.jsonl'}" in proc.stderr


def test_report_gives_the_test_accuracy_and_its_paired_interval(three_runs, tmp_path):
    """Runs with data.test_root: the row's test accuracy (best / last checkpoint) and the last checkpoint's paired 95%
    interval to the baseline row (from copies of two seeds' records with known test results); the final training
    loss gets its paired interval too (what tells whether a deeper plain network trains worse). A row whose seeds
    trained on two machines names each with its seeds."""
    for group, ls, last in (("a", 0.1, (0.60, 0.70)), ("b", 0.05, (0.70, 0.90))):
        for run, acc in zip(three_runs[:2], last):
            copy = tmp_path / group / run.name
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "wandb", "evals.jsonl"))
            config = yaml.safe_load((copy / "config.yaml").read_text())
            config["train"]["label_smoothing"] = ls
            (copy / "config.yaml").write_text(yaml.safe_dump(config))
            lines = (copy / "metrics.jsonl").read_text().splitlines()
            final_epoch = max(i for i, line in enumerate(lines) if "train/epoch_loss" in line)
            lines[final_epoch] = json.dumps({**json.loads(lines[final_epoch]), "train/epoch_loss": acc + 1})  # a known final training loss
            lines.append(json.dumps({"step": epochs(run)[-1]["step"], "test/best/accuracy": 0.5, "test/last/accuracy": acc}))
            (copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    info = json.loads((three_runs[1] / "run.json").read_text())
    here = f"cpu: {info['device_name']}, {info['cpu_capability']}"
    (tmp_path / "b" / three_runs[1].name / "run.json").write_text(json.dumps({**info, "device_name": "Other CPU (2 cores)"}))  # seed 1 of b elsewhere
    run_cli("report", *map(str, sorted(tmp_path.glob("[ab]/*"))), "--out", str(tmp_path / "r"))
    rows = table(tmp_path / "r" / "report.md")
    assert [r["machine"] for r in rows] == [here, f"{here} (seed 0); cpu: Other CPU (2 cores), {info['cpu_capability']} (seed 1)"]
    assert [r["test acc, best / last checkpoint"] for r in rows] == ["0.500 / 0.650 ± 0.071", "0.500 / 0.800 ± 0.141"]
    assert [r["test acc (last) - seed0 (95% CI)"] for r in rows] == ["baseline", "+0.150 [-0.485, +0.785] (n=2)"]  # diffs 0.1, 0.2: 12.706 x 0.05
    assert [r["final training loss"] for r in rows] == ["1.650 ± 0.071", "1.800 ± 0.141"]
    assert [r["final training loss - seed0 (95% CI)"] for r in rows] == ["baseline", "+0.150 [-0.485, +0.785] (n=2)"]


def test_mistakes_grid_is_skipped_with_a_note_without_the_data(three_runs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(three_runs[0], moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"]["root"] = str(tmp_path / "gone")  # the photos it trained on are no longer there
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    out = run_cli("report", str(moved)).stdout
    assert "no mistakes grid for moved: its data folder" in out
    assert not (moved / "report" / "mistakes-moved.png").exists() and (moved / "report" / "confusion-moved.png").is_file()


def test_wandb_gets_the_confusion_matrix_and_mistakes_as_images(trained_run):
    rows = [r for path in trained_run.glob("wandb/offline-run-*/run-*.wandb") for r in history(path)]
    images = [r for r in rows if r.get("val/confusion_matrix/_type") == "image-file"]
    assert images and all(r.get("val/mistakes/_type") == "image-file" for r in images)
    accs = [e["val/accuracy"] for e in epochs(trained_run)]
    improved = sum(a > max(accs[:i], default=-1) for i, a in enumerate(accs))
    last_is_best = accs[-1] > max(accs[:-1])
    assert len(images) == improved + (0 if last_is_best else 1)  # each new best, and the end
    media = list(trained_run.glob("wandb/offline-run-*/files/media/images/val/*.png"))
    assert len(media) == 2 * len(images)


def test_predict_plot_writes_the_picture(trained_run, tiny_data, tmp_path):
    images = [str(tiny_data / "roses" / f"roses_{i:05d}.jpg") for i in range(4)]
    run_cli("predict", "--checkpoint", str(trained_run), "--topk", "3", "--plot", str(tmp_path / "p.png"), *images)
    width, height = Image.open(tmp_path / "p.png").size
    assert 1000 < width < 1700 and 500 < height < 850  # a grid of 3 columns x 2 rows (4.4 x 3.2 in each at 110 dpi)
    run_cli("predict", "--checkpoint", str(trained_run), "--plot", str(tmp_path / "one.png"), images[0])
    assert Image.open(tmp_path / "one.png").size[0] < width
    proc = run_cli("predict", "--checkpoint", str(trained_run), "--json", "--plot", str(tmp_path / "all.png"), str(tiny_data / "roses"))
    assert len(json.loads(proc.stdout)) == 40 and "the first 24 of 40 images" in proc.stderr  # all predicted, 24 drawn
    assert 2450 < Image.open(tmp_path / "all.png").size[1] < 3400  # 8 rows of 3.2 in, not 14
    proc = run_cli("predict", "--checkpoint", str(trained_run), "--plot", str(tmp_path / "p.jpg"), images[0], check=False)
    assert proc.returncode == 2 and "must name a .png file" in proc.stderr


@pytest.mark.parametrize("model, fmt", [("seed_resnet", "onnx"), ("resnet18-A", "onnx"), ("timm/resnet18", "onnx"),
                                        ("resnet18-A", "torchscript")])
def test_export_parity(tiny_data, tmp_path, trained_run, model, fmt):
    if model == "seed_resnet":
        run = trained_run
    else:
        name, _, shortcut = model.partition("-")
        run = short_run(tiny_data, tmp_path / "run", f"model.name={name}", "data.image_size=32", "train.epochs=1",
                        "train.max_steps=3", *([f"model.shortcut={shortcut}"] if shortcut else []))
    out = tmp_path / f"model.{fmt}"
    run_cli("export", "--checkpoint", str(run), "--format", fmt, "--out", str(out))
    sidecar = json.loads((tmp_path / f"model.{fmt}.json").read_text())
    assert sidecar["classes"] == ["daisy", "dandelion", "roses", "sunflowers", "tulips"] and sidecar["format"] == fmt
    assert sidecar["mean"] == [0.485, 0.456, 0.406] and sidecar["resize"]["short_side"] >= sidecar["input"]["shape"][2]
    # Independently of export's own check: the run's validation photos, prepared as the sidecar says, through the
    # exported file (onnxruntime / torch.jit.load) and through the eager model rebuilt from the checkpoint.
    import numpy as np
    import torch
    from torchvision.transforms.v2 import functional as F

    from flowerdist.inference import load_model

    size, short = sidecar["input"]["shape"][2], sidecar["resize"]["short_side"]
    photos = json.loads((run / "split.json").read_text())["val"][:6]
    root = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    batch = torch.stack([F.center_crop(F.resize(F.pil_to_tensor(Image.open(f"{root}/{p}").convert("RGB")), short, antialias=True), size)
                         for p in photos]).float() / 255
    x = ((batch - torch.tensor(sidecar["mean"]).view(1, 3, 1, 1)) / torch.tensor(sidecar["std"]).view(1, 3, 1, 1)).contiguous()
    with torch.no_grad():
        eager = load_model(run)[0](x)
    if fmt == "onnx":
        import onnx
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        exported = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch axis
    else:
        with torch.no_grad():
            exported = torch.jit.load(str(out))(x)
    assert exported.shape == eager.shape == (6, 5) and eager.std() > 0
    assert float((exported - eager).abs().max()) <= 1e-4
    assert np.array_equal(exported.argmax(1).numpy(), eager.argmax(1).numpy())


def test_export_without_onnx_names_the_extra(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails as if it were not installed
    proc = run_cli("export", "--checkpoint", trained_run, "--format", "onnx", "--out", tmp_path / "m.onnx", check=False)
    assert proc.returncode == 2 and "pip install -e '.[export]'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


# ---- statistics over seeds and budgets (report.py), on run records built in memory -----------------------------


def fake_run(tmp_path, name, finals, seed, epochs=6, shortcut="B", model="resnet18"):
    """A finished run's record as load_run makes it: the config, one validation event per epoch and a result."""
    from flowerdist.config import load_config
    from flowerdist.report import Run

    cfg = load_config(None, [f"model.name={model}", f"model.shortcut={shortcut}", f"train.seed={seed}", f"train.epochs={epochs}"])
    events = [{"step": 10 * (i + 1), "val/accuracy": acc, "train/epoch_loss": 1 - acc} for i, acc in enumerate(finals)]
    return Run(tmp_path / name, cfg, events, result={"global_step": events[-1]["step"]})


def test_paired_interval_of_the_difference_to_the_baseline(tmp_path):
    from flowerdist.report import paired_difference

    base = [fake_run(tmp_path, f"b{s}", [0.5, acc], s) for s, acc in enumerate([0.70, 0.72, 0.68])]
    other = [fake_run(tmp_path, f"o{s}", [0.5, acc], s, shortcut="A") for s, acc in enumerate([0.71, 0.75, 0.70])]
    # differences 0.01, 0.03, 0.02: mean 0.02, sd 0.01, t(2) = 4.303 -> half-width 0.02484
    assert paired_difference(other, base) == "+0.020 [-0.005, +0.045] (n=3)"
    unpaired = [fake_run(tmp_path, "u", [0.9], 7, shortcut="A")]  # no seed in common with the baseline
    assert paired_difference(unpaired, base) == ""
    # seed 0 run again (on another machine): still one seed, whose value is its runs' mean (0.71 and 0.69 -> 0.70)
    assert paired_difference(other[:2] + [fake_run(tmp_path, "o0b", [0.5, 0.69], 0, shortcut="A")], base) == "+0.015 [-0.176, +0.206] (n=2)"


def test_budget_curves_join_the_budgets_of_one_network(tmp_path):
    from flowerdist.report import budget_curves

    runs = [fake_run(tmp_path, f"r{e}-{s}", [0.1] * (e - 1) + [acc], s, epochs=e)
            for e, accs in ((2, (0.50, 0.54)), (4, (0.60, 0.62))) for s, acc in enumerate(accs)]
    runs.append(fake_run(tmp_path, "plain", [0.3, 0.4], 0, epochs=2, shortcut="none"))  # one budget: no curve
    curves = budget_curves(runs)
    assert list(curves) == ["resnet18 (shortcut B)"]
    (s1, m1, h1, l1, lh1, n1), (s2, m2, h2, l2, lh2, n2) = curves["resnet18 (shortcut B)"]
    assert (s1, s2) == (20, 40) and (n1, n2) == (2, 2) and (m1, m2) == (pytest.approx(0.52), pytest.approx(0.61))
    assert h1 == pytest.approx(12.706 * statistics.stdev([0.50, 0.54]) / 2**0.5)
    assert (l1, l2) == (pytest.approx(0.48), pytest.approx(0.39)) and lh1 == pytest.approx(h1)  # the last epoch's loss
    again = budget_curves(runs + [fake_run(tmp_path, "r4-1b", [0.1] * 3 + [0.64], 1, epochs=4)])  # seed 1 again, another machine
    assert again["resnet18 (shortcut B)"][1][1:] == (pytest.approx(0.615), pytest.approx(12.706 * statistics.stdev([0.60, 0.63]) / 2**0.5),
                                                     pytest.approx(0.385), pytest.approx(12.706 * statistics.stdev([0.60, 0.63]) / 2**0.5), 2)
    from flowerdist.figures import budget_figure

    acc_ax, loss_ax = budget_figure(curves).axes  # accuracy and training loss, side by side
    assert list(loss_ax.lines[0].get_ydata()) == [pytest.approx(0.48), pytest.approx(0.39)]
    assert acc_ax.get_title() == "accuracy against budget (mean, 95% CI over 2 seeds)"
    one_seed = {name: [(*p[:5], 1) for p in points] for name, points in curves.items()}
    assert budget_figure(one_seed).axes[0].get_title() == "accuracy against budget (one seed, no interval)"


def test_loss_flattening_names_the_budget_from_which_the_loss_no_longer_falls(tmp_path):
    from flowerdist.report import loss_flattening

    def network(model, losses_by_epochs, shortcut="B"):  # {epochs: the final training loss of seeds 0, 1, 2}
        return [fake_run(tmp_path, f"{model}{shortcut}-{e}-{s}", [0.0] * (e - 1) + [1 - loss], s, epochs=e, model=model, shortcut=shortcut)
                for e, losses in losses_by_epochs.items() for s, loss in enumerate(losses)]

    runs = (network("resnet18", {2: (0.90, 0.92, 0.91), 4: (0.70, 0.73, 0.71), 8: (0.69, 0.74, 0.70)})  # falls, then about flat
            + network("resnet34", {2: (0.90, 0.92, 0.91), 4: (0.91, 0.91, 0.90), 8: (0.70, 0.71, 0.72)})  # about flat, then falls again
            + network("resnet50", {2: (0.9,), 4: (0.8,)})  # one seed: a change, no verdict
            + network("resnet101", {2: (0.90, 0.80), 4: (0.80, 0.60)})  # two seeds, both falling: an interval far wider than the falls
            + network("resnet152", {2: (0.70, 0.73, 0.71), 4: (0.71, 0.73, 0.72), 8: (0.60,)})  # flat, then a one-seed probe falls
            + network("resnet152", {2: (0.70, 0.73, 0.71), 4: (0.71, 0.73, 0.72), 8: (0.75,)}, shortcut="C")  # ... or rises
            + network("resnet34", {2: (1.163, 1.335), 4: (1.197, 1.367)}, shortcut="none"))  # plain-34's first two seeds, 64 -> 128 epochs
    rows = {r["network"]: r for r in loss_flattening(runs)}
    r18, r34, r50, r101 = (rows[f"resnet{d} (shortcut B)"] for d in (18, 34, 50, 101))
    # 20 -> 40 steps: changes -0.20, -0.19, -0.20: mean -0.19667, sd 0.00577, t(2) 4.303 -> half-width 0.01434;
    # 40 -> 80: -0.01, +0.01, -0.01: mean -0.00333, sd 0.01155 -> half-width 0.02869: [-0.032, +0.025] reaches 0,
    # but leaves room for a fall of 0.032, more than the default margin of 0.02: not shown to be flat
    assert r18["20 -> 40 steps"] == "-0.197 [-0.211, -0.182] (n=3)"
    assert r18["40 -> 80 steps"] == "-0.003 [-0.032, +0.025] (n=3)" and r18["flat from"] == "not shown by 80 steps"
    # two seeds falling by 0.10 and 0.20: t(1) 12.706 makes [-0.785, +0.485], which reaches 0: a falling loss
    # that "no longer falls for certain" would be called flat for want of seeds
    assert r101["20 -> 40 steps"] == "-0.150 [-0.785, +0.485] (n=2)" and r101["flat from"] == "not shown by 40 steps"
    assert r34["flat from"] == "still falling at 80 steps"  # its last step, -0.197 over three seeds, is shown to fall
    wide = {r["network"]: r for r in loss_flattening(runs, margin=0.05)}  # falls under 0.05 count as flat
    assert wide["resnet18 (shortcut B)"]["flat from"] == "40 steps"
    assert wide["resnet34 (shortcut B)"]["flat from"] == "still falling at 80 steps"  # a flat step followed by a fall is not flattened
    assert wide["resnet101 (shortcut B)"]["flat from"] == "not shown by 40 steps"
    assert r50 == {"network": "resnet50 (shortcut B)", "20 -> 40 steps": "-0.100 (one seed)", "flat from": "not shown by 40 steps",
                   "floor": "0.000", "(loss - floor) / last fall": "8.0"}  # no label smoothing: the floor is 0; 0.8 / 0.1
    # the last loss (0.71, 0.71) over the last fall (-0.00333, -0.19667): how many more such falls the floor leaves room for
    assert (r18["(loss - floor) / last fall"], r34["(loss - floor) / last fall"]) == ("213.0", "3.6")
    # 20 -> 40: +0.01, 0, +0.01: [-0.008, +0.021], above -0.02: flat; the one-seed step 40 -> 80 then falls by 0.11 (undone)
    probe_falls, probe_rises = rows["resnet152 (shortcut B)"], rows["resnet152 (shortcut C)"]
    assert probe_falls["20 -> 40 steps"] == "+0.007 [-0.008, +0.021] (n=3)" and probe_falls["40 -> 80 steps"] == "-0.110 (one seed)"
    assert probe_falls["flat from"] == "not shown by 80 steps"  # undone, but one seed cannot show it still falling
    assert probe_rises["40 -> 80 steps"] == "+0.040 (one seed)" and probe_rises["flat from"] == "20 steps"
    # two seeds that agree (+0.034, +0.032) give a narrow interval above -0.02 and no verdict: plain-34's third seed fell by 0.086
    two_agree = rows["resnet34 (plain)"]
    assert two_agree["20 -> 40 steps"] == "+0.033 [+0.020, +0.046] (n=2)" and two_agree["flat from"] == "not shown by 40 steps"
    unpaired = [fake_run(tmp_path, "u2", [0.0, 0.3], 0, epochs=2), fake_run(tmp_path, "u4", [0.0] * 3 + [0.5], 1, epochs=4)]
    (row,) = loss_flattening(unpaired)  # no seed at both budgets: no fall to divide by, not "not falling"
    assert row["20 -> 40 steps"] == "no seed at both" and row["(loss - floor) / last fall"] == ""


def test_the_loss_floor_is_the_smoothed_targets_entropy_that_torchs_loss_reaches(tmp_path):
    """With label smoothing the training loss cannot reach 0: its floor is the smoothed target's entropy, the loss
    torch's cross-entropy gives a prediction equal to that target (0.390 for 0.1 over the five flowers)."""
    import torch

    from flowerdist.config import load_config
    from flowerdist.report import Run, loss_flattening, target_entropy

    cfg = load_config(None, ["train.label_smoothing=0.1"])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "class_indices.json").write_text(json.dumps({str(i): c for i, c in enumerate(["a", "b", "c", "d", "e"])}))
    floor = target_entropy(Run(tmp_path / "r", cfg, []))
    target = torch.full((5,), 0.1 / 5) + torch.nn.functional.one_hot(torch.tensor(2), 5) * 0.9
    reached = torch.nn.functional.cross_entropy(target.log()[None], torch.tensor([2]), label_smoothing=0.1).item()
    assert floor == pytest.approx(reached, abs=1e-6) and f"{floor:.3f}" == "0.390"
    assert target_entropy(Run(tmp_path / "no-classes", cfg, [])) is None  # a record without its class list: unknown
    runs = [Run(tmp_path / "r", load_config(None, ["train.label_smoothing=0.1", f"train.epochs={e}"]), [
        {"step": 10 * e, "val/accuracy": 0.5, "train/epoch_loss": loss}], result={"global_step": 10 * e}) for e, loss in ((2, 0.70), (4, 0.55))]
    (row,) = loss_flattening(runs)
    assert row["floor"] == "0.390" and row["(loss - floor) / last fall"] == f"{(0.55 - floor) / 0.15:.1f}" == "1.1"


@pytest.mark.slow
def test_report_draws_the_budget_plot_and_the_paired_column_from_run_directories(tiny_data, tmp_path):
    runs = [short_run(tiny_data, tmp_path / f"seed={s},epochs={e}", f"train.seed={s}", f"train.epochs={e}", "train.max_steps=0")
            for e in (1, 2) for s in (0, 1, 2)]  # named as sweep cells are; three seeds, the fewest a flat verdict takes
    out = tmp_path / "rep"
    run_cli("report", *map(str, runs), "--out", str(out), "--baseline", "epochs=2")
    text = (out / "report.md").read_text()
    assert (out / "budget.png").is_file() and "Accuracy against the training budget" in text and ", n=3)" in text
    assert "| network | 10 -> 20 steps | flat from | floor | (loss - floor) / last fall |\n| --- | --- | --- | --- | --- |\n| seed_resnet | -0." in text  # the loss change, paired by seed
    rows = table(out / "report.md")
    column = next(k for k in rows[0] if k.startswith("final acc - "))
    assert column == "final acc - epochs=2 (95% CI, paired by seed)"  # the baseline cell's name less its seed
    assert sorted(r[column] for r in rows)[-1] == "baseline" and "(n=3)" in sorted(r[column] for r in rows)[0]
    assert not list(out.glob("mistakes-*.png")) == (len(runs) <= 6)  # per-run figures only for a few runs (6 here: yes)
    flattening = next(line for line in text.splitlines() if line.startswith("| seed_resnet | -0."))
    assert flattening.split(" | ")[2] == "still falling at 20 steps"  # one epoch more lowers this loss by more than 0.02, in three seeds
    assert "'still falling' where the last step, over as many seeds, is shown to lower it by more" in text
    run_cli("report", *map(str, runs), "--out", str(out), "--no-per-run", "--flat-margin", "5")
    text = (out / "report.md").read_text()  # with a margin above any fall, the first budget step is flat
    assert "interval lies above -5:" in text and next(line for line in text.splitlines() if line.startswith("| seed_resnet | -0.")).split(" | ")[2] == "10 steps"
    proc = run_cli("report", *map(str, runs), "--flat-margin", "-0.1", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--flat-margin -0.1: give the largest loss fall" in proc.stderr


def test_per_class_bars_keep_their_width_beside_long_run_names():
    """Sweep cells' names are long: a one-row legend of four was wider than the figure, and the layout squeezed the
    bars to a third of it (matplotlib: "constrained_layout not applied")."""
    import warnings

    from flowerdist.figures import per_class_figure

    names = [f"seed={s},name=resnet{d},shortcut=B,epochs=128" for s in (0, 1) for d in (18, 34)]
    fig = per_class_figure(names, ["daisy", "dandelion", "roses", "sunflowers", "tulips"], [[0.8] * 5] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig.canvas.draw()
    assert fig.axes[0].get_position().width > 0.8
    assert fig.legends[0].get_window_extent().width <= fig.bbox.width  # in as many columns as fit


def test_curves_and_throughput_keep_their_axes_and_a_colour_per_run_beside_a_sweeps_legend():
    """`report` over a sweep's 52 cells drew their legend inside the curves' axes: it covered the plots, collapsed the
    layout (matplotlib: "constrained_layout not applied") and repeated each of 10 colours five times."""
    import warnings

    from matplotlib.colors import to_rgba

    from flowerdist.figures import curves_figure, throughput_figure

    names = [f"budget-intel/seed={s},name=resnet{d},shortcut={c},epochs={e}"
             for s in range(3) for d in (18, 34) for c in ("B", "none") for e in (4, 8, 16, 32, 64)][:52]
    events = [{"step": 10 * i, "train/loss": 1.5 - 0.01 * i, "train/images_per_s": 100.0, "train/data_wait": 0.1} for i in range(20)]
    events += [{"step": 10 * i, "val/accuracy": 0.5 + 0.01 * i} for i in range(0, 20, 5)]
    runs = {name: events for name in names}
    minutes = {name: {10 * i: 0.1 * i for i in range(20)} for name in names}
    with_ema = {name: [{**e, "val_ema/accuracy": 0.6} if "val/accuracy" in e else e for e in events] for name in names[:26]}
    for fig, colours in ((curves_figure(runs, minutes), 52), (throughput_figure(runs), 52), (curves_figure(with_ema, minutes), 26)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fig.canvas.draw()
        height = fig.get_size_inches()[1]
        assert min(ax.get_position().height * height for ax in fig.axes) > 2.4  # inches: as tall as with one run
        assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 52  # 26 runs with their EMA: 52 too
        assert fig.legends[0].get_window_extent().width <= fig.bbox.width  # in as many columns as fit
        for ax in fig.axes:
            assert len({to_rgba(line.get_color()) for line in ax.lines}) == colours  # one per run
