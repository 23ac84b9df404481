"""neobert.py against an independent float64 reference written here from the published facts of the architecture."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import neobert as nb

torch.manual_seed(0)


def small_config(**kw):
    base = dict(vocab_size=97, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                max_position_embeddings=64)
    base.update(kw)
    return nb.NeoBERTConfig(**base)


def randomize(model, scale=0.08):
    """Weights larger than the init so that errors are not hidden by tiny activations."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


# -----------------------------------------------------------------------------
# the float64 reference: one unpadded sequence, plain loops, complex numbers for RoPE


def ref_norm(x, sd, prefix, cfg):
    if cfg.rms_norm:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * sd[prefix + ".weight"]
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + cfg.norm_eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def ref_rope(x, positions):
    """x: (S, hd). Pairs (2i, 2i+1) are the complex number x[2i] + j x[2i+1], multiplied by e^(j pos theta_i)."""
    hd = x.shape[-1]
    z = torch.complex(x[:, 0::2], x[:, 1::2])
    theta = torch.tensor([10000.0 ** (-2.0 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    rot = torch.exp(1j * positions[:, None].double() * theta[None, :])
    z = z * rot
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = z.real, z.imag
    return out


def ref_encoder(sd, cfg, ids):
    """Hidden states (S, H) of one sequence, from the state_dict of an NeoBERTLMHead, all in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    S, H, nh = len(ids), cfg.hidden_size, cfg.num_attention_heads
    hd = H // nh
    pos = torch.arange(S)
    x = sd["model.encoder.weight"][ids]
    if not cfg.rope:
        x = x + sd["model.positional_embedding.weight"][pos]
    for i in range(cfg.num_hidden_layers):
        p = f"model.transformer_encoder.{i}."
        h = ref_norm(x, sd, p + "attention_norm", cfg)
        qkv = h @ sd[p + "qkv.weight"].T  # (S, 3H), per head [q | k | v]
        heads = []
        for head in range(nh):
            base = head * 3 * hd
            q, k, v = qkv[:, base:base + hd], qkv[:, base + hd:base + 2 * hd], qkv[:, base + 2 * hd:base + 3 * hd]
            if cfg.rope:
                q, k = ref_rope(q, pos), ref_rope(k, pos)
            scores = q @ k.T / math.sqrt(hd)
            heads.append(torch.softmax(scores, dim=-1) @ v)
        x = x + torch.cat(heads, dim=-1) @ sd[p + "wo.weight"].T
        h = ref_norm(x, sd, p + "ffn_norm", cfg)
        if cfg.hidden_act == "swiglu":
            inner = 8 * math.ceil(int(2 * cfg.intermediate_size / 3) / 8)
            gu = h @ sd[p + "ffn.w12.weight"].T
            gate, up = gu[:, :inner], gu[:, inner:]
            x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "ffn.w3.weight"].T
        else:
            a = h @ sd[p + "ffn.w1.weight"].T
            a = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
            x = x + a @ sd[p + "ffn.w2.weight"].T
    return ref_norm(x, sd, "model.layer_norm", cfg)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -----------------------------------------------------------------------------
# layout


def test_released_key_and_shape_list():
    with torch.device("meta"):
        sd = nb.NeoBERTLMHead(nb.NeoBERTConfig()).state_dict()
    expected = {"model.encoder.weight": (30522, 768), "model.layer_norm.weight": (768,),
                "decoder.weight": (30522, 768), "decoder.bias": (30522,)}
    for i in range(28):
        p = f"model.transformer_encoder.{i}."
        expected.update({p + "qkv.weight": (2304, 768), p + "wo.weight": (768, 768), p + "ffn.w12.weight": (4096, 768),
                         p + "ffn.w3.weight": (768, 2048), p + "attention_norm.weight": (768,),
                         p + "ffn_norm.weight": (768,)})
    assert len(sd) == 172
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_released_defaults():
    c = nb.NeoBERTConfig()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.max_position_embeddings, c.norm_eps, c.pad_token_id, c.rope, c.rms_norm, c.hidden_act, c.dropout) == \
        (30522, 768, 28, 12, 3072, 4096, 1e-5, 0, True, True, "swiglu", 0.0)
    assert c.ffn_hidden_size == 2048


# -----------------------------------------------------------------------------
# numerics against the reference


VARIANTS = [dict(rope=r, rms_norm=n, hidden_act=a) for r in (True, False) for n in (True, False)
            for a in ("swiglu", "gelu")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_forward_matches_float64_reference_with_padding(variant):
    cfg = small_config(**variant)
    model = randomize(nb.NeoBERTLMHead(cfg)).eval()
    lengths = [13, 9, 5]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, cfg.vocab_size, (3, 13), generator=g)
    mask = torch.zeros(3, 13, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids = ids * mask  # pad id 0
    with torch.no_grad():
        hidden = model.model(ids, attention_mask=mask)
        logits = model(ids, attention_mask=mask).logits
    sd = model.state_dict()
    for b, n in enumerate(lengths):
        ref = ref_encoder(sd, cfg, ids[b, :n])
        assert rel_err(hidden[b, :n], ref) <= 1e-5
        ref_logits = ref @ sd["decoder.weight"].double().T + sd["decoder.bias"].double()
        assert rel_err(logits[b, :n], ref_logits) <= 1e-5


def test_rope_is_adjacent_pairs_not_rotate_half():
    # with rotate-half pairing, position 1 would mix dims 0 and hd/2 instead of 0 and 1
    x = torch.zeros(1, 2, 1, 8)
    x[..., 0] = 1.0
    cos, sin = nb.rope_tables(8, 4)
    out = nb.apply_rope(x, cos[None, :2], sin[None, :2])
    assert torch.allclose(out[0, 1, 0, :2], torch.tensor([math.cos(1.0), math.sin(1.0)]), atol=1e-6)
    assert out[0, 1, 0, 2:].abs().max() == 0


def test_padded_rows_equal_unpadded_sequences():
    cfg = small_config()
    model = randomize(nb.NeoBERT(cfg)).eval()
    a, b = torch.randint(1, 97, (11,)), torch.randint(1, 97, (6,))
    ids = torch.zeros(2, 11, dtype=torch.long)
    ids[0], ids[1, :6] = a, b
    mask = (torch.arange(11) < torch.tensor([[11], [6]])).long()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        alone_b = model(b[None])
    assert torch.allclose(padded[1, :6], alone_b[0], atol=1e-5, rtol=1e-5)


def packed_batch(docs, rows, seq_len):
    """Pack documents into `rows` rows of seq_len; a trailing remainder in a row becomes a padding segment."""
    ids = torch.zeros(rows, seq_len, dtype=torch.long)
    cu, r, col = [0], 0, 0
    for d in docs:
        if col + len(d) > seq_len:  # close the row with a pad segment
            if col < seq_len:
                cu.append(r * seq_len + seq_len)
            r, col = r + 1, 0
        ids[r, col:col + len(d)] = d
        col += len(d)
        cu.append(r * seq_len + col)
    if col < seq_len:
        cu.append(r * seq_len + seq_len)
    return ids, torch.tensor(cu, dtype=torch.int32)


def test_packed_equals_each_document_alone():
    cfg = small_config()
    model = randomize(nb.NeoBERT(cfg)).eval()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, 97, (n,), generator=g) for n in (7, 5, 4, 9, 3, 6)]
    ids, cu = packed_batch(docs, rows=3, seq_len=16)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu, max_seqlen=16).reshape(-1, cfg.hidden_size)
        pos_given = model(ids, cu_seqlens=cu, max_seqlen=16,
                          position_ids=nb.packed_position_ids(cu, ids.shape)).reshape(-1, cfg.hidden_size)
        flat = ids.flatten()
        starts = [int(s) for s in cu[:-1]]
        for d in docs:  # find each document by its start
            s = next(s for s in starts if torch.equal(flat[s:s + len(d)], d))
            alone = model(d[None])[0]
            assert (packed[s:s + len(d)] - alone).abs().max() <= 1e-5 * alone.abs().max()
    assert torch.equal(packed, pos_given)
    # positions restart at 0 in every segment
    pos = nb.packed_position_ids(cu, ids.shape).flatten()
    assert all(int(pos[int(s)]) == 0 for s in cu[:-1])


def test_backend_choice_on_cpu():
    cfg = small_config()
    assert nb.pick_backend(cfg, torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)) == "sdpa"
    if nb.KERNEL_INSTALLED["torch_varlen"]:
        forced = small_config(attn_backend="torch_varlen")
        with pytest.raises(ValueError, match="CUDA only"):
            nb.pick_backend(forced, torch.zeros(1, 1, 1, 64))


# -----------------------------------------------------------------------------
# losses, heads, pooling


def test_sparse_loss_equals_full_cross_entropy():
    cfg = small_config()
    model = randomize(nb.NeoBERTLMHead(cfg)).eval()
    ids = torch.randint(1, 97, (3, 12))
    labels = torch.full_like(ids, -100)
    pick = torch.rand(3, 12, generator=torch.Generator().manual_seed(4)) < 0.3
    labels[pick] = ids[pick]
    with torch.no_grad():
        out = model(ids, labels=labels)
        logits = model(ids).logits.double()
    full_sum = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.flatten(), ignore_index=-100, reduction="sum")
    assert out.num_masked.item() == pick.sum().item()
    assert abs(out.loss_sum.item() - full_sum.item()) <= 1e-5 * full_sum.item()
    assert abs(out.loss.item() - full_sum.item() / pick.sum().item()) <= 1e-5 * out.loss.item()
    assert out.logits is None


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kwargs)
    out.loss_sum.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def with_options(model, **options):
    """The same weights under other loss options (no effect on the state_dict)."""
    other = nb.NeoBERTLMHead(nb.NeoBERTConfig(**{**model.config.to_dict(), **options}))
    other.load_state_dict(model.state_dict())
    return other.train()


def test_static_predictions_equal_the_boolean_gather():
    """A fixed number of decoder positions per row (predictions_per_row, padded with ignored ones): the same loss and
    gradients as the boolean gather of exactly the predicted positions, padded and packed."""
    model = randomize(nb.NeoBERTLMHead(small_config())).train()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 97, (3, 16), generator=g)
    labels = torch.where(torch.rand(3, 16, generator=g) < 0.25, ids, -100)
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    labels[2, 11:] = -100
    _, cu = packed_batch([torch.randint(1, 97, (n,), generator=g) for n in (7, 9, 5, 11, 16)], rows=3, seq_len=16)
    assert 8 >= int((labels != -100).sum(1).max())
    for kwargs in (dict(attention_mask=mask), dict(cu_seqlens=cu, max_seqlen=16)):
        want, want_grads = loss_and_grads(model, ids, labels, **kwargs)
        got, grads = loss_and_grads(model, ids, labels, predictions_per_row=8, **kwargs)
        assert got.num_masked.item() == want.num_masked.item() == int((labels != -100).sum())
        assert abs(got.loss.item() - want.loss.item()) <= 1e-6
        for name, grad in want_grads.items():
            assert (grads[name] - grad).abs().max().item() <= 1e-6, name
    # a row with more predicted tokens than the fixed count keeps its first ones (documented), in order
    h = torch.randn(2, 16, 4)
    all_predicted = torch.arange(32).view(2, 16)
    rows, y = nb.gather_predictions(h, all_predicted, per_row=8)
    assert rows.shape == (16, 4) and y.tolist() == list(range(8)) + list(range(16, 24))
    sparse = torch.full((2, 16), -100)
    sparse[0, 3], sparse[1, 15] = 5, 6
    rows, y = nb.gather_predictions(h, sparse, per_row=8)
    assert y.tolist() == [5] + [-100] * 7 + [6] + [-100] * 7
    assert torch.equal(rows[0], h[0, 3]) and torch.equal(rows[8], h[1, 15])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_decoder_loss_equals_the_full_one(dtype):
    """decoder + cross-entropy fused and chunked: the full loss and its gradients, chunk sizes that do and do not
    divide the rows, ignored labels included."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(37, 24, generator=g, dtype=dtype)
    decoder = nn_linear(24, 50, dtype, g)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::5] = -100
    tol = 1e-6 if dtype == torch.float32 else 1e-12

    def run(chunk):
        x = x0.clone().requires_grad_()
        decoder.zero_grad(set_to_none=True)
        loss = nb.decoder_loss(decoder, x, labels, chunk)
        (2.5 * loss).backward()  # a scaled loss, as the trainer's normalisation makes it
        return loss.detach(), x.grad, decoder.weight.grad.clone(), decoder.bias.grad.clone()

    want = run(0)
    # an independent reference: float64 log-softmax by hand
    logits = x0.double() @ decoder.weight.detach().double().T + decoder.bias.detach().double()
    keep = labels != -100
    ref = -(logits[keep].log_softmax(-1).gather(-1, labels[keep, None])).sum()
    assert abs(want[0].item() - ref.item()) <= tol * ref.item()
    for chunk in (1, 8, 37, 64):
        got = run(chunk)
        assert got[0].dtype == (torch.float32 if dtype == torch.float32 else torch.float64)
        assert abs(got[0].item() - want[0].item()) <= tol * want[0].item(), chunk
        for a, b in zip(got[1:], want[1:]):
            assert a.dtype == b.dtype and (a - b).abs().max().item() <= tol * b.abs().max().item(), chunk


def nn_linear(fan_in, fan_out, dtype, g):
    layer = torch.nn.Linear(fan_in, fan_out).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(fan_out, fan_in, generator=g, dtype=dtype) * 0.3)
        layer.bias.copy_(torch.randn(fan_out, generator=g, dtype=dtype))
    return layer


def test_chunked_decoder_in_the_model_and_under_bf16_autocast():
    model = randomize(nb.NeoBERTLMHead(small_config())).train()
    chunked = with_options(model, decoder_chunk_size=5)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(1, 97, (2, 16), generator=g)
    labels = torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, -100)
    want, want_grads = loss_and_grads(model, ids, labels)
    got, grads = loss_and_grads(chunked, ids, labels)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-6
    for n, v in want_grads.items():
        assert (grads[n] - v).abs().max().item() <= 1e-6 * v.abs().max().item(), n
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 softmax: close to the full path's
        want, want_grads = loss_and_grads(model, ids, labels)
        got, grads = loss_and_grads(chunked, ids, labels)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-2 * want.loss.item()
    assert all(grads[n].dtype == torch.float32 for n in grads)
    for n in ("decoder.weight", "decoder.bias", "model.encoder.weight"):
        assert (grads[n] - want_grads[n]).norm() <= 3e-2 * want_grads[n].norm(), n


