"""usage: python train.py CONFIG [--section.key value | section.key=value ...] [--print-config]
       python train.py CONFIG --prepare-only [--bench]                 only prepare the data (= python data.py CONFIG)
       torchrun --nproc_per_node N train.py CONFIG [...]                data-parallel, the same code
  CONFIG: configs/smoke.yaml (offline, CPU, minutes), configs/pretrain.yaml, configs/contrastive_smoke.yaml, ...
  sections: model tokenizer dataset datacollator trainer optimizer scheduler wandb contrastive (docs/pretraining.md)
  e.g. --trainer.max_steps 50 --optimizer.lr 2e-4 --trainer.resume_from_checkpoint auto --trainer.objective contrastive
  --print-config: print the whole resolved config first; --bench (with --prepare-only): time the data loader
  writes <trainer.output_dir>/metrics.jsonl, model_checkpoints/<step>/, checkpoints/<step>/ (python export.py)

Train a NeoBERT encoder: one loop, one code path from a laptop CPU to torchrun on 8 GPUs. The loop knows one
interface, the objective (MLM below, contrastive.Contrastive the second). Read top to bottom: config -> schedule and
optimizer step -> the MLM objective -> logging -> setup -> the loop -> main.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import config
import contrastive
import data
import neobert
import prepare
import runtime
from config import UserError, config_to_dict, config_to_yaml, require, warn
from contrastive import ContrastiveConfig
from runtime import autocast, host_to_device, to_device

# -----------------------------------------------------------------------------
# config: the sections this file owns, and Config, the whole run (model, data and task sections from their files)

@dataclass
class TrainerConfig:
    output_dir: str = "runs/neobert"
    per_device_train_batch_size: int = 16  # rows per micro-batch per process
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1  # global batch = per_device_train_batch_size * this * world size
    max_steps: int = 1000  # optimizer steps
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 autocast on CUDA and bf16 CPUs, else fp32
    torch_compile: bool = False
    gradient_checkpointing: bool = False
    gradient_clipping: Optional[float] = 1.0  # max global grad norm; null = no clipping (the norm is still logged)
    logging_steps: int = 10  # a metrics.jsonl line every this many steps (and at the last one)
    eval_steps: int = 1000  # evaluate on the val split every this many steps and at the end; 0 = never
    eval_max_batches: int = 20  # micro-batches per process in one evaluation
    save_steps: int = 1000  # checkpoint every this many steps; a final one is always written; 0 = only the final
    save_total_limit: Optional[int] = 3  # keep the newest N checkpoints; null = keep all
    resume_from_checkpoint: Union[bool, str, None] = False  # false | true | latest | auto | <path>
    init_from: Optional[str] = None  # model weights only (new optimizer, step 0): checkpoint dir, run dir or hub id
    seed: int = 0
    disable_tqdm: bool = False
    objective: Literal["mlm", "contrastive"] = "mlm"  # mlm (pretraining) | contrastive (the contrastive section)
    num_train_epochs: int = 10  # fine-tuning tasks (evaluate.py glue): epochs per run (trainer.max_steps > 0 caps it)
    early_stopping: int = 0  # fine-tuning tasks: stop after this many evaluations without improvement; 0 = off

    def __post_init__(self):
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "num_train_epochs"):
            require(getattr(self, key) >= 1, f"trainer.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("max_steps", "save_steps", "eval_steps", "eval_max_batches", "early_stopping", "seed"):
            require(getattr(self, key) >= 0, f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        require(self.save_total_limit is None or self.save_total_limit >= 1,
                f"trainer.save_total_limit must be at least 1 (or null to keep all), got {self.save_total_limit}")
        require(self.gradient_clipping is None or self.gradient_clipping > 0,
                f"trainer.gradient_clipping must be > 0 (or null for no clipping), got {self.gradient_clipping}")
        require(self.resume_from_checkpoint != "",
                "trainer.resume_from_checkpoint is empty; use false, true, latest, auto or a path")


@dataclass
class OptimizerConfig:
    # adamw (fused): norms, biases and embeddings get no weight decay. muon: torch.optim.Muon on the encoder blocks'
    # matrices (qkv, wo, w12, w3) with the update scaled to AdamW's RMS, so `lr` and `weight_decay` serve both; AdamW
    # (betas, eps) on the rest (embeddings, decoder, norms, a classifier head). auto: the optimizer the start model
    # (trainer.init_from, glue.init_from) was trained with, adamw for a fresh one (optimizer_name)
    name: Literal["auto", "adamw", "muon"] = "auto"
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    muon_momentum: float = 0.95  # Muon's Nesterov momentum (its own default, as in nanochat and Moonlight)

    def __post_init__(self):
        require(self.lr >= 0 and self.weight_decay >= 0 and self.eps > 0,
                "optimizer.lr and optimizer.weight_decay must be >= 0 and optimizer.eps > 0")
        require(all(0 <= b < 1 for b in self.betas), f"optimizer.betas must be in [0, 1), got {list(self.betas)}")
        require(0 <= self.muon_momentum < 1, f"optimizer.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        require(self.name != "muon" or hasattr(torch.optim, "Muon"), f"optimizer.name muon needs torch.optim.Muon "
                f"(torch >= 2.9); this is torch {torch.__version__}: upgrade torch or use optimizer.name adamw")


@dataclass
class SchedulerConfig:
    # after a linear warmup: cosine or linear decay to final_lr_ratio; constant; or wsd (warmup-stable-decay): flat,
    # then a 1-sqrt decay to final_lr_ratio over the last decay_ratio of the steps
    name: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # the step where the decay reaches final_lr_ratio; null = trainer.max_steps
    final_lr_ratio: float = 0.1
    decay_ratio: float = 0.2  # wsd: the share of the steps (up to decay_steps) spent decaying

    def __post_init__(self):
        require(self.warmup_steps >= 0 and (self.decay_steps is None or self.decay_steps >= 0),
                "scheduler.warmup_steps and scheduler.decay_steps must be >= 0")
        require(0 <= self.final_lr_ratio <= 1, f"scheduler.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        require(0 <= self.decay_ratio <= 1, f"scheduler.decay_ratio must be in [0, 1], got {self.decay_ratio}")


@dataclass
class WandbConfig:
    mode: Literal["disabled", "online", "offline"] = "disabled"  # disabled: wandb is not even imported
    project: str = "neobert"
    name: Optional[str] = None

@dataclass
class Config:
    model: neobert.NeoBERTConfig = field(default_factory=neobert.NeoBERTConfig)
    tokenizer: prepare.TokenizerConfig = field(default_factory=prepare.TokenizerConfig)
    dataset: prepare.DatasetConfig = field(default_factory=prepare.DatasetConfig)
    datacollator: data.DataCollatorConfig = field(default_factory=data.DataCollatorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)  # objective contrastive


def load_config(path, overrides: Optional[list[str]] = None, schema=Config):
    """A YAML file (or None) and `--section.key value` overrides -> Config (or a schema extending it, e.g. bench's),
    strictly (config.load_config: each section checks its own values), then the rules that span sections."""
    cfg = config.load_config(schema, path, overrides)
    require(not cfg.dataset.streaming or cfg.datacollator.pack_sequences,
            "dataset.streaming supports packed rows only: set datacollator.pack_sequences: true")
    require(cfg.dataset.max_seq_length <= cfg.model.max_position_embeddings,
            f"dataset.max_seq_length={cfg.dataset.max_seq_length} exceeds "
            f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
    return cfg


# -----------------------------------------------------------------------------
# learning-rate schedule (a pure function of the step, so resuming needs nothing saved) and the optimizer step

def get_lr(step: int, lr: float, sched: SchedulerConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to lr over warmup_steps, then cosine or linear decay
    to lr * final_lr_ratio at decay_steps (default max_steps), flat after; constant stays at lr after warmup; wsd
    stays at lr until the last decay_ratio of the steps up to decay_steps, then decays as 1 - sqrt(progress)."""
    if step < sched.warmup_steps:
        return lr * (step + 1) / sched.warmup_steps
    if sched.name == "constant":
        return lr
    end = sched.decay_steps if sched.decay_steps is not None else max_steps
    start = max(sched.warmup_steps, end - round(sched.decay_ratio * end)) if sched.name == "wsd" else sched.warmup_steps
    progress = min(1.0, max(0, step - start) / max(1, end - start))
    if sched.name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - (progress if sched.name == "linear" else math.sqrt(progress))  # wsd: 1-sqrt
    return lr * (sched.final_lr_ratio + (1.0 - sched.final_lr_ratio) * decay)


def build_optimizer(module, o: OptimizerConfig, device, lr: Optional[float] = None, weight_decay=None, fused=True):
    """AdamW (fused: one kernel, and it can skip a step on the device) over the module's parameters; matmul weights
    decay, the rest don't. optimizer.name muon: the encoder blocks' matrices go to torch.optim.Muon (see MuonAdamW)."""
    wd, lr = o.weight_decay if weight_decay is None else weight_decay, o.lr if lr is None else lr
    groups = neobert.param_groups(module, wd)
    hidden = {id(p) for p in neobert.hidden_matrices(module)} if o.name == "muon" else set()
    adamw = torch.optim.AdamW([{**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in groups],
                              lr=lr, betas=o.betas, eps=o.eps, fused=fused)
    if o.name != "muon":
        return adamw
    muon = torch.optim.Muon([p for g in groups for p in g["params"] if id(p) in hidden], lr=lr, weight_decay=wd,
                            momentum=o.muon_momentum, adjust_lr_fn="match_rms_adamw")
    split = [id(p) for opt in (muon, adamw) for g in opt.param_groups for p in g["params"]]
    assert sorted(split) == sorted({id(p) for p in module.parameters() if p.requires_grad}), "each parameter once"
    return MuonAdamW(muon, adamw)


class MuonAdamW:
    """Muon on the encoder blocks' 2-D matrices and AdamW on every other parameter, stepped as one optimizer: the
    loop sets the lr of every param group, steps and zeroes once; the state dict holds both (exact resume). Muon's
    update is scaled by 0.2 * sqrt(max(rows, cols)) (torch's match_rms_adamw), so its RMS matches AdamW's and one
    lr and weight decay serve both, as in Moonlight ("Muon is Scalable for LLM Training")."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, skip=None):
        """skip: a device bool; true leaves every weight as it was (AdamW's fused kernel skips itself; torch's Muon
        has no such switch, so its matrices are put back, while its momentum moves: unused, the run stops)."""
        muon = [p for g in self.muon.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in muon] if skip is not None else []
        self.muon.step()
        for p, b in zip(muon, before):
            p.detach().copy_(torch.where(skip, b, p.detach()))
        self.adamw.found_inf = None if skip is None else skip.float()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict):
        require(set(state) == {"muon", "adamw"}, "the saved optimizer state is not a muon one")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def optimizer_name(o: OptimizerConfig, start) -> str:
    """optimizer.name with auto resolved: the optimizer the start model was trained with, as its config.yaml records
    it (a Muon-pretrained model fine-tunes better with Muon: docs/speedrun.md), else adamw (a fresh model, or an
    exported or released folder, which records none)."""
    if o.name != "auto":
        return o.name
    try:
        full = checkpoint.read_config(checkpoint.resolve(start), {})[0] if start else {}
    except UserError:  # a start that does not resolve: loading it says why, with the objective's own advice
        return "adamw"
    return {"muon": "muon"}.get((full.get("optimizer") or {}).get("name"), "adamw")


def dropout_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of a step's dropout: a function of (seed, step, rank), so a resumed run draws the same."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def optimizer_step(model, optimizer, lr: float, clipping: Optional[float], loss, skip=None):
    """Clip the global grad norm (clipping None: only measure it), set the lr, step, clear the gradients, all on the
    device (nothing is read on the host) -> (grad norm, finite: the loss and the norm are finite). A step that is not
    finite, or any step while `skip` (a device bool) holds, leaves the weights as they were; the caller reads
    `finite` at its next read (check_finite) and stops there."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clipping or float("inf"))
    finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
    skipped = ~finite if skip is None else ~finite | skip
    for group in optimizer.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, MuonAdamW):
        optimizer.step(skipped)
    else:  # AdamW: the fused kernel skips the whole update (moments and step count too) where found_inf is 1
        optimizer.found_inf = skipped.float() if optimizer.defaults.get("fused") else None
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def check_finite(loss: float, grad_norm: float, context: str) -> None:
    """A non-finite loss or grad norm (read from the device) is a UserError ending with `context`."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise UserError(f"non-finite loss ({loss}) or grad norm ({grad_norm}) {context}")


# -----------------------------------------------------------------------------
# the MLM objective (trainer.objective: mlm). An objective is what the loop needs to know of a task:
#   name                                    checked when a run resumes (an MLM run resumes only MLM checkpoints)
#   cfg                                     the config the run saves (an objective may fill in its model section)
#   prepare()                               rank 0, before the others read it: write the data the run needs
#   load() -> tokenizer                     every rank, after: open the prepared data, decide the eval batch size
#   eval_batch_size                         None: no evaluation (load() said why)
#   eval_at_start                           evaluate the starting model (step 0) too
#   train_module(model) -> module           what is trained, compiled and wrapped in DDP (model: the saved LM head)
#   loader(split, batch, accum, prefetch)   an exactly resumable data.Loader: next_step(), state_dict(), close()
#   forward_backward(module, micro_batches, amp) -> (loss sum, global count, extra sums)   the backward included
#   tokens(micro_batches) -> (positions, real tokens)   this process's share of the step (real: not padding)
#   metrics(extra sums, count) -> dict      training metrics from the extra sums, summed over processes
#   evaluate(model, amp) -> dict            held-out metrics; every process takes part and gets the same
#   flops(micro_batches) -> float           this process's training FLOPs for the step (for MFU)
# contrastive.Contrastive is the second; a third is one more class with these members (train(cfg, objective=...)).

class MLM:
    """Masked-language modelling on dataset.*."""
    name, eval_at_start = "mlm", False

    def __init__(self, cfg, rank: int, world_size: int, device, resume: Optional[Path] = None):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.data_dir, self.eval_batch_size, self.val_store = prepare.dataset_dir(cfg.dataset), None, None

    def prepare(self):
        if self.cfg.dataset.pre_tokenize or self.cfg.dataset.streaming:
            prepare.prepare(self.cfg.dataset, self.cfg.tokenizer)

    def load(self):
        t, ds = self.cfg.trainer, self.cfg.dataset
        if t.eval_steps and t.eval_max_batches and not ds.streaming:  # the val split, opened (and checked) once
            self.val_store = prepare.TokenStore(self.data_dir, "val")
        self.eval_batch_size = eval_batch_size(self.cfg, self.val_store, self.world_size, self.rank == 0)
        return prepare.load_tokenizer(self.cfg.tokenizer, self.data_dir)

    def train_module(self, model):
        return model

    def loader(self, split: str, micro_batch_size: int, grad_accum_steps: int, prefetch: int = 2):
        ds = self.cfg.dataset
        if split == "val" and ds.streaming:
            # the eval stream: tokenized in this process (no fork while the train loader's threads run) and in
            # small windows (the first eval batch must not wait for shuffle_buffer_size held-out documents)
            ds = dataclasses.replace(ds, num_workers=1, shuffle_buffer_size=min(ds.shuffle_buffer_size, 256))
        return data.build_loader(ds, self.cfg.tokenizer, self.cfg.datacollator, split,
                                 micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, rank=self.rank,
                                 world_size=self.world_size, seed=self.cfg.trainer.seed, prefetch=prefetch,
                                 store=self.val_store if split == "val" else None)

    def forward_backward(self, module, micro_batches: list[dict], amp):
        """The loss is normalised by the predicted tokens of the whole step on every process, so the gradient does
        not depend on how the global batch is split into micro-batches and processes."""
        device, world_size = self.device, self.world_size
        count = float(sum(predicted(b) for b in micro_batches))  # counted on the host
        if world_size > 1:  # the global count, on the device (no read): x world_size, as DDP averages over ranks
            count = host_to_device(count, device)
            dist.all_reduce(count)
        scale = world_size / (count.clamp(min=1.0) if world_size > 1 else max(count, 1.0))
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, device)
            if self.cfg.trainer.torch_compile and "cu_seqlens" in batch:  # one graph for any number of documents
                torch._dynamo.mark_dynamic(batch["cu_seqlens"], 0)
            sync = i == len(micro_batches) - 1 or world_size == 1
            with nullcontext() if sync else module.no_sync():  # the forward too: DDP prepares its hooks there
                with amp:
                    out = module(**batch)
                (out.loss_sum * scale).backward()
            loss_sum += out.loss_sum.detach()
        return loss_sum, count, torch.zeros(0, device=device)

    def tokens(self, micro_batches: list[dict]) -> tuple[int, int]:
        positions = sum(b["input_ids"].numel() for b in micro_batches)
        return positions, sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                              for b in micro_batches)

    def metrics(self, sums: list, count: float) -> dict:
        return {}

    @torch.no_grad()
    def evaluate(self, model, amp) -> dict:
        val = self.loader("val", self.eval_batch_size, 1, prefetch=0)
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, predicted
        try:
            for _ in range(self.cfg.trainer.eval_max_batches):
                for batch in val.next_step():
                    batch = to_device(batch, self.device)
                    labels = batch.pop("labels").reshape(-1)
                    del batch["predictions_per_row"]
                    keep = labels != -100
                    with amp:
                        hidden = model.model(**batch)  # (B, S, H)
                        logits = model.decoder(hidden.reshape(-1, hidden.size(-1))[keep]).float()
                    totals[0] += F.cross_entropy(logits, labels[keep], reduction="sum")
                    totals[1] += (logits.argmax(-1) == labels[keep]).sum()
                    totals[2] += keep.sum()
            if dist.is_initialized():
                dist.all_reduce(totals)
        finally:
            val.close()  # a streaming loader holds worker processes
        model.train()
        n = max(totals[2].item(), 1.0)
        return dict(loss=totals[0].item() / n, accuracy=totals[1].item() / n)

    def flops(self, micro_batches: list[dict]) -> float:
        return step_flops(self.cfg.model, micro_batches)


def eval_batch_size(cfg: Config, val_store, world_size: int, master: bool = True) -> Optional[int]:
    """The per-process eval batch size, decided before training: None when evaluation is off or there is no
    held-out data (a warning says so), else per_device_eval_batch_size, lowered to what the val split holds."""
    t, ds = cfg.trainer, cfg.dataset
    say = warn if master else (lambda msg: None)
    if t.eval_steps == 0 or t.eval_max_batches == 0:
        return None
    if ds.streaming:
        if ds.validation_split <= 0 and ds.eval_samples <= 0:
            say("dataset.validation_split and dataset.eval_samples are 0: no held-out documents, evaluation is off")
            return None
        return t.per_device_eval_batch_size
    rows, where = data.split_rows(None, "val", ds.max_seq_length, cfg.datacollator.pack_sequences, val_store), \
        val_store.dir
    if rows < world_size:
        say(f"the val split of {where} gives {rows} rows of {ds.max_seq_length} tokens, fewer than one per "
            f"process: evaluation is off (raise dataset.validation_split or dataset.eval_samples)")
        return None
    if rows < t.per_device_eval_batch_size * world_size:
        say(f"the val split of {where} gives {rows} rows of {ds.max_seq_length} tokens: evaluating with "
            f"{rows // world_size} rows per process instead of trainer.per_device_eval_batch_size="
            f"{t.per_device_eval_batch_size}")
        return rows // world_size
    return t.per_device_eval_batch_size


def predicted(batch: dict) -> int:
    """The positions to predict in a batch from the loader: its labels are still on the host (numpy: no tensor op)."""
    return int((batch["labels"].numpy() != -100).sum())


def step_flops(model_cfg, micro_batches: list[dict], sparse: bool = True) -> float:
    """Training FLOPs of these micro-batches. Attention counts the keys each query really attends to (its document's
    length in packed rows, the padded width otherwise); the decoder runs on the predicted tokens (sparse) or all."""
    total = 0.0
    for b in micro_batches:
        n = b["input_ids"].numel()
        if "cu_seqlens" in b:
            seg = np.diff(b["cu_seqlens"].numpy()).astype(np.float64)
            keys = float((seg * seg).sum() / seg.sum())
        else:
            keys = b["input_ids"].shape[-1]
        share = predicted(b) / n if sparse else 1.0
        total += n * neobert.flops_per_token(model_cfg, keys, share)
    return total


# -----------------------------------------------------------------------------
# logging and signals

class StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C) -> save at the next step boundary and exit; a second signal kills."""

    def __init__(self):  # installs the handlers until restore()
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True
        self.restore()

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl records up to `step` (what a killed run logged after its last checkpoint goes). A line
    that does not decode (a kill mid-write, a full disk) is dropped with a warning instead of blocking the resume."""
    if not path.exists():
        return
    kept, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            bad += bool(line.strip())
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            bad += 1
        elif record["step"] <= step:
            kept.append(line)
    if bad:
        warn(f"{path}: dropped {bad} damaged line{'s' * (bad > 1)} (a write cut short by a kill or a full disk)")
    runtime.write_atomic(path, "".join(line + "\n" for line in kept))


def metrics_line(record: dict) -> str:
    """`step 200: eval_loss 5.332, eval_accuracy 0.1658`: a record's held-out metrics, as the console shows them."""
    evals = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("eval_"))
    return f"step {record['step']}: {evals}"


