"""Export a training checkpoint as a Hugging Face folder that transformers, sentence-transformers and MTEB load as is.

    python export.py --out HF_DIR [RUN_DIR | CHECKPOINT_DIR] [--force]

RUN_DIR is a training run's output_dir (the newest complete model checkpoint is taken: model_checkpoints/latest, else
the highest complete step); CHECKPOINT_DIR is one model checkpoint (model.safetensors, config.yaml, tokenizer.json).
The folder holds config.json (model_type neobert, auto_map), model.safetensors (the released chandar-lab/NeoBERT
tensor names: model.*, decoder.*), modeling_neobert.py (written below, self-contained; transformers 4.5x and 5.x), the
tokenizer files, the sentence-transformers files (mean pooling) and a README.md model card.
The folder is written under a temporary name next to HF_DIR and renamed when complete.
This file imports torch and neobert, never transformers: the modeling file is a string that the folder carries.
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
# every NeoBERTConfig field and what the exported modeling file does with it; a field missing here is a variant the
# modeling file was not written for, and export refuses it rather than writing a folder that computes something else
EXPORTED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "max_position_embeddings", "norm_eps", "pad_token_id", "rope", "rms_norm", "hidden_act", "dropout",
                   "init_range")
NOT_EXPORTED_FIELDS = ("attn_backend",)  # how to run, not what to compute: the modeling file picks its own kernel
SUPPORTED_HIDDEN_ACTS = ("swiglu", "gelu")


class ExportError(Exception):
    """A mistake the user can fix; main() prints it as `error: ...` and exits 2."""


# -----------------------------------------------------------------------------
# the modeling file the folder carries (loaded by transformers with trust_remote_code=True)

MODELING_FILE = r'''"""NeoBERT for Hugging Face transformers, written by the neobert project's export.py.

