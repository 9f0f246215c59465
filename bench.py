"""Training-step figures on synthetic checkpoints of real Llama shapes (random weights, Meta's format).

python bench.py --shape 7b --layers 8 [--mode full|lora] [--optimizer sgd|adamw] [--compute_dtype fp32|bf16]
                [--batch_size 2] [--seq_len 128] [--steps 3] [--memory_budget GB] [--cold] [--reference]
                [--reuse_offload]
Makes (once, in bench_cache/) the checkpoint, converts it into a fresh offload (timed), runs one warm-up
and --steps timed training steps in this process, and prints a table and, as the last line, JSON.
"""
import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import loader
from blackbox_model import module_shapes
from utils import FILE_BYTES, evict_from_page_cache, io_bytes, parse_dtype, peak_rss_mb

HERE = Path(__file__).resolve().parent
CACHE = HERE / "bench_cache"
SHAPES = {  # params.json of the real models; 1b is a 7B-like model cut to dim 2048
    "tiny": {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 64, "ffn_dim_multiplier": 1.3},
    "1b": {"dim": 2048, "n_layers": 16, "n_heads": 16, "multiple_of": 256},
    "7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256},
    "13b": {"dim": 5120, "n_layers": 40, "n_heads": 40, "multiple_of": 256},
    "70b": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096, "ffn_dim_multiplier": 1.3},
}
SHARDS = {"tiny": 2, "1b": 1, "7b": 1, "13b": 2, "70b": 8}


def checkpoint(shape, layers):
    """The synthetic model folder, made in a child process the first time (so its memory is not counted)."""
    path = CACHE / f"{shape}-{layers}L"
    if not (path / "params.json").exists():
        code = ("import sys, json, default_model as d; d.make_model(sys.argv[1], json.loads(sys.argv[2]), "
                "d.train_tokenizer(d.DEFAULT_TEXT, 32000, 31500), int(sys.argv[3]))")
        params = {**SHAPES[shape], "n_layers": layers, "norm_eps": 1e-5, "vocab_size": -1}
        start = time.time()
        subprocess.run([sys.executable, "-c", code, str(path), json.dumps(params), str(SHARDS[shape])], check=True, cwd=HERE)
        print(f"made {path} in {time.time() - start:.0f} s", file=sys.stderr)
    return path


def make_batches(vocab, batch_size, seq_len, n):
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g) for _ in range(n)]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def matmul_params(args):
    block = sum(math.prod(s) for s in module_shapes(args, "layers").values() if len(s) == 2)
    return args.n_layers * block + args.vocab_size * args.dim  # the output projection; embeddings are a lookup


def gemm_gflops(args, tokens, dtype, repeats=3):
    """GFLOP/s of the step's three matmul kinds (y = x W^T, dx = dy W, dW = dy^T x) on this model's shapes."""
    flops, seconds = 0, 0.0
    for key, shape in module_shapes(args, "layers").items():
        if len(shape) != 2:
            continue
        n_out, n_in = shape
        w, x, dy = torch.randn(n_out, n_in, dtype=dtype), torch.randn(tokens, n_in, dtype=dtype), \
            torch.randn(tokens, n_out, dtype=dtype)
        for f in (lambda: x @ w.t(), lambda: dy @ w, lambda: dy.t() @ x):
            f()
            start = time.perf_counter()
            for _ in range(repeats):
                f()
            seconds += time.perf_counter() - start
            flops += 2 * tokens * n_in * n_out * repeats
    return flops / seconds / 1e9


def disk_read_gbps(path):
    evict_from_page_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    return path.stat().st_size / (time.perf_counter() - start) / 1e9


