"""usage: python bench.py CONFIG [--bench.steps N] [--bench.variants packing,sparse,...] [--section.key value ...]
    python bench.py --suite mission [--tiny] [--out DIR]
    python bench.py --suite profile [--tiny] [--steps N] [--out DIR]
    python bench.py --suite gpu [--tiny] [--parts mission,profile,throughput] [--steps N] [--budget-s S]
                    [--data-dir DIR] [--out DIR] [--tests] [--only TEXT]
    python bench.py --suite recipe [--budget-s 60] [--lrs 1e-3,3e-3,1e-2] [--config configs/smoke.yaml] [--out DIR]
                    [--section.key value ...]
    python bench.py --suite speedrun [CONFIG] [--against REF] [...]      (--suite speedrun -h: its options)

CONFIG: the config's training throughput (real tokens/s, MFU, peak memory), then one setting changed at a time, and
the data loader alone; a contrastive config: pairs/s and memory with and without gradient caching. mission: every
README command at small scale (tests/mission.py); profile: where a step's device time goes (OUT/profile.md); gpu: the
mission, the profile and the throughput table in one call (OUT/gpu-suite.md); recipe: AdamW and Muon x cosine and
wsd at equal training time; speedrun: did my edit help (speedrun.py). Options and results: docs/performance.md.
"""

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import io
import json
import math
import multiprocessing
import re
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

import contrastive
import data
import neobert
import prepare
import runtime
import speedrun
import train
from config import UserError, require

# -----------------------------------------------------------------------------
# the timing loop, and the objective that turns sparse prediction off (or puts transformers' models in its place)

def trainer_step(objective, steps: int, fused: bool = True):
    """(run, step_batches): the micro-batches of `steps` steps drawn up front, and run(batches=step_batches), which
    takes the trainer's optimizer step (forward_backward, train.optimizer_step) over each step's micro-batches, on a
    fresh model set up as the trainer's (speed and memory do not depend on the weights)."""
    cfg, device, t = objective.cfg, objective.device, objective.cfg.trainer
    loader = objective.loader("train", t.per_device_train_batch_size, t.gradient_accumulation_steps, prefetch=0)
    step_batches = [loader.next_step() for _ in range(steps)]
    loader.close()
    torch.manual_seed(t.seed)
    model = neobert.NeoBERTLMHead(cfg.model)
    model.model.gradient_checkpointing = t.gradient_checkpointing
    module = objective.train_module(model).to(device)  # contrastive: only the encoder goes to the device
    optimizer = train.build_optimizer(module, cfg.optimizer, device, fused=fused)
    step_module = torch.compile(module) if t.torch_compile else module
    amp = runtime.autocast(device, runtime.resolve_precision(t.mixed_precision, device, warn=None))

    def run(batches=step_batches):
        for micro_batches in batches:
            loss_sum, count, _ = objective.forward_backward(step_module, micro_batches, amp)
            train.optimizer_step(module, optimizer, cfg.optimizer.lr, t.gradient_clipping, loss_sum / max(count, 1.0))
    return run, step_batches


def timed(fn, device) -> float:
    """Seconds of fn(), the device synchronized before the clock stops."""
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(objective, steps: int, fused: bool = True) -> dict:
    """Times `steps` optimizer steps (trainer_step) after running the same steps once untimed (so every batch shape
    is compiled). -> real tokens/s (not padding: packed and padded rows compare fairly), ms/step, MFU, peak memory,
    activations (CUDA), warm-up seconds and the share of positions that are real tokens."""
    device = objective.device
    run, step_batches = trainer_step(objective, steps, fused)
    warm_s = timed(run, device)  # warm-up: every shape the timed steps will see
    before = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20  # weights and optimizer state: what stays between steps
    dt = timed(run, device)
    positions, tokens = (sum(counts) for counts in zip(*(objective.tokens(mb) for mb in step_batches)))  # real: no pad
    peak = neobert.peak_flops(device)
    flops = sum(objective.flops(mb) for mb in step_batches)  # what the device computes
    # CPU: the process's high-water mark so far (it never goes down: read it as an upper bound)
    memory = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch._dynamo.reset()  # the model, optimizer and compiled graphs go when this returns
    return dict(tokens_per_s=tokens / dt, step_s=dt / steps, mfu=flops / dt / peak if peak else None,
                memory_mb=memory, activation_mb=None if before is None else memory - before, warm_s=warm_s,
                real_fraction=tokens / positions)


class FullLogitsMLM(train.MLM):
    """train.MLM with the decoder on every position, the loss then over the predicted tokens: sparse prediction off,
    or (hf: "modernbert" | "bert") transformers' model at NeoBERT's width, depth, heads, context, feed-forward size."""

    def __init__(self, cfg, device, hf: Optional[str] = None):
        super().__init__(cfg, 0, 1, device)
        self.hf = hf

    def train_module(self, model):
        if self.hf is None:
            return FullLogits(model)
        import transformers  # the bench's comparison only: never a runtime dependency of the trainer
        c = self.cfg.model
        same = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "max_position_embeddings", "pad_token_id")}
        if self.hf == "bert":  # a 2-matrix GELU MLP of intermediate_size: the same parameters as NeoBERT's SwiGLU
            lm = transformers.BertForMaskedLM(transformers.BertConfig(**same, intermediate_size=c.intermediate_size))
        else:  # ModernBERT: GeGLU with 2 x intermediate in, again the same parameters; prepare.SPECIAL_TOKENS' ids
            lm = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
                **same, intermediate_size=c.ffn_hidden_size, cls_token_id=2, sep_token_id=3, bos_token_id=2,
                eos_token_id=3))
        return FullLogits(lm, hf=True)

    def flops(self, micro_batches):  # transformers' rows count the trainer's FLOPs: their MFU compares as tokens/s do
        return train.step_flops(self.cfg.model, micro_batches, sparse=self.hf is not None)


