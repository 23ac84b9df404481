"""The data a researcher edits: which tokens are predicted (Masker), how documents become rows (pack_rows), the batch
format (Collator), and the loaders that turn a prepared or a streamed corpus into each step's micro-batches. Making a
corpus ready (tokenizer, sources, token shards) is prepare.py's.

    python data.py CONFIG [--section.key value ...]     # prepare the data (= python train.py CONFIG --prepare-only)

Determinism: a step's global batch (all rows of all ranks and micro-steps) is a function of (seed, epoch, row
position) only; rank r takes rows [r*B_r, (r+1)*B_r) of it, micro-step m the m-th micro_batch_size slice of those.
Masks are seeded by (seed, epoch, row index) (streaming: (seed, row number)), never the rank, so 1 rank x batch 8,
1 rank x 4 x 2 accumulation and 2 ranks x 4 see the same rows with the same masks.

Reading order: config -> masking -> packing and the batch format -> Loader (prefetch, position) -> the prepared
loader -> the streaming loader -> build_loader, the prepare command.
"""

import hashlib
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from config import require
from neobert import batch_sequences
from prepare import (Encoder, ReadStats, TokenStore, all_special_ids, check_sources, check_vocab, chunked,
                     dataset_dir, dataset_label, iter_split, load_tokenizer, prepare, report_stats, source_files,
                     special_token_ids, worker_count)

# -----------------------------------------------------------------------------
# config: the datacollator section (dataset and tokenizer are prepare.py's)

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


PERM_STREAM, MASK_STREAM = 0x7065726D, 0x6D61736B    # keep the permutation and mask RNG streams apart


def seeded_rng(*key):
    return np.random.default_rng([int(k) % 2**63 for k in key])


# -----------------------------------------------------------------------------
# masking

class Masker:
    """Select round(mlm_probability x the row's non-special tokens) of them, uniformly (an exact count per row, as in
    cramming: a row never has more than predictions_per_row to predict, so the decoder's shape is fixed); selected ->
    [MASK] (mask_all), or 80% [MASK] / 10% a random non-special id / 10% unchanged. labels = original id where
    selected, else -100. The same random draws are made in both modes, so a row's selection does not depend on
    mask_all."""

    def __init__(self, cfg, mask_id: int, never_ids, vocab_size: int):
        self.p, self.mask_all, self.mask_id = cfg.mlm_probability, cfg.mask_all, mask_id
        self.never = np.asarray(sorted(never_ids), dtype=np.int64)
        self.random_ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), self.never)

    def __call__(self, ids, rng):
        n, eligible = len(ids), ~np.isin(ids, self.never)
        keys = np.where(eligible, rng.random(n), 2.0)  # the eligible tokens with the k smallest keys are selected
        selected = np.zeros(n, dtype=bool)
        selected[np.argsort(keys, kind="stable")[:int(self.p * eligible.sum() + 0.5)]] = True
        how = rng.random(n)
        random_ids = self.random_ids[rng.integers(0, len(self.random_ids), n)]
        if self.mask_all:
            inputs = np.where(selected, self.mask_id, ids)
        else:
            inputs = np.where(selected & (how < 0.8), self.mask_id, ids)
            inputs = np.where(selected & (how >= 0.8) & (how < 0.9), random_ids, inputs)
        return inputs, np.where(selected, ids, -100)


# -----------------------------------------------------------------------------
# packing and the batch format

def pack_rows(docs, seq_len, cls, sep, offset=0):
    """Both MLM loaders' packing rule: units [CLS] doc [SEP] of `docs` ((key, tokens) pairs) from token `offset` of
    the first, cut into rows of exactly seq_len (a unit crossing a row boundary goes on as a new segment, nothing is
    padded). Yields (ids int64 [seq_len], segment lengths, key, offset of the next token in key's unit)."""
    pieces, segs, filled = [], [], 0
    for key, doc in docs:
        n = len(doc) + 2
        while offset < n:
            end = min(n, offset + seq_len - filled)
            if offset == 0:
                pieces.append([cls])
            pieces.append(doc[max(offset - 1, 0):end - 1])     # of a memmap view, only this slice is read
            if end == n:
                pieces.append([sep])
            segs.append(end - offset)
            filled, offset = filled + end - offset, end
            if filled == seq_len:
                yield np.concatenate(pieces, dtype=np.int64), segs, key, offset
                pieces, segs, filled = [], [], 0
        offset = 0


