"""Training throughput of a config: tokens/s, MFU (where the device's peak is known) and peak memory, then the same
config with one thing changed at a time (packing, sparse prediction, compile, gradient checkpointing), each printed
as a ratio to the baseline; and the data loader's own throughput next to what training consumes.

    python bench.py configs/smoke.yaml
    python bench.py configs/pretrain.yaml --trainer.per_device_train_batch_size 16 --bench.steps 20
    python bench.py --suite gpu [--tiny]     the prepared GPU suite (see SUITE_USAGE below)

Honest timing: every variant first runs all of its timed steps once untimed (so every batch shape is compiled and
cached), then runs them again under the clock. tokens/s counts real tokens (not padding) so packed and padded
batches compare fairly. Single process; the numbers are per device.
"""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

import data
import neobert
import train
from data import UserError


@dataclass
class BenchConfig:
    steps: int = 10  # timed optimizer steps per variant (each also run once untimed first)
    variants: list[str] = field(default_factory=lambda: ["packing", "sparse", "compile", "checkpointing"])
    loader_steps: int = 30  # steps drawn from the loader alone to time it


class FullLogitsMLM(torch.nn.Module):
    """Sparse prediction off: the decoder runs on every position, then the loss is taken over the predicted ones."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, labels, **batch):
        logits = self.lm(**batch).logits  # (B, S, V)
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return neobert.MaskedLMOutput(logits=None, loss_sum=loss_sum, num_masked=(labels != -100).sum())


def real_tokens(batch) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def variant_configs(cfg: train.Config, names: list[str]) -> list[tuple[str, train.Config, bool]]:
    """(label, config, sparse prediction) for the baseline and each variant: one setting flipped at a time."""
    t, c = cfg.trainer, cfg.datacollator
    out = [("baseline", cfg, True)]
    for name in names:
        if name == "packing":
            label = "packing off (padded rows)" if c.pack_sequences else "packing on"
            out.append((label, dataclasses.replace(cfg, datacollator=dataclasses.replace(
                c, pack_sequences=not c.pack_sequences)), True))
        elif name == "sparse":
            out.append(("sparse prediction off (full logits)", cfg, False))
        elif name == "compile":
            label = "compile off" if t.torch_compile else "compile on"
            out.append((label, dataclasses.replace(cfg, trainer=dataclasses.replace(
                t, torch_compile=not t.torch_compile)), True))
        elif name == "checkpointing":
            label = "gradient checkpointing " + ("off" if t.gradient_checkpointing else "on")
            out.append((label, dataclasses.replace(cfg, trainer=dataclasses.replace(
                t, gradient_checkpointing=not t.gradient_checkpointing)), True))
        else:
            raise UserError(f"bench.variants: unknown {name!r}; choose from packing, sparse, compile, checkpointing")
    return out


def measure(cfg: train.Config, sparse: bool, steps: int, device, fused: bool = True, hf: str = None) -> dict:
    """Times `steps` optimizer steps (after running the same steps once to warm up); returns tokens/s, MFU, memory.
    fused: fused AdamW on CUDA (as the trainer); hf: time transformers' "modernbert" or "bert" instead (HFMaskedLM)."""
    t = cfg.trainer
    loader = data.build_loader(cfg.dataset, cfg.tokenizer, cfg.datacollator, "train",
                               micro_batch_size=t.per_device_train_batch_size,
                               grad_accum_steps=t.gradient_accumulation_steps, seed=t.seed, prefetch=0)
    step_batches = [loader.next_step() for _ in range(steps)]
    loader.close()
    torch.manual_seed(t.seed)
    model = (neobert.NeoBERTLMHead(cfg.model) if hf is None else HFMaskedLM(hf, cfg.model)).to(device)
    if hf is None:
        model.model.gradient_checkpointing = t.gradient_checkpointing
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(neobert.param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                  fused=fused and device.type == "cuda")
    step_model = model if sparse or hf else FullLogitsMLM(model)
    step_model = torch.compile(step_model) if t.torch_compile else step_model
    amp = train.autocast(device, train.resolve_precision(t.mixed_precision, device, warn=None))

    def run_steps():
        for micro_batches in step_batches:
            loss_sum, num_masked = train.forward_backward(step_model, micro_batches, device, amp)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.gradient_clipping or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum.item()  # the training loop reads the loss every step too

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    run_steps()  # warm-up: every shape the timed steps will see
    sync()
    warm_s = time.perf_counter() - t0
    before = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20  # weights and optimizer state: what stays between steps
    t0 = time.perf_counter()
    run_steps()
    sync()
    dt = time.perf_counter() - t0
    tokens = sum(real_tokens(b) for mb in step_batches for b in mb)
    positions = sum(b["input_ids"].numel() for mb in step_batches for b in mb)
    peak = neobert.peak_flops(device)
    flops = sum(train.step_flops(cfg.model, mb, sparse) for mb in step_batches)  # what the device computes
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:  # the process's high-water mark so far (it never goes down: read it as an upper bound)
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch._dynamo.reset()  # the model, optimizer and compiled graphs go when this returns
    return dict(tokens_per_s=tokens / dt, step_s=dt / steps, mfu=flops / dt / peak if peak else None,
                memory_mb=memory, activation_mb=None if before is None else memory - before, warm_s=warm_s,
                real_fraction=tokens / positions)


