"""The mission at small scale, on this machine, as a user runs it: every command of the README in a subprocess,
checked end to end (pretraining killed with kill -9 and resumed, contrastive fine-tuning, GLUE, MTEB, export); it
stops loudly at the first mismatch, each part's row printed and appended to DIR/mission.md as it finishes.
`python bench.py --suite mission [--tiny] [--out DIR]`: about 3 minutes on a GPU; --tiny: a tiny model on CPU, the
same code path (the tests run it). What each part checks: its function below, and docs/performance.md.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from prepare import stdlib_pairs

ROOT = Path(__file__).resolve().parent.parent  # the repository


class Mismatch(Exception):
    """A part of the mission did not do what the README says."""


def cli(*args, env=None, expect=0, timeout=900) -> subprocess.CompletedProcess:
    """python ARGS from the repository, as a user runs it; a return code other than `expect` is a Mismatch."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if p.returncode != expect:
        raise Mismatch(f"`python {' '.join(map(str, args))}` exited {p.returncode} (expected {expect}): "
                       f"{(p.stderr or p.stdout)[-1500:]}")
    return p


def metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def pretraining(out: Path, sizes: list, exact: bool) -> str:
    """Part 1: an uninterrupted run and one killed with kill -9 after its step-6 checkpoint, then resumed."""
    common = ["train.py", "configs/smoke.yaml", *sizes, "--dataset.path", out / "data", "--trainer.logging_steps", 1,
              "--trainer.save_steps", 6, "--trainer.eval_steps", 12, "--trainer.disable_tqdm", "true"]
    cli(*common, "--trainer.output_dir", out / "pretrain")
    cli(*common, "--trainer.output_dir", out / "killed", env={"NEOBERT_TEST_KILL": "after_save:6"}, expect=-9)
    cli(*common, "--trainer.output_dir", out / "killed", "--trainer.resume_from_checkpoint", "auto")
    a, b = ([m["loss"] for m in metrics(out / run)] for run in ("pretrain", "killed"))
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    if worst > (0 if exact else 2e-2):  # bf16 and non-deterministic GPU kernels: close, not bitwise
        raise Mismatch(f"resumed losses differ from the uninterrupted run's by up to {worst:.2%}: {a} vs {b}")
    evals = [m for m in metrics(out / "pretrain") if "eval_loss" in m]
    return f"{len(a)} steps; resume after kill -9: losses {'bitwise equal' if worst == 0 else f'within {worst:.1e}'}" \
           f"; held-out loss {evals[-1]['eval_loss']:.3f}"


def contrastive(out: Path, precision: str) -> str:
    """Part 2: configs/contrastive_smoke.yaml from part 1's run, gradient caching in chunks of 4."""
    cli("train.py", "configs/contrastive_smoke.yaml", "--trainer.init_from", out / "pretrain", "--trainer.output_dir",
        out / "contrastive", "--contrastive.path", out / "pairs", "--contrastive.chunk_size", 4, "--trainer.max_steps",
        6, "--trainer.eval_steps", 6, "--trainer.per_device_train_batch_size", 16, "--trainer.disable_tqdm", "true",
        "--trainer.mixed_precision", precision)
    last = metrics(out / "contrastive")[-1]
    return f"6 steps with gradient caching; held-out recall@10 {last['eval_recall@10']:.3f}, MRR@10 " \
           f"{last['eval_mrr@10']:.3f}"


def glue(out: Path, steps: int, precision: str) -> str:
    """Part 3: a custom pair task (label 1 when the second text holds `omega`) fine-tuned from part 1's run."""
    rng, root = random.Random(0), out / "glue_data"
    root.mkdir(parents=True, exist_ok=True)
    words = "the of a model data token train text word list file value name type".split()
    for split, n in (("train", 256), ("validation", 64)):
        rows = []
        for _ in range(n):
            b, y = rng.sample(words, 4), rng.randint(0, 1)
            b.insert(rng.randint(0, 4), "omega" if y else "alpha")
            rows.append(f"{' '.join(rng.sample(words, 5))}\t{' '.join(b)}\t{y}\n")
        (root / f"{split}.tsv").write_text("premise\thypothesis\tlabel\n" + "".join(rows))
    cli("evaluate.py", "glue", "--glue.task_name", "custom", "--glue.data_dir", root, "--glue.text_columns",
        "premise,hypothesis", "--glue.init_from", out / "pretrain", "--trainer.output_dir", out / "glue",
        "--trainer.max_steps", steps, "--trainer.eval_steps", steps // 2, "--optimizer.lr", 1e-3,
        "--glue.max_seq_length", 32, "--trainer.disable_tqdm", "true", "--trainer.mixed_precision", precision)
    score = json.loads((out / "glue" / "glue" / "results.json").read_text())["tasks"]["custom"]["score"]
    if score < 0.75:
        raise Mismatch(f"the custom GLUE task did not learn: accuracy {score:.3f} (a one-word rule)")
    return f"custom pair task, {steps} steps: validation accuracy {score:.3f}"