class Logger:
    """metrics.jsonl, wandb, the progress bar and one console line per evaluation, on rank 0; elsewhere nothing."""

    def __init__(self, cfg, run_dir: Path, master: bool, step: int):
        t = cfg.trainer
        self.file = self.wandb = self.last_eval = None
        self.master = master
        if master and cfg.wandb.mode != "disabled":  # a wandb run under RUN/wandb; wandb is imported only here
            try:
                import wandb
            except ImportError:
                raise UserError(f"wandb.mode={cfg.wandb.mode} needs the wandb package: pip install wandb") from None
            if cfg.wandb.mode == "offline":
                # no network: wandb-core's error reporting would look its server up (`wandb sync RUN/wandb` uploads)
                os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                                    dir=str(run_dir), config=config_to_dict(cfg))
        if master:  # opened last: nothing above can leave it open
            truncate_metrics(run_dir / "metrics.jsonl", step)
            self.file = open(run_dir / "metrics.jsonl", "a")
        from tqdm import tqdm
        self.bar = tqdm(total=t.max_steps, initial=step, disable=not master or t.disable_tqdm, dynamic_ncols=True)

    def log(self, record: dict):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        if self.master and any(k.startswith("eval_") for k in record):
            self.last_eval = metrics_line(record)
            self.bar.write(self.last_eval)  # above the bar (a plain print when it is off)
        if "loss" in record:
            mfu = record["mfu"]
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}",
                                 mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%", refresh=False)

    def close(self):
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