def bench(cfg: train.Config, bench_cfg: BenchConfig, argv: list[str]) -> None:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    data_dir = data.prepare(cfg.dataset, cfg.tokenizer) if (cfg.dataset.pre_tokenize or cfg.dataset.streaming) \
        else data.dataset_dir(cfg.dataset)
    data.check_vocab(data.load_tokenizer(cfg.tokenizer, data_dir), cfg.model.vocab_size)
    t = cfg.trainer
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows = t.per_device_train_batch_size * t.gradient_accumulation_steps
    precision = "bf16 autocast" if train.resolve_precision(t.mixed_precision, device, warn=None) == "bf16" else "fp32"
    print(f"`python bench.py {' '.join(argv)}`  \n{name}, torch {torch.__version__}; "
          f"{neobert.num_params(neobert.NeoBERTLMHead(cfg.model)) / 1e6:.1f}M parameters; {rows} rows x "
          f"{cfg.dataset.max_seq_length} tokens per step ({t.per_device_train_batch_size} x "
          f"{t.gradient_accumulation_steps}), {precision}, compile {'on' if t.torch_compile else 'off'}, "
          f"{'packed' if cfg.datacollator.pack_sequences else 'padded'}; {bench_cfg.steps} timed steps per variant\n")
    print("| variant | real tokens/s | ms/step | MFU | peak memory (MB) | real-token share | vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = None
    for label, vcfg, sparse in variant_configs(cfg, bench_cfg.variants):
        r = measure(vcfg, sparse, bench_cfg.steps, device)
        base = base or r
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {label} | {r['tokens_per_s']:,.0f} | {1000 * r['step_s']:,.1f} | {mfu} | {r['memory_mb']:,.0f} | "
              f"{r['real_fraction']:.2f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x |", flush=True)
    if device.type == "cpu":
        print("\nCPU peak memory is the process's resident high-water mark so far (it never goes down).")
    loader = data.build_loader(cfg.dataset, cfg.tokenizer, cfg.datacollator, "train",
                               micro_batch_size=t.per_device_train_batch_size,
                               grad_accum_steps=t.gradient_accumulation_steps, seed=t.seed)
    lb = data.bench_loader(loader, steps=bench_cfg.loader_steps)
    loader.close()
    real = lb["tokens_per_s"] * lb["real_token_fraction"]
    print(f"\ndata loader alone: {lb['batches_per_s']:,.1f} micro-batches/s, {real:,.0f} real tokens/s; the "
          f"baseline training step consumes {base['tokens_per_s']:,.0f} real tokens/s "
          f"({100 * base['tokens_per_s'] / real:.1f}% of what the loader delivers)")


# -----------------------------------------------------------------------------
# the GPU suite: python bench.py --suite gpu [--tiny]. One command that measures, side by side and in one process,
# what the GPU work needs: the GPU tests, the 250M config with one thing changed at a time, transformers' ModernBERT
# and BERT at the same size and batch, and seq 4096 with and without gradient checkpointing. Its data is made here
# (a synthetic corpus and tokenizer), so it runs on a machine that can download nothing. --tiny runs the same code
# with a tiny model on CPU: tests/test_bench.py runs it end to end.

