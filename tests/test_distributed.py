"""Distributed training proven with real processes (gloo on CPU): DDP and accumulation equal the
big batch, ranks shard the data, two "nodes" on one machine train one model."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    DDP_STEPS, REPO, accelerate_cmd, free_port, initial_weights, launch, launch_many, train_args, update_difference,
    weights_of,
)

pytestmark = pytest.mark.slow

#: Tolerance on the difference of two runs' updates, relative to the update (conftest.update_difference). Measured on
#: the generated flowers: seed_resnet over 8 steps (conftest.DDP_STEPS) 1e-6 (DDP) to 1.8e-5 (2 processes with
#: accumulation); ResNet-18 with sync BN 2.5e-6 after 2 steps. The controls below, stand-ins for the defects a wrong
#: shard or a wrong accumulation would make, move the update by 0.25 or more: 2,500x the tolerance.
TOLERANCE = 1e-4
#: ResNet-18 runs stop after 2 steps: from the third on, float rounding flips max-pool and ReLU ties in the generated
#: flowers' flat regions and the two layouts drift apart chaotically (measured: 2.5e-6, 1.6e-5, 6e-4 of the update
#: after 2, 3 and 4 steps with sync BN), whatever the code does; the equality itself is exact math.
RESNET = ("model.name=resnet18", "data.image_size=32", "train.max_steps=2")


def world_size(proc):
    return int(re.search(r"world_size=(\d+)", proc.stdout).group(1))


def compare(tmp_path, same: tuple[str, str], controls: tuple[str, ...], model="seed_resnet", image_size=64):
    """`same` must train the same update; each control (a defect's stand-in) an update >100x the tolerance away."""
    init = initial_weights(model, image_size)
    reference = weights_of(tmp_path / same[1])
    diff = update_difference(weights_of(tmp_path / same[0]), reference, init)
    assert diff <= TOLERANCE, f"{same[0]} and {same[1]}: the updates differ by {diff:.2e} of the update"
    for control in controls:
        assert update_difference(weights_of(tmp_path / control), reference, init) > 100 * TOLERANCE, control
    return diff


def test_ddp_equals_the_big_batch_seed_resnet(tiny_data, tmp_path):
    two, one, *_ = launch_many(
        (2, train_args(tiny_data, tmp_path / "ddp", "data.batch_size=4")),
        (1, train_args(tiny_data, tmp_path / "one", "data.batch_size=8")),
        (1, train_args(tiny_data, tmp_path / "one_shard", "data.batch_size=4")),  # as if both ranks took the same shard
    )
    assert world_size(two) == 2 and world_size(one) == 1
    assert "global batch 8 = 4 per device x 2 processes x 1 accumulation" in two.stdout
    compare(tmp_path, ("ddp", "one"), ("one_shard",))


def test_ddp_with_sync_bn_equals_the_big_batch_resnet(tiny_data, tmp_path):
    args = RESNET
    two, *_ = launch_many(
        (2, train_args(tiny_data, tmp_path / "sync", "data.batch_size=4", "train.sync_bn=true", *args)),
        (1, train_args(tiny_data, tmp_path / "one", "data.batch_size=8", *args)),
        (2, train_args(tiny_data, tmp_path / "local", "data.batch_size=4", *args)),  # each rank normalises its own 4 images
    )
    assert world_size(two) == 2
    compare(tmp_path, ("sync", "one"), ("local",), model="resnet18", image_size=32)


def test_accumulation_equals_the_big_batch_on_one_and_two_processes(tiny_data, tmp_path):
    *_, two = launch_many(
        (1, train_args(tiny_data, tmp_path / "big", "data.batch_size=8")),
        (1, train_args(tiny_data, tmp_path / "acc1", "data.batch_size=2", "train.grad_accum_steps=4")),
        (1, train_args(tiny_data, tmp_path / "big16", "data.batch_size=16")),
        (1, train_args(tiny_data, tmp_path / "step_each", "data.batch_size=2", f"train.max_steps={4 * DDP_STEPS}")),  # no accumulation
        (2, train_args(tiny_data, tmp_path / "acc2", "data.batch_size=2", "train.grad_accum_steps=4")),
    )
    compare(tmp_path, ("acc1", "big"), ("step_each", "big16"))
    assert "global batch 16 = 2 per device x 2 processes x 4 accumulation" in two.stdout
    compare(tmp_path, ("acc2", "big16"), ("big",))


def read_samples(run_dir, rank):
    rows = [json.loads(line) for line in (run_dir / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
    by_epoch = {}
    for row in rows:
        by_epoch.setdefault(row["epoch"], []).extend(row["indices"])
    return by_epoch


def test_ranks_shard_each_epoch_disjointly_and_reproducibly(tiny_data, tmp_path):
    args = (
        "data.batch_size=4", "train.record_samples=true", "train.max_steps=0", "train.epochs=2", "data.num_workers=1",
        "optim.lr_scale=linear", "optim.reference_batch=4", "train.log_every=1",
    )
    with socket.socket() as busy:  # the rendezvous port is taken: on one node the launch moves to a free port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = launch(3, *train_args(tiny_data, tmp_path / "a", *args), port=port)
    assert f"Port `{port}` is already in use" in proc.stderr and world_size(proc) == 3
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    files = sorted(p.relative_to(tiny_data).as_posix() for p in tiny_data.rglob("*.jpg"))
    train_set = {files.index(f) for f in split["train"]}
    ranks = [read_samples(tmp_path / "a", r) for r in range(3)]
    for epoch in (0, 1):
        parts = [set(r[epoch]) for r in ranks]
        assert all(len(r[epoch]) == len(ranks[0][epoch]) for r in ranks)  # equal steps per rank
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # disjoint
        union = parts[0] | parts[1] | parts[2]
        assert union <= train_set and len(train_set - union) < 4 * 3  # all but a tail < one global batch
    assert ranks[0][0] != ranks[0][1]  # reshuffled per epoch
    # same seed, same order: tests/test_sampler.py; across real runs: the bit-identical resume tests
    # the lr is scaled for the global batch 12 and the schedule counts optimizer steps, once each
    assert "global batch 12 = 4 per device x 3 processes x 1 accumulation; 13 steps/epoch, 26 steps; peak lr 0.003" in proc.stdout
    from flowerdist.config import OptimConfig
    from flowerdist.optim import lr_factor

    cfg = OptimConfig(lr=0.003, warmup_steps=2)
    logged = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lrs = [(m["step"], m["train/lr"]) for m in logged if "train/lr" in m]
    assert [s for s, _ in lrs] == list(range(1, 27))
    assert [lr for _, lr in lrs] == pytest.approx([0.003 * lr_factor(s, 26, 2, cfg) for s, _ in lrs])


def test_validation_is_exact_at_any_world_size(tiny_data, tmp_path):
    """A 3-process evaluation counts every validation image once: equal to 1 process on the same weights."""
    # through the shipped launch file, as the README shows it
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "launch/cpu_multi_process.yaml",
        "--num_processes", "3", "--main_process_port", str(free_port()),
        "-m", "flowerdist", "train", *train_args(tiny_data, tmp_path / "three", "data.batch_size=4", "train.max_steps=3"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and world_size(proc) == 3, proc.stdout + proc.stderr
    val = [json.loads(l) for l in (tmp_path / "three" / "metrics.jsonl").read_text().splitlines() if "val/accuracy" in l][-1]
    assert val["val/count"] == 40
    from conftest import run_cli

    out = json.loads(run_cli("eval", "--checkpoint", str(tmp_path / "three" / "checkpoints" / "last"), "--json").stdout)
    assert out["confusion"] == val["val/confusion"] and out["accuracy"] == val["val/accuracy"]


def test_two_nodes_on_one_machine_train_one_model(tiny_data, tmp_path):
    port = free_port()
    run_dir = tmp_path / "nodes"
    args = list(train_args(tiny_data, run_dir, "data.batch_size=4", "log.wandb=offline"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    procs = [
        subprocess.Popen(
            accelerate_cmd(2, *args, num_machines=2, machine_rank=rank, port=port),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "world_size=2" in outs[0] and "num_machines=2" in outs[0]
    digests = [re.search(rf"rank {r} weights sha256 ([0-9a-f]{{16}})", outs[r]).group(1) for r in (0, 1)]
    assert digests[0] == digests[1]
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # one W&B run
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").is_file()
    from wandb_offline import read_run

    config = read_run(run_dir)["config"]
    assert config["world_size"] == 2 and config["num_machines"] == 2


def test_nodes_in_different_precisions_are_refused_in_one_line(tiny_data, tmp_path):
    """Two nodes whose ranks would train in different precisions (auto on unlike devices, or two commands): every
    rank stops at the start with the same line, before any data or weights, instead of averaging unlike gradients."""
    port, run_dir = free_port(), tmp_path / "mixed"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    procs = [
        subprocess.Popen(
            accelerate_cmd(2, *train_args(tiny_data, run_dir, f"train.mixed_precision={precision}"), num_machines=2, machine_rank=rank, port=port),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank, precision in ((0, "no"), (1, "bf16"))
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode != 0 for p in procs] == [True, True], outs
    for out in outs:
        (line,) = [line for line in out.splitlines() if "different precisions" in line]
        assert "(bf16 on rank(s) 1; no on rank(s) 0)" in line and "set train.mixed_precision to one of bf16, no on every node" in line
    assert not (run_dir / "checkpoints").exists()


def test_cpu_flag_trap_fails_loudly(tiny_data, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process: flowerdist refuses to train alone."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "flowerdist", "train", *train_args(tiny_data, tmp_path / "trap"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "silently runs ONE process" in proc.stderr and "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu" in proc.stderr
    assert not (tmp_path / "trap" / "checkpoints").exists()


EVERY_INGREDIENT = (
    "augment.color_jitter=0.3", "augment.auto_augment=trivialaugment", "augment.random_erasing=0.5",
    "augment.mixup_alpha=0.4", "augment.cutmix_alpha=1.0", "augment.mix_prob=0.9", "train.ema_decay=0.9",
    "train.ema_warmup=false", *RESNET, "train.sync_bn=true",
)


def test_ddp_with_every_ingredient_equals_the_big_batch(tiny_data, tmp_path):
    """Augmentation, MixUp/CutMix over the global micro-batch and the EMA: 2 x 4 still equals 1 x 8."""
    launch_many(
        (2, train_args(tiny_data, tmp_path / "ddp", "data.batch_size=4", *EVERY_INGREDIENT)),
        (1, train_args(tiny_data, tmp_path / "one", "data.batch_size=8", *EVERY_INGREDIENT)),
        (1, train_args(tiny_data, tmp_path / "nomix", "data.batch_size=8", *EVERY_INGREDIENT, "augment.mix_prob=0")),
    )
    compare(tmp_path, ("ddp", "one"), ("nomix",), model="resnet18", image_size=32)  # the mixing mattered
    ema = [torch.load(tmp_path / r / "checkpoints" / "last" / "train_state.pt", weights_only=True)["ema"] for r in ("ddp", "one")]
    assert ema[0].keys() == ema[1].keys() and len(ema[0]) > 10
    init = {f"module.{k}": v for k, v in initial_weights("resnet18", 32).items()}  # timm's ModelEmaV3 keeps `module.`
    diff = update_difference(ema[0], ema[1], init)
    assert diff <= TOLERANCE, f"the EMAs' updates differ by {diff:.2e}"


def test_two_ranks_agree_on_moving_an_old_run_aside(tiny_data, tmp_path):
    """train.overwrite=true, and resume=auto over a run that died before its first checkpoint (what an elastic
    restart meets), on 2 ranks: the main process moves the old run aside and tells the other rank, which would
    otherwise see an empty directory, skip the barrier and leave both ranks waiting for each other."""
    runs = {"overwrite": ("train.overwrite=true",), "auto": ("train.resume=auto",)}
    for name in runs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("old: run\n")
        (tmp_path / name / "metrics.jsonl").write_text("")
    launch_many(*[(2, train_args(tiny_data, tmp_path / name, "data.batch_size=4", "train.dist_timeout_s=30", *extra))
                  for name, extra in runs.items()], timeout=240)
    for name in runs:
        (aside,) = tmp_path.glob(f"{name}.replaced-*")
        assert (aside / "config.yaml").read_text() == "old: run\n"
        assert (tmp_path / name / "checkpoints" / "last" / "model.safetensors").is_file()


def test_batch_norm_ranks_validate_the_weights_they_save(tiny_data, tmp_path):
    """ResNet-18 on 2 ranks without sync BN: each rank's forward passes update its own running statistics, so
    rank 0's are broadcast before validation and the digest. The logged validation equals `flowerdist eval` of the
    saved checkpoint, and both ranks state the same digest."""
    run = tmp_path / "bn"
    proc = launch(2, *train_args(tiny_data, run, "data.batch_size=4", "model.name=resnet18", "data.image_size=32", "train.max_steps=4"))
    digests = re.findall(r"rank (\d) weights sha256 ([0-9a-f]{16})", proc.stdout + proc.stderr)
    assert len(digests) == 2 and digests[0][1] == digests[1][1], digests
    val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val/loss" in l][-1]
    from conftest import run_cli

    out = json.loads(run_cli("eval", "--checkpoint", str(run / "checkpoints" / "last"), "--json").stdout)
    assert out["confusion"] == val["val/confusion"]
    assert out["loss"] == pytest.approx(val["val/loss"], rel=1e-5)
