"""usage: python evaluate.py glue [CONFIG] [--section.key value ...]     CONFIG defaults to configs/glue.yaml
       python evaluate.py mteb [CONFIG] [--section.key value ...]     CONFIG defaults to configs/mteb.yaml
       torchrun --nproc_per_node 8 evaluate.py glue|mteb [...]        runs / tasks spread over the processes
  python evaluate.py glue --help, python evaluate.py mteb --help: each one's options
  A model may be a run directory, a model_checkpoints/<step> directory, an exported HF folder or a hub id.

Evaluate NeoBERT models: fine-tune and score on GLUE here with the paper's protocol (docs/glue.md), or embed and score
on MTEB (mteb_eval.py). Each finished GLUE run writes its results.json, so the same command continues a stopped sweep.
"""

import dataclasses
import datetime
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import config
import hub
import mteb_eval
import neobert
import prepare
import runtime
import train
from config import UserError

# -----------------------------------------------------------------------------
# config

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
            config.require(values is None or len(values) > 0, f"glue.sweep.{key} is empty; give at least one value")


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
    tasks: Optional[dict[str, TaskSettings]] = field(default_factory=dict)  # null: none
    sweep: SweepConfig = field(default_factory=SweepConfig)
    batching: Literal["auto", "padded", "unpadded"] = "auto"  # auto: unpadded on GPU, length-grouped padded on CPU
    text_columns: list[str] = field(default_factory=list)  # custom: one or two columns
    label_column: str = "label"  # custom
    metric: Optional[str] = None  # custom: accuracy f1 mcc pearson spearman, or a comma list (score = their mean)
    bench_steps: int = 20  # --bench: timed steps per batching mode

    def __post_init__(self):
        self.tasks = self.tasks or {}
        for task in self.tasks:
            config.require(task in GLUE_TASKS or task == "custom",
                           f"glue.tasks.{task}: unknown task; choose from {', '.join([*GLUE_TASKS, 'custom'])}")
        config.require(0.0 <= self.warmup_ratio < 1.0 and 0.0 <= self.classifier_dropout < 1.0,
                       "glue.warmup_ratio and glue.classifier_dropout must be in [0, 1)")
        config.require(self.init_from is not None or self.allow_random_weights,
                       "glue.init_from is null: pass a checkpoint (a run dir, model_checkpoints/<step>, an exported "
                       "folder or a hub id such as chandar-lab/NeoBERT), or set glue.allow_random_weights: true")
        config.require(self.metric is None or (self.metric_names and set(self.metric_names) <= set(METRICS)),
                       f"glue.metric={self.metric!r}: choose from {', '.join(METRICS)} (or a comma list of them)")

    @property
    def metric_names(self) -> tuple:
        return tuple(m.strip() for m in (self.metric or "").split(",") if m.strip())


@dataclass
class GlueRunConfig:
    """The sections `evaluate.py glue` reads (configs/glue.yaml)."""
    glue: GlueConfig = field(default_factory=GlueConfig)
    trainer: train.TrainerConfig = field(default_factory=train.TrainerConfig)
    optimizer: train.OptimizerConfig = field(default_factory=train.OptimizerConfig)
    scheduler: train.SchedulerConfig = field(default_factory=train.SchedulerConfig)
    model: neobert.NeoBERTConfig = field(default_factory=neobert.NeoBERTConfig)  # glue.allow_random_weights only
    tokenizer: prepare.TokenizerConfig = field(default_factory=prepare.TokenizerConfig)  # a model without one


def load_glue_config(argv: list):
    """CONFIG [overrides] -> (GlueRunConfig, the dotted keys given on the command line)."""
    cfg = config.load_config(GlueRunConfig, argv[0], argv[1:])
    return cfg, {key for key, _ in config.parse_overrides(argv[1:])}


# -----------------------------------------------------------------------------
# tasks

@dataclass(frozen=True)
class GlueTask:
    name: str
    title: str  # also the GLUE download's folder
    columns: tuple  # text columns of the nyu-mll/glue parquet files
    labels: tuple  # id -> name, as in the parquet files; () for regression
    metrics: tuple  # the task's numbers; its score is their mean
    tsv: tuple = ((), "label", None)  # the GLUE download's text columns (() = the parquet's), label column, header
    val_splits: tuple = ("validation",)
    paper: Optional[float] = None  # NeoBERT's score in the paper (Table 3, validation)

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


PAIR = ("sentence1", "sentence2")
GLUE_TASKS = {t.name: t for t in [
    GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("mcc",),
             ((), "label", ("source", "label", "original_label", "sentence")), paper=66.2),  # a TSV without header
    GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), paper=95.6),
    GlueTask("mrpc", "MRPC", PAIR, ("not_equivalent", "equivalent"), ("f1", "accuracy"),
             (("#1 String", "#2 String"), "Quality", None), paper=93.4),
    GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"),
             ((), "is_duplicate", None), paper=90.7),
    GlueTask("stsb", "STS-B", PAIR, (), ("pearson", "spearman"), ((), "score", None), paper=91.8),
    GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
             ("accuracy_matched", "accuracy_mismatched"), (PAIR, "gold_label", None),
             ("validation_matched", "validation_mismatched"), paper=89.0),
    GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), paper=93.7),
    GlueTask("rte", "RTE", PAIR, ("entailment", "not_entailment"), ("accuracy",), paper=91.3),
    GlueTask("wnli", "WNLI", PAIR, ("not_entailment", "entailment"), ("accuracy",)),
]}
PAPER_EIGHT = ("mnli", "qnli", "qqp", "rte", "sst2", "mrpc", "cola", "stsb")  # the paper's column order
PAPER_GLUE_SCORE = 89.0
TRANSFER_TASKS = ("rte", "mrpc", "stsb", "qnli")


