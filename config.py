"""Every setting of a run: one dataclass, parsed from the command line and an optional YAML file. The settings of
the data and the model are declared beside their code (DataConfig in data.py, ModelConfig in model.py) and nested
here: their flags stay short (--n_layer 6) and a YAML file holds them under `data:` and `model:`.

Precedence, lowest first: the defaults below, the run's own config.yaml (with --resume RUN), --config_path FILE,
then flags on the command line.
"""

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import simple_parsing
import yaml
from lightning.fabric.accelerators import ACCELERATOR_REGISTRY
from lightning.fabric.connector import _PRECISION_INPUT_STR
from simple_parsing.helpers import list_field

from data import DataConfig
from model import ModelConfig, check_settings
from utils.exits import fail
from utils.launching import launcher_hardware
from utils.lr_schedule import SCHEDULES

LOGGERS = ("csv", "tensorboard", "wandb")
PRECISIONS = get_args(_PRECISION_INPUT_STR)
ACCELERATORS = ("auto", "gpu", *ACCELERATOR_REGISTRY.available_accelerators())
# strategies whose launcher re-runs this script: "ddp_spawn" and the like would need main() passed to launch()
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "fsdp2")
MAX_NAME_BYTES = 255  # the longest file name on common file systems (ext4, xfs, btrfs, NFS)


