"""GGUF out: the model (and a LoRA adapter) as llama.cpp, Ollama and LM Studio load it.

write_model streams a model into DST/model.gguf with the gguf package (gguf-py, from the llama.cpp
repository): every tensor is announced first (name, shape, type), the header, the metadata and the
tensor infos are written, then the tensor data module by module, so the export holds about one
module in memory, as the other layouts do. The file is written under a temporary name and renamed
into place. Metadata and tensor names follow llama.cpp's convert_hf_to_gguf.py:

- architectures: "llama" (Llama 2 / 3.x, CodeLlama, TinyLlama, SmolLM2, Mistral, Mixtral), "qwen2" (q/k/v
  biases), "qwen3" (q/k norms), "gemma2", "gemma3", "phi3", "olmo2", "qwen3moe" and "olmoe". llama's tensors keep Meta's
  interleaved rotary layout, the one slowllama holds its weights in; the others rotate the two halves of
  each head (NEOX), so their q/k rows (and biases, norms) go out in Hugging Face's order. Gemma's norms
  go out as 1 + w (llama.cpp multiplies by the weight), its embeddings unscaled (llama.cpp scales them);
  Phi-3's q/k/v and gate/up go out fused (attn_qkv, ffn_up), with its longrope factors as tensors; a
  mixture's router as ffn_gate_inp and its experts stacked per block (ffn_gate_exps, ffn_up_exps,
  ffn_down_exps: expert by expert, each read once), as the converter stacks them;
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
from model import module_names, module_of, module_shapes
from rope import longrope_attention_factor
from gguf_types import check_type, encode, file_type, nbytes_of, np_dtype, tensor_type
from utils import UserError, check_disk, gb, progress

MODEL_FILE, ADAPTER_FILE = "model.gguf", "adapter.gguf"
WINDOWED = ("gemma2", "gemma3", "phi3")  # llama.cpp's architectures that read a sliding window

BLOCK_NAMES = {"attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
               "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
               "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
               "feed_forward.w3.weight": "ffn_up.weight", "attention_norm.weight": "attn_norm.weight",
               "ffn_norm.weight": "ffn_norm.weight", "post_attention_norm.weight": "post_attention_norm.weight",
               "post_ffn_norm.weight": "post_ffw_norm.weight", "attention.wq.bias": "attn_q.bias",
               "attention.wk.bias": "attn_k.bias", "attention.wv.bias": "attn_v.bias",
               "attention.q_norm.weight": "attn_q_norm.weight", "attention.k_norm.weight": "attn_k_norm.weight",
               "feed_forward.gate.weight": "ffn_gate_inp.weight"}
EXPERT_NAMES = {"w1": "ffn_gate_exps.weight", "w2": "ffn_down_exps.weight", "w3": "ffn_up_exps.weight"}
FUSED = {"phi3": {"attention.wq.weight": "attn_qkv.weight", "attention.wk.weight": "attn_qkv.weight",
                  "attention.wv.weight": "attn_qkv.weight", "feed_forward.w1.weight": "ffn_up.weight",
                  "feed_forward.w3.weight": "ffn_up.weight"}}  # Phi-3: q|k|v and gate|up, in that row order
TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
ARCHITECTURES = ("gemma2", "gemma3", "phi3", "olmo2", "qwen2", "qwen3", "qwen3moe", "olmoe")  # under their own name

def gguf_key(key, args):
    """GGUF's name of a Meta key: layers.3.attention.wq.weight -> blk.3.attn_q.weight (Phi-3's fused q, k, v:
    blk.3.attn_qkv.weight; every expert's w1: blk.3.ffn_gate_exps.weight, one tensor)."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    _, layer, local = key.split(".", 2)
    if local.startswith("experts."):
        return f"blk.{layer}.{EXPERT_NAMES[local.split('.')[2]]}"
    return f"blk.{layer}.{FUSED.get(args.family, {}).get(local) or BLOCK_NAMES[local]}"


