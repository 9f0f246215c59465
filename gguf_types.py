"""GGML's tensor types as slowllama writes them: which type each tensor gets, its size, its bytes.

Matrices go out in f16 (default), bf16, q8_0 or f32, 1-D tensors (norms, biases) always in f32, as llama.cpp's
converter writes them; q8_0 (blocks of 32 values with an f16 scale) only for rows of whole blocks, quantized
with gguf-py's own quantizer (bit-exact with ggml's).
"""
import math

import torch

from gguf_vocab import gguf
from settings import GGUF_TYPES as TYPES
from utils import UserError

F16_MAX = 65504.0
Q8_BLOCK, Q8_BYTES = 32, 34  # q8_0: 32 values in 34 bytes (an f16 scale, 32 int8)
QUANTIZE_CHUNK = 1 << 22  # values quantized at a time (bounds the temporary arrays)


def check_type(name):
    """The GGML type of a --gguf_type name; a UserError for anything else."""
    if name not in TYPES:
        raise UserError(f"gguf_type={name!r} is not supported; use {', '.join(TYPES)}")
    return getattr(gguf().GGMLQuantizationType, name.upper())


def file_type(name):
    return {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[name]  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16 ...


def tensor_type(name, shape, qtype, log):
    """The GGML type a tensor is written in: 1-D tensors in f32 (as llama.cpp's converter writes norms
    and biases), q8_0 only for rows of whole blocks (else f16)."""
    types = gguf().GGMLQuantizationType
    if len(shape) <= 1:
        return types.F32
    if qtype == types.Q8_0 and shape[-1] % Q8_BLOCK:
        log(f"{name}: rows of {shape[-1]} values are not whole q8_0 blocks of {Q8_BLOCK}; written as f16")
        return types.F16
    return qtype


def nbytes_of(shape, ggml_type):
    types = gguf().GGMLQuantizationType
    n = math.prod(shape)
    if ggml_type == types.Q8_0:
        return n // Q8_BLOCK * Q8_BYTES
    return n * {types.F32: 4, types.F16: 2, types.BF16: 2}[ggml_type]


def encode(t, ggml_type, name, log):
    """The bytes of a tensor in a GGML type, as a numpy array (q8_0 quantized a chunk of rows at a time,
    with gguf's own quantizer, bit-exact with ggml's)."""
    g = gguf()
    types = g.GGMLQuantizationType
    if ggml_type == types.F32:
        return t.float().contiguous().numpy()
    if ggml_type == types.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    if ggml_type == types.F16:
        if t.dtype != torch.float16 and max(-float(t.min()), float(t.max())) > F16_MAX:
            log(f"{name}: values beyond f16's range ({F16_MAX}) clamped; use --gguf_type bf16 for this model")
            t = t.float().clamp(-F16_MAX, F16_MAX)
        return t.to(torch.float16).contiguous().numpy()
    import numpy as np
    rows = t.reshape(-1, t.shape[-1])
    out = np.empty((rows.shape[0], rows.shape[1] // Q8_BLOCK * Q8_BYTES), dtype=np.uint8)
    step = max(1, QUANTIZE_CHUNK // rows.shape[1])
    for r in range(0, rows.shape[0], step):
        out[r:r + step] = g.quants.quantize(rows[r:r + step].float().numpy(), types.Q8_0)
    return out


def np_dtype(ggml_type):
    """The numpy dtype add_tensor_info derives f32 and f16 from; other types go as raw_dtype with
    their shape in values (any dtype but uint8, which would mean a shape in bytes)."""
    import numpy as np
    return np.dtype(np.float16 if ggml_type == gguf().GGMLQuantizationType.F16 else np.float32)