SUITE_USAGE = """python bench.py --suite gpu [--tiny] [--steps N] [--budget-s S] [--data-dir DIR] [--no-tests]

  --tiny        a tiny model and short rows (CPU, a minute): the same code path as the full suite
  --steps       timed optimizer steps per variant (each also run once untimed first, compile included); default 10
  --budget-s    stop starting new variants after this many seconds (default 420: the suite must fit 8 minutes)
  --data-dir    where the synthetic corpus, tokenizer and shards are written (default data_cache/bench-suite)
  --no-tests    skip step 1 (pytest -k gpu)"""


class HFMaskedLM(torch.nn.Module):
    """transformers' ModernBertForMaskedLM or BertForMaskedLM at NeoBERT's width, depth, heads, context and
    feed-forward parameter count, fed the same rows with the loss over the same predicted tokens. Each row is one
    sequence to them (without flash-attn neither has a packed path): the same tokens, attention over the full row."""

    def __init__(self, kind: str, config: neobert.NeoBERTConfig):
        super().__init__()
        import transformers  # the bench's comparison only: never a runtime dependency of the trainer
        same = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                    num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                    max_position_embeddings=config.max_position_embeddings, pad_token_id=config.pad_token_id)
        special = dict(cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3)  # data.SPECIAL_TOKENS' ids
        if kind == "modernbert":  # GeGLU with 2 x intermediate in: the same parameters as NeoBERT's SwiGLU
            cfg = transformers.ModernBertConfig(**same, intermediate_size=config.ffn_hidden_size, **special)
            self.lm = transformers.ModernBertForMaskedLM(cfg)
        elif kind == "bert":  # a 2-matrix GELU MLP of intermediate_size: again the same parameters
            cfg = transformers.BertConfig(**same, intermediate_size=config.intermediate_size)
            self.lm = transformers.BertForMaskedLM(cfg)
        else:
            raise ValueError(f"unknown transformers model {kind!r}")

    def forward(self, input_ids, labels, attention_mask=None, **packing):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, S, V): their default
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return neobert.MaskedLMOutput(logits=None, loss_sum=loss_sum, num_masked=(labels != -100).sum())


