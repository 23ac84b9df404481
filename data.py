"""
Data for NeoBERT pretraining: corpus -> tokenizer -> memory-mapped token shards -> packed MLM batches.

    python data.py CONFIG [--section.key value ...]     # prepare dataset.path (tokenizer.json, shards, manifest)

Reading order of this file:
  1. errors and the config sections (TokenizerConfig, DatasetConfig, DataCollatorConfig)
  2. tokenizer: load from a file / the hub, or train a BERT-style WordPiece vocabulary
  3. sources: local .txt/.jsonl/.parquet, hub parquet files, the embedded stdlib-docstring corpus
  4. shards: on-disk format, writer, validated memory-mapped reader
  5. prepare(): corpus -> tokenizer.json + train/ + val/ + manifest.json (idempotent, crash-safe)
  6. MLM masking and collation (packed and padded)
  7. MLMLoader (from shards) and StreamingMLMLoader (tokenize on the fly), both exactly resumable
  8. pairs for contrastive fine-tuning: ContrastiveConfig, prepare_pairs, PairLoader (one source per step)
  9. build_loader / bench_loader / prepare_only (the prepare command; its command line is train.py's)

Determinism contract. A step's global batch (all rows of all ranks and micro-steps) is a function of
(seed, epoch, row position) only; rank r takes rows [r*B_r, (r+1)*B_r) of it and micro-step m the m-th
micro_batch_size slice of those. Masks come from a generator seeded by (seed, epoch, row index) (streaming:
(seed, row number)), never the rank.
So 1 rank x batch 8, 1 rank x 4 x 2 accumulation and 2 ranks x 4 see the same rows with the same masks.
"""

import ast
import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import signal
import struct
import sys
import sysconfig
import threading
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from glob import glob, has_magic
from itertools import islice
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config value, corrupt file). Scripts print `error: msg`, exit 2."""


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def require(ok, msg):
    """How a config section checks its own values: a UserError with msg unless ok."""
    if not ok:
        raise UserError(msg)


# -----------------------------------------------------------------------------
# config sections (train.py composes them into the full config and parses YAML/overrides over them); each checks its
# own values when built, written `ok` first so that a NaN fails too

@dataclass
class TokenizerConfig:
    name: str = "bert-base-uncased"     # hub repo holding a tokenizer.json (used when path is unset and train is false)
    path: Optional[str] = None          # a local tokenizer.json
    train: bool = False                 # train a BERT-style WordPiece vocabulary on the corpus's train split
    vocab_size: int = 30522             # target vocabulary size when training
    min_frequency: int = 2              # when training: minimum count of a merged piece
    lowercase: bool = True              # when training: BERT uncased normalisation

    def __post_init__(self):
        require(self.vocab_size >= 1 and self.min_frequency >= 1,
                f"tokenizer.vocab_size and tokenizer.min_frequency must be >= 1, got {self.vocab_size}, "
                f"{self.min_frequency}")


@dataclass
class DatasetConfig:
    name: str = "stdlib"                # stdlib | stdlib+packages | hub dataset repo id (unused when data_files set)
    config: Optional[str] = None        # hub dataset config (subset), e.g. "20231101.en"
    train_split: str = "train"          # hub split to read
    data_files: list[str] = field(default_factory=list)  # local files, globs or directories (.txt .jsonl .parquet)
    text_column: str = "text"           # column of .jsonl/.parquet records holding the text
    path: Optional[str] = None          # prepared dir; default data_cache/<name>
    streaming: bool = False             # tokenize on the fly instead of reading prepared shards
    max_seq_length: int = 1024          # tokens per row
    shuffle_buffer_size: int = 10000    # streaming: documents shuffled together (a window of the reading order)
    num_workers: int = 0                # tokenizer processes; 0 = all cores
    pre_tokenize: bool = True           # train.py prepares the shards itself when they are missing
    validation_split: float = 0.01      # fraction of documents held out (chosen by a hash of their position)
    eval_samples: int = 0               # if > 0: hold out the first eval_samples documents instead
    max_documents: int = 0              # read at most this many documents (0 = all)

    def __post_init__(self):
        require(self.max_seq_length >= 8, f"dataset.max_seq_length must be >= 8, got {self.max_seq_length}")
        require(0 <= self.validation_split < 1,
                f"dataset.validation_split must be in [0, 1), got {self.validation_split}")
        require(self.eval_samples >= 0, f"dataset.eval_samples must be >= 0, got {self.eval_samples}")
        require(self.max_documents >= 0, f"dataset.max_documents must be >= 0 (0 = all), got {self.max_documents}")
        require(self.num_workers >= 0, f"dataset.num_workers must be >= 0 (0 = all cores), got {self.num_workers}")
        require(self.shuffle_buffer_size >= 1,
                f"dataset.shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")


@dataclass
class DataCollatorConfig:
    mlm_probability: float = 0.20       # fraction of (non-special) tokens selected for prediction
    mask_all: bool = True               # every selected token becomes [MASK] (NeoBERT); false: 80/10/10
    pad_to_multiple_of: int = 8         # padded mode: pad each batch's length up to a multiple of this
    pack_sequences: bool = True         # packed rows with cu_seqlens (true) or one document per padded row

    def __post_init__(self):
        require(0 < self.mlm_probability < 1,
                f"datacollator.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        require(self.pad_to_multiple_of >= 1,
                f"datacollator.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")


def dataset_dir(ds):
    """The prepared directory: dataset.path, or data_cache/<name> (data_cache/local for data_files)."""
    if ds.path:
        return Path(ds.path)
    name = "local" if ds.data_files else ds.name + (f"-{ds.config}" if ds.config else "")
    return Path("data_cache") / "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def _num_workers(n):
    if n > 0:
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# -----------------------------------------------------------------------------
# tokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer_from_spec(tok_cfg):
    """The tokenizer named by tokenizer.path or tokenizer.name (not a trained one)."""
    if tok_cfg.path:
        path = Path(tok_cfg.path)
        if not path.is_file():
            raise UserError(f"tokenizer.path {str(path)!r} does not exist")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"tokenizer.path {str(path)!r} is not a tokenizers tokenizer.json ({e})") from None
    import huggingface_hub
    try:
        path = huggingface_hub.hf_hub_download(tok_cfg.name, "tokenizer.json")
    except Exception as e:
        raise UserError(f"could not get tokenizer.json of {tok_cfg.name!r} from the Hugging Face Hub "
                        f"({type(e).__name__}); set tokenizer.path to a local tokenizer.json "
                        f"or tokenizer.train: true") from None
    return Tokenizer.from_file(str(path))


def train_tokenizer(texts, vocab_size, min_frequency=2, lowercase=True):
    """A BERT-style WordPiece tokenizer trained on an iterable of strings (streamed, not held in RAM).
    Note: the tokenizers trainer breaks count ties in hash order, so two trainings may differ in a few rare
    pieces; prepare() trains once and saves tokenizer.json, and everything after that is deterministic."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def load_tokenizer(tok_cfg, data_dir=None):
    """The tokenizer to use. With data_dir (a prepared dataset.path) it is the tokenizer.json the data was made
    with; otherwise tokenizer.path, or tokenizer.name from the hub."""
    if data_dir is not None and (Path(data_dir) / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json"))
    if tok_cfg.train:
        raise UserError("tokenizer.train is true but no trained tokenizer.json exists yet in "
                        f"{str(data_dir)!r}: run python data.py CONFIG first")
    return _tokenizer_from_spec(tok_cfg)


def special_token_ids(tokenizer):
    """dict(pad, cls, sep, mask, unk) -> ids; an error names the missing BERT special tokens."""
    names = dict(pad="[PAD]", cls="[CLS]", sep="[SEP]", mask="[MASK]", unk="[UNK]")
    ids = {k: tokenizer.token_to_id(v) for k, v in names.items()}
    missing = [names[k] for k, v in ids.items() if v is None]
    if missing:
        raise UserError(f"the tokenizer lacks the special tokens {missing}; a BERT-style tokenizer is needed")
    return ids


def check_vocab(tokenizer, model_vocab_size):
    """The model's vocab_size may exceed the tokenizer's (rounded up for speed), never be smaller."""
    n = tokenizer if isinstance(tokenizer, int) else tokenizer.get_vocab_size(with_added_tokens=True)
    if model_vocab_size < n:
        raise UserError(f"model.vocab_size {model_vocab_size} is smaller than the tokenizer's vocabulary of {n} "
                        f"tokens; set model.vocab_size >= {n} (e.g. {-(-n // 64) * 64})")


def _all_special_ids(tokenizer):
    ids = set(special_token_ids(tokenizer).values())
    for tid, added in tokenizer.get_added_tokens_decoder().items():
        if added.special:
            ids.add(tid)
    return sorted(ids)


# -----------------------------------------------------------------------------
# sources: a list of files read one by one; each yields its documents in a fixed order.
# A document's position is (file index, row index within the file); rows are counted before dropping empties.

@dataclass
class ReadStats:
    bad_bytes: int = 0          # undecodable bytes skipped
    bad_lines: int = 0          # lines that held undecodable bytes
    bad_records: int = 0        # .jsonl lines that are not a JSON object, or a non-string text
    skipped_files: int = 0      # .py files that do not parse
    empty_documents: int = 0


@dataclass
class SourceFile:
    name: str                   # shown in messages
    kind: str                   # txt | jsonl | parquet | py
    local: Optional[str] = None  # local path, or None for a hub file fetched on first read
    repo: Optional[str] = None
    revision: Optional[str] = None

    def fetch(self):
        if self.local is None:
            import huggingface_hub
            try:
                self.local = huggingface_hub.hf_hub_download(self.repo, self.name, repo_type="dataset",
                                                             revision=self.revision)
            except Exception as e:
                raise UserError(f"could not download {self.name} of dataset {self.repo!r} ({type(e).__name__}: {e})")
        return self.local


KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _py_files(root, skip):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


def _local_files(patterns, kinds=KINDS, key="dataset.data_files", label=".txt, .jsonl or .parquet"):
    files, seen = [], set()
    for pat in patterns:
        if has_magic(pat):
            matched = sorted(glob(pat, recursive=True))
            if not matched:
                raise UserError(f"{key} pattern {pat!r} matches no files")
        elif os.path.isdir(pat):
            matched = sorted(str(p) for p in Path(pat).rglob("*") if p.suffix in kinds and p.is_file())
            if not matched:
                raise UserError(f"{key} directory {pat!r} holds no {label} files")
        elif os.path.exists(pat):
            matched = [pat]
        else:
            raise UserError(f"{key}: no such file {pat!r}")
        for m in matched:
            if os.path.isdir(m) or m in seen:
                continue
            kind = kinds.get(Path(m).suffix)
            if kind is None:
                raise UserError(f"{key}: {m!r} is not {label}")
            seen.add(m)
            files.append(SourceFile(m, kind, local=m))
    return files


def _match_hub_parquet(files, config, split):
    files = [f for f in files if f.endswith(".parquet")]
    if config:
        files = [f for f in files if f.split("/")[0] == config or f.startswith(f"data/{config}/")]
    elif any(f.startswith("data/") for f in files):
        files = [f for f in files if f.startswith("data/")]
    elif any(f.startswith("default/") for f in files):
        files = [f for f in files if f.startswith("default/")]

    def is_split(f):
        parts = f.split("/")
        base = parts[-1]
        return base.startswith(f"{split}-") or base == f"{split}.parquet" or split in parts[1:-1]
    return sorted(f for f in files if is_split(f))


def _hub_files(ds, hint="check dataset.name, or use dataset.data_files for local files"):
    import huggingface_hub
    api = huggingface_hub.HfApi()
    listed = []
    for revision in (None, "refs/convert/parquet"):
        try:
            files = api.list_repo_files(ds.name, repo_type="dataset", revision=revision)
        except Exception as e:
            if revision is None:
                raise UserError(f"cannot list dataset {ds.name!r} on the Hugging Face Hub ({type(e).__name__}); "
                                f"{hint}") from None
            continue
        listed += [f for f in files if f.endswith(".parquet")]
        matched = _match_hub_parquet(files, ds.config, ds.train_split)
        if matched:
            return [SourceFile(f, "parquet", repo=ds.name, revision=revision) for f in matched]
    raise UserError(f"dataset {ds.name!r} has no parquet files for config {ds.config!r} split {ds.train_split!r}; "
                    f"its parquet files: {sorted(set(listed))[:10] or 'none'}")


def source_files(ds):
    """The corpus's files in reading order (sorted; deterministic)."""
    if ds.data_files:
        return _local_files(ds.data_files)
    if ds.name in ("stdlib", "stdlib+packages"):
        root = sysconfig.get_paths()["stdlib"]
        files = _py_files(root, _SKIP_DIRS)
        if ds.name == "stdlib+packages":
            for sp in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
                files += _py_files(sp, _SKIP_DIRS - {"site-packages", "dist-packages"})
        return [SourceFile(f, "py", local=f) for f in files]
    return _hub_files(ds)


def _decode(raw, stats):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        s = raw.decode("utf-8", errors="ignore")
        stats.bad_bytes += len(raw) - len(s.encode("utf-8"))
        stats.bad_lines += 1
        return s


@lru_cache(maxsize=None)
def _py_docstrings(path):
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return tuple(docs)


JSONL_PROBE = 1000      # .jsonl: this many leading records without dataset.text_column make it an error


def _no_text_column(sf, ds, columns, lacking):
    raise UserError(f"{sf.name}: no column {ds.text_column!r} in any of its first {lacking} records; their "
                    f"columns: {sorted(columns)} (set dataset.text_column)")


def _jsonl_records(sf, stats, skip=0):
    """(line index, record) of the JSON-object lines of a .jsonl file from line `skip` on; other lines are counted."""
    with open(sf.fetch(), "rb") as f:
        for row, raw in enumerate(f):
            if row < skip or not raw.strip():
                continue
            try:
                rec = json.loads(_decode(raw, stats))
            except json.JSONDecodeError:
                stats.bad_records += 1
                continue
            if not isinstance(rec, dict):
                stats.bad_records += 1
                continue
            yield row, rec


def _read_rows(sf, ds, stats, skip=0):
    """(row index, text) of one file from row `skip` on. .txt: documents are separated by blank lines."""
    if sf.kind == "py":
        docs = _py_docstrings(sf.local)
        if docs is None:
            stats.skipped_files += 1
            return
        yield from enumerate(docs[skip:], start=skip) if skip else enumerate(docs)
    elif sf.kind == "txt":
        row, lines = 0, []
        with open(sf.fetch(), "rb") as f:
            for raw in f:
                line = _decode(raw, stats)
                if line.strip():
                    lines.append(line)
                elif lines:
                    if row >= skip:
                        yield row, "".join(lines).strip()
                    row, lines = row + 1, []
        if lines and row >= skip:
            yield row, "".join(lines).strip()
    elif sf.kind == "jsonl":
        # a record without the column is skipped and counted (real corpora have a few); a file in which none of
        # the first JSONL_PROBE records has it (a wrong dataset.text_column) is an error listing the columns
        seen, lacking, columns = False, 0, set()
        for row, rec in _jsonl_records(sf, stats, skip):
            if ds.text_column not in rec:
                lacking += 1
                columns.update(rec)
                if not seen and lacking >= JSONL_PROBE:
                    _no_text_column(sf, ds, columns, lacking)
                stats.bad_records += 1
                continue
            seen = True
            text = rec[ds.text_column]
            if text is not None and not isinstance(text, str):
                stats.bad_records += 1
                continue
            yield row, text or ""
        if lacking and not seen:
            _no_text_column(sf, ds, columns, lacking)
    elif sf.kind == "parquet":
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(sf.fetch())
        except Exception as e:
            raise UserError(f"{sf.name} is not a readable parquet file ({e})") from None
        import pyarrow as pa
        names = pf.schema_arrow.names
        if ds.text_column not in names:
            raise UserError(f"{sf.name} has no column {ds.text_column!r}; its columns: {names} "
                            f"(set dataset.text_column)")
        textual = [f.name for f in pf.schema_arrow if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                   or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_null(f.type)]
        if ds.text_column not in textual:
            raise UserError(f"{sf.name}: column {ds.text_column!r} holds {pf.schema_arrow.field(ds.text_column).type}, "
                            f"not text; its text columns: {textual} (set dataset.text_column)")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[ds.text_column]):
            n = batch.num_rows
            if row + n <= skip:
                row += n
                continue
            for i, v in enumerate(batch.column(0).to_pylist()):
                if row + i >= skip:
                    if isinstance(v, bytes):
                        v = _decode(v, stats)
                    yield row + i, v or ""
            row += n


