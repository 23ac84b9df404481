"""NeoBERT: a modern BERT-style encoder, weight-for-weight the released chandar-lab/NeoBERT.

Read top to bottom: varlen kernels -> config -> norms, rotary, attention, feed-forward -> block -> encoder -> heads
and the MLM loss -> pooling, batching, embed -> FLOPs/MFU and optimizer groups. Paper: https://arxiv.org/abs/2502.19587
This file is the model only: loading a trained model is checkpoint.py's, what transformers needs modeling_neobert.py's.
It imports nothing of the project, so an exported folder ships it as it is.

Conventions used everywhere below:
- attention_mask: 1/True = a real token to attend to, 0/False = padding.
- packed batches: input_ids [B, S] whose rows hold several documents back to back. cu_seqlens (int32, [N+1]) gives the
  segment offsets in the row-major flattened B*S tokens (every row start is a segment start) and position_ids restart
  at 0 in each segment. No token attends across a segment boundary.
"""

import contextlib
import importlib.util
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTN_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
HIDDEN_ACTS = ("swiglu", "gelu")
FIELD_KINDS = {int: (int, "an integer"), float: ((int, float), "a number"), bool: (bool, "true or false"),
               str: (str, "a string")}  # NeoBERTConfig's field types: what each accepts, as the error names it

# -----------------------------------------------------------------------------
# the optional varlen kernels (CUDA only), imported on first use: torch.nn.attention.varlen pulls in torch._dynamo,
# seconds of start-up on every command, and only a packed batch on CUDA needs either kernel.
# found, not imported (milliseconds); found once here so that torch.compile never traces a failing import
KERNEL_INSTALLED = {}
for _backend, _module in (("flash_attn", "flash_attn"), ("torch_varlen", "torch.nn.attention.varlen")):
    try:
        KERNEL_INSTALLED[_backend] = importlib.util.find_spec(_module) is not None
    except (ImportError, ValueError):
        KERNEL_INSTALLED[_backend] = False
_kernels = {}


def varlen_kernel(backend: str):
    """flash_attn.flash_attn_varlen_func or torch.nn.attention.varlen.varlen_attn, or None if it cannot be imported."""
    if backend not in _kernels and KERNEL_INSTALLED[backend]:
        try:
            if backend == "flash_attn":
                from flash_attn import flash_attn_varlen_func as fn
            else:
                from torch.nn.attention.varlen import varlen_attn as fn
        except Exception:  # built for another torch, or another CUDA
            fn = None
        _kernels[backend] = fn
    return _kernels.get(backend)


# -----------------------------------------------------------------------------
# config

