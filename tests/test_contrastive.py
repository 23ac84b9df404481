"""Contrastive fine-tuning (trainer.objective: contrastive): the InfoNCE loss against a float64 reference, gradient
caching == the whole batch, 2 gloo processes == 1 process, the pair data (formats, mixing, prepared-dir guarantees),
exact resume after kill -9, held-out MRR@10 rising, pooling through export, bad input, and the bench.

Every run uses a tiny model (hidden 32, 2 layers) saved as a "pretrained" run dir, with a WordPiece vocabulary
chosen from the offline stdlib pairs; the pairs (the first 1000 stdlib functions) are prepared once per session.
This file doubles as the torchrun worker of the DDP test (see __main__ at the bottom).
"""

import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import prepare  # noqa: E402
import config  # noqa: E402
import contrastive  # noqa: E402
import neobert  # noqa: E402
import train  # noqa: E402

@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread: on a shared 2-core machine, two OpenMP threads per process spin against each
    other (measured: a step 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
SOURCE = {"name": "stdlib", "negative_columns": ["negative"], "max_rows": 1000, "instruction": "Function:"}


# -----------------------------------------------------------------------------
# fixtures: a tiny "pretrained" run dir and the prepared pairs


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A run dir in the layout train.py writes (model_checkpoints/<step>, latest), tiny random weights and a WordPiece
    vocabulary trained on the pair texts, so trainer.init_from resolves it as it would a pretraining run."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    sf = contrastive.pair_source_files(contrastive.PairSourceConfig(name="stdlib"))[0]
    texts = [t for _, row in zip(range(3000), prepare.read_rows(sf, ["query", "positive"], prepare.ReadStats()))
             for t in row[1]]
    tokenizer = word_tokenizer(texts, vocab_size=1024)
    vocab = tokenizer.get_vocab_size()
    cfg = train.load_config(None, [f"model.{k}={v}" for k, v in {**TINY_MODEL, "vocab_size": vocab}.items()]
                            + ["dataset.max_seq_length=64"])
    torch.manual_seed(0)
    model = neobert.NeoBERTLMHead(cfg.model)
    ckpt = run / "model_checkpoints" / "0"
    ckpt.mkdir(parents=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.yaml").write_text(config.config_to_yaml(cfg))
    tokenizer.save(str(ckpt / "tokenizer.json"))
    (run / "model_checkpoints" / "latest").write_text("0\n")
    return run


def word_tokenizer(texts, vocab_size):
    """A BERT-style WordPiece tokenizer whose vocabulary is chosen deterministically (the most frequent words, ties by
    spelling, then single characters): unlike the tokenizers trainer, the same on every run, so the runs below are."""
    from collections import Counter
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in counts for c in w})
    vocab = list(prepare.SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    vocab += [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in vocab]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab[:vocab_size])}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = norm, pre, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


@pytest.fixture(scope="session")
def pairs(pretrained, tmp_path_factory):
    """The prepared stdlib pairs (contrastive.path), shared by every run of the session."""
    path = tmp_path_factory.mktemp("pairs") / "stdlib"
    cc = contrastive.ContrastiveConfig(sources=[SOURCE], path=str(path), validation_split=0.15, num_workers=1)
    _, info = checkpoint.load(pretrained)
    contrastive.prepare_pairs(cc, info.tokenizer, progress=False)
    return path


def run_args(pretrained, pairs, out, **overrides) -> list[str]:
    keys = {
        "trainer.objective": "contrastive", "trainer.init_from": pretrained, "trainer.output_dir": out,
        "trainer.per_device_train_batch_size": 8, "trainer.per_device_eval_batch_size": 64,
        "trainer.max_steps": 6, "trainer.logging_steps": 1, "trainer.eval_steps": 0, "trainer.save_steps": 0,
        "trainer.mixed_precision": "no", "trainer.disable_tqdm": "true", "trainer.resume_from_checkpoint": "false",
        "optimizer.lr": 2e-3, "scheduler.warmup_steps": 2, "contrastive.path": pairs,
        "contrastive.validation_split": 0.15, "contrastive.max_query_length": 32,
        "contrastive.max_document_length": 48, "contrastive.num_workers": 1, "contrastive.eval_pairs": 200,
        **overrides}
    return [str(write_config(Path(out).parent / f"{Path(out).name}.yaml"))] + [f"{k}={v}" for k, v in keys.items()]


