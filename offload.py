"""Modules that live on disk: the Blackbox, the background reader and writer, recycled buffers and
the memory plan.

A Blackbox holds one module's tensors in a file (the token embeddings, a block, the final norm, the
output; any piece a step may need alone): read into memory when used (the next one in the background
meanwhile), let go after, written back by the background writer when training changed it. Nothing in a
Blackbox knows which module it holds but what its owner tells it. The memory plan decides what stays in
memory.
"""
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from files import WINDOW_BYTES, evict_from_page_cache, map_tensors, mappable, read_ahead, read_tensors, write_tensors
from model import graph_bytes_per_token

CHUNK_BYTES = 32 << 20  # gradients are computed and applied in blocks of rows of about this size
PROCESS_BYTES = 340 << 20  # Python, torch and its thread pools' buffers, with room for what allocations round
# up to (bench.py's peaks against its plans check it)


def take_one_thread():
    torch.get_num_threads()  # this thread's count settles at the default, then is set: it stays 1
    torch.set_num_threads(1)


class Offload:
    """What the modules on disk share: one background thread that reads and writes their files in
    order, the buffers reads go into (recycled), the device and compute dtype, the run folder of a
    training run (run_folder.RunFolder; None otherwise), and the bytes of module files read and written."""

    def __init__(self, device, compute_dtype, prefetch=True, evict_before_read=False):
        self.device, self.compute_dtype = device, compute_dtype
        self.prefetch = prefetch  # read the next module in the background while this one computes
        self.prefetch_in_memory = True  # into memory; else only into the OS's page cache (the plan decides)
        self.evict_before_read = evict_before_read  # drop each file from the page cache first (cold-disk benchmarks)
        self.io = ThreadPoolExecutor(max_workers=1)
        self.io_on_one_thread = False
        self.spare_buffers, self.buffer_lock = [], threading.Lock()
        self.run = None  # run_folder.RunFolder of a training run
        self.bytes = {"read": 0, "written": 0}  # module file data moved, memory-mapped reads included
        self.seconds = dict.fromkeys(("wait_read", "wait_write", "reading", "writing"), 0.0)  # where time went

    def timed(self, what, fn, *args):
        """fn(*args), its seconds added to self.seconds[what]."""
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[what] += time.perf_counter() - start

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

    def stream(self, boxes, keep=(), into_memory=None):
        """Yield each module loaded while the next one is read in the background (into memory where the plan
        says, or into_memory says; else into the page cache); let each go after (those in keep stay: they are
        the first the next pass needs)."""
        for i, box in enumerate(boxes):
            box.load()
            if i + 1 < len(boxes) and self.prefetch:
                boxes[i + 1].prefetch(into_memory=self.prefetch_in_memory if into_memory is None else into_memory)
            yield box
            box.release(keep=box in keep)

    def background_on_one_thread(self):
        """From now on the background thread's torch work runs on that thread alone: for runs whose
        steps only map files. The background thread has little to do then, and an OpenMP team of its
        own (made by any earlier conversion) would leave more OpenMP threads than cores: OpenMP then
        lets the step's idle threads sleep at once rather than wait for its next operation (idle
        cores; docs/performance.md). Where reads convert at every step, the step's
        threads had better yield to the background thread's team: that stays. The old thread ends
        here, and its team with it."""
        if not self.io_on_one_thread:
            self.io.shutdown(wait=True)
            threads = torch.get_num_threads()  # (this thread's count settles here, before the new one's)
            self.io = ThreadPoolExecutor(max_workers=1, initializer=take_one_thread)
            self.io.submit(lambda: None).result()
            torch.set_num_threads(threads)  # the count threads started later take, as it was
            self.io_on_one_thread = True

    def wait(self):
        """Until every read and write submitted so far is done."""
        self.io.submit(lambda: None).result()

    def close(self):
        self.io.shutdown(wait=True)


