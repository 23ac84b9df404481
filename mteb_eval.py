"""MTEB for NeoBERT checkpoints: embed texts with a checkpoint (its own pooling; sorted by length, unpadded and bf16 on
GPU) behind mteb 2.x's encoder protocol, let mteb run its evaluators and write its files, summarise like Table 4.

usage: python evaluate.py mteb [CONFIG=configs/mteb.yaml] --mteb.model RUN_DIR|CHECKPOINT|HF_DIR|HUB_ID [--s.key v ...]
  --mteb.tasks STSBenchmark,SciFact | --mteb.benchmark "MTEB(eng, v1)" | --mteb.beir_dir DIR
  --mteb.task_types STS,Retrieval (keeps only these types of the tasks above)
  --mteb.pooling auto|mean|cls  --mteb.max_seq_length 1024  --mteb.batch_size 64  --mteb.use_instructions true|false
  torchrun --nproc_per_node N evaluate.py mteb ...: the tasks are spread over the processes
  results: mteb's files and results.md / results.json in mteb.output_dir (default: <run dir>/mteb, or runs/<name>/mteb)

mteb is optional and slow to import: only the functions that need it import it. Reference: docs/mteb.md.
"""

import datetime
import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, get_args

import numpy as np
import torch
import torch.distributed as dist
import yaml

import checkpoint
import config
import hub
import neobert
import prepare
import runtime
from config import UserError

MTEB_TYPE_LABELS = {"Classification": "Class.", "Clustering": "Clust.", "PairClassification": "PairClass.",
                    "Reranking": "Rerank.", "Retrieval": "Retr.", "STS": "STS", "Summarization": "Summ."}  # Table 4
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
    output_dir: Optional[str] = None    # results folder; null: <run dir>/mteb (a checkpoint), else runs/<name>/mteb
    overwrite: bool = False             # re-score tasks that already have results for this checkpoint

    def __post_init__(self):
        config.require(self.model, f"mteb.model is not set; pass --mteb.model with {checkpoint.MODEL_SOURCES}")
        config.require(self.max_seq_length >= 2, "mteb.max_seq_length must be >= 2")
        config.require(self.batch_size >= 1, "mteb.batch_size must be >= 1")


# -----------------------------------------------------------------------------
# the encoder: texts -> (N, H) float32 embeddings

class SentenceEncoder:
    """A NeoBERT encoder and its tokenizer as a text embedder (neobert.embed; packed: unpadded rows, varlen kernels)."""

    def __init__(self, model, tokenizer, pooling: str, max_seq_length: int, batch_size: int, device, precision: str,
                 packed: Optional[bool] = None):
        from tokenizers import Tokenizer
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation is set on it
        self.max_seq_length = min(max_seq_length, model.config.max_position_embeddings)
        self.tokenizer.enable_truncation(self.max_seq_length)
        self.tokenizer.no_padding()
        self.pad_id = prepare.special_token_ids(self.tokenizer)["pad"]
        self.pooling, self.batch_size, self.precision = pooling, batch_size, precision
        # padded batches on CPU: there the packed path masks a (T, T) block-diagonal matrix
        self.packed = self.device.type == "cuda" if packed is None else packed

    def encode(self, texts, show_progress_bar: bool = True, desc: str = "embedding") -> np.ndarray:
        from tqdm.auto import tqdm
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        bar = lambda starts: tqdm(starts, desc=desc, disable=not show_progress_bar, leave=False)  # noqa: E731
        return neobert.embed(self.model, ids, self.pad_id, self.pooling, self.batch_size, self.packed,
                             runtime.autocast(self.device, self.precision), bar).numpy()


# -----------------------------------------------------------------------------
# instructions: per task (or per task type) a query instruction and an optional document instruction

@dataclass
class Instruction:
    query: str = ""
    document: str = ""


