"""The tiny GPT of `attnbench train` in PyTorch, written from docs/train.md and
docs/selective.md: post-LN blocks, half-split RoPE, causal, sliding-window
(`window`) and selective (materialized, as the seed computes it) attention,
and the block options. Parameters are a dict of tensors under attnbench's
checkpoint names (PyTorch [out, in] layout); autograd does the backward.

Used by tests/torch_gpt_parity_test.py (float64, against a checkpoint) and
scripts/torch_gpt_throughput.py (float32, eager, timed against attnbench).
torch is optional: importing this module needs it.
"""

import json
import math
import struct

import torch
import torch.nn.functional as F


def read_safetensors(path):
    """(tensors as float64 torch tensors, metadata) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": torch.float32, "F64": torch.float64}
    out = {}
    for name, h in header.items():
        lo, hi = h["data_offsets"]
        t = torch.frombuffer(bytearray(data[lo:hi]), dtype=dtypes[h["dtype"]]) if hi > lo else torch.zeros(0)
        out[name] = t.reshape(h["shape"]).to(torch.float64)
    return out, meta


def rope(x, pos):
    """Half-split RoPE of x (..., T, dh) at positions pos (T): pairs (t, t + dh/2) by pos * 10000^(-2t/dh)."""
    dh = x.shape[-1]
    half = dh // 2
    theta = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / dh)
    ang = pos.to(torch.float64)[:, None] * theta[None, :]
    c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def heads(x, H):
    """(B, T, d) -> (B, H, T, dh)."""
    B, T, d = x.shape
    return x.reshape(B, T, H, d // H).transpose(1, 2)


def merge(x):
    """(B, H, T, dh) -> (B, T, d)."""
    B, H, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * dh)


def attention(q, k, v, allowed, causal):
    """Softmax attention per head at scale 1/sqrt(dh): PyTorch's scaled_dot_product_attention,
    causal, or with the boolean mask `allowed` (T, T)."""
    if causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def selective(x, wq, wk, wv, H, use_rope):
    """Selective attention, materialized (docs/selective.md): k_ij = wk [q_i; x_j], v_ij = wv [q_i; x_j]."""
    B, T, d = x.shape
    dh = d // H
    q = x @ wq.T
    A, Bk = wk[:, :d], wk[:, d:]
    C, D = wv[:, :d], wv[:, d:]
    k = (q @ A.T)[:, :, None, :] + (x @ Bk.T)[:, None, :, :]  # (B, i, j, d)
    v = (q @ C.T)[:, :, None, :] + (x @ D.T)[:, None, :, :]
    qh = q.reshape(B, T, H, dh)
    kh = k.reshape(B, T, T, H, dh)
    vh = v.reshape(B, T, T, H, dh)
    pos = torch.arange(T)
    if use_rope:
        qh = rope(qh.transpose(1, 2), pos).transpose(1, 2)  # query i by position i
        kh = rope(kh.permute(0, 1, 3, 2, 4), pos).permute(0, 1, 3, 2, 4)  # key k_ij by position j
    s = torch.einsum("bihc,bijhc->bhij", qh, kh) / math.sqrt(dh)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.einsum("bhij,bijhc->bihc", p, vh).reshape(B, T, d)


def forward(P, cfg, tokens):
    """Logits (B*T, V) of the GPT of docs/train.md."""
    H, d, L = cfg["heads"], cfg["d"], cfg["layers"]
    blk = cfg.get("block", {})
    use_rope, kind = cfg["rope"], cfg["attention"]
    T = tokens.shape[1]
    pos = torch.arange(T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (i - j >= 0) & (i - j < cfg["window"]) if kind == "window" else None
    x = P["wte"][tokens]
    v1 = None
    for l in range(L):
        p = lambda n: P[f"l{l}.{n}"]  # noqa: E731
        if kind in ("selective", "selective_materialized"):
            att = selective(x, p("wq"), p("wk"), p("wv"), H, use_rope)
        else:
            q, k, v = heads(x @ p("wq").T, H), heads(x @ p("wk").T, H), heads(x @ p("wv").T, H)
            vr = blk.get("value_residual", "none")
            if vr != "none":
                if l == 0:
                    v1 = v
                else:
                    z = p("vres")[None, :, None, None] if vr == "learned" else (x @ p("wvres").T).transpose(1, 2)[..., None]
                    m = torch.sigmoid(z)
                    v = m * v + (1 - m) * v1
            if use_rope:
                q, k = rope(q, pos), rope(k, pos)
            att = merge(attention(q, k, v, allowed, kind != "window"))
        if blk.get("gate"):
            att = torch.sigmoid(x @ p("wg").T) * att
        ao = att @ p("wo").T
        if blk.get("layer_scale", 0) > 0:
            ao = p("ls1") * ao
        x1 = F.layer_norm(x + ao, (d,), weight=p("ln1"), bias=None, eps=1e-5)
        h = x1 @ p("w1").T
        h = F.silu(h) * (x1 @ p("w3").T) if blk.get("glu") else torch.relu(h)
        f = h @ p("w2").T
        if blk.get("layer_scale", 0) > 0:
            f = p("ls2") * f
        x = F.layer_norm(x1 + f, (d,), weight=p("ln2"), bias=None, eps=1e-5)
    return (x @ P["wout"].T).reshape(-1, cfg["vocab"])


def loss_of(P, cfg, tokens, targets):
    return F.cross_entropy(forward(P, cfg, tokens), targets.reshape(-1), ignore_index=-1)


def param_shapes(cfg):
    """attnbench's parameter layout (harness/train/gpt.cpp gpt_param_layout): name -> shape."""
    d, H, V, L = cfg["d"], cfg["heads"], cfg["vocab"], cfg["layers"]
    blk = cfg.get("block", {})
    kv_in = 2 * d if cfg["attention"] in ("selective", "selective_materialized") else d
    out = {"wte": (V, d)}
    for l in range(L):
        p = f"l{l}."
        out.update({p + "wq": (d, d), p + "wk": (d, kv_in), p + "wv": (d, kv_in), p + "wo": (d, d), p + "ln1": (d,),
                    p + "w1": (4 * d, d), p + "w2": (d, 4 * d), p + "ln2": (d,)})
        if blk.get("gate"):
            out[p + "wg"] = (d, d)
        if l > 0 and blk.get("value_residual") == "learned":
            out[p + "vres"] = (H,)
        if l > 0 and blk.get("value_residual") == "token":
            out[p + "wvres"] = (H, d)
        if blk.get("layer_scale", 0) > 0:
            out[p + "ls1"], out[p + "ls2"] = (d,), (d,)
        if blk.get("glu"):
            out[p + "w3"] = (4 * d, d)
    out["wout"] = (V, d)
    return out


def init_params(cfg, dtype, generator):
    """PyTorch's default initialisation, as attnbench's (docs/train.md): embedding N(0, 1), linear
    U(+-1/sqrt(in)), gains 1, gate weights and mix logits 0, LayerScale gains block.layer_scale."""
    P = {}
    for name, shape in param_shapes(cfg).items():
        w = name.split(".")[-1]
        if w in ("ln1", "ln2"):
            t = torch.ones(shape, dtype=dtype)
        elif w in ("ls1", "ls2"):
            t = torch.full(shape, float(cfg["block"]["layer_scale"]), dtype=dtype)
        elif w in ("wg", "vres"):
            t = torch.zeros(shape, dtype=dtype)
        elif w == "wte":
            t = torch.randn(shape, dtype=dtype, generator=generator)
        else:
            bound = 1.0 / math.sqrt(shape[1])
            t = (torch.rand(shape, dtype=dtype, generator=generator) * 2 - 1) * bound
        P[name] = t.requires_grad_(True)
    return P
