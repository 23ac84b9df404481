"""export.py: the Hugging Face folder loads in transformers and sentence-transformers and computes what neobert.py does.

transformers and sentence-transformers are test dependencies only (CI pins them in requirements-dev.txt).
"""

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402
import prepare  # noqa: E402
import config  # noqa: E402
import export  # noqa: E402
import neobert  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM,  # noqa: E402
                          AutoModelForSequenceClassification, AutoTokenizer)

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Encoders read the whole sentence in both directions at once.",
    "Masked language models predict the hidden words from their context.",
    "NeoBERT is a modern BERT with rotary embeddings and SwiGLU.",
    "Hello world, this is a short test!",
    "Padding and attention masks must not change the real tokens.",
]
TEXTS = ["hello world", "The lazy dog sleeps; the quick fox does not.", "a",
         "masked words, rotary embeddings, encoders"]


# -----------------------------------------------------------------------------
# fixtures: a tokenizer, tiny checkpoints in the run-dir layout, their exports


@pytest.fixture(scope="module")
def tokenizer():
    return prepare.train_tokenizer(SENTENCES * 4, vocab_size=300, min_frequency=1)


def tiny_config(tokenizer, **kw):
    base = dict(vocab_size=tokenizer.get_vocab_size() + 20, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=160, max_position_embeddings=128)
    base.update(kw)
    return neobert.NeoBERTConfig(**base)


