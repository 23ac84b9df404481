"""data.py: corpus -> tokenizer -> shards -> packed/padded MLM batches; determinism, resume, streaming, bad input.

Corpora are small synthetic files written into tmp_path; one tokenizer is trained once per session and passed by
tokenizer.path, so each test takes well under a few seconds.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import prepare  # noqa: E402
import data  # noqa: E402
from config import UserError  # noqa: E402
from data import DataCollatorConfig  # noqa: E402
from prepare import DatasetConfig, TokenizerConfig  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega the of and to in is was for on with as by at from neural network token").split()


def make_docs(n, seed=0, min_words=3, max_words=60):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        k = int(rng.integers(min_words, max_words))
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), k)]
        docs.append(f"doc{i} " + " ".join(words) + ".")
    return docs


def write_txt(path, docs):
    path.write_text("\n\n".join(docs) + "\n")
    return path


def write_jsonl(path, docs, column="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({column: d, "id": len(d)}) + "\n")
    return path


def write_parquet(path, docs, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path, row_group_size=7)
    return path


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory):
    tok = prepare.train_tokenizer(make_docs(400, seed=123), vocab_size=300, min_frequency=1)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def tok(tok_path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(tok_path))


def ds_cfg(tmp_path, files, **kw):
    kw.setdefault("validation_split", 0.0)
    kw.setdefault("num_workers", 1)
    return DatasetConfig(data_files=[str(f) for f in files], path=str(tmp_path / "prepared"), **kw)


def prepared(tmp_path, tok_path, docs=None, n=200, **kw):
    docs = make_docs(n) if docs is None else docs
    src = write_txt(tmp_path / "corpus.txt", docs)
    return prepare.prepare(ds_cfg(tmp_path, [src], **kw), TokenizerConfig(path=str(tok_path)), progress=False), docs


def loader(out, **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("micro_batch_size", 4)
    return data.prepared_loader(out, "train", **kw)


def original(batch):
    """Token ids before masking."""
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def cat(batches, key):
    return torch.cat([b[key] for b in batches])


def units_of(stream, cls, sep):
    """Split a packed token stream into [CLS] ... [SEP] units (lists of ids without the specials)."""
    out, cur = [], None
    for t in stream:
        if t == cls:
            cur = []
        elif t == sep:
            out.append(tuple(cur))
            cur = None
        elif cur is not None:
            cur.append(t)
    return out


# -----------------------------------------------------------------------------
# tokenizer

def test_trained_tokenizer_is_bert_style(tok):
    ids = prepare.special_token_ids(tok)
    assert ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    one = tok.encode("alpha beta")
    assert one.ids[0] == ids["cls"] and one.ids[-1] == ids["sep"] and one.tokens[1] == "alpha"
    pair = tok.encode("alpha", "beta")
    assert pair.tokens == ["[CLS]", "alpha", "[SEP]", "beta", "[SEP]"] and pair.type_ids == [0, 0, 0, 1, 1]
    assert tok.encode("ALPHA", add_special_tokens=False).tokens == ["alpha"]    # BERT uncased normalisation


def test_vocab_mismatch_names_both_numbers(tok):
    n = tok.get_vocab_size()
    prepare.check_vocab(tok, n)
    prepare.check_vocab(tok, n + 64)                       # larger (rounded up) is fine
    with pytest.raises(UserError, match=f"{n - 1}.*{n}"):
        prepare.check_vocab(tok, n - 1)


def test_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        prepare.load_tokenizer(TokenizerConfig(path=str(tmp_path / "nope.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match="not a tokenizers"):
        prepare.load_tokenizer(TokenizerConfig(path=str(bad)))
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match="bert-base-uncased.*tokenizer.path"):
        prepare.load_tokenizer(TokenizerConfig())


def test_hub_tokenizer_through_huggingface_hub(tok_path, monkeypatch):
    import huggingface_hub
    calls = []

    def download(repo, filename, **kw):
        calls.append((repo, filename))
        return str(tok_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    t = prepare.load_tokenizer(TokenizerConfig(name="someone/tok"))
    assert calls == [("someone/tok", "tokenizer.json")] and t.token_to_id("[MASK]") == 4


# -----------------------------------------------------------------------------
# prepare: sources, format, round trip

def test_txt_to_shards_to_batches_reproduces_token_ids(tmp_path, tok_path, tok):
    docs = make_docs(120)
    out, _ = prepared(tmp_path, tok_path, docs)
    man = json.loads((out / "manifest.json").read_text())
    assert man["dtype"] == "uint16" and man["splits"]["train"]["documents"] == len(docs)
    assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    want = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    store = prepare.TokenStore(out, "train")
    assert [store.doc(i).tolist() for i in range(store.n_docs)] == want      # stored without specials, in order
    shard = out / "train" / man["splits"]["train"]["shards"][0]["file"]
    raw = np.fromfile(shard, dtype="<u2", offset=prepare.HEADER.size)
    assert raw.tolist() == [t for w in want for t in w]                      # raw little-endian uint16 after header

    # packed rows of one epoch, concatenated, are exactly the [CLS] doc [SEP] units in the epoch's permutation
    ld = loader(out, seq_len=32, micro_batch_size=4, prefetch=0)
    stream = []
    for _ in range(ld.steps_per_epoch):
        (b,) = ld.next_step()
        assert b["input_ids"].shape == (4, 32) and "attention_mask" not in b
        stream += original(b).flatten().tolist()
    perm = ld.plan(0)[0]
    units = [t for d in perm for t in [2, *want[d], 3]]
    assert stream == units[:len(stream)] and len(units) - len(stream) < ld.global_batch_rows * 32
    # positions restart at every segment start, and cu_seqlens agrees with them
    b = ld.next_step()[0]
    starts = (b["position_ids"].flatten() == 0).nonzero().flatten()
    assert starts.tolist() == b["cu_seqlens"][:-1].tolist() and b["cu_seqlens"][-1] == b["input_ids"].numel()
    # max_seqlen is the row length: a bound on every segment and the same in every batch (one compiled graph)
    assert b["cu_seqlens"].dtype == torch.int32 and b["max_seqlen"] == 32 >= int(b["cu_seqlens"].diff().max())


def test_jsonl_and_parquet_sources(tmp_path, tok_path, tok):
    docs = make_docs(60)
    j = write_jsonl(tmp_path / "a.jsonl", docs[:30], column="body")
    p = write_parquet(tmp_path / "b.parquet", docs[30:], column="body")
    ds = ds_cfg(tmp_path, [j, p], text_column="body")
    out = prepare.prepare(ds, TokenizerConfig(path=str(tok_path)), progress=False)
    store = prepare.TokenStore(out, "train")
    assert [store.doc(i).tolist() for i in range(store.n_docs)] == [
        tok.encode(d, add_special_tokens=False).ids for d in docs]


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("first line\nsame doc\n\n\n  \nsecond doc\n\nthird\n")
    ds = DatasetConfig(data_files=[str(f)])
    assert [t for *_, t in prepare.iter_documents(ds)] == ["first line\nsame doc", "second doc", "third"]


def test_glob_and_directory_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        write_txt(tmp_path / "d" / f"{i}.txt", [f"file {i} doc"])
    by_glob = prepare.source_files(DatasetConfig(data_files=[str(tmp_path / "d" / "*.txt")]))
    by_dir = prepare.source_files(DatasetConfig(data_files=[str(tmp_path / "d")]))
    assert [f.name for f in by_glob] == [f.name for f in by_dir] == sorted(f.name for f in by_glob)
    assert len(by_glob) == 3


def test_stdlib_corpus_and_trained_tokenizer(tmp_path):
    ds = DatasetConfig(name="stdlib", path=str(tmp_path / "std"), max_documents=300, validation_split=0.1,
                       num_workers=1)
    tcfg = TokenizerConfig(train=True, vocab_size=800)
    out = prepare.prepare(ds, tcfg, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    s = man["splits"]
    assert s["train"]["documents"] + s["val"]["documents"] == 300 and 10 < s["val"]["documents"] < 60
    tok = prepare.load_tokenizer(tcfg, out)
    assert tok.get_vocab_size() == man["tokenizer"]["vocab_size"] <= 800
    assert prepare.special_token_ids(tok)["cls"] == 2
    # deterministic reading order: the same documents every time
    first = [t for *_, t in prepare.iter_split(ds, "train")][:5]
    assert first == [t for *_, t in prepare.iter_split(ds, "train")][:5] and all(isinstance(t, str) for t in first)
    assert prepare.prepare(ds, tcfg, progress=False) == out           # idempotent


def test_stdlib_plus_installed_packages():
    std = prepare.source_files(DatasetConfig(name="stdlib"))
    both = prepare.source_files(DatasetConfig(name="stdlib+packages"))
    assert all(f.kind == "py" for f in both) and [f.name for f in both[:len(std)]] == [f.name for f in std]
    assert any("site-packages" in f.name for f in both[len(std):])
    assert not any("/test/" in f.name for f in std)                         # test suites are left out


def test_validation_split_and_eval_samples(tmp_path, tok_path, tok):
    docs = make_docs(300)
    src = write_txt(tmp_path / "c.txt", docs)
    tcfg = TokenizerConfig(path=str(tok_path))
    out = prepare.prepare(ds_cfg(tmp_path, [src], validation_split=0.1), tcfg, progress=False)
    tr, va = prepare.TokenStore(out, "train"), prepare.TokenStore(out, "val")
    assert tr.n_docs + va.n_docs == 300 and 15 <= va.n_docs <= 50
    both = sorted([tuple(st.doc(i).tolist()) for st in (tr, va) for i in range(st.n_docs)])
    assert both == sorted(tuple(tok.encode(d, add_special_tokens=False).ids) for d in docs)   # a partition
    ds = ds_cfg(tmp_path, [src], eval_samples=7)
    ds.path = str(tmp_path / "p2")
    out2 = prepare.prepare(ds, tcfg, progress=False)
    va2 = prepare.TokenStore(out2, "val")
    assert [va2.doc(i).tolist() for i in range(7)] == [tok.encode(d, add_special_tokens=False).ids for d in docs[:7]]
    assert prepare.TokenStore(out2, "train").n_docs == 293


def test_worker_processes_give_the_same_shards(tmp_path, tok_path):
    docs = make_docs(700)
    src = write_txt(tmp_path / "c.txt", docs)
    outs = []
    for w in (1, 2):
        ds = ds_cfg(tmp_path, [src], num_workers=w)
        ds.path = str(tmp_path / f"w{w}")
        outs.append(prepare.prepare(ds, TokenizerConfig(path=str(tok_path)), progress=False))
    a, b = (prepare.TokenStore(o, "train") for o in outs)
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.shards[0], b.shards[0])


def test_interrupted_prepare_finishes_on_rerun(tmp_path, tok_path, monkeypatch):
    docs = make_docs(400)
    src = write_txt(tmp_path / "c.txt", docs)
    ds = ds_cfg(tmp_path, [src], validation_split=0.05)
    tcfg = TokenizerConfig(path=str(tok_path))
    real = prepare.ShardWriter.write_docs
    calls = {"n": 0}

    def crash(self, lengths, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("power cut")
        return real(self, lengths, ids)
    monkeypatch.setattr(prepare.ShardWriter, "write_docs", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(ds, tcfg, shard_tokens=500, progress=False)
    out = Path(ds.path)
    assert not (out / "manifest.json").exists()
    assert any(out.rglob("*.tmp")) and list(out.rglob("shard_00000.bin"))    # partial, complete-looking shards exist
    with pytest.raises(UserError, match="no manifest.json"):
        prepare.TokenStore(out, "train")                                       # ...but never taken as complete
    monkeypatch.setattr(prepare.ShardWriter, "write_docs", real)
    prepare.prepare(ds, tcfg, shard_tokens=500, progress=False)
    assert not any(out.rglob("*.tmp"))
    clean = ds_cfg(tmp_path, [src], validation_split=0.05)
    clean.path = str(tmp_path / "clean")
    prepare.prepare(clean, tcfg, shard_tokens=500, progress=False)
    for split in ("train", "val"):
        a, b = prepare.TokenStore(out, split), prepare.TokenStore(clean.path, split)
        assert len(a.shards) == len(b.shards) > (1 if split == "train" else 0)
        assert np.array_equal(a.offsets, b.offsets)
        assert all(np.array_equal(x, y) for x, y in zip(a.shards, b.shards))
    # idempotent: a finished directory is returned as is
    mtime = (out / "manifest.json").stat().st_mtime_ns
    prepare.prepare(ds, tcfg, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_prepared_dir_from_another_source_is_refused(tmp_path, tok_path):
    out, _ = prepared(tmp_path, tok_path, n=50)
    ds = ds_cfg(tmp_path, [tmp_path / "corpus.txt"], max_documents=10)
    with pytest.raises(UserError, match="max_documents: 0 -> 10"):
        prepare.prepare(ds, TokenizerConfig(path=str(tok_path)), progress=False)


def test_refusal_names_the_changed_leaf_keys():
    """A trained tokenizer's spec nests the corpus spec: the refusal names the changed key, not two whole dicts."""
    old = {"train": True, "vocab_size": 512, "corpus": {"name": "local", "validation_split": 0.05}}
    new = {"train": True, "vocab_size": 512, "corpus": {"name": "local", "validation_split": 0.1}}
    assert prepare.spec_diff(old, new, "tokenizer") == ["tokenizer.corpus.validation_split: 0.05 -> 0.1"]
    assert prepare.spec_diff(old, {"path": "t.json"}, "tokenizer") == [
        "tokenizer.corpus: {'name': 'local', 'validation_split': 0.05} -> None", "tokenizer.path: None -> 't.json'",
        "tokenizer.train: True -> None", "tokenizer.vocab_size: 512 -> None"]


