"""Did my edit help? The working tree (side A) and another commit or setting (side B) each train from scratch, seeds
interleaved A, B, A, B, until the held-out MLM loss first reaches a target (or the time budget runs out); then each
model is fine-tuned briefly on a fixed downstream probe. The report gives the ratios of steps, FLOPs and seconds to
the target with a band over the seeds, the probe scores side by side, and one verdict line.

Side B's code is a git commit, branch or tag built in a temporary `git worktree`; the data (prepared once, by side A),
the held-out set, the target and the probe are fixed. One engine runs every training: train_run, a subprocess of a
tree's train.py watched through its metrics.jsonl (the recipe suite uses it too). Options, rules: docs/speedrun.md.
"""

import json
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml

import neobert
import prepare
import train
from config import UserError, convert, parse_overrides, require
from runtime import write_atomic

ROOT = Path(__file__).resolve().parent
# the probe's fine-tuning noise, the floor of the noise a difference is judged against: the largest accuracy sd over
# fine-tuning seeds 0-2 measured on this probe, 0.017 (a random model; 0.007 and 0.004 for two pretrained ones),
# rounded up (docs/speedrun.md)
PROBE_SD = 0.02

# -----------------------------------------------------------------------------
# the probe task: replaced-word detection on stdlib docstrings. Each of a docstring's first three 40-word windows
# appears twice, as it is and with half its words replaced by words drawn from the training docstrings: word
# frequencies and length say nothing, only context tells the classes apart. Split by module: the 20 largest
# packages, each one's smallest modules held out.


def module_split(packages: int = 20) -> dict:
    """{"train" | "validation": [(module, docstring)]} of the `packages` largest stdlib packages with two modules or
    more; held out: each package's smallest modules, up to a fifth of its docstrings (one at least)."""
    root, by_package = Path(sysconfig.get_paths()["stdlib"]), {}
    for path in prepare.py_files(root):
        rel = Path(path).relative_to(root)
        if len(rel.parts) < 2:  # a top-level module, not a package
            continue
        for doc in prepare.py_docstrings(path) or ():
            by_package.setdefault(rel.parts[0], []).append((str(rel), " ".join(doc.split())[:1000]))
    split_able = [p for p in by_package if len({m for m, _ in by_package[p]}) >= 2]  # a module on each side
    largest = sorted(split_able, key=lambda p: (-len(by_package[p]), p))[:packages]
    rows = {"train": [], "validation": []}
    for package in sorted(largest):
        docs = by_package[package]
        sizes = {m: sum(1 for n, _ in docs if n == m) for m, _ in docs}
        held, count = set(), 0
        for module in sorted(sizes, key=lambda m: (sizes[m], zlib.crc32(m.encode()))):
            if not held or count + sizes[module] <= len(docs) / 5:
                held.add(module)
                count += sizes[module]
        for module, text in docs:
            rows["validation" if module in held else "train"].append((module, text))
    return rows


def probe_task(out: Path, words: int = 40, windows: int = 3) -> Path:
    """out/train.jsonl and out/validation.jsonl ({text, label: original | changed, module}): the first `windows`
    windows of `words` words of each docstring (8 words at least), each as a pair of rows, `original` then `changed`
    (half of its words replaced); deterministic for a given Python (the draws are seeded by the window's text)."""
    spec = json.dumps({"task": "replaced-word pairs", "words": words, "windows": windows, "python": sys.version})
    made = out / "task.json"  # written last: the task is complete, made by this recipe on this Python
    if made.is_file() and made.read_text() == spec:
        return out
    rows = module_split()
    pool = [w for _, text in rows["train"] for w in text.split()[:words * windows]]
    out.mkdir(parents=True, exist_ok=True)
    for split, docs in rows.items():
        lines = []
        for module, text in docs:
            all_words = text.split()
            for k in range(windows):
                ws = all_words[k * words:(k + 1) * words]
                if len(ws) < 8:
                    break
                rng, changed = random.Random(zlib.crc32(f"{split} {module} {k} {text}".encode())), list(ws)
                for i in rng.sample(range(len(ws)), round(0.5 * len(ws))):
                    changed[i] = rng.choice(pool)
                lines += [json.dumps({"text": " ".join(t), "label": label, "module": module})
                          for t, label in ((ws, "original"), (changed, "changed"))]
        write_atomic(out / f"{split}.jsonl", "\n".join(lines) + "\n")
    write_atomic(made, spec)
    return out


