"""train.py: config, schedule, checkpoints, exact resume, DDP (gloo) and accumulation equivalence, bad input.

Every run uses a tiny model (hidden 32, 2 layers, seq 64) on the smoke config's offline corpus, prepared once per
session. Runs go through train.main (in this process) or `python train.py` / torchrun (subprocesses).
"""

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import prepare  # noqa: E402
import runtime  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import neobert  # noqa: E402
import train  # noqa: E402

SMOKE = ROOT / "configs" / "smoke.yaml"
TINY = {
    "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
    "model.intermediate_size": 64, "model.max_position_embeddings": 64, "dataset.max_seq_length": 64,
    "trainer.per_device_train_batch_size": 4, "trainer.gradient_accumulation_steps": 1, "trainer.logging_steps": 1,
    "trainer.eval_steps": 0, "trainer.save_steps": 0, "trainer.mixed_precision": "no", "trainer.torch_compile": False,
    "trainer.disable_tqdm": True, "trainer.resume_from_checkpoint": False, "optimizer.lr": 3e-3,
    "scheduler.warmup_steps": 2, "wandb.mode": "disabled",
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The smoke corpus, tokenized once for the whole session."""
    path = tmp_path_factory.mktemp("data") / "smoke"
    cfg = train.load_config(SMOKE, [f"dataset.path={path}"])
    prepare.prepare(cfg.dataset, cfg.tokenizer)
    return path


def args(data_dir, out, **overrides) -> list[str]:
    merged = {**TINY, "dataset.path": data_dir, "trainer.output_dir": out, **overrides}
    return [str(SMOKE)] + [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items()]


def run(data_dir, out, **overrides) -> list[dict]:
    """train.main in this process; returns metrics.jsonl."""
    assert train.main(args(data_dir, out, **overrides)) == 0
    return metrics(out)


def run_cli(data_dir, out, nproc=1, env=None, **overrides) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["train.py"] + args(data_dir, out, **overrides)
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> list[float]:
    return [m["loss"] for m in metrics(out)]


def weights(out, step) -> dict:
    return load_file(str(Path(out) / "model_checkpoints" / str(step) / "model.safetensors"))


def expect_error(capsys, argv, *fragments):
    """main() exits 2 with `error: ...` naming every fragment, and no traceback."""
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# -----------------------------------------------------------------------------
# config


def test_config_overrides_types_and_round_trip(tmp_path):
    cfg = train.load_config(SMOKE, ["--trainer.max_steps", "50", "optimizer.lr=2e-4", "--trainer.torch_compile=yes",
                                    "--trainer.gradient_clipping", "null", "--optimizer.betas", "0.9,0.98",
                                    "--scheduler.decay_steps", "1e3", "--trainer.resume_from_checkpoint", "auto"])
    assert cfg.trainer.max_steps == 50 and cfg.optimizer.lr == 2e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.trainer.torch_compile is True and cfg.trainer.gradient_clipping is None
    assert cfg.optimizer.betas == (0.9, 0.98) and cfg.scheduler.decay_steps == 1000
    assert cfg.trainer.resume_from_checkpoint == "auto"
    assert train.load_config(SMOKE, ["trainer.resume_from_checkpoint=true"]).trainer.resume_from_checkpoint is True
    assert train.load_config(SMOKE, ["--optimizer.betas", "[0.8, 0.9]"]).optimizer.betas == (0.8, 0.9)
    # the resolved config saved with checkpoints reads back to the same config
    (tmp_path / "c.yaml").write_text(config.config_to_yaml(cfg))
    assert train.load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("argv, fragments", [
    (["--trainer.max_stepz", "5"], ["trainer.max_stepz", "max_steps", "per_device_train_batch_size"]),
    (["--trainr.max_steps", "5"], ["trainr.max_steps", "trainer", "optimizer"]),
    (["--trainer.max_steps", "five"], ["trainer.max_steps", "five", "int"]),
    (["optimizer.lr=fast"], ["optimizer.lr", "fast", "float"]),
    (["--trainer.torch_compile", "maybe"], ["trainer.torch_compile", "maybe", "bool"]),
    (["--trainer.mixed_precision", "fp16"], ["trainer.mixed_precision", "fp16", "bf16"]),
    (["--scheduler.name", "step"], ["scheduler.name", "cosine", "linear", "constant"]),
    (["--model.num_attention_heads", "3"], ["model.hidden_size", "num_attention_heads"]),
    (["--optimizer.betas", "0.9"], ["optimizer.betas", "list of 2"]),
    (["--trainer.max_steps"], ["--trainer.max_steps needs a value"]),
    (["stray"], ["stray"]),
    (["--optimizer.lr", "nan"], ["optimizer.lr must be a finite number", "nan"]),
    (["--scheduler.final_lr_ratio", "inf"], ["scheduler.final_lr_ratio must be a finite number"]),
    (["--model.dropout", "-inf"], ["model.dropout must be a finite number"]),
    (["--optimizer.lr", "-1"], ["optimizer.lr and optimizer.weight_decay must be >= 0"]),
    (["--optimizer.betas", "0.9,1.5"], ["optimizer.betas must be in [0, 1)"]),
    (["--trainer.gradient_clipping", "0"], ["trainer.gradient_clipping must be > 0", "null"]),
    (["--trainer.max_steps", "2.5"], ["trainer.max_steps", "2.5", "int"]),
    (["--trainer.per_device_train_batch_size", "0"], ["trainer.per_device_train_batch_size must be at least 1"]),
    (["--wandb.mode", "on"], ["wandb.mode", "disabled", "online", "offline"]),
    (["--tokenizer.vocab_size", "0"], ["tokenizer.vocab_size"]),
])
def test_config_errors_exit_2_without_traceback(capsys, argv, fragments):
    expect_error(capsys, [str(SMOKE)] + argv, *fragments)


@pytest.mark.parametrize("override, fragment", [
    ("datacollator.mlm_probability=1.5", "datacollator.mlm_probability must be in (0, 1)"),
    ("datacollator.pad_to_multiple_of=0", "datacollator.pad_to_multiple_of must be >= 1"),
    ("dataset.max_seq_length=4", "dataset.max_seq_length must be >= 8"),
    ("dataset.validation_split=1.5", "dataset.validation_split must be in [0, 1)"),
    ("dataset.eval_samples=-1", "dataset.eval_samples must be >= 0"),
    ("dataset.max_documents=-5", "dataset.max_documents must be >= 0"),
    ("dataset.num_workers=-1", "dataset.num_workers must be >= 0"),
    ("dataset.shuffle_buffer_size=0", "dataset.shuffle_buffer_size must be >= 1"),
])
def test_data_values_fail_before_any_work(capsys, tmp_path, override, fragment):
    """Bad dataset/datacollator values stop at config time, before the output dir, the corpus or the model are
    touched (they used to pass the config, then fail after preparing the data, or not at all)."""
    out, prep = tmp_path / "run", tmp_path / "prep"
    expect_error(capsys, [str(SMOKE), override, f"trainer.output_dir={out}", f"dataset.path={prep}"], fragment)
    assert not out.exists() and not prep.exists()


def test_sections_check_themselves_and_nested_sections(tmp_path):
    """A section checks its values however it is built (YAML, overrides or Python), NaN included; a list of mappings
    becomes a list of small dataclasses with strict keys, named by position in errors."""
    for build in (lambda: prepare.DatasetConfig(max_seq_length=4), lambda: data.DataCollatorConfig(mlm_probability=0.0),
                  lambda: train.OptimizerConfig(lr=float("nan")), lambda: train.SchedulerConfig(final_lr_ratio=2.0),
                  lambda: train.TrainerConfig(save_total_limit=0)):
        with pytest.raises(config.UserError):
            build()
    (tmp_path / "no.yaml").write_text("trainer:\n  mixed_precision: no\n")  # YAML 1.1: an unquoted no is false
    assert train.load_config(tmp_path / "no.yaml").trainer.mixed_precision == "no"
    (tmp_path / "nan.yaml").write_text("optimizer:\n  lr: .nan\n")
    with pytest.raises(config.UserError, match="optimizer.lr must be a finite number"):
        train.load_config(tmp_path / "nan.yaml")

    @dataclasses.dataclass
    class Source:
        name: str = ""
        weight: float = 1.0

        def __post_init__(self):
            config.require(self.weight > 0, f"weight must be > 0, got {self.weight}")

    @dataclasses.dataclass
    class Task:
        sources: list[Source] = dataclasses.field(default_factory=list)
        mode: typing.Literal["a", "b"] = "a"

    @dataclasses.dataclass
    class WithTask(train.Config):  # an entry point's own sections: the training config's plus one
        task: Task = dataclasses.field(default_factory=Task)

    (tmp_path / "t.yaml").write_text("task:\n  sources:\n    - {name: x}\n    - {name: y, weight: 2}\n")
    cfg = train.load_config(tmp_path / "t.yaml", ["task.mode=b"], schema=WithTask)
    assert cfg.task == Task(sources=[Source("x", 1.0), Source("y", 2.0)], mode="b")
    assert config.config_to_dict(cfg)["task"]["sources"][1] == {"name": "y", "weight": 2.0}
    for text, fragment in [("- {name: x, wieght: 2}", "unknown config key task.sources[0].wieght"),
                           ("- {name: x}\n    - {weight: fast}", "task.sources[1].weight: expected float"),
                           ("- {weight: -1}", "task.sources[0]: weight must be > 0")]:
        (tmp_path / "t.yaml").write_text(f"task:\n  sources:\n    {text}\n")
        with pytest.raises(config.UserError, match=re.escape(fragment)):
            train.load_config(tmp_path / "t.yaml", schema=WithTask)


def test_config_file_errors(capsys, tmp_path):
    expect_error(capsys, [str(tmp_path / "missing.yaml")], "missing.yaml", "not found")
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_steps: 5\nfoo:\n  bar: 1\n")
    expect_error(capsys, [str(tmp_path / "bad.yaml")], "foo", "trainer")
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_stepz: 5\n")
    expect_error(capsys, [str(tmp_path / "typo.yaml")], "trainer.max_stepz", "max_steps")
    (tmp_path / "broken.yaml").write_text("trainer: [\n")
    expect_error(capsys, [str(tmp_path / "broken.yaml")], "broken.yaml")


# -----------------------------------------------------------------------------
# schedule


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedule_values(name):
    sched = train.SchedulerConfig(name=name, warmup_steps=10, final_lr_ratio=0.1)
    lr, max_steps = 1e-3, 110
    for step in range(0, 130):
        got = train.get_lr(step, lr, sched, max_steps)
        if step < 10:
            want = lr * (step + 1) / 10
        elif name == "constant":
            want = lr
        else:
            p = min(1.0, (step - 10) / 100)
            shape = 0.5 * (1 + math.cos(math.pi * p)) if name == "cosine" else 1 - p
            want = lr * (0.1 + 0.9 * shape)
        assert got == pytest.approx(want, rel=1e-12), step
    assert train.get_lr(9, lr, sched, max_steps) == pytest.approx(lr)
    if name != "constant":
        assert train.get_lr(110, lr, sched, max_steps) == pytest.approx(1e-4)  # reaches final_lr_ratio
        assert train.get_lr(500, lr, sched, max_steps) == pytest.approx(1e-4)  # and stays there
    # decay_steps ends the decay early
    early = train.SchedulerConfig(name=name, warmup_steps=0, decay_steps=50, final_lr_ratio=0.0)
    assert train.get_lr(60, lr, early, 1000) == (lr if name == "constant" else 0.0)


def test_wsd_schedule_values():
    """warmup-stable-decay, from the definition: linear warmup, flat, then 1 - sqrt(progress) to final_lr_ratio over
    the last decay_ratio of the steps (to decay_steps when set)."""
    lr = 1e-3
    sched = train.SchedulerConfig(name="wsd", warmup_steps=10, final_lr_ratio=0.1, decay_ratio=0.2)
    got = [train.get_lr(step, lr, sched, 110) for step in range(111)]
    assert got[0] == lr / 10 and got[9] == lr  # warmup ends at lr exactly
    assert all(v == lr for v in got[10:89])  # the plateau: steps 10..88 (decay over the last 22 of 110 steps)
    assert got[99] == pytest.approx(lr * (0.1 + 0.9 * (1 - math.sqrt(11 / 22))), rel=1e-12)
    assert got[109] == pytest.approx(lr * (0.1 + 0.9 * (1 - math.sqrt(21 / 22))), rel=1e-12)
    assert got[110] == pytest.approx(lr * 0.1, rel=1e-12)  # the end: final_lr_ratio
    assert all(a >= b for a, b in zip(got[88:], got[89:]))
    early = train.SchedulerConfig(name="wsd", warmup_steps=0, decay_steps=50, decay_ratio=0.5, final_lr_ratio=0.0)
    assert train.get_lr(24, lr, early, 1000) == lr and train.get_lr(50, lr, early, 1000) == 0.0
    assert train.get_lr(31, lr, early, 1000) == pytest.approx(lr * (1 - math.sqrt(6 / 25)), rel=1e-12)
    # extending a run: a step before the old decay start has the same lr under the longer max_steps
    assert [train.get_lr(s, lr, sched, 110) for s in range(89)] == [train.get_lr(s, lr, sched, 220) for s in range(89)]


def ns_float64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's orthogonalization (Jordan et al.'s quintic Newton-Schulz, coefficients 3.4445, -4.775, 2.0315) in
    float64, written from the published iteration."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = (x.T if tall else x) / x.norm()
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x + (-4.775 * a + 2.0315 * a @ a) @ x
    return x.T if tall else x


@needs_muon
def test_muon_split_and_first_step_against_float64():
    """optimizer.name muon: every parameter in exactly one group, the encoder blocks' matrices (and only they) in
    Muon, for the MLM, classifier and contrastive modules; one step moves a hidden matrix by Muon's rule with
    the AdamW-matching RMS scale 0.2 * sqrt(max(rows, cols)) and the rest by AdamW's."""
    import contrastive
    cfg = neobert.NeoBERTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32)
    hidden = re.compile(r"(^|\.)transformer_encoder\.\d+\.(qkv|wo|ffn\.w12|ffn\.w3)\.weight$")
    for module in (neobert.NeoBERTLMHead(cfg), neobert.NeoBERTForSequenceClassification(cfg, num_labels=3),
                   contrastive.Embedder(neobert.NeoBERT(cfg), "mean")):
        opt = train.build_optimizer(module, train.OptimizerConfig(name="muon"), "cpu")
        names = {id(p): n for n, p in module.named_parameters()}
        muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
        adamw = [names[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
        assert sorted(muon + adamw) == sorted(names.values())  # each exactly once
        assert sorted(muon) == sorted(n for n in names.values() if hidden.search(n)) and len(muon) == 8
    model = neobert.NeoBERTLMHead(cfg)
    o = train.OptimizerConfig(name="muon", weight_decay=0.1)
    opt = train.build_optimizer(model, o, "cpu")
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone().double() for n, p in model.named_parameters()}
    lr = 0.01
    train.optimizer_step(model, opt, lr, None, torch.tensor(1.0))
    after = dict(model.named_parameters())
    for n in ("model.transformer_encoder.0.qkv.weight", "model.transformer_encoder.1.ffn.w3.weight"):
        w0, g = before[n], grads[n]
        want = w0 * (1 - lr * 0.1) - lr * 0.2 * math.sqrt(max(g.shape)) * ns_float64(g)
        step = (want - w0).abs().max()
        assert (after[n].double() - want).abs().max() < 0.03 * step, n  # Muon's Newton-Schulz runs in bf16
    for n, wd in (("decoder.weight", 0.1), ("model.layer_norm.weight", 0.0), ("model.encoder.weight", 0.0)):
        g = grads[n]  # AdamW's first step: m/sqrt(v) = g/(|g| + eps) after bias correction
        want = before[n] * (1 - lr * wd) - lr * g / (g.abs() + o.eps)
        torch.testing.assert_close(after[n].double(), want, rtol=0, atol=1e-6)


def test_muon_needs_a_torch_that_has_it(capsys, tmp_path, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    expect_error(capsys, args(tmp_path, tmp_path / "run", **{"optimizer.name": "muon"}),
                 "optimizer.name muon needs torch.optim.Muon (torch >= 2.9)", "optimizer.name adamw")


# -----------------------------------------------------------------------------
# training, checkpoints, resume


def test_smoke_loss_falls_and_checkpoint_layout(data_dir, tmp_path):
    out = tmp_path / "run"
    log = run(data_dir, out, **{"trainer.max_steps": 30, "trainer.save_steps": 10, "trainer.save_total_limit": 2,
                                "trainer.eval_steps": 15, "trainer.eval_max_batches": 2})
    assert [m["step"] for m in log] == list(range(1, 31))
    first, last = sum(m["loss"] for m in log[:3]) / 3, sum(m["loss"] for m in log[-3:]) / 3
    assert last < first - 0.5, (first, last)
    for m in log:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed"} <= m.keys()
        assert m["mfu"] is None  # CPU: no peak known, so no (wrong) MFU
    evals = [m for m in log if "eval_loss" in m]
    assert [m["step"] for m in evals] == [15, 30] and all(0 <= m["eval_accuracy"] <= 1 for m in evals)
    # retention keeps the newest two; latest names the last; keys are plain; config and tokenizer ride along
    assert checkpoint.list_checkpoints(out) == [20, 30]
    assert (out / "model_checkpoints" / "latest").read_text().strip() == "30"
    ck = out / "model_checkpoints" / "30"
    assert sorted(p.name for p in ck.iterdir()) == ["config.yaml", "model.safetensors", "tokenizer.json"]
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in weights(out, 30))
    assert "decoder.weight" in weights(out, 30)
    assert train.load_config(ck / "config.yaml").model.hidden_size == 32
    state = json.loads((out / "checkpoints" / "30" / "train_state.json").read_text())
    assert state["step"] == 30 and state["tokens"] == log[-1]["tokens"] and len(state["loader_states"]) == 1
    assert "wandb" not in sys.modules  # wandb.mode disabled: never imported


def test_exact_resume_after_kill_9(data_dir, tmp_path):
    """A run killed with SIGKILL right after its step-4 checkpoint, then resumed, logs bitwise the same losses."""
    kw = {"trainer.max_steps": 8, "trainer.save_steps": 4, "trainer.resume_from_checkpoint": "auto"}
    full = run_cli(data_dir, tmp_path / "full", **kw)
    assert full.returncode == 0, full.stderr
    killed = run_cli(data_dir, tmp_path / "resumed", env={"NEOBERT_TEST_KILL": "after_save:4"}, **kw)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint.list_checkpoints(tmp_path / "resumed") == [4]
    resumed = run_cli(data_dir, tmp_path / "resumed", **kw)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in b] == list(range(1, 9))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]  # bitwise: CPU, fp32, compile off
    assert [m["grad_norm"] for m in a] == [m["grad_norm"] for m in b]
    assert a[-1]["tokens"] == b[-1]["tokens"]
    wa, wb = weights(tmp_path / "full", 8), weights(tmp_path / "resumed", 8)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_muon
