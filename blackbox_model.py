"""Llama 2 with every large module on disk, and its manual training step.

The token embeddings, each transformer block and the output projection are Blackboxes: their
weights live in a file and come into memory only while they are used (or stay, when a memory
budget allows). The forward pass streams them in order; the backward pass walks them in reverse,
runs each block again with autograd (or reuses its kept activations), updates its weights and
writes them back. Matmuls look their weight up at use, so no autograd graph ever holds a weight.
"""
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from utils import (evict_from_page_cache, fsync_path, get_rng_state, read_ahead, read_tensors,
                   return_freed_memory_to_os, set_rng_state, write_tensors)


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

    @property
    def kv_heads(self):
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def hidden_dim(self):
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


CHUNK_BYTES = 32 << 20  # gradients are computed and applied in blocks of rows of about this size


def module_shapes(args, module):
    """{key: shape} of one module's tensors; keys as in Meta's checkpoints, without the module prefix."""
    d, hd, hidden = args.dim, args.head_dim, args.hidden_dim
    if module == "tok_embeddings" or module == "output":
        return {"weight": (args.vocab_size, d)}
    if module == "norm":
        return {"weight": (d,)}
    return {"attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (args.kv_heads * hd, d),
            "attention.wv.weight": (args.kv_heads * hd, d), "attention.wo.weight": (d, args.n_heads * hd),
            "feed_forward.w1.weight": (hidden, d), "feed_forward.w2.weight": (d, hidden),
            "feed_forward.w3.weight": (hidden, d), "attention_norm.weight": (d,), "ffn_norm.weight": (d,)}


def module_names(args):
    return ["tok_embeddings"] + [f"layers.{i}" for i in range(args.n_layers)] + ["norm", "output"]


def graph_bytes_per_token(args, dtype):
    """What autograd keeps of one block per token (its inputs to matmuls, attention, SwiGLU), with
    a tenth more for what allocations round up to (measured: 7B shape, 256 tokens, about 88 MB)."""
    attention = 2 * (args.n_heads + args.kv_heads) * args.head_dim
    return (5 * args.dim + attention + 4 * args.hidden_dim) * torch.finfo(dtype).bits // 8 * 11 // 10


# --- the pieces of the architecture ---

class Linear(torch.autograd.Function):
    """x @ W.T where W is looked up in its Blackbox at use: the graph keeps x, never W.
    The weight's gradient goes to the Blackbox, which applies the update once it is complete."""

    @staticmethod
    def forward(ctx, x, box, name):
        w = box.compute[name]
        ctx.box, ctx.name, ctx.in_dtype = box, name, x.dtype
        x = x.to(w.dtype)
        ctx.save_for_backward(x if box.trainable else None)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        w = ctx.box.compute[ctx.name]
        dx = (dy @ w).to(ctx.in_dtype) if ctx.needs_input_grad[0] else None
        if x is not None:  # dW = dy^T x, row block by row block
            dy, x = dy.flatten(0, -2), x.flatten(0, -2)
            ctx.box.add_grad(ctx.name, lambda r0, r1, out: torch.mm(dy[:, r0:r1].t(), x, out=out))
        return dx, None, None


class Scale(torch.autograd.Function):
    """x * w for an RMSNorm weight w looked up in its Blackbox at use."""

    @staticmethod
    def forward(ctx, x, box, name):
        ctx.box, ctx.name = box, name
        ctx.save_for_backward(x if box.trainable else None)
        return x * box.compute[name]

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = dy * ctx.box.compute[ctx.name] if ctx.needs_input_grad[0] else None
        if x is not None:  # after dx: the update may follow at once and change w in place
            grad = (dy * x).flatten(0, -2).sum(0)
            ctx.box.add_grad(ctx.name, lambda r0, r1, out: grad[r0:r1])
        return dx, None, None


def dropout(x, p, training):
    # F.dropout draws random numbers even at p=0; skipping it keeps the random stream to real masks
    return F.dropout(x, p, True) if training and p > 0 else x