@dataclass
class NeoBERTConfig:
    """Defaults are the released 250M NeoBERT. This dataclass is also the `model:` section of a training config."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # SwiGLU uses 2/3 of it (rounded up to a multiple of 8): 2048
    max_position_embeddings: int = 4096  # the released config.json calls this max_length
    norm_eps: float = 1e-5
    pad_token_id: int = 0
    rope: bool = True  # False: learned absolute positions
    rms_norm: bool = True  # False: LayerNorm (with bias)
    hidden_act: str = "swiglu"  # swiglu | gelu (a 2-layer GELU MLP)
    dropout: float = 0.0
    attn_backend: str = "auto"  # auto | flash_attn | torch_varlen | sdpa
    init_range: float = 0.02  # uniform(-r, r) for every linear and embedding weight, as released
    # how the MLM loss runs (no effect on the weights or the math, like attn_backend):
    decoder_chunk_size: int = 0  # 0: one decoder matmul; N: decoder + cross-entropy fused, N positions at a time

    def __post_init__(self):
        for f in fields(self):  # a bool is an int to isinstance: only a bool field takes one
            v, (types, kind) = getattr(self, f.name), FIELD_KINDS[f.type]
            if not isinstance(v, types) or (isinstance(v, bool) and f.type is not bool):
                raise ValueError(f"model.{f.name} must be {kind}, got {v!r}")
            if f.type is float:
                setattr(self, f.name, float(v))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        self.hidden_act = self.hidden_act.lower()
        for name, allowed in (("hidden_act", HIDDEN_ACTS), ("attn_backend", ATTN_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is unknown; choose one of {', '.join(allowed)}")
        hs, nh, backend = self.hidden_size, self.num_attention_heads, self.attn_backend
        for ok, problem in (  # written `ok` first, so NaN fails too
            (hs % nh == 0, f"model.hidden_size={hs} is not divisible by model.num_attention_heads={nh}"),
            (not self.rope or self.head_dim % 2 == 0,
             f"rotary embeddings need an even head dim; hidden_size/num_attention_heads = {self.head_dim}"),
            (backend != "flash_attn" or KERNEL_INSTALLED["flash_attn"], "model.attn_backend=flash_attn but the "
             "flash-attn package is not installed; install it (CUDA only) or use attn_backend: auto"),
            (backend != "torch_varlen" or KERNEL_INSTALLED["torch_varlen"],
             "model.attn_backend=torch_varlen needs torch.nn.attention.varlen (PyTorch >= 2.9); use auto"),
            (0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}"),
            (self.norm_eps > 0 and self.init_range > 0, "model.norm_eps and model.init_range must be positive"),
            (self.decoder_chunk_size >= 0,
             f"model.decoder_chunk_size must be >= 0 (0 = off), got {self.decoder_chunk_size}"),
            (0 <= self.pad_token_id < self.vocab_size,
             f"model.pad_token_id={self.pad_token_id} is outside the vocabulary (size {self.vocab_size})"),
        ):
            if not ok:
                raise ValueError(problem)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_hidden_size(self) -> int:
        if self.hidden_act == "swiglu":  # 2/3 keeps params and FLOPs equal to a GELU MLP (arXiv:2002.05202)
            return 8 * ((int(2 * self.intermediate_size / 3) + 7) // 8)
        return self.intermediate_size

    def to_dict(self) -> dict:
        return asdict(self)


# -----------------------------------------------------------------------------
# the encoder: norms, rotary, attention, feed-forward, block, initialisation, the model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in fp32 even under bf16 autocast
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(config: NeoBERTConfig) -> nn.Module:
    H, eps = config.hidden_size, config.norm_eps
    return RMSNorm(H, eps) if config.rms_norm else nn.LayerNorm(H, eps=eps)


def rope_tables(head_dim: int, max_positions: int, theta: float = 10000.0):
    """cos, sin of shape (max_positions, head_dim/2) for rotating dims (2i, 2i+1) by pos * theta^(-2i/head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: (B, S, nh, hd); cos/sin: (B, S, hd/2). Adjacent pairs as complex numbers times e^(i*angle), as released."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, nh, hd/2) each
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def segment_ids(cu_seqlens, shape):
    """The segment index of every token of a packed batch, shaped like input_ids."""
    idx = torch.arange(shape[0] * shape[1], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), idx, right=True).view(shape)


def packed_position_ids(cu_seqlens, shape):
    seg = segment_ids(cu_seqlens, shape).flatten()
    idx = torch.arange(seg.numel(), device=seg.device)
    return (idx - cu_seqlens.long()[seg]).view(shape)


def pick_backend(config: NeoBERTConfig, q: torch.Tensor) -> str:
    """The attention backend for a packed batch on this device and dtype."""
    if config.attn_backend != "auto":
        if config.attn_backend != "sdpa" and not q.is_cuda:
            raise ValueError(f"attn_backend={config.attn_backend} runs on CUDA only; use auto or sdpa on {q.device}")
        return config.attn_backend
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        for backend in ("flash_attn", "torch_varlen"):  # in order of preference
            if varlen_kernel(backend) is not None:
                return backend
    return "sdpa"