@dataclass
class Config:
    """Hardware and distribution defaults equal Fabric's own, so that `fabric run` can set them instead."""

    accelerator: str = "auto"
    """Device type: auto, cpu, cuda, gpu, mps or tpu."""
    devices: int | str = "auto"
    """Devices per node: a number, 'auto', -1 (all), or a list like '0,1'."""
    num_nodes: int = 1
    """Number of nodes (machines)."""
    strategy: str = "auto"
    """Distribution strategy: auto, ddp, ddp_find_unused_parameters_true, or fsdp2 (sharded: model.shard_model).
    FSDP1 (fsdp) and DeepSpeed are not offered: fsdp2 covers both (see the README's Launching section)."""
    precision: str | None = None
    """Numeric precision: 32-true, 16-mixed, bf16-mixed, 64-true, ... Unset means Fabric's default (32-true)."""

    root_dir: str = "runs"
    """Folder that holds all run folders."""
    out_dir: str = "train_out"
    """Run name (not a path): a run goes to ROOT_DIR/<YYYYmmdd-HHMMSS>-OUT_DIR."""
    comment: str = ""
    """A short note on this run, kept in config.yaml and sent to the loggers."""
    resume: str | None = None
    """A run folder to continue from its newest checkpoint, a checkpoint file in one, or 'auto': the newest
    unfinished run named *-OUT_DIR (in a SLURM batch job: the run this job started), else a new run."""
    seed: int = 42
    """Seed for model init, data order and dropout."""

    epochs: int = 10
    """Number of passes over the training set (ignored when MAX_STEPS is set)."""
    max_steps: int | None = None
    """Optimizer steps to train for, passing over the data as often as needed. Unset: EPOCHS decide."""
    eff_batch_size: int = 64
    """Samples per optimizer step, summed over all devices and nodes."""
    micro_batch_size: int | None = None
    """Most samples one device takes in one forward pass (more are accumulated). Unset means no cap."""
    base_lr: float = 2e-3
    """Learning rate at BASE_BATCH_SIZE; scaled to EFF_BATCH_SIZE by LR_SCALING_RULE."""
    base_batch_size: int = 64
    """Batch size at which BASE_LR holds."""
    lr_scaling_rule: Literal["linear", "sqrt", "none"] = "linear"
    """How the LR follows the batch size: lr = base_lr * ratio (linear) or * sqrt(ratio), or base_lr (none)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup to the peak LR."""
    lr_schedule: Literal["cosine", "linear", "exponential", "constant"] = "cosine"
    """LR after warmup: decays to MIN_LR_RATIO x peak at the last step (cosine, linear, exponential) or stays."""
    min_lr_ratio: float = 0.1
    """The LR at the last step, as a fraction of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay, on tensors of 2 or more dimensions only (not on biases and norm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float | None = None
    """Max gradient norm, applied once per optimizer step. Unset means off."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (0.999: about the last 1,000 steps); it is
    what validation, best.ckpt, test.py, sample.py and --init_from use. 0: off."""
    dropout: float = 0.1
    """Dropout probability of the model."""
    compile: bool = False
    """Compile the model with torch.compile."""
    activation_checkpointing: bool = False
    """Keep no activations inside each sharding unit (model.sharding_units: the GPT's blocks) in the forward and
    recompute them in the backward: less memory for about one more forward's time; the same gradients (dropout
    draws the same masks again)."""
    compile_check: bool = True
    """With COMPILE: first compare the compiled model's loss and gradients with eager mode's on one batch, and stop
    if they differ (a compiler bug)."""
    init_from: str | None = None
    """Start a new run from these model weights: a checkpoint of this template or a plain state_dict file."""
    collective_timeout: float = 10.0
    """Minutes a process waits for the others in a collective once training runs: a process that died or hangs
    then stops every other with one line (resume with --resume auto). Before the first step (compilation, data
    built by one process first) the wait is 60 minutes or this, the longer."""
    num_workers: int | None = None
    """DataLoader worker processes per device. Unset: up to 4 on CUDA (the host must keep ahead of the GPU), none
    on a CPU (whose cores train)."""
    tf32: bool = True
    """On CUDA, float32 matrix multiplies and convolutions use TF32 (Ampere and newer: several times faster, about
    10 bits of mantissa in the products); false keeps full float32. No effect on a CPU or at other precisions."""

    logger_name: list[str] = list_field("csv", "tensorboard", choices=LOGGERS)
    """Loggers, one or more of: csv tensorboard wandb."""
    log_per_epoch: int = 4
    """How many times per epoch the training loss is logged."""
    log_every_n_steps: int | None = None
    """Log the training loss every this many optimizer steps instead (for step-based runs)."""
    wandb_project: str = "fabric-template"
    """W&B project name (with the wandb logger; set WANDB_MODE=offline to log offline)."""

    val_every_n_steps: int | None = None
    """Validate every this many optimizer steps (and at the last). Unset: at the end of each epoch."""
    checkpoint_frequency: int = 1
    """Save a checkpoint every this many epochs (and always at the end)."""
    checkpoint_every_n_steps: int | None = None
    """Save a checkpoint every this many optimizer steps instead of CHECKPOINT_FREQUENCY epochs."""
    num_checkpoint_keep: int = 3
    """How many of the newest checkpoints to keep (checkpoints/best.ckpt is kept apart)."""
    save_top_k: int = 1
    """Keep the K best checkpoints by --monitor, as checkpoints/top-step-<step>-<metric>=<value>.ckpt beside
    best.ckpt (the best of them). 1: best.ckpt alone."""
    monitor: str = "val_loss"
    """Validation metric that picks checkpoints/best.ckpt and drives early stopping: val_<name> for any metric of
    make_metrics in train.py (val_loss, val_acc, ...)."""
    monitor_mode: str | None = None
    """Whether a lower (min) or higher (max) MONITOR is better. Unset: the metric's own direction (its
    higher_is_better: loss min, accuracy max); a mode against it is refused."""
    early_stop_patience: int = 0
    """Stop after this many validations in a row that do not beat the reference by more than EARLY_STOP_MIN_DELTA.
    The reference is the last validation that did (as in Lightning's and Keras' EarlyStopping), so slow steady
    progress counts. 0: off."""
    early_stop_min_delta: float = 0.0
    """How much a validation must beat the early-stopping reference by to count as progress (best.ckpt still
    follows every strict improvement)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        if isinstance(self.devices, str) and self.devices.lstrip("-").isdigit():
            self.devices = int(self.devices)
        checks = [
            ("accelerator", self.accelerator in ACCELERATORS, f"one of {', '.join(ACCELERATORS)}"),
            ("strategy", self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)} (the strategies this "
                                                      "template runs; fsdp2 covers FSDP1 and DeepSpeed's ZeRO)"),
            ("precision", self.precision is None or self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("devices", _valid_devices(self.devices), "'auto', -1, a positive number or a list like '0,1'"),
            ("num_nodes", self.num_nodes >= 1, "at least 1"),
            ("lr_scaling_rule", self.lr_scaling_rule in ("linear", "sqrt", "none"), "linear, sqrt or none"),
            ("logger_name", self.logger_name and set(self.logger_name) <= set(LOGGERS),
             f"one or more of {', '.join(LOGGERS)}"),
            ("out_dir", self.out_dir and Path(self.out_dir).name == self.out_dir and self.out_dir not in (".", ".."),
             "a name, not a path: the run folder is ROOT_DIR/<stamp>-OUT_DIR, so put the parent folder in root_dir"),
            ("out_dir", len(self.out_dir.encode()) <= MAX_NAME_BYTES - len("YYYYmmdd-HHMMSS-"),
             f"a name of at most {MAX_NAME_BYTES - 16} bytes: with the time stamp before it, the run folder's name "
             f"must fit the file system's {MAX_NAME_BYTES}"),
            ("weight_decay", self.weight_decay >= 0, "at least 0"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0 is off)"),
            ("num_workers", self.num_workers is None or self.num_workers >= 0, "at least 0"),
            ("collective_timeout", self.collective_timeout > 0, "more than 0 minutes"),
            ("num_checkpoint_keep", self.num_checkpoint_keep >= 1, "at least 1"),
            ("save_top_k", self.save_top_k >= 1, "at least 1"),
            ("lr_schedule", self.lr_schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("warmup_steps", self.warmup_steps >= 0, "at least 0"),
            ("warmup_steps", not self.max_steps or self.max_steps < 1 or self.warmup_steps < self.max_steps,
             f"smaller than max_steps={self.max_steps}"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("min_lr_ratio", self.lr_schedule != "exponential" or self.min_lr_ratio > 0,
             "above 0 for lr_schedule=exponential"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("monitor", self.monitor.startswith("val_"), "val_<name> of a metric of make_metrics in train.py"),
            ("monitor_mode", self.monitor_mode in (None, "min", "max"), "min or max"),
            ("early_stop_patience", self.early_stop_patience >= 0, "at least 0 (0 is off)"),
            ("early_stop_min_delta", self.early_stop_min_delta >= 0, "at least 0"),
        ]
        for name in ("epochs", "eff_batch_size", "base_lr", "base_batch_size", "log_per_epoch", "checkpoint_frequency"):
            checks.append((name, getattr(self, name) > 0, "positive"))
        for name in ("micro_batch_size", "grad_clip", "max_steps", "log_every_n_steps", "val_every_n_steps",
                     "checkpoint_every_n_steps"):
            checks.append((name, getattr(self, name) is None or getattr(self, name) > 0, "positive or unset"))
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {expected}")
        check_settings(self)  # model.py's checks of settings across groups (a model that fits the data)


def _valid_devices(devices: int | str) -> bool:
    if isinstance(devices, int):
        return devices > 0 or devices == -1
    parts = devices.split(",")
    return devices == "auto" or (len(parts) > 1 and all(p.strip().isdigit() for p in parts if p.strip()))


class _Parser(simple_parsing.ArgumentParser):
    def error(self, message):
        raise ValueError(message)  # parse_config turns every error into one line and exit status 2


def make_parser(description: str | None = None, defaults: Config | None = None) -> _Parser:
    parser = _Parser(allow_abbrev=False, nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT, description=description)
    parser.add_argument("--config_path", type=Path, default=None, help="YAML file of settings; flags override it.")
    parser.add_arguments(Config, dest="config", default=defaults)
    return parser


def _as_flags(values: dict) -> list[str]:
    """Turns a config file's {field: value} into flags, so that its values get the same parsing and checks. A value
    is joined to its flag (--comment=-v2), so that one starting with '-' stays a value; null unsets the field."""
    flags = []
    for name, value in values.items():
        if isinstance(value, dict):  # data: and model: hold flags of their own
            flags += _as_flags(value)
        elif isinstance(value, list):
            flags += [f"--{name}", *map(str, value)]
        else:
            flags.append(f"--{name}={'none' if value is None else value}")
    return flags


NESTED = {"data": DataConfig, "model": ModelConfig}


def _all_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.name not in NESTED] + \
        [f for group in NESTED.values() for f in dataclasses.fields(group)]


def _check_keys(values: dict) -> dict:
    """Refuses a key that is no setting, naming the group a nested setting belongs under."""
    for name, value in values.items():
        group = NESTED.get(name)
        if group is not None and not isinstance(value, dict):
            raise ValueError(f"{name!r} must be a mapping of its settings")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(group)}) if group else []
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} under {name!r}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        owner = [key for key, group in NESTED.items() if unknown[0] in {f.name for f in dataclasses.fields(group)}]
        raise ValueError(f"unknown key {unknown[0]!r}" + (f" (it belongs under {owner[0]}:)" if owner else ""))
    return values