def write_config(path: Path, sources=None) -> Path:
    """contrastive.sources is a list of mappings: YAML only (overrides cannot express it)."""
    import yaml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"contrastive": {"sources": sources or [SOURCE]}}))
    return path


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def expect_error(capsys, argv, *fragments):
    """main() exits 2 with one `error: ...` line naming every fragment (after any progress bar), no traceback."""
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert "Traceback" not in err and last.startswith("error: ") and err.endswith("\n"), err
    err = last
    for f in fragments:
        assert f in err, (f, err)
    return err


# -----------------------------------------------------------------------------
# the loss and gradient caching


def reference_infonce(q, pos, neg, temperature):
    """float64 from the definition: for query i, -log softmax over [cos(q_i, p_j) for all j] + [cos(q_i, n_k) for
    all hard negatives k], at the index of p_i."""
    q, pos, neg = q.double(), pos.double(), neg.double()

    def cos(a, b):
        return float((a @ b) / (a.norm() * b.norm()))
    docs = list(pos) + list(neg)
    total = 0.0
    for i in range(len(q)):
        logits = [cos(q[i], d) / temperature for d in docs]
        m = max(logits)
        total += -(logits[i] - m - math.log(sum(math.exp(x - m) for x in logits)))
    return total / len(q)


def test_loss_with_hard_negatives_matches_float64_reference():
    torch.manual_seed(0)
    q, pos, neg = torch.randn(6, 16), torch.randn(6, 16), torch.randn(12, 16)
    pos[2] = q[2] * 3.0  # one easy positive, so top-1 accuracy is not trivially 0
    loss_sum, sums = contrastive.contrastive_loss(q, pos, neg, 0.07)
    assert abs(loss_sum.item() / 6 - reference_infonce(q, pos, neg, 0.07)) < 1e-5
    cos = F.normalize(q.double(), dim=-1) @ F.normalize(torch.cat([pos, neg]).double(), dim=-1).T
    m = contrastive.contrastive_metrics(sums.tolist(), 6)
    assert m["accuracy"] == pytest.approx(float((cos.argmax(1) == torch.arange(6)).double().mean()))
    assert m["pos_cosine"] == pytest.approx(float(cos.diagonal().mean()), abs=1e-6)
    off = cos.sum() - cos.diagonal().sum()
    assert m["neg_cosine"] == pytest.approx(float(off / (cos.numel() - 6)), abs=1e-6)
    # no hard negatives: in-batch only
    loss_sum, _ = contrastive.contrastive_loss(q, pos, neg[:0], 0.05)
    assert abs(loss_sum.item() / 6 - reference_infonce(q, pos, neg[:0], 0.05)) < 1e-5


def tiny_embedder(pooling="mean", seed=0):
    torch.manual_seed(seed)
    cfg = neobert.NeoBERTConfig(vocab_size=64, **TINY_MODEL)
    return contrastive.Embedder(neobert.NeoBERT(cfg), pooling)


def random_batch(rows, negatives, seed=1):
    """A padded batch like PairLoader's: queries of 5-12 tokens, documents of 6-20, [CLS] ... [SEP]."""
    g = np.random.default_rng(seed)
    queries = [g.integers(5, 64, g.integers(5, 12)) for _ in range(rows)]
    docs = [g.integers(5, 64, g.integers(6, 20)) for _ in range(rows * (1 + negatives))]
    qi, qm = contrastive.pad_rows(queries, 16, 2, 3, 0)
    di, dm = contrastive.pad_rows(docs, 24, 2, 3, 0)
    return {"query_ids": qi, "query_mask": qm, "doc_ids": di, "doc_mask": dm, "num_negatives": negatives,
            "source": 0}


def local_slice(batch, rank, world):
    """Rows [rank*B, (rank+1)*B) of a global batch, as PairLoader gives a process: its queries, its positives, then
    its rows' hard negatives."""
    n = batch["query_ids"].size(0)
    b, h = n // world, batch["num_negatives"]
    rows = slice(rank * b, (rank + 1) * b)
    negs = slice(n + rank * b * h, n + (rank + 1) * b * h)
    out = dict(batch, query_ids=batch["query_ids"][rows], query_mask=batch["query_mask"][rows])
    for k in ("doc_ids", "doc_mask"):
        out[k] = torch.cat([batch[k][rows], batch[k][negs]])
    return out