class FullLogits(torch.nn.Module):
    """The MLM loss from the logits of every position. hf: a transformers model, which takes each row as one sequence
    (without flash-attn neither has a packed path): the same tokens, attention over the full row."""

    def __init__(self, lm, hf: bool = False):
        super().__init__()
        self.lm, self.hf = lm, hf

    def forward(self, input_ids, labels, **batch):
        if self.hf:
            batch = dict(attention_mask=batch.get("attention_mask", torch.ones_like(input_ids)))
        logits = self.lm(input_ids=input_ids, **batch).logits  # (B, S, V)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return neobert.MaskedLMOutput(logits=None, loss_sum=loss_sum, num_masked=(labels != -100).sum())


def change(cfg, **sections):
    """cfg with some keys of some sections replaced: change(cfg, trainer=dict(torch_compile=True))."""
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def setup(cfg, objective_class=train.MLM):
    """(device, its name, the baseline objective with its data opened as the trainer does). The bench never
    evaluates: trainer.eval_steps 0 keeps the objective from sizing (and warning about) an evaluation."""
    _, _, device = runtime.setup_distributed()  # one process: cuda:0 (TF32 on, as the trainer) or cpu
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    objective = objective_class(change(cfg, trainer=dict(eval_steps=0)), 0, 1, device)
    train.load_data(objective, objective.cfg, master=True, ddp=False)
    return device, name, objective


def table(columns: list[str], variants: list, steps: int, cells, budget_s: float = math.inf, since=None,
          alone: bool = False) -> dict:
    """Measures each (label, objective, fused AdamW) variant and prints its row: label, cells(objective, result, ref),
    ref: the first result of the same row length. A variant that fails, runs out of memory or would start past
    budget_s seconds after `since` (default: now) is a row that says so. -> {label: result}"""
    since, refs, results = time.perf_counter() if since is None else since, {}, {}
    print("| " + " | ".join(["variant", *columns]) + " |\n|---|" + "---:|" * len(columns), flush=True)
    for label, objective, fused in variants:
        if time.perf_counter() - since > budget_s:
            r = f"skipped: the {budget_s:.0f} s budget is spent"
        else:
            try:
                if alone and objective.device.type == "cpu":  # a fresh process: a process's max RSS never goes down
                    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
                        r = fresh.submit(measure, objective, steps, fused).result()
                else:  # (on CUDA the peak is reset before the timed steps)
                    r = measure(objective, steps, fused)
            except torch.cuda.OutOfMemoryError:
                r = "out of memory"
            except Exception as e:  # noqa: BLE001 - reported in its row
                r = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        if isinstance(r, str):
            torch._dynamo.reset()
            print(f"| {label} | {r} |" + " |" * (len(columns) - 1), flush=True)
            continue
        results[label] = r
        ref = refs.setdefault(objective.cfg.dataset.max_seq_length, r)
        print("| " + " | ".join([label, *cells(objective, r, ref)]) + " |", flush=True)
        if objective.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# -----------------------------------------------------------------------------
# bench CONFIG: the config's own setup, then one setting flipped at a time; a contrastive config: contrastive_bench

@dataclass
class BenchConfig:
    steps: int = 10  # timed optimizer steps per variant (each also run once untimed first)
    variants: list[Literal["packing", "sparse", "compile", "checkpointing"]] = field(
        default_factory=lambda: ["packing", "sparse", "compile", "checkpointing"])
    loader_steps: int = 30  # steps drawn from the loader alone to time it

    def __post_init__(self):
        require(self.steps >= 1, f"bench.steps must be at least 1, got {self.steps}")


@dataclass
class BenchRun(train.Config):
    """The sections `python bench.py CONFIG` reads: a training config's, plus bench."""
    bench: BenchConfig = field(default_factory=BenchConfig)


