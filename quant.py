"""GGML's block formats in torch: a frozen base kept quantized on disk and dequantized as it is read.

A quantized matrix is stored as the bytes of its rows (uint8, rows x bytes per row), each row a run of
blocks: 32 values (q8_0, q4_0, q4_1, q5_0, q5_1) or 256 (the k-quants q2_k to q6_k), each block a scale (and
a minimum) in f16 and small integers. The layouts and formulas are ggml's (ggml-common.h, ggml-quants.c's
dequantize_row_*); the arithmetic runs in fp32 on whatever device the bytes are on (CPU, CUDA, MPS), a few
million values at a time, into the compute dtype. quantize() writes q8_0 and q4_0 as ggml's reference
quantizer does (round half away from zero; q4_0's scale from the value of largest magnitude, over -8).
"""
import math

import torch

# values and bytes of a block; GGML's type number (gguf.GGMLQuantizationType)
BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
          "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11,
              "q4_k": 12, "q5_k": 13, "q6_k": 14, "bf16": 30}
FLOATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
CHUNK_VALUES = 1 << 19  # values dequantized at a time: their fp32 temporaries stay under the size glibc maps
# afresh for each allocation (utils.MMAP_THRESHOLD), so they reuse the heap instead of faulting in new pages


def is_quantized(kind):
    return kind in BLOCKS


def row_bytes(cols, kind):
    """Bytes of a row of cols values in a block format (cols a multiple of its block)."""
    values, nbytes = BLOCKS[kind]
    return cols // values * nbytes


def stored_bytes(shape, kind):
    """Bytes a tensor of shape takes in kind (a block format, a GGML float type or a dtype's name)."""
    if kind in BLOCKS:
        return math.prod(shape[:-1]) * row_bytes(shape[-1], kind)
    return math.prod(shape) * (FLOATS.get(kind) or float_dtype(kind)).itemsize


def fits(shape, kind):
    """Whether a tensor's rows are whole blocks of kind (ggml quantizes only those)."""
    return len(shape) == 2 and shape[-1] % BLOCKS[kind][0] == 0


def kinds_at_conversion(args, name, base_quant):
    """{key: block format} of the matrices of a module a base_quant of q8_0 or q4_0 quantizes at conversion: those
    of rows of whole blocks, as ggml quantizes them (the embedding table too: read whole at each use, as a file of
    a quarter or half the bytes, rather than as its rows)."""
    from model import module_shapes
    if base_quant not in ENCODE:
        return {}
    return {k: base_quant for k, shape in module_shapes(args, name).items() if fits(shape, base_quant)}


