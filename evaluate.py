"""Evaluate NeoBERT checkpoints: fine-tune and score on GLUE, or embed and score on MTEB.

    python evaluate.py glue [CONFIG] [--section.key value ...]     # CONFIG defaults to configs/glue.yaml
    python evaluate.py mteb [CONFIG] [--section.key value ...]     # CONFIG defaults to configs/mteb.yaml
    torchrun --nproc_per_node 8 evaluate.py glue|mteb [...]        # runs / tasks spread over the processes

A model may be a run directory, a model_checkpoints/<step> directory, an exported HF folder or a hub id.
Read top to bottom: GLUE (tasks, data, metrics, fine-tuning, sweep, report) -> MTEB (encoder, tasks, report) -> main.
"""

import csv
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

import data
import neobert
import train
from data import UserError

# -----------------------------------------------------------------------------
# GLUE
# (section owned by the GLUE work; entry point: glue_main(argv) -> int)
#
# The NeoBERT paper's protocol (Appendix C): the released head on [CLS], AdamW with linear warmup and decay, at most
# trainer.num_train_epochs epochs, an evaluation every min(500, steps_per_epoch // 10) steps, early stopping after
# trainer.early_stopping evaluations without improvement, the best evaluation is the run's score. RTE, MRPC, STS-B
# and QNLI may start from the best MNLI model (glue.transfer_from_task). A sweep is a grid of runs; every run
# writes <output_dir>/glue/<task>/<run>/results.json when it is done, so the same command continues a stopped sweep.


@dataclass
class TaskSettings:
    """glue.tasks.<task>: one task's own values; null keeps the trainer/optimizer/glue section's."""
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    num_train_epochs: Optional[int] = None
    max_seq_length: Optional[int] = None


@dataclass
class SweepConfig:
    """glue.sweep: lists of values; every combination runs (null: the task's one value)."""
    lr: Optional[list[float]] = None
    batch_size: Optional[list[int]] = None
    weight_decay: Optional[list[float]] = None
    seed: Optional[list[int]] = None

    def __post_init__(self):
        for key, values in vars(self).items():
            data.require(values is None or len(values) > 0, f"glue.sweep.{key} is empty; give at least one value")


@dataclass
class GlueConfig:
    task_name: str = "all"  # cola sst2 mrpc qqp stsb mnli qnli rte wnli | all (the paper's eight) | a,b,c | custom
    init_from: Optional[str] = "runs/pretrain"  # run dir, model_checkpoints/<step>, HF folder or hub id
    allow_random_weights: bool = False  # init_from: null then fine-tunes a randomly initialised model.* config
    data_dir: Optional[str] = None  # local GLUE (hub parquet or the TSV download) or a custom dataset; null = hub
    cache_dir: Optional[str] = None  # huggingface_hub cache for nyu-mll/glue (null = its default)
    max_seq_length: int = 128
    num_labels: Optional[int] = None  # custom: 1 = regression; null = from the data. GLUE: checked against the task
    classifier_dropout: float = 0.1
    classifier_init_range: float = 0.02
    warmup_ratio: float = 0.1  # linear warmup over this fraction of a run's steps (replaces scheduler.warmup_steps)
    transfer_from_task: bool = False  # RTE, MRPC, STS-B, QNLI start from the best MNLI model (the paper does)
    tasks: Optional[dict] = field(default_factory=dict)  # {task: TaskSettings mapping}
    sweep: SweepConfig = field(default_factory=SweepConfig)
    batching: Literal["auto", "padded", "unpadded"] = "auto"  # auto: unpadded on GPU, length-grouped padded on CPU
    text_columns: list[str] = field(default_factory=list)  # custom: one or two columns
    label_column: str = "label"  # custom
    metric: Optional[str] = None  # custom: accuracy f1 mcc pearson spearman, or a comma list (score = their mean)
    bench_steps: int = 20  # --bench: timed steps per batching mode

    def __post_init__(self):
        for task in self.tasks or {}:
            data.require(task in GLUE_TASKS or task == "custom",
                         f"glue.tasks.{task}: unknown task; choose from {', '.join([*GLUE_TASKS, 'custom'])}")
        self.tasks = {task: s if isinstance(s, TaskSettings) else train.build_section(f"glue.tasks.{task}",
                                                                                      TaskSettings, s)
                      for task, s in (self.tasks or {}).items()}
        data.require(0.0 <= self.warmup_ratio < 1.0 and 0.0 <= self.classifier_dropout < 1.0,
                     "glue.warmup_ratio and glue.classifier_dropout must be in [0, 1)")
        data.require(self.init_from is not None or self.allow_random_weights,
                     "glue.init_from is null: pass a checkpoint (a run dir, model_checkpoints/<step>, an exported "
                     "folder or a hub id such as chandar-lab/NeoBERT), or set glue.allow_random_weights: true to "
                     "fine-tune random weights")


def load_glue_config(argv: list):
    """CONFIG [overrides] -> (Config with cfg.tasks["glue"], the dotted keys given on the command line).
    --glue.tasks.<task>.<key> v and --glue.sweep.<key> v1,v2 reach one level below load_config's section.key: they
    go into the glue section's plain form, which the same converter (train.build_section) builds again."""
    overrides = train.parse_overrides(argv[1:])
    flat = [arg for key, value in overrides if key.count(".") < 2 for arg in (f"--{key}", value)]
    cfg = train.load_config(argv[0], flat, extra_sections={"glue": GlueConfig})
    deep = [(key.split("."), value) for key, value in overrides if key.count(".") >= 2]
    if deep:
        raw = train.config_to_dict(cfg)["glue"]
        for parts, value in deep:
            if parts[:2] == ["glue", "tasks"] and len(parts) == 4:
                raw["tasks"].setdefault(parts[2], {})[parts[3]] = value
            elif parts[:2] == ["glue", "sweep"] and len(parts) == 3:
                raw["sweep"][parts[2]] = value
            else:
                raise UserError(f"unknown override {'.'.join(parts)!r}; use section.key, glue.tasks.<task>.<key> or "
                                "glue.sweep.<key>")
        cfg.tasks["glue"] = train.build_section("glue", GlueConfig, raw)
    return cfg, {key for key, _ in overrides}


@dataclass(frozen=True)
class GlueTask:
    name: str
    title: str
    columns: tuple  # text columns of the nyu-mll/glue parquet files
    labels: tuple  # id -> name, as in the parquet files; () for regression
    metrics: tuple  # the task's numbers; its score is their mean
    tsv_dir: str  # the GLUE download's folder
    tsv_columns: tuple  # its text columns
    tsv_label: str  # its label column
    val_splits: tuple = ("validation",)
    paper: Optional[float] = None  # NeoBERT's score in the paper (Table 3, validation)

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


GLUE_TASKS = {t.name: t for t in [
    GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("mcc",), "CoLA", ("sentence",), "label",
             paper=66.2),
    GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), "SST-2", ("sentence",),
             "label", paper=95.6),
    GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
             "MRPC", ("#1 String", "#2 String"), "Quality", paper=93.4),
    GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), "QQP",
             ("question1", "question2"), "is_duplicate", paper=90.7),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearman"), "STS-B",
             ("sentence1", "sentence2"), "score", paper=91.8),
    GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
             ("accuracy_matched", "accuracy_mismatched"), "MNLI", ("sentence1", "sentence2"), "gold_label",
             val_splits=("validation_matched", "validation_mismatched"), paper=89.0),
    GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), "QNLI",
             ("question", "sentence"), "label", paper=93.7),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), "RTE",
             ("sentence1", "sentence2"), "label", paper=91.3),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "WNLI",
             ("sentence1", "sentence2"), "label"),
]}
PAPER_EIGHT = ("mnli", "qnli", "qqp", "rte", "sst2", "mrpc", "cola", "stsb")  # the paper's column order
PAPER_GLUE_SCORE = 89.0
TRANSFER_TASKS = ("rte", "mrpc", "stsb", "qnli")
COLA_TSV_COLUMNS = ("source", "label", "original_label", "sentence")  # CoLA's TSV has no header row
METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman")


# data: every split becomes texts (a list of 1- or 2-tuples) and labels (int64 ids, or float32 for regression)


@dataclass
class Split:
    texts: list
    labels: np.ndarray
    source: str  # the file it came from, for messages


def _read_tsv(path: Path, header: Optional[tuple] = None) -> tuple[list, list]:
    """(column names, rows) of a tab-separated file, read with no quoting at all: GLUE's QQP and MNLI hold unbalanced
    quote characters that a CSV reader would swallow across lines. Only \\n ends a line. Fields past the header's
    count (trailing extras, as in some STS-B rows) are ignored, as csv.DictReader does; rows with fewer fields than
    the header (a few in QQP's train.tsv) are skipped and counted in a warning."""
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        lines = [ln.rstrip("\n").removesuffix("\r") for ln in f]
    lines = [ln for ln in lines if ln.strip()]
    if header is None:
        if not lines:
            raise UserError(f"{path} is empty")
        header, lines = tuple(lines[0].split("\t")), lines[1:]
    rows = [ln.split("\t") for ln in lines]
    good = [r[:len(header)] for r in rows if len(r) >= len(header)]
    if len(good) < len(rows):
        data.warn(f"{path}: skipped {len(rows) - len(good)} malformed rows (fewer than {len(header)} tab-separated "
                  "fields)")
    return list(header), good


def read_examples(path: Path, tsv_header: Optional[tuple] = None) -> dict:
    """{column: list of values} of a .parquet, .jsonl, .csv or .tsv file (csv/tsv with a header row, or a .tsv with
    the columns tsv_header); an empty split is an error (nothing to train on or to score)."""
    table = _read_table(path, tsv_header)
    if not any(len(v) for v in table.values()):
        raise UserError(f"{path} holds no examples (an empty split)")
    return table


