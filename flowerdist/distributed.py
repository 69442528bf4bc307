"""Processes, devices and precision: building the Accelerator, checking the world it got, ending it,
and batch norm over all ranks.

The rest of flowerdist uses the Accelerator in three ways: the training step goes through
`accumulate`, `sync_gradients`, `backward` and `clip_grad_norm_` (`flowerdist.train.train_step`);
metrics are summed with `reduce`; and code asks who it is (`process_index`, `num_processes`,
`is_main_process`, `device`) and waits with `wait_for_everyone`. Models never know they are
distributed.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from datetime import timedelta

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, parse_flag_from_env
from accelerate.utils import extract_model_from_parallel, gather_object

from flowerdist.config import Config
from flowerdist.errors import FlowerdistError


def die_with_launcher() -> None:
    """A rank of torch's launcher (accelerate launch, torchrun, launch/elastic.sh) runs in a session of its own: a
    `kill -9` of the launcher, or of its process group, would leave it training to the end, beside the rerun
    that resumes the same run directory. On Linux the kernel kills it with its launcher instead, from this call
    on (a launcher that dies in the rank's first seconds, while it imports, is not covered)."""
    if sys.platform.startswith("linux") and "TORCHELASTIC_RUN_ID" in os.environ:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


def cuda_visible() -> bool:
    """The one device check flowerdist makes before Accelerate picks the device (tests replace only this)."""
    return torch.cuda.is_available()


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles: the only CPUs where bf16 autocast trains faster than fp32 (tests replace only this)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def auto_precision(device_type: str, capability: tuple[int, int] = (0, 0), amx: bool = False) -> str:
    """What `train.mixed_precision=auto` trains in on a device: the fastest precision it computes natively.

    bf16 on CUDA GPUs of compute capability 8.0 and above (Ampere on: bf16 tensor cores) and on CPUs with AMX;
    fp16 with the gradient scaler on Volta and Turing (7.x: tensor cores for fp16 only; bf16 there is emulated);
    fp32 elsewhere: older GPUs, and CPUs without AMX, where bf16 autocast is 1.3-13x slower than fp32."""
    if device_type == "cuda":
        return "bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "no"
    return "bf16" if device_type == "cpu" and amx else "no"


def precision_here(cfg: Config) -> str:
    """auto_precision of the device this process will train on, found as Accelerate will pick it: the GPU of its
    local rank unless train.cpu (or `accelerate launch --cpu`) keeps it on the CPU."""
    if cuda_visible() and not cfg.train.cpu and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return auto_precision("cuda", torch.cuda.get_device_capability(local_rank % torch.cuda.device_count()))
    return auto_precision("cpu", amx=cpu_has_amx())


def build_accelerator(cfg: Config, log_with: str | None) -> Accelerator:
    die_with_launcher()
    accelerator = Accelerator(
        cpu=cfg.train.cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=log_with,
        # We step the scheduler once per optimizer step ourselves; Accelerate's default steps a
        # prepared scheduler num_processes times per step (accelerate #2926).
        step_scheduler_with_optimizer=False,
        # A rank that dies must not leave the others waiting for the default 30 minutes.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))],
    )
    if cfg.train.cpu and cuda_visible():
        say(accelerator, "flowerdist: note: train.cpu=true keeps this run on the CPU although CUDA is visible; "
                         "set train.cpu=false to train on the GPU")
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_amx():
        say(accelerator, f"flowerdist: note: train.mixed_precision=bf16 on a CPU without AMX (this one: "
                         f"{torch.backends.cpu.get_cpu_capability()}) trains slower than fp32, for ResNet-18 at 64-96 px 6.6-13x "
                         "on AVX2, 1.5x on AVX-512 without avx512_bf16, about 1.3x with it; set train.mixed_precision=no unless you need bf16's numbers")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        enable_cpu_fp16(accelerator)
    return accelerator


def enable_cpu_fp16(accelerator: Accelerator) -> None:
    """fp16 on the CPU through Accelerate's own fp16 path: the gradient scaler and fp16 autocast that it builds
    for a GPU. Accelerate 1.16 skips both on the CPU (its scaler stays None and its autocast leaves fp32), so
    fp16 would train silently in fp32. torch runs both on the CPU: the GPU's scaler path (scaled backward,
    unscale before clipping, skipped steps, the scaler's state in checkpoints) then runs in the CPU tests.
    It is a test path, not a speed-up: fp16 matmuls on a CPU are slower than fp32."""
    accelerator.native_amp = True  # what Accelerator.__init__ sets for fp16 on a GPU
    accelerator.scaler = torch.amp.GradScaler("cpu")


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its DDP and torch.compile wrappers: what weights are read from and written to.

    Never `accelerator.unwrap_model(model)` with its default keep_torch_compile=True on a compiled DDP model: it
    rebinds the compile wrapper's `_orig_mod` from the DDP module to the bare one, so every later forward
    bypasses DDP (no gradient sync, `no_sync` a null context) and state dicts gain an `_orig_mod.` prefix."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def set_device_fast_paths(device: torch.device) -> bool:
    """TF32 matmuls and convolutions and cuDNN's autotuner: on CUDA only (they do not exist elsewhere).
    Set by the loop and by every bench part alike, so the bench measures what training runs. True when set."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return True


def peak_memory(device: torch.device) -> dict:
    """The most memory this process held so far: the CUDA allocator's peak on a GPU, else the peak resident size."""
    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_of": "GPU"}
    import resource

    return {"peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_memory_of": "host RSS"}


def use_fused_optimizer(device: torch.device, mixed_precision: str) -> bool:
    """The fused AdamW/SGD kernel: the fastest on CUDA, but not under fp16. There the gradient scaler hands the
    inf check to the fused kernel, which skips the step internally; Accelerate then never learns that the step
    was skipped (accelerate #4242) and the schedule would advance on skipped steps. On the CPU it rounds
    differently from the default kernel, which would change every recorded CPU result."""
    return device.type == "cuda" and mixed_precision != "fp16"


def broadcast_buffers(*models: torch.nn.Module | None) -> None:
    """Rank 0's buffers (batch-norm running statistics) to every rank.

    Under DDP every rank's forward pass updates its buffers from its own shard (DDP copies rank 0's at the start
    of the next forward), so between steps they differ. Evaluation, weight digests and checkpoints must all use
    the same ones, those rank 0 saves. A no-op on one process or with sync BN (the statistics already agree)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for model in models:
        if model is not None:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)


def end_accelerator(accelerator: Accelerator) -> None:
    """Finish the trackers, destroy the process group, and forget Accelerate's process-wide state.

    The reset lets one process train again with other settings (a sweep, a notebook, the tests);
    Accelerate otherwise refuses a second Accelerator with, say, another mixed precision.
    """
    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)


def check_world(accelerator: Accelerator) -> None:
    """Refuse the silent launch traps: processes that were requested but did not form one group."""
    env = os.environ
    requested = env.get("WORLD_SIZE")
    fix = "on CPUs use: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 ... (launch/cpu_multi_process.yaml)"
    if requested and int(requested) != accelerator.num_processes:
        raise FlowerdistError(
            f"the launcher started {requested} processes but each runs alone (world size {accelerator.num_processes}), "
            f"e.g. --multi_gpu on a machine without GPUs; {fix}"
        )
    mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
    if not requested and not mpi and "MASTER_PORT" in env and "ACCELERATE_USE_CPU" in env and accelerator.num_processes == 1:
        raise FlowerdistError(f"accelerate launch --cpu --num_processes N silently runs ONE process (world size 1); {fix}")


def say(accelerator: Accelerator, message: str) -> None:
    """Print once per run (global main process; `accelerator.print` prints once per node)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def describe_machine(device: str) -> dict:
    """What a number measured here depends on: device, its name, the CPU's vector ISA, threads, torch."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")] if cpuinfo.is_file() else []
        name = f"{models[0] if models else platform.processor()} ({os.cpu_count()} cores)"
    return {"device": device, "device_name": name, "cpu_capability": torch.backends.cpu.get_cpu_capability() + (" + AMX" if cpu_has_amx() else ""),
            "gpus": torch.cuda.device_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def local_processes(accelerator: Accelerator) -> int:
    """Processes on this node (torchrun/accelerate set LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))


