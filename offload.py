"""Modules that live on disk: the Blackbox, the background reader and writer, recycled buffers.

A Blackbox holds one module's tensors in a file (the token embeddings, a block, the final norm, the
output; any piece a step may need alone): read into memory when used (the next one in the background
meanwhile), let go after, written back by the background writer when training changed it. Nothing in a
Blackbox knows which module it holds but what its owner tells it. The memory plan (memory_plan.py) decides
what stays in memory. Files are mapped from the OS's page cache where it can hold what a step streams, else read and
written past it (Offload.direct; the model decides).
"""
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

import quant
from files import (evict_from_page_cache, map_tensors, mappable, read_ahead, read_image, read_tensors, write_image,
                   write_tensors)



def take_one_thread():
    torch.get_num_threads()  # this thread's count settles at the default, then is set: it stays 1
    torch.set_num_threads(1)


class Offload:
    """What the modules on disk share: one background thread that reads and writes their files in
    order, the buffers reads go into (recycled), the device and compute dtype, the run folder of a
    training run (run_folder.RunFolder; None otherwise), and the bytes of module files read and written."""

    def __init__(self, device, compute_dtype, prefetch=True, cold=False):
        self.device, self.compute_dtype = device, compute_dtype
        self.prefetch = prefetch  # read the next module in the background while this one computes
        self.prefetch_in_memory = True  # into memory; else only into the OS's page cache (the plan decides)
        self.cold = cold  # cold-disk benchmarks: each file leaves the page cache once used and written (evict)
        self.direct = False  # module files are read and written past the page cache (the model decides)
        self.io = ThreadPoolExecutor(max_workers=1)
        self.io_on_one_thread = False
        self.spare_buffers, self.buffer_lock = [], threading.Lock()
        self.run = None  # run_folder.RunFolder of a training run
        self.bytes = {"read": 0, "written": 0}  # module file data moved, memory-mapped reads included
        self.seconds = dict.fromkeys(("wait_read", "wait_write", "reading", "writing", "dequantizing"), 0.0)  # where
        # time went

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
        """Keep the buffers of the module let go last (weights, compute copies) for a later read: the
        I/O thread writes a module, hands its buffers back, then reads a module into them. Older
        spares are dropped, so at most one module's buffers wait unused."""
        with self.buffer_lock:
            self.spare_buffers = buffers

    def stream(self, boxes, keep=(), into_memory=None):
        """Yield each module loaded while the next one is read in the background (into memory where the plan
        says, or into_memory says; else into the page cache); let each go after (those in keep stay: they are
        the first the next pass needs)."""
        for i, box in enumerate(boxes):
            box.prefetch()  # its read first (if not under way), then the next one's behind it: under way while
            if i + 1 < len(boxes) and self.prefetch:  # this one is dequantized (load) and computed
                boxes[i + 1].prefetch(into_memory=self.prefetch_in_memory if into_memory is None else into_memory)
            box.load()
            yield box
            box.release(keep=box in keep)

    def background_on_one_thread(self):
        """From now on the background thread's torch work runs on that thread alone, for runs whose steps
        convert nothing: an OpenMP team of its own (made by an earlier conversion) would leave more OpenMP
        threads than cores, and OpenMP then lets the step's idle threads sleep at once (idle cores;
        docs/performance.md). Where reads convert at every step, its team stays. The old thread ends here."""
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