# -----------------------------------------------------------------------------
# data: every split becomes texts (a list of 1- or 2-tuples) and labels (int64 ids, or floats for regression)

@dataclass
class Split:
    texts: list
    labels: np.ndarray
    source: str  # the file it came from, for messages


def _columns(table: dict, names, path, what: str) -> list:
    for name in names:
        config.require(name in table, f"{path} has no {what} column {name!r}; its columns: "
                                      f"{', '.join(map(str, table))}")
    return [table[n] for n in names]


def _make_split(table: dict, text_names, label_name, path, num_labels: int, names: tuple, hint: str) -> Split:
    """The texts and labels of one split; rows without a label are skipped, with a warning."""
    columns = _columns(table, text_names, path, "text")
    texts = list(zip(*[["" if v is None else str(v) for v in col] for col in columns]))
    (raw,) = _columns(table, [label_name], path, "label")
    labels = [_label(value, i, path, num_labels, names, hint) for i, value in enumerate(raw)]
    keep = [i for i, label in enumerate(labels) if label is not None]
    if len(keep) < len(texts):
        config.warn(f"{path}: skipped {len(texts) - len(keep)} rows without a gold label")
    config.require(keep, f"{path} holds no labelled examples")
    return Split([texts[i] for i in keep], np.asarray([labels[i] for i in keep]), str(path))


def _label(value, row: int, path, num_labels: int, names: tuple, hint: str):
    """One raw label (parquet ints, TSV/CSV strings such as 'entailment' or '1') -> a class id (the index of its
    name in `names`, or the integer it is), a float for a regression (num_labels 1), or None when there is none."""
    if _no_label(value):
        return None
    number, where = _number(value), f"{path} row {row + 1}: label"
    if num_labels == 1:
        config.require(number is not None, f"{where} {value!r} is not a number (a regression: {hint})")
        return number
    if str(value) in names:
        return names.index(str(value))
    config.require(number is not None and number.is_integer(),
                   f"{where} {value!r} is neither one of {', '.join(names)} nor an id 0..{num_labels - 1}")
    config.require(0 <= number < num_labels, f"{where} {int(number)} is outside 0..{num_labels - 1} ({hint})")
    return int(number)


def load_glue_task(task: GlueTask, g: GlueConfig) -> dict:
    """{split: Split} of train and the validation split(s), from the hub or glue.data_dir: hub parquet layout
    <task>/<split>-*.parquet, or the GLUE download's <Task>/train.tsv, dev.tsv (MNLI: dev_matched, dev_mismatched)."""
    splits = ("train", *task.val_splits)
    hint = f"{task.name} has {task.num_labels} label{'s' if task.num_labels > 1 else ''}"
    config.require(g.num_labels in (None, task.num_labels), f"glue.num_labels={g.num_labels} contradicts {task.name}"
                   f" ({hint}); leave glue.num_labels null for GLUE tasks")
    tsv = {s: f"{task.title}/{'train' if s == 'train' else 'dev' + s.removeprefix('validation')}.tsv" for s in splits}
    columns, label, header = task.columns, "label", None
    if g.data_dir is None:
        offline = (f"download GLUE and set glue.data_dir to a folder holding {task.name}/<split>-*.parquet or the GLUE "
                   f"TSV files {', '.join(tsv.values())}, and set HF_HUB_OFFLINE=1 (no hub calls)")
        names = {s: f"{task.name}/{s}-00000-of-00001.parquet" for s in splits}
        files = {s: [Path(hub.download("nyu-mll/glue", name, repo_type="dataset", cache_dir=g.cache_dir,
                                       what=f"download {name} of the hub dataset nyu-mll/glue", offline=offline))]
                 for s, name in names.items()}
    else:
        root = Path(g.data_dir)
        files = {s: sorted((root / task.name).glob(f"{s}-*.parquet")) for s in splits}
        if not all(files.values()):
            files = {s: [root / name] for s, name in tsv.items()}
            config.require(all(p.is_file() for (p,) in files.values()),
                           f"glue.data_dir={root} holds neither {task.name}/<split>-*.parquet for {', '.join(splits)} "
                           f"nor the GLUE TSV files {', '.join(tsv.values())}; "
                           "set glue.data_dir to a folder with one of those layouts, or to null for the hub")
            columns, label, header = task.tsv[0] or task.columns, *task.tsv[1:]
    out = {}
    for split, paths in files.items():
        tables = [prepare.read_table(p, header) for p in paths]
        table = {c: [v for t in tables for v in t.get(c, [])] for c in tables[0]}
        path = paths[0] if len(paths) == 1 else paths[0].parent / f"{split}-*.parquet"
        out[split] = _make_split(table, columns, label, path, task.num_labels, task.labels, hint)
    return out