def test_muon_wsd_resume_after_kill_9_is_exact_and_extends(data_dir, tmp_path):
    """Muon + wsd, killed with SIGKILL after its step-4 checkpoint of an 8-step run (decay from step 6), resumed with
    trainer.max_steps 12: bitwise the losses, grad norms, lrs and weights of a 12-step run from the start (Muon's
    momentum and AdamW's moments restored; the longer run's decay starts later, at step 9)."""
    kw = {"trainer.save_steps": 4, "trainer.resume_from_checkpoint": "auto", "optimizer.name": "muon",
          "scheduler.name": "wsd", "scheduler.decay_ratio": 0.25}
    full = run_cli(data_dir, tmp_path / "full", **kw, **{"trainer.max_steps": 12})
    assert full.returncode == 0, full.stderr
    killed = run_cli(data_dir, tmp_path / "resumed", env={"NEOBERT_TEST_KILL": "after_save:4"},
                     **kw, **{"trainer.max_steps": 8})
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "4" / "optimizer.pt", weights_only=True)
    assert set(state) == {"muon", "adamw"} and len(state["muon"]["state"]) == 8  # a momentum per hidden matrix
    assert all("momentum_buffer" in v for v in state["muon"]["state"].values())
    resumed = run_cli(data_dir, tmp_path / "resumed", **kw, **{"trainer.max_steps": 12})
    assert resumed.returncode == 0, resumed.stderr
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in b] == list(range(1, 13))
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in a] == [m[key] for m in b], key  # bitwise: CPU, fp32, compile off
    assert [m["lr"] for m in a][7:] == sorted([m["lr"] for m in a][7:], reverse=True) and a[7]["lr"] == 3e-3
    wa, wb = weights(tmp_path / "full", 12), weights(tmp_path / "resumed", 12)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # an adamw run refuses Muon's state (and the other way round) in one line
    p = run_cli(data_dir, tmp_path / "resumed", **{**kw, "optimizer.name": "adamw", "trainer.max_steps": 16})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "holds the state of optimizer.name muon; resume it with --optimizer.name muon" in p.stderr