def yaml_error(err: yaml.YAMLError) -> str:
    """A YAML error in one line, with the line and column it points at."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{getattr(err, 'problem', None) or str(err).splitlines()[0]}"


def read_yaml(path: Path) -> dict:
    """Reads a config file into {field: value}; an unreadable file or an unknown key is an error."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ValueError(f"cannot be read ({err.__class__.__name__}: {err.strerror})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"cannot be read (YAML error at {yaml_error(err)})") from None
    if not isinstance(values, dict):
        raise ValueError("expected a mapping of field: value")
    if values.pop("derived", None) is not None:  # a run's config.yaml: a record of settings, not a resume
        values.pop("resume", None)
    return _check_keys(values)


def _bare_flag(argv: list[str]) -> str | None:
    """The first flag of a field that takes a value but was given none (simple_parsing would quietly use None)."""
    takes_value = {f"--{f.name}" for f in _all_fields() if f.type is not bool} | {"--config_path"}
    for i, flag in enumerate(argv):
        if flag in takes_value and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            return flag
    return None


def _optional_fields() -> set[str]:
    return {f.name for f in _all_fields() if type(None) in get_args(f.type)}


def _take_unset(flags: list[str]) -> tuple[list[str], set[str]]:
    """Takes `--FIELD none` (or `--FIELD=none`) out of the flags for fields that may be unset; returns the other flags
    and the fields whose last word is none."""
    optional, kept, unset = _optional_fields(), [], set()
    i = 0
    while i < len(flags):
        name, joined, value = flags[i].removeprefix("--").partition("=")
        if not joined and i + 1 < len(flags):
            value = flags[i + 1]
        if flags[i].startswith("--") and name in optional:
            if value.lower() in ("none", "null"):
                unset.add(name)
                i += 1 if joined else 2
                continue
            unset.discard(name)
        kept.append(flags[i])
        i += 1
    return kept, unset


