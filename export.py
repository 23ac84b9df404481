"""Export a training checkpoint as a Hugging Face folder that transformers, sentence-transformers and MTEB load as is.

    python export.py --out HF_DIR [RUN_DIR | CHECKPOINT_DIR] [--force]

RUN_DIR is a training run's output_dir (the newest complete model checkpoint is taken: model_checkpoints/latest, else
the highest complete step); CHECKPOINT_DIR is one model checkpoint (model.safetensors, config.yaml, tokenizer.json).
With neither, the newest complete model checkpoint among the runs under ./runs is exported.
The folder holds config.json (model_type neobert, auto_map), model.safetensors (the released chandar-lab/NeoBERT
tensor names: model.*, decoder.*; a fine-tuned classifier: model.*, dense.*, classifier.*), neobert.py copied byte for
byte, a thin modeling_neobert.py that adapts it to transformers, the tokenizer files, the sentence-transformers files
(the run's pooling) and a README.md model card.
The folder is written under a temporary name next to HF_DIR and renamed when complete.
This file imports torch and neobert, never transformers: the thin modeling file is a string that the folder carries.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, processors

import neobert

MODELING_FILE_NAME = "modeling_neobert.py"
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}
CHECKPOINT_FILES = ("model.safetensors", "config.yaml", "tokenizer.json")
RUNS_DIR = Path("runs")  # where `python export.py --out HF_DIR` looks for the newest run (relative to the cwd)
POOLINGS = ("mean", "cls")


class ExportError(Exception):
    """A mistake the user can fix; main() prints it as `error: ...` and exits 2."""


# -----------------------------------------------------------------------------
# the thin modeling file the folder carries beside neobert.py; transformers loads it with trust_remote_code=True and
# copies its relative import (neobert.py) along with it

MODELING_FILE = r'''"""NeoBERT for Hugging Face transformers (4.5x and 5.x), written by the neobert project's export.py.

