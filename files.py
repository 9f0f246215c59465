"""Files: every write goes to a temporary name, is flushed and renamed into place (or, for module
files being trained, overwrites a slot no committed state names); module files in the safetensors
layout, mapped from the OS's page cache or read into reusable buffers; checkpoints of plain tensors, never unpickled objects."""
import contextlib
import json
import math
import mmap
import os
import time

import torch

from utils import UserError

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
    """torch.save a dict of plain tensors (and plain values) atomically. Into a file object: given a name,
    torch.save reports a full disk as a RuntimeError without its errno."""
    with published(path) as tmp, open(tmp, "wb") as f:
        torch.save(tensors, f)


def write_text(text, path):
    with published(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(obj, path):
    write_text(json.dumps(obj, indent=1) + "\n", path)


# --- module files: the safetensors layout, read into reusable buffers ---

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
             torch.uint8: "U8"}  # U8: a matrix in a block format, its rows' bytes (quant.py)
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}
HEADER_ALIGN = 4096  # the data starts on a page boundary
WINDOW_BYTES = 32 << 20  # converting reads map the file a window of this size at a time


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


def write_tensors(tensors, path, in_place=False, rows=None):
    """A safetensors file (8-byte header size, JSON header, the tensors' bytes back to back), written to
    a temporary name and renamed into place, or with in_place over the file's old bytes (whose memory
    the OS then reuses: several times faster than a new file). Wider dtypes first: all aligned.
    rows, in place: rows(n) -> (r0, r1), the rows of every tensor this process writes (the processes
    sharing the file write the others; the header and the size are the same from each)."""
    items = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    header = safetensors_header([(name, t.shape, t.dtype) for name, t in items])
    tmp = path if in_place else f"{path}.tmp{os.getpid()}"
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644), "wb") as f:
            if rows is not None:
                return write_rows(f, header, items, rows)
            f.write(header)
            for _, t in items:
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            f.truncate()
        if not in_place:
            os.replace(tmp, path)
    finally:
        if not in_place and os.path.exists(tmp):
            os.remove(tmp)


def write_rows(f, header, items, own_rows):
    """write_tensors' rows own_rows(n) of each tensor, written at their place in the file (a 0-d tensor is
    one row)."""
    offset = len(header)
    os.ftruncate(f.fileno(), offset + sum(t.numel() * t.element_size() for _, t in items))
    os.pwrite(f.fileno(), header, 0)
    for _, t in items:
        rows = t.reshape(len(t) if t.dim() else 1, -1)
        r0, r1 = own_rows(len(rows))
        row_bytes = rows.shape[1] * t.element_size()
        data = rows[r0:r1].detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
        done = 0
        while done < len(data):
            done += os.pwrite(f.fileno(), data[done:], offset + r0 * row_bytes + done)
        offset += t.numel() * t.element_size()


def read_header(f, path):
    """({name: (dtype, shape, start, end)}, where the data starts) of an open module file."""
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size)) if 2 <= size < 1 << 26 else None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a module file (bad header)")
    header.pop("__metadata__", None)
    stored = {name: (ST_TORCH[h["dtype"]], h["shape"], *h["data_offsets"]) for name, h in header.items()}
    for name, (kind, shape, start, end) in stored.items():
        if end - start != math.prod(shape) * kind.itemsize:
            raise UserError(f"{path}: tensor {name} does not match its shape")
    needed, actual = 8 + size + max((end for *_, end in stored.values()), default=0), os.fstat(f.fileno()).st_size
    if actual < needed:
        raise UserError(f"{path}: truncated ({actual} of its {needed} bytes); the file is damaged")
    return stored, 8 + size


@contextlib.contextmanager
def module_file(path, mode="rb"):
    """An open module file; a missing or damaged one is a UserError."""
    try:
        with open(path, mode) as f:
            yield f
    except FileNotFoundError:
        raise UserError(f"{path}: file not found")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a module file ({e})")


def read_tensors(path, buffer_for=None, dtype=None, names=None):
    """({name: tensor}, buffer) of a file written by write_tensors (only the tensors of names, where given): all
    tensors are views of one uint8 buffer (buffer_for(nbytes) may hand out a recycled one). With dtype, tensors
    of another dtype are converted one at a time on the way in (no second copy of the whole file in memory). A
    damaged file is a UserError."""
    with module_file(path) as f:
        stored, data_start = read_header(f, path)
        stored = {name: entry for name, entry in stored.items() if names is None or name in names}
        wanted = {name: dtype or kind for name, (kind, *_) in stored.items()}
        nbytes = sum(math.prod(shape) * wanted[name].itemsize for name, (_, shape, *_) in stored.items())
        buffer = buffer_for(nbytes) if buffer_for else torch.empty(nbytes, dtype=torch.uint8)
        tensors, offset = {}, 0
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
    return tensors, buffer


