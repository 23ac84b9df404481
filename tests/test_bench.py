"""bench.py's GPU suite (python bench.py --suite gpu): the same code path end to end on CPU with a tiny model, and
the GPU checks it runs (skipped without CUDA). No test name here contains "gpu" unless it needs a GPU: the suite
runs `pytest -k gpu`."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("suite")


def test_suite_tiny_runs_end_to_end(suite_dir, tmp_path, capsys):
    """--suite gpu (the profile and the throughput table here; the mission has its own test), everything also in
    OUT/gpu-suite.md."""
    assert bench.main(["--suite", "gpu", "--tiny", "--steps", "2", "--data-dir", str(suite_dir), "--tests", "--parts",
                       "profile,throughput", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "gpu-suite.md").read_text() in out  # written as printed (after the data preparation)
    assert "attn_backend auto runs sdpa" in out and "torch.nn.attention.varlen" in out  # which backend ran
    assert re.search(r"GPU tests: `pytest .*-k gpu.*`: .*(skipped|passed)", out), out
    assert "## The profile" in out and "## Throughput" in out and "## The mission" not in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.split("## Throughput")[1].splitlines()
            if line.startswith("| ")}
    for label in ("baseline (attn_backend auto = sdpa)", "compile on", "2 micro-steps per optimizer step (as "
                  "configs/pretrain.yaml)", "chunked decoder + CE (64 positions)", "AdamW not fused",
                  "micro-batch 8 rows", "HF ModernBertForMaskedLM (same size and rows)",
                  "HF BertForMaskedLM (same size and rows)", "seq 256, 1 rows", "seq 256, gradient checkpointing"):
        assert label in rows, (label, out)
        cells = [c.strip() for c in rows[label].strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0 and cells[6].endswith("x"), rows[label]
    assert not re.search(r"failed|out of memory|skipped: the", out), out
    assert rows["baseline (attn_backend auto = sdpa)"].split("|")[7].strip() == "1.00x"


def test_suite_budget_skips_the_rest(suite_dir, tmp_path, capsys):
    assert bench.main(["--suite", "gpu", "--tiny", "--steps", "1", "--data-dir", str(suite_dir), "--no-tests",
                       "--budget-s", "0", "--parts", "throughput", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GPU tests" not in out and out.count("skipped: the 0 s budget is spent") == 11


def test_suite_only_times_the_named_rows(suite_dir, tmp_path, capsys):
    assert bench.main(["--suite", "gpu", "--tiny", "--steps", "1", "--data-dir", str(suite_dir), "--only", "seq 256",
                       "--parts", "throughput", "--out", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| seq 256, 1 rows", "| seq 256, gradient checkpointing"]
    assert all("skipped" not in r and "failed" not in r for r in rows)


def test_suite_bad_arguments_are_one_line(capsys):
    assert bench.main(["--suite", "gpu", "--steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --steps must be at least 1")
    assert bench.main(["--suite", "gpu", "--parts", "mission,speed"]) == 2
    assert capsys.readouterr().err.startswith("error: --parts takes a comma list of mission, profile and throughput")
    assert bench.main(["--suite", "recipe", "--lrs", "1e-3,fast"]) == 2
    assert capsys.readouterr().err.startswith("error: --lrs takes comma-separated numbers")
    assert bench.main(["--suite", "recipe", "--budget-s", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --budget-s and every --lrs value must be > 0")


def test_no_recompiles_after_warmup_tiny(suite_dir):
    """The check the GPU test makes on the 250M config, here on a tiny one: packed batches of varying document
    counts under torch.compile, as the trainer runs them."""
    cfg = bench.suite_config(str(ROOT / "configs" / "pretrain.yaml"), suite_dir, tiny=True)
    assert bench.recompiles_after_warmup(cfg, steps=5, warmup=3, device=torch.device("cpu")) == 0


@cuda
def test_gpu_250m_compile_has_no_recompiles_after_warmup(tmp_path):
    """20 steps of the 250M config (packed, bf16, compiled, 8 rows of 1024) on synthetic data: after 5 warm-up
    steps no batch makes torch.compile build another graph."""
    cfg = bench.suite_config(str(ROOT / "configs" / "pretrain.yaml"), tmp_path, tiny=False)
    cfg.trainer.per_device_train_batch_size = 8
    assert bench.recompiles_after_warmup(cfg, steps=20, warmup=5, device=torch.device("cuda")) == 0


def test_profile_tiny(suite_dir, tmp_path, capsys):
    """--suite profile on CPU: the categories add up to the profiled time, the largest kernels and the
    micro-benchmarks are there, in profile.md and profile.json."""
    assert bench.main(["--suite", "profile", "--tiny", "--steps", "2", "--data-dir", str(suite_dir), "--out",
                       str(tmp_path)]) == 0
    s = json.loads((tmp_path / "profile.json").read_text())
    assert (tmp_path / "profile.md").read_text() in capsys.readouterr().out
    total = sum(s["ms_per_step"].values()) + s["idle_ms_per_step"]
    assert s["ms_per_step"]["GEMMs"] > 0 and s["ms_per_step"]["attention"] > 0 and s["ms_per_step"]["optimizer"] > 0
    assert 0.5 * s["wall_ms_per_step"] <= total <= 1.5 * s["wall_ms_per_step"], (total, s["wall_ms_per_step"])
    assert any("aten::mm" in name for name, _ in s["largest"]) and len(s["largest"]) == 20
    micro = {what: (rate, unit) for what, _, rate, unit in s["micro"]}
    assert {"matmul qkv", "matmul decoder", "attention sdpa, forward + backward", "device copy (read + write)"} <= \
        set(micro) and all(rate > 0 for rate, _ in micro.values()) and micro["device copy (read + write)"][1] == "GB/s"


def test_mission_tiny(tmp_path, capsys):
    """--suite mission on CPU with a tiny model: every part passes, each row printed and written as it finishes."""
    assert bench.main(["--suite", "mission", "--tiny", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "mission.md").read_text()
    assert report in capsys.readouterr().out and "MISMATCH" not in report
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines()[2:]}
    assert list(rows) == ["pretraining, kill -9, exact resume", "contrastive fine-tuning, gradient caching",
                          "GLUE, a custom task", "MTEB, a local BEIR folder",
                          "export, transformers, sentence-transformers"]
    assert "losses bitwise equal" in rows["pretraining, kill -9, exact resume"]
    assert "embed as we do" in rows["export, transformers, sentence-transformers"]
