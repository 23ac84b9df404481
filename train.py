"""Pretrain a NeoBERT encoder with masked language modelling. One code path from a laptop CPU to torchrun on 8 GPUs.

    python train.py configs/smoke.yaml                                   # one process: CPU or one GPU
    python train.py configs/smoke.yaml --trainer.max_steps 50 optimizer.lr=2e-4
    torchrun --nproc_per_node 8 train.py configs/pretrain.yaml           # data-parallel (DDP), same code
    python train.py configs/smoke.yaml --prepare-only [--bench]          # only prepare the data (= python data.py)

The config is one YAML file with the sections model, tokenizer, dataset, datacollator, trainer, optimizer, scheduler,
wandb; every key can be overridden on the command line as `--section.key value` or `section.key=value`.
Read top to bottom: config -> schedule -> checkpoints -> evaluation -> the loop -> main.
"""

import dataclasses
import difflib
import json
import math
import os
import shutil
import signal
import sys
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

import data
import neobert
from data import UserError

# -----------------------------------------------------------------------------
# config: one dataclass per section; a choice is a Literal type, each section checks its own values in __post_init__
# (so they hold however the section is built), and check_config holds the few rules that span sections.
# load_config turns YAML and `--section.key value` overrides into these types, strictly, before any work.

require = data.require  # require(ok, msg): UserError(msg) unless ok


@dataclass
class TrainerConfig:
    output_dir: str = "runs/neobert"
    per_device_train_batch_size: int = 16  # rows per micro-batch per process
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1  # global batch = per_device_train_batch_size * this * world size
    max_steps: int = 1000  # optimizer steps
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 autocast on CUDA and bf16 CPUs, else fp32
    torch_compile: bool = False
    gradient_checkpointing: bool = False
    gradient_clipping: Optional[float] = 1.0  # max global grad norm; null = no clipping (the norm is still logged)
    logging_steps: int = 10  # a metrics.jsonl line every this many steps (and at the last one)
    eval_steps: int = 1000  # evaluate on the val split every this many steps and at the end; 0 = never
    eval_max_batches: int = 20  # micro-batches per process in one evaluation
    save_steps: int = 1000  # checkpoint every this many steps; a final one is always written; 0 = only the final
    save_total_limit: Optional[int] = 3  # keep the newest N checkpoints; null = keep all
    resume_from_checkpoint: Union[bool, str, None] = False  # false | true | latest | auto | <path>
    init_from: Optional[str] = None  # model weights only (new optimizer, step 0): checkpoint dir, run dir or hub id
    seed: int = 0
    disable_tqdm: bool = False
    objective: Literal["mlm", "contrastive"] = "mlm"  # mlm (pretraining) | contrastive (the contrastive section)
    num_train_epochs: int = 10  # fine-tuning tasks (evaluate.py glue): epochs per run (trainer.max_steps > 0 caps it)
    early_stopping: int = 0  # fine-tuning tasks: stop after this many evaluations without improvement; 0 = off

    def __post_init__(self):
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "num_train_epochs"):
            require(getattr(self, key) >= 1, f"trainer.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_steps", "save_steps", "eval_steps", "eval_max_batches", "early_stopping", "seed"):
            require(getattr(self, key) >= 0, f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        require(self.save_total_limit is None or self.save_total_limit >= 1,
                f"trainer.save_total_limit must be at least 1 (or null to keep all), got {self.save_total_limit}")
        require(self.gradient_clipping is None or self.gradient_clipping > 0,
                f"trainer.gradient_clipping must be > 0 (or null for no clipping), got {self.gradient_clipping}")
        require(self.resume_from_checkpoint != "",
                "trainer.resume_from_checkpoint is empty; use false, true, latest, auto or a path")


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"  # adamw (fused on CUDA); norms, biases and embeddings get no weight decay
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1

    def __post_init__(self):
        require(self.lr >= 0 and self.weight_decay >= 0 and self.eps > 0,
                "optimizer.lr and optimizer.weight_decay must be >= 0 and optimizer.eps > 0")
        require(all(0 <= b < 1 for b in self.betas), f"optimizer.betas must be in [0, 1), got {list(self.betas)}")


@dataclass
class SchedulerConfig:
    name: Literal["cosine", "linear", "constant"] = "cosine"  # the decay after a linear warmup
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # the step where the decay reaches final_lr_ratio; null = trainer.max_steps
    final_lr_ratio: float = 0.1

    def __post_init__(self):
        require(self.warmup_steps >= 0 and (self.decay_steps is None or self.decay_steps >= 0),
                "scheduler.warmup_steps and scheduler.decay_steps must be >= 0")
        require(0 <= self.final_lr_ratio <= 1, f"scheduler.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")


@dataclass
class WandbConfig:
    mode: Literal["disabled", "online", "offline"] = "disabled"  # disabled: wandb is not even imported
    project: str = "neobert"
    name: Optional[str] = None


@dataclass
class Config:
    model: neobert.NeoBERTConfig = field(default_factory=neobert.NeoBERTConfig)
    tokenizer: data.TokenizerConfig = field(default_factory=data.TokenizerConfig)
    dataset: data.DatasetConfig = field(default_factory=data.DatasetConfig)
    datacollator: data.DataCollatorConfig = field(default_factory=data.DataCollatorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    contrastive: data.ContrastiveConfig = field(default_factory=data.ContrastiveConfig)  # objective contrastive
    tasks: dict = field(default_factory=dict)  # extra sections a caller asked for (load_config's extra_sections)


def check_config(cfg: Config):
    """The rules that span sections (each section has checked its own values when it was built)."""
    require(not cfg.dataset.streaming or cfg.datacollator.pack_sequences,
            "dataset.streaming supports packed rows only: set datacollator.pack_sequences: true")
    require(cfg.dataset.max_seq_length <= cfg.model.max_position_embeddings,
            f"dataset.max_seq_length={cfg.dataset.max_seq_length} exceeds "
            f"model.max_position_embeddings={cfg.model.max_position_embeddings}")


NONE_WORDS = ("null", "none", "~")
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} {_type_name(args[0])}"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is Literal:
        return " | ".join(map(str, args))
    return getattr(tp, "__name__", str(tp))


def convert(value, tp, where: str):
    """A YAML value or a command-line string -> the annotated type tp (bool, int, float, str, dict, Optional/Union,
    Literal choices, list[...], tuple[...], a nested config dataclass from a mapping). A mismatch, a choice not
    offered or a non-finite number is a UserError naming `where` (e.g. optimizer.lr). No eval of any kind."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is typing.Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or str(value).lower() in NONE_WORDS):
            return None
        for a in args:
            if a is not type(None):
                try:
                    return convert(value, a, where)
                except UserError:
                    pass
        raise bad
    if origin is Literal:
        if value is False and "no" in args:  # YAML reads an unquoted `no` as false
            return "no"
        if value not in args or isinstance(value, bool):
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):  # a mapping inside a section, e.g. one entry of a list of sources
        return build_section(where, tp, value)
    if origin in (list, tuple):
        if isinstance(value, str):  # "0.9,0.95" or "[0.9, 0.95]"
            s = value.strip().removeprefix("[").removesuffix("]").strip()
            value = [v.strip() for v in s.split(",")] if s else []
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            raise bad
        items = [convert(v, args[i] if origin is tuple else args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        value = BOOL_WORDS.get(value.lower(), value) if isinstance(value, str) else value
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise bad
    if tp in (int, float):
        if isinstance(value, str):  # PyYAML reads 2e-4 (no dot) as a string, and overrides are strings
            try:
                value = int(value)
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and value != int(value)):
            raise bad
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value}")
        return tp(value)
    if isinstance(tp, type) and isinstance(value, tp):  # str, dict
        return value
    raise bad


def build_section(name: str, cls, raw):
    """A config section (a dataclass) from a mapping, strictly: unknown keys and wrong types are UserErrors, then the
    section's own checks (__post_init__) run."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config section {name!r} must be a mapping of key: value, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {name}.{close[0]}?)" if close else ""
            raise UserError(f"unknown config key {name}.{key}{hint}; valid keys in {name}: {', '.join(valid)}")
    kwargs = {key: convert(value, hints[key], f"{name}.{key}") for key, value in raw.items()}
    try:
        return cls(**kwargs)
    except (UserError, ValueError, TypeError) as e:  # its own checks (ValueError: neobert.py imports only torch)
        msg = str(e)
        raise UserError(msg if msg.startswith(f"{name}.") else f"{name}: {msg}") from None


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--trainer.max_steps', '50', 'optimizer.lr=2e-4', '--wandb.mode=offline'] -> [(dotted key, string value)]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" in arg:
                key, value = arg.split("=", 1)
            elif i + 1 < len(args):
                key, value = arg, args[i + 1]
                i += 1
            else:
                raise UserError(f"--{arg} needs a value: --{arg} VALUE")
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise UserError(f"unexpected argument {arg!r}; overrides look like --section.key value or "
                            "section.key=value")
        out.append((key, value))
        i += 1
    return out


def load_config(path, overrides: Optional[list[str]] = None, extra_sections: Optional[dict] = None) -> Config:
    """YAML file (or None) + overrides -> Config. Unknown sections/keys and wrong types raise UserError before any work.
    extra_sections {name: dataclass} adds task sections (e.g. glue) that land in cfg.tasks[name]."""
    raw = {}
    if path is not None:  # None: the defaults plus the overrides
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections (model:, trainer:, ...)")
    schema = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config) if f.name != "tasks"}
    schema.update(extra_sections or {})
    for dotted, value in parse_overrides(list(overrides or [])):
        parts = dotted.split(".")
        if len(parts) != 2 or parts[0] not in schema:
            raise UserError(f"unknown override {dotted!r}; use section.key with a section in {', '.join(schema)}")
        section = raw.get(parts[0])
        if section is None:
            section = raw[parts[0]] = {}
        if not isinstance(section, dict):
            raise UserError(f"config section {parts[0]!r} in {path} must be a mapping")
        section[parts[1]] = value
    for name in raw:
        if name not in schema:
            raise UserError(f"unknown config section {name!r} in {path}; valid sections: {', '.join(schema)}")
    built = {name: build_section(name, cls, raw.get(name)) for name, cls in schema.items()}
    tasks = {name: built.pop(name) for name in list(built) if name in (extra_sections or {})}
    cfg = Config(**built, tasks=tasks)
    check_config(cfg)
    return cfg