# -----------------------------------------------------------------------------
# one training: a tree's train.py in a subprocess, stopped (SIGTERM: it saves and exits) at the target or the budget

@dataclass
class Run:
    records: list = field(default_factory=list)  # its metrics.jsonl
    steps: Optional[int] = None  # to the target (the first evaluation at or below it); None: not reached
    seconds: Optional[float] = None  # training time to the target (the run's `elapsed`, evaluations included)
    flops: Optional[float] = None  # training FLOPs to the target
    final_loss: float = float("nan")  # held-out loss at the end: at the target, or the budget's last evaluation
    model: Path = Path()  # the checkpoint the probe starts from: the one at the target (else the last one)


def train_run(tree: Path, cfg_path: str, overrides: list, out: Path, budget_s: float,
              target: Optional[float] = None) -> Run:
    """Trains from scratch in `out`; stops at the first evaluation at or below `target`, or once the run's training
    time passes budget_s (SIGTERM: the trainer saves a checkpoint at the next step and exits 0). A run that stops on
    its own (max_steps, a non-finite loss) just ends. -> its records and when it reached the target."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(tree / "train.py"), cfg_path, *map(str, overrides), f"--trainer.output_dir={out}",
           "--trainer.resume_from_checkpoint=false", "--trainer.disable_tqdm=true", "--wandb.mode=disabled"]
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty run never blocks on a full pipe
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=errors, text=True)
    metrics, stopped, t0 = out / "metrics.jsonl", False, time.perf_counter()
    try:
        while proc.poll() is None:
            time.sleep(0.1)
            records = read_records(metrics)
            over = records and records[-1].get("elapsed", 0) > budget_s or time.perf_counter() - t0 > budget_s + 300
            hit = target is not None and any(r.get("eval_loss", float("inf")) <= target for r in records)
            if (over or hit) and not stopped:
                proc.send_signal(signal.SIGTERM)
                stopped = True
    finally:  # interrupted here (Ctrl-C, SIGTERM): the run goes too
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        errors.seek(0)
        err = errors.read()
        errors.close()
    require(proc.returncode == 0 or "non-finite" in err, f"`{' '.join(cmd)}` failed: {err.strip()[-800:]}")
    run = Run(records=read_records(metrics), model=out)
    evals = [r for r in run.records if "eval_loss" in r]
    first = next((r for r in evals if target is not None and r["eval_loss"] <= target), None)
    run.final_loss = first["eval_loss"] if first else evals[-1]["eval_loss"] if evals else float("nan")
    if first is not None:  # the SIGTERM lands a few steps later, at a moment that depends on the machine: use the
        run.steps, run.seconds = first["step"], first["elapsed"]  # target's evaluation and checkpoint
        run.flops = first["step"] * step_flops(out, first["tokens"] / max(first["step"], 1))
        if (out / "model_checkpoints" / str(first["step"])).is_dir():
            run.model = out / "model_checkpoints" / str(first["step"])
    return run


def read_records(path: Path) -> list:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def step_flops(run_dir: Path, tokens_per_step: float) -> float:
    """Training FLOPs per step, neobert.flops_per_token for the run's saved model section, its row length and
    masking rate (the same formula for both sides, whatever code trained them)."""
    folder = max((p for p in (run_dir / "model_checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    full = yaml.safe_load((folder / "config.yaml").read_text())
    known = {k: v for k, v in full["model"].items() if k in neobert.NeoBERTConfig.__dataclass_fields__}
    rate = (full.get("datacollator") or {}).get("mlm_probability", 0.2)
    return tokens_per_step * neobert.flops_per_token(neobert.NeoBERTConfig(**known),
                                                     full["dataset"]["max_seq_length"], rate)


def probe(run_dir: Path, task: Path, out: Path, steps: int, seed: int = 0) -> float:
    """The model fine-tuned on the probe task with a fixed recipe (evaluate.py glue, custom task; its optimizer is
    the one the checkpoint was pretrained with), -> its accuracy on the held-out modules."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "glue", "--glue.task_name", "custom", "--glue.data_dir",
           str(task), "--glue.text_columns", "text", "--glue.init_from", str(run_dir), "--trainer.output_dir", str(out),
           "--trainer.max_steps", str(steps), "--trainer.eval_steps", str(steps), "--trainer.early_stopping", "0",
           "--trainer.per_device_train_batch_size", "32", "--optimizer.lr", "1e-3", "--glue.max_seq_length", "64",
           "--trainer.seed", str(seed), "--trainer.disable_tqdm", "true", "--trainer.mixed_precision", "no"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    require(p.returncode == 0, f"the probe of {run_dir} failed: {p.stderr.strip()[-800:]}")
    return json.loads((out / "glue" / "results.json").read_text())["tasks"]["custom"]["score"]