def dequantize(data, kind, cols, dtype=torch.float32, out=None):
    """The (rows, cols) values of data (uint8, rows x row bytes) stored in kind, in dtype (into out, if given):
    computed in fp32 a chunk of rows at a time (into out itself where it is fp32), rounded into dtype once."""
    rows = data.shape[0]
    out = torch.empty(rows, cols, dtype=dtype, device=data.device) if out is None else out
    step = max(1, CHUNK_VALUES // cols)
    values, nbytes = BLOCKS[kind]
    n = min(rows, step) * cols
    # the chunk's fp32 values and nibbles, made once: a step's tensors freed and made again at every chunk would
    # each be pages given back to the OS and faulted in again
    scratch = (None if dtype == torch.float32 else torch.empty(n, device=data.device),
               torch.empty(n, dtype=torch.uint8, device=data.device))
    for r in range(0, rows, step):
        blocks, into = data[r:r + step].reshape(-1, nbytes), out[r:r + step].view(-1, values)
        work = into if scratch[0] is None else scratch[0][:into.numel()].view(-1, values)
        if kind in FUSED:
            FUSED[kind](blocks, work, scratch[1][:into.numel()].view(-1, values))
        else:
            work.copy_(DECODE[kind](blocks))
        if work is not into:
            into.copy_(work)
    return out


def dequantized(data, kinds, dtype, device, take_buffer=None):
    """(data with the tensors of kinds ({key: block format}) dequantized into dtype on device, the rest in dtype,
    the buffer of take_buffer those of the CPU live in (None: each a tensor of its own))."""
    sizes = {k: math.prod(t.shape) * dtype.itemsize if k not in kinds else
             t.shape[0] * t.shape[1] // BLOCKS[kinds[k]][1] * BLOCKS[kinds[k]][0] * dtype.itemsize
             for k, t in data.items()}
    buffer = take_buffer(sum(sizes.values())) if take_buffer else None
    out, offset = {}, 0
    for key, t in data.items():
        place = None if buffer is None else buffer[offset:offset + sizes[key]].view(dtype)
        offset += sizes[key]
        if key in kinds:
            cols = sizes[key] // dtype.itemsize // t.shape[0]
            out[key] = dequantize(t.to(device), kinds[key], cols, dtype,
                                        None if place is None else place.view(t.shape[0], cols))
        else:
            out[key] = t.to(device, dtype) if place is None else place.view(t.shape).copy_(t)
    return out, buffer


def half(blocks, at):
    """The f16 stored at byte at of each block, as fp32 (blocks, 1)."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def nibbles(qs):
    """Each byte's low four bits, then (after all the low ones) its high four bits: (blocks, 2 x bytes)."""
    return torch.cat((qs & 0xF, qs >> 4), 1)


def bits(qh, count):
    """The first count bits of each block's little-endian bytes qh, bit i at column i: (blocks, count) of 0/1."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], -1)[:, :count]


def q8_0(b):
    return half(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def q4_0(b):
    return half(b, 0) * (nibbles(b[:, 2:]).float() - 8)


def q4_1(b):
    return half(b, 0) * nibbles(b[:, 4:]).float() + half(b, 2)


def q5_0(b):
    return half(b, 0) * ((nibbles(b[:, 6:]) | bits(b[:, 2:6], 32) << 4).float() - 16)


def q5_1(b):
    return half(b, 0) * (nibbles(b[:, 8:]) | bits(b[:, 4:8], 32) << 4).float() + half(b, 2)


def q2_k(b):
    """scales[16] (low 4 bits: scale, high: minimum) qs[64] d dmin; per 128 values 32 bytes of 2-bit values,
    four shifts of them, each shift 2 x 16 values of a scale of their own."""
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], half(b, 80), half(b, 82)
    q = qs.reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    q = (q & 3).reshape(-1, 16, 16).float()  # (half, shift, group) -> one of 16 groups of 16
    return ((d * (scales & 0xF).float()).unsqueeze(-1) * q - (dmin * (scales >> 4).float()).unsqueeze(-1)).reshape(-1, 256)


def q3_k(b):
    """hmask[32] qs[64] scales[12] d: 2 low bits as q2_k's, the third from hmask (clear: minus 4); 16 signed
    6-bit scales, their low 4 bits in scales[0:8] (low, then high nibbles), the top 2 in scales[8:12]."""
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], half(b, 108)
    low = nibbles(packed[:, :8])  # scale i: i < 8 the low nibble of byte i, else the high one of byte i - 8
    i = torch.arange(16, device=b.device)
    high = (packed[:, 8 + i % 4] >> (2 * (i // 4)).to(torch.uint8)) & 3
    scale = (low | high << 4).float() - 32
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    q = (qs.reshape(-1, 2, 1, 32) >> shifts) & 3  # (half, shift, 32)
    h = ((hmask.unsqueeze(1) >> torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 8, 1)) & 1)
    h = h.reshape(-1, 2, 4, 32)  # bit m of hmask[l]: half m // 4, shift m % 4
    q = (q.float() - 4 * (1 - h.float())).reshape(-1, 16, 16)
    return ((d * scale).unsqueeze(-1) * q).reshape(-1, 256)


def scale_min_k4(packed):
    """The 8 (scale, minimum) pairs of 6 bits of q4_k's and q5_k's 12 packed bytes (ggml's get_scale_min_k4)."""
    p = packed.int()
    low_s, low_m = p[:, 0:4] & 63, p[:, 4:8] & 63
    high_s = (p[:, 8:12] & 0xF) | ((p[:, 0:4] >> 6) << 4)
    high_m = (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)
    return torch.cat((low_s, high_s), 1).float(), torch.cat((low_m, high_m), 1).float()


def q4_k(b):
    """d dmin scales[12] qs[128]: per 64 values 32 bytes, low nibbles (32 values) then high ones, each 32 of a
    (scale, minimum) of their own."""
    d, dmin, (sc, m) = half(b, 0), half(b, 2), scale_min_k4(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)
    q = torch.stack((qs & 0xF, qs >> 4), 2).reshape(-1, 8, 32).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)).reshape(-1, 256)