def _plain(x):
    if dataclasses.is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def config_to_dict(cfg: Config) -> dict:
    """Plain dict (YAML/JSON-safe) with the same sections as the file; load_config reads it back to an equal Config."""
    d = _plain(cfg)
    d.update(d.pop("tasks"))
    return d


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# -----------------------------------------------------------------------------
# precision: bf16 autocast where the hardware has bf16 units, fp32 elsewhere (weights and optimizer stay fp32)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # /proc/cpuinfo: x86 AVX512-BF16 / AMX, aarch64 BF16


def cpu_flags(cpuinfo="/proc/cpuinfo") -> set:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS: then fp32 is chosen)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    return {w for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
            for w in line.split(":", 1)[-1].split()}


def cpu_has_native_bf16() -> bool:
    # torch's capability names the kernel family it dispatches to (AVX2, AVX512, SVE256, ...), which does not say
    # whether bf16 units exist; the feature flags do. Either naming bf16/AMX is enough.
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "BF16" in capability or "AMX" in capability or bool(cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_precision(mixed_precision: str, device, warn=data.warn) -> str:
    """trainer.mixed_precision (auto | bf16 | no) on this device -> "bf16" or "no". auto: bf16 on CUDA and on CPUs
    with native bf16 (AVX512-BF16, AMX), fp32 otherwise: emulated bf16 is hundreds of times slower than fp32."""
    convert(mixed_precision, typing.get_type_hints(TrainerConfig)["mixed_precision"], "trainer.mixed_precision")
    device_type = torch.device(device).type
    native = device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16())
    if mixed_precision == "auto":
        return "bf16" if native else "no"
    if mixed_precision == "bf16" and device_type == "cpu" and not native and warn is not None:
        warn("trainer.mixed_precision=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): expect it to be "
             "hundreds of times slower than fp32 (2048^3 matmul on an AVX2 CPU: 0.27 GFLOP/s bf16, 98 fp32); "
             "use auto or no")
    return mixed_precision


def autocast(device, precision: str):
    """bf16 autocast for precision "bf16", else a no-op context."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


# -----------------------------------------------------------------------------
# learning-rate schedule: a pure function of the step, so resuming needs nothing saved


def get_lr(step: int, lr: float, sched: SchedulerConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to lr over warmup_steps, then cosine or linear decay
    to lr * final_lr_ratio at decay_steps (default max_steps), flat after; constant stays at lr after warmup."""
    if step < sched.warmup_steps:
        return lr * (step + 1) / sched.warmup_steps
    if sched.name == "constant":
        return lr
    end = sched.decay_steps if sched.decay_steps is not None else max_steps
    progress = min(1.0, (step - sched.warmup_steps) / max(1, end - sched.warmup_steps))
    if sched.name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return lr * (sched.final_lr_ratio + (1.0 - sched.final_lr_ratio) * decay)