def attention(q, k, v, config, attention_mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0):
    """q, k, v: (B, S, nh, hd) -> (B, S, nh, hd). Scale 1/sqrt(hd); bidirectional."""
    B, S, nh, hd = q.shape
    if cu_seqlens is not None:
        backend = pick_backend(config, q)
        if backend in ("flash_attn", "torch_varlen"):
            max_seqlen = int(max_seqlen) if max_seqlen is not None else S
            dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16  # kernels need half
            qf, kf, vf = (t.reshape(B * S, nh, hd).to(dtype) for t in (q, k, v))
            cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
            kernel = varlen_kernel(backend)
            if kernel is None:
                raise ValueError(f"attn_backend={backend} is installed but cannot be imported; use auto or sdpa")
            if backend == "flash_attn":
                out = kernel(qf, kf, vf, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout_p)
            else:  # no dropout in torch's varlen kernel: assert rather than silently skip it
                assert dropout_p == 0.0, "attn_backend=torch_varlen does not support attention dropout"
                out = kernel(qf, kf, vf, cu, cu, max_seqlen, max_seqlen)
            return out.view(B, S, nh, hd).to(q.dtype)
        # exact path: a block-diagonal mask per row (segments never cross rows)
        seg = segment_ids(cu_seqlens, (B, S))
        mask = (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)  # (B, 1, S, S)
    else:  # (B, 1, 1, S): keys only
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2)


class SwiGLU(nn.Module):
    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.w12 = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)  # [gate; up]
        self.w3 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: NeoBERTConfig):
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
        nh, hd = self.config.num_attention_heads, self.config.head_dim
        # rows are grouped per head: (B, S, nh, 3*hd) -> q, k, v each (B, S, nh, hd)
        q, k, v = self.qkv(self.attention_norm(x)).view(B, S, nh, 3 * hd).chunk(3, dim=-1)
        if self.config.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.config.dropout if self.training else 0.0
        a = attention(q, k, v, self.config, attention_mask, cu_seqlens, max_seqlen, dropout_p=p)
        x = x + self.dropout(self.wo(a.reshape(B, S, H)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def init_weights(module: nn.Module, init_range: float, recurse: bool = True):
    """The released initialisation: every nn.Linear and nn.Embedding weight ~ uniform(-r, r), every bias 0, every norm
    weight 1 (the classifier head: init_classifier_layer). recurse=False: this module's own (for transformers)."""
    for m in module.modules() if recurse else (module,):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.uniform_(m.weight, -init_range, init_range)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def init_classifier_layer(layer: nn.Linear, init_range: float):
    """The released classification head (dense and classifier): weight ~ normal(0, init_range), bias 0."""
    nn.init.normal_(layer.weight, std=init_range)
    nn.init.zeros_(layer.bias)


class NeoBERT(nn.Module):
    """(input_ids, attention_mask | cu_seqlens) -> final-normed hidden states (B, S, H)."""

    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # the trainer flips this; keys and numerics do not change
        self.encoder = nn.Embedding(config.vocab_size, config.hidden_size)
        if not config.rope:
            self.positional_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.transformer_encoder = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_hidden_layers))
        self.layer_norm = make_norm(config)
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)  # not in the state_dict: derived, not learned
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, config.init_range)

    @torch.no_grad()
    def init_rope_tables(self):
        """Recompute the rotary tables in place: not saved, so a meta-device build (transformers 5) lacks them."""
        cos, sin = rope_tables(self.config.head_dim, self.config.max_position_embeddings)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def positions(self, shape, device, cu_seqlens=None, max_seqlen=None):
        """Position ids (B, S): 0..S-1 in every row, or restarting in each document of a packed batch (then only the
        longest document, max_seqlen, must fit the position tables)."""
        longest = max_seqlen if cu_seqlens is not None and max_seqlen is not None else shape[1]
        if longest > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {longest} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if cu_seqlens is not None:
            return packed_position_ids(cu_seqlens, shape)
        return torch.arange(shape[1], device=device).expand(*shape)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cu_seqlens=None, max_seqlen=None):
        """input_ids (B, S) -> hidden states (B, S, H) after the final norm. Padded rows: attention_mask (B, S), 1 = a
        real token. Packed rows: cu_seqlens and max_seqlen (the longest document); positions restart per document."""
        if position_ids is None:
            position_ids = self.positions(input_ids.shape, input_ids.device, cu_seqlens, max_seqlen)
        x = self.encoder(input_ids)
        if not self.config.rope:  # learned absolute positions
            x = x + self.positional_embedding(position_ids)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]  # (B, S, hd/2)
        mask = None if cu_seqlens is not None else attention_mask  # packing says everything the mask would
        for block in self.transformer_encoder:
            if self.gradient_checkpointing and self.training:  # keep only x; recompute the block in the backward
                x = checkpoint(block, x, cos, sin, mask, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cu_seqlens, max_seqlen)
        return self.layer_norm(x)