def gguf_tensor(keys, weights, args, arch):
    """The tensor of a GGUF name made of keys (one, or a fused projection's parts, in row order) of a module's
    weights ({key in the module: tensor}): q/k rows in Hugging Face's order but for llama; Gemma's norm
    weights as 1 + w."""
    parts = []
    for key in keys:
        t = weights[module_of(key)[1]].cpu()
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
    if args.n_experts and args.dense_layers:
        raise UserError(f"GGUF export: llama.cpp's {arch} has no dense MLP between layers of experts (this model's "
                        f"mlp_only_layers or decoder_sparse_step make layers {list(args.dense_layers)} dense); export as hf")
    if arch == "olmoe" and (args.kv_heads != args.n_heads or args.n_heads * args.head_dim != args.dim):
        raise UserError("GGUF export: llama.cpp's olmoe takes q, k and v of hidden_size each (a key and value head "
                        f"for each of the {args.n_heads} heads), this model's k and v have {args.kv_heads} heads; "
                        "export as hf")
    if args.n_experts and args.norm_topk != (arch != "olmoe"):  # llama.cpp's choice per architecture
        raise UserError(f"GGUF export: llama.cpp's {arch} {'does not renormalise' if arch == 'olmoe' else 'renormalises'}"
                        f" the top-k routing weights, this model's norm_topk_prob is {str(args.norm_topk).lower()}; "
                        "export as hf")
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
    if args.n_experts:
        writer.add_expert_count(args.n_experts)
        writer.add_expert_used_count(args.top_k)
        if args.moe_hidden_dim:
            writer.add_expert_feed_forward_length(args.moe_hidden_dim)
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


def source_type(model, log=None):
    """A GGUF export's type when none is asked for: the GGUF source's own where it is one slowllama writes, else
    f16 (log: says why)."""
    if model.manifest.get("gguf_type"):
        return model.manifest["gguf_type"]
    if log and model.manifest.get("layout") == "gguf":
        log(f"{Path(model.manifest['source']).name}: its tensors' types are not all ones slowllama writes (f32, f16, "
            "bf16, q8_0); the model is written in f16 (out_format=gguf:q8_0 for a smaller file)")
    return "f16"


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
    stacked = {}  # GGUF name -> the keys of a block's experts, stacked in one tensor
    for name in names:
        grouped = {}  # GGUF name -> [(key, shape)]: one, or the parts of a fused projection
        for key, shape in module_shapes(args, name).items():
            grouped.setdefault(gguf_key(f"{name}.{key}", args), []).append((f"{name}.{key}", shape))
        for gname, parts in grouped.items():
            if ".experts." in name:  # announced with the block's first expert, written expert by expert
                if gname not in stacked:
                    shape = (args.n_experts, *parts[0][1])
                    stacked[gname] = []
                    entries.append((name, stacked[gname], gname, shape, tensor_type(gname, shape, qtype, log)))
                stacked[gname].append(parts[0][0])
                continue
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
            by_module = {}
            for entry in entries:
                by_module.setdefault(entry[0], []).append(entry)
            for name in progress(names, "writing GGUF", unit="module"):
                mine = by_module.get(name, [])
                if ".experts." in name:
                    for _, keys, gname, shape, ggml_type in mine:
                        writer.write_tensor_data(Stacked(model, keys, nbytes_of(shape, ggml_type),
                                                         lambda t, n=gname, g=ggml_type: encode(t, g, n, log)))
                    continue
                weights = model.read_weights(name)
                for module, keys, gname, shape, ggml_type in mine:
                    writer.write_tensor_data(encode(gguf_tensor(keys, weights, args, arch), ggml_type, gname, log))
                del weights
        finally:
            writer.close()
    log(f"wrote {path} ({arch}, {type_name}, {gb(total)}) in {time.time() - start:.1f} s")
    return path


class Stacked:
    """A block's experts' tensor of one key stacked, as gguf's writer takes a tensor (its nbytes, tofile):
    written expert by expert, each expert's tensor read alone (encode: into its GGML type's bytes)."""

    def __init__(self, model, keys, nbytes, encode):
        self.model, self.keys, self.nbytes, self.encode = model, keys, nbytes, encode

    def tofile(self, f):
        for key in self.keys:
            name, local = module_of(key)
            self.encode(self.model.read_weights(name, keys=[local])[local].cpu()).tofile(f)


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
    for gname, keys in expert_keys(model.lora, args).items():  # a block's experts: A (E, r, in), B (E, out, r)
        stacked[gname] = tuple(torch.stack([model.lora[k][i].detach().cpu().float() for k in keys]) for i in (0, 1)) + (1,)
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


def expert_keys(keys, args):
    """{GGUF name: the keys of its experts in order} of the experts' keys among keys."""
    out = {}
    for key in keys:
        if ".experts." in key:
            out.setdefault(gguf_key(key, args), []).append(key)
    return {name: sorted(ks, key=lambda k: int(k.split(".")[3])) for name, ks in out.items()}