def _read_table(path: Path, tsv_header: Optional[tuple]) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pydict()
        except Exception as e:
            raise UserError(f"cannot read {path} as parquet: {' '.join(str(e).split())[:200]}") from None
    if suffix in (".jsonl", ".json"):
        records = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path} line {i} is not JSON ({e.msg}); one object per line is expected") \
                            from None
                    if not isinstance(rec, dict):
                        raise UserError(f"{path} line {i} is not a JSON object")
                    records.append(rec)
        columns = list(dict.fromkeys(k for r in records for k in r))
        return {c: [r.get(c) for r in records] for c in columns}
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise UserError(f"{path} is empty")
        header, rows = rows[0], [r for r in rows[1:] if r]
        bad = [i for i, r in enumerate(rows) if len(r) != len(header)]
        if bad:
            raise UserError(f"{path} row {bad[0] + 2} has {len(rows[bad[0]])} fields but the header has {len(header)}")
    else:
        header, rows = _read_tsv(path, tsv_header)
    return {c: [r[i] for r in rows] for i, c in enumerate(header)}


def _columns(table: dict, names, path, what: str) -> list:
    missing = [n for n in names if n not in table]
    if missing:
        raise UserError(f"{path} has no {what} column {missing[0]!r}; its columns: {', '.join(map(str, table))}")
    return [table[n] for n in names]


def _make_split(table: dict, text_names, label_name, path, num_labels: int, names: tuple, hint: str) -> Split:
    """The texts and labels of one split; rows without a label are skipped, with a warning."""
    texts = list(zip(*[[("" if v is None else str(v)) for v in col] for col in _columns(table, text_names, path,
                                                                                        "text")]))
    (raw,) = _columns(table, [label_name], path, "label")
    labels = [_label(value, i, path, num_labels, names, hint) for i, value in enumerate(raw)]
    keep = [i for i, label in enumerate(labels) if label is not None]
    if len(keep) < len(texts):
        data.warn(f"{path}: skipped {len(texts) - len(keep)} rows without a gold label")
    if not keep:
        raise UserError(f"{path} holds no labelled examples")
    return Split([texts[i] for i in keep], np.asarray([labels[i] for i in keep]), str(path))


def _label(value, row: int, path, num_labels: int, names: tuple, hint: str):
    """One raw label (parquet ints, TSV/CSV strings such as 'entailment' or '1') -> a class id (the index of its
    name in `names`, or the integer it is), a float for a regression (num_labels 1), or None when there is none."""
    if _no_label(value):
        return None
    number = _number(value)
    if num_labels == 1:
        if number is None:
            raise UserError(f"{path} row {row + 1}: label {value!r} is not a number (a regression: {hint})")
        return number
    if str(value) in names:
        return names.index(str(value))
    if number is None or not number.is_integer():
        raise UserError(f"{path} row {row + 1}: label {value!r} is neither one of {', '.join(names)} nor an id "
                        f"0..{num_labels - 1}")
    if not 0 <= number < num_labels:
        raise UserError(f"{path} row {row + 1}: label {int(number)} is outside 0..{num_labels - 1} ({hint})")
    return int(number)


def _hub_parquet(task: GlueTask, split: str, g: GlueConfig) -> Path:
    from huggingface_hub import hf_hub_download
    filename = f"{task.name}/{split}-00000-of-00001.parquet"
    try:
        return Path(hf_hub_download("nyu-mll/glue", filename, repo_type="dataset", cache_dir=g.cache_dir))
    except Exception as e:  # offline, blocked, renamed
        raise UserError(f"cannot download {filename} of the hub dataset nyu-mll/glue ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:160]}); download GLUE and set glue.data_dir to a folder holding "
                        f"{task.name}/{split}-00000-of-00001.parquet or the GLUE TSV layout ({task.tsv_dir}/train.tsv, "
                        f"{task.tsv_dir}/dev.tsv)") from None


def load_glue_task(task: GlueTask, g: GlueConfig) -> dict:
    """{split: Split} with train and the task's validation split(s), from glue.data_dir (hub parquet layout
    <task>/<split>-*.parquet, or the GLUE download's <Task>/train.tsv, dev.tsv) or from the hub."""
    splits = ("train", *task.val_splits)
    files = {}
    if g.data_dir is not None:
        root = Path(g.data_dir)
        parquet = {s: sorted((root / task.name).glob(f"{s}-*.parquet")) for s in splits}
        tsv_dir = root / task.tsv_dir
        tsv = {s: tsv_dir / ("train.tsv" if s == "train" else "dev" + s.removeprefix("validation") + ".tsv")
               for s in splits}
        if all(parquet.values()):
            files = {s: ("parquet", parquet[s]) for s in splits}
        elif all(p.is_file() for p in tsv.values()):
            files = {s: ("tsv", [tsv[s]]) for s in splits}
        else:
            raise UserError(f"glue.data_dir={root} holds neither {task.name}/<split>-*.parquet for {', '.join(splits)} "
                            f"nor the GLUE TSV files {', '.join(str(p.relative_to(root)) for p in tsv.values())}; "
                            "set glue.data_dir to a folder with one of those layouts, or to null for the hub")
    else:
        files = {s: ("parquet", [_hub_parquet(task, s, g)]) for s in splits}
    out = {}
    for split, (kind, paths) in files.items():
        path = paths[0] if len(paths) == 1 else paths[0].parent / f"{split}-*.parquet"
        if kind == "parquet":
            tables = [read_examples(p) for p in paths]
            table = {c: [v for t in tables for v in t.get(c, [])] for c in tables[0]}
            names, label = task.columns, "label"
        else:
            table = read_examples(paths[0], COLA_TSV_COLUMNS if task.name == "cola" else None)
            names, label = task.tsv_columns, task.tsv_label
        out[split] = _make_split(table, names, label, path, task.num_labels, task.labels,
                                 f"{task.name} has {task.num_labels} label{'s' if task.num_labels > 1 else ''}")
    return out


def _custom_file(root: Path, stems) -> Path:
    for stem in stems:
        for ext in (".tsv", ".csv", ".jsonl", ".parquet"):
            if (root / (stem + ext)).is_file():
                return root / (stem + ext)
    raise UserError(f"glue.data_dir={root} has no {stems[0]}.tsv/.csv/.jsonl/.parquet"
                    f"{' (or ' + stems[1] + '.*)' if len(stems) > 1 else ''}; a custom task needs train.* and "
                    "validation.* (or dev.*) there")


def load_custom_task(g: GlueConfig) -> tuple[dict, int, Optional[dict]]:
    """A user's dataset: ({train, validation}, num_labels, id2label). String labels become ids in sorted order."""
    if g.data_dir is None:
        raise UserError("glue.task_name=custom needs glue.data_dir: a folder with train.* and validation.* "
                        "(tsv, csv, jsonl or parquet)")
    root = Path(g.data_dir)
    if not root.is_dir():
        raise UserError(f"glue.data_dir={root} is not a directory")
    if not 1 <= len(g.text_columns) <= 2:
        raise UserError(f"glue.text_columns must name one or two columns for a custom task, got {g.text_columns}")
    paths = {"train": _custom_file(root, ["train"]), "validation": _custom_file(root, ["validation", "dev"])}
    tables = {s: read_examples(p) for s, p in paths.items()}
    raw = {s: _columns(t, [g.label_column], paths[s], "label")[0] for s, t in tables.items()}
    values = [v for s in raw for v in raw[s] if not _no_label(v)]
    numbers = [_number(v) for v in values]  # CSV/TSV labels are strings: "1", "2.5"
    numeric = all(n is not None for n in numbers)
    id2label = None
    if g.num_labels == 1 or (g.num_labels is None and numeric and any(not n.is_integer() for n in numbers)):
        num_labels = 1  # a regression
    elif numeric and all(n.is_integer() for n in numbers):
        ints = [int(n) for n in numbers]  # ids as given; their count comes from glue.num_labels or the data
        num_labels = g.num_labels if g.num_labels is not None else max(ints) + 1
        if num_labels < 2:
            raise UserError(f"the labels in {paths['train']} are all {ints[0]}: a classifier needs at least two "
                            "classes (glue.num_labels: 1 makes it a regression)")
    else:
        names = sorted({str(v) for v in values})
        num_labels = g.num_labels if g.num_labels is not None else len(names)
        if len(names) > num_labels:
            raise UserError(f"glue.num_labels={num_labels} but the data has {len(names)} distinct labels "
                            f"({', '.join(names[:10])}); set glue.num_labels: {len(names)} or leave it null")
        id2label = {i: names[i] if i < len(names) else f"LABEL_{i}" for i in range(num_labels)}  # one name per id
    names = tuple(id2label.values()) if id2label else ()
    hint = f"glue.num_labels={num_labels}; fix the data or change glue.num_labels"
    splits = {s: _make_split(tables[s], g.text_columns, g.label_column, paths[s], num_labels, names, hint)
              for s in paths}
    return splits, num_labels, id2label


def _no_label(value) -> bool:
    """None, an empty string, or "-" (MNLI's marker for no consensus)."""
    return value is None or (isinstance(value, str) and value.strip() in ("", "-"))


def _number(value) -> Optional[float]:
    """A label as a float (1, 2.5, "2.5", True), or None when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def custom_task(g: GlueConfig, num_labels: int) -> GlueTask:
    if g.metric is not None:
        metrics = tuple(m.strip() for m in g.metric.split(",") if m.strip())
    else:
        metrics = ("pearson", "spearman") if num_labels == 1 else ("accuracy",)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UserError(f"glue.metric={g.metric!r}: choose from {', '.join(METRICS)} (or a comma list of them)")
    correlations = {"pearson", "spearman"}  # for a regression, and only there
    if (num_labels == 1) != (set(metrics) <= correlations):
        kind = "regression" if num_labels == 1 else "classification"
        raise UserError(f"glue.metric={','.join(metrics)} does not fit a {kind} task: use pearson/spearman for "
                        "num_labels 1, accuracy/f1/mcc otherwise")
    labels = tuple(str(i) for i in range(num_labels)) if num_labels > 1 else ()
    return GlueTask("custom", f"custom ({Path(g.data_dir).name})", tuple(g.text_columns), labels, metrics, "",
                    (), "")


# tokenization: [CLS] A [SEP] or [CLS] A [SEP] B [SEP], truncated longest-first


@dataclass
class Encoded:
    ids: np.ndarray  # int32, every example's tokens back to back
    offsets: np.ndarray  # int64 (n + 1,): example i is ids[offsets[i]:offsets[i + 1]]
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Longest-first: drop a token from the longer side (the second on a tie) until both fit the budget."""
    if len_a + len_b <= budget:
        return len_a, len_b
    short = min(len_a, len_b)
    if 2 * short <= budget:  # the shorter side fits in half the budget: only the longer one is cut
        return (budget - short, short) if len_a > len_b else (short, budget - short)
    return (budget + 1) // 2, budget // 2


