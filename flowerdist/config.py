"""Typed, nested run configuration: defaults < YAML file < dotted `KEY=VALUE` overrides.

Every field has a docstring with its unit. The sections are pydantic dataclasses: types are
checked (lists included), unknown keys and non-finite numbers are refused, and the first error
becomes one line that names the key, where it was set (file or command line) and the closest
valid key. Impossible values are rejected by `validate()` before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from flowerdist.errors import FlowerdistError
from flowerdist.files import atomic_write_text


#: Unknown keys are errors, inf/nan are refused, YAML numbers may fill string fields (a run name 2024).
section = pydantic_dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True))


@section
class ModelConfig:
    name: str = "seed_resnet"
    """Model name: `seed_resnet`, `resnet18|34|50|101|152`, or `timm/<timm model name>`."""
    shortcut: Literal["A", "B", "C", "none"] = "B"
    """ResNet shortcut option of the paper: A zero-pad identity, B projection where the shape changes, C projection
    everywhere; `none` builds the paper's plain network (the same layers, no shortcut)."""
    pretrained: bool = False
    """Load pretrained weights (timm models only): from `pretrained_file` or the local HF cache."""
    pretrained_file: str | None = None
    """Local .pth/.safetensors weights for `pretrained` (works offline)."""
    init_weights: bool = True
    """Apply the model's weight initialisation (kaiming for convs) instead of torch's defaults."""
    channels_last: bool = True
    """Train in channels_last memory format (measured on CPU: 1.23x for seed_resnet at 224 px, 1.24x resnet50, equal for resnet18)."""
    compile: bool = False
    """Wrap the model in torch.compile (costs 20-40 s of compilation at start)."""


@section
class DataConfig:
    root: str = "data/synthetic_flowers"
    """Image folder laid out ROOT/<class>/<image> (torchvision ImageFolder)."""
    synthetic: bool = False
    """Generate a procedural flower set at `root` first if the folder does not exist."""
    synthetic_per_class: int = 200
    """Images per class when `synthetic` generates the set."""
    synthetic_size: int = 128
    """Side in pixels of the generated images."""
    image_size: int = 224
    """Network input side in pixels (train crop and validation centre crop)."""
    eval_image_size: int = 0
    """Input side for validation, eval and predict (0: data.image_size). Above the training side pays with
    random-crop training, which shows objects larger than a centre crop does (Touvron et al., FixRes)."""
    batch_size: int = 32
    """Images per device per micro-step; global batch = batch_size x processes x grad_accum_steps."""
    val_fraction: float = 0.2
    """Fraction of every class held out for validation (stratified, seeded by train.seed)."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes per rank (0 loads in the training process). auto: 0 on the CPU, where workers
    would compete with the model for the same cores; on a GPU every CPU this process may use (its affinity mask, as
    Slurm or taskset set it), shared by the node's ranks. The start line says what was chosen and why."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead (with num_workers > 0)."""
    cache: bool | Literal["auto"] = "auto"
    """Fast data path: decode every image once into a memory-mapped uint8 cache shared by the ranks of a node.
    auto: on for CPU training (falls back to the folder, with a note, if the cache cannot be written); on a GPU on
    when the pipeline, timed on this machine at start, is faster from it and it fits the disk and half the memory."""
    cache_size: int = 0
    """Short side in pixels that data.root's larger images are shrunk to when loaded, from the cache or the folder
    alike (the cache stores them so; smaller ones stay as they are); 0 keeps the original sizes. A recipe tuned on
    192-px copies sets 192, so originals train on the same pixels. Photos evaluated from another folder (data.test_root, eval data.root=...) keep theirs."""
    cache_dir: str = ""
    """Where the decoded-image cache lives ("": `<data.root>/.flowerdist-cache`)."""
    min_scale: float = 0.35
    """Smallest area fraction of RandomResizedCrop for training."""
    progressive_from: int = 0
    """Progressive resizing (FFCV): the training side starts at this many pixels and grows linearly to data.image_size
    (multiples of 16) by `progressive_until` of the epochs; 0: off. Early epochs cost less and the late ones train at
    the full side. Needs a model without a fixed input size (not seed_resnet)."""
    progressive_until: float = 0.85
    """Fraction of train.epochs at which progressive resizing reaches data.image_size."""
    test_root: str = ""
    """A held-out test folder (ROOT/<class>/<image>, the classes of data.root): its photos are removed from data.root
    by class and file name (so they are never trained or selected on), and at the end of training the best and the
    last weights are evaluated on all of it, at its own resolution ("": none)."""