def mteb(out: Path, precision: str) -> str:
    """Part 4: a BEIR folder of stdlib pairs (function name -> its docstring), scored offline."""
    if importlib.util.find_spec("mteb") is None or importlib.util.find_spec("sentence_transformers") is None:
        return "skipped: mteb (requirements-eval.txt) is not installed here"
    pairs = [p for _, p in zip(range(60), stdlib_pairs(sysconfig.get_paths()["stdlib"]))]
    beir = out / "beir" / "stdlib_pairs"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    for name, prefix, key in (("corpus", "d", "positive"), ("queries", "q", "query")):
        (beir / f"{name}.jsonl").write_text("".join(json.dumps({"_id": f"{prefix}{i}", "text": p[key]}) + "\n"
                                                    for i, p in enumerate(pairs)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\td{i}\t1\n" for i in range(len(pairs))))
    cli("evaluate.py", "mteb", "--mteb.model", out / "contrastive", "--mteb.beir_dir", beir, "--mteb.output_dir",
        out / "mteb", "--trainer.mixed_precision", precision)
    score = json.loads((out / "mteb" / "results.json").read_text())["average"]
    return f"a {len(pairs)}-query BEIR folder: nDCG@10 x 100 = {score:.1f}"


def export(out: Path) -> str:
    """Part 5: export part 2's model; transformers' AutoModel and SentenceTransformer embed as checkpoint.load does."""
    cli("export.py", "--out", out / "hf", out / "contrastive")
    if importlib.util.find_spec("transformers") is None:
        return "exported; transformers is not installed here, so loading was not checked"
    check = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import checkpoint, neobert
from transformers import AutoModel, AutoTokenizer
texts = ["def read_rows(path): yield rows", "Return the number of items.", "a third text, longer than the others"]
tok = AutoTokenizer.from_pretrained({str(out / "hf")!r}, trust_remote_code=False)
batch = tok(texts, padding=True, return_tensors="pt")
hf = AutoModel.from_pretrained({str(out / "hf")!r}, trust_remote_code=True).eval()
with torch.no_grad():
    theirs = neobert.pool(hf(**batch).last_hidden_state, batch["attention_mask"], "mean")
model, info = checkpoint.load({str(out / "contrastive")!r}, head="encoder")
ours = neobert.embed(model.eval(), [e.ids for e in info.tokenizer.encode_batch(texts)], 0, info.pooling)
worst = (theirs - ours).abs().max().item()
try:
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer({str(out / "hf")!r}, trust_remote_code=True, device="cpu")
    worst = max(worst, (torch.as_tensor(st.encode(texts)) - ours).abs().max().item())
except ImportError:
    pass
print(worst)
"""
    worst = float(cli("-c", check).stdout.split()[-1])
    if worst > 1e-4:
        raise Mismatch(f"the exported folder's embeddings differ from ours by up to {worst:.2e}")
    return f"transformers (and sentence-transformers where installed) embed as we do: max difference {worst:.1e}"


def mission(out: Path, tiny: bool, cuda: bool) -> list:
    """Runs the five parts in order, each row printed and appended to out/mission.md as it finishes; -> the rows."""
    out.mkdir(parents=True, exist_ok=True)
    precision = "bf16" if cuda else "no"  # fp32 on CPU: bf16 is emulated (slow) on many, and resume is then bitwise
    sizes = ["--trainer.max_steps", 12, "--trainer.per_device_train_batch_size", 8, "--trainer.mixed_precision",
             precision, "--trainer.torch_compile", str(cuda).lower()]
    if tiny:  # a tiny model on short rows, a small corpus
        sizes += ["--model.hidden_size", 32, "--model.num_hidden_layers", 2, "--model.num_attention_heads", 2,
                  "--model.intermediate_size", 64, "--model.max_position_embeddings", 64, "--dataset.max_seq_length",
                  64, "--dataset.max_documents", 2000]
    parts = [("pretraining, kill -9, exact resume", lambda: pretraining(out, sizes, exact=not cuda)),
             ("contrastive fine-tuning, gradient caching", lambda: contrastive(out, precision)),
             ("GLUE, a custom task", lambda: glue(out, 40 if tiny else 120, precision)),
             ("MTEB, a local BEIR folder", lambda: mteb(out, precision)),
             ("export, transformers, sentence-transformers", lambda: export(out))]
    report = out / "mission.md"
    report.write_text("| part | seconds | result |\n|---|---:|---|\n")
    print(report.read_text(), end="", flush=True)
    rows = []
    for name, part in parts:
        t0 = time.perf_counter()
        try:
            result = part()
        except Mismatch as e:
            result = f"MISMATCH: {' '.join(str(e).split())}"
        rows.append((name, time.perf_counter() - t0, result))
        line = f"| {name} | {rows[-1][1]:.0f} | {result} |\n"
        with open(report, "a") as f:
            f.write(line)
        print(line, end="", flush=True)
        if result.startswith("MISMATCH"):
            raise SystemExit(f"mission failed at {name}: see {report}")
    return rows