def load_custom_task(g: GlueConfig) -> tuple[dict, int, Optional[dict]]:
    """A user's dataset: ({train, validation}, num_labels, id2label). String labels become ids in sorted order."""
    config.require(g.data_dir is not None and Path(g.data_dir).is_dir(), f"glue.task_name=custom needs glue.data_dir "
                   f"(now {g.data_dir}): a folder with train.* and validation.* (tsv, csv, jsonl or parquet)")
    config.require(1 <= len(g.text_columns) <= 2,
                   f"glue.text_columns must name one or two columns for a custom task, got {g.text_columns}")
    root, paths = Path(g.data_dir), {}
    for split, stems in (("train", ["train"]), ("validation", ["validation", "dev"])):
        found = [root / (stem + ext) for stem in stems for ext in (".tsv", ".csv", ".jsonl", ".parquet")]
        paths[split] = next((p for p in found if p.is_file()), None)
        config.require(paths[split] is not None, f"glue.data_dir={root} has no {split}.tsv/.csv/.jsonl/.parquet"
                       f"{' (or dev.*)' if len(stems) > 1 else ''}; a custom task needs train.* and validation.* "
                       "(or dev.*) there")
    for path in (p for p in paths.values() if p.suffix == ".tsv"):  # prepare.read_table would skip a short row
        with open(path, encoding="utf-8-sig", errors="replace", newline="\n") as f:
            lines = ((n, ln.rstrip("\r\n").split("\t")) for n, ln in enumerate(f, 1) if ln.strip())
            _, header = next(lines, (0, []))
            for n, fields in lines:
                config.require(len(fields) >= len(header), f"{path} line {n} has {len(fields)} tab-separated field"
                               f"{'s' if len(fields) > 1 else ''} but its header has {len(header)} "
                               f"({', '.join(header)}); fix or delete that line")
    tables = {s: prepare.read_table(p) for s, p in paths.items()}
    values = [v for s, t in tables.items() for v in _columns(t, [g.label_column], paths[s], "label")[0]
              if not _no_label(v)]
    numbers = [_number(v) for v in values]  # CSV/TSV labels are strings: "1", "2.5"
    ids = None not in numbers and all(n.is_integer() for n in numbers)
    id2label = None
    if g.num_labels == 1 or (g.num_labels is None and None not in numbers and not ids):
        num_labels = 1  # a regression
    elif ids:  # ids as given; their count comes from glue.num_labels or the data
        num_labels = g.num_labels if g.num_labels is not None else int(max(numbers, default=1)) + 1
        config.require(num_labels >= 2, f"the labels in {paths['train']} are all {max(numbers, default=0):g}: a "
                       "classifier needs at least two classes (glue.num_labels: 1 makes it a regression)")
    else:
        names = sorted({str(v) for v in values})
        num_labels = g.num_labels if g.num_labels is not None else len(names)
        config.require(len(names) <= num_labels, f"glue.num_labels={num_labels} but the data has {len(names)} distinct "
                       f"labels ({', '.join(names[:10])}); set glue.num_labels: {len(names)} or leave it null")
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
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def custom_task(g: GlueConfig, num_labels: int) -> GlueTask:
    metrics = g.metric_names or (("pearson", "spearman") if num_labels == 1 else ("accuracy",))
    if (num_labels == 1) != (set(metrics) <= {"pearson", "spearman"}):  # correlations for a regression, only there
        kind = "regression" if num_labels == 1 else "classification"
        raise UserError(f"glue.metric={','.join(metrics)} does not fit a {kind} task: use pearson/spearman for "
                        "num_labels 1, accuracy/f1/mcc otherwise")
    labels = tuple(str(i) for i in range(num_labels)) if num_labels > 1 else ()
    return GlueTask("custom", f"custom ({Path(g.data_dir).name})", tuple(g.text_columns), labels, metrics)


# -----------------------------------------------------------------------------
# tokenization: [CLS] A [SEP] or [CLS] A [SEP] B [SEP], truncated longest-first

@dataclass
class Encoded:
    ids: np.ndarray  # int32, every example's tokens back to back
    offsets: np.ndarray  # int64 (n + 1,): example i is ids[offsets[i]:offsets[i + 1]]
    labels: np.ndarray

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
    cls, sep = (prepare.special_token_ids(tokenizer)[k] for k in ("cls", "sep"))
    pieces = [[e.ids for e in tokenizer.encode_batch(list(col), add_special_tokens=False)] for col in zip(*split.texts)]
    seqs = []
    for a, *b in zip(*pieces):
        if b:
            la, lb = truncate_pair(len(a), len(b[0]), max_len - 3)
            seqs.append([cls, *a[:la], sep, *b[0][:lb], sep])
        else:
            seqs.append([cls, *a[:max_len - 2], sep])
    offsets = np.cumsum([0] + [len(s) for s in seqs], dtype=np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
    return Encoded(ids, offsets, split.labels)


def make_batch(enc: Encoded, idx, pad_id: int, unpadded: bool) -> dict:
    """The examples idx as model inputs (neobert.batch_sequences: padded, or one (1, N) row) with their labels."""
    idx = np.asarray(idx)
    batch = neobert.batch_sequences([enc.ids[enc.offsets[i]:enc.offsets[i + 1]] for i in idx], pad_id, unpadded)
    if not unpadded:
        batch["attention_mask"] = batch["attention_mask"].bool()  # bool: it selects the real tokens
    batch["labels"] = torch.from_numpy(enc.labels[idx])
    return batch


def epoch_batches(enc: Encoded, batch_size: int, seed: int, epoch: int) -> list:
    """This epoch's batches of example indices, a pure function of (seed, epoch): sorted by length within windows of
    64 batches (little padding), then shuffled. Padded and unpadded runs get the same batches, so the same model."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(enc.labels))
    window = batch_size * 64
    perm = np.concatenate([w[np.argsort(-enc.lengths[w], kind="stable")]
                           for w in np.split(perm, range(window, len(perm), window))])
    batches = [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# -----------------------------------------------------------------------------
# metrics, in numpy (float64). Scores are fractions here and percentages in the report.

def accuracy(pred, label) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def f1_score(pred, label, num_labels: int = 2) -> float:
    """Binary F1 of class 1 (MRPC, QQP); the unweighted mean over classes (macro) when there are more than two."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes = [1] if num_labels <= 2 else range(num_labels)
    return float(np.mean([2.0 * np.sum((pred == c) & (label == c)) / max(np.sum(pred == c) + np.sum(label == c), 1)
                          for c in classes]))


def matthews_corrcoef(pred, label) -> float:
    """Matthews correlation (its multiclass form, Gorodkin 2004); 0 when a marginal is constant."""
    pred, label = np.asarray(pred), np.asarray(label)
    classes, inv = np.unique(np.concatenate([pred, label]), return_inverse=True)
    conf = np.zeros((len(classes), len(classes)), dtype=np.float64)
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
    _, inv, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inv.reshape(-1)]  # a group's last rank minus half its extra