# -----------------------------------------------------------------------------
# setup: the run directory, the data, the model with its optimizer (and what it resumes from)

def check_resume(ckpt: Path, objective: str, optimizer: str) -> dict:
    """A run resumes only checkpoints of its own objective (a contrastive run, contrastive ones) and optimizer (the
    saved state is that optimizer's); -> the checkpoint's train_state."""
    saved = checkpoint.read_train_state(ckpt)
    config_was = saved.get("config", {})
    was = saved.get("objective") or (config_was.get("trainer") or {}).get("objective", "mlm")
    require(was == objective, f"{ckpt} was written by a trainer.objective={was} run; this run is {objective}. Resume "
            f"it with trainer.objective: {was}, or start a new trainer.output_dir (trainer.init_from: "
            f"{ckpt.parent.parent} takes its weights)")
    was = (config_was.get("optimizer") or {}).get("name", "adamw")
    require(was == optimizer, f"{ckpt} holds the state of optimizer.name {was}; resume it with --optimizer.name "
            f"{was}, or start a new trainer.output_dir (trainer.init_from takes its weights)")
    return saved


def load_data(objective, cfg, master: bool, ddp: bool):
    """Rank 0 prepares the objective's data when missing; the others wait, then every rank opens it. -> tokenizer"""
    if master:
        objective.prepare()
    if ddp:
        dist.barrier()
    tokenizer = objective.load()
    prepare.check_vocab(tokenizer, cfg.model.vocab_size)
    pad_id = prepare.special_token_ids(tokenizer)["pad"]
    require(pad_id == cfg.model.pad_token_id, f"model.pad_token_id={cfg.model.pad_token_id} but the tokenizer's "
            f"[PAD] is {pad_id}; set model.pad_token_id: {pad_id}")
    return tokenizer