@section
class AugmentConfig:
    color_jitter: float = 0.0
    """Brightness, contrast and saturation jitter strength (torchvision ColorJitter; 0: off)."""
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    """Policy after crop and flip: torchvision's RandAugment (2 ops) or TrivialAugmentWide."""
    randaugment_magnitude: int = 9
    """RandAugment magnitude, 0-30."""
    random_erasing: float = 0.0
    """Probability of erasing one random box per image (filled with noise)."""
    mixup_alpha: float = 0.0
    """MixUp strength: the mixing weight is drawn from Beta(alpha, alpha) (0: off)."""
    cutmix_alpha: float = 0.0
    """CutMix strength: the box area is drawn from Beta(alpha, alpha) (0: off)."""
    mix_prob: float = 1.0
    """Probability that a micro-batch is mixed when MixUp or CutMix is on (with both on, each is picked half the time)."""


@section
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 1e-3
    """Peak learning rate for a global batch of `reference_batch` images (see lr_scale)."""
    lr_scale: Literal["linear", "sqrt", "none"] = "none"
    """How the peak lr follows the actual global batch: lr x (global/reference) for linear, its sqrt, or unchanged."""
    reference_batch: int = 32
    """The global batch (images per optimizer step) for which `lr` is given."""
    weight_decay: float = 0.05
    """Decoupled (AdamW) or L2 (SGD) weight decay; not applied to biases and norm weights."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    nesterov: bool = True
    """SGD Nesterov momentum."""
    warmup_steps: int = 0
    """Linear warm-up length in optimizer steps (or set `warmup_epochs`, not both)."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs, may be fractional: converted to optimizer steps at start (and printed), so it
    means the same share of the schedule on any number of GPUs."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """LR schedule after warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak lr."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value (0 disables)."""


@section
class TrainConfig:
    epochs: int = 10
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs); warm-up and cosine then end at max_steps, so a short
    run still decays its learning rate."""
    grad_accum_steps: int = 1
    """Micro-steps accumulated per optimizer step."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "no"
    """Autocast precision: no (fp32), bf16, fp16 (with a gradient scaler) or auto, which the tuned recipes use: bf16 on GPUs
    of compute capability 8.0+ (Ampere on) and on CPUs with AMX (2.4x the fp32 step on the project machine), fp16 on
    Volta and Turing GPUs (V100, T4), fp32 elsewhere (bf16 is 1.3-13x slower than fp32 on CPUs without AMX). A
    resume with auto keeps the run's precision on any machine; config.yaml and the checkpoints record the precision
    a run trained in, never auto."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay per optimizer step (timm's ModelEmaV3;
    0: off). It is evaluated each epoch beside the raw weights and saved in checkpoints."""
    ema_warmup: bool = True
    """Ramp the EMA decay up from 0 (timm's warm-up: decay_t = min(ema_decay, 1 - (1 + t)^-2/3)), so early
    weights do not dominate a short run."""
    best_of: Literal["model", "ema"] = "model"
    """Which weights `checkpoints/best` follows: the raw model's validation accuracy or the EMA's."""
    seed: int = 42
    """Seeds the split, the shuffling of every epoch, the initial weights and augmentation."""
    output_dir: str | None = None
    """Run directory; default runs/<config-name>-<timestamp>."""
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm in multi-process runs."""
    log_every: int = 10
    """Log loss and lr every this many optimizer steps (the only host syncs in the step loop)."""
    eval_every: int = 1
    """Validate every this many epochs, and after the last; `best` is chosen among the validated epochs. On a CPU
    the validation of the raw and the EMA weights at a raised eval_image_size costs a third of a short epoch."""
    cpu: bool = False
    """Train on the CPU even when a GPU is visible."""
    checkpoint_every: int = 0
    """Also checkpoint every this many optimizer steps (0: only at epoch ends)."""
    keep_last: int = 2
    """Training checkpoints kept (older ones are deleted; `best` is kept apart)."""
    resume: str = ""
    """"auto": continue the newest complete checkpoint in train.output_dir (if any); or a checkpoint path."""
    overwrite: bool = False
    """Start a fresh run in a train.output_dir that holds one: the old run is moved aside (DIR.replaced-<time>), never deleted."""
    resume_override: bool = False
    """Allow a resume to change what shapes the optimisation (optim.*, augment.*, batch, accumulation, precision,
    EMA); the change is recorded in config.yaml and metrics.jsonl at the step it takes effect."""
    dist_timeout_s: int = 600
    """Seconds a collective may wait for a missing rank before the run fails (not the default 30 min)."""
    record_samples: bool = False
    """Write the dataset indices every rank trained on, per optimizer step, to samples/rank<R>.jsonl (audits sharding)."""


@section
class EvalConfig:
    flip: bool = False
    """Flip test-time augmentation: the logits of each image and of its mirror image are averaged. Used alike by the
    validation during training, `eval`, `predict` and `export` (the exported model holds the flip)."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision of validation, `eval` and `predict`; auto: train.mixed_precision, so `eval` of a checkpoint
    gives the accuracy its run logged. `no` evaluates in fp32, as an exported model runs."""


@section
class LogConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """Weights & Biases: auto is online when an API key is configured (WANDB_API_KEY or `wandb login`), else offline
    into RUN/wandb/offline-run-* (upload later with `wandb sync`); disabled: metrics.jsonl only."""
    project: str = "flowerdist"
    """The W&B project the runs are filed under."""
    progress: bool = True
    """Show a tqdm progress bar on the main process."""


@section
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    name: str = "flowerdist"
    """Run name (defaults to the config file's stem)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def eval_image_size(self) -> int:
        """The side validation, eval and predict use."""
        return self.data.eval_image_size or self.data.image_size

    @property
    def eval_precision(self) -> str:
        """The autocast precision of evaluation: eval.precision, or the training's."""
        return self.train.mixed_precision if self.eval.precision == "auto" else self.eval.precision

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, e.g. {"optim.lr": 0.001}: what W&B's config gets."""
        return _flatten(self.to_dict())


# ---------------------------------------------------------------------------------------------
# Loading: pydantic validates types (unknown keys forbidden); we only turn its errors into one line.


def _all_keys() -> list[str]:
    return list(Config().flat())


def _unknown_key(key: str, where: str) -> FlowerdistError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(_all_keys())}"
    return FlowerdistError(f"unknown config key '{key}' in {where}{hint}")


