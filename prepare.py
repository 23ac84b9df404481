"""Preparing a corpus, once, before training: the tokenizer (a file, the hub, or WordPiece trained on the corpus);
the sources (local files, a hub dataset's parquet files, the stdlib's docstrings) and one row reader for them all
(contrastive.py's pairs and GLUE read through it too); tokenizing in worker processes; the token shards data.py's
loaders read (TokenStore). docs/pretraining.md describes the prepared layout.

    python data.py CONFIG [--section.key value ...]     # prepare dataset.path (tokenizer.json, shards, manifest)
"""

import ast
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import struct
import sys
import sysconfig
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from glob import glob, has_magic
from itertools import groupby, islice
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import hub
from config import UserError, require, warn
from runtime import write_atomic

# -----------------------------------------------------------------------------
# config sections (train.py composes them); each checks its values when built

@dataclass
class TokenizerConfig:
    name: str = "bert-base-uncased"     # hub repo holding a tokenizer.json (used when path is unset and train is false)
    path: Optional[str] = None          # a local tokenizer.json
    train: bool = False                 # train a BERT-style WordPiece vocabulary on the corpus's train split
    vocab_size: int = 30522             # target vocabulary size when training
    min_frequency: int = 2              # when training: minimum count of a merged piece
    lowercase: bool = True              # when training: BERT uncased normalisation

    def __post_init__(self):
        require(self.vocab_size >= 1 and self.min_frequency >= 1, f"tokenizer.vocab_size and tokenizer.min_frequency "
                f"must be >= 1, got {self.vocab_size}, {self.min_frequency}")


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
        require(0 <= self.validation_split < 1,
                f"dataset.validation_split must be in [0, 1), got {self.validation_split}")
        for key, low in (("max_seq_length", 8), ("eval_samples", 0), ("max_documents", 0), ("num_workers", 0),
                         ("shuffle_buffer_size", 1)):
            require(getattr(self, key) >= low, f"dataset.{key} must be >= {low}, got {getattr(self, key)}")


def dataset_dir(ds):
    """The prepared directory: dataset.path, or data_cache/<name> (data_cache/local for data_files)."""
    if ds.path:
        return Path(ds.path)
    name = "local" if ds.data_files else ds.name + (f"-{ds.config}" if ds.config else "")
    return Path("data_cache") / "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def worker_count(n):
    return n if n > 0 else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# -----------------------------------------------------------------------------
# tokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts, vocab_size, min_frequency=2, lowercase=True):
    """A BERT-style WordPiece tokenizer trained on an iterable of strings (streamed). The trainer breaks count ties in
    hash order, so two trainings may differ in rare pieces: prepare() trains once and saves tokenizer.json."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def load_tokenizer(tok_cfg, data_dir=None):
    """The tokenizer.json a prepared data_dir was made with, else tokenizer.path, or tokenizer.name from the hub."""
    if data_dir is not None and (Path(data_dir) / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json"))
    require(not tok_cfg.train, "tokenizer.train is true but no trained tokenizer.json exists yet in "
            f"{str(data_dir)!r}: run python data.py CONFIG first")
    if tok_cfg.path:
        path = Path(tok_cfg.path)
        require(path.is_file(), f"tokenizer.path {str(path)!r} does not exist")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"tokenizer.path {str(path)!r} is not a tokenizers tokenizer.json ({e})") from None
    path = hub.download(tok_cfg.name, "tokenizer.json", what=f"get tokenizer.json of {tok_cfg.name!r}",
                        offline="set HF_HUB_OFFLINE=1 to use the HF cache, or set tokenizer.path to a local "
                                "tokenizer.json or tokenizer.train: true")
    return Tokenizer.from_file(str(path))


def special_token_ids(tokenizer):
    """dict(pad, cls, sep, mask, unk) -> ids; an error names the missing BERT special tokens."""
    ids = {k: tokenizer.token_to_id(f"[{k.upper()}]") for k in ("pad", "cls", "sep", "mask", "unk")}
    missing = [f"[{k.upper()}]" for k, v in ids.items() if v is None]
    require(not missing, f"the tokenizer lacks the special tokens {missing}; a BERT-style tokenizer is needed")
    return ids


def check_vocab(tokenizer, model_vocab_size):
    """The model's vocab_size may exceed the tokenizer's (rounded up for speed), never be smaller."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    require(model_vocab_size >= n, f"model.vocab_size {model_vocab_size} is smaller than the tokenizer's vocabulary "
            f"of {n} tokens; set model.vocab_size >= {n} (e.g. {-(-n // 64) * 64})")