def check_sources(files, ds):
    """Read the first record of every local .jsonl/.parquet file, so that a wrong dataset.text_column (or an
    unreadable file) late in the list fails before any work rather than after the files before it were read."""
    for sf in files:
        if sf.local is not None and sf.kind in ("jsonl", "parquet"):
            rows = _read_rows(sf, ds, ReadStats())
            next(rows, None)
            rows.close()


def iter_documents(ds, files=None, start=(0, 0), stats=None):
    """(file index, row index, text) of every non-empty document from position `start`, file by file.
    Only one file's current batch is in memory (hub files are downloaded to the HF cache one at a time)."""
    files = source_files(ds) if files is None else files
    stats = ReadStats() if stats is None else stats
    for fi in range(start[0], len(files)):
        for ri, text in _read_rows(files[fi], ds, stats, skip=start[1] if fi == start[0] else 0):
            if not text or not text.strip():
                stats.empty_documents += 1
                continue
            yield fi, ri, text


def _is_validation(ds, fi, ri, ordinal):
    """Held-out rule, shared by prepare() and streaming: the first eval_samples documents, or else a
    validation_split fraction chosen by a hash of the document's (file, row) position."""
    if ds.eval_samples > 0:
        return ordinal < ds.eval_samples
    if ds.validation_split <= 0:
        return False
    h = hashlib.blake2b(f"{fi}:{ri}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < ds.validation_split


def iter_split(ds, split, files=None, start=(0, 0, 0), stats=None):
    """(file, row, ordinal, text) of the documents of one split ('train' | 'val', or both for None) from source
    position `start`; ordinal counts the documents of both splits from the start of the corpus (up to
    dataset.max_documents)."""
    ordinal = start[2]
    for fi, ri, text in iter_documents(ds, files, (start[0], start[1]), stats):
        if ds.max_documents and ordinal >= ds.max_documents:
            return
        if split == "val" and 0 < ds.eval_samples <= ordinal:
            return
        if split is None or _is_validation(ds, fi, ri, ordinal) == (split == "val"):
            yield fi, ri, ordinal, text
        ordinal += 1


# -----------------------------------------------------------------------------
# tokenizing in worker processes (bounded queue: the corpus is never materialised)

_WORKER_TOKENIZER = None


def _worker_init(tok_json):
    global _WORKER_TOKENIZER
    # Signals are the parent's business: a worker leaves its process group, so Ctrl-C or a preemption SIGTERM sent
    # to the group does not kill it mid-task (that hung the parent's pending results), and it drops any Python
    # handler inherited through fork (train.py's stop-at-step-boundary handler made Pool.terminate() hang).
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER_TOKENIZER = Tokenizer.from_str(tok_json)


def _encode_chunk(texts, tokenizer=None):
    """-> (lengths int64 [n], ids uint32 [sum]) of a list of texts, without special tokens."""
    encs = (tokenizer or _WORKER_TOKENIZER).encode_batch_fast(texts, add_special_tokens=False)  # no offsets: faster
    lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
    ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.uint32, count=int(lengths.sum()))
    return lengths, ids


