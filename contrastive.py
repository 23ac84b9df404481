"""Contrastive fine-tuning (trainer.objective: contrastive): pair data, the InfoNCE objective and its evaluation.

Reading order: config -> pair data (prepared through prepare.py's reader and writer; layout in docs/contrastive.md)
-> pair_loader (one source per global batch, exactly resumable) -> the objective (InfoNCE over the global batch,
gradient caching) -> retrieval evaluation on held-out pairs.
"""

import dataclasses
import hashlib
import json
import shutil
import sysconfig
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import neobert
from config import UserError, build_section, require, warn
from data import PERM_STREAM, Loader, pin_batch, rank_rows, seeded_rng
from prepare import (FORMAT_VERSION, ReadStats, SourceFile, TokenStore, check_sources, held_out, hub_files,
                     is_prepared, load_tokenizer, local_files, read_manifest, read_rows, report_stats, save_tokenizer,
                     spec_diff, special_token_ids, token_dtype, worker_count, write_json, write_shards)
from runtime import to_device


@dataclass
class PairSourceConfig:
    """One entry of contrastive.sources."""
    name: str = ""                      # hub dataset repo id, or "stdlib" (offline function -> docstring pairs)
    config: Optional[str] = None        # hub subset (config name), e.g. "triplet"
    split: str = "train"                # hub split
    data_files: list[str] = field(default_factory=list)  # local .jsonl/.csv/.tsv/.parquet files, globs or dirs
    query_column: str = "query"
    positive_column: str = "positive"
    negative_columns: list[str] = field(default_factory=list)  # hard negatives, zero or more columns
    instruction: str = ""               # prefixed to every query, e.g. "Given a question, retrieve its answer."
    max_rows: int = 0                   # read at most this many rows (0 = all)

    def __post_init__(self):
        require(self.name or self.data_files, "needs a name (a hub dataset id, or stdlib) or data_files")
        require(self.max_rows >= 0, f"max_rows must be >= 0 (0 = all), got {self.max_rows}")

    @property
    def label(self):
        return self.name or ",".join(self.data_files)

    @property
    def columns(self):
        return [self.query_column, self.positive_column, *self.negative_columns]


@dataclass
class ContrastiveConfig:
    sources: list[PairSourceConfig] = field(default_factory=list)  # the pair sources (keys above)
    temperature: float = 0.07           # InfoNCE on cosine / temperature
    pooling: Literal["mean", "cls"] = "mean"  # the sentence embedding, in training, eval and export
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
        # load_config builds the entries; mappings given in code go through the same converter
        self.sources = [build_section(f"contrastive.sources[{i}]", PairSourceConfig, s)
                        if not isinstance(s, PairSourceConfig) else s for i, s in enumerate(self.sources)]
        require(self.temperature > 0, f"contrastive.temperature must be > 0, got {self.temperature}")
        for key in ("alpha", "hard_negatives", "chunk_size", "eval_pairs", "num_workers"):
            require(getattr(self, key) >= 0, f"contrastive.{key} must be >= 0, got {getattr(self, key)}")
        require(min(self.max_query_length, self.max_document_length) >= 3,
                "contrastive.max_query_length and contrastive.max_document_length must be >= 3")
        require(0 <= self.validation_split < 1,
                f"contrastive.validation_split must be in [0, 1), got {self.validation_split}")


def pairs_dir(cc):
    return Path(cc.path) if cc.path else Path("data_cache") / "pairs"


PAIR_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
COLUMN_HINT = "set contrastive.sources[{}].query_column, positive_column or negative_columns"


def pair_source_files(src, i=0):
    """The files of one pair source in reading order; a hub source is listed (not downloaded) here."""
    if src.data_files:
        return local_files(src.data_files, PAIR_KINDS, f"contrastive.sources[{i}].data_files",
                           ".jsonl, .csv, .tsv or .parquet")
    if src.name == "stdlib":
        return [SourceFile("stdlib", "stdlib-pairs", local=sysconfig.get_paths()["stdlib"])]
    from huggingface_hub import constants
    try:
        return hub_files(src.name, src.config, src.split,
                         hint=f"looked at {constants.ENDPOINT}, cache {constants.HF_HUB_CACHE}; check the name, or "
                              f"(offline) download its parquet files and list them in data_files",
                         offline=f"list local copies of its parquet files in contrastive.sources[{i}].data_files")
    except UserError as e:
        raise UserError(f"contrastive.sources[{i}]: {e}") from None


