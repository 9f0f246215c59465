"""Small helpers: errors, devices, RNG state, memory and I/O figures, file writes, progress."""
import contextlib
import json
import math
import mmap
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


class UserError(Exception):
    """Bad input from the user: reported as one line, without a traceback."""


def main_guard(main):
    """Run a script's main(); a UserError or Ctrl-C becomes one line and a non-zero exit."""
    debug = "--debug=1" in sys.argv
    try:
        return main()
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
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
    """Whether the CPU multiplies bf16 natively: AVX-512 BF16 or AMX on x86, the BF16 extension on
    Arm. Without them torch converts bf16 to fp32 and back around every matmul (measured on a Xeon with
    AVX-512F only: 43 against 107 GFLOP/s in fp32)."""
    if sys.platform == "darwin":
        return sysctl("hw.optional.arm.FEAT_BF16") == "1"
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


def matmul_gflops(device, dtype, n=1024, seconds=0.2):
    """A short measure of the device's matmul rate in a dtype (square n x n products)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        synchronize(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


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


def total_ram_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 2**30


def return_freed_memory_to_os():
    """glibc keeps freed blocks of up to 32 MB in its heap for reuse; with a block's activations and
    gradients coming and going, a step's peak then grows by a gigabyte of freed but kept memory.
    Blocks of 4 MB and more are given back to the OS at once instead (measured: 1b shape, budget 2 GB,
    peak RSS 3.4 GB -> 2.4 GB at the same step time)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD, fixed (no longer adaptive)
        except (OSError, AttributeError):
            pass


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


# --- files: every write goes to a temporary name, is flushed, and renamed into place ---

def fsync_path(path):
    """Flush a file's data, or a folder's entries (so a rename in it survives a power cut), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def published(path):
    """Write to a temporary name (yielded), then flush and rename it to path; on failure remove it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_tensors(tensors, path):
    """torch.save a dict of plain tensors (and plain values) atomically."""
    with published(path) as tmp:
        torch.save(tensors, tmp)


def write_text(text, path):
    with published(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(obj, path):
    write_text(json.dumps(obj, indent=1) + "\n", path)


# --- module files: the safetensors layout, read into reusable buffers ---

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}
HEADER_ALIGN = 4096  # the data starts on a page boundary
WINDOW_BYTES = 32 << 20  # converting reads map the file a window of this size at a time
FILE_BYTES = {"read": 0, "written": 0}  # module file data moved, memory-mapped reads included