# -----------------------------------------------------------------------------
# the sides: the working tree, and a commit (a temporary git worktree) and/or other settings

@dataclass
class Side:
    name: str  # A | B
    tree: Path  # whose train.py runs
    label: str
    overrides: list = field(default_factory=list)


def git(*args) -> str:
    p = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"git {' '.join(args)} failed")
    return p.stdout.strip()


def worktree(ref: str, tmp: Path) -> tuple:
    """(the tree of `ref` checked out in tmp/tree, its short commit); the user's tree and index are left alone."""
    try:
        git("rev-parse", "--show-toplevel")
    except UserError:
        raise UserError(f"--against {ref} needs a git checkout, and {ROOT} is not one; compare settings with "
                        "--against-overrides instead") from None
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except UserError:
        raise UserError(f"--against {ref}: not a commit, branch or tag of this repository (git rev-parse finds "
                        "none); see `git log --oneline`") from None
    git("worktree", "add", "--detach", str(tmp / "tree"), commit)
    return tmp / "tree", commit[:10]


def sides_of(args, tmp: Path) -> list:
    a = Side("A", ROOT, "the working tree")
    changed = (git("diff", "--name-only", "HEAD") + "\n" + git("ls-files", "--others", "--exclude-standard")).split() \
        if (ROOT / ".git").exists() else []  # edited and new files
    if changed:
        a.label += f" (with its uncommitted changes to {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})"
    if not (args.against or args.against_overrides):
        return [a]
    tree, label = ROOT, "the working tree"
    if args.against:
        tree, commit = worktree(args.against, tmp)
        label = f"{args.against} ({commit})"
    overrides = args.against_overrides.split()
    for key, _ in parse_overrides(overrides):  # --against-overrides: the usual --section.key value pairs
        require("." in key, f"--against-overrides {args.against_overrides!r}: use --section.key value pairs")
    return [a, Side("B", tree, label + (f" with {args.against_overrides}" if overrides else ""), overrides)]


# -----------------------------------------------------------------------------
# the report: per seed and side, the ratios with their band, the probe, one verdict

