"""usage: python export.py --out HF_DIR [MODEL] [--force]
  MODEL: a run directory (its newest complete checkpoint), a model_checkpoints/<step> directory, an exported or
  released Hugging Face folder, or a hub id; none: the newest complete checkpoint among the runs under ./runs
  --force: replace a non-empty HF_DIR

Export a model as a Hugging Face folder that transformers, sentence-transformers and MTEB load as is: config.json,
model.safetensors (the released tensor names), neobert.py and its transformers adapter modeling_neobert.py copied
byte for byte, the tokenizer, the sentence-transformers files and a model card. docs/export.md describes the folder.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from safetensors.torch import save_file
from tokenizers import processors

import checkpoint
import config
import prepare
import runtime
from config import UserError, require

MODELING_FILE_NAME = "modeling_neobert.py"
SPECIAL_TOKENS = {f"{token[1:-1].lower()}_token": token for token in prepare.SPECIAL_TOKENS}  # pad_token: [PAD], ...


# -----------------------------------------------------------------------------
# finding and reading a checkpoint

@dataclass
class ClassifierSection:
    """config.yaml's `classifier:` section, which evaluate.py glue writes for a fine-tuned classifier."""
    num_labels: Optional[int] = None
    id2label: Optional[dict] = None  # {0: "neg", ...}; None: transformers' LABEL_i
    classifier_dropout: float = 0.1
    classifier_init_range: float = 0.02

    def __post_init__(self):
        n = self.num_labels
        require(n is not None and n >= 1, f"classifier.num_labels must be a positive integer, got {n!r}")
        if self.id2label is not None:
            try:
                self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except ValueError:
                raise UserError(f"classifier.id2label must map 0..{n - 1} to label names") from None
            require(sorted(self.id2label) == list(range(n)),
                    f"classifier.id2label must name labels 0..{n - 1}, got ids {sorted(self.id2label)}")


def read_checkpoint(folder: Path):
    """(state dict, PretrainedInfo, ClassifierSection or None) of a model folder (checkpoint.load checks every
    tensor). The kernel the run used (e.g. flash_attn) says how it ran, not what it computes: auto here."""
    model, info = checkpoint.load(folder, head="auto", attn_backend="auto")
    require(info.tokenizer is not None, f"{folder} has no tokenizer.json: the exported folder needs the tokenizer "
            "the model was trained with; copy it there")
    full, trained = info.full_config, (folder / "config.yaml").is_file()
    where = folder / ("config.yaml" if trained else "config.json")
    section = full.get("classifier") if trained else None  # a training checkpoint: its classifier: section, if any
    if not trained and info.num_labels:  # an exported classifier: config.json's label keys
        section = {"num_labels": info.num_labels, "id2label": info.id2label,
                   **{k: full[k] for k in ("classifier_dropout", "classifier_init_range") if k in full}}
    if section is None:
        require(not info.num_labels, f"{folder} holds a classifier head, but {where} has no classifier: section "
                "(num_labels, id2label)")
        return model.state_dict(), info, None
    try:
        classifier = config.build_section("classifier", ClassifierSection, section)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    require(info.num_labels, f"{folder / 'model.safetensors'} has no tensor 'dense.weight' (nor any classifier head), "
            f"but {where} has a classifier: section")
    require(info.num_labels == classifier.num_labels, f"{folder} holds a classifier with {info.num_labels} labels, "
            f"but {where} says classifier.num_labels {classifier.num_labels}")
    return model.state_dict(), info, classifier


# -----------------------------------------------------------------------------
# the files of the folder

