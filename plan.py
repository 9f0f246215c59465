"""python finetune.py --plan=1 [settings]: what a run will cost on this machine, before anything is written.

Measures this machine for a few seconds (the disk where the step's files live: a temporary file of --plan_mb MB
written with fsync, read back from the page cache and, after evicting it, from the disk, overwritten with O_DIRECT,
then deleted; the device's matmul rate at the model's block shapes) and prints, for the model and the settings
given: seconds per step, the memory plan, the time for the run, the disk space and the bytes the run will write.
Writes nothing (but the built-in model, made in models/ on first use as by every command): the shapes come from the
offload folder when converted, else from the source (params.json, config.json or the GGUF's metadata, the tensor
headers, memory-mapped). The memory plan is training's (model.setup_training, in a temporary folder, removed).

The model of a step: full fine-tuning keeps each module's fp32 working copy (with AdamW, weights and two moments)
in out_path/run; a step reads each module that is not resident about twice (the forward pass, then the backward
pass; the last block and the embeddings once) and writes it once. LoRA reads the frozen base (the offload's files:
the source's dtype, or base_quant's blocks) about twice and writes nothing. Arithmetic: 6 FLOPs per matmul
parameter per token, 2 in the forward pass and 4 in the backward (LoRA: 4, 2 and 2: no weight gradients), and
attention's quadratic share at the same rate. Reading ahead and writing behind overlap with the arithmetic, so each
pass takes the slower of its arithmetic and its disk traffic (step_seconds); the forward pass, with a third of the
arithmetic and half of the reads, is the first to wait for the disk. On the CPU the I/O's memory copies (page cache
to module buffers and back) take their time from the arithmetic: they are counted with it.

Warm or cold: the files a step reads were written (or read) one step before. When they fit in the page cache (the
RAM the run leaves free: MemAvailable now minus the run's planned peak), the reads come from memory and the writes
drain to the disk in the background at the streaming write speed: "warm". When they do not, the run reads and writes
its modules past the page cache (O_DIRECT), every read from the disk: "cold" (as bench.py --cold). The plan prints
both and counts the run at the one that applies.

How close the plan comes to bench.py's measured steps is in docs/performance.md.
"""
import json
import math
import mmap
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import gguf_source
import quant
from adapters import add_lora, base_copy_bytes
from architectures import read_config
from blackbox_model import Transformer
from data import packs_examples
from dpo import objective_for
from default_model import default_model
from files import direct_read_speed, evict_from_page_cache
from model import module_names, module_shapes
from loader import (FORMAT, check_base_quant, fingerprint, layout_of, offload_bytes, offload_dir_for, read_manifest,
                    source_files, source_path)
from meta_format import model_args, read_source
from rope import check_positions
from run_folder import RunFolder
from utils import (check_device, choose_compute_dtype, dtype_name, duration, existing_folder, gb, matmul_rate,
                   parse_dtype)

MATMUL_PROBE_S = 2.0  # how long --plan=1 times the step's matmuls to rate the device (longer: steadier)

# --- the model without converting it ---

def planning_model(s, log=lambda *a: None):
    """(model, converted): a Transformer with the run's shapes and memory budget, made from the offload
    folder's manifest when the model is converted already, else from the source folder (nothing written)."""
    device = check_device(s.device)
    compute_dtype = choose_compute_dtype(s.compute_dtype, device, log)
    check_base_quant(s.model_path or default_model(), s.base_quant)
    source = source_path(s.model_path or default_model())
    fp = fingerprint(source)  # also: the folder and its config exist
    folder = offload_dir_for(source, s.offload_path or None, s.base_quant)
    manifest = read_manifest(folder)
    converted = bool(manifest and manifest.get("format") == FORMAT and manifest.get("fingerprint") == fp)
    keys = manifest["keys"] if converted else None  # the stored kinds: block formats count as their blocks
    if converted:
        args = model_args(manifest["params"], manifest["vocab_size"])
    elif layout_of(source) == "gguf":
        args, keys = gguf_source.stored_kinds(source_files(source), s.base_quant)
    elif layout_of(source) == "hf":
        params, config = read_config(source)
        args = model_args(params, params["vocab_size"])
        storage = parse_dtype(config.get("torch_dtype") or "bfloat16")
    else:
        _, args, _, first = read_source(source)
        storage = first["tok_embeddings.weight"].dtype
        del first
    if keys is None:  # as the conversion will store them
        keys = [[f"{name}.{key}", quant.kinds_at_conversion(args, name, s.base_quant).get(key, dtype_name(storage))]
                for name in module_names(args) for key in module_shapes(args, name)]
    storage = quant.float_dtype(dict(keys)["tok_embeddings.weight"])
    manifest = {"source": str(source), "fingerprint": fp, "keys": keys}
    check_positions(args, s.data.seq_len, source)
    model = Transformer(args, folder, manifest, None, storage, device, compute_dtype, s.memory_budget_bytes(),
                        s.dropout)
    model.source_bytes = 0 if converted else offload_bytes(source, s.base_quant)
    return model, converted