def encode(tokenizer, split: Split, max_len: int) -> Encoded:
    special = data.special_token_ids(tokenizer)
    cls, sep = special["cls"], special["sep"]
    columns = list(zip(*split.texts))
    pieces = [[e.ids for e in tokenizer.encode_batch(list(col), add_special_tokens=False)] for col in columns]
    seqs = []
    if len(pieces) == 1:
        for a in pieces[0]:
            seqs.append([cls, *a[:max_len - 2], sep])
    else:
        for a, b in zip(*pieces):
            la, lb = truncate_pair(len(a), len(b), max_len - 3)
            seqs.append([cls, *a[:la], sep, *b[:lb], sep])
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return Encoded(ids, offsets, split.labels)


def make_batch(enc: Encoded, idx, pad_id: int, unpadded: bool) -> dict:
    """Padded: input_ids/attention_mask (B, S) with S the longest row. Unpadded: one (1, N) row of the examples back
    to back with cu_seqlens, for the varlen attention path (no compute on padding; positions restart per example, so
    the row may be longer than max_position_embeddings)."""
    idx = np.asarray(idx)
    starts, ends = enc.offsets[idx], enc.offsets[idx + 1]
    labels = torch.from_numpy(enc.labels[idx])
    if unpadded:
        flat = np.concatenate([enc.ids[s:e] for s, e in zip(starts, ends)])
        cu = np.zeros(len(idx) + 1, dtype=np.int32)
        np.cumsum(ends - starts, out=cu[1:])
        return dict(input_ids=torch.from_numpy(flat.astype(np.int64))[None], cu_seqlens=torch.from_numpy(cu),
                    max_seqlen=int((ends - starts).max()), labels=labels)
    width = int((ends - starts).max())
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=bool)
    for r, (s, e) in enumerate(zip(starts, ends)):
        ids[r, :e - s] = enc.ids[s:e]
        mask[r, :e - s] = True
    return dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=labels)