def pin_batch(batch):
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


def predictions_per_row(p: float, seq_len: int) -> int:
    """The decoder positions per row: ceil(p x S) rounded up to a multiple of 8 (at most S), never fewer than Masker
    selects in a row of S tokens."""
    return min(seq_len, 8 * math.ceil(p * seq_len / 8))


class Collator:
    """Rows -> an MLM batch. A row is (ids, segment lengths (packed) or None, rng key): its masks depend only on the
    key, so not on the rank, the micro-step or the padding.
    Packed -> input_ids, labels, position_ids [B, S], cu_seqlens int32 [N+1] over the flattened B*S tokens (every row
    start is a segment start), max_seqlen = S (a bound on every segment, the same in every batch). Padded ->
    input_ids, labels, attention_mask [B, L], L = the longest row rounded up to pad_to_multiple_of (at most S). Both
    also hold predictions_per_row (see neobert.NeoBERTLMHead)."""

    def __init__(self, cfg, special: dict, never_ids, vocab_size: int, seq_len: int, pin_memory=None):
        self.cfg = cfg or DataCollatorConfig()
        self.seq_len, self.packed = seq_len, self.cfg.pack_sequences
        self.cls, self.sep, self.pad_id = (special[k] for k in ("cls", "sep", "pad"))
        self.masker = Masker(self.cfg, special["mask"], never_ids, vocab_size)
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory

    def __call__(self, rows) -> dict:
        inputs, labels = zip(*(self.masker(ids, seeded_rng(*key)) for ids, _, key in rows))
        if self.packed:
            segs = [n for _, row_segs, _ in rows for n in row_segs]
            positions = np.concatenate([np.arange(n) for n in segs]).reshape(len(rows), -1)
            batch = {"input_ids": torch.from_numpy(np.stack(inputs)), "labels": torch.from_numpy(np.stack(labels)),
                     "position_ids": torch.from_numpy(positions), "max_seqlen": self.seq_len,
                     "cu_seqlens": torch.from_numpy(np.cumsum([0, *segs]).astype(np.int32))}
        else:
            multiple = self.cfg.pad_to_multiple_of
            padded = batch_sequences(inputs, self.pad_id, multiple=multiple)
            padded["labels"] = batch_sequences(labels, -100, multiple=multiple)["input_ids"]
            batch = {k: padded[k][:, :self.seq_len].contiguous() for k in ("input_ids", "labels", "attention_mask")}
        batch["predictions_per_row"] = predictions_per_row(self.cfg.mlm_probability, batch["input_ids"].shape[1])
        return pin_batch(batch) if self.pin else batch


# -----------------------------------------------------------------------------
# Loader: a step generator run ahead in a thread, and the position after the last step it returned

def rank_rows(micro_batch_size, grad_accum_steps=1, rank=0, world_size=1):
    """(rows of a global batch, this rank's row indices in it per micro-step)."""
    first = rank * micro_batch_size * grad_accum_steps
    return micro_batch_size * grad_accum_steps * world_size, [
        list(range(first + m * micro_batch_size, first + (m + 1) * micro_batch_size)) for m in range(grad_accum_steps)]


