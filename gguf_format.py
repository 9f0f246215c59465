"""GGUF out: the model (and a LoRA adapter) as llama.cpp, Ollama and LM Studio load it.

write_model streams a model into DST/model.gguf with the gguf package (gguf-py, from the llama.cpp
repository): every tensor is announced first (name, shape, type), the header, the metadata and the
tensor infos are written, then the tensor data module by module, so the export holds about one
module in memory, as the other layouts do. The file is written under a temporary name and renamed
into place. Metadata and tensor names follow llama.cpp's convert_hf_to_gguf.py:

- architectures: "llama" (Llama 2 / 3.x, CodeLlama, TinyLlama, SmolLM2, Mistral), "qwen2" (q/k/v
  biases), "qwen3" (q/k norms), "gemma2", "gemma3", "phi3" and "olmo2". llama's tensors keep Meta's
  interleaved rotary layout, the one slowllama holds its weights in; the others rotate the two halves of
  each head (NEOX), so their q/k rows (and biases, norms) go out in Hugging Face's order. Gemma's norms
  go out as 1 + w (llama.cpp multiplies by the weight), its embeddings unscaled (llama.cpp scales them);
  Phi-3's q/k/v and gate/up go out fused (attn_qkv, ffn_up), with its longrope factors as tensors;
- types: f16 (default), bf16, q8_0, f32 for the matrices; 1-D tensors (norms, biases) always f32;
  q8_0 needs rows of a multiple of 32 values, other matrices fall back to f16 (said in the log);
- llama3 rope scaling as the rope_freqs tensor of per-pair factors, linear and yarn as rope.scaling keys;
- the tokenizer: sentencepiece as tokenizer.ggml.model "llama" (pieces, scores, types); byte-level
  BPE (tokenizer.json, Meta's Llama 3 tiktoken file) as "gpt2" with merges and a pre-tokenizer
  name llama.cpp knows; special token ids, add_bos, the chat template.

write_adapter writes a LoRA adapter as a GGUF adapter (llama-cli --lora, Ollama's ADAPTER).
"""
import math
import time
from pathlib import Path

import torch

from files import published
from gguf_vocab import BYTE, gguf, vocabulary
from adapters import stacked_adapters
from hf_format import hf_rows
from model import module_names, module_shapes
from rope import longrope_attention_factor
from settings import GGUF_TYPES as TYPES
from utils import UserError, check_disk, gb, progress

MODEL_FILE, ADAPTER_FILE = "model.gguf", "adapter.gguf"
WINDOWED = ("gemma2", "gemma3", "phi3")  # llama.cpp's architectures that read a sliding window
F16_MAX = 65504.0
Q8_BLOCK, Q8_BYTES = 32, 34  # q8_0: 32 values in 34 bytes (an f16 scale, 32 int8)
QUANTIZE_CHUNK = 1 << 22  # values quantized at a time (bounds the temporary arrays)

BLOCK_NAMES = {"attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
               "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
               "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
               "feed_forward.w3.weight": "ffn_up.weight", "attention_norm.weight": "attn_norm.weight",
               "ffn_norm.weight": "ffn_norm.weight", "post_attention_norm.weight": "post_attention_norm.weight",
               "post_ffn_norm.weight": "post_ffw_norm.weight", "attention.wq.bias": "attn_q.bias",
               "attention.wk.bias": "attn_k.bias", "attention.wv.bias": "attn_v.bias",
               "attention.q_norm.weight": "attn_q_norm.weight", "attention.k_norm.weight": "attn_k_norm.weight"}
FUSED = {"phi3": {"attention.wq.weight": "attn_qkv.weight", "attention.wk.weight": "attn_qkv.weight",
                  "attention.wv.weight": "attn_qkv.weight", "feed_forward.w1.weight": "ffn_up.weight",
                  "feed_forward.w3.weight": "ffn_up.weight"}}  # Phi-3: q|k|v and gate|up, in that row order
TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
ARCHITECTURES = ("gemma2", "gemma3", "phi3", "olmo2", "qwen2", "qwen3")  # families under their own name

def check_type(name):
    """The GGML type of a --gguf_type name; a UserError for anything else."""
    if name not in TYPES:
        raise UserError(f"gguf_type={name!r} is not supported; use {', '.join(TYPES)}")
    return getattr(gguf().GGMLQuantizationType, name.upper())