def linear(box, name, x):
    y = Linear.apply(x, box, name)
    if name in box.lora:
        a, b, scale, p = box.lora[name]
        x = dropout(x.to(a.dtype), p, box.model.training)
        y = y + (F.linear(F.linear(x, a), b) * scale).to(y.dtype)
    return y


def rms_norm(box, name, x, eps):
    xf = x.float()
    return Scale.apply(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps), box, name)


def rope_tables(args, start, length, device):
    half = args.head_dim // 2
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, 2 * half, 2, device=device)[:half].float() / args.head_dim))
    angles = torch.outer(torch.arange(start, start + length, device=device).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each adjacent pair of features (2i, 2i+1) by its position's angle, as Meta's reference."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, head_dim/2) against (B, T, heads, head_dim/2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).type_as(x)


def attention(box, x, args, rope, cache, start):
    B, T, _ = x.shape
    q = linear(box, "attention.wq.weight", x).view(B, T, args.n_heads, args.head_dim)
    k = linear(box, "attention.wk.weight", x).view(B, T, args.kv_heads, args.head_dim)
    v = linear(box, "attention.wv.weight", x).view(B, T, args.kv_heads, args.head_dim)
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
    return linear(box, "attention.wo.weight", out.transpose(1, 2).reshape(B, T, -1))


def block_forward(box, x, args, rope, cache=None, start=0):
    """One transformer block on the fp32 residual stream x; matmuls in the compute dtype."""
    p, training, cdt = box.model.dropout, box.model.training, box.model.compute_dtype
    attn = attention(box, rms_norm(box, "attention_norm.weight", x, args.norm_eps).to(cdt), args, rope, cache, start)
    h = x + dropout(attn, p, training).to(x.dtype)
    hn = rms_norm(box, "ffn_norm.weight", h, args.norm_eps).to(cdt)
    ffn = linear(box, "feed_forward.w2.weight",
                 F.silu(linear(box, "feed_forward.w1.weight", hn)) * linear(box, "feed_forward.w3.weight", hn))
    return h + dropout(ffn, p, training).to(h.dtype)


def embed(box, tokens):
    return F.embedding(tokens, box.compute["weight"]).float()


def head(norm, output, h, eps):
    return linear(output, "weight", rms_norm(norm, "weight", h, eps).to(output.model.compute_dtype)).float()


def loss_sum(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum")


# --- modules on disk ---

class Blackbox:
    """One module whose weights live in a file: loaded on use and let go after, unless resident."""

    def __init__(self, model, name, file):
        self.model, self.name, self.file = model, name, Path(file)
        self.shapes = module_shapes(model.args, name.split(".")[0])
        self.resident = name == "norm"  # the final norm is tiny: always in memory
        self.trainable = False
        self.weights = None  # key -> tensor while in memory: the fp32 working copy when trainable
        self.compute = None  # key -> tensor the matmuls use (a compute-dtype copy where it differs)
        self.optim = {}  # key -> optimizer state (AdamW moments), stored beside the weights
        self.grads = {}  # key -> gradient being accumulated over the micro-batches of a step
        self.grad_count = {}
        self.lora = {}  # key -> (A, B, scale, dropout) adapter applied on top of the weight
        self.reading = self.writing = None  # futures of the background reader and writer
        self.buffer = None  # the memory the weights were read into, handed back for reuse when let go
        self.compute_buffer = None  # the memory of the compute-dtype copies, likewise
        self.reading_ahead = False  # the OS was asked to read the file ahead into its page cache
        self.grad_file = None
        self.dirty = False
        self.stale = False  # the compute-dtype copies lag behind updated weights

    def memory_bytes(self):
        """Bytes this module holds in memory when loaded (weights, compute copies, optimizer state)."""
        m, n = self.model, self.numel()
        if not self.trainable:
            return n * m.compute_dtype.itemsize
        copies = 0 if m.compute_dtype == torch.float32 or self.name in ("tok_embeddings", "norm") else \
            sum(math.prod(s) for s in self.shapes.values() if len(s) == 2) * m.compute_dtype.itemsize
        return n * 4 * (3 if m.optimizer == "adamw" else 1) + copies

    def numel(self):
        return sum(math.prod(s) for s in self.shapes.values())

    def prefetch(self, into_memory=True):
        """Start reading this module in the background: into memory, or only into the OS's page cache."""
        if self.weights is None and self.reading is None:
            if self.model.evict_before_read and not self.reading_ahead:  # benchmarks of a disk serving every read
                self.model.io.submit(evict_from_page_cache, self.file)
            if into_memory:
                self.reading, self.reading_ahead = self.model.io.submit(self._read, self.file), False
            elif not self.reading_ahead:
                self.model.io.submit(read_ahead, self.file)
                self.reading_ahead = True

    def load(self):
        if self.weights is None:
            self.prefetch()
            self.weights, self.compute, self.optim, grads, self.buffer, self.compute_buffer = self.reading.result()
            self.grads.update(grads)
        elif self.stale:  # updated since its compute-dtype copies were made
            for key, copy in self.compute.items():
                if copy is not self.weights[key]:
                    copy.copy_(self.weights[key])
        self.reading, self.stale = None, False
        return self

    def _read(self, file):
        """(weights, optimizer state, pending gradients, the buffer they live in): in the background thread."""
        m = self.model
        data, buffer = read_tensors(file, m.take_buffer, torch.float32 if self.trainable else m.compute_dtype)
        weights = {k: data[k].to(m.device) for k in self.shapes}
        optim = {}
        for name, t in data.items():
            if ":" in name:  # "attention.wq.weight:exp_avg"
                key, state = name.split(":")
                optim.setdefault(key, {})[state] = t.to(m.device)
        if m.device.type != "cpu":
            buffer = None  # everything was moved to the device: the buffer is free again
        compute, compute_buffer = m.compute_copies(self.name, weights)
        grads = {}
        if self.grad_file is not None:
            grads = {k: t.to(m.device) for k, t in read_tensors(self.grad_file)[0].items()}
            self.grad_file.unlink()
            self.grad_file = None
        return weights, compute, optim, grads, buffer, compute_buffer

    def release(self, keep=False):
        """Done with this module for now: write it back if it changed, and let it go unless kept."""
        if self.dirty and not self.resident:
            self.write()
        if not (self.resident or keep):
            if self.grads:  # gradient clipping: the gradients wait on disk for the global norm
                self.grad_file = self.model.run_dir / f"{self.name}.grad.safetensors"
                self.writing = self.model.io.submit(write_tensors, self.grads, self.grad_file)
                self.grads = {}
            buffers = [b for b in (self.buffer, self.compute_buffer) if b is not None]
            self.model.io.submit(self.model.give_buffers, buffers)  # once any pending write of them is done
            self.weights = self.compute = self.buffer = self.compute_buffer = None
            self.optim = {}

    def write(self):
        """Write the weights (and optimizer state) to the run folder in the background. Each module has
        two slot files: the last committed state is in one, newer states overwrite the other. A kill
        mid-write tears only a slot that no committed manifest names."""
        m = self.model
        slots = [m.run_dir / f"{self.name}.{slot}.safetensors" for slot in (0, 1)]
        self.file = slots[1] if slots[0].name in m.committed else slots[0]
        self.dirty = False
        data = {**self.weights, **{f"{k}:{s}": t for k, state in self.optim.items() for s, t in state.items()}}
        self.writing = m.io.submit(write_tensors, data, self.file, True)
        m.written.add(self.file)

    def wait_write(self):
        if self.writing is not None:
            self.writing.result()
            self.writing = None

    def add_grad(self, key, grad_rows, parts=1):
        """Take in a gradient given as grad_rows(r0, r1, out): its rows r0:r1 (computed into out when
        out is a buffer). With one micro-batch and no clipping the update follows at once, a block of
        rows at a time, so no whole gradient is ever held; otherwise gradients add up until complete."""
        m, rows = self.model, self.shapes[key][0]
        if m.micro_batches == 1 and not m.grad_clip:
            step = max(1, CHUNK_BYTES // (4 * math.prod(self.shapes[key][1:])))
            for r0 in range(0, rows, step):
                shape = (min(rows, r0 + step) - r0, *self.shapes[key][1:])
                grad = grad_rows(r0, r0 + shape[0], m.chunk_buffer(shape, m.compute_dtype))
                if grad.dtype != torch.float32:
                    grad = m.chunk_buffer(shape, torch.float32).copy_(grad)
                m.update(self, key, grad, r0)
            return
        grad = grad_rows(0, rows, None).float()
        self.grads[key] = grad if key not in self.grads else self.grads[key].add_(grad)
        self.grad_count[key] = self.grad_count.get(key, 0) + parts
        if self.grad_count[key] < m.micro_batches:
            return
        del self.grad_count[key]
        if m.grad_clip:
            m.grad_norms.append(torch.linalg.vector_norm(self.grads[key]))
        else:
            m.update(self, key, self.grads.pop(key))


class Transformer:
    """The model: Blackboxes in order, the final norm in memory, streaming and the manual step."""

    def __init__(self, args, offload_dir, manifest, tokenizer, storage_dtype, device=torch.device("cpu"),
                 compute_dtype=torch.float32, memory_budget=None, dropout=0.0, prefetch=True, evict_before_read=False):
        self.manifest, self.tokenizer = manifest, tokenizer
        self.args, self.offload_dir, self.storage_dtype = args, Path(offload_dir), storage_dtype
        self.device, self.compute_dtype, self.dropout = device, compute_dtype, dropout
        self.memory_budget = memory_budget
        self.boxes = {name: Blackbox(self, name, self.offload_dir / f"{name}.safetensors") for name in module_names(args)}
        self.embeddings, self.norm, self.output = self.boxes["tok_embeddings"], self.boxes["norm"], self.boxes["output"]
        self.layers = [self.boxes[f"layers.{i}"] for i in range(args.n_layers)]
        return_freed_memory_to_os()
        self.io = ThreadPoolExecutor(max_workers=1)  # one background reader and writer, in order
        self.spare_buffers, self.buffer_lock, self.chunks = [], threading.Lock(), {}
        self.training = False
        self.prefetching = prefetch  # read the next module in the background while this one computes
        self.evict_before_read = evict_before_read  # drop each file from the page cache first (benchmarks of cold reads)
        # training state, set by setup_training
        self.run_dir, self.committed, self.written, self.step = None, set(), set(), 0
        self.mode, self.optimizer, self.lr, self.grad_clip, self.micro_batches = None, None, 0.0, 0.0, 1
        self.optim_settings, self.clip_coef, self.keep_activations, self.graph_budget = {}, None, True, 0
        self.grad_norms, self.lora, self.lora_optimizer = [], {}, None
        self.plan_memory()

    def train(self, on=True):
        self.training = on
        return self

    def eval(self):
        return self.train(False)

    # --- memory ---

    def compute_copies(self, name, weights):
        """(weights in the compute dtype for the matmuls, the buffer the copies live in): copies of
        the matrices where the dtypes differ (not of the embedding table: it is only looked up)."""
        cdt = self.compute_dtype
        convert = [k for k, w in weights.items() if w.dim() == 2 and w.dtype != cdt and name != "tok_embeddings"]
        if not convert:
            return dict(weights), None
        sizes = [weights[k].numel() * cdt.itemsize for k in convert]
        buffer = self.take_buffer(sum(sizes)) if self.device.type == "cpu" else None
        compute, offset = dict(weights), 0
        for key, size in zip(convert, sizes):
            if buffer is None:
                compute[key] = weights[key].to(cdt)
                continue
            compute[key] = buffer[offset:offset + size].view(cdt).view(weights[key].shape).copy_(weights[key])
            offset += size
        return compute, buffer

    def take_buffer(self, nbytes):
        """A buffer of nbytes for a module file: a recycled one when there is one (fresh memory costs a
        page fault per 4 KB, as much as the read itself)."""
        with self.buffer_lock:
            for i, spare in enumerate(self.spare_buffers):
                if spare.numel() == nbytes:
                    return self.spare_buffers.pop(i)
            self.spare_buffers = []  # none fits (a module of another size): free them before allocating
        return torch.empty(nbytes, dtype=torch.uint8)

    def give_buffers(self, buffers):
        """Keep the buffers of the module let go last (weights, compute copies) for the next read: the
        I/O thread writes a module, hands its buffers back, then reads the next module into them. Older
        spares are dropped, so at most one module's buffers wait unused."""
        with self.buffer_lock:
            self.spare_buffers = buffers

    def plan_memory(self, tokens_per_step=0):
        """Share the memory budget (the whole process) out. Always needed: a block and the embeddings
        or output beside it (at the turns of the step both are in memory), the gradient rows being
        applied, each block's input, the logits and their gradient. Then, in order of what they save: blocks' activations (a quarter
        of a block's arithmetic each), reading the next module into memory ahead of its use (else the
        OS reads it ahead), and the last modules staying resident."""
        budget = int(self.memory_budget) if self.memory_budget is not None else 1 << 62
        boxes = list(self.boxes.values())
        block = max(box.memory_bytes() for box in self.layers) if self.layers else 0
        big = max(self.embeddings.memory_bytes(), self.output.memory_bytes())
        grads = 0 if self.mode != "full" else 4 * max(box.numel() for box in boxes) \
            if self.micro_batches > 1 or self.grad_clip else CHUNK_BYTES
        tokens = tokens_per_step * self.micro_batches  # tokens_per_step: of one micro-batch
        inputs = self.args.n_layers * tokens * self.args.dim * 4
        head = 3 * tokens_per_step * self.args.vocab_size * 4  # logits, log-probabilities, their gradient
        needed = (300 << 20) + block + big + grads + inputs + head  # 300 MB: Python and torch themselves
        prefetch = max(0, 2 * max(block, big) - block - big)  # a second block beside the one in use
        graphs = self.args.n_layers * tokens * graph_bytes_per_token(self.args, self.compute_dtype)
        self.graph_budget = max(0, min(budget - needed, graphs if self.keep_activations else 0))
        free = budget - needed - self.graph_budget
        self.prefetch_in_memory = free >= prefetch
        free -= prefetch * self.prefetch_in_memory
        suffix = True  # residents are the last modules: those in use at the turn of the step
        for box in reversed(boxes):
            if box is not self.norm:
                box.resident = suffix and box.memory_bytes() <= free
                free -= box.memory_bytes() if box.resident else 0
                suffix = box.resident
        self.peak_estimate = needed + self.graph_budget + prefetch * self.prefetch_in_memory + \
            sum(box.memory_bytes() for box in boxes if box.resident and box is not self.norm)

    def stream(self, boxes, keep=()):
        """Yield each module loaded while the next one is read in the background; let each go after
        (those in keep stay: they are the first the next pass needs)."""
        for i, box in enumerate(boxes):
            box.load()
            if i + 1 < len(boxes) and self.prefetching:
                boxes[i + 1].prefetch(into_memory=self.prefetch_in_memory)
            yield box
            box.release(keep=box in keep)

    def close(self):
        for box in self.boxes.values():
            box.wait_write()
        self.io.shutdown(wait=True)

    # --- inference ---

    @torch.no_grad()
    def forward(self, tokens, targets=None, caches=None, start=0):
        """Logits for a batch of token ids (and the mean loss over targets != -1 when given)."""
        tokens = tokens.to(self.device)
        rope = rope_tables(self.args, start, tokens.shape[1], self.device)
        for i, box in enumerate(self.stream([self.embeddings, *self.layers, self.output])):
            if box is self.embeddings:
                h = embed(box, tokens)
            elif box is self.output:
                logits = head(self.norm.load(), box, h, self.args.norm_eps)
            else:
                h = block_forward(box, h, self.args, rope, caches[i - 1] if caches else None, start)
        if targets is None:
            return logits
        targets = targets.to(self.device)
        return logits, loss_sum(logits, targets) / max(1, int((targets != -1).sum()))

    __call__ = forward

    @torch.no_grad()
    def generate(self, prompt, max_new, temperature=0.0, top_p=1.0, eos_id=None, use_cache=True, generator=None):
        """Continue a list of token ids; greedy unless temperature > 0 (then top-p sampling)."""
        tokens = list(prompt)
        caches, start = None, 0
        if use_cache:
            shape = (1, len(prompt) + max_new, self.args.kv_heads, self.args.head_dim)
            caches = [(torch.zeros(shape, dtype=self.compute_dtype, device=self.device),
                       torch.zeros(shape, dtype=self.compute_dtype, device=self.device)) for _ in self.layers]
        for _ in range(max_new):
            feed = tokens[start:] if use_cache else tokens
            logits = self.forward(torch.tensor([feed]), caches=caches, start=start)[0, -1]
            start = len(tokens) if use_cache else 0
            token = sample(logits, temperature, top_p, generator)
            tokens.append(token)
            if token == eos_id:
                break
        return tokens[len(prompt):]

    # --- training ---

    def setup_training(self, run_dir, mode="full", optimizer="sgd", grad_clip=0.0, micro_batches=1,
                       keep_activations=True, tokens_per_step=0, files=None, committed=(), **optim_settings):
        """Prepare a run: full fine-tuning keeps an fp32 working copy of every module in run_dir.
        tokens_per_step (of one micro-batch) sizes the memory plan; files and committed name the
        module files of a resumed run."""
        self.run_dir, self.mode, self.optimizer = Path(run_dir), mode, optimizer
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.grad_clip, self.micro_batches, self.keep_activations = grad_clip, micro_batches, keep_activations
        self.optim_settings, self.committed = optim_settings, set(committed)
        for name, box in self.boxes.items():
            box.trainable = mode == "full"
            box.weights = box.compute = None
            box.optim = {}
            if files and name in files:
                box.file = self.run_dir / files[name]
        if mode == "lora":
            self.lora_optimizer = torch.optim.AdamW(self.lora_parameters(), lr=0.0, **optim_settings)
        self.plan_memory(tokens_per_step)

    # --- LoRA: low-rank adapters in memory on top of frozen offloaded weights ---

    def add_lora(self, rank, alpha, dropout, targets, seed=0, tensors=None):
        """Adapters W x + alpha/rank * B A dropout(x) on the weights named in targets (wq wk wv wo w1
        w2 w3 output); A random and B zero as in the LoRA paper, or the given {key: (A, B)}."""
        generator = torch.Generator().manual_seed(seed)
        self.lora = {}
        for box in [*self.layers, self.output]:
            for key, shape in box.shapes.items():
                short = "output" if box is self.output else key.split(".")[-2]
                if short not in targets or len(shape) != 2:
                    continue
                name = f"{box.name}.{key}"
                if tensors is not None:
                    a, b = tensors[name]
                else:  # A like nn.Linear's default initialisation of a (rank x in) weight
                    a = (torch.rand(rank, shape[1], generator=generator) * 2 - 1) / math.sqrt(shape[1])
                    b = torch.zeros(shape[0], rank)
                a, b = (t.to(self.device, torch.float32).requires_grad_() for t in (a, b))
                self.lora[name] = (a, b)
                box.lora[key] = (a, b, alpha / rank, dropout)

    def lora_parameters(self):
        return [t for pair in self.lora.values() for t in pair]

    def lora_step(self):
        params = self.lora_parameters()
        norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        if not torch.isfinite(norms).all():
            raise FloatingPointError("non-finite gradient of a LoRA adapter")
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for group in self.lora_optimizer.param_groups:
            group["lr"] = self.lr
        self.lora_optimizer.step()
        self.lora_optimizer.zero_grad(set_to_none=True)

    def update(self, box, key, grad, r0=0):
        """Apply the optimizer to rows r0: of one weight, whose gradient (for those rows) is complete.
        torch.optim.AdamW runs on the rows and their moments (views): it is elementwise, so updating
        a weight block by block gives the bits of one update of the whole."""
        if not torch.isfinite(grad.sum()):  # a NaN or inf anywhere makes the sum one (and sum is fast)
            raise FloatingPointError(f"non-finite gradient in {box.name}.{key}")
        if self.clip_coef is not None:
            grad.mul_(self.clip_coef)
        box.wait_write()  # a background write may still be reading these tensors
        full = box.weights[key]
        weight = full[r0:r0 + len(grad)]
        if self.optimizer == "sgd":
            weight.add_(grad, alpha=-self.lr)
        else:
            state = box.optim.get(key)
            if state is None:
                state = box.optim[key] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(full),
                                          "exp_avg_sq": torch.zeros_like(full)}
            opt = torch.optim.AdamW([weight], lr=self.lr, **self.optim_settings)
            opt.state[weight] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"][r0:r0 + len(grad)],
                                 "exp_avg_sq": state["exp_avg_sq"][r0:r0 + len(grad)]}
            weight.grad = grad
            opt.step()
            weight.grad = None
            if r0 + len(grad) == len(full):  # the last rows: the step count moves on
                state["step"] = opt.state[weight]["step"]
        box.stale |= box.compute[key] is not full  # the copy is made again if the module is used again
        box.dirty = True

    def chunk_buffer(self, shape, dtype):
        """A reused buffer for rows of a gradient (fresh memory would cost a page fault per 4 KB)."""
        if dtype not in self.chunks:
            self.chunks[dtype] = torch.empty(CHUNK_BYTES // 4, dtype=dtype, device=self.device)
        return self.chunks[dtype][:math.prod(shape)].view(shape)

    def train_step(self, batches, lr):
        """One optimizer step on a list of (x, y) micro-batches, layer-major: every micro-batch
        passes through a module while it is in memory. Returns the mean loss over all targets."""
        self.lr, self.clip_coef, self.grad_norms = lr, None, []
        full = self.mode == "full"
        xs = [x.to(self.device) for x, _ in batches]
        ys = [y.to(self.device) for _, y in batches]
        n_targets = max(1, sum(int((y != -1).sum()) for y in ys))
        rope = rope_tables(self.args, 0, xs[0].shape[1], self.device)
        graph_bytes = xs[0].numel() * graph_bytes_per_token(self.args, self.compute_dtype)
        kept_bytes, saved = 0, []  # saved[i][j]: (input, RNG state, output with its graph or None)

        # forward: each block's input is kept, and its autograd graph too while the budget allows
        forward = self.stream([self.embeddings, *self.layers, self.output], keep=self.layers[-1:])
        emb = next(forward)
        hs = [embed(emb, x) for x in xs]
        for i, box in zip(range(len(self.layers)), forward):
            saved.append([])
            for j, x in enumerate(hs):
                x.requires_grad_(full or i > 0)
                rng = get_rng_state(self.device)
                with torch.enable_grad():  # also when recomputing later: the same kernels, the same bits
                    y = block_forward(box, x, self.args, rope)
                keep = self.keep_activations and kept_bytes + graph_bytes <= self.graph_budget
                kept_bytes += graph_bytes if keep else 0
                saved[i].append((x, rng, y if keep else None))
                hs[j] = y.detach()

        # the turn: final norm and output, forward and backward at once
        next(forward)
        grads, loss = [], 0.0
        for h, y in zip(hs, ys):
            h.requires_grad_()
            with torch.enable_grad():
                batch_loss = loss_sum(head(self.norm.load(), self.output, h, self.args.norm_eps), y) / n_targets
            if not torch.isfinite(batch_loss):
                raise FloatingPointError(f"the loss is {batch_loss.item()}")
            batch_loss.backward()
            grads.append(h.grad)
            loss += batch_loss.item()
        rng_after_forward = get_rng_state(self.device)
        del hs
        next(forward, None)  # lets the output module go

        # backward through the blocks in reverse, then the embeddings
        backward = self.stream(self.layers[::-1] + [self.embeddings] * full, keep=[self.embeddings])
        for i, box in zip(reversed(range(len(self.layers))), backward):
            for j, (x, rng, y) in enumerate(saved[i]):
                if y is None:  # recompute the block's forward with the random state it had
                    set_rng_state(rng, self.device)
                    with torch.enable_grad():
                        y = block_forward(box, x, self.args, rope)
                y.backward(grads[j])
                grads[j] = x.grad
            saved[i] = None
        if full:
            emb = next(backward)
            tokens, dys = torch.cat([x.flatten() for x in xs]), torch.cat([g.flatten(0, 1) for g in grads])

            def embedding_rows(r0, r1, out):
                rows = (tokens >= r0) & (tokens < r1)
                if out is None or out.dtype != torch.float32:  # sums of many rows: in fp32
                    out = torch.empty(r1 - r0, dys.shape[1], device=self.device)
                return out.zero_().index_add_(0, tokens[rows] - r0, dys[rows].float())
            emb.add_grad("weight", embedding_rows, parts=len(xs))
            next(backward, None)
        set_rng_state(rng_after_forward, self.device)
        if full and self.grad_clip:
            self.apply_clipped_updates()
        if not full:
            self.lora_step()
        return loss

    def apply_clipped_updates(self):
        """Gradient clipping: the global norm is known after the whole backward pass; update now."""
        total = torch.linalg.vector_norm(torch.stack(self.grad_norms))
        if not torch.isfinite(total):
            raise FloatingPointError(f"the gradient norm is {total.item()}")
        self.clip_coef = torch.clamp(self.grad_clip / (total + 1e-6), max=1.0)
        for box in self.stream(list(self.boxes.values())[::-1], keep=[self.embeddings]):
            for key in list(box.grads):
                self.update(box, key, box.grads.pop(key))
        self.clip_coef = None

    def flush(self):
        """Write every changed module and wait for all writes: {module: file} of the current state."""
        for box in self.boxes.values():
            if box.dirty:
                box.write()
        for box in self.boxes.values():
            box.wait_write()
        for file in self.written:  # on the disk before a manifest names them
            fsync_path(file)
        self.written = set()
        return {name: box.file.name for name, box in self.boxes.items() if box.file.parent == self.run_dir}

    def read_weights(self, name, merge_lora=True):
        """The current weights of one module, read on their own: the fp32 working copy when trained,
        the source tensors otherwise, with LoRA adapters merged in (W + alpha/rank * B A, in fp32)."""
        box = self.boxes[name]
        box.wait_write()
        weights = box.weights if box.weights is not None and box.trainable else \
            {k: t for k, t in read_tensors(box.file)[0].items() if k in box.shapes}
        if merge_lora and box.lora:
            weights = dict(weights)
            for key, (a, b, scale, _) in box.lora.items():
                weights[key] = weights[key].float() + scale * (b.detach() @ a.detach()).to(weights[key].device)
        return weights


def sample(logits, temperature, top_p, generator=None):
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, -1)
    sorted_probs, order = probs.sort(descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
    sorted_probs[drop] = 0.0
    choice = torch.multinomial(sorted_probs.cpu() / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice.to(order.device)])