Load with AutoModel, AutoModelForMaskedLM or AutoModelForSequenceClassification and trust_remote_code=True; works
with transformers 4.5x and 5.x. Tensor names are those of the released chandar-lab/NeoBERT (model.*, decoder.*) and
the math is that of neobert.py: pre-norm blocks, RMSNorm, rotary embeddings on adjacent pairs (theta 10000), SwiGLU
(and neobert.py's variants: learned positions, LayerNorm, a GELU MLP).
Padded batches use PyTorch SDPA with the padding mask; packed batches (cu_seqlens) use flash-attn when it is installed
and the tensors are half precision on CUDA, else SDPA with a block-diagonal mask.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

try:  # optional, CUDA only
    from flash_attn import flash_attn_varlen_func
except Exception:  # not installed, or built for another torch
    flash_attn_varlen_func = None


class NeoBERTConfig(PretrainedConfig):
    model_type = "neobert"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        max_position_embeddings: Optional[int] = None,
        norm_eps: float = 1e-5,
        pad_token_id: int = 0,
        rope: bool = True,
        rms_norm: bool = True,
        hidden_act: str = "swiglu",
        dropout: float = 0.0,
        init_range: float = 0.02,
        classifier_dropout: float = 0.1,
        classifier_init_range: float = 0.02,
        **kwargs,
    ):
        # released chandar-lab/NeoBERT configs call the context length `max_length`
        legacy_max_length = kwargs.pop("max_length", None)
        if max_position_embeddings is None:
            max_position_embeddings = legacy_max_length or 4096
        kwargs.setdefault("tie_word_embeddings", False)  # the decoder is not tied to the embedding
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
        if str(hidden_act).lower() not in ("swiglu", "gelu"):
            raise ValueError(f"hidden_act={hidden_act!r} is not supported; choose swiglu or gelu")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.norm_eps = norm_eps
        self.pad_token_id = pad_token_id
        self.rope = rope
        self.rms_norm = rms_norm
        self.hidden_act = str(hidden_act).lower()
        self.dropout = dropout
        self.init_range = init_range
        self.classifier_dropout = classifier_dropout
        self.classifier_init_range = classifier_init_range


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(config):
    if config.rms_norm:
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def ffn_hidden_size(config) -> int:
    if config.hidden_act == "swiglu":  # 2/3 of intermediate_size, rounded up to a multiple of 8
        return 8 * ((int(2 * config.intermediate_size / 3) + 7) // 8)
    return config.intermediate_size


def rope_cos_sin(position_ids, head_dim: int, theta: float = 10000.0):
    """cos, sin (B, S, hd/2) of pos * theta^(-2i/hd), computed in float64 then rounded, as neobert.py does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim)
    angles = position_ids.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x (B, S, nh, hd): rotate adjacent pairs (2i, 2i+1) as complex numbers times e^(i*angle)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def segment_ids(cu_seqlens, shape):
    """The packed-segment index of every token, shaped like input_ids (B, S)."""
    idx = torch.arange(shape[0] * shape[1], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), idx, right=True).view(shape)


def attention(q, k, v, attention_mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0):
    """q, k, v (B, S, nh, hd) -> (B, S, nh, hd); bidirectional, scale 1/sqrt(hd)."""
    B, S, nh, hd = q.shape
    if cu_seqlens is not None:
        if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
            m = int(max_seqlen) if max_seqlen is not None else S
            out = flash_attn_varlen_func(q.reshape(B * S, nh, hd), k.reshape(B * S, nh, hd), v.reshape(B * S, nh, hd),
                                         cu, cu, m, m, dropout_p=dropout_p)
            return out.view(B, S, nh, hd)
        seg = segment_ids(cu_seqlens.to(q.device), (B, S))
        mask = (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)  # (B, 1, S, S): block-diagonal
    elif attention_mask is not None:
        mask = attention_mask.to(q.device).bool()[:, None, None, :]  # (B, 1, 1, S): 1 = real token
    else:
        mask = None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout_p)
    return out.transpose(1, 2)


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = ffn_hidden_size(config)
        self.w12 = nn.Linear(config.hidden_size, 2 * hidden, bias=False)  # rows [gate; up]
        self.w3 = nn.Linear(hidden, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.ffn = SwiGLU(config) if config.hidden_act == "swiglu" else GeluMLP(config)
        self.attention_norm = make_norm(config)
        self.ffn_norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, attention_mask=None, cu_seqlens=None, max_seqlen=None):
        B, S, H = x.shape
        nh = self.config.num_attention_heads
        hd = H // nh
        # qkv rows are grouped per head: (B, S, nh, 3*hd) -> q, k, v (B, S, nh, hd)
        q, k, v = self.qkv(self.attention_norm(x)).view(B, S, nh, 3 * hd).chunk(3, dim=-1)
        if self.config.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.config.dropout if self.training else 0.0
        a = attention(q, k, v, attention_mask, cu_seqlens, max_seqlen, dropout_p=p)
        x = x + self.dropout(self.wo(a.reshape(B, S, H)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


# -----------------------------------------------------------------------------
# models


class NeoBERTPreTrainedModel(PreTrainedModel):
    config_class = NeoBERTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EncoderBlock"]
    # attention is always PyTorch SDPA, so attn_implementation="sdpa" (or "eager") is accepted; it changes nothing
    _supports_sdpa = True
    # transformers' Trainer passes num_items_in_batch to a forward with **kwargs and then leaves the loss unscaled for
    # gradient accumulation; only the MLM head uses it (below), so the others say no and the Trainer divides itself
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module):
        """neobert.py's initialisation, for tensors the checkpoint does not hold (e.g. a new classification head):
        linear and embedding weights ~ uniform(-init_range, init_range), biases 0, norms 1; the classification head
        ~ normal(0, classifier_init_range). transformers marks loaded tensors (5.x) or modules (4.5x)
        `_is_hf_initialized`; those are never touched, so loaded weights survive under both."""
        if getattr(module, "_is_hf_initialized", False):
            return

        def fresh(p):
            return p is not None and not getattr(p, "_is_hf_initialized", False)

        head = (getattr(self, "dense", None), getattr(self, "classifier", None))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if fresh(module.weight):
                if any(module is m for m in head if m is not None):
                    module.weight.normal_(0.0, self.config.classifier_init_range)
                else:
                    module.weight.uniform_(-self.config.init_range, self.config.init_range)
            if fresh(getattr(module, "bias", None)):
                module.bias.zero_()
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            if fresh(module.weight):
                module.weight.fill_(1.0)
            if fresh(getattr(module, "bias", None)):
                module.bias.zero_()


# the MLM decoder of an exported folder is not a weight of the encoder or the classifier: no "unexpected keys" report
IGNORE_DECODER = [r"(^|\.)decoder\.(weight|bias)$"]


def use_return_dict(config, return_dict):
    """return_dict if given, else the config's (return_dict=False in the config gives tuples, as in transformers)."""
    if return_dict is not None:
        return return_dict
    return getattr(config, "return_dict", True) and not getattr(config, "torchscript", False)


class NeoBERT(NeoBERTPreTrainedModel):
    """The encoder: (input_ids, attention_mask) -> last_hidden_state (B, S, H), after the final norm."""

    _keys_to_ignore_on_load_unexpected = IGNORE_DECODER

    def __init__(self, config):
        super().__init__(config)
        self.encoder = nn.Embedding(config.vocab_size, config.hidden_size)
        if not config.rope:
            self.positional_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.transformer_encoder = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.layer_norm = make_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.encoder

    def set_input_embeddings(self, value):
        self.encoder = value

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,  # accepted for BERT-style callers, unused
        position_ids: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,  # SDPA computes no attention weights; attentions stay None
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.encoder(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        if cu_seqlens is not None:
            attention_mask = None  # packing says everything the mask would
            if position_ids is None:
                seg = segment_ids(cu_seqlens.to(x.device), (B, S)).flatten()
                idx = torch.arange(B * S, device=x.device)
                position_ids = (idx - cu_seqlens.to(x.device).long()[seg]).view(B, S)
        max_positions = self.config.max_position_embeddings
        if S > max_positions or (cu_seqlens is not None and max_seqlen is not None and max_seqlen > max_positions):
            # as neobert.py: the model was not trained on longer sequences (and learned positions have no row for them)
            raise ValueError(f"sequence length {S if S > max_positions else max_seqlen} exceeds "
                             f"max_position_embeddings={max_positions}; truncate the input (e.g. tokenizer(..., "
                             f"truncation=True))")
        if position_ids is None:
            position_ids = torch.arange(S, device=x.device).expand(B, S)
            if attention_mask is not None:  # left padding: real tokens still sit at 0..len-1 (right padding: shift 0)
                first = attention_mask.to(x.device).long().argmax(dim=-1, keepdim=True)
                position_ids = (position_ids - first).clamp(min=0)
        cos = sin = None
        if self.config.rope:
            cos, sin = rope_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads)
        else:
            x = x + self.positional_embedding(position_ids)
        want_hidden = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        hidden_states = (x,) if want_hidden else None
        for block in self.transformer_encoder:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attention_mask, cu_seqlens, max_seqlen,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, attention_mask, cu_seqlens, max_seqlen)
            if want_hidden:
                hidden_states = hidden_states + (x,)
        x = self.layer_norm(x)
        out = BaseModelOutput(last_hidden_state=x, hidden_states=hidden_states)
        return out if use_return_dict(self.config, return_dict) else out.to_tuple()