@needs_muon
def test_muon_ddp_and_accumulation_match_one_process(data_dir, tmp_path):
    """Muon: torchrun --nproc_per_node 2 (2 rows each) == one process with 4 rows == 4x1 accumulation. DDP averages
    the gradients before Muon orthogonalizes them, so every rank applies the same update. Muon's Newton-Schulz runs
    in bf16, so a float-rounding difference in the averaged gradient moves a hidden matrix's update by about a bf16
    step (measured: 0.5-2.5% of it after one step, growing to ~7% by step 4 as the runs drift): the losses compare
    over 4 steps, the hidden matrices after the first within 10% of how far they moved (Frobenius norms; a step on
    2 rows instead of the 4 is off by ~90%), every other tensor within 1e-6. (optimizer.eps 1 keeps AdamW's
    update smooth in g: with 1e-8 it is ~sign(g), and float noise flips rarely used embedding rows.)"""
    kw = {"trainer.max_steps": 4, "optimizer.name": "muon", "scheduler.name": "wsd", "optimizer.eps": 1.0,
          "trainer.save_steps": 1, "trainer.save_total_limit": None}
    ddp = run_cli(data_dir, tmp_path / "ddp", nproc=2, **kw, **{"trainer.per_device_train_batch_size": 2})
    assert ddp.returncode == 0, ddp.stderr
    one = run(data_dir, tmp_path / "one", **kw)
    run(data_dir, tmp_path / "acc", **kw, **{"trainer.per_device_train_batch_size": 1,
                                             "trainer.gradient_accumulation_steps": 4})
    cfg = train.load_config(SMOKE, args(data_dir, tmp_path / "one", **kw)[1:])
    torch.manual_seed(cfg.trainer.seed)  # the trainer's initialisation: how far each tensor moved in the step
    init, wo = neobert.NeoBERTLMHead(cfg.model).state_dict(), weights(tmp_path / "one", 1)
    for other in ("ddp", "acc"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / other)), torch.tensor([m["loss"] for m in one]),
                                   rtol=1e-4, atol=0)
        w = weights(tmp_path / other, 1)
        for k in wo:
            if re.search(r"\.(qkv|wo|w12|w3)\.weight$", k):
                ratio = ((w[k] - wo[k]).norm() / (wo[k] - init[k]).norm()).item()
                assert ratio < 0.1, (other, k, ratio)
            else:
                torch.testing.assert_close(w[k], wo[k], rtol=0, atol=1e-6, msg=f"{other} {k}")


@needs_muon
def test_muon_with_compile_and_bf16(data_dir, tmp_path):
    """Muon under torch.compile and bf16 autocast (the GPU recipe, here on CPU): the loss falls and every hidden
    matrix moves."""
    log = run(data_dir, tmp_path / "run", **{"trainer.max_steps": 6, "optimizer.name": "muon",
                                             "trainer.torch_compile": True, "trainer.mixed_precision": "bf16"})
    assert all(math.isfinite(m["loss"]) for m in log) and log[-1]["loss"] < log[0]["loss"]
    w = weights(tmp_path / "run", 6)
    assert all(not k.startswith("_orig_mod.") for k in w)