def folder_files(info: checkpoint.PretrainedInfo, dtype, classifier: Optional[ClassifierSection]) -> dict:
    """{file name: JSON-able object}: config.json (neobert.NeoBERTConfig's fields, which modeling_neobert.py's config
    reads by the same names), the tokenizer files and the sentence-transformers files (the run's pooling:
    neobert.pool's mean over real tokens, or the [CLS] vector)."""
    c, module, tokenizer = info.model_config, MODELING_FILE_NAME.removesuffix(".py"), info.tokenizer
    head = classifier or ClassifierSection(num_labels=2)
    id2label = head.id2label or {i: f"LABEL_{i}" for i in range(head.num_labels)}
    labels = {"id2label": {str(i): name for i, name in id2label.items()},  # transformers reads num_labels from it
              "label2id": {name: i for i, name in id2label.items()}, "num_labels": head.num_labels}
    hf_config = {
        "model_type": "neobert",
        "architectures": ["NeoBERTLMHead" if classifier is None else "NeoBERTForSequenceClassification"],
        "auto_map": {"AutoConfig": f"{module}.NeoBERTConfig", "AutoModel": f"{module}.NeoBERT",
                     "AutoModelForMaskedLM": f"{module}.NeoBERTLMHead",
                     "AutoModelForSequenceClassification": f"{module}.NeoBERTForSequenceClassification"},
        # the context length is max_position_embeddings: transformers 5 refuses to save a config with `max_length`
        **c.to_dict(),
        "classifier_dropout": head.classifier_dropout, "classifier_init_range": head.classifier_init_range,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).replace("torch.", ""),
        # transformers 4.50's fill-mask pipeline finds a custom model's tokenizer only by config.json's class name
        "tokenizer_class": "PreTrainedTokenizerFast", **(labels if classifier else {})}
    try:  # prepare.py's rules: the BERT special tokens, and no more tokens than the model has embeddings
        ids = prepare.special_token_ids(tokenizer)
        prepare.check_vocab(tokenizer, c.vocab_size)
    except UserError as e:
        raise UserError(f"{info.path / 'tokenizer.json'}: {e}") from None
    if tokenizer.post_processor is None:  # add [CLS] a [SEP] (b [SEP]) as BERT and the released tokenizer do
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["cls"]), ("[SEP]", ids["sep"])])
    tokenizer.no_truncation()  # truncation and padding are the caller's choice in transformers
    tokenizer.no_padding()
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL_TOKENS,
                        "model_max_length": c.max_position_embeddings,
                        "model_input_names": ["input_ids", "attention_mask"], "padding_side": "right",
                        "truncation_side": "right", "clean_up_tokenization_spaces": False}
    modules = [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
               for i, (path, kind) in enumerate([("", "Transformer"), ("1_Pooling", "Pooling")])]
    pooling = {"word_embedding_dimension": c.hidden_size, "pooling_mode_cls_token": info.pooling == "cls",
               "pooling_mode_mean_tokens": info.pooling == "mean", "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": False, "include_prompt": True}
    return {"config.json": hf_config, "tokenizer.json": json.loads(tokenizer.to_str()),
            "tokenizer_config.json": tokenizer_config, "special_tokens_map.json": dict(SPECIAL_TOKENS),
            "modules.json": modules, "1_Pooling/config.json": pooling,
            "sentence_bert_config.json": {"max_seq_length": c.max_position_embeddings, "do_lower_case": False},
            # the model type and the similarity said explicitly: MTEB reads this file to pick its loader
            "config_sentence_transformers.json": {"model_type": "SentenceTransformer", "prompts": {},
                                                  "default_prompt_name": None, "similarity_fn_name": "cosine"}}


# -----------------------------------------------------------------------------
# the model card: what the model is, how to load it, what it was trained on, how it scored, the config

NOT_RESULTS = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json",
               "sentence_bert_config.json", "config_sentence_transformers.json", "manifest.json", "tokenizer_spec.json",
               "train_state.json"}
SKIP_DIRS = ("checkpoints", "model_checkpoints", "wandb")  # folders of the run dir that hold no results


def evaluation_results(run_dir: Path, limit: int = 50) -> list:
    """[(path relative to the run dir, parsed JSON)] of the JSON files in the run dir that can be results: not in
    checkpoint folders, model folders (a previous export) or data folders, not a known config file, not large."""
    found = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here != run_dir or d not in SKIP_DIRS)
                             and not any((here / d / f).exists() for f in ("model.safetensors", "tokenizer.json")))
        for path in sorted(here / n for n in filenames if n.endswith(".json") and n not in NOT_RESULTS):
            try:
                if path.stat().st_size <= 200_000:
                    found.append((path.relative_to(run_dir).as_posix(), json.loads(path.read_text())))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
            if len(found) == limit:
                return found
    return found