def build_model(cfg, objective, ckpt: Optional[Path], rank: int, world_size: int, device, print0):
    """(model, train module, optimizer, loader, state): the same init on every rank, then the weights of the
    checkpoint it resumes (with the optimizer and the loader's position) or of trainer.init_from."""
    t = cfg.trainer
    torch.manual_seed(t.seed)
    model = neobert.NeoBERTLMHead(cfg.model)
    model.model.gradient_checkpointing = t.gradient_checkpointing
    if ckpt is not None:  # strictly: a different shape is an error naming the tensor
        checkpoint.resume_weights(ckpt, model)
    elif t.init_from:  # the weights of any model source, strictly
        loaded, info = checkpoint.load(t.init_from, head="mlm")
        checkpoint.load_state_dict_strict(model, loaded.state_dict(), f"trainer.init_from={t.init_from} ({info.path})")
    model.to(device)  # before the optimizer: its state is made (or loaded) on the parameters' device
    module = objective.train_module(model)  # contrastive: the encoder alone; the MLM decoder stays as loaded
    optimizer = build_optimizer(module, cfg.optimizer, device)
    loader = objective.loader("train", t.per_device_train_batch_size, t.gradient_accumulation_steps)
    state = dict(step=0, tokens=0, elapsed=0.0)
    if ckpt is not None:  # the optimizer state and every rank's loader position
        saved = checkpoint.resume_state(ckpt, optimizer)
        # a loader state is a position in the global stream, so any rank's works for any world size
        states = saved["loader_states"]
        loader.load_state_dict(states[rank] if len(states) == world_size else states[0])
        state = {k: saved[k] for k in state}
    print0(f"model: {neobert.num_params(model) / 1e6:.2f}M parameters")
    # compile after loading weights and before DDP; `model` stays the raw module for saving and evaluation
    module = torch.compile(module) if t.torch_compile else module
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    return model, module, optimizer, loader, state


