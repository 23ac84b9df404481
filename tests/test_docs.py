"""What a newcomer meets first: the README's quick start (two commands, the test one exactly what CI runs), the
command lines' help, and a repository that following the docs leaves clean."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start() -> list[str]:
    """The commands of the README's quick-start block (comment lines and trailing comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n```bash\n(.*?)```", text, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    install_and_train, tests = quick_start()
    assert "pip install" in install_and_train and "-r requirements-dev.txt" in install_and_train
    assert install_and_train.endswith("&& python train.py configs/smoke.yaml")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci[-1] == tests == "python -m pytest -q tests"
    # the install says which wheel is for which machine: PyTorch's CPU index on CPU-only machines
    text = (ROOT / "README.md").read_text()
    assert "https://download.pytorch.org/whl/cpu" in text and "GPU" in text


def test_help_starts_with_a_usage_line_and_a_closed_pipe_is_quiet():
    for script in ("train.py", "export.py", "bench.py", "evaluate.py"):
        p = subprocess.run([sys.executable, script, "-h"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.startswith("usage: python "), (script, p.stdout[:200])
    # `python train.py -h | head`: a reader that leaves early gets no BrokenPipeError traceback
    p = subprocess.run(f"{sys.executable} train.py -h | head -c 0", shell=True, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_gitignore_covers_what_the_docs_and_configs_create():
    """Every folder the README, docs/ and the configs' comments tell a user to create (--out NAME, a venv) is ignored
    by git, so following them never leaves untracked files behind."""
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    texts += [p.read_text() for p in sorted((ROOT / "configs").glob("*.yaml"))]
    created = {m for t in texts for m in re.findall(r"--out ([a-z][\w.-]*)", t)} | {".venv", "runs", "data_cache"}
    assert created >= {"hf_dir", ".venv", "hf_contrastive"} and created <= ignored, sorted(created - ignored)


def test_a_warning_of_ours_fails_the_test_run(tmp_path):
    """pytest.ini turns every warning raised by one of our modules into an error (third-party ones it filters are
    named with their reason there); a module added at the root (or tests/mission.py, run by bench.py) must join it."""
    ini = (ROOT / "pytest.ini").read_text()
    ours = re.search(r"error:::\((.*)\)\$", ini).group(1).split("|")
    assert sorted(ours) == sorted([p.stem for p in ROOT.glob("*.py")] + ["mission"])
    # the filter at work: the same warning fails a test when raised from `train`, not from another module
    for module, verdict in (("train", "1 failed"), ("somelib", "1 passed")):
        (tmp_path / "test_w.py").write_text(
            "import warnings\n\ndef test_w():\n"
            f"    exec(\"import warnings; warnings.warn('x')\", {{'__name__': {module!r}}})\n")
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                            str(ROOT / "pytest.ini"), str(tmp_path / "test_w.py")], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
        assert verdict in p.stdout, (module, p.stdout[-2000:])