def randomize(model, seed=0):
    """Every tensor away from its init (norms off 1, biases off 0), so a loader that re-initialises shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def write_checkpoint(run_dir: Path, step: int, model, tokenizer, latest=True, extra=None) -> Path:
    """RUN/model_checkpoints/<step> as train.py writes it (the GLUE and MTEB tests use it too); `extra` adds or
    replaces top-level sections of its config.yaml."""
    d = run_dir / "model_checkpoints" / str(step)
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    full = {"model": model.config.to_dict(), "tokenizer": {"train": True, "vocab_size": 300},
            "dataset": {"name": "toy-sentences", "max_seq_length": 64}, "trainer": {"max_steps": step},
            **(extra or {})}
    (d / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    tokenizer.save(str(d / "tokenizer.json"))
    if latest:
        (run_dir / "model_checkpoints" / "latest").write_text(f"{step}\n")
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """A run dir with two model checkpoints (latest = 20), logged metrics and an evaluation results file."""
    run_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    old = randomize(neobert.NeoBERTLMHead(tiny_config(tokenizer)), seed=1)
    model = randomize(neobert.NeoBERTLMHead(tiny_config(tokenizer)), seed=2)
    write_checkpoint(run_dir, 10, old, tokenizer)
    write_checkpoint(run_dir, 20, model, tokenizer)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in (10, 20):
            f.write(json.dumps({"step": step, "loss": 5.0 - step / 10, "tokens": step * 512}) + "\n")
        f.write(json.dumps({"step": 20, "eval_loss": 4.25, "eval_accuracy": 0.125}) + "\n")
    (run_dir / "glue_results.json").write_text(json.dumps({"cola": {"matthews_correlation": 0.123}}))
    return run_dir, model


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "hf"
    export.export(run[0], out)
    return out


def padded_batch(folder):
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding"
    return batch


def assert_close(a, b, tol=1e-5):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# what the folder holds


def test_folder_files(folder, run):
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert names == {"config.json", "model.safetensors", export.MODELING_FILE_NAME, "neobert.py", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "modules.json", "sentence_bert_config.json",
                     "config_sentence_transformers.json", "1_Pooling/config.json", "README.md"}
    assert [p.name for p in folder.parent.iterdir()] == ["hf"], "a temporary folder was left behind"

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "neobert" and cfg["architectures"] == ["NeoBERTLMHead"]
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM",
                                    "AutoModelForSequenceClassification"}
    assert all(v.startswith("modeling_neobert.") for v in cfg["auto_map"].values())
    assert "max_length" not in cfg and cfg["max_position_embeddings"] == 128
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.50's pipelines need it
    assert checkpoint.config_from_hf(cfg) == run[1].config

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    weights = load_file(str(folder / "model.safetensors"))
    expected = run[1].state_dict()
    assert set(weights) == set(expected)
    assert all(k.startswith(("model.", "decoder.")) for k in weights)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)

    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tc["model_input_names"] == ["input_ids", "attention_mask"]
    assert tc["model_max_length"] == 128
    assert {tc[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")} == \
        {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    assert json.loads((folder / "special_tokens_map.json").read_text())["mask_token"] == "[MASK]"

    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer",
                                            "sentence_transformers.models.Pooling"]
    st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert st_config["model_type"] == "SentenceTransformer" and st_config["similarity_fn_name"] == "cosine"
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    assert pooling["word_embedding_dimension"] == 64


def test_model_card(folder):
    card = (folder / "README.md").read_text()
    assert "## Architecture" in card and "| layers | 2 |" in card and "SwiGLU" in card and "RMSNorm" in card
    assert "toy-sentences" in card  # the data
    assert "hidden_size: 64" in card and "max_steps: 20" in card  # the training config
    assert "eval_loss" in card and "4.25" in card  # the last evaluation in metrics.jsonl
    assert "glue_results.json" in card and "0.123" in card  # a results file of the run


def test_model_card_names_the_tokenizer_that_was_used(run, tmp_path, tokenizer):
    """A run that trained its own WordPiece (tokenizer.train) has the default `name: bert-base-uncased` in its
    config.yaml: the card says what was used (its kind, size and origin) and shows only the keys that chose it."""
    trained = {"name": "bert-base-uncased", "path": None, "train": True, "vocab_size": 300, "min_frequency": 1}
    write_checkpoint(tmp_path / "trained", 1, run[1], tokenizer, extra={"tokenizer": trained})
    export.export(tmp_path / "trained", tmp_path / "hf_trained")
    card = (tmp_path / "hf_trained" / "README.md").read_text()
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    assert f"- tokenizer: WordPiece, {size:,} tokens, trained on the dataset" in card
    assert "bert-base-uncased" not in card and "train: true" in card and "min_frequency: 1" in card
    named = {"name": "org/some-tokenizer", "path": None, "train": False, "vocab_size": 30522}
    write_checkpoint(tmp_path / "named", 1, run[1], tokenizer, extra={"tokenizer": named})
    export.export(tmp_path / "named", tmp_path / "hf_named")
    card = (tmp_path / "hf_named" / "README.md").read_text()
    assert f"- tokenizer: WordPiece, {size:,} tokens, `org/some-tokenizer`" in card
    assert "tokenizer:\n  name: org/some-tokenizer\n" in card and "vocab_size: 30522" not in card


def test_model_card_step(folder, run, tmp_path):
    assert "(training step 20)" in (folder / "README.md").read_text()
    best = tmp_path / "best"  # a checkpoint folder copied out of its run: its name is not a step
    best.mkdir()
    for name in ("model.safetensors", "config.yaml", "tokenizer.json"):
        (best / name).write_bytes((run[0] / "model_checkpoints" / "20" / name).read_bytes())
    export.export(best, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "training step" not in card and "No evaluation results" in card


def test_model_card_skips_model_folders_in_the_run(run, tmp_path, tokenizer):
    run_dir = tmp_path / "run"  # an export inside the run dir, exported again: its JSON files are not results
    write_checkpoint(run_dir, 1, run[1], tokenizer)
    (run_dir / "results").mkdir()
    (run_dir / "results" / "mteb_sts.json").write_text(json.dumps({"spearman": 0.5}))
    export.export(run_dir, run_dir / "hf")
    export.export(run_dir, run_dir / "hf", force=True)
    card = (run_dir / "hf" / "README.md").read_text()
    assert "results/mteb_sts.json" in card and "hf/" not in card and "modules.json" not in card


def test_newest_complete_checkpoint(run, tmp_path, tokenizer):
    run_dir, model = run
    assert checkpoint.resolve(run_dir) == run_dir / "model_checkpoints" / "20"  # model_checkpoints/latest
    assert checkpoint.resolve(run_dir / "model_checkpoints" / "10") == run_dir / "model_checkpoints" / "10"

    other = tmp_path / "run"  # no latest file, an incomplete newer step, a temporary dir of the trainer
    write_checkpoint(other, 5, model, tokenizer, latest=False)
    write_checkpoint(other, 7, model, tokenizer, latest=False)
    (other / "model_checkpoints" / "9").mkdir()
    (other / "model_checkpoints" / "9" / "model.safetensors").write_bytes(b"")
    (other / "model_checkpoints" / "11.tmp-123").mkdir()
    assert checkpoint.resolve(other) == other / "model_checkpoints" / "7"
    (other / "model_checkpoints" / "latest").write_text("5\n")
    assert checkpoint.resolve(other) == other / "model_checkpoints" / "5"
    (other / "model_checkpoints" / "latest").write_text("42\n")  # names a step that is gone: the newest complete
    assert checkpoint.resolve(other) == other / "model_checkpoints" / "7"
    (other / "checkpoints" / "5").mkdir(parents=True)  # resume state: the model checkpoint beside it, as init_from
    assert checkpoint.resolve(other / "checkpoints" / "5") == other / "model_checkpoints" / "5"
    # export resolves with the one rule (checkpoint.resolve): a missing local path says so
    with pytest.raises(config.UserError, match="runs/mistyped is not a model folder: it does not exist"):
        checkpoint.resolve(tmp_path / "runs" / "mistyped")


# -----------------------------------------------------------------------------
# transformers and sentence-transformers load it and compute what neobert.py does


def test_auto_classes_match_neobert(folder, run):
    model = run[1]
    batch = padded_batch(folder)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.model_type == "neobert" and config.max_position_embeddings == 128
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(encoder).__name__ == "NeoBERT" and type(mlm).__name__ == "NeoBERTLMHead"
    for k, v in mlm.state_dict().items():  # nothing re-initialised over the loaded weights
        assert torch.equal(v, model.state_dict()[k]), k
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    with torch.no_grad():
        want_h = model.model(ids, mask)
        want = model(ids, mask).logits
        want_loss = model(ids, mask, labels=labels).loss
        assert_close(encoder(**batch).last_hidden_state, want_h)
        out = mlm(**batch, labels=labels)
        assert_close(out.logits, want)
        assert abs(out.loss.item() - want_loss.item()) < 1e-5
        # token_type_ids and unknown keyword arguments are accepted
        assert_close(encoder(**batch, token_type_ids=torch.zeros_like(ids), foo=1).last_hidden_state, want_h)
        assert len(encoder(**batch, output_hidden_states=True).hidden_states) == 3
        assert_close(encoder(ids, mask, return_dict=False)[0], want_h)


def test_sequence_classification(folder, run):
    model = run[1]
    batch = padded_batch(folder)
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=3).eval()
    assert type(clf).__name__ == "NeoBERTForSequenceClassification"
    sd = clf.state_dict()
    for k, v in model.model.state_dict().items():
        assert torch.equal(sd["model." + k], v), k
    assert 0.01 < clf.classifier.weight.std().item() < 0.03  # a fresh head: normal(0, 0.02)
    ref = neobert.NeoBERTForSequenceClassification(model.config, num_labels=3).eval()
    ref.load_state_dict(sd)
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        out, want = clf(**batch, labels=labels), ref(batch["input_ids"], batch["attention_mask"], labels=labels)
    assert_close(out.logits, want.logits)
    assert abs(out.loss.item() - want.loss.item()) < 1e-5
    reg = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=1).eval()
    ref1 = neobert.NeoBERTForSequenceClassification(model.config, num_labels=1).eval()
    ref1.load_state_dict(reg.state_dict())
    target = torch.tensor([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        assert abs(reg(**batch, labels=target).loss.item() -
                   ref1(batch["input_ids"], batch["attention_mask"], labels=target).loss.item()) < 1e-5


@pytest.mark.parametrize("trust", [True, False])
def test_tokenizer_ids(folder, tokenizer, trust, capfd):
    """The tokenizer is a standard one: it loads without the model's code too (trust_remote_code=False: no question
    asked; transformers 5's AutoTokenizer reads config.json first, whose AutoConfig is remote code)."""
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    assert "Do you wish to run the custom code" not in capfd.readouterr().out
    got = tok(TEXTS + ["Unseen Wörds, ÜBER-long tokens!!", "two\nlines\tand  spaces"])["input_ids"]
    want = [e.ids for e in tokenizer.encode_batch(TEXTS + ["Unseen Wörds, ÜBER-long tokens!!",
                                                           "two\nlines\tand  spaces"])]
    assert got == want
    ids = prepare.special_token_ids(tokenizer)
    assert all(g[0] == ids["cls"] and g[-1] == ids["sep"] for g in got)
    assert (tok.pad_token_id, tok.mask_token_id, tok.cls_token_id, tok.sep_token_id, tok.unk_token_id) == \
        (ids["pad"], ids["mask"], ids["cls"], ids["sep"], ids["unk"])
    assert tok.model_max_length == 128 and "token_type_ids" not in tok("a b")