def run_steps(model, batches, lr):
    """Step times and bytes per step: (logical reads, writes) from /proc/self/io, and the module file data
    read and written (which also counts reads through memory maps, invisible to /proc/self/io)."""
    times = []
    for i, batch in enumerate(batches):
        if i == 1:  # after the warm-up
            model.io.submit(lambda: None).result()
            before = (*io_bytes(), FILE_BYTES["read"], FILE_BYTES["written"])
        start = time.perf_counter()
        model.train_step([batch], lr)
        times.append(time.perf_counter() - start)
    model.io.submit(lambda: None).result()  # the last step's writes are done
    after = (*io_bytes(), FILE_BYTES["read"], FILE_BYTES["written"])
    return times[1:], [(b - a) // (len(batches) - 1) for a, b in zip(before, after)]


def reference_child(a):
    """Plain in-memory autograd on the same weights, batches and dtype: (median step s, peak RSS MB)."""
    from reference import Reference, add_adapters, read_meta_folder
    import torch.nn.functional as F
    weights, params = read_meta_folder(checkpoint(a.shape, a.layers), mmap=True)
    model = Reference(weights, params)
    trained = model.parameters()
    if a.mode == "lora":  # the same adapters as the offloaded run: rank 8 on wq and wv, AdamW
        model.requires_grad_(False)
        adapters = {k: (torch.randn(8, w.shape[1]) * 0.01, torch.zeros(w.shape[0], 8)) for k, w in weights.items()
                    if k.endswith(("wq.weight", "wv.weight"))}
        trained = add_adapters(model, adapters, alpha=16.0, dropout=0.0)
    del weights
    opt = torch.optim.SGD(trained, lr=1e-4) if a.optimizer == "sgd" and a.mode == "full" else \
        torch.optim.AdamW(trained, lr=1e-4)
    times = []
    for x, y in make_batches(model.tok_embeddings.num_embeddings, a.batch_size, a.seq_len, a.steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.compute_dtype == "bf16"):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"reference_step_s": statistics.median(times[1:]), "reference_peak_rss_mb": peak_rss_mb()}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=SHAPES)
    p.add_argument("--layers", type=int, default=None, help="cut the depth to this many blocks")
    p.add_argument("--mode", default="full", choices=("full", "lora"))
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--compute_dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--memory_budget", type=float, default=None, help="GB (default: finetune.py's default)")
    p.add_argument("--keep_activations", type=int, default=1)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--cold", action="store_true", help="evict every offloaded file from the page cache before reading it")
    p.add_argument("--reference", action="store_true", help="also time plain in-memory autograd in a child process")
    p.add_argument("--reuse_offload", action="store_true",
                   help="keep the offload of an earlier run of this shape (conversion not timed; saves disk and time)")
    p.add_argument("--reference-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.layers = a.layers or SHAPES[a.shape]["n_layers"]
    a.optimizer = "adamw" if a.mode == "lora" else a.optimizer  # LoRA adapters are trained with AdamW
    if a.reference_child:
        return reference_child(a)

    source = checkpoint(a.shape, a.layers)
    offload_root = CACHE / "offload"
    if not a.reuse_offload:  # a fresh conversion of this source, timed
        shutil.rmtree(loader.offload_dir_for(source, offload_root), ignore_errors=True)
    start = time.perf_counter()
    model = loader.load_llama2(source, offload_path=offload_root, compute_dtype=parse_dtype(a.compute_dtype),
                               memory_budget=None if a.memory_budget is None else a.memory_budget * 2**30,
                               prefetch=bool(a.prefetch), evict_before_read=a.cold, log=lambda *x: None)
    convert_s = time.perf_counter() - start
    run_dir = CACHE / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    tokens = a.batch_size * a.seq_len
    if a.mode == "lora":
        model.add_lora(8, 16.0, 0.0, ["wq", "wv"])
    model.setup_training(run_dir, mode=a.mode, optimizer=a.optimizer, keep_activations=bool(a.keep_activations),
                         tokens_per_step=tokens)
    model.train()
    batches = make_batches(model.args.vocab_size, a.batch_size, a.seq_len, a.steps + 1)
    times, (reads, writes, file_reads, file_writes) = run_steps(model, batches, 1e-4)
    model.close()
    step_s = statistics.median(times)
    n = matmul_params(model.args)
    n_all = sum(box.numel() for box in model.boxes.values())
    flops = (6 if a.mode == "full" else 4) * n * tokens
    min_bytes = 2 * n_all * (4 if a.optimizer == "sgd" else 12) if a.mode == "full" else n_all * 2
    result = {"shape": a.shape, "layers": a.layers, "mode": a.mode, "optimizer": a.optimizer,
              "compute_dtype": a.compute_dtype, "tokens_per_step": tokens, "convert_s": round(convert_s, 2),
              "step_s_median": round(step_s, 3), "tokens_per_s": round(tokens / step_s, 2),
              "peak_rss_mb": round(peak_rss_mb()), "planned_peak_mb": round(model.peak_estimate / 2**20),
              "read_bytes_per_step": reads, "write_bytes_per_step": writes,
              "file_read_bytes_per_step": file_reads, "file_write_bytes_per_step": file_writes,
              "min_bytes_per_step": min_bytes,
              "flops_per_step": flops, "achieved_gflops": round(flops / step_s / 1e9, 1),
              "gemm_gflops": round(gemm_gflops(model.args, tokens, parse_dtype(a.compute_dtype)), 1),
              "cold": a.cold, "step_s_all": [round(t, 3) for t in times]}
    if a.cold:
        result["disk_read_gbps"] = round(disk_read_gbps(next(offload_root.glob("*/layers.0.safetensors"))), 2)
    if a.reference:
        child = subprocess.run([sys.executable, __file__, "--reference-child", *sys.argv[1:]], capture_output=True,
                               text=True, cwd=HERE)
        if child.returncode:
            sys.exit(f"reference run failed: {child.stderr.strip()[-500:]}")
        ref = json.loads(child.stdout.strip().splitlines()[-1])
        result.update(ref, ratio_vs_reference=round(step_s / ref["reference_step_s"], 3))
    for key, value in result.items():
        print(f"{key:24} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