def grads_of(model, batch, chunk_size, temperature=0.05):
    model.zero_grad(set_to_none=True)
    loss_sum, n, _ = contrastive.contrastive_forward_backward(model, batch, torch.device("cpu"), nullcontext(), temperature,
                                                        chunk_size)
    return loss_sum.item() / n, {k.removeprefix("model."): p.grad.clone() for k, p in model.named_parameters()
                                 if p.grad is not None}


def test_gradient_caching_equals_the_whole_batch_and_bounds_activations():
    model, batch = tiny_embedder(), random_batch(12, 2)
    loss, whole = grads_of(model, batch, 0)
    # the whole batch through autograd, written out independently of contrastive_forward_backward
    model.zero_grad(set_to_none=True)
    q, d = model(batch["query_ids"], batch["query_mask"], batch["doc_ids"], batch["doc_mask"])
    qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    F.cross_entropy(qn @ dn.T / 0.05, torch.arange(12)).backward()
    assert all(torch.allclose(whole[k], p.grad, atol=1e-6) for k, p in model.named_parameters())
    saved = []  # bytes saved for backward by each forward with a graph: the activation memory held at once

    def pack(t):
        saved[-1] += t.numel() * t.element_size()
        return t
    for chunk in (5, 4):
        saved.clear()
        hook_model = HookedForward(model, saved)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_c, cached = grads_of(hook_model, batch, chunk)
        assert loss_c == pytest.approx(loss, abs=1e-6)
        assert whole.keys() == cached.keys()
        for k in whole:
            assert torch.allclose(cached[k], whole[k], atol=1e-5, rtol=1e-5), (chunk, k)
        if chunk == 4:  # 12 queries + 36 documents in chunks of 4: 12 forwards without a graph, 12 re-runs with
            assert len(saved) == 24 and max(saved[:11]) == 0  # (the 12th holds the loss's)
            per_forward = max(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grads_of(HookedForward(model, saved), batch, 0)
    assert per_forward * 6 < max(saved)  # the whole batch (48 rows) at once holds ~12x what a 4-row chunk does


class HookedForward(torch.nn.Module):
    """A new entry of `saved` at each model call: the bytes autograd saves from there on (the forward's activations;
    the small similarity matrix of the loss adds to the entry before it)."""

    def __init__(self, model, saved):
        super().__init__()
        self.model, self.saved = model, saved

    def forward(self, *args):
        self.saved.append(0)
        return self.model(*args)


def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    """torchrun --nproc_per_node 2: each process holds half the global batch; loss and gradients (after DDP's
    all-reduce) equal one process holding it all, without and with gradient caching. Once DDP is freed,
    destroy_process_group ends gloo's threads: left running, they free tensors while Python shuts down, which
    aborted 1 exit in ~40 (runtime.setup_distributed imports torch._dynamo before the group for this)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = random_batch(8, 1)
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"threads_{rank}.json").read_text())
        assert threads["started"] > threads["before"] == threads["after"], threads
    for chunk in (0, 3):
        got = torch.load(tmp_path / f"ddp_{chunk}.pt", weights_only=True)
        loss, want = grads_of(tiny_embedder(), batch, 0)
        assert got["loss"] == pytest.approx(loss, abs=1e-6)
        assert set(got["grads"]) == set(want)
        for k in want:
            assert torch.allclose(got["grads"][k], want[k], atol=1e-6, rtol=1e-5), (chunk, k)


def test_torchrun_training_run_equals_one_process(tmp_path, pretrained, pairs):
    """The whole loop under torchrun (2 gloo processes x 4 pairs) against one process with 8: the same losses,
    held-out metrics (each process embeds half, then gathers) and weights."""
    # optimizer.eps 1e-4, as test_train's third objective: AdamW's per-element division turns float rounding in a
    # near-cancelling gradient element into a weight gap; 1e-4 bounds it at lr / eps
    kw = {"trainer.max_steps": 3, "trainer.eval_steps": 3, "contrastive.chunk_size": 3, "optimizer.eps": 1e-4}
    one, two = tmp_path / "one", tmp_path / "two"
    assert train.main(run_args(pretrained, pairs, one, **kw)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    proc = subprocess.run(cmd + run_args(pretrained, pairs, two, **kw, **{"trainer.per_device_train_batch_size": 4}),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(metrics(one), metrics(two), strict=True):
        for k in ("loss", "accuracy", "pos_cosine", "neg_cosine", "eval_recall@10", "eval_mrr@10"):
            assert (k in a) == (k in b) and a.get(k, 0) == pytest.approx(b.get(k, 0), abs=1e-5), k
    wa, wb = (load_file(str(d / "model_checkpoints/3/model.safetensors")) for d in (one, two))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def _ddp_worker(out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import runtime
    before = len(os.listdir("/proc/self/task"))  # the process's threads, C++ ones included
    rank, world, _ = runtime.setup_distributed()
    started = len(os.listdir("/proc/self/task"))
    model = DDP(tiny_embedder())
    local = local_slice(random_batch(8, 1), rank, world)
    for chunk in (0, 3):
        model.zero_grad(set_to_none=True)
        loss_sum, n, _ = contrastive.contrastive_forward_backward(model, local, torch.device("cpu"), nullcontext(), 0.05,
                                                            chunk, world, rank)
        dist.all_reduce(loss_sum)
        if rank == 0:
            grads = {k.removeprefix("module."): p.grad for k, p in model.named_parameters() if p.grad is not None}
            torch.save({"loss": loss_sum.item() / n, "grads": grads}, Path(out_dir) / f"ddp_{chunk}.pt")
    del model  # DDP holds the group: freed first, the group goes with destroy_process_group (as in train.train)
    dist.barrier()
    dist.destroy_process_group()
    counts = {"before": before, "started": started, "after": len(os.listdir("/proc/self/task"))}
    (Path(out_dir) / f"threads_{rank}.json").write_text(json.dumps(counts))


# -----------------------------------------------------------------------------
# pair data


def test_sources_formats_mixing_and_single_source_batches(tmp_path, pretrained):
    """jsonl, csv and parquet sources with their own column names; each global batch comes from one source, picked
    ∝ rows^alpha; the global batch does not depend on the world size or the micro-batch split."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    _, info = checkpoint.load(pretrained)
    words = ["file", "list", "string"]  # whole tokens of the docstring vocabulary
    sizes = [40, 160, 640]

    def rows(w, n):
        return [{"q": f"{w} question {i}", "a": f"{w} answer {i}", "bad": f"{w} wrong {i}"} for i in range(n)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(words[0], sizes[0])))
    import csv
    with open(tmp_path / "b.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["q", "a", "bad"])
        w.writeheader()
        w.writerows(rows(words[1], sizes[1]))
    pq.write_table(pa.Table.from_pylist(rows(words[2], sizes[2])), tmp_path / "c.parquet")
    sources = [{"data_files": [str(tmp_path / f)], "query_column": "q", "positive_column": "a",
                "negative_columns": ["bad"]} for f in ("a.jsonl", "b.csv", "c.parquet")]
    cc = contrastive.ContrastiveConfig(sources=sources, path=str(tmp_path / "prepared"), alpha=0.5, validation_split=0.0,
                                num_workers=1, max_query_length=16, max_document_length=16)
    contrastive.prepare_pairs(cc, info.tokenizer, progress=False)
    marker = {info.tokenizer.token_to_id(w): k for k, w in enumerate(words)}

    loader = contrastive.pair_loader(cc.path, cc, micro_batch_size=8, prefetch=0)
    want = np.asarray(sizes, dtype=float) ** 0.5
    want /= want.sum()
    assert np.allclose(loader.probs, want)
    picks = np.bincount([contrastive.pick_source(0, s, loader.probs) for s in range(20000)], minlength=3) / 20000
    assert np.abs(picks - want).max() < 0.015  # ~3.5 sigma at n = 20000
    for _ in range(30):
        b = loader.next_step()[0]
        firsts = {marker[int(i)] for i in b["query_ids"][:, 1]}  # the first token after [CLS] names the source
        assert firsts == {b["source"]}
        assert {marker[int(i)] for i in b["doc_ids"][:, 1]} == {b["source"]}
        assert b["doc_ids"].size(0) == 16  # 8 positives + 8 hard negatives
    loader.close()

    def rows_of(loaders, steps=12):
        """The global batches' query token lists, step by step, across processes in rank order."""
        out = []
        for _ in range(steps):
            parts = [ld.next_step()[0] for ld in loaders]
            out.append([row[m.bool()].tolist() for p in parts for row, m in zip(p["query_ids"], p["query_mask"])])
        return out
    one = rows_of([contrastive.pair_loader(cc.path, cc, micro_batch_size=8, prefetch=0)])
    two = rows_of([contrastive.pair_loader(cc.path, cc, micro_batch_size=2, grad_accum_steps=2, rank=r, world_size=2,
                                   prefetch=0) for r in range(2)])
    assert one == two


def test_hub_source_reads_its_subset_and_split_and_prefixes_the_instruction(tmp_path, monkeypatch, pretrained):
    """A hub dataset in the sentence-transformers layout (<subset>/<split>-*.parquet), served by stand-ins for
    huggingface_hub's listing and download (no network here): only the named subset and split are read."""
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq
    root, repo = tmp_path / "hub", "sentence-transformers/all-nli"
    tables = {"triplet/train-00000-of-00001.parquet": 30, "triplet/dev-00000-of-00001.parquet": 5,
              "pair/train-00000-of-00001.parquet": 7}
    for name, n in tables.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        rows = [{"anchor": f"a man plays {i}", "positive": f"someone plays {i}", "negative": f"nobody sleeps {i}"}
                for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), root / name)
    downloads = []

    def list_repo_files(self, repo_id, repo_type=None, revision=None, **kw):
        assert repo_id == repo and repo_type == "dataset"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet")) if revision is None else []

    def hf_hub_download(repo_id, filename, repo_type=None, revision=None, **kw):
        downloads.append(filename)
        return str(root / filename)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    _, info = checkpoint.load(pretrained)
    source = {"name": repo, "config": "triplet", "query_column": "anchor", "positive_column": "positive",
              "negative_columns": ["negative"], "instruction": "Given a premise, retrieve a hypothesis."}
    cc = contrastive.ContrastiveConfig(sources=[source], path=str(tmp_path / "prepared"), validation_split=0.0,
                                num_workers=1)
    contrastive.prepare_pairs(cc, info.tokenizer, progress=False)
    assert downloads == ["triplet/train-00000-of-00001.parquet"]
    man = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert man["sources"][0]["rows"] == {"train": 30, "val": 0} and man["sources"][0]["negatives"] == 1
    loader = contrastive.pair_loader(cc.path, cc, micro_batch_size=4, prefetch=0)
    b = loader.next_step()[0]
    prefix = info.tokenizer.encode(source["instruction"], add_special_tokens=False).ids
    assert all(row[1:1 + len(prefix)].tolist() == prefix for row in b["query_ids"])


