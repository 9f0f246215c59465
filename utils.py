"""Small helpers: errors, devices, RNG state, memory and I/O figures, file writes, progress."""
import errno
import functools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

# PyTorch's CPU allocator asks the OS for 2 MB pages (transparent huge pages, where the OS gives them on
# request) for tensors of a huge page and more. A block's activations and gradients are fresh memory at every step;
# faulted in 4 KB at a time they cost time of their own, and the matmuls over them miss the TLB more
# (docs/performance.md). Read at the first tensor's allocation, so set on import; THP_MEM_ALLOC_ENABLE=0 keeps 4 KB.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402


class UserError(Exception):
    """Bad input from the user: reported as one line, without a traceback."""


def main_guard(main):
    """Run a script's main(); a UserError, a full disk or Ctrl-C becomes one line and a non-zero exit.
    --debug=1 (taken out of sys.argv here, so every script has it) shows the traceback instead."""
    flags = [a for a in sys.argv[1:] if a == "--debug" or a.startswith("--debug=")]
    sys.argv = [a for a in sys.argv if a not in flags]
    debug = any(a in ("--debug", "--debug=1") for a in flags)
    try:
        return main()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if debug or e.errno != errno.ENOSPC:
            raise
        where = e.filename or "a file being written"
        print(f"error: {where}: no space left on its disk; free some space and run the command again", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# --- devices and dtypes ---

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name, setting="dtype"):
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"{setting}={name!r} is not a dtype; use one of float32, bfloat16, float16")
    return DTYPES[name]


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def check_device(name):
    """The torch.device for 'cpu', 'cuda', 'cuda:N' or 'mps', or a UserError saying why not."""
    kind = str(name).split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"device={name!r} is not supported; use cpu, cuda or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r}: CUDA is not available on this machine; use cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name!r}: MPS is not available on this machine; use cpu")
    return torch.device(name)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cpu_name():
    """The CPU's model name, as the OS reports it (figures from different CPUs are not comparable)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        return sysctl("machdep.cpu.brand_string") or platform.processor()
    return platform.processor() or platform.machine()


def sysctl(name):
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU multiplies bf16 natively: AVX-512 BF16 or AMX on x86, the BF16 extension on Arm (without
    them torch converts bf16 to fp32 and back around every matmul, slower than fp32 itself)."""
    if sys.platform == "darwin":
        return sysctl("hw.optional.arm.FEAT_BF16") == "1"
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()  # oneDNN runs torch's bf16 matmuls on x86
    if limit not in ("", "ALL", "DEFAULT") and not any(isa in limit for isa in ("BF16", "AMX", "FP16", "AVX10")):
        return False  # held below the bf16 instructions (e.g. AVX512_CORE): its bf16 matmuls are emulated
    try:
        flags = {word for line in open(cpuinfo) if line.startswith(("flags", "Features"))
                 for word in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_is_native(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "mps":  # Apple GPUs of chips with the BF16 extension (M2 on), on macOS 14 or later
        return cpu_has_bf16() and int(platform.mac_ver()[0].split(".")[0] or 0) >= 14
    return cpu_has_bf16()


def matmul_rate(shapes, tokens, dtype, device, seconds=2.0):
    """FLOP/s of a training step's three matmul kinds (y = x W^T, dx = dy W, dW = dy^T x) for weights of the
    given (out, in) shapes and micro-batches of tokens (timed at 4096 at most: past a few thousand rows the rate
    is flat), in dtype: rounds over the shapes for about seconds of matmuls (at most twice that in all), into
    memory kept from the first round (fresh memory, as big as a weight for its gradient, would time page faults)."""
    flops, spent, begin, outs, tokens = 0, 0.0, time.perf_counter(), {}, min(tokens, 4096)
    while not spent or spent < seconds and time.perf_counter() - begin < 2 * seconds:
        for n_out, n_in in shapes:
            w = torch.randn(n_out, n_in, device=device).to(dtype)
            x, dy = torch.randn(tokens, n_in, device=device).to(dtype), torch.randn(tokens, n_out, device=device).to(dtype)
            for kind, (a, b) in enumerate(((x, w.t()), (dy, w), (dy.t(), x))):
                out = outs.get((n_out, n_in, kind))
                if out is None:  # warm-up: the first call of a shape and kind
                    out = outs[n_out, n_in, kind] = torch.matmul(a, b)
                synchronize(device)
                start = time.perf_counter()
                torch.matmul(a, b, out=out)
                synchronize(device)
                spent += time.perf_counter() - start
                flops += 2 * tokens * n_in * n_out
            del w, x, dy
    return flops / spent


def matmul_gflops(device, dtype, n=1024):
    """A short measure of the device's matmul rate in a dtype (square n x n products)."""
    return matmul_rate([(n, n)], n, dtype, device, seconds=0.2) / 1e9


def choose_compute_dtype(name, device, log):
    """The compute dtype for a setting: 'auto' is bf16 where the device multiplies it natively, fp32
    elsewhere; an explicit bf16 on a device without native bf16 is kept, with the measured rates."""
    if name == "auto":
        native = bf16_is_native(device)
        log(f"compute_dtype=auto: {'bfloat16' if native else 'float32'} ({device.type}"
            f"{' ' + cpu_name() if device.type == 'cpu' else ''} {'has' if native else 'has no'} native bf16)")
        return torch.bfloat16 if native else torch.float32
    dtype = parse_dtype(name, "compute_dtype")
    if dtype == torch.bfloat16 and not bf16_is_native(device):
        log(f"compute_dtype=bfloat16: this {device.type} has no native bf16 and multiplies it at "
            f"{matmul_gflops(device, torch.bfloat16):.0f} GFLOP/s against {matmul_gflops(device, torch.float32):.0f} "
            "in float32; compute_dtype=auto chooses the faster")
    return dtype


# --- RNG state: saved before each offloaded module runs, restored when it runs again ---

def get_rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


# --- memory and I/O figures ---

def peak_rss_mb():
    """Peak resident set size of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rss_bytes():
    """Resident set size of this process now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def total_ram_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 2**30


def local_processes():
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))