# -----------------------------------------------------------------------------
# the loop

def train(cfg: Config, objective=None) -> dict:
    """Runs the training described by cfg; returns the last metrics record. objective: the objective's class (default
    trainer.objective's: MLM or contrastive.Contrastive), called as objective(cfg, rank, world_size, device, resume)."""
    if objective is None:
        objective = contrastive.Contrastive if cfg.trainer.objective == "contrastive" else MLM
    rank, world_size, device = runtime.setup_distributed()
    try:
        return run(cfg, objective, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def run(cfg: Config, make_objective, rank: int, world_size: int, device) -> dict:
    """Setup (run directory, what it resumes, data, model, logger), then the loop; -> the last metrics record."""
    t, master, ddp = cfg.trainer, rank == 0, world_size > 1
    print0 = print if master else (lambda *a, **k: None)
    run_dir, auto = Path(t.output_dir), cfg.optimizer.name == "auto"
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, name=optimizer_name(cfg.optimizer,
                                                                                                    t.init_from)))
    if master:
        checkpoint.prepare_run_dir(run_dir)
    ckpt = checkpoint.find_resume(t.resume_from_checkpoint, run_dir)  # before any work: no waiting for the data
    done = check_resume(ckpt, make_objective.name, cfg.optimizer.name)["step"] if ckpt is not None else 0
    if ckpt is not None and done >= t.max_steps:
        print0(f"the run in {run_dir} is already at step {done} >= trainer.max_steps {t.max_steps}: nothing to "
               "train; pass another trainer.output_dir to start over, or a larger trainer.max_steps to continue")
        return {}
    objective = make_objective(cfg, rank, world_size, device, ckpt)
    print0(f"run: {run_dir} ({objective.name}, {world_size} process{'es' if ddp else ''}, {device}); data: "
           f"{getattr(objective, 'data_dir', '-')}; "
           f"{'resuming from ' + str(ckpt) if ckpt else 'from ' + str(t.init_from) if t.init_from else 'fresh'}")
    cfg = objective.cfg  # e.g. contrastive: the model section of the checkpoint it starts from
    tokenizer = load_data(objective, cfg, master, ddp)
    model, module, optimizer, loader, state = build_model(cfg, objective, ckpt, rank, world_size, device, print0)
    precision = runtime.resolve_precision(t.mixed_precision, device, warn=warn if master else None)
    print0(f"precision: {'bf16 autocast' if precision == 'bf16' else 'fp32'} "
           f"(trainer.mixed_precision={t.mixed_precision}); optimizer: {cfg.optimizer.name}"
           + (f" (optimizer.name auto: {'the start model' if t.init_from else 'a fresh model'}'s)" if auto else ""))
    logger = Logger(cfg, run_dir, master, state["step"])

    def save(step):
        loader_states = [loader.state_dict()]
        if ddp:  # every rank's position
            loader_states = [None] * world_size
            dist.all_gather_object(loader_states, loader.state_dict())
        if master:
            train_state = dict(step=step, tokens=state["tokens"], elapsed=state["elapsed"], world_size=world_size,
                               objective=objective.name, loader_states=loader_states, config=config_to_dict(cfg))
            checkpoint.save(run_dir, step, model, optimizer, cfg, tokenizer, train_state, t.save_total_limit,
                            after_model=lambda d: kill_point("mid_save", step))
        if ddp:
            dist.barrier()
        kill_point("after_save", step)

    stop = StopRequest()
    try:
        record = loop(cfg, objective, model, module, optimizer, loader, logger, state, save, stop,
                      autocast(device, precision), resumed=ckpt is not None)
    finally:
        stop.restore()
        logger.close()
        loader.close()
    print0(f"done: step {state['step']}, {state['tokens']} tokens, checkpoints in {run_dir}"
           + (f"; last evaluation: {logger.last_eval}" if logger.last_eval else ""))
    return record