def safetensors_header(entries):
    """The bytes before the data of a safetensors file holding [(name, shape, dtype)] in this order."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-(8 + len(encoded)) % HEADER_ALIGN)
    return len(encoded).to_bytes(8, "little") + encoded


def write_tensors(tensors, path, in_place=False):
    """A safetensors file (8-byte header size, JSON header, the tensors' bytes back to back), written to
    a temporary name and renamed into place, or with in_place over the file's old bytes (whose memory
    the OS then reuses: several times faster than a new file). Wider dtypes first: all aligned."""
    items = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    tmp = path if in_place else f"{path}.tmp{os.getpid()}"
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644), "wb") as f:
            f.write(safetensors_header([(name, t.shape, t.dtype) for name, t in items]))
            for _, t in items:
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                FILE_BYTES["written"] += t.numel() * t.element_size()
            f.truncate()
        if not in_place:
            os.replace(tmp, path)
    finally:
        if not in_place and os.path.exists(tmp):
            os.remove(tmp)


def read_tensors(path, buffer_for=None, dtype=None):
    """({name: tensor}, buffer) of a file written by write_tensors: all tensors are views of one uint8
    buffer (buffer_for(nbytes) may hand out a recycled one). With dtype, tensors of another dtype are
    converted one at a time on the way in (no second copy of the whole file in memory). A damaged
    file is a UserError."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 2 <= size < 1 << 26 else None
            if not isinstance(header, dict):
                raise UserError(f"{path}: not a module file (bad header)")
            header.pop("__metadata__", None)
            stored = {name: (ST_TORCH[h["dtype"]], h["shape"], *h["data_offsets"]) for name, h in header.items()}
            for name, (kind, shape, start, end) in stored.items():
                if end - start != math.prod(shape) * kind.itemsize:
                    raise UserError(f"{path}: tensor {name} does not match its shape")
            wanted = {name: dtype or kind for name, (kind, *_) in stored.items()}
            nbytes = sum(math.prod(shape) * wanted[name].itemsize for name, (_, shape, *_) in stored.items())
            buffer = buffer_for(nbytes) if buffer_for else torch.empty(nbytes, dtype=torch.uint8)
            tensors, offset, data_start = {}, 0, 8 + size
            order = sorted(stored.items(), key=lambda item: (-wanted[item[0]].itemsize, item[1][2]))
            for name, (kind, shape, start, end) in order:  # wider first: every tensor aligned to its type
                out = buffer[offset:offset + math.prod(shape) * wanted[name].itemsize]
                offset += len(out)
                f.seek(data_start + start)
                if kind == wanted[name]:
                    read_into(f, out, path)
                else:  # converted straight from the OS's page cache, a mapped window at a time
                    converted = out.view(wanted[name])
                    for first in range(0, end - start, WINDOW_BYTES):
                        begin = data_start + start + first
                        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
                        length = min(WINDOW_BYTES, end - start - first)
                        with mmap.mmap(f.fileno(), begin - aligned + length, offset=aligned,
                                       access=mmap.ACCESS_COPY) as window:
                            piece = torch.frombuffer(window, dtype=torch.uint8)[begin - aligned:]
                            done = first // kind.itemsize
                            converted[done:done + length // kind.itemsize].copy_(piece.view(kind))
                            del piece
                tensors[name] = out.view(wanted[name]).view(shape)
                FILE_BYTES["read"] += end - start
    except FileNotFoundError:
        raise UserError(f"{path}: file not found")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a module file ({e})")
    return tensors, buffer


def read_into(f, buffer, path):
    view, done = buffer.numpy(), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise UserError(f"{path}: truncated; the file is damaged")
        done += n


def load_tensors(path, mmap=True):
    """Load a file of plain tensors; refuses anything else (weights_only=True never runs code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot be read as plain tensors ({first[:200]})") from e


def evict_from_page_cache(path):
    """Drop a file's pages from the OS page cache, so the next read comes from the disk (pages written
    but not yet on the disk are written first: only those on the disk can be dropped)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_ahead(path):
    """Ask the OS to start reading a whole file into its page cache (before it is memory-mapped)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def gb(nbytes):
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def check_disk(needs, log=print):
    """needs: [(what, folder, bytes)]. Says what each disk must hold, and refuses (before anything is
    written) when one has not the space."""
    disks = {}
    for what, folder, nbytes in needs:
        existing = Path(folder).resolve()
        while not existing.exists():
            existing = existing.parent
        disk = disks.setdefault(os.stat(existing).st_dev, [existing, 0, []])
        disk[1] += nbytes
        disk[2].append(f"{what} {gb(nbytes)}")
    for folder, total, whats in disks.values():
        free = shutil.disk_usage(folder).free
        log(f"disk: {', '.join(whats)} on the disk of {folder} ({gb(free)} free)")
        if total > free:
            raise UserError(f"{folder}: its disk has {gb(free)} free, but this needs {gb(total)} "
                            f"({', '.join(whats)}); free some space or choose another folder")


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


# --- settings: constants at the top of a script, each overridable as --name=value ---

def parse_settings(argv, defaults):
    """{name: value}: the defaults with --name=value overrides, each typed like its default."""
    settings = dict(defaults)
    for arg in argv:
        name, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise UserError(f"{arg!r}: settings are given as --name=value")
        if name not in defaults:
            raise UserError(f"unknown setting --{name}; the settings are: {', '.join(sorted(defaults))}")
        kind = type(defaults[name])
        try:
            settings[name] = value if kind is str else kind(float(value)) if kind is int and "e" in value.lower() \
                else kind(value)
        except ValueError:
            raise UserError(f"--{name}={value}: expected {'an integer' if kind is int else 'a number'}")
        if kind is int and settings[name] != float(value):
            raise UserError(f"--{name}={value}: expected an integer")
    return settings


def read_json_object(path, missing=""):
    """A JSON file that must hold an object; every way it can fail is one line naming the file."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
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
             "true or false": lambda v: isinstance(v, bool),
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