# -----------------------------------------------------------------------------
# heads, then pooling and batching for sentence embeddings

class MaskedLMOutput(NamedTuple):
    logits: Optional[torch.Tensor]  # (B, S, V) when called without labels
    loss: Optional[torch.Tensor] = None  # mean CE over predicted positions
    loss_sum: Optional[torch.Tensor] = None  # fp32 sum of CE: normalise by the global count yourself
    num_masked: Optional[torch.Tensor] = None  # int64 count of positions with labels != -100


def gather_predictions(hidden, labels, per_row: int = 0):
    """(hidden states (N, H), labels (N,)) of the positions to predict. per_row=0: exactly those labelled != -100 (N
    depends on the data: a graph break under torch.compile). per_row=K: the first K of them in each row, then -100
    positions to fill it (N = B*K always: static shapes; a row with more than K predicted tokens loses the rest)."""
    H = hidden.size(-1)
    labels = labels.reshape(hidden.shape[:-1])
    if not per_row:
        keep = labels.reshape(-1) != -100
        return hidden.reshape(-1, H)[keep], labels.reshape(-1)[keep]
    # a stable sort of "not predicted" puts each row's predicted positions first, in order
    idx = torch.sort((labels == -100).to(torch.int8), dim=-1, stable=True).indices[:, :per_row]  # (B, K)
    return hidden.gather(1, idx[..., None].expand(-1, -1, H)).reshape(-1, H), labels.gather(1, idx).reshape(-1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross-entropy(x @ weight.T + bias, labels), labels -100 ignored, `chunk` rows at a time. The
    gradients are made in the forward, chunk by chunk (d loss / d logits = softmax - one-hot), so no logits tensor
    outlives its chunk and nothing is recomputed: peak memory is chunk x V, not N x V (twice, with its gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, chunk):
        loss = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))  # fp32 (fp64 stays fp64)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=loss.dtype)
        grad_b = torch.zeros_like(bias, dtype=loss.dtype)
        for start in range(0, x.shape[0], chunk):
            xc, yc = x[start:start + chunk], labels[start:start + chunk]
            logits = F.linear(xc, weight, bias)  # bf16 under autocast
            valid = (yc != -100).unsqueeze(-1)
            target = yc.clamp(min=0).unsqueeze(-1)
            logp = torch.log_softmax(logits.to(loss.dtype), dim=-1)
            loss = loss - (logp.gather(-1, target) * valid).sum()
            g = (logp.exp() - torch.zeros_like(logp).scatter_(-1, target, 1.0)) * valid  # (chunk, V)
            grad_x[start:start + chunk] = (g.to(logits.dtype) @ weight.to(logits.dtype)).to(x.dtype)
            grad_w += (g.to(logits.dtype).t() @ xc.to(logits.dtype)).to(grad_w.dtype)
            grad_b += g.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        return (grad_x * grad_loss.to(grad_x.dtype), (grad_w * grad_loss).to(ctx.dtypes[0]),
                (grad_b * grad_loss).to(ctx.dtypes[1]), None, None)