def all_special_ids(tokenizer):
    added = tokenizer.get_added_tokens_decoder().items()
    return sorted(set(special_token_ids(tokenizer).values()) | {tid for tid, tok in added if tok.special})


# -----------------------------------------------------------------------------
# sources: files read one by one, rows in a fixed order; a row's position is (file index, row index in the file),
# counted before dropping empties. One reader serves the corpus, contrastive.py's pairs and GLUE (read_table).

@dataclass
class ReadStats:
    bad_bytes: int = 0          # undecodable bytes skipped
    bad_lines: int = 0          # lines that held undecodable bytes
    bad_records: int = 0        # .jsonl lines that are not a JSON object; records without a column; non-string text
    skipped_files: int = 0      # .py files that do not parse
    empty_documents: int = 0
    first_bad: str = ""         # where the first bad record is: `<file> line N`

    def skip(self, sf, row: int):
        """Count a bad record at row `row` of a .jsonl file or of a .csv/.tsv one (row 0 follows the header)."""
        self.bad_records += 1
        self.first_bad = self.first_bad or f"{sf.name} line {row + (1 if sf.kind == 'jsonl' else 2)}"


@dataclass
class SourceFile:
    name: str                   # shown in messages
    kind: str                   # txt | jsonl | csv | tsv | parquet | py (its docstrings) | stdlib-pairs
    local: Optional[str] = None  # local path, or None for a hub file fetched on first read
    repo: Optional[str] = None
    revision: Optional[str] = None

    def fetch(self):
        if self.local is None:
            self.local = hub.download(self.repo, self.name, repo_type="dataset", revision=self.revision,
                                      what=f"download {self.name} of dataset {self.repo!r}",
                                      offline="download the files and list them in data_files (dataset.data_files, "
                                              "contrastive.sources[i].data_files)")
        return self.local


KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def py_files(root, skip=SKIP_DIRS):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


def local_files(patterns, kinds=KINDS, key="dataset.data_files", label=".txt, .jsonl or .parquet"):
    """The files that local paths, globs and directories name, each once, in sorted order per pattern."""
    files = {}
    for pat in patterns:
        if has_magic(pat):
            matched = sorted(glob(pat, recursive=True))
            require(matched, f"{key} pattern {pat!r} matches no files")
        elif os.path.isdir(pat):
            matched = sorted(str(p) for p in Path(pat).rglob("*") if p.suffix in kinds and p.is_file())
            require(matched, f"{key} directory {pat!r} holds no {label} files")
        else:
            require(os.path.exists(pat), f"{key}: no such file {pat!r}")
            matched = [pat]
        for m in matched:
            if not os.path.isdir(m) and m not in files:
                require(Path(m).suffix in kinds, f"{key}: {m!r} is not {label}")
                files[m] = SourceFile(m, kinds[Path(m).suffix], local=m)
    return list(files.values())


def _match_hub_parquet(files, config, split):
    files = [f for f in files if f.endswith(".parquet")]
    if config:
        files = [f for f in files if f.split("/")[0] == config or f.startswith(f"data/{config}/")]
    else:           # a repo with data/ or default/ keeps its parquet files there
        root = next((r for r in ("data/", "default/") if any(f.startswith(r) for f in files)), "")
        files = [f for f in files if f.startswith(root)]
    parts = {f: f.split("/") for f in files}
    return sorted(f for f, p in parts.items()
                  if p[-1].startswith(f"{split}-") or p[-1] == f"{split}.parquet" or split in p[1:-1])


