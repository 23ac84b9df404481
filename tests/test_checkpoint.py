"""checkpoint.py: one resolver and one loader for "a model" (a run dir, a step, an exported or released folder, a hub
id), the run directory's layout, and the errors a user meets there."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import checkpoint  # noqa: E402
import neobert as nb  # noqa: E402
import prepare  # noqa: E402
from config import UserError  # noqa: E402
from test_model import randomize, small_config, write_released_folder  # noqa: E402


TOKENIZER = prepare.train_tokenizer(["a small corpus of words", "more words here"] * 3, vocab_size=60, min_frequency=1)


def write_run(run_dir: Path, steps, model, latest=None):
    """A training run's model_checkpoints/<step> folders (weights, config.yaml) and resume states."""
    for step in steps:
        checkpoint.save_model_dir(run_dir / "model_checkpoints" / str(step), model,
                                  {"model": model.config.to_dict()}, TOKENIZER)
        (run_dir / "checkpoints" / str(step)).mkdir(parents=True)
        (run_dir / "checkpoints" / str(step) / "train_state.json").write_text(json.dumps({"step": step}))
    if latest is not None:
        (run_dir / "model_checkpoints" / "latest").write_text(f"{latest}\n")


def test_released_folder_loads_every_head(tmp_path):
    cfg = small_config(max_position_embeddings=48)
    src = randomize(nb.NeoBERTLMHead(cfg)).eval()
    write_released_folder(tmp_path / "neo", src, cfg)
    m, info = checkpoint.load(str(tmp_path / "neo"), head="mlm")
    assert m.config.max_position_embeddings == 48 and m.config.hidden_act == "swiglu" and info.tokenizer is None
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    enc = checkpoint.load(str(tmp_path / "neo"), head="encoder")[0].eval()
    ids = torch.randint(1, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(enc(ids), src.model(ids))
    clf = checkpoint.load(str(tmp_path / "neo"), head="classifier", num_labels=2)[0]
    assert torch.equal(clf.model.encoder.weight, src.model.encoder.weight) and clf.num_labels == 2


def test_hub_id_goes_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub
    cfg = small_config()
    src = nb.NeoBERTLMHead(cfg)
    write_released_folder(tmp_path / "snap", src, cfg)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = checkpoint.load("chandar-lab/NeoBERT")[0]
    assert calls[0][0] == "chandar-lab/NeoBERT" and "config.json" in calls[0][1]
    assert torch.equal(m.decoder.bias, src.decoder.bias)

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)  # one line naming the repo, not a traceback
    with pytest.raises(UserError, match="download the model someone/model from the Hugging Face Hub") as e:
        checkpoint.load("someone/model", head="encoder")
    assert "\n" not in str(e.value) and "second line" in str(e.value) and "pass a local folder" in str(e.value)


def test_a_different_shape_or_a_missing_folder_is_one_clear_line(tmp_path):
    src = nb.NeoBERTLMHead(small_config(intermediate_size=512))
    with pytest.raises(UserError, match=r"ffn\.w12\.weight.*different model shape"):
        checkpoint.load_state_dict_strict(nb.NeoBERTLMHead(small_config()), src.state_dict(), "here")
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load(str(tmp_path / "missing" / "dir"))


def test_classifier_from_a_fine_tuned_folder(tmp_path):
    cfg = small_config()
    clf = randomize(nb.NeoBERTForSequenceClassification(cfg, num_labels=3))
    os.makedirs(tmp_path / "clf")
    save_file(clf.state_dict(), str(tmp_path / "clf" / "model.safetensors"))
    with open(tmp_path / "clf" / "config.json", "w") as f:
        json.dump({**cfg.to_dict(), "id2label": {"0": "a", "1": "b", "2": "c"}, "classifier_dropout": 0.3}, f)
    loaded, info = checkpoint.load(str(tmp_path / "clf"), head="classifier")
    assert loaded.num_labels == 3 and loaded.dropout.p == 0.3 and info.id2label == {0: "a", 1: "b", 2: "c"}
    assert torch.equal(loaded.classifier.weight, clf.classifier.weight) and torch.equal(loaded.dense.bias, clf.dense.bias)
    with pytest.raises(UserError, match="3 labels but num_labels=2"):
        checkpoint.load(str(tmp_path / "clf"), head="classifier", num_labels=2)


def test_resolve_run_dir_step_resume_state_and_latest(tmp_path):
    """Every way to name a model of a run lands on the same rule: latest if complete, else the highest step."""
    model = nb.NeoBERTLMHead(small_config())
    run = tmp_path / "run"
    write_run(run, [2, 4], model, latest=2)
    mc = run / "model_checkpoints"
    assert checkpoint.resolve(run) == mc / "2" and checkpoint.resolve(mc) == mc / "2"
    assert checkpoint.resolve(mc / "4") == mc / "4" and checkpoint.resolve(run / "checkpoints" / "4") == mc / "4"
    (mc / "latest").write_text("9\n")  # names a step that is gone: the highest complete one
    assert checkpoint.resolve(run) == mc / "4"
    assert checkpoint.owning_run(mc / "4") == run and checkpoint.owning_run(tmp_path) is None
    assert checkpoint.list_checkpoints(run) == [2, 4]
    assert checkpoint.find_resume("auto", run) == run / "checkpoints" / "4"
    assert checkpoint.find_resume(str(mc / "2"), run) == run / "checkpoints" / "2"
    empty = tmp_path / "empty"
    (empty / "model_checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete model checkpoint yet"):
        checkpoint.resolve(empty)


def test_truncated_weights_name_the_file(tmp_path):
    model = nb.NeoBERTLMHead(small_config())
    write_run(tmp_path / "run", [3], model)
    weights = tmp_path / "run" / "model_checkpoints" / "3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError) as e:
        checkpoint.load(str(tmp_path / "run"))
    assert str(weights) in str(e.value) and "\n" not in str(e.value)


def test_home_is_beside_the_model():
    """Where glue/ and mteb/ results go by default: the run of a training checkpoint, else runs/<name>."""
    assert checkpoint.home("chandar-lab/NeoBERT") == Path("runs/chandar-lab_NeoBERT")
    assert checkpoint.home("x/model_checkpoints/12") == Path("x")


def test_older_checkpoints_with_the_dropped_kernel_backend_key_still_load(tmp_path):
    model = nb.NeoBERTLMHead(small_config())
    folder = tmp_path / "old"
    checkpoint.save_model_dir(folder, model, {"model": {**model.config.to_dict(), "kernel_backend": "auto"}}, TOKENIZER)
    loaded = checkpoint.load(str(folder))[0]
    assert torch.equal(loaded.decoder.weight, model.decoder.weight)