# -----------------------------------------------------------------------------
# checkpoints
#   model_checkpoints/<step>/  model.safetensors (plain keys), config.yaml, tokenizer.json   <- export, init_from
#   model_checkpoints/latest   the newest complete step
#   checkpoints/<step>/        optimizer.pt, train_state.json (step, tokens, every rank's loader state, config)
# Each directory is written as <name>.tmp-<pid> and renamed when complete; a step counts only when both exist.


def _steps_in(d: Path) -> set:
    return {int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()} if d.is_dir() else set()


def list_checkpoints(run_dir) -> list[int]:
    """Steps with a complete resume checkpoint, oldest first."""
    run_dir = Path(run_dir)
    return sorted(_steps_in(run_dir / "checkpoints") & _steps_in(run_dir / "model_checkpoints"))


def _write_dir(final: Path, write) -> None:
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():  # the same step written again (a resumed run passing it): swap, never leave a gap
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _kill_point(where: str, step: int) -> None:
    # test hook: NEOBERT_TEST_KILL=<where>:<step> SIGKILLs this process there (where: mid_save | after_save)
    if os.environ.get("NEOBERT_TEST_KILL") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, cfg: Config, tokenizer, train_state: dict) -> None:
    """Called on rank 0 only, with the raw (uncompiled, unwrapped) model."""
    from safetensors.torch import save_file

    def write_model(d: Path):
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.yaml").write_text(config_to_yaml(cfg))
        tokenizer.save(str(d / "tokenizer.json"))
        _kill_point("mid_save", step)

    def write_state(d: Path):
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
        (d / "train_state.json").write_text(json.dumps(train_state))

    _write_dir(run_dir / "model_checkpoints" / str(step), write_model)
    _write_dir(run_dir / "checkpoints" / str(step), write_state)
    latest = run_dir / "model_checkpoints" / "latest"
    tmp = latest.with_name(f"latest.tmp-{os.getpid()}")
    tmp.write_text(f"{step}\n")
    os.replace(tmp, latest)
    limit = cfg.trainer.save_total_limit
    if limit:
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(run_dir / "checkpoints" / str(old), ignore_errors=True)
            shutil.rmtree(run_dir / "model_checkpoints" / str(old), ignore_errors=True)


def find_resume_checkpoint(t: TrainerConfig) -> Optional[Path]:
    """The checkpoints/<step> dir to resume from, or None for a fresh run."""
    r, run_dir = t.resume_from_checkpoint, Path(t.output_dir)
    if r is None or r is False:
        if list_checkpoints(run_dir):
            raise UserError(f"{run_dir} already holds checkpoints; set trainer.resume_from_checkpoint auto to continue "
                            "that run, or choose a new trainer.output_dir")
        return None
    if r is True or r in ("latest", "auto"):
        steps = list_checkpoints(run_dir)
        if steps:
            return run_dir / "checkpoints" / str(steps[-1])
        if r == "auto":
            return None
        raise UserError(f"trainer.resume_from_checkpoint={str(r).lower()} but {run_dir} holds no complete checkpoint "
                        "to resume; use auto to start fresh when there is none")
    p = Path(r)
    if p.parent.name == "model_checkpoints":  # given the model dir of a step: its resume state sits beside it
        p = p.parent.parent / "checkpoints" / p.name
    if not (p / "train_state.json").is_file() and list_checkpoints(p):  # a run dir: its newest step
        p = p / "checkpoints" / str(list_checkpoints(p)[-1])
    if not (p / "train_state.json").is_file() or not (p.parent.parent / "model_checkpoints" / p.name).is_dir():
        raise UserError(f"trainer.resume_from_checkpoint={r}: not a run directory or a complete checkpoints/<step> "
                        "directory")
    return p


def load_weights(model, path) -> None:
    """model.safetensors into the model, strictly; a different shape is a UserError naming the tensor."""
    from safetensors.torch import load_file
    try:
        neobert.load_state_dict_strict(model, load_file(str(path)))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # unreadable / truncated file
        raise UserError(f"cannot read {path}: {e}") from None


# -----------------------------------------------------------------------------
# loading a trained model, the same way everywhere (trainer.init_from, evaluate.py glue | mteb, ...):
# a run dir, model_checkpoints/<step>, checkpoints/<step>, an exported / released folder (config.json), or a hub id

MODEL_SOURCES = neobert.MODEL_SOURCES


def resolve_model_source(source) -> Path:
    """The folder holding the model that `source` names (neobert.resolve_model_dir: a run dir gives its newest
    complete checkpoint); a bad source is a UserError."""
    try:
        return neobert.resolve_model_dir(source)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


@dataclass
class PretrainedInfo:
    path: Path  # the folder the weights came from
    model_config: neobert.NeoBERTConfig
    tokenizer: object  # tokenizers.Tokenizer, or None when the folder has no tokenizer.json
    full_config: dict  # config.yaml (a training checkpoint) or config.json (a Hugging Face folder)
    pooling: str = "mean"  # mean | cls: contrastive.pooling, or an exported folder's 1_Pooling/config.json
    num_labels: Optional[int] = None  # a saved classifier head's label count
    id2label: Optional[dict] = None  # {int: str} of a saved classifier