class Image(NamedTuple):
    """A module file's bytes read past the page cache (files.read_image), its tensors views of them: written
    back whole while its tensors are the same (names)."""
    data: torch.Tensor
    size: int
    names: frozenset


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
        self.quant = {}  # key -> the block format it is stored in (quant.py), dequantized as it is read
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
        self.image = None  # Image: the file's bytes in self.buffer, read past the page cache
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
        if not self.trainable:  # (a quantized module: its values in the compute dtype, and its file's bytes
            return self.resident_bytes() + self.stored_bytes()  # while they are dequantized)
        copies = 0 if not self.copies_for_compute(torch.float32) else \
            sum(math.prod(s) for s in self.shapes.values() if len(s) == 2) * cdt.itemsize  # (none of the norm)
        return self.numel() * 4 * (1 + self.optimizer.states) + copies

    def stored_bytes(self):
        """Bytes of a quantized module's matrices as their blocks (0 for others)."""
        return sum(quant.stored_bytes(self.shapes[k], kind) for k, kind in self.quant.items())

    def resident_bytes(self):
        """Bytes this module holds while it stays in memory: memory_bytes, but a quantized module's blocks, which
        are let go once dequantized."""
        if not self.trainable:
            return self.numel() * self.compute_dtype.itemsize
        return self.memory_bytes()

    def converts(self):
        """Whether reading this module makes new tensors on the I/O thread every time (for another device, in
        another dtype than its file's, or compute-dtype copies of trained weights) rather than mapping its file
        (or, quantized, reading its bytes for the step's threads to dequantize)."""
        if self.offload.device.type != "cpu":
            return True
        if self.quant:
            return False
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
            if into_memory:
                self.reading, self.reading_ahead = o.io.submit(o.timed, "reading", self._read), False
            elif not self.reading_ahead and not o.direct:  # (read past the page cache: nothing to read ahead into)
                o.io.submit(read_ahead, self.file)
                self.reading_ahead = True

    def load(self):
        if self.weights is None:
            self.prefetch()
            self.weights, self.compute, self.optim, grads, self.buffer, self.compute_buffer, self.mapping, \
                self.mapped, self.image = self.offload.timed("wait_read", self.reading.result)
            self.grads.update(grads)
            if self.quant:  # dequantized on the step's threads, on its device: faster than on the I/O thread,
                # which the matmuls leave no core (bench.py's dequantizing_s)
                o = self.offload
                buffers = o.take_buffer if o.device.type == "cpu" else None
                self.weights, self.compute_buffer = o.timed("dequantizing", quant.dequantized, self.weights,
                                                            self.quant, self.compute_dtype, o.device, buffers)
                self.compute = self.weights
                if self.resident:  # its blocks are not needed again (resident_bytes)
                    self.buffer = self.mapping = None
        elif self.stale:  # updated since its compute-dtype copies were made
            for key, copy in self.compute.items():
                if copy is not self.weights[key]:
                    copy.copy_(self.weights[key])
        self.reading, self.stale = None, False
        return self

    def _read(self):
        """(weights, compute copies, optimizer state, pending gradients, their buffers, the mapping,
        whether it is shared, the Image read past the page cache): in the I/O thread. On the CPU a file
        stored in the wanted dtype is read past the page cache where the model says (Offload.direct), else
        mapped, not copied: shared when it is the working copy being trained (then updates go straight into
        it), unless the module stays resident (its memory is written once, at a commit: the OS would write a
        shared mapping's changes to the disk every few seconds)."""
        o = self.offload
        dtype = torch.float32 if self.trainable else o.compute_dtype
        shared = self.trainable and not self.resident and o.run is not None and o.run.is_open_slot(self.file)
        # a frozen table that is only looked up: its pages come in as rows are read, not the whole table
        rows_only = self.looked_up and not self.trainable and self.grad_uses == 1
        direct = o.direct and not rows_only  # (read_image maps what map_tensors would: None, then neither does)
        stored = None if self.quant else dtype  # a quantized module's bytes as they are (load() dequantizes them)
        read = read_image(self.file, o.take_buffer, stored) if direct else None
        mapped = map_tensors(self.file, stored, shared, populate=not rows_only) \
            if o.device.type == "cpu" and not direct else None
        image = None
        if read is not None:
            data, (buffer, file_bytes, size) = read
            image, mapping, shared = Image(file_bytes, size, frozenset(data)), None, False
        elif mapped is None:  # converted on the way in, or bound for another device
            data, buffer = read_tensors(self.file, o.take_buffer, stored)
            mapping, shared = None, False
            if o.device.type != "cpu":
                buffer = None  # everything is moved to the device: the buffer is free again
        else:
            (data, mapping), buffer = mapped, None
        o.bytes["read"] += self.file.stat().st_size
        self.reads += 1
        if self.quant:  # the file's bytes as they are: load() dequantizes them
            weights = {k: data[k] for k in self.shapes}
            return weights, weights, {}, {}, buffer, None, None, False, None
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
        return weights, compute, optim, grads, buffer, compute_buffer, mapping, shared, image

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
            if o.cold and self.image is None:  # after its writes, the file leaves the page cache (its changes
                # reach the disk first) and its next read comes from the disk; after each use, not before each
                # read, as the OS writes back and evicts where the model does not fit
                o.io.submit(evict_from_page_cache, self.file)
            self.weights = self.compute = self.buffer = self.compute_buffer = self.mapping = self.image = None
            self.optim, self.mapped, self.dirty = {}, False, False  # a mapping closes once no view of it is left

    def _write_file(self, tensors, path, in_place=False):
        write_tensors(tensors, path, in_place)
        self.offload.bytes["written"] += sum(t.numel() * t.element_size() for t in tensors.values())

    def _write_image(self, image, path):
        write_image(image.data, image.size, path)
        self.offload.bytes["written"] += image.size

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
        elif self.image is None and o.device.type == "cpu" and not self.resident:  # into the slot (this
            # process's part), then mapped; an image read past the page cache is written whole when let go
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
            if self.image is not None and self.image.names == set(self.state()):  # (no optimizer state added since)
                self.writing = o.io.submit(o.timed, "writing", self._write_image, self.image, self.file)
            else:
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