class NeoBERTLMHead(NeoBERTPreTrainedModel):
    """The encoder plus an untied decoder H -> vocab (with bias). Keys model.*, decoder.*."""

    accepts_loss_kwargs = True  # the loss divides by num_items_in_batch when the Trainer gives it

    def __init__(self, config):
        super().__init__(config)
        self.model = NeoBERT(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):  # so resize_token_embeddings resizes the decoder too (it is never tied)
        return self.decoder

    def set_output_embeddings(self, value):
        self.decoder = value

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None, inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, num_items_in_batch=None, **kwargs):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, inputs_embeds=inputs_embeds,
                       output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.decoder(h.last_hidden_state)
        loss = None
        if labels is not None:  # mean cross-entropy over positions whose label is not -100
            flat_logits, flat_labels = logits.view(-1, logits.size(-1)).float(), labels.view(-1).to(logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
            else:  # the Trainer's count of predicted tokens over all accumulated micro-batches (and devices)
                loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype)
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=h.hidden_states)
        return out if use_return_dict(self.config, return_dict) else out.to_tuple()


class NeoBERTForSequenceClassification(NeoBERTPreTrainedModel):
    """As released: [CLS] -> dropout -> dense (H -> H) -> tanh -> dropout -> classifier (H -> num_labels).
    Loss by config.problem_type: regression (MSE; the default when num_labels == 1), single-label (cross-entropy;
    the default for integer labels) or multi-label (BCE with logits)."""

    _keys_to_ignore_on_load_unexpected = IGNORE_DECODER

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = NeoBERT(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                **kwargs):
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states, return_dict=True)
        x = self.dropout(h.last_hidden_state[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        logits = self.classifier(x)
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
        return out if use_return_dict(self.config, return_dict) else out.to_tuple()
'''


# -----------------------------------------------------------------------------
# finding and reading a checkpoint


def missing_files(folder: Path) -> list:
    return [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]


def find_checkpoint(path: Path) -> Path:
    """A model checkpoint folder from a checkpoint folder, a run's output_dir, or its model_checkpoints folder."""
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if not path.is_dir():
        raise ExportError(f"{path} is not a folder: pass a run directory or a model checkpoint directory")
    if (path / "model.safetensors").exists() or (path / "config.yaml").exists():
        if missing := missing_files(path):
            raise ExportError(f"{path} is not a complete model checkpoint: {', '.join(missing)} missing")
        return path
    root = path / "model_checkpoints" if (path / "model_checkpoints").is_dir() else path
    latest = root / "latest"
    if latest.is_file():
        step = latest.read_text().strip()
        if step.isdigit() and (root / step).is_dir() and not missing_files(root / step):
            return root / step
    steps = sorted((int(p.name), p) for p in root.iterdir() if p.is_dir() and p.name.isdigit() and not missing_files(p))
    if steps:
        return steps[-1][1]
    raise ExportError(f"no model checkpoint in {path}: expected a run directory with model_checkpoints/<step>/ or a "
                      f"checkpoint directory holding {', '.join(CHECKPOINT_FILES)}")


def run_dir_of(checkpoint: Path):
    """RUN for RUN/model_checkpoints/<step>, else None."""
    return checkpoint.parent.parent if checkpoint.parent.name == "model_checkpoints" else None


def read_training_config(checkpoint: Path):
    """(the full resolved training config as a dict, its model section as a neobert.NeoBERTConfig)."""
    path = checkpoint / "config.yaml"
    try:
        full = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ExportError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(full, dict) or not isinstance(full.get("model"), dict):
        raise ExportError(f"{path} has no `model:` section")
    try:
        config = neobert.NeoBERTConfig(**full["model"])
    except (TypeError, ValueError) as e:  # an unknown key (TypeError) or a bad value
        raise ExportError(f"{path}: bad model config: {e}") from None
    return full, config


def check_supported(config: neobert.NeoBERTConfig):
    """Refuse, naming it, any variant the exported modeling file does not compute exactly as neobert.py."""
    fields = set(config.to_dict())
    unknown = sorted(fields - set(EXPORTED_FIELDS) - set(NOT_EXPORTED_FIELDS))
    if unknown:
        raise ExportError(f"model.{unknown[0]} is a model option the exported modeling file does not implement; "
                          f"export.py needs updating before this checkpoint can be exported")
    if config.hidden_act not in SUPPORTED_HIDDEN_ACTS:
        raise ExportError(f"model.hidden_act={config.hidden_act} is not supported by the exported modeling file "
                          f"(supported: {', '.join(SUPPORTED_HIDDEN_ACTS)})")


def read_weights(checkpoint: Path, config: neobert.NeoBERTConfig) -> dict:
    """The checkpoint's tensors, checked name by name and shape by shape against neobert.NeoBERTLMHead(config)."""
    path = checkpoint / "model.safetensors"
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}") from None
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in neobert.NeoBERTLMHead(config).state_dict().items()}
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


def hf_config(config: neobert.NeoBERTConfig, dtype: torch.dtype) -> dict:
    d = {"model_type": "neobert", "architectures": ["NeoBERTLMHead"]}
    module = MODELING_FILE_NAME[: -len(".py")]
    d["auto_map"] = {
        "AutoConfig": f"{module}.NeoBERTConfig",
        "AutoModel": f"{module}.NeoBERT",
        "AutoModelForMaskedLM": f"{module}.NeoBERTLMHead",
        "AutoModelForSequenceClassification": f"{module}.NeoBERTForSequenceClassification",
    }
    d.update({k: v for k, v in config.to_dict().items() if k in EXPORTED_FIELDS})
    # the context length is max_position_embeddings: transformers 5 refuses to save a config with `max_length`
    d.update(classifier_dropout=0.1, classifier_init_range=0.02, tie_word_embeddings=False,
             torch_dtype=str(dtype).replace("torch.", ""),
             # pipeline("fill-mask") of transformers 4.50 loads a tokenizer for a custom model_type only when
             # config.json names its class (4.57 and 5.x read tokenizer_config.json)
             tokenizer_class="PreTrainedTokenizerFast")
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


def sentence_transformers_files(config: neobert.NeoBERTConfig) -> dict:
    """modules.json (Transformer -> mean Pooling), sentence_bert_config.json, config_sentence_transformers.json,
    1_Pooling/config.json."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    pooling = {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    # the model type and the similarity (cosine, what mean-pooled embeddings are compared with) said explicitly, for
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


def model_card(config: neobert.NeoBERTConfig, full_config: dict, checkpoint: Path, n_params: int) -> str:
    run_dir = run_dir_of(checkpoint)
    H, L = config.hidden_size, config.num_hidden_layers
    norm = "RMSNorm" if config.rms_norm else "LayerNorm"
    positions = "rotary (RoPE, theta 10000)" if config.rope else "learned absolute"
    ffn = (f"SwiGLU ({config.ffn_hidden_size} hidden)"
           if config.hidden_act == "swiglu" else f"GELU MLP ({config.intermediate_size} hidden)")
    dataset = full_config.get("dataset") or {}
    tok = full_config.get("tokenizer") or {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        "tags: [neobert, fill-mask, feature-extraction, sentence-transformers]",
        "---",
        "",
        "# NeoBERT (exported)",
        "",
        f"A NeoBERT encoder trained with the neobert project, exported by `export.py` from `{checkpoint}`"
        + (f" (training step {checkpoint.name})." if checkpoint.name.isdigit() else "."),
        "The tensor names and layout are those of the released "
        "[chandar-lab/NeoBERT](https://huggingface.co/chandar-lab/NeoBERT) "
        "([paper](https://arxiv.org/abs/2502.19587)); the modeling file `modeling_neobert.py` is self-contained.",
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
        "| MLM decoder | untied, with bias |",
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
        "fill = pipeline(\"fill-mask\", model=path, trust_remote_code=True)",
        "print(fill(\"Paris is the [MASK] of France.\"))",
        "",
        "from sentence_transformers import SentenceTransformer  # mean pooling",
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
    check_supported(config)
    state = read_weights(checkpoint, config)
    files = {"config.json": hf_config(config, next(iter(state.values())).dtype)}
    files.update(tokenizer_files(checkpoint, config))
    files.update(sentence_transformers_files(config))
    card = model_card(config, full_config, checkpoint, sum(t.numel() for t in state.values()))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    aside = None  # where an existing --out waits until the new folder is in place
    try:
        for name, obj in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        (tmp / MODELING_FILE_NAME).write_text(MODELING_FILE)
        (tmp / "README.md").write_text(card)
        # released layout: the training state_dict keys are already model.* and decoder.*
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
    parser.add_argument("src", metavar="RUN_DIR|CHECKPOINT_DIR",
                        help="a run's output_dir (its newest complete model checkpoint) or one model checkpoint")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = parser.parse_args(argv)

    def interrupt(signum, frame):  # SIGTERM (a scheduler, `kill`) cleans up as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
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
