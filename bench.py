"""Training throughput of a config: tokens/s, MFU (where the device's peak is known) and peak memory, then the same
config with one thing changed at a time (packing, sparse prediction, compile, gradient checkpointing), each printed
as a ratio to the baseline; and the data loader's own throughput next to what training consumes.

    python bench.py configs/smoke.yaml
    python bench.py configs/pretrain.yaml --trainer.per_device_train_batch_size 16 --bench.steps 20

Honest timing: every variant first runs all of its timed steps once untimed (so every batch shape is compiled and
cached), then runs them again under the clock. tokens/s counts real tokens (not padding) so packed and padded
batches compare fairly. Single process; the numbers are per device.
"""

import dataclasses
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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


def measure(cfg: train.Config, sparse: bool, steps: int, device) -> dict:
    """Times `steps` optimizer steps (after running the same steps once to warm up); returns tokens/s, MFU, memory."""
    t = cfg.trainer
    loader = data.build_loader(cfg.dataset, cfg.tokenizer, cfg.datacollator, "train",
                               micro_batch_size=t.per_device_train_batch_size,
                               grad_accum_steps=t.gradient_accumulation_steps, seed=t.seed, prefetch=0)
    step_batches = [loader.next_step() for _ in range(steps)]
    loader.close()
    torch.manual_seed(t.seed)
    model = neobert.NeoBERTLMHead(cfg.model).to(device)
    model.model.gradient_checkpointing = t.gradient_checkpointing
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(neobert.param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                  fused=device.type == "cuda")
    step_model = model if sparse else FullLogitsMLM(model)
    step_model = torch.compile(step_model) if t.torch_compile else step_model
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if t.mixed_precision == "bf16" else nullcontext()

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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
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
                memory_mb=memory, warm_s=warm_s, real_fraction=tokens / positions)


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
    precision = "bf16 autocast" if t.mixed_precision == "bf16" else "fp32"
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


def _bench_cli(argv):
    cfg = train.load_config(argv[0], argv[1:], extra_sections={"bench": BenchConfig})
    if cfg.tasks["bench"].steps < 1:
        raise UserError(f"bench.steps must be at least 1, got {cfg.tasks['bench'].steps}")
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
