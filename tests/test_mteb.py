"""evaluate.py mteb: a checkpoint behind mteb 2.x's encoder protocol, scored offline on tasks built in memory from
the Python stdlib's docstrings (STS, retrieval, classification) and on local BEIR folders.

mteb (the mteb-core package is enough next to sentence-transformers) is a test dependency: requirements-dev.txt.
"""

import json
import math
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import prepare  # noqa: E402
import config  # noqa: E402
import evaluate  # noqa: E402
import mteb_eval  # noqa: E402
import neobert  # noqa: E402
from test_export import write_checkpoint as write_model_checkpoint  # noqa: E402

mteb = pytest.importorskip("mteb")
from datasets import Dataset, DatasetDict  # noqa: E402  (an mteb dependency)
from mteb.abstasks.classification import AbsTaskClassification  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

MODULES = ("textwrap.py", "calendar.py", "heapq.py", "fractions.py", "shutil.py", "statistics.py")


# -----------------------------------------------------------------------------
# the embedded corpus: docstrings of a few stdlib modules, each (module, first line, rest)


def stdlib_docs():
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, seen = [], set()
    for label, module in enumerate(MODULES):
        for doc in prepare.py_docstrings(root / module)[:12]:
            first, _, rest = doc.partition("\n")
            first, rest = first.strip(), " ".join(rest.split())[:300]
            # no repeated texts: their similarities tie exactly, and rank metrics would then hinge on rounding
            if rest and len(first) > 10 and first not in seen and rest not in seen:
                seen.update((first, rest))
                docs.append((label, first, rest))
    return docs


DOCS = stdlib_docs()


def meta(name, type_, main_score, splits=("test",)):
    return TaskMetadata(name=name, description=f"{type_} task built from stdlib docstrings, for tests",
                        dataset={"path": "local/stdlib-docstrings", "revision": "1"}, type=type_, category="t2t",
                        modalities=["text"], eval_splits=list(splits), eval_langs=["eng-Latn"], main_score=main_score)


class DocSTS(AbsTaskSTS):
    """Pairs (first line, rest): 5 when from the same docstring, 2 from the same module, 0 otherwise."""
    metadata = meta("DocSTS", "STS", "cosine_spearman")
    min_score, max_score = 0, 5

    def load_data(self, num_proc=None, **kwargs):
        rows = []
        for i, (label, first, _) in enumerate(DOCS):
            for j in (i, (i + 1) % len(DOCS), (i + 7) % len(DOCS)):
                score = 5 if i == j else (2 if DOCS[j][0] == label else 0)
                rows.append(dict(sentence1=first, sentence2=DOCS[j][2], score=score))
        self.dataset = DatasetDict({"test": Dataset.from_list(rows)})
        self.data_loaded = True


class DocRetrieval(AbsTaskRetrieval):
    """Queries are docstrings' first lines; the relevant document is the rest of the same docstring."""
    metadata = meta("DocRetrieval", "Retrieval", "ndcg_at_10")

    def load_data(self, num_proc=None, **kwargs):
        corpus = Dataset.from_list([dict(id=f"d{i}", title="", text=rest) for i, (_, _, rest) in enumerate(DOCS)])
        queries = Dataset.from_list([dict(id=f"q{i}", text=first) for i, (_, first, _) in enumerate(DOCS)])
        qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(DOCS))}
        self.dataset = {"default": {"test": dict(corpus=corpus, queries=queries, relevant_docs=qrels,
                                                 top_ranked=None)}}
        self.data_loaded = True


class DocClassification(AbsTaskClassification):
    """Which module a docstring comes from."""
    metadata = meta("DocClassification", "Classification", "accuracy")
    samples_per_label, n_experiments = 4, 2

    def load_data(self, num_proc=None, **kwargs):
        rows = [dict(text=f"{first} {rest}", label=label) for label, first, rest in DOCS]
        self.dataset = DatasetDict({"train": Dataset.from_list(rows[0::2]), "test": Dataset.from_list(rows[1::2])})
        self.data_loaded = True


def custom_tasks():
    return [DocSTS(), DocRetrieval(), DocClassification()]