def test_external_kill_9_at_any_moment_then_resume(data_dir, tmp_path):
    """The real thing: SIGKILL from outside as soon as a checkpoint exists (maybe mid-save), then resume."""
    out = tmp_path / "run"
    kw = {"trainer.max_steps": 2000, "trainer.save_steps": 3, "trainer.save_total_limit": None,
          "trainer.resume_from_checkpoint": "auto", "scheduler.decay_steps": 2000}  # lr independent of max_steps
    proc = subprocess.Popen([sys.executable, "train.py"] + args(data_dir, out, **kw), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoint.list_checkpoints(out):
        time.sleep(0.05)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    s = checkpoint.list_checkpoints(out)[-1]
    more = {**kw, "trainer.max_steps": s + 3}
    assert run_cli(data_dir, out, **more).returncode == 0
    assert run_cli(data_dir, tmp_path / "full", **more).returncode == 0
    assert [m["step"] for m in metrics(out)] == list(range(1, s + 4))
    assert losses(out) == losses(tmp_path / "full")


def test_save_interrupted_mid_write_is_ignored(data_dir, tmp_path):
    """kill -9 inside the step-4 save: the half-written dir is never picked; resume continues from step 2."""
    out = tmp_path / "run"
    kw = {"trainer.max_steps": 6, "trainer.save_steps": 2, "trainer.resume_from_checkpoint": "auto"}
    killed = run_cli(data_dir, out, env={"NEOBERT_TEST_KILL": "mid_save:4"}, **kw)
    assert killed.returncode == -signal.SIGKILL
    assert list((out / "model_checkpoints").glob("4.tmp-*")), "the interrupted save should have left a temp dir"
    assert checkpoint.list_checkpoints(out) == [2]
    assert (out / "model_checkpoints" / "latest").read_text().strip() == "2"
    resumed = run_cli(data_dir, out, **kw)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoints' / '2'}" in resumed.stdout
    assert not list(out.glob("*/*.tmp-*"))  # stale temp dirs are cleaned up
    assert run_cli(data_dir, tmp_path / "full", **kw).returncode == 0
    assert losses(out) == losses(tmp_path / "full")


def test_resume_with_bf16_and_signal_stop(data_dir, tmp_path):
    """SIGTERM saves at the next step boundary and exits 0; resuming (bf16 autocast on CPU) continues the curve."""
    out = tmp_path / "run"
    kw = {"trainer.max_steps": 400, "trainer.mixed_precision": "bf16", "trainer.resume_from_checkpoint": "auto",
          "trainer.save_steps": 0, "scheduler.decay_steps": 400}  # the lr schedule must not depend on max_steps
    launcher = [sys.executable, "train.py"] + args(data_dir, out, **kw)
    proc = subprocess.Popen(launcher, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    stopped = checkpoint.list_checkpoints(out)
    assert len(stopped) == 1 and stopped[0] == metrics(out)[-1]["step"] < 400
    s = stopped[0]
    more = {**kw, "trainer.max_steps": s + 3}
    assert run_cli(data_dir, out, **more).returncode == 0
    assert run_cli(data_dir, tmp_path / "full", **more).returncode == 0
    assert [m["step"] for m in metrics(out)] == list(range(1, s + 4))
    # bf16 autocast on CPU is deterministic too (same thread count), so the resumed curve matches exactly
    assert losses(out) == losses(tmp_path / "full")


def test_gradient_accumulation_equivalence(data_dir, tmp_path):
    """The same global batch of 8 rows as 1x8, 4x2 and 8x1 micro-batches gives the same update.
    eps=1 and lr=1 make AdamW's first update ~ -g/(|g|+1), which is smooth in g (with eps 1e-8 it is ~ -sign(g)
    and tiny gradients would flip on float noise), so the parameters after one step compare tightly."""
    kw = {"trainer.max_steps": 1, "optimizer.lr": 1.0, "optimizer.eps": 1.0, "optimizer.weight_decay": 0.0,
          "trainer.gradient_clipping": None, "scheduler.warmup_steps": 0}
    base = {}
    for micro, accum in [(8, 1), (2, 4), (1, 8)]:
        out = tmp_path / f"{micro}x{accum}"
        log = run(data_dir, out, **kw, **{"trainer.per_device_train_batch_size": micro,
                                          "trainer.gradient_accumulation_steps": accum})
        w = weights(out, 1)
        if not base:
            base, loss = w, log[0]["loss"]
            continue
        assert log[0]["loss"] == pytest.approx(loss, rel=1e-6)
        for k in base:
            torch.testing.assert_close(w[k], base[k], rtol=0, atol=2e-6, msg=k)


def test_ddp_gloo_matches_one_process_and_accumulation(data_dir, tmp_path):
    """torchrun --nproc_per_node 2 (2 rows each) == one process with 4 rows == one process with 4x1 accumulation."""
    kw = {"trainer.max_steps": 4, "trainer.save_steps": 2, "trainer.eval_steps": 4, "trainer.eval_max_batches": 2}
    ddp = run_cli(data_dir, tmp_path / "ddp", nproc=2, **kw, **{"trainer.per_device_train_batch_size": 2,
                                                                 "trainer.per_device_eval_batch_size": 2})
    assert ddp.returncode == 0, ddp.stderr
    one = run(data_dir, tmp_path / "one", **kw, **{"trainer.per_device_eval_batch_size": 4})
    acc = run(data_dir, tmp_path / "acc", **kw, **{"trainer.per_device_train_batch_size": 1,
                                                   "trainer.gradient_accumulation_steps": 4,
                                                   "trainer.per_device_eval_batch_size": 4})
    ref = torch.tensor([m["loss"] for m in one])
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ddp")), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor([m["loss"] for m in acc]), ref, rtol=1e-5, atol=0)
    # evaluation: both ranks take part and their sums are all-reduced -> the same numbers as one process
    d, o = metrics(tmp_path / "ddp")[-1], one[-1]
    assert d["eval_loss"] == pytest.approx(o["eval_loss"], rel=1e-5)
    assert d["eval_accuracy"] == pytest.approx(o["eval_accuracy"], abs=1e-9)
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "4" / "train_state.json").read_text())
    assert state["world_size"] == 2 and len(state["loader_states"]) == 2
    # resume the 2-process run's step-2 checkpoint with ONE process (2x2 accumulation): the same data stream
    resumed = tmp_path / "resumed"
    for sub in ("checkpoints", "model_checkpoints"):
        shutil.copytree(tmp_path / "ddp" / sub / "2", resumed / sub / "2")
    log = run(data_dir, resumed, **kw, **{"trainer.resume_from_checkpoint": "latest",
                                          "trainer.per_device_train_batch_size": 2,
                                          "trainer.gradient_accumulation_steps": 2})
    assert [m["step"] for m in log] == [3, 4]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in log]), ref[2:], rtol=1e-5, atol=0)


def test_init_from_checkpoint_run_dir_and_hf_folder(data_dir, tmp_path, capsys):
    src = tmp_path / "src"
    run(data_dir, src, **{"trainer.max_steps": 2})
    trained = weights(src, 2)
    # a run dir (-> its latest) and a model_checkpoints/<step> dir; max_steps 0 just loads and saves
    for i, source in enumerate([src, src / "model_checkpoints" / "2"]):
        out = tmp_path / f"init{i}"
        run(data_dir, out, **{"trainer.max_steps": 0, "trainer.init_from": source})
        assert checkpoint.list_checkpoints(out) == [0]
        assert all(torch.equal(weights(out, 0)[k], trained[k]) for k in trained)
    # new optimizer, step 0: a normal run from those weights starts at step 1 with a lower loss than from scratch
    log = run(data_dir, tmp_path / "cont", **{"trainer.max_steps": 1, "trainer.init_from": src})
    scratch = run(data_dir, tmp_path / "scratch", **{"trainer.max_steps": 1})
    assert log[0]["step"] == 1 and log[0]["lr"] == scratch[0]["lr"] and log[0]["loss"] < scratch[0]["loss"]
    if hasattr(torch.optim, "Muon"):  # optimizer.name auto: the optimizer the start model's config.yaml records
        muon_src = tmp_path / "muon_src"
        shutil.copytree(src / "model_checkpoints", muon_src / "model_checkpoints")
        saved = muon_src / "model_checkpoints" / "2" / "config.yaml"
        full = yaml.safe_load(saved.read_text())
        saved.write_text(yaml.safe_dump({**full, "optimizer": {**full["optimizer"], "name": "muon"}}))
        capsys.readouterr()
        for source, said in ((muon_src, "optimizer: muon (optimizer.name auto: the start model's)"),
                             ("null", "optimizer: adamw (optimizer.name auto: a fresh model's)")):
            run(data_dir, tmp_path / f"auto-{said[11:15]}", **{"trainer.max_steps": 0, "optimizer.name": "auto",
                                                              "trainer.init_from": source})
            assert said in capsys.readouterr().out
    # an exported / released folder (config.json + model.safetensors), as NeoBERTLMHead.from_pretrained reads it
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = train.load_config(src / "model_checkpoints" / "2" / "config.yaml")
    (hf / "config.json").write_text(json.dumps(cfg.model.to_dict()))
    save_file(trained, str(hf / "model.safetensors"))
    run(data_dir, tmp_path / "init_hf", **{"trainer.max_steps": 0, "trainer.init_from": hf})
    assert all(torch.equal(weights(tmp_path / "init_hf", 0)[k], trained[k]) for k in trained)
    # a different model shape names the tensor
    wide = args(data_dir, tmp_path / "wide", **{"trainer.max_steps": 1, "trainer.init_from": src,
                                                "model.hidden_size": 64})
    expect_error(capsys, wide, "weight' has shape [", "different model shape")
    expect_error(capsys, args(data_dir, tmp_path / "nowhere", **{"trainer.init_from": tmp_path / "nope"}), "nope")


# -----------------------------------------------------------------------------
# bad input: a clear error, exit 2, no traceback