@dataclass
class Instructions:
    """A YAML file of instructions by task name or type (configs/mteb_instructions.yaml describes the format). Queries
    and inputs of symmetric tasks (no prompt_type) get the query instruction; documents the document one, or none."""
    tasks: Optional[dict] = None  # task name or type -> Instruction (a string: the query instruction)
    query_template: str = "{instruction} "
    document_template: str = "{instruction} "
    digest: str = field(default="none", init=False)  # of the file's content: changed instructions reuse no scores

    def __post_init__(self):
        self.tasks = {str(name): config.convert({"query": v} if isinstance(v, str) else v, Instruction,
                                                f"instructions.tasks.{name}") for name, v in (self.tasks or {}).items()}
        for key in ("query_template", "document_template"):
            config.require("{instruction}" in getattr(self, key), f"{key} must be a string holding {{instruction}}")

    def prefix(self, task_name: str, task_type: str, prompt_type=None) -> str:
        entry = self.tasks.get(task_name) or self.tasks.get(task_type) or Instruction()
        if str(getattr(prompt_type, "value", prompt_type)) == "document":
            return self.document_template.format(instruction=entry.document) if entry.document else ""
        return self.query_template.format(instruction=entry.query) if entry.query else ""


def load_instructions(path: Optional[str], use: bool = True) -> Instructions:
    if not use or not path:
        return Instructions()
    p = Path(path).expanduser()
    p = p if p.exists() else Path(__file__).resolve().parent / p  # the shipped configs work from any directory
    config.require(p.is_file(), f"mteb.instructions: {path} not found; pass a YAML file of per-task instructions, or "
                   "--mteb.use_instructions false")
    text = p.read_text()
    try:
        out = config.build_section("instructions", Instructions, yaml.safe_load(text))
    except yaml.YAMLError as e:
        raise UserError(f"mteb.instructions: {p} is not valid YAML: {' '.join(str(e).split())}") from None
    except UserError as e:
        raise UserError(f"mteb.instructions: {p}: {e}") from None
    out.digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return out


# -----------------------------------------------------------------------------
# the mteb side: model meta (who produced these scores), the encoder protocol, tasks

def import_mteb():
    # mteb.evaluate imports sentence-transformers even for our own encoder; the mteb-core package lacks it
    if importlib.util.find_spec("mteb") is None or importlib.util.find_spec("sentence_transformers") is None:
        raise UserError("evaluate.py mteb needs the mteb package (with sentence-transformers): "
                        "pip install -r requirements-eval.txt (mteb)")
    return importlib.import_module("mteb")


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
    if (run := checkpoint.owning_run(path)) is not None:
        return f"local/{run.resolve().name}-step{path.name}"
    return f"local/{path.resolve().name}"