def epoch_batches(enc: Encoded, batch_size: int, seed: int, epoch: int) -> list:
    """This epoch's batches of example indices, a pure function of (seed, epoch): shuffled, sorted by length within
    windows of 64 batches (little padding where batches are padded), then the batches shuffled. The padded and the
    unpadded path get the same batches, so a run trains the same model on a CPU and on a GPU."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(enc))
    window = batch_size * 64
    perm = np.concatenate([w[np.argsort(-enc.lengths[w], kind="stable")]
                           for w in np.split(perm, range(window, len(perm), window))])
    batches = [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# metrics, in numpy (float64). Scores are fractions here and percentages in the report.


def accuracy(pred, label) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def f1_score(pred, label, num_labels: int = 2) -> float:
    """Binary F1 of class 1 (MRPC, QQP); the unweighted mean over classes (macro) when there are more than two."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes = [1] if num_labels <= 2 else range(num_labels)
    scores = []
    for c in classes:
        tp = np.sum((pred == c) & (label == c))
        denom = np.sum(pred == c) + np.sum(label == c)
        scores.append(2.0 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def matthews_corrcoef(pred, label) -> float:
    """Matthews correlation (its multiclass form, Gorodkin 2004); 0 when a marginal is constant."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes, inv = np.unique(np.concatenate([pred, label]), return_inverse=True)
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (inv[len(pred):], inv[:len(pred)]), 1.0)  # rows: true, columns: predicted
    t, p, c, s = conf.sum(1), conf.sum(0), np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom else 0.0


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (what Spearman's correlation needs)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each run of equal values
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def compute_metric(name: str, pred, label, num_labels: int) -> float:
    if name == "accuracy":
        return accuracy(pred, label)
    if name == "f1":
        return f1_score(pred, label, num_labels)
    if name == "mcc":
        return matthews_corrcoef(pred, label)
    if name == "pearson":
        return pearson(pred, label)
    return spearman(pred, label)


# fine-tuning one run


@dataclass
class GlueRun:
    task: str
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    num_train_epochs: int
    max_seq_length: int

    @property
    def name(self) -> str:
        return f"bs{self.batch_size}_lr{self.lr:g}_wd{self.weight_decay:g}_seed{self.seed}"


def run_dir(cfg, run: GlueRun) -> Path:
    return Path(cfg.trainer.output_dir) / "glue" / run.task / run.name


def read_results(path: Path) -> Optional[dict]:
    """A finished run's results.json, or None (absent: not finished; it is written last, atomically)."""
    try:
        return json.loads((path / "results.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path / 'results.json'} cannot be read ({e}); delete it to rerun that run") from None


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_batch(model, enc: Encoded, idx, accum: int, unpadded: bool, ctx: dict) -> tuple[float, int]:
    """Forward and backward of one batch in `accum` micro-batches, the loss weighted by examples so the gradient is
    the batch mean's. Returns (loss, token slots fed, padding included)."""
    loss, slots = torch.zeros((), device=ctx["device"]), 0
    for micro in np.array_split(idx, min(accum, len(idx))):
        batch = make_batch(enc, micro, ctx["pad_id"], unpadded)
        slots += batch["input_ids"].numel()
        with ctx["amp"]:
            micro_loss = model(**to_device(batch, ctx["device"])).loss * (len(micro) / len(idx))
        micro_loss.backward()
        loss += micro_loss.detach().float()
    return loss.item(), slots


@torch.no_grad()
def predict(model, enc: Encoded, batch_size: int, pad_id: int, unpadded: bool, device, amp) -> np.ndarray:
    """Predictions in dataset order (class ids, or floats for regression); batches sorted by length."""
    model.eval()
    order = np.argsort(enc.lengths, kind="stable")
    out = np.empty(len(enc), dtype=np.float64)
    for idx in (order[i:i + batch_size] for i in range(0, len(order), batch_size)):
        batch = make_batch(enc, idx, pad_id, unpadded)
        batch.pop("labels")
        with amp:
            logits = model(**to_device(batch, device)).logits.float()
        pred = logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1)
        out[idx] = pred.cpu().double().numpy()
    model.train()
    return out


def evaluate_task(model, task: GlueTask, val: dict, ctx: dict) -> dict:
    """{metric: value} on the validation split(s); MNLI's accuracy_matched / accuracy_mismatched."""
    result = {}
    for split, enc in val.items():
        pred = predict(model, enc, ctx["eval_batch_size"], ctx["pad_id"], ctx["unpadded"], ctx["device"], ctx["amp"])
        label = enc.labels
        if task.num_labels > 1:
            pred = pred.astype(np.int64)
        if len(task.val_splits) > 1:  # MNLI: the same metric on each
            result[f"accuracy_{split.removeprefix('validation_')}"] = accuracy(pred, label)
        else:
            for m in task.metrics:
                result[m] = compute_metric(m, pred, label, task.num_labels)
    return result


def glue_task_score(task: GlueTask, metrics: dict) -> float:
    return float(np.mean([metrics[m] for m in task.metrics]))


def start_run(cfg, run: GlueRun, task: GlueTask, source, splits: dict, ctx: dict):
    """What a run (and --bench) starts from: the checkpoint with a classifier head (a new one seeded by run.seed) on
    ctx's device, its tokenizer, the encoded splits and the optimizer."""
    g, t, o = cfg.tasks["glue"], cfg.trainer, cfg.optimizer
    torch.manual_seed(run.seed)  # the new head's init
    model, info = train.load_pretrained(source, head="classifier", num_labels=task.num_labels,
                                        classifier_dropout=g.classifier_dropout,
                                        classifier_init_range=g.classifier_init_range, new_head_if_mismatch=True)
    tokenizer = info.tokenizer if info.tokenizer is not None else ctx["tokenizer"]
    train_enc, val = encoded_splits(task, splits, tokenizer, run.max_seq_length, ctx)
    model.model.gradient_checkpointing = t.gradient_checkpointing
    model.to(ctx["device"])
    optimizer = torch.optim.AdamW(neobert.param_groups(model, run.weight_decay), lr=run.lr, betas=o.betas, eps=o.eps,
                                  fused=ctx["device"].type == "cuda")
    return model, info, tokenizer, train_enc, val, optimizer


def finetune(cfg, run: GlueRun, task: GlueTask, source, splits: dict, ctx: dict, id2label: Optional[dict]) -> dict:
    """Fine-tunes one run from `source`, writes its run dir (metrics.jsonl, best/, results.json last) and returns the
    results. Randomness (head init, data order, dropout) comes from run.seed only, so any process gives the same run."""
    from tqdm import tqdm
    g, t = cfg.tasks["glue"], cfg.trainer
    out = run_dir(cfg, run)
    out.mkdir(parents=True, exist_ok=True)
    model, info, tokenizer, train_enc, val, optimizer = start_run(cfg, run, task, source, splits, ctx)
    train_model = torch.compile(model, dynamic=True) if t.torch_compile else model
    steps_per_epoch = math.ceil(len(train_enc) / run.batch_size)
    total = run.num_train_epochs * steps_per_epoch
    if t.max_steps > 0:
        total = min(total, t.max_steps)
    eval_every = t.eval_steps if t.eval_steps > 0 else max(1, min(500, steps_per_epoch // 10))
    sched = dataclasses.replace(cfg.scheduler, warmup_steps=round(g.warmup_ratio * total), decay_steps=None)
    evaluations, best, best_state, bad_evals = [], None, None, 0
    metrics_file = open(out / "metrics.jsonl", "w")

    def log(record: dict):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    bar = tqdm(total=total, desc=f"{run.task} {run.name}", disable=t.disable_tqdm, dynamic_ncols=True, leave=False,
               position=ctx["rank"])  # under torchrun: one line per process
    t0, examples, stopped_early, step = time.perf_counter(), 0, False, 0
    try:
        for step in range(total):
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0:
                batches = epoch_batches(train_enc, run.batch_size, run.seed, epoch)
            lr = train.get_lr(step, run.lr, sched, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed((run.seed * 1_000_003 + step) * 1_009)  # dropout, from (seed, step)
            idx = batches[i]
            loss, _ = train_batch(train_model, train_enc, idx, t.gradient_accumulation_steps, ctx["unpadded"], ctx)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.gradient_clipping or float("inf")).item()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise UserError(f"{run.task} {run.name}: non-finite loss ({loss}) at step {step + 1}; lower the lr "
                                "or set trainer.gradient_clipping")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            examples += len(idx)
            bar.update(1)
            last = step + 1 == total
            if (step + 1) % t.logging_steps == 0 or last:
                elapsed = time.perf_counter() - t0
                log(dict(step=step + 1, epoch=(step + 1) / steps_per_epoch, loss=loss, lr=lr, grad_norm=grad_norm,
                         examples_per_s=examples / elapsed, elapsed=elapsed))
            if (step + 1) % eval_every == 0 or last:
                metrics = evaluate_task(model, task, val, ctx)
                score = glue_task_score(task, metrics)
                record = dict(step=step + 1, epoch=(step + 1) / steps_per_epoch, score=score, **metrics)
                evaluations.append(record)
                log({**{f"eval_{k}": v for k, v in record.items() if k != "step"}, "step": step + 1})
                if best is None or score > best["score"]:
                    best, bad_evals = record, 0
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    bad_evals += 1
                bar.set_postfix(score=f"{100 * score:.2f}", best=f"{100 * best['score']:.2f}", refresh=False)
                if t.early_stopping and bad_evals >= t.early_stopping and not last:
                    stopped_early = True
                    break
    finally:
        bar.close()
        metrics_file.close()
    model.load_state_dict(best_state)
    save_classifier(out / "best", model, info, cfg, tokenizer, task, id2label, run)
    results = dict(task=run.task, run=run.name, setting=dataclasses.asdict(run), config=train.config_to_dict(cfg),
                   source=str(source), process=ctx["rank"],
                   model_path=str(info.path), fingerprint=run_fingerprint(cfg, run, source),
                   steps=step + 1, total_steps=total, steps_per_epoch=steps_per_epoch, eval_every=eval_every,
                   stopped_early=stopped_early, evaluations=evaluations, best=best,
                   wall_time_s=time.perf_counter() - t0, train_examples=len(train_enc),
                   id2label={str(k): v for k, v in id2label.items()} if id2label else None, device=str(ctx["device"]),
                   precision=ctx["precision"], batching="unpadded" if ctx["unpadded"] else "padded")
    write_atomic(out / "results.json", json.dumps(results, indent=1))  # last: the run counts as finished now
    return results


def save_classifier(path: Path, model, info, cfg, tokenizer, task: GlueTask, id2label, run: GlueRun) -> None:
    """The checkpoint layout (model.safetensors, config.yaml with model: and classifier:, tokenizer.json), written
    under a temporary name and renamed: export.py turns it into a folder transformers loads with its labels.
    config.yaml keeps the pretraining sections of the checkpoint it started from (what the model card reports) and
    adds the fine-tuning's glue: section, with this run's setting."""
    g = cfg.tasks["glue"]
    full = dict(info.full_config) if (info.path / "config.yaml").is_file() else {}
    full["model"] = dataclasses.asdict(model.config)
    full["glue"] = {**train.config_to_dict(cfg)["glue"], "task_name": task.name, "run": dataclasses.asdict(run)}
    full["classifier"] = dict(num_labels=task.num_labels, id2label=dict(id2label) if id2label else None,
                              classifier_dropout=g.classifier_dropout, classifier_init_range=g.classifier_init_range)
    save_model_dir(path, model, full, tokenizer)


def save_model_dir(path: Path, model, full_config: dict, tokenizer) -> None:
    """A checkpoint folder (model.safetensors, config.yaml, tokenizer.json), written whole or not at all."""
    from safetensors.torch import save_file

    def write(d: Path):
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.yaml").write_text(yaml.safe_dump(full_config, sort_keys=False))
        tokenizer.save(str(d / "tokenizer.json"))

    train._write_dir(path, write)


def run_fingerprint(cfg, run: GlueRun, source) -> dict:
    """What decides a run's result beyond its name: a finished run with another fingerprint is not reused."""
    g, t = cfg.tasks["glue"], cfg.trainer
    return dict(source=str(source), data_dir=g.data_dir, max_steps=t.max_steps, eval_steps=t.eval_steps,
                early_stopping=t.early_stopping, warmup_ratio=g.warmup_ratio, epochs=run.num_train_epochs,
                max_seq_length=run.max_seq_length, classifier_dropout=g.classifier_dropout,
                gradient_clipping=t.gradient_clipping, text_columns=list(g.text_columns), label_column=g.label_column,
                metric=g.metric, num_labels=g.num_labels)


def encoded_splits(task: GlueTask, splits: dict, tokenizer, max_len: int, ctx: dict):
    """(train Encoded, {val split: Encoded}); cached per task, tokenizer and length for the runs of a sweep."""
    key = (task.name, hashlib.sha1(tokenizer.to_str().encode()).hexdigest(), max_len)
    if key not in ctx["encoded"]:
        enc = {s: encode(tokenizer, sp, max_len) for s, sp in splits.items()}
        ctx["encoded"] = {key: (enc["train"], {s: enc[s] for s in task.val_splits})}  # one task at a time in memory
    return ctx["encoded"][key]


def bench_glue(cfg, run: GlueRun, task: GlueTask, source, splits: dict, ctx: dict) -> dict:
    """Fine-tuning examples/s with padded (length-grouped) and unpadded (cu_seqlens) batches, same model, data and
    steps, side by side."""
    device = ctx["device"]
    steps, warmup = cfg.tasks["glue"].bench_steps, 3
    model, _, _, train_enc, _, optimizer = start_run(cfg, run, task, source, splits, ctx)
    plan = epoch_batches(train_enc, run.batch_size, run.seed, 0)[:steps + warmup]  # the same batches both ways
    results = {}
    for mode in ("padded", "unpadded"):
        n = tokens = padded_tokens = 0
        for i, idx in enumerate(plan):
            if i == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, n, tokens, padded_tokens = time.perf_counter(), 0, 0, 0
            padded_tokens += train_batch(model, train_enc, idx, 1, mode == "unpadded", ctx)[1]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n += len(idx)
            tokens += int(train_enc.lengths[idx].sum())
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        results[mode] = dict(examples_per_s=n / elapsed, tokens_per_s=tokens / elapsed,
                             padding=1 - tokens / max(padded_tokens, 1), steps=len(plan) - warmup)
    ratio = results["unpadded"]["examples_per_s"] / results["padded"]["examples_per_s"]
    print(f"glue bench: {task.name}, batch {run.batch_size}, max_seq_length {run.max_seq_length}, {steps} steps, "
          f"{device}, precision {ctx['precision']}")
    print(f"{'batching':<10} {'examples/s':>11} {'real tokens/s':>14} {'padding':>8}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['examples_per_s']:>11.1f} {r['tokens_per_s']:>14.0f} {100 * r['padding']:>7.1f}%")
    print(f"speed-up of unpadded over padded: {ratio:.2f}x")
    return dict(task=task.name, device=str(device), precision=ctx["precision"], ratio=ratio, **results)


# the sweep: which tasks, each run's setting (the grid), which runs are finished, where transfer starts


def parse_tasks(name: str) -> list[str]:
    names = [n.strip().lower().replace("-", "") for n in name.split(",") if n.strip()]
    if names == ["all"]:
        return list(PAPER_EIGHT)
    valid = [*GLUE_TASKS, "all", "custom"]
    bad = [n for n in names if n not in GLUE_TASKS and n != "custom"]
    if bad or not names:
        raise UserError(f"glue.task_name={name!r}: unknown task {bad[0] if bad else ''!r}; choose from "
                        f"{', '.join(valid)} (or a comma list)")
    if "custom" in names and len(names) > 1:
        raise UserError("glue.task_name=custom runs alone (its data and labels come from glue.data_dir)")
    if "mnli" in names:  # transfer tasks start from MNLI's best model: it runs first
        names.remove("mnli")
        names.insert(0, "mnli")
    return list(dict.fromkeys(names))


def plan_runs(cfg, tasks: list, cli: set) -> list[GlueRun]:
    """Every run, in order. A setting comes from (lowest first): trainer/optimizer sections, glue.tasks.<task>,
    the same keys given on the command line (--optimizer.lr ...), then glue.sweep lists (the grid)."""
    g, t, o = cfg.tasks["glue"], cfg.trainer, cfg.optimizer
    base = {"batch_size": ("trainer.per_device_train_batch_size", t.per_device_train_batch_size),
            "lr": ("optimizer.lr", o.lr), "weight_decay": ("optimizer.weight_decay", o.weight_decay),
            "num_train_epochs": ("trainer.num_train_epochs", t.num_train_epochs),
            "max_seq_length": ("glue.max_seq_length", g.max_seq_length)}
    runs = []
    for name in tasks:
        block = dataclasses.asdict(g.tasks.get(name, TaskSettings()))
        s = {k: value if block[k] is None or key in cli else block[k] for k, (key, value) in base.items()}
        s["seed"] = t.seed
        grid = [getattr(g.sweep, k) or [s[k]] for k in ("batch_size", "lr", "weight_decay", "seed")]
        for bs, lr, wd, seed in itertools.product(*grid):
            run = GlueRun(name, bs, lr, wd, seed, s["num_train_epochs"], s["max_seq_length"])
            if run.batch_size < 1 or run.lr <= 0 or run.weight_decay < 0 or run.max_seq_length < 8:
                raise UserError(f"{name}: batch_size {bs}, lr {lr}, weight_decay {wd}, max_seq_length "
                                f"{run.max_seq_length}: need batch_size >= 1, lr > 0, weight_decay >= 0, "
                                "max_seq_length >= 8")
            runs.append(run)
    return runs


def _finished(cfg, run: GlueRun, source) -> bool:
    res = read_results(run_dir(cfg, run))
    if res is None:
        return False
    want = run_fingerprint(cfg, run, source)
    diff = [k for k in want if res.get("fingerprint", {}).get(k) != want[k]]
    if diff == ["source"] and run.task in TRANSFER_TASKS and cfg.tasks["glue"].transfer_from_task:
        data.warn(f"{run_dir(cfg, run)}: the best MNLI model is now {source}; running it again from there")
        return False
    if diff:
        raise UserError(f"{run_dir(cfg, run)} holds a finished run made with another {diff[0]} "
                        f"({res.get('fingerprint', {}).get(diff[0])!r}, now {want[diff[0]]!r}); choose another "
                        "trainer.output_dir, or delete that run to redo it")
    return True


def _best_mnli(cfg) -> Optional[Path]:
    """The best/ checkpoint of the highest-scoring finished MNLI run under output_dir (the transfer source)."""
    root = Path(cfg.trainer.output_dir) / "glue" / "mnli"
    found = [(r["best"]["score"], r["run"]) for r in (read_results(d) for d in sorted(root.glob("*/"))) if r]
    if not found:
        return None
    return root / max(found)[1] / "best"


# report: per task the best setting over the sweep, the GLUE score, beside the paper's numbers


def summarize_glue(cfg, runs: list, tasks: dict) -> dict:
    """Per task: the best setting (mean score over seeds), its mean ± std per metric, the paper's number."""
    table = {}
    for name, task in tasks.items():
        finished = [r for r in (read_results(run_dir(cfg, run)) for run in runs if run.task == name) if r]
        if not finished:
            continue
        by_setting = {}
        for r in finished:
            s = r["setting"]
            by_setting.setdefault((s["batch_size"], s["lr"], s["weight_decay"]), []).append(r)
        setting, chosen = max(by_setting.items(), key=lambda kv: np.mean([r["best"]["score"] for r in kv[1]]))
        scores = np.array([r["best"]["score"] for r in chosen])
        row = dict(title=task.title, metrics={}, score=float(scores.mean()),
                   score_std=float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                   setting=dict(batch_size=setting[0], lr=setting[1], weight_decay=setting[2]),
                   seeds=sorted(r["setting"]["seed"] for r in chosen), runs=len(finished),
                   best_run=max(chosen, key=lambda r: r["best"]["score"])["run"], paper=task.paper)
        for m in task.metrics:
            vals = np.array([r["best"][m] for r in chosen])
            row["metrics"][m] = dict(mean=float(vals.mean()), std=float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)
        table[name] = row
    scored = [table[n]["score"] for n in PAPER_EIGHT if n in table]
    glue_score = float(np.mean(scored)) if len(scored) == len(PAPER_EIGHT) else None
    return dict(model=cfg.tasks["glue"].init_from, split="validation", tasks=table, glue_score=glue_score,
                glue_tasks_done=len(scored), paper_glue_score=PAPER_GLUE_SCORE)


METRIC_NAMES = dict(accuracy="acc", f1="F1", mcc="MCC", pearson="Pearson", spearman="Spearman",
                    accuracy_matched="acc m", accuracy_mismatched="acc mm")


def results_markdown(summary: dict) -> str:
    lines = ["# GLUE (validation)", "",
             f"Model: `{summary['model']}`. Scores in percent; a task's score is the mean of its numbers (MNLI: "
             "matched and mismatched accuracy), for the best setting by mean over seeds, ± the std over those seeds. "
             "Paper: the NeoBERT paper's GLUE table.", "",
             "| task | metrics | ours | paper NeoBERT | batch / lr / wd | seeds | runs |",
             "|---|---|---|---|---|---|---|"]
    for name, row in summary["tasks"].items():
        metrics = ", ".join(f"{METRIC_NAMES[m]} {100 * v['mean']:.1f}" for m, v in row["metrics"].items())
        s = row["setting"]
        paper = f"{row['paper']:.1f}" if row["paper"] is not None else "-"
        lines.append(f"| {row['title']} | {metrics} | {100 * row['score']:.1f} ± {100 * row['score_std']:.1f} | "
                     f"{paper} | {s['batch_size']} / {s['lr']:g} / {s['weight_decay']:g} | "
                     f"{','.join(map(str, row['seeds']))} | {row['runs']} |")
    score = summary["glue_score"]
    if summary["glue_tasks_done"]:  # not for a custom task alone
        ours = f"{100 * score:.1f}" if score is not None else f"n/a ({summary['glue_tasks_done']} of 8 tasks)"
        lines.append(f"| **GLUE score** (mean of the 8) | | **{ours}** | {summary['paper_glue_score']:.1f} | | | |")
    return "\n".join(lines) + "\n"


# entry point: processes, the model to start from, every task's data, then the runs phase by phase


def _distributed():
    """(rank, world size, device). Under torchrun each process fine-tunes its own runs on its own GPU; a gloo group
    (with a long timeout: runs take hours) only carries barriers and the list of runs to do."""
    return train.setup_distributed("gloo", timeout=datetime.timedelta(days=7))


def auto_output_dir(init_from: Optional[str]) -> str:
    """trainer.output_dir: auto -> beside the model it scores: the run directory of a training checkpoint (a run dir,
    or its model_checkpoints/<step>), else runs/<the folder's name or the hub id with _ for />."""
    if init_from is None:
        return "runs/glue_random_init"
    p = Path(init_from).expanduser()
    if (p / "model_checkpoints").is_dir():
        return str(p)
    if p.parent.name in ("model_checkpoints", "checkpoints") and p.name.isdigit():
        return str(p.parent.parent)
    return str(Path("runs") / (p.name if p.exists() else init_from.strip("/").replace("/", "_")))


def _random_source(cfg, ctx) -> Path:
    """glue.allow_random_weights with no init_from: a randomly initialised model.* written once as a checkpoint, so
    every run starts from the same weights through the same loading code."""
    path = Path(cfg.trainer.output_dir) / "glue" / "random_init"
    if not (path / "model.safetensors").is_file() and ctx["rank"] == 0:
        torch.manual_seed(cfg.trainer.seed)
        tokenizer = data.load_tokenizer(cfg.tokenizer)
        data.check_vocab(tokenizer, cfg.model.vocab_size)
        save_model_dir(path, neobert.NeoBERTLMHead(cfg.model), {"model": dataclasses.asdict(cfg.model)}, tokenizer)
    if ctx["world"] > 1:
        dist.barrier()
    return path


def _check_model(cfg, source, runs: list):
    """The tokenizer of the starting checkpoint, loaded once before any work: a missing checkpoint, no tokenizer, or
    a max_seq_length beyond its positions stops here."""
    _, info = train.load_pretrained(source, head="encoder")
    tokenizer = info.tokenizer
    if tokenizer is None:
        tokenizer = data.load_tokenizer(cfg.tokenizer)  # e.g. a folder with only config.json + weights
    data.special_token_ids(tokenizer)
    data.check_vocab(tokenizer, info.model_config.vocab_size)
    positions = info.model_config.max_position_embeddings
    for run in runs:
        if run.max_seq_length > positions:
            raise UserError(f"{run.task}: max_seq_length={run.max_seq_length} exceeds the model's "
                            f"max_position_embeddings={positions}; lower glue.max_seq_length (or "
                            "glue.tasks.<task>.max_seq_length)")
    return tokenizer


def load_tasks(names: list, g: GlueConfig, rank: int, world: int) -> tuple[dict, dict, dict]:
    """({name: GlueTask}, {name: {split: Split}}, {name: id2label}) for every task, read and checked before any
    fine-tuning. Under torchrun rank 0 reads (and downloads) first; the others then read its cache."""
    tasks, splits, id2labels = {}, {}, {}
    for turn in ((0,), tuple(range(1, world))) if world > 1 else ((0,),):
        if rank in turn:
            for name in names:
                if name == "custom":
                    splits[name], num_labels, id2labels[name] = load_custom_task(g)
                    tasks[name] = custom_task(g, num_labels)
                else:
                    task = tasks[name] = GLUE_TASKS[name]
                    if g.num_labels is not None and g.num_labels != task.num_labels:
                        raise UserError(f"glue.num_labels={g.num_labels} contradicts {name}, which has "
                                        f"{task.num_labels} label{'s' if task.num_labels > 1 else ''}; leave "
                                        "glue.num_labels null for GLUE tasks")
                    splits[name] = load_glue_task(task, g)
                    id2labels[name] = dict(enumerate(task.labels)) if task.labels else None
                if rank == 0:
                    sizes = ", ".join(f"{split} {len(sp.texts)}" for split, sp in splits[name].items())
                    print(f"{name}: {sizes} examples ({Path(splits[name]['train'].source).parent})", flush=True)
        if world > 1:
            dist.barrier()
    return tasks, splits, id2labels


def glue(cfg, cli: set, bench: bool = False) -> Optional[dict]:
    g, t = cfg.tasks["glue"], cfg.trainer
    names = parse_tasks(g.task_name)
    runs = plan_runs(cfg, names, cli)
    rank, world, device = _distributed()
    try:
        precision = train.resolve_precision(t.mixed_precision, device, warn=data.warn if rank == 0 else None)
        ctx = dict(rank=rank, world=world, device=device, precision=precision, amp=train.autocast(device, precision),
                   unpadded=g.batching == "unpadded" or (g.batching == "auto" and device.type == "cuda"),
                   eval_batch_size=t.per_device_eval_batch_size, encoded={})
        if t.output_dir == "auto":
            t.output_dir = auto_output_dir(g.init_from)
        source = g.init_from if g.init_from is not None else _random_source(cfg, ctx)
        ctx["tokenizer"] = _check_model(cfg, source, runs)
        ctx["pad_id"] = data.special_token_ids(ctx["tokenizer"])["pad"]
        tasks, splits, id2labels = load_tasks(names, g, rank, world)
        if bench:
            return bench_glue(cfg, runs[0], tasks[runs[0].task], source, splits[runs[0].task], ctx)

        # phase 1: everything that does not start from MNLI; phase 2: the transfer tasks, from MNLI's best model
        moved = [r for r in runs if g.transfer_from_task and r.task in TRANSFER_TASKS]
        phases = [[r for r in runs if r not in moved], moved]
        if phases[1] and "mnli" not in names and _best_mnli(cfg) is None:
            raise UserError(f"glue.transfer_from_task starts {', '.join(sorted({r.task for r in phases[1]}))} from "
                            f"the best MNLI model, and {Path(t.output_dir) / 'glue' / 'mnli'} holds no finished "
                            "MNLI run: add mnli to glue.task_name (all includes it) or run it first")
        if rank == 0:
            print(f"glue: {len(runs)} run{'s' if len(runs) > 1 else ''} of {', '.join(names)} over {world} "
                  f"process{'es' if world > 1 else ''} ({device}, {'bf16 autocast' if precision == 'bf16' else 'fp32'},"
                  f" {'unpadded' if ctx['unpadded'] else 'length-grouped padded'} batches) -> "
                  f"{Path(t.output_dir) / 'glue'}", flush=True)
        for phase_no, phase in enumerate(phases):
            if not phase:
                continue
            start = source
            if phase_no == 1:
                start = _best_mnli(cfg)
                if rank == 0:
                    print(f"transfer: {', '.join(sorted({r.task for r in phase}))} start from {start}")
            todo = [None]
            if rank == 0:
                todo = [[i for i, run in enumerate(phase) if not _finished(cfg, run, start)]]
                done = len(phase) - len(todo[0])
                if done:
                    print(f"skipping {done} finished run{'s' if done > 1 else ''} (their results.json exist)")
            if world > 1:
                dist.broadcast_object_list(todo, src=0)  # rank 0's list of runs to do, to every process
            for i in todo[0][rank::world]:  # round-robin: each process its own runs, on its own device
                run = phase[i]
                res = finetune(cfg, run, tasks[run.task], start, splits[run.task], ctx, id2labels[run.task])
                who = f"[rank {rank}] " if world > 1 else ""
                print(f"{who}{run.task} {run.name}: best {100 * res['best']['score']:.2f} at step "
                      f"{res['best']['step']} ({res['steps']} steps, {res['wall_time_s']:.0f}s)", flush=True)
            if world > 1:
                dist.barrier()
        summary = None
        if rank == 0:
            summary = summarize_glue(cfg, runs, tasks)
            out = Path(t.output_dir) / "glue"
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "results.json", json.dumps(summary, indent=1))  # the MTEB section's writer
            write_atomic(out / "results.md", results_markdown(summary))
            print(results_markdown(summary), end="")
            print(f"written: {out / 'results.md'}, {out / 'results.json'}")
        return summary
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


GLUE_USAGE = """usage: python evaluate.py glue [CONFIG] [--bench] [--section.key value ...]  (CONFIG: configs/glue.yaml)
  --glue.task_name cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte|wnli|all|custom (or a comma list)
  --glue.init_from RUN_DIR|CHECKPOINT_DIR|HF_FOLDER|HUB_ID   --glue.tasks.<task>.<key> v   --glue.sweep.<key> v1,v2
  --bench: fine-tuning examples/s, padded vs unpadded batches, on the first task
  results: <trainer.output_dir>/glue/results.md, results.json; one folder per run under glue/<task>/"""


def glue_main(argv) -> int:
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(GLUE_USAGE)
        return 0
    if not argv or argv[0].startswith("--") or "=" in argv[0]:  # no CONFIG: the default one
        argv.insert(0, str(Path(__file__).resolve().parent / "configs" / "glue.yaml"))
    bench = "--bench" in argv
    argv = [a for a in argv if a != "--bench"]

    def work(args):
        cfg, cli = load_glue_config(args)
        glue(cfg, cli, bench=bench)
    return data.run_main(argv, GLUE_USAGE, work)


# === GLUE SECTION END ===

# -----------------------------------------------------------------------------
# MTEB
# (section owned by the MTEB work; entry point: mteb_main(argv) -> int)
# Embed texts with a checkpoint (its own pooling, sorted by length, unpadded on GPU, bf16 on GPU) behind mteb 2.x's
# encoder protocol; let mteb run its evaluators and write its result files; summarise like Table 4 of the paper.
# Read: config -> encoder -> instructions -> mteb adapter (model meta) -> tasks (registry, BEIR) -> run -> report.
# mteb is imported only inside the functions that need it (it is optional, and importing it takes seconds).

import importlib.util
import typing
from typing import Literal

MTEB_INSTALL = "pip install -r requirements-eval.txt (mteb)"
MTEB_TYPES = ("Classification", "Clustering", "PairClassification", "Reranking", "Retrieval", "STS", "Summarization")
MTEB_TYPE_LABELS = {"Classification": "Class.", "Clustering": "Clust.", "PairClassification": "PairClass.",
                    "Reranking": "Rerank.", "Retrieval": "Retr.", "STS": "STS", "Summarization": "Summ."}
# NeoBERT (after contrastive fine-tuning) on MTEB(eng, v1), arXiv:2502.19587 Table 4; the average is over the 56 tasks
PAPER_MTEB = {"Classification": 61.6, "Clustering": 40.8, "PairClassification": 76.2, "Reranking": 51.2,
              "Retrieval": 31.6, "STS": 74.8, "Summarization": 30.7, "Average": 51.3}
BEIR_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")


@dataclass
class MtebConfig:
    model: Optional[str] = None         # run dir | model_checkpoints/<step> | exported HF folder | hub id
    benchmark: str = "MTEB(eng, v1)"    # mteb benchmark, used when neither tasks nor beir_dir is given
    tasks: list[str] = field(default_factory=list)       # mteb task names (a benchmark's own subsets where it has them)
    task_types: list[str] = field(default_factory=list)  # keep only these types (STS, Retrieval, ...)
    beir_dir: Optional[str] = None      # a BEIR folder (corpus.jsonl queries.jsonl qrels/test.tsv), or a parent of some
    pooling: Literal["auto", "mean", "cls"] = "auto"     # auto: the checkpoint's (contrastive.pooling / 1_Pooling)
    max_seq_length: int = 1024          # longer inputs are truncated (the paper: 1024)
    batch_size: int = 64                # texts per forward pass
    instructions: Optional[str] = "configs/mteb_instructions.yaml"  # per-task query / document instructions
    use_instructions: bool = True
    output_dir: Optional[str] = None    # null: the model's run directory (a training run or checkpoint), else runs/mteb
    overwrite: bool = False             # re-score tasks that already have results for this checkpoint

    def __post_init__(self):
        if self.max_seq_length < 2 or self.batch_size < 1:
            raise ValueError("mteb.max_seq_length must be >= 2 and mteb.batch_size >= 1")


# -----------------------------------------------------------------------------
# the encoder: texts -> (N, H) float32 embeddings


def pool_packed(hidden, cu_seqlens, mode: str):
    """neobert.pool for a packed batch: hidden (T, H) of concatenated sequences -> (n, H)."""
    if mode == "cls":
        return hidden[cu_seqlens[:-1].long()]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    sums = hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, seg, hidden)
    return sums / lengths.unsqueeze(-1).to(hidden.dtype)


class SentenceEncoder:
    """A NeoBERT encoder and its tokenizer as a text embedder. Texts are truncated to max_seq_length tokens and run
    longest first in batches of similar length: unpadded (cu_seqlens, the varlen kernels) when packed, else padded."""

    def __init__(self, model, tokenizer, pooling: str, max_seq_length: int, batch_size: int, device, precision: str,
                 packed: Optional[bool] = None):
        from tokenizers import Tokenizer
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation is set on it
        self.max_seq_length = min(max_seq_length, model.config.max_position_embeddings)
        self.tokenizer.enable_truncation(self.max_seq_length)
        self.tokenizer.no_padding()
        self.pad_id = data.special_token_ids(self.tokenizer)["pad"]
        self.pooling, self.batch_size, self.precision = pooling, batch_size, precision
        # padded batches on CPU: there the packed path masks a (T, T) block-diagonal matrix
        self.packed = self.device.type == "cuda" if packed is None else packed
        self.dim = model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts, show_progress_bar: bool = True, desc: str = "embedding") -> np.ndarray:
        from tqdm.auto import tqdm
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: OOM shows up at once
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not show_progress_bar, leave=False):
            rows = order[start:start + self.batch_size]
            out[rows] = self._embed([ids[i] for i in rows]).float().cpu().numpy()
        return out

    def _packed_rows(self, seqs):
        """Whole sequences end to end in rows of at most max_position_embeddings tokens, the layout of the trainer's
        packed batches: (input_ids (R, W), cu_seqlens over the flattened rows, the segment of each sequence). A row's
        unused tail is a segment of its own, of padding."""
        width = min(self.model.config.max_position_embeddings, sum(len(s) for s in seqs))
        tokens, bounds, segment_of, used = [], [0], [], 0
        for s in seqs:
            if used + len(s) > width:  # close the row
                if used < width:
                    tokens += [self.pad_id] * (width - used)
                    bounds.append(len(tokens))
                used = 0
            segment_of.append(len(bounds) - 1)
            tokens += s
            bounds.append(len(tokens))
            used += len(s)
        if used < width:
            tokens += [self.pad_id] * (width - used)
            bounds.append(len(tokens))
        return torch.tensor(tokens).view(-1, width), torch.tensor(bounds, dtype=torch.int32), segment_of

    def _embed(self, seqs):
        with train.autocast(self.device, self.precision):
            if self.packed:
                input_ids, cu, segment_of = self._packed_rows(seqs)
                max_seqlen = int((cu[1:] - cu[:-1]).max())
                input_ids, cu = input_ids.to(self.device), cu.to(self.device)
                hidden = self.model(input_ids, cu_seqlens=cu, max_seqlen=max_seqlen)  # (R, W, H)
                return pool_packed(hidden.flatten(0, 1).float(), cu, self.pooling)[segment_of]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                input_ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids, mask)
            return neobert.pool(hidden.float(), mask, self.pooling)