def hub_files(name, config, split, hint="check dataset.name, or use dataset.data_files for local files",
              offline="list local files in dataset.data_files"):
    """The parquet files of a hub dataset's config and split (listed, not downloaded), or of its parquet branch."""
    listed = []
    for revision in (None, "refs/convert/parquet"):
        try:
            files = hub.list_files(name, repo_type="dataset", revision=revision, what=f"list dataset {name!r}",
                                   offline=offline)
        except UserError:
            raise
        except Exception as e:
            if revision is None:
                raise UserError(f"cannot list dataset {name!r} on the Hugging Face Hub ({type(e).__name__}); "
                                f"{hint}") from None
            continue
        listed += [f for f in files if f.endswith(".parquet")]
        matched = _match_hub_parquet(files, config, split)
        if matched:
            return [SourceFile(f, "parquet", repo=name, revision=revision) for f in matched]
    raise UserError(f"dataset {name!r} has no parquet files for config {config!r} split {split!r}; "
                    f"its parquet files: {sorted(set(listed))[:10] or 'none'}")


def source_files(ds):
    """The corpus's files in reading order (sorted; deterministic)."""
    if ds.data_files:
        return local_files(ds.data_files)
    if ds.name in ("stdlib", "stdlib+packages"):
        files = py_files(sysconfig.get_paths()["stdlib"])
        if ds.name == "stdlib+packages":
            for sp in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
                files += py_files(sp, SKIP_DIRS - {"site-packages", "dist-packages"})
        return [SourceFile(f, "py", local=f) for f in files]
    return hub_files(ds.name, ds.config, ds.train_split)


def _decode(raw, stats):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        s = raw.decode("utf-8", errors="ignore")
        stats.bad_bytes += len(raw) - len(s.encode("utf-8"))
        stats.bad_lines += 1
        return s


def _parse_py(path):
    try:
        return ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None


@lru_cache(maxsize=None)
def py_docstrings(path):
    """The docstrings of a .py file (module, classes, functions), or None when it does not parse."""
    tree = _parse_py(path)
    if tree is None:
        return None
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return tuple(filter(None, (ast.get_docstring(n, clean=True) for n in ast.walk(tree) if isinstance(n, kinds))))


def stdlib_pairs(root):
    """Offline pairs from the standard library: a public function's qualified name and signature (query) -> its
    docstring (positive); the module's next documented function's docstring is a hard negative. Deterministic."""
    for path in py_files(root):
        tree = _parse_py(path)
        if tree is None:
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


RECORD_PROBE = 1000     # this many leading records without a wanted column make a file an error


def read_rows(sf, columns, stats, skip=0, hint="set dataset.text_column"):
    """(row index, [value of each of `columns`]) of one file from row `skip` on (a value may be None or not a string);
    a .txt file (documents separated by blank lines) and a .py file (its docstrings) give one text per row. A record
    without a wanted column is counted and skipped (real corpora have a few); a file whose first RECORD_PROBE records
    all lack one (a wrong column setting) is an error listing its columns (`hint`: the setting to fix)."""
    if sf.kind == "py":
        docs = py_docstrings(sf.local)
        if docs is None:
            stats.skipped_files += 1
            return
        yield from ((row, [doc]) for row, doc in enumerate(docs[skip:], start=skip))
    elif sf.kind == "txt":
        with open(sf.fetch(), "rb") as f:
            lines = groupby((_decode(raw, stats) for raw in f), key=lambda line: bool(line.strip()))
            docs = ("".join(group) for text, group in lines if text)
            yield from ((row, [doc.strip()]) for row, doc in islice(enumerate(docs), skip, None))
    elif sf.kind == "parquet":
        yield from _parquet_rows(sf, columns, stats, skip, hint)
    else:
        seen, lacking, names = False, 0, {}
        for row, rec in _records(sf, stats, skip):
            if all(c in rec for c in columns):
                seen = True
                yield row, [rec[c] for c in columns]
                continue
            lacking += 1
            names.update(dict.fromkeys(rec))
            stats.skip(sf, row)
            if not seen and lacking >= RECORD_PROBE:
                break
        if lacking and not seen:
            _no_column(sf, columns, names, hint, f" in any of its first {lacking} records")


