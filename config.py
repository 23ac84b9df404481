"""What every script shares: errors, the typed config system, precision, distributed setup, atomic directories and
loading a trained model. Imports nothing of ours but neobert.py.

Reading order:
  1. errors: UserError (a mistake the user can fix: `error: ...`, exit 2), warn, require, run_main
  2. config: convert (YAML / command-line value -> annotated type), build_section, load_config, config_to_dict
  3. precision: bf16 autocast where the hardware has bf16 units, fp32 elsewhere
  4. processes: setup_distributed (torchrun's environment, or one process), to_device
  5. files: write_dir / write_atomic (written under a temporary name, renamed when complete), save_model_dir
  6. models: load_pretrained (a run dir, a checkpoint, an exported or released folder, a hub id; strict)
"""

import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import sys
import time
import types
import typing
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.distributed as dist
import yaml

import neobert

# -----------------------------------------------------------------------------
# errors

class UserError(Exception):
    """A mistake the user can fix (bad path, bad config value, corrupt file). Scripts print `error: msg`, exit 2."""


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def require(ok, msg):
    """How a config section checks its own values: a UserError with msg unless ok."""
    if not ok:
        raise UserError(msg)


def run_main(argv, usage: str, work) -> int:
    """The main() of every script: usage on no arguments or -h; a UserError is printed as `error: ...` and exits 2
    (no traceback: it is the user's to fix); Ctrl-C before a loop takes the signal over exits 130.

    Under torchrun the job prints a mistake once. One found before the process group starts (a config value) is
    found by every rank: rank 0 prints it. One found later (rank 0 preparing the data, or every rank at a non-finite
    loss) is counted in the process group's store: the first rank to count it prints it. A rank whose collective
    then fails because that peer exited (any exception, within a few seconds of the count) exits 2 without a word."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    debug = os.environ.get("NEOBERT_DEBUG")
    try:
        work(argv)
    except UserError as e:
        if debug:
            raise
        count = _count_errors(1)
        if count == 1 or (count is None and int(os.environ.get("RANK", 0)) == 0):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        if debug or _JOB.get("store") is None or not _peer_reported():
            raise
        return 2  # a peer stopped with its error (printed there), taking this rank's collective down
    return 0


_JOB = {}  # the torchrun job's store (setup_distributed), kept past destroy_process_group for run_main


def _count_errors(add: int) -> Optional[int]:
    """The job's count of ranks that stopped on a UserError, after adding `add`; None before a process group."""
    if _JOB.get("store") is None:
        return None
    try:
        return _JOB["store"].add("neobert/user_errors", add)
    except Exception:  # the store went with the process that held it
        return None


def _peer_reported(seconds: float = 5.0) -> bool:
    """Whether another rank stops on a UserError within `seconds` (it may still be on its way to count it)."""
    for _ in range(int(seconds / 0.2)):
        if _count_errors(0):
            return True
        time.sleep(0.2)
    return False


# -----------------------------------------------------------------------------
# config: one dataclass per section; a choice is a Literal type, each section checks its own values in __post_init__
# (so they hold however the section is built). load_config turns YAML and `--section.key value` overrides into these
# types, strictly, before any work.

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
    Literal choices, list, tuple, dict[str, ...], a nested config dataclass from a mapping). A mismatch, a choice not
    offered or a non-finite number is a UserError naming `where` (e.g. optimizer.lr). No eval of any kind."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is typing.Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or str(value).lower() in NONE_WORDS):
            return None
        options = [a for a in args if a is not type(None)]
        inner = options[0] if len(options) == 1 else None
        if dataclasses.is_dataclass(inner) or typing.get_origin(inner) in (dict, list):
            return convert(value, inner, where)  # Optional[a section, mapping or list]: a nested error is its own
        for a in options:
            with suppress(UserError):
                return convert(value, a, where)
        raise bad
    if origin is Literal:
        if value is False and "no" in args:  # YAML reads an unquoted `no` as false
            return "no"
        require(value in args and not isinstance(value, bool),
                f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
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
            for parse in (int, float):  # neither: it stays a string, refused below
                with suppress(ValueError):
                    value = parse(value)
                    break
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and value != int(value)):
            raise bad
        require(math.isfinite(value), f"{where} must be a finite number, got {value}")
        return tp(value)
    if origin is dict:  # a mapping of named entries, e.g. glue.tasks: {task: TaskSettings}
        if not isinstance(value, dict):
            raise bad
        return {k: convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):  # str, dict
        return value
    raise bad