class Encoder:
    """encode_batch over chunks of documents in a pool of processes (or in-process for num_workers=1)."""

    def __init__(self, tokenizer, num_workers):
        self.num_workers = num_workers
        self.pool, self.tokenizer = None, tokenizer
        if num_workers > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes do the parallelism; no rayon after fork
            ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ctx.Pool(num_workers, initializer=_worker_init, initargs=(tokenizer.to_str(),))

    def map(self, chunks):
        """Yield (item, lengths, ids) for (item, texts) chunks, in order, at most 2 chunks per worker in flight."""
        if self.pool is None:
            for item, texts in chunks:
                yield (item, *_encode_chunk(texts, self.tokenizer))
            return
        pending = deque()
        for item, texts in chunks:
            pending.append((item, self.pool.apply_async(_encode_chunk, (texts,))))
            if len(pending) >= 2 * self.num_workers:
                item, res = pending.popleft()
                yield (item, *res.get())
        while pending:
            item, res = pending.popleft()
            yield (item, *res.get())

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _chunked(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


# -----------------------------------------------------------------------------
# shards: a 32-byte header (magic, version, itemsize, token count) then raw little-endian uint16/uint32 tokens.
# index.npy: int64 start offsets of the documents in the split's concatenated shards, plus the total at the end.
# Documents never straddle shards.

SHARD_MAGIC = b"NEOBTOK\x00"
SHARD_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")      # 32 bytes
FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 27                  # ~128M tokens (256 MB of uint16) per shard


def token_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Append documents to <dir>/shard_XXXXX.bin(.tmp); a shard is renamed when complete."""

    def __init__(self, out_dir, dtype, shard_tokens=SHARD_TOKENS):
        self.dir, self.dtype, self.shard_tokens = Path(out_dir), dtype, shard_tokens
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shards, self.offsets = [], array("q", [0])     # offsets: the doc index, 8 bytes per document
        self.f, self.count = None, 0

    def _close_shard(self):
        self.f.seek(0)
        self.f.write(HEADER.pack(SHARD_MAGIC, SHARD_VERSION, self.dtype.itemsize, self.count))
        self.f.close()
        name = f"shard_{len(self.shards):05d}.bin"
        os.replace(self.dir / (name + ".tmp"), self.dir / name)
        self.shards.append({"file": name, "tokens": self.count})
        self.f, self.count = None, 0

    def write_docs(self, lengths, ids):
        """Documents given as their lengths and their concatenated ids. A shard is closed after the document that
        takes it to shard_tokens, so no document straddles two shards."""
        ids = ids.astype(self.dtype, copy=False)
        ends = np.cumsum(lengths)
        self.offsets.extend((ends + self.offsets[-1]).tolist())
        doc = tok = 0
        while doc < len(lengths):
            if self.f is None:
                self.f = open(self.dir / f"shard_{len(self.shards):05d}.bin.tmp", "wb")
                self.f.write(b"\0" * HEADER.size)
            # documents [doc, k) go into this shard: up to and including the one that reaches shard_tokens
            k = min(int(np.searchsorted(ends, tok + self.shard_tokens - self.count, side="left")) + 1, len(lengths))
            self.f.write(ids[tok:ends[k - 1]].tobytes())
            self.count += int(ends[k - 1]) - tok
            doc, tok = k, int(ends[k - 1])
            if self.count >= self.shard_tokens:
                self._close_shard()

    def finish(self):
        if self.f is not None:
            self._close_shard()
        with open(self.dir / "index.npy.tmp", "wb") as f:
            np.save(f, np.frombuffer(self.offsets, dtype=np.int64))
        os.replace(self.dir / "index.npy.tmp", self.dir / "index.npy")
        return {"documents": len(self.offsets) - 1, "tokens": int(self.offsets[-1]), "shards": self.shards}


def _check_shard(path, n_tokens, dtype):
    if not path.is_file():
        raise UserError(f"token shard {path} is missing; delete {path.parent.parent} and prepare again")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != SHARD_MAGIC:
        raise UserError(f"{path} is not a neobert token shard (bad header); delete {path.parent.parent} "
                        f"and prepare again")
    _, version, itemsize, count = HEADER.unpack(head)
    if version != SHARD_VERSION or itemsize != dtype.itemsize or count != n_tokens:
        raise UserError(f"{path}: header says version {version}, {itemsize}-byte tokens, {count} tokens; "
                        f"manifest.json expects version {SHARD_VERSION}, {dtype.itemsize}-byte, {n_tokens}")
    if size != HEADER.size + n_tokens * dtype.itemsize:
        raise UserError(f"{path} is truncated or has trailing bytes: {size} bytes, expected "
                        f"{HEADER.size + n_tokens * dtype.itemsize}; delete {path.parent.parent} and prepare again")


def read_manifest(data_dir):
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{str(data_dir)!r} is not a prepared dataset (no manifest.json); "
                        f"run python data.py CONFIG")
    try:
        man = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if man.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format_version {man.get('format_version')!r}; this data.py reads "
                        f"{FORMAT_VERSION}: prepare the data again")
    return man


class TokenStore:
    """One split of a prepared dir: memory-mapped shards (zero copy) and the document index (the only thing in
    RAM that grows with the corpus)."""

    def __init__(self, data_dir, split="train"):
        self.dir = Path(data_dir)
        self.manifest = man = read_manifest(data_dir)
        if split not in man["splits"]:
            raise UserError(f"{data_dir} has no split {split!r}; it has {sorted(man['splits'])}")
        info = man["splits"][split]
        self.split, self.dtype = split, np.dtype(man["dtype"])
        self.shards, starts = [], [0]
        for sh in info["shards"]:
            path = self.dir / split / sh["file"]
            _check_shard(path, sh["tokens"], self.dtype)
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r", offset=HEADER.size, shape=(sh["tokens"],)))
            starts.append(starts[-1] + sh["tokens"])
        self.shard_starts = np.asarray(starts, dtype=np.int64)
        index = self.dir / split / "index.npy"
        try:
            self.offsets = np.load(index, allow_pickle=False)
        except FileNotFoundError:
            raise UserError(f"document index {index} is missing; delete {data_dir} and prepare again") from None
        except Exception as e:
            raise UserError(f"document index {index} is unreadable or truncated ({e}); delete {data_dir} "
                            f"and prepare again") from None
        n = info["documents"]
        if (self.offsets.dtype != np.int64 or self.offsets.shape != (n + 1,) or self.offsets[0] != 0
                or self.offsets[-1] != starts[-1] or np.any(np.diff(self.offsets) < 0)):
            raise UserError(f"document index {index} does not match its shards ({n} documents, {starts[-1]} tokens "
                            f"expected); delete {data_dir} and prepare again")
        self.lengths = np.diff(self.offsets)
        self.n_docs, self.n_tokens = n, starts[-1]

    def doc(self, d):
        """Tokens of document d (a read-only memmap view)."""
        start, end = int(self.offsets[d]), int(self.offsets[d + 1])
        s = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        base = int(self.shard_starts[s])
        return self.shards[s][start - base:end - base]


# -----------------------------------------------------------------------------
# prepare

def _source_spec(ds):
    return {"name": "local" if ds.data_files else ds.name, "config": ds.config, "train_split": ds.train_split,
            "data_files": list(ds.data_files), "text_column": ds.text_column,
            "validation_split": ds.validation_split, "eval_samples": ds.eval_samples,
            "max_documents": ds.max_documents}


def _tokenizer_spec(tok_cfg, ds):
    if tok_cfg.path:
        return {"path": str(tok_cfg.path), "sha256": hashlib.sha256(Path(tok_cfg.path).read_bytes()).hexdigest()
                if Path(tok_cfg.path).is_file() else None}
    if tok_cfg.train:
        return {"train": True, "vocab_size": tok_cfg.vocab_size, "min_frequency": tok_cfg.min_frequency,
                "lowercase": tok_cfg.lowercase, "corpus": _source_spec(ds)}
    return {"name": tok_cfg.name}


def _spec_diff(old, new, prefix):
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):   # e.g. the trained tokenizer's corpus: name the leaf keys
            out += _spec_diff(a, b, f"{prefix}.{k}")
        elif a != b:
            out.append(f"{prefix}.{k}: {a!r} -> {b!r}")
    return out


def _write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _prepare_tokenizer(ds, tok_cfg, out, files, stats):
    """tokenizer.json (+ tokenizer_spec.json) in `out`; reused when its spec matches."""
    spec = _tokenizer_spec(tok_cfg, ds)
    spec_path, tok_path = out / "tokenizer_spec.json", out / "tokenizer.json"
    if tok_path.is_file() and spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return Tokenizer.from_file(str(tok_path))
    if tok_cfg.train:
        print(f"training a WordPiece tokenizer (vocab_size {tok_cfg.vocab_size}) on {dataset_label(ds)}", flush=True)
        t0 = time.time()
        texts = (text for _, _, _, text in iter_split(ds, "train", files, stats=stats))
        tok = train_tokenizer(texts, tok_cfg.vocab_size, tok_cfg.min_frequency, tok_cfg.lowercase)
        print(f"trained {tok.get_vocab_size()} tokens in {time.time() - t0:.1f}s", flush=True)
    else:
        tok = _tokenizer_from_spec(tok_cfg)
    special_token_ids(tok)
    tok.save(str(out / "tokenizer.json.tmp"))
    os.replace(out / "tokenizer.json.tmp", tok_path)
    _write_json(spec_path, spec)
    return tok


def dataset_label(ds):
    if ds.data_files:
        return f"local files {ds.data_files}"
    if ds.name.startswith("stdlib"):
        return f"the docstrings of the Python {ds.name} ({sysconfig.get_paths()['stdlib']})"
    return f"hub dataset {ds.name} (config {ds.config}, split {ds.train_split})"


def prepare(ds, tok_cfg, *, shard_tokens=SHARD_TOKENS, progress=True):
    """Build dataset.path: tokenizer.json, train/ and val/ shards, manifest.json (written last: its presence marks a
    complete directory). Returns the directory. A finished directory returns at once (after checking it was made
    from the same source and tokenizer); an interrupted one is rebuilt. With dataset.streaming only the tokenizer
    is prepared. Call it on one rank only (then barrier)."""
    out = dataset_dir(ds)
    man_path = out / "manifest.json"
    if man_path.is_file():
        man = read_manifest(out)
        diff = (_spec_diff(man["source"], _source_spec(ds), "dataset")
                + _spec_diff(man["tokenizer"]["spec"], _tokenizer_spec(tok_cfg, ds), "tokenizer"))
        if diff:
            raise UserError(f"{out} was prepared from another source or tokenizer ({'; '.join(diff)}); "
                            f"delete it or set another dataset.path")
        return out
    files = source_files(ds)                # bad paths and globs fail here, before any work
    check_sources(files, ds)                # and a text_column missing from a local file
    out.mkdir(parents=True, exist_ok=True)
    tok = _prepare_tokenizer(ds, tok_cfg, out, files, ReadStats())
    if ds.streaming:
        return out
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    for split in ("train", "val"):          # leftovers of an interrupted run
        shutil.rmtree(out / split, ignore_errors=True)
    writers = {s: ShardWriter(out / s, dtype, shard_tokens) for s in ("train", "val")}
    stats = ReadStats()
    docs = ((_is_validation(ds, fi, ri, ordinal), text)
            for fi, ri, ordinal, text in iter_split(ds, None, files, stats=stats))
    chunks = ((np.asarray([v for v, _ in c], dtype=bool), [t for _, t in c]) for c in _chunked(docs, 256))
    encoder = Encoder(tok, _num_workers(ds.num_workers))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc=f"tokenize {out}", unit=" docs", unit_scale=True, file=sys.stderr, mininterval=0.5)
    t0, n_docs, n_tok, n_empty = time.time(), 0, 0, 0
    try:
        for is_val, lengths, ids in encoder.map(chunks):
            keep = lengths > 0
            n_empty += int((~keep).sum())
            for split, sel in (("train", ~is_val & keep), ("val", is_val & keep)):
                if sel.all():
                    writers[split].write_docs(lengths, ids)
                elif sel.any():
                    writers[split].write_docs(lengths[sel], ids[np.repeat(sel, lengths)])
            n_docs += len(lengths)
            n_tok += int(lengths.sum())
            if bar is not None:
                bar.update(len(lengths))
                bar.set_postfix_str(f"{n_tok / max(time.time() - t0, 1e-9):,.0f} tokens/s", refresh=False)
    finally:
        encoder.close()
        if bar is not None:
            bar.close()
    splits = {s: w.finish() for s, w in writers.items()}
    if splits["train"]["documents"] == 0:
        raise UserError(f"the corpus is empty: no training documents with text in {dataset_label(ds)}"
                        + (f" ({stats.empty_documents} empty)" if stats.empty_documents else ""))
    _report_stats(stats, ds)
    stats.empty_documents += n_empty
    man = {
        "format_version": FORMAT_VERSION,
        "source": _source_spec(ds),
        "tokenizer": {"spec": _tokenizer_spec(tok_cfg, ds), "vocab_size": vocab_size,
                      "sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest(),
                      "special_ids": special_token_ids(tok), "all_special_ids": _all_special_ids(tok)},
        "dtype": dtype.name,
        "splits": splits,
        "skipped": asdict(stats),
        "seconds": round(time.time() - t0, 2),
    }
    _write_json(man_path, man)
    s = splits
    print(f"prepared {out}: train {s['train']['documents']:,} docs / {s['train']['tokens']:,} tokens, "
          f"val {s['val']['documents']:,} docs / {s['val']['tokens']:,} tokens in {time.time() - t0:.1f}s", flush=True)
    return out


def _report_stats(stats, ds):
    if stats.bad_bytes:
        warn(f"skipped {stats.bad_bytes} undecodable bytes in {stats.bad_lines} lines (not UTF-8)")
    if stats.bad_records:
        warn(f"skipped {stats.bad_records} records that were not JSON objects with a string {ds.text_column!r} "
             f"(including records without that column)")
    if stats.skipped_files:
        warn(f"skipped {stats.skipped_files} .py files that do not parse")


# -----------------------------------------------------------------------------
# MLM masking and collation

PERM_STREAM, MASK_STREAM = 0x7065726D, 0x6D61736B    # keep the permutation and mask RNG streams apart


def _rng(*key):
    return np.random.default_rng([int(k) % 2**63 for k in key])


class Masker:
    """Select each non-special token with probability mlm_probability; selected -> [MASK] (mask_all), or
    80% [MASK] / 10% a random non-special id / 10% unchanged. labels = original id where selected, else -100.
    The same random draws are made in both modes, so a row's selection does not depend on mask_all."""

    def __init__(self, cfg, mask_id, never_ids, vocab_size):
        self.p, self.mask_all, self.mask_id = cfg.mlm_probability, cfg.mask_all, mask_id
        self.never = np.asarray(sorted(never_ids), dtype=np.int64)
        self.random_ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), self.never)

    def __call__(self, ids, rng):
        n = len(ids)
        selected = (rng.random(n) < self.p) & ~np.isin(ids, self.never)
        how = rng.random(n)
        random_ids = self.random_ids[rng.integers(0, len(self.random_ids), n)]
        labels = np.where(selected, ids, -100)
        if self.mask_all:
            inputs = np.where(selected, self.mask_id, ids)
        else:
            inputs = np.where(selected & (how < 0.8), self.mask_id, ids)
            inputs = np.where(selected & (how >= 0.8) & (how < 0.9), random_ids, inputs)
        return inputs, labels