def test_bad_input(data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    expect_error(capsys, args(data_dir, tmp_path / "file" / "run"), "trainer.output_dir", "cannot be written")
    expect_error(capsys, args(data_dir, tmp_path / "empty", **{"trainer.resume_from_checkpoint": "latest"}),
                 "no complete checkpoint")
    expect_error(capsys, args(data_dir, tmp_path / "empty", **{"trainer.resume_from_checkpoint": True}),
                 "no complete checkpoint")
    expect_error(capsys, args(data_dir, tmp_path / "empty", **{"trainer.resume_from_checkpoint": tmp_path / "x"}),
                 "not a run directory")
    expect_error(capsys, args(data_dir, tmp_path / "pad", **{"model.pad_token_id": 3}), "model.pad_token_id", "[PAD]")
    expect_error(capsys, args(data_dir, tmp_path / "vocab", **{"model.vocab_size": 1000}), "model.vocab_size")
    out = tmp_path / "run"
    run(data_dir, out, **{"trainer.max_steps": 1})
    expect_error(capsys, args(data_dir, out, **{"trainer.max_steps": 2}), "already holds checkpoints", "auto")
    expect_error(capsys, args(data_dir, out, **{"trainer.max_steps": 2, "trainer.resume_from_checkpoint": "auto",
                                                "model.intermediate_size": 128}), "ffn.w12.weight' has shape")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    err = expect_error(capsys, args(data_dir, out, **{"trainer.max_steps": 6, "trainer.save_steps": 1,
                                                       "optimizer.lr": 1e30, "scheduler.warmup_steps": 0,
                                                       "trainer.gradient_clipping": None}), "non-finite")
    steps = checkpoint.list_checkpoints(out)
    assert steps and f"checkpoints/{steps[-1]}" in err
    w = weights(out, steps[-1])
    assert all(torch.isfinite(v).all() for v in w.values())  # the last good checkpoint is untouched
    assert len(metrics(out)) == steps[-1]  # nothing logged or saved for the failing step


def test_damaged_shard_names_the_file(data_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    shard = sorted((damaged / "train").glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    expect_error(capsys, args(damaged, tmp_path / "run", **{"trainer.max_steps": 1}), shard.name)


def test_torch_compile_saves_plain_keys(data_dir, tmp_path):
    """Compiled training saves the raw module's keys (no _orig_mod.), matches eager, and resumes without compile."""
    out = tmp_path / "compiled"
    log = run(data_dir, out, **{"trainer.max_steps": 2, "trainer.torch_compile": True})
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in weights(out, 2))
    eager = run(data_dir, tmp_path / "eager", **{"trainer.max_steps": 2})
    torch.testing.assert_close(torch.tensor([m["loss"] for m in log]), torch.tensor([m["loss"] for m in eager]),
                               rtol=1e-4, atol=0)
    resumed = run(data_dir, out, **{"trainer.max_steps": 3, "trainer.resume_from_checkpoint": "auto"})
    assert [m["step"] for m in resumed] == [1, 2, 3]


def test_wandb_is_optional(data_dir, tmp_path, capsys, monkeypatch):
    """wandb.mode disabled never imports it (checked in the smoke test); online/offline without the package is a
    clear error rather than an ImportError traceback."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, installed or not
    expect_error(capsys, args(data_dir, tmp_path / "run", **{"wandb.mode": "offline"}), "pip install wandb")


def test_bench_prints_the_table(data_dir, capsys):
    import bench
    argv = args(data_dir, "unused", **{"bench.steps": 1, "bench.loader_steps": 2,
                                       "bench.variants": "packing,sparse,checkpointing"})
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for row in ("| baseline |", "| packing off (padded rows) |", "| sparse prediction off (full logits) |",
                "| gradient checkpointing on |", "data loader alone:"):
        assert row in out, out
    assert bench.main(argv + ["bench.variants=fast"]) == 2


def test_bench_on_a_streaming_config(data_dir, capsys):
    """configs/pretrain.yaml streams: bench.py's default variants must not die after timing the baseline because
    the streaming loader cannot make padded rows (the 'packing off' variant is left out, with a note)."""
    import bench
    argv = args(data_dir, "unused", **{"bench.steps": 1, "bench.loader_steps": 2, "bench.variants": "packing,sparse",
                                       "dataset.streaming": True, "dataset.num_workers": 1,
                                       "dataset.shuffle_buffer_size": 200})
    assert bench.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "| baseline |" in out and "| sparse prediction off (full logits) |" in out and "data loader alone:" in out
    assert "packing off" not in out.split("| variant |")[1] and "'packing off' variant is left out" in out


@needs_muon
def test_recipe_suite_compares_the_four_recipes_at_equal_time(data_dir, tmp_path, capsys):
    """python bench.py --suite recipe with a tiny budget: AdamW / Muon x cosine / wsd, each at the best of its lrs
    (the lowest final held-out loss of the runs it lists), the steps that fit the budget, and the same held-out split
    for every run."""
    import bench
    tiny = [x for k, v in TINY.items() if not k.startswith(("trainer.", "optimizer.", "scheduler.", "wandb."))
            for x in (f"--{k}", str(v))]
    assert bench.main(["--suite", "recipe", "--budget-s", "1.5", "--lrs", "1e-3,1e-2", "--out", str(tmp_path / "r"),
                       "--dataset.path", str(data_dir), "--trainer.mixed_precision", "no", *tiny]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| AdamW", "| Muon"))]
    assert [r[0] for r in rows] == ["| AdamW + cosine", "| AdamW + wsd", "| Muon + cosine", "| Muon + wsd"]
    for r in rows:
        per_lr = dict(x.split(": ") for x in r[6].split(", "))
        assert set(per_lr) == {"0.001", "0.01"} and r[1] == min(per_lr, key=lambda lr: float(per_lr[lr]))
        assert float(r[4]) == pytest.approx(float(per_lr[r[1]]), abs=1e-3) and 0 <= float(r[5].rstrip("%")) <= 100
        assert int(r[2]) >= 10 and float(r[3].replace(",", "")) > 0
        log = metrics(tmp_path / "r" / f"{r[0][2:].split(' + ')[0].lower()}-{r[0].split(' + ')[1]}-{r[1]}")
        assert log[-1]["step"] == int(r[2]) and log[-1]["eval_loss"] == pytest.approx(float(r[4]), abs=1e-3)
    assert rows[0][7].startswith("step ") or rows[0][7] == "not reached |"  # AdamW + cosine reaches its own loss
    assert rows[0][7].startswith("step " + rows[0][2]) or int(rows[0][7].split()[1]) <= int(rows[0][2])


def test_mfu_uses_step_flops_and_the_device_peak(data_dir, tmp_path, monkeypatch):
    cfg = train.load_config(SMOKE)
    labels = torch.full((1, 128), -100)
    labels[0, :32] = 5
    packed = {"input_ids": torch.zeros(1, 128, dtype=torch.long), "labels": labels,
              "cu_seqlens": torch.tensor([0, 64, 128], dtype=torch.int32)}
    want = 128 * neobert.flops_per_token(cfg.model, 64, 0.25)  # each query attends to its 64-token document
    assert train.step_flops(cfg.model, [packed]) == pytest.approx(want)
    padded = {"input_ids": torch.zeros(2, 96, dtype=torch.long), "labels": torch.zeros(2, 96, dtype=torch.long),
              "attention_mask": torch.ones(2, 96, dtype=torch.long)}
    assert train.step_flops(cfg.model, [padded], sparse=False) == pytest.approx(
        192 * neobert.flops_per_token(cfg.model, 96, 1.0))
    # with a known peak (as on a GPU in neobert's table), metrics carry an MFU
    monkeypatch.setattr(neobert, "peak_flops", lambda device: 1e12)
    log = run(data_dir, tmp_path / "run", **{"trainer.max_steps": 2})
    assert all(0 < m["mfu"] < 1 for m in log)


def test_sigterm_to_the_process_group_stops_a_streaming_run(data_dir, tmp_path):
    """Preemption (SIGTERM to the whole process group, as `timeout -s TERM` or a scheduler sends it) of a streaming
    run whose tokenizer runs in worker processes: the run saves at the step boundary and exits 0 promptly. (The
    workers used to die mid-task or inherit the trainer's signal handler, and closing the pool hung forever.)"""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(words[(i * j) % len(words)] for j in range(40)) for i in range(400)))
    out = tmp_path / "run"
    kw = {"dataset.streaming": True, "dataset.data_files": str(corpus), "dataset.path": tmp_path / "prep",
          "dataset.num_workers": 2, "dataset.shuffle_buffer_size": 50, "dataset.validation_split": 0,
          "tokenizer.path": data_dir / "tokenizer.json", "tokenizer.train": False, "trainer.max_steps": 100000}
    cmd = [sys.executable, "train.py"] + args(data_dir, out, **kw)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (
                (out / "metrics.jsonl").exists() and len(metrics(out)) >= 5):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by signal" in stdout
    assert checkpoint.list_checkpoints(out) == [metrics(out)[-1]["step"]]


def test_eval_with_a_small_or_empty_val_split(data_dir, tmp_path, capsys):
    """A val split smaller than one eval batch is evaluated with the rows it has, and an empty one turns evaluation
    off with a warning, decided before training; neither may crash the run at its first eval step (they did, after
    the training work, with nothing saved)."""
    rows = data.split_rows(data_dir, "val", 64)
    assert 0 < rows < 1000
    m = run(data_dir, tmp_path / "small", **{"trainer.max_steps": 2, "trainer.eval_steps": 1,
                                             "trainer.per_device_eval_batch_size": 1000})
    assert [r["step"] for r in m] == [1, 2] and all(math.isfinite(r["eval_loss"]) for r in m)
    assert f"evaluating with {rows} rows per process" in capsys.readouterr().err
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(words[(i * j) % len(words)] for j in range(40)) for i in range(100)))
    for streaming in (False, True):
        out = tmp_path / f"noval-{streaming}"
        m = run(data_dir, out, **{"trainer.max_steps": 2, "trainer.eval_steps": 1, "dataset.streaming": streaming,
                                  "dataset.data_files": str(corpus), "dataset.path": tmp_path / f"prep-{streaming}",
                                  "dataset.validation_split": 0, "tokenizer.path": data_dir / "tokenizer.json",
                                  "tokenizer.train": False, "dataset.num_workers": 1})
        assert [r["step"] for r in m] == [1, 2] and not any("eval_loss" in r for r in m)
        assert "evaluation is off" in capsys.readouterr().err
        assert checkpoint.list_checkpoints(out) == [2]


def test_init_from_a_resume_checkpoint_dir(data_dir, tmp_path):
    """init_from accepts the checkpoints/<step> directory that resume_from_checkpoint takes (its weights sit in
    model_checkpoints/<step>); it used to fail with 'no config.json'."""
    src = tmp_path / "src"
    run(data_dir, src, **{"trainer.max_steps": 3})
    firsts = []
    for i, path in enumerate([src / "checkpoints" / "3", src / "model_checkpoints" / "3"]):
        m = run(data_dir, tmp_path / f"init{i}", **{"trainer.max_steps": 1, "trainer.init_from": path})
        firsts.append(m[0]["loss"])
    fresh = run(data_dir, tmp_path / "fresh", **{"trainer.max_steps": 1})[0]["loss"]
    assert firsts[0] == firsts[1] != fresh


# -----------------------------------------------------------------------------
# precision: trainer.mixed_precision auto | bf16 | no, decided by the hardware (mocked here: any CPU passes)


def fake_cpu(monkeypatch, flags, capability="AVX2"):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


@pytest.mark.parametrize("device, flags, asked, expected, warned", [
    ("cuda", [], "auto", "bf16", False),
    ("cuda:1", [], "no", "no", False),
    ("cpu", ["avx", "avx2", "fma"], "auto", "no", False),
    ("cpu", ["avx512f", "avx512_bf16"], "auto", "bf16", False),
    ("cpu", ["amx_tile", "amx_bf16"], "auto", "bf16", False),
    ("cpu", ["fp", "asimd", "bf16"], "auto", "bf16", False),  # aarch64
    ("cpu", ["avx2"], "bf16", "bf16", True),
    ("cpu", ["avx512_bf16"], "bf16", "bf16", False),
    ("cpu", ["avx512_bf16"], "no", "no", False),
])
def test_resolve_precision_follows_the_hardware(monkeypatch, capsys, device, flags, asked, expected, warned):
    fake_cpu(monkeypatch, flags)
    assert runtime.resolve_precision(asked, torch.device(device) if ":" in device else device) == expected
    err = capsys.readouterr().err
    assert ("0.27 GFLOP/s" in err and "no AVX512-BF16/AMX" in err and err.count("\n") == 1) == warned, err


def test_cpu_capability_and_cpuinfo_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert {"avx2", "avx512_bf16"} <= runtime.cpu_flags(cpuinfo) and "processor" not in runtime.cpu_flags(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU implementer\t: 0x41\n")
    assert "bf16" in runtime.cpu_flags(cpuinfo) and "0x41" not in runtime.cpu_flags(cpuinfo)
    assert runtime.cpu_flags(tmp_path / "missing") == set()  # macOS, Windows: no file, fp32
    fake_cpu(monkeypatch, [], capability="AVX512")  # AVX512 alone says nothing about bf16 units
    assert runtime.resolve_precision("auto", "cpu") == "no"
    with pytest.raises(config.UserError, match="fp16"):
        runtime.resolve_precision("fp16", "cpu")


def test_autocast_context():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with runtime.autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with runtime.autocast(torch.device("cpu"), "no"):
        assert (a @ b).dtype == torch.float32


def test_trainer_uses_the_resolved_precision(data_dir, tmp_path, monkeypatch, capsys):
    assert train.load_config(SMOKE).trainer.mixed_precision == "auto" == train.TrainerConfig().mixed_precision
    fake_cpu(monkeypatch, ["avx2"])
    run(data_dir, tmp_path / "fp32", **{"trainer.max_steps": 1, "trainer.mixed_precision": "auto"})
    assert "precision: fp32 (trainer.mixed_precision=auto)" in capsys.readouterr().out
    fake_cpu(monkeypatch, ["amx_bf16"])
    seen = []
    real = runtime.autocast
    monkeypatch.setattr(train, "autocast", lambda device, precision: seen.append(precision) or real(device, precision))
    run(data_dir, tmp_path / "bf16", **{"trainer.max_steps": 1, "trainer.mixed_precision": "auto"})
    assert "precision: bf16 autocast" in capsys.readouterr().out and seen == ["bf16"]


# -----------------------------------------------------------------------------
# loading a trained model: resolve_model_source / load_pretrained, the same for every caller


def tiny_cfg(**extra):
    return train.load_config(None, [f"{k}={v}" for k, v in {**TINY, **extra}.items()])


def write_checkpoint(folder, model, cfg_dict, tokenizer=True):
    """A model_checkpoints/<step>-style folder: model.safetensors (plain keys), config.yaml, tokenizer.json."""
    from tokenizers import Tokenizer, models
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(config.yaml.safe_dump(cfg_dict))
    if tokenizer:
        Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    return folder


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def mlm_run(tmp_path):
    """A run directory written by hand as the trainer writes it: steps 1 and 2, latest = 2."""
    cfg = tiny_cfg()
    torch.manual_seed(1)
    old = neobert.NeoBERTLMHead(cfg.model)
    torch.manual_seed(2)
    new = neobert.NeoBERTLMHead(cfg.model)
    run_dir = tmp_path / "run"
    write_checkpoint(run_dir / "model_checkpoints" / "1", old, config.config_to_dict(cfg))
    write_checkpoint(run_dir / "model_checkpoints" / "2", new, config.config_to_dict(cfg))
    (run_dir / "model_checkpoints" / "latest").write_text("2\n")
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    return run_dir, cfg, new


def test_resolve_model_source_layouts(mlm_run, tmp_path, capsys, monkeypatch):
    run_dir, _, _ = mlm_run
    step2 = run_dir / "model_checkpoints" / "2"
    for source in [run_dir, str(run_dir), run_dir / "model_checkpoints", step2, run_dir / "checkpoints" / "2"]:
        assert checkpoint.resolve(source) == step2, source
    assert checkpoint.resolve(run_dir / "model_checkpoints" / "1") == run_dir / "model_checkpoints" / "1"
    (run_dir / "model_checkpoints" / "latest").write_text("7\n")  # stale: the newest complete step
    (run_dir / "model_checkpoints" / "9").mkdir()  # an empty step dir is not complete
    assert checkpoint.resolve(run_dir) == step2
    for bad, fragments in [(tmp_path / "nope", ["nope", "does not exist", "run directory", "hub id"]),
                           ("./nope", ["does not exist", "hub id"]), (tmp_path, ["not a model folder"])]:
        with pytest.raises(config.UserError) as e:
            checkpoint.resolve(bad)
        assert all(f in str(e.value) for f in fragments) and "\n" not in str(e.value), e.value
    (tmp_path / "empty_run" / "model_checkpoints").mkdir(parents=True)
    with pytest.raises(config.UserError, match="no complete model checkpoint"):
        checkpoint.resolve(tmp_path / "empty_run")
    # runs/mistyped (relative, owner/name-shaped) is a missing run when runs/ exists, never a hub repo to fetch
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(config.UserError, match="runs/mistyped is not a model folder: it does not exist"):
        checkpoint.resolve("runs/mistyped")


def test_load_pretrained_mlm_and_encoder_from_a_run(mlm_run):
    run_dir, cfg, new = mlm_run
    model, info = checkpoint.load(run_dir)
    assert type(model) is neobert.NeoBERTLMHead and same_weights(model, new)
    assert info.path == run_dir / "model_checkpoints" / "2" and info.model_config == cfg.model
    assert info.pooling == "mean" and info.num_labels is None and info.id2label is None
    assert info.full_config["trainer"]["max_steps"] == cfg.trainer.max_steps
    assert info.tokenizer.token_to_id("[PAD]") == 0
    encoder, _ = checkpoint.load(run_dir / "checkpoints" / "2", head="encoder")
    assert type(encoder) is neobert.NeoBERT and same_weights(encoder, new.model)
    overridden, info = checkpoint.load(run_dir, attn_backend="sdpa")
    assert info.model_config.attn_backend == "sdpa" and overridden.config.attn_backend == "sdpa"


def test_load_pretrained_hf_folder_and_hub_id(mlm_run, tmp_path, monkeypatch):
    """The released chandar-lab/NeoBERT layout (config.json with max_length/dim_head, model.safetensors with
    model.* and decoder.*) and an exported folder's sentence-transformers pooling; a hub id goes through
    huggingface_hub.snapshot_download."""
    _, cfg, new = mlm_run
    hf = tmp_path / "hf"
    hf.mkdir()
    m = cfg.model
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["NeoBERTLMHead"], "model_type": "neobert", "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size, "num_hidden_layers": m.num_hidden_layers, "intermediate_size":
        m.intermediate_size, "num_attention_heads": m.num_attention_heads, "dim_head": m.head_dim,
        "max_length": m.max_position_embeddings, "norm_eps": m.norm_eps, "pad_token_id": 0,
        "transformers_version": "4.48.2"}))
    save_file(new.state_dict(), str(hf / "model.safetensors"))
    (hf / "1_Pooling").mkdir()
    (hf / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": m.hidden_size,
                                                              "pooling_mode_cls_token": True,
                                                              "pooling_mode_mean_tokens": False}))
    model, info = checkpoint.load(hf)
    assert same_weights(model, new) and info.model_config == m and info.pooling == "cls" and info.tokenizer is None
    assert info.full_config["max_length"] == m.max_position_embeddings
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(hf)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, info = checkpoint.load("chandar-lab/NeoBERT", head="encoder")
    assert calls[0][0] == "chandar-lab/NeoBERT" and "1_Pooling/config.json" in calls[0][1]["allow_patterns"]
    assert same_weights(model, new.model) and info.path == hf

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(config.UserError, match="cannot download the model someone/model from the Hugging Face Hub"):
        checkpoint.load("someone/model")