def band(values) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def verdict(results: dict, seeds: list, eval_every: int) -> list:
    """Lines: the B / A ratios to the target with their band over seeds, the probe side by side, the verdict (the
    rules: docs/speedrun.md, "The verdict"). Neither side reaching the target in any seed: the held-out losses at the
    end of the budget are compared instead."""
    A, B = ([results[side, s] for s in seeds] for side in "AB")
    lines, mean = [], lambda xs: sum(xs) / len(xs)
    if any(r.steps for r, _ in A + B):
        ratios = [(b.flops or float("inf")) / a.flops if a.flops else (0.0 if b.flops else 1.0)
                  for (a, _), (b, _) in zip(A, B)]
        tol = max(0.1, 2 * eval_every / mean([a.steps for a, _ in A if a.steps] or [eval_every]))
        for what in ("steps", "flops", "seconds"):
            pairs = [getattr(b, what) / getattr(a, what) for (a, _), (b, _) in zip(A, B)
                     if getattr(a, what) and getattr(b, what)]
            lines.append(f"B / A {what} to the target: " + (f"{mean(pairs):.2f}x (seeds: {band(pairs)})" if pairs else
                                                          "n/a (a side did not reach it)"))
        mlm = "faster" if all(r < 1 - tol for r in ratios) else "slower" if all(r > 1 + tol for r in ratios) else None
        said = f"B reaches the MLM target {mlm} than A" if mlm else f"no difference to the MLM target within noise " \
                                                                   f"(+-{tol:.0%})"
    else:
        ends = [[r.final_loss for r, _ in side] for side in (A, B)]
        noise = max(0.02, 2 * max(max(e) - min(e) for e in ends))
        d = mean(ends[1]) - mean(ends[0])
        mlm = "faster" if d < -noise else "slower" if d > noise else None
        lines.append(f"neither side reached the target: held-out loss at the end of the budget A {mean(ends[0]):.3f}, "
                     f"B {mean(ends[1]):.3f}")
        said = f"B ends {'lower' if d < 0 else 'higher'} than A on the MLM loss" if mlm else \
            f"no difference in the final MLM loss within noise (+-{noise:.3f})"
    scores = [[p for _, p in side] for side in (A, B)]
    spread = max(max(s) - min(s) for s in scores) / 2 if len(seeds) > 1 else 0.0
    threshold = 2 * max(PROBE_SD, spread) * (2 / len(seeds)) ** 0.5
    d = mean(scores[1]) - mean(scores[0])
    probe_said = "better" if d > threshold else "worse" if d < -threshold else None
    lines.append(f"probe accuracy: A {mean(scores[0]):.3f} (seeds: {band(scores[0])}), B {mean(scores[1]):.3f} "
                 f"(seeds: {band(scores[1])}); a difference counts beyond +-{threshold:.3f}")
    said += "; " + (f"B is {probe_said} on the probe" if probe_said else "no difference on the probe within noise")
    if (mlm == "faster" and probe_said == "worse") or (mlm == "slower" and probe_said == "better"):
        said += ": the two disagree (MLM loss alone would mislead here)"
    return lines + [f"verdict: {said}"]


# -----------------------------------------------------------------------------
# the command

# the held-out loss each config's speedrun aims at (measured: docs/speedrun.md). speedrun.yaml: where the probe
# rewards pretraining (AdamW ~700 steps); smoke.yaml: its 600-step schedule reaches 5.6, where the probe cannot tell
TARGETS = {"speedrun.yaml": 5.1, "smoke.yaml": 5.6}
USAGE = ("python bench.py --suite speedrun [CONFIG] [--against REF] [--against-overrides \"--section.key value ...\"] "
         "[--seeds K] [--budget-s S] [--target-loss L] [--probe-steps N] [--eval-every N] [--out DIR] "
         "[--section.key value ...]")


@dataclass
class Args:
    config: str = "configs/speedrun.yaml"
    against: Optional[str] = None
    against_overrides: str = ""
    seeds: int = 2
    budget_s: float = 240.0
    target_loss: Optional[float] = None
    probe_steps: int = 600
    eval_every: int = 25
    out: str = "runs/speedrun"
    overrides: list = field(default_factory=list)  # for both sides


def parse(argv: list) -> Args:
    """`--suite speedrun [CONFIG] [--option value ...]`; --section.key value pairs go to both sides."""
    args, rest = Args(), list(argv[2:] if argv[:1] == ["--suite"] else argv[1:])
    if {"-h", "--help"} & set(rest):
        print(f"usage: {USAGE}\n\n{__doc__}")
        raise SystemExit(0)
    if rest and not rest[0].startswith("--"):
        args.config = rest.pop(0)
    options = {f"--{f.replace('_', '-')}": f for f in Args.__dataclass_fields__ if f not in ("config", "overrides")}
    while rest:
        flag = rest.pop(0)
        if flag in options:
            require(rest, f"{flag} needs a value; usage: {USAGE}")
            name = options[flag]
            setattr(args, name, convert(rest.pop(0), {f.name: f.type for f in fields(Args)}[name], flag))
        else:
            require("." in flag, f"unknown option {flag}; usage: {USAGE}")
            args.overrides += [flag, *([rest.pop(0)] if rest and "=" not in flag else [])]
    require(args.seeds >= 1 and args.budget_s > 0 and args.probe_steps >= 1 and args.eval_every >= 1,
            "--seeds, --budget-s, --probe-steps and --eval-every must be positive")
    return args