def file_type(name):
    return {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[name]  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16 ...


def gguf_key(key, args):
    """GGUF's name of a Meta key: layers.3.attention.wq.weight -> blk.3.attn_q.weight (Phi-3's fused q, k, v:
    blk.3.attn_qkv.weight)."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    _, layer, local = key.split(".", 2)
    return f"blk.{layer}.{FUSED.get(args.family, {}).get(local) or BLOCK_NAMES[local]}"


def gguf_tensor(keys, weights, args, arch):
    """The tensor of a GGUF name made of keys (one, or a fused projection's parts, in row order) of a module's
    weights ({key in the module: tensor}): q/k rows in Hugging Face's order but for llama; Gemma's norm
    weights as 1 + w."""
    parts = []
    for key in keys:
        t = weights[key.split(".", 2)[-1] if key.startswith("layers.") else key.split(".", 1)[1]].cpu()
        parts.append(t if arch == "llama" else hf_rows(key, t, args))
    t = torch.cat(parts) if len(parts) > 1 else parts[0]
    return t.float() + 1 if args.norm_offset and keys[0].endswith("norm.weight") else t


def architecture(args):
    """llama.cpp's architecture of the model; a UserError for what GGUF cannot express."""
    if args.qkv_bias and args.qk_norm:
        raise UserError("GGUF export: a model with both q/k/v biases and q/k norms is no architecture llama.cpp "
                        "has (qwen2 has the biases, qwen3 the norms)")
    arch = args.family if args.family in ARCHITECTURES else "qwen2" if args.qkv_bias else "qwen3" if args.qk_norm \
        else "llama"
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "llama3" and arch != "llama":
        raise UserError(f"GGUF export: llama3 rope scaling on a {arch} model cannot be expressed (llama.cpp reads "
                        "the rope_freqs factors for the llama architecture only)")
    if kind == "yarn":  # llama.cpp's yarn for llama/qwen2/qwen3: type, factor and original context, the rest fixed
        default = {"beta_fast": 32, "beta_slow": 1, "truncate": True,
                   "attention_factor": 0.1 * math.log(scaling["factor"]) + 1 if scaling["factor"] > 1 else 1.0}
        other = [key for key in ("beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")
                 if scaling.get(key) is not None and not math.isclose(scaling[key], default.get(key, 0), rel_tol=1e-6)]
        if other:
            raise UserError(f"GGUF export: yarn rope scaling with {other[0]}={scaling[other[0]]} cannot be expressed "
                            f"(llama.cpp's {arch} reads the scaling type, factor and original context only)")
    return arch


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


def extra_tensors(args):
    """{GGUF name: f32 tensor} of what llama.cpp reads of the rope beside the weights: llama3 scaling as
    rope_freqs, Phi-3's longrope factors as rope_factors_long and rope_factors_short."""
    s = args.rope_scaling or {}
    if s.get("rope_type") == "llama3":
        return {"rope_freqs.weight": rope_factors(args)}
    if s.get("rope_type") == "longrope":
        return {f"rope_factors_{kind}.weight": torch.tensor(s[f"{kind}_factor"], dtype=torch.float32)
                for kind in ("long", "short")}
    return {}


def rope_factors(args):
    """llama3 rope scaling as llama.cpp takes it: per feature pair, the factor its frequency is divided
    by (1: kept, factor: slowed, a blend between), from the definition of the scaling."""
    s, d = args.rope_scaling, args.head_dim
    old, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"],
                              s["factor"])
    factors = []
    for i in range(d // 2):
        wavelength = 2 * math.pi * args.rope_theta ** (2 * i / d)
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(float(factor))
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# --- writing ---

def write_metadata(writer, arch, args, vocab, type_name, name):
    """general.*, the architecture's hyperparameters (and each family's own) and the tokenizer, under GGUF's key
    names."""
    g = gguf()
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(file_type(type_name))
    writer.add_quantization_version(g.GGML_QUANT_VERSION)
    writer.add_context_length(context_length(args))
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(args.rotary_dim or args.head_dim)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_vocab_size(args.vocab_size)
    if args.head_dim != args.dim // args.n_heads or arch.startswith("gemma"):
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    write_family_metadata(writer, arch, args)
    s = args.rope_scaling or {}
    if s.get("rope_type") in ("linear", "yarn"):  # llama3: the rope_freqs tensor
        writer.add_string(f"{arch}.rope.scaling.type", s["rope_type"])
        writer.add_float32(f"{arch}.rope.scaling.factor", float(s["factor"]))
    if s.get("rope_type") == "yarn":
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length",
                          int(s.get("original_max_position_embeddings") or args.max_seq_len))
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    if vocab.get("scores") is not None:
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if vocab.get("merges"):
        writer.add_token_merges(vocab["merges"])
    for key in ("bos", "eos", "unk", "pad", "eot", "eom"):
        if vocab.get(key) is not None:
            gguf_name = {"unk": "unknown", "pad": "padding"}.get(key, key)
            writer.add_uint32(f"tokenizer.ggml.{gguf_name}_token_id", int(vocab[key]))
    writer.add_bool("tokenizer.ggml.add_bos_token", vocab["add_bos"])
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    if vocab.get("add_space_prefix") is not None:
        writer.add_bool("tokenizer.ggml.add_space_prefix", vocab["add_space_prefix"])
    if vocab.get("chat_template"):
        writer.add_chat_template(vocab["chat_template"])


def write_family_metadata(writer, arch, args):
    """What llama.cpp reads of Gemma's and Phi-3's windows, caps and ropes."""
    if args.attn_softcap:
        writer.add_attn_logit_softcapping(args.attn_softcap)
    if args.final_softcap:
        writer.add_final_logit_softcapping(args.final_softcap)
    if args.rope_local_theta:
        writer.add_float32(f"{arch}.rope.freq_base_swa", float(args.rope_local_theta))
    if args.sliding_window and arch in WINDOWED:
        writer.add_sliding_window(args.sliding_window)
        default = {"gemma2": 2, "gemma3": 6}.get(arch)
        types = args.layer_types or ("sliding_attention",) * args.n_layers
        if default and types != tuple("sliding_attention" if (i + 1) % default else "full_attention"
                                      for i in range(args.n_layers)):
            writer.add_array(f"{arch}.attention.sliding_window_pattern", [t == "sliding_attention" for t in types])
    elif arch == "phi3":
        writer.add_sliding_window(0)
    s = args.rope_scaling or {}
    if s.get("rope_type") == "longrope":
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", int(s["original_max_position_embeddings"]))
        writer.add_float32(f"{arch}.rope.scaling.attn_factor", float(longrope_attention_factor(s, args.max_seq_len)))


def context_length(args):
    """The context the model was trained for; Meta's params.json does not say it: Llama 3.1 to 3.3 (llama3
    rope scaling) have 131072, Llama 2 4096."""
    if args.max_seq_len:
        return args.max_seq_len
    return 131072 if (args.rope_scaling or {}).get("rope_type") == "llama3" else 4096


def check_model(model, type_name, output_adapter):
    """(GGML type, llama.cpp's architecture, the vocabulary) of the export of model, or the UserError of what
    GGUF cannot hold, before a run starts (output_adapter: the output weight gets a LoRA adapter)."""
    qtype, arch = check_type(type_name), architecture(model.args)
    if arch == "gemma2" and model.args.tied and output_adapter:
        raise UserError("GGUF export: llama.cpp's gemma2 always takes the embedding table as the output; an output "
                        "adapter merged makes them differ (export as hf, or train without an output adapter)")
    return qtype, arch, vocabulary(model)


def write_model(model, out_dir, type_name="f16", log=print):
    """Stream the model (LoRA adapters merged) into out_dir/model.gguf. Returns its path."""
    g = gguf()
    args, out_dir = model.args, Path(out_dir)
    qtype, arch, vocab = check_model(model, type_name, "output.weight" in model.lora)
    if vocab["model"] == "llama" and BYTE not in vocab["types"]:
        log(f"note: {model.tokenizer.path.name} has no byte pieces (<0x00> to <0xFF>, sentencepiece's byte_fallback, "
            "which Llama, Mistral and TinyLlama have); llama.cpp and Ollama stop with an error on text with a "
            "character outside its vocabulary")
    if args.sliding_window and arch not in WINDOWED:
        log(f"note: llama.cpp's {arch} architecture has no sliding window; the model's window of "
            f"{args.sliding_window} positions is not in the file (as llama.cpp's own converter leaves it)")
    names = module_names(args)
    if args.tied and "output.weight" in model.lora:  # a merged output adapter: no longer the table
        names.append("output")
    entries = [(None, [tensor], gname, tuple(tensor.shape), g.GGMLQuantizationType.F32)
               for gname, tensor in extra_tensors(args).items()]  # (module, keys or the tensor, name, shape, type)
    for name in names:
        grouped = {}  # GGUF name -> [(key, shape)]: one, or the parts of a fused projection
        for key, shape in module_shapes(args, name).items():
            grouped.setdefault(gguf_key(f"{name}.{key}", args), []).append((f"{name}.{key}", shape))
        for gname, parts in grouped.items():
            shape = (sum(s[0] for _, s in parts), *parts[0][1][1:])
            entries.append((name, [k for k, _ in parts], gname, shape, tensor_type(gname, shape, qtype, log)))
    total = sum(nbytes_of(e[3], e[4]) for e in entries)
    check_disk([("GGUF export", out_dir, total)], log)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, start = out_dir / MODEL_FILE, time.time()
    with published(path) as tmp:
        writer = g.GGUFWriter(tmp, arch)
        try:
            write_metadata(writer, arch, args, vocab, type_name, Path(model.manifest["source"]).name)
            for _, _, gname, shape, ggml_type in entries:
                plain = ggml_type in (g.GGMLQuantizationType.F32, g.GGMLQuantizationType.F16)
                writer.add_tensor_info(gname, shape, np_dtype(ggml_type), nbytes_of(shape, ggml_type),
                                       raw_dtype=None if plain else ggml_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for module, (tensor,), *_ in (e for e in entries if e[0] is None):
                writer.write_tensor_data(tensor.numpy())
            for name in progress(names, "writing GGUF", unit="module"):
                weights = model.read_weights(name)
                for module, keys, gname, shape, ggml_type in entries:
                    if module == name:
                        writer.write_tensor_data(encode(gguf_tensor(keys, weights, args, arch), ggml_type, gname, log))
                del weights
        finally:
            writer.close()
    log(f"wrote {path} ({arch}, {type_name}, {gb(total)}) in {time.time() - start:.1f} s")
    return path


def np_dtype(ggml_type):
    """The numpy dtype add_tensor_info derives f32 and f16 from; other types go as raw_dtype with
    their shape in values (any dtype but uint8, which would mean a shape in bytes)."""
    import numpy as np
    return np.dtype(np.float16 if ggml_type == gguf().GGMLQuantizationType.F16 else np.float32)


def write_adapter(model, path, alpha, log=print):
    """A LoRA run's adapter as a GGUF LoRA adapter (general.type adapter, adapter.lora.alpha, tensors
    <weight>.lora_a (rank x in) and .lora_b (out x rank), f32), for the GGUF of the base model:
    llama-cli -m base.gguf --lora adapter.gguf, Ollama's ADAPTER. B's q/k rows in the base file's
    layout: as they are for llama (Meta's), half-split for qwen2/qwen3. Returns the path, or None
    when the adapter cannot apply to the base model's GGUF (an output adapter of a tied model)."""
    g = gguf()
    args, path = model.args, Path(path)
    arch = architecture(args)
    if args.tied and "output.weight" in model.lora:
        log(f"{path.name} not written: the base model's GGUF has no output tensor for the output adapter to "
            f"apply to (tied embeddings); {MODEL_FILE} holds the adapter merged")
        return None
    stacked = stacked_adapters(model, lambda key: gguf_key(key, args),
                               lambda key, b: b if arch == "llama" else hf_rows(key, b, args))
    # llama.cpp scales each adapter by alpha over its own rank: a stack of n parts' B times n keeps each part's
    tensors = [t for name, (a, b, n) in stacked.items()
               for t in ((f"{name}.lora_a", a.contiguous()), (f"{name}.lora_b", (b * n).contiguous()))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with published(path) as tmp:
        writer = g.GGUFWriter(tmp, arch)
        try:
            writer.add_type("adapter")
            writer.add_name(Path(model.manifest["source"]).name)
            writer.add_string("adapter.type", "lora")
            writer.add_float32("adapter.lora.alpha", float(alpha))
            for name, t in tensors:
                writer.add_tensor(name, t.numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    log(f"wrote {path} (LoRA adapter, {len(tensors) // 2} weights, alpha {alpha})")
    return path