def loop(cfg, objective, model, module, optimizer, loader, logger, state, save, stop, amp, resumed) -> dict:
    """From state["step"] to trainer.max_steps: the lr, this rank's micro-batches, forward and backward, one optimizer
    step. A step reads nothing from the device unless it logs, evaluates or saves (or stops): the loss, the grad norm
    and the finite check stay there until then, and a non-finite step never reaches the weights. A signal saves at
    the next read (every step in one process; under torchrun the next logging step, where the ranks agree) and stops."""
    t, world_size, device = cfg.trainer, objective.world_size, objective.device
    peak = neobert.peak_flops(device)  # None on CPU or an unknown GPU: no MFU rather than a wrong one
    step, record, last_saved = state["step"], {}, state["step"] if resumed else None
    t_start = time.perf_counter() - state["elapsed"]  # elapsed carries over a resume
    t_log, tokens_log, flops_log = time.perf_counter(), state["tokens"], 0.0  # since the last metrics line
    # the step, counted on the device; the first non-finite step's loss, grad norm and step (-1: none yet)
    trouble = torch.tensor([float(step), 0.0, 0.0, -1.0], device=device)
    if objective.eval_at_start and objective.eval_batch_size is not None and not resumed and step == 0:
        logger.log(dict(step=0, **{f"eval_{k}": v for k, v in objective.evaluate(model, amp).items()}))
    while step < t.max_steps:
        lr = get_lr(step, cfg.optimizer.lr, cfg.scheduler, t.max_steps)
        torch.manual_seed(dropout_seed(t.seed, step, objective.rank))
        micro_batches = loader.next_step()
        loss_sum, count, sums = objective.forward_backward(module, micro_batches, amp)
        stats = torch.cat([loss_sum.float().view(1), sums.float()])
        if world_size > 1:  # the global loss (so every rank takes the same finite decision) and the stop requests
            stats = torch.cat([stats, host_to_device(stop.requested, device).view(1)])
            dist.all_reduce(stats)  # after DDP's all-reduce, the grad norm is already the same on every rank
        loss = stats[0] / (count.clamp(min=1.0) if torch.is_tensor(count) else max(count, 1.0))
        grad_norm, finite = optimizer_step(model, optimizer, lr, t.gradient_clipping, loss, skip=trouble[3] >= 0)
        trouble[0] += 1
        trouble[1:] = torch.where(~finite & (trouble[3] < 0), torch.stack([loss, grad_norm, trouble[0]]), trouble[1:])
        step += 1
        state.update(step=step, tokens=state["tokens"] + objective.tokens(micro_batches)[0] * world_size,
                     elapsed=time.perf_counter() - t_start)
        flops_log += world_size * objective.flops(micro_batches) if peak else 0.0
        logger.bar.update(1)
        save_due = step == t.max_steps or (t.save_steps > 0 and step % t.save_steps == 0)
        eval_due = objective.eval_batch_size is not None and (step % t.eval_steps == 0 or step == t.max_steps)
        if not (save_due or eval_due or step % t.logging_steps == 0 or (stop.requested and world_size == 1)):
            continue  # past here a metrics line is due (a log, an evaluation, a save or a stop)
        bad_loss, bad_norm, bad_step = trouble[1:].tolist()  # a read: everything before it has run
        if bad_step >= 0:
            where = f"{t.output_dir}/checkpoints/{last_saved}" if last_saved is not None else "none was written"
            check_finite(bad_loss, bad_norm, f"at step {int(bad_step)}; stopped without saving (last good checkpoint: "
                         f"{where}). Lower optimizer.lr, raise scheduler.warmup_steps or set trainer.gradient_clipping")
        stopping = stop.requested if world_size == 1 else stats[-1].item() > 0
        seconds = max(time.perf_counter() - t_log, 1e-9)
        record = dict(step=step, loss=loss.item(), lr=lr, grad_norm=grad_norm.item(), tokens=state["tokens"],
                      tokens_per_s=(state["tokens"] - tokens_log) / seconds,
                      mfu=flops_log / seconds / (peak * world_size) if peak else None, elapsed=state["elapsed"],
                      **objective.metrics(stats[1:1 + sums.numel()].tolist(), float(count)))
        if eval_due or (stopping and objective.eval_batch_size is not None):
            record.update({f"eval_{k}": v for k, v in objective.evaluate(model, amp).items()})
        logger.log(record)
        t_log, tokens_log, flops_log = time.perf_counter(), state["tokens"], 0.0
        if save_due or stopping:
            save(step)
            last_saved = step
        if stopping:
            if objective.rank == 0:
                logger.bar.write(f"stopped by signal at step {step}; checkpoint saved. Resume with "
                                 "--trainer.resume_from_checkpoint auto")
            break
    if last_saved != step:  # a fresh run with max_steps == 0
        save(step)
    return record