def test_load_pretrained_classifier_heads(mlm_run, tmp_path):
    run_dir, cfg, new = mlm_run
    # from an MLM checkpoint: the encoder, a new head
    torch.manual_seed(0)
    clf, info = checkpoint.load(run_dir, head="classifier", num_labels=3, classifier_dropout=0.3)
    assert type(clf) is neobert.NeoBERTForSequenceClassification and clf.classifier.out_features == 3
    assert same_weights(clf.model, new.model) and clf.dropout.p == 0.3 and info.num_labels is None
    # a fine-tuned classifier (contract 3: a `classifier:` section beside the training config) keeps its head
    with torch.no_grad():
        clf.classifier.weight.add_(1.0)
    saved = {**config.config_to_dict(cfg), "classifier": {"num_labels": 3, "id2label": {0: "neg", 1: "neu", 2: "pos"},
                                                       "classifier_dropout": 0.2, "classifier_init_range": 0.02}}
    ck = write_checkpoint(tmp_path / "clf" / "model_checkpoints" / "5", clf, saved)
    for num_labels in (None, 3):
        back, info = checkpoint.load(ck, head="classifier", num_labels=num_labels)
        assert same_weights(back, clf) and back.dropout.p == 0.2
        assert info.num_labels == 3 and info.id2label == {0: "neg", 1: "neu", 2: "pos"}
    with pytest.raises(config.UserError, match="3 labels but num_labels=5"):
        checkpoint.load(ck, head="classifier", num_labels=5)
    other, info = checkpoint.load(ck, head="classifier", num_labels=5, new_head_if_mismatch=True)
    assert other.classifier.out_features == 5 and same_weights(other.model, clf.model) and info.num_labels is None
    encoder, _ = checkpoint.load(ck, head="encoder")
    assert same_weights(encoder, clf.model)
    with pytest.raises(config.UserError, match="no MLM decoder"):
        checkpoint.load(ck)