class Blackbox:
    """One module whose tensors live in a file: loaded on use and let go after, unless resident.

    What its owner sets: resident (the memory plan), file (where it is read from: the offload, a slot of
    the run folder, LoRA's fp32 copy of the base), lora ({key: (A, B, scale, dropout)}, adapters applied on
    top of its weights) and, with start_training, whether it is trained and the optimizer its gradients go
    to. The rest is its own state while in memory."""

    def __init__(self, name, file, shapes, offload, grad_uses=1, looked_up=False):
        self.name, self.file, self.shapes, self.offload = name, file, shapes, offload
        self.grad_uses = grad_uses  # gradients per micro-batch: 2 for a table that is embeddings and output
        self.looked_up = looked_up  # rows are looked up (an embedding table), never multiplied
        self.compute_dtype = offload.compute_dtype
        self.resident = False
        self.trainable, self.optimizer = False, None
        self.lora = {}
        self.experts = None  # a sparse block's experts (moe.Experts), which its forward pass streams
        self.uses = None  # an expert: the micro-batches of this step whose tokens chose it (its gradient's parts)
        self.reads = 0  # times its file was read
        self.weights = None  # key -> tensor while in memory: the fp32 working copy when trainable
        self.compute = None  # key -> tensor the matmuls use (a compute-dtype copy where it differs)
        self.optim = {}  # key -> optimizer state (AdamW moments), stored beside the weights
        self.grads = {}  # key -> gradient being accumulated over the micro-batches of a step
        self.dirty = False  # changed since it was read or written
        self.stale = False  # the compute-dtype copies lag behind updated weights
        self.mapped = False  # the weights are views of a shared mapping of self.file: changes go straight into it
        self.mapping = None  # the file's pages the weights are views of (mmap), or
        self.buffer = None  # the memory the weights were read into, handed back for reuse when let go
        self.compute_buffer = None  # the memory of the compute-dtype copies, likewise
        self.reading = self.writing = None  # futures of the background reader and writer
        self.reading_ahead = False  # the OS was asked to read the file ahead into its page cache
        self.grad_file = None

    def start_training(self, optimizer, trainable):
        """From now on: gradients go to optimizer, and the weights change when trainable (full
        fine-tuning); whatever was in memory is read again."""
        self.trainable, self.optimizer = trainable, optimizer
        self.weights = self.compute = None
        self.optim = {}

    def numel(self):
        return sum(math.prod(s) for s in self.shapes.values())

    def memory_bytes(self):
        """Bytes this module holds in memory when loaded (weights, compute copies, optimizer state)."""
        cdt = self.compute_dtype
        if not self.trainable:
            return self.numel() * cdt.itemsize
        copies = 0 if not self.copies_for_compute(torch.float32) else \
            sum(math.prod(s) for s in self.shapes.values() if len(s) == 2) * cdt.itemsize  # (none of the norm)
        return self.numel() * 4 * (1 + self.optimizer.states) + copies

    def converts(self):
        """Whether reading this module makes new tensors every time (for another device, in another dtype
        than its file's, or compute-dtype copies of trained weights) rather than mapping its file."""
        if self.offload.device.type != "cpu":
            return True
        if self.trainable:  # read from its fp32 working copy once it has one
            return self.copies_for_compute(torch.float32)
        if not self.file.exists():  # a plan made before the conversion
            return True
        return not mappable(self.file, self.compute_dtype)

    def copies_for_compute(self, dtype):
        """Whether matrices read in dtype get compute-dtype copies (not a table that is only looked up)."""
        return dtype != self.compute_dtype and not self.looked_up

    def take_grad(self, key, rows):
        self.optimizer.take(self, key, rows)

    # --- reading ---

    def prefetch(self, into_memory=True):
        """Start reading this module in the background: into memory, or only into the OS's page cache."""
        o = self.offload
        if self.weights is None and self.reading is None:
            if o.evict_before_read and not self.reading_ahead:
                o.io.submit(evict_from_page_cache, self.file)
            if into_memory:
                self.reading, self.reading_ahead = o.io.submit(o.timed, "reading", self._read), False
            elif not self.reading_ahead:
                o.io.submit(read_ahead, self.file)
                self.reading_ahead = True

    def load(self):
        if self.weights is None:
            self.prefetch()
            self.weights, self.compute, self.optim, grads, self.buffer, self.compute_buffer, self.mapping, \
                self.mapped = self.offload.timed("wait_read", self.reading.result)
            self.grads.update(grads)
        elif self.stale:  # updated since its compute-dtype copies were made
            for key, copy in self.compute.items():
                if copy is not self.weights[key]:
                    copy.copy_(self.weights[key])
        self.reading, self.stale = None, False
        return self

    def _read(self):
        """(weights, compute copies, optimizer state, pending gradients, their buffers, the mapping,
        whether it is shared): in the I/O thread. On the CPU a file stored in the wanted dtype is mapped,
        not copied: shared when it is the working copy being trained (then updates go straight into it),
        unless the module stays resident (its memory is written once, at a commit: the OS would write a
        shared mapping's changes to the disk every few seconds)."""
        o = self.offload
        dtype = torch.float32 if self.trainable else o.compute_dtype
        shared = self.trainable and not self.resident and o.run is not None and o.run.is_open_slot(self.file)
        # a frozen table that is only looked up: its pages come in as rows are read, not the whole table
        rows_only = self.looked_up and not self.trainable and self.grad_uses == 1
        mapped = map_tensors(self.file, dtype, shared, populate=not rows_only) if o.device.type == "cpu" else None
        if mapped is None:  # converted on the way in, or bound for another device
            data, buffer = read_tensors(self.file, o.take_buffer, dtype)
            mapping, shared = None, False
            if o.device.type != "cpu":
                buffer = None  # everything is moved to the device: the buffer is free again
        else:
            (data, mapping), buffer = mapped, None
        o.bytes["read"] += self.file.stat().st_size
        self.reads += 1
        weights = {k: data[k].to(o.device) for k in self.shapes}
        optim = {}
        for name, t in data.items():
            if ":" in name:  # "attention.wq.weight:exp_avg"
                key, state = name.split(":")
                optim.setdefault(key, {})[state] = t.to(o.device)
        compute, compute_buffer = compute_copies(weights, self.compute_dtype, self.copies_for_compute,
                                                 o.take_buffer if o.device.type == "cpu" else None)
        grads = {}
        if self.grad_file is not None:
            grads = {k: t.to(o.device) for k, t in read_tensors(self.grad_file)[0].items()}
            o.bytes["read"] += self.grad_file.stat().st_size
            self.grad_file.unlink()
            self.grad_file = None
        return weights, compute, optim, grads, buffer, compute_buffer, mapping, shared

    # --- letting go and writing ---

    def release(self, keep=False):
        """Done with this module for now: write it back if it changed, and let it go unless kept."""
        o = self.offload
        if self.optimizer is not None:
            self.optimizer.finish(self)  # gradients still being summed over the processes
        if self.dirty and not self.resident and not self.mapped:
            self.write()
        if not (self.resident or keep):
            if self.grads:  # gradient clipping: the gradients wait on disk for the global norm
                self.grad_file = o.run.grad_file(self.name)
                self.writing = o.io.submit(o.timed, "writing", self._write_file, self.grads, self.grad_file)
                self.grads = {}
            buffers = [b for b in (self.buffer, self.compute_buffer) if b is not None]
            if buffers:
                o.io.submit(o.give_buffers, buffers)  # once any pending write of them is done
            self.weights = self.compute = self.buffer = self.compute_buffer = self.mapping = None
            self.optim, self.mapped, self.dirty = {}, False, False  # a mapping closes once no view of it is left

    def _write_file(self, tensors, path, in_place=False):
        write_tensors(tensors, path, in_place)
        self.offload.bytes["written"] += sum(t.numel() * t.element_size() for t in tensors.values())

    def prepare_update(self, states):
        """Before the weights change: the optimizer state is there (states: the fp32 tensors per weight,
        made as zeros the first time), and on the CPU the weights are views of a shared mapping of the
        slot file, so updates go straight into its pages (the OS writes them to the disk in the
        background: no copy and no write of the module afterwards). The first update after the module
        was read from elsewhere or its file was committed copies the module into the slot first (each
        process of a machine its own rows of it)."""
        if self.dirty:  # prepared at its first update since it was read or written
            return
        self.dirty = True
        o, run = self.offload, self.offload.run
        for key, weight in self.weights.items():
            if states and key not in self.optim:
                self.optim[key] = {"step": torch.tensor(0.0), **{s: torch.zeros_like(weight) for s in states}}
        nbytes = sum(t.numel() * 4 for t in self.state().values()) // run.group.local_world
        if self.mapped and run.is_open_slot(self.file):
            o.bytes["written"] += nbytes  # by the OS
        elif o.device.type == "cpu" and not self.resident:  # into the slot (this process's part), then mapped
            self.file = run.slot(self.name)
            write_tensors(self.state(), self.file, in_place=True, rows=run.own_rows)
            o.bytes["written"] += nbytes
            tensors, self.mapping = map_tensors(self.file, torch.float32, True)
            for key in self.weights:
                if self.compute[key] is self.weights[key]:
                    self.compute[key] = tensors[key]
                self.weights[key] = tensors[key]
            self.optim = {key: {s: tensors[f"{key}:{s}"] for s in state} for key, state in self.optim.items()}
            self.buffer, self.mapped = None, True
            run.written.add(self.file)

    def state(self):
        """{name: tensor} as stored: the weights and, as "key:state", their optimizer state."""
        return {**self.weights, **{f"{k}:{s}": t for k, state in self.optim.items() for s, t in state.items()}}

    def write(self):
        """Write the weights (and optimizer state) to the slot file in the background, unless they are
        views of it already."""
        o, run = self.offload, self.offload.run
        self.dirty = False
        if self.mapped:
            return
        self.file = run.slot(self.name)
        if run.writes:  # else the machine's first process writes the same bytes
            self.writing = o.io.submit(o.timed, "writing", self._write_file, self.state(), self.file, True)
            run.written.add(self.file)

    def wait_write(self):
        if self.writing is not None:
            self.offload.timed("wait_write", self.writing.result)
            self.writing = None