def speedrun(argv: list) -> dict:
    """Runs the comparison (or side A alone, with neither --against nor --against-overrides) and prints the report,
    also written to OUT/speedrun.md (and the numbers to speedrun.json). -> {(side, seed): (Run, probe accuracy)}."""
    args = parse(argv)
    target = args.target_loss if args.target_loss is not None else TARGETS.get(Path(args.config).name)
    require(target is not None, f"no recorded target loss for {args.config}: pass --target-loss L (docs/speedrun.md)")
    out = Path(args.out).resolve()
    cfg = train.load_config(ROOT / args.config, args.overrides)  # an absolute CONFIG stays itself
    data_dir = prepare.prepare(cfg.dataset, cfg.tokenizer, progress=False).resolve()  # prepared once, by side A
    task = probe_task(out / "probe_task")
    fixed = [*args.overrides, f"--dataset.path={data_dir}", f"--trainer.eval_steps={args.eval_every}",
             f"--trainer.logging_steps={min(10, args.eval_every)}", f"--trainer.save_steps={args.eval_every}",
             "--trainer.save_total_limit=4"]  # a checkpoint at every evaluation: the probe starts at the target
    tmp = Path(tempfile.mkdtemp(prefix="speedrun-"))
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up as Ctrl-C does
    try:
        sides = sides_of(args, tmp)
        header = [f"speedrun: {args.config}, target held-out loss {target}, budget {args.budget_s:.0f} s of training "
                  f"per run, {args.seeds} seed(s), probe {args.probe_steps} steps (Python {sys.version_info[0]}."
                  f"{sys.version_info[1]}'s stdlib); "
                  + "; ".join(f"{s.name} = {s.label}" for s in sides), "",
                  "| side | seed | steps to target | GFLOPs to target | seconds to target | held-out loss at the end "
                  "| probe accuracy |", "|---|---:|---:|---:|---:|---:|---:|"]
        print("\n".join(header), flush=True)
        results = {}
        for seed in range(args.seeds):  # interleaved: A, B, A, B, so machine noise falls on both sides
            for side in sides:
                name = f"{side.name}-seed{seed}"
                run = train_run(side.tree, args.config, [*fixed, *side.overrides, f"--trainer.seed={seed}"],
                                out / name, args.budget_s, target)
                results[side.name, seed] = run, probe(run.model, task, out / f"{name}-probe", args.probe_steps)
                row = f"| {side.name} | {seed} | {run.steps or 'not reached'} | " \
                      f"{f'{run.flops / 1e9:,.0f}' if run.flops else '-'} | " \
                      f"{f'{run.seconds:.0f}' if run.seconds else '-'} | {run.final_loss:.3f} | " \
                      f"{results[side.name, seed][1]:.3f} |"
                header.append(row)
                print(row, flush=True)
        lines = verdict(results, list(range(args.seeds)), args.eval_every) if len(sides) == 2 else []
        print("\n" + "\n".join(lines), flush=True)
        (out / "speedrun.md").write_text("\n".join(header + [""] + lines) + "\n")
        (out / "speedrun.json").write_text(json.dumps({f"{k[0]}-{k[1]}": dict(steps=r.steps, flops=r.flops,
                                                       seconds=r.seconds, final_loss=r.final_loss, probe=p)
                                                       for k, (r, p) in results.items()}, indent=1) + "\n")
        return results
    finally:
        signal.signal(signal.SIGTERM, previous)
        if (tmp / "tree").exists():
            git("worktree", "remove", "--force", str(tmp / "tree"))
        shutil.rmtree(tmp, ignore_errors=True)
