"""The head of the model: the final norm, the output projection and each token's log-probability of its target,
forward and backward over chunks of tokens, so the (tokens x vocabulary) logits of a long row never exist whole.

A chunk's logits are computed, reduced to each token's log-sum-exp and target logit, and let go; the backward
computes them again a chunk at a time for the gradient at the head's input, and the output weight's gradient
is handed to the optimizer as rows (box.take_grad, as model.Linear does), each block of rows from the logits
of that block of the vocabulary over every token: one more pass of the output matmul, no whole gradient.
Where every token fits one chunk (short rows), the logits are kept from the forward and nothing is computed
twice.
"""
import torch
import torch.nn.functional as F

from model import linear, scale_of
from utils import get_rng_state, set_rng_state

HEAD_CHUNK_BYTES = 256 << 20  # the fp32 logits of a chunk of tokens


def chunk_tokens(args):
    """The tokens of a chunk of the head."""
    return max(1, HEAD_CHUNK_BYTES // (4 * args.vocab_size))


def normed(norm, h, args):
    """The final RMSNorm of h, without autograd's own graph (the backward is written out below)."""
    return F.rms_norm(h.float(), h.shape[-1:], eps=args.norm_eps) * scale_of(norm.compute["weight"], args.norm_offset)


def capped(logits, args):
    """The output's logits, capped as cap * tanh(logits / cap) where the family does (Gemma 2)."""
    return torch.tanh(logits / args.final_softcap) * args.final_softcap if args.final_softcap else logits


def head(norm, output, h, args, training=False):
    """Every token's logits (generation, comparisons: rows that fit in memory), without a backward."""
    xn = normed(norm, h, args).to(output.compute_dtype)
    return capped(linear(output, "weight", xn, training).float(), args)


def target_logps(norm, output, h, targets, args, training=False):
    """Each token's log-probability of its target (0 where the target is -1), shaped as targets, with autograd
    through h and the norm's and output's weights and adapters (their gradients reach the optimizer)."""
    return TargetLogps.apply(h, norm, output, targets, args, training).view(targets.shape)


class TargetLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, norm, output, targets, args, training):
        ctx.shape, h, targets = h.shape, h.flatten(0, -2), targets.flatten()
        size = chunk_tokens(args)
        ctx.rngs = [] if training and output.lora else None  # each chunk's, for the adapter's dropout again
        xn = torch.empty(h.shape, dtype=output.compute_dtype, device=h.device)
        lse, picked = torch.empty(len(h), device=h.device), torch.empty(len(h), device=h.device)
        for t0 in range(0, len(h), size):
            t1 = min(len(h), t0 + size)
            if ctx.rngs is not None:
                ctx.rngs.append(get_rng_state(h.device))
            xn[t0:t1] = normed(norm, h[t0:t1], args)
            logits = capped(linear(output, "weight", xn[t0:t1], training).float(), args)
            lse[t0:t1] = torch.logsumexp(logits, -1)
            picked[t0:t1] = logits.gather(1, targets[t0:t1].clamp(min=0)[:, None])[:, 0]
        ctx.kept = logits if len(h) <= size and "weight" not in output.lora else None
        ctx.save_for_backward(h, xn, lse, targets)
        ctx.norm, ctx.output, ctx.args, ctx.training = norm, output, args, training
        return (picked - lse) * (targets != -1)

    @staticmethod
    def backward(ctx, g):
        h, xn, lse, targets = ctx.saved_tensors
        norm, output, args = ctx.norm, ctx.output, ctx.args
        coef = g * (targets != -1)  # d loss / d each token's log-probability
        size, w = chunk_tokens(args), output.compute["weight"]
        dh, norm_grad = torch.empty_like(h), torch.zeros(h.shape[1], device=h.device) if norm.trainable else None
        rng_now = get_rng_state(h.device)
        for c, t0 in enumerate(range(0, len(h), size)):
            t1 = min(len(h), t0 + size)
            grads = lambda logits: logit_grads(logits, lse[t0:t1], targets[t0:t1], coef[t0:t1], args, 0)
            if "weight" in output.lora:  # the logits again with the adapter's graph (the same dropout)
                if ctx.rngs:
                    set_rng_state(ctx.rngs[c], h.device)
                x = xn[t0:t1].detach().requires_grad_()
                with torch.enable_grad():
                    raw = linear(output, "weight", x, ctx.training)
                    raw.backward(grads(capped(raw.detach().float(), args)).to(raw.dtype))
                dxn = x.grad.float()
            else:
                logits = ctx.kept if ctx.kept is not None else \
                    capped(linear(output, "weight", xn[t0:t1], ctx.training).float(), args)
                dy = grads(logits).to(w.dtype)
                dxn = (dy @ w).to(xn.dtype).float()  # (model.Linear's rounding)
                ctx.kept = dy if ctx.kept is not None else None  # the output weight's rows come from it
            with torch.enable_grad():  # the norm's backward, its weight's gradient summed over the chunks
                x = h[t0:t1].detach().requires_grad_()
                n = F.rms_norm(x, x.shape[-1:], eps=args.norm_eps)
                (dh[t0:t1],) = torch.autograd.grad(n, x, dxn * scale_of(norm.compute["weight"], args.norm_offset))
            if norm_grad is not None:
                norm_grad += (dxn * n.detach()).sum(0)
        set_rng_state(rng_now, h.device)
        kept, ctx.kept = ctx.kept, None  # (the graph may outlive the backward: the logits' memory goes now)
        if norm_grad is not None:
            norm.take_grad("weight", lambda r0, r1, out: norm_grad[r0:r1])
        if output.trainable:
            output.take_grad("weight", output_grad_rows(kept, xn, w, lse, targets, coef, args))
        return dh.view(ctx.shape), None, None, None, None, None


def logit_grads(logits, lse, targets, coef, args, v0):
    """d loss / d logits of columns v0: of the vocabulary (logits: fp32, capped), written over logits:
    coef * (one-hot of the target - softmax), through the cap."""
    capped_logits = logits.clone() if args.final_softcap else None
    grad = logits.sub_(lse[:, None]).exp_().mul_(-coef[:, None])
    inside = (targets >= v0) & (targets < v0 + logits.shape[1])
    rows = inside.nonzero()[:, 0]
    grad[rows, targets[rows] - v0] += coef[rows]
    if args.final_softcap:  # d (cap tanh(l / cap)) / dl = 1 - tanh^2
        grad.mul_(1 - (capped_logits / args.final_softcap) ** 2)
    return grad


def output_grad_rows(kept, xn, w, lse, targets, coef, args):
    """The output weight's gradient as rows(r0, r1, out): from the kept logits' gradient (one chunk), else from
    the logits of vocabulary rows r0:r1 over every token, computed again in blocks of at most a chunk's bytes."""
    xn = xn.to(w.dtype)  # (as model.Linear computes: in the weight's dtype)

    def rows(r0, r1, out):
        if kept is not None:
            return torch.mm(kept[:, r0:r1].t(), xn, out=out)
        out = torch.empty(r1 - r0, xn.shape[1], dtype=xn.dtype, device=xn.device) if out is None else out
        step = max(1, HEAD_CHUNK_BYTES // (4 * len(xn)))
        for v0 in range(r0, r1, step):
            v1 = min(r1, v0 + step)
            raw = F.linear(xn, w[v0:v1]).float()
            dy = logit_grads(capped(raw, args), lse, targets, coef, args, v0).to(xn.dtype)
            torch.mm(dy.t(), xn, out=out[v0 - r0:v1 - r0])
        return out
    return rows