The model is neobert.py, the file beside this one, byte for byte the training code. This file only adapts it to
transformers: a PretrainedConfig holding neobert.NeoBERTConfig's fields, and PreTrainedModel classes whose modules are
neobert.py's own, under the released chandar-lab/NeoBERT tensor names (model.*, decoder.*; GLUE head: dense.*,
classifier.*). Load with AutoModel, AutoModelForMaskedLM or AutoModelForSequenceClassification, trust_remote_code=True.
"""

from dataclasses import fields

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from .neobert import NeoBERT as Encoder
from .neobert import NeoBERTConfig as ModelConfig
from .neobert import NeoBERTForSequenceClassification as Classifier
from .neobert import NeoBERTLMHead as LMHead
from .neobert import init_classifier_layer, init_weights


class NeoBERTConfig(PretrainedConfig):
    model_type = "neobert"

    def __init__(self, classifier_dropout=0.1, classifier_init_range=0.02, **kwargs):
        max_length = kwargs.pop("max_length", None)  # the released config.json's name for the context length
        if max_length is not None and "max_position_embeddings" not in kwargs:
            kwargs["max_position_embeddings"] = max_length
        model = {f.name: kwargs.pop(f.name, f.default) for f in fields(ModelConfig)}
        kwargs.setdefault("tie_word_embeddings", False)  # the MLM decoder is its own matrix
        super().__init__(pad_token_id=model["pad_token_id"], **kwargs)
        for name, value in model.items():
            setattr(self, name, value)
        self.classifier_dropout = classifier_dropout
        self.classifier_init_range = classifier_init_range

    def model_config(self):
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})


class NeoBERTPreTrainedModel(PreTrainedModel):
    config_class = NeoBERTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # transformers sets neobert.NeoBERT.gradient_checkpointing
    _no_split_modules = ["EncoderBlock"]
    _supports_sdpa = True  # neobert.py always runs PyTorch SDPA (or a varlen kernel): attn_implementation="sdpa" is it
    # the Trainer passes num_items_in_batch to a forward with **kwargs and then leaves the loss unscaled for gradient
    # accumulation: only the MLM head uses it, the others say no and the Trainer divides itself
    accepts_loss_kwargs = False
    _keys_to_ignore_on_load_unexpected = [r"^(decoder|dense|classifier)\."]  # another head's tensors in the folder

    def get_input_embeddings(self):
        return self.model.encoder

    def set_input_embeddings(self, value):
        self.model.encoder = value

    @torch.no_grad()
    def _init_weights(self, module):
        """neobert.py's initialisation of what a checkpoint does not hold (a new head, from_config); transformers
        skips the loaded tensors. The rotary tables are derived and never saved: transformers 5 builds the model on
        the meta device and fills only the saved tensors, so they are recomputed here."""
        if isinstance(module, Encoder):
            module.init_rope_tables()
        elif any(module is getattr(self, name, None) for name in ("dense", "classifier")):
            init_classifier_layer(module, self.config.classifier_init_range)
        else:
            init_weights(module, self.config.init_range, recurse=False)

    def encode(self, input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen, inputs_embeds,
               output_hidden_states):
        want = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        out = self.model(input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen, inputs_embeds, bool(want))
        if want:
            return BaseModelOutput(last_hidden_state=out[0], hidden_states=out[1])
        return BaseModelOutput(last_hidden_state=out)

    def returns_dict(self, return_dict):
        if return_dict is not None:
            return return_dict
        return getattr(self.config, "return_dict", True) and not getattr(self.config, "torchscript", False)


class NeoBERT(NeoBERTPreTrainedModel):
    """The encoder: last_hidden_state (B, S, H) after the final norm; hidden_states: the embeddings, every block."""

    def __init__(self, config):
        super().__init__(config)
        self.model = Encoder(config.model_config())
        self.post_init()

    # token_type_ids (BERT-style callers) and output_attentions (SDPA computes no weights) are accepted and unused
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None, inputs_embeds=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **kwargs):
        out = self.encode(input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen, inputs_embeds,
                          output_hidden_states)
        return out if self.returns_dict(return_dict) else out.to_tuple()


class NeoBERTLMHead(NeoBERTPreTrainedModel):
    """neobert.NeoBERTLMHead's modules; logits at every position, loss = mean cross-entropy over labels != -100."""

    accepts_loss_kwargs = True  # the loss divides by num_items_in_batch when the Trainer gives it

    def __init__(self, config):
        super().__init__(config)
        head = LMHead(config.model_config())
        self.model, self.decoder = head.model, head.decoder
        self.post_init()

    def get_output_embeddings(self):  # so resize_token_embeddings resizes the (untied) decoder too
        return self.decoder

    def set_output_embeddings(self, value):
        self.decoder = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None, inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, num_items_in_batch=None, **kwargs):
        h = self.encode(input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen, inputs_embeds,
                        output_hidden_states)
        logits = self.decoder(h.last_hidden_state)
        loss = None
        if labels is not None:
            flat_logits, flat_labels = logits.view(-1, logits.size(-1)).float(), labels.view(-1).to(logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
            else:  # the Trainer's count of predicted tokens over all accumulated micro-batches (and devices)
                loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype)
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=h.hidden_states)
        return out if self.returns_dict(return_dict) else out.to_tuple()