def test_shard_writer_keeps_documents_whole(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 300)
    ids = rng.integers(0, 60000, int(lengths.sum())).astype(np.uint32)
    w = prepare.ShardWriter(tmp_path / "s", np.dtype("<u2"), shard_tokens=500)
    for part in np.array_split(np.arange(300), 7):                          # several calls, shards cross calls
        lo, hi = int(lengths[:part[0]].sum()), int(lengths[:part[-1] + 1].sum())
        w.write_docs(lengths[part], ids[lo:hi])
    info = w.finish()
    sizes = [sh["tokens"] for sh in info["shards"]]
    assert sum(sizes) == ids.size and all(n >= 500 for n in sizes[:-1]) and len(sizes) > 5
    offsets = np.load(tmp_path / "s" / "index.npy")
    assert offsets.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert set(np.cumsum(sizes).tolist()) <= set(offsets.tolist())          # shard boundaries are document starts
    raw = np.concatenate([np.fromfile(tmp_path / "s" / sh["file"], dtype="<u2", offset=prepare.HEADER.size)
                          for sh in info["shards"]])
    assert np.array_equal(raw, ids)


def test_uint32_shards_for_large_vocab(tmp_path):
    assert prepare.token_dtype(65536) == np.uint16 and prepare.token_dtype(65537) == np.uint32
    w = prepare.ShardWriter(tmp_path / "s", np.dtype("<u4"))
    w.write_docs(np.array([2, 1]), np.array([70000, 5, 99999], dtype=np.uint32))
    info = w.finish()
    prepare._check_shard(tmp_path / "s" / "shard_00000.bin", 3, np.dtype("<u4"))
    raw = np.fromfile(tmp_path / "s" / "shard_00000.bin", dtype="<u4", offset=prepare.HEADER.size)
    assert raw.tolist() == [70000, 5, 99999] and info["documents"] == 2