def _no_column(sf, columns, names, hint, where=""):
    missing = next((c for c in columns if c not in names), columns[0])
    raise UserError(f"{sf.name} has no column {missing!r}{where}; its columns: {list(names)} ({hint})")


def _records(sf, stats, skip, strict=False, header=None):
    """(row index, record) of a .jsonl/.csv/.tsv file or of the stdlib pairs from row `skip` on. A .jsonl line that is
    not a JSON object is counted and skipped; with `strict` (GLUE) it is an error, as is a CSV row of another width. A
    .tsv is split on tabs, unquoted (QQP and MNLI hold unbalanced quotes); `header` names a headerless file's columns
    (CoLA). Extra fields are ignored (some STS-B rows); a row with fewer (a few in QQP's train.tsv) is skipped."""
    if sf.kind == "stdlib-pairs":
        yield from islice(enumerate(stdlib_pairs(sf.local)), skip, None)
    elif sf.kind in ("csv", "tsv"):
        import csv
        tsv = sf.kind == "tsv"
        with open(sf.fetch(), encoding="utf-8-sig", errors="replace", newline="\n" if tsv else "") as f:
            lines = (ln.rstrip("\r\n").split("\t") for ln in f if ln.strip()) if tsv else filter(None, csv.reader(f))
            header = header or next(lines, [])
            for row, fields in islice(enumerate(lines), skip, None):
                if strict and not tsv and len(fields) != len(header):
                    raise UserError(f"{sf.name} row {row + 2} has {len(fields)} fields but the header has "
                                    f"{len(header)}")
                if len(fields) < len(header):
                    stats.skip(sf, row)
                else:
                    yield row, dict(zip(header, fields))
    else:
        with open(sf.fetch(), "rb") as f:
            for row, raw in islice(enumerate(f), skip, None):
                if not raw.strip():
                    continue
                rec, why = None, "not a JSON object"
                try:
                    rec = json.loads(_decode(raw, stats))
                except json.JSONDecodeError as e:
                    why = f"not JSON ({e.msg}); one object per line is expected"
                if isinstance(rec, dict):
                    yield row, rec
                elif strict:
                    raise UserError(f"{sf.name} line {row + 1} is {why}")
                else:
                    stats.skip(sf, row)


def _parquet_file(sf):
    import pyarrow.parquet as pq
    path = sf.fetch()  # its errors are its own
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{sf.name} is not a readable parquet file ({' '.join(str(e).split())})") from None


def _parquet_rows(sf, columns, stats, skip, hint):
    import pyarrow as pa
    pf = _parquet_file(sf)
    schema = pf.schema_arrow
    if any(c not in schema.names for c in columns):
        _no_column(sf, columns, schema.names, hint)
    textual = [f.name for f in schema if f.type in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary(),
                                                     pa.null())]
    for c in columns:
        require(c in textual, f"{sf.name}: column {c!r} holds {schema.field(c).type}, not text; its text columns: "
                f"{textual} ({hint})")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=list(dict.fromkeys(columns))):
        if row + batch.num_rows > skip:
            values = [batch.column(c).to_pylist() for c in columns]
            for i in range(max(skip - row, 0), batch.num_rows):
                yield row + i, [_decode(v[i], stats) if isinstance(v[i], bytes) else v[i] for v in values]
        row += batch.num_rows


def check_sources(files, columns, hint="set dataset.text_column"):
    """Read each local file's first row, so a wrong column setting or unreadable file fails before any work."""
    for sf in files:
        if sf.local is not None and sf.kind not in ("txt", "py"):
            next(read_rows(sf, columns, ReadStats(), hint=hint), None)   # the generator closes its file when dropped


def read_table(path, header=None):
    """{column: list of values} of a whole .parquet, .jsonl, .csv or .tsv file, read strictly (small labelled sets:
    GLUE); a column of any type is kept (integer and float labels); an empty file is an error (nothing to score)."""
    sf, stats = SourceFile(str(path), Path(path).suffix[1:].lower(), local=str(path)), ReadStats()
    if sf.kind == "parquet":
        table = _parquet_file(sf).read().to_pydict()
    else:
        records = [rec for _, rec in _records(sf, stats, 0, strict=True, header=header)]
        table = {c: [r.get(c) for r in records] for c in dict.fromkeys(k for r in records for k in r)}
    if stats.bad_records:
        warn(f"{path}: skipped {stats.bad_records} malformed rows (fewer tab-separated fields than the header); "
             f"the first: {stats.first_bad}")
    require(any(table.values()), f"{path} holds no examples (an empty split)")
    return table