def memory_budget_bytes(gigabytes=-1.0, processes=None):
    """The memory_budget setting in bytes: gigabytes (GiB) as given, or with -1 (the default) half of this
    machine's RAM shared among its processes of the run."""
    if gigabytes is not None and gigabytes >= 0:
        return int(gigabytes * 2**30)
    return total_ram_bytes() // 2 // (processes or local_processes())


MMAP_THRESHOLD = 4 << 20  # glibc serves blocks of this size and more from the OS (return_freed_memory_to_os)


@functools.cache
def glibc():
    """The C library where it is glibc (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_freed_memory_to_os():
    """glibc keeps freed blocks of up to 32 MB in its heap for reuse; with a block's activations and
    gradients coming and going, a step's peak then grows by up to a gigabyte of freed but kept memory.
    Blocks of MMAP_THRESHOLD and more are given back to the OS at once instead, which keeps the peak at
    the memory plan at the same step time (docs/performance.md)."""
    libc = glibc()
    if libc:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD, fixed (no longer adaptive)


def release_heap_holes():
    """Give the OS the pages of the heap's free blocks (malloc_trim): where a step's tensors are
    smaller than MMAP_THRESHOLD, those freed between kept activations stay in the heap. The pages come back
    as faults when reused, which costs time: called only where the memory plan needs it."""
    libc = glibc()
    if libc:
        libc.malloc_trim(0)


def proc_io():
    """This process's I/O so far from /proc/self/io (zeros where it is missing): rchar / wchar, all
    bytes through read() and write(), page-cache hits included, memory-mapped reads not; read_bytes /
    write_bytes, what the disk served and what was dirtied for it to write (mapped reads included; a
    page rewritten before it reaches the disk counts once)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/io").read().splitlines())
    except OSError:
        fields = {}
    return {key: int(fields.get(key, 0)) for key in ("rchar", "wchar", "read_bytes", "write_bytes")}


def gb(nbytes):
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def duration(seconds):
    """A span of time for people: seconds, minutes, hours or days."""
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def existing_folder(folder):
    """folder, or the nearest folder above it that exists (where it would be made: its disk)."""
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    return path


def mount_point(folder):
    """The mount point of the disk a folder (or the nearest existing folder above it) is on."""
    path = existing_folder(folder)
    while not os.path.ismount(path):
        path = path.parent
    return path


def check_disk(needs, log=print):
    """needs: [(what, folder, bytes)]. Says what each disk must hold, and refuses (before anything is
    written) when one has not the space."""
    disks = {}
    for what, folder, nbytes in needs:
        existing = existing_folder(folder)
        disk = disks.setdefault(os.stat(existing).st_dev, [existing, 0, []])
        disk[1] += nbytes
        disk[2].append(f"{what} {gb(nbytes)}")
    for folder, total, whats in disks.values():
        free = shutil.disk_usage(folder).free
        log(f"disk: {', '.join(whats)} on the disk of {folder} ({gb(free)} free)")
        if total > free:
            raise UserError(f"{folder}: its disk has {gb(free)} free, but this needs {gb(total)} "
                            f"({', '.join(whats)}); free some space or choose another folder")


def mem_available_bytes():
    """RAM that can be had now without swapping (MemAvailable: free memory and the page cache that can
    be dropped); half the RAM where /proc/meminfo is missing."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total_ram_bytes() // 2


# --- progress: a bar on a terminal, a few plain lines otherwise ---

def progress(items, desc, total=None, unit="it"):
    total = len(items) if total is None else total
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False)
        return
    start = last = time.time()
    for i, item in enumerate(items):
        yield item
        now = time.time()
        if now - last > 10 or i + 1 == total and now - start > 2:
            left = (now - start) / (i + 1) * (total - i - 1)
            print(f"{desc}: {i + 1}/{total} {unit}, {now - start:.0f} s, {left:.0f} s left",
                  file=sys.stderr, flush=True)
            last = now


def read_json_object(path, missing="", optional=False):
    """A JSON file that must hold an object; every way it can fail is one line naming the file. optional:
    {} when the file is absent."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        if optional:
            return {}
        raise UserError(f"{path}: not found{missing}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})")
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def check_keys(path, config, required, optional=()):
    """Refuse a config file's dict unless every key of required is there, and every key of required or
    optional that is there holds a value of its kind: {key: kind}, each kind one of the names below,
    a name followed by " or null" also taking null. One line naming the file and the key otherwise."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0  # True is an int in Python

    tests = {"a positive integer": positive_int,
             "a positive integer or -1": lambda v: positive_int(v) or type(v) is int and v == -1,
             "a positive number": lambda v: positive_int(v) or type(v) is float and math.isfinite(v) and v > 0,
             "true or false": lambda v: isinstance(v, bool), "an object": lambda v: isinstance(v, dict),
             "a non-empty list of strings": lambda v: isinstance(v, list) and len(v) > 0
             and all(isinstance(s, str) for s in v)}
    for key, kind in {**required, **dict(optional)}.items():
        value = config.get(key)
        if key not in config:
            if key in required:
                raise UserError(f"{path}: missing the key {key!r}")
        elif not (value is None and kind.endswith(" or null") or tests[kind.removesuffix(" or null")](value)):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(f"{path}: {key} must be {kind}, not {shown}")