CARD = """---
library_name: transformers
pipeline_tag: {pipeline}
tags: [neobert, fill-mask, feature-extraction, sentence-transformers]
---

# NeoBERT (exported)

A NeoBERT encoder trained with the neobert project, exported by `export.py` from `{checkpoint}`{step}
The tensor names and layout are those of the released \
[chandar-lab/NeoBERT](https://huggingface.co/chandar-lab/NeoBERT) ([paper](https://arxiv.org/abs/2502.19587)). \
The model code is `neobert.py`, the training code itself; `modeling_neobert.py` adapts it to transformers.

## Architecture

| | |
|---|---|
| parameters | {n_params:,} |
| layers | {c.num_hidden_layers} |
| hidden size | {c.hidden_size} |
| attention heads | {c.num_attention_heads} (head dim {c.head_dim}) |
| feed-forward | {ffn} |
| normalisation | pre-norm {norm}, eps {c.norm_eps} |
| positions | {positions}, max {c.max_position_embeddings} |
| vocabulary | {c.vocab_size} |
{head}

## Use

```python
path = "path/to/this/folder"  # or its hub id once uploaded
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, pipeline
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # a standard tokenizer: no model code
model = AutoModel.from_pretrained(path, trust_remote_code=True)
batch = tokenizer(["a sentence"], truncation=True, return_tensors="pt")  # at most {c.max_position_embeddings} tokens
out = model(**batch)  # out.last_hidden_state: (B, S, H)
{use}

from sentence_transformers import SentenceTransformer  # {pooling} pooling
embeddings = SentenceTransformer(path, trust_remote_code=True).encode(["a sentence"])
```

## Data

{data}

## Evaluation

{evaluation}## Training config (resolved)

```yaml
{config}
```
"""
USE_MLM = """fill = pipeline("fill-mask", model=path, trust_remote_code=True)
print(fill("Paris is the [MASK] of France."))"""
USE_CLASSIFIER = """from transformers import AutoModelForSequenceClassification
clf = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
label = clf.config.id2label[clf(**batch).logits.argmax(-1).item()]"""


def model_card(info: checkpoint.PretrainedInfo, folder: Path, n_params: int, classifier) -> str:
    c = info.model_config
    run_dir = checkpoint.owning_run(folder)  # a run's step: its metrics and evaluations
    metrics, entries = run_dir and run_dir / "metrics.jsonl", []
    for line in metrics.read_text().splitlines() if metrics and metrics.is_file() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    entries = [e for e in reversed(entries) if isinstance(e, dict)]  # newest first
    last = next((e for e in entries if "loss" in e), None)  # the last logged training step
    last_eval = next((e for e in entries if any(k.startswith(("eval", "val")) for k in e)), None)
    blocks = [(f"`{rel}`", json.dumps(result, indent=2)[:20_000])
              for rel, result in (evaluation_results(run_dir) if run_dir else [])]
    if last_eval:
        keys = {k: v for k, v in last_eval.items() if k == "step" or k.startswith(("eval", "val"))}
        blocks.insert(0, ("Last evaluation logged in metrics.jsonl", json.dumps(keys, indent=2)))
    full, dataset = dict(info.full_config), info.full_config.get("dataset") or {}
    tok = tokenizer_section(full.get("tokenizer"))  # only the keys that chose the tokenizer
    if tok:
        full["tokenizer"] = tok
    how = "trained on the dataset" if tok.get("train") else f"`{tok.get('path') or tok.get('name')}`" if tok else ""
    tokenizer = f"{json.loads(info.tokenizer.to_str())['model']['type']}, " \
                f"{info.tokenizer.get_vocab_size(with_added_tokens=True):,} tokens" + (f", {how}" if how else "")
    prepared = f" (prepared at `{dataset['path']}`)" if dataset.get("path") else ""
    data_lines = [f"- dataset: `{dataset.get('name', 'unknown')}`{prepared}", f"- tokenizer: {tokenizer}"]
    if "max_seq_length" in dataset:
        data_lines.append(f"- sequence length: {dataset['max_seq_length']}")
    if last:
        seen = ", ".join(f"{k} {last[k]:.4g}" if isinstance(last[k], float) else f"{k} {last[k]:,}"
                         for k in ("step", "tokens", "loss") if k in last)
        data_lines.append(f"- last logged training step: {seen}")
    if classifier is None:
        head = "| MLM decoder | untied, with bias |"
    else:
        labels = ", ".join((classifier.id2label or {i: str(i) for i in range(classifier.num_labels)}).values())
        head = f"| classification head | [CLS] -> dense -> tanh -> {classifier.num_labels} labels ({labels}) |"
    return CARD.format(
        pipeline="fill-mask" if classifier is None else "text-classification", checkpoint=folder,
        step=f" (training step {folder.name})." if run_dir else ".", n_params=n_params, c=c,
        ffn=f"SwiGLU ({c.ffn_hidden_size} hidden)" if c.hidden_act == "swiglu" else
        f"GELU MLP ({c.intermediate_size} hidden)", norm="RMSNorm" if c.rms_norm else "LayerNorm",
        positions="rotary (RoPE, theta 10000)" if c.rope else "learned absolute", head=head,
        use=USE_MLM if classifier is None else USE_CLASSIFIER, pooling=info.pooling,
        data="\n".join(data_lines),
        evaluation="".join(f"{title}:\n\n```json\n{text}\n```\n\n" for title, text in blocks)
        or "No evaluation results were found in the run directory.\n\n",
        config=yaml.safe_dump(full, sort_keys=False).rstrip())