# -----------------------------------------------------------------------------
# hub datasets (no network here: the hub listing/download functions serve files written in the hub layout)

def fake_hub(monkeypatch, root, repo, revisions=None):
    import huggingface_hub
    revisions = revisions or {None: root}
    downloads = []

    def list_repo_files(self, repo_id, repo_type=None, revision=None, **kw):
        assert repo_id == repo and repo_type == "dataset"
        base = revisions.get(revision)
        if base is None:
            return []
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def hf_hub_download(repo_id, filename, repo_type=None, revision=None, **kw):
        assert repo_id == repo and repo_type == "dataset"
        downloads.append(filename)
        return str(revisions[revision] / filename)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return downloads


def test_hub_parquet_source_file_by_file(tmp_path, tok_path, tok, monkeypatch):
    root = tmp_path / "hub"
    docs = make_docs(90)
    (root / "en").mkdir(parents=True)
    (root / "fr").mkdir()
    write_parquet(root / "en" / "train-00000-of-00002.parquet", docs[:40])
    write_parquet(root / "en" / "train-00001-of-00002.parquet", docs[40:80])
    write_parquet(root / "en" / "test-00000-of-00001.parquet", docs[80:])
    write_parquet(root / "fr" / "train-00000-of-00001.parquet", ["nope"] * 5)
    (root / "README.md").write_text("card")
    downloads = fake_hub(monkeypatch, root, "org/corpus")
    ds = DatasetConfig(name="org/corpus", config="en", train_split="train", path=str(tmp_path / "p"),
                       validation_split=0.0, num_workers=1)
    files = prepare.source_files(ds)
    assert [f.name for f in files] == ["en/train-00000-of-00002.parquet", "en/train-00001-of-00002.parquet"]
    assert downloads == []                                   # listing only: files are fetched when read
    out = prepare.prepare(ds, TokenizerConfig(path=str(tok_path)), progress=False)
    store = prepare.TokenStore(out, "train")
    assert [store.doc(i).tolist() for i in range(store.n_docs)] == [
        tok.encode(d, add_special_tokens=False).ids for d in docs[:80]]
    ds.text_column = "content"
    with pytest.raises(UserError, match=r"no column 'content'.*\['text', 'n'\]"):
        next(prepare.iter_documents(ds))
    ds.train_split = "validation"
    with pytest.raises(UserError, match="no parquet files for config 'en' split 'validation'"):
        prepare.source_files(ds)


