"""GGML's block formats (quant.py): every type's blocks decoded as its definition in ggml (written out below,
value by value, from ggml-common.h's layouts and ggml-quants.c's dequantize_row_*) and as gguf-py decodes them;
q8_0 and q4_0 quantized as ggml's reference quantizer (gguf-py's port of it) writes them."""
import struct

import gguf
import numpy as np
import pytest
import torch

import quant

N_BLOCKS = 6


def f16(b, at):
    return float(np.frombuffer(bytes(b[at:at + 2]), dtype=np.float16)[0])


def i8(byte):
    return byte - 256 if byte > 127 else byte


def q4_0(b):
    d = f16(b, 0)
    return [((b[2 + j] & 0xF) - 8) * d for j in range(16)] + [((b[2 + j] >> 4) - 8) * d for j in range(16)]


def q4_1(b):
    d, m = f16(b, 0), f16(b, 2)
    return [(b[4 + j] & 0xF) * d + m for j in range(16)] + [(b[4 + j] >> 4) * d + m for j in range(16)]


def q5(b, with_min):
    d, m = f16(b, 0), f16(b, 2) if with_min else 0.0
    at = 4 if with_min else 2
    qh = struct.unpack("<I", bytes(b[at:at + 4]))[0]
    qs = b[at + 4:]
    low = [((qs[j] & 0xF) | ((qh >> j) & 1) << 4) for j in range(16)]
    high = [((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) for j in range(16)]
    return [(q if with_min else q - 16) * d + m for q in low + high]


def q8_0(b):
    return [f16(b, 0) * i8(b[2 + j]) for j in range(32)]


def q2_k(b):
    scales, qs, d, dmin = b[:16], b[16:80], f16(b, 80), f16(b, 82)
    out, i = [], 0
    for n in range(2):
        q = qs[32 * n:32 * n + 32]
        for shift in (0, 2, 4, 6):
            for part in range(2):
                sc = scales[i]
                i += 1
                out += [d * (sc & 0xF) * ((q[16 * part + l] >> shift) & 3) - dmin * (sc >> 4) for l in range(16)]
    return out


def q3_k(b):
    hmask, qs, s, d = b[:32], b[32:96], b[96:108], f16(b, 108)
    scales = [((s[i] & 0xF) if i < 8 else (s[i - 8] >> 4)) | (((s[8 + i % 4] >> (2 * (i // 4))) & 3) << 4)
              for i in range(16)]
    out, i, m = [], 0, 1
    for n in range(2):
        q = qs[32 * n:32 * n + 32]
        for shift in (0, 2, 4, 6):
            for part in range(2):
                dl = d * (scales[i] - 32)
                i += 1
                out += [dl * (((q[16 * part + l] >> shift) & 3) - (0 if hmask[16 * part + l] & m else 4))
                        for l in range(16)]
            m <<= 1
    return out


def scale_min(j, s):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def q45_k(b, five):
    d, dmin, s = f16(b, 0), f16(b, 2), b[4:16]
    qh, ql = (b[16:48], b[48:]) if five else (None, b[16:])
    out = []
    for j in range(4):
        q = ql[32 * j:32 * j + 32]
        for part in range(2):
            sc, m = scale_min(2 * j + part, s)
            bit = 1 << (2 * j + part)
            out += [d * sc * (((q[l] >> 4 * part) & 0xF) + (16 if five and qh[l] & bit else 0)) - dmin * m
                    for l in range(32)]
    return out


def q6_k(b):
    ql, qh, sc, d = b[:128], b[128:192], [i8(x) for x in b[192:208]], f16(b, 208)
    out = [0.0] * 256
    for n in range(2):
        l_, h_, s_ = ql[64 * n:], qh[32 * n:], sc[8 * n:]
        for l in range(32):
            i = l // 16
            q1 = ((l_[l] & 0xF) | ((h_[l] >> 0) & 3) << 4) - 32
            q2 = ((l_[l + 32] & 0xF) | ((h_[l] >> 2) & 3) << 4) - 32
            q3 = ((l_[l] >> 4) | ((h_[l] >> 4) & 3) << 4) - 32
            q4 = ((l_[l + 32] >> 4) | ((h_[l] >> 6) & 3) << 4) - 32
            for k, q in enumerate((q1, q2, q3, q4)):
                out[128 * n + l + 32 * k] = d * s_[i + 2 * k] * q
    return out


DEFINITIONS = {"q4_0": q4_0, "q4_1": q4_1, "q5_0": lambda b: q5(b, False), "q5_1": lambda b: q5(b, True),
               "q8_0": q8_0, "q2_k": q2_k, "q3_k": q3_k, "q4_k": lambda b: q45_k(b, False),
               "q5_k": lambda b: q45_k(b, True), "q6_k": q6_k}
SCALES = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q2_k": (80, 82), "q3_k": (108,),
          "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}  # where each block's f16 scales (and minimums) are


def random_blocks(kind, rows, per_row, seed):
    """Random block bytes of rows x per_row blocks, their f16 scales finite and of ordinary sizes."""
    g = np.random.default_rng(seed)
    nbytes = quant.BLOCKS[kind][1]
    data = g.integers(0, 256, size=(rows * per_row, nbytes), dtype=np.uint8)
    for at in SCALES[kind]:
        data[:, at:at + 2] = g.normal(0, 0.05, size=(rows * per_row, 1)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, per_row * nbytes)


@pytest.mark.parametrize("kind", quant.BLOCKS)
def test_dequantize_is_the_formats_definition_and_gguf_pys(kind):
    values, nbytes = quant.BLOCKS[kind]
    data = random_blocks(kind, 3, 2, seed=len(kind) + values)
    by_definition = torch.tensor([DEFINITIONS[kind](block.tolist()) for block in data.reshape(-1, nbytes)],
                                 dtype=torch.float64).reshape(3, 2 * values)
    ours = quant.dequantize(torch.from_numpy(data.copy()), kind, 2 * values)
    # the definition in float64, ours in fp32: equal to fp32's rounding of a product or two
    torch.testing.assert_close(ours.double(), by_definition, rtol=3e-7, atol=1e-30)
    theirs = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind.upper()))
    assert np.array_equal(ours.numpy(), np.asarray(theirs, dtype=np.float32).reshape(3, -1))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_k"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_into_the_compute_dtype_rounds_the_fp32_values(dtype, kind):
    """Rounded once: the fp32 values (gguf-py's, test above) in dtype, not a product of rounded factors."""
    data = torch.from_numpy(random_blocks(kind, 4, 768 // quant.BLOCKS[kind][0], seed=1))
    out = torch.empty(4, 768, dtype=dtype)
    assert quant.dequantize(data, kind, 768, dtype, out) is out
    want = gguf.quants.dequantize(data.numpy(), getattr(gguf.GGMLQuantizationType, kind.upper()))
    assert torch.equal(out, torch.from_numpy(np.asarray(want, dtype=np.float32)).reshape(4, 768).to(dtype))


def test_dequantize_in_chunks_of_rows(monkeypatch):
    data = torch.from_numpy(random_blocks("q6_k", 7, 2, seed=2))
    whole = quant.dequantize(data, "q6_k", 512)
    monkeypatch.setattr(quant, "CHUNK_VALUES", 1000)  # two rows at a time
    assert torch.equal(quant.dequantize(data, "q6_k", 512), whole)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantize_writes_ggmls_bytes(kind):
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    x[0, :32] = 0  # an all-zero block
    x[1, :32] = torch.linspace(-1, 1, 32)  # values on the rounding halves
    x[2, 32:64] = 7.0  # a block of one value
    ours = quant.quantize(x, kind)
    theirs = gguf.quants.quantize(x.numpy(), getattr(gguf.GGMLQuantizationType, kind.upper()))
    assert ours.shape == (9, quant.row_bytes(256, kind)) and np.array_equal(ours.numpy(), theirs)
    back = quant.dequantize(ours, kind, 256).reshape(-1, 32)
    blocks = x.reshape(-1, 32)
    step = blocks.abs().amax(1, keepdim=True) / (127 if kind == "q8_0" else 8)
    # half a step (q4_0: a whole one for the value opposite the largest, clamped at 15), and the scale's f16 rounding
    # times the largest integer
    bound = step * (0.5 + 127 * 2**-11 if kind == "q8_0" else 1.0 + 8 * 2**-11)
    assert bool(((back - blocks).abs() <= bound * 1.001 + 1e-12).all())


def test_sizes():
    assert quant.stored_bytes((4096, 4096), "q4_0") == 4096 * 128 * 18
    assert quant.stored_bytes((4096, 4096), "q8_0") / (4096 * 4096 * 2) == 34 / 64
    assert quant.stored_bytes((10, 512), "q4_k") == 10 * 2 * 144 and quant.stored_bytes((3, 5), "bf16") == 30
    assert quant.fits((8, 64), "q4_0") and not quant.fits((8, 48), "q4_0") and not quant.fits((64,), "q8_0")