class Loader:
    """What the trainer uses of every loader: next_step() -> this rank's micro-batches of the next optimizer step;
    state_dict() -> the position after the last step returned (a small JSON dict, what a checkpoint saves);
    load_state_dict(state) resumes there. steps(state) is a generator of (micro-batches, state after them) from a
    position; a daemon thread runs it up to `prefetch` steps ahead (0: in the caller). `settings` are the state's keys
    a resumed run must share (kind, seed, ...); `info` becomes attributes (global_batch_rows, row, ...)."""

    def __init__(self, steps, state: dict, settings, prefetch: int = 2, on_close=None, **info):
        self.steps, self.state, self.settings, self.prefetch = steps, dict(state), set(settings), prefetch
        self.on_close = on_close
        self.items = self.thread = self.error = None
        self.__dict__.update(info)

    def next_step(self) -> list:
        if self.error is not None:  # a failed generator fails every later call the same way
            raise self.error
        if self.items is None:
            self.items = self.steps(dict(self.state))
            if self.prefetch > 0:
                self.queue, self.stop = queue.Queue(self.prefetch), threading.Event()
                self.thread = threading.Thread(target=run_ahead, args=(self.items, self.queue, self.stop), daemon=True)
                self.thread.start()
        item = self.queue.get() if self.thread is not None else next_item(self.items)
        if isinstance(item, Exception):
            self.error = item
            raise item
        batches, self.state = item
        return batches

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict):
        for k, v in self.state.items():
            require(k in state, f"loader state lacks {k!r}; it was saved by another loader kind")
            require(k not in self.settings or state[k] == v, f"loader state was saved with {k} = {state[k]!r}, "
                    f"this run has {v!r}; resume with the same setting")
        self.stop_thread()
        self.state = {k: state[k] for k in self.state}

    def stop_thread(self):
        """Stop the background thread (a later next_step() restarts it from the last state returned)."""
        if self.thread is not None:
            self.stop.set()
            while not self.queue.empty():
                self.queue.get_nowait()
            self.thread.join(timeout=10)
        self.items = self.thread = self.error = None

    def close(self):
        self.stop_thread()
        if self.on_close is not None:
            self.on_close()

    def __del__(self):
        try:
            self.stop_thread()
        except Exception:
            pass


def next_item(items):
    try:
        return next(items)
    except Exception as e:  # handed to the consumer, as the thread does
        return e


def run_ahead(items, q, stop):
    while not stop.is_set():
        item = next_item(items)
        q.put(item)  # close() empties the queue after setting stop: a put blocked here returns
        if isinstance(item, Exception):
            return


# -----------------------------------------------------------------------------
# the prepared loader: rows of an epoch by random access into prepared shards