def decoder_loss(decoder: nn.Linear, hidden, labels, chunk_size: int = 0):
    """fp32 sum of the cross-entropy of decoder(hidden) over labels != -100. chunk_size > 0: fused and chunked
    (_LinearCrossEntropy), never holding more than chunk_size x V logits; the same loss and gradients."""
    if chunk_size:
        return _LinearCrossEntropy.apply(hidden, decoder.weight, decoder.bias, labels, chunk_size)
    logits = decoder(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, ignore_index=-100,
                           reduction="sum")


class NeoBERTLMHead(nn.Module):
    """The encoder plus an untied decoder H -> V with bias (keys model.*, decoder.*)."""

    def __init__(self, config: NeoBERTConfig):
        super().__init__()
        self.config = config
        self.model = NeoBERT(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        init_weights(self.decoder, config.init_range)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None, predictions_per_row: int = 0) -> MaskedLMOutput:
        """Without labels: logits (B, S, V). With labels: the loss over the positions != -100, the decoder run on them
        only (sparse prediction, as in cramming). predictions_per_row K > 0: on the first K predicted positions of each
        row, then ignored ones to fill K (a fixed shape: one compiled graph, no host sync; data.Collator masks at most
        K per row); 0: on exactly the predicted positions (a shape that depends on the data)."""
        h = self.model(input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen)
        if labels is None:
            return MaskedLMOutput(logits=self.decoder(h))
        h, labels = gather_predictions(h, labels, predictions_per_row)
        loss_sum = decoder_loss(self.decoder, h, labels, self.config.decoder_chunk_size)
        num_masked = (labels != -100).sum()
        return MaskedLMOutput(None, loss_sum / num_masked.clamp(min=1), loss_sum, num_masked)



class ClassifierOutput(NamedTuple):
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


class NeoBERTForSequenceClassification(nn.Module):
    """The GLUE head as released: CLS -> dropout -> dense (H->H) -> tanh -> dropout -> classifier (H -> num_labels).
    num_labels == 1 is regression (MSE)."""

    def __init__(self, config: NeoBERTConfig, num_labels: int = 2, classifier_dropout: float = 0.1,
                 classifier_init_range: float = 0.02):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1 (1 = regression), got {num_labels}")
        self.config, self.num_labels = config, num_labels
        self.model = NeoBERT(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        for layer in (self.dense, self.classifier):
            init_classifier_layer(layer, classifier_init_range)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None) -> ClassifierOutput:
        """Padded (B, S): logits (B, num_labels). Packed (cu_seqlens): one row of logits per segment, read at its
        first token (its [CLS]), so logits are (len(cu_seqlens) - 1, num_labels)."""
        logits = self.head(self.model(input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen), cu_seqlens)
        if labels is None:
            return ClassifierOutput(logits)
        if self.num_labels == 1:  # regression
            return ClassifierOutput(logits, F.mse_loss(logits.squeeze(-1).float(), labels.float()))
        return ClassifierOutput(logits, F.cross_entropy(logits.float(), labels.long()))

    def head(self, hidden, cu_seqlens=None):
        """Logits from the encoder's hidden states, read at each sequence's (or packed segment's) first token."""
        cls = hidden[:, 0] if cu_seqlens is None else hidden.reshape(-1, hidden.size(-1))[cu_seqlens[:-1].long()]
        return self.classifier(self.dropout(torch.tanh(self.dense(self.dropout(cls)))))


def pool(hidden, attention_mask=None, mode: str = "mean"):
    """Sentence embedding (B, H) from hidden states (B, S, H): masked mean over real tokens, or the [CLS] vector."""
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"pooling mode {mode!r} is unknown; choose mean or cls")
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def pool_packed(hidden, cu_seqlens, mode: str = "mean"):
    """pool for a packed batch: hidden (T, H) of sequences back to back (bounds cu_seqlens) -> (n, H)."""
    if mode == "cls":
        return hidden[cu_seqlens[:-1].long()]
    if mode != "mean":
        raise ValueError(f"pooling mode {mode!r} is unknown; choose mean or cls")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    sums = hidden.new_zeros(len(lengths), hidden.shape[-1]).index_add_(0, seg, hidden)
    return sums / lengths.unsqueeze(-1).to(hidden.dtype)


