"""The models' math: their settings, the shapes of their modules, and one forward pass, for every family
slowllama reads (the Llama family; Mistral; Qwen 2 and 3; Gemma 2 and 3; Phi-3; OLMo 2: what differs is
in ModelArgs, read from each family's config by architectures.py).

Read this first. Every function works on one module's weights, given as a `box` with:
  box.compute[key]   the weight in the compute dtype, looked up when a matmul runs
  box.lora[key]      optional low-rank adapter (A, B, scale, dropout) on top of that weight
  box.trainable      whether the weights get gradients
  box.take_grad(key, rows)  receives a weight's gradient as rows(r0, r1, out) -> its rows r0:r1
so autograd's graph keeps activations, never a weight: the weights can be let go after the forward
and read again for the backward pass. Keys and the rotary layout (adjacent feature pairs) are Meta's;
the rotary embedding is in rope.py.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import chunked
from rope import apply_rope


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
    explicit_head_dim: int | None = None  # Qwen 3, Gemma: heads of their own width, not dim / n_heads
    qkv_bias: bool = False  # Qwen 2: biases on the q, k and v projections
    qk_norm: str | None = None  # RMSNorm of q and k before rope: "head" over each head (Qwen 3, Gemma 3), "all"
    # over the whole projection (OLMo 2)
    tied: bool = False  # the output projection is the embedding table (no output module)
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "yarn" | "longrope", ...}
    sliding_window: int | None = None  # attention sees this many positions (itself included) in sliding layers
    max_seq_len: int | None = None  # the context length the model was trained for
    family: str = "llama"  # llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, olmo2 (the export's names)
    norms: str = "pre"  # "pre": before attention and MLP; "sandwich": before and after both (Gemma); "post":
    # after both (OLMo 2)
    norm_offset: float = 0.0  # Gemma: norms scale by (1 + w)
    activation: str = "silu"  # the gate of the MLP: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)
    embed_scale: float = 1.0  # Gemma: the embeddings times sqrt(dim), rounded to the weights' dtype
    attn_scale: float | None = None  # Gemma: query_pre_attn_scalar ** -0.5; None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: attention logits capped as cap * tanh(logits / cap)
    final_softcap: float | None = None  # Gemma 2: the output's logits likewise
    layer_types: tuple | None = None  # per block: "sliding_attention" or "full_attention"; None: every block
    # slides where sliding_window is set (Mistral)
    rope_local_theta: float | None = None  # Gemma 3: the sliding blocks' rope theta (and no scaling there)
    rotary_dim: int | None = None  # Phi: features of a head that turn (partial_rotary_factor); None: all
    pad_id: int | None = None  # the padding token: its embedding row takes no gradient (transformers' padding_idx)
    n_experts: int = 0  # a mixture of experts (Qwen3-MoE, Mixtral, OLMoE): the experts of a sparse block's MLP
    top_k: int = 0  # the experts each token is routed to
    moe_hidden_dim: int | None = None  # an expert's FFN size; None: hidden_dim
    norm_topk: bool = False  # the top-k routing weights renormalised to sum to 1 (Mixtral; norm_topk_prob)
    dense_layers: tuple = ()  # blocks with a dense MLP in a mixture of experts (Qwen3-MoE's mlp_only_layers)

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

    def sparse(self, layer):
        """Whether block layer's MLP is a mixture of experts."""
        return self.n_experts > 0 and layer not in self.dense_layers

    def window(self, layer):
        """The sliding window of block layer, or None where it attends to every earlier position."""
        sliding = self.layer_types is None or self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None


def module_shapes(args, module):
    """{key: shape} of one module's tensors (module: its name, "layers" for any dense block); keys as in Meta's
    checkpoints, without the module prefix. A sparse block holds attention and the router; each of its experts
    (layers.3.experts.5) is a module of its own, read only when a token chose it."""
    d, hd, hidden, q, kv = args.dim, args.head_dim, args.hidden_dim, args.n_heads * args.head_dim, \
        args.kv_heads * args.head_dim
    if module == "tok_embeddings" or module == "output":
        return {"weight": (args.vocab_size, d)}
    if module == "norm":
        return {"weight": (d,)}
    parts = module.split(".")
    mlp = lambda prefix, n: {f"{prefix}w1.weight": (n, d), f"{prefix}w2.weight": (d, n), f"{prefix}w3.weight": (n, d)}
    if len(parts) == 4:  # an expert
        return mlp("", args.moe_hidden_dim or hidden)
    shapes = {"attention.wq.weight": (q, d), "attention.wk.weight": (kv, d), "attention.wv.weight": (kv, d),
              "attention.wo.weight": (d, q)}
    sparse = len(parts) == 2 and args.sparse(int(parts[1]))
    shapes.update({"feed_forward.gate.weight": (args.n_experts, d)} if sparse else mlp("feed_forward.", hidden))
    if args.norms != "post":
        shapes.update({"attention_norm.weight": (d,), "ffn_norm.weight": (d,)})
    if args.norms != "pre":
        shapes.update({"post_attention_norm.weight": (d,), "post_ffn_norm.weight": (d,)})
    if args.qkv_bias:
        shapes.update({"attention.wq.bias": (q,), "attention.wk.bias": (kv,), "attention.wv.bias": (kv,)})
    if args.qk_norm:
        whole = args.qk_norm == "all"
        shapes.update({"attention.q_norm.weight": (q if whole else hd,), "attention.k_norm.weight": (kv if whole else hd,)})
    return shapes