def spearman(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))


METRICS = dict(accuracy=accuracy, f1=f1_score, mcc=matthews_corrcoef, pearson=pearson, spearman=spearman)


# -----------------------------------------------------------------------------
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


@dataclass
class Context:
    """What the runs of one `evaluate.py glue` share, and the encoded data of the task at hand (for a sweep's runs)."""
    rank: int
    world: int
    device: torch.device
    precision: str  # "bf16" or "no"
    amp: object  # its autocast context
    unpadded: bool  # cu_seqlens batches, else length-grouped padded ones
    tokenizer: object = None
    pad_id: int = 0
    encoded: dict = field(default_factory=dict)


def train_batch(model, enc: Encoded, idx, accum: int, unpadded: bool, ctx: Context) -> torch.Tensor:
    """Forward and backward of one batch in `accum` micro-batches, each loss weighted so the gradient is the batch's."""
    loss = torch.zeros((), device=ctx.device)
    for micro in np.array_split(idx, min(accum, len(idx))):
        batch = runtime.to_device(make_batch(enc, micro, ctx.pad_id, unpadded), ctx.device)
        with ctx.amp:
            micro_loss = model(**batch).loss * (len(micro) / len(idx))
        micro_loss.backward()
        loss += micro_loss.detach().float()
    return loss


@torch.no_grad()
def predict(model, enc: Encoded, batch_size: int, pad_id: int, unpadded: bool, device, amp) -> np.ndarray:
    """Predictions in dataset order (class ids, or floats for regression); batches sorted by length."""
    model.eval()
    order = np.argsort(enc.lengths, kind="stable")
    out = np.empty(len(enc.labels), dtype=np.float64)
    for idx in (order[i:i + batch_size] for i in range(0, len(order), batch_size)):
        batch = make_batch(enc, idx, pad_id, unpadded)
        batch.pop("labels")
        with amp:
            logits = model(**runtime.to_device(batch, device)).logits.float()
        pred = logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1)
        out[idx] = pred.cpu().double().numpy()
    model.train()
    return out


def split_metrics(task: GlueTask, preds: dict, val: dict) -> dict:
    """{metric: value} on the validation split(s); MNLI: the accuracy of each (accuracy_matched / _mismatched)."""
    result = {}
    for split, pred in preds.items():
        pred, labels = pred.astype(np.int64) if task.num_labels > 1 else pred, val[split].labels
        if len(task.val_splits) > 1:
            result[f"accuracy_{split.removeprefix('validation_')}"] = accuracy(pred, labels)
        else:
            for m in task.metrics:
                result[m] = f1_score(pred, labels, task.num_labels) if m == "f1" else METRICS[m](pred, labels)
    return result


def constant_score(task: GlueTask, val: dict) -> float:
    """The best score of one answer for all (the majority class; 0 for a correlation): a run at or below it learned
    nothing."""
    return max(glue_task_score(task, split_metrics(task, {s: np.full(len(enc.labels), c, np.float64)
                                                          for s, enc in val.items()}, val))
               for c in range(task.num_labels))


def glue_task_score(task: GlueTask, metrics: dict) -> float:
    return float(np.mean([metrics[m] for m in task.metrics]))


def start_run(cfg, run: GlueRun, task: GlueTask, source, splits: dict, ctx: Context):
    """(model with a classifier head seeded by run.seed, info, tokenizer, train, {val split}, optimizer). The encoded
    splits stay in ctx for the next run of the same task, tokenizer and length (one task at a time in memory)."""
    torch.manual_seed(run.seed)  # the new head's init
    model, info = checkpoint.load(source, head="classifier", num_labels=task.num_labels, new_head_if_mismatch=True,
                                  classifier_dropout=cfg.glue.classifier_dropout,
                                  classifier_init_range=cfg.glue.classifier_init_range)
    tokenizer = info.tokenizer if info.tokenizer is not None else ctx.tokenizer
    key = (task.name, run.max_seq_length)  # a task's runs share one start model, so one tokenizer
    if key not in ctx.encoded:
        enc = {s: encode(tokenizer, sp, run.max_seq_length) for s, sp in splits.items()}
        ctx.encoded = {key: (enc["train"], {s: enc[s] for s in task.val_splits})}
    model.model.gradient_checkpointing = cfg.trainer.gradient_checkpointing
    model.to(ctx.device)
    optimizer = train.build_optimizer(model, cfg.optimizer, ctx.device, lr=run.lr, weight_decay=run.weight_decay)
    return model, info, tokenizer, *ctx.encoded[key], optimizer