def batch_sequences(seqs, pad_id: int, packed: bool = False, multiple: int = 1) -> dict:
    """Token sequences (special tokens included) -> model inputs. Padded: input_ids and attention_mask (B, S), S the
    longest rounded up to `multiple`. Packed: one (1, N) row of them back to back with cu_seqlens and max_seqlen (no
    compute on padding; positions restart per sequence, so N may exceed max_position_embeddings)."""
    lengths = [len(s) for s in seqs]
    if packed:
        flat = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seqs])
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return dict(input_ids=flat[None], cu_seqlens=cu, max_seqlen=max(lengths))
    width = -(-max(lengths) // multiple) * multiple
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return dict(input_ids=ids, attention_mask=mask)


@torch.no_grad()
def embed(encoder, seqs, pad_id: int, pooling: str = "mean", batch_size: int = 32, packed: bool = False,
          amp=None, progress=None):
    """Pooled float32 embeddings (n, H), in input order, of token sequences (special tokens included): longest first
    (an out-of-memory shows at once, batches hold similar lengths), padded or packed (batch_sequences).
    amp: an autocast context or None; progress: wraps the batch starts (e.g. a tqdm)."""
    device = next(encoder.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.zeros(len(seqs), encoder.config.hidden_size)
    starts = range(0, len(order), batch_size)
    was_training = encoder.training
    encoder.eval()
    for start in progress(starts) if progress else starts:
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) if torch.is_tensor(v) else v
                 for k, v in batch_sequences([seqs[i] for i in rows], pad_id, packed).items()}
        with amp if amp is not None else contextlib.nullcontext():
            hidden = encoder(**batch).float()
        out[rows] = (pool_packed(hidden[0], batch["cu_seqlens"], pooling) if packed
                     else pool(hidden, batch["attention_mask"], pooling)).cpu()
    encoder.train(was_training)
    return out


# -----------------------------------------------------------------------------
# accounting: parameters, FLOPs, MFU, optimizer groups

def num_params(model: nn.Module, non_embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return n


def flops_per_token(config: NeoBERTConfig, seq_len: int, predicted_fraction: float = 1.0) -> float:
    """Training FLOPs (forward + backward = 3x forward) per input token: 6 per matmul weight per token, plus
    attention (QK^T and AV: 2 * 2 * seq_len * H per token per layer, x3), plus the decoder on predicted tokens only.
    seq_len is the number of keys each query attends to (the document length for packed batches)."""
    H, L = config.hidden_size, config.num_hidden_layers
    ffn = (3 if config.hidden_act == "swiglu" else 2) * H * config.ffn_hidden_size
    matmul = L * (4 * H * H + ffn)
    attn = L * 2 * 2 * seq_len * H
    decoder = 2 * H * config.vocab_size * predicted_fraction
    return 3.0 * (2 * matmul + attn + decoder)


# peak dense bf16 tensor-core FLOP/s by device name; more specific names first
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("RTX 4090", 165e12),
]


def peak_flops(device=None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a CUDA device, or None (CPU, or a GPU not in the table: no MFU beats a wrong one)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((value for key, value in PEAK_BF16_FLOPS if key in name), None)


def hidden_matrices(model: nn.Module) -> list:
    """The encoder blocks' 2-D weights (qkv, wo, the MLP's w12 and w3): what optimizer.name muon orthogonalizes.
    Embeddings, the decoder, norms and heads are not in a block, so they stay with AdamW."""
    return [p for m in model.modules() if isinstance(m, EncoderBlock)
            for p in m.parameters() if p.ndim == 2 and p.requires_grad]


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW groups: matmul weights decay; norms, biases and embeddings don't. Every parameter in exactly one group."""
    decay, no_decay, seen = [], [], set()
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if isinstance(m, nn.Linear) and name == "weight" else no_decay).append(p)
    assert len(seen) == len({id(p) for p in model.parameters() if p.requires_grad})
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