def iter_documents(ds, files=None, start=(0, 0), stats=None):
    """(file index, row index, text) of every non-empty document from position `start`, one file at a time."""
    files = source_files(ds) if files is None else files
    stats = ReadStats() if stats is None else stats
    for fi in range(start[0], len(files)):
        for ri, (text,) in read_rows(files[fi], [ds.text_column], stats, skip=start[1] if fi == start[0] else 0):
            if text is not None and not isinstance(text, str):
                stats.skip(files[fi], ri)
            elif not text or not text.strip():
                stats.empty_documents += 1
            else:
                yield fi, ri, text


def held_out(position, fraction):
    """Whether the row at `position` ("file:row") is held out: its hash is below `fraction` (the same every run)."""
    h = hashlib.blake2b(position.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def _is_validation(ds, fi, ri, ordinal):
    """Held-out rule of prepare() and streaming: the first eval_samples documents, else held_out("file:row")."""
    return ordinal < ds.eval_samples if ds.eval_samples > 0 else held_out(f"{fi}:{ri}", ds.validation_split)


def iter_split(ds, split, files=None, start=(0, 0, 0), stats=None):
    """(file, row, ordinal, text) of one split's documents ('train' | 'val', None: both) from source position `start`;
    ordinal counts the documents of both splits from the corpus's start (up to dataset.max_documents)."""
    ordinal = start[2]
    for fi, ri, text in iter_documents(ds, files, (start[0], start[1]), stats):
        if (ds.max_documents and ordinal >= ds.max_documents) or (split == "val" and 0 < ds.eval_samples <= ordinal):
            return
        if split is None or _is_validation(ds, fi, ri, ordinal) == (split == "val"):
            yield fi, ri, ordinal, text
        ordinal += 1


# -----------------------------------------------------------------------------
# tokenizing in worker processes (bounded queue: the corpus is never materialised)

_WORKER_TOKENIZER = None


def _worker_init(tok_json):
    global _WORKER_TOKENIZER
    # signals are the parent's business: out of its process group, Ctrl-C or a SIGTERM to the group cannot kill a
    # worker mid-task (that hung pending results); no inherited handler (train.py's made Pool.terminate() hang)
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
        self.num_workers, self.pool, self.tokenizer = num_workers, None, tokenizer
        if num_workers > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes do the parallelism; no rayon after fork
            ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ctx.Pool(num_workers, initializer=_worker_init, initargs=(tokenizer.to_str(),))

    def map(self, chunks):
        """Yield (item, lengths, ids) for (item, texts) chunks, in order, at most 2 chunks per worker in flight."""
        if self.pool is None:
            yield from ((item, *_encode_chunk(texts, self.tokenizer)) for item, texts in chunks)
            return
        pending = deque()
        for item, texts in chunks:
            pending.append((item, self.pool.apply_async(_encode_chunk, (texts,))))
            if len(pending) >= 2 * self.num_workers:
                item, job = pending.popleft()
                yield item, *job.get()
        yield from ((item, *job.get()) for item, job in pending)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def chunked(items, n):
    """Lists of n items (the last one shorter) from an iterable, read lazily."""
    it = iter(items)
    return iter(lambda: list(islice(it, n)), [])


# -----------------------------------------------------------------------------
# shards: a 32-byte header (magic, version, itemsize, token count) then raw little-endian uint16/uint32 tokens;
# index.npy: int64 start offsets of the documents in the split's concatenated shards, plus the total at the end.

SHARD_MAGIC = b"NEOBTOK\x00"
SHARD_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")      # 32 bytes
FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 27                  # ~128M tokens (256 MB of uint16) per shard


def token_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Append documents to <dir>/shard_XXXXX.bin(.tmp), a shard renamed when complete; the directory is emptied first
    (what an interrupted run left there)."""

    def __init__(self, out_dir, dtype, shard_tokens=SHARD_TOKENS):
        self.dir, self.dtype, self.shard_tokens = Path(out_dir), dtype, shard_tokens
        shutil.rmtree(self.dir, ignore_errors=True)         # leftovers of an interrupted run
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
        """Documents as lengths + concatenated ids; a shard closes after the document that fills it (none straddles)."""
        ids = ids.astype(self.dtype, copy=False)
        ends = np.cumsum(lengths)
        self.offsets.extend((ends + self.offsets[-1]).tolist())
        doc = tok = 0
        while doc < len(lengths):
            if self.f is None:
                self.f = open(self.dir / f"shard_{len(self.shards):05d}.bin.tmp", "wb")
                self.f.write(b"\0" * HEADER.size)
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
    """The tokens of a shard (memory-mapped) whose header and size match what manifest.json says of it."""
    again = f"delete {path.parent.parent} and prepare again"
    require(path.is_file(), f"token shard {path} is missing; {again}")
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    require(len(head) == HEADER.size and head[:8] == SHARD_MAGIC, f"{path} is not a neobert token shard (bad "
            f"header); {again}")
    _, version, itemsize, count = HEADER.unpack(head)
    require((version, itemsize, count) == (SHARD_VERSION, dtype.itemsize, n_tokens), f"{path}: header says version "
            f"{version}, {itemsize}-byte tokens, {count} tokens; manifest.json expects version {SHARD_VERSION}, "
            f"{dtype.itemsize}-byte, {n_tokens}")
    size, expected = path.stat().st_size, HEADER.size + n_tokens * dtype.itemsize
    require(size == expected, f"{path} is truncated or has trailing bytes: {size} bytes, expected {expected}; {again}")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(n_tokens,))


def read_manifest(data_dir):
    path = Path(data_dir) / "manifest.json"
    require(path.is_file(), f"{str(data_dir)!r} is not a prepared dataset (no manifest.json); "
            f"run python data.py CONFIG")
    try:
        man = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    require(man.get("format_version") == FORMAT_VERSION, f"{path} has format_version {man.get('format_version')!r}; "
            f"this data.py reads {FORMAT_VERSION}: prepare the data again")
    return man


class TokenStore:
    """One split of a prepared dir: memory-mapped shards and the document index (all it holds in RAM). The split is
    validated once, here: manifest.json's format version, each shard's header and size, the index against the shards."""

    def __init__(self, data_dir, split="train"):
        self.dir, self.split = Path(data_dir), split
        self.manifest = man = read_manifest(data_dir)
        require(split in man["splits"], f"{data_dir} has no split {split!r}; it has {sorted(man['splits'])}")
        info, self.dtype = man["splits"][split], np.dtype(man["dtype"])
        self.shards = [_check_shard(self.dir / split / sh["file"], sh["tokens"], self.dtype) for sh in info["shards"]]
        self.shard_starts = np.cumsum([0] + [sh["tokens"] for sh in info["shards"]], dtype=np.int64)
        self.n_docs, self.n_tokens = info["documents"], int(self.shard_starts[-1])
        index = self.dir / split / "index.npy"
        try:
            self.offsets = offsets = np.load(index, allow_pickle=False)
        except Exception as e:  # missing, unreadable or truncated
            raise UserError(f"document index {index} is missing or unreadable ({e}); delete {data_dir} and prepare "
                            f"again") from None
        require(offsets.dtype == np.int64 and offsets.shape == (self.n_docs + 1,) and offsets[0] == 0
                and offsets[-1] == self.n_tokens and not np.any(np.diff(offsets) < 0), f"document index {index} does "
                f"not match its shards ({self.n_docs} documents, {self.n_tokens} tokens expected); delete {data_dir} "
                f"and prepare again")
        self.lengths = np.diff(offsets)

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
            "data_files": list(ds.data_files), "text_column": ds.text_column, "validation_split": ds.validation_split,
            "eval_samples": ds.eval_samples, "max_documents": ds.max_documents}


def _tokenizer_spec(tok_cfg, ds):
    if tok_cfg.path:
        path = Path(tok_cfg.path)
        return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None}
    if tok_cfg.train:
        return {"train": True, "vocab_size": tok_cfg.vocab_size, "min_frequency": tok_cfg.min_frequency,
                "lowercase": tok_cfg.lowercase, "corpus": _source_spec(ds)}
    return {"name": tok_cfg.name}


def spec_diff(old, new, prefix):
    """`prefix.key: old -> new` for each difference of two specs; nested ones (dicts, lists of dicts) name leaf keys."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, dict) for x in a + b):
            a, b = dict(enumerate(a)), dict(enumerate(b))
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_diff(a, b, f"{prefix}.{k}")
        elif a != b:
            out.append(f"{prefix}.{k}: {a!r} -> {b!r}")
    return out


def is_prepared(out, changes, made_from, key):
    """Whether `out` is a finished prepared directory (manifest.json is written last). One made from another spec
    (changes(manifest) lists the differences) is refused: reading it would silently train on other data."""
    if not (Path(out) / "manifest.json").is_file():
        return False
    diff = changes(read_manifest(out))
    require(not diff, f"{out} was prepared from {made_from} ({'; '.join(diff)}); delete it or set another {key}")
    return True


def write_json(path, obj):
    write_atomic(Path(path), json.dumps(obj, indent=2) + "\n")


def save_tokenizer(tok, out):
    write_atomic(Path(out) / "tokenizer.json", tok.to_str(pretty=True))


def write_shards(out, rows, fields, tokenizer, num_workers, *, shard_tokens=SHARD_TOKENS, desc, unit, progress):
    """Tokenize rows (is_val, [text of each field]) in worker processes into shards: out/<split>/ for a corpus's one
    unnamed field (fields [""]), out/<split>.<field>/ for pairs; row i of a split is document i of each field. A row
    with a text of no tokens is dropped. -> (shard info per directory, rows per split, rows dropped)."""
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    dirs = {(s, f): f"{s}.{f}" if f else s for s in ("train", "val") for f in fields}
    writers = {key: ShardWriter(out / d, dtype, shard_tokens) for key, d in dirs.items()}
    # a chunk's texts go field by field (all queries, all positives, ...) so one encode call serves them all
    chunks = ((np.asarray([v for v, _ in c], dtype=bool), [texts[k] for k in range(len(fields)) for _, texts in c])
              for c in chunked(rows, 256))
    from tqdm import tqdm
    encoder = Encoder(tokenizer, num_workers)
    bar = tqdm(desc=desc, unit=unit, unit_scale=True, file=sys.stderr, mininterval=0.5, disable=not progress)
    t0, n_tok, counts, dropped = time.time(), 0, {"train": 0, "val": 0}, 0
    try:
        for is_val, lengths, ids in encoder.map(chunks):
            lengths = lengths.reshape(len(fields), len(is_val))
            keep = (lengths > 0).all(axis=0)
            dropped += int((~keep).sum())
            ids_per_field = np.split(ids, np.cumsum(lengths.sum(axis=1))[:-1])
            for split, sel in (("train", ~is_val & keep), ("val", is_val & keep)):
                counts[split] += int(sel.sum())
                if sel.any():
                    for f, field_lengths, field_ids in zip(fields, lengths, ids_per_field):
                        writers[split, f].write_docs(field_lengths[sel], field_ids[np.repeat(sel, field_lengths)])
            n_tok += int(lengths.sum())
            bar.update(len(is_val))
            bar.set_postfix_str(f"{n_tok / max(time.time() - t0, 1e-9):,.0f} tokens/s", refresh=False)
    finally:
        encoder.close()
        bar.close()
    return {dirs[key]: w.finish() for key, w in writers.items()}, counts, dropped


def _prepare_tokenizer(ds, tok_cfg, spec, out, files):
    """tokenizer.json (+ tokenizer_spec.json) in `out`; reused when its spec matches."""
    spec_path, tok_path = out / "tokenizer_spec.json", out / "tokenizer.json"
    if tok_path.is_file() and spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return Tokenizer.from_file(str(tok_path))
    if tok_cfg.train:
        print(f"training a WordPiece tokenizer (vocab_size {tok_cfg.vocab_size}) on {dataset_label(ds)}", flush=True)
        t0 = time.time()
        texts = (text for _, _, _, text in iter_split(ds, "train", files))
        tok = train_tokenizer(texts, tok_cfg.vocab_size, tok_cfg.min_frequency, tok_cfg.lowercase)
        print(f"trained {tok.get_vocab_size()} tokens in {time.time() - t0:.1f}s", flush=True)
    else:
        tok = load_tokenizer(tok_cfg)
    special_token_ids(tok)
    save_tokenizer(tok, out)
    write_json(spec_path, spec)
    return tok


def dataset_label(ds):
    if ds.data_files:
        return f"local files {ds.data_files}"
    if ds.name.startswith("stdlib"):
        return f"the docstrings of the Python {ds.name} ({sysconfig.get_paths()['stdlib']})"
    return f"hub dataset {ds.name} (config {ds.config}, split {ds.train_split})"


def prepare(ds, tok_cfg, *, shard_tokens=SHARD_TOKENS, progress=True):
    """Build dataset.path (returned): tokenizer.json, train/ and val/ shards, manifest.json (written last: it marks a
    complete directory). A finished one returns at once (if made from the same source and tokenizer); an interrupted
    one is rebuilt. Streaming prepares only the tokenizer. Call it on one rank only (then barrier)."""
    out, source, tok_spec = dataset_dir(ds), _source_spec(ds), _tokenizer_spec(tok_cfg, ds)

    def changes(man):
        return spec_diff(man["source"], source, "dataset") + spec_diff(man["tokenizer"]["spec"], tok_spec, "tokenizer")
    if is_prepared(out, changes, "another source or tokenizer", "dataset.path"):
        return out
    files = source_files(ds)                # bad paths and globs fail here, before any work
    check_sources(files, [ds.text_column])  # and a text_column missing from a local file
    out.mkdir(parents=True, exist_ok=True)
    tok = _prepare_tokenizer(ds, tok_cfg, tok_spec, out, files)
    if ds.streaming:
        return out
    stats, t0 = ReadStats(), time.time()
    rows = ((_is_validation(ds, fi, ri, ordinal), [text])
            for fi, ri, ordinal, text in iter_split(ds, None, files, stats=stats))
    splits, _, n_empty = write_shards(out, rows, [""], tok, worker_count(ds.num_workers), shard_tokens=shard_tokens,
                                      desc=f"tokenize {out}", unit=" docs", progress=progress)
    require(splits["train"]["documents"] > 0, f"the corpus is empty: no training documents with text in "
            f"{dataset_label(ds)}" + (f" ({stats.empty_documents} empty)" if stats.empty_documents else ""))
    report_stats(stats, [ds.text_column])
    stats.empty_documents += n_empty
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    write_json(out / "manifest.json", {
        "format_version": FORMAT_VERSION, "source": source,
        "tokenizer": {"spec": tok_spec, "vocab_size": vocab_size,
                      "sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest(),
                      "special_ids": special_token_ids(tok), "all_special_ids": all_special_ids(tok)},
        "dtype": token_dtype(vocab_size).name, "splits": splits, "skipped": asdict(stats),
        "seconds": round(time.time() - t0, 2)})
    t, v = splits["train"], splits["val"]
    print(f"prepared {out}: train {t['documents']:,} docs / {t['tokens']:,} tokens, "
          f"val {v['documents']:,} docs / {v['tokens']:,} tokens in {time.time() - t0:.1f}s", flush=True)
    return out


def report_stats(stats, columns):
    if stats.bad_bytes:
        warn(f"skipped {stats.bad_bytes} undecodable bytes in {stats.bad_lines} lines (not UTF-8)")
    if stats.bad_records:
        warn(f"skipped {stats.bad_records} records that were not JSON objects with a string "
             f"{' and '.join(map(repr, columns))} (including records without one); the first: {stats.first_bad}")
    if stats.skipped_files:
        warn(f"skipped {stats.skipped_files} .py files that do not parse")