# -----------------------------------------------------------------------------
# instructions: per task (or per task type) a query instruction and an optional document instruction


@dataclass
class Instructions:
    """From a YAML file:
        query_template: "{instruction} "      # how an instruction prefixes a query (as contrastive training does)
        document_template: "{instruction} "
        tasks:
          ArguAna: Given a claim, find passages that argue against it.   # a query instruction
          QuoraRetrieval: {query: ..., document: ...}                     # both sides
          STS: Retrieve semantically similar text.                       # a task type: its tasks without an entry
    Queries (prompt_type query) and inputs of symmetric tasks (STS, classification, ...: no prompt_type) get the
    query instruction; documents get the document instruction, or nothing."""
    tasks: dict = field(default_factory=dict)  # name or type -> {"query": str, "document": str}
    query_template: str = "{instruction} "
    document_template: str = "{instruction} "
    digest: str = "none"  # of the file's content, so changed instructions never reuse cached scores

    def prefix(self, task_name: str, task_type: str, prompt_type=None) -> str:
        entry = self.tasks.get(task_name) or self.tasks.get(task_type) or {}
        side = "document" if str(getattr(prompt_type, "value", prompt_type)) == "document" else "query"
        text = entry.get(side)
        if not text:
            return ""
        return (self.document_template if side == "document" else self.query_template).format(instruction=text)