def test_sentence_transformers_mean_pooling(folder, run):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    got = model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    batch = padded_batch(folder)
    with torch.no_grad():
        h = run[1].model(batch["input_ids"], batch["attention_mask"])
    assert_close(got.cpu(), neobert.pool(h, batch["attention_mask"], "mean"))


def test_packed_batches(folder, run):
    """cu_seqlens (the trainer's packed layout) in the modeling file: SDPA with a block-diagonal mask on CPU."""
    mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(5, 200, (2, 12))
    cu = torch.tensor([0, 5, 12, 20, 24], dtype=torch.int32)
    with torch.no_grad():
        want = run[1](ids, cu_seqlens=cu, max_seqlen=8).logits
        assert_close(mlm(input_ids=ids, cu_seqlens=cu, max_seqlen=8).logits, want)


def test_inputs_longer_than_the_context_are_a_clear_error(folder, run):
    """As neobert.py: more than max_position_embeddings tokens is a ValueError naming it, not a silent extrapolation."""
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(5, 200, (1, 129))
    with torch.no_grad():
        assert encoder(input_ids=ids[:, :128]).last_hidden_state.shape == (1, 128, 64)  # the full context is fine
        with pytest.raises(ValueError, match="max_position_embeddings=128"):
            encoder(input_ids=ids)
        with pytest.raises(ValueError, match="max_position_embeddings=128"):
            run[1].model(ids)


