"""A block over chunks of tokens, for long rows: no more than a chunk's (tokens x hidden) activations at once.

Everything in a block but attention's core works token by token: the norms, the projections, the rope, the
MLP. So the forward pass computes the queries, keys and values a chunk of positions at a time, attention over
the whole rows (the fused kernel, which needs memory in proportion to the tokens, its graph kept), then the rest
of the block a chunk at a time, keeping only the block's input. The backward runs each chunk again with autograd
(with the random state it had), the rest of the block first, then attention's backward, then the projections;
each weight's gradient is summed over the chunks and handed to the optimizer once (box.take_grad), the
adapters collect theirs from each chunk. The math is model.py's; only the order of the work differs (and each
chunk's weight gradient is rounded to the compute dtype before the sum, in fp32)."""
from types import SimpleNamespace

import torch

import model as m
from utils import get_rng_state, set_rng_state

CHUNK_BYTES = 64 << 20  # a chunk's (tokens x hidden) MLP activations in the compute dtype
LONG = 4  # micro-batches of more than this many chunks' tokens run in chunks; shorter ones whole (no recomputing)


def chunk_tokens(args, dtype):
    """The tokens of a chunk."""
    return max(1, CHUNK_BYTES // (torch.finfo(dtype).bits // 8 * args.hidden_dim))


def long_micro_batch(tokens, args, dtype):
    """Whether a micro-batch of tokens runs the model's dense blocks in chunks: a long one, where the fused
    attention kernel serves every block (not Gemma 2's capped attention, written out whole; a mixture's sparse
    blocks route the whole micro-batch)."""
    return tokens > LONG * chunk_tokens(args, dtype) and not args.attn_softcap


def runs_in_chunks(x, args, layer, dtype):
    """Whether block layer runs x in chunks."""
    return long_micro_batch(x[..., 0].numel(), args, dtype) and not args.sparse(layer)


def block_forward(box, x, args, rope, layer, training, p, cache=None, start=0, recomputing=False):
    """model.block_forward in chunks: with autograd (ChunkedBlock) or without (inference: a long prompt's pass
    filling the cache of keys and values from start). recomputing: for the backward pass, which runs the rest of
    the block again anyway: attention alone, the output left uncomputed (zeros, with the block's graph)."""
    if not torch.is_grad_enabled():
        return forward_chunks(box, x, args, rope, layer, training, p, cache, start)[0]
    adapters = [t for adapter in box.lora.values() for t in adapter[:2]]  # inputs: a frozen first block's
    return ChunkedBlock.apply(x, box, args, rope, layer, training, p, recomputing, *adapters)  # adapters learn


def forward_chunks(box, x, args, rope, layer, training, p, cache=None, start=0, rngs=None, rest=True):
    """(the block's output, (queries, keys, values, attention's output)): the queries, keys and values a chunk at
    a time, attention over the whole rows, the rest a chunk at a time (not rest: zeros). rngs: a dict that takes
    the random state (dropout) before the first chunk of each, and attention's graph is kept for the backward."""
    qkv = None
    if rngs is not None:  # (the chunks draw one after the other: the backward's, in the same order, too)
        rngs["qkv"] = get_rng_state(x.device)
    for span in spans(x, args, box.compute_dtype):
        parts = m.qkv(box, m.attention_input(box, x[:, span], args), args, rope_of(rope, span), layer, training)
        if qkv is None:
            qkv = [t.new_empty(x.shape[:2] + t.shape[2:]) for t in parts]
        for whole, part in zip(qkv, parts):
            whole[:, span] = part
    q, k, v = qkv
    if cache is not None:
        B, T = x.shape[:2]
        cache[0][:B, start:start + T], cache[1][:B, start:start + T] = k, v
        k, v = cache[0][:B, :start + T], cache[1][:B, :start + T]
    if rngs is not None:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    with torch.set_grad_enabled(rngs is not None):
        o = m.attend_rows(q, k, v, args, layer, start, rope)
    if rngs is not None:
        rngs["rest"] = get_rng_state(x.device)
    y = torch.empty_like(x) if rest else torch.zeros_like(x)
    for span in spans(x, args, box.compute_dtype) if rest else ():
        a = m.linear(box, "attention.wo.weight", o[:, span].detach(), training)
        y[:, span] = m.after_attention(box, x[:, span], a, args, layer, training, p)
    return y, (q, k, v, o)


def spans(x, args, dtype):
    """The positions of each chunk (slices of the rows: a chunk's tokens over the rows)."""
    n = max(1, chunk_tokens(args, dtype) // x.shape[0])
    return [slice(t0, min(x.shape[1], t0 + n)) for t0 in range(0, x.shape[1], n)]


def rope_of(rope, span):
    """The rope tables of the positions span (rope.layer_ropes'; the examples stay the whole rows': attention's)."""
    return {key: value if key == "examples" else tuple(t[..., span, :] for t in value) for key, value in rope.items()}


def collecting(box):
    """(a box computing with box's weights whose gradients are summed, hand_over(): the sums to box.take_grad)."""
    sums = {}

    def take(key, rows):
        grad = rows(0, box.shapes[key][0], None).float()
        sums[key] = sums[key].add_(grad) if key in sums else grad

    def hand_over():
        for key, grad in sums.items():
            box.take_grad(key, lambda r0, r1, out, grad=grad: grad[r0:r1])
        sums.clear()
    return SimpleNamespace(compute=box.compute, lora=box.lora, trainable=box.trainable,
                           compute_dtype=box.compute_dtype, take_grad=take), hand_over


class ChunkedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, box, args, rope, layer, training, p, recomputing, *adapters):
        ctx.spans, ctx.rngs = spans(x, args, box.compute_dtype), {}
        y, ctx.attention = forward_chunks(box, x, args, rope, layer, training, p, rngs=ctx.rngs, rest=not recomputing)
        if not (training and (p > 0 or box.lora)):  # no dropout: the random state need not be restored
            ctx.rngs = dict.fromkeys(ctx.rngs)
        ctx.save_for_backward(x)
        ctx.box, ctx.args, ctx.rope, ctx.layer, ctx.training, ctx.p = box, args, rope, layer, training, p
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        (q, k, v, o), args, rng_now = ctx.attention, ctx.args, get_rng_state(x.device)
        ctx.attention = None  # (attention's output goes once its backward is done)
        box, hand_over = collecting(ctx.box)
        dx, do = torch.empty_like(x), torch.empty_like(o)
        if ctx.rngs["rest"] is not None:
            set_rng_state(ctx.rngs["rest"], x.device)
        for span in ctx.spans:  # the rest of the block, from attention's output
            xc, oc = (t[:, span].detach().requires_grad_() for t in (x, o))
            with torch.enable_grad():
                a = m.linear(box, "attention.wo.weight", oc, ctx.training)
                m.after_attention(box, xc, a, args, ctx.layer, ctx.training, ctx.p).backward(g[:, span])
            dx[:, span], do[:, span] = xc.grad, oc.grad
        hand_over()
        o.backward(do)
        del do, o
        if ctx.rngs["qkv"] is not None:
            set_rng_state(ctx.rngs["qkv"], x.device)
        for span in ctx.spans:  # the queries, keys and values
            xc = x[:, span].detach().requires_grad_()
            with torch.enable_grad():
                qc, kc, vc = m.qkv(box, m.attention_input(box, xc, args), args, rope_of(ctx.rope, span), ctx.layer,
                                   ctx.training)
                torch.autograd.backward((qc, kc, vc), (q.grad[:, span], k.grad[:, span], v.grad[:, span]))
            dx[:, span] += xc.grad
        hand_over()
        set_rng_state(rng_now, x.device)
        return (dx,) + (None,) * (len(ctx.needs_input_grad) - 1)  # (the adapters took theirs in the chunks)
