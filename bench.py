"""Training-step figures on synthetic checkpoints of real shapes (default_model.SHAPES: Llama 2 and 3, Gemma 3 27B,
Phi-4, Qwen3-30B-A3B, Mixtral 8x7B; random weights, Meta's format).

python bench.py --shape 7b --layers 8 [--mode full|lora] [--optimizer sgd|adamw] [--compute_dtype fp32|bf16]
                [--batch_size 2] [--seq_len 128] [--steps 3] [--memory_budget GB] [--cold] [--reference]
                [--keep_cache [--reuse_offload]] [--nproc N] [--base_copy 0|1] [--generate N]
                [--objective sft|dpo] [--examples_per_row N] [--warmup 1]
Checks the disk, makes the checkpoint in bench_cache/, converts it (timed), runs a warm-up and --steps timed
steps, prints a table and, last, JSON; what it made is removed at the end unless --keep_cache (then
--reuse_offload skips the conversion next time). --nproc N: N processes under torchrun (gloo), batch_size/N rows
each. --reference: plain in-memory autograd on the same batches in a child process, a step of it after each of
ours (after all with --nproc): ratio_vs_reference of the medians, ratio_paired the median of each step's ratio.
A mixture of experts adds what the steps read of its experts against what their tokens chose. --generate N:
N tokens generated after a prompt of --seq_len tokens, the bytes read a token against those of the parameters
a token uses. --cold: as where the page cache cannot hold the model (files read and written past it, O_DIRECT,
where the disk allows; else evicted after use). --objective dpo: DPO on --batch_size pairs (two rows each, the
loss on each row's second half; LoRA: the reference in the step's pass, full: given). --examples_per_row N: N
examples packed into each row (the block-diagonal mask). Every figure comes with the step's floors: its matmuls
at the probe's rate (compute_floor_s, the faster probe before or after the steps), its disk bytes at the disk's
rates measured first on a temporary file (disk_floor_s), and efficiency, the larger floor over the step (for
--generate: tokens/s against the disk's read rate over the bytes a token read from it).
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import finetune
import loader
from adapters import add_lora
from bench_reference import ReferenceRun, reference_child
from dpo import Objective
import default_model
from default_model import SHAPES, checkpoint, n_params, remove, shape_args
from plan import arithmetic_seconds, attention_flops, disk_speeds, matmul_params
from run_folder import RunFolder
from utils import (UserError, check_disk, cpu_has_bf16, cpu_name, main_guard, memory_budget_bytes,
                   parse_dtype, peak_rss_mb, proc_io)

HERE = Path(__file__).resolve().parent
DISK_PROBE_BYTES = 1 << 30  # the disk's rates are measured on a temporary file of this size
MATMUL_PROBE_S = 2.0  # seconds of matmuls at the step's shapes that rate the chip (each probe)


def make_batches(vocab, rows, seq_len, n, examples=1, dpo_reference=None):
    """n micro-batches (x, y, positions, DPO's reference) of random tokens, rows packing examples each; with
    dpo_reference ("given": random, "in_pass": None) the loss on each row's second half."""
    g = torch.Generator().manual_seed(0)
    positions = None if examples == 1 else (torch.arange(seq_len) % -(-seq_len // examples)).expand(rows, -1)
    batches = []
    for window in (torch.randint(0, vocab, (rows, seq_len + 1), generator=g) for _ in range(n)):
        y = window[:, 1:].clone()
        y[:, :seq_len // 2] = -1 if dpo_reference else y[:, :seq_len // 2]
        reference = -10 * seq_len * torch.rand(rows, generator=g) if dpo_reference == "given" else None
        batches.append((window[:, :-1], y, positions, reference))
    return batches


IO_KEYS = ("rchar", "wchar", "disk_read_bytes", "disk_write_bytes", "file_read_bytes", "file_write_bytes",
           "minor_faults")


def io_counters(model):
    """This process's bytes so far, in IO_KEYS' order: utils.proc_io's four, then the module file data
    read and written (reads through memory maps included, whether from the cache or the disk), then
    its page faults served without the disk (mostly fresh memory, which the kernel zeroes first)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return (*proc_io().values(), model.offload.bytes["read"], model.offload.bytes["written"], faults)


def cpu_seconds():
    """{user_cpu, kernel_cpu}: this process's CPU seconds so far, all threads, in its own code and in
    the kernel's (page faults and zeroing fresh memory, mapping files, reads and writes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_cpu": usage.ru_utime, "kernel_cpu": usage.ru_stime}


def seconds_so_far(model):
    return dict(model.offload.seconds, collective_wait=model.group.wait_s, **cpu_seconds())


def floors(io, compute_s, disk, step_s):
    """What bounds a step: the seconds of its matmuls (the recomputed forward passes of blocks included) at the
    probe's rates (compute_floor_s), and of its disk bytes at the disk's sequential rates, reads and writes one
    after the other on the one disk (disk_floor_s); efficiency: the larger floor over the step."""
    disk_s = io["disk_read_bytes"] / disk["disk_read"] + io["disk_write_bytes"] / disk["stream_write"]
    return {"disk_read_gbps": round(disk["disk_read"] / 1e9, 2),
            "disk_write_gbps": round(disk["stream_write"] / 1e9, 2), "compute_floor_s": round(compute_s, 2),
            "disk_floor_s": round(disk_s, 2), "efficiency": round(max(compute_s, disk_s) / step_s, 3)}


def run_steps(model, batches, lr, between=None, after=None, warmup=1):
    """Step times, {IO_KEYS: bytes or faults} per timed step and {Offload.seconds, collective_wait,
    user_cpu, kernel_cpu: s} per timed step (collective_wait: in a parallel run, waiting for the other
    processes), the first warmup steps untimed. between(): after each step, untimed (the reference's step);
    after(i): after step i (0: the warm-up)."""
    times = []
    for i, batch in enumerate(batches):
        if i == warmup:
            model.offload.wait()
            before, seconds = io_counters(model), seconds_so_far(model)
        start = time.perf_counter()
        model.train_step([batch], lr)
        times.append(time.perf_counter() - start)
        if after:
            after(i)
        if between:
            model.offload.wait()
            between()
    model.offload.wait()  # the last step's writes are done
    after, n = io_counters(model), len(batches) - warmup
    return times[warmup:], {key: (b - a) // n for key, a, b in zip(IO_KEYS, before, after)}, \
        {key: round((seconds_so_far(model)[key] - s) / n, 2) for key, s in seconds.items()}


def disk_needs(a, cached, offload, reuse):
    """What the run writes on the disk: [(what, folder, bytes)] for utils.check_disk."""
    n = n_params(a.shape, a.layers)
    full = a.mode == "full" and not a.generate
    run = n * (4 if a.optimizer == "sgd" else 12) if full else 0  # one slot: bench commits no step
    return [("source (cached)" if cached else "source", default_model.CACHE, 0 if cached else 2 * n),  # bf16
            ("offload (reused)" if reuse else "offload", offload.parent, 0 if reuse else 2 * n),
            ("run folder", default_model.CACHE / "run", run)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=SHAPES)
    p.add_argument("--layers", type=int, default=None, help="cut the depth to this many blocks")
    p.add_argument("--mode", default="full", choices=("full", "lora"))
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--compute_dtype", default="fp32", choices=("fp32", "bf16"))
    for name, default in (("batch_size", 2), ("seq_len", 128), ("steps", 3), ("keep_activations", 1), ("prefetch", 1),
                          ("warmup", 1)):  # (warmup: untimed steps first; 0 for long rows, one step timed)
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--memory_budget", type=float, default=None, help="GB (default: finetune.py's default)")
    p.add_argument("--base_quant", default="none", choices=("none", "q8_0", "q4_0"),
                   help="LoRA: the frozen base quantized at conversion (finetune.py's base_quant)")
    p.add_argument("--base_copy", type=int, default=-1, help="LoRA in fp32: finetune.py's base_copy (-1: when it fits)")
    p.add_argument("--cold", action="store_true", help="every module read from the disk (past the page cache)")
    p.add_argument("--reference", action="store_true", help="also time plain in-memory autograd (a child process)")
    p.add_argument("--keep_cache", action="store_true", help="keep what the run made in bench_cache/ (the source, "
                                                             "its offload, the run folder) for --reuse_offload")
    p.add_argument("--reuse_offload", action="store_true", help="use the offload a --keep_cache run kept")
    p.add_argument("--nproc", type=int, default=1, help="processes taking the steps together (torchrun, gloo)")
    p.add_argument("--generate", type=int, default=0, help="instead of training: tokens to generate after a prompt "
                                                              "of --seq_len tokens (bytes read a token)")
    p.add_argument("--objective", default="sft", choices=("sft", "dpo"), help="dpo: --batch_size pairs a step")
    p.add_argument("--examples_per_row", type=int, default=1, help="examples packed into each row")
    p.add_argument("--reference-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--parallel-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.layers = a.layers or SHAPES[a.shape]["n_layers"]
    if a.layers < 1 or a.steps < 1:
        raise UserError(f"--layers={a.layers}, --steps={a.steps}: both must be at least 1")
    a.optimizer = "adamw" if a.mode == "lora" else a.optimizer  # LoRA adapters are trained with AdamW
    if a.reference and (SHAPES[a.shape].get("family") or a.objective == "dpo" or a.examples_per_row > 1):
        raise UserError("--reference: the in-memory reference is the Llama family's cross-entropy of unpacked rows")
    if a.reference_child:
        return reference_child(a)
    if a.batch_size % a.nproc or a.nproc > 1 and a.objective == "dpo":
        raise UserError(f"--batch_size={a.batch_size} is not a multiple of --nproc={a.nproc} (--objective dpo: one)")
    a.rows = a.batch_size * (2 if a.objective == "dpo" else 1)

    source = default_model.CACHE / f"{a.shape}-{a.layers}L"
    offload_root, run_dir = default_model.CACHE / "offload", default_model.CACHE / "run"
    if a.parallel_worker:
        return parallel_worker(a, source, offload_root, run_dir)
    if a.base_quant != "none" and a.mode != "lora":
        raise UserError(f"--base_quant={a.base_quant} is for --mode lora")
    offload = loader.offload_dir_for(source, offload_root, a.base_quant)
    cached = (source / "params.json").exists()  # by an earlier --keep_cache run: used and kept
    reuse = a.reuse_offload and cached and (offload / "manifest.json").exists()
    made = [run_dir] + ([] if cached else [source]) + ([] if reuse else [offload])
    for path in [run_dir] if reuse else [run_dir, offload]:  # old ones are replaced: their space is free
        shutil.rmtree(path, ignore_errors=True)
    check_disk(disk_needs(a, cached, offload, reuse), lambda line: print(line, file=sys.stderr))
    try:
        checkpoint(a.shape, a.layers)
        result = run(a, source, offload_root, run_dir)
    finally:  # after the reference run, which reads the source
        if not a.keep_cache:
            remove(made)
            print(f"removed {', '.join(os.path.relpath(path, HERE) for path in made)} (--keep_cache keeps them)",
                  file=sys.stderr)
    print("\n".join(f"{key:26} {value}" for key, value in result.items()))
    print(json.dumps(result))


def load(a, source, offload_root):
    return loader.load_model(source, offload_path=offload_root, compute_dtype=parse_dtype(a.compute_dtype),
                             memory_budget=memory_budget_bytes(-1 if a.memory_budget is None else a.memory_budget),
                             prefetch=bool(a.prefetch), cold=a.cold, log=lambda *x: None, base_quant=a.base_quant)


class ExpertReads:
    """A mixture's experts in the timed steps: those read (files), those the steps' tokens chose."""

    def __init__(self, model):
        self.model, self.sparse = model, [box.experts for box in model.layers if box.experts]
        self.chosen, self.steps = 0, 0

    def counts(self):
        return [[e.reads for e in experts.boxes] for experts in self.sparse]

    def step(self, i):
        if i == 0:  # the warm-up: counted from its end
            self.reads = self.counts()
            return
        self.steps += 1
        self.chosen += sum(len(set().union(*map(set, experts.chosen))) for experts in self.sparse)

    def figures(self, file_read_bytes):
        """Per timed step: experts read per sparse block, bytes of expert files read, the bytes of the chosen
        experts (read by the forward and the backward pass), and all file bytes read against what the step had
        to read: the chosen experts twice, every other module as the memory plan streams it."""
        expert_bytes = self.sparse[0].boxes[0].file.stat().st_size
        read = sum(b - a for now, then in zip(self.counts(), self.reads) for b, a in zip(now, then)) / self.steps
        chosen = self.chosen / self.steps
        others = round(file_read_bytes - read * expert_bytes)
        return {"experts_chosen_per_block": round(chosen / len(self.sparse), 1),
                "experts_read_per_block": round(read / 2 / len(self.sparse), 1),  # (two passes)
                "expert_read_bytes_per_step": round(read * expert_bytes),
                "chosen_expert_bytes_per_step": round(2 * chosen * expert_bytes),
                "other_read_bytes_per_step": others,
                "read_vs_chosen": round(file_read_bytes / (2 * chosen * expert_bytes + others), 3)}


def train_figures(a, model, run_dir, group=None, between=None):
    """run_steps' figures of --steps timed steps after a warm-up (a mixture's: ExpertReads' too); in a parallel
    run, of this process's rows of each step."""
    processes, rank = (group.world, group.rank) if group else (1, 0)
    rows = a.rows // processes
    try:
        s = finetune.settings(mode=a.mode, optimizer=a.optimizer, lora_rank=8, lora_alpha=16.0, lora_dropout=0,
                              lora_targets="wq,wv")
        if a.mode == "lora":
            add_lora(model, s.lora)
        in_pass = a.mode == "lora" and not model.args.n_experts
        model.objective, model.packed_rows = Objective(0.1, 0.0, in_pass) if a.objective == "dpo" else None, \
            a.examples_per_row > 1
        model.setup_training(RunFolder(run_dir.parent, group), a.mode, s.optim, rows * a.seq_len,
                             keep_activations=bool(a.keep_activations), base_copy=a.base_copy,
                             log=lambda line: print(line, file=sys.stderr))
        model.train()
        batches = make_batches(model.args.vocab_size, a.rows, a.seq_len, a.steps + a.warmup, a.examples_per_row,
                               a.objective == "dpo" and ("in_pass" if in_pass else "given"))
        experts = ExpertReads(model) if model.args.n_experts and processes == 1 else None
        mine = lambda t: t if t is None else t[rank * rows:(rank + 1) * rows]  # this process's rows
        times, io, seconds = run_steps(model, [tuple(map(mine, b)) for b in batches], 1e-4, between,
                                       experts and experts.step, a.warmup)
        return times, io, seconds, experts and experts.figures(io["file_read_bytes"])
    finally:
        model.close()  # no write into the run folder is left when it is removed


def parallel_worker(a, source, offload_root, run_dir):
    """One process of a --nproc run (under torchrun); the first prints every process's figures as JSON."""
    import parallel
    group, _ = parallel.start("cpu", 600)
    try:
        model = load(a, source, offload_root)
        times, io, seconds, _ = train_figures(a, model, run_dir, group)
        figures = group.gather({"times": times, "io": io, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                                "planned_peak_mb": model.memory.peak / 2**20, "recomputed": model.recomputed})
    finally:
        group.close()
    if group.rank == 0:
        print(json.dumps(figures))


def parallel_steps(a):
    """--nproc: run the steps in a.nproc processes under torchrun; (times, io, seconds, figures of all):
    a step's time is the slowest process's, bytes are summed, seconds are the processes' mean."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // a.nproc))}
    argv = [arg for i, arg in enumerate(sys.argv[1:]) if not arg.startswith("--nproc") and  # torchrun would
            sys.argv[i] != "--nproc"]  # take it for its own --nproc_per_node; the workers know from WORLD_SIZE
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
                            __file__, "--parallel-worker", *argv], capture_output=True, text=True, cwd=HERE, env=env)
    if child.returncode:
        sys.exit(f"parallel run failed: {(child.stdout + child.stderr).strip()[-1500:]}")
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    times = [max(step) for step in zip(*(f["times"] for f in figures))]
    io = {key: sum(f["io"][key] for f in figures) for key in IO_KEYS}
    seconds = {key: round(statistics.mean(f["seconds"][key] for f in figures), 2) for key in figures[0]["seconds"]}
    return times, io, seconds, figures


def generation_figures(a, model, disk):
    """--generate: the bytes a generated token reads (module files; from the disk, the page cache aside) against
    the bytes of the parameters it uses (a block's attention, norms, router and top_k experts or its MLP, the
    output, a row of the embeddings), in the storage dtype; tokens per second, against the disk's floor (the bytes
    a token read from the disk at its read rate), the prompt's pass left out (generating 1 and 1 + N tokens)."""
    model.eval()
    prompt = make_batches(model.args.vocab_size, 1, a.seq_len, 1)[0][0][0].tolist()
    counts = []
    for n in (1, 1 + a.generate):
        model.offload.wait()
        before, start = io_counters(model), time.perf_counter()
        model.generate(prompt, n, stop_ids=())
        model.offload.wait()
        counts.append(([b - a for a, b in zip(before, io_counters(model))], time.perf_counter() - start))
    (one, one_s), (more, more_s) = counts
    per_token = {key: (b - a) // a_n for key, a, b, a_n in zip(IO_KEYS, one, more, [a.generate] * len(IO_KEYS))}
    args, unit = model.args, model.storage_dtype.itemsize
    expert = model.layers[0].experts.boxes[0].numel() if args.n_experts else 0
    active = sum(box.numel() + args.top_k * expert * bool(box.experts) for box in model.layers) + \
        model.norm.numel() + model.output.numel() * (not args.tied) + args.dim * (1 + args.tied * (args.vocab_size - 1))
    tokens_per_s, floor = a.generate / (more_s - one_s), disk["disk_read"] / max(1, per_token["disk_read_bytes"])
    model_bytes = sum(box.numel() for box in model.boxes.values())
    return {"prompt_tokens": a.seq_len, "generated": a.generate, "tokens_per_s": round(tokens_per_s, 3),
            "disk_read_gbps": round(disk["disk_read"] / 1e9, 2), "disk_floor_tokens_per_s": round(floor, 3),
            "efficiency": round(tokens_per_s / floor, 3),
            "file_read_bytes_per_token": per_token["file_read_bytes"], "peak_rss_mb": round(peak_rss_mb()),
            "planned_peak_mb": round(model.memory.peak / 2**20), "active_bytes_per_token": active * unit,
            "disk_read_bytes_per_token": per_token["disk_read_bytes"], "model_bytes": model_bytes * unit,
            "disk_read_vs_active": round(per_token["disk_read_bytes"] / (active * unit), 3)}


def run(a, source, offload_root, run_dir):
    """Convert, train and time; the figures, with the reference run's when asked."""
    args = shape_args(a.shape, a.layers)
    tokens = a.rows * a.seq_len
    in_pass = a.objective == "dpo" and a.mode == "lora" and not args.n_experts  # DPO's reference: a forward more
    flops_per_param = (6 if a.mode == "full" else 4) + 2 * in_pass
    os.sync()  # the checkpoint's writes reach the disk before anything is timed (the OS's writeback takes CPU)
    disk = disk_speeds(default_model.CACHE, DISK_PROBE_BYTES)  # where the offload and the run folder are
    # the step's matmuls timed at their shapes, before the model takes its memory (not counted in its peak)
    probe = lambda: arithmetic_seconds(args, tokens, flops_per_param, parse_dtype(a.compute_dtype),
                                       torch.device("cpu"), MATMUL_PROBE_S)
    matmul_s, rates = probe()
    start = time.perf_counter()
    model = load(a, source, offload_root)
    convert_s = time.perf_counter() - start
    os.sync()
    if a.generate:
        return {"cpu": cpu_name(), "shape": a.shape, "layers": a.layers, "compute_dtype": a.compute_dtype,
                "cold": a.cold, **generation_figures(a, model, disk)}
    reference = ReferenceRun() if a.reference else None
    experts = None
    if a.nproc > 1:
        times, io, seconds, figures = parallel_steps(a)
        peak_mb, planned_mb = max(f["peak_rss_mb"] for f in figures), max(f["planned_peak_mb"] for f in figures)
        for _ in range(a.steps + a.warmup if reference else 0):  # after the parallel run's steps, not between them
            reference.step()
    else:
        times, io, seconds, experts = train_figures(a, model, run_dir, between=reference and reference.step)
        peak_mb, planned_mb = peak_rss_mb(), model.memory.peak / 2**20
    recomputed = figures[0]["recomputed"] if a.nproc > 1 else model.recomputed
    matmul_s, rates = min((matmul_s, rates), probe())  # (the speed drifts: the faster probe is the floor)
    step_s = statistics.median(times)
    n = matmul_params(model.args)
    n_all = sum(box.numel() for box in model.boxes.values())
    # the blocks' forward passes the backward computes again (their graphs beyond the memory plan): 2 more FLOPs
    # per parameter and token of a block each
    base_flops = flops_per_param * n * tokens
    flops = base_flops + 2 * (n - args.vocab_size * args.dim) // args.n_layers * tokens * recomputed
    compute_s = matmul_s * flops / base_flops
    attention = attention_flops(args, tokens, a.seq_len)  # of a forward pass, not in flops (matmuls of weights)
    min_bytes = 2 * n_all * (4 if a.optimizer == "sgd" else 12) if a.mode == "full" else n_all * 2
    result = {"cpu": cpu_name(), "bf16_native": cpu_has_bf16(),
              "shape": a.shape, "layers": a.layers, "mode": a.mode, "optimizer": a.optimizer, "base_quant": a.base_quant,
              "objective": a.objective, "examples_per_row": a.examples_per_row,
              "compute_dtype": a.compute_dtype, "tokens_per_step": tokens, "convert_s": round(convert_s, 2),
              "step_s_median": round(step_s, 3), "tokens_per_s": round(tokens / step_s, 2),
              "processes": a.nproc, "threads": max(1, (os.cpu_count() or 1) // a.nproc) if a.nproc > 1 else
              torch.get_num_threads(), "peak_rss_mb": round(peak_mb), "planned_peak_mb": round(planned_mb),
              **{f"{key}_per_step": value for key, value in io.items()}, "min_bytes_per_step": min_bytes,
              **{f"{key}_s": value for key, value in seconds.items()},
              "flops_per_step": flops, "achieved_gflops": round(flops / step_s / 1e9, 1),
              "gemm_gflops": round(rates[0] / 1e9, 1),
              "recomputed_blocks": recomputed, "matmul_share": round(compute_s / step_s, 2),
              "attention_share_of_forward": round(attention / (attention + base_flops * 2 / flops_per_param), 3),
              "inputs_kept_in_memory": model.memory.kept_inputs,
              **floors(io, compute_s, disk, step_s),
              "cold": a.cold, "step_s_all": [round(t, 3) for t in times]}
    if a.nproc > 1:  # peaks per process (shared mapped pages count in each), and the time waited for the others
        result.update(peak_rss_mb_each=[round(f["peak_rss_mb"]) for f in figures],
                      collective_wait_share=round(seconds["collective_wait"] / step_s, 3))
    if experts:
        result.update(experts)
    if reference:
        figures = reference.figures()
        result.update(figures, ratio_vs_reference=round(step_s / figures["reference_step_s"], 3))
        if a.nproc == 1:  # each of our steps against the reference's step right after it
            result["ratio_paired"] = round(statistics.median(
                ours / theirs for ours, theirs in zip(times, figures["reference_step_s_all"])), 3)
    return result


if __name__ == "__main__":
    main_guard(main)