def plan_memory(model, s):
    """The memory plan training makes (setup_training), in a temporary run folder that is removed."""
    if s.mode == "lora":
        add_lora(model, s.lora, s.seed)
    model.objective, model.packed_rows = objective_for(s, model), packs_examples(s.data)
    with tempfile.TemporaryDirectory(prefix="slowllama-plan-") as tmp:
        model.setup_training(RunFolder(tmp), s.mode, s.optim, s.data.micro_batch_tokens, s.data.grad_accum,
                             s.keep_activations, base_copy=0)


# --- measuring this machine ---

def disk_speeds(folder, nbytes):
    """Bytes/s of a temporary file of nbytes in folder, removed after: write (written, then fsync: what
    reaches the disk when each write must be on it before it is read back), cache_read (read back from
    the page cache), disk_read (from the disk, after evicting it: through the page cache, or past it in one
    request where that is faster: the cold runs read so), stream_write (overwritten in place
    with O_DIRECT: what the background writeback of a run sustains, without a flush after each file;
    the fsync figure where O_DIRECT is not supported). Reads go into one buffer, as module reads do."""
    path = existing_folder(folder) / f".slowllama-plan-{os.getpid()}.tmp"
    size = min(nbytes, 32 << 20)
    chunk = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    chunk.write(np.random.default_rng(0).bytes(size))
    view = memoryview(chunk)
    speeds = {}
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            written = 0
            while written < nbytes:
                written += f.write(view[:nbytes - written])
            os.fsync(f.fileno())
        speeds["write"] = nbytes / (time.perf_counter() - start)
        for key in ("cache_read", "disk_read"):
            if key == "disk_read":
                evict_from_page_cache(path)
            start = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                while f.readinto(view):
                    pass
            speeds[key] = nbytes / (time.perf_counter() - start)
        speeds["stream_write"] = speeds["write"]
        try:
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = None
        if fd is not None and hasattr(os, "O_DIRECT"):
            try:
                start, written = time.perf_counter(), 0
                while written < nbytes:
                    written += os.write(fd, view[:nbytes - written])
                os.fdatasync(fd)
                speeds["stream_write"] = max(speeds["write"], nbytes / (time.perf_counter() - start))
            except OSError:  # O_DIRECT refused (the file system, the alignment): the fsync figure
                pass
            finally:
                os.close(fd)
        elif fd is not None:
            os.close(fd)
        speeds["disk_read"] = max(speeds["disk_read"], direct_read_speed(path, nbytes))
    finally:
        view.release()
        chunk.close()
        path.unlink(missing_ok=True)
    return speeds


def matmul_params(args):
    """Parameters of the matmuls a token passes through: every block's matrices (of a mixture's sparse block,
    attention, the router and top_k experts) and the output."""
    return sum(n for n, _, _ in matmul_parts(args, 1))