def _prepare_pair_source(src, i, cc, spec, files, tokenizer, out, progress):
    """One source -> out/ (its own manifest, written last, holds its spec). Returns the manifest."""
    where = f"contrastive.sources[{i}] ({src.label})"
    if (out / "manifest.json").is_file() and read_manifest(out).get("source") == spec:
        return read_manifest(out)       # a finished source of an interrupted multi-source prepare
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    fields = ["query", "positive"] + [f"negative{j}" for j in range(len(src.negative_columns))]
    stats, skipped = ReadStats(), 0
    prefix = src.instruction.strip() + " " if src.instruction.strip() else ""

    def rows():
        nonlocal skipped
        read = ((fi, ri, values) for fi, sf in enumerate(files)
                for ri, values in read_rows(sf, src.columns, stats, hint=COLUMN_HINT.format(i)))
        for fi, ri, values in islice(read, src.max_rows or None):
            if not all(isinstance(v, str) and v.strip() for v in values):
                skipped += 1        # a missing or empty query, positive or negative
                continue
            yield held_out(f"pair:{fi}:{ri}", cc.validation_split), [prefix + values[0], *values[1:]]

    splits, counts, dropped = write_shards(out, rows(), fields, tokenizer, worker_count(cc.num_workers),
                                           desc=f"tokenize {where}", unit=" pairs", progress=progress)
    skipped += dropped                  # a text with no tokens left would give an empty embedding
    if counts["train"] == 0:
        raise UserError(f"{where} has no rows with a non-empty {', '.join(src.columns)}"
                        + (f" ({skipped} rows skipped)" if skipped else "") + "; check its files and columns")
    report_stats(stats, src.columns)
    man = {"format_version": FORMAT_VERSION, "source": spec, "fields": fields, "rows": counts, "skipped_rows": skipped,
           "dtype": token_dtype(tokenizer.get_vocab_size(with_added_tokens=True)).name, "splits": splits}
    write_json(out / "manifest.json", man)
    return man


def prepare_pairs(cc, tokenizer, *, progress=True):
    """contrastive.path: every source tokenized once. A finished directory made from the same sources and tokenizer
    returns at once; one made from others is refused, naming what differs; an interrupted one is completed (finished
    sources are kept). Call it on one rank only (then barrier)."""
    out = pairs_dir(cc)
    sha = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    spec = {"sources": [dict(dataclasses.asdict(s), validation_split=cc.validation_split) for s in cc.sources],
            "tokenizer_sha256": sha}
    if is_prepared(out, lambda man: spec_diff(man["spec"], spec, "contrastive"),
                   "other pair sources or another tokenizer", "contrastive.path"):
        return out
    files = [pair_source_files(s, i) for i, s in enumerate(cc.sources)]    # bad paths / hub ids fail before work
    for i, (src, fs) in enumerate(zip(cc.sources, files)):                   # and columns missing from local files
        check_sources(fs, src.columns, COLUMN_HINT.format(i))
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out)
    summary = []
    for i, (src, fs) in enumerate(zip(cc.sources, files)):
        man = _prepare_pair_source(src, i, cc, dict(spec["sources"][i], tokenizer_sha256=sha), fs, tokenizer,
                                   out / f"source_{i:02d}", progress)
        summary.append({"dir": f"source_{i:02d}", "label": src.label, "rows": man["rows"],
                        "negatives": len(man["fields"]) - 2})
        print(f"pairs: {src.label}: {man['rows']['train']:,} train / {man['rows']['val']:,} held-out rows",
              flush=True)
    write_json(out / "manifest.json", {"format_version": FORMAT_VERSION, "kind": "pairs", "spec": spec,
                                        "special_ids": special_token_ids(tokenizer), "sources": summary})
    return out