# keys of the NeoBERT training guide that have another name here: an error naming it, not "unknown key"
GUIDE_KEYS = {"tokenizer.max_length": "dataset.max_seq_length", "dataset.pre_tokenize_output": "dataset.path"}


def build_section(name: str, cls, raw):
    """A config section (a dataclass) from a mapping, strictly: unknown keys and wrong types are UserErrors, then the
    section's own checks (__post_init__) run."""
    raw = {} if raw is None else raw
    require(isinstance(raw, dict), f"config section {name!r} must be a mapping of key: value, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in raw:
        here = GUIDE_KEYS.get(f"{name}.{key}")
        require(here is None, f"{name}.{key} is {here} here (the NeoBERT guide's name); set {here} instead")
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
        flag, arg = args[i].startswith("--"), args[i].removeprefix("--")
        if "=" in arg:
            key, value = arg.split("=", 1)
        elif not flag:
            raise UserError(f"unexpected argument {arg!r}; overrides look like --section.key value or "
                            "section.key=value")
        elif i + 1 < len(args):
            key, value = arg, args[i + 1]
            i += 1
        else:
            raise UserError(f"--{arg} needs a value: --{arg} VALUE")
        out.append((key, value))
        i += 1
    return out


def load_config(schema, path, overrides: Optional[list[str]] = None, extra_sections: Optional[dict] = None):
    """YAML file (or None) + overrides -> schema (a dataclass of sections, e.g. train.Config), strictly, before any
    work. extra_sections {name: dataclass} adds task sections (e.g. glue) that land in cfg.tasks[name]."""
    raw = {}
    if path is not None:  # None: the defaults plus the overrides
        path = Path(path)
        require(path.is_file(), f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {e}") from None
    require(isinstance(raw, dict), f"{path} must be a mapping of sections (model:, trainer:, ...)")
    sections = {f.name: typing.get_type_hints(schema)[f.name] for f in dataclasses.fields(schema) if f.name != "tasks"}
    sections.update(extra_sections or {})
    for dotted, value in parse_overrides(list(overrides or [])):  # section.key, or deeper: glue.tasks.cola.lr
        parts = dotted.split(".")
        require(len(parts) >= 2 and parts[0] in sections,
                f"unknown override {dotted!r}; use section.key with a section in {', '.join(sections)}")
        node = raw
        for depth, key in enumerate(parts[:-1]):
            if node.get(key) is None:
                node[key] = {}
            require(isinstance(node[key], dict),
                    f"{'.'.join(parts[:depth + 1])} in {path} is not a mapping, so {dotted} cannot be set")
            node = node[key]
        node[parts[-1]] = value
    for name in raw:
        require(name in sections, f"unknown config section {name!r} in {path}; valid sections: {', '.join(sections)}")
    built = {name: build_section(name, cls, raw.get(name)) for name, cls in sections.items()}
    tasks = {name: built.pop(name) for name in list(built) if name in (extra_sections or {})}
    return schema(**built, tasks=tasks)


def _plain(x):
    if dataclasses.is_dataclass(x):
        x = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def config_to_dict(cfg) -> dict:
    """Plain dict (YAML/JSON-safe) with the same sections as the file; load_config reads it back to an equal Config."""
    d = _plain(cfg)
    d.update(d.pop("tasks"))
    return d


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# -----------------------------------------------------------------------------
# precision: bf16 autocast where the hardware has bf16 units, fp32 elsewhere (weights and optimizer stay fp32)

def cpu_flags(cpuinfo="/proc/cpuinfo") -> set:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS: then fp32 is chosen)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    return {w for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
            for w in line.split(":", 1)[-1].split()}


def resolve_precision(mixed_precision: str, device, warn=warn) -> str:
    """trainer.mixed_precision (auto | bf16 | no) on this device -> "bf16" or "no". auto: bf16 on CUDA and on CPUs
    with native bf16 (AVX512-BF16, AMX), fp32 otherwise: emulated bf16 is hundreds of times slower than fp32."""
    convert(mixed_precision, Literal["auto", "bf16", "no"], "trainer.mixed_precision")
    device_type = torch.device(device).type
    native = device_type == "cuda"
    if device_type == "cpu":  # torch's capability is the kernel family (AVX2, AVX512, SVE256, ...), not whether bf16
        # units exist; the feature flags say (x86 AVX512-BF16 / AMX, aarch64 BF16). Either naming bf16/AMX is enough.
        capability = torch.backends.cpu.get_cpu_capability().upper()
        native = "BF16" in capability or "AMX" in capability or bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
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
# processes and files

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
        _JOB["store"] = dist.distributed_c10d._get_default_store()  # run_main's error count (no public handle)
    return rank, world_size, device


def to_device(batch: dict, device) -> dict:
    """A batch's tensors on the device (non-blocking: loaders pin their batches on CUDA); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def write_dir(final: Path, write) -> None:
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():  # the same step written again (a resumed run passing it): swap, never leave a gap
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_model_dir(path: Path, model, full_config, tokenizer, after_write=None) -> None:
    """A model folder as every loader reads it (model.safetensors with plain keys, config.yaml, tokenizer.json), whole
    or not at all (write_dir). full_config: a config or a plain dict; after_write(d): run before the rename (tests)."""
    from safetensors.torch import save_file

    def write(d: Path):
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        plain = full_config if isinstance(full_config, dict) else config_to_dict(full_config)
        (d / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
        tokenizer.save(str(d / "tokenizer.json"))
        if after_write is not None:
            after_write(d)

    write_dir(path, write)


def write_atomic(path: Path, text: str) -> None:
    """A file written under a temporary name, then renamed: never seen half-written."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


@contextmanager
def hub_requests(what: str, offline: str):
    """Around huggingface_hub calls (datasets' and mteb's too): when a request fails and the hub does not answer one
    5 s request either, stop at once with one line saying what to do offline. huggingface_hub would first retry for
    ~25 s; its retry loop logs each failed request, and this check runs there."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session
    unreachable = []

    def check(record):
        if "thrown while requesting" in record.getMessage():
            try:
                get_session().head(constants.ENDPOINT, timeout=5)  # any answer: reachable, let it retry
            except Exception as e:
                unreachable.append(f"cannot reach the Hugging Face Hub to {what} ({constants.ENDPOINT}: "
                                   f"{one_line(e)}); offline: {offline}")
                raise UserError(unreachable[0]) from None
        return True
    log = logging.getLogger("huggingface_hub.utils._http")
    log.addFilter(check)
    try:
        yield
    except Exception:
        if unreachable:  # whatever the callers in between made of it
            raise UserError(unreachable[0]) from None
        raise
    finally:
        log.removeFilter(check)


# -----------------------------------------------------------------------------
# loading a trained model, the same way everywhere (trainer.init_from, evaluate.py glue | mteb, ...):
# a run dir, model_checkpoints/<step>, checkpoints/<step>, an exported / released folder (config.json), or a hub id

def resolve_model_source(source) -> Path:
    """The folder holding the model that `source` names (neobert.resolve_model_dir: a run dir gives its newest
    complete checkpoint); a bad source is a UserError."""
    offline = "pass a local folder (a run dir, a checkpoint or an exported folder), or set HF_HUB_OFFLINE=1 to use " \
              "the HF cache"
    try:
        with hub_requests(f"download the model {source}", offline):
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
        require(isinstance(full, dict) and isinstance(full.get("model"), dict),
                f"{path / 'config.yaml'} has no model: section; is it a neobert checkpoint?")
        model_config = build_section("model", neobert.NeoBERTConfig, {**full["model"], **model_overrides})
        pooling = convert((full.get("contrastive") or {}).get("pooling", "mean"), Literal["mean", "cls"],
                          f"{path / 'config.yaml'}: contrastive.pooling")
        return full, model_config, pooling, full.get("classifier") or {}
    try:
        full = json.loads((path / "config.json").read_text())
        model_config = neobert.NeoBERTConfig.from_hf_dict(full, **model_overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path / 'config.json'}: {e}") from None
    st_pooling = path / "1_Pooling" / "config.json"  # sentence-transformers' pooling of an exported model
    st = json.loads(st_pooling.read_text()) if st_pooling.is_file() else {}
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
        try:
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # not a tokenizers file, or a damaged one
            raise UserError(f"{path / 'tokenizer.json'} is not a tokenizers tokenizer.json: {e}") from None
    info = PretrainedInfo(path=path, model_config=model_config, tokenizer=tokenizer, full_config=full,
                          pooling=pooling, num_labels=saved_labels, id2label=id2label)

    encoder_sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if head == "mlm":
        require("decoder.weight" in sd,
                f"{path} holds no MLM decoder (decoder.*): load it as an encoder or a classifier")
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