def kill_point(where: str, step: int) -> None:
    # test hook: NEOBERT_TEST_KILL=<where>:<step> SIGKILLs this process there (where: mid_save | after_save)
    if os.environ.get("NEOBERT_TEST_KILL") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def resolved(cfg, dotted: str) -> str:
    """The value cfg holds at a dotted key (an override's, e.g. trainer.max_steps), as YAML would write it inline."""
    value = config_to_dict(cfg)
    for part in dotted.split("."):
        value = value[part]
    return value if isinstance(value, str) else json.dumps(value)


def main(argv=None) -> int:
    def work(args):
        flags = {a for a in args if a in ("--prepare-only", "--bench", "--print-config")}  # --bench: the loader's
        args = [a for a in args if a not in flags]
        require(args, "no config file: python train.py CONFIG [--prepare-only] [--print-config] [--section.key v ...]")
        cfg = load_config(args[0], args[1:])
        if int(os.environ.get("RANK", 0)) == 0:  # the whole config behind --print-config (checkpoints keep it)
            overrides = "".join(f" {k}={resolved(cfg, k)}" for k, _ in config.parse_overrides(args[1:]))
            print(f"config: {args[0]}{overrides}")
            if "--print-config" in flags:
                print(f"# resolved config\n{config_to_yaml(cfg)}", end="")
        flags.discard("--print-config")
        if flags and cfg.trainer.objective == "contrastive":
            return contrastive.prepare_pairs_only(cfg)
        return data.prepare_only(cfg, bench="--bench" in flags) if flags else train(cfg)

    return runtime.run_main(argv, __doc__, work)


if __name__ == "__main__":
    sys.exit(main())