def read_pairs_manifest(data_dir):
    man = read_manifest(data_dir)
    if man.get("kind") != "pairs":
        raise UserError(f"{data_dir} holds pretraining shards, not prepared pairs; set contrastive.path to another "
                        f"directory")
    return man


class PairSource:
    """One prepared source's split: a TokenStore per field; row i = document i of each (write_shards writes every
    field of a row together, and each store checks its index against its manifest)."""

    def __init__(self, data_dir, entry, split):
        self.label, self.num_negatives = entry["label"], entry["negatives"]
        fields = ["query", "positive"] + [f"negative{j}" for j in range(self.num_negatives)]
        self.stores = [TokenStore(Path(data_dir) / entry["dir"], f"{split}.{f}") for f in fields]
        self.rows = self.stores[0].n_docs


def pad_rows(seqs, max_len, cls_id, sep_id, pad_id, multiple=8):
    """[CLS] tokens[:max_len-2] [SEP] per row, right-padded to the longest row (rounded up to `multiple`, at most
    max_len) -> input_ids, attention_mask int64 [B, L]."""
    rows = [np.concatenate([[cls_id], s[:max_len - 2], [sep_id]]).astype(np.int64) for s in seqs]
    batch = neobert.batch_sequences(rows, pad_id, multiple=multiple)
    return batch["input_ids"][:, :max_len].contiguous(), batch["attention_mask"][:, :max_len].contiguous()


SOURCE_STREAM = 0x736F7572


def pick_source(seed, step, probs):
    """The source of global step `step`: a function of (seed, step) only, so resuming needs no RNG state."""
    u = seeded_rng(SOURCE_STREAM, seed, step).random()
    return min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(probs) - 1)


def pair_loader(data_dir, cc, split="train", *, micro_batch_size, grad_accum_steps=1, rank=0, world_size=1, seed=0,
                prefetch=2, pin_memory=None) -> Loader:
    """Contrastive batches from prepared pairs. next_step() -> [one dict for this process]: query_ids/query_mask
    [B, Lq], doc_ids/doc_mask [B*(1+h), Ld] (the B positives, then each row's h hard negatives row by row),
    num_negatives h, source (index). B = micro_batch_size * grad_accum_steps rows: the process's share of the
    global batch (rows [rank*B, (rank+1)*B)), so the global batch is the same for any world size and split; the
    trainer chunks it (gradient caching), since the loss needs the whole global batch at once."""
    man = read_pairs_manifest(data_dir)
    sources = [PairSource(data_dir, e, split) for e in man["sources"]]
    special = [man["special_ids"][k] for k in ("cls", "sep", "pad")]     # what pad_rows takes
    G, (mine,) = rank_rows(micro_batch_size * grad_accum_steps, 1, rank, world_size)
    for k, src in enumerate(sources):
        require(src.rows >= G, f"pair source {k} ({src.label}) has {src.rows} {split} rows, fewer than one global "
                f"batch of {G}; use a smaller batch or drop the source")
    weights = np.asarray([src.rows for src in sources], dtype=np.float64) ** cc.alpha  # 0: uniform, 1: ∝ rows
    probs = weights / weights.sum()
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory

    @lru_cache(maxsize=None)  # one permutation per source and epoch (each a few bytes per row)
    def perm(k, epoch):
        return seeded_rng(PERM_STREAM, seed, k, epoch).permutation(sources[k].rows)

    def batch(k, rows):
        src, h = sources[k], min(cc.hard_negatives, sources[k].num_negatives)
        docs = [src.stores[1].doc(r) for r in rows] + [src.stores[2 + j].doc(r) for r in rows for j in range(h)]
        query_ids, query_mask = pad_rows([src.stores[0].doc(r) for r in rows], cc.max_query_length, *special)
        doc_ids, doc_mask = pad_rows(docs, cc.max_document_length, *special)
        out = {"query_ids": query_ids, "query_mask": query_mask, "doc_ids": doc_ids, "doc_mask": doc_mask,
               "num_negatives": h, "source": k}
        return pin_batch(out) if pin else out

    def steps(state):
        step, cursors = state["step"], [list(c) for c in state["cursors"]]
        while True:
            k = pick_source(seed, step, probs)
            epoch, row = cursors[k]
            if row + G > sources[k].rows:
                epoch, row = epoch + 1, 0
            rows = perm(k, epoch)[row:row + G]
            cursors[k] = [epoch, row + G]
            step += 1
            yield [batch(k, [int(rows[i]) for i in mine])], {**state, "step": step,
                                                             "cursors": [list(c) for c in cursors]}

    digest = hashlib.sha256(json.dumps([[src.label, src.rows] for src in sources]).encode()).hexdigest()[:16]
    settings = {"kind": "pairs", "split": split, "seed": seed, "sources": digest}
    return Loader(steps, {**settings, "step": 0, "cursors": [[0, 0] for _ in sources]}, settings, prefetch,
                  global_batch_rows=G, probs=probs)