def bench(cfg: train.Config, bench_cfg: BenchConfig, argv: list[str]) -> None:
    device, name, base = setup(cfg)
    t, precision = cfg.trainer, runtime.resolve_precision(cfg.trainer.mixed_precision, device, warn=None)
    print(f"`python bench.py {' '.join(argv)}`  \n{name}, torch {torch.__version__}; "
          f"{neobert.num_params(neobert.NeoBERTLMHead(cfg.model)) / 1e6:.1f}M parameters; "
          f"{t.per_device_train_batch_size * t.gradient_accumulation_steps} rows x {cfg.dataset.max_seq_length} "
          f"tokens per step ({t.per_device_train_batch_size} x {t.gradient_accumulation_steps}), "
          f"{'bf16 autocast' if precision == 'bf16' else 'fp32'}, compile {'on' if t.torch_compile else 'off'}, "
          f"{'packed' if cfg.datacollator.pack_sequences else 'padded'}; {bench_cfg.steps} timed steps per variant\n")

    def cells(objective, r, ref):
        return [*speed_cells(r), f"{r['real_fraction']:.2f}", f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x"]

    flips = {"packing": ("datacollator", "pack_sequences", "packing"),  # section, key, label
             "compile": ("trainer", "torch_compile", "compile"),
             "checkpointing": ("trainer", "gradient_checkpointing", "gradient checkpointing")}
    variants = [("baseline", base, True)]  # then one setting flipped at a time
    for flip in bench_cfg.variants:
        if flip == "sparse":
            variants.append(("sparse prediction off (full logits)", FullLogitsMLM(cfg, device), True))
            continue
        section, key, what = flips[flip]
        on = getattr(getattr(cfg, section), key)
        label = "packing off (padded rows)" if flip == "packing" and on else f"{what} {'off' if on else 'on'}"
        variants.append((label, train.MLM(change(cfg, **{section: {key: not on}}), 0, 1, device), True))
    results = table(["real tokens/s", "ms/step", "MFU", "peak memory (MB)", "real-token share", "vs baseline"],
                    variants, bench_cfg.steps, cells)
    if device.type == "cpu":
        print("\nCPU peak memory is the process's resident high-water mark so far (it never goes down).")
    loader = base.loader("train", t.per_device_train_batch_size, t.gradient_accumulation_steps)
    lb = data.bench_loader(loader, steps=bench_cfg.loader_steps)
    loader.close()
    real = lb["tokens_per_s"] * lb["real_token_fraction"]
    print(f"\ndata loader alone: {lb['batches_per_s']:,.1f} micro-batches/s, {real:,.0f} real tokens/s", end="")
    if "baseline" in results:
        used = results["baseline"]["tokens_per_s"]
        print(f"; the baseline training step consumes {used:,.0f} real tokens/s ({100 * used / real:.1f}% of what the "
              f"loader delivers)", end="")
    print()


def speed_cells(r: dict) -> list[str]:
    return [f"{r['tokens_per_s']:,.0f}", f"{1000 * r['step_s']:,.1f}",
            "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", f"{r['memory_mb']:,.0f}"]


def contrastive_bench(cfg: train.Config, bench_cfg: BenchConfig, argv: list[str]) -> None:
    """Side by side: the config's batch without and with gradient caching, and 8x that batch with caching (and
    without, to show what caching saves). On CPU each variant runs in a fresh process, so its max RSS is its own."""
    device, name, objective = setup(cfg, contrastive.Contrastive)
    cfg, cc, t = objective.cfg, objective.cc, objective.cfg.trainer  # cfg: the model of the checkpoint it starts from
    rows = t.per_device_train_batch_size * t.gradient_accumulation_steps
    chunk = cc.chunk_size or rows  # the default chunk holds the uncached batch's activations: the same memory
    variants = []
    for label, n, c in [("no caching", rows, 0), (f"caching (chunk {chunk})", rows, chunk),
                        ("8x batch, no caching", 8 * rows, 0), (f"8x batch, caching (chunk {chunk})", 8 * rows, chunk)]:
        variant = copy.copy(objective)  # n pairs per step in one micro-batch, gradient caching in chunks of c
        variant.cfg = change(cfg, trainer=dict(per_device_train_batch_size=n, gradient_accumulation_steps=1))
        variant.chunk = c
        variants.append((label, variant, True))
    print(f"`python bench.py {' '.join(argv)}`  \n{name}, torch {torch.__version__}; contrastive, "
          f"{neobert.num_params(neobert.NeoBERT(cfg.model)) / 1e6:.1f}M encoder parameters, {cc.pooling} pooling, "
          f"{cc.hard_negatives} hard negative(s), queries <= {cc.max_query_length} and documents <= "
          f"{cc.max_document_length} tokens; {bench_cfg.steps} timed steps per variant\n")

    def cells(variant, r, ref):
        n = variant.cfg.trainer.per_device_train_batch_size
        return [str(n), f"{n / r['step_s']:,.1f}", f"{1000 * r['step_s']:,.1f}", f"{r['memory_mb']:,.0f}",
                f"{r['memory_mb'] / ref['memory_mb']:.2f}x"]

    results = table(["pairs/step", "pairs/s", "ms/step", "peak memory (MB)", "memory vs no caching"], variants,
                    bench_cfg.steps, cells, alone=True)
    base, big = results.get("no caching"), results.get(variants[-1][0])
    if base and big:
        print(f"\n8x the batch with gradient caching takes {big['memory_mb'] / base['memory_mb']:.2f}x the peak memory "
              f"of the batch without it" + (" (CPU: max RSS of each variant's own process, including torch itself)."
                                            if device.type == "cpu" else "."))


# -----------------------------------------------------------------------------
# the GPU suite, in one process: the GPU tests, the 250M config one change at a time, transformers' ModernBERT and BERT
# at the same size, seq 4096 with and without checkpointing; on synthetic data made here (it runs offline)

def suite_config(path: str, root: Path, tiny: bool) -> train.Config:
    """A pretraining config (configs/pretrain.yaml or pretrain_4096.yaml) over synthetic data (reused when present), no
    gradient accumulation (the suite times micro-steps); tiny: a 2-layer, 64-wide model on short rows, compile off.
    The tokenizer: BERT's five special tokens plus vocab_size - 5 made-up words, so every decoder row is in use; the
    documents: Zipf-distributed words, web-like lengths (log-normal, median 300 tokens, 16 to 4000)."""
    cfg = train.load_config(path, [])
    S, rows = cfg.dataset.max_seq_length, cfg.trainer.per_device_train_batch_size
    if tiny:
        cfg = change(cfg, dataset=dict(max_seq_length=S // 16), model=dict(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=max(256, S // 16)))
        rows = max(1, rows // 8)
    V, corpus_dir = cfg.model.vocab_size, root / f"corpus-{cfg.model.vocab_size}"
    corpus, tok_path = corpus_dir / "corpus.jsonl", corpus_dir / "tokenizer.json"
    if not (corpus.is_file() and tok_path.is_file()):
        corpus_dir.mkdir(parents=True, exist_ok=True)
        words = [f"w{i}" for i in range(V - len(prepare.SPECIAL_TOKENS))]
        vocab = {token: i for i, token in enumerate(prepare.SPECIAL_TOKENS + words)}
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        rng, docs, total = np.random.default_rng(0), [], 0
        while total < (40_000 if tiny else 1_500_000):
            n = int(np.clip(rng.lognormal(np.log(300), 1.0), 16, 4000))
            ids = np.minimum(rng.zipf(1.2, n), len(words)) - 1
            docs.append(json.dumps({"text": " ".join(words[i] for i in ids)}) + "\n")
            total += n
        runtime.write_atomic(corpus, "".join(docs))
        prepare.save_tokenizer(tok, corpus_dir)  # the tokenizer last: both present means both complete
    cfg = change(cfg, dataset=dict(name="synthetic", data_files=[str(corpus)], text_column="text",
                                   path=str(root / f"shards-{V}"), streaming=False, pre_tokenize=True, eval_samples=0,
                                   validation_split=0.01, max_documents=0),
                 trainer=dict(per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                              gradient_checkpointing=False, torch_compile=cfg.trainer.torch_compile and not tiny),
                 tokenizer=dict(path=str(tok_path), train=False))
    prepare.prepare(cfg.dataset, cfg.tokenizer, progress=False)  # shared by both configs: documents ignore row length
    return cfg


def suite_variants(base: train.MLM, long_base: train.MLM, tiny: bool, backend: str) -> list:
    """[(label, objective, fused AdamW)]: the baseline, then one change at a time."""
    cfg, long_cfg, device = base.cfg, long_base.cfg, base.device

    def mlm(c, **sections):
        return train.MLM(change(c, **sections), 0, 1, device)

    t, long_S = cfg.trainer, long_cfg.dataset.max_seq_length
    pretrain = train.load_config(Path(__file__).resolve().parent / "configs" / "pretrain.yaml")
    accum = 2 if tiny else pretrain.trainer.gradient_accumulation_steps  # the other rows time micro-steps: 1
    sdpa = "attn_backend sdpa (block-diagonal mask)"
    if backend == "sdpa":  # auto fell back: say what is missing rather than time sdpa against itself
        sdpa = "attn_backend torch_varlen: not available here" if device.type == "cuda" else \
            "attn_backend sdpa (the only backend on CPU)"
    # the goals first (MFU, the HF ratios, checkpointing's memory), so a spent budget skips the least needed
    return [
        (f"baseline (attn_backend auto = {backend})", base, True),
        (sdpa, mlm(cfg, model=dict(attn_backend="sdpa")), True),
        ("HF ModernBertForMaskedLM (same size and rows)", FullLogitsMLM(cfg, device, hf="modernbert"), True),
        ("HF BertForMaskedLM (same size and rows)", FullLogitsMLM(cfg, device, hf="bert"), True),
        (f"seq {long_S}, {long_cfg.trainer.per_device_train_batch_size} rows", long_base, True),
        (f"seq {long_S}, gradient checkpointing", mlm(long_cfg, trainer=dict(gradient_checkpointing=True)), True),
        (f"chunked decoder + CE ({64 if tiny else 4096} positions)",
         mlm(cfg, model=dict(decoder_chunk_size=64 if tiny else 4096)), True),
        (f"compile {'off' if t.torch_compile else 'on'}", mlm(cfg, trainer=dict(torch_compile=not t.torch_compile)),
         True),
        ("AdamW not fused", base, False),
        (f"micro-batch {2 * t.per_device_train_batch_size} rows",
         mlm(cfg, trainer=dict(per_device_train_batch_size=2 * t.per_device_train_batch_size)), True),
        (f"{accum} micro-steps per optimizer step (as configs/pretrain.yaml)",
         mlm(cfg, trainer=dict(gradient_accumulation_steps=accum)), True),
    ]


def recompiles_after_warmup(cfg: train.Config, steps: int, warmup: int, device) -> int:
    """Runs `steps` training steps of cfg under torch.compile, as the trainer does, and returns how many graphs
    torch.compile made after the first `warmup` steps (0: every later batch reused a compiled graph)."""
    from torch._dynamo.utils import counters
    objective = train.MLM(change(cfg, trainer=dict(torch_compile=True, gradient_accumulation_steps=1)), 0, 1, device)
    train.load_data(objective, cfg, master=True, ddp=False)
    torch._dynamo.reset()
    run, step_batches = trainer_step(objective, steps)
    run(step_batches[:warmup])
    graphs = counters["stats"]["unique_graphs"]
    run(step_batches[warmup:])
    return counters["stats"]["unique_graphs"] - graphs


def suite_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python bench.py")  # python bench.py --suite gpu -h: what the options do
    parser.add_argument("--suite", choices=["gpu", "profile", "mission"], required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--data-dir", default="data_cache/bench-suite")
    parser.add_argument("--out", default="runs/gpu-suite")
    parser.add_argument("--tests", action="store_true")
    parser.add_argument("--no-tests", action="store_true")  # the default now (the tests run with --tests)
    parser.add_argument("--only", default="")
    parser.add_argument("--parts", default="mission,profile,throughput")
    args = parser.parse_args(argv)
    require(args.steps >= 1, f"--steps must be at least 1, got {args.steps}")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    require(set(args.parts) <= {"mission", "profile", "throughput"}, f"--parts takes a comma list of mission, "
            f"profile and throughput; got {','.join(args.parts)}")
    return args


class Tee(io.TextIOBase):
    """Writes to the screen and to a file, flushed as it goes: a timeout loses nothing already printed."""

    def __init__(self, screen, file):
        self.screen, self.file = screen, file

    def write(self, text):
        self.screen.write(text)
        self.file.write(text)
        self.file.flush()
        return len(text)


def run_mission(out: Path, tiny: bool, cuda: bool) -> int:
    """tests/mission.py: every README command run as a user runs it and checked, an end-to-end test kept with the
    tests; the GPU suite runs it first. Loaded from its path: no sys.path entry, no other `mission` module found."""
    spec = importlib.util.spec_from_file_location("mission", Path(__file__).resolve().parent / "tests" / "mission.py")
    mission = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mission)
    return mission.mission(out, tiny, cuda)


def suite(argv: list[str]) -> None:
    """--suite mission | profile | gpu. gpu: the mission, then the profile, then the throughput table, in one call
    (about 8 minutes with the default --budget-s), everything also written to OUT/gpu-suite.md as it is printed."""
    args, here, t_start = suite_args(argv), Path(__file__).resolve().parent, time.perf_counter()
    out = Path(args.out)
    if args.suite == "mission":
        return run_mission(out, args.tiny, torch.cuda.is_available())
    device, name, base = setup(suite_config(str(here / "configs" / "pretrain.yaml"), Path(args.data_dir), args.tiny))
    if args.suite == "profile":
        return profile(base, args.steps, out, args.tiny)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gpu-suite.md", "a") as f, contextlib.redirect_stdout(Tee(sys.stdout, f)):
        print(f"`python bench.py {' '.join(argv)}`, {time.strftime('%Y-%m-%d')}", flush=True)
        if args.tests:  # `pytest -k gpu` in a subprocess (on CPU every GPU test skips itself)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu",
                   "tests/test_model.py" if args.tiny else "tests"]
            p = subprocess.run(cmd, cwd=here, capture_output=True, text=True)
            lines = [line for line in p.stdout.splitlines() if line.strip()]
            print(f"\nGPU tests: `{' '.join(cmd[2:])}`: {lines[-1] if lines else p.stderr.strip()[-300:]}", flush=True)
        if "mission" in args.parts:
            print("\n## The mission (python bench.py --suite mission)\n", flush=True)
            run_mission(out / "mission", args.tiny, device.type == "cuda")
        if "profile" in args.parts:
            print("\n## The profile (python bench.py --suite profile)\n", flush=True)
            profile(base, args.steps, out, args.tiny)
        if "throughput" in args.parts:
            print("\n## Throughput, one change at a time\n", flush=True)
            throughput(args, device, name, base, t_start)


def throughput(args, device, name, base, t_start) -> None:
    here, tiny, steps = Path(__file__).resolve().parent, args.tiny, args.steps
    _, _, long_base = setup(suite_config(str(here / "configs" / "pretrain_4096.yaml"), Path(args.data_dir), tiny))
    cfg, long_cfg = base.cfg, long_base.cfg
    probe = torch.zeros(1, 1, 1, cfg.model.head_dim, device=device, dtype=torch.bfloat16)
    backend = neobert.pick_backend(cfg.model, probe)  # what auto runs for a packed bf16 batch here (CPU: sdpa)
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    varlen = neobert.varlen_kernel("torch_varlen") is not None
    print(f"{name}; torch {torch.__version__}, transformers {hf_version}; "
          f"torch.nn.attention.varlen {'available' if varlen else 'NOT available'}, flash-attn "
          f"{'installed' if neobert.varlen_kernel('flash_attn') is not None else 'not installed'}; "
          f"attn_backend auto runs {backend}", flush=True)
    t, precision = cfg.trainer, runtime.resolve_precision(cfg.trainer.mixed_precision, device, warn=None)
    print(f"\n{neobert.num_params(neobert.NeoBERTLMHead(cfg.model)) / 1e6:.1f}M parameters "
          f"({cfg.model.num_hidden_layers} x {cfg.model.hidden_size}); baseline {t.per_device_train_batch_size} rows x "
          f"{cfg.dataset.max_seq_length} tokens, packed, {'bf16 autocast' if precision == 'bf16' else 'fp32'}, compile "
          f"{'on' if t.torch_compile else 'off'}, fused AdamW; {steps} timed steps per variant after the same steps "
          f"untimed. MFU counts the trainer's FLOPs (train.step_flops: matmuls, attention within documents, the "
          f"decoder on predicted tokens).\n")

    def cells(objective, r, ref):
        act = "n/a" if r["activation_mb"] is None else f"{r['activation_mb']:,.0f}"
        if objective.cfg.dataset.max_seq_length != cfg.dataset.max_seq_length and ref is not r \
                and r["activation_mb"] and ref["activation_mb"]:
            act += f" ({ref['activation_mb'] / r['activation_mb']:.1f}x less)"
        return [*speed_cells(r), act, f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x", f"{r['warm_s']:.0f}"]

    table(["real tokens/s", "ms/step", "MFU", "peak memory (MiB)", "activations (MiB)", "vs baseline", "warm-up s"],
          [v for v in suite_variants(base, long_base, tiny, backend) if args.only in v[0]], steps, cells, args.budget_s,
          since=t_start)
    print(f"\nThe seq rows compare with the first seq {long_cfg.dataset.max_seq_length} row. Activations = peak minus "
          f"what was allocated before the timed steps (weights, optimizer state). Warm-up = the untimed first pass "
          f"(compile included)"
          + (". CPU peak memory is the process's resident high-water mark (it never goes down)."
             if device.type == "cpu" else ".") + f" Suite wall time {time.perf_counter() - t_start:.0f} s.")


# -----------------------------------------------------------------------------
# the profile suite: where a step's device time goes, and what the device can reach on the model's own shapes

KERNEL_CATEGORIES = [  # (category, pattern of a CUDA kernel's name, or on CPU an aten op's); the first match wins
    ("attention", r"flash|fmha|attention|varlen|scaled_dot_product|sdpa"),
    ("GEMMs", r"gemm|xmma|cutlass|cublas|matmul|\bmm\b|addmm|bmm|aten::linear|aten::mm"),
    ("optimizer", r"adam|multi_tensor|foreach_(add|mul|lerp|addcdiv|addcmul|sqrt|div)|muon"),
    ("grad norm and clipping", r"foreach_norm|vector_norm|clip"),
    ("cross-entropy", r"log_softmax|nll_loss|cross_entropy"),
    ("fused elementwise, norms, RoPE, SwiGLU", r"triton|elementwise|vectorized|reduce|silu|rsqrt|mul|add|pow|mean"),
    ("copies", r"copy|memcpy|memset|fill|cat|index|gather|scatter"),
    ("other", r"."),
]


def category(name: str) -> str:
    return next(c for c, pattern in KERNEL_CATEGORIES if re.search(pattern, name, re.IGNORECASE))


def micro_benchmarks(objective, batch: dict, tiny: bool) -> list:
    """[(what, shape, rate, unit)]: the model's matmuls alone, each attention kernel available (forward +
    backward on this batch's documents), and a large device copy: what the device reaches on these shapes."""
    c, device, repeat = objective.cfg.model, objective.device, 3 if tiny else 20

    def median_s(fn):  # after 2 untimed calls
        return float(np.median([timed(fn, device) for _ in range(repeat + 2)][2:]))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M, H, F, V = batch["input_ids"].numel(), c.hidden_size, c.ffn_hidden_size, c.vocab_size
    K = batch["predictions_per_row"] * batch["input_ids"].shape[0]
    rows = []
    for what, m, n, k in [("qkv", M, 3 * H, H), ("wo", M, H, H), ("ffn w12", M, 2 * F, H), ("ffn w3", M, H, F),
                          ("decoder", K, V, H)]:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        rate = 2 * m * n * k / median_s(lambda: a @ b) / 1e12
        rows.append((f"matmul {what}", f"{m} x {k} @ {k} x {n}", rate, "TFLOP/s"))
    seg = np.diff(batch["cu_seqlens"].numpy()).astype(np.float64)
    attn_flops = 3 * 4 * float((seg * seg).sum()) * H  # QK^T and AV, forward + backward (2x)
    B, S, nh = batch["input_ids"].shape[0], batch["input_ids"].shape[1], c.num_attention_heads
    cu = batch["cu_seqlens"].to(device)
    for backend in ("torch_varlen", "flash_attn", "sdpa"):
        if backend != "sdpa" and (device.type != "cuda" or neobert.varlen_kernel(backend) is None):
            continue
        q, k, v = (torch.randn(B, S, nh, c.head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        cfg = dataclasses.replace(c, attn_backend=backend)

        def fwd_bwd():
            neobert.attention(q, k, v, cfg, cu_seqlens=cu, max_seqlen=S).sum().backward()
        rows.append((f"attention {backend}, forward + backward", f"{len(seg)} documents in {B} x {S}",
                     attn_flops / median_s(fwd_bwd) / 1e12, "TFLOP/s"))
    x = torch.empty(1 << (20 if tiny else 28), device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    rate = 4 * x.numel() / median_s(lambda: y.copy_(x)) / 1e9  # bytes read and written per second
    rows.append(("device copy (read + write)", f"{x.numel() * 2 / 2**20:,.0f} MiB", rate, "GB/s"))
    return rows


def profile(objective, steps: int, out: Path, tiny: bool) -> dict:
    """torch.profiler over `steps` steps of the trainer (after the same steps untimed: compile, autotuning): device
    time by category per step, idle time between kernels, the TFLOP/s of the GEMMs and of attention, the 20 largest
    kernels, the micro-benchmarks. Writes out/profile.md and out/profile.json (and prints the table) -> the summary."""
    from torch.profiler import ProfilerActivity
    device, cuda = objective.device, objective.device.type == "cuda"
    run, step_batches = trainer_step(objective, steps)
    run()  # warm-up: every shape compiled
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        wall = timed(run, device)
    if cuda:  # the kernels themselves, with their intervals: idle = the step's wall time they do not cover
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
        spans = [(name, (end - start) / 1e6) for name, start, end in kernels]
        busy, reach = 0.0, float("-inf")
        for _, start, end in sorted(kernels, key=lambda k: k[1]):
            busy += max(0.0, end - max(start, reach)) / 1e6
            reach = max(reach, end)
    else:  # CPU: each aten op's own time (its children's excluded)
        spans = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
        busy = min(wall, sum(t for _, t in spans))
    by_name, by_category = {}, {c: 0.0 for c, _ in KERNEL_CATEGORIES}
    for name, seconds in spans:
        by_name[name] = by_name.get(name, 0.0) + seconds
        by_category[category(name)] += seconds
    flops = sum(objective.flops(mb) for mb in step_batches)
    gemm_flops = sum(b["input_ids"].numel() * neobert.flops_per_token(objective.cfg.model, 0, train.predicted(b) /
                                                                      b["input_ids"].numel())
                     for mb in step_batches for b in mb)
    summary = dict(
        device=torch.cuda.get_device_name(device) if cuda else "cpu", steps=steps, wall_ms_per_step=1e3 * wall / steps,
        idle_ms_per_step=1e3 * max(0.0, wall - busy) / steps,
        ms_per_step={c: 1e3 * t / steps for c, t in by_category.items()},
        gemm_tflops=gemm_flops / max(by_category["GEMMs"], 1e-12) / 1e12,
        attention_tflops=(flops - gemm_flops) / max(by_category["attention"], 1e-12) / 1e12,
        largest=[(n, 1e3 * t / steps) for n, t in sorted(by_name.items(), key=lambda kv: -kv[1])[:20]],
        micro=micro_benchmarks(objective, step_batches[0][0], tiny))
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "profile.md").write_text(markdown := profile_markdown(summary))
    print(markdown, flush=True)
    torch._dynamo.reset()
    return summary


def profile_markdown(s: dict) -> str:
    wall = s["wall_ms_per_step"]
    lines = [f"Profile: {s['device']}, {s['steps']} steps, {wall:,.1f} ms per step "
             f"({'device' if s['device'] != 'cpu' else 'CPU'} time of each category below; idle = the step's wall "
             f"time no kernel covers)", "", "| category | ms/step | share of the step |", "|---|---:|---:|"]
    lines += [f"| {c} | {t:,.2f} | {100 * t / wall:.1f}% |" for c, t in s["ms_per_step"].items() if t > 0]
    lines += [f"| idle between kernels | {s['idle_ms_per_step']:,.2f} | {100 * s['idle_ms_per_step'] / wall:.1f}% |",
              "", f"GEMMs reach {s['gemm_tflops']:,.3g} TFLOP/s and attention {s['attention_tflops']:,.3g} TFLOP/s "
              "(the trainer's FLOPs over their time).", "", "| the 20 largest kernels | ms/step |", "|---|---:|"]
    lines += [f"| {n[:100]} | {t:,.3f} |" for n, t in s["largest"]]
    lines += ["", "| micro-benchmark | shape | reached |", "|---|---|---:|"]
    lines += [f"| {what} | {shape} | {rate:,.2f} {unit} |" for what, shape, rate, unit in s["micro"]]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the recipe suite: AdamW and Muon x cosine and wsd, each at its best of three lrs, for the same training time

def recipe_run(config_path: str, overrides: list, out: Path, **keys) -> list[dict]:
    """Trains config_path with the overrides and these dotted keys from scratch in `out`, through the speedrun's
    engine (speedrun.train_run); -> its metrics.jsonl records, or [] if it stopped on a non-finite loss."""
    run = speedrun.train_run(Path(__file__).resolve().parent, config_path,
                             [*overrides, *(f"--{k}={v}" for k, v in keys.items())], out, budget_s=math.inf)
    if not run.records or run.records[-1]["step"] != keys["trainer.max_steps"]:
        print(f"  {out.name}: stopped on a non-finite loss", flush=True)
        return []
    return run.records


def recipe_suite(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python bench.py")
    parser.add_argument("--suite", choices=["recipe"], required=True)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "configs" / "smoke.yaml"))
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--out", default="runs/recipe")
    args, overrides = parser.parse_known_args(argv)
    try:
        lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        raise UserError(f"--lrs takes comma-separated numbers, e.g. 1e-3,3e-3,1e-2; got {args.lrs!r}") from None
    require(args.budget_s > 0 and all(lr > 0 for lr in lrs), "--budget-s and every --lrs value must be > 0")
    cfg, out = train.load_config(args.config, overrides), Path(args.out).resolve()
    data_dir = prepare.prepare(cfg.dataset, cfg.tokenizer, progress=False).resolve()
    overrides = [*overrides, f"--dataset.path={data_dir}", "--trainer.save_steps=0"]
    size = neobert.num_params(neobert.NeoBERTLMHead(cfg.model)) / 1e6
    print(f"`python bench.py {' '.join(argv)}`: {args.config}, {size:.1f}M parameters, {args.budget_s:.0f} s of "
          f"training per run; lrs {lrs}", flush=True)
    rows, ref = [], None
    for opt in ("adamw", "muon"):  # the steps that fit the budget: timed on 30 steps after 10 (warm-up, first shapes)
        log = recipe_run(args.config, overrides, out / f"{opt}-timing", **{
            "optimizer.name": opt, "trainer.max_steps": 40, "trainer.eval_steps": 0, "trainer.logging_steps": 10})
        require(bool(log), f"{opt}: the timing run stopped on a non-finite loss; lower the --lrs")
        seconds = log[-1]["elapsed"] - log[0]["elapsed"]
        steps, tok_s = max(10, int(args.budget_s * 30 / seconds)), (log[-1]["tokens"] - log[0]["tokens"]) / seconds
        for sched in ("cosine", "wsd"):
            runs = {lr: recipe_run(args.config, overrides, out / f"{opt}-{sched}-{lr:g}", **{
                "optimizer.name": opt, "optimizer.lr": lr, "scheduler.name": sched, "trainer.max_steps": steps,
                "trainer.eval_steps": max(1, steps // 10)}) for lr in lrs}
            final = {lr: records[-1]["eval_loss"] for lr, records in runs.items() if records}
            require(bool(final), f"{opt} + {sched}: every lr stopped on a non-finite loss; lower the --lrs")
            best = min(final, key=final.get)
            rows.append((opt, sched, best, runs[best], final, tok_s))
            ref = ref or runs[best][-1]["eval_loss"]
    print("\n| optimizer + schedule | best lr | steps | real tokens/s | held-out loss | masked-token accuracy | "
          "held-out loss at each lr | first eval at or below AdamW + cosine's final loss |\n|---|---:|---:|---:|---:|"
          "---:|---|---|")
    for opt, sched, best, log, final, tok_s in rows:
        evals = [r for r in log if "eval_loss" in r]
        hit = next((f"step {r['step']} ({r['elapsed']:.0f} s)" for r in evals if r["eval_loss"] <= ref), "not reached")
        print(f"| {'AdamW' if opt == 'adamw' else 'Muon'} + {sched} | {best:g} | {log[-1]['step']} | {tok_s:,.0f} | "
              f"{log[-1]['eval_loss']:.3f} | {100 * log[-1]['eval_accuracy']:.1f}% | "
              f"{', '.join(f'{lr:g}: {v:.3f}' for lr, v in final.items()) or '-'} | {hit} |", flush=True)
    print(f"\nSteps: what fits the budget at the speed of the optimizer's timing run (steps 10-40, no evaluation), "
          f"whose real tokens/s the table shows. Held-out: the val split (trainer.eval_max_batches micro-batches), "
          f"evaluated every tenth of a run; times are the run's wall time, evaluations included. Runs in {out}.")


def _bench_cli(argv):
    if argv[0].startswith("--suite"):
        name = argv[0].partition("=")[2] or (argv[1] if len(argv) > 1 else "")
        if name == "speedrun":
            return speedrun.speedrun(argv)
        return recipe_suite(argv) if name == "recipe" else suite(argv)
    cfg = train.load_config(argv[0], argv[1:], schema=BenchRun)
    bench_cfg = cfg.bench
    if cfg.trainer.objective == "contrastive":
        return contrastive_bench(cfg, bench_cfg, argv)
    if cfg.dataset.streaming and "packing" in bench_cfg.variants:
        # the streaming loader makes packed rows only: padded rows would fail after the baseline was timed
        print("note: dataset.streaming gives packed rows only, so the 'packing off' variant is left out "
              "(set dataset.streaming false over prepared shards to time it)\n")
        bench_cfg.variants = [v for v in bench_cfg.variants if v != "packing"]
    bench(cfg, bench_cfg, argv)


def main(argv=None) -> int:
    return runtime.run_main(argv, __doc__, _bench_cli)


if __name__ == "__main__":
    sys.exit(main())