def synthetic_corpus(root: Path, vocab_size: int, n_tokens: int, seed: int = 0) -> tuple[Path, Path]:
    """(corpus.jsonl, tokenizer.json) in root, made here (reused when present). The tokenizer's vocabulary is BERT's
    five special tokens plus vocab_size - 5 made-up words, one token each, so every row of the decoder is in use;
    documents are Zipf-distributed words with web-like lengths (log-normal, median 300 tokens, 16 to 4000)."""
    corpus, tok_path = root / "corpus.jsonl", root / "tokenizer.json"
    if corpus.is_file() and tok_path.is_file():
        return corpus, tok_path
    root.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(vocab_size - len(data.SPECIAL_TOKENS))]
    vocab = {token: i for i, token in enumerate(data.SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rng = np.random.default_rng(seed)
    total = 0
    with open(root / "corpus.jsonl.tmp", "w") as f:
        while total < n_tokens:
            n = int(np.clip(rng.lognormal(np.log(300), 1.0), 16, 4000))
            ids = np.minimum(rng.zipf(1.2, n), len(words)) - 1
            f.write(json.dumps({"text": " ".join(words[i] for i in ids)}) + "\n")
            total += n
    tok.save(str(root / "tokenizer.json.tmp"))
    os.replace(root / "corpus.jsonl.tmp", corpus)  # the tokenizer last: both present means both complete
    os.replace(root / "tokenizer.json.tmp", tok_path)
    return corpus, tok_path


def suite_config(path: str, root: Path, tiny: bool) -> train.Config:
    """A pretraining config (configs/pretrain.yaml or pretrain_4096.yaml) over the synthetic data, one process and
    no gradient accumulation (the suite times micro-steps); tiny: a 2-layer, 64-wide model on short rows, compile off."""
    cfg = train.load_config(path, [])
    model, trainer, dataset = cfg.model, cfg.trainer, cfg.dataset
    rows = trainer.per_device_train_batch_size
    if tiny:
        model = dataclasses.replace(model, vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, max_position_embeddings=max(256, dataset.max_seq_length // 16))
        dataset = dataclasses.replace(dataset, max_seq_length=dataset.max_seq_length // 16)
        rows = max(1, rows // 8)
    corpus, tok = synthetic_corpus(root / f"corpus-{model.vocab_size}", model.vocab_size,
                                   n_tokens=(40_000 if tiny else 1_500_000))
    dataset = dataclasses.replace(dataset, name="synthetic", data_files=[str(corpus)], text_column="text",
                                  path=str(root / f"shards-{model.vocab_size}"), streaming=False, pre_tokenize=True,
                                  eval_samples=0, validation_split=0.01, max_documents=0)
    trainer = dataclasses.replace(trainer, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                                  torch_compile=trainer.torch_compile and not tiny, gradient_checkpointing=False)
    return dataclasses.replace(cfg, model=model, dataset=dataset, trainer=trainer,
                               tokenizer=dataclasses.replace(cfg.tokenizer, path=str(tok), train=False))


def attention_backend(model_cfg: neobert.NeoBERTConfig, device) -> str:
    """The backend a packed bf16 batch of this config runs on this device (what `auto` resolves to)."""
    if device.type != "cuda":
        return "sdpa"
    probe = torch.zeros(1, 1, 1, model_cfg.head_dim, device=device, dtype=torch.bfloat16)
    return neobert.pick_backend(model_cfg, probe)


def suite_variants(cfg: train.Config, long_cfg: train.Config, device, tiny: bool) -> list:
    """[(label, config, measure() keywords)]: the baseline and one change at a time (attention backend; transformers'
    models in its place; seq 4096 with and without checkpointing, compared with each other; the loss options,
    compile, fused AdamW, micro-batch size)."""
    def change(c, **sections):
        return dataclasses.replace(c, **{k: dataclasses.replace(getattr(c, k), **v) for k, v in sections.items()})

    t, S = cfg.trainer, cfg.dataset.max_seq_length
    backend = attention_backend(cfg.model, device)
    out = [(f"baseline (attn_backend auto = {backend})", cfg, {})]
    if backend != "sdpa":
        out.append(("attn_backend sdpa (block-diagonal mask)", change(cfg, model=dict(attn_backend="sdpa")), {}))
    else:  # auto fell back: say what is missing rather than time sdpa against itself
        out.append(("attn_backend torch_varlen: not available here" if device.type == "cuda"
                    else "attn_backend sdpa (the only backend on CPU)", change(cfg, model=dict(attn_backend="sdpa")), {}))
    # the goals first (MFU, the HF ratios, checkpointing's memory), so a spent budget skips the least needed
    out += [
        ("HF ModernBertForMaskedLM (same size and rows)", cfg, {"hf": "modernbert"}),
        ("HF BertForMaskedLM (same size and rows)", cfg, {"hf": "bert"}),
        (f"seq {long_cfg.dataset.max_seq_length}, {long_cfg.trainer.per_device_train_batch_size} rows", long_cfg, {}),
        (f"seq {long_cfg.dataset.max_seq_length}, gradient checkpointing",
         change(long_cfg, trainer=dict(gradient_checkpointing=True)), {}),
        (f"static predictions ({neobert.predictions_per_row(dataclasses.replace(cfg.model, static_predictions=0.3), S)}"
         f" per row)", change(cfg, model=dict(static_predictions=0.3)), {}),
        (f"chunked decoder + CE ({64 if tiny else 4096} positions)",
         change(cfg, model=dict(decoder_chunk_size=64 if tiny else 4096)), {}),
        (f"compile {'off' if t.torch_compile else 'on'}", change(cfg, trainer=dict(torch_compile=not t.torch_compile)),
         {}),
        ("AdamW not fused", cfg, {"fused": False}),
        (f"micro-batch {2 * t.per_device_train_batch_size} rows",
         change(cfg, trainer=dict(per_device_train_batch_size=2 * t.per_device_train_batch_size)), {}),
    ]
    return out


def recompiles_after_warmup(cfg: train.Config, steps: int, warmup: int, device) -> int:
    """Runs `steps` training steps of cfg under torch.compile, as the trainer does, and returns how many graphs
    torch.compile made after the first `warmup` steps (0: every later batch reused a compiled graph)."""
    from torch._dynamo.utils import counters
    t = cfg.trainer
    data_dir = data.prepare(cfg.dataset, cfg.tokenizer, progress=False)
    data.check_vocab(data.load_tokenizer(cfg.tokenizer, data_dir), cfg.model.vocab_size)
    loader = data.build_loader(cfg.dataset, cfg.tokenizer, cfg.datacollator, "train",
                               micro_batch_size=t.per_device_train_batch_size, seed=t.seed, prefetch=0)
    torch._dynamo.reset()
    model = neobert.NeoBERTLMHead(cfg.model).to(device)
    optimizer = torch.optim.AdamW(neobert.param_groups(model, 0.1), lr=1e-4, fused=device.type == "cuda")
    compiled = torch.compile(model)
    amp = train.autocast(device, train.resolve_precision(t.mixed_precision, device, warn=None))
    graphs = 0
    for step in range(steps):
        if step == warmup:
            graphs = counters["stats"]["unique_graphs"]
        loss_sum, _ = train.forward_backward(compiled, loader.next_step(), device, amp)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss_sum):
            raise RuntimeError(f"non-finite loss at step {step}")
    loader.close()
    return counters["stats"]["unique_graphs"] - graphs


def run_gpu_tests(tiny: bool) -> str:
    """Step 1: `pytest -k gpu` in a subprocess (on CPU every GPU test skips itself); its summary line."""
    paths = ["tests/test_model.py"] if tiny else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu", *paths]
    p = subprocess.run(cmd, cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else p.stderr.strip()[-300:]
    if p.returncode not in (0, 5):  # 5: nothing collected
        print("\n".join(lines[-40:]), flush=True)
    return f"`{' '.join(cmd[2:])}`: {summary}"


def gpu_suite(tiny: bool, steps: int, budget_s: float, root: Path, tests: bool) -> None:
    t_start = time.perf_counter()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    here = Path(__file__).resolve().parent
    cfg = suite_config(str(here / "configs" / "pretrain.yaml"), root, tiny)
    long_cfg = suite_config(str(here / "configs" / "pretrain_4096.yaml"), root, tiny)
    for c in (cfg, long_cfg):  # the shards (shared by both configs: documents do not depend on the row length)
        data.check_vocab(data.load_tokenizer(c.tokenizer, data.prepare(c.dataset, c.tokenizer, progress=False)),
                         c.model.vocab_size)
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    varlen = neobert.varlen_kernel("torch_varlen") is not None
    print(f"GPU suite{' (tiny)' if tiny else ''}: {name}; torch {torch.__version__}, transformers {hf_version}; "
          f"torch.nn.attention.varlen {'available' if varlen else 'NOT available'}, flash-attn "
          f"{'installed' if neobert.varlen_kernel('flash_attn') is not None else 'not installed'}; "
          f"attn_backend auto runs {attention_backend(cfg.model, device)}", flush=True)
    if tests:
        print(f"\n1. GPU tests: {run_gpu_tests(tiny)}", flush=True)
    t = cfg.trainer
    precision = "bf16 autocast" if train.resolve_precision(t.mixed_precision, device, warn=None) == "bf16" else "fp32"
    print(f"\n2-4. {neobert.num_params(neobert.NeoBERTLMHead(cfg.model)) / 1e6:.1f}M parameters "
          f"({cfg.model.num_hidden_layers} x {cfg.model.hidden_size}); baseline {t.per_device_train_batch_size} rows x "
          f"{cfg.dataset.max_seq_length} tokens, packed, {precision}, compile {'on' if t.torch_compile else 'off'}, "
          f"fused AdamW; {steps} timed steps per variant after the same steps untimed. MFU counts the trainer's FLOPs "
          f"(train.step_flops: matmuls, attention within documents, the decoder on predicted tokens).\n")
    print("| variant | real tokens/s | ms/step | MFU | peak memory (MiB) | activations (MiB) | vs baseline | "
          "warm-up s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    base, long_base = None, None
    for label, vcfg, kwargs in suite_variants(cfg, long_cfg, device, tiny):
        if time.perf_counter() - t_start > budget_s:
            print(f"| {label} | skipped: the {budget_s:.0f} s budget is spent | | | | | | |", flush=True)
            continue
        try:
            r = measure(vcfg, True, steps, device, **kwargs)
        except torch.cuda.OutOfMemoryError:
            torch._dynamo.reset()
            print(f"| {label} | out of memory | | | | | | |", flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others' numbers
            torch._dynamo.reset()
            print(f"| {label} | failed: {type(e).__name__}: {' '.join(str(e).split())[:200]} | | | | | | |", flush=True)
            continue
        is_long = vcfg.dataset.max_seq_length != cfg.dataset.max_seq_length
        ref = long_base if is_long else base
        if ref is None:
            ref = r
            if is_long:
                long_base = r
            else:
                base = r
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        act = "n/a" if r["activation_mb"] is None else f"{r['activation_mb']:,.0f}"
        if is_long and ref is not r and r["activation_mb"] and ref["activation_mb"]:
            act += f" ({ref['activation_mb'] / r['activation_mb']:.1f}x less)"
        print(f"| {label} | {r['tokens_per_s']:,.0f} | {1000 * r['step_s']:,.1f} | {mfu} | {r['memory_mb']:,.0f} | "
              f"{act} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | {r['warm_s']:.0f} |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nThe seq rows compare with the first seq {long_cfg.dataset.max_seq_length} row. Activations = peak minus "
          f"what was allocated before the timed steps (weights, optimizer state). Warm-up = the untimed first pass "
          f"(compile included)"
          + (". CPU peak memory is the process's resident high-water mark (it never goes down)."
             if device.type == "cpu" else ".") + f" Suite wall time {time.perf_counter() - t_start:.0f} s.")


def suite_cli(argv):
    parser = argparse.ArgumentParser(prog="python bench.py", usage=SUITE_USAGE)
    parser.add_argument("--suite", choices=["gpu"], required=True)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--data-dir", default="data_cache/bench-suite")
    parser.add_argument("--no-tests", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    gpu_suite(args.tiny, args.steps, args.budget_s, Path(args.data_dir), tests=not args.no_tests)


# -----------------------------------------------------------------------------
# contrastive fine-tuning (trainer.objective: contrastive): pairs/s and peak memory with and without gradient caching


def measure_contrastive(cfg: train.Config, data_dir, rows: int, chunk_size: int, steps: int) -> dict:
    """Times `steps` contrastive optimizer steps of `rows` pairs per step (after running them once untimed); returns
    pairs/s, ms/step and peak memory (CUDA max allocated, else this process's max RSS: run it in a fresh process)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    t, cc = cfg.trainer, cfg.contrastive
    loader = data.PairLoader(data_dir, cc, micro_batch_size=rows, seed=t.seed, prefetch=0)
    step_batches = [loader.next_step()[0] for _ in range(steps)]
    loader.close()
    torch.manual_seed(t.seed)
    model = neobert.NeoBERTLMHead(cfg.model)  # speed and memory do not depend on the weights
    model.model.gradient_checkpointing = t.gradient_checkpointing
    embedder = train.Embedder(model.model, cc.pooling).to(device)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(neobert.param_groups(model.model, o.weight_decay), lr=o.lr, betas=o.betas,
                                  eps=o.eps, fused=device.type == "cuda")
    step_model = torch.compile(embedder) if t.torch_compile else embedder
    amp = train.autocast(device, train.resolve_precision(t.mixed_precision, device, warn=None))

    def run_steps():
        for batch in step_batches:
            loss_sum, _, _ = train.contrastive_forward_backward(step_model, batch, device, amp, cc.temperature,
                                                                chunk_size)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.gradient_clipping or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum.item()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    run_steps()  # warm-up: every shape the timed steps will see
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_steps()
    sync()
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(pairs_per_s=rows * steps / dt, step_s=dt / steps, memory_mb=memory)


def _measure_in_child(args, results):
    try:
        results.put(measure_contrastive(*args))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        results.put(e)


def contrastive_bench(cfg: train.Config, bench_cfg: BenchConfig, argv: list[str]) -> None:
    """Side by side: the config's batch without and with gradient caching, and 8x that batch with caching (and
    without, to show what caching saves). On CPU each variant runs in a fresh process, so its max RSS is its own."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    cfg, tokenizer = train.contrastive_model_config(cfg, None)
    data_dir = data.prepare_pairs(cfg.contrastive, tokenizer)
    t, cc = cfg.trainer, cfg.contrastive
    rows = t.per_device_train_batch_size * t.gradient_accumulation_steps
    chunk = cc.chunk_size or rows  # the default chunk holds the uncached batch's activations: the same memory
    variants = [("no caching", rows, 0), (f"caching (chunk {chunk})", rows, chunk),
                ("8x batch, no caching", 8 * rows, 0), (f"8x batch, caching (chunk {chunk})", 8 * rows, chunk)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"`python bench.py {' '.join(argv)}`  \n{name}, torch {torch.__version__}; contrastive, "
          f"{neobert.num_params(neobert.NeoBERT(cfg.model)) / 1e6:.1f}M encoder parameters, {cc.pooling} pooling, "
          f"{cc.hard_negatives} hard negative(s), queries <= {cc.max_query_length} and documents <= "
          f"{cc.max_document_length} tokens; {bench_cfg.steps} timed steps per variant\n")
    print("| variant | pairs/step | pairs/s | ms/step | peak memory (MB) | memory vs no caching |")
    print("|---|---:|---:|---:|---:|---:|")
    results = {}
    for label, n, c in variants:
        args = (cfg, data_dir, n, c, bench_cfg.steps)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            try:
                r = measure_contrastive(*args)
            except torch.cuda.OutOfMemoryError:
                r = None
        else:
            import multiprocessing
            ctx = multiprocessing.get_context("spawn")  # a fresh process: max RSS never goes down
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure_in_child, args=(args, queue))
            proc.start()
            r = queue.get()
            proc.join()
            if isinstance(r, BaseException):
                raise r
        results[label] = r
        if r is None:
            print(f"| {label} | {n} | out of memory | | | |", flush=True)
            continue
        base = results["no caching"]["memory_mb"]
        print(f"| {label} | {n} | {r['pairs_per_s']:,.1f} | {1000 * r['step_s']:,.1f} | {r['memory_mb']:,.0f} | "
              f"{r['memory_mb'] / base:.2f}x |", flush=True)
    base, big = results["no caching"], results[variants[-1][0]]
    print(f"\n8x the batch with gradient caching takes {big['memory_mb'] / base['memory_mb']:.2f}x the peak memory of "
          f"the batch without it" + (" (CPU: max RSS of each variant's own process, including torch itself)."
                                     if device.type == "cpu" else "."))


def _bench_cli(argv):
    if argv[0].startswith("--suite"):
        return suite_cli(argv)
    cfg = train.load_config(argv[0], argv[1:], extra_sections={"bench": BenchConfig})
    if cfg.tasks["bench"].steps < 1:
        raise UserError(f"bench.steps must be at least 1, got {cfg.tasks['bench'].steps}")
    if cfg.trainer.objective == "contrastive":
        return contrastive_bench(cfg, cfg.tasks["bench"], argv)
    variant_configs(cfg, cfg.tasks["bench"].variants)  # unknown variant names fail before any work
    if cfg.dataset.streaming and "packing" in cfg.tasks["bench"].variants:
        # the streaming loader makes packed rows only: padded rows would fail after the baseline was timed
        print("note: dataset.streaming gives packed rows only, so the 'packing off' variant is left out "
              "(set dataset.streaming false over prepared shards to time it)\n")
        cfg.tasks["bench"].variants = [v for v in cfg.tasks["bench"].variants if v != "packing"]
    bench(cfg, cfg.tasks["bench"], argv)


def main(argv=None) -> int:
    return data.run_main(argv, __doc__, _bench_cli)


if __name__ == "__main__":
    sys.exit(main())
