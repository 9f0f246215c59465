"""Mixtures of experts (Qwen3-MoE, Mixtral, OLMoE): each token routed to its top-k experts as transformers routes
it, and a sparse block's experts streamed from the disk by expert.

Each expert is a module of its own (model.module_shapes: layers.3.experts.5, one file), so a pass reads the
block (attention, norms, router), routes its tokens, then reads only the experts some token chose, one after
another while the next is read in the background. The backward pass reads those experts again (in reverse
order: the last one read may still be in the page cache) and recomputes each one's forward on its tokens, so
no more than one expert's activations live at once; full fine-tuning updates each there and writes it back, and
an expert no token chose is neither read nor written. The choice itself has no gradient (as in transformers);
the routing weights do, so the router is trained through them.
"""
import torch

from model import mlp
from utils import get_rng_state, set_rng_state

TOKENS_TO_READ_AHEAD = 16  # tokens an expert (on average) from which the next one is read ahead into memory


def route(logits, args):
    """(routing weights, chosen experts: both (tokens, top_k), every expert's probability (tokens, experts)):
    softmax of the router's logits in fp32, its top k (ties as torch.topk breaks them), renormalised to sum to 1
    where norm_topk_prob says so (Mixtral always: its softmax over the top-k logits is the same)."""
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    weights, chosen = torch.topk(probs, args.top_k, -1)
    if args.norm_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, chosen, probs


class Router:
    """The load-balancing loss of a training step, as transformers' load_balancing_loss_func computes it for one
    forward pass (output_router_logits): E * sum_e f_e * P_e, where f_e is the share of the top-k choices of all
    sparse blocks that went to expert e and P_e expert e's mean probability over those blocks' rows. A step of
    several micro-batches (and processes) adds coef times the mean of theirs to the loss; the gradient reaches each
    block's router in that block's backward pass (RouterLoss), once every block's choices are known.
    Also where a training step is, for every sparse block's Experts: recording (its forward pass), recomputing (a
    block's forward run again for its backward pass), batch (the micro-batch)."""

    def __init__(self, args):
        self.args, self.coef, self.recording, self.recomputing = args, 0.0, False, False
        self.start(1)

    def start(self, micro_batches, processes=1):
        """A training step of micro_batches in each of processes begins."""
        self.parts, self.batch = micro_batches * processes, 0
        self.counts = [torch.zeros(self.args.n_experts) for _ in range(micro_batches)]
        self.prob_sums = [torch.zeros(self.args.n_experts) for _ in range(micro_batches)]
        self.rows = [0] * micro_batches

    def record(self, counts, probs):
        """One sparse block's choices (tokens each expert got) and probabilities, in micro-batch self.batch."""
        self.counts[self.batch] += counts
        self.prob_sums[self.batch] += probs.detach().sum(0).float().cpu()
        self.rows[self.batch] += probs.shape[0]

    def loss(self):
        """The loss (without coef) of this process's micro-batches, each as transformers computes it, averaged."""
        E = self.args.n_experts
        return sum(E * float((c / n * p / n).sum()) for c, p, n in zip(self.counts, self.prob_sums, self.rows)) / \
            len(self.rows)

    def grad(self, batch):
        """d(coef * loss) / d(one row's probabilities) of micro-batch batch: coef * E * count_e / rows^2, over
        the parts (micro-batches of every process) the step's loss averages."""
        return self.coef * self.args.n_experts * self.counts[batch] / self.rows[batch] ** 2 / self.parts


class RouterLoss(torch.autograd.Function):
    """The identity on a block's routed output; its backward adds the load-balancing loss's gradient at the
    block's router probabilities."""

    @staticmethod
    def forward(ctx, out, probs, router):
        ctx.router, ctx.batch, ctx.rows = router, router.batch, probs.shape[0]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return g, ctx.router.grad(ctx.batch).to(g.device).expand(ctx.rows, -1), None