def test_a_pair_line_that_does_not_parse_is_named(tmp_path, pretrained, capsys):
    """A .jsonl pair source with a broken line: skipped and counted, and the warning names the file and its line."""
    _, info = checkpoint.load(pretrained)
    lines = [json.dumps({"query": f"q{i}", "positive": f"answer {i}"}) for i in range(12)]
    lines[2] = '{"query": "q2", "positive": '  # cut short
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    cc = contrastive.ContrastiveConfig(sources=[{"data_files": [str(tmp_path / "p.jsonl")]}],
                                       path=str(tmp_path / "prepared"), validation_split=0.0, num_workers=1)
    contrastive.prepare_pairs(cc, info.tokenizer, progress=False)
    err = capsys.readouterr().err
    assert "skipped 1 records" in err and f"the first: {tmp_path / 'p.jsonl'} line 3" in err, err
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text())["sources"][0]["rows"]["train"] == 11


def test_prepared_pairs_are_reused_refused_and_checked(tmp_path, pretrained, pairs):
    _, info = checkpoint.load(pretrained)
    man = pairs / "manifest.json"
    before = man.stat().st_mtime_ns
    cc = contrastive.ContrastiveConfig(sources=[SOURCE], path=str(pairs), validation_split=0.15, num_workers=1)
    assert contrastive.prepare_pairs(cc, info.tokenizer, progress=False) == pairs and man.stat().st_mtime_ns == before
    other = contrastive.ContrastiveConfig(sources=[dict(SOURCE, instruction="Given a function, retrieve its docstring.")], path=str(pairs), validation_split=0.15)
    with pytest.raises(config.UserError, match=r"prepared from other pair sources.*instruction"):
        contrastive.prepare_pairs(other, info.tokenizer, progress=False)
    # a truncated shard is named when the loader opens it
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(pairs, copy)
    shard = copy / "source_00" / "train.positive" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(config.UserError, match="shard_00000.bin is truncated"):
        contrastive.pair_loader(copy, dict_cc(cc, copy), micro_batch_size=4)
    # an interrupted prepare (no top-level manifest) is completed; the finished source is kept
    (copy / "manifest.json").unlink()
    shard.unlink()
    (copy / "source_00" / "manifest.json").unlink()
    contrastive.prepare_pairs(dict_cc(cc, copy), info.tokenizer, progress=False)
    assert json.loads((copy / "manifest.json").read_text())["sources"] == json.loads(man.read_text())["sources"]