# the matrices LoRA can adapt (w1, w2, w3: of the dense MLP and of every expert; router: a mixture's gate)
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "router", "output")


def lora_target(module, key):
    """The LoRA target name of a module's tensor (wq ... w3 of a block or expert, router, output of the output
    projection), or None for tensors LoRA does not adapt (norms, biases, the embedding lookup)."""
    if module == "output":
        return "output" if key == "weight" else None
    name = key.split(".")[-2] if key.endswith(".weight") and "." in key else None
    name = "router" if name == "gate" else name
    return name if module.startswith("layers") and name in LORA_TARGETS else None


def module_names(args):
    """The modules in order, each block followed by its experts; a model with tied embeddings has no output
    module of its own."""
    blocks = [name for i in range(args.n_layers) for name in [f"layers.{i}"] + experts_of(args, i)]
    return ["tok_embeddings"] + blocks + ["norm"] + ["output"] * (not args.tied)


def experts_of(args, layer):
    return [f"layers.{layer}.experts.{e}" for e in range(args.n_experts)] if args.sparse(layer) else []


def module_of(key):
    """(module, key in it): ('layers.3', 'attention.wq.weight'), ('layers.3.experts.5', 'w1.weight'), ('output', 'weight')."""
    parts = key.split(".")
    n = 1 if parts[0] != "layers" else 4 if len(parts) > 3 and parts[2] == "experts" else 2
    return ".".join(parts[:n]), ".".join(parts[n:])


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
    """x * (offset + w) for an RMSNorm weight w looked up in its box at use (offset: Gemma's 1)."""

    @staticmethod
    def forward(ctx, x, box, key, offset=0.0):
        ctx.box, ctx.key, ctx.offset = box, key, offset
        ctx.save_for_backward(x if box.trainable else None)
        return x * scale_of(box.compute[key], offset)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = dy * scale_of(ctx.box.compute[ctx.key], ctx.offset) if ctx.needs_input_grad[0] else None
        if x is not None:  # after dx: an update may follow at once and change w in place
            grad = (dy * x).flatten(0, -2).sum(0)
            ctx.box.take_grad(ctx.key, lambda r0, r1, out: grad[r0:r1])
        return dx, None, None, None


def scale_of(w, offset):
    return w.float() + offset if offset else w


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


class Gated(torch.autograd.Function):
    """act(a) * b, the gated MLP's product (act: silu, SwiGLU; gelu with tanh, GeGLU), keeping a and b
    (autograd keeps act(a) besides); the backward writes the gradients over a and b, so a block's backward
    takes one new (tokens x hidden) buffer, not three."""

    @staticmethod
    def forward(ctx, a, b, kind):
        ctx.save_for_backward(a, b)
        ctx.kind = kind
        return activation(a, kind).mul_(b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors  # used by nothing else: the MLP's projections are their only users
        da = None
        if ctx.needs_input_grad[0]:
            da = torch.ops.aten.silu_backward(b.mul_(g), a) if ctx.kind == "silu" else \
                torch.ops.aten.gelu_backward(b.mul_(g), a, approximate="tanh")
        db = activation(a, ctx.kind, inplace=True).mul_(g) if ctx.needs_input_grad[1] else None
        return da, db, None


def activation(a, kind, inplace=False):
    if kind == "silu":
        return F.silu(a, inplace=inplace)
    y = F.gelu(a, approximate="tanh")
    return a.copy_(y) if inplace else y


def gated(a, b, kind="silu"):
    return Gated.apply(a, b, kind)


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


def rms_norm(box, key, x, args):
    """x / sqrt(mean(x^2) + eps) * (offset + w), in fp32 (torch's fused kernel: a third faster than written
    out)."""
    return Scale.apply(F.rms_norm(x.float(), x.shape[-1:], eps=args.norm_eps), box, key, args.norm_offset)


# --- the model, module by module ---

def qkv(box, x, args, rope, layer, training):
    """Attention's queries, keys and values of x (B, T, dim): (B, T, heads, head_dim) each, normed and turned
    by the rope as the family does."""
    B, T, _ = x.shape
    q = linear(box, "attention.wq.weight", x, training)
    k = linear(box, "attention.wk.weight", x, training)
    v = linear(box, "attention.wv.weight", x, training).view(B, T, args.kv_heads, args.head_dim)
    if args.qk_norm == "all":  # OLMo 2: over the whole projection
        q = rms_norm(box, "attention.q_norm.weight", q, args).to(q.dtype)
        k = rms_norm(box, "attention.k_norm.weight", k, args).to(k.dtype)
    q, k = q.view(B, T, args.n_heads, args.head_dim), k.view(B, T, args.kv_heads, args.head_dim)
    if args.qk_norm == "head":  # Qwen 3, Gemma 3: over each head
        q = rms_norm(box, "attention.q_norm.weight", q, args).to(q.dtype)
        k = rms_norm(box, "attention.k_norm.weight", k, args).to(k.dtype)
    cos, sin = rope["sliding" if args.window(layer) else "full"]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention(box, x, args, rope, layer, training, cache, start):
    q, k, v = qkv(box, x, args, rope, layer, training)
    if cache is not None:
        cache_k, cache_v = cache
        B, T = x.shape[:2]
        cache_k[:B, start:start + T], cache_v[:B, start:start + T] = k, v
        k, v = cache_k[:B, :start + T], cache_v[:B, :start + T]
    return linear(box, "attention.wo.weight", attend_rows(q, k, v, args, layer, start, rope), training)


def attend_rows(q, k, v, args, layer, start, rope):
    """attend over rows (B, T, heads, head_dim): (B, T, heads * head_dim)."""
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), args, args.window(layer), start,
                 rope["examples"])
    return out.transpose(1, 2).flatten(2)


