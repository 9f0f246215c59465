"""bench.py's reference: plain in-memory autograd on the same weights and batches (reference.Reference), in a
child process of its own (its memory apart), taking a step each time bench.py takes one."""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from default_model import checkpoint
from reference import Reference, add_adapters, read_meta_folder
from utils import peak_rss_mb

HERE = Path(__file__).resolve().parent


class ReferenceRun:
    """Plain in-memory autograd on the same weights, batches and dtype, in a child process (its memory
    apart) that takes a step each time step() is called: its steps alternate with the offloaded run's,
    so both are timed at the same moments of a machine whose speed drifts."""

    def __init__(self):
        self.child = subprocess.Popen([sys.executable, HERE / "bench.py", "--reference-child", *sys.argv[1:]], cwd=HERE,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reply()  # its model is loaded

    def reply(self):
        line = self.child.stdout.readline()
        if not line:
            sys.exit(f"reference run failed: {self.child.stderr.read().strip()[-500:]}")
        return line

    def step(self):
        self.child.stdin.write("step\n")
        self.child.stdin.flush()
        self.reply()

    def figures(self):
        """{reference_step_s: median of its timed steps, reference_peak_rss_mb, reference_kernel_cpu_s}:
        once it has taken them all."""
        self.child.stdin.close()
        figures = json.loads(self.reply())
        self.child.wait()
        return figures


def reference_child(a):
    """The Reference's process: loads the model, says "ready", then a step per line read; at the end of
    its input, the median of the steps after the first, its peak RSS and its kernel CPU seconds a step,
    as JSON."""
    from bench import cpu_seconds, make_batches  # (bench.py's, run as the child's main)
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
    print("ready", flush=True)
    times, kernel_cpu = [], []
    for _, (x, y, *_) in zip(sys.stdin, make_batches(model.tok_embeddings.num_embeddings, a.batch_size, a.seq_len,
                                                 a.steps + 1)):
        start, kernel_start = time.perf_counter(), cpu_seconds()["kernel_cpu"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.compute_dtype == "bf16"):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        kernel_cpu.append(cpu_seconds()["kernel_cpu"] - kernel_start)
        print(times[-1], flush=True)
    print(json.dumps({"reference_step_s": statistics.median(times[1:]), "reference_peak_rss_mb": peak_rss_mb(),
                      "reference_kernel_cpu_s": round(statistics.mean(kernel_cpu[1:]), 2),
                      "reference_step_s_all": [round(t, 3) for t in times[1:]]}))
