"""A model with every large module on disk, and its manual training step.

The token embeddings, each transformer block and the output projection are Blackboxes (offload.py):
their weights live in a file and come into memory only while they are used (or stay, when the memory
plan allows). The forward pass streams them in order; the backward pass walks them in reverse, runs
each block again with autograd (or reuses its kept activations), hands each weight's gradient to the
optimizer (optim.py) and lets the background writer put the updated module back on disk. The math
of each module is in model.py; LoRA's adapters in adapters.py; the run folder in run_folder.py.
"""
import math
from pathlib import Path

import torch

from adapters import copy_base, without_adapters
from files import direct_io_works, read_tensors
import quant
from head import head, target_logps
from model import block_forward, embed, experts_of, module_names, module_of, module_shapes
from rope import layer_ropes, longrope_switches
from moe import Experts, Router
from memory_plan import graph_bytes_per_token, plan_memory
from offload import Blackbox, Offload
from optim import Optimizer
from parallel import Group
from spill import Spilled, read_back, spill, unspilled
from utils import (get_rng_state, mem_available_bytes, release_heap_holes, return_freed_memory_to_os, rss_bytes,
                   set_rng_state)


class Transformer:
    """The model: Blackboxes in order, the final norm in memory, streaming and the manual step."""

    def __init__(self, args, offload_dir, manifest, tokenizer, storage_dtype, device, compute_dtype, memory_budget,
                 dropout=0.0, prefetch=True, cold=False):
        """memory_budget: bytes of RAM the whole process plans for (utils.memory_budget_bytes)."""
        self.args, self.offload_dir, self.manifest, self.tokenizer = args, Path(offload_dir), manifest, tokenizer
        self.storage_dtype, self.device, self.compute_dtype, self.dropout = storage_dtype, device, compute_dtype, dropout
        self.memory_budget = int(memory_budget)
        self.offload = Offload(device, compute_dtype, prefetch, cold)
        self.boxes = {name: Blackbox(name, self.offload_dir / f"{name}.safetensors",
                                     module_shapes(args, name), self.offload,
                                     grad_uses=2 if args.tied and name == "tok_embeddings" else 1,
                                     looked_up=name == "tok_embeddings")
                      for name in module_names(args)}
        for key, kind in manifest.get("keys", []):  # matrices stored in a block format (quant.py)
            if quant.is_quantized(kind):
                name, local = module_of(key)
                self.boxes[name].quant[local] = kind
        self.embeddings, self.norm = self.boxes["tok_embeddings"], self.boxes["norm"]
        self.output = self.boxes.get("output", self.embeddings)  # tied: the embedding table is the output
        self.layers = [self.boxes[f"layers.{i}"] for i in range(args.n_layers)]
        self.router = Router(args)  # a mixture of experts' load-balancing loss (its coef: 0, off)
        for i, box in enumerate(self.layers):
            if args.sparse(i):
                box.experts = Experts([self.boxes[name] for name in experts_of(args, i)], self.offload, args,
                                      self.router)
        self.sparse = [box.experts for box in self.layers if box.experts]
        return_freed_memory_to_os()
        self.training, self.mode, self.optimizer, self.lora, self.run = False, None, None, {}, None
        self.recomputed = 0  # of the last training step (forward_keeping_inputs)
        self.keep_activations, self.plan, self.router_loss = True, None, None
        self.objective = None  # the loss of a training step: None, the cross-entropy; a dpo.Objective
        self.packed_rows = True  # whether rows may hold several examples (a mask in attention: the plan counts it)
        self.base_files = {}  # box -> its offload file, while LoRA reads it from an fp32 copy (adapters.copy_base)

    def train(self, on=True):
        self.training = on
        return self

    def eval(self):
        return self.train(False)

    @property
    def group(self):
        """This process's place in a parallel run (parallel.py)."""
        return self.run.group if self.run else Group()

    @property
    def memory(self):
        """The memory plan (memory_plan.plan_memory) in force: for inference until setup_training makes the one of
        its micro-batches."""
        if self.plan is None:
            self.make_plan(0)
        return self.plan

    def make_plan(self, tokens_per_micro_batch, micro_batches=1, cache_tokens=0):
        """The memory plan, and whether the streamed modules are read past the page cache (Offload.direct): where
        the page cache cannot hold them all (in what the plan leaves of the RAM available now), or a cold-disk
        benchmark says so, and the disks of their folders allow it (Offload._read). All of them: keeping the
        last ones mapped from the page cache made the OS evict and fault them in page by page."""
        opt = self.optimizer
        plan = lambda reads_from_disk: plan_memory(
            self.args, self.embeddings, self.layers, self.norm, self.output, self.memory_budget, tokens_per_micro_batch,
            micro_batches, bool(opt and opt.whole_grads) or self.args.tied, self.keep_activations, reads_from_disk,
            bool(self.objective and self.objective.reference_in_pass), cache_tokens, self.packed_rows)
        self.plan = plan(False)
        streamed = sum(self.file_bytes(box) if box.quant else box.memory_bytes() for box in self.boxes.values()
                       if box.name not in self.plan.resident)  # (a quantized module's file: its blocks)
        folders = {self.offload_dir, *([self.run.dir] if self.run else [])}
        # (on the CPU, one process a machine: the processes of a machine share the working copy's mapped slots)
        # (on the CPU, one process a machine: the processes of a machine share the working copy's mapped slots)
        self.offload.direct = (self.offload.cold or streamed > self.page_cache_room()) and \
            self.device.type == "cpu" and self.group.local_world == 1 and all(map(direct_io_works, folders))
        if self.offload.direct:
            self.plan = plan(True)
        for box in self.boxes.values():
            box.resident = box.name in self.plan.resident
        self.offload.prefetch_in_memory = self.plan.prefetch_in_memory

    def file_bytes(self, box):
        """Bytes of a frozen module's file: its tensors in the storage dtype, those in a block format as their blocks."""
        return sum(quant.stored_bytes(shape, box.quant[key]) if key in box.quant else
                   math.prod(shape) * self.storage_dtype.itemsize for key, shape in box.shapes.items())

    def page_cache_room(self):
        """Bytes of RAM the page cache can have beside this machine's processes at their planned peaks."""
        return mem_available_bytes() - self.memory.peak * self.group.local_world

    def close(self):
        for box in self.boxes.values():
            box.wait_write()
        self.offload.close()

    # --- inference ---

    @torch.no_grad()
    def forward(self, tokens, targets=None, caches=None, start=0, positions=None, last=False):
        """Logits for a batch of token ids (last: of the last token only), or with targets, each token's
        log-probability of its target (0 where the target is -1: head.target_logps, without the whole logits);
        positions: of packed rows (data.get_batch)."""
        if self.plan is None:  # the plan decides what stays in memory
            self.make_plan(0)
        tokens = tokens.to(self.device)
        rope = layer_ropes(self.args, start, tokens.shape[1], self.device, positions)
        modules = [self.embeddings, *self.layers, self.output]  # with tied embeddings, the first is the last
        for i, box in enumerate(self.offload.stream(modules)):
            if i == 0:
                h = embed(box, tokens, self.args.embed_scale)
            elif i == len(modules) - 1:
                if targets is not None:
                    return target_logps(self.norm.load(), box, h, targets.to(self.device), self.args, self.training)
                return head(self.norm.load(), box, h[:, -1:] if last else h, self.args, self.training)
            else:
                h = block_forward(box, h, self.args, rope, i - 1, self.training, self.dropout,
                                  caches[i - 1] if caches else None, start)

    __call__ = forward

    @torch.no_grad()
    def generate(self, prompt, max_new, temperature=0.0, top_p=1.0, stop_ids=(), use_cache=True, generator=None):
        """Continue a list of token ids until a stop token (included) or max_new tokens; greedy unless
        temperature > 0 (then top-p sampling)."""
        tokens = list(prompt)
        caches, start = None, 0
        if use_cache:
            if self.optimizer is None:  # (a training run's plan holds an evaluation's short prompt)
                self.make_plan(0, cache_tokens=len(prompt) + max_new)
            shape = (1, len(prompt) + max_new, self.args.kv_heads, self.args.head_dim)
            caches = [(torch.zeros(shape, dtype=self.compute_dtype, device=self.device),
                       torch.zeros(shape, dtype=self.compute_dtype, device=self.device)) for _ in self.layers]
        for _ in range(max_new):
            if use_cache and longrope_switches(self.args, start, len(tokens)):
                start = 0  # the cached keys were turned with the other longrope factors: all again
            feed = tokens[start:] if use_cache else tokens
            logits = self.forward(torch.tensor([feed]), caches=caches, start=start, last=True)[0, -1]
            start = len(tokens) if use_cache else 0
            token = sample(logits, temperature, top_p, generator)
            tokens.append(token)
            if token in stop_ids:
                break
        return tokens[len(prompt):]

    # --- training ---

    def setup_training(self, run, mode, optim, micro_batch_tokens, micro_batches=1, keep_activations=True,
                       base_copy=-1, disk_reserve=0, log=print):
        """Prepare a run in run (run_folder.RunFolder): full fine-tuning keeps an fp32 working copy of every
        module there (read from the slots of its last commit when resumed); LoRA trains the adapters
        added before (adapters.add_lora) with AdamW, over an fp32 copy of the base where base_copy says so
        (adapters.copy_base; disk_reserve: bytes the run needs on that disk besides). optim: settings.Optim;
        micro_batch_tokens and micro_batches size the memory plan."""
        self.run, self.mode, self.keep_activations = run, mode, keep_activations
        self.offload.run = run
        run.dir.mkdir(parents=True, exist_ok=True)
        adapters = [t for pair in self.lora.values() for t in pair] if mode == "lora" else ()
        self.optimizer = Optimizer(optim, self.device, self.compute_dtype, micro_batches, adapters, run)
        for name, box in self.boxes.items():
            box.start_training(self.optimizer, trainable=mode == "full")
            if name in run.module_files:
                box.file = run.dir / run.module_files[name]
        self.make_plan(micro_batch_tokens, micro_batches)
        if mode == "lora":
            self.base_files = copy_base(self, base_copy, disk_reserve, log)
        if not any(box.converts() for box in self.boxes.values() if not box.resident):
            self.offload.background_on_one_thread()  # the steps only map files

    def train_step(self, batches, lr):
        """One optimizer step on a list of micro-batches (x, y[, positions of packed rows or None[, with DPO, the
        reference's log-probabilities of the rows or None: computed in the pass]]), layer-major: every micro-batch
        passes through a module while it is in memory. Returns the mean loss over all targets (DPO: pairs)."""
        full, opt = self.mode == "full", self.optimizer
        opt.start_step(lr)
        xs = [b[0].to(self.device) for b in batches]
        ys = [b[1].to(self.device) for b in batches]
        ropes = [layer_ropes(self.args, 0, x.shape[1], self.device, b[2] if len(b) > 2 else None)
                 for x, b in zip(xs, batches)]
        counted = [len(y) // 2 if self.objective else int((y != -1).sum()) for y in ys]  # DPO: pairs
        n = self.group.sum(torch.tensor(sum(counted)))  # of every process
        self.router.start(len(xs), self.group.world)
        for experts in self.sparse:
            experts.start_step(len(xs))
        forward = self.offload.stream([self.embeddings, *self.layers, self.output], keep=self.layers[-1:])
        hs, saved, refs = forward_keeping_inputs(self, forward, xs, ropes)
        references = [b[3] if len(b) > 3 else None for b in batches]
        grads, loss = the_turn(self, forward, hs, ys, max(1, int(n)), refs or references)
        self.router_loss = self.router.loss() if self.router.coef else None  # (this process's)
        del hs, refs  # the last block's outputs (and their .grad) are not needed through the backward
        backward_through_blocks(self, saved, grads, ropes)
        if full:
            opt.take(self.embeddings, "weight", embedding_grad(xs, grads, self.args, self.device), parts=len(xs))
            self.embeddings.release(keep=True)
        for box in self.boxes.values():  # the final norm is never let go: its summed gradient is applied here
            opt.finish(box)
        if full and opt.grad_clip:  # (the modules with gradients: not the experts no token chose)
            clipped = [box for box in list(self.boxes.values())[::-1] if box.grads or box.grad_file is not None]
            opt.apply_clipped(self.offload.stream(clipped, keep=[self.embeddings]))
        if not full:
            opt.step_adapters()
        if self.group.world > 1:  # the others read what this process wrote once this step is done everywhere
            for box in self.boxes.values():
                box.wait_write()
            loss = self.group.sum(torch.tensor(loss, dtype=torch.float64)).item()
        return loss

    def flush(self):
        """Write every changed module and wait for all writes: {module: file} of the current state, on the disk."""
        for box in self.boxes.values():
            if box.dirty:
                box.write()
        for box in self.boxes.values():
            box.wait_write()
            if box.mapped:  # changes made through a mapping reach the file (msync)
                box.mapping.flush()
        self.run.sync()
        return {name: box.file.name for name, box in self.boxes.items()
                if box.trainable and box.file.parent == self.run.dir}

    def read_weights(self, name, merge_lora=True, keys=None):
        """The current weights of one module (those of keys, all by default), read on their own: the fp32
        working copy when trained, the source tensors otherwise, with LoRA adapters merged in (W + alpha/rank *
        B A, in fp32). With tied embeddings, "output" is the table with the output's adapter merged,
        "tok_embeddings" without."""
        box = self.output if name == "output" else self.boxes[name]
        box.wait_write()
        keys = set(keys or box.shapes)
        weights = {k: t for k, t in box.weights.items() if k in keys} if box.weights is not None and box.trainable \
            else read_tensors(box.file, names=keys)[0]
        if box.quant:
            weights = quant.dequantized(weights, box.quant, torch.float32, torch.device("cpu"))[0]
        if merge_lora and box.lora and not (box is self.output and name == "tok_embeddings"):
            weights = dict(weights)
            for key, (a, b, scale, _) in ((k, v) for k, v in box.lora.items() if k in weights):
                weights[key] = weights[key].float() + scale * (b.detach() @ a.detach()).to(weights[key].device)
        return weights

# --- the parts of a training step ---

def forward_keeping_inputs(model, forward, xs, ropes):
    """The forward pass through the embeddings and the blocks (forward: the stream of modules): (the last
    block's outputs, saved[i][j] = (block i's input of micro-batch j, the random state before it, its output
    with the autograd graph while the memory plan has room for graphs, else None), and with DPO's reference in
    the pass, the last block's outputs of the model without adapters, else None). model.recomputed: the
    blocks' forward passes (one a block and micro-batch) the backward pass will compute again."""
    kept_bytes, saved, model.recomputed = 0, [], 0
    table = next(forward)
    hs = [embed(table, x, model.args.embed_scale) for x in xs]
    refs = list(hs) if model.objective and model.objective.reference_in_pass else None
    model.router.recording = True
    for i, box in zip(range(len(model.layers)), forward):
        saved.append([])
        for j, x in enumerate(hs):
            x.requires_grad_(model.mode == "full" or i > 0)
            model.router.batch = j
            rng = get_rng_state(model.device)
            with torch.enable_grad():  # also when recomputing later: the same kernels, the same bits
                y = block_forward(box, x, model.args, ropes[j], i, model.training, model.dropout)
            if refs:  # (no dropout: the reference is the base model as it generates)
                with torch.no_grad(), without_adapters(box):
                    refs[j] = block_forward(box, refs[j], model.args, ropes[j], i)
            tokens = x[..., 0].numel()
            graph_bytes = tokens * graph_bytes_per_token(model.args, model.compute_dtype, x.shape[1],
                                                         ropes[j]["examples"] is not None, tokens)
            keep = model.keep_activations and kept_bytes + graph_bytes <= model.memory.graph_budget
            kept_bytes += graph_bytes if keep else 0
            model.recomputed += not keep
            if not keep and i < len(model.layers) - model.memory.kept_inputs:  # the first blocks' wait on disk
                x = spill(model.offload, model.run.dir, f"spilled-input.{model.group.rank}.{i}.{j}", x)
            saved[i].append((x, rng, y if keep else None))
            hs[j] = y.detach()
            del y  # a graph not kept goes now, not beside the next block's
    model.router.recording = False
    return hs, saved, refs


def the_turn(model, forward, hs, ys, n, references):
    """The head of the step: final norm, output and loss, forward and backward at once (the output is updated
    here). n: the targets (DPO: pairs) the loss is the mean over; references: DPO's reference log-probabilities of
    each micro-batch's rows, or the reference's last block outputs to compute them from. Returns (the gradients at
    the last block's outputs, the loss)."""
    next(forward)
    grads, loss = [], 0.0
    if model.objective:
        model.objective.reset()
    for h, y, reference in zip(hs, ys, references):
        h.requires_grad_()
        if reference is not None and reference.dim() == 3:
            with torch.no_grad(), without_adapters(model.norm, model.output):
                reference = target_logps(model.norm.load(), model.output, reference, y, model.args).sum(-1)
        with torch.enable_grad():
            logps = target_logps(model.norm.load(), model.output, h, y, model.args, model.training)
            batch_loss = model.objective.loss(logps.sum(-1), reference, n) if model.objective else -logps.sum() / n
        if not torch.isfinite(batch_loss) and model.group.world == 1:  # else every process finds the summed
            raise FloatingPointError(f"the loss is {batch_loss.item()}")  # gradients non-finite
        batch_loss.backward()
        grads.append(h.grad)
        loss += batch_loss.item()
    next(forward, None)  # lets the output module go
    graph_bytes = max(h[..., 0].numel() * graph_bytes_per_token(model.args, model.compute_dtype, h.shape[1],
                                                                tokens=h[..., 0].numel()) for h in hs)
    if rss_bytes() + max(box.memory_bytes() for box in model.layers) + graph_bytes > model.memory.peak:
        release_heap_holes()  # the backward's first blocks would cross the plan: the heap's free pages
        # (between kept activations, where the step's tensors are small) go back to the OS
    return grads, loss


def backward_through_blocks(model, saved, grads, ropes):
    """The blocks in reverse: each block's kept graph, or its forward recomputed with the random state it had,
    takes the gradient from above (grads, replaced by the gradients at the blocks' inputs). y.backward hands
    each weight's gradient to the optimizer as autograd computes it (Linear/Scale -> box.take_grad ->
    opt.take), which updates the weight right there, a block of rows at a time, unless gradients accumulate
    or are clipped. Full fine-tuning ends with the embedding table loaded, for its update."""
    rng_after_forward = get_rng_state(model.device)
    full = model.mode == "full"
    backward = model.offload.stream(model.layers[::-1] + [model.embeddings] * full, keep=[model.embeddings])
    reading = set()
    for i, box in zip(reversed(range(len(model.layers))), backward):
        for k in {i, max(0, i - 1)} - reading:  # spilled inputs read back: this block's, the next one's ahead
            saved[k] = [(read_back(model.offload, x) if isinstance(x, Spilled) else x, *rest) for x, *rest in saved[k]]
            reading.add(k)
        for j, (x, rng, y) in enumerate(saved[i]):
            model.router.batch = j
            if isinstance(x, Spilled):
                x = unspilled(x)
            if y is None:
                set_rng_state(rng, model.device)
                model.router.recomputing = True
                with torch.enable_grad():
                    y = block_forward(box, x, model.args, ropes[j], i, model.training, model.dropout,
                                      recomputing=True)
                model.router.recomputing = False
            y.backward(grads[j])
            grads[j] = x.grad
        saved[i] = None
    if full:
        next(backward)  # the embedding table, loaded (the stream keeps it: let go by the caller)
    set_rng_state(rng_after_forward, model.device)


def embedding_grad(xs, grads, args, device):
    """The embedding table's gradient as rows(r0, r1, out): the gradients at each token's position (times the
    embeddings' scale) summed into its row (in fp32: a row may sum many), but the padding token's."""
    tokens, dys = torch.cat([x.flatten() for x in xs]), torch.cat([g.flatten(0, 1) for g in grads])
    if args.embed_scale != 1.0:
        dys = dys * args.embed_scale

    def rows(r0, r1, out, add=False):
        picked = (tokens >= r0) & (tokens < r1) & (tokens != (-1 if args.pad_id is None else args.pad_id))
        if out is None or out.dtype != torch.float32:
            out = torch.empty(r1 - r0, dys.shape[1], device=device)
        return (out if add else out.zero_()).index_add_(0, tokens[picked] - r0, dys[picked].float())
    rows.adds = True
    return rows


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