def test_prepare_only_makes_the_pairs_without_training(tmp_path, pretrained, capsys):
    """`python data.py CONFIG` (= train.py --prepare-only) of a contrastive config prepares contrastive.path."""
    out, path = tmp_path / "run", tmp_path / "pairs"
    assert train.main(run_args(pretrained, path, out) + ["--prepare-only"]) == 0
    assert "training pairs ready" in capsys.readouterr().out
    assert contrastive.read_pairs_manifest(path)["sources"][0]["rows"]["train"] > 0 and not out.exists()


def dict_cc(cc, path):
    import dataclasses
    return dataclasses.replace(cc, path=str(path))


# -----------------------------------------------------------------------------
# training runs


def test_exact_resume_after_kill_9(tmp_path, pretrained, pairs):
    """Killed right after the step-4 checkpoint, then resumed: the same losses and the same final weights as the
    uninterrupted run (loader position, source picks and optimizer state all restored)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    kw = {"trainer.max_steps": 7, "trainer.save_steps": 2, "contrastive.chunk_size": 3}
    assert train.main(run_args(pretrained, pairs, full, **kw)) == 0
    p = subprocess.run([sys.executable, "train.py"] + run_args(pretrained, pairs, resumed, **kw), cwd=ROOT,
                       capture_output=True, text=True, env={**ENV, "NEOBERT_TEST_KILL": "after_save:4"}, timeout=300)
    assert p.returncode == -9
    assert train.main(run_args(pretrained, pairs, resumed, **kw, **{"trainer.resume_from_checkpoint": "auto"})) == 0
    a, b = metrics(full), metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 8))
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-6)
    wa, wb = load_file(str(full / "model_checkpoints/7/model.safetensors")), \
        load_file(str(resumed / "model_checkpoints/7/model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    start = load_file(str(pretrained / "model_checkpoints/0/model.safetensors"))
    assert torch.equal(wa["decoder.weight"], start["decoder.weight"])  # only the encoder trains
    assert not torch.equal(wa["model.encoder.weight"], start["model.encoder.weight"])
    saved = json.loads((resumed / "checkpoints/6/train_state.json").read_text())
    assert saved["loader_states"][0]["kind"] == "pairs" and saved["config"]["trainer"]["objective"] == "contrastive"


@needs_muon
def test_muon_trains_the_encoder_and_resumes_its_state(tmp_path, pretrained, pairs):
    """optimizer.name muon in contrastive fine-tuning: the trained module is the encoder, so Muon holds its blocks'
    matrices and AdamW its embeddings; the decoder stays as loaded; the loss falls; the checkpoint holds both."""
    out = tmp_path / "run"
    assert train.main(run_args(pretrained, pairs, out, **{"optimizer.name": "muon", "trainer.save_steps": 3})) == 0
    log = metrics(out)
    assert all(math.isfinite(m["loss"]) for m in log) and log[-1]["loss"] < log[0]["loss"]
    state = torch.load(out / "checkpoints" / "6" / "optimizer.pt", weights_only=True)
    layers = yaml.safe_load((out / "model_checkpoints" / "6" / "config.yaml").read_text())["model"]["num_hidden_layers"]
    assert len(state["muon"]["state"]) == 4 * layers  # qkv, wo, w12, w3 per block
    w, start = load_file(str(out / "model_checkpoints/6/model.safetensors")), \
        load_file(str(pretrained / "model_checkpoints/0/model.safetensors"))
    assert torch.equal(w["decoder.weight"], start["decoder.weight"])
    assert not torch.equal(w["model.transformer_encoder.0.qkv.weight"], start["model.transformer_encoder.0.qkv.weight"])


def test_held_out_mrr_rises_and_metrics_are_logged(tmp_path, pretrained, pairs, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert train.main(run_args(pretrained, pairs, out, **{"trainer.max_steps": 60, "trainer.eval_steps": 30,
                                                          "trainer.logging_steps": 10, "optimizer.lr": 3e-3,
                                                          "trainer.per_device_train_batch_size": 16})) == 0
    m = metrics(out)
    evals = [r for r in m if "eval_mrr@10" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    # each evaluation (the starting model's too) is one console line with the numbers metrics.jsonl holds
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert said == [f"step {r['step']}: " + ", ".join(f"{k} {r[k]:.4g}" for k in ("eval_recall@1", "eval_recall@10",
                                                                                 "eval_mrr@10")) for r in evals]
    start, end = evals[0]["eval_mrr@10"], evals[-1]["eval_mrr@10"]
    assert end > start + 0.05 and end > 1.5 * start, (start, end)  # measured: 0.124 -> 0.248
    assert evals[-1]["eval_recall@10"] >= evals[-1]["eval_recall@1"]
    logged = [r for r in m if "loss" in r]
    for key in ("loss", "accuracy", "pos_cosine", "neg_cosine", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r for r in logged)
    assert logged[-1]["pos_cosine"] > logged[-1]["neg_cosine"]
    assert logged[-1]["loss"] < logged[0]["loss"]
    import yaml
    saved = yaml.safe_load((out / "model_checkpoints/60/config.yaml").read_text())
    assert saved["trainer"]["objective"] == "contrastive" and saved["contrastive"]["pooling"] == "mean"
    assert saved["model"]["hidden_size"] == 32  # the model config of the checkpoint it started from


def test_retrieval_metrics_match_sklearn():
    from sklearn.metrics import label_ranking_average_precision_score, top_k_accuracy_score
    torch.manual_seed(3)
    q, p = torch.randn(40, 8), torch.randn(40, 8)
    p[:10] = q[:10] + 0.1 * torch.randn(10, 8)
    scores = (F.normalize(q.double(), dim=-1) @ F.normalize(p.double(), dim=-1).T).numpy()
    labels = np.arange(40)
    got = contrastive.retrieval_metrics(q, p, mrr_k=40)
    assert got["recall@1"] == pytest.approx(top_k_accuracy_score(labels, scores, k=1, labels=labels))
    assert got["recall@10"] == pytest.approx(top_k_accuracy_score(labels, scores, k=10, labels=labels))
    assert got["mrr@40"] == pytest.approx(label_ranking_average_precision_score(np.eye(40), scores))
    cut = contrastive.retrieval_metrics(q, p)["mrr@10"]  # below rank 10 counts 0
    rank = (scores > scores.diagonal()[:, None]).sum(1)
    assert cut == pytest.approx(np.mean(np.where(rank < 10, 1 / (rank + 1), 0.0)))


def test_cls_pooling_is_honoured_through_export(tmp_path, pretrained, pairs):
    """Trained with pooling cls, exported: sentence-transformers' encode == neobert.pool(..., "cls") on the
    checkpoint's encoder."""
    st = pytest.importorskip("sentence_transformers")
    import export
    out = tmp_path / "run"
    assert train.main(run_args(pretrained, pairs, out, **{"trainer.max_steps": 2, "contrastive.pooling": "cls"})) == 0
    assert export.main(["--out", str(tmp_path / "hf"), str(out)]) == 0
    pool_cfg = json.loads((tmp_path / "hf" / "1_Pooling" / "config.json").read_text())
    assert pool_cfg["pooling_mode_cls_token"] and not pool_cfg["pooling_mode_mean_tokens"]
    texts = ["json.dumps(obj)", "Return the number of items in a container, counting nested ones too."]
    got = st.SentenceTransformer(str(tmp_path / "hf"), trust_remote_code=True, device="cpu").encode(
        texts, convert_to_tensor=True)
    model, info = checkpoint.load(out, head="encoder")
    assert info.pooling == "cls"
    ids, mask = contrastive.pad_rows([np.asarray(e.ids[1:-1]) for e in info.tokenizer.encode_batch(texts)], 64,
                              *(prepare.special_token_ids(info.tokenizer)[k] for k in ("cls", "sep", "pad")))
    with torch.no_grad():
        want = neobert.pool(model.eval()(ids, attention_mask=mask), mask, "cls")
    assert torch.allclose(got.cpu(), want, atol=1e-5)
    assert not torch.allclose(want, neobert.pool(model(ids, attention_mask=mask), mask, "mean"), atol=1e-3)