def num_machines(accelerator: Accelerator) -> int:
    return max(1, accelerator.num_processes // local_processes(accelerator))


def describe_world(accelerator: Accelerator) -> str:
    """One line, built from what the processes report (all ranks must call it)."""
    me = (f"{accelerator.process_index}@{socket.gethostname()}:{accelerator.local_process_index}", accelerator.mixed_precision)
    ranks = gather_object([me]) if accelerator.num_processes > 1 else [me]
    require_one_precision(ranks)
    state = accelerator.state
    backend = state.backend or "none"
    return (
        f"world_size={accelerator.num_processes} backend={backend} device={accelerator.device.type} "
        f"num_machines={num_machines(accelerator)} mixed_precision={accelerator.mixed_precision} "
        f"threads={torch.get_num_threads()} ranks=[{', '.join(name for name, _ in ranks)}]"
    )


def require_one_precision(ranks: list[tuple[str, str]]) -> None:
    """Every rank must train in one precision: an fp16 rank's scaled gradients averaged with a bf16 rank's unscaled
    ones would drift the weights apart without an error. train.mixed_precision=auto picks per device, so an A100
    beside a V100, or CPU nodes with and without AMX, disagree; so do nodes started with different commands."""
    kinds = sorted({precision for _, precision in ranks})
    if len(kinds) > 1:
        who = "; ".join(f"{p} on rank(s) {', '.join(name.split('@')[0] for name, q in ranks if q == p)}" for p in kinds)
        raise FlowerdistError(f"the ranks would train in different precisions ({who}): set train.mixed_precision to one of "
                              f"{', '.join(kinds)} on every node (auto picks per device, and these devices differ)")


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all ranks, on any device.

    `torch.nn.SyncBatchNorm` only runs on GPUs; this one uses autograd-aware all-reduces
    (gloo on CPU) in two passes (mean, then centred variance) so it matches BatchNorm over
    the concatenated batch to float rounding. Eval mode uses the running statistics as usual.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._normalize(x)
        # a timm BatchNormAct2d keeps its dropout and activation (as timm's SyncBatchNormAct does)
        if hasattr(self, "drop"):
            y = self.drop(y)
        if hasattr(self, "act"):
            y = self.act(y)
        return y

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        sums = dist_nn.all_reduce(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        var = dist_nn.all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), m)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """SyncBatchNorm on CUDA (fused kernels), GlobalBatchNorm elsewhere (CPU/gloo).

    Both keep the activation and dropout of timm's fused BatchNormAct2d (efficientnet, regnet, mobilenet):
    torch's own converter would keep them only as unused children, and the network would train without its
    activations while `eval` and `predict` rebuild it with them. timm's converter handles both layer kinds."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    return _replace_bn(model)


def _replace_bn(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        for name in ("drop", "act"):  # timm's BatchNormAct2d
            if hasattr(module, name):
                new.add_module(name, getattr(module, name))
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _replace_bn(child))
    return module
