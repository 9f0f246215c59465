"""The reference: a plain in-memory Llama written the way Meta's model.py is, trained by autograd.

Independent of the offloaded model (its own rotary embedding in complex numbers, explicitly repeated
key/value heads, nn.Linear layers): the tests and bench.py compare the offloaded step against it.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Meta's model-parallel layout: the dimension each weight is split along across shards
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def read_meta_folder(folder, mmap=False):
    """All weights of a Meta-format folder, shards concatenated, as float32."""
    shards = [torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
              for p in sorted(Path(folder).glob("consolidated.*.pth"))]
    weights = {}
    for key in shards[0]:
        parts = key.split(".")
        dim = SPLIT.get(parts[-2] if len(parts) > 1 else parts[0])
        weights[key] = (shards[0][key] if dim is None else torch.cat([s[key] for s in shards], dim)).float()
    return weights, json.loads((Path(folder) / "params.json").read_text())


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LoraLinear(nn.Linear):
    """nn.Linear without bias, plus an optional low-rank adapter: W x + scale * B A dropout(x)."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out, bias=False)
        self.lora_a = self.lora_b = None
        self.scale = self.lora_dropout = 0.0

    def forward(self, x):
        y = super().forward(x)
        if self.lora_a is not None:
            y = y + self.scale * F.linear(F.linear(F.dropout(x, self.lora_dropout, self.training and self.lora_dropout > 0),
                                                   self.lora_a), self.lora_b)
        return y


class Block(nn.Module):
    def __init__(self, p, hidden):
        super().__init__()
        dim, heads = p["dim"], p["n_heads"]
        self.heads, self.kv_heads, self.head_dim = heads, p.get("n_kv_heads") or heads, dim // heads
        self.wq = LoraLinear(dim, heads * self.head_dim)
        self.wk = LoraLinear(dim, self.kv_heads * self.head_dim)
        self.wv = LoraLinear(dim, self.kv_heads * self.head_dim)
        self.wo = LoraLinear(heads * self.head_dim, dim)
        self.w1, self.w2, self.w3 = LoraLinear(dim, hidden), LoraLinear(hidden, dim), LoraLinear(dim, hidden)
        self.attention_norm, self.ffn_norm = RMSNorm(dim, p["norm_eps"]), RMSNorm(dim, p["norm_eps"])
        self.dropout = 0.0

    def forward(self, x, freqs_cis):
        B, T, _ = x.shape
        xn = self.attention_norm(x)
        q = self.wq(xn).view(B, T, self.heads, self.head_dim)
        k = self.wk(xn).view(B, T, self.kv_heads, self.head_dim)
        v = self.wv(xn).view(B, T, self.kv_heads, self.head_dim)
        q, k = rotate(q, freqs_cis), rotate(k, freqs_cis)
        repeat = self.heads // self.kv_heads  # grouped-query attention: each kv head serves `repeat` heads
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        h = x + self.drop(self.wo(out))
        hn = self.ffn_norm(h)
        return h + self.drop(self.w2(F.silu(self.w1(hn)) * self.w3(hn)))

    def drop(self, x):
        return F.dropout(x, self.dropout, True) if self.training and self.dropout > 0 else x


def rotate(x, freqs_cis):
    """Meta's rotary embedding: adjacent feature pairs as complex numbers, times e^(i pos theta_k)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


class Reference(nn.Module):
    def __init__(self, weights, params, dropout=0.0):
        super().__init__()
        dim, vocab = params["dim"], weights["tok_embeddings.weight"].shape[0]
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier"):
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        hidden = params["multiple_of"] * math.ceil(hidden / params["multiple_of"])
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(params, hidden) for _ in range(params["n_layers"]))
        self.norm, self.output = RMSNorm(dim, params["norm_eps"]), LoraLinear(dim, vocab)
        theta, head_dim = params.get("rope_theta") or 10000.0, dim // params["n_heads"]
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
        for layer in self.layers:
            layer.dropout = dropout
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(weights[meta_key(name)])

    def forward(self, tokens):
        T = tokens.shape[1]
        freqs_cis = torch.polar(torch.ones(T, len(self.inv_freq)), torch.outer(torch.arange(T).float(), self.inv_freq))
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis.to(h.device))
        return self.output(self.norm(h)).float()


def meta_key(name):
    """Meta's key of a reference parameter: layers.0.wq.weight -> layers.0.attention.wq.weight."""
    parts = name.split(".")
    if parts[-1] in ("lora_a", "lora_b"):
        parts = parts[:-1]
    if parts[0] == "layers" and parts[2] in ("wq", "wk", "wv", "wo"):
        parts.insert(2, "attention")
    elif parts[0] == "layers" and parts[2] in ("w1", "w2", "w3"):
        parts.insert(2, "feed_forward")
    return ".".join(parts)


def add_adapters(model, adapters, alpha, dropout):
    """Put the given {meta key: (A, B)} on the reference's linear layers; returns the adapter tensors."""
    params = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and f"{meta_key(name)}.weight" in adapters:
            a, b = adapters[f"{meta_key(name)}.weight"]
            module.lora_a, module.lora_b = nn.Parameter(a.clone()), nn.Parameter(b.clone())
            module.scale, module.lora_dropout = alpha / a.shape[0], dropout
            params += [module.lora_a, module.lora_b]
    return params