DIRECT_ALIGN = 4096  # reads and writes past the page cache (O_DIRECT) start, end and sit in memory at multiples


def direct_io_works(folder):
    """Whether files in folder can be read and written past the page cache (O_DIRECT: not on every file system)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    path = os.path.join(folder, f".slowllama-direct-{os.getpid()}")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def read_image(path, take_buffer, dtype):
    """({name: tensor}, (buffer, image, size)), or None where a tensor is not stored in dtype (as map_tensors): the
    whole module file read past the page cache (O_DIRECT) into a page-aligned stretch (image) of a buffer of
    take_buffer, every tensor a view of its bytes there. Where the page cache cannot hold the model, caching it
    only costs: a copy, and pages the OS must find. The image is written back as it is (write_image)."""
    with module_file(path) as f:
        stored, data_start = read_header(f, path)
        size = os.fstat(f.fileno()).st_size
    if not maps_as(stored, data_start, dtype):
        return None
    padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    buffer = take_buffer(padded + DIRECT_ALIGN)
    first = -buffer.data_ptr() % DIRECT_ALIGN
    image = buffer[first:first + padded]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        view, done = image.numpy(), 0
        while done < size:
            n = os.preadv(fd, [view[done:]], done)
            if not n:
                raise UserError(f"{path}: truncated; the file is damaged")
            done += n
    finally:
        os.close(fd)
    return tensor_views(image, stored, data_start), (buffer, image, size)


def direct_read_speed(path, nbytes):
    """Bytes/s of the file's first nbytes read past the page cache in one request, as a module read so is
    (files.read_image); 0 where the file system does not allow it."""
    evict_from_page_cache(path)
    whole = mmap.mmap(-1, nbytes)  # page-aligned
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return 0
    try:
        view, start, done = memoryview(whole), time.perf_counter(), 0
        while done < nbytes:
            done += os.preadv(fd, [view[done:]], done) or nbytes
        return nbytes / (time.perf_counter() - start)
    except OSError:
        return 0
    finally:
        os.close(fd)
        view.release()
        whole.close()


def write_image(image, size, path):
    """The image of a module file (read_image's, its tensors changed in place) written over path past the
    page cache."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        view, done = image.numpy(), 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


MADV_POPULATE_READ = 22  # Linux 5.14+: fault a mapping's pages in now (reading them from the disk if needed)


def maps_as(stored, data_start, dtype):
    """Whether a file's tensors can be mapped as dtype (None: each as stored): all stored in it, each aligned to it."""
    return all(kind == (dtype or kind) and (data_start + start) % kind.itemsize == 0 for kind, _, start, _ in stored.values())


def mappable(path, dtype):
    """Whether map_tensors(path, dtype) maps the file (else it returns None)."""
    with module_file(path) as f:
        return maps_as(*read_header(f, path), dtype)


def map_tensors(path, dtype, writable, populate=False):
    """({name: tensor}, the mapping) with every tensor a view of the file's pages in the OS's page
    cache: nothing is copied, and with writable changes to the tensors go straight into the file
    (else they stay in this process). None when a tensor is stored in another dtype than dtype, or
    not aligned to it (then read_tensors converts or copies). populate: have the pages in memory and
    mapped before returning (else the first use of each page reads it)."""
    with module_file(path, "r+b" if writable else "rb") as f:
        stored, data_start = read_header(f, path)
        if not maps_as(stored, data_start, dtype):
            return None
        size = data_start + max((end for *_, end in stored.values()), default=0)
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY)
    if populate and hasattr(mapping, "madvise"):
        try:
            mapping.madvise(MADV_POPULATE_READ)
        except OSError:  # an older kernel, or not Linux: ask for the pages to be read ahead instead
            mapping.madvise(mmap.MADV_WILLNEED)
    data = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping open while a view lives
    return tensor_views(data, stored, data_start), mapping


def tensor_views(data, stored, data_start):
    """{name: tensor} of a module file's header (read_header's), each a view of its bytes in data (uint8: the
    whole file, mapped or read)."""
    return {name: data[data_start + start:data_start + end].view(kind).view(shape)
            for name, (kind, shape, start, end) in stored.items()}


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
