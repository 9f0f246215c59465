"""Modules that live on disk: the Blackbox, the background reader and writer, recycled buffers and
the memory plan.

A Blackbox holds one module (the token embeddings, a block, the final norm or the output) in a file:
read into memory when used (the next one in the background meanwhile), let go after, written back
by the background writer when training changed it. The memory plan decides what stays in memory.
"""
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from files import (FILE_BYTES, WINDOW_BYTES, evict_from_page_cache, map_tensors, mappable, read_ahead, read_tensors,
                   write_tensors)
from llama import graph_bytes_per_token

CHUNK_BYTES = 32 << 20  # gradients are computed and applied in blocks of rows of about this size
PROCESS_BYTES = 340 << 20  # Python, torch and its thread pools' buffers (measured: 221 MB after the imports, 266
# after the matmuls of a GEMM probe; 340 leaves room for what allocations round up to)


def take_one_thread():
    torch.get_num_threads()  # this thread's count settles at the default, then is set: it stays 1
    torch.set_num_threads(1)


class Offload:
    """What the modules on disk share: one background thread that reads and writes their files in
    order, the buffers reads go into (recycled), the device and compute dtype, the run folder."""

    def __init__(self, device, compute_dtype, prefetch=True, evict_before_read=False):
        self.device, self.compute_dtype = device, compute_dtype
        self.prefetch = prefetch  # read the next module in the background while this one computes
        self.prefetch_in_memory = True  # into memory; else only into the OS's page cache (the plan decides)
        self.evict_before_read = evict_before_read  # drop each file from the page cache first (cold-disk benchmarks)
        self.io = ThreadPoolExecutor(max_workers=1)
        self.io_on_one_thread = False
        self.spare_buffers, self.buffer_lock = [], threading.Lock()
        self.run_dir, self.committed, self.written = None, set(), set()  # of a training run
        self.share = (0, 1)  # (part, parts): several processes of one machine (parallel.py) each update
        # and copy their part of every weight's rows in the shared mapped files
        self.writes = True  # whether this process writes files no mapping changes (the machine's first)
        self.tag = ""  # in the names of the files each process writes for itself
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

    def stream(self, boxes, keep=()):
        """Yield each module loaded while the next one is read in the background; let each go after
        (those in keep stay: they are the first the next pass needs)."""
        for i, box in enumerate(boxes):
            box.load()
            if i + 1 < len(boxes) and self.prefetch:
                boxes[i + 1].prefetch(into_memory=self.prefetch_in_memory)
            yield box
            box.release(keep=box in keep)

    def own_rows(self, n):
        """The rows r0:r1 of n this process updates in a shared mapped file."""
        part, parts = self.share
        return n * part // parts, n * (part + 1) // parts

    def background_on_one_thread(self):
        """From now on the background thread's torch work runs on that thread alone: for runs whose
        steps only map files. The background thread has little to do then, and an OpenMP team of its
        own (made by any earlier conversion) would leave more OpenMP threads than cores: OpenMP then
        lets the step's idle threads sleep at once rather than wait for its next operation (1B LoRA:
        2300 sleeps a step, 5% of its cores' time idle). Where reads convert at every step, the step's
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
    """One module whose weights live in a file: loaded on use and let go after, unless resident."""

    def __init__(self, name, file, shapes, offload, grad_uses=1):
        self.name, self.file, self.shapes, self.offload = name, file, shapes, offload
        self.grad_uses = grad_uses  # gradients per micro-batch: 2 for a table that is embeddings and output
        self.compute_dtype = offload.compute_dtype
        self.resident = name == "norm"  # the final norm is tiny: always in memory
        self.trainable = False
        self.optimizer = None  # where gradients go when trainable (optim.Optimizer)
        self.weights = None  # key -> tensor while in memory: the fp32 working copy when trainable
        self.compute = None  # key -> tensor the matmuls use (a compute-dtype copy where it differs)
        self.optim = {}  # key -> optimizer state (AdamW moments), stored beside the weights
        self.grads = {}  # key -> gradient being accumulated over the micro-batches of a step
        self.lora = {}  # key -> (A, B, scale, dropout) adapter applied on top of the weight
        self.reading = self.writing = None  # futures of the background reader and writer
        self.buffer = None  # the memory the weights were read into, handed back for reuse when let go
        self.mapping = None  # or the file's pages the weights are views of (mmap)
        self.mapped = False  # the mapping is shared: changes to the weights go straight into self.file
        self.compute_buffer = None  # the memory of the compute-dtype copies, likewise
        self.reading_ahead = False  # the OS was asked to read the file ahead into its page cache
        self.grad_file = None
        self.dirty = False
        self.stale = False  # the compute-dtype copies lag behind updated weights

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
        """Whether matrices read in dtype get compute-dtype copies (not the embedding table: it is only
        looked up)."""
        return dtype != self.compute_dtype and self.name != "tok_embeddings"

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
        shared = self.trainable and not self.resident and self.file.parent == o.run_dir and \
            self.file.name not in o.committed
        # a frozen table that is only looked up (embeddings not tied to the output): its pages come in
        # as rows are read, a few MB a step, not the whole table
        looked_up = self.name == "tok_embeddings" and not self.trainable and self.grad_uses == 1
        mapped = map_tensors(self.file, dtype, shared, populate=not looked_up) if o.device.type == "cpu" else None
        if mapped is None:  # converted on the way in, or bound for another device
            data, buffer = read_tensors(self.file, o.take_buffer, dtype)
            mapping, shared = None, False
        else:
            (data, mapping), buffer = mapped, None
        weights = {k: data[k].to(o.device) for k in self.shapes}
        optim = {}
        for name, t in data.items():
            if ":" in name:  # "attention.wq.weight:exp_avg"
                key, state = name.split(":")
                optim.setdefault(key, {})[state] = t.to(o.device)
        if o.device.type != "cpu":
            buffer = None  # everything was moved to the device: the buffer is free again
        compute, compute_buffer = self._compute_copies(weights)
        grads = {}
        if self.grad_file is not None:
            grads = {k: t.to(o.device) for k, t in read_tensors(self.grad_file)[0].items()}
            self.grad_file.unlink()
            self.grad_file = None
        return weights, compute, optim, grads, buffer, compute_buffer, mapping, shared

    def _compute_copies(self, weights):
        """(weights in the compute dtype for the matmuls, the buffer the copies live in): copies of
        the matrices where copies_for_compute says so."""
        o, cdt = self.offload, self.compute_dtype
        convert = [k for k, w in weights.items() if w.dim() == 2 and self.copies_for_compute(w.dtype)]
        if not convert:
            return dict(weights), None
        sizes = [weights[k].numel() * cdt.itemsize for k in convert]
        buffer = o.take_buffer(sum(sizes)) if o.device.type == "cpu" else None
        compute, offset = dict(weights), 0
        for key, size in zip(convert, sizes):
            if buffer is None:
                compute[key] = weights[key].to(cdt)
                continue
            compute[key] = buffer[offset:offset + size].view(cdt).view(weights[key].shape).copy_(weights[key])
            offset += size
        return compute, buffer

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
                self.grad_file = o.run_dir / f"{self.name}.grad{o.tag}.safetensors"
                self.writing = o.io.submit(o.timed, "writing", write_tensors, self.grads, self.grad_file)
                self.grads = {}
            buffers = [b for b in (self.buffer, self.compute_buffer) if b is not None]
            if buffers:
                o.io.submit(o.give_buffers, buffers)  # once any pending write of them is done
            self.weights = self.compute = self.buffer = self.compute_buffer = self.mapping = None
            self.optim, self.mapped, self.dirty = {}, False, False  # a mapping closes once no view of it is left

    def slot(self):
        """The file the next state goes to. Each module has two slot files in the run folder: the last
        committed state is in one, newer states overwrite the other, so a kill mid-write tears only
        a slot that no committed manifest names."""
        o = self.offload
        slots = [o.run_dir / f"{self.name}.{slot}.safetensors" for slot in (0, 1)]
        return slots[1] if slots[0].name in o.committed else slots[0]

    def prepare_update(self, states):
        """Before the weights change: the optimizer state is there (states: the fp32 tensors per weight,
        made as zeros the first time), and on the CPU the weights are views of a shared mapping of the
        slot file, so updates go straight into its pages (the OS writes them to the disk in the
        background: no copy and no write of the module afterwards). The first update after the module
        was read from elsewhere or its file was committed copies the module into the slot first."""
        if self.dirty:  # prepared at its first update since it was read or written
            return
        self.dirty = True
        o = self.offload
        for key, weight in self.weights.items():
            if states and key not in self.optim:
                self.optim[key] = {"step": torch.tensor(0.0), **{s: torch.zeros_like(weight) for s in states}}
        if self.mapped and self.file.name not in o.committed:
            FILE_BYTES["written"] += sum(t.numel() * 4 for t in self.state().values()) // o.share[1]  # by the OS
        elif o.device.type == "cpu" and not self.resident:  # into the slot (this process's part), then mapped
            self.file = self.slot()
            write_tensors(self.state(), self.file, in_place=True, part=o.share)
            tensors, self.mapping = map_tensors(self.file, torch.float32, True)
            for key in self.weights:
                if self.compute[key] is self.weights[key]:
                    self.compute[key] = tensors[key]
                self.weights[key] = tensors[key]
            self.optim = {key: {s: tensors[f"{key}:{s}"] for s in state} for key, state in self.optim.items()}
            self.buffer, self.mapped = None, True
            o.written.add(self.file)

    def state(self):
        """{name: tensor} as stored: the weights and, as "key:state", their optimizer state."""
        return {**self.weights, **{f"{k}:{s}": t for k, state in self.optim.items() for s, t in state.items()}}

    def write(self):
        """Write the weights (and optimizer state) to the slot file in the background, unless they are
        views of it already."""
        o = self.offload
        self.dirty = False
        if self.mapped:
            return
        self.file = self.slot()
        if o.writes:  # else the machine's first process writes the same bytes
            self.writing = o.io.submit(o.timed, "writing", write_tensors, self.state(), self.file, True)
            o.written.add(self.file)

    def wait_write(self):
        if self.writing is not None:
            self.offload.timed("wait_write", self.writing.result)
            self.writing = None


def plan_memory(args, embeddings, layers, norm, output, budget, tokens, micro_batches=1, whole_grads=False,
                keep_activations=True):
    """Share the memory budget (bytes, the whole process) out. Always needed: a block and the embeddings
    or output beside it (at the turns of the step both are in memory), the gradient rows being applied
    (a whole module's gradient when gradients accumulate, wait for clipping or come from two uses of
    one table: whole_grads), each block's input, the logits and their gradient, the block being computed.
    Then, in order of what
    they save: blocks' activations (a quarter of a block's arithmetic each), reading the next module
    into memory ahead of its use (else the OS reads it ahead), and the last modules staying resident.
    Sets box.resident; returns (activation bytes kept, prefetch into memory, planned peak)."""
    modules = list(dict.fromkeys([embeddings, *layers, output]))  # the output may be the embeddings
    block = max((box.memory_bytes() for box in layers), default=0)
    big = max(embeddings.memory_bytes(), output.memory_bytes())
    grads = 0 if not embeddings.trainable else \
        4 * max(box.numel() for box in modules) if whole_grads else CHUNK_BYTES
    all_tokens = tokens * micro_batches  # tokens: of one micro-batch
    inputs = args.n_layers * all_tokens * args.dim * 4
    head = 3 * tokens * args.vocab_size * 4  # logits, their fp32 copy, the log-probabilities (their gradient)
    working = tokens * graph_bytes_per_token(args, embeddings.compute_dtype) + WINDOW_BYTES  # the block being
    # computed (its activations and their gradients) and the window a converting read maps
    needed = PROCESS_BYTES + block + big + grads + inputs + head + working
    prefetch = max(0, 2 * max(block, big) - block - big)  # a second block beside the one in use
    graphs = args.n_layers * all_tokens * graph_bytes_per_token(args, embeddings.compute_dtype)
    graph_budget = max(0, min(budget - needed, graphs if keep_activations else 0))
    free = budget - needed - graph_budget
    prefetch_in_memory = free >= prefetch
    free -= prefetch * prefetch_in_memory
    suffix = True  # residents are the last modules: those in use at the turn of the step
    for box in reversed(modules):
        box.resident = suffix and box.memory_bytes() <= free
        free -= box.memory_bytes() if box.resident else 0
        suffix = box.resident
    norm.resident = True  # tiny, and used at every turn
    peak = needed + graph_budget + prefetch * prefetch_in_memory + sum(box.memory_bytes() for box in modules
                                                                       if box.resident)
    return graph_budget, prefetch_in_memory, peak