def test_transformers_model_api(folder, run):
    """What transformers' own code calls: loading reports, resize_token_embeddings, config.return_dict, fill-mask."""
    _, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the MLM decoder is not reported to users
    _, info = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not info["unexpected_keys"] and set(info["missing_keys"]) == {"dense.weight", "dense.bias",
                                                                          "classifier.weight", "classifier.bias"}

    mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    V = mlm.config.vocab_size
    old = mlm.decoder.weight.detach().clone()
    mlm.resize_token_embeddings(V + 8)  # new tokens need decoder rows as well: the decoder is untied, not skipped
    assert mlm.model.encoder.weight.shape[0] == V + 8 and mlm.decoder.weight.shape[0] == V + 8
    assert mlm.decoder.bias.shape[0] == V + 8 and torch.equal(mlm.decoder.weight[:V], old)
    assert mlm.decoder.weight.data_ptr() != mlm.model.encoder.weight.data_ptr()
    ids = torch.tensor([[2, V + 3, 10, 3]])
    with torch.no_grad():
        assert mlm(input_ids=ids, labels=ids).logits.shape == (1, 4, V + 8)

    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True, return_dict=False).eval()
    ids = torch.tensor([[2, 10, 11, 3]])
    with torch.no_grad():
        out, want = encoder(input_ids=ids), run[1].model(ids)
    assert isinstance(out, tuple)
    assert_close(out[0], want)
    # attn_implementation="sdpa", as embedding libraries pass it, is accepted (the modeling file always uses SDPA)
    sdpa = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert_close(sdpa(input_ids=ids).last_hidden_state, want)

    fill = transformers.pipeline("fill-mask", model=str(folder), trust_remote_code=True)
    tok = fill.tokenizer
    text = f"the quick brown {tok.mask_token} jumps"
    result = fill(text, top_k=3)
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the pipeline's top 3 are neobert.py's (a fixed check: the weights are random)
        want = run[1](ids).logits[0, (ids[0] == tok.mask_token_id).nonzero()[0, 0]].softmax(-1).topk(3)
    assert [r["token"] for r in result] == want.indices.tolist()
    assert all(abs(r["score"] - p) < 1e-5 for r, p in zip(result, want.values.tolist()))


def test_trainer_gradient_accumulation_loss_scale(folder):
    """transformers' Trainer passes num_items_in_batch to a forward that takes **kwargs and then does not divide the
    loss by the accumulation steps: the MLM loss must divide its sum by that count, the other heads must opt out
    (accepts_loss_kwargs False), or every accumulated step's gradient is gradient_accumulation_steps times too big."""
    mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
    clf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2).eval()
    assert mlm.accepts_loss_kwargs is True and clf.accepts_loss_kwargs is False
    assert AutoModel.from_pretrained(folder, trust_remote_code=True).accepts_loss_kwargs is False
    batch = padded_batch(folder)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.where(mask.bool() & (torch.arange(ids.shape[1]) % 2 == 1), ids, -100)
    n = int((labels != -100).sum())
    with torch.no_grad():
        full = mlm(**batch, labels=labels).loss  # the mean over the whole batch's predicted tokens
        halves = sum(mlm(input_ids=ids[i:i + 2], attention_mask=mask[i:i + 2], labels=labels[i:i + 2],
                         num_items_in_batch=torch.tensor(n)).loss for i in (0, 2))
    assert abs(full.item() - halves.item()) < 1e-5


# -----------------------------------------------------------------------------
# the other direction: neobert.py loads exported and released folders


def test_from_pretrained_roundtrip(folder, run, tmp_path):
    expected = run[1].state_dict()
    loaded = checkpoint.load(str(folder))[0].state_dict()
    assert list(loaded) == list(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)

    # a folder laid out like chandar-lab/NeoBERT: max_length, hidden_act "SwiGLU", dim_head, kwargs, *_init_range
    released = tmp_path / "released"
    released.mkdir()
    c = run[1].config
    (released / "config.json").write_text(json.dumps({
        "architectures": ["NeoBERTLMHead"],
        "auto_map": {"AutoConfig": "modeling_neobert.NeoBERTConfig", "AutoModel": "modeling_neobert.NeoBERT",
                     "AutoModelForMaskedLM": "modeling_neobert.NeoBERTLMHead"},
        "classifier_init_range": 0.02, "decoder_init_range": 0.02, "embedding_init_range": 0.02,
        "dim_head": c.head_dim, "hidden_act": "SwiGLU", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "kwargs": {"trust_remote_code": True}, "max_length": 128,
        "model_type": "neobert", "norm_eps": 1e-05, "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers, "pad_token_id": 0, "torch_dtype": "float32",
        "transformers_version": "4.48.2", "vocab_size": c.vocab_size}))
    for name in ("model.safetensors", export.MODELING_FILE_NAME, "neobert.py"):
        (released / name).write_bytes((folder / name).read_bytes())
    loaded = checkpoint.load(str(released))[0]
    assert loaded.config.max_position_embeddings == 128
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    # and the exported modeling file reads the released config.json as well
    mlm = AutoModelForMaskedLM.from_pretrained(released, trust_remote_code=True).eval()
    assert mlm.config.max_position_embeddings == 128
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        assert_close(mlm(input_ids=ids).logits, run[1](ids).logits)


# -----------------------------------------------------------------------------
# variants: learned positions, LayerNorm, GELU MLP, dropout; and the smoke config's own checkpoint