def test_bad_input(tmp_path, capsys, monkeypatch, pretrained, pairs):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no waiting for network retries
    args = run_args(pretrained, pairs, tmp_path / "r")
    expect_error(capsys, args + ["contrastive.temperature=0"], "contrastive.temperature must be > 0")
    expect_error(capsys, args + ["contrastive.pooling=max"], "contrastive.pooling", "mean, cls")
    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    cfg = write_config(tmp_path / "bad.yaml", [{"data_files": [str(tmp_path / "p.jsonl")]}])
    bad = [str(cfg)] + args[1:] + [f"contrastive.path={tmp_path / 'p1'}"]
    expect_error(capsys, bad, "no column 'query'", "its columns: ['question', 'answer']")
    (tmp_path / "e.jsonl").write_text(json.dumps({"query": "", "positive": "b"}) + "\n")
    cfg = write_config(tmp_path / "empty.yaml", [{"data_files": [str(tmp_path / "e.jsonl")]}])
    expect_error(capsys, [str(cfg)] + args[1:] + [f"contrastive.path={tmp_path / 'p2'}"], "has no rows")
    cfg = write_config(tmp_path / "hub.yaml", [{"name": "no-such-org/no-such-dataset", "config": "triplet"}])
    expect_error(capsys, [str(cfg)] + args[1:] + [f"contrastive.path={tmp_path / 'p3'}"],
                 "no-such-org/no-such-dataset", "looked at http", "cache ")
    expect_error(capsys, args + [f"trainer.init_from={tmp_path / 'runs' / 'smoke'}"],
                 "python train.py configs/smoke.yaml")
    # an MLM run dir resumed as contrastive, and a contrastive run dir resumed as MLM
    mlm = tmp_path / "mlm"
    (mlm / "checkpoints" / "3").mkdir(parents=True)
    (mlm / "model_checkpoints" / "3").mkdir(parents=True)
    (mlm / "checkpoints" / "3" / "train_state.json").write_text(json.dumps({"config": {"trainer": {}}}))
    expect_error(capsys, run_args(pretrained, pairs, mlm, **{"trainer.resume_from_checkpoint": "auto"}),
                 "trainer.objective=mlm run; this run is contrastive")
    con = tmp_path / "con"
    assert train.main(run_args(pretrained, pairs, con, **{"trainer.max_steps": 1})) == 0
    capsys.readouterr()
    mlm_args = [str(ROOT / "configs" / "smoke.yaml"), f"trainer.output_dir={con}", "trainer.resume_from_checkpoint=auto"]
    expect_error(capsys, mlm_args, "trainer.objective=contrastive run; this run is mlm")