def test_hub_layouts_data_dir_and_parquet_conversion_branch(tmp_path, monkeypatch):
    main, conv = tmp_path / "main", tmp_path / "conv"
    (main / "data").mkdir(parents=True)
    write_parquet(main / "data" / "train-00000-of-00001.parquet", ["a b"])
    write_parquet(main / "data" / "validation-00000-of-00001.parquet", ["c d"])
    fake_hub(monkeypatch, main, "org/x")
    assert [f.name for f in prepare.source_files(DatasetConfig(name="org/x"))] == ["data/train-00000-of-00001.parquet"]
    (main / "data" / "train-00000-of-00001.parquet").unlink()
    (main / "data" / "validation-00000-of-00001.parquet").unlink()
    (main / "script.py").write_text("")
    (conv / "default" / "train").mkdir(parents=True)
    write_parquet(conv / "default" / "train" / "0000.parquet", ["e f"])
    fake_hub(monkeypatch, main, "org/x", revisions={None: main, "refs/convert/parquet": conv})
    files = prepare.source_files(DatasetConfig(name="org/x"))
    assert [(f.name, f.revision) for f in files] == [("default/train/0000.parquet", "refs/convert/parquet")]
    assert [t for *_, t in prepare.iter_documents(DatasetConfig(name="org/x"))] == ["e f"]


def test_hub_listing_failure_is_a_user_error(monkeypatch):
    import huggingface_hub

    def fail(*a, **k):
        raise ConnectionError("offline")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fail)
    with pytest.raises(UserError, match="cannot list dataset 'org/none'"):
        prepare.source_files(DatasetConfig(name="org/none"))


# -----------------------------------------------------------------------------
# bad input

def test_missing_path_and_empty_glob(tmp_path, tok_path):
    tcfg = TokenizerConfig(path=str(tok_path))
    with pytest.raises(UserError, match="no such file"):
        prepare.prepare(ds_cfg(tmp_path, [tmp_path / "missing.txt"]), tcfg, progress=False)
    with pytest.raises(UserError, match="matches no files"):
        prepare.prepare(ds_cfg(tmp_path, [tmp_path / "*.jsonl"]), tcfg, progress=False)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(UserError, match="not .txt, .jsonl or .parquet"):
        prepare.prepare(ds_cfg(tmp_path, [tmp_path / "x.csv"]), tcfg, progress=False)


def test_empty_corpus(tmp_path, tok_path):
    src = tmp_path / "empty.txt"
    src.write_text("\n\n   \n\n")
    with pytest.raises(UserError, match="corpus is empty"):
        prepare.prepare(ds_cfg(tmp_path, [src]), TokenizerConfig(path=str(tok_path)), progress=False)
    assert not (tmp_path / "prepared" / "manifest.json").exists()


def test_undecodable_bytes_are_skipped_and_counted(tmp_path, tok_path, tok, capsys):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"alpha \xff\xfe beta\n\ngamma delta\n\nbroken \xc3 end\n")
    out = prepare.prepare(ds_cfg(tmp_path, [src]), TokenizerConfig(path=str(tok_path)), progress=False)
    assert "skipped 3 undecodable bytes in 2 lines" in capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    assert man["skipped"]["bad_bytes"] == 3 and man["splits"]["train"]["documents"] == 3
    store = prepare.TokenStore(out, "train")
    assert store.doc(0).tolist() == tok.encode("alpha  beta", add_special_tokens=False).ids


def test_missing_text_column_lists_columns(tmp_path, tok_path):
    tcfg = TokenizerConfig(path=str(tok_path))
    j = write_jsonl(tmp_path / "a.jsonl", ["x y"], column="body")
    with pytest.raises(UserError, match=r"no column 'text'.*\['body', 'id'\]"):
        prepare.prepare(ds_cfg(tmp_path, [j]), tcfg, progress=False)
    p = write_parquet(tmp_path / "b.parquet", ["x y"], column="content")
    with pytest.raises(UserError, match=r"no column 'text'.*\['content', 'n'\]"):
        prepare.prepare(ds_cfg(tmp_path, [p]), tcfg, progress=False)


def test_records_without_text_are_skipped_and_counted(tmp_path, tok_path, tok, capsys):
    """Real .jsonl corpora have a few records without the text column or with null text: they are skipped and
    counted (this used to stop the whole prepare at the first such line); a .parquet text_column that is not text
    is a clear error, not a traceback."""
    docs = make_docs(30)
    j = tmp_path / "a.jsonl"
    with open(j, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"body": d}) + "\n")
            if i % 10 == 4:
                f.write(json.dumps({"title": "no body here"}) + "\n")
            if i % 10 == 6:
                f.write(json.dumps({"body": None}) + "\n")
    out = prepare.prepare(ds_cfg(tmp_path, [j], text_column="body"), TokenizerConfig(path=str(tok_path)),
                       progress=False)
    man = prepare.read_manifest(out)
    assert man["splits"]["train"]["documents"] == len(docs)
    assert man["skipped"]["bad_records"] == 3 and man["skipped"]["empty_documents"] == 3
    # the warning names the file and the first bad line: docs 0-4 are lines 1-5, the record without body line 6
    assert man["skipped"]["first_bad"] == f"{j} line 6"
    err = capsys.readouterr().err
    assert "skipped 3 records" in err and f"the first: {j} line 6" in err, err
    store = prepare.TokenStore(out, "train")
    assert [store.doc(i).tolist() for i in range(len(docs))] == [
        tok.encode(d, add_special_tokens=False).ids for d in docs]
    p = write_parquet(tmp_path / "b.parquet", docs, column="content")
    with pytest.raises(UserError, match=r"column 'n' holds int64, not text; its text columns: \['content'\]"):
        prepare.prepare(ds_cfg(tmp_path / "p2", [p], text_column="n"),
                     TokenizerConfig(path=str(tok_path)), progress=False)
    # a file late in a mixture without the column fails before any work (nothing written), not after the others
    t = write_txt(tmp_path / "a_first.txt", make_docs(50))
    ds = ds_cfg(tmp_path / "p3", [t, p], text_column="body")
    with pytest.raises(UserError, match=r"b.parquet has no column 'body'; its columns: \['content', 'n'\]"):
        prepare.prepare(ds, TokenizerConfig(path=str(tok_path)), progress=False)
    assert not (tmp_path / "p3" / "prepared" / "tokenizer.json").exists()
    with pytest.raises(UserError, match="no column 'body'"):
        data.streaming_loader(ds, tok, seq_len=32, micro_batch_size=4)