def matmul_parts(args, tokens):
    """[(parameters a token passes through, their (out, in) shapes, the rows a matmul of them gets)] of tokens:
    the blocks' matrices and the output at every token; a mixture's experts at the tokens each gets where the
    router spreads them evenly (tokens * top_k / experts: small matmuls, far below the rate of the others)."""
    blocks = sum(math.prod(s) for i in range(args.n_layers) for s in module_shapes(args, f"layers.{i}").values()
                 if len(s) == 2)
    parts = [(blocks + args.vocab_size * args.dim, block_matmul_shapes(args), tokens)]
    if args.n_experts:
        expert = list(module_shapes(args, "layers.0.experts.0").values())
        n = args.top_k * sum(map(math.prod, expert)) * sum(map(args.sparse, range(args.n_layers)))
        parts.append((n, expert, max(1, tokens * args.top_k // args.n_experts)))
    return parts


def attention_flops(args, tokens, row_tokens):
    """FLOPs of attention's scores and weighted values in one forward pass of tokens in rows of row_tokens: each
    query against the keys before it (within a sliding window where a block has one), in every block."""
    keys = lambda window: sum(min(t + 1, window or t + 1) for t in range(row_tokens)) / max(1, row_tokens)
    return sum(4 * tokens * keys(args.window(i)) * args.n_heads * args.head_dim for i in range(args.n_layers))


def arithmetic_seconds(args, tokens, flops_per_param, dtype, device, probe_s):
    """(seconds of the matmuls of tokens at flops_per_param FLOPs per parameter and token, [FLOP/s of each of
    matmul_parts]), each part's rate measured at its shapes and rows."""
    parts = matmul_parts(args, tokens)
    rates = [matmul_rate(shapes, rows, dtype, device, probe_s) for _, shapes, rows in parts]
    return sum(flops_per_param * n * tokens / rate for (n, _, _), rate in zip(parts, rates)), rates


def block_matmul_shapes(args):
    """The (out, in) shapes of the first block's matrices: what matmul_rate is measured at."""
    return [s for s in module_shapes(args, "layers.0").values() if len(s) == 2]


# --- the figures ---

def step_traffic(model, s, base_copy=0):
    """(bytes read by the forward pass, by the backward pass, bytes written) of one step, from the memory
    plan (modules that stay resident move nothing). The forward pass reads each streamed file once: the
    step's working set, and what each of an evaluation's passes reads. base_copy: LoRA reads an fp32 copy.
    A mixture's experts count as if every one were chosen in every block (the worst case: a step reads and
    writes only those its tokens choose)."""
    full = s.mode == "full"
    size = lambda box: 0 if box.resident else file_bytes(model, s, box, base_copy)
    ends = list(dict.fromkeys([model.embeddings, model.output]))  # one table when tied
    experts = sum(size(e) for box in model.layers if box.experts for e in box.experts.boxes)  # as if every one
    forward = sum(map(size, ends)) + sum(map(size, model.layers)) + experts  # were chosen: the worst case
    backward = sum(map(size, model.layers[:-1])) + experts  # the last block is kept from the forward pass
    writes = forward if full else 0  # each changed module once, the embeddings and output included
    if full and s.optim.grad_clip:  # gradients wait on disk for the norm; a third pass applies them
        grads = sum(0 if box.resident else 4 * box.numel() for box in model.boxes.values())
        backward, writes = backward + forward + grads, writes + grads
    return forward, backward, writes


def file_bytes(model, s, box, base_copy=0):
    """Bytes of a module's file a step reads: its fp32 working copy (and AdamW's moments), LoRA's fp32 copy of the
    base, or the offload's (a quantized base's matrices as their blocks)."""
    full = s.mode == "full"
    return box.numel() * 4 * (1 + model.optimizer.states * full) if full or base_copy else model.file_bytes(box)


def step_seconds(compute_s, forward_share, reads_forward, reads_backward, writes, speeds, copies_share_cpu):
    """Seconds of a step's parts and of the step, warm and cold: in each pass, the slower of its arithmetic and
    its disk traffic (reading ahead and writing behind overlap with the arithmetic). The forward pass has
    forward_share of the arithmetic (2 of 6 FLOPs per parameter and token; 2 of 4 for LoRA) and reads every
    streamed module; the backward pass reads them again and writes them.
    copies_share_cpu (device cpu): the arithmetic uses every core, so the memory copies of the I/O (from the
    page cache into the module buffers, into the page cache when writing) take their time from it: they are
    added to the arithmetic, at the page-cache speed.
    Warm: reads come from the page cache, and the writes drain to the disk in the background through both
    passes (the page cache holds them): the step is at least writes / stream_write speed.
    Cold: the page cache cannot hold the streamed modules, so the run reads and writes them past it (O_DIRECT):
    the disk serves every read, and the backward pass's disk time is its reads and its writes at the streaming
    write speed, one after the other (one disk)."""
    cache, disk = speeds["cache_read"], speeds["disk_read"]
    t = {"forward_s": compute_s * forward_share + (reads_forward / cache if copies_share_cpu else 0),
         "backward_s": compute_s * (1 - forward_share) + ((reads_backward + writes) / cache if copies_share_cpu else 0),
         "drain_s": writes / speeds["stream_write"], "cold_forward_disk_s": reads_forward / disk,
         "cold_backward_disk_s": reads_backward / disk + writes / speeds["stream_write"]}
    t["warm_forward_s"], t["warm_backward_s"] = max(t["forward_s"], reads_forward / cache), \
        max(t["backward_s"], reads_backward / cache)
    t["warm_step_s"] = max(t["warm_forward_s"] + t["warm_backward_s"], t["drain_s"])
    t["cold_step_s"] = max(t["forward_s"], t["cold_forward_disk_s"]) + max(t["backward_s"], t["cold_backward_disk_s"])
    return t


def n_evaluations(s, first_step):
    if not s.eval_period:
        return 0
    return (first_step == 0) + sum(1 for i in range(first_step + 1, s.iters) if i % s.eval_period == 0) + 1


def tb(nbytes):
    return f"{nbytes / 1e12:.1f} TB" if nbytes >= 1e12 else gb(nbytes)


def plan(s, disk_needs, out=print):
    """Measure, compute and print the plan of a run of settings s; returns its figures (also printed last as
    JSON)."""
    model, converted = planning_model(s)
    try:
        plan_memory(model, s)
    finally:
        model.close()
    previous = RunFolder(s.out_path).read_manifest() if s.resume else None
    first_step = previous["step"] if previous else 0
    steps = max(0, s.iters - first_step)
    full = s.mode == "full"
    needs = disk_needs(model, s)
    base_copy = 0 if full else base_copy_bytes(model, s.base_copy, needs[0][2], existing_folder(s.out_path))
    traffic_dir = Path(s.out_path) if full or base_copy else model.offload_dir
    speeds = disk_speeds(traffic_dir, s.plan_mb << 20)
    tokens = s.data.micro_batch_tokens
    tokens_per_step = tokens * s.data.grad_accum
    reference = 2 * bool(model.objective and model.objective.reference_in_pass)  # DPO's reference: a forward more
    per_param = (6 if full else 4) + reference
    flops = per_param * matmul_params(model.args) * tokens_per_step
    compute_s, rates = arithmetic_seconds(model.args, tokens, per_param, model.compute_dtype, model.device,
                                          MATMUL_PROBE_S)
    compute_s *= s.data.grad_accum
    rate = flops / compute_s
    # attention's quadratic share at the matmuls' rate: a forward pass and the backward's two (LoRA too)
    attention = attention_flops(model.args, tokens_per_step, s.data.seq_len) * 3
    flops, compute_s = flops + attention, compute_s + attention / rate
    reads_forward, reads_backward, writes = step_traffic(model, s, base_copy)
    reads, working_set = reads_forward + reads_backward, reads_forward
    peak = model.memory.peak
    cache_room = model.page_cache_room()
    forward_share = (2 + reference) / per_param
    copies_share_cpu = model.device.type == "cpu" and not base_copy  # LoRA's fp32 copy is mapped: no copies
    t = step_seconds(compute_s, forward_share, reads_forward, reads_backward, writes, speeds, copies_share_cpu)
    warm = working_set <= cache_room
    step_s = t["warm_step_s"] if warm else t["cold_step_s"]
    n_evals = n_evaluations(s, first_step)
    # each generated token streams the whole model once (a mixture: of each block only the top_k experts)
    passes = s.gen_tokens + (s.data.val_fraction > 0)
    experts = sum(file_bytes(model, s, e, base_copy) for box in model.layers if box.experts for e in box.experts.boxes)
    unchosen = experts * (1 - model.args.top_k / max(1, model.args.n_experts))
    eval_s = (passes * working_set - s.gen_tokens * unchosen) / speeds["cache_read" if warm else "disk_read"]
    total_s = steps * step_s + n_evals * eval_s
    if base_copy:
        needs.insert(1, ("fp32 copy of the base (LoRA; removed at the end)", Path(s.out_path) / "run", base_copy))
    if not converted:
        needs = [("offload (conversion, once)", model.offload_dir.parent, model.source_bytes)] + needs
    n_commits = steps // s.save_period + 1
    resident_writes = sum(box.numel() * 4 * (1 + model.optimizer.states) for box in model.boxes.values()
                          if box.resident) if full else 0
    run_writes = steps * writes + n_commits * resident_writes + sum(n for what, _, n in needs if what != "run folder")
    n_resident, spilled = sum(box.resident for box in model.boxes.values()), model.args.n_layers - model.memory.kept_inputs
    n_params = sum(box.numel() for box in model.boxes.values())

    figures = {"params": n_params, "mode": s.mode, "optimizer": model.optimizer.kind,
               "compute_dtype": dtype_name(model.compute_dtype), "tokens_per_step": tokens_per_step,
               "steps": steps, "disk_folder": str(existing_folder(traffic_dir)), "probe_bytes": s.plan_mb << 20,
               "write_bps": speeds["write"], "stream_write_bps": speeds["stream_write"],
               "disk_read_bps": speeds["disk_read"], "copies_share_cpu": copies_share_cpu,
               "cache_read_bps": speeds["cache_read"], "matmul_flops": rate, "matmul_params": matmul_params(model.args),
               "flops_per_step": flops, "compute_s": compute_s, "forward_share": forward_share, "read_bytes_per_step": reads,
               "forward_read_bytes": reads_forward, "backward_read_bytes": reads_backward,
               "write_bytes_per_step": writes, "working_set_bytes": working_set, "cache_room_bytes": cache_room,
               "warm": warm, "warm_step_s": t["warm_step_s"], "cold_step_s": t["cold_step_s"], "step_s": step_s,
               "evaluations": n_evals, "eval_s": eval_s, "total_s": total_s, "peak_ram_bytes": peak,
               "inputs_kept_in_memory": model.memory.kept_inputs,
               "resident_modules": n_resident, "modules": len(model.boxes), "converted": converted,
               "disk_space_bytes": sum(n for _, _, n in needs), "run_write_bytes": run_writes, "base_copy_bytes": base_copy}

    source = Path(model.manifest["source"])
    count = f"{n_params / 1e9:.2f} B" if n_params >= 1e9 else f"{n_params / 1e6:.1f} M"
    out(f"plan: {source.name} ({count} parameters, {model.args.n_layers} blocks), mode={s.mode}, "
        f"optimizer={figures['optimizer']}, compute {figures['compute_dtype']} on {model.device.type}, "
        f"{tokens_per_step} tokens a step (batch_size {s.data.batch_size} x seq_len {s.data.seq_len} x grad_accum "
        f"{s.data.grad_accum}), {steps} steps{f' (from step {first_step})' if first_step else ''}")
    out(f"measured: disk in {figures['disk_folder']} (a {gb(figures['probe_bytes'])} file, deleted): write "
        f"{speeds['write'] / 1e9:.2f} GB/s with fsync, {speeds['stream_write'] / 1e9:.2f} GB/s streaming (O_DIRECT); "
        f"read {speeds['disk_read'] / 1e9:.2f} GB/s from the disk, {speeds['cache_read'] / 1e9:.2f} GB/s from the page "
        f"cache; matmul {rates[0] / 1e9:.1f} GFLOP/s ({figures['compute_dtype']}, the block shapes at {tokens} tokens)"
        + (f", {rates[1] / 1e9:.1f} GFLOP/s for the experts (at {matmul_parts(model.args, tokens)[1][2]} tokens each, "
           "as if spread evenly)" if len(rates) > 1 else ""))
    streamed = "the run folder (the fp32 working copy" + (" and AdamW moments" if model.optimizer.states else "") \
        + ")" if full else "the run folder (an fp32 copy of the frozen base, made once)" if base_copy else \
        "the offload folder (the frozen base, dequantized at every read)" if any(b.quant for b in model.boxes.values()) \
        else "the offload folder (the frozen base, converted to fp32 at every read)" if model.compute_dtype != \
        model.storage_dtype else "the offload folder (the frozen base)"
    if model.args.n_experts:
        out(f"a mixture of {model.args.n_experts} experts, {model.args.top_k} a token: the reads and writes below "
            "count every expert of every block (the worst case; a step moves only those its tokens choose), the "
            f"arithmetic {model.args.top_k} experts a token")
    out(f"memory: about {gb(peak)} of RAM at peak (memory_budget {model.memory_budget / 2**30:.1f} GiB); "
        f"{n_resident} of {len(model.boxes)} modules stay in memory"
        + (f", the others are streamed from {streamed}" if n_resident < len(model.boxes) else ": nothing is streamed")
        + (f"; the inputs of {spilled} blocks wait on disk through a step" if spilled else ""))
    out(f"per step: {flops / 1e12:.2f} TFLOP ({per_param} per matmul parameter per token) = {compute_s:.1f} s "
        f"of arithmetic ({forward_share * compute_s:.1f} s forward, {(1 - forward_share) * compute_s:.1f} s backward); "
        f"reads {gb(reads_forward)} forward + {gb(reads_backward)} backward = {gb(reads)}, writes {gb(writes)}")
    cr, dr, sw = speeds["cache_read"], speeds["disk_read"], speeds["stream_write"]
    fwd_s, bwd_s = t["forward_s"], t["backward_s"]
    if copies_share_cpu:
        out(f"  on the CPU the I/O's memory copies take time from the arithmetic: forward {fwd_s:.1f} s "
            f"(+ {gb(reads_forward)} / {cr / 1e9:.2f} GB/s), backward {bwd_s:.1f} s "
            f"(+ {gb(reads_backward + writes)} / {cr / 1e9:.2f} GB/s)")
    out(f"  warm (reads from the page cache): forward {t['warm_forward_s']:.1f} s + backward "
        f"{t['warm_backward_s']:.1f} s = {t['warm_forward_s'] + t['warm_backward_s']:.1f} s; the writes drain to the "
        f"disk meanwhile: {gb(writes)} / {sw / 1e9:.2f} GB/s = {t['drain_s']:.1f} s -> {t['warm_step_s']:.1f} s/step")
    out(f"  cold (past the page cache):       forward max({fwd_s:.1f} s, {gb(reads_forward)} / {dr / 1e9:.2f} GB/s = "
        f"{t['cold_forward_disk_s']:.1f} s) + backward max({bwd_s:.1f} s, {gb(reads_backward)} / {dr / 1e9:.2f} GB/s + "
        f"{gb(writes)} / {sw / 1e9:.2f} GB/s = {t['cold_backward_disk_s']:.1f} s) -> {t['cold_step_s']:.1f} s/step")
    fit = f"the {gb(working_set)} the step reads {'fit' if warm else 'do not fit'} in the page cache " \
          f"({gb(max(0, cache_room))} of RAM free beside the run's peak)"
    bound = "arithmetic" if step_s <= (fwd_s + bwd_s) * 1.001 else "disk"
    out(f"  this run: {'warm' if warm else 'cold'}: {fit}; {bound}-bound, {step_s:.1f} s/step, "
        f"{tokens_per_step / step_s:.1f} tokens/s")
    out(f"time: {steps} steps x {step_s:.1f} s = {duration(steps * step_s)}"
        + (f", {n_evals} evaluations x {eval_s:.0f} s ({passes} passes over the model each)" if n_evals else "")
        + f"; about {duration(total_s)} in all")
    disks = {}  # st_dev -> [a folder on it, bytes needed]
    for _, where, n in needs:
        folder = existing_folder(where)
        disks.setdefault(os.stat(folder).st_dev, [folder, 0])[1] += n
    out("disk space: " + ", ".join(f"{what} {gb(n)} ({where})" for what, where, n in needs) + "; free: "
        + ", ".join(f"{gb(shutil.disk_usage(folder).free)} on the disk of {folder}" for folder, _ in disks.values()))
    for folder, need in disks.values():
        if need > shutil.disk_usage(folder).free:
            out(f"  not enough: the disk of {folder} needs {gb(need)}; the run would be refused there")
    out(f"SSD: the run writes {tb(run_writes)}"
        + (f" ({tb(steps * writes)} over {steps} steps: {gb(writes)} a step, the working copy rewritten)"
           if full else " (LoRA writes no weights during steps: adapters and checkpoints only)")
        + ("" if converted else "; the conversion's share is written once per model"))
    out(json.dumps(figures))
    return figures
