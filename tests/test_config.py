import json

import pytest

from flowerdist.config import Config, apply_overrides, load_config
from flowerdist.errors import FlowerdistError
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "experiments")


def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 0.5\n  name: sgd\ndata:\n  batch_size: 8\n")
    cfg = load_config(path, ["optim.lr=0.25", "train.epochs=3", "model.shortcut=C", "model.pretrained_file=null"])
    assert cfg.optim.lr == 0.25 and cfg.optim.name == "sgd"  # CLI beats YAML
    assert cfg.data.batch_size == 8  # YAML beats default
    assert cfg.data.image_size == Config().data.image_size  # default kept
    assert cfg.train.epochs == 3 and cfg.model.shortcut == "C" and cfg.model.pretrained_file is None
    assert cfg.name == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_trains_a_step_with_its_own_settings(path, tiny_data, tmp_path):
    """Each recipe, shrunk only in size (images, batch, steps; no pretrained download), trains: its own mix of keys
    (warm-up in epochs, MixUp/CutMix, EMA, precision, ...) reaches the run's config.yaml unchanged."""
    import yaml

    from conftest import run_cli

    size = ["data.image_size=32", "data.eval_image_size=0", "data.batch_size=8", "data.val_fraction=0.2", "model.pretrained=false"]
    if load_config(path).data.progressive_from:  # still progressive, from 32 px (ResNet-18 at 16 px: 1x1 maps from layer3)
        size += ["data.image_size=64", "data.progressive_from=32"]
    run = tmp_path / "run"
    run_cli("train", "-c", str(path), f"data.root={tiny_data}", *size, "train.max_steps=2", "train.epochs=1", f"train.output_dir={run}",
            "log.wandb=disabled", "log.progress=false")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    expected = load_config(path, [f"data.root={tiny_data}", *size, "train.max_steps=2", "train.epochs=1", f"train.output_dir={run}",
                                  "log.wandb=disabled", "log.progress=false"]).to_dict()
    if expected["train"]["mixed_precision"] == "auto":  # recorded as what it trained in here: on a CPU, bf16 with AMX, else fp32
        from flowerdist.distributed import precision_here

        expected["train"]["mixed_precision"] = precision_here(load_config(path))
    assert saved == expected and saved["name"] == path.stem
    assert json.loads((run / "result.json").read_text())["global_step"] == 2


def test_shipped_config_set():
    assert {str(p.relative_to(REPO / "configs")) for p in CONFIGS} >= {
        "quickstart.yaml", "flowers/tutorial.yaml", "flowers/resnet18_cpu.yaml", "flowers/resnet18_gpu.yaml",
        "flowers/resnet50_gpu.yaml", "flowers/timm_resnet50_pretrained.yaml",
    }


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=0.1", "unknown config key 'optim.lrr' in the command line; did you mean 'optim.lr'?"),
        ("data.batch_size=abc", "config key 'data.batch_size' in the command line must be int, got 'abc'"),
        ("model.shortcut=D", "config key 'model.shortcut' in the command line must be one of A, B, C, none, got 'D'"),
        ("train.mixed_precision=fp8", "must be one of auto, no, fp16, bf16"),
        ("optim.lr=-1", "config key 'optim.lr' must be positive (got -1.0)"),
        ("data.batch_size=0", "config key 'data.batch_size' must be at least 1 (got 0)"),
        ("log.wandb=maybe", "config key 'log.wandb'"),
        ("optim=3", "is a section"),
        ("epochs", "must look like KEY=VALUE"),
        ("model.pretrained=true", "needs a timm model"),
    ],
)
def test_cli_errors_name_the_key(override, needle):
    with pytest.raises(FlowerdistError) as err:
        load_config(None, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_errors_name_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batchsize: 8\n")
    with pytest.raises(FlowerdistError, match=r"unknown config key 'data.batchsize' in .*bad.yaml; did you mean 'data.batch_size'"):
        load_config(path)
    path.write_text("train:\n  epochs: ten\n")
    with pytest.raises(FlowerdistError, match=r"'train.epochs' in .*bad.yaml must be int, got 'ten'"):
        load_config(path)
    path.write_text("train: [1, 2\n")
    with pytest.raises(FlowerdistError, match="not valid YAML at line"):
        load_config(path)
    with pytest.raises(FlowerdistError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_bool_and_float_parsing():
    cfg = apply_overrides(Config(), ["log.progress=false", "optim.lr=3e-4", "optim.weight_decay=0"])
    assert cfg.log.progress is False and cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 0.0
    assert Config().flat()["optim.lr"] == 1e-3


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "experiments").glob("*.yaml")))
def test_every_experiment_has_seeds_and_a_cpu_variant(path):
    """`flowerdist sweep FILE --variant cpu` validates every cell's config; the full experiments repeat 3 seeds, the CPU
    variants 5 for the tables (the paired intervals of `report`) and 3 for the budget curves."""
    from flowerdist.sweep import load_sweep

    full, cpu = load_sweep(REPO / path), load_sweep(REPO / path, "cpu")
    seeds = lambda cells: {o for c in cells for o in c.overrides if o.startswith("train.seed=")}  # noqa: E731
    assert len(seeds(full)) >= 3 and len(seeds(cpu)) >= (3 if "budget" in path else 5)
    for cells in (full, cpu):
        assert len({c.run_dir for c in cells}) == len(cells)
    assert all("train.cpu=true" in c.overrides for c in cpu)