def test_variant_learned_positions_layernorm_gelu(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(tokenizer, rope=False, rms_norm=False, hidden_act="gelu", dropout=0.1)
    model = randomize(neobert.NeoBERTLMHead(cfg), seed=3)
    # also: a tokenizer.json without a post-processor gets BERT's [CLS] a [SEP] in the export
    plain = json.loads(tokenizer.to_str())
    plain["post_processor"] = None
    plain = Tokenizer.from_str(json.dumps(plain))
    write_checkpoint(tmp_path / "run", 3, model, plain)
    export.export(tmp_path / "run", tmp_path / "hf")
    ids = prepare.special_token_ids(tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert hf_tok(TEXTS)["input_ids"] == [[ids["cls"]] + e.ids + [ids["sep"]] for e in plain.encode_batch(TEXTS)]
    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    batch = padded_batch(tmp_path / "hf")
    with torch.no_grad():
        want = model(batch["input_ids"], batch["attention_mask"]).logits
        assert_close(mlm(**batch).logits, want)
        # a left-padded batch (padding_side="left") puts the real tokens at positions 0..len-1 too: with learned
        # positions, counting positions from the row start would give other logits
        left = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True, padding_side="left")
        lb = left(TEXTS, padding=True, return_tensors="pt")
        assert (lb["attention_mask"][:, 0] == 0).any()
        got = mlm(**lb).logits
    for i in range(len(TEXTS)):
        assert_close(got[i][lb["attention_mask"][i].bool()], want[i][batch["attention_mask"][i].bool()])
    assert "LayerNorm" in (tmp_path / "hf" / "README.md").read_text()
    back = checkpoint.load(str(tmp_path / "hf"))[0]
    assert back.config == cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_export_of_a_smoke_training_run(tmp_path):
    """configs/smoke.yaml, cut to a few steps of a tiny model, trained by train.main; then exported and loaded."""
    train = pytest.importorskip("train")
    run_dir = tmp_path / "run"
    rc = train.main([str(ROOT / "configs" / "smoke.yaml"),
                     "--trainer.output_dir", str(run_dir), "--dataset.path", str(tmp_path / "data"),
                     "--dataset.max_documents", "300", "--dataset.eval_samples", "60",
                     "--dataset.max_seq_length", "64", "--trainer.per_device_eval_batch_size", "2",
                     "--tokenizer.vocab_size", "600", "--model.vocab_size", "640", "--model.hidden_size", "32",
                     "--model.num_hidden_layers", "2", "--model.num_attention_heads", "2",
                     "--model.intermediate_size", "64", "--model.max_position_embeddings", "64",
                     "--trainer.per_device_train_batch_size", "4", "--trainer.max_steps", "2",
                     "--trainer.save_steps", "2", "--trainer.eval_steps", "2", "--trainer.logging_steps", "1"])
    assert rc in (0, None)
    assert export.main([str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    step_dir = run_dir / "model_checkpoints" / "2"
    trained = load_file(str(step_dir / "model.safetensors"))
    model = checkpoint.load(str(tmp_path / "hf"))[0].eval()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    batch = padded_batch(tmp_path / "hf")
    raw = Tokenizer.from_file(str(step_dir / "tokenizer.json"))  # the tokenizer data.py trained for this run
    assert [e.ids for e in raw.encode_batch(TEXTS)] == \
        [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    with torch.no_grad():
        assert_close(mlm(**batch).logits, model(batch["input_ids"], batch["attention_mask"]).logits)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "eval_loss" in card and "max_documents: 300" in card


# -----------------------------------------------------------------------------
# bad input: a clear error, exit 2, no traceback, nothing written


def run_main(argv, capsys):
    code = export.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return code, err


def test_no_checkpoint(tmp_path, capsys):
    code, err = run_main([tmp_path / "nowhere", "--out", tmp_path / "hf"], capsys)
    assert code == 2 and str(tmp_path / "nowhere") in err
    (tmp_path / "empty_run" / "model_checkpoints").mkdir(parents=True)
    code, err = run_main([tmp_path / "empty_run", "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "no model checkpoint in" in err and str(tmp_path / "empty_run") in err
    assert not (tmp_path / "hf").exists()


def test_incomplete_or_mismatched_checkpoint(run, tmp_path, capsys, tokenizer):
    src = run[0] / "model_checkpoints" / "20"
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    code, err = run_main([half, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "config.yaml" in err
    (half / "config.yaml").write_text((src / "config.yaml").read_text())  # then the tokenizer is what is missing
    code, err = run_main([half, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "tokenizer.json" in err and str(half) in err

    wrong = tmp_path / "wrong"  # weights of another shape than config.yaml says
    model = neobert.NeoBERTLMHead(tiny_config(tokenizer, hidden_size=32, num_attention_heads=2))
    d = write_checkpoint(wrong, 1, model, tokenizer)
    (d / "config.yaml").write_text((src / "config.yaml").read_text())
    code, err = run_main([wrong, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "model.encoder.weight" in err and "shape" in err

    no_mask = json.loads(tokenizer.to_str())  # a tokenizer without [MASK]
    no_mask["added_tokens"] = [t for t in no_mask["added_tokens"] if t["content"] != "[MASK]"]
    del no_mask["model"]["vocab"]["[MASK]"]
    d = write_checkpoint(tmp_path / "nomask", 1, run[1], tokenizer)
    (d / "tokenizer.json").write_text(json.dumps(no_mask))
    code, err = run_main([d, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "[MASK]" in err and "tokenizer.json" in err
    assert not (tmp_path / "hf").exists()


def test_out_exists(run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, err = run_main([run[0], "--out", out], capsys)
    assert code == 2 and "--force" in err and str(out) in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert export.main([str(run[0]), "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    code, err = run_main([run[0], "--out", run[0], "--force"], capsys)  # never replace the run being exported
    assert code == 2 and (run[0] / "model_checkpoints" / "20" / "model.safetensors").is_file()


def test_out_is_the_current_folder(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old export")
    monkeypatch.chdir(out)
    assert export.main([str(run[0]), "--out", ".", "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left, inside or beside


def test_bad_yaml_is_one_line(run, tmp_path, capsys, tokenizer):
    d = write_checkpoint(tmp_path / "run", 1, run[1], tokenizer)
    (d / "config.yaml").write_text("model: [\n")
    code, err = run_main([d, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "config.yaml is not valid YAML" in err and err.count("\n") == 1


def test_interrupted_write_leaves_nothing(run, tmp_path, capsys, monkeypatch):
    (tmp_path / "hf").mkdir()  # interrupted while swapping the new folder in: the old one is put back
    (tmp_path / "hf" / "old.txt").write_text("old export")
    real_replace = os.replace

    def interrupted_swap(src, dst):
        if ".hf.tmp-" in str(src):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", interrupted_swap)
    code, err = run_main([run[0], "--out", tmp_path / "hf", "--force"], capsys)
    assert code == 130
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["hf", "hf/old.txt"]
    monkeypatch.setattr(export.os, "replace", real_replace)
    (tmp_path / "hf" / "old.txt").unlink()
    (tmp_path / "hf").rmdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", interrupted)
    code, err = run_main([run[0], "--out", tmp_path / "hf"], capsys)
    assert code == 130
    assert list(tmp_path.iterdir()) == []  # neither hf nor its temporary folder

    def terminated(*args, **kwargs):  # `kill` (SIGTERM) half-way through: cleaned up as an interrupt
        assert callable(signal.getsignal(signal.SIGTERM)), "export.main does not handle SIGTERM"  # else pytest dies
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export, "save_file", terminated)
    code, err = run_main([run[0], "--out", tmp_path / "hf"], capsys)
    assert code == 130 and list(tmp_path.iterdir()) == []

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("old export")
    code, err = run_main([run[0], "--out", tmp_path / "hf", "--force"], capsys)
    assert code == 2 and "No space left" in err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["hf", "hf/old.txt"]


def test_command_line(run, tmp_path):
    cmd = [sys.executable, str(ROOT / "export.py"), str(tmp_path / "missing"), "--out", str(tmp_path / "hf")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
    assert "missing" in p.stderr and not (tmp_path / "hf").exists()


# -----------------------------------------------------------------------------
# one copy of the model: the folder runs neobert.py itself


def test_folder_runs_the_repos_neobert_py(folder):
    assert (folder / "neobert.py").read_bytes() == (ROOT / "neobert.py").read_bytes()
    thin = (folder / export.MODELING_FILE_NAME).read_text()
    assert thin == (ROOT / export.MODELING_FILE_NAME).read_text()  # the repo's adapter, copied
    assert "from .neobert import" in thin  # transformers copies relative imports of remote code along with it
    for math in ("scaled_dot_product_attention", "rsqrt", "silu", "theta", "nn.Linear("):
        assert math not in thin, f"the modeling file computes {math} itself: the model belongs to neobert.py"
    assert len(thin.splitlines()) < 200
    mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)
    encoder = type(mlm.model)
    assert encoder.__name__ == "NeoBERT" and encoder.__module__.endswith(".neobert")  # the folder's neobert.py
    assert (Path(sys.modules[encoder.__module__].__file__).read_bytes() == (ROOT / "neobert.py").read_bytes())


@pytest.mark.parametrize("rope", [True, False])
def test_left_padding_equals_unpadded(tokenizer, rope):
    """Left padding is the adapter's (modeling_neobert.py): real tokens keep positions 0..n-1, as unpadded."""
    import modeling_neobert
    cfg = tiny_config(tokenizer, rope=rope)
    model = randomize(modeling_neobert.NeoBERT(modeling_neobert.NeoBERTConfig(**cfg.to_dict())))
    seq = torch.randint(5, cfg.vocab_size, (6,))
    ids = torch.zeros(1, 10, dtype=torch.long)
    ids[0, 4:] = seq
    with torch.no_grad():
        padded = model(ids, attention_mask=(ids != 0).long()).last_hidden_state[0, 4:]
        assert torch.allclose(padded, model(seq[None]).last_hidden_state[0], atol=1e-5, rtol=1e-5)


def test_packed_flat_1d_input(tokenizer):
    """A flat (T,) packed sequence is the adapter's (transformers callers pass one): row 0 of (1, T)."""
    import modeling_neobert
    cfg = tiny_config(tokenizer)
    model = randomize(modeling_neobert.NeoBERT(modeling_neobert.NeoBERTConfig(**cfg.to_dict())))
    a, b = torch.randint(5, cfg.vocab_size, (5,)), torch.randint(5, cfg.vocab_size, (8,))
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    with torch.no_grad():
        out = model(torch.cat([a, b]), cu_seqlens=cu, max_seqlen=8).last_hidden_state[0]
        assert torch.allclose(out[5:], model(b[None]).last_hidden_state[0], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_and_hidden_states_with_learned_positions(tokenizer):
    """The adapter's inputs_embeds and output_hidden_states, exactly: learned positions are added to inputs_embeds
    too, hidden_states[0] is the embeddings and the last one, normed, is the output."""
    import modeling_neobert
    cfg = tiny_config(tokenizer, rope=False)
    model = randomize(modeling_neobert.NeoBERT(modeling_neobert.NeoBERTConfig(**cfg.to_dict())))
    enc = model.model
    ids = torch.randint(5, cfg.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        want = model(ids, mask).last_hidden_state
        assert torch.equal(want, enc(ids, mask))  # neobert.py's own forward
        assert torch.equal(model(inputs_embeds=enc.encoder(ids), attention_mask=mask).last_hidden_state, want)
        out = model(ids, mask, output_hidden_states=True)
    assert torch.equal(out.last_hidden_state, want) and len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], enc.encoder(ids) + enc.positional_embedding(torch.arange(7)))
    assert torch.equal(enc.layer_norm(out.hidden_states[-1]), want)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=enc.encoder(ids))


def test_inputs_embeds_and_hidden_states(folder, run):
    model = run[1]
    batch = padded_batch(folder)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        want = model.model(ids, mask)
        embeds = encoder.get_input_embeddings()(ids)
        assert_close(encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, want)
        out = encoder(**batch, output_hidden_states=True)
        mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert_close(mlm(inputs_embeds=embeds, attention_mask=mask).logits, model(ids, mask).logits)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert_close(out.hidden_states[0], model.model.encoder(ids))  # the embeddings, then every block's output
    assert_close(model.model.layer_norm(out.hidden_states[-1]), want)
    assert encoder(**batch).hidden_states is None


def test_from_config_initialises_as_neobert(folder, run):
    """A model built from the config alone (transformers 5 builds on the meta device): neobert.py's init and rope."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    mlm = AutoModelForMaskedLM.from_config(config, trust_remote_code=True).eval()
    r = run[1].config.init_range
    for name, p in mlm.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # uniform(-r, r): inside the range and spread over it
            assert p.abs().max() <= r and p.std() > 0.4 * r, name
    cos, sin = neobert.rope_tables(run[1].config.head_dim, run[1].config.max_position_embeddings)
    assert torch.equal(mlm.model.rope_cos, cos) and torch.equal(mlm.model.rope_sin, sin)
    ref = neobert.NeoBERTLMHead(run[1].config).eval()
    ref.load_state_dict(mlm.state_dict())
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        assert_close(mlm(input_ids=ids).logits, ref(ids).logits)
    clf = AutoModelForSequenceClassification.from_config(config, trust_remote_code=True)
    assert 0.01 < clf.dense.weight.std().item() < 0.03 and torch.equal(clf.classifier.bias, torch.zeros(2))


def test_bf16_load(folder, run):
    kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True, **{kwarg: torch.bfloat16}).eval()
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    cos, _ = neobert.rope_tables(run[1].config.head_dim, run[1].config.max_position_embeddings)
    assert torch.allclose(encoder.model.rope_cos.float(), cos, atol=4e-3)  # recomputed, not left uninitialised
    batch = padded_batch(folder)
    with torch.no_grad():
        got = encoder(**batch).last_hidden_state
        want = run[1].model(batch["input_ids"], batch["attention_mask"])
    assert got.dtype == torch.bfloat16
    m = batch["attention_mask"].bool()
    assert ((got.float() - want)[m].norm() / want[m].norm()).item() < 3e-2


def test_gradient_checkpointing_gives_the_same_gradients(folder):
    batch = padded_batch(folder)
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    grads = []
    for checkpointing in (False, True):
        mlm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).train()
        if checkpointing:
            mlm.gradient_checkpointing_enable()
            assert mlm.is_gradient_checkpointing and mlm.model.gradient_checkpointing
        mlm(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in mlm.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_fine_tune_save_and_reload(folder, run, tmp_path):
    """The classifier fine-tuned a few steps in transformers, saved (neobert.py travels with it), reloaded by
    transformers and by neobert.py."""
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=3).train()
    batch = padded_batch(folder)
    labels = torch.tensor([0, 2, 1, 1])
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = clf(**batch, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    clf.eval()
    clf.save_pretrained(tmp_path / "ft")
    assert (tmp_path / "ft" / "neobert.py").read_bytes() == (ROOT / "neobert.py").read_bytes()
    with torch.no_grad():
        want = clf(**batch).logits
        back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft", trust_remote_code=True).eval()
        assert_close(back(**batch).logits, want)
        ours = checkpoint.load(str(tmp_path / "ft"), head="classifier")[0].eval()
        assert_close(ours(batch["input_ids"], batch["attention_mask"]).logits, want)


# -----------------------------------------------------------------------------
# fine-tuned classifiers and the run's pooling


def write_classifier_checkpoint(run_dir, clf, tokenizer, id2label, pooling=None):
    d = write_checkpoint(run_dir, 7, clf, tokenizer)
    full = yaml.safe_load((d / "config.yaml").read_text())
    full["classifier"] = {"num_labels": clf.num_labels, "id2label": id2label, "classifier_dropout": 0.2,
                          "classifier_init_range": 0.02}
    if pooling:
        full["trainer"]["objective"] = "contrastive"
        full["contrastive"] = {"pooling": pooling}
    (d / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    return d


def test_classifier_checkpoint_exports_with_its_labels(tmp_path, tokenizer):
    torch.manual_seed(0)
    clf = randomize(neobert.NeoBERTForSequenceClassification(tiny_config(tokenizer), num_labels=3), seed=4)
    write_classifier_checkpoint(tmp_path / "run", clf, tokenizer, {0: "neg", 1: "neutral", 2: "pos"})
    export.export(tmp_path / "run", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["NeoBERTForSequenceClassification"] and cfg["num_labels"] == 3
    assert cfg["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert cfg["label2id"] == {"neg": 0, "neutral": 1, "pos": 2} and cfg["classifier_dropout"] == 0.2
    assert set(load_file(str(tmp_path / "hf" / "model.safetensors"))) == set(clf.state_dict())
    assert "text-classification" in (tmp_path / "hf" / "README.md").read_text()

    hf, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    assert hf.config.id2label == {0: "neg", 1: "neutral", 2: "pos"} and hf.config.label2id["pos"] == 2
    assert hf.dropout.p == 0.2
    batch = padded_batch(tmp_path / "hf")
    with torch.no_grad():
        assert_close(hf(**batch).logits, clf(batch["input_ids"], batch["attention_mask"]).logits)
    _, info = AutoModel.from_pretrained(tmp_path / "hf", trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the head is not the encoder's business

    # no label names in the run: transformers' LABEL_i
    write_classifier_checkpoint(tmp_path / "run2", clf, tokenizer, None)
    export.export(tmp_path / "run2", tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["id2label"] == \
        {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_transformers_use_the_runs_pooling(tmp_path, tokenizer, pooling):
    st = pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    model = randomize(neobert.NeoBERTLMHead(tiny_config(tokenizer)), seed=5)
    d = write_checkpoint(tmp_path / "run", 3, model, tokenizer)
    full = yaml.safe_load((d / "config.yaml").read_text())
    full["contrastive"] = {"pooling": pooling}
    (d / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    export.export(tmp_path / "run", tmp_path / "hf")
    pooling_config = json.loads((tmp_path / "hf" / "1_Pooling" / "config.json").read_text())
    assert pooling_config["pooling_mode_cls_token"] == (pooling == "cls")
    assert pooling_config["pooling_mode_mean_tokens"] == (pooling == "mean")
    got = st.SentenceTransformer(str(tmp_path / "hf"), trust_remote_code=True, device="cpu").encode(
        TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    batch = padded_batch(tmp_path / "hf")
    with torch.no_grad():
        want = neobert.pool(model.model(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"], pooling)
    assert_close(got.cpu(), want)


def test_bad_classifier_or_pooling_sections(run, tmp_path, capsys, tokenizer):
    d = write_checkpoint(tmp_path / "run", 1, run[1], tokenizer)
    full = yaml.safe_load((d / "config.yaml").read_text())
    for section, match in (({"classifier": {"num_labels": 0}}, "classifier.num_labels"),
                           ({"classifier": {"num_labels": 2, "id2label": {0: "a", 2: "b"}}}, "classifier.id2label"),
                           ({"contrastive": {"pooling": "max"}}, "contrastive.pooling")):
        (d / "config.yaml").write_text(yaml.safe_dump({**full, **section}))
        code, err = run_main([d, "--out", tmp_path / "hf"], capsys)
        assert code == 2 and match in err
    # a classifier section on an MLM checkpoint: the weights do not match what config.yaml describes
    (d / "config.yaml").write_text(yaml.safe_dump({**full, "classifier": {"num_labels": 2}}))
    code, err = run_main([d, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "dense.weight" in err
    assert not (tmp_path / "hf").exists()


# -----------------------------------------------------------------------------
# `python export.py --out HF_DIR` with no run named: the newest run under ./runs


def test_no_run_named_exports_the_newest_run(run, tmp_path, tokenizer, monkeypatch, capsys):
    runs = tmp_path / "runs"
    older = write_checkpoint(runs / "older", 50, run[1], tokenizer)
    newer = write_checkpoint(runs / "sub" / "newer", 3, run[1], tokenizer)  # a lower step, written later
    write_checkpoint(runs / "incomplete", 99, run[1], tokenizer)
    (runs / "incomplete" / "model_checkpoints" / "99" / "tokenizer.json").unlink()
    os.utime(older / "model.safetensors", (1_000_000, 1_000_000))
    os.utime(runs / "incomplete" / "model_checkpoints" / "99" / "model.safetensors", (2_000_000_000,) * 2)
    export.export(runs / "older", runs / "older" / "hf")  # an export inside a run is not a run
    monkeypatch.chdir(tmp_path)
    assert export.main(["--out", "hf"]) == 0
    assert str(Path("runs") / "sub" / "newer" / "model_checkpoints" / "3") in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "neobert"
    assert checkpoint.newest_run(Path("runs")) == Path("runs") / "sub" / "newer" / "model_checkpoints" / "3"
    assert newer.is_dir()


def test_no_run_named_and_no_runs_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["--out", "hf"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert str(tmp_path / "runs") in err and "RUN_DIR" in err
    (tmp_path / "runs" / "empty" / "model_checkpoints").mkdir(parents=True)
    code, err = run_main(["--out", "hf"], capsys)
    assert code == 2 and "no complete model checkpoint under" in err and str(tmp_path / "runs") in err
    assert not (tmp_path / "hf").exists()