def held_out_pairs(data_dir, max_per_source):
    """(queries, positives): token arrays of the first max_per_source held-out rows of every source."""
    queries, positives = [], []
    for entry in read_pairs_manifest(data_dir)["sources"]:
        if entry["rows"]["val"]:
            src = PairSource(data_dir, entry, "val")
            rows = range(min(src.rows, max_per_source))
            queries += [src.stores[0].doc(r).astype(np.int64) for r in rows]
            positives += [src.stores[1].doc(r).astype(np.int64) for r in rows]
    return queries, positives


# -----------------------------------------------------------------------------
# the objective (trainer.objective: contrastive): InfoNCE over the global batch, gradient caching, retrieval
# evaluation, and class Contrastive: what train.py's loop needs of it (the interface is described beside train.MLM)

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


class GatherWithGrad(torch.autograd.Function):
    """Every process's rows (the same count on each), in rank order, differentiably: in the backward each process's
    gradient for a slice is summed into the process that owns it (all_reduce, then this rank's slice)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x):
    """Every process's rows, in rank order, with their gradient (GatherWithGrad); one process: x itself."""
    return GatherWithGrad.apply(x) if dist.is_initialized() and dist.get_world_size() > 1 else x


def contrastive_loss(q, pos, neg, temperature: float, rank: int = 0):
    """InfoNCE (cosine / temperature) of this process's queries q (B, H) against every positive and hard negative of the
    global batch (pos (B, H), neg (B*h, H): this process's rows, gathered from all). -> (the B queries' loss sum,
    logging sums [top-1 correct, positive cosine, negative cosine, number of negative pairs])."""
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


