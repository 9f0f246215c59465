"""The Llama architecture: its settings, the shapes of its modules, and the math of one forward pass.

Read this first. Every function works on one module's weights, given as a `box` with:
  box.compute[key]   the weight in the compute dtype, looked up when a matmul runs
  box.lora[key]      optional low-rank adapter (A, B, scale, dropout) on top of that weight
  box.trainable      whether the weights get gradients
  box.take_grad(key, rows)  receives a weight's gradient as rows(r0, r1, out) -> its rows r0:r1
so autograd's graph keeps activations, never a weight: the weights can be let go after the forward
and read again for the backward pass. Keys and the rotary layout (adjacent feature pairs) are Meta's.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    ffn_dim: int | None = None  # the FFN size where it is given rather than derived (Mistral, Hugging Face)
    explicit_head_dim: int | None = None  # Qwen 3: heads wider than dim / n_heads
    qkv_bias: bool = False  # Qwen 2: biases on the q, k and v projections
    qk_norm: bool = False  # Qwen 3: RMSNorm over each head of q and k, before rope
    tied: bool = False  # the output projection is the embedding table (no output module)
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "yarn", "factor": ..., ...}
    sliding_window: int | None = None  # Mistral v0.1: attention sees this many positions back
    max_seq_len: int | None = None  # the context length the model was trained for

    @property
    def kv_heads(self):
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self):
        return self.explicit_head_dim or self.dim // self.n_heads

    @property
    def hidden_dim(self):
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def module_shapes(args, module):
    """{key: shape} of one module's tensors; keys as in Meta's checkpoints, without the module prefix."""
    d, hd, hidden, q, kv = args.dim, args.head_dim, args.hidden_dim, args.n_heads * args.head_dim, \
        args.kv_heads * args.head_dim
    if module == "tok_embeddings" or module == "output":
        return {"weight": (args.vocab_size, d)}
    if module == "norm":
        return {"weight": (d,)}
    shapes = {"attention.wq.weight": (q, d), "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
              "attention.wo.weight": (d, q), "feed_forward.w1.weight": (hidden, d),
              "feed_forward.w2.weight": (d, hidden), "feed_forward.w3.weight": (hidden, d),
              "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}
    if args.qkv_bias:
        shapes.update({"attention.wq.bias": (q,), "attention.wk.bias": (kv,), "attention.wv.bias": (kv,)})
    if args.qk_norm:
        shapes.update({"attention.q_norm.weight": (hd,), "attention.k_norm.weight": (hd,)})
    return shapes


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")  # the matrices LoRA can adapt


def lora_target(module, key):
    """The LoRA target name of a module's tensor (wq ... w3 of a block, output of the output projection),
    or None for tensors LoRA does not adapt (norms, biases, the embedding lookup)."""
    if module == "output":
        return "output" if key == "weight" else None
    name = key.split(".")[-2] if key.endswith(".weight") and "." in key else None
    return name if module.startswith("layers") and name in LORA_TARGETS else None


def module_names(args):
    """The modules in order; a model with tied embeddings has no output module of its own."""
    return ["tok_embeddings"] + [f"layers.{i}" for i in range(args.n_layers)] + ["norm"] + ["output"] * (not args.tied)


def module_of(key):
    """('layers.3', 'attention.wq.weight') for 'layers.3.attention.wq.weight'; ('output', 'weight') ..."""
    parts = key.split(".")
    n = 2 if parts[0] == "layers" else 1
    return ".".join(parts[:n]), ".".join(parts[n:])


def graph_bytes_per_token(args, dtype):
    """What autograd keeps of one block per token: the residual stream and the norms' inputs in fp32,
    the inputs to matmuls, attention and SwiGLU in the compute dtype, and a tenth more for what
    allocations round up to (tests/test_model.py holds it against what autograd saves of a block)."""
    attention = 2 * (args.n_heads + args.kv_heads) * args.head_dim
    return (5 * args.dim * 4 + (attention + 3 * args.hidden_dim) * torch.finfo(dtype).bits // 8) * 11 // 10


# --- matmuls and norms whose weights are looked up at use ---

class Linear(torch.autograd.Function):
    """x @ W.T where W is looked up in its box at use: the graph keeps x, never W."""

    @staticmethod
    def forward(ctx, x, box, key):
        w = box.compute[key]
        ctx.box, ctx.key, ctx.in_dtype = box, key, x.dtype
        x = x.to(w.dtype)
        ctx.save_for_backward(x if box.trainable else None)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        w = ctx.box.compute[ctx.key]
        dx = (dy @ w).to(ctx.in_dtype) if ctx.needs_input_grad[0] else None
        del w  # the update may move the weights into a mapped file: the old memory is freed at once
        if x is not None:  # dW = dy^T x, handed over as row blocks (the weight may be updated at once)
            dy, x = dy.flatten(0, -2), x.flatten(0, -2)
            ctx.box.take_grad(ctx.key, lambda r0, r1, out: torch.mm(dy[:, r0:r1].t(), x, out=out))
        return dx, None, None


class Scale(torch.autograd.Function):
    """x * w for an RMSNorm weight w looked up in its box at use."""

    @staticmethod
    def forward(ctx, x, box, key):
        ctx.box, ctx.key = box, key
        ctx.save_for_backward(x if box.trainable else None)
        return x * box.compute[key]

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = dy * ctx.box.compute[ctx.key] if ctx.needs_input_grad[0] else None
        if x is not None:  # after dx: an update may follow at once and change w in place
            grad = (dy * x).flatten(0, -2).sum(0)
            ctx.box.take_grad(ctx.key, lambda r0, r1, out: grad[r0:r1])
        return dx, None, None


class Bias(torch.autograd.Function):
    """y + b for a bias b looked up in its box at use."""

    @staticmethod
    def forward(ctx, y, box, key):
        ctx.box, ctx.key = box, key
        return (y + box.compute[key]).to(y.dtype)

    @staticmethod
    def backward(ctx, dy):
        if ctx.box.trainable:
            grad = dy.flatten(0, -2).float().sum(0)
            ctx.box.take_grad(ctx.key, lambda r0, r1, out: grad[r0:r1])
        return dy, None, None


class SwiGLU(torch.autograd.Function):
    """silu(a) * b keeping a and b (autograd keeps silu(a) besides); the backward writes the
    gradients over a and b, so a block's backward takes one new (tokens x hidden) buffer, not three."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors  # used by nothing else: the FFN's projections are their only users
        da = torch.ops.aten.silu_backward(b.mul_(g), a) if ctx.needs_input_grad[0] else None
        db = F.silu(a, inplace=True).mul_(g) if ctx.needs_input_grad[1] else None
        return da, db