# -----------------------------------------------------------------------------
# fixtures: a tokenizer, tiny checkpoints in the run-dir layout, BEIR folders


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"{first} {rest}" for _, first, rest in DOCS]
    return prepare.train_tokenizer(texts * 2, vocab_size=600, min_frequency=1)


def write_checkpoint(run_dir: Path, step: int, tokenizer, seed: int, pooling=None) -> Path:
    torch.manual_seed(seed)
    config = neobert.NeoBERTConfig(vocab_size=tokenizer.get_vocab_size() + 8, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    model = neobert.NeoBERTLMHead(config)
    with torch.no_grad():  # away from the init, so that different seeds give clearly different embeddings
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p)) if not name.endswith("norm.weight") else p.mul_(1.2)
    extra = {"trainer": {"max_steps": step, "objective": "contrastive"}, "contrastive": {"pooling": pooling}}
    return write_model_checkpoint(run_dir, step, model, tokenizer, extra=extra if pooling else None)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("run"), 10, tokenizer, seed=0).parent.parent


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("clsrun"), 10, tokenizer, seed=1, pooling="cls").parent.parent


def write_beir(folder: Path, docs, skip=()):
    (folder / "qrels").mkdir(parents=True)
    files = {
        "corpus.jsonl": "".join(json.dumps({"_id": f"d{i}", "title": "", "text": rest}) + "\n"
                                for i, (_, _, rest) in enumerate(docs)),
        "queries.jsonl": "".join(json.dumps({"_id": f"q{i}", "text": first}) + "\n"
                                 for i, (_, first, _) in enumerate(docs)),
        "qrels/test.tsv": "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(docs))),
    }
    for name, text in files.items():
        if name not in skip:
            (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def beir_root(tmp_path_factory):
    """Three BEIR folders (one per slice of the corpus) under one root."""
    root = tmp_path_factory.mktemp("beir")
    for k, name in enumerate(("alpha", "beta", "gamma")):
        write_beir(root / name, DOCS[k::3])
    return root


def load_cfg(*overrides):
    return mteb_eval.load_mteb_config(["--trainer.mixed_precision", "no", *overrides])


def encoder_for(run_dir, **kw):
    model, info = checkpoint.load(run_dir, head="encoder")
    args = dict(pooling=info.pooling, max_seq_length=1024, batch_size=8, device="cpu", precision="no")
    args.update(kw)
    return mteb_eval.SentenceEncoder(model, info.tokenizer, **args), model, info


def main_scores(model_result):
    return {r.task_name: r.get_score() for r in model_result.task_results}


def error_line(capsys, argv):
    rc = evaluate.main(["mteb", "--trainer.mixed_precision", "no", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


# -----------------------------------------------------------------------------
# the encoder


def reference_embeddings(model, tokenizer, texts, pooling, max_len=1024):
    """float64, one text at a time (no padding at all), pooled from the definition."""
    model = model.double().eval()
    out = []
    for text in texts:
        ids = tokenizer.encode(text).ids[:max_len]
        if len(ids) == max_len and max_len < len(tokenizer.encode(text).ids):
            ids[-1] = tokenizer.token_to_id("[SEP]")
        with torch.no_grad():
            h = model(torch.tensor([ids]))[0]
        out.append(h[0] if pooling == "cls" else h.mean(0))
    model.float()
    return torch.stack(out).numpy()


@pytest.mark.parametrize("packed", [False, True])
def test_embeddings_match_a_float64_reference(run, cls_run, packed):
    texts = [first for _, first, _ in DOCS[:9]] + ["", "x " * 300]  # an empty text and one past max_seq_length
    for run_dir, pooling in ((run, "mean"), (cls_run, "cls")):
        enc, model, info = encoder_for(run_dir, max_seq_length=40, packed=packed)
        assert info.pooling == enc.pooling == pooling  # pooling from the checkpoint's training (contrastive.pooling)
        if packed:  # a batch is one (1, N) row, here past max_position_embeddings (128): the same as padded
            seqs = [[5] * 40, [6] * 40, [7] * 30, [8] * 30, [9] * 10]
            row = neobert.batch_sequences(seqs, enc.pad_id, packed=True)
            assert row["input_ids"].shape == (1, 150) and row["cu_seqlens"].tolist() == [0, 40, 80, 110, 140, 150]
            np.testing.assert_allclose(neobert.embed(model, seqs, enc.pad_id, pooling, 8, packed=True),
                                       neobert.embed(model, seqs, enc.pad_id, pooling, 8), atol=2e-5, rtol=1e-4)
        got = enc.encode(texts, show_progress_bar=False)
        assert got.shape == (len(texts), 32) and got.dtype == np.float32
        want = reference_embeddings(model, info.tokenizer, texts, pooling, max_len=40)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_pooling_override_and_truncation(cls_run):
    cfg = load_cfg("--mteb.model", str(cls_run), "--mteb.pooling", "mean", "--mteb.max_seq_length", "16")
    assert cfg.mteb.pooling == "mean"
    enc, model, info = encoder_for(cls_run, pooling="mean", max_seq_length=16)
    long = " ".join(first for _, first, _ in DOCS[:5])
    assert len(info.tokenizer.encode(long).ids) > 16
    want = reference_embeddings(model, info.tokenizer, [long], "mean", max_len=16)
    np.testing.assert_allclose(enc.encode([long], show_progress_bar=False), want, atol=2e-5, rtol=1e-4)


def test_model_meta_names_the_checkpoint(run, cls_run, tokenizer, tmp_path):
    enc, model, info = encoder_for(run)
    instr = mteb_eval.load_instructions("configs/mteb_instructions.yaml")
    name, rev = mteb_eval.model_identity(str(run), info.path), mteb_eval.weights_digest(info.path)
    m = mteb_eval.model_meta(name, rev, neobert.num_params(model), enc, instr, True)
    assert m.name == f"local/{run.name}-step10" and len(rev) == 16
    assert (m.n_parameters, m.embed_dim, m.max_tokens) == (neobert.num_params(model), 32, 128)
    assert m.similarity_fn_name.value == "cosine" and m.use_instructions
    wrapped = mteb_eval.mteb_encoder(enc, m, instr)
    assert isinstance(wrapped, mteb.models.abs_encoder.AbsEncoder) and wrapped.mteb_model_meta is m
    a, b = np.random.default_rng(0).normal(size=(2, 3, 32))
    cos = (a @ b.T) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None]
    np.testing.assert_allclose(np.asarray(wrapped.similarity(a, b)), cos, atol=1e-6)
    np.testing.assert_allclose(np.asarray(wrapped.similarity_pairwise(a, b)), np.diag(cos), atol=1e-6)
    assert mteb_eval.model_identity("chandar-lab/NeoBERT", tmp_path) == "chandar-lab/NeoBERT"  # a hub id: as is
    (tmp_path / "hf_dir").mkdir()
    assert mteb_eval.model_identity(str(tmp_path / "hf_dir"), tmp_path / "hf_dir") == "local/hf_dir"  # an HF folder
    # same weights under another folder: the same revision; other weights: another one
    other = write_checkpoint(tmp_path / "other", 10, tokenizer, seed=0)
    assert mteb_eval.weights_digest(other) == rev
    assert mteb_eval.weights_digest(cls_run / "model_checkpoints" / "10") != rev


# -----------------------------------------------------------------------------
# scores: the same as mteb's own for SentenceTransformer(exported folder)


@pytest.fixture
def one_thread():
    """Both encoders on one thread: with several, a loaded machine can split a reduction differently between the two
    encode calls, and near-tied cosines of a tiny model then swap ranks (STS Spearman moved by 1.4e-4 once)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_scores_equal_sentence_transformers_on_the_exported_folder(cls_run, tmp_path, one_thread):
    """cls pooling end to end: the run's contrastive.pooling -> the folder's 1_Pooling -> both encoders. (Mean pooling:
    our embeddings against float64 above; sentence-transformers' against neobert.pool in test_export.py.)"""
    st = pytest.importorskip("sentence_transformers")
    import export
    folder, pooling = tmp_path / "hf", "cls"
    export.export(cls_run, folder)
    st_model = st.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    theirs = main_scores(mteb.evaluate(st_model, custom_tasks(), cache=None, co2_tracker=False,
                                       show_progress_bar=False, encode_kwargs={"batch_size": 8}))
    enc, model, info = encoder_for(folder)  # the exported folder itself, through load_pretrained
    assert enc.pooling == pooling  # read back from the folder's 1_Pooling/config.json
    instr = mteb_eval.Instructions()
    m = mteb_eval.model_meta("local/hf", "x", neobert.num_params(model), enc, instr, False)
    ours = main_scores(mteb.evaluate(mteb_eval.mteb_encoder(enc, m, instr, False), custom_tasks(), cache=None,
                                     co2_tracker=False, show_progress_bar=False, encode_kwargs={"batch_size": 8}))
    assert set(ours) == {"DocSTS", "DocRetrieval", "DocClassification"}
    for name in ours:
        assert abs(ours[name] - theirs[name]) <= 1e-4, (name, ours[name], theirs[name])
    assert 0 < ours["DocRetrieval"] <= 1 and -1 <= ours["DocSTS"] <= 1


# -----------------------------------------------------------------------------
# instructions


def test_instructions_reach_queries_only(run, monkeypatch, tmp_path):
    seen = []
    real = mteb_eval.SentenceEncoder.encode

    def recording(self, texts, **kw):
        seen.append((kw.get("desc"), list(texts)))
        return real(self, texts, **kw)
    monkeypatch.setattr(mteb_eval.SentenceEncoder, "encode", recording)
    monkeypatch.setattr(mteb_eval, "select_tasks", lambda mc: custom_tasks()[:2])
    instr = tmp_path / "instr.yaml"
    instr.write_text(yaml.safe_dump({"query_template": "Q[{instruction}] ", "tasks": {
        "DocRetrieval": "find the body", "STS": "same meaning?"}}))
    cfg = load_cfg("--mteb.model", str(run), "--mteb.instructions", str(instr), "--mteb.output_dir",
                   str(tmp_path / "out"))
    mteb_eval.run_mteb(cfg, progress=False)
    by_desc = {desc: texts for desc, texts in seen}
    queries, docs = by_desc["DocRetrieval queries"], by_desc["DocRetrieval documents"]
    assert queries and all(t.startswith("Q[find the body] ") for t in queries)
    assert docs and not any("find the body" in t or t.startswith("Q[") for t in docs)
    sts = by_desc["DocSTS texts"]  # a symmetric task (no prompt_type): its type's instruction on every input
    assert sts and all(t.startswith("Q[same meaning?] ") for t in sts)
    # off: nothing is prefixed, and the scores are filed apart from the instructed ones
    seen.clear()
    monkeypatch.setattr(mteb_eval, "select_tasks", lambda mc: [DocSTS()])
    mteb_eval.run_mteb(load_cfg("--mteb.model", str(run), "--mteb.instructions", str(instr), "--mteb.use_instructions",
                               "false", "--mteb.output_dir", str(tmp_path / "out")), progress=False)
    assert seen and not any(t.startswith("Q[") for _, texts in seen for t in texts)


def test_document_instruction_and_template_checks(tmp_path):
    p = tmp_path / "i.yaml"
    p.write_text(yaml.safe_dump({"document_template": "D: {instruction}\n",
                                 "tasks": {"Quora": {"query": "q-side.", "document": "d-side."}}}))
    ins = mteb_eval.load_instructions(str(p))
    assert ins.prefix("Quora", "Retrieval", mteb.types.PromptType.document) == "D: d-side.\n"
    assert ins.prefix("Quora", "Retrieval", mteb.types.PromptType.query) == "q-side. "
    assert ins.prefix("Other", "Retrieval", None) == ""
    shipped = mteb_eval.load_instructions("configs/mteb_instructions.yaml")
    v1 = [t.metadata.name for t in mteb.get_benchmark("MTEB(eng, v1)").tasks]
    assert all(t in shipped.tasks for t in v1)
    p.write_text("query_template: 'no placeholder'\n")
    with pytest.raises(config.UserError, match="query_template"):
        mteb_eval.load_instructions(str(p))


# -----------------------------------------------------------------------------
# results: the cache, the summary, a BEIR folder, torchrun


@pytest.fixture(scope="module")
def scored(run, tmp_path_factory):
    """The three stdlib tasks scored once for `run`: (summary, output_dir)."""
    out = tmp_path_factory.mktemp("scored")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mteb_eval, "select_tasks", lambda mc: custom_tasks())
        summary = mteb_eval.run_mteb(load_cfg("--mteb.model", str(run), "--mteb.output_dir", str(out)), progress=False)
    return summary, out


def count_encodes(monkeypatch):
    calls = []
    real = mteb_eval.SentenceEncoder.encode
    monkeypatch.setattr(mteb_eval.SentenceEncoder, "encode", lambda self, texts, **kw: calls.append(1) or
                        real(self, texts, **kw))
    return calls


def test_summary_is_table_4(scored):  # before the test below, which rewrites results.json
    s, out = scored
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"] == s["tasks"] and on_disk["average"] == s["average"]
    for name in ("DocSTS", "DocRetrieval", "DocClassification"):  # x100 of mteb's main score, from its own file
        result = mteb.TaskResult.from_disk(Path(s["results_dir"]) / f"{name}.json")
        assert s["tasks"][name]["score"] == pytest.approx(100 * result.get_score(), abs=1e-3)
    scores = [r["score"] for r in s["tasks"].values()]
    assert s["average"] == pytest.approx(sum(scores) / 3, abs=1e-3)
    assert s["types"]["STS"]["score"] == pytest.approx(s["tasks"]["DocSTS"]["score"], abs=1e-3)
    md = (out / "results.md").read_text()
    assert "| Model | Class. | Clust. | PairClass. | Rerank. | Retr. | STS | Summ. | Avg. |" in md
    assert "| 61.6 | 40.8 | 76.2 | 51.2 | 31.6 | 74.8 | 30.7 | 51.3 |" in md
    assert f"| {s['average']:.1f} |" in md


def test_rerun_skips_scored_tasks_and_checkpoints_never_share(run, cls_run, scored, monkeypatch):
    first, out = scored
    assert first["tasks_scored"] == 3
    monkeypatch.setattr(mteb_eval, "select_tasks", lambda mc: custom_tasks())
    calls = count_encodes(monkeypatch)
    again = mteb_eval.run_mteb(load_cfg("--mteb.model", str(run), "--mteb.output_dir", str(out)), progress=False)
    assert not calls and again["tasks"] == first["tasks"]  # all three read back from mteb's files
    monkeypatch.setattr(mteb_eval, "select_tasks", lambda mc: [DocSTS()])
    other = mteb_eval.run_mteb(load_cfg("--mteb.model", str(cls_run), "--mteb.output_dir", str(out)), progress=False)
    assert calls, "another checkpoint must be scored, not handed the first one's results"
    assert other["tasks"]["DocSTS"] != first["tasks"]["DocSTS"] and other["revision"] != first["revision"]
    files = sorted(p.relative_to(out / "results") for p in (out / "results").rglob("DocSTS.json"))
    assert len(files) == 2 and files[0].parts[:2] != files[1].parts[:2]
    calls.clear()  # an interrupted benchmark: a lost task file is the only one scored again
    Path(first["results_dir"], "DocRetrieval.json").unlink()
    monkeypatch.setattr(mteb_eval, "select_tasks", lambda mc: custom_tasks())
    mteb_eval.run_mteb(load_cfg("--mteb.model", str(run), "--mteb.output_dir", str(out)), progress=False)
    assert len(calls) == 2  # queries and documents of DocRetrieval only
    calls.clear()
    monkeypatch.setattr(mteb_eval, "select_tasks", lambda mc: [DocSTS()])
    mteb_eval.run_mteb(load_cfg("--mteb.model", str(run), "--mteb.output_dir", str(out), "--mteb.overwrite", "true"),
                      progress=False)
    assert calls  # overwrite: scored again although its file is there


def ndcg_at_10(q_emb, d_emb):
    """nDCG@10 with one relevant document per query (query i <-> document i), cosine similarity, float64."""
    q = q_emb / np.linalg.norm(q_emb, axis=1, keepdims=True)
    d = d_emb / np.linalg.norm(d_emb, axis=1, keepdims=True)
    ranks = [int((row > row[i]).sum()) for i, row in enumerate(q @ d.T)]
    return float(np.mean([1 / math.log2(r + 2) if r < 10 else 0.0 for r in ranks]))


@pytest.fixture(scope="module")
def beir_single(run, beir_root, tmp_path_factory):
    """python evaluate.py mteb --mteb.beir_dir ROOT (three BEIR folders), in this process: the output dir."""
    out = tmp_path_factory.mktemp("beir-single")
    argv = ["mteb", "--trainer.mixed_precision", "no", "--mteb.model", str(run), "--mteb.beir_dir", str(beir_root),
            "--mteb.output_dir", str(out)]
    assert evaluate.main(argv) == 0
    return out


def test_beir_folders_are_retrieval_tasks(run, beir_single, tmp_path, capsys):
    s = json.loads((beir_single / "results.json").read_text())
    assert list(s["tasks"]) == ["alpha", "beta", "gamma"]
    assert {r["type"] for r in s["tasks"].values()} == {"Retrieval"}
    enc, _, _ = encoder_for(run)
    ins = mteb_eval.load_instructions("configs/mteb_instructions.yaml")  # the Retrieval type's query instruction
    for k, name in enumerate(("alpha", "beta", "gamma")):
        docs = DOCS[k::3]
        queries = [ins.prefix(name, "Retrieval", mteb.types.PromptType.query) + f for _, f, _ in docs]
        want = ndcg_at_10(enc.encode(queries, show_progress_bar=False).astype(np.float64),
                          enc.encode([r for _, _, r in docs], show_progress_bar=False).astype(np.float64))
        assert s["tasks"][name]["score"] == pytest.approx(100 * want, abs=1e-3)
    broken = write_beir(tmp_path / "broken", DOCS, skip=("qrels/test.tsv",))
    line = error_line(capsys, ["--mteb.model", str(run), "--mteb.beir_dir", str(broken)])
    assert "qrels/test.tsv" in line and str(broken) in line
    single = write_beir(tmp_path / "one", DOCS[:5])  # a folder that is itself a BEIR folder
    assert [t.metadata.name for t in mteb_eval.beir_tasks(str(single))] == ["one"]


def test_an_edited_beir_folder_is_scored_again(run, tmp_path):
    folder = write_beir(tmp_path / "edit", DOCS[:12])
    argv = ["mteb", "--trainer.mixed_precision", "no", "--mteb.model", str(run), "--mteb.beir_dir", str(folder),
            "--mteb.output_dir", str(tmp_path)]
    assert evaluate.main(argv) == 0
    before = json.loads((tmp_path / "results.json").read_text())["tasks"]["edit"]["score"]
    # the same folder name, other judgements: query i now wants document i + 1
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                               "".join(f"q{i}\td{(i + 1) % 12}\t1\n" for i in range(12)))
    assert evaluate.main(argv) == 0
    after = json.loads((tmp_path / "results.json").read_text())["tasks"]["edit"]["score"]
    assert after != before


def test_torchrun_splits_tasks_and_summary_matches(run, beir_root, beir_single, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "evaluate.py"), "mteb", "--trainer.mixed_precision", "no", "--mteb.model",
                           str(run), "--mteb.beir_dir", str(beir_root), "--mteb.output_dir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = sorted(re.findall(r"\[rank (\d)\] (\w+) \(Retrieval\)", proc.stderr))  # progress bars share the lines
    assert ran == [("0", "alpha"), ("0", "gamma"), ("1", "beta")], ran
    a = json.loads((beir_single / "results.json").read_text())
    b = json.loads((tmp_path / "results.json").read_text())
    assert a["tasks"] == b["tasks"] and a["types"] == b["types"] and a["average"] == b["average"]
    assert b["tasks_scored"] == 3


# -----------------------------------------------------------------------------
# bad input: one line, exit 2


def test_bad_input_is_one_line(run, capsys, tmp_path, monkeypatch):
    line = error_line(capsys, ["--mteb.model", str(run), "--mteb.tasks", "STSBenchmrk"])
    assert "STSBenchmrk" in line and "STSBenchmark" in line
    line = error_line(capsys, ["--mteb.model", str(run), "--mteb.benchmark", "MTEB(eng, v3)"])
    assert "MTEB(eng, v3)" in line and "MTEB(eng, v2)" in line
    line = error_line(capsys, ["--mteb.model", str(run), "--mteb.task_types", "Retreival"])
    assert "Retrieval" in line
    line = error_line(capsys, ["--mteb.model", str(tmp_path / "nope"), "--mteb.tasks", "STS12"])
    assert "nope" in line and "run directory" in line
    line = error_line(capsys, ["--mteb.model", str(run), "--mteb.pooling", "max"])
    assert "mteb.pooling" in line
    line = error_line(capsys, ["--mteb.model", str(run), "--mteb.beir_dir", str(tmp_path / "absent")])
    assert "absent" in line


def test_task_data_unreachable_offline(run, capsys, monkeypatch, tmp_path):
    import datasets
    import huggingface_hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = error_line(capsys, ["--mteb.model", str(run), "--mteb.tasks", "STS12", "--mteb.output_dir",
                               str(tmp_path)])
    assert "STS12" in line and "Hugging Face Hub" in line and "--mteb.beir_dir" in line


def test_missing_mteb_says_what_to_install(run, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mteb" else real(name, *a))
    line = error_line(capsys, ["--mteb.model", str(run), "--mteb.tasks", "STS12"])
    assert "pip install" in line and "requirements-eval.txt" in line


# -----------------------------------------------------------------------------
# first contact (issue 18): an unreachable hub, qrels naming absent documents, where results land


def test_unreachable_hub_fails_at_once_with_the_offline_ways(run, capsys, monkeypatch, tmp_path):
    """No network (every host name unresolvable) and HF_HUB_OFFLINE unset: huggingface_hub's own retry loop (1, 2, 4,
    8, 8 s) would take half a minute before failing; one line arrives within seconds instead."""
    import socket
    import time

    import datasets
    import huggingface_hub.constants

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t = time.perf_counter()
    line = error_line(capsys, ["--mteb.model", str(run), "--mteb.tasks", "STS12", "--mteb.output_dir", str(tmp_path)])
    assert time.perf_counter() - t < 5
    assert "cannot reach the Hugging Face Hub" in line and "STS12" in line and "Name or service not known" in line
    assert "HF_HUB_OFFLINE=1" in line and "--mteb.beir_dir" in line


def test_qrels_naming_absent_documents_are_counted_and_named(tmp_path, capsys):
    folder = write_beir(tmp_path / "gaps", DOCS[:6])
    with open(folder / "qrels" / "test.tsv", "a") as f:
        f.write("q0\tghost-1\t1\nq1\tghost-2\t1\n")
    task = mteb_eval.beir_task(folder)
    err = capsys.readouterr().err
    assert "2 judgements" in err and "'ghost-1'" in err and "corpus.jsonl" in err and err.count("\n") == 1
    task.load_data()
    assert "ghost-1" not in task.dataset["default"]["test"]["relevant_docs"]["q0"]  # skipped, as BEIR does
    write_beir(tmp_path / "whole", DOCS[:6])
    mteb_eval.beir_task(tmp_path / "whole")
    assert "warning" not in capsys.readouterr().err


def test_results_land_in_one_folder(tmp_path, tokenizer, monkeypatch):
    """mteb.output_dir is the results folder itself; unset: <run dir>/mteb for a training checkpoint, runs/<its
    name>/mteb (from the working directory, as GLUE's runs/<name>/glue) for any other model folder. Never mteb/mteb."""
    import shutil
    monkeypatch.setattr(mteb_eval, "select_tasks", lambda mc: [DocSTS()])
    ckpt = write_checkpoint(tmp_path / "run", 10, tokenizer, seed=3)
    mteb_eval.run_mteb(load_cfg("--mteb.model", str(tmp_path / "run")), progress=False)
    assert (tmp_path / "run/mteb/results.json").is_file() and not (tmp_path / "run/mteb/mteb").exists()
    mteb_eval.run_mteb(load_cfg("--mteb.model", str(ckpt), "--mteb.output_dir", str(tmp_path / "out")), progress=False)
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "results").is_dir()
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ckpt, tmp_path / "plain")
    mteb_eval.run_mteb(load_cfg("--mteb.model", "plain"), progress=False)
    assert (tmp_path / "runs/plain/mteb/results.json").is_file() and not (tmp_path / "runs/plain/mteb/mteb").exists()