def _field_type(key: str, where: str) -> Any:
    """The annotation of dotted `key` (unknown keys and sections are refused here, with the fix)."""
    target: Any = Config
    for i, part in enumerate(key.split(".")):
        hints = typing.get_type_hints(target) if dataclasses.is_dataclass(target) else {}
        if part not in hints:
            raise _unknown_key(key, where)
        target = hints[part]
    if dataclasses.is_dataclass(target):
        raise FlowerdistError(f"config key '{key}' in {where} is a section; set its keys, e.g. '{key}.{dataclasses.fields(target)[0].name}'")
    return target


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _parse_cli_value(text: str, tp: Any) -> Any:
    """CLI values are strings; YAML-parse them unless the field is a plain string."""
    if tp is str or typing.get_origin(tp) is Literal:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        target = out
        for s in sections:
            target = target.setdefault(s, {})
        target[leaf] = value
    return out


def _build(flat: dict[str, Any], where: dict[str, str]) -> Config:
    """Validate dotted values into a Config; the first error becomes one line naming key and source."""
    for key in flat:
        _field_type(key, where[key])
    try:
        return TypeAdapter(Config).validate_python(_nest(flat))
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"] if isinstance(p, str))
        source = where.get(key, "the config")
        if first["type"] == "literal_error" and isinstance(first["input"], str) and first["input"].upper() in first["ctx"]["expected"]:
            return _build({**flat, key: first["input"].upper()}, where)  # shortcut a -> A
        if first["type"] == "finite_number":
            raise FlowerdistError(f"config key '{key}' in {source} must be a finite number, got {first['input']!r}") from None
        raise FlowerdistError(f"config key '{key}' in {source} must be {_type_name(_field_type(key, source))}, got {first['input']!r}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated Config from defaults, an optional YAML file and `KEY=VALUE` overrides."""
    flat: dict[str, Any] = {}
    name = "flowerdist"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FlowerdistError(f"config file {path} not found; pass an existing file with -c (see configs/)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            at = f" at line {line + 1}" if line is not None else ""
            raise FlowerdistError(f"config file {path} is not valid YAML{at}: {getattr(err, 'problem', err)}") from None
        if not isinstance(data, dict):
            raise FlowerdistError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
        name, flat = path.stem, _flatten(data)
    return _with_overrides({"name": name, **flat}, {"name": "the config", **dict.fromkeys(flat, str(path))}, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A copy of `cfg` with dotted `KEY=VALUE` strings applied (values parsed as YAML), validated."""
    flat = _flatten(cfg.to_dict())
    return _with_overrides(flat, dict.fromkeys(flat, "the config"), overrides)


def _with_overrides(flat: dict[str, Any], where: dict[str, str], overrides) -> Config:
    for item in overrides:
        if "=" not in item:
            raise FlowerdistError(f"override '{item}' must look like KEY=VALUE, e.g. optim.lr=0.01")
        key, value = (t.strip() for t in item.split("=", 1))
        flat[key], where[key] = _parse_cli_value(value, _field_type(key, "the command line")), "the command line"
    cfg = _build(flat, where)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], where: str = "a checkpoint") -> Config:
    """Rebuild a Config saved with a run (config.yaml or checkpoint metadata)."""
    flat = _flatten(data)
    return _build(flat, dict.fromkeys(flat, where))


def validate(cfg: Config) -> None:
    """Reject impossible values before any work starts, naming the key."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise FlowerdistError(f"config key '{key}' {what} (got {_get(cfg, key)!r})")

    need(cfg.data.root.strip() != "", "data.root", "is empty; set data.root=PATH to a ROOT/<class>/<image> folder")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be at least 1")
    need(cfg.data.image_size >= 16, "data.image_size", "must be at least 16 pixels")
    need(cfg.data.eval_image_size == 0 or cfg.data.eval_image_size >= 16, "data.eval_image_size", "must be 0 (data.image_size) or at least 16 pixels")
    if cfg.model.name == "seed_resnet" and cfg.data.eval_image_size not in (0, cfg.data.image_size):
        raise FlowerdistError("data.eval_image_size must equal data.image_size for seed_resnet (its linear layer fixes the input size); set data.eval_image_size=0")
    need(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction", "must lie strictly between 0 and 1")
    need(cfg.data.num_workers == "auto" or cfg.data.num_workers >= 0, "data.num_workers", "must be 0 or more, or auto")
    need(cfg.data.cache_size == 0 or cfg.data.cache_size >= 16, "data.cache_size", "must be 0 (original sizes) or at least 16 pixels")
    need(cfg.data.prefetch_factor >= 1, "data.prefetch_factor", "must be at least 1")
    need(0.0 < cfg.data.min_scale <= 1.0, "data.min_scale", "must lie in (0, 1]")
    need(cfg.data.progressive_from == 0 or 16 <= cfg.data.progressive_from <= cfg.data.image_size, "data.progressive_from",
         "must be 0 (off) or between 16 and data.image_size")
    need(0.0 < cfg.data.progressive_until <= 1.0, "data.progressive_until", "must lie in (0, 1]")
    if cfg.data.progressive_from and cfg.model.name == "seed_resnet":
        raise FlowerdistError("data.progressive_from needs a model without a fixed input size; seed_resnet's linear layer fixes it: set data.progressive_from=0")
    need(0.0 <= cfg.augment.color_jitter <= 1.0, "augment.color_jitter", "must lie in [0, 1]")
    need(0 <= cfg.augment.randaugment_magnitude <= 30, "augment.randaugment_magnitude", "must lie in 0-30")
    need(0.0 <= cfg.augment.random_erasing <= 1.0, "augment.random_erasing", "must lie in [0, 1]")
    need(cfg.augment.mixup_alpha >= 0, "augment.mixup_alpha", "must be 0 (off) or positive")
    need(cfg.augment.cutmix_alpha >= 0, "augment.cutmix_alpha", "must be 0 (off) or positive")
    need(0.0 <= cfg.augment.mix_prob <= 1.0, "augment.mix_prob", "must lie in [0, 1]")
    need(cfg.data.synthetic_per_class >= 2, "data.synthetic_per_class", "must be at least 2")
    need(cfg.data.synthetic_size >= 16, "data.synthetic_size", "must be at least 16 pixels")
    need(cfg.optim.lr > 0, "optim.lr", "must be positive")
    need(cfg.optim.lr <= 10, "optim.lr", "must be at most 10 (a step that large diverges at once)")
    need(0 <= cfg.optim.weight_decay <= 10, "optim.weight_decay", "must lie in [0, 10]")
    need(cfg.optim.reference_batch >= 1, "optim.reference_batch", "must be at least 1")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be 0 or more")
    need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be 0 or more")
    if cfg.optim.warmup_steps and cfg.optim.warmup_epochs:
        raise FlowerdistError("set optim.warmup_steps or optim.warmup_epochs, not both (one of them must be 0)")
    need(0.0 <= cfg.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must lie in [0, 1]")
    need(cfg.optim.clip_grad_norm >= 0, "optim.clip_grad_norm", "must be 0 (off) or positive")
    need(0.0 <= cfg.optim.momentum < 1.0, "optim.momentum", "must lie in [0, 1)")
    need(cfg.train.epochs >= 1, "train.epochs", "must be at least 1")
    need(cfg.train.max_steps >= 0, "train.max_steps", "must be 0 (off) or positive")
    need(cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps", "must be at least 1")
    need(0.0 <= cfg.train.label_smoothing < 1.0, "train.label_smoothing", "must lie in [0, 1)")
    need(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", "must lie in [0, 1) (0: off; 0.999 is typical)")
    if cfg.train.best_of == "ema" and not cfg.train.ema_decay:
        raise FlowerdistError("train.best_of=ema needs an EMA: set train.ema_decay (e.g. 0.999) or train.best_of=model")
    need(cfg.train.log_every >= 1, "train.log_every", "must be at least 1")
    need(cfg.train.eval_every >= 1, "train.eval_every", "must be at least 1 (epochs)")
    need(cfg.train.checkpoint_every >= 0, "train.checkpoint_every", "must be 0 (epoch ends only) or positive")
    need(cfg.train.dist_timeout_s >= 10, "train.dist_timeout_s", "must be at least 10 seconds")
    need(cfg.train.keep_last >= 1, "train.keep_last", "must be at least 1")
    if cfg.train.resume == "auto" and not cfg.train.output_dir:
        raise FlowerdistError("train.resume=auto needs a fixed run directory: set train.output_dir=DIR (the same on every restart)")
    if cfg.model.pretrained and not cfg.model.name.startswith("timm/"):
        raise FlowerdistError(
            f"config key 'model.pretrained' needs a timm model (model.name=timm/{cfg.model.name}); "
            f"scratch model '{cfg.model.name}' has no pretrained weights"
        )


def field_docs() -> dict[str, str]:
    """Dotted key -> the docstring written under its field in this file. Python keeps no attribute docstrings, so
    they are read from the source: the README's key table is generated from them (`flowerdist config --keys`)."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    by_class: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs = by_class.setdefault(node.name, {})
            for field_node, doc in zip(node.body, node.body[1:]):
                if isinstance(field_node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
                    docs[field_node.target.id] = " ".join(str(doc.value.value).split())
    out = {}
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else typing.get_type_hints(Config)[f.name]):
            section = typing.get_type_hints(Config)[f.name]
            out.update({f"{f.name}.{k}": v for k, v in by_class[section.__name__].items()})
        else:
            out[f.name] = by_class["Config"][f.name]
    return out


def keys_table() -> str:
    """The markdown table of every config key: key, default, meaning (the field's docstring)."""
    docs, defaults = field_docs(), Config().flat()
    missing = sorted(set(defaults) - set(docs))
    if missing:
        raise FlowerdistError(f"config keys without a docstring in flowerdist/config.py: {', '.join(missing)}")
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default in defaults.items():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else f'"{default}"' if default == "" else default
        meaning = docs[key].replace("|", "\\|")
        rows.append(f"| `{key}` | `{shown}` | {meaning} |")
    return "\n".join(rows)


def _get(cfg: Config, key: str) -> Any:
    target: Any = cfg
    for part in key.split("."):
        target = getattr(target, part)
    return target


def save_config(cfg: Config, path: Path, changes: dict[str, list] | None = None, step: int = 0) -> None:
    """The resolved config; `changes` made on a resume (key -> [old, new]) are appended under `resumed_changes`,
    so config.yaml says what each part of the run trained with."""
    data = cfg.to_dict()
    history = []
    if path.is_file():
        history = (yaml.safe_load(path.read_text()) or {}).get("resumed_changes", [])
    if changes:
        history = [*history, {"step": step, "changes": {k: {"was": old, "now": new} for k, (old, new) in changes.items()}}]
    if history:
        data["resumed_changes"] = history
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