def swiglu(a, b):
    return SwiGLU.apply(a, b)


def dropout(x, p, training):
    # F.dropout draws random numbers even at p=0; skipping it keeps the random stream to real masks
    return F.dropout(x, p, True) if training and p > 0 else x


def linear(box, key, x, training):
    y = Linear.apply(x, box, key)
    bias = key.removesuffix("weight") + "bias"
    if bias in box.compute:
        y = Bias.apply(y, box, bias)
    if key in box.lora:
        a, b, scale, p = box.lora[key]
        x = dropout(x.to(a.dtype), p, training)
        y = y + F.linear(F.linear(x, a), b * scale).to(y.dtype)  # scaling B, not the output: a pass fewer
    return y


def rms_norm(box, key, x, eps):
    """x / sqrt(mean(x^2) + eps) * w, in fp32 (torch's fused kernel: a third faster than written out)."""
    return Scale.apply(F.rms_norm(x.float(), x.shape[-1:], eps=eps), box, key)


# --- rotary position embedding ---

def rope_frequencies(args):
    """(the angle per position of each feature pair, a factor on cos and sin): 1 / theta^(2i / head_dim),
    changed by the context-extension scaling the model was trained with, as transformers defines each."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2)[:d // 2].float() / d))
    s = args.rope_scaling or {}
    kind, factor = s.get("rope_type"), s.get("factor", 1.0)
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":  # long wavelengths slowed by factor, short ones kept, a smooth blend between
        old = s["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv
        smooth = ((old / wavelength - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        return (1 - smooth) * inv / factor + smooth * inv, 1.0
    if kind == "yarn":  # interpolated (slowed) below a band of pairs, extrapolated (kept) above it
        old = s.get("original_max_position_embeddings") or args.max_seq_len

        def pair(rotations):  # the pair index that turns `rotations` times over the old context
            return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(args.rope_theta))
        low, high = pair(s.get("beta_fast") or 32), pair(s.get("beta_slow") or 1)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = ((torch.arange(d // 2).float() - low) / (high - low if high != low else 0.001)).clamp(0, 1)
        return inv / factor * ramp + inv * (1 - ramp), yarn_attention_factor(s, factor)
    return inv, 1.0


def yarn_attention_factor(s, factor):
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    return mscale(factor)


def rope_tables(args, start, length, device):
    inv, scale = rope_frequencies(args)
    angles = torch.outer(torch.arange(start, start + length).float(), inv).to(device)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x, cos, sin):
    """Rotate each adjacent pair of features (2i, 2i+1) by its position's angle, as Meta's reference:
    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), the pair as a complex number times cos + i sin
    (one pass over x each way; four times faster than the pairs split, rotated and stacked)."""
    if x.device.type == "mps":  # complex numbers are missing on some Macs' GPUs: the same in real numbers
        return rotate_pairs(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).flatten(-2).type_as(x)


def rotate_pairs(x, cos, sin):
    """apply_rope in real numbers: x * cos + (x with each pair swapped) * (-sin, sin)."""
    cos2 = cos.repeat_interleave(2, -1)[:, None, :]  # (T, 1, head_dim) against (B, T, heads, head_dim)
    sin2 = torch.stack((-sin, sin), -1).flatten(-2)[:, None, :]
    xf = x.float()
    return (xf * cos2 + xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2) * sin2).type_as(x)


# --- the model, module by module ---

def attention(box, x, args, rope, training, cache, start):
    B, T, _ = x.shape
    q = linear(box, "attention.wq.weight", x, training).view(B, T, args.n_heads, args.head_dim)
    k = linear(box, "attention.wk.weight", x, training).view(B, T, args.kv_heads, args.head_dim)
    v = linear(box, "attention.wv.weight", x, training).view(B, T, args.kv_heads, args.head_dim)
    if args.qk_norm:
        q = rms_norm(box, "attention.q_norm.weight", q, args.norm_eps).to(q.dtype)
        k = rms_norm(box, "attention.k_norm.weight", k, args.norm_eps).to(k.dtype)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if cache is not None:
        cache_k, cache_v = cache
        cache_k[:B, start:start + T], cache_v[:B, start:start + T] = k, v
        k, v = cache_k[:B, :start + T], cache_v[:B, :start + T]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = None
    if T > 1 and start > 0:  # a chunk after cached positions: each query sees the cache and its past
        mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and start == 0,
                                         enable_gqa=args.kv_heads != args.n_heads)
    return linear(box, "attention.wo.weight", out.transpose(1, 2).reshape(B, T, -1), training)


def block_forward(box, x, args, rope, training=False, p=0.0, cache=None, start=0):
    """One transformer block on the fp32 residual stream x; matmuls in the box's compute dtype;
    dropout p on the outputs of attention and feed-forward while training."""
    cdt = box.compute_dtype
    attn = attention(box, rms_norm(box, "attention_norm.weight", x, args.norm_eps).to(cdt), args, rope, training,
                     cache, start)
    h = x + dropout(attn, p, training).to(x.dtype)
    hn = rms_norm(box, "ffn_norm.weight", h, args.norm_eps).to(cdt)
    ffn = linear(box, "feed_forward.w2.weight", swiglu(linear(box, "feed_forward.w1.weight", hn, training),
                                                       linear(box, "feed_forward.w3.weight", hn, training)), training)
    return h + dropout(ffn, p, training).to(h.dtype)


def embed(box, tokens):
    return F.embedding(tokens, box.compute["weight"]).float()


def head(norm, output, h, eps, training=False):
    return linear(output, "weight", rms_norm(norm, "weight", h, eps).to(output.compute_dtype), training).float()


def loss_sum(logits, targets):
    """The cross-entropy of logits (..., vocab) against targets (-1: no target), summed."""
    return CrossEntropySum.apply(logits, targets)


class CrossEntropySum(torch.autograd.Function):
    """loss_sum whose backward turns the kept log-probabilities into the gradient in place (softmax
    minus one-hot): two (tokens x vocab) buffers live at most, where autograd's cross-entropy keeps the
    log-probabilities and makes a one-hot gradient and the logits' gradient beside them."""

    @staticmethod
    def forward(ctx, logits, targets):
        logp = torch.log_softmax(logits.flatten(0, -2), -1, dtype=torch.float32)
        targets = targets.flatten()
        rows = (targets != -1).nonzero().squeeze(1)
        ctx.save_for_backward(logp, targets, rows)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return -logp[rows, targets[rows]].sum()

    @staticmethod
    def backward(ctx, g):
        logp, targets, rows = ctx.saved_tensors
        grad = logp.exp_()  # softmax, in the log-probabilities' memory (this graph is not run twice)
        grad[targets == -1] = 0.0
        grad[rows, targets[rows]] -= 1.0
        return grad.mul_(g).view(ctx.shape).to(ctx.dtype), None


def sample(logits, temperature, top_p, generator=None):
    """The next token: the most likely one, or with temperature > 0 one drawn from the top-p set."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, -1)
    sorted_probs, order = probs.sort(descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
    sorted_probs[drop] = 0.0
    choice = torch.multinomial(sorted_probs.cpu() / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice.to(order.device)])