def q5_k(b):
    """d dmin scales[12] qh[32] qs[128]: q4_k's values with a fifth bit, bit j of qh[l] for group j."""
    d, dmin, (sc, m) = half(b, 0), half(b, 2), scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:].reshape(-1, 4, 32)
    q = torch.stack((qs & 0xF, qs >> 4), 2).reshape(-1, 8, 32)
    h = (qh.unsqueeze(1) >> torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 8, 1)) & 1
    q = (q | h << 4).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)).reshape(-1, 256)


def q6_k(b):
    """ql[128] qh[64] scales[16] (int8) d: per 128 values 64 bytes of low nibbles and 32 of 2 high bits; the four
    32-value quarters: ql[0:32] low, ql[32:64] low, ql[0:32] high, ql[32:64] high nibbles, with qh's bits 0-1,
    2-3, 4-5, 6-7; a scale per 16 values."""
    ql, qh = b[:, :128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    scale, d = b[:, 192:208].contiguous().view(torch.int8).float(), half(b, 208)
    low = torch.stack((ql & 0xF, ql >> 4), 2).reshape(-1, 2, 4, 32)  # quarters: (ql0 lo, ql1 lo, ql0 hi, ql1 hi)
    high = (qh >> torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    q = ((low | high << 4).float() - 32).reshape(-1, 16, 16)
    return ((d * scale).unsqueeze(-1) * q).reshape(-1, 256)


def q8_0_into(b, out, _):
    out.copy_(b[:, 2:].view(torch.int8)).mul_(half(b, 0))


def q4_0_into(b, out, q):
    qs, q = b[:, 2:], q.view(-1, 2, 16)
    torch.bitwise_and(qs, 0xF, out=q[:, 0])
    torch.bitwise_right_shift(qs, 4, out=q[:, 1])
    out.copy_(q.view(-1, 32)).sub_(8).mul_(half(b, 0))


FUSED = {"q8_0": q8_0_into, "q4_0": q4_0_into}  # the formats quantize() writes: in place, without temporaries
DECODE = {"q8_0": q8_0, "q4_0": q4_0, "q4_1": q4_1, "q5_0": q5_0, "q5_1": q5_1, "q2_k": q2_k, "q3_k": q3_k,
          "q4_k": q4_k, "q5_k": q5_k, "q6_k": q6_k}


# --- quantizing (q8_0, q4_0) ---

def quantize(t, kind):
    """The bytes (uint8, rows x row bytes) of a (rows, cols) tensor in q8_0 or q4_0, as ggml's reference
    quantizer writes them, a chunk of rows at a time."""
    rows, cols = t.shape
    out = torch.empty(rows, row_bytes(cols, kind), dtype=torch.uint8, device=t.device)
    step = max(1, CHUNK_VALUES // cols)
    for r in range(0, rows, step):
        x = t[r:r + step].float().reshape(-1, 32)
        out[r:r + step] = ENCODE[kind](x).reshape(-1, out.shape[1])
    return out


def inverse(d):
    """1 / d where d is not 0, else 0 (an all-zero block)."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def round_away(x):
    """C's roundf: halves away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def encode_q8_0(x):
    d = x.abs().amax(1, keepdim=True) / 127
    q = round_away(x * inverse(d)).to(torch.int8)
    return torch.cat((d.half().view(torch.uint8), q.view(torch.uint8)), 1)


def encode_q4_0(x):
    largest = x.gather(1, x.abs().argmax(1, keepdim=True))  # the value of largest magnitude, with its sign
    d = largest / -8
    q = torch.trunc(x * inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat((d.half().view(torch.uint8), q[:, :16] | q[:, 16:] << 4), 1)


ENCODE = {"q8_0": encode_q8_0, "q4_0": encode_q4_0}


def float_dtype(kind):
    """The float dtype of a stored kind: a dtype name's, or bf16 for a block format (its range holds any block's
    values: what exports write them in unless told otherwise)."""
    from utils import parse_dtype
    return torch.bfloat16 if kind in BLOCKS else parse_dtype(kind)


def kinds_note(kinds):
    """The stored kinds of a model's tensors, most frequent first ("170 q4_k, 28 q6_k, 57 float32")."""
    counts = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