def visible(T, start, window, device):
    """(T, start + T) booleans: the keys each of T queries at positions start.. sees (itself and the
    positions before it; with a window, the last window of them, itself included, as transformers masks)."""
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(start + T, device=device)[None, :]
    return (k <= q) & (k > q - window) if window else k <= q


def attend(q, k, v, args, window, start, examples=None):
    """Attention of q (B, heads, T, hd) over k, v (B, kv heads, start + T, hd): the fused kernel, with the
    causal (or sliding window) mask, within each token's example where rows are packed (examples: (B, T));
    written out where the logits are capped (Gemma 2)."""
    T, S = q.shape[2], k.shape[2]
    whole = T > 1 and start == 0 and (not window or S <= window)  # the causal mask alone is the visible set
    mask = None if whole or (T == 1 and (not window or S <= window)) else visible(T, start, window, q.device)
    if examples is not None:  # (B, 1, T, T): block-diagonal
        whole, mask = False, (mask if mask is not None else visible(T, start, None, q.device)) & \
            (examples[:, None, :, None] == examples[:, None, None, :])
    if args.attn_softcap:
        k, v = (t.repeat_interleave(args.n_heads // args.kv_heads, 1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) * (args.attn_scale or args.head_dim ** -0.5)
        scores = torch.tanh(scores / args.attn_softcap) * args.attn_softcap
        if T > 1 or mask is not None:
            scores = scores.masked_fill(~(mask if mask is not None else visible(T, start, None, q.device)),
                                        float("-inf"))
        return torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=whole, scale=args.attn_scale,
                                          enable_gqa=args.kv_heads != args.n_heads)


def mlp(box, x, args, training, prefix="feed_forward."):
    """The gated MLP of a block (or, prefix "", of an expert)."""
    gate, up = linear(box, prefix + "w1.weight", x, training), linear(box, prefix + "w3.weight", x, training)
    return linear(box, prefix + "w2.weight", gated(gate, up, args.activation), training)


def block_forward(box, x, args, rope, layer, training=False, p=0.0, cache=None, start=0, recomputing=False):
    """Block layer on the fp32 residual stream x; matmuls in the box's compute dtype; dropout p on the
    outputs of attention and the MLP while training. rope: rope.layer_ropes. The norms before the
    sublayers, before and after them (sandwich) or after them (post), as the family has them. A long
    micro-batch of a dense block runs in chunks of tokens (chunked.py; recomputing: only its graph is used)."""
    if chunked.runs_in_chunks(x, args, layer, box.compute_dtype):
        return chunked.block_forward(box, x, args, rope, layer, training, p, cache, start, recomputing)
    a = attention(box, attention_input(box, x, args), args, rope, layer, training, cache, start)
    return after_attention(box, x, a, args, layer, training, p)


def attention_input(box, x, args):
    pre = args.norms != "post"
    return rms_norm(box, "attention_norm.weight", x, args).to(box.compute_dtype) if pre else x.to(box.compute_dtype)


def after_attention(box, x, a, args, layer, training, p):
    """The rest of the block from attention's output a: the residual, the MLP (a mixture's experts) and its
    norms."""
    if args.norms != "pre":
        a = rms_norm(box, "post_attention_norm.weight", a, args)
    h = x + dropout(a, p, training).to(x.dtype)
    pre, cdt = args.norms != "post", box.compute_dtype
    f = rms_norm(box, "ffn_norm.weight", h, args).to(cdt) if pre else h.to(cdt)
    if args.sparse(layer):  # the router's logits; box.experts (moe.Experts) routes and runs the chosen experts
        f = box.experts(f, linear(box, "feed_forward.gate.weight", f, training), training)
    else:
        f = mlp(box, f, args, training)
    if args.norms != "pre":
        f = rms_norm(box, "post_ffn_norm.weight", f, args)
    return h + dropout(f, p, training).to(h.dtype)


def embed(box, tokens, scale=1.0):
    h = F.embedding(tokens, box.compute["weight"]).float()
    return h * scale if scale != 1.0 else h