def _from_values(values: dict) -> Config:
    """A Config from {field: value} with typed values (a run's record): nothing passes through the parser as text."""
    groups = {name: group(**values.get(name, {})) for name, group in NESTED.items()}
    return Config(**{name: value for name, value in values.items() if name not in NESTED}, **groups)


def _unset(cfg: Config, names: set[str]) -> Config:
    """cfg with the named fields (top-level or in a group) set to None, checked again."""
    top = {name: None for name in names if name in {f.name for f in dataclasses.fields(Config)}}
    groups = {group: dataclasses.replace(getattr(cfg, group), **{name: None for name in names - top.keys()
                                                                  if hasattr(getattr(cfg, group), name)})
              for group in NESTED}
    return dataclasses.replace(cfg, **top, **groups) if names else cfg


def _group_named(flag: str) -> str:
    """--data.streaming, --model.n_layer=4: a data or model setting may be named under its group, as a YAML file
    nests it (a name its group does not have is left for the parser to refuse)."""
    group, dot, rest = flag.removeprefix("--").partition(".")
    fields = {f.name for f in dataclasses.fields(NESTED[group])} if flag.startswith("--") and group in NESTED else ()
    return f"--{rest}" if dot and rest.partition("=")[0] in fields else flag


def parse_config(argv: list[str] | None = None, saved: dict | None = None, description: str | None = None) -> Config:
    """Parses flags over --config_path over the hardware a launcher fixed over `saved` (a run's own settings, typed
    values that never pass through the parser) over the defaults. `--FIELD none` unsets an optional field."""
    argv = [_group_named(flag) for flag in (sys.argv[1:] if argv is None else argv)]
    bare = _bare_flag(argv)
    if bare:
        fail(f"{bare} needs a value")
    try:
        defaults = _from_values({**(saved or {}), **launcher_hardware()})
    except (TypeError, ValueError) as err:
        fail(f"the run's recorded settings are invalid: {err}")
    parser = make_parser(description, defaults)
    try:
        config_path = parser.parse_known_args(_take_unset(argv)[0])[0].config_path
    except ValueError as err:
        fail(str(err))
    flags = []
    if config_path is not None:
        try:
            flags = _as_flags(read_yaml(config_path))
            file_flags, file_unset = _take_unset(flags)
            _unset(parser.parse_args(file_flags).config, file_unset)  # a bad value in the file is named as the file's
        except ValueError as err:
            fail(f"config_path={str(config_path)!r}: {err}")
    flags, unset = _take_unset(flags + argv)
    try:
        return _unset(parser.parse_args(flags).config, unset)
    except ValueError as err:
        fail(str(err))