def compute_copies(weights, dtype, wanted, take_buffer=None):
    """(weights in the compute dtype for the matmuls, the buffer the copies live in): copies in dtype of the
    matrices where wanted(their dtype) says so, in one buffer of take_buffer (None: each a tensor of its own)."""
    convert = [k for k, w in weights.items() if w.dim() == 2 and wanted(w.dtype)]
    if not convert:
        return dict(weights), None
    sizes = [weights[k].numel() * dtype.itemsize for k in convert]
    buffer = take_buffer(sum(sizes)) if take_buffer else None
    compute, offset = dict(weights), 0
    for key, size in zip(convert, sizes):
        if buffer is None:
            compute[key] = weights[key].to(dtype)
            continue
        compute[key] = buffer[offset:offset + size].view(dtype).view(weights[key].shape).copy_(weights[key])
        offset += size
    return compute, buffer


@dataclass(frozen=True)
class MemoryPlan:
    graph_budget: int  # bytes of blocks' activations kept for the backward pass
    prefetch_in_memory: bool  # the next module is read into memory ahead of its use (else into the page cache)
    peak: int  # the planned peak of the process, bytes
    resident: frozenset  # names of the modules that stay in memory


def plan_memory(args, embeddings, layers, norm, output, budget, tokens, micro_batches=1, whole_grads=False,
                keep_activations=True):
    """Share the memory budget (bytes, the whole process) out. Always needed: a block (of a mixture: with two
    of its experts, whatever the number chosen) and the embeddings or output beside it (at the turns of the
    step both are in memory), the gradient rows being applied
    (a whole module's gradient when gradients accumulate, wait for clipping or come from two uses of
    one table: whole_grads), each block's input, the logits and their gradient, the block being computed.
    Then, in order of what they save: blocks' activations (a quarter of a block's arithmetic each),
    reading the next module into memory ahead of its use (else the OS reads it ahead), and the last
    modules staying resident (the final norm always: it is tiny and used at every turn)."""
    modules = list(dict.fromkeys([embeddings, *layers, output]))  # the output may be the embeddings
    experts = [box.experts.boxes[0] for box in layers if box.experts]  # a mixture: an expert in use, the next
    block = max((box.memory_bytes() for box in layers), default=0) + \
        2 * max((e.memory_bytes() for e in experts), default=0)  # read ahead
    big = max(embeddings.memory_bytes(), output.memory_bytes())
    grads = 0 if not embeddings.trainable else \
        4 * max(box.numel() for box in modules) if whole_grads else CHUNK_BYTES
    all_tokens = tokens * micro_batches  # tokens: of one micro-batch
    inputs = args.n_layers * all_tokens * args.dim * 4
    # logits, their fp32 copy, the log-probabilities (their gradient); capped logits keep two more (Gemma 2)
    head = (3 + 2 * bool(args.final_softcap)) * tokens * args.vocab_size * 4
    per_token = graph_bytes_per_token(args, embeddings.compute_dtype, tokens)  # (a row of every token: an upper
    # bound of attention written out)
    working = tokens * per_token + WINDOW_BYTES  # the block being computed (its activations and their
    # gradients) and the window a converting read maps
    needed = PROCESS_BYTES + block + big + grads + inputs + head + working
    prefetch = max(0, 2 * max(block, big) - block - big)  # a second block beside the one in use
    graphs = args.n_layers * all_tokens * per_token
    graph_budget = max(0, min(budget - needed, graphs if keep_activations else 0))
    free = budget - needed - graph_budget
    prefetch_in_memory = free >= prefetch
    free -= prefetch * prefetch_in_memory
    resident = {norm.name}
    for box in reversed(modules):  # residents are the last modules: those in use at the turn of the step
        if box.memory_bytes() > free:
            break
        resident.add(box.name)
        free -= box.memory_bytes()
    peak = needed + graph_budget + prefetch * prefetch_in_memory + sum(box.memory_bytes() for box in modules
                                                                       if box.name in resident)
    return MemoryPlan(graph_budget, prefetch_in_memory, peak, frozenset(resident))