def tokenizer_section(tok) -> dict:
    """The keys of a run's tokenizer: section that chose its tokenizer (trained, a file, or a hub name); the others
    are defaults the run never read, and the card must not show them as if they were used. {}: no such section."""
    if not isinstance(tok, dict) or not tok:
        return {}
    keys = ("train", "vocab_size", "min_frequency", "lowercase") if tok.get("train") else \
        ("path",) if tok.get("path") else ("name",)
    return {k: tok[k] for k in keys if k in tok}


# -----------------------------------------------------------------------------
# writing the folder, main

def export(src: Path, out: Path, force: bool = False) -> Path:
    """Writes the Hugging Face folder of the model src names (checkpoint.resolve) to out; returns its folder.
    Not runtime.write_dir: an interrupted export removes its temporary folder and puts a replaced --out back."""
    folder = checkpoint.resolve(src)
    out = Path(os.path.abspath(out))  # normalised: `--out .` and `--out ..` have a parent to write next to
    require(out.parent != out, f"--out {out} is a filesystem root; name a folder to create")
    require(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
    require(force or not out.is_dir() or not any(out.iterdir()),
            f"--out {out} exists and is not empty; pass --force to replace it")
    require(out.resolve() != folder.resolve() and out.resolve() not in folder.resolve().parents,
            f"--out {out} contains the checkpoint being exported; choose another folder")
    state, info, classifier = read_checkpoint(folder)
    files = folder_files(info, next(iter(state.values())).dtype, classifier)
    card = model_card(info, folder, sum(t.numel() for t in state.values()), classifier)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    aside = None  # where an existing --out waits until the new folder is in place
    try:
        for name, obj in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        for name in ("neobert.py", MODELING_FILE_NAME):  # the model and its transformers adapter, byte for byte
            shutil.copyfile(Path(__file__).resolve().parent / name, tmp / name)
        (tmp / "README.md").write_text(card)
        # released layout: the training state_dict keys are already model.* and decoder.* (or dense.*, classifier.*)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        for p in (tmp, *tmp.rglob("*")):  # mkdtemp (and safetensors) make private files; use the usual modes
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        if out.exists():  # empty, or --force
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, aside / out.name)
        os.replace(tmp, out)
    except BaseException:  # also KeyboardInterrupt: no half-written folder, and the old one back in its place
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and (aside / out.name).exists() and not out.exists():
            os.replace(aside / out.name, out)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    return folder


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one `error: ...` line, as every error (runtime.run_main), not argparse's usage block
        raise UserError(f"{message}; usage: python export.py --out HF_DIR [MODEL] [--force]")


def main(argv=None) -> int:
    def work(argv):
        parser = ArgumentParser(add_help=False, allow_abbrev=False)
        parser.add_argument("src", nargs="?")  # RUN_DIR | CHECKPOINT_DIR
        parser.add_argument("--out", required=True)  # HF_DIR
        parser.add_argument("--force", action="store_true")
        args = parser.parse_args(argv)
        src, out = checkpoint.newest_run() if args.src is None else args.src, args.out
        if args.src is None:
            print(f"no run directory given: exporting {src}, the newest checkpoint under ./runs "
                  f"(name a run to export another: python export.py --out {out} RUN_DIR)")
        try:
            folder = export(Path(src), Path(out), force=args.force)
        except OSError as e:  # disk full, permissions, ...
            raise UserError(str(e)) from None
        except KeyboardInterrupt:
            print(f"error: interrupted; {out} was not written", file=sys.stderr)
            raise
        print(f"exported {folder} -> {out}")

    # SIGTERM (a scheduler, `kill`) cleans up as Ctrl-C does: it raises KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return runtime.run_main(argv, __doc__, work)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