def model_meta(name: str, revision: str, n_parameters: int, encoder: SentenceEncoder, instructions: Instructions,
               use_instructions: bool):
    from mteb.models.model_meta import ModelMeta
    # experiment_kwargs: settings that change the embeddings file results apart (results/<name>/<rev>/experiments/..)
    settings = dict(pooling=encoder.pooling, max_seq_length=encoder.max_seq_length, precision=encoder.precision,
                    instructions=instructions.digest if use_instructions else "none")
    return ModelMeta(
        loader=None, name=name, revision=revision, release_date=None, languages=None, n_parameters=n_parameters,
        memory_usage_mb=None, max_tokens=encoder.max_seq_length, embed_dim=encoder.model.config.hidden_size,
        license=None, open_weights=True, public_training_code=None, public_training_data=None, framework=["PyTorch"],
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
            prefix = self.instructions.prefix(task_metadata.name, task_metadata.type, prompt_type)
            side = {"query": "queries", "document": "documents"}.get(getattr(prompt_type, "value", None), "texts")
            return self.model.encode([prefix + t for batch in inputs for t in batch["text"]],
                                     desc=f"{task_metadata.name} {side}",
                                     show_progress_bar=show_progress_bar and kwargs.get("show_progress_bar", True))

    return NeoBERTEncoder()


def _read_jsonl(path: Path) -> list:
    """The rows of a BEIR corpus.jsonl ({_id, title, text}) or queries.jsonl ({_id, text}) as {id, title, text}."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{i}: not a JSON object; each line of {path.name} is one") from None
            config.require(isinstance(row, dict) and "_id" in row and isinstance(row.get("text", ""), str),
                           f"{path}:{i}: a {path.name} line needs \"_id\" and \"text\" (BEIR format)")
            rows.append({"id": str(row["_id"]), "title": str(row.get("title") or ""), "text": row.get("text") or ""})
    return rows


def beir_task(folder: Path):
    """A local BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv: query-id, corpus-id, score, a header line) as
    an mteb retrieval task, named after the folder; nDCG@10 as BEIR and MTEB report. Read up front: a broken folder
    fails before any model work."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    missing = [f for f in BEIR_FILES if not (folder / f).is_file()]
    config.require(not missing, f"mteb.beir_dir: {folder} lacks {', '.join(missing)}; a BEIR folder holds "
                   f"{', '.join(BEIR_FILES)}")
    corpus, queries, qrels = _read_jsonl(folder / "corpus.jsonl"), _read_jsonl(folder / "queries.jsonl"), {}
    qrels_file = folder / "qrels" / "test.tsv"
    with open(qrels_file, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if i == 1 and parts[-1].strip().lower() == "score" or not line.strip():
                continue  # the header
            try:
                qid, did, score = parts[0], parts[-2], int(float(parts[-1]))
            except (IndexError, ValueError):
                raise UserError(f"{qrels_file}:{i}: expected query-id<TAB>corpus-id<TAB>score") from None
            qrels.setdefault(qid, {})[did] = score
    doc_ids = {r["id"] for r in corpus}
    if missing := [d for docs in qrels.values() for d in docs if d not in doc_ids]:
        config.warn(f"{qrels_file}: {len(missing)} judgements name documents missing from "
                    f"corpus.jsonl (e.g. {missing[0]!r}); they are skipped, as BEIR does")
    qrels = {q: {d: s for d, s in docs.items() if d in doc_ids} for q, docs in qrels.items()}
    queries = [{"id": r["id"], "text": r["text"]} for r in queries if qrels.get(r["id"])]
    config.require(corpus and queries, f"mteb.beir_dir: {folder} has no queries with judged documents of its corpus "
                   "(qrels/test.tsv ids must match queries.jsonl and corpus.jsonl)")
    revision = hashlib.sha256(b"".join((folder / f).read_bytes() for f in BEIR_FILES)).hexdigest()[:16]

    class BEIRFolderTask(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=folder.resolve().name, description=f"the local BEIR folder {folder.resolve()}",
            dataset={"path": str(folder.resolve()), "revision": revision}, type="Retrieval",
            category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
            main_score="ndcg_at_10")

        def load_data(self, num_proc=None, **kwargs):
            split = dict(corpus=Dataset.from_list(corpus), queries=Dataset.from_list(queries), relevant_docs=qrels,
                         top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return BEIRFolderTask()


def beir_tasks(beir_dir: str) -> list:
    root = Path(beir_dir).expanduser()
    config.require(root.is_dir(), f"mteb.beir_dir: {beir_dir} is not a directory; pass a BEIR folder "
                   f"({', '.join(BEIR_FILES)})")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and (d / "corpus.jsonl").is_file())
    # a BEIR folder, or a folder of BEIR folders (as the BEIR download unpacks)
    return [beir_task(d) for d in (subdirs if subdirs and not (root / "corpus.jsonl").is_file() else [root])]


def select_tasks(mc: MtebConfig) -> list:
    """The tasks to run: mteb.tasks (a benchmark's own version where it has the task: e.g. STS17 en-en only in
    MTEB(eng, v1)), plus mteb.beir_dir folders; neither given: the benchmark's tasks. task_types filters them."""
    import difflib
    mteb = import_mteb()
    from mteb.abstasks.task_metadata import TaskType
    types = get_args(TaskType)
    bad = [t for t in mc.task_types if t not in types]
    close = difflib.get_close_matches(bad[0], types, n=3, cutoff=0.5) if bad else []
    config.require(not bad, f"mteb.task_types: unknown task type {', '.join(bad)}; did you mean "
                   f"{', '.join(close or MTEB_TYPE_LABELS)}?")
    config.require(mc.tasks or mc.beir_dir or mc.benchmark, "no tasks: set --mteb.tasks, --mteb.benchmark or "
                   "--mteb.beir_dir")
    bench = None
    if mc.benchmark and (mc.tasks or not mc.beir_dir):  # the source of tasks, or of their benchmark versions
        try:
            bench = mteb.get_benchmark(mc.benchmark)
        except (KeyError, ValueError) as e:
            raise UserError(f"mteb.benchmark: {e.args[0] if e.args else e}") from None
    own = {t.metadata.name: t for t in bench.tasks} if bench is not None else {}
    from_registry = [n for n in mc.tasks if n not in own]
    try:
        found = {t.metadata.name: t for t in mteb.get_tasks(tasks=from_registry)} if from_registry else {}
    except (KeyError, ValueError) as e:
        raise UserError(f"mteb.tasks: {str(e.args[0] if e.args else e).removeprefix('KeyError: ')}") from None
    tasks = [own.get(n) or found[n] for n in mc.tasks] + (beir_tasks(mc.beir_dir) if mc.beir_dir else [])
    tasks = tasks or list(bench.tasks)  # neither tasks nor beir_dir given: the benchmark's
    if mc.task_types:
        tasks = [t for t in tasks if t.metadata.type in mc.task_types]
        config.require(tasks, f"mteb.task_types {','.join(mc.task_types)}: none of the selected tasks has these types")
    names = [t.metadata.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    config.require(not dup, f"task names given twice: {', '.join(dup)} (BEIR folders are named after their folder)")
    return tasks


def score_task(mteb, model, task, cache, overwrite: bool):
    name = task.metadata.name
    # only-missing keeps a result of another dataset revision: an edited BEIR folder (revision: its hash) is rescored
    cached = None if overwrite else cache.load_task_result(name, model.mteb_model_meta)
    stale = cached is not None and cached.dataset_revision != task.metadata.revision
    offline = "set HF_HUB_OFFLINE=1 to use task data already in the HF cache, or pass a local BEIR folder with " \
              "--mteb.beir_dir DIR"
    with hub.requests(f"download the data of task {name}", offline):
        try:
            mteb.evaluate(model, task, cache=cache, co2_tracker=False, raise_error=True, show_progress_bar=False,
                          overwrite_strategy="always" if overwrite or stale else "only-missing",
                          encode_kwargs={"batch_size": model.model.batch_size})
        except Exception as e:  # a UserError is none of these: it passes as it is
            unreachable = {"ConnectionError", "TimeoutError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                           "DatasetNotFoundError", "HfHubHTTPError"}  # the hub (or network) could not be reached
            if unreachable & {c.__name__ for c in type(e).__mro__}:
                raise UserError(f"task {name}: its data could not be fetched from the Hugging Face Hub "
                                f"({config.one_line(e)}); MTEB tasks need the hub (or their datasets already in the "
                                "HF cache); to score a local corpus offline, pass a BEIR folder with --mteb.beir_dir "
                                "DIR") from None
            raise


# -----------------------------------------------------------------------------
# report: per task, per type, overall, beside the paper's row (Table 4 of arXiv:2502.19587)

def summarize(tasks, cache, meta, info: dict) -> dict:
    """A task's score: its main score x 100, the mean over its eval splits and (benchmark-selected) subsets."""
    rows = {}
    for task in tasks:
        result = cache.load_task_result(task.metadata.name, meta)
        scores = result.scores if result is not None else {}
        values = [s["main_score"] for split in task.eval_splits for s in scores.get(split, [])
                  if s.get("hf_subset") in task.hf_subsets]
        rows[task.metadata.name] = dict(type=task.metadata.type, main_score=task.metadata.main_score,
                                        score=round(100.0 * float(np.mean(values)), 4) if values else None)
    scored = [r for r in rows.values() if r["score"] is not None]
    by_type = {t: [r["score"] for r in scored if r["type"] == t] for t in dict.fromkeys(r["type"] for r in scored)}
    return dict(**info, tasks=rows,
                types={t: dict(score=round(float(np.mean(v)), 4), tasks=len(v)) for t, v in by_type.items()},
                average=round(float(np.mean([r["score"] for r in scored])), 4) if scored else None,
                tasks_scored=len(scored), tasks_total=len(rows),
                paper={"model": "NeoBERT (paper, MTEB(eng, v1))", **PAPER_MTEB})


def render_markdown(s: dict) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    row = lambda *cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    types = [*MTEB_TYPE_LABELS, *sorted(t for t in s["types"] if t not in MTEB_TYPE_LABELS)]
    ours = {t: s["types"].get(t, {}) for t in types}
    lines = [f"# MTEB: {s['model']}", "",
             f"`{s['source']}` ({s['path']}), revision {s['revision']}; pooling {s['pooling']}, max_seq_length "
             f"{s['max_seq_length']}, precision {s['precision']}, instructions {s['instructions']}. "
             f"{s['tasks_scored']}/{s['tasks_total']} tasks scored; main score x 100.", "",
             row("Model", *(MTEB_TYPE_LABELS.get(t, t) for t in types), "Avg."), "|" + " --- |" * (len(types) + 2),
             row(s["model"], *(fmt(ours[t].get("score")) for t in types), fmt(s["average"])),
             row(s["paper"]["model"], *(fmt(s["paper"].get(t)) for t in types), fmt(s["paper"]["Average"])),
             row("tasks", *(ours[t].get("tasks", 0) for t in types), s["tasks_scored"]), "",
             "Per type: the mean of its tasks; Avg.: the mean over all tasks scored (the paper's: over the 56 tasks "
             "of MTEB(eng, v1)).", "", "| Task | Type | Main score | Score |", "| --- | --- | --- | --- |",
             *(row(name, r["type"], r["main_score"], fmt(r["score"])) for name, r in s["tasks"].items())]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the run: every process scores its share of the tasks; rank 0 writes the summary once all are done

def run_mteb(cfg, progress: bool = True) -> Optional[dict]:
    """Score cfg.mteb.model; returns the summary on rank 0 (None elsewhere)."""
    mc = cfg.mteb
    mteb = import_mteb()
    tasks = select_tasks(mc)  # every rank checks everything before any work, so all fail alike
    instructions = load_instructions(mc.instructions, mc.use_instructions)
    model, info = checkpoint.load(mc.model, head="encoder")
    config.require(info.tokenizer is not None, f"{info.path} has no tokenizer.json; the model folder needs its "
                   "tokenizer")
    # each process scores its share of the tasks: gloo carries the one barrier, however long the tasks take
    rank, world, device = runtime.setup_distributed("gloo", timeout=datetime.timedelta(days=7))
    precision = runtime.resolve_precision(cfg.trainer.mixed_precision, device)
    pooling = info.pooling if mc.pooling == "auto" else mc.pooling
    encoder = SentenceEncoder(model, info.tokenizer, pooling, mc.max_seq_length, mc.batch_size, device, precision)
    name, revision = model_identity(mc.model, info.path), weights_digest(info.path)
    meta = model_meta(name, revision, neobert.num_params(model), encoder, instructions, mc.use_instructions)
    # output_dir null: beside the model (<run dir>/mteb for a training checkpoint, else runs/<its name>/mteb)
    out = Path(mc.output_dir).expanduser() if mc.output_dir else checkpoint.home(mc.model) / "mteb"
    out.mkdir(parents=True, exist_ok=True)
    cache = mteb.ResultCache(cache_path=out)
    wrapped = mteb_encoder(encoder, meta, instructions, show_progress_bar=progress and rank == 0)
    mine = tasks[rank::world]
    for i, task in enumerate(mine, 1):
        print(f"[rank {rank}] {task.metadata.name} ({task.metadata.type}) {i}/{len(mine)}", file=sys.stderr, flush=True)
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
    runtime.write_atomic(out / "results.json", json.dumps(summary, indent=2) + "\n")
    runtime.write_atomic(out / "results.md", markdown := render_markdown(summary))
    print(markdown)
    print(f"wrote {out / 'results.md'} and results.json; mteb's files: {summary['results_dir']}", file=sys.stderr)
    return summary


@dataclass
class PrecisionConfig:
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # the trainer's key: auto is bf16 on GPUs and bf16 CPUs


@dataclass
class MtebRunConfig:
    """The sections `evaluate.py mteb` reads (configs/mteb.yaml)."""
    mteb: MtebConfig = field(default_factory=MtebConfig)
    trainer: PrecisionConfig = field(default_factory=PrecisionConfig)


def load_mteb_config(argv):
    if not argv or argv[0].startswith("--") or "=" in argv[0]:  # no CONFIG: the default one
        argv = [str(Path(__file__).resolve().parent / "configs" / "mteb.yaml"), *argv]
    return config.load_config(MtebRunConfig, argv[0], argv[1:])


def main(argv) -> int:
    try:
        return runtime.run_main(argv, __doc__, lambda args: run_mteb(load_mteb_config(args)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