class Experts:
    """The experts of one sparse block: their Blackboxes (one file each), streamed through memory for the
    tokens routed to them. Where a block's forward runs again for its backward pass (router.recomputing), nothing
    reads its values (the families' norms come before the MLP), so the experts are not read for it unless they
    draw random numbers (LoRA dropout on their adapters: the same masks are drawn again)."""

    def __init__(self, boxes, offload, args, router):
        assert args.norms == "pre", "a recomputed block's expert output is not computed (router.recomputing)"
        self.boxes, self.offload, self.args, self.router = boxes, offload, args, router
        self.chosen = []  # the experts each micro-batch of a training step chose (note_chosen)

    def __call__(self, x, logits, training):
        shape = x.shape
        x, logits = x.flatten(0, -2), logits.flatten(0, -2)
        weights, chosen, probs = route(logits, self.args)
        if self.router.recording:  # a training step's forward pass
            counts = torch.bincount(chosen.flatten().cpu(), minlength=self.args.n_experts).float()
            if self.router.coef:
                self.router.record(counts, probs)
            self.note_chosen(counts)
        out = RoutedExperts.apply(x, weights, chosen, self, training)
        if self.router.coef and training and torch.is_grad_enabled():
            out = RouterLoss.apply(out, probs, self.router)
        return out.view(*shape[:-1], -1)

    def start_step(self, micro_batches):
        self.chosen = [None] * micro_batches
        for box in self.boxes:
            box.uses = 0

    def note_chosen(self, counts):
        """The experts micro-batch router.batch chose (counts: the tokens each got here), in every process of a
        parallel run (each process's backward pass streams them all, in the same order, those without tokens of
        its own taking a zero gradient: the sums over the processes are made in the same order everywhere);
        each expert's uses."""
        picked = counts.clone()
        group = self.offload.run.group
        if group.world > 1:
            picked = group.sum(picked)
        self.chosen[self.router.batch] = picked.nonzero().squeeze(1).tolist()
        for e in self.chosen[self.router.batch]:
            self.boxes[e].uses += 1

    def random(self, training):
        return training and any(p > 0 for box in self.boxes for _, _, _, p in box.lora.values())

    def learn(self):
        return any(box.trainable or box.lora for box in self.boxes)

    def stream(self, chosen, order=None):
        """(expert, its box loaded, the rows routed to it, the top-k slot each came by) for each chosen expert,
        in ascending order as transformers sums them; or for each expert of order."""
        k, flat = chosen.shape[1], chosen.flatten()
        counts = torch.bincount(flat, minlength=self.args.n_experts).tolist()
        order = [e for e, n in enumerate(counts) if n] if order is None else order
        by_expert = flat.argsort(stable=True).split(counts)  # each expert's positions, in ascending order
        picks = [by_expert[e] for e in order]
        # few tokens an expert (generation, short rows): the next expert read ahead into the page cache only, as
        # the background thread's work on it would slow the short matmuls of this one more than it saves
        into_memory = None if flat.numel() >= TOKENS_TO_READ_AHEAD * len(order) else False
        for box, e, pick in zip(self.offload.stream([self.boxes[e] for e in order], into_memory=into_memory), order,
                                picks):
            yield e, box, pick // k, pick % k


class RoutedExperts(torch.autograd.Function):
    """The sum over each token's chosen experts of routing weight * expert(x), in fp32, streaming the experts."""

    @staticmethod
    def forward(ctx, x, weights, chosen, experts, training):
        ctx.experts, ctx.training, ctx.rng, ctx.batch = experts, training, {}, experts.router.batch
        ctx.save_for_backward(x, weights, chosen)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        random = experts.random(training)
        if experts.router.recomputing and not random:
            return out
        for e, box, rows, slots in experts.stream(chosen):
            if random:
                ctx.rng[e] = get_rng_state(x.device)
            y = mlp(box, x[rows], experts.args, training, prefix="")
            out.index_add_(0, rows, (y * weights[rows, slots, None].to(y.dtype)).float())
        return out

    @staticmethod
    def backward(ctx, g):
        x, weights, chosen = ctx.saved_tensors
        experts = ctx.experts
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weights)
        if dx is None and not ctx.needs_input_grad[1] and not experts.learn():
            return None, None, None, None, None
        after = get_rng_state(x.device) if ctx.rng else None
        # a training step's experts (in reverse: the last one read may still be in the page cache)
        order = (experts.chosen[ctx.batch] if experts.chosen else torch.unique(chosen).tolist())[::-1]
        for e, box, rows, slots in experts.stream(chosen, order):
            if e in ctx.rng:  # the adapters' dropout masks of the forward pass
                set_rng_state(ctx.rng[e], x.device)
            with torch.enable_grad():
                xe = x[rows].detach().requires_grad_(dx is not None)
                y = mlp(box, xe, experts.args, ctx.training, prefix="")
            dw[rows, slots] = (g[rows].float() * y.detach().float()).sum(-1)
            if y.requires_grad:
                y.backward((g[rows] * weights[rows, slots, None]).to(y.dtype))
            if dx is not None:
                dx.index_add_(0, rows, xe.grad.float())
        if after is not None:
            set_rng_state(after, x.device)
        return None if dx is None else dx.to(x.dtype), dw, None, None, None