def test_load_pretrained_contrastive_pooling_and_bad_files(mlm_run, tmp_path):
    run_dir, cfg, new = mlm_run
    d = {**config.config_to_dict(cfg), "contrastive": {"pooling": "cls"}}
    d["trainer"]["objective"] = "contrastive"
    ck = write_checkpoint(tmp_path / "c", new, d, tokenizer=False)
    model, info = checkpoint.load(ck, head="encoder")
    assert info.pooling == "cls" and info.tokenizer is None and same_weights(model, new.model)
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:100])  # truncated
    with pytest.raises(config.UserError, match="cannot read the weights"):
        checkpoint.load(ck)
    wide = write_checkpoint(tmp_path / "w", neobert.NeoBERTLMHead(tiny_cfg(**{"model.hidden_size": 64}).model),
                            config.config_to_dict(cfg))  # config.yaml says hidden 32, weights are 64 wide
    with pytest.raises(config.UserError, match="different model shape"):
        checkpoint.load(wide)


# -----------------------------------------------------------------------------
# metrics.jsonl damaged by a kill mid-write or a full disk never blocks a resume


def test_truncate_metrics_drops_damaged_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_bytes(("\n".join(good) + '\n[1, 2]\n\x00\x00\x00\n\xff\xfe{"step"\n\n{"step": 4, "lo').encode("latin-1"))
    train.truncate_metrics(path, 2)
    assert path.read_text() == good[0] + "\n" + good[1] + "\n"
    assert "dropped 4 damaged lines" in capsys.readouterr().err
    train.truncate_metrics(tmp_path / "missing.jsonl", 5)  # a fresh run: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def test_resume_after_a_partial_metrics_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run(data_dir, out, **{"trainer.max_steps": 2})
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 7.1, "lr": 0.00')  # killed mid-write
    log = run(data_dir, out, **{"trainer.max_steps": 3, "trainer.resume_from_checkpoint": "auto"})
    assert [r["step"] for r in log] == [1, 2, 3]
    assert "dropped 1 damaged line" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the guide's CLI-only smoke run, as written, with wandb offline


def test_guide_command_line_with_wandb_offline(data_dir, tmp_path):
    """python train.py configs/smoke.yaml --dataset.streaming false --datacollator.pack_sequences false
    --trainer.max_steps 50 --wandb.mode offline: runs after `pip install -r requirements.txt`, writes the offline
    wandb run under the run directory, and (where a network namespace can be made) runs with no network at all."""
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "configs/smoke.yaml", "--dataset.streaming", "false",
           "--datacollator.pack_sequences", "false", "--trainer.max_steps", "50", "--wandb.mode", "offline",
           "--dataset.path", str(data_dir), "--trainer.output_dir", str(out), "--trainer.disable_tqdm", "true"]
    no_network = ["unshare", "-rn"]
    if shutil.which("unshare") is None or subprocess.run(no_network + ["true"], capture_output=True).returncode:
        no_network = []
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    p = subprocess.run(no_network + cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    log = metrics(out)
    assert log[-1]["step"] == 50 and "eval_loss" in log[-1] and log[-1]["loss"] < log[0]["loss"]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((out / "wandb").iterdir())
    assert (runs[0] / "run-" f"{runs[0].name.rsplit('-', 1)[1]}.wandb").stat().st_size > 0


# -----------------------------------------------------------------------------
# the objective interface: a third objective, written here, trains through train.py's loop unchanged

THIRD_OBJECTIVE = '''
"""A third objective for the test: pooled embeddings regressed (mean-squared error) onto a fixed random target per
row, the mean of a seeded random vector per token. It reuses MLM's data (a subclass) and replaces the loss."""
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv.pop(1))  # the repo
import neobert, runtime, train


class Pooled(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return neobert.pool(self.encoder(input_ids, attention_mask=attention_mask), attention_mask, "mean")


class PooledMSE(train.MLM):
    name, eval_at_start = "pooled_mse", False

    def load(self):
        tokenizer = super().load()
        self.eval_batch_size = None  # no held-out metric for this objective
        g = torch.Generator().manual_seed(1234)
        self.table = torch.randn(self.cfg.model.vocab_size, self.cfg.model.hidden_size, generator=g)
        return tokenizer

    def train_module(self, model):
        return Pooled(model.model)

    def forward_backward(self, module, micro_batches, amp):
        rows = torch.tensor(float(sum(b["input_ids"].shape[0] for b in micro_batches)))
        if self.world_size > 1:
            dist.all_reduce(rows)
        loss_sum = torch.zeros(())
        for i, b in enumerate(micro_batches):
            mask = b["attention_mask"]
            target = neobert.pool(self.table[b["input_ids"]], mask, "mean")
            sync = i == len(micro_batches) - 1 or self.world_size == 1
            with (nullcontext() if sync else module.no_sync()), amp:
                loss = ((module(b["input_ids"], mask).float() - target) ** 2).mean(-1).sum()
                (loss * self.world_size / rows).backward()
            loss_sum += loss.detach()
        return loss_sum, rows.item(), torch.stack([loss_sum])

    def metrics(self, sums, count):
        return {"mse": sums[0] / count}

    def flops(self, micro_batches):
        return 0.0


sys.exit(runtime.run_main(sys.argv[1:], "third objective",
                         lambda a: train.train(train.load_config(a[0], a[1:]), objective=PooledMSE)))
'''


def test_a_third_objective_trains_through_the_same_loop(data_dir, tmp_path):
    """The objective interface: a class defined outside train.py (pooled-embedding MSE) runs through train.train with
    DDP (2 gloo processes == 1 process == accumulation), checkpoints, and resumes exactly after kill -9; its
    checkpoints carry its name, so an MLM run refuses to resume them."""
    script = tmp_path / "third.py"
    script.write_text(THIRD_OBJECTIVE)
    # optimizer.eps 1e-4: AdamW divides each gradient element by its own RMS, so an element whose gradient is a
    # near-cancelling sum (7e-8 beside 1e-2 in its row, measured) turns float rounding (1e-9, a 2% error there) into a
    # weight gap of 3e-5 by step 6 with eps 1e-8 (2 of 20 preparations of the corpus); 1e-4 bounds that amplification
    # at lr / eps = 30 (gaps <= 2e-7 on those preparations) while gradients above 1e-4 still take full-size steps
    kw = {"trainer.max_steps": 6, "trainer.save_steps": 3, "trainer.resume_from_checkpoint": "auto",
          "datacollator.pack_sequences": False, "optimizer.eps": 1e-4}

    def launch(out, nproc=1, env=None, **overrides):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = (launcher if nproc > 1 else [sys.executable]) + [str(script), str(ROOT)]
        return subprocess.run(cmd + args(data_dir, out, **kw, **overrides), cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**ENV, **(env or {})})

    one = launch(tmp_path / "one")
    assert one.returncode == 0, one.stderr
    log = metrics(tmp_path / "one")
    assert [m["step"] for m in log] == list(range(1, 7)) and all(m["mse"] == m["loss"] for m in log)
    assert log[-1]["loss"] < log[0]["loss"]  # it learns
    ddp = launch(tmp_path / "ddp", nproc=2, **{"trainer.per_device_train_batch_size": 2})
    assert ddp.returncode == 0, ddp.stderr
    acc = launch(tmp_path / "acc", **{"trainer.per_device_train_batch_size": 1,
                                      "trainer.gradient_accumulation_steps": 4})
    assert acc.returncode == 0, acc.stderr
    for key in ("loss", "grad_norm"):  # the gradient's norm too: a DDP that summed, or skipped, the ranks' shows there
        ref = torch.tensor([m[key] for m in log])
        for other in ("ddp", "acc"):
            torch.testing.assert_close(torch.tensor([m[key] for m in metrics(tmp_path / other)]), ref, rtol=1e-5,
                                       atol=0, msg=f"{other}: {key}")
    wa, wb = weights(tmp_path / "one", 6), weights(tmp_path / "ddp", 6)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)  # as the contrastive DDP test
    # kill -9 right after the step-3 checkpoint, then resume: bitwise the same run
    killed = launch(tmp_path / "resumed", env={"NEOBERT_TEST_KILL": "after_save:3"})
    assert killed.returncode == -signal.SIGKILL and checkpoint.list_checkpoints(tmp_path / "resumed") == [3]
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "3" / "train_state.json").read_text())
    assert state["objective"] == "pooled_mse"
    resumed = launch(tmp_path / "resumed")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    assert losses(tmp_path / "resumed") == losses(tmp_path / "one")
    wc = weights(tmp_path / "resumed", 6)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    # train.py's own command line (the MLM objective) refuses to resume another objective's checkpoints
    r = run_cli(data_dir, tmp_path / "resumed", **{**kw, "trainer.max_steps": 8})
    assert r.returncode == 2 and "trainer.objective=pooled_mse" in r.stderr and "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# first contact (issue 18): one error per torchrun job, a finished run says so, a short header, the guide's keys