def collate_packed(rows, masker, pin=False):
    """rows: (ids int64 [S], segment lengths, rng key). -> input_ids, labels, position_ids [B, S], cu_seqlens int32
    [N+1] over the flattened B*S tokens, max_seqlen (python int). Every row start is a segment start."""
    inputs, labels, positions, segs = [], [], [], []
    for ids, row_segs, key in rows:
        x, y = masker(ids, _rng(*key))
        inputs.append(x)
        labels.append(y)
        positions.append(np.concatenate([np.arange(n) for n in row_segs]))
        segs += row_segs
    batch = {
        "input_ids": torch.from_numpy(np.stack(inputs)),
        "labels": torch.from_numpy(np.stack(labels)),
        "position_ids": torch.from_numpy(np.stack(positions)),
        "cu_seqlens": torch.from_numpy(np.concatenate([[0], np.cumsum(segs)]).astype(np.int32)),
        "max_seqlen": int(max(segs)),
    }
    return _pin(batch) if pin else batch


def collate_padded(rows, masker, pad_id, seq_len, multiple, pin=False):
    """rows: (ids int64 [n <= S], rng key). -> input_ids, labels, attention_mask [B, L], L = the longest row
    rounded up to `multiple` (at most S). Masks depend only on the row, not on the padding."""
    width = max(len(ids) for ids, _ in rows)
    width = min(seq_len, -(-width // multiple) * multiple) if width < seq_len else width
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), -100, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (ids, key) in enumerate(rows):
        x, y = masker(ids, _rng(*key))
        input_ids[i, :len(ids)], labels[i, :len(ids)], attention_mask[i, :len(ids)] = x, y, 1
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "attention_mask": torch.from_numpy(attention_mask)}
    return _pin(batch) if pin else batch


def _pin(batch):
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


# -----------------------------------------------------------------------------
# loaders

class _Prefetcher:
    """Runs a generator in a daemon thread, `depth` items ahead."""

    def __init__(self, gen, depth):
        self.q, self.stop, self.error = queue.Queue(depth), threading.Event(), None
        self.thread = threading.Thread(target=self._run, args=(gen,), daemon=True)
        self.thread.start()

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, gen):
        try:
            for item in gen:
                if not self._put(item):
                    return
        except BaseException as e:      # handed to the consumer, raised there
            self._put(e)

    def get(self):
        if self.error is not None:          # the thread has ended: raise again rather than wait forever
            raise self.error
        item = self.q.get()
        if isinstance(item, BaseException):
            self.error = item
            raise item
        return item

    def close(self):
        self.stop.set()
        self.thread.join(timeout=10)


class _Loader:
    """Rank / micro-step slicing of global batches, background prefetch and the JSON state, shared by both loaders.
    Subclasses define _steps(state) -> iterator of (this rank's micro-batches, state after the step)."""

    def __init__(self, micro_batch_size, grad_accum_steps, rank, world_size, prefetch, pin_memory):
        if micro_batch_size < 1 or grad_accum_steps < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad batch layout: micro_batch_size {micro_batch_size}, grad_accum_steps "
                            f"{grad_accum_steps}, rank {rank} of world_size {world_size}")
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.rank, self.world_size = rank, world_size
        self.global_batch_rows = micro_batch_size * grad_accum_steps * world_size
        # rank r owns rows [r*B_r, (r+1)*B_r) of the global batch; micro-step m the m-th micro_batch_size of them
        first = rank * micro_batch_size * grad_accum_steps
        self.micro_rows = [list(range(first + m * micro_batch_size, first + (m + 1) * micro_batch_size))
                           for m in range(grad_accum_steps)]
        self.prefetch = prefetch
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._state, self._gen, self._prefetcher, self._error = None, None, None, None

    def next_step(self):
        """The grad_accum_steps micro-batches of this rank for the next optimizer step."""
        if self.prefetch > 0:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._steps(dict(self._state)), self.prefetch)
            batches, state = self._prefetcher.get()
        else:
            if self._gen is None:
                self._gen = self._steps(dict(self._state))
            if self._error is not None:         # a failed generator is finished: raise again
                raise self._error
            try:
                batches, state = next(self._gen)
            except Exception as e:
                self._error = e
                raise
        self._state = state
        return batches

    def __iter__(self):
        while True:
            yield self.next_step()

    def state_dict(self):
        """A small JSON-serialisable dict: the position after the last step returned."""
        return dict(self._state)

    def load_state_dict(self, state):
        state = dict(state)
        for k, v in self._state.items():
            if k not in state:
                raise UserError(f"loader state lacks {k!r}; it was saved by another loader kind")
            if k in self._must_match and state[k] != v:
                raise UserError(f"loader state was saved with {k} = {state[k]!r}, this run has {v!r}; "
                                f"resume with the same setting")
        self._stop()
        self._state = {k: state[k] for k in self._state}

    def _stop(self):
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        self._gen, self._error = None, None

    def close(self):
        """Stop the background thread (a later next_step() restarts it)."""
        self._stop()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@dataclass