def test_truncated_or_foreign_shard_names_the_file(tmp_path, tok_path):
    out, _ = prepared(tmp_path, tok_path, n=50)
    shard = out / "train" / "shard_00000.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    with pytest.raises(UserError, match=f"{shard}.*truncated"):
        loader(out)
    shard.write_bytes(b"PK\x03\x04" + good[4:])
    with pytest.raises(UserError, match=f"{shard} is not a neobert token shard"):
        loader(out)
    shard.write_bytes(good)
    index = out / "train" / "index.npy"
    index.write_bytes(index.read_bytes()[:-16])
    with pytest.raises(UserError, match=f"{index}"):
        loader(out)


def test_too_small_corpus_for_one_global_batch(tmp_path, tok_path):
    out, _ = prepared(tmp_path, tok_path, n=5)
    with pytest.raises(UserError, match="fewer than one global batch"):
        loader(out, micro_batch_size=64)


# -----------------------------------------------------------------------------
# batches: packing, padding, masking

def test_packing_efficiency_and_long_documents(tmp_path, tok_path, tok):
    docs = make_docs(150, max_words=40) + make_docs(3, seed=9, min_words=150, max_words=200)
    out, _ = prepared(tmp_path, tok_path, docs)
    ld = loader(out, seq_len=64, micro_batch_size=4, prefetch=0)
    assert data.packing_stats(ld)["epoch_tokens_used"] >= 0.97
    for _ in range(ld.steps_per_epoch):
        b = ld.next_step()[0]
        assert b["max_seqlen"] <= 64 and (b["input_ids"] != 0).all()      # no padding at all
    want = [tok.encode(d, add_special_tokens=False).ids for d in docs]
    assert all(len(w) > 64 for w in want[-3:])
    # all rows of the epoch, concatenated, are the units in order: long documents span rows, nothing is cut away
    every = [t for r in range(ld.rows_per_epoch) for t in ld.row(0, r)[0].tolist()]
    units = [t for d in ld.plan(0)[0] for t in [2, *want[d], 3]]
    assert every == units[:len(every)] and len(units) - len(every) < 64


def test_padded_mode_chunks_long_documents(tmp_path, tok_path, tok):
    docs = make_docs(40, max_words=20) + make_docs(1, seed=5, min_words=120, max_words=121)
    out, _ = prepared(tmp_path, tok_path, docs)
    cfg = DataCollatorConfig(pack_sequences=False, pad_to_multiple_of=8)
    ld = loader(out, seq_len=32, micro_batch_size=4, collator_cfg=cfg, prefetch=0)
    rows = []
    for _ in range(ld.steps_per_epoch):
        b = ld.next_step()[0]
        assert set(b) == {"input_ids", "labels", "attention_mask", "predictions_per_row"}
        assert b["input_ids"].shape[1] % 8 == 0
        assert int((b["labels"] != -100).sum(1).max()) <= b["predictions_per_row"] <= b["input_ids"].shape[1]
        assert b["input_ids"].shape[1] <= 32
        ids = original(b)
        for r in range(len(ids)):
            n = int(b["attention_mask"][r].sum())
            assert (ids[r, n:] == 0).all() and (b["labels"][r, n:] == -100).all()
            assert ids[r, 0] == 2 and ids[r, n - 1] == 3
            rows.append(ids[r, 1:n - 1].tolist())
    n_rows = ld.rows_per_epoch
    assert n_rows == sum(-(-len(tok.encode(d, add_special_tokens=False).ids) // 30) for d in docs)
    assert len(rows) == ld.steps_per_epoch * 4 > n_rows - 4                 # only the last partial batch is dropped
    every = [ld.row(0, r)[0][1:-1].tolist() for r in range(n_rows)]
    assert rows == every[:len(rows)]
    long_doc = tok.encode(docs[-1], add_special_tokens=False).ids
    chunks = [long_doc[i:i + 30] for i in range(0, len(long_doc), 30)]
    assert len(chunks) >= 4 and all(c in every for c in chunks)             # split into chunks, nothing truncated


def test_masking_statistics(tmp_path, tok_path):
    out, _ = prepared(tmp_path, tok_path, n=400)
    results = {}
    for mask_all in (True, False):
        cfg = DataCollatorConfig(mlm_probability=0.2, mask_all=mask_all)
        ld = loader(out, seq_len=64, micro_batch_size=8, collator_cfg=cfg, prefetch=0)
        results[mask_all] = [ld.next_step()[0] for _ in range(20)]
    sel_counts, eligible = 0, 0
    how = Counter()
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a["labels"], b["labels"])                       # the same selection in both modes
        ids, labels = original(a), a["labels"]
        special = (ids == 2) | (ids == 3) | (ids == 0)
        selected = labels != -100
        assert not (selected & special).any()                              # [CLS] [SEP] [PAD] never selected
        sel_counts += int(selected.sum())
        eligible += int((~special).sum())
        assert (a["input_ids"][selected] == 4).all()                       # mask_all: every selected -> [MASK]
        assert torch.equal(a["input_ids"][~selected], ids[~selected])
        x = b["input_ids"][selected]
        orig = ids[selected]
        how["mask"] += int((x == 4).sum())
        how["same"] += int((x == orig).sum())
        rand = x[(x != 4) & (x != orig)]
        how["random"] += len(rand)
        assert ((rand > 4) & (rand < 300)).all()                            # real vocabulary ids only
    rate = sel_counts / eligible
    assert abs(rate - 0.2) < 0.01, rate
    n = sum(how.values())
    assert abs(how["mask"] / n - 0.8) < 0.03 and abs(how["random"] / n - 0.1) < 0.03, how
    assert abs(how["same"] / n - 0.1) < 0.03, how


def test_packed_batch_never_attends_across_documents(tmp_path, tok_path):
    neobert = pytest.importorskip("neobert")
    out, _ = prepared(tmp_path, tok_path, n=80)
    (b,) = loader(out, seq_len=48, micro_batch_size=3, prefetch=0).next_step()
    torch.manual_seed(0)
    cfg = neobert.NeoBERTConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, attn_backend="sdpa")
    model = neobert.NeoBERT(cfg).eval()
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"],
                       max_seqlen=b["max_seqlen"]).flatten(0, 1)
        flat_ids = b["input_ids"].flatten()
        cu = b["cu_seqlens"].tolist()
        assert len(cu) - 1 > 3                                   # several documents per row
        for s, e in zip(cu[:-1], cu[1:]):
            alone = model(input_ids=flat_ids[s:e][None])[0]
            torch.testing.assert_close(packed[s:e], alone, atol=1e-5, rtol=1e-4)
        out_lm = neobert.NeoBERTLMHead(cfg).eval()(**b)          # the batch's keys are the forward's arguments
    assert out_lm.num_masked == int((b["labels"] != -100).sum())


