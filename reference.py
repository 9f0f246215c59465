"""The reference: a plain in-memory Llama written the way Meta's model.py is, trained by autograd.

Independent of the offloaded model (its own rotary embedding in complex numbers, explicitly repeated
key/value heads, nn.Linear layers): the tests and bench.py compare the offloaded step against it.
Also the variants of other families, told by the weights given (Meta's keys, Meta's rotary layout):
biases on q, k and v (Qwen 2), RMSNorm over each head of q and k before rope (Qwen 3), heads of their
own width (params' head_dim), the output projection tied to the embedding table (no output.weight),
and rope frequencies with the factor on cos and sin given by the caller (rope scaling).
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
    """All weights of a folder in Meta's layout, shards concatenated, as float32."""
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
    """nn.Linear (without bias unless told), plus an optional low-rank adapter: W x + b + scale * B A dropout(x)."""

    def __init__(self, n_in, n_out, bias=False):
        super().__init__(n_in, n_out, bias=bias)
        self.lora_a = self.lora_b = None
        self.scale = self.lora_dropout = 0.0

    def forward(self, x):
        y = super().forward(x)
        if self.lora_a is not None:
            y = y + self.scale * F.linear(F.linear(F.dropout(x, self.lora_dropout, self.training and self.lora_dropout > 0),
                                                   self.lora_a), self.lora_b)
        return y


class Block(nn.Module):
    def __init__(self, p, hidden, head_dim, qkv_bias=False, qk_norm=False):
        super().__init__()
        dim, heads = p["dim"], p["n_heads"]
        self.heads, self.kv_heads, self.head_dim = heads, p.get("n_kv_heads") or heads, head_dim
        self.wq = LoraLinear(dim, heads * head_dim, bias=qkv_bias)
        self.wk = LoraLinear(dim, self.kv_heads * head_dim, bias=qkv_bias)
        self.wv = LoraLinear(dim, self.kv_heads * head_dim, bias=qkv_bias)
        self.wo = LoraLinear(heads * head_dim, dim)
        self.w1, self.w2, self.w3 = LoraLinear(dim, hidden), LoraLinear(hidden, dim), LoraLinear(dim, hidden)
        self.attention_norm, self.ffn_norm = RMSNorm(dim, p["norm_eps"]), RMSNorm(dim, p["norm_eps"])
        # Qwen 3: one RMSNorm weight of head_dim shared by every head of q (and one by every head of k)
        self.q_norm, self.k_norm = (RMSNorm(head_dim, p["norm_eps"]), RMSNorm(head_dim, p["norm_eps"])) \
            if qk_norm else (None, None)
        self.dropout = 0.0

    def forward(self, x, freqs_cis):
        B, T, _ = x.shape
        xn = self.attention_norm(x)
        q = self.wq(xn).view(B, T, self.heads, self.head_dim)
        k = self.wk(xn).view(B, T, self.kv_heads, self.head_dim)
        v = self.wv(xn).view(B, T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:  # over the features of each head, after the bias, before rope
            q, k = self.q_norm(q), self.k_norm(k)
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
    """The model of weights {Meta key: tensor} and params (params.json's keys, or an object with
    ModelArgs' names). The variants follow the weights: q/k/v biases where layers.0.attention.wq.bias is
    given, q/k norms where layers.0.attention.q_norm.weight is, the output tied to the embedding table
    (one parameter) where output.weight is not. rope: (inverse frequency of each feature pair, factor on
    cos and sin), by default 1 / theta^(2i / head_dim) and 1."""

    def __init__(self, weights, params, dropout=0.0, rope=None):
        super().__init__()
        params = params if isinstance(params, dict) else settings_of(params)
        dim, vocab = params["dim"], weights["tok_embeddings.weight"].shape[0]
        hidden = params.get("hidden_dim")
        if not hidden:  # Meta's formula
            hidden = int(2 * 4 * dim / 3)
            if params.get("ffn_dim_multiplier"):
                hidden = int(params["ffn_dim_multiplier"] * hidden)
            hidden = params["multiple_of"] * math.ceil(hidden / params["multiple_of"])
        head_dim = params.get("head_dim") or dim // params["n_heads"]
        qkv_bias = bool(params.get("qkv_bias")) or "layers.0.attention.wq.bias" in weights
        qk_norm = bool(params.get("qk_norm")) or "layers.0.attention.q_norm.weight" in weights
        self.tied = bool(params.get("tie_embeddings")) or "output.weight" not in weights
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(params, hidden, head_dim, qkv_bias, qk_norm)
                                    for _ in range(params["n_layers"]))
        self.norm, self.output = RMSNorm(dim, params["norm_eps"]), LoraLinear(dim, vocab)
        if self.tied:  # one parameter, used twice: its gradient is the sum of both uses
            self.output.weight = self.tok_embeddings.weight
        if rope is None:
            theta = params.get("rope_theta") or 10000.0
            rope = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)), 1.0
        self.inv_freq, self.attention_factor = torch.as_tensor(rope[0], dtype=torch.float32), float(rope[1])
        assert self.inv_freq.shape == (head_dim // 2,), (self.inv_freq.shape, head_dim)
        for layer in self.layers:
            layer.dropout = dropout
        with torch.no_grad():
            for name, p in self.named_parameters():  # a tied table is named once: tok_embeddings.weight
                p.copy_(weights[meta_key(name)])

    def forward(self, tokens):
        T = tokens.shape[1]
        # e^(i pos inv_freq), scaled by the attention factor (cos and sin both multiplied by it)
        freqs_cis = torch.polar(torch.full((T, len(self.inv_freq)), self.attention_factor),
                                torch.outer(torch.arange(T).float(), self.inv_freq))
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis.to(h.device))
        return self.output(self.norm(h)).float()


def meta_key(name):
    """Meta's key of a reference parameter: layers.0.wq.weight -> layers.0.attention.wq.weight."""
    parts = name.split(".")
    if parts[-1] in ("lora_a", "lora_b"):
        parts = parts[:-1]
    if parts[0] == "layers" and parts[2] in ("wq", "wk", "wv", "wo", "q_norm", "k_norm"):
        parts.insert(2, "attention")
    elif parts[0] == "layers" and parts[2] in ("w1", "w2", "w3"):
        parts.insert(2, "feed_forward")
    return ".".join(parts)


def settings_of(args):
    """params.json's keys of an object with ModelArgs' attribute names (dim, explicit_head_dim, ffn_dim ...)."""
    names = {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
             "norm_eps": "norm_eps", "rope_theta": "rope_theta", "multiple_of": "multiple_of",
             "ffn_dim_multiplier": "ffn_dim_multiplier", "hidden_dim": "ffn_dim", "head_dim": "explicit_head_dim",
             "qkv_bias": "qkv_bias", "qk_norm": "qk_norm", "tie_embeddings": "tied"}
    return {key: getattr(args, attr, None) for key, attr in names.items()}


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
