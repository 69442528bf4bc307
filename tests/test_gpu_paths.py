"""The branches a GPU run takes, run on the CPU where torch allows it: torch.compile with resume and with DDP +
accumulation, fp16 with its gradient scaler, the GPU data path (worker processes decoding the folder), and the
CUDA-only switches (fused optimizer, TF32, cuDNN autotuning, SyncBatchNorm), each reached through the one device
check flowerdist makes and nothing else faked."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, assert_same_weights, launch_many, run_cli, train_args, weights_of as weights

SMALL = ("data.image_size=32", "train.log_every=1")


def steps(run_dir, key="train/loss"):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if key in line]


# ---- torch.compile ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_run_resumes_bit_identical(tiny_data, tmp_path):
    """model.compile=true: a checkpoint holds plain weight names and a resume loads them into the compiled model
    (Slurm requeue and elastic restarts always resume), ending where the uninterrupted compiled run ends."""
    common = ("-c", "configs/quickstart.yaml", f"data.root={tiny_data}", *TINY, *SMALL, "model.compile=true", "train.epochs=1",
              "optim.warmup_steps=0", "optim.schedule=constant")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli("train", *common, f"train.output_dir={ref}", "train.max_steps=6")
    run_cli("train", *common, f"train.output_dir={cut}", "train.max_steps=3")
    assert not [k for k in weights(cut) if "_orig_mod" in k]  # plain names: eval, predict and export load them
    out = run_cli("train", *common, f"train.output_dir={cut}", "train.max_steps=6", "train.resume=auto").stdout
    assert "resuming from" in out and "(epoch 0, step 3)" in out
    a, b = weights(ref), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_accumulation_and_compile_equal_the_big_batch(tiny_data, tmp_path):
    """2 processes x 2 images x 2 accumulation with torch.compile: gradients must still be all-reduced (only on the
    last micro-step), so the weights equal one process with 8 images. Unwrapping the compiled DDP model the wrong
    way makes every later forward bypass DDP: each rank would train alone."""
    launch_many(
        (2, train_args(tiny_data, tmp_path / "ddp", "data.batch_size=2", "train.grad_accum_steps=2", "model.compile=true",
                       "train.max_steps=4", "optim.lr=0.01")),
        (1, train_args(tiny_data, tmp_path / "one", "data.batch_size=8", "train.max_steps=4", "optim.lr=0.01")),
    )
    assert_same_weights(weights(tmp_path / "ddp"), weights(tmp_path / "one"))


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank in this process: enough for DDP to wrap a model."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_reading_weights_leaves_the_compiled_ddp_model_intact(one_rank_group):
    """bare_model gives the plain module and leaves torch.compile's wrapper pointing at DDP, so the next forward
    still goes through DDP and `no_sync` (what Accelerate's accumulate() uses) is DDP's, not a null context."""
    from flowerdist.distributed import bare_model
    from flowerdist.models import create_model

    model = create_model("seed_resnet", 5, image_size=32)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    compiled = torch.compile(ddp)  # compiles lazily: nothing is compiled here
    assert bare_model(compiled) is model
    assert compiled._orig_mod is ddp and compiled.no_sync == ddp.no_sync


# ---- fp16 and the gradient scaler ---------------------------------------------------------------------------


@pytest.fixture
def built(request):
    """An Accelerator, model, optimizer and schedule built exactly as `flowerdist train` builds them, for `overrides`."""
    from flowerdist.config import load_config
    from flowerdist.distributed import build_accelerator, end_accelerator
    from flowerdist.train import Plan, build_model

    made = []

    def build(*overrides):
        cfg = load_config("configs/quickstart.yaml", ["data.image_size=32", *overrides])
        accelerator = build_accelerator(cfg, None)
        made.append(accelerator)
        plan = Plan(global_batch=8, steps_per_epoch=10, total_steps=10, peak_lr=cfg.optim.lr, warmup_steps=0)
        return (cfg, accelerator, *build_model(cfg, accelerator, 5, plan))

    yield build
    for accelerator in made:
        end_accelerator(accelerator)


def batch_of(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_fp16_on_the_cpu_runs_the_scaler_path(built):
    """fp16 is really fp16 (a conv's output dtype) with a real gradient scaler, not Accelerate's silent fp32."""
    cfg, accelerator, model, optimizer, scheduler = built("train.mixed_precision=fp16", "optim.name=sgd")
    assert isinstance(accelerator.scaler, torch.amp.GradScaler) and accelerator.scaler.is_enabled()
    seen = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    from flowerdist.train import train_step

    images, labels = batch_of()
    skipped = []
    for _ in range(4):
        train_step(accelerator, model, optimizer, scheduler, torch.nn.CrossEntropyLoss(), images, labels, 0.0)
        skipped.append(optimizer.step_was_skipped)
    assert seen == [torch.float16] * 4
    # the scaler starts at 2^16 and halves on every overflow until the gradients fit, then counts good steps
    state = accelerator.scaler.state_dict()
    assert state["scale"] == 2.0**16 / 2 ** sum(skipped) and state["_growth_tracker"] == skipped[::-1].index(True) if any(skipped) else 4


def test_fp16_step_with_inf_gradients_is_skipped(built):
    """A step whose gradients overflow: weights and schedule stay, the scale halves, and the next good step trains."""
    from flowerdist.train import train_step

    cfg, accelerator, model, optimizer, scheduler = built("train.mixed_precision=fp16", "optim.name=sgd")
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    scale = accelerator.scaler.get_scale()
    images, labels = batch_of()
    train_step(accelerator, model, optimizer, scheduler, torch.nn.CrossEntropyLoss(), images * float("inf"), labels, 1.0)
    assert optimizer.step_was_skipped and scheduler.scheduler.last_epoch == 0
    assert accelerator.scaler.get_scale() == scale / 2
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], before[k]) for k in params)
    for _ in range(20):  # good steps: the first may still overflow at a high scale, and is skipped too
        train_step(accelerator, model, optimizer, scheduler, torch.nn.CrossEntropyLoss(), images, labels, 1.0)
        if not optimizer.step_was_skipped:
            break
    assert scheduler.scheduler.last_epoch == 1  # the schedule counts the one step taken
    assert not all(torch.equal(params[k], before[k]) for k in params)


def test_fp16_clips_the_unscaled_gradients(built):
    """Clipping must see the true gradients (unscaled first): the fp16 update then matches fp32's. Clipping the
    scaled ones (65,536x larger) would shrink every SGD update by that factor."""
    from flowerdist.train import train_step

    updates = {}
    for precision in ("fp16", "no"):
        cfg, accelerator, model, optimizer, scheduler = built(f"train.mixed_precision={precision}", "optim.name=sgd",
                                                              "optim.lr=0.1", "optim.momentum=0", "optim.weight_decay=0")
        flat = lambda: torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        start, images, labels = flat(), *batch_of()
        for _ in range(20):  # until the scaler's first step that fits (fp32: the first)
            train_step(accelerator, model, optimizer, scheduler, torch.nn.CrossEntropyLoss(), images, labels, 0.01)
            if not optimizer.step_was_skipped:
                break
        updates[precision] = flat() - start
        from flowerdist.distributed import end_accelerator

        end_accelerator(accelerator)
    norms = {k: float(v.norm()) for k, v in updates.items()}
    assert norms["no"] == pytest.approx(0.1 * 0.01, rel=1e-3)  # lr x clip: clipping was active
    assert norms["fp16"] == pytest.approx(norms["no"], rel=1e-2)


def test_a_fused_optimizer_would_hide_skipped_fp16_steps(built):
    """Why fp16 keeps the fused kernel off (accelerate #4242): with it, the scaler lets the kernel skip the step
    internally and Accelerate reports it as taken, so the schedule would advance. The CUDA decision is tested
    through the device check alone."""
    from flowerdist.distributed import use_fused_optimizer
    from flowerdist.optim import build_optimizer
    from flowerdist.train import train_step

    cuda = torch.device("cuda")
    assert use_fused_optimizer(cuda, "bf16") and use_fused_optimizer(cuda, "no")
    assert not use_fused_optimizer(cuda, "fp16") and not use_fused_optimizer(torch.device("cpu"), "bf16")
    cfg, accelerator, model, optimizer, scheduler = built("train.mixed_precision=fp16")
    assert not optimizer.optimizer.defaults["fused"]
    fused = accelerator.prepare(build_optimizer(model, cfg.optim, 1e-3, fused=True))
    assert fused.optimizer.defaults["fused"]
    images, labels = batch_of()
    train_step(accelerator, model, fused, scheduler, torch.nn.CrossEntropyLoss(), images * float("inf"), labels, 0.0)
    assert not fused.step_was_skipped  # skipped, but reported as taken


@pytest.mark.slow
def test_fp16_resume_restores_the_scaler_bit_identical(tiny_data, tmp_path):
    """fp16 stopped after 3 steps and resumed to 6 ends with the uninterrupted run's weights and gradient scaler."""
    common = ("-c", "configs/quickstart.yaml", f"data.root={tiny_data}", *TINY, *SMALL, "train.epochs=1", "train.mixed_precision=fp16")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli("train", *common, f"train.output_dir={ref}", "train.max_steps=6")
    run_cli("train", *common, f"train.output_dir={cut}", "train.max_steps=3")
    run_cli("train", *common, f"train.output_dir={cut}", "train.max_steps=6", "train.resume=auto")
    states = [torch.load(r / "checkpoints" / "last" / "train_state.pt", weights_only=True)["scaler"] for r in (ref, cut)]
    assert states[0] == states[1] and states[0]["_growth_tracker"] > 3  # good steps counted across the resume
    a, b = weights(ref), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_bf16_run_resumes_as_fp16_with_a_fresh_scaler(tiny_data, tmp_path):
    common = ("-c", "configs/quickstart.yaml", f"data.root={tiny_data}", *TINY, *SMALL, "train.epochs=1", f"train.output_dir={tmp_path / 'r'}")
    run_cli("train", *common, "train.mixed_precision=bf16", "train.max_steps=3")
    out = run_cli("train", *common, "train.mixed_precision=fp16", "train.max_steps=6", "train.resume=auto", "train.resume_override=true").stdout
    assert "has no scaler state (the run trained without one); starting a fresh scaler" in out
    state = torch.load(tmp_path / "r" / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    assert state["state"]["global_step"] == 6 and "scaler" in state
    change = [e for e in steps(tmp_path / "r", "config_change")]
    assert change[0]["config_change"]["train.mixed_precision"] == ["bf16", "fp16"]


# ---- the CUDA-only switches, reached through the device check alone -----------------------------------------


@pytest.fixture
def fast_path_flags():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def test_tf32_and_cudnn_autotuning_are_set_on_cuda_only(fast_path_flags):
    from flowerdist.distributed import set_device_fast_paths

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    assert not set_device_fast_paths(torch.device("cpu"))
    assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 or torch.backends.cudnn.benchmark)
    assert set_device_fast_paths(torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark


@pytest.mark.slow
def test_a_config_that_pins_the_cpu_says_so_when_cuda_is_visible(tiny_data, tmp_path, monkeypatch):
    import flowerdist.distributed

    common = ("-c", "configs/quickstart.yaml", f"data.root={tiny_data}", *TINY, *SMALL, "train.epochs=1", "train.max_steps=1")
    out = run_cli("train", *common, "train.cpu=true", f"train.output_dir={tmp_path / 'a'}").stdout
    assert "train.cpu=true keeps this run on the CPU" not in out  # no CUDA here: nothing to say
    monkeypatch.setattr(flowerdist.distributed, "cuda_visible", lambda: True)
    out = run_cli("train", *common, "train.cpu=true", f"train.output_dir={tmp_path / 'b'}").stdout
    note = [line for line in out.splitlines() if "train.cpu=true keeps this run on the CPU although CUDA is visible" in line]
    assert len(note) == 1 and "set train.cpu=false" in note[0] and "device=cpu" in out


def test_bf16_on_a_cpu_without_amx_says_it_trains_slower(monkeypatch, capsys):
    """The records were made in bf16 on an AMX CPU; without AMX a CPU runs bf16 autocast several times slower than
    fp32 (6.6-13x on AVX2), so a bf16 run (the experiment sweeps, a resume of a bf16 run) says so at its start,
    with the key that fixes it."""
    from pathlib import Path

    import flowerdist.distributed
    from flowerdist.config import load_config

    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert flowerdist.distributed.cpu_has_amx() == ("amx_tile" in flags)  # the probe reads this CPU, whichever it is
    said = {}
    for amx, precision in ((False, "bf16"), (True, "bf16"), (False, "no")):
        monkeypatch.setattr(flowerdist.distributed, "cpu_has_amx", lambda amx=amx: amx)
        accelerator = flowerdist.distributed.build_accelerator(load_config(None, ["train.cpu=true", f"train.mixed_precision={precision}"]), None)
        flowerdist.distributed.end_accelerator(accelerator)
        said[amx, precision] = [line for line in capsys.readouterr().out.splitlines() if "without AMX" in line]
    assert said[True, "bf16"] == said[False, "no"] == []
    (note,) = said[False, "bf16"]
    assert note.startswith("flowerdist: note: train.mixed_precision=bf16") and "set train.mixed_precision=no" in note
    assert torch.backends.cpu.get_cpu_capability() in note


# ---- train.mixed_precision=auto ------------------------------------------------------------------------------


def test_auto_precision_is_the_precision_each_device_computes_natively(monkeypatch):
    """bf16 from Ampere (8.0) on and on AMX CPUs, fp16 with its scaler on Volta and Turing, fp32 elsewhere; on a GPU
    machine the GPU of the process's local rank decides (no CUDA here: torch's two queries are stood in for)."""
    import flowerdist.distributed as fd
    from flowerdist.config import load_config

    cuda = {(6, 0): "no", (6, 1): "no", (7, 0): "fp16", (7, 5): "fp16", (8, 0): "bf16", (8, 9): "bf16", (9, 0): "bf16", (10, 0): "bf16"}
    assert {c: fd.auto_precision("cuda", c) for c in cuda} == cuda
    assert (fd.auto_precision("cpu", amx=True), fd.auto_precision("cpu", amx=False), fd.auto_precision("mps", amx=True)) == ("bf16", "no", "no")
    monkeypatch.setattr(fd, "cuda_visible", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(8, 0), (7, 0)][i])  # one A100, one V100
    monkeypatch.setattr(fd, "cpu_has_amx", lambda: False)
    for local_rank, expected in (("0", "bf16"), ("1", "fp16"), ("3", "fp16")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert fd.precision_here(load_config(None, [])) == expected
    assert fd.precision_here(load_config(None, ["train.cpu=true"])) == "no"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # what `accelerate launch --cpu` sets
    assert fd.precision_here(load_config(None, [])) == "no"


@pytest.mark.slow
def test_auto_trains_in_the_native_precision_records_it_and_a_resume_keeps_the_runs(tiny_data, tmp_path, monkeypatch):
    """auto trains in bf16 on an AMX CPU and in fp32 on another, and config.yaml, the checkpoints and the start line
    say which (never auto); a run resumed with auto on the other kind of CPU continues in its own precision,
    with the note when that is bf16 without AMX, and nothing recorded as changed."""
    import flowerdist.distributed
    import yaml

    common = ("-c", "configs/quickstart.yaml", f"data.root={tiny_data}", *TINY, *SMALL, "train.epochs=1", "train.mixed_precision=auto")
    monkeypatch.setattr(flowerdist.distributed, "cuda_visible", lambda: False)  # a GPU host's test run decides on its CPU too
    for amx, precision in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(flowerdist.distributed, "cpu_has_amx", lambda amx=amx: amx)
        run = tmp_path / precision
        out = run_cli("train", *common, f"train.output_dir={run}", "train.max_steps=2").stdout
        assert f"mixed_precision={precision} " in out
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["mixed_precision"] == precision
        meta = json.loads((run / "checkpoints" / "last" / "meta.json").read_text())
        assert meta["config"]["train"]["mixed_precision"] == precision
    for amx, precision in ((False, "bf16"), (True, "no")):  # each run resumed on the other kind of CPU
        monkeypatch.setattr(flowerdist.distributed, "cpu_has_amx", lambda amx=amx: amx)
        run = tmp_path / precision
        out = run_cli("train", *common, f"train.output_dir={run}", "train.max_steps=4", "train.resume=auto").stdout
        assert "resuming from" in out and f"mixed_precision={precision} " in out
        assert ("train.mixed_precision=bf16 on a CPU without AMX" in out) == (precision == "bf16")
        other = "no" if precision == "bf16" else "bf16"
        assert f"note: resuming in {precision}, the run's precision; train.mixed_precision=auto would pick {other} on this device" in out
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["train"]["mixed_precision"] == precision
        assert [list(c["changes"]) for c in saved["resumed_changes"]] == [["train.max_steps"]]


def test_shipped_configs_leave_the_device_to_the_machine():
    """`make train` and every recipe use the GPU where there is one; only an explicit train.cpu=true pins the CPU. No
    recipe pins a 16-bit precision either: auto picks it where the device computes it natively (bf16 on an AVX2 CPU
    would train a recipe 6.6-13x slower, on a V100 without bf16 tensor cores too)."""
    from pathlib import Path

    from flowerdist.config import load_config

    for path in sorted(Path("configs").rglob("*.yaml")):
        if path.parent.name != "experiments":
            assert load_config(path).train.cpu is False, path
            assert load_config(path).train.mixed_precision in ("auto", "no"), path
    assert {load_config(f"configs/flowers/{name}.yaml").train.mixed_precision
            for name in ("resnet18_cpu", "resnet18_gpu", "resnet50_gpu", "timm_resnet50_pretrained")} == {"auto"}


def test_warmup_in_epochs_becomes_steps_of_this_layout():
    """5 warm-up epochs are 5 epochs on 1 GPU or 8: the steps follow the epoch length, and the start line says so."""
    from flowerdist.config import load_config
    from flowerdist.train import Plan

    class Sampler:
        def __init__(self, steps):
            self.steps_per_epoch = steps

    cfg = load_config("configs/flowers/resnet50_gpu.yaml")
    one, eight = Plan.of(cfg, 1, Sampler(37)), Plan.of(cfg, 8, Sampler(4))
    assert (one.warmup_steps, eight.warmup_steps) == (185, 20)
    assert one.warmup_steps / one.total_steps == pytest.approx(eight.warmup_steps / eight.total_steps)
    assert load_config(None, ["optim.warmup_steps=7"]).optim.warmup_steps == 7


@pytest.mark.slow  # builds regnets
def test_timm_batchnorm_act_keeps_its_activation_under_sync_bn():
    """regnet's BatchNormAct2d after conversion (GPU: timm's SyncBatchNormAct; CPU: GlobalBatchNorm): the same
    outputs as before, activations included."""
    import timm

    from flowerdist.distributed import GlobalBatchNorm, convert_sync_batchnorm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for device in ("cpu", "cuda"):
        model = timm.create_model("regnetx_002", num_classes=5).eval()
        with torch.no_grad():
            expected = model(x)
        converted = convert_sync_batchnorm(model, torch.device(device)).eval()
        kind = GlobalBatchNorm if device == "cpu" else torch.nn.SyncBatchNorm
        norms = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, kind) for m in norms)
        with torch.no_grad():
            assert torch.equal(converted(x), expected), device
    train = convert_sync_batchnorm(timm.create_model("regnetx_002", num_classes=5), torch.device("cpu")).train()
    reference = timm.create_model("regnetx_002", num_classes=5)
    reference.load_state_dict(train.state_dict())
    with torch.no_grad():  # training mode on one process: batch statistics, then the activation
        assert torch.allclose(train(x), reference.train()(x), atol=1e-6)