# -----------------------------------------------------------------------------
# order, ranks, resume

def global_batch(out, steps, layouts, **kw):
    """steps of global batches, each as the concatenation over ranks and micro-steps, for each (mb, accum, world)."""
    res = []
    for mb, accum, world in layouts:
        lds = [loader(out, micro_batch_size=mb, grad_accum_steps=accum, rank=r, world_size=world, **kw)
               for r in range(world)]
        got = []
        for _ in range(steps):
            micro = [m for ld in lds for m in ld.next_step()]
            got.append({k: cat(micro, k) for k in ("input_ids", "labels", "position_ids", "attention_mask")
                        if k in micro[0]})
        res.append(got)
    return res


@pytest.mark.parametrize("pack", [True, False])
def test_global_batch_same_for_1_rank_2_ranks_and_micro_steps(tmp_path, tok_path, pack):
    out, _ = prepared(tmp_path, tok_path, n=200)
    kw = {"collator_cfg": DataCollatorConfig(pack_sequences=pack, pad_to_multiple_of=32), "seq_len": 32}
    if not pack:
        kw["collator_cfg"].pad_to_multiple_of = 32               # same width everywhere so rows concatenate
    ref, *others = global_batch(out, 6, [(8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 1, 8)], **kw)
    keys = ("input_ids", "labels", "position_ids") if pack else ("input_ids", "labels", "attention_mask")
    for other in others:
        for a, b in zip(ref, other):
            for k in keys:
                assert torch.equal(a[k], b[k])
    assert not torch.equal(ref[0]["input_ids"], ref[1]["input_ids"])


def test_rank_streams_disjoint_and_covering(tmp_path, tok_path):
    out, _ = prepared(tmp_path, tok_path, n=200)
    lds = [loader(out, micro_batch_size=2, grad_accum_steps=2, rank=r, world_size=2, prefetch=0) for r in range(2)]
    n = lds[0].steps_per_epoch
    rows = [[], []]
    for _ in range(n):
        for r, ld in enumerate(lds):
            for m in ld.next_step():
                rows[r] += [tuple(x) for x in original(m).tolist()]
    every = [tuple(lds[0].row(0, i)[0].tolist()) for i in range(n * lds[0].global_batch_rows)]
    assert len(set(every)) == len(every)
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == sorted(every)
    assert lds[0].next_step()[0]["input_ids"].shape == (2, 32) and lds[0].state_dict()["epoch"] == 1


def test_state_restore_across_epoch_boundary_and_world_size_change(tmp_path, tok_path):
    out, _ = prepared(tmp_path, tok_path, n=60)
    ref = loader(out, micro_batch_size=4, grad_accum_steps=2)           # prefetching thread on
    spe = ref.steps_per_epoch
    assert 2 <= spe < 12
    states, steps = [], []
    for _ in range(2 * spe + 3):
        states.append(json.loads(json.dumps(ref.state_dict())))             # JSON round trip: what train.py stores
        steps.append(torch.cat([m["input_ids"] for m in ref.next_step()]))
    assert ref.state_dict()["epoch"] == 2
    for k in (spe - 1, spe, spe + 1, 2 * spe):                              # around the epoch boundaries
        for mb, accum, world in ((4, 2, 1), (8, 1, 1), (2, 2, 2), (4, 1, 2)):
            lds = [loader(out, micro_batch_size=mb, grad_accum_steps=accum, rank=r, world_size=world)
                   for r in range(world)]
            for ld in lds:
                ld.load_state_dict(states[k])
            for j in range(k, k + 2):
                got = torch.cat([m["input_ids"] for ld in lds for m in ld.next_step()])
                assert torch.equal(got, steps[j]), (k, mb, accum, world)
            for ld in lds:
                ld.close()
    bad = dict(states[1], seed=7)
    with pytest.raises(UserError, match="seed"):
        loader(out).load_state_dict(bad)


def test_masks_do_not_depend_on_rank(tmp_path, tok_path):
    out, _ = prepared(tmp_path, tok_path, n=100)
    a = loader(out, micro_batch_size=4, prefetch=0).next_step()[0]
    b = loader(out, micro_batch_size=2, rank=1, world_size=2, prefetch=0).next_step()[0]
    assert torch.equal(a["labels"][2:], b["labels"]) and torch.equal(a["input_ids"][2:], b["input_ids"])
    c = loader(out, micro_batch_size=4, prefetch=0, seed=1).next_step()[0]
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_eval_batches_are_fixed(tmp_path, tok_path):
    out, _ = prepared(tmp_path, tok_path, n=300, validation_split=0.3)
    # train.py builds a fresh val loader for every evaluation: it must give the same rows and masks each time
    def batches():
        ld = data.prepared_loader(out, "val", seq_len=32, micro_batch_size=4, prefetch=0)
        return [ld.next_step()[0] for _ in range(3)]
    a, b = batches(), batches()
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert (a[0]["labels"] != -100).any() and not torch.equal(a[0]["input_ids"], a[1]["input_ids"])