def torchrun_errors(data_dir, out, **overrides) -> str:
    """A 2-process gloo torchrun of train.py that fails: its output, after checking it holds exactly one `error:` line
    and no traceback of ours (torchrun's own ChildFailedError report stays). A slow monitor (3 s) lets a waiting rank
    meet its dead peer by itself instead of being terminated by torchrun first."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=3",
                "--nproc_per_node=2"]
    r = subprocess.run(launcher + ["train.py"] + args(data_dir, out, **overrides), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    output = r.stdout + r.stderr
    assert r.returncode != 0
    assert sum(line.startswith("error:") for line in output.splitlines()) == 1, output
    assert output.count("Traceback") <= 1 and not re.search(r'(train|config|data)\.py", line', output), output
    assert "exitcode  : 2" in output and "exitcode  : 1 " not in output, output  # every rank: 2 (none crashed)
    return output


def test_torchrun_prints_one_error_and_no_traceback(data_dir, tmp_path):
    # a config value: every rank finds it before the process group starts; rank 0 says it
    out = torchrun_errors(data_dir, tmp_path / "a", **{"optimizer.lr": -1})
    assert "error: optimizer.lr and optimizer.weight_decay must be >= 0" in out
    # rank 0 fails preparing the data while rank 1 waits at the barrier: rank 1 leaves quietly (exit 2), unless
    # torchrun terminates it first (SIGTERM, a race with the monitor): either way no traceback and no crash of ours
    out = torchrun_errors(data_dir, tmp_path / "b", **{"dataset.path": tmp_path / "fresh", "dataset.pre_tokenize": True,
                                                       "dataset.data_files": tmp_path / "missing.txt"})
    assert "error: dataset.data_files: no such file" in out and out.count("exitcode  : 2") >= 1


def test_a_finished_run_says_so(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run(data_dir, out, **{"trainer.max_steps": 2})
    capsys.readouterr()
    assert train.main(args(data_dir, out, **{"trainer.max_steps": 1, "trainer.resume_from_checkpoint": "auto"})) == 0
    said = capsys.readouterr().out
    assert (f"the run in {out} is already at step 2 >= trainer.max_steps 1: nothing to train; pass another "
            "trainer.output_dir to start over, or a larger trainer.max_steps to continue") in said
    assert "done:" not in said and checkpoint.list_checkpoints(out) == [2]


def test_the_run_header_is_short_and_names_the_overrides(data_dir, tmp_path, capsys):
    argv = args(data_dir, tmp_path / "run", **{"trainer.max_steps": 1})
    assert train.main(argv) == 0
    said = capsys.readouterr().out
    assert len(said.splitlines()) <= 6 and "# resolved config" not in said, said
    assert f"config: {SMOKE} model.hidden_size=32 " in said and " trainer.max_steps=1" in said
    assert f"run: {tmp_path / 'run'} (mlm, 1 process, cpu); data: {data_dir}; fresh" in said
    assert "model: " in said and "precision: fp32" in said
    assert train.main(argv[:1] + ["--print-config"] + argv[1:] + ["trainer.resume_from_checkpoint=auto"]) == 0
    said = capsys.readouterr().out
    assert "# resolved config\nmodel:\n  vocab_size: 4096\n  hidden_size: 32\n" in said


def test_the_guides_keys(capsys, tmp_path):
    renamed = {"tokenizer.max_length": "dataset.max_seq_length", "dataset.pre_tokenize_output": "dataset.path"}
    for key, here in renamed.items():
        expect_error(capsys, [str(SMOKE), f"--{key}", "512"], f"error: {key} is {here} here", f"set {here} instead")
    for value in ("torch", "liger"):  # the guide's Liger switch: nothing to set here, said in one line
        expect_error(capsys, [str(SMOKE), "--model.kernel_backend", value], "model.kernel_backend is the NeoBERT "
                     "guide's fused-kernel (Liger) switch", "model.attn_backend", "remove the key")


def test_every_evaluation_is_a_console_line(data_dir, tmp_path, capsys):
    """Every evaluation prints `step N: eval_loss X, eval_accuracy Y` with the numbers metrics.jsonl holds (also with
    the progress bar off), and the final line repeats the last evaluation."""
    log = run(data_dir, tmp_path / "run", **{"trainer.max_steps": 4, "trainer.eval_steps": 2,
                                               "trainer.eval_max_batches": 1, "trainer.disable_tqdm": True})
    out = capsys.readouterr().out
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    lines = [line for line in out.splitlines() if re.match(r"step \d+: eval_", line)]
    want = [f"step {r['step']}: eval_loss {r['eval_loss']:.4g}, eval_accuracy {r['eval_accuracy']:.4g}" for r in evals]
    assert lines == want, out
    assert out.rstrip().splitlines()[-1].endswith(f"last evaluation: {want[-1]}"), out


# -----------------------------------------------------------------------------
# one compiled graph, and a step that never waits on the host (issue: GPU-ready)

def test_compiled_training_is_one_graph_that_never_recompiles(data_dir, tmp_path, monkeypatch):
    """30 compiled steps of the smoke config (packed rows, a tiny model) with fullgraph=True (a graph break would
    raise): every graph is made in the first step, none later (documents per row, and so cu_seqlens' length, change
    from batch to batch), and the losses are the eager path's."""
    from torch._dynamo.utils import counters
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compile_(module, **{**kw, "fullgraph": True}))
    graphs, next_step = [], data.Loader.next_step

    def counting(self):
        graphs.append(counters["stats"]["unique_graphs"])  # graphs made before this step
        return next_step(self)

    monkeypatch.setattr(data.Loader, "next_step", counting)
    torch._dynamo.reset()
    counters.clear()
    kw = {"trainer.max_steps": 30, "trainer.logging_steps": 1, "optimizer.lr": 3e-3}
    compiled = run(data_dir, tmp_path / "compiled", **kw, **{"trainer.torch_compile": True})
    made = counters["stats"]["unique_graphs"]
    assert len(graphs) == 30 and graphs[0] == 0 and graphs[1] == graphs[-1] == made >= 1, graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    eager = run(data_dir, tmp_path / "eager", **kw)
    torch.testing.assert_close(torch.tensor([m["loss"] for m in compiled]), torch.tensor([m["loss"] for m in eager]),
                               rtol=2e-3, atol=0)


def test_a_step_that_does_not_log_reads_nothing_from_the_device(data_dir, tmp_path, monkeypatch):
    """Between two metrics lines the loop reads nothing back: no Tensor.item, tolist, bool, float or int on any
    tensor (on a GPU each would wait for all queued work); the counts it needs come from the host."""
    read_at, step = [], [0]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, **k):
            read_at.append(step[0])
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    next_step = data.Loader.next_step

    def counting(self):
        step[0] += 1  # the step this batch is for (1-based)
        return next_step(self)

    monkeypatch.setattr(data.Loader, "next_step", counting)
    run(data_dir, tmp_path / "run", **{"trainer.max_steps": 12, "trainer.logging_steps": 4, "trainer.save_steps": 0})
    assert step[0] == 12 and read_at, read_at  # the logging steps do read (and the test sees reads)
    assert set(read_at) <= {0, 4, 8, 12}, sorted(set(read_at))  # 0: setup, before the first step


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_non_finite_step_leaves_the_weights_on_the_device(name):
    """optimizer_step with a NaN gradient, or with `skip` set, changes no weight (AdamW's fused kernel skips, Muon's
    matrices are put back) and says so in `finite`, without reading the device; a finite step changes them."""
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    torch.manual_seed(0)
    model = neobert.NeoBERTLMHead(neobert.NeoBERTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=64))
    opt = train.build_optimizer(model, train.OptimizerConfig(name=name, lr=1e-2), "cpu")
    ids = torch.randint(5, 64, (2, 8))

    def step(loss_scale, skip=None):
        out = model(ids, labels=ids)
        (out.loss * loss_scale).backward()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _, finite = train.optimizer_step(model, opt, 1e-2, 1.0, out.loss * loss_scale, skip=skip)
        same = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        return bool(finite), same

    assert step(float("nan")) == (False, True)
    assert step(1.0, skip=torch.tensor(True)) == (True, True)
    assert step(1.0) == (True, False)