def _read_source_config(path: Path, model_overrides: dict):
    """(full config dict, NeoBERTConfig, pooling, saved classifier section) of a checkpoint or an HF folder."""
    if (path / "config.yaml").is_file():  # a training checkpoint (model_checkpoints/<step> layout)
        try:
            full = yaml.safe_load((path / "config.yaml").read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{path / 'config.yaml'} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(full, dict) or not isinstance(full.get("model"), dict):
            raise UserError(f"{path / 'config.yaml'} has no model: section; is it a neobert checkpoint?")
        model_config = build_section("model", neobert.NeoBERTConfig, {**full["model"], **model_overrides})
        pooling = (full.get("contrastive") or {}).get("pooling", "mean")
        return full, model_config, pooling, full.get("classifier") or {}
    try:
        full = json.loads((path / "config.json").read_text())
        model_config = neobert.NeoBERTConfig.from_hf_dict(full, **model_overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path / 'config.json'}: {e}") from None
    pooling = "mean"
    if (path / "1_Pooling" / "config.json").is_file():  # sentence-transformers' pooling of an exported model
        st = json.loads((path / "1_Pooling" / "config.json").read_text())
        pooling = "cls" if st.get("pooling_mode_cls_token") else "mean"
    saved = {k: full[k] for k in ("id2label", "classifier_dropout") if full.get(k) is not None}
    return full, model_config, pooling, saved


def load_pretrained(source, head: str = "mlm", num_labels: Optional[int] = None,
                    classifier_dropout: Optional[float] = None, classifier_init_range: float = 0.02,
                    new_head_if_mismatch: bool = False, **model_overrides):
    """(model, PretrainedInfo) from any MODEL_SOURCES. head: mlm (NeoBERTLMHead), encoder (NeoBERT) or classifier
    (NeoBERTForSequenceClassification: a saved head with the same label count is kept; from an MLM checkpoint, or with
    new_head_if_mismatch, a new head initialised with classifier_init_range). model_overrides replace model config
    keys (e.g. attn_backend="sdpa"). The model is on the CPU in fp32, in train mode."""
    if head not in ("mlm", "encoder", "classifier"):
        raise ValueError(f"head must be mlm, encoder or classifier, got {head!r}")
    path = resolve_model_source(source)
    full, model_config, pooling, saved_head = _read_source_config(path, model_overrides)
    try:
        sd = neobert.read_safetensors(str(path))
    except Exception as e:  # truncated or unreadable
        raise UserError(f"cannot read the weights in {path}: {e}") from None
    if not any(k.startswith("model.") for k in sd):  # a bare encoder file
        sd = {"model." + k: v for k, v in sd.items()}
    saved_labels = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else None
    id2label = saved_head.get("id2label") if saved_labels else None
    id2label = {int(k): str(v) for k, v in id2label.items()} if id2label else None
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    info = PretrainedInfo(path=path, model_config=model_config, tokenizer=tokenizer, full_config=full,
                          pooling=pooling, num_labels=saved_labels, id2label=id2label)

    encoder_sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if head == "mlm":
        if "decoder.weight" not in sd:
            raise UserError(f"{path} holds no MLM decoder (decoder.*): load it as an encoder or a classifier")
        model = target = neobert.NeoBERTLMHead(model_config)
        load = {k: v for k, v in sd.items() if k.split(".")[0] in ("model", "decoder")}
    elif head == "encoder":
        model = target = neobert.NeoBERT(model_config)
        load = encoder_sd
    else:
        keep = saved_labels is not None and num_labels in (None, saved_labels)
        if saved_labels is not None and not keep and not new_head_if_mismatch:
            raise UserError(f"{path} holds a classifier with {saved_labels} labels but num_labels={num_labels} was "
                            "asked for; leave num_labels out to keep it, or ask for a new head")
        dropout = classifier_dropout if classifier_dropout is not None else saved_head.get("classifier_dropout", 0.1)
        model = neobert.NeoBERTForSequenceClassification(
            model_config, num_labels=saved_labels if keep else (num_labels or 2), classifier_dropout=float(dropout),
            classifier_init_range=classifier_init_range)
        if keep:  # the whole fine-tuned model
            target, load = model, {k: v for k, v in sd.items() if k.split(".")[0] in ("model", "dense", "classifier")}
        else:  # the encoder; the head stays as initialised
            target, load = model.model, encoder_sd
            info.num_labels, info.id2label = None, None
    try:
        neobert.load_state_dict_strict(target, load)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    return model, info


def init_weights_from(model, source: str) -> None:
    """trainer.init_from: the weights of any MODEL_SOURCES into this (MLM) model, strictly."""
    loaded, info = load_pretrained(source, head="mlm")
    try:
        neobert.load_state_dict_strict(model, loaded.state_dict())
    except ValueError as e:
        raise UserError(f"trainer.init_from={source} ({info.path}): {e}") from None


# -----------------------------------------------------------------------------
# evaluation: MLM loss and masked-token accuracy on the val split; every rank takes part


@torch.no_grad()
def evaluate(model, loader, num_batches: int, device, amp) -> tuple[float, float]:
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, predicted
    for _ in range(num_batches):
        for batch in loader.next_step():
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            labels = batch.pop("labels").reshape(-1)
            keep = labels != -100
            with amp:
                hidden = model.model(**batch)  # (B, S, H)
                logits = model.decoder(hidden.reshape(-1, hidden.size(-1))[keep]).float()
            totals[0] += F.cross_entropy(logits, labels[keep], reduction="sum")
            totals[1] += (logits.argmax(-1) == labels[keep]).sum()
            totals[2] += keep.sum()
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    n = max(totals[2].item(), 1.0)
    return totals[0].item() / n, totals[1].item() / n


def eval_batch_size(cfg: Config, data_dir, world_size: int, master: bool = True) -> Optional[int]:
    """The per-process eval batch size, decided before training: None when evaluation is off or there is no
    held-out data (a warning says so), else per_device_eval_batch_size, lowered to what the val split holds."""
    t, ds = cfg.trainer, cfg.dataset
    warn = data.warn if master else (lambda msg: None)
    if t.eval_steps == 0 or t.eval_max_batches == 0:
        return None
    if ds.streaming:
        if ds.validation_split <= 0 and ds.eval_samples <= 0:
            warn("dataset.validation_split and dataset.eval_samples are 0: no held-out documents, evaluation is off")
            return None
        return t.per_device_eval_batch_size
    rows = data.split_rows(data_dir, "val", ds.max_seq_length, cfg.datacollator.pack_sequences)
    if rows < world_size:
        warn(f"the val split of {data_dir} gives {rows} rows of {ds.max_seq_length} tokens, fewer than one per "
             f"process: evaluation is off (raise dataset.validation_split or dataset.eval_samples)")
        return None
    if rows < t.per_device_eval_batch_size * world_size:
        warn(f"the val split of {data_dir} gives {rows} rows of {ds.max_seq_length} tokens: evaluating with "
             f"{rows // world_size} rows per process instead of trainer.per_device_eval_batch_size="
             f"{t.per_device_eval_batch_size}")
        return rows // world_size
    return t.per_device_eval_batch_size


# -----------------------------------------------------------------------------
# contrastive objective (trainer.objective: contrastive): InfoNCE over the global batch, gradient caching, retrieval
# evaluation. The model stays a NeoBERTLMHead, so checkpoints keep the MLM layout; only its encoder is trained.


class Embedder(torch.nn.Module):
    """Encoder + pooling: the module contrastive training runs (and compiles, and wraps in DDP), so the MLM decoder,
    which gets no gradient, is not part of it."""

    def __init__(self, encoder, pooling: str):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling

    def forward(self, input_ids, attention_mask, doc_ids=None, doc_mask=None):
        emb = neobert.pool(self.encoder(input_ids, attention_mask=attention_mask), attention_mask, self.pooling)
        if doc_ids is None:
            return emb
        # queries and documents in one call: one forward per backward, as DDP expects
        return emb, neobert.pool(self.encoder(doc_ids, attention_mask=doc_mask), doc_mask, self.pooling)


def gather_with_grad(x):
    """Every process's rows, in rank order, differentiably: torch.distributed.nn's all_gather sums, in the backward,
    every process's gradient for a slice into the process that owns it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_nn
    return torch.cat(dist_nn.all_gather(x.contiguous()))


def contrastive_loss(q, pos, neg, temperature: float, rank: int = 0):
    """InfoNCE of this process's queries q (B, H) against every positive and every hard negative of the global batch
    (pos (B, H) and neg (B*h, H) are this process's rows, gathered from all). Cosine similarity / temperature.
    Returns (the sum of the B queries' losses, logging sums [top-1 correct, positive cosine, negative cosine,
    number of negative pairs])."""
    q, pos, neg = (F.normalize(x.float(), dim=-1) for x in (q, pos, neg))
    docs = gather_with_grad(pos)  # (N, H): the other positives are in-batch negatives
    if neg.numel():  # every process has the same h in a step (one source per global batch)
        docs = torch.cat([docs, gather_with_grad(neg)])  # (N + N*h, H)
    cos = q @ docs.T  # (B, N + N*h)
    target = rank * q.size(0) + torch.arange(q.size(0), device=q.device)
    loss_sum = F.cross_entropy(cos / temperature, target, reduction="sum")
    with torch.no_grad():
        pos_cos = cos.gather(1, target[:, None]).sum()
        sums = torch.stack([(cos.argmax(-1) == target).sum().float(), pos_cos, cos.sum() - pos_cos,
                            torch.tensor(float(cos.numel() - q.size(0)), device=cos.device)])
    return loss_sum, sums


def contrastive_metrics(sums, num_queries: float) -> dict:
    """Logging record from contrastive_loss's sums (all-reduced over processes)."""
    correct, pos, neg, n_neg = (float(v) for v in sums)
    return dict(accuracy=correct / num_queries, pos_cosine=pos / num_queries, neg_cosine=neg / max(n_neg, 1.0))


def _rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def contrastive_forward_backward(model, batch: dict, device, amp, temperature: float, chunk_size: int = 0,
                                 world_size: int = 1, rank: int = 0):
    """Forward and backward of one step's InfoNCE over the global batch (model: an Embedder, maybe compiled or in
    DDP; batch: this process's rows from data.PairLoader). Returns (this process's loss sum, the global number of
    queries, logging sums). The loss is the mean over the global batch's queries, scaled by world_size against
    DDP's averaging, so the gradients equal one process holding the whole batch.

    chunk_size 0: one forward of the process's rows, graph kept. chunk_size > 0: gradient caching (Gao et al. 2021,
    https://arxiv.org/abs/2101.06983): 1. embed chunk_size rows at a time with no graph; 2. the loss and its gradient
    with respect to the embeddings; 3. each chunk again with its graph, backpropagating its slice of that gradient.
    Same gradients as the whole batch at once; activations are held for chunk_size rows only."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    qi, qm, di, dm = batch["query_ids"], batch["query_mask"], batch["doc_ids"], batch["doc_mask"]
    B = qi.size(0)
    scale = world_size / (B * world_size)
    if not chunk_size:
        with amp:
            q, d = model(qi, qm, di, dm)
        loss_sum, sums = contrastive_loss(q, d[:B], d[B:], temperature, rank)
        (loss_sum * scale).backward()
        return loss_sum.detach(), B * world_size, sums
    chunks = [(ids[i:i + chunk_size], mask[i:i + chunk_size])
              for ids, mask in ((qi, qm), (di, dm)) for i in range(0, ids.size(0), chunk_size)]
    embs, states = [], []
    with torch.no_grad():  # 1.
        for ids, mask in chunks:
            states.append(_rng_state(device))  # the re-run draws the same dropout
            with amp:
                embs.append(model(ids, mask).float())
    n_q = -(-B // chunk_size)
    q = torch.cat(embs[:n_q]).requires_grad_()
    d = torch.cat(embs[n_q:]).requires_grad_()
    loss_sum, sums = contrastive_loss(q, d[:B], d[B:], temperature, rank)  # 2.
    (loss_sum * scale).backward()
    grads = list(q.grad.split(chunk_size)) + list(d.grad.split(chunk_size))
    for i, ((ids, mask), grad, state) in enumerate(zip(chunks, grads, states)):  # 3.
        sync = i == len(chunks) - 1 or world_size == 1
        with nullcontext() if sync else model.no_sync():  # DDP all-reduces once, after the last chunk
            _set_rng_state(device, state)
            with amp:
                emb = model(ids, mask)
            (emb.float() * grad).sum().backward()
    return loss_sum.detach(), B * world_size, sums


def contrastive_step_flops(model_cfg, batch: dict, cached: bool) -> float:
    """Training FLOPs of one process's contrastive step (no decoder); gradient caching adds one forward (x 4/3)."""
    total = sum(ids.numel() * neobert.flops_per_token(model_cfg, ids.shape[-1], 0.0)
                for ids in (batch["query_ids"], batch["doc_ids"]))
    return total * (4 / 3 if cached else 1.0)


def retrieval_metrics(q, p, mrr_k: int = 10) -> dict:
    """Query i's relevant document is p[i]; every query is ranked against all of p by cosine.
    -> recall@1, recall@10, MRR@mrr_k (a relevant document ranked below mrr_k scores 0)."""
    q, p = F.normalize(q.double(), dim=-1), F.normalize(p.double(), dim=-1)
    scores = q @ p.T
    rank = (scores > scores.diagonal()[:, None]).sum(-1)  # 0 = first
    rr = torch.where(rank < mrr_k, 1.0 / (rank + 1).double(), torch.zeros((), dtype=torch.float64))
    return {"recall@1": (rank < 1).double().mean().item(), "recall@10": (rank < 10).double().mean().item(),
            f"mrr@{mrr_k}": rr.mean().item()}


@torch.no_grad()
def embed_sequences(encoder, seqs: list, max_len: int, special: dict, pooling: str, batch_size: int, device, amp):
    """Pooled float32 embeddings (n, H) of token sequences (no special tokens), [CLS] ... [SEP], in batches."""
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = data.pad_rows(seqs[i:i + batch_size], max_len, special["cls"], special["sep"], special["pad"])
        ids, mask = ids.to(device), mask.to(device)
        with amp:
            out.append(neobert.pool(encoder(ids, attention_mask=mask), mask, pooling).float())
    return torch.cat(out) if out else torch.zeros(0, encoder.config.hidden_size, device=device)


@torch.no_grad()
def evaluate_retrieval(encoder, held_out, cc, special: dict, batch_size: int, device, amp) -> dict:
    """Retrieval on held-out pairs: every query against all held-out positives. Each process embeds a contiguous
    slice; the embeddings are gathered, so every process returns the same metrics."""
    queries, positives = held_out[0], held_out[1]
    n = len(queries)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    per = -(-n // world)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    was_training = encoder.training
    encoder.eval()
    q = embed_sequences(encoder, queries[lo:hi], cc.max_query_length, special, cc.pooling, batch_size, device, amp)
    p = embed_sequences(encoder, positives[lo:hi], cc.max_document_length, special, cc.pooling, batch_size, device,
                        amp)
    encoder.train(was_training)
    if world > 1:  # pad every slice to `per` rows, gather, drop the padding
        both = torch.cat([q, p], dim=1)
        both = torch.cat([both, both.new_zeros(per - both.size(0), both.size(1))])
        parts = [torch.empty_like(both) for _ in range(world)]
        dist.all_gather(parts, both)
        both = torch.cat([part[:max(0, min(per, n - r * per))] for r, part in enumerate(parts)])
        q, p = both.split(q.size(1), dim=1)
    return retrieval_metrics(q, p)


def contrastive_eval_set(cfg: Config, data_dir, master: bool = True):
    """(held-out pairs, per-process eval batch size), or (None, None) when evaluation is off (a warning says why)."""
    t, cc = cfg.trainer, cfg.contrastive
    if t.eval_steps == 0 or cc.eval_pairs == 0:
        return None, None
    held_out = data.held_out_pairs(data_dir, cc.eval_pairs)
    if len(held_out[0]) < 2:
        if master:
            data.warn(f"the pair sources hold {len(held_out[0])} held-out rows: retrieval evaluation is off (raise "
                      f"contrastive.validation_split, then prepare again into a new contrastive.path)")
        return None, None
    return held_out, t.per_device_eval_batch_size


def contrastive_model_config(cfg: Config, ckpt: Optional[Path]):
    """A contrastive run takes its model config from the checkpoint it resumes (ckpt) or starts from
    (trainer.init_from), so the config.yaml it saves describes the weights; -> (cfg with that model section, the
    checkpoint's tokenizer)."""
    t, cc = cfg.trainer, cfg.contrastive
    if not cc.sources:
        raise UserError("trainer.objective is contrastive but contrastive.sources is empty; list the pair sources "
                        "(see configs/contrastive.yaml)")
    tokenizer = None
    source = ckpt.parent.parent / "model_checkpoints" / ckpt.name if ckpt is not None else t.init_from
    if source:
        try:
            _, info = load_pretrained(source, head="mlm")
        except UserError as e:
            if Path(source).exists():
                raise
            raise UserError(f"trainer.init_from={source}: no such directory, and not on the hub either ({e}). "
                            "Contrastive fine-tuning starts from a pretrained model; for "
                            "configs/contrastive_smoke.yaml run `python train.py configs/smoke.yaml` first") from None
        keep = {"attn_backend": cfg.model.attn_backend}  # how to compute, not what the weights are
        model_cfg = dataclasses.replace(info.model_config, **keep)
        cfg = dataclasses.replace(cfg, model=model_cfg)
        tokenizer = info.tokenizer
    if tokenizer is None:
        tokenizer = data.load_tokenizer(cfg.tokenizer)
    longest = max(cc.max_query_length, cc.max_document_length)
    if longest > cfg.model.max_position_embeddings:
        raise UserError(f"contrastive.max_query_length/max_document_length {longest} exceeds the model's "
                        f"max_position_embeddings {cfg.model.max_position_embeddings}")
    return cfg, tokenizer


def prepare_pairs_only(cfg: Config) -> None:
    """`python train.py CONFIG --prepare-only` (= `python data.py CONFIG`) of a contrastive config: the pair sources
    tokenized into contrastive.path with the tokenizer of the checkpoint the run will start from."""
    cfg, tokenizer = contrastive_model_config(cfg, None)
    out = data.prepare_pairs(cfg.contrastive, tokenizer)
    rows = [s["rows"]["train"] for s in data.read_pairs_manifest(out)["sources"]]
    print(f"{out}: {len(rows)} pair source(s), {sum(rows):,} training pairs ready")


def check_resume_objective(ckpt: Path, objective: str) -> None:
    """A contrastive run resumes only from contrastive checkpoints, and an MLM run only from MLM ones."""
    saved = json.loads((ckpt / "train_state.json").read_text()).get("config", {})
    was = (saved.get("trainer") or {}).get("objective", "mlm")
    if was != objective:
        raise UserError(f"{ckpt} was written by a trainer.objective={was} run; this run is {objective}. Resume it "
                        f"with trainer.objective: {was}, or start a new trainer.output_dir (trainer.init_from: "
                        f"{ckpt.parent.parent} takes its weights)")


# -----------------------------------------------------------------------------
# the loop


def forward_backward(model, micro_batches: list[dict], device, amp, world_size: int = 1):
    """Forward and backward of one optimizer step's micro-batches; returns (this rank's loss sum, the global count of
    predicted tokens). The loss is normalised by the predicted tokens of the whole step on every rank, so the
    gradient does not depend on how the global batch is split into micro-batches and processes."""
    num_masked = torch.tensor(float(sum(int((b["labels"] != -100).sum()) for b in micro_batches)), device=device)
    if world_size > 1:
        dist.all_reduce(num_masked)
    scale = world_size / num_masked.clamp(min=1.0)  # x world_size: DDP averages gradients over ranks
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        sync = i == len(micro_batches) - 1 or world_size == 1
        with nullcontext() if sync else model.no_sync():  # the forward too: DDP prepares its hooks there
            with amp:
                out = model(**batch)
            (out.loss_sum * scale).backward()
        loss_sum += out.loss_sum.detach()
    return loss_sum, num_masked


def step_flops(model_cfg, micro_batches: list[dict], sparse: bool = True) -> float:
    """Training FLOPs of these micro-batches. Attention counts the keys each query really attends to (its document's
    length in packed rows, the padded width otherwise); the decoder runs on the predicted tokens (sparse) or all."""
    total = 0.0
    for b in micro_batches:
        n = b["input_ids"].numel()
        if "cu_seqlens" in b:
            seg = b["cu_seqlens"].diff().double()
            keys = float((seg * seg).sum() / seg.sum())
        else:
            keys = b["input_ids"].shape[-1]
        predicted = int((b["labels"] != -100).sum()) / n if sparse else 1.0
        total += n * neobert.flops_per_token(model_cfg, keys, predicted)
    return total


class StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C) -> save at the next step boundary and exit; a second signal kills."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.restore()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def start_wandb(cfg: Config, run_dir: Path):
    """A wandb run writing under RUN/wandb (wandb is imported only here). Offline it never touches the network:
    wandb-core's error reporting would otherwise look its server up; `wandb sync RUN/wandb/offline-run-*` uploads."""
    try:
        import wandb
    except ImportError:
        raise UserError(f"wandb.mode={cfg.wandb.mode} needs the wandb package: pip install wandb") from None
    if cfg.wandb.mode == "offline":
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    return wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode, dir=str(run_dir),
                      config=config_to_dict(cfg))


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl records up to `step` (what a killed run logged after its last checkpoint goes). A line
    that does not decode (a kill mid-write, a full disk) is dropped with a warning instead of blocking the resume."""
    if not path.exists():
        return
    kept, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad += bool(line.strip())
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            bad += 1
        elif record["step"] <= step:
            kept.append(line)
    if bad:
        data.warn(f"{path}: dropped {bad} damaged line{'s' * (bad > 1)} (a write cut short by a kill or a full disk)")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def setup_distributed(backend: Optional[str] = None, timeout=None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment, or (0, 1, cuda:0 | cpu) for one process. Under torchrun
    the process group is started: nccl on GPUs and gloo on CPU, unless `backend` says otherwise (evaluate.py's
    processes run their own tasks and need only gloo barriers, with a long `timeout`)."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, **({"timeout": timeout} if timeout is not None else {}))
    return rank, world_size, device


def train(cfg: Config) -> dict:
    """Runs the training described by cfg; returns the last metrics record."""
    rank, world_size, device = setup_distributed()
    ddp, master = world_size > 1, rank == 0
    print0 = print if master else (lambda *a, **k: None)
    try:
        return _train(cfg, rank, world_size, device, master, print0)
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(cfg: Config, rank: int, world_size: int, device, master: bool, print0) -> dict:
    t, ddp = cfg.trainer, world_size > 1
    run_dir = Path(t.output_dir)
    if master:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"trainer.output_dir {run_dir} cannot be written ({e.strerror or e}); choose another "
                            "directory") from None
        for stale in [*run_dir.glob("*checkpoints/*.tmp-*"), *run_dir.glob("*checkpoints/*.old-*")]:
            # what a save killed half-way left behind: never picked by resume, now removed
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    print0(f"# resolved config ({world_size} process{'es' if ddp else ''}, {device})\n{config_to_yaml(cfg)}", end="")
    ckpt = find_resume_checkpoint(t)  # before any work: "nothing to resume" should not wait for the data
    contrastive, cc = t.objective == "contrastive", cfg.contrastive
    if ckpt is not None:
        check_resume_objective(ckpt, t.objective)
    if contrastive:  # the model config and tokenizer are those of the checkpoint it starts from
        cfg, init_tokenizer = contrastive_model_config(cfg, ckpt)
        print0(f"contrastive: model {cfg.model.hidden_size} x {cfg.model.num_hidden_layers} from "
               f"{ckpt or t.init_from or 'a random init'}")

    # data: rank 0 prepares the shards (or, streaming, the tokenizer) when missing; the others wait, then read them
    data_dir = data.pairs_dir(cc) if contrastive else data.dataset_dir(cfg.dataset)
    if master and contrastive:
        data_dir = data.prepare_pairs(cc, init_tokenizer)
    elif master and (cfg.dataset.pre_tokenize or cfg.dataset.streaming):
        data_dir = data.prepare(cfg.dataset, cfg.tokenizer)
    if ddp:
        dist.barrier()
    tokenizer = data.load_tokenizer(cfg.tokenizer, data_dir)
    data.check_vocab(tokenizer, cfg.model.vocab_size)
    pad_id = data.special_token_ids(tokenizer)["pad"]
    if pad_id != cfg.model.pad_token_id:
        raise UserError(f"model.pad_token_id={cfg.model.pad_token_id} but the tokenizer's [PAD] is {pad_id}; "
                        f"set model.pad_token_id: {pad_id}")

    def make_loader(split, micro_batch_size, grad_accum_steps, prefetch=2):
        if contrastive:
            return data.PairLoader(data_dir, cc, split, micro_batch_size=micro_batch_size,
                                   grad_accum_steps=grad_accum_steps, rank=rank, world_size=world_size, seed=t.seed,
                                   prefetch=prefetch)
        ds = cfg.dataset
        if split == "val" and ds.streaming:
            # the eval stream: tokenized in this process (no fork while the train loader's threads run) and in
            # small windows (the first eval batch must not wait for shuffle_buffer_size held-out documents)
            ds = dataclasses.replace(ds, num_workers=1, shuffle_buffer_size=min(ds.shuffle_buffer_size, 256))
        return data.build_loader(ds, cfg.tokenizer, cfg.datacollator, split, micro_batch_size=micro_batch_size,
                                 grad_accum_steps=grad_accum_steps, rank=rank, world_size=world_size, seed=t.seed,
                                 prefetch=prefetch)

    if contrastive:  # retrieval on held-out pairs (None: no evaluation, said why)
        held_out, eval_batch = contrastive_eval_set(cfg, data_dir, master)
    else:
        eval_batch = eval_batch_size(cfg, data_dir, world_size, master)  # None: no evaluation (said why)

    # model: the same init on every rank (DDP would broadcast rank 0's anyway), then weights from a checkpoint
    torch.manual_seed(t.seed)
    model = neobert.NeoBERTLMHead(cfg.model)
    model.model.gradient_checkpointing = t.gradient_checkpointing
    state = dict(step=0, tokens=0, elapsed=0.0)
    if ckpt is not None:
        print0(f"resuming from {ckpt}")
        load_weights(model, ckpt.parent.parent / "model_checkpoints" / ckpt.name / "model.safetensors")
    elif t.init_from:
        print0(f"initialising weights from {t.init_from}")
        init_weights_from(model, t.init_from)
    model.to(device)
    print0(f"model: {neobert.num_params(model) / 1e6:.2f}M parameters")

    o = cfg.optimizer
    trained = model.model if contrastive else model  # contrastive: the MLM decoder stays as loaded
    optimizer = torch.optim.AdamW(neobert.param_groups(trained, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                  fused=device.type == "cuda")
    loader = make_loader("train", t.per_device_train_batch_size, t.gradient_accumulation_steps)
    if ckpt is not None:
        saved = json.loads((ckpt / "train_state.json").read_text())
        try:
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
        except (ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"{ckpt / 'optimizer.pt'} does not fit this model/optimizer: {e}") from None
        # a loader state is a position in the global stream, so any rank's works for any world size
        loader_states = saved["loader_states"]
        loader.load_state_dict(loader_states[rank] if len(loader_states) == world_size else loader_states[0])
        state = {k: saved[k] for k in state}

    # compile after loading weights and before DDP; `model` stays the raw module for saving and evaluation
    train_model = Embedder(model.model, cc.pooling) if contrastive else model
    train_model = torch.compile(train_model) if t.torch_compile else train_model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    precision = resolve_precision(t.mixed_precision, device, warn=data.warn if master else None)
    print0(f"precision: {'bf16 autocast' if precision == 'bf16' else 'fp32'} "
           f"(trainer.mixed_precision={t.mixed_precision})")
    amp = autocast(device, precision)

    # logging: metrics.jsonl, tqdm, wandb, all on rank 0
    wandb_run = start_wandb(cfg, run_dir) if master and cfg.wandb.mode != "disabled" else None
    metrics_path = run_dir / "metrics.jsonl"
    if master:
        truncate_metrics(metrics_path, state["step"])
    metrics_file = open(metrics_path, "a") if master else None
    from tqdm import tqdm
    bar = tqdm(total=t.max_steps, initial=state["step"], disable=not master or t.disable_tqdm, dynamic_ncols=True)
    peak = neobert.peak_flops(device)  # None on CPU or an unknown GPU: no MFU rather than a wrong one

    def save(step):
        loader_states = [None] * world_size
        if ddp:
            dist.all_gather_object(loader_states, loader.state_dict())
        else:
            loader_states = [loader.state_dict()]
        if master:
            train_state = dict(step=step, tokens=state["tokens"], elapsed=state["elapsed"], world_size=world_size,
                               loader_states=loader_states, config=config_to_dict(cfg))
            save_checkpoint(run_dir, step, model, optimizer, cfg, tokenizer, train_state)
        if ddp:
            dist.barrier()
        _kill_point("after_save", step)

    step, record, last_saved = state["step"], {}, state["step"] if ckpt is not None else None
    t_start = time.perf_counter() - state["elapsed"]  # elapsed carries over a resume
    t_log, tokens_log, flops_log = time.perf_counter(), state["tokens"], 0.0  # since the last metrics line
    if contrastive and eval_batch is not None and step == 0 and ckpt is None:  # the starting model's score
        special = data.special_token_ids(tokenizer)
        start = evaluate_retrieval(model.model, held_out, cc, special, eval_batch, device, amp)
        record = dict(step=0, **{f"eval_{k}": v for k, v in start.items()})
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if wandb_run is not None:
                wandb_run.log(record, step=0)
    stop = StopRequest().install()
    try:
        while step < t.max_steps:
            lr = get_lr(step, o.lr, cfg.scheduler, t.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed((t.seed * 1_000_003 + step) * 1_009 + rank)  # dropout RNG from (seed, step, rank)
            micro_batches = loader.next_step()
            if contrastive:  # InfoNCE over the global batch; gradient accumulation = caching in micro-batch chunks
                chunk = cc.chunk_size or (t.per_device_train_batch_size if t.gradient_accumulation_steps > 1 else 0)
                loss_sum, num_queries, sums = contrastive_forward_backward(
                    train_model, micro_batches[0], device, amp, cc.temperature, chunk, world_size, rank)
                num_masked = torch.tensor(float(num_queries))
            else:
                loss_sum, num_masked = forward_backward(train_model, micro_batches, device, amp, world_size)
                sums = torch.zeros(0, device=device)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.gradient_clipping or float("inf"))
            stats = torch.cat([torch.stack([loss_sum.float(), torch.tensor(float(stop.requested), device=device)]),
                               sums.float()])
            if ddp:
                dist.all_reduce(stats)  # after DDP's all-reduce, grad_norm is already the same on every rank
            loss, grad_norm = stats[0].item() / max(num_masked.item(), 1.0), grad_norm.item()
            extra = contrastive_metrics(stats[2:].tolist(), num_masked.item()) if contrastive else {}
            stopping = bool(stats[1] > 0)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                where = f"{run_dir}/checkpoints/{last_saved}" if last_saved is not None else "none was written"
                raise UserError(f"non-finite loss ({loss}) or grad norm ({grad_norm}) at step {step + 1}; stopped "
                                f"without saving (last good checkpoint: {where}). Lower optimizer.lr, raise "
                                "scheduler.warmup_steps or set trainer.gradient_clipping")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step
            state["tokens"] += sum(v.numel() for b in micro_batches for k, v in b.items()
                                   if k in ("input_ids", "query_ids", "doc_ids")) * world_size
            state["elapsed"] = time.perf_counter() - t_start
            if peak:
                flops_log += world_size * (contrastive_step_flops(cfg.model, micro_batches[0], chunk > 0) if contrastive
                                           else step_flops(cfg.model, micro_batches))

            last_step = step == t.max_steps or stopping
            do_eval = eval_batch is not None and (step % t.eval_steps == 0 or last_step)
            if step % t.logging_steps == 0 or last_step or do_eval:
                now = time.perf_counter()
                tokens_per_s = (state["tokens"] - tokens_log) / max(now - t_log, 1e-9)
                mfu = flops_log / max(now - t_log, 1e-9) / (peak * world_size) if peak else None
                record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=state["tokens"],
                              tokens_per_s=tokens_per_s, mfu=mfu, elapsed=state["elapsed"], **extra)
                if do_eval and contrastive:
                    special = data.special_token_ids(tokenizer)
                    for k, v in evaluate_retrieval(model.model, held_out, cc, special, eval_batch, device, amp).items():
                        record[f"eval_{k}"] = v
                elif do_eval:
                    val = make_loader("val", eval_batch, 1, prefetch=0)
                    try:
                        record["eval_loss"], record["eval_accuracy"] = evaluate(model, val, t.eval_max_batches, device,
                                                                                amp)
                    finally:
                        val.close()  # a streaming loader holds worker processes
                if master:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if wandb_run is not None:
                        wandb_run.log(record, step=step)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}",
                                    mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%", refresh=False)
                t_log, tokens_log, flops_log = time.perf_counter(), state["tokens"], 0.0
            bar.update(1)
            if last_step or (t.save_steps > 0 and step % t.save_steps == 0):
                save(step)
                last_saved = step
            if stopping:
                print0(f"\nstopped by signal at step {step}; checkpoint saved. Resume with "
                       f"--trainer.resume_from_checkpoint auto")
                break
        if last_saved != step:  # max_steps reached before the loop (resumed a finished run), or max_steps == 0
            save(step)
    finally:
        stop.restore()
        bar.close()
        loader.close()
        if metrics_file is not None:
            metrics_file.close()
        if wandb_run is not None:
            wandb_run.finish()
    print0(f"done: step {step}, {state['tokens']} tokens, checkpoints in {run_dir}")
    return record


def main(argv=None) -> int:
    def work(args):
        flags = {a for a in args if a in ("--prepare-only", "--bench")}  # --bench: the loader's, so prepare-only too
        args = [a for a in args if a not in flags]
        if not args:
            raise UserError("no config file: python train.py CONFIG [--prepare-only] [--section.key value ...]")
        cfg = load_config(args[0], args[1:])
        if flags and cfg.trainer.objective == "contrastive":
            return prepare_pairs_only(cfg)
        return data.prepare_only(cfg, bench="--bench" in flags) if flags else train(cfg)

    return data.run_main(argv, __doc__, work)


if __name__ == "__main__":
    sys.exit(main())