RESUME_CHOICE = "FABRIC_TEMPLATE_RESUME"  # what the launching process resolved; the processes Fabric starts inherit it


def load_config(argv: list[str] | None = None, description: str | None = None) -> Config:
    """parse_config, with --resume resolved to a run folder or checkpoint (None: a new run), and that run's own
    settings under the flags, so nothing is repeated. Reads only."""
    from utils.run_dir import find_resume_target

    cfg = parse_config(argv, description=description)
    if cfg.resume is None:
        return cfg
    if cfg.init_from is not None:
        fail(f"init_from={cfg.init_from!r} cannot be given with resume={cfg.resume!r}: a resumed run continues from "
             f"its own checkpoint; init_from starts a new run")
    if RESUME_CHOICE not in os.environ:  # processes that Fabric starts later must not choose again
        try:
            run_dir, checkpoint = find_resume_target(cfg.resume, cfg.root_dir, cfg.out_dir)
        except ValueError as err:
            fail(str(err))
        os.environ[RESUME_CHOICE] = str(checkpoint or run_dir or "")
    cfg.resume = os.environ[RESUME_CHOICE] or None
    if cfg.resume is None:
        return cfg
    run_dir, _ = find_resume_target(cfg.resume, cfg.root_dir, cfg.out_dir)
    saved, _ = _read_run_record(run_dir, f"resume={cfg.resume!r}")
    cfg = parse_config(argv, saved=saved, description=description)
    cfg.resume = os.environ[RESUME_CHOICE]
    return cfg


def load_run_config(run_dir: Path, argv: list[str], description: str | None = None) -> tuple[Config, dict]:
    """(settings, derived values) of an existing run, for a reader of it (test.py, sample.py): the run's own record
    under any flags in `argv`."""
    if not (run_dir / "config.yaml").is_file():
        fail(f"out_dir={str(run_dir)!r} is not a run folder (no config.yaml)")
    saved, derived = _read_run_record(run_dir, f"out_dir={str(run_dir)!r}")
    return parse_config(argv, saved=saved, description=description), derived


def _read_run_record(run_dir: Path, asked_by: str) -> tuple[dict, dict]:
    """The run's (settings, derived values); a record that cannot be read is a one-line error naming `asked_by`."""
    from utils.run_dir import run_record

    try:
        saved, derived = run_record(run_dir)
        return _check_keys(saved), derived
    except yaml.YAMLError as err:
        fail(f"{asked_by}: the run's record cannot be read (YAML error at {yaml_error(err)})")
    except (OSError, ValueError) as err:
        fail(f"{asked_by}: the run's record cannot be read ({str(err).splitlines()[0]})")


def settings_record(cfg: Config) -> dict:
    """The settings as recorded in config.yaml, checkpoints and loggers: everything but `resume`, which says how
    this process started, not how the run trains."""
    return {name: value for name, value in dataclasses.asdict(cfg).items() if name != "resume"}