def _repo_relative(path: str) -> Path:
    """A path as given, else relative to this repository (so the shipped configs work from any directory)."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and (Path(__file__).resolve().parent / p).exists():
        return Path(__file__).resolve().parent / p
    return p


def load_instructions(path: Optional[str], use: bool = True) -> Instructions:
    if not use or not path:
        return Instructions()
    p = _repo_relative(path)
    if not p.is_file():
        raise UserError(f"mteb.instructions: {path} not found; pass a YAML file of per-task instructions, or "
                        "--mteb.use_instructions false")
    text = p.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"mteb.instructions: {p} is not valid YAML: {' '.join(str(e).split())}") from None
    known = ("tasks", "query_template", "document_template")
    if not isinstance(raw, dict) or set(raw) - set(known) or not isinstance(raw.get("tasks", {}), dict):
        raise UserError(f"mteb.instructions: {p} must be a mapping with keys {', '.join(known)} (tasks: a mapping of "
                        "task name or type -> instruction)")
    tasks = {}
    for name, entry in (raw.get("tasks") or {}).items():
        if isinstance(entry, str):
            entry = {"query": entry}
        if not isinstance(entry, dict) or set(entry) - {"query", "document"} or \
                not all(isinstance(v, str) for v in entry.values()):
            raise UserError(f"mteb.instructions: {p}: tasks.{name} must be an instruction string or "
                            "{query: str, document: str}")
        tasks[str(name)] = entry
    out = Instructions(tasks=tasks, digest=hashlib.sha256(text.encode()).hexdigest()[:12])
    for key in ("query_template", "document_template"):
        template = raw.get(key, getattr(out, key))
        if not isinstance(template, str) or "{instruction}" not in template:
            raise UserError(f"mteb.instructions: {p}: {key} must be a string holding {{instruction}}")
        setattr(out, key, template)
    return out


# -----------------------------------------------------------------------------
# the mteb side: model meta (who produced these scores), the encoder protocol, tasks


def import_mteb():
    # mteb.evaluate imports sentence-transformers even for our own encoder; the mteb-core package lacks it
    if importlib.util.find_spec("mteb") is None or importlib.util.find_spec("sentence_transformers") is None:
        raise UserError(f"evaluate.py mteb needs the mteb package (with sentence-transformers): {MTEB_INSTALL}")
    import mteb
    return mteb


def weights_digest(folder: Path) -> str:
    """sha256 of the weight files: the revision under which mteb files a checkpoint's results."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def model_identity(source: str, path: Path) -> str:
    """The name mteb files results under: a hub id as is; a checkpoint as local/<run>-step<N>; a folder by its name."""
    if not Path(source).expanduser().exists():
        return source  # a hub id, downloaded
    if path.parent.name == "model_checkpoints" and path.name.isdigit():
        return f"local/{path.parent.parent.resolve().name}-step{path.name}"
    return f"local/{path.resolve().name}"