def test_bench_loader(tmp_path, tok_path):
    out, _ = prepared(tmp_path, tok_path, n=200)
    r = data.bench_loader(loader(out, micro_batch_size=8), steps=20)
    assert r["tokens_per_s"] > 1e4 and r["real_token_fraction"] == 1.0


# -----------------------------------------------------------------------------
# streaming

def streaming(tmp_path, tok, files, **kw):
    ds = DatasetConfig(data_files=[str(f) for f in files], streaming=True, validation_split=0.0, num_workers=1,
                       shuffle_buffer_size=kw.pop("buffer", 7))
    for k in ("validation_split", "eval_samples", "num_workers"):
        if k in kw:
            setattr(ds, k, kw.pop(k))
    kw.setdefault("seq_len", 32)
    kw.setdefault("micro_batch_size", 4)
    split = kw.pop("split", "train")
    return data.streaming_loader(ds, tok, split, **kw)


@pytest.fixture
def stream_files(tmp_path):
    docs = make_docs(45, max_words=30)
    files = [write_jsonl(tmp_path / "a.jsonl", docs[:20]), write_txt(tmp_path / "b.txt", docs[20:33]),
             write_parquet(tmp_path / "c.parquet", docs[33:])]
    return files, docs


def test_streaming_resume_neither_repeats_nor_skips(tmp_path, tok, stream_files):
    files, docs = stream_files
    ref = streaming(tmp_path, tok, files)
    n_steps = 14
    states, steps = [], []
    for _ in range(n_steps):
        states.append(json.loads(json.dumps(ref.state_dict())))
        steps.append(ref.next_step()[0])
    assert ref.state_dict()["epoch"] >= 1                                  # crossed into the second epoch
    assert any(st["offset"] > 0 for st in states) and any(st["window"] > 0 and st["doc"] > 0 for st in states)
    # every document exactly once per epoch: the first len(docs) units are a permutation of the corpus
    stream = [t for b in steps for t in original(b).flatten().tolist()]
    units = units_of(stream, 2, 3)
    want = sorted(tuple(tok.encode(d, add_special_tokens=False).ids) for d in docs)
    assert sorted(units[:len(docs)]) == want
    assert Counter(units[len(docs):]) <= Counter(want)                      # epoch 2 so far: no repeats either
    assert units[:len(docs)] != units[len(docs):2 * len(docs)]            # a new shuffle in epoch 2
    # resuming from any saved state continues exactly (same rows, same masks)
    for k in (1, 3, 6, 9, 12):
        ld = streaming(tmp_path, tok, files, prefetch=0 if k % 2 else 2)
        ld.load_state_dict(states[k])
        for j in range(k, n_steps):
            b = ld.next_step()[0]
            for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                assert torch.equal(b[key], steps[j][key]), (k, j, key)
        ld.close()
    ref.close()


def test_streaming_ranks_and_workers(tmp_path, tok, stream_files):
    files, _ = stream_files
    one = streaming(tmp_path, tok, files, micro_batch_size=8, num_workers=2)
    ref = [one.next_step()[0] for _ in range(5)]
    state = one.state_dict()
    more = [one.next_step()[0] for _ in range(3)]
    one.close()
    lds = [streaming(tmp_path, tok, files, micro_batch_size=2, grad_accum_steps=2, rank=r, world_size=2)
           for r in range(2)]
    for b in ref:
        got = [m for ld in lds for m in ld.next_step()]
        assert torch.equal(cat(got, "input_ids"), b["input_ids"]) and torch.equal(cat(got, "labels"), b["labels"])
    for ld in lds:                                                        # resume under another world size
        ld.load_state_dict(state)
    for b in more:
        got = [m for ld in lds for m in ld.next_step()]
        assert torch.equal(cat(got, "input_ids"), b["input_ids"])
    for ld in lds:
        ld.close()


def test_streaming_validation_docs_are_held_out(tmp_path, tok, stream_files):
    files, docs = stream_files
    tr = streaming(tmp_path, tok, files, eval_samples=5, prefetch=0, seq_len=16, micro_batch_size=1)
    va = streaming(tmp_path, tok, files, eval_samples=5, prefetch=0, split="val", seq_len=16, micro_batch_size=1)
    val_units = units_of([t for _ in range(12) for t in original(va.next_step()[0]).flatten().tolist()], 2, 3)
    first5 = {tuple(tok.encode(d, add_special_tokens=False).ids) for d in docs[:5]}
    assert set(val_units) == first5
    train_units = units_of([t for _ in range(40) for t in original(tr.next_step()[0]).flatten().tolist()], 2, 3)
    assert not set(train_units) & first5 and len(train_units) > 10
    tr.close()
    va.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_streaming_empty_source(tmp_path, tok, prefetch):
    f = tmp_path / "e.txt"
    f.write_text("\n\n")
    ld = streaming(tmp_path, tok, [f], prefetch=prefetch)
    for _ in range(2):                                   # raised in the caller, also from the prefetch thread
        with pytest.raises(UserError, match="has no documents"):
            ld.next_step()
    ld.close()


# -----------------------------------------------------------------------------
# command line