class _EpochPlan:
    perm: np.ndarray        # document order of this epoch
    cum_end: np.ndarray     # end offset of each unit (packed: tokens; padded: rows) in that order
    n_rows: int


class MLMLoader(_Loader):
    """MLM batches from prepared shards.

    Packed (collator_cfg.pack_sequences): each epoch concatenates [CLS] doc [SEP] units in a seeded document
    permutation and cuts the stream into rows of exactly seq_len tokens; a unit crossing a row boundary continues
    at the start of the next row as a new segment (positions restart at 0). Nothing is padded; the tail of an
    epoch shorter than one global batch is dropped. Row r is found by a binary search in the cumulative unit
    lengths, so rows are random access and only the document index and the epoch's permutation are in RAM.
    Padded: one [CLS] chunk [SEP] per row, a document longer than seq_len - 2 split into several chunks.

    Position = (epoch, row). A step takes global_batch_rows rows from there; when they do not fit into the
    epoch, the next epoch (new permutation) starts at row 0. Masks are seeded by (seed, epoch, row)."""

    def __init__(self, data_dir, split="train", *, seq_len, micro_batch_size, grad_accum_steps=1, rank=0,
                 world_size=1, seed=0, collator_cfg=None, prefetch=2, pin_memory=None):
        super().__init__(micro_batch_size, grad_accum_steps, rank, world_size, prefetch, pin_memory)
        self.cfg = collator_cfg or DataCollatorConfig()
        self.store = TokenStore(data_dir, split)
        if self.store.n_docs == 0:
            raise UserError(f"the {split} split of {data_dir} has no documents")
        if seq_len < 8:
            raise UserError(f"dataset.max_seq_length must be >= 8, got {seq_len}")
        man = self.store.manifest
        sp = man["tokenizer"]["special_ids"]
        self.pad_id, self.cls_id, self.sep_id = sp["pad"], sp["cls"], sp["sep"]
        self.vocab_size = man["tokenizer"]["vocab_size"]
        self.masker = Masker(self.cfg, sp["mask"], man["tokenizer"]["all_special_ids"], self.vocab_size)
        self.seq_len, self.seed, self.split = seq_len, seed, split
        self.packed = self.cfg.pack_sequences
        self._cls, self._sep = np.array([self.cls_id], np.int64), np.array([self.sep_id], np.int64)
        self._plans, self._plans_lock = {}, threading.Lock()
        self._state = {"kind": "packed" if self.packed else "padded", "split": split, "seed": seed,
                       "seq_len": seq_len, "documents": self.store.n_docs, "epoch": 0, "row": 0}
        self._must_match = ("kind", "split", "seed", "seq_len", "documents")
        if self.plan(0).n_rows < self.global_batch_rows:
            raise UserError(f"the {split} split of {data_dir} gives {self.plan(0).n_rows} rows of {seq_len} tokens "
                            f"per epoch, fewer than one global batch of {self.global_batch_rows} rows; use more "
                            f"data, a smaller batch or a smaller dataset.max_seq_length")

    @property
    def steps_per_epoch(self):
        return self.plan(0).n_rows // self.global_batch_rows

    def plan(self, epoch):
        """The epoch's document permutation and cumulative unit ends (cached for two epochs)."""
        with self._plans_lock:
            return self._plan(epoch)

    def _plan(self, epoch):
        if epoch not in self._plans:
            perm = _rng(PERM_STREAM, self.seed, epoch).permutation(self.store.n_docs)
            lengths = self.store.lengths[perm]
            if self.packed:
                cum_end = np.cumsum(lengths + 2)
                n_rows = int(cum_end[-1]) // self.seq_len
            else:
                cum_end = np.cumsum(-(-lengths // (self.seq_len - 2)))
                n_rows = int(cum_end[-1])
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = _EpochPlan(perm, cum_end, n_rows)
        return self._plans[epoch]

    def _unit_slice(self, d, a, b):
        """Tokens [a, b) of the unit [CLS] doc_d [SEP]."""
        n = int(self.store.lengths[d])
        parts = [self._cls] if a == 0 else []
        lo, hi = max(a, 1) - 1, min(b, n + 1) - 1
        if hi > lo:
            parts.append(self.store.doc(d)[lo:hi].astype(np.int64))
        if b == n + 2:
            parts.append(self._sep)
        return np.concatenate(parts)

    def packed_row(self, epoch, r):
        """(ids int64 [seq_len], segment lengths) of row r of an epoch."""
        plan, S = self.plan(epoch), self.seq_len
        t, end = r * S, (r + 1) * S
        u = int(np.searchsorted(plan.cum_end, t, side="right"))
        pieces, segs = [], []
        while t < end:
            d, unit_end = int(plan.perm[u]), int(plan.cum_end[u])
            unit_start = unit_end - int(self.store.lengths[d]) - 2
            a, b = t - unit_start, min(end, unit_end) - unit_start
            pieces.append(self._unit_slice(d, a, b))
            segs.append(b - a)
            t += b - a
            u += 1
        return np.concatenate(pieces), segs

    def padded_row(self, epoch, r):
        """ids int64 of row r: [CLS] k-th chunk of a document [SEP]."""
        plan, chunk = self.plan(epoch), self.seq_len - 2
        u = int(np.searchsorted(plan.cum_end, r, side="right"))
        d = int(plan.perm[u])
        k = r - (int(plan.cum_end[u]) - -(-int(self.store.lengths[d]) // chunk))
        body = self.store.doc(d)[k * chunk:(k + 1) * chunk].astype(np.int64)
        return np.concatenate([self._cls, body, self._sep])

    def _micro_batch(self, epoch, rows):
        if self.packed:
            return collate_packed([(*self.packed_row(epoch, r), (MASK_STREAM, self.seed, epoch, r)) for r in rows],
                                  self.masker, self.pin)
        return collate_padded([(self.padded_row(epoch, r), (MASK_STREAM, self.seed, epoch, r)) for r in rows],
                              self.masker, self.pad_id, self.seq_len, self.cfg.pad_to_multiple_of, self.pin)

    def _steps(self, state):
        epoch, row, G = state["epoch"], state["row"], self.global_batch_rows
        while True:
            if row + G > self.plan(epoch).n_rows:
                epoch, row = epoch + 1, 0
                continue
            batches = [self._micro_batch(epoch, [row + i for i in idx]) for idx in self.micro_rows]
            row += G
            yield batches, {**state, "epoch": epoch, "row": row}


class StreamingMLMLoader(_Loader):
    """Packed MLM batches tokenized on the fly from the source files (dataset.streaming: true).

    Documents of the split are read in the fixed reading order (sorted files, rows in file order) and grouped into
    windows of dataset.shuffle_buffer_size documents; each window is tokenized by the worker processes and
    shuffled by a permutation seeded by (seed, epoch, window); the [CLS] doc [SEP] units are packed into rows of
    seq_len exactly as MLMLoader packs them (no padding, a unit crossing a row boundary continues in the next row).
    At the end of the source the next epoch starts from the first file with new window permutations.

    The state is (epoch, source position (file, row, ordinal) where the current window starts, window number,
    document index within the shuffled window, token offset within that document's unit, rows emitted). Resuming
    re-reads and re-tokenizes only the current window and continues from the saved token: the resumed run yields
    exactly the batches (rows, order, masks) the uninterrupted run would have, so within an epoch every document
    is used once, none repeated and none skipped. This holds as long as the source files, seed,
    shuffle_buffer_size, max_seq_length and tokenizer are unchanged (checked where possible); the global batch
    size and world size may change. Masks are seeded by (seed, global row number).
    Every rank reads and tokenizes the whole stream and keeps its own rows, so the global batch does not depend on
    the world size; give each rank enough dataset.num_workers to keep up."""

    def __init__(self, ds, tokenizer, split="train", *, seq_len, micro_batch_size, grad_accum_steps=1, rank=0,
                 world_size=1, seed=0, collator_cfg=None, prefetch=2, pin_memory=None):
        super().__init__(micro_batch_size, grad_accum_steps, rank, world_size, prefetch, pin_memory)
        self.cfg = collator_cfg or DataCollatorConfig()
        if not self.cfg.pack_sequences:
            raise UserError("dataset.streaming supports packed rows only: set datacollator.pack_sequences: true")
        if seq_len < 8:
            raise UserError(f"dataset.max_seq_length must be >= 8, got {seq_len}")
        self.ds, self.split, self.seq_len, self.seed = ds, split, seq_len, seed
        self.files = source_files(ds)
        check_sources(self.files, ds)
        sp = special_token_ids(tokenizer)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.masker = Masker(self.cfg, sp["mask"], _all_special_ids(tokenizer), self.vocab_size)
        self._cls, self._sep = np.array([sp["cls"]], np.int64), np.array([sp["sep"]], np.int64)
        self.stats = ReadStats()
        files_digest = hashlib.sha256("\n".join(f.name for f in self.files).encode()).hexdigest()[:16]
        self._state = {"kind": "streaming", "split": split, "seed": seed, "seq_len": seq_len,
                       "shuffle_buffer_size": ds.shuffle_buffer_size, "files": files_digest,
                       "epoch": 0, "file": 0, "row": 0, "ordinal": 0, "window": 0, "doc": 0, "offset": 0, "rows": 0}
        self._must_match = ("kind", "split", "seed", "seq_len", "shuffle_buffer_size", "files")
        self.encoder = Encoder(tokenizer, _num_workers(ds.num_workers))

    def _tokenize(self, texts):
        docs = []
        for _, lengths, ids in self.encoder.map((None, c) for c in _chunked(texts, 256)):
            ids = ids.astype(np.int64)
            docs += np.split(ids, np.cumsum(lengths)[:-1])
        return docs

    def _windows(self, state):
        epoch, pos, w = state["epoch"], (state["file"], state["row"], state["ordinal"]), state["window"]
        K = self.ds.shuffle_buffer_size
        docs_iter = iter_split(self.ds, self.split, self.files, start=pos, stats=self.stats)
        while True:
            items = list(islice(docs_iter, K))     # the reader stays open: the next window continues from here
            if not items:
                if pos == (0, 0, 0):
                    raise UserError(f"streaming: the {self.split} split of {dataset_label(self.ds)} has no documents")
                _report_stats(self.stats, self.ds)
                self.stats = ReadStats()
                epoch, pos, w = epoch + 1, (0, 0, 0), 0
                docs_iter = iter_split(self.ds, self.split, self.files, start=pos, stats=self.stats)
                continue
            fi, ri, ordinal, _ = items[-1]
            next_pos = (fi, ri + 1, ordinal + 1)
            docs = self._tokenize([text for *_, text in items])
            order = _rng(PERM_STREAM, self.seed, epoch, w).permutation(len(docs))
            yield epoch, pos, w, [docs[j] for j in order], next_pos
            pos, w = next_pos, w + 1

    def _steps(self, state):
        S, G = self.seq_len, self.global_batch_rows
        mine = {g: (m, i) for m, idx in enumerate(self.micro_rows) for i, g in enumerate(idx)}
        rows_done, batch_len, own = state["rows"], 0, {}
        pieces, segs, filled = [], [], 0
        first = True
        for epoch, pos, w, docs, next_pos in self._windows(state):
            i0, off0 = (state["doc"], state["offset"]) if first else (0, 0)
            first = False
            for i in range(i0, len(docs)):
                unit = np.concatenate([self._cls, docs[i], self._sep])
                off = off0 if i == i0 else 0
                while off < len(unit):
                    take = min(S - filled, len(unit) - off)
                    pieces.append(unit[off:off + take])
                    segs.append(take)
                    filled, off = filled + take, off + take
                    if filled < S:
                        continue
                    if batch_len in mine:
                        own[batch_len] = (np.concatenate(pieces), segs, (MASK_STREAM, self.seed, rows_done))
                    rows_done, batch_len = rows_done + 1, batch_len + 1
                    pieces, segs, filled = [], [], 0
                    if batch_len < G:
                        continue
                    # where the next token comes from: this unit, the next one, or the next window
                    if off < len(unit):
                        src, where = pos, {"window": w, "doc": i, "offset": off}
                    elif i + 1 < len(docs):
                        src, where = pos, {"window": w, "doc": i + 1, "offset": 0}
                    else:
                        src, where = next_pos, {"window": w + 1, "doc": 0, "offset": 0}
                    where.update(file=src[0], row=src[1], ordinal=src[2])
                    batches = [collate_packed([own[g] for g in idx], self.masker, self.pin) for idx in self.micro_rows]
                    yield batches, {**state, **where, "epoch": epoch, "rows": rows_done}
                    batch_len, own = 0, {}

    def close(self):
        """Stop the prefetch thread and the tokenizer processes."""
        super().close()
        if getattr(self, "encoder", None) is not None:
            self.encoder.close()
            self.encoder = None


# -----------------------------------------------------------------------------
# pairs for contrastive fine-tuning (train.py, trainer.objective: contrastive)
#   sources (local .jsonl/.csv/.parquet, hub parquet, the offline stdlib pairs) -> contrastive.path:
#     manifest.json           written last: format version, the sources' spec, tokenizer sha256, rows per source
#     tokenizer.json          the tokenizer the pairs were made with
#     source_00/ ...          one prepared dir per source, in the pretraining layout (its own manifest.json, written
#                             last) with one split per field: train.query/ train.positive/ train.negative0/ ...
#                             val.query/ ...; row i of a source is document i of every one of its fields
# A step's global batch comes from ONE source, picked with probability ∝ rows^alpha from (seed, step); rows are
# taken in a seeded per-source permutation from that source's cursor. State = (step, every source's cursor).

@dataclass
class PairSourceConfig:
    name: str = ""                      # hub dataset repo id, or "stdlib" (offline function -> docstring pairs)
    config: Optional[str] = None        # hub subset (config name), e.g. "triplet"
    split: str = "train"                # hub split
    data_files: list[str] = field(default_factory=list)  # local .jsonl/.csv/.parquet files, globs or directories
    query_column: str = "query"
    positive_column: str = "positive"
    negative_columns: list[str] = field(default_factory=list)  # hard negatives, zero or more columns
    instruction: str = ""               # prefixed to every query, e.g. "Given a question, retrieve its answer."
    max_rows: int = 0                   # read at most this many rows (0 = all)

    @property
    def label(self):
        return self.name or ",".join(self.data_files)


@dataclass
class ContrastiveConfig:
    sources: list[dict] = field(default_factory=list)  # PairSourceConfig mappings (keys above); held as such
    temperature: float = 0.07           # InfoNCE on cosine / temperature
    pooling: str = "mean"               # mean | cls: the sentence embedding, in training, eval and export
    alpha: float = 0.5                  # a step's source is picked with probability ∝ rows^alpha
    hard_negatives: int = 1             # hard negatives per query (at most a source's negative_columns)
    chunk_size: int = 0                 # gradient caching: rows per forward; 0 = a process's whole batch at once
    max_query_length: int = 64          # tokens, with [CLS] and [SEP]
    max_document_length: int = 256
    path: Optional[str] = None          # the prepared pairs; default data_cache/pairs
    validation_split: float = 0.01      # fraction of each source's rows held out (by a hash of the row position)
    eval_pairs: int = 1000              # held-out pairs per source in one evaluation (0 = evaluation off)
    num_workers: int = 0                # tokenizer processes; 0 = all cores

    def __post_init__(self):
        self.sources = [_pair_source(s, i) for i, s in enumerate(self.sources)]
        checks = [
            (self.temperature > 0, f"contrastive.temperature must be > 0, got {self.temperature}"),
            (self.pooling in ("mean", "cls"), f"contrastive.pooling: {self.pooling!r} is not one of mean, cls"),
            (self.alpha >= 0, f"contrastive.alpha must be >= 0, got {self.alpha}"),
            (self.hard_negatives >= 0, f"contrastive.hard_negatives must be >= 0, got {self.hard_negatives}"),
            (self.chunk_size >= 0, f"contrastive.chunk_size must be >= 0 (0 = no caching), got {self.chunk_size}"),
            (min(self.max_query_length, self.max_document_length) >= 3,
             "contrastive.max_query_length and contrastive.max_document_length must be >= 3"),
            (0 <= self.validation_split < 1, f"contrastive.validation_split must be in [0, 1), got "
                                             f"{self.validation_split}"),
            (self.eval_pairs >= 0, f"contrastive.eval_pairs must be >= 0, got {self.eval_pairs}"),
            (self.num_workers >= 0, f"contrastive.num_workers must be >= 0, got {self.num_workers}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


def _pair_source(raw, i):
    """One contrastive.sources entry (a mapping, or a PairSourceConfig) -> PairSourceConfig, strictly typed."""
    if isinstance(raw, PairSourceConfig):
        return raw
    where = f"contrastive.sources[{i}]"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping (name:, query_column:, ...), got {raw!r}")
    kinds = {"name": str, "config": (str, type(None)), "split": str, "data_files": list, "query_column": str,
             "positive_column": str, "negative_columns": list, "instruction": str, "max_rows": int}
    for key, value in raw.items():
        if key not in kinds:
            raise UserError(f"unknown key {where}.{key}; valid keys: {', '.join(kinds)}")
        if key in ("data_files", "negative_columns") and isinstance(value, str):
            raw = {**raw, key: [value]}
            continue
        ok = isinstance(value, kinds[key]) and not isinstance(value, bool)
        if ok and isinstance(value, list):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            expected = {"data_files": "a list of str", "negative_columns": "a list of str", "max_rows": "int",
                        "config": "str or null"}.get(key, "str")
            raise UserError(f"{where}.{key}: expected {expected}, got {value!r}")
    src = PairSourceConfig(**raw)
    if not src.name and not src.data_files:
        raise UserError(f"{where} needs a name (a hub dataset id, or stdlib) or data_files")
    if src.max_rows < 0:
        raise UserError(f"{where}.max_rows must be >= 0 (0 = all), got {src.max_rows}")
    return src


def pairs_dir(cc):
    return Path(cc.path) if cc.path else Path("data_cache") / "pairs"


PAIR_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
STDLIB_PAIR_COLUMNS = ["query", "positive", "negative"]


def _hub_where():
    from huggingface_hub import constants
    return f"{constants.ENDPOINT}, cache {constants.HF_HUB_CACHE}"


def pair_source_files(src, i=0):
    """The files of one pair source in reading order; a hub source is listed (not downloaded) here."""
    if src.data_files:
        return _local_files(src.data_files, PAIR_KINDS, f"contrastive.sources[{i}].data_files", ".jsonl, .csv or .parquet")
    if src.name == "stdlib":
        return [SourceFile("stdlib", "stdlib-pairs", local=sysconfig.get_paths()["stdlib"])]
    hub = type("HubSpec", (), dict(name=src.name, config=src.config, train_split=src.split))
    try:
        return _hub_files(hub, hint=f"looked at {_hub_where()}; check the name, or (offline) download its parquet "
                                    f"files and list them in data_files")
    except UserError as e:
        raise UserError(f"contrastive.sources[{i}]: {e}") from None


def _stdlib_pairs(root):
    """Real pairs from the Python standard library, offline: a public function's qualified name and signature
    (query) -> its docstring (positive); the docstring of the next documented function of the same module is a hard
    negative. Modules in sorted order, functions in source order: deterministic."""
    for path in _py_files(root, _SKIP_DIRS):
        try:
            tree = ast.parse(Path(path).read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        found = []

        def visit(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                    visit(child, f"{prefix}.{child.name}")
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
                    doc = ast.get_docstring(child, clean=True)
                    if doc and len(doc) >= 20:
                        found.append((f"{prefix}.{child.name}({ast.unparse(child.args)})", doc))
        visit(tree, module)
        for j, (query, doc) in enumerate(found):
            negatives = [d for _, d in found[j + 1:] + found[:j] if d != doc]
            if negatives:
                yield {"query": query, "positive": doc, "negative": negatives[0]}


def _missing_columns(where, name, wanted, columns):
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UserError(f"{where}: {name} has no column {missing[0]!r}; its columns: {list(columns)} (set "
                        f"query_column, positive_column and negative_columns)")


def _read_pair_rows(sf, wanted, where, stats):
    """(row index, [value of each wanted column]) of one pair file; a missing column is an error listing those
    that exist. Values may be None (the row is skipped by the caller)."""
    if sf.kind == "stdlib-pairs":
        _missing_columns(where, "the stdlib pair source", wanted, STDLIB_PAIR_COLUMNS)
        for row, rec in enumerate(_stdlib_pairs(sf.local)):
            yield row, [rec[c] for c in wanted]
    elif sf.kind == "jsonl":
        checked = False
        for row, rec in _jsonl_records(sf, stats):
            if not checked:             # the first record names the columns; later ones may lack a value
                _missing_columns(where, sf.name, wanted, rec)
                checked = True
            yield row, [rec.get(c) for c in wanted]
    elif sf.kind == "csv":
        import csv
        with open(sf.fetch(), newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            _missing_columns(where, sf.name, wanted, reader.fieldnames or [])
            for row, rec in enumerate(reader):
                yield row, [rec.get(c) for c in wanted]
    elif sf.kind == "parquet":
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(sf.fetch())
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{where}: {sf.name} is not a readable parquet file ({e})") from None
        _missing_columns(where, sf.name, wanted, pf.schema_arrow.names)
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=wanted):
            cols = [batch.column(j).to_pylist() for j in range(len(wanted))]
            for k in range(batch.num_rows):
                yield row + k, [c[k] for c in cols]
            row += batch.num_rows


def _pair_spec(src, cc):
    return {"name": src.name, "config": src.config, "split": src.split, "data_files": list(src.data_files),
            "query_column": src.query_column, "positive_column": src.positive_column,
            "negative_columns": list(src.negative_columns), "instruction": src.instruction, "max_rows": src.max_rows,
            "validation_split": cc.validation_split}


def _tokenizer_sha(tokenizer):
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def _pair_row_is_val(fi, ri, fraction):
    h = hashlib.blake2b(f"pair:{fi}:{ri}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def _prepare_pair_source(src, i, cc, files, tokenizer, out, progress):
    """One source -> out/ (its own manifest written last). Returns the manifest."""
    where = f"contrastive.sources[{i}] ({src.label})"
    spec = dict(_pair_spec(src, cc), tokenizer_sha256=_tokenizer_sha(tokenizer))
    if (out / "manifest.json").is_file():
        man = read_manifest(out)
        if man.get("source") == spec:
            return man                  # a finished source of an interrupted multi-source prepare
    shutil.rmtree(out, ignore_errors=True)
    fields = ["query", "positive"] + [f"negative{j}" for j in range(len(src.negative_columns))]
    wanted = [src.query_column, src.positive_column, *src.negative_columns]
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    writers = {(s, f): ShardWriter(out / f"{s}.{f}", dtype) for s in ("train", "val") for f in fields}
    stats, skipped = ReadStats(), 0
    prefix = src.instruction.strip() + " " if src.instruction.strip() else ""

    def rows():
        nonlocal skipped
        n = 0
        for fi, sf in enumerate(files):
            for ri, values in _read_pair_rows(sf, wanted, where, stats):
                if src.max_rows and n >= src.max_rows:
                    return
                n += 1
                if not all(isinstance(v, str) and v.strip() for v in values):
                    skipped += 1        # a missing or empty query, positive or negative
                    continue
                yield _pair_row_is_val(fi, ri, cc.validation_split), [prefix + values[0], *values[1:]]

    encoder = Encoder(tokenizer, _num_workers(cc.num_workers))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc=f"tokenize {where}", unit=" pairs", unit_scale=True, file=sys.stderr, mininterval=0.5)
    counts = {"train": 0, "val": 0}
    try:
        # a chunk's texts go field by field (all queries, all positives, ...) so one encode call serves them all
        chunks = ((np.asarray([v for v, _ in c], dtype=bool), [vals[k] for k in range(len(fields)) for _, vals in c])
                  for c in _chunked(rows(), 256))
        for is_val, lengths, ids in encoder.map(chunks):
            n = len(is_val)
            lengths = lengths.reshape(len(fields), n)
            keep = (lengths > 0).all(axis=0)       # a text with no tokens left would give an empty embedding
            skipped += int((~keep).sum())
            starts = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
            for k, f in enumerate(fields):
                field_ids = ids[starts[k]:starts[k + 1]]
                for split, sel in (("train", ~is_val & keep), ("val", is_val & keep)):
                    if sel.any():
                        writers[split, f].write_docs(lengths[k][sel], field_ids[np.repeat(sel, lengths[k])])
            counts["train"] += int((~is_val & keep).sum())
            counts["val"] += int((is_val & keep).sum())
            if bar is not None:
                bar.update(n)
    finally:
        encoder.close()
        if bar is not None:
            bar.close()
    if counts["train"] == 0:
        raise UserError(f"{where} has no rows with a non-empty {', '.join(wanted)}"
                        + (f" ({skipped} rows skipped)" if skipped else "") + "; check its files and columns")
    _report_stats(stats, DatasetConfig())
    splits = {f"{s}.{f}": w.finish() for (s, f), w in writers.items()}
    man = {"format_version": FORMAT_VERSION, "source": spec, "dtype": dtype.name, "fields": fields,
           "rows": counts, "skipped_rows": skipped, "splits": splits}
    _write_json(out / "manifest.json", man)
    return man


def prepare_pairs(cc, tokenizer, *, progress=True):
    """contrastive.path: every source tokenized once (see the layout above). A finished directory made from the
    same sources and tokenizer returns at once; one made from others is refused, naming what differs; an interrupted
    one is completed (finished sources are kept). Call it on one rank only (then barrier)."""
    if not cc.sources:
        raise UserError("contrastive.sources is empty: list at least one source (name: or data_files:, with "
                        "query_column, positive_column, negative_columns)")
    out = pairs_dir(cc)
    spec = {"sources": [_pair_spec(s, cc) for s in cc.sources], "tokenizer_sha256": _tokenizer_sha(tokenizer)}
    if (out / "manifest.json").is_file():
        man = read_manifest(out)
        diff = _spec_diff({"sources": dict(enumerate(man["spec"]["sources"])),
                           "tokenizer_sha256": man["spec"]["tokenizer_sha256"]},
                          {"sources": dict(enumerate(spec["sources"])), "tokenizer_sha256": spec["tokenizer_sha256"]},
                          "contrastive")
        if diff:
            raise UserError(f"{out} was prepared from other pair sources or another tokenizer ({'; '.join(diff)}); "
                            f"delete it or set another contrastive.path")
        return out
    files = [pair_source_files(s, i) for i, s in enumerate(cc.sources)]    # bad paths / hub ids fail before work
    for i, (src, fs) in enumerate(zip(cc.sources, files)):                   # and columns missing from local files
        wanted = [src.query_column, src.positive_column, *src.negative_columns]
        for sf in fs:
            if sf.local is not None:
                rows = _read_pair_rows(sf, wanted, f"contrastive.sources[{i}] ({src.label})", ReadStats())
                next(rows, None)
                rows.close()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json.tmp"))
    os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
    summary = []
    for i, (src, fs) in enumerate(zip(cc.sources, files)):
        man = _prepare_pair_source(src, i, cc, fs, tokenizer, out / f"source_{i:02d}", progress)
        summary.append({"dir": f"source_{i:02d}", "label": src.label, "rows": man["rows"],
                        "negatives": len(man["fields"]) - 2})
        print(f"pairs: {src.label}: {man['rows']['train']:,} train / {man['rows']['val']:,} held-out rows",
              flush=True)
    _write_json(out / "manifest.json", {"format_version": FORMAT_VERSION, "kind": "pairs", "spec": spec,
                                        "special_ids": special_token_ids(tokenizer), "sources": summary})
    return out


def read_pairs_manifest(data_dir):
    man = read_manifest(data_dir)
    if man.get("kind") != "pairs":
        raise UserError(f"{data_dir} holds pretraining shards, not prepared pairs; set contrastive.path to another "
                        f"directory")
    return man


class PairSource:
    """One prepared source's split: a TokenStore per field; row i = document i of each."""

    def __init__(self, data_dir, entry, split):
        d = Path(data_dir) / entry["dir"]
        self.label, self.num_negatives = entry["label"], entry["negatives"]
        fields = ["query", "positive"] + [f"negative{j}" for j in range(self.num_negatives)]
        self.stores = [TokenStore(d, f"{split}.{f}") for f in fields]
        self.rows = self.stores[0].n_docs
        if any(s.n_docs != self.rows for s in self.stores):
            raise UserError(f"{d}: its fields hold different numbers of rows; delete {data_dir} and prepare again")


def pad_rows(seqs, max_len, cls_id, sep_id, pad_id, multiple=8):
    """[CLS] tokens[:max_len-2] [SEP] per row, right-padded to the longest row (rounded up to `multiple`, at most
    max_len) -> input_ids, attention_mask int64 [B, L]."""
    body = max_len - 2
    width = max(min(len(s), body) for s in seqs) + 2
    width = min(max_len, -(-width // multiple) * multiple)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[:body]
        ids[i, 0], ids[i, 1:len(s) + 1], ids[i, len(s) + 1] = cls_id, s, sep_id
        mask[i, :len(s) + 2] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


SOURCE_STREAM = 0x736F7572


def source_probabilities(rows, alpha):
    """P(source k) ∝ rows_k^alpha (alpha 0: uniform, 1: proportional to size)."""
    w = np.asarray(rows, dtype=np.float64) ** alpha
    return w / w.sum()


def pick_source(seed, step, probs):
    """The source of global step `step`: a function of (seed, step) only, so resuming needs no RNG state."""
    u = _rng(SOURCE_STREAM, seed, step).random()
    return min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(probs) - 1)


class PairLoader(_Loader):
    """Contrastive batches from prepared pairs. next_step() -> [one dict for this process]: query_ids/query_mask
    [B, Lq], doc_ids/doc_mask [B*(1+h), Ld] (the B positives, then each row's h hard negatives row by row),
    num_negatives h, source (index). B = micro_batch_size * grad_accum_steps rows: the process's share of the
    global batch (rows [rank*B, (rank+1)*B)), so the global batch is the same for any world size and split; the
    trainer chunks it (gradient caching), since the loss needs the whole global batch at once."""

    def __init__(self, data_dir, cc, split="train", *, micro_batch_size, grad_accum_steps=1, rank=0, world_size=1,
                 seed=0, prefetch=2, pin_memory=None):
        super().__init__(micro_batch_size * grad_accum_steps, 1, rank, world_size, prefetch, pin_memory)
        man = read_pairs_manifest(data_dir)
        self.cc, self.seed, self.split = cc, seed, split
        self.sources = [PairSource(data_dir, e, split) for e in man["sources"]]
        sp = man["special_ids"]
        self.cls_id, self.sep_id, self.pad_id = sp["cls"], sp["sep"], sp["pad"]
        G = self.global_batch_rows
        for k, s in enumerate(self.sources):
            if s.rows < G:
                raise UserError(f"pair source {k} ({s.label}) has {s.rows} {split} rows, fewer than one global batch "
                                f"of {G}; use a smaller batch or drop the source")
        self.probs = source_probabilities([s.rows for s in self.sources], cc.alpha)
        digest = hashlib.sha256(json.dumps([[s.label, s.rows] for s in self.sources]).encode()).hexdigest()[:16]
        self._state = {"kind": "pairs", "split": split, "seed": seed, "sources": digest, "step": 0,
                       "cursors": [[0, 0] for _ in self.sources]}
        self._must_match = ("kind", "split", "seed", "sources")
        self._perms = {}

    def _perm(self, k, epoch):
        if (k, epoch) not in self._perms:
            if len(self._perms) >= 2 * len(self.sources):
                self._perms.pop(next(iter(self._perms)))
            self._perms[k, epoch] = _rng(PERM_STREAM, self.seed, k, epoch).permutation(self.sources[k].rows)
        return self._perms[k, epoch]

    def _batch(self, k, rows):
        src, h = self.sources[k], min(self.cc.hard_negatives, self.sources[k].num_negatives)
        q = [src.stores[0].doc(r).astype(np.int64) for r in rows]
        docs = [src.stores[1].doc(r).astype(np.int64) for r in rows]
        docs += [src.stores[2 + j].doc(r).astype(np.int64) for r in rows for j in range(h)]
        query_ids, query_mask = pad_rows(q, self.cc.max_query_length, self.cls_id, self.sep_id, self.pad_id)
        doc_ids, doc_mask = pad_rows(docs, self.cc.max_document_length, self.cls_id, self.sep_id, self.pad_id)
        batch = {"query_ids": query_ids, "query_mask": query_mask, "doc_ids": doc_ids, "doc_mask": doc_mask,
                 "num_negatives": h, "source": k}
        return _pin(batch) if self.pin else batch

    def _steps(self, state):
        step, cursors, G = state["step"], [list(c) for c in state["cursors"]], self.global_batch_rows
        mine = self.micro_rows[0]
        while True:
            k = pick_source(self.seed, step, self.probs)
            epoch, row = cursors[k]
            if row + G > self.sources[k].rows:
                epoch, row = epoch + 1, 0
            rows = self._perm(k, epoch)[row:row + G]
            cursors[k] = [epoch, row + G]
            step += 1
            yield [self._batch(k, [int(rows[i]) for i in mine])], {**state, "step": step,
                                                                   "cursors": [list(c) for c in cursors]}


def held_out_pairs(data_dir, max_per_source):
    """(queries, positives, source index) token arrays of the first max_per_source held-out rows of every source."""
    man = read_pairs_manifest(data_dir)
    queries, positives, source = [], [], []
    for k, entry in enumerate(man["sources"]):
        if entry["rows"]["val"] == 0:
            continue
        src = PairSource(data_dir, entry, "val")
        for r in range(min(src.rows, max_per_source)):
            queries.append(src.stores[0].doc(r).astype(np.int64))
            positives.append(src.stores[1].doc(r).astype(np.int64))
            source.append(k)
    return queries, positives, np.asarray(source, dtype=np.int64)


# -----------------------------------------------------------------------------
# entry points for train.py / bench.py

def build_loader(ds, tok_cfg, collator_cfg, split="train", *, micro_batch_size, grad_accum_steps=1, rank=0,
                 world_size=1, seed=0, prefetch=2, pin_memory=None):
    """The loader train.py uses: StreamingMLMLoader when dataset.streaming, else MLMLoader over dataset.path.
    Run prepare() first (on one rank, then barrier): the shards (or, streaming, the tokenizer) must exist."""
    out = dataset_dir(ds)
    kw = dict(seq_len=ds.max_seq_length, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
              rank=rank, world_size=world_size, seed=seed, collator_cfg=collator_cfg, prefetch=prefetch,
              pin_memory=pin_memory)
    if ds.streaming:
        return StreamingMLMLoader(ds, load_tokenizer(tok_cfg, out), split, **kw)
    if not (out / "manifest.json").is_file():
        raise UserError(f"{out} holds no prepared data: run python data.py CONFIG "
                        f"(or set dataset.pre_tokenize: true)")
    return MLMLoader(out, split, **kw)


def split_rows(data_dir, split, seq_len, pack_sequences=True):
    """The number of rows of seq_len tokens one epoch of a prepared split gives (0 for an empty split): what
    MLMLoader would cut, so a caller can size its batch before building one."""
    store = TokenStore(data_dir, split)
    if store.n_docs == 0:
        return 0
    if pack_sequences:
        return int((store.lengths + 2).sum()) // seq_len
    return int((-(-store.lengths // (seq_len - 2))).sum())


def bench_loader(loader, steps=50, warmup=3):
    """Loader throughput as consumed by a trainer that takes no time: steps/s, micro-batches/s, tokens/s (all
    positions of this rank's rows) and the fraction of those that are real (not padding)."""
    for _ in range(warmup):
        loader.next_step()
    tokens = real = n_batches = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        for b in loader.next_step():
            n_batches += 1
            tokens += b["input_ids"].numel()
            real += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    dt = time.perf_counter() - t0
    return {"steps_per_s": steps / dt, "batches_per_s": n_batches / dt, "tokens_per_s": tokens / dt,
            "real_token_fraction": real / max(tokens, 1)}


def packing_stats(loader):
    """Packed MLMLoader: the fraction of real tokens in its rows (1.0: rows are never padded) and the fraction of
    an epoch's [CLS] doc [SEP] tokens that its full global batches use (the rest is the dropped epoch tail)."""
    used = loader.steps_per_epoch * loader.global_batch_rows * loader.seq_len
    return {"real_token_fraction": 1.0, "epoch_tokens_used": used / int(loader.plan(0).cum_end[-1])}


def run_main(argv, usage: str, work) -> int:
    """The main() of every script: usage on no arguments or -h; a UserError is printed as `error: ...` and exits 2
    (no traceback: it is the user's to fix); Ctrl-C before a loop takes the signal over exits 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        work(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def prepare_only(cfg, bench=False):
    """`python train.py CONFIG --prepare-only [--bench]` (and `python data.py CONFIG`): prepare dataset.path, check
    the tokenizer against model.vocab_size, and with bench measure the training loader. cfg is train.py's Config."""
    out = prepare(cfg.dataset, cfg.tokenizer)
    tok = load_tokenizer(cfg.tokenizer, out)
    check_vocab(tok, cfg.model.vocab_size)
    print(f"{out}: tokenizer of {tok.get_vocab_size()} tokens ready" + ("" if cfg.dataset.streaming else
          f", shards in {out}/train and {out}/val"))
    if bench:
        t = cfg.trainer
        loader = build_loader(cfg.dataset, cfg.tokenizer, cfg.datacollator, micro_batch_size=
                              t.per_device_train_batch_size, grad_accum_steps=t.gradient_accumulation_steps,
                              seed=t.seed)
        if isinstance(loader, MLMLoader) and loader.packed:
            p = packing_stats(loader)
            print(f"packing: {p['real_token_fraction']:.2%} of batch tokens are real, full batches use "
                  f"{p['epoch_tokens_used']:.2%} of an epoch's tokens ({loader.steps_per_epoch} steps/epoch)")
        r = bench_loader(loader, steps=100)
        loader.close()
        print(f"loader: {r['steps_per_s']:,.1f} steps/s, {r['batches_per_s']:,.1f} micro-batches/s, "
              f"{r['tokens_per_s']:,.0f} tokens/s, {r['real_token_fraction']:.2%} real tokens "
              f"(micro-batch {t.per_device_train_batch_size} x {cfg.dataset.max_seq_length})")


if __name__ == "__main__":
    # `python data.py CONFIG [--bench] [...]` is `python train.py CONFIG --prepare-only [...]`: train.py owns the config
    # schema and imports this module, so the command line is its; this module itself never imports train.py
    import train
    sys.exit(train.main(sys.argv[1:] + ["--prepare-only"]))