def model_meta(name: str, revision: str, n_parameters: int, encoder: SentenceEncoder, instructions: Instructions,
               use_instructions: bool):
    from mteb.models.model_meta import ModelMeta
    # experiment_kwargs: settings that change the embeddings file results apart (results/<name>/<rev>/experiments/..)
    settings = dict(pooling=encoder.pooling, max_seq_length=encoder.max_seq_length, precision=encoder.precision,
                    instructions=instructions.digest if use_instructions else "none")
    return ModelMeta(
        loader=None, name=name, revision=revision, release_date=None, languages=None, n_parameters=n_parameters,
        memory_usage_mb=None, max_tokens=encoder.max_seq_length, embed_dim=encoder.dim, license=None,
        open_weights=True, public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name="cosine", use_instructions=use_instructions, training_datasets=None,
        experiment_kwargs=settings)


def mteb_encoder(encoder: SentenceEncoder, meta, instructions: Instructions, show_progress_bar: bool = True):
    """The encoder behind mteb's protocol (mteb.models.abs_encoder.AbsEncoder). Similarities are cosine: the meta's
    similarity_fn_name picks mteb's cos_sim in AbsEncoder.similarity / similarity_pairwise."""
    from mteb.models.abs_encoder import AbsEncoder

    class NeoBERTEncoder(AbsEncoder):
        def __init__(self):
            self.model, self.mteb_model_meta, self.instructions = encoder, meta, instructions

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [text for batch in inputs for text in batch["text"]]
            prefix = self.instructions.prefix(task_metadata.name, task_metadata.type, prompt_type)
            side = {"query": "queries", "document": "documents"}.get(getattr(prompt_type, "value", None), "texts")
            return self.model.encode([prefix + t for t in texts], desc=f"{task_metadata.name} {side}",
                                     show_progress_bar=show_progress_bar and kwargs.get("show_progress_bar", True))

    return NeoBERTEncoder()


def _read_jsonl(path: Path, what: str) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i}: not a JSON object; each line of {what} is one") from None
            if not isinstance(row, dict) or "_id" not in row or not isinstance(row.get("text", ""), str):
                raise UserError(f"{path}:{i}: a {what} line needs \"_id\" and \"text\" (BEIR format)")
            rows.append(row)
    return rows


