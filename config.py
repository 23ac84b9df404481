"""The config system: one YAML file of sections, each section a dataclass, every key overridable on the command line
as `--section.key value`, typed and strict (an unknown key or a wrong type stops the program before any work, naming
the key and the choices). Imports nothing of ours.

Reading order: errors (UserError: a mistake the user can fix, printed as `error: ...`) -> convert (a YAML or
command-line value -> the annotated type) -> build_section -> load_config -> config_to_dict.
"""

import dataclasses
import difflib
import math
import sys
import types
import typing
from contextlib import suppress
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

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


def one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


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
# keys that are gone, with why; a checkpoint's config.yaml that still holds one loads (checkpoint.read_config)
REMOVED_KEYS = {
    "model.kernel_backend": "is the NeoBERT guide's fused-kernel (Liger) switch; this project runs PyTorch's kernels "
                            "(model.attn_backend picks the attention kernel)",
    "model.static_predictions": "is no longer needed: the decoder always runs on a fixed number of positions per row, "
                                "which data.Collator sets from datacollator.mlm_probability",
}


def build_section(name: str, cls, raw):
    """A config section (a dataclass) from a mapping, strictly: unknown keys and wrong types are UserErrors, then the
    section's own checks (__post_init__) run."""
    raw = {} if raw is None else raw
    require(isinstance(raw, dict), f"config section {name!r} must be a mapping of key: value, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in raw:
        here, why = GUIDE_KEYS.get(f"{name}.{key}"), REMOVED_KEYS.get(f"{name}.{key}")
        require(here is None, f"{name}.{key} is {here} here (the NeoBERT guide's name); set {here} instead")
        require(why is None, f"{name}.{key} {why}: remove the key")
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


def load_config(schema, path, overrides: Optional[list[str]] = None):
    """YAML file (or None: the defaults) + overrides -> schema, a dataclass whose fields are the sections the entry
    point uses (train.Config, evaluate.GlueRunConfig, ...), strictly, before any work."""
    raw = {}
    if path is not None:
        path = Path(path)
        require(path.is_file(), f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {e}") from None
    require(isinstance(raw, dict), f"{path} must be a mapping of sections (model:, trainer:, ...)")
    sections = {f.name: typing.get_type_hints(schema)[f.name] for f in dataclasses.fields(schema)}
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
    return schema(**{name: build_section(name, cls, raw.get(name)) for name, cls in sections.items()})


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
    return _plain(cfg)


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