def test_static_predictions_and_chunked_decoder_compile_without_graph_breaks():
    cfg = small_config(num_hidden_layers=1, decoder_chunk_size=16)
    model = nb.NeoBERTLMHead(cfg).train()
    ids, cu = packed_batch([torch.randint(1, 97, (n,)) for n in (5, 6, 4, 9, 8)], rows=3, seq_len=16)
    labels = torch.where(torch.rand(ids.shape) < 0.2, ids, -100)
    explained = torch._dynamo.explain(model)(ids, labels=labels, cu_seqlens=cu, max_seqlen=16, predictions_per_row=8)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_gradient_checkpointing_gives_equal_gradients():
    cfg = small_config(dropout=0.1)
    model = randomize(nb.NeoBERTLMHead(cfg)).train()
    ids = torch.randint(1, 97, (2, 10))
    labels = ids.clone()
    labels[:, ::3] = -100
    keys = list(model.state_dict())

    def grads(flag):
        model.zero_grad(set_to_none=True)
        model.model.gradient_checkpointing = flag
        torch.manual_seed(7)  # same dropout masks in both runs
        model(ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert list(model.state_dict()) == keys
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-5), n
    assert any(g.abs().sum() > 0 for g in plain.values())


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_variants_train(variant):
    cfg = small_config(**variant)
    model = nb.NeoBERTLMHead(cfg)
    names = set(model.state_dict())
    assert ("model.positional_embedding.weight" in names) == (not variant["rope"])
    assert ("model.layer_norm.bias" in names) == (not variant["rms_norm"])
    assert ("model.transformer_encoder.0.ffn.w12.weight" in names) == (variant["hidden_act"] == "swiglu")
    assert ("model.transformer_encoder.0.ffn.w1.weight" in names) == (variant["hidden_act"] == "gelu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(5, 97, (4, 16), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    losses = []
    for _ in range(8):  # memorise one batch: the loss must fall
        out = model(ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_sequence_classification_head():
    cfg = small_config()
    clf = randomize(nb.NeoBERTForSequenceClassification(cfg, num_labels=3)).eval()
    assert {k.split(".")[0] for k in clf.state_dict()} == {"model", "dense", "classifier"}
    assert clf.dense.bias is not None and clf.classifier.weight.shape == (3, 128)
    ids = torch.randint(1, 97, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        out = clf(ids, attention_mask=mask, labels=labels)
        cls = clf.model(ids, attention_mask=mask)[:, 0].double()
    sd = {k: v.double() for k, v in clf.state_dict().items()}
    ref_logits = torch.tanh(cls @ sd["dense.weight"].T + sd["dense.bias"]) @ sd["classifier.weight"].T + sd["classifier.bias"]
    assert out.logits.shape == (4, 3)
    assert torch.allclose(out.logits.double(), ref_logits, atol=1e-5)
    ref_loss = -torch.log_softmax(ref_logits, -1)[torch.arange(4), labels].mean()
    assert abs(out.loss.item() - ref_loss.item()) < 1e-5
    reg = nb.NeoBERTForSequenceClassification(cfg, num_labels=1).eval()
    target = torch.tensor([0.5, 1.0, 2.0, 3.0])
    out = reg(ids, labels=target)
    assert out.logits.shape == (4, 1)
    assert abs(out.loss.item() - ((out.logits.squeeze(-1) - target) ** 2).mean().item()) < 1e-6


def test_packed_classifier_equals_padded_per_sequence():
    """cu_seqlens in the classifier: one row of logits per segment, from its first token, as if it ran alone."""
    cfg = small_config()
    clf = randomize(nb.NeoBERTForSequenceClassification(cfg, num_labels=3)).eval()
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(1, 97, (n,), generator=g) for n in (7, 5, 4, 9, 3, 6)]
    ids, cu = packed_batch(docs, rows=3, seq_len=16)
    pad = torch.zeros(len(docs), 9, dtype=torch.long)
    mask = torch.zeros_like(pad)
    for i, d in enumerate(docs):
        pad[i, :len(d)], mask[i, :len(d)] = d, 1
    with torch.no_grad():
        packed = clf(ids, cu_seqlens=cu, max_seqlen=16).logits
        padded = clf(pad, attention_mask=mask).logits
    assert packed.shape == (len(cu) - 1, 3)
    flat, starts = ids.flatten(), [int(s) for s in cu[:-1]]
    for i, d in enumerate(docs):
        seg = next(j for j, s in enumerate(starts) if torch.equal(flat[s:s + len(d)], d))
        assert (packed[seg] - padded[i]).abs().max() <= 1e-5, (packed[seg] - padded[i]).abs().max()
    # the loss takes one label per segment
    labels = torch.randint(0, 3, (len(cu) - 1,), generator=g)
    out = clf(ids, cu_seqlens=cu, max_seqlen=16, labels=labels)
    assert abs(out.loss.item() - F.cross_entropy(packed, labels).item()) < 1e-6


def test_pooling():
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mean = nb.pool(h, mask)
    assert torch.allclose(mean[0], h[0, :3].mean(0), atol=1e-6)
    assert torch.allclose(mean[1], h[1].mean(0), atol=1e-6)
    assert torch.equal(nb.pool(h, mask, mode="cls"), h[:, 0])
    with pytest.raises(ValueError, match="max"):
        nb.pool(h, mask, mode="max")


# -----------------------------------------------------------------------------
# init, accounting


def test_initialisation_as_released():
    cfg = small_config(vocab_size=4000, hidden_size=256, num_attention_heads=4)
    m = nb.NeoBERTLMHead(cfg)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert p.abs().max() <= 0.02, name
            if p.numel() > 10000:  # uniform(-r, r) has std r/sqrt(3)
                assert abs(p.std().item() - 0.02 / math.sqrt(3)) < 5e-4, name


def test_param_groups_and_counts():
    cfg = small_config(rms_norm=False, rope=False)
    m = nb.NeoBERTLMHead(cfg)
    decay, no_decay = nb.param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p): n for n, p in m.named_parameters()}
    decay_names = {ids[id(p)] for p in decay["params"]}
    no_decay_names = {ids[id(p)] for p in no_decay["params"]}
    assert decay_names | no_decay_names == set(ids.values()) and not decay_names & no_decay_names
    assert "model.encoder.weight" in no_decay_names and "model.positional_embedding.weight" in no_decay_names
    assert "decoder.bias" in no_decay_names and "model.layer_norm.bias" in no_decay_names
    assert "model.transformer_encoder.0.qkv.weight" in decay_names and "decoder.weight" in decay_names
    assert all(n.endswith("weight") and "norm" not in n for n in decay_names)
    assert nb.num_params(m) == sum(p.numel() for p in m.parameters())
    emb = cfg.vocab_size * cfg.hidden_size + cfg.max_position_embeddings * cfg.hidden_size
    assert nb.num_params(m, non_embedding=True) == nb.num_params(m) - emb


