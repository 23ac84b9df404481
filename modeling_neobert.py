"""NeoBERT for Hugging Face transformers (4.5x and 5.x): export.py copies this file, byte for byte, into the folder.

The model is neobert.py beside it, the training code itself. This file only adapts it: a PretrainedConfig holding
neobert.NeoBERTConfig's fields, and PreTrainedModel classes holding neobert.py's modules under the released tensor
names. Only this file imports transformers (docs/export.md).
"""

import importlib
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

try:  # in an exported folder: neobert.py beside this file (transformers copies relative imports along)
    from .neobert import (NeoBERT as Encoder, NeoBERTConfig as ModelConfig, NeoBERTForSequenceClassification as
                          Classifier, NeoBERTLMHead as LMHead, init_classifier_layer, init_weights)
except ImportError:  # in the repo, where neobert.py is a top-level module. importlib, not an import statement:
    # transformers 4.5x skips try blocks only up to `except ...:` when it lists the packages a remote file needs
    _neobert = importlib.import_module("neobert")
    Encoder, ModelConfig, LMHead = _neobert.NeoBERT, _neobert.NeoBERTConfig, _neobert.NeoBERTLMHead
    Classifier = _neobert.NeoBERTForSequenceClassification
    init_classifier_layer, init_weights = _neobert.init_classifier_layer, _neobert.init_weights


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
        self.classifier_dropout, self.classifier_init_range = classifier_dropout, classifier_init_range

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
        """neobert.NeoBERT's forward, block by block, with what transformers callers also pass: inputs_embeds in place
        of the token embeddings, a flat (T,) packed sequence, left padding (real tokens keep positions 0..n-1) and
        output_hidden_states (the embeddings, then every block's output)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        enc = self.model
        x = enc.encoder(input_ids) if inputs_embeds is None else inputs_embeds
        if x.dim() == 2:  # one flat packed sequence
            x, position_ids = x[None], None if position_ids is None else position_ids[None]
        attention_mask = None if cu_seqlens is not None else attention_mask  # packing says all the mask would
        if position_ids is None:
            position_ids = enc.positions(x.shape[:2], x.device, cu_seqlens, max_seqlen)
            if attention_mask is not None:  # left padding: real tokens keep positions 0..n-1
                position_ids = (position_ids - attention_mask.long().argmax(-1, keepdim=True)).clamp(min=0)
        if not enc.config.rope:
            x = x + enc.positional_embedding(position_ids)
        rotary = (enc.rope_cos[position_ids], enc.rope_sin[position_ids])
        states = [x]
        for block in enc.transformer_encoder:
            args = (x, *rotary, attention_mask, cu_seqlens, max_seqlen)
            use_checkpoint = enc.gradient_checkpointing and self.training
            x = checkpoint(block, *args, use_reentrant=False) if use_checkpoint else block(*args)
            states.append(x)
        want = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return BaseModelOutput(last_hidden_state=enc.layer_norm(x), hidden_states=tuple(states) if want else None)

    def returns_dict(self, return_dict):
        return return_dict if return_dict is not None else \
            getattr(self.config, "return_dict", True) and not getattr(self.config, "torchscript", False)


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
            # num_items_in_batch: the Trainer's count of predicted tokens over all micro-batches (and devices)
            loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100,
                                   reduction="mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:
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
            integer = labels.dtype in (torch.long, torch.int)
            problem = self.config.problem_type or ("regression" if self.num_labels == 1 else
                                                   "single_label_classification" if integer else
                                                   "multi_label_classification")
            if problem == "regression":  # (B, 1) logits against (B,) or (B, 1) labels when num_labels == 1
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
            elif problem == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1).long())
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=h.hidden_states)
        return out if self.returns_dict(return_dict) else out.to_tuple()