def test_config_round_trip(tmp_path):
    cfg = train.load_config(ROOT / "configs" / "contrastive_smoke.yaml", ["contrastive.chunk_size=4"])
    (tmp_path / "c.yaml").write_text(config.config_to_yaml(cfg))
    assert config.config_to_dict(train.load_config(tmp_path / "c.yaml")) == config.config_to_dict(cfg)
    d = config.config_to_dict(cfg)
    assert d["contrastive"]["sources"][0]["name"] == "stdlib" and d["contrastive"]["chunk_size"] == 4
    with pytest.raises(config.UserError, match="unknown config key contrastive.sources.0..colums"):
        contrastive.ContrastiveConfig(sources=[{"name": "x", "colums": "a"}])
    for path in ("contrastive.yaml", "contrastive_smoke.yaml"):
        cfg = train.load_config(ROOT / "configs" / path)
        assert cfg.trainer.objective == "contrastive" and cfg.contrastive.sources


def test_bench_reports_pairs_per_second_and_memory_with_and_without_caching(capsys, pretrained, pairs, tmp_path):
    import bench
    argv = run_args(pretrained, pairs, tmp_path / "b", **{"bench.steps": 1, "trainer.per_device_train_batch_size": 4,
                                                         "contrastive.chunk_size": 4})
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for row in ("no caching", "caching (chunk 4)", "8x batch, caching (chunk 4)"):
        assert row in out, out
    assert "pairs/s" in out and "peak memory" in out


if __name__ == "__main__":  # the torchrun worker of test_ddp_two_gloo_processes_equal_one_process
    _ddp_worker(sys.argv[1])