def contrastive_forward_backward(model, batch: dict, device, amp, temperature: float, chunk_size: int = 0,
                                 world_size: int = 1, rank: int = 0):
    """InfoNCE forward and backward of one step (model: an Embedder, maybe compiled or in DDP; batch: this process's
    pair_loader rows) -> (this process's loss sum, the global number of queries, logging sums). The gradients equal
    one process holding the whole global batch.

    chunk_size > 0: gradient caching (https://arxiv.org/abs/2101.06983): 1. embed chunk_size rows at a time with no
    graph; 2. the loss and its gradient with respect to the embeddings; 3. each chunk again with its graph,
    backpropagating its slice of that gradient. Activations are held for chunk_size rows only."""
    batch = to_device(batch, device)
    qi, qm, di, dm = batch["query_ids"], batch["query_mask"], batch["doc_ids"], batch["doc_mask"]
    B, cuda = qi.size(0), device.type == "cuda"
    if not chunk_size:
        with amp:
            q, d = model(qi, qm, di, dm)
    else:
        chunks = [(ids[i:i + chunk_size], mask[i:i + chunk_size])
                  for ids, mask in ((qi, qm), (di, dm)) for i in range(0, ids.size(0), chunk_size)]
        embs, states = [], []
        with torch.no_grad():  # 1. (with each chunk's RNG state, so that 3. draws the same dropout)
            for ids, mask in chunks:
                states.append((torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None))
                with amp:
                    embs.append(model(ids, mask).float())
        n_q = -(-B // chunk_size)
        q, d = (torch.cat(part).requires_grad_() for part in (embs[:n_q], embs[n_q:]))
    loss_sum, sums = contrastive_loss(q, d[:B], d[B:], temperature, rank)  # 2.
    (loss_sum * (1 / B)).backward()  # 1 / B = the global mean's 1 / (B * world_size), x world_size
    if chunk_size:
        grads = list(q.grad.split(chunk_size)) + list(d.grad.split(chunk_size))
        for i, ((ids, mask), grad, state) in enumerate(zip(chunks, grads, states)):  # 3.
            sync = i == len(chunks) - 1 or world_size == 1
            with nullcontext() if sync else model.no_sync():  # DDP all-reduces once, after the last chunk
                torch.set_rng_state(state[0])
                if cuda:
                    torch.cuda.set_rng_state(state[1], device)
                with amp:
                    emb = model(ids, mask)
                (emb.float() * grad).sum().backward()
    return loss_sum.detach(), B * world_size, sums


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
def evaluate_retrieval(encoder, held_out, cc, special: dict, batch_size: int, device, amp) -> dict:
    """Every held-out query against all held-out positives. Each process embeds a contiguous slice ([CLS] tokens
    [SEP], through neobert.embed); the embeddings are gathered, so every process returns the same metrics."""
    n = len(held_out[0])
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    per = -(-n // world)  # rows per process; the last ones may hold fewer, or none
    q, p = (neobert.embed(encoder, [[special["cls"], *s[:max_len - 2], special["sep"]]
                                    for s in seqs[rank * per:(rank + 1) * per]],
                          special["pad"], cc.pooling, batch_size, amp=amp).to(device)
            for seqs, max_len in ((held_out[0], cc.max_query_length), (held_out[1], cc.max_document_length)))
    if world > 1:  # every slice padded to `per` rows: gathered, the n rows come first, then the padding
        both = gather_with_grad(F.pad(torch.cat([q, p], dim=1), (0, 0, 0, per - q.size(0))))[:n]
        q, p = both.split(q.size(1), dim=1)
    return retrieval_metrics(q, p)


def contrastive_model_config(cfg, ckpt: Optional[Path]):
    """-> (cfg with the model section of the checkpoint the run resumes (ckpt) or starts from (trainer.init_from),
    that checkpoint's tokenizer), so the config.yaml the run saves describes its weights."""
    t, cc = cfg.trainer, cfg.contrastive
    if not cc.sources:
        raise UserError("trainer.objective is contrastive but contrastive.sources is empty; list the pair sources "
                        "(name: or data_files:, with query_column, positive_column, negative_columns; see "
                        "configs/contrastive.yaml)")
    tokenizer = None
    source = ckpt if ckpt is not None else t.init_from  # checkpoints/<step>: checkpoint.resolve finds its weights
    if source:
        try:
            _, info = checkpoint.load(source, head="mlm")
        except UserError as e:
            if Path(source).exists():
                raise
            raise UserError(f"trainer.init_from={source}: no such directory, and not on the hub either ({e}). "
                            "Contrastive fine-tuning starts from a pretrained model; for "
                            "configs/contrastive_smoke.yaml run `python train.py configs/smoke.yaml` first") from None
        # attn_backend is how to compute, not what the weights are: the run's own
        model_cfg = dataclasses.replace(info.model_config, attn_backend=cfg.model.attn_backend)
        cfg, tokenizer = dataclasses.replace(cfg, model=model_cfg), info.tokenizer
    tokenizer = load_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
    longest = max(cc.max_query_length, cc.max_document_length)
    if longest > cfg.model.max_position_embeddings:
        raise UserError(f"contrastive.max_query_length/max_document_length {longest} exceeds the model's "
                        f"max_position_embeddings {cfg.model.max_position_embeddings}")
    return cfg, tokenizer


def prepare_pairs_only(cfg) -> None:
    """`python train.py CONFIG --prepare-only` (= `python data.py CONFIG`) of a contrastive config: the pair sources
    tokenized into contrastive.path with the tokenizer of the checkpoint the run will start from."""
    cfg, tokenizer = contrastive_model_config(cfg, None)
    out = prepare_pairs(cfg.contrastive, tokenizer)
    rows = [s["rows"]["train"] for s in read_pairs_manifest(out)["sources"]]
    print(f"{out}: {len(rows)} pair source(s), {sum(rows):,} training pairs ready")


class Contrastive:
    """InfoNCE over the global batch of one pair source per step. The model stays a NeoBERTLMHead, so checkpoints
    keep the MLM layout; only its encoder (with pooling: Embedder) is trained. Gradient accumulation is gradient
    caching in micro-batch chunks."""
    name, eval_at_start = "contrastive", True

    def __init__(self, cfg, rank: int, world_size: int, device, resume: Optional[Path] = None):
        cfg, self.init_tokenizer = contrastive_model_config(cfg, resume)  # the model of the checkpoint it starts from
        self.cfg, self.cc, self.rank, self.world_size, self.device = cfg, cfg.contrastive, rank, world_size, device
        self.data_dir, self.eval_batch_size, self.held_out = pairs_dir(self.cc), None, None
        t = cfg.trainer
        self.chunk = self.cc.chunk_size or (t.per_device_train_batch_size if t.gradient_accumulation_steps > 1 else 0)
        if rank == 0:
            print(f"contrastive: model {cfg.model.hidden_size} x {cfg.model.num_hidden_layers} from "
                  f"{resume or t.init_from or 'a random init'}")

    def prepare(self):
        prepare_pairs(self.cc, self.init_tokenizer)

    def load(self):
        self.tokenizer = load_tokenizer(self.cfg.tokenizer, self.data_dir)
        if self.cfg.trainer.eval_steps and self.cc.eval_pairs:
            self.held_out = held_out_pairs(self.data_dir, self.cc.eval_pairs)
            if len(self.held_out[0]) >= 2:
                self.eval_batch_size = self.cfg.trainer.per_device_eval_batch_size
            elif self.rank == 0:
                warn(f"the pair sources hold {len(self.held_out[0])} held-out rows: retrieval evaluation is off "
                     "(raise contrastive.validation_split, then prepare again into a new contrastive.path)")
        return self.tokenizer

    def train_module(self, model):
        return Embedder(model.model, self.cc.pooling)

    def loader(self, split: str, micro_batch_size: int, grad_accum_steps: int, prefetch: int = 2):
        return pair_loader(self.data_dir, self.cc, split, micro_batch_size=micro_batch_size,
                           grad_accum_steps=grad_accum_steps, rank=self.rank, world_size=self.world_size,
                           seed=self.cfg.trainer.seed, prefetch=prefetch)

    def forward_backward(self, module, micro_batches: list[dict], amp):
        return contrastive_forward_backward(module, micro_batches[0], self.device, amp, self.cc.temperature,
                                            self.chunk, self.world_size, self.rank)

    def tokens(self, micro_batches: list[dict]) -> tuple[int, int]:
        b = micro_batches[0]
        return b["query_ids"].numel() + b["doc_ids"].numel(), int(b["query_mask"].sum() + b["doc_mask"].sum())

    metrics = staticmethod(contrastive_metrics)

    def evaluate(self, model, amp) -> dict:
        return evaluate_retrieval(model.model, self.held_out, self.cc, special_token_ids(self.tokenizer),
                                  self.eval_batch_size, self.device, amp)

    def flops(self, micro_batches: list[dict]) -> float:
        """This process's step (no decoder); gradient caching adds one forward (x 4/3)."""
        total = sum(ids.numel() * neobert.flops_per_token(self.cfg.model, ids.shape[-1], 0.0)
                    for ids in (micro_batches[0]["query_ids"], micro_batches[0]["doc_ids"]))
        return total * (4 / 3 if self.chunk else 1.0)