def epoch_units(lengths, seq_len, packed):
    """(start of each unit, rows) of documents of these lengths in this order. Packed, a unit is [CLS] doc [SEP]
    and the units' tokens are cut into rows of seq_len; padded, a unit is the rows a document's chunks take."""
    sizes = lengths + 2 if packed else -(-lengths // (seq_len - 2))
    return np.cumsum(sizes) - sizes, int(sizes.sum()) // (seq_len if packed else 1)


def split_rows(data_dir, split, seq_len, pack_sequences=True, store=None):
    """Rows of seq_len tokens one epoch of a prepared split gives, as prepared_loader cuts them (0 for none)."""
    return epoch_units((store or TokenStore(data_dir, split)).lengths, seq_len, pack_sequences)[1]


def prepared_loader(data_dir, split="train", *, seq_len, micro_batch_size, grad_accum_steps=1, rank=0, world_size=1,
                    seed=0, collator_cfg=None, prefetch=2, pin_memory=None, store=None) -> Loader:
    """MLM batches from prepared shards (store: the split already opened). Packed: each epoch packs (pack_rows) the
    documents in a seeded permutation; row r is found by a binary search in the unit starts (random access; only the
    document index and the permutation are in RAM). Padded: one [CLS] chunk [SEP] per row, chunks of seq_len - 2.
    Position = (epoch, row); a step that does not fit into the epoch's rows starts the next epoch at row 0."""
    store = store or TokenStore(data_dir, split)
    tok = store.manifest["tokenizer"]
    collate = Collator(collator_cfg, tok["special_ids"], tok["all_special_ids"], tok["vocab_size"], seq_len, pin_memory)
    G, micro_rows = rank_rows(micro_batch_size, grad_accum_steps, rank, world_size)
    n_rows = epoch_units(store.lengths, seq_len, collate.packed)[1]  # the same in every epoch
    require(n_rows >= G, f"the {split} split of {data_dir} gives {n_rows} rows of {seq_len} tokens per epoch, fewer "
            f"than one global batch of {G} rows; use more data, a smaller batch or a smaller dataset.max_seq_length")

    @lru_cache(maxsize=2)  # this epoch's and the next one's
    def plan(epoch):  # (document order, start of each unit in that order)
        perm = seeded_rng(PERM_STREAM, seed, epoch).permutation(store.n_docs)
        return perm, epoch_units(store.lengths[perm], seq_len, collate.packed)[0]

    def row(epoch, r):
        """(ids int64, segment lengths or None) of row r of an epoch."""
        perm, starts = plan(epoch)
        u = int(np.searchsorted(starts, r * seq_len if collate.packed else r, side="right")) - 1
        if collate.packed:
            docs = ((d, store.doc(int(d))) for d in perm[u:])
            return next(pack_rows(docs, seq_len, collate.cls, collate.sep, r * seq_len - int(starts[u])))[:2]
        chunk, k = seq_len - 2, r - int(starts[u])
        body = store.doc(int(perm[u]))[k * chunk:(k + 1) * chunk]
        return np.concatenate([[collate.cls], body, [collate.sep]], dtype=np.int64), None

    def steps(state):
        epoch, r = state["epoch"], state["row"]
        while True:
            if r + G > n_rows:
                epoch, r = epoch + 1, 0
            yield [collate([(*row(epoch, r + i), (MASK_STREAM, seed, epoch, r + i)) for i in idx])
                   for idx in micro_rows], {**state, "epoch": epoch, "row": r + G}
            r += G

    settings = {"kind": "packed" if collate.packed else "padded", "split": split, "seed": seed, "seq_len": seq_len,
                "documents": store.n_docs}
    return Loader(steps, {**settings, "epoch": 0, "row": 0}, settings, prefetch, global_batch_rows=G, row=row,
                  plan=plan, rows_per_epoch=n_rows, steps_per_epoch=n_rows // G, seq_len=seq_len, store=store,
                  packed=collate.packed)


# -----------------------------------------------------------------------------
# the streaming loader: the corpus tokenized on the fly (dataset.streaming)

def streaming_loader(ds, tokenizer, split="train", *, seq_len, micro_batch_size, grad_accum_steps=1, rank=0,
                     world_size=1, seed=0, collator_cfg=None, prefetch=2, pin_memory=None) -> Loader:
    """Packed MLM batches tokenized on the fly: the split's documents in reading order, in windows of
    dataset.shuffle_buffer_size tokenized by the workers, shuffled by (seed, epoch, window), packed (pack_rows); row
    n is masked by (seed, n). The state is the next token's position (epoch, window's source position, window,
    document, offset): a resume re-tokenizes only that window and yields exactly the uninterrupted run's batches while
    files, seed, shuffle buffer, max_seq_length and tokenizer are unchanged; batch and world size may change. Every
    rank tokenizes the whole stream and keeps its own rows: give each rank enough dataset.num_workers."""
    collate = Collator(collator_cfg, special_token_ids(tokenizer), all_special_ids(tokenizer),
                       tokenizer.get_vocab_size(with_added_tokens=True), seq_len, pin_memory)
    require(collate.packed, "dataset.streaming supports packed rows only: set datacollator.pack_sequences: true")
    files = source_files(ds)
    check_sources(files, [ds.text_column])
    G, micro_rows = rank_rows(micro_batch_size, grad_accum_steps, rank, world_size)
    encoder = Encoder(tokenizer, worker_count(ds.num_workers))

    def docs(state):
        """((epoch, window's source position, window, document within it), tokens) from the state's document on."""
        epoch, pos, w, first, stats = state["epoch"], (state["file"], state["row"], state["ordinal"]), \
            state["window"], state["doc"], ReadStats()
        while True:
            reader = iter_split(ds, split, files, start=pos, stats=stats)
            while items := list(islice(reader, ds.shuffle_buffer_size)):   # the reader stays open
                window = []
                for _, lengths, ids in encoder.map((None, c) for c in chunked([t for *_, t in items], 256)):
                    window += np.split(ids.astype(np.int64), np.cumsum(lengths)[:-1])
                order = seeded_rng(PERM_STREAM, seed, epoch, w).permutation(len(window))
                yield from (((epoch, pos, w, i), window[order[i]]) for i in range(first, len(window)))
                fi, ri, ordinal, _ = items[-1]
                pos, w, first = (fi, ri + 1, ordinal + 1), w + 1, 0
            require(pos != (0, 0, 0), f"streaming: the {split} split of {dataset_label(ds)} has no documents")
            report_stats(stats, [ds.text_column])
            epoch, pos, w, stats = epoch + 1, (0, 0, 0), 0, ReadStats()

    def steps(state):
        rows, done = pack_rows(docs(state), seq_len, collate.cls, collate.sep, state["offset"]), state["rows"]
        for step in chunked(rows, G):
            batches = [collate([(*step[g][:2], (MASK_STREAM, seed, done + g)) for g in idx]) for idx in micro_rows]
            (epoch, (fi, ri, ordinal), w, i), offset = step[-1][2:]
            done += len(step)
            yield batches, {**state, "epoch": epoch, "file": fi, "row": ri, "ordinal": ordinal, "window": w,
                            "doc": i, "offset": offset, "rows": done}

    digest = hashlib.sha256("\n".join(f.name for f in files).encode()).hexdigest()[:16]
    settings = {"kind": "streaming", "split": split, "seed": seed, "seq_len": seq_len,
                "shuffle_buffer_size": ds.shuffle_buffer_size, "files": digest}
    position = {"epoch": 0, "file": 0, "row": 0, "ordinal": 0, "window": 0, "doc": 0, "offset": 0, "rows": 0}
    # closing stops the tokenizer processes; a later next_step() tokenizes in this process
    return Loader(steps, {**settings, **position}, settings, prefetch, on_close=encoder.close, global_batch_rows=G,
                  seq_len=seq_len, packed=True)


def build_loader(ds, tok_cfg, collator_cfg, split="train", **batch) -> Loader:
    """streaming_loader when dataset.streaming, else prepared_loader over dataset.path (run prepare() first, on one
    rank); batch: micro_batch_size, grad_accum_steps, rank, world_size, seed, prefetch, pin_memory, store."""
    out, kw = dataset_dir(ds), dict(seq_len=ds.max_seq_length, collator_cfg=collator_cfg, **batch)
    if ds.streaming:
        kw.pop("store", None)
        return streaming_loader(ds, load_tokenizer(tok_cfg, out), split, **kw)
    return prepared_loader(out, split, **kw)


# -----------------------------------------------------------------------------
# the prepare command, and the loader's own speed

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
    """A packed prepared loader: the fraction of real tokens in its rows (1.0: rows are never padded) and the fraction
    of an epoch's [CLS] doc [SEP] tokens that its full global batches use (the rest is the dropped epoch tail)."""
    used = loader.steps_per_epoch * loader.global_batch_rows * loader.seq_len
    units = int(loader.store.lengths.sum()) + 2 * loader.store.n_docs
    return {"real_token_fraction": 1.0, "epoch_tokens_used": used / units}


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
        if getattr(loader, "store", None) is not None and loader.packed:
            p = packing_stats(loader)
            print(f"packing: {p['real_token_fraction']:.2%} of batch tokens are real, full batches use "
                  f"{p['epoch_tokens_used']:.2%} of an epoch's tokens ({loader.steps_per_epoch} steps/epoch)")
        r = bench_loader(loader, steps=100)
        loader.close()
        print(f"loader: {r['steps_per_s']:,.1f} steps/s, {r['batches_per_s']:,.1f} micro-batches/s, "
              f"{r['tokens_per_s']:,.0f} tokens/s, {r['real_token_fraction']:.2%} real tokens "
              f"(micro-batch {t.per_device_train_batch_size} x {cfg.dataset.max_seq_length})")


if __name__ == "__main__":
    # `python data.py CONFIG [...]` is `python train.py CONFIG --prepare-only [...]`: train.py knows every objective's
    # data. This file is handed over, not imported: the module data never imports train.
    import runpy
    sys.argv = [str(Path(__file__).with_name("train.py"))] + sys.argv[1:] + ["--prepare-only"]
    runpy.run_path(sys.argv[0], run_name="__main__")