def test_flops_per_token_counts_matmuls_attention_and_sparse_decoder():
    cfg = nb.NeoBERTConfig()
    # independent count: weights of every encoder matmul, read off the real modules (on meta: no memory)
    with torch.device("meta"):
        m = nb.NeoBERT(cfg)
    matmul = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    S, frac = 1024, 0.2
    expected = 6 * matmul + 12 * cfg.num_hidden_layers * cfg.hidden_size * S + 6 * cfg.hidden_size * cfg.vocab_size * frac
    assert nb.flops_per_token(cfg, S, frac) == pytest.approx(expected, rel=1e-12)
    # the 250M model: about 6 * 200M matmul weights per token
    assert 1.3e9 < nb.flops_per_token(cfg, S, frac) < 1.6e9


def test_peak_flops_table(monkeypatch):
    assert nb.peak_flops("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert nb.peak_flops("cuda:0") == peak


# -----------------------------------------------------------------------------
# loading the released format


def write_released_folder(path, model, cfg):
    """A folder laid out as chandar-lab/NeoBERT on the hub: its config.json field names and model.safetensors."""
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["NeoBERTLMHead"], "model_type": "neobert", "hidden_size": cfg.hidden_size,
              "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
              "intermediate_size": cfg.intermediate_size, "max_length": cfg.max_position_embeddings,
              "vocab_size": cfg.vocab_size, "norm_eps": cfg.norm_eps, "pad_token_id": 0, "rms_norm": True,
              "rope": True, "hidden_act": "SwiGLU", "dim_head": cfg.head_dim, "embedding_init_range": 0.02,
              "decoder_init_range": 0.02, "classifier_init_range": 0.02, "torch_dtype": "float32",
              "kwargs": {"trust_remote_code": True}, "auto_map": {"AutoModel": "model.NeoBERT"}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


# -----------------------------------------------------------------------------
# bad configs


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=100, num_attention_heads=12), "hidden_size=100 is not divisible by model.num_attention_heads"),
    (dict(hidden_act="relu"), "hidden_act='relu' is unknown"),
    (dict(attn_backend="xformers"), "attn_backend='xformers' is unknown"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be positive"),
    (dict(hidden_size=768.0), "hidden_size must be an integer"),
    (dict(rope="yes"), "rope must be true or false"),
    (dict(dropout=1.5), "dropout must be in"),
    (dict(pad_token_id=40000), "pad_token_id=40000 is outside"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nb.NeoBERTConfig(**kwargs)


def test_unknown_config_field_is_named():
    with pytest.raises(TypeError, match="hiden_size"):
        nb.NeoBERTConfig(hiden_size=768)


def test_too_long_input_is_refused():
    m = nb.NeoBERT(small_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        m(torch.ones(1, 9, dtype=torch.long))
    # a packed row restarts positions in each segment: 12 tokens in segments of 6 fit, one segment of 9 does not
    ids = torch.arange(1, 13).unsqueeze(0) % 90 + 1
    out = m(ids, cu_seqlens=torch.tensor([0, 6, 12], dtype=torch.int32), max_seqlen=6)
    first = m(ids[:, :6])
    assert torch.allclose(out[:, :6], first, atol=1e-5) and torch.allclose(out[:, 6:], m(ids[:, 6:]), atol=1e-5)
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_position_embeddings=8"):
        m(ids, cu_seqlens=torch.tensor([0, 9, 12], dtype=torch.int32), max_seqlen=9)


# -----------------------------------------------------------------------------
# compile, and the GPU backends (skipped without a GPU)


def test_torch_compile_padded_and_packed_on_cpu():
    cfg = small_config(num_hidden_layers=1)
    model = randomize(nb.NeoBERTLMHead(cfg)).eval()
    compiled = torch.compile(model)
    ids, cu = packed_batch([torch.randint(1, 97, (n,)) for n in (5, 6, 4)], rows=1, seq_len=16)
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    with torch.no_grad():
        assert torch.allclose(compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, atol=1e-5)
        assert torch.allclose(compiled(ids, cu_seqlens=cu, max_seqlen=16).logits,
                              model(ids, cu_seqlens=cu, max_seqlen=16).logits, atol=1e-5)
    assert list(compiled.state_dict()) != list(model.state_dict())  # the wrapper prefixes: save the raw module
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_gpu_varlen_backends_match_per_document(backend):
    if nb.varlen_kernel(backend) is None:
        pytest.skip("flash-attn is not installed")
    cfg = small_config(attn_backend=backend)
    model = randomize(nb.NeoBERT(cfg), scale=0.05).cuda().eval()
    docs = [torch.randint(1, 97, (n,)) for n in (7, 5, 4, 9, 3, 6)]
    ids, cu = packed_batch(docs, rows=3, seq_len=16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(ids.cuda(), cu_seqlens=cu.cuda(), max_seqlen=16).reshape(-1, cfg.hidden_size).float()
        model.config.attn_backend = "sdpa"
        flat = ids.flatten()
        for d in docs:
            s = next(int(s) for s in cu[:-1] if torch.equal(flat[int(s):int(s) + len(d)], d))
            alone = model(d[None].cuda())[0].float()
            assert (packed[s:s + len(d)] - alone).abs().max() <= 3e-2 * alone.abs().max()
        model.config.attn_backend = backend


def test_import_leaves_dynamo_and_the_varlen_kernels_unimported():
    """torch.nn.attention.varlen pulls in torch._dynamo (seconds on every command): only a packed CUDA batch may."""
    code = ("import sys, neobert; bad = [m for m in ('torch._dynamo', 'torch.nn.attention.varlen', 'flash_attn') "
            "if m in sys.modules]; assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_no_graph_breaks_in_the_encoder():
    cfg = small_config()
    enc = nb.NeoBERT(cfg).train()
    enc.gradient_checkpointing = True
    ids, cu = packed_batch([torch.randint(1, 97, (n,)) for n in (5, 6, 4)], rows=1, seq_len=16)
    for kwargs in (dict(cu_seqlens=cu, max_seqlen=16), dict(attention_mask=torch.ones_like(ids))):
        explained = torch._dynamo.explain(enc)(ids, **kwargs)
        assert explained.graph_break_count == 0, explained.break_reasons


def test_the_guides_attn_backend_name_is_refused_with_the_choices():
    """flash_attn_varlen (the NeoBERT guide's name) is not an alias here: the error lists the names to use."""
    with pytest.raises(ValueError, match="attn_backend='flash_attn_varlen' is unknown; choose one of auto, flash_attn"):
        small_config(attn_backend="flash_attn_varlen")