def read_beir(folder: Path):
    """(corpus, queries, qrels) of a BEIR folder: corpus.jsonl {_id, title, text}, queries.jsonl {_id, text},
    qrels/test.tsv (query-id, corpus-id, score; a header line)."""
    missing = [f for f in BEIR_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"mteb.beir_dir: {folder} lacks {', '.join(missing)}; a BEIR folder holds "
                        f"{', '.join(BEIR_FILES)}")
    corpus = _read_jsonl(folder / "corpus.jsonl", "corpus.jsonl")
    queries = _read_jsonl(folder / "queries.jsonl", "queries.jsonl")
    qrels = {}
    with open(folder / "qrels" / "test.tsv", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if i == 1 and parts[-1].strip().lower() == "score" or not line.strip():
                continue  # the header
            try:
                qid, did, score = parts[0], parts[-2], int(float(parts[-1]))
            except (IndexError, ValueError):
                raise UserError(f"{folder / 'qrels' / 'test.tsv'}:{i}: expected query-id<TAB>corpus-id<TAB>score") \
                    from None
            qrels.setdefault(qid, {})[did] = score
    doc_ids = {str(r["_id"]) for r in corpus}
    qrels = {q: {d: s for d, s in docs.items() if d in doc_ids} for q, docs in qrels.items()}
    queries = [r for r in queries if str(r["_id"]) in qrels and qrels[str(r["_id"])]]
    if not corpus or not queries:
        raise UserError(f"mteb.beir_dir: {folder} has no queries with judged documents of its corpus "
                        "(qrels/test.tsv ids must match queries.jsonl and corpus.jsonl)")
    return corpus, queries, qrels


def beir_task(folder: Path):
    """A local BEIR folder as an mteb retrieval task (named after the folder; nDCG@10 as BEIR and MTEB report)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    corpus, queries, qrels = read_beir(folder)  # read up front: a broken folder fails before any model work
    h = hashlib.sha256()
    for f in BEIR_FILES:
        h.update((folder / f).read_bytes())

    class BEIRFolderTask(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=folder.resolve().name, description=f"the local BEIR folder {folder.resolve()}",
            dataset={"path": str(folder.resolve()), "revision": h.hexdigest()[:16]}, type="Retrieval",
            category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
            main_score="ndcg_at_10")

        def load_data(self, num_proc=None, **kwargs):
            split = dict(
                corpus=Dataset.from_list([{"id": str(r["_id"]), "title": str(r.get("title") or ""),
                                           "text": r.get("text") or ""} for r in corpus]),
                queries=Dataset.from_list([{"id": str(r["_id"]), "text": r.get("text") or ""} for r in queries]),
                relevant_docs=qrels, top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return BEIRFolderTask()


def beir_tasks(beir_dir: str) -> list:
    root = Path(beir_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"mteb.beir_dir: {beir_dir} is not a directory; pass a BEIR folder ({', '.join(BEIR_FILES)})")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and (d / "corpus.jsonl").is_file())
    if (root / "corpus.jsonl").is_file() or not subdirs:
        return [beir_task(root)]
    return [beir_task(d) for d in subdirs]  # a folder of BEIR folders (as the BEIR download unpacks)


def _closest(name: str, choices, what: str) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"unknown {what} {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")


def select_tasks(mc: MtebConfig) -> list:
    """The tasks to run: mteb.tasks (a benchmark's own version where it has the task: e.g. STS17 en-en only in
    MTEB(eng, v1)), plus mteb.beir_dir folders; neither given: the benchmark's tasks. task_types filters them."""
    mteb = import_mteb()
    from mteb.abstasks.task_metadata import TaskType
    bad = [t for t in mc.task_types if t not in typing.get_args(TaskType)]
    if bad:
        raise UserError(f"mteb.task_types: {_closest(bad[0], typing.get_args(TaskType), 'task type')} "
                        f"(types: {', '.join(MTEB_TYPES)}, ...)")
    bench = None
    if mc.benchmark and (mc.tasks or not mc.beir_dir):  # the source of tasks, or of their benchmark versions
        try:
            bench = mteb.get_benchmark(mc.benchmark)
        except (KeyError, ValueError) as e:
            raise UserError(f"mteb.benchmark: {e.args[0] if e.args else e}") from None
    if mc.tasks or mc.beir_dir:
        own = {t.metadata.name: t for t in bench.tasks} if bench is not None else {}
        from_registry = [n for n in mc.tasks if n not in own]
        try:
            found = {t.metadata.name: t for t in mteb.get_tasks(tasks=from_registry)} if from_registry else {}
        except (KeyError, ValueError) as e:
            raise UserError(f"mteb.tasks: {str(e.args[0] if e.args else e).removeprefix('KeyError: ')}") from None
        tasks = [own.get(n) or found[n] for n in mc.tasks]
        tasks += beir_tasks(mc.beir_dir) if mc.beir_dir else []
    elif bench is not None:
        tasks = list(bench.tasks)
    else:
        raise UserError("no tasks: set --mteb.tasks, --mteb.benchmark or --mteb.beir_dir")
    if mc.task_types:
        tasks = [t for t in tasks if t.metadata.type in mc.task_types]
        if not tasks:
            raise UserError(f"mteb.task_types {','.join(mc.task_types)}: none of the selected tasks has these types")
    names = [t.metadata.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"task names given twice: {', '.join(dup)} (BEIR folders are named after their folder)")
    return tasks


def _is_unreachable(e: BaseException) -> bool:
    """Whether an exception from loading a task's data means the hub (or network) could not be reached."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "TimeoutError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                         "DatasetNotFoundError", "HfHubHTTPError"})


def score_task(mteb, model, task, cache, overwrite: bool):
    name = task.metadata.name
    # mteb's only-missing keeps a result whose dataset revision differs; a BEIR folder's revision is its content hash,
    # so an edited folder is scored again instead of being handed the old scores
    cached = None if overwrite else cache.load_task_result(name, model.mteb_model_meta)
    stale = cached is not None and cached.dataset_revision != task.metadata.revision
    try:
        mteb.evaluate(model, task, cache=cache, overwrite_strategy="always" if overwrite or stale else "only-missing",
                      co2_tracker=False, raise_error=True, show_progress_bar=False,
                      encode_kwargs={"batch_size": model.model.batch_size})
    except UserError:
        raise
    except Exception as e:
        if _is_unreachable(e):
            raise UserError(f"task {name}: its data could not be fetched from the Hugging Face Hub "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); MTEB tasks need the hub (or "
                            "their datasets already in the HF cache); to score a local corpus offline, pass a BEIR "
                            "folder with --mteb.beir_dir DIR") from None
        raise


def task_score(task, result) -> Optional[float]:
    """The task's main score x 100: the mean over its eval splits and (benchmark-selected) subsets."""
    if result is None:
        return None
    values = [s["main_score"] for split in task.eval_splits for s in result.scores.get(split, [])
              if s.get("hf_subset") in task.hf_subsets]
    return 100.0 * float(np.mean(values)) if values else None


# -----------------------------------------------------------------------------
# report: per task, per type, overall, beside the paper's row (Table 4 of arXiv:2502.19587)


def summarize(tasks, cache, meta, info: dict) -> dict:
    rows = {}
    for task in tasks:
        score = task_score(task, cache.load_task_result(task.metadata.name, meta))
        rows[task.metadata.name] = dict(type=task.metadata.type, main_score=task.metadata.main_score,
                                        score=None if score is None else round(score, 4))
    by_type = {}
    for row in rows.values():
        if row["score"] is not None:
            by_type.setdefault(row["type"], []).append(row["score"])
    scored = [r["score"] for r in rows.values() if r["score"] is not None]
    return dict(**info, tasks=rows,
                types={t: dict(score=round(float(np.mean(v)), 4), tasks=len(v)) for t, v in by_type.items()},
                average=round(float(np.mean(scored)), 4) if scored else None, tasks_scored=len(scored),
                tasks_total=len(rows), paper={"model": "NeoBERT (paper, MTEB(eng, v1))", **PAPER_MTEB})


def render_markdown(s: dict) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    types = [t for t in MTEB_TYPES] + sorted(t for t in s["types"] if t not in MTEB_TYPES)
    head = "| Model | " + " | ".join(MTEB_TYPE_LABELS.get(t, t) for t in types) + " | Avg. |"
    ours = [fmt(s["types"].get(t, {}).get("score")) for t in types]
    lines = [f"# MTEB: {s['model']}", "",
             f"`{s['source']}` ({s['path']}), revision {s['revision']}; pooling {s['pooling']}, max_seq_length "
             f"{s['max_seq_length']}, precision {s['precision']}, instructions {s['instructions']}. "
             f"{s['tasks_scored']}/{s['tasks_total']} tasks scored; main score x 100.", "",
             head, "|" + " --- |" * (len(types) + 2),
             "| " + " | ".join([s["model"], *ours, fmt(s["average"])]) + " |",
             "| " + " | ".join([s["paper"]["model"], *(fmt(s["paper"].get(t)) for t in types),
                                fmt(s["paper"]["Average"])]) + " |",
             "| tasks | " + " | ".join(str(s["types"].get(t, {}).get("tasks", 0)) for t in types)
             + f" | {s['tasks_scored']} |", "",
             "Per type: the mean of its tasks; Avg.: the mean over all tasks scored (the paper's: over the 56 tasks "
             "of MTEB(eng, v1)).", "", "| Task | Type | Main score | Score |", "| --- | --- | --- | --- |"]
    for name, row in s["tasks"].items():
        lines.append(f"| {name} | {row['type']} | {row['main_score']} | {fmt(row['score'])} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str):
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the run: every process scores its share of the tasks; rank 0 writes the summary once all are done


def mteb_output_dir(mc: MtebConfig, path: Path) -> Path:
    if mc.output_dir:
        return Path(mc.output_dir).expanduser()
    if path.parent.name == "model_checkpoints":  # a training checkpoint: beside it, in its run directory
        return path.parent.parent
    return Path("runs/mteb")


def run_mteb(cfg, progress: bool = True) -> Optional[dict]:
    """Score cfg.tasks["mteb"].model; returns the summary on rank 0 (None elsewhere)."""
    mc = cfg.tasks["mteb"]
    if not mc.model:
        raise UserError(f"mteb.model is not set; pass --mteb.model with {train.MODEL_SOURCES}")
    mteb = import_mteb()
    tasks = select_tasks(mc)  # every rank checks everything before any work, so all fail alike
    instructions = load_instructions(mc.instructions, mc.use_instructions)
    model, info = train.load_pretrained(mc.model, head="encoder")
    if info.tokenizer is None:
        raise UserError(f"{info.path} has no tokenizer.json; the model folder needs its tokenizer")
    rank, world, device = _distributed()  # each process scores its share of the tasks; gloo carries one barrier
    precision = train.resolve_precision(cfg.trainer.mixed_precision, device)
    pooling = info.pooling if mc.pooling == "auto" else mc.pooling
    encoder = SentenceEncoder(model, info.tokenizer, pooling, mc.max_seq_length, mc.batch_size, device, precision)
    name, revision = model_identity(mc.model, info.path), weights_digest(info.path)
    meta = model_meta(name, revision, neobert.num_params(model), encoder, instructions, mc.use_instructions)
    out = mteb_output_dir(mc, info.path) / "mteb"
    out.mkdir(parents=True, exist_ok=True)
    cache = mteb.ResultCache(cache_path=out)
    wrapped = mteb_encoder(encoder, meta, instructions, show_progress_bar=progress and rank == 0)
    mine = tasks[rank::world]
    for i, task in enumerate(mine):
        print(f"[rank {rank}] {task.metadata.name} ({task.metadata.type}) {i + 1}/{len(mine)}", file=sys.stderr,
              flush=True)
        score_task(mteb, wrapped, task, cache, mc.overwrite)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    info_row = dict(model=name, revision=revision, source=mc.model, path=str(info.path), pooling=pooling,
                    max_seq_length=encoder.max_seq_length, precision=precision,
                    instructions=f"{mc.instructions} ({instructions.digest})" if mc.use_instructions else "off",
                    mteb_version=mteb.__version__, results_dir=str(cache.get_task_result_path("TASK", meta).parent))
    summary = summarize(tasks, cache, meta, info_row)
    write_atomic(out / "results.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out / "results.md", render_markdown(summary))
    print(render_markdown(summary))
    print(f"wrote {out / 'results.md'} and results.json; mteb's files: {summary['results_dir']}", file=sys.stderr)
    return summary


MTEB_USAGE = """usage: python evaluate.py mteb [CONFIG] --mteb.model RUN_DIR|CHECKPOINT|HF_DIR|HUB_ID [--s.key v ...]
  CONFIG: configs/mteb.yaml
  --mteb.tasks STSBenchmark,SciFact | --mteb.benchmark "MTEB(eng, v1)" | --mteb.beir_dir DIR
  --mteb.task_types STS,Retrieval (keeps only these types of the tasks above)
  --mteb.pooling auto|mean|cls  --mteb.max_seq_length 1024  --mteb.batch_size 64  --mteb.use_instructions true|false
  torchrun --nproc_per_node N evaluate.py mteb ...: the tasks are spread over the processes
  results: mteb's files and results.md / results.json under <mteb.output_dir>/mteb/"""


def load_mteb_config(argv):
    if not argv or argv[0].startswith("--") or "=" in argv[0]:  # no CONFIG: the default one
        argv = [str(Path(__file__).resolve().parent / "configs" / "mteb.yaml"), *argv]
    return train.load_config(argv[0], argv[1:], extra_sections={"mteb": MtebConfig})


def mteb_main(argv) -> int:
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(MTEB_USAGE)
        return 0
    try:
        return data.run_main(argv, MTEB_USAGE, lambda args: run_mteb(load_mteb_config(args)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# === MTEB SECTION END ===

# -----------------------------------------------------------------------------
# main

USAGE = __doc__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("glue", "mteb"):
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    return glue_main(rest) if command == "glue" else mteb_main(rest)


if __name__ == "__main__":
    sys.exit(main())