class NeoBERTForSequenceClassification(NeoBERTPreTrainedModel):
    """neobert.NeoBERTForSequenceClassification's modules and head. The loss follows config.problem_type as
    transformers' own classifiers do: regression (MSE; num_labels == 1), single-label (cross-entropy; integer labels)
    or multi-label (BCE with logits)."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        head = Classifier(config.model_config(), config.num_labels, config.classifier_dropout,
                          config.classifier_init_range)
        self.model, self.dense, self.dropout, self.classifier = head.model, head.dense, head.dropout, head.classifier
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None, inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **kwargs):
        h = self.encode(input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen, inputs_embeds,
                        output_hidden_states)
        logits = Classifier.head(self, h.last_hidden_state, cu_seqlens)  # neobert.py's head, on this model's layers
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            problem = self.config.problem_type
            if problem is None:
                if self.num_labels == 1:
                    problem = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem = "single_label_classification"
                else:
                    problem = "multi_label_classification"
            if problem == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float()) if self.num_labels == 1 \
                    else F.mse_loss(logits.float(), labels.float())
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1).long())
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=h.hidden_states)
        return out if self.returns_dict(return_dict) else out.to_tuple()
'''


# -----------------------------------------------------------------------------
# finding and reading a checkpoint


def find_checkpoint(path: Path) -> Path:
    """The model checkpoint `path` names, by the rule every loader uses (neobert.resolve_model_dir): a run's output_dir
    or its model_checkpoints folder gives the newest complete one. Local training checkpoints only: export needs the
    training config and tokenizer, so no hub ids and no Hugging Face folders."""
    try:
        return neobert.resolve_model_dir(path, needs=tuple((name,) for name in CHECKPOINT_FILES), hub=False,
                                         what=f"a run directory or a model checkpoint directory holding "
                                              f"{', '.join(CHECKPOINT_FILES)}")
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None


def run_dir_of(checkpoint: Path):
    """RUN for RUN/model_checkpoints/<step>, else None."""
    return checkpoint.parent.parent if checkpoint.parent.name == "model_checkpoints" else None


def find_newest_run(runs: Path = RUNS_DIR) -> Path:
    """The newest complete model checkpoint (by its weights' write time) among the run directories under `runs`."""
    how = "train one (python train.py CONFIG) or name the run to export: python export.py --out HF_DIR RUN_DIR"
    if not runs.is_dir():
        raise ExportError(f"no run directory given and no {runs.resolve()} folder to look in; {how}")
    found = []
    for dirpath, dirnames, _ in os.walk(runs):
        if "model_checkpoints" in dirnames:
            try:
                checkpoint = find_checkpoint(Path(dirpath))
            except ExportError:  # a run that has not saved a complete checkpoint yet
                continue
            found.append(((checkpoint / "model.safetensors").stat().st_mtime, str(checkpoint), checkpoint))
        # a run's own folders and earlier exports hold no further runs
        dirnames[:] = [d for d in dirnames if d not in ("model_checkpoints", "checkpoints", "wandb")
                       and not d.startswith(".") and not (Path(dirpath) / d / "config.json").exists()]
    if not found:
        raise ExportError(f"no run directory given and no complete model checkpoint under {runs.resolve()}; {how}")
    return max(found)[2]


def read_training_config(checkpoint: Path):
    """(the full resolved training config as a dict, its model section as a neobert.NeoBERTConfig)."""
    path = checkpoint / "config.yaml"
    try:
        full = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExportError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(full, dict) or not isinstance(full.get("model"), dict):
        raise ExportError(f"{path} has no `model:` section")
    try:  # the kernel the run used (e.g. flash_attn) says how it ran, not what it computes: the folder picks its own
        config = neobert.NeoBERTConfig(**{**full["model"], "attn_backend": "auto"})
    except (TypeError, ValueError) as e:  # an unknown key (TypeError) or a bad value
        raise ExportError(f"{path}: bad model config: {e}") from None
    return full, config


def read_classifier(full: dict, path: Path):
    """config.yaml's `classifier:` section of a fine-tuned classifier ({num_labels, id2label (int -> str, or None),
    classifier_dropout, classifier_init_range}), or None for an MLM checkpoint."""
    section = full.get("classifier")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ExportError(f"{path}: `classifier:` must be a section with num_labels and id2label")
    n = section.get("num_labels")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ExportError(f"{path}: classifier.num_labels must be a positive integer, got {n!r}")
    id2label = section.get("id2label")
    if id2label is not None:
        try:
            id2label = {int(k): str(v) for k, v in id2label.items()}
        except (AttributeError, TypeError, ValueError):
            raise ExportError(f"{path}: classifier.id2label must map 0..{n - 1} to label names") from None
        if sorted(id2label) != list(range(n)):
            raise ExportError(f"{path}: classifier.id2label must name labels 0..{n - 1}, got ids {sorted(id2label)}")
    return {"num_labels": n, "id2label": id2label,
            "classifier_dropout": float(section.get("classifier_dropout", 0.1)),
            "classifier_init_range": float(section.get("classifier_init_range", 0.02))}


def read_pooling(full: dict, path: Path) -> str:
    """The run's sentence-embedding pooling: config.yaml contrastive.pooling (mean or cls), default mean."""
    contrastive = full.get("contrastive") or {}
    pooling = contrastive.get("pooling", "mean") if isinstance(contrastive, dict) else None
    if pooling not in POOLINGS:
        raise ExportError(f"{path}: contrastive.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def read_weights(checkpoint: Path, config: neobert.NeoBERTConfig, classifier=None) -> dict:
    """The checkpoint's tensors, checked name by name and shape by shape against the module config.yaml describes:
    neobert.NeoBERTLMHead, or neobert.NeoBERTForSequenceClassification for a fine-tuned classifier."""
    path = checkpoint / "model.safetensors"
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    with torch.device("meta"):  # shapes only, no memory
        module = neobert.NeoBERTLMHead(config) if classifier is None else \
            neobert.NeoBERTForSequenceClassification(config, num_labels=classifier["num_labels"])
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise ExportError(f"{path} has no tensor {name!r}: it does not match the model in config.yaml")
        if tuple(state[name].shape) != shape:
            raise ExportError(f"{path}: tensor {name!r} has shape {list(state[name].shape)}, config.yaml implies "
                              f"{list(shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ExportError(f"{path} has a tensor {extra[0]!r} that the model in config.yaml does not have")
    return state


# -----------------------------------------------------------------------------
# the files of the folder


def hf_config(config: neobert.NeoBERTConfig, dtype: torch.dtype, classifier=None) -> dict:
    """config.json: neobert.NeoBERTConfig's fields (which the thin modeling file's config reads by the same names)."""
    arch = "NeoBERTLMHead" if classifier is None else "NeoBERTForSequenceClassification"
    d = {"model_type": "neobert", "architectures": [arch]}
    module = MODELING_FILE_NAME[: -len(".py")]
    d["auto_map"] = {
        "AutoConfig": f"{module}.NeoBERTConfig",
        "AutoModel": f"{module}.NeoBERT",
        "AutoModelForMaskedLM": f"{module}.NeoBERTLMHead",
        "AutoModelForSequenceClassification": f"{module}.NeoBERTForSequenceClassification",
    }
    # the context length is max_position_embeddings: transformers 5 refuses to save a config with `max_length`
    d.update(config.to_dict())
    head = classifier or {"classifier_dropout": 0.1, "classifier_init_range": 0.02}
    d.update(classifier_dropout=head["classifier_dropout"], classifier_init_range=head["classifier_init_range"],
             tie_word_embeddings=False, torch_dtype=str(dtype).replace("torch.", ""),
             # pipeline("fill-mask") of transformers 4.50 loads a tokenizer for a custom model_type only when
             # config.json names its class (4.57 and 5.x read tokenizer_config.json)
             tokenizer_class="PreTrainedTokenizerFast")
    if classifier is not None:  # transformers reads num_labels from id2label
        id2label = classifier["id2label"] or {i: f"LABEL_{i}" for i in range(classifier["num_labels"])}
        d["id2label"] = {str(i): name for i, name in id2label.items()}
        d["label2id"] = {name: i for i, name in id2label.items()}
        d["num_labels"] = classifier["num_labels"]
    return d


def tokenizer_files(checkpoint: Path, config: neobert.NeoBERTConfig) -> dict:
    """{file name: JSON-able object} for tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    path = checkpoint / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
        raise ExportError(f"{path} is not a tokenizers tokenizer.json: {e}") from None
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS.values()}
    if missing := [tok for tok, i in ids.items() if i is None]:
        raise ExportError(f"{path} has no {', '.join(missing)} token; the exported tokenizer needs "
                          f"{', '.join(SPECIAL_TOKENS.values())}")
    if tokenizer.get_vocab_size(with_added_tokens=True) > config.vocab_size:
        raise ExportError(f"{path} has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the model's "
                          f"vocab_size is {config.vocab_size}")
    if tokenizer.post_processor is None:  # add [CLS] a [SEP] (b [SEP]) as BERT and the released tokenizer do
        cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, ids[cls]),
                                                                                         (sep, ids[sep])])
    tokenizer.no_truncation()  # truncation and padding are the caller's choice in transformers
    tokenizer.no_padding()
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKENS,
        "model_max_length": config.max_position_embeddings,
        "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": json.loads(tokenizer.to_str()), "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": dict(SPECIAL_TOKENS)}


def sentence_transformers_files(config: neobert.NeoBERTConfig, pooling_mode: str = "mean") -> dict:
    """modules.json (Transformer -> Pooling), sentence_bert_config.json, config_sentence_transformers.json,
    1_Pooling/config.json (the run's pooling: neobert.pool's mean over real tokens, or the [CLS] vector)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    pooling = {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": pooling_mode == "cls",
        "pooling_mode_mean_tokens": pooling_mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    # the model type and the similarity (cosine, what pooled embeddings are compared with) said explicitly, for
    # sentence-transformers and for MTEB, which reads this file to pick its loader
    st_config = {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
                 "similarity_fn_name": "cosine"}
    return {"modules.json": modules,
            "sentence_bert_config.json": {"max_seq_length": config.max_position_embeddings, "do_lower_case": False},
            "config_sentence_transformers.json": st_config,
            "1_Pooling/config.json": pooling}


def read_metrics(run_dir: Path):
    """(last logged training entry, last entry with evaluation keys) from RUN/metrics.jsonl, or Nones."""
    last = last_eval = None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if not isinstance(entry, dict):
            continue
        if any(k.startswith(("eval", "val")) for k in entry):
            last_eval = entry
        if "loss" in entry:
            last = entry
    return last, last_eval


NOT_RESULTS = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json",
               "sentence_bert_config.json", "config_sentence_transformers.json", "manifest.json", "tokenizer_spec.json",
               "train_state.json"}


def evaluation_results(run_dir: Path, limit: int = 50) -> list:
    """[(path relative to the run dir, parsed JSON)] of the JSON files in the run dir that can be results: not in
    checkpoint folders, model folders (a previous export) or data folders, not a known config file, not large."""
    found = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        here = Path(dirpath)
        if here == run_dir:
            dirnames[:] = [d for d in dirnames if d not in ("checkpoints", "model_checkpoints", "wandb")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not any((here / d / f).exists() for f in ("model.safetensors", "tokenizer.json")))
        for name in sorted(filenames):
            path = here / name
            if not name.endswith(".json") or name in NOT_RESULTS or path.stat().st_size > 200_000:
                continue
            try:
                found.append((path.relative_to(run_dir).as_posix(), json.loads(path.read_text())))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
            if len(found) == limit:
                return found
    return found


def tokenizer_origin(tok: dict) -> str:
    if tok.get("train"):
        return f"WordPiece (BERT-style) trained on the dataset, {tok.get('vocab_size', '?')} tokens"
    if tok.get("path"):
        return f"`{tok['path']}`"
    return f"`{tok['name']}`" if tok.get("name") else "see tokenizer.json"


def model_card(config: neobert.NeoBERTConfig, full_config: dict, checkpoint: Path, n_params: int, classifier=None,
               pooling: str = "mean") -> str:
    run_dir = run_dir_of(checkpoint)
    H, L = config.hidden_size, config.num_hidden_layers
    norm = "RMSNorm" if config.rms_norm else "LayerNorm"
    positions = "rotary (RoPE, theta 10000)" if config.rope else "learned absolute"
    ffn = (f"SwiGLU ({config.ffn_hidden_size} hidden)"
           if config.hidden_act == "swiglu" else f"GELU MLP ({config.intermediate_size} hidden)")
    dataset = full_config.get("dataset") or {}
    tok = full_config.get("tokenizer") or {}
    if classifier is None:
        head = "| MLM decoder | untied, with bias |"
        use_head = ["fill = pipeline(\"fill-mask\", model=path, trust_remote_code=True)",
                    "print(fill(\"Paris is the [MASK] of France.\"))"]
    else:
        labels = ", ".join((classifier["id2label"] or {i: str(i) for i in range(classifier["num_labels"])}).values())
        head = f"| classification head | [CLS] -> dense -> tanh -> {classifier['num_labels']} labels ({labels}) |"
        use_head = ["from transformers import AutoModelForSequenceClassification",
                    "clf = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)",
                    "label = clf.config.id2label[clf(**batch).logits.argmax(-1).item()]"]
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'fill-mask' if classifier is None else 'text-classification'}",
        "tags: [neobert, fill-mask, feature-extraction, sentence-transformers]",
        "---",
        "",
        "# NeoBERT (exported)",
        "",
        f"A NeoBERT encoder trained with the neobert project, exported by `export.py` from `{checkpoint}`"
        + (f" (training step {checkpoint.name})." if checkpoint.name.isdigit() else "."),
        "The tensor names and layout are those of the released "
        "[chandar-lab/NeoBERT](https://huggingface.co/chandar-lab/NeoBERT) "
        "([paper](https://arxiv.org/abs/2502.19587)). The model code is `neobert.py`, the training code itself; "
        "`modeling_neobert.py` adapts it to transformers.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {n_params:,} |",
        f"| layers | {L} |",
        f"| hidden size | {H} |",
        f"| attention heads | {config.num_attention_heads} (head dim {H // config.num_attention_heads}) |",
        f"| feed-forward | {ffn} |",
        f"| normalisation | pre-norm {norm}, eps {config.norm_eps} |",
        f"| positions | {positions}, max {config.max_position_embeddings} |",
        f"| vocabulary | {config.vocab_size} |",
        head,
        "",
        "## Use",
        "",
        "```python",
        "path = \"path/to/this/folder\"  # or its hub id once uploaded",
        "from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, pipeline",
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # transformers 5 reads config.json",
        "model = AutoModel.from_pretrained(path, trust_remote_code=True)",
        f"batch = tokenizer([\"a sentence\"], truncation=True, return_tensors=\"pt\")  # at most "
        f"{config.max_position_embeddings} tokens",
        "out = model(**batch)  # out.last_hidden_state: (B, S, H)",
        *use_head,
        "",
        f"from sentence_transformers import SentenceTransformer  # {pooling} pooling",
        "embeddings = SentenceTransformer(path, trust_remote_code=True).encode([\"a sentence\"])",
        "```",
        "",
        "## Data",
        "",
        f"- dataset: `{dataset.get('name', 'unknown')}`" + (f" (prepared at `{dataset['path']}`)"
                                                              if dataset.get("path") else ""),
        f"- tokenizer: {tokenizer_origin(tok)}",
    ]
    if "max_seq_length" in dataset:
        lines.append(f"- sequence length: {dataset['max_seq_length']}")
    last, last_eval = read_metrics(run_dir) if run_dir else (None, None)
    if last:
        seen = ", ".join(f"{k} {last[k]:.4g}" if isinstance(last[k], float) else f"{k} {last[k]:,}"
                         for k in ("step", "tokens", "loss") if k in last)
        lines.append(f"- last logged training step: {seen}")
    lines += ["", "## Evaluation", ""]
    results = evaluation_results(run_dir) if run_dir else []
    if last_eval:
        keys = {k: v for k, v in last_eval.items() if k == "step" or k.startswith(("eval", "val"))}
        lines += ["Last evaluation logged in metrics.jsonl:", "", "```json", json.dumps(keys, indent=2), "```", ""]
    for rel, data in results:
        lines += [f"`{rel}`:", "", "```json", json.dumps(data, indent=2)[:20_000], "```", ""]
    if not last_eval and not results:
        lines += ["No evaluation results were found in the run directory.", ""]
    lines += ["## Training config", "", "The resolved config this checkpoint was trained with:", "", "```yaml",
              yaml.safe_dump(full_config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# writing the folder


def check_out(out: Path, force: bool, checkpoint: Path):
    if out.parent == out:
        raise ExportError(f"--out {out} is a filesystem root; name a folder to create")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; pass --force to replace it")
    src, dst = checkpoint.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ExportError(f"--out {out} contains the checkpoint being exported; choose another folder")


def export(src: Path, out: Path, force: bool = False) -> Path:
    """Writes the Hugging Face folder for the checkpoint at (or newest under) src to out; returns the checkpoint."""
    checkpoint = find_checkpoint(src)
    out = Path(os.path.abspath(out))  # normalised: `--out .` and `--out ..` have a parent to write next to
    check_out(out, force, checkpoint)
    full_config, config = read_training_config(checkpoint)
    classifier = read_classifier(full_config, checkpoint / "config.yaml")
    pooling = read_pooling(full_config, checkpoint / "config.yaml")
    state = read_weights(checkpoint, config, classifier)
    files = {"config.json": hf_config(config, next(iter(state.values())).dtype, classifier)}
    files.update(tokenizer_files(checkpoint, config))
    files.update(sentence_transformers_files(config, pooling))
    card = model_card(config, full_config, checkpoint, sum(t.numel() for t in state.values()), classifier, pooling)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    aside = None  # where an existing --out waits until the new folder is in place
    try:
        for name, obj in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        shutil.copyfile(neobert.__file__, tmp / "neobert.py")  # the model itself, byte for byte
        (tmp / MODELING_FILE_NAME).write_text(MODELING_FILE)
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
        if aside is not None:
            if (aside / out.name).exists() and not out.exists():
                os.replace(aside / out.name, out)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="RUN_DIR|CHECKPOINT_DIR", nargs="?",
                        help="a run's output_dir (its newest complete model checkpoint) or one model checkpoint; "
                             f"default: the newest complete checkpoint of the runs under ./{RUNS_DIR}")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = parser.parse_args(argv)

    def interrupt(signum, frame):  # SIGTERM (a scheduler, `kill`) cleans up as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        if args.src is None:
            args.src = find_newest_run()
            print(f"no run directory given: exporting {args.src}, the newest checkpoint under ./{RUNS_DIR} "
                  f"(name a run to export another: python export.py --out {args.out} RUN_DIR)")
        checkpoint = export(Path(args.src), Path(args.out), force=args.force)
    except (ExportError, OSError) as e:  # OSError: disk full, permissions, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"exported {checkpoint} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