def test_prepare_command_prepares_and_reports_errors(tmp_path, tok_path, capsys):
    """`python train.py CONFIG --prepare-only [--bench]`, the prepare command (train.py owns the config schema, so
    data.py never imports train.py); `python data.py CONFIG` forwards to it."""
    train = pytest.importorskip("train")
    src = write_txt(tmp_path / "c.txt", make_docs(50))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{vocab_size: 512}}\ntokenizer: {{path: {tok_path}}}\n"
                   f"dataset: {{data_files: [{src}], path: {tmp_path / 'out'}, num_workers: 1}}\n")
    assert train.main([str(cfg), "--prepare-only"]) == 0
    assert (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "runs").exists()
    assert train.main([str(cfg), "--bench", "--dataset.max_seq_length", "32",
                       "--trainer.per_device_train_batch_size", "4"]) == 0
    assert "packing: 100.00% of batch tokens are real" in capsys.readouterr().out
    assert train.main([str(cfg), "--model.vocab_size", "100", "--prepare-only"]) == 2
    err = capsys.readouterr().err
    assert "error: model.vocab_size 100" in err and "Traceback" not in err
    assert train.main(["--prepare-only", str(cfg), "--dataset.data_files", "[nope.txt]",
                       "--dataset.path", str(tmp_path / "o2")]) == 2
    assert "no such file 'nope.txt'" in capsys.readouterr().err
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), str(tmp_path / "missing.yaml")], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), str(cfg)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "tokenizer of" in r.stdout and not (tmp_path / "runs").exists(), r.stderr
    assert "import train" not in "".join(line for line in (ROOT / "data.py").read_text().splitlines(True)
                                         if not line.startswith(" "))  # never at module level


def test_prepare_command_on_prepared_data_is_quick(tmp_path, tok_path):
    """On a prepared directory, `python data.py CONFIG` costs little beyond `import torch` (no torch._dynamo, no
    re-reading of the corpus). The bound is loose: the machine running the tests may be busy."""
    src = write_txt(tmp_path / "c.txt", make_docs(50))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{vocab_size: 512}}\ntokenizer: {{path: {tok_path}}}\n"
                   f"dataset: {{data_files: [{src}], path: {tmp_path / 'out'}, num_workers: 1}}\n")
    prepare.prepare(prepare.DatasetConfig(data_files=[str(src)], path=str(tmp_path / "out"), num_workers=1),
                 TokenizerConfig(path=str(tok_path)), progress=False)
    # one process: the time of `import torch`, then of the whole command after it (the rest of the imports,
    # the config, checking the prepared directory)
    probe = ("import runpy, sys, time\nt = time.perf_counter()\nimport torch\ntorch_s = time.perf_counter() - t\n"
             "sys.argv = ['data.py', sys.argv[1]]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print('dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo', torch_s, time.perf_counter() - t)")
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", probe, str(cfg)], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "tokens ready" in r.stdout, r.stderr
        verdict, torch_s, total_s = r.stdout.split("\n")[-2].rsplit(" ", 2)
        runs.append((verdict, float(torch_s), float(total_s)))
    assert all(verdict == "no dynamo" for verdict, _, _ in runs), runs
    assert min(total - torch_s for _, torch_s, total in runs) < 1.5, runs


def test_build_loader_prepared_and_streaming(tmp_path, tok_path):
    src = write_txt(tmp_path / "c.txt", make_docs(100))
    ds = ds_cfg(tmp_path, [src], max_seq_length=32)
    tcfg, coll = TokenizerConfig(path=str(tok_path)), DataCollatorConfig()
    with pytest.raises(UserError, match="python data.py CONFIG"):
        data.build_loader(ds, tcfg, coll, micro_batch_size=2)
    prepare.prepare(ds, tcfg, progress=False)
    a = data.build_loader(ds, tcfg, coll, micro_batch_size=2)
    assert a.state_dict()["kind"] == "packed" and a.next_step()[0]["input_ids"].shape == (2, 32)
    ds.streaming, ds.path = True, str(tmp_path / "streamed")
    assert prepare.prepare(ds, tcfg, progress=False) == Path(ds.path)           # streaming: only the tokenizer
    assert (Path(ds.path) / "tokenizer.json").exists() and not (Path(ds.path) / "train").exists()
    b = data.build_loader(ds, tcfg, coll, micro_batch_size=2, prefetch=0)
    assert b.state_dict()["kind"] == "streaming" and b.next_step()[0]["input_ids"].shape == (2, 32)
    a.close()
    b.close()


# -----------------------------------------------------------------------------
# an unreachable hub, whole error messages (issue 18)

def test_unreachable_hub_is_one_line_at_once(monkeypatch, tmp_path):
    """No network (host names unresolvable), HF_HUB_OFFLINE unset: the real huggingface_hub would retry each request
    for ~25 s (1, 2, 4, 8, 8 s); each hub call fails within seconds with one line saying what to do offline."""
    import socket
    import time

    import huggingface_hub.constants

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # nothing cached
    calls = {("dataset.data_files",): lambda: prepare.source_files(DatasetConfig(name="org/corpus")),
             ("HF_HUB_OFFLINE=1", "tokenizer.path"): lambda: prepare.load_tokenizer(TokenizerConfig(name="org/tok")),
             ("data_files",): lambda: prepare.SourceFile("train.parquet", "parquet", repo="org/corpus").fetch(),
             ("data_files", "train.parquet"): lambda: prepare._parquet_file(prepare.SourceFile("train.parquet", "parquet",
                                                                                         repo="org/corpus"))}
    for fixes, call in calls.items():
        t = time.perf_counter()
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert time.perf_counter() - t < 5 and "\n" not in msg, msg
        assert msg.startswith("cannot reach the Hugging Face Hub") and "Name or service not known" in msg, msg
        assert all(fix in msg for fix in fixes), msg
    t = time.perf_counter()  # a model given as a hub id (trainer.init_from, glue.init_from, mteb.model, export)
    with pytest.raises(UserError) as e:
        checkpoint.resolve("org/model")
    msg = str(e.value)
    assert time.perf_counter() - t < 5 and "\n" not in msg and "Name or service not known" in msg, msg
    assert "HF_HUB_OFFLINE=1" in msg and "pass a local folder" in msg and msg.endswith("chandar-lab/NeoBERT"), msg


def test_parquet_errors_are_not_cut(tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    reason = "a reason " * 40 + "that ends here"
    monkeypatch.setattr(pq, "ParquetFile", lambda *a, **k: (_ for _ in ()).throw(OSError(reason)))
    with pytest.raises(UserError, match="that ends here"):
        prepare._parquet_file(prepare.SourceFile("x.parquet", "parquet", local=str(tmp_path / "x.parquet")))