def finetune(cfg, run: GlueRun, task: GlueTask, source, splits: dict, ctx: Context, id2label: Optional[dict]) -> dict:
    """Fine-tunes one run and writes its dir (metrics.jsonl, best/, then results.json: finished). Randomness (head init,
    data order, dropout) comes from run.seed only, so any process gives the same run."""
    from tqdm import tqdm
    g, t, out = cfg.glue, cfg.trainer, run_dir(cfg, run)
    out.mkdir(parents=True, exist_ok=True)
    model, info, tokenizer, train_enc, val, optimizer = start_run(cfg, run, task, source, splits, ctx)
    steps_per_epoch = math.ceil(len(train_enc.labels) / run.batch_size)
    total = min(run.num_train_epochs * steps_per_epoch, t.max_steps or math.inf)  # max_steps 0: no cap
    eval_every = t.eval_steps if t.eval_steps > 0 else max(1, min(500, steps_per_epoch // 10))  # the paper's
    sched = dataclasses.replace(cfg.scheduler, warmup_steps=round(g.warmup_ratio * total), decay_steps=None)
    train_model = torch.compile(model, dynamic=True) if t.torch_compile else model
    evaluations, best_state = [], None
    t0, examples = time.perf_counter(), 0
    bar = tqdm(total=total, desc=f"{run.task} {run.name}", disable=t.disable_tqdm, dynamic_ncols=True, leave=False,
               position=ctx.rank)  # under torchrun: one line per process
    with bar, open(out / "metrics.jsonl", "w", buffering=1) as log:  # line-buffered: each record lands whole
        for step in range(total):
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0:
                batches = epoch_batches(train_enc, run.batch_size, run.seed, epoch)
            torch.manual_seed(train.dropout_seed(run.seed, step))
            loss = train_batch(train_model, train_enc, batches[i], t.gradient_accumulation_steps, ctx.unpadded, ctx)
            lr = train.get_lr(step, run.lr, sched, total)
            grad_norm, _ = train.optimizer_step(model, optimizer, lr, t.gradient_clipping, loss)  # skips a bad step
            loss, grad_norm = loss.item(), grad_norm.item()
            train.check_finite(loss, grad_norm, f"at step {step + 1} of {run.task} {run.name}; lower the lr or set "
                               "trainer.gradient_clipping")
            examples += len(batches[i])
            bar.update(1)
            done, last = step + 1, step + 1 == total
            if done % t.logging_steps == 0 or last:
                elapsed = time.perf_counter() - t0
                print(json.dumps(dict(step=done, epoch=done / steps_per_epoch, loss=loss, lr=lr, grad_norm=grad_norm,
                                      examples_per_s=examples / elapsed, elapsed=elapsed)), file=log)
            if done % eval_every == 0 or last:
                metrics = split_metrics(task, {s: predict(model, enc, t.per_device_eval_batch_size, ctx.pad_id,
                                                          ctx.unpadded, ctx.device, ctx.amp) for s, enc in val.items()},
                                        val)
                record = dict(step=done, epoch=done / steps_per_epoch, score=glue_task_score(task, metrics), **metrics)
                evaluations.append(record)
                best = max(evaluations, key=lambda r: r["score"])  # the first of equal scores
                if best is record:  # keep the best weights, on the CPU
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                print(json.dumps({**{f"eval_{k}": v for k, v in record.items() if k != "step"}, "step": done}),
                      file=log)
                bar.set_postfix(score=f"{100 * record['score']:.2f}", best=f"{100 * best['score']:.2f}", refresh=False)
                if t.early_stopping and len(evaluations) - 1 - evaluations.index(best) >= t.early_stopping:
                    break  # early: done < total
    # best/ (export.py's input): the start checkpoint's config.yaml sections (the model card's), glue: and classifier:
    model.load_state_dict(best_state)
    plain = config.config_to_dict(cfg)
    full = dict(info.full_config) if (info.path / "config.yaml").is_file() else {}
    full.update(model=dataclasses.asdict(model.config),
                glue={**plain["glue"], "task_name": task.name, "run": dataclasses.asdict(run)},
                classifier=dict(num_labels=task.num_labels, id2label=id2label,
                                classifier_dropout=g.classifier_dropout, classifier_init_range=g.classifier_init_range))
    checkpoint.save_model_dir(out / "best", model, full, tokenizer)
    results = dict(task=run.task, run=run.name, setting=dataclasses.asdict(run), config=plain, source=str(source),
                   process=ctx.rank, model_path=str(info.path), fingerprint=run_fingerprint(cfg, run, source),
                   steps=done, total_steps=total, steps_per_epoch=steps_per_epoch, eval_every=eval_every,
                   stopped_early=done < total, evaluations=evaluations, best=best,
                   constant_score=constant_score(task, val),
                   wall_time_s=time.perf_counter() - t0, device=str(ctx.device), train_examples=len(train_enc.labels),
                   id2label=id2label, precision=ctx.precision, batching="unpadded" if ctx.unpadded else "padded")
    runtime.write_atomic(out / "results.json", json.dumps(results, indent=1))  # last: the run counts as finished now
    return results


def run_fingerprint(cfg, run: GlueRun, source) -> dict:
    """What decides a run's result beyond its name: a finished run with another fingerprint is not reused."""
    g, t = cfg.glue, cfg.trainer
    return dict(source=str(source), data_dir=g.data_dir, max_steps=t.max_steps, eval_steps=t.eval_steps,
                early_stopping=t.early_stopping, warmup_ratio=g.warmup_ratio, epochs=run.num_train_epochs,
                max_seq_length=run.max_seq_length, classifier_dropout=g.classifier_dropout,
                gradient_clipping=t.gradient_clipping, text_columns=list(g.text_columns), label_column=g.label_column,
                metric=g.metric, num_labels=g.num_labels,
                **({"optimizer": "muon", "muon_momentum": cfg.optimizer.muon_momentum}  # adamw runs keep their prints
                   if cfg.optimizer.name == "muon" else {}))


def bench_glue(cfg, run: GlueRun, task: GlueTask, source, splits: dict, ctx: Context) -> dict:
    """Fine-tuning examples/s with padded and with unpadded batches: the same model, data and steps."""
    device, steps, warmup = ctx.device, cfg.glue.bench_steps, 3
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    model, _, _, train_enc, _, optimizer = start_run(cfg, run, task, source, splits, ctx)
    plan = epoch_batches(train_enc, run.batch_size, run.seed, 0)[:steps + warmup]  # the same batches both ways
    timed = plan[warmup:]
    n, tokens, results = sum(map(len, timed)), int(sum(train_enc.lengths[idx].sum() for idx in timed)), {}
    slots = dict(padded=int(sum(len(idx) * train_enc.lengths[idx].max() for idx in timed)), unpadded=tokens)
    for mode in slots:  # token slots fed: padding included
        for i, idx in enumerate(plan):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            loss = train_batch(model, train_enc, idx, 1, mode == "unpadded", ctx)
            train.optimizer_step(model, optimizer, run.lr, cfg.trainer.gradient_clipping, loss)
        sync()
        elapsed = time.perf_counter() - t0
        results[mode] = dict(examples_per_s=n / elapsed, tokens_per_s=tokens / elapsed,
                             padding=1 - tokens / max(slots[mode], 1), steps=len(timed))
    ratio = results["unpadded"]["examples_per_s"] / results["padded"]["examples_per_s"]
    print(f"glue bench: {task.name}, batch {run.batch_size}, max_seq_length {run.max_seq_length}, {steps} steps, "
          f"{device}, precision {ctx.precision}")
    print(f"{'batching':<10} {'examples/s':>11} {'real tokens/s':>14} {'padding':>8}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['examples_per_s']:>11.1f} {r['tokens_per_s']:>14.0f} {100 * r['padding']:>7.1f}%")
    print(f"speed-up of unpadded over padded: {ratio:.2f}x")
    return dict(task=task.name, device=str(device), precision=ctx.precision, ratio=ratio, **results)


# -----------------------------------------------------------------------------
# the sweep: which tasks, each run's setting (the grid), which runs are finished, where transfer starts

def parse_tasks(name: str) -> list[str]:
    names = list(dict.fromkeys(n.strip().lower().replace("-", "") for n in name.split(",") if n.strip()))
    if names == ["all"]:
        return list(PAPER_EIGHT)
    bad = [n for n in names if n not in GLUE_TASKS and n != "custom"]
    if bad or not names:
        raise UserError(f"glue.task_name={name!r}: unknown task {bad[0] if bad else ''!r}; choose from "
                        f"{', '.join([*GLUE_TASKS, 'all', 'custom'])} (or a comma list)")
    if "custom" in names and len(names) > 1:
        raise UserError("glue.task_name=custom runs alone (its data and labels come from glue.data_dir)")
    return sorted(names, key=lambda n: n != "mnli")  # transfer tasks start from MNLI's best model: it runs first


def plan_runs(cfg, tasks: list, cli: set) -> list[GlueRun]:
    """Every run, in order. A setting comes from (lowest first): trainer/optimizer sections, glue.tasks.<task>,
    the same keys given on the command line (--optimizer.lr ...), then glue.sweep lists (the grid)."""
    g, t, o = cfg.glue, cfg.trainer, cfg.optimizer
    base = {"batch_size": ("trainer.per_device_train_batch_size", t.per_device_train_batch_size),
            "lr": ("optimizer.lr", o.lr), "weight_decay": ("optimizer.weight_decay", o.weight_decay),
            "num_train_epochs": ("trainer.num_train_epochs", t.num_train_epochs),
            "max_seq_length": ("glue.max_seq_length", g.max_seq_length), "seed": ("trainer.seed", t.seed)}
    runs = []
    for name in tasks:
        block = dataclasses.asdict(g.tasks.get(name, TaskSettings()))
        s = {k: value if block.get(k) is None or key in cli else block[k] for k, (key, value) in base.items()}
        grid = [getattr(g.sweep, k) or [s[k]] for k in ("batch_size", "lr", "weight_decay", "seed")]
        for bs, lr, wd, seed in itertools.product(*grid):
            run = GlueRun(name, bs, lr, wd, seed, s["num_train_epochs"], s["max_seq_length"])
            config.require(bs >= 1 and lr > 0 and wd >= 0 and run.max_seq_length >= 8, f"{name}: batch_size {bs}, "
                           f"lr {lr}, weight_decay {wd}, max_seq_length {run.max_seq_length}: need batch_size >= 1, "
                           "lr > 0, weight_decay >= 0, max_seq_length >= 8")
            runs.append(run)
    return runs


def _finished(cfg, run: GlueRun, source) -> bool:
    res = read_results(run_dir(cfg, run))
    if res is None:
        return False
    want, had = run_fingerprint(cfg, run, source), res.get("fingerprint", {})
    diff = [k for k in want if had.get(k) != want[k]]
    if diff == ["source"] and run.task in TRANSFER_TASKS and cfg.glue.transfer_from_task:
        config.warn(f"{run_dir(cfg, run)}: the best MNLI model is now {source}; running it again from there")
        return False
    if diff:
        raise UserError(f"{run_dir(cfg, run)} holds a finished run made with another {diff[0]} ({had.get(diff[0])!r}, "
                        f"now {want[diff[0]]!r}); choose another trainer.output_dir, or delete that run to redo it")
    return True


def _best_mnli(cfg) -> Optional[Path]:
    """The best/ checkpoint of the highest-scoring finished MNLI run under output_dir (the transfer source)."""
    root = Path(cfg.trainer.output_dir) / "glue" / "mnli"
    found = [(r["best"]["score"], r["run"]) for r in (read_results(d) for d in sorted(root.glob("*/"))) if r]
    return root / max(found)[1] / "best" if found else None


# -----------------------------------------------------------------------------
# report: per task the best setting over the sweep, the GLUE score, beside the paper's numbers

def summarize_glue(cfg, runs: list, tasks: dict) -> dict:
    """Per task: the best setting (mean score over seeds), its mean ± std per metric, the paper's number."""
    table = {}
    for name, task in tasks.items():
        by_setting, keys = {}, ("batch_size", "lr", "weight_decay")
        for r in filter(None, (read_results(run_dir(cfg, run)) for run in runs if run.task == name)):
            by_setting.setdefault(tuple(r["setting"][k] for k in keys), []).append(r)
        if not by_setting:
            continue
        setting, chosen = max(by_setting.items(), key=lambda kv: np.mean([r["best"]["score"] for r in kv[1]]))
        score = _mean_std([r["best"]["score"] for r in chosen])
        table[name] = dict(title=task.title, metrics={m: _mean_std([r["best"][m] for r in chosen])
                                                      for m in task.metrics}, score=score["mean"],
                           score_std=score["std"], setting=dict(zip(keys, setting)),
                           seeds=sorted(r["setting"]["seed"] for r in chosen), runs=sum(map(len, by_setting.values())),
                           best_run=max(chosen, key=lambda r: r["best"]["score"])["run"], paper=task.paper,
                           at_chance=all(map(at_chance, chosen)))
    scored = [table[n]["score"] for n in PAPER_EIGHT if n in table]
    glue_score = float(np.mean(scored)) if len(scored) == len(PAPER_EIGHT) else None
    return dict(model=cfg.glue.init_from, split="validation", tasks=table, glue_score=glue_score,
                glue_tasks_done=len(scored), paper_glue_score=PAPER_GLUE_SCORE)


def at_chance(res: dict) -> bool:
    """Whether a run's best score is at or below its constant_score (results.json of older runs have none)."""
    return res.get("constant_score") is not None and res["best"]["score"] <= res["constant_score"] + 1e-9


def _mean_std(values) -> dict:
    """The mean and the sample std (0 for one value) over the seeds."""
    v = np.array(values, dtype=np.float64)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0)


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
        chance = " (at chance)" if row.get("at_chance") else ""
        lines.append(f"| {row['title']} | {metrics} | {100 * row['score']:.1f} ± {100 * row['score_std']:.1f}"
                     f"{chance} | {paper} | {s['batch_size']} / {s['lr']:g} / {s['weight_decay']:g} | "
                     f"{','.join(map(str, row['seeds']))} | {row['runs']} |")
    score = summary["glue_score"]
    if summary["glue_tasks_done"]:  # not for a custom task alone
        ours = f"{100 * score:.1f}" if score is not None else f"n/a ({summary['glue_tasks_done']} of 8 tasks)"
        lines.append(f"| **GLUE score** (mean of the 8) | | **{ours}** | {summary['paper_glue_score']:.1f} | | | |")
    if any(row.get("at_chance") for row in summary["tasks"].values()):
        lines += ["", "(at chance): no better than one answer for all; raise optimizer.lr or glue.tasks.<task>.lr, "
                  "or trainer.early_stopping (docs/glue.md, learning rate)"]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# entry point: processes, the model to start from, every task's data, then the runs phase by phase

def start_model(cfg, runs: list, ctx: Context):
    """The model every run starts from, checked before any work, its tokenizer into ctx. No init_from: a random model.*
    saved once, so every run starts from the same weights through the same loading code."""
    source = cfg.glue.init_from
    if source is None:
        source = Path(cfg.trainer.output_dir) / "glue" / "random_init"
        if not (source / "model.safetensors").is_file() and ctx.rank == 0:
            torch.manual_seed(cfg.trainer.seed)
            tokenizer = prepare.load_tokenizer(cfg.tokenizer)
            prepare.check_vocab(tokenizer, cfg.model.vocab_size)
            checkpoint.save_model_dir(source, neobert.NeoBERTLMHead(cfg.model),
                                      {"model": dataclasses.asdict(cfg.model)}, tokenizer)
        if ctx.world > 1:
            dist.barrier()
    try:
        _, info = checkpoint.load(source, head="encoder")
    except UserError as e:  # the key that chose it, and the runs it could name instead
        found = [str(d) for d in sorted(Path("runs").glob("*/")) if checkpoint.list_checkpoints(d)]
        raise UserError(f"glue.init_from={source}: {e}" + (f"; runs with a checkpoint here: {', '.join(found)}"
                                                             if found else "")) from None
    ctx.tokenizer = info.tokenizer if info.tokenizer is not None else prepare.load_tokenizer(cfg.tokenizer)
    prepare.check_vocab(ctx.tokenizer, info.model_config.vocab_size)
    ctx.pad_id = prepare.special_token_ids(ctx.tokenizer)["pad"]
    positions = info.model_config.max_position_embeddings
    for run in (r for r in runs if r.max_seq_length > positions):
        raise UserError(f"{run.task}: max_seq_length={run.max_seq_length} exceeds the model's "
                        f"max_position_embeddings={positions}; lower glue.max_seq_length (or "
                        "glue.tasks.<task>.max_seq_length)")
    return source


def load_tasks(names: list, g: GlueConfig, rank: int, world: int) -> tuple[dict, dict, dict]:
    """({name: GlueTask}, {name: {split: Split}}, {name: id2label}), read and checked before any fine-tuning. Under
    torchrun rank 0 reads (and downloads) first; the others then read its cache."""
    tasks, splits, id2labels = {}, {}, {}
    if rank > 0:
        dist.barrier()
    for name in names:
        if name == "custom":
            splits[name], num_labels, id2labels[name] = load_custom_task(g)
            tasks[name] = custom_task(g, num_labels)
        else:
            task = tasks[name] = GLUE_TASKS[name]
            splits[name] = load_glue_task(task, g)
            id2labels[name] = dict(enumerate(task.labels)) if task.labels else None
        if rank == 0:
            sizes = ", ".join(f"{split} {len(sp.texts)}" for split, sp in splits[name].items())
            print(f"{name}: {sizes} examples ({Path(splits[name]['train'].source).parent})", flush=True)
    if rank == 0 and world > 1:
        dist.barrier()
    return tasks, splits, id2labels


def run_phase(cfg, phase: list, start, tasks: dict, splits: dict, id2labels: dict, ctx: Context) -> None:
    """The runs of a phase that are not finished (rank 0 decides), dealt round-robin to the processes."""
    todo = [None]
    if ctx.rank == 0:
        todo = [[i for i, run in enumerate(phase) if not _finished(cfg, run, start)]]
        if done := len(phase) - len(todo[0]):
            print(f"skipping {done} finished run{'s' if done > 1 else ''} (their results.json exist)")
    if ctx.world > 1:
        dist.broadcast_object_list(todo, src=0)  # rank 0's list of runs to do, to every process
    for i in todo[0][ctx.rank::ctx.world]:
        run = phase[i]
        res = finetune(cfg, run, tasks[run.task], start, splits[run.task], ctx, id2labels[run.task])
        print(f"{f'[rank {ctx.rank}] ' if ctx.world > 1 else ''}{run.task} {run.name}: best "
              f"{100 * res['best']['score']:.2f} at step {res['best']['step']} ({res['steps']} steps, "
              f"{res['wall_time_s']:.0f}s)", flush=True)
        if at_chance(res):
            config.warn(f"{run_dir(cfg, run)} learned nothing: its best score {100 * res['best']['score']:.2f} is no "
                        f"better than one answer for all ({100 * res['constant_score']:.2f}); raise optimizer.lr or "
                        f"glue.tasks.{run.task}.lr (a small model: about 1e-3) or trainer.early_stopping (0: off)")
    if ctx.world > 1:
        dist.barrier()


def glue(cfg, cli: set, bench: bool = False) -> Optional[dict]:
    g, t = cfg.glue, cfg.trainer
    names = parse_tasks(g.task_name)
    runs = plan_runs(cfg, names, cli)
    # under torchrun each process fine-tunes its own runs; a gloo group (runs take hours) carries barriers and to-dos
    rank, world, device = runtime.setup_distributed("gloo", timeout=datetime.timedelta(days=7))
    precision = runtime.resolve_precision(t.mixed_precision, device, warn=config.warn if rank == 0 else None)
    ctx = Context(rank, world, device, precision, runtime.autocast(device, precision),
                  unpadded=g.batching == "unpadded" or (g.batching == "auto" and device.type == "cuda"))
    if t.output_dir == "auto":
        t.output_dir = str(checkpoint.home(g.init_from) if g.init_from else Path("runs/glue_random_init"))
    source = start_model(cfg, runs, ctx)
    auto = cfg.optimizer.name == "auto"  # the optimizer the start model was trained with (train.optimizer_name)
    cfg.optimizer.name = train.optimizer_name(cfg.optimizer, source)
    tasks, splits, id2labels = load_tasks(names, g, rank, world)
    if bench:
        return bench_glue(cfg, runs[0], tasks[runs[0].task], source, splits[runs[0].task], ctx)
    # phase 1: everything that does not start from MNLI; phase 2: the transfer tasks, from MNLI's best model
    moved = [r for r in runs if g.transfer_from_task and r.task in TRANSFER_TASKS]
    if moved and "mnli" not in names and _best_mnli(cfg) is None:
        raise UserError(f"glue.transfer_from_task starts {', '.join(sorted({r.task for r in moved}))} from "
                        f"the best MNLI model, and {Path(t.output_dir) / 'glue' / 'mnli'} holds no finished "
                        "MNLI run: add mnli to glue.task_name (all includes it) or run it first")
    if rank == 0:
        print(f"glue: {len(runs)} run{'s' if len(runs) > 1 else ''} of {', '.join(names)} over {world} "
              f"process{'es' if world > 1 else ''} ({device}, {'bf16 autocast' if precision == 'bf16' else 'fp32'},"
              f" {'unpadded' if ctx.unpadded else 'length-grouped padded'} batches, optimizer "
              f"{cfg.optimizer.name}{' (optimizer.name auto: as the start model was trained)' if auto else ''}) -> "
              f"{Path(t.output_dir) / 'glue'}", flush=True)
    run_phase(cfg, [r for r in runs if r not in moved], source, tasks, splits, id2labels, ctx)
    if moved:
        start = _best_mnli(cfg)
        if rank == 0:
            print(f"transfer: {', '.join(sorted({r.task for r in moved}))} start from {start}")
        run_phase(cfg, moved, start, tasks, splits, id2labels, ctx)
    if rank > 0:
        return None
    summary, out = summarize_glue(cfg, runs, tasks), Path(t.output_dir) / "glue"  # every run wrote in it
    runtime.write_atomic(out / "results.json", json.dumps(summary, indent=1))
    markdown = results_markdown(summary)
    runtime.write_atomic(out / "results.md", markdown)
    print(markdown, end="")
    print(f"written: {out / 'results.md'}, {out / 'results.json'}")
    return summary


GLUE_USAGE = """usage: python evaluate.py glue [CONFIG] [--bench] [--section.key value ...]  (CONFIG: configs/glue.yaml)
  --glue.task_name cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte|wnli|all|custom (or a comma list)
  --glue.init_from RUN_DIR|CHECKPOINT_DIR|HF_FOLDER|HUB_ID   --glue.tasks.<task>.<key> v   --glue.sweep.<key> v1,v2
  --bench: fine-tuning examples/s, padded vs unpadded batches, on the first task
  results: <trainer.output_dir>/glue/results.md, results.json; one folder per run under glue/<task>/"""


def glue_main(argv) -> int:
    bench = "--bench" in argv
    argv = [a for a in argv if a != "--bench"]
    if argv[:1] not in (["-h"], ["--help"]) and (not argv or argv[0].startswith("--") or "=" in argv[0]):
        argv.insert(0, str(Path(__file__).resolve().parent / "configs" / "glue.yaml"))  # no CONFIG: the default one
    try:
        return runtime.run_main(argv, GLUE_USAGE, lambda args: glue(*load_glue_config(args), bench=bench))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


USAGE = __doc__[:__doc__.index("\n\nEvaluate NeoBERT")]  # the command lines that open this docstring


def main(argv=None) -> int:
    """python evaluate.py glue|mteb ...; anything else: the usage (run_main's rules: -h prints it and exits 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["glue"], ["mteb"]):
        return glue_main(argv[1:]) if argv[0] == "glue" else mteb_eval.main(argv[1:])
    return runtime.run_main(argv if argv[:1] in (["-h"], ["--help"]) else [], USAGE, None)


if __name__ == "__main__":
    sys.exit(main())
