"""GGUF in: the .gguf file llama.cpp, Ollama or LM Studio runs, as the source model.

model_path may be a .gguf file, a folder holding one (or split -00001-of-0000N.gguf files) or ollama:NAME[:TAG]
(the blob Ollama's manifest names, under $OLLAMA_MODELS or ~/.ollama/models; nothing is copied). The model's
settings come from the file's metadata (the llama, qwen2 and qwen3 architectures: Llama 2 / 3.x, Mistral,
SmolLM2, Qwen 2 / 2.5 / 3), its tokenizer from tokenizer.ggml.* (written into the offload folder as the files
the tokenizers of model folders are read from: a sentencepiece model for "llama", a tokenizer.json for
"gpt2"), its tensors in their GGML types: floats as they are, block formats (quant.py) as their bytes, or
dequantized into fp32 where base_quant asks for floats. q/k rows are in Meta's order for llama (as
llama.cpp's converter permutes them) and in Hugging Face's for the others (turned on reading).
"""
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

import quant
from gguf_format import architecture, gguf_key, rope_factors
from gguf_vocab import BYTE, CONTROL, LLAMA3_PATTERN, QWEN2_PATTERN, UNKNOWN, USER_DEFINED, gguf
from hf_format import permutation, to_meta_rows
from meta_format import model_args
from model import module_names, module_shapes
from files import write_json
from utils import UserError, dtype_name

OLLAMA = "ollama:"
OPENED = {}  # open_gguf's last files and what they hold
ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF architecture -> the family read as
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
PRE_TOKENIZERS = {"llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}  # split by a regular expression first


def is_gguf(source):
    """Whether model_path names a GGUF source (ollama:NAME, a .gguf file, a folder of one and no model folder)."""
    source = str(source)
    if source.startswith(OLLAMA):
        return True
    path = Path(source)
    if path.is_file():  # (Ollama's blobs have no suffix: the file's first bytes say)
        with open(path, "rb") as f:
            return path.suffix == ".gguf" or f.read(4) == b"GGUF"
    return path.is_dir() and any(path.glob("*.gguf")) and not (path / "config.json").exists() and \
        not (path / "params.json").exists()


def files_of(source):
    """The GGUF files of a source, the first holding the metadata (one, or every part of a split model)."""
    source = str(source)
    if source.startswith(OLLAMA):
        return [ollama_blob(source[len(OLLAMA):])]
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in path.glob("*.gguf") if not SPLIT.search(p.name) or SPLIT.search(p.name)[1] == "00001")
        if len(found) != 1:
            raise UserError(f"{path}: holds {len(found)} GGUF models ({', '.join(p.name for p in found) or 'none'}); "
                            "give model_path=the .gguf file")
        path = found[0]
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    split = SPLIT.search(path.name)
    if not split:
        return [path]
    count = int(split[2])
    parts = [path.with_name(SPLIT.sub(f"-{i:05d}-of-{count:05d}.gguf", path.name)) for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise UserError(f"{path}: part of a model split in {count} files; {missing[0]} is missing beside it")
    return parts


def ollama_blob(spec):
    """The model blob of Ollama's NAME[:TAG] (library models as NAME, others as NAMESPACE/NAME or HOST/NS/NAME)."""
    root = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    name, _, tag = spec.rpartition(":") if ":" in spec.rsplit("/", 1)[-1] else (spec, "", "latest")
    parts = name.split("/")
    parts = ["registry.ollama.ai", "library", *parts] if len(parts) == 1 else \
        ["registry.ollama.ai", *parts] if len(parts) == 2 else parts
    manifest = root.joinpath("manifests", *parts, tag)
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer["mediaType"].endswith(".model"))
        blob = root / "blobs" / digest.replace(":", "-")
    except FileNotFoundError:
        raise UserError(f"{OLLAMA}{spec}: Ollama has no such model ({manifest} not found; `ollama pull {spec}` "
                        "fetches it, OLLAMA_MODELS says where Ollama keeps its models)")
    except OSError as e:
        raise UserError(f"{manifest}: cannot be read ({e.strerror})")
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise UserError(f"{manifest}: not an Ollama manifest naming a model layer")
    if not blob.is_file():
        raise UserError(f"{blob}: the model's blob named by {manifest} is missing")
    return blob


# --- metadata ---

def open_gguf(files):
    """(metadata {key: value}, {tensor name: gguf ReaderTensor}) of a model's GGUF files: read once for the
    conversion's steps (its size, its shapes, its tensors), the files' sizes and times naming them."""
    key = tuple((str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    if key not in OPENED:
        OPENED.clear()  # (the last model's only: its files stay mapped while it is kept)
        OPENED[key] = read_gguf(files)
    return OPENED[key]


def read_gguf(files):
    fields, tensors = {}, {}
    for path in files:
        try:
            reader = gguf().GGUFReader(path)
        except (ValueError, OSError, struct.error, IndexError, KeyError, TypeError) as e:  # gguf-py's own for a bad file
            raise UserError(f"{path}: not a GGUF file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})")
        if not fields:
            fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
        tensors.update({t.name: t for t in reader.tensors})
    return fields, tensors


def read_params(path, meta, tensors):
    """params in params.json's terms of a GGUF's metadata; one line for an architecture not read here."""
    arch = meta.get("general.architecture")
    if arch not in ARCHES:
        raise UserError(f"{path}: a GGUF of architecture {arch!r}; slowllama reads {', '.join(ARCHES)} GGUF files "
                        "(for other families, give their Hugging Face folder)")
    def key(name, default=None):  # a float32 of the file as the shortest decimal it is (1e-05, not 9.99999974e-06)
        value = meta.get(f"{arch}.{name}", default)
        return float(str(np.float32(value))) if isinstance(value, float) else value
    required = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
    missing = [f"{arch}.{name}" for name in required if not isinstance(key(name), int)]
    if missing or not meta.get("tokenizer.ggml.tokens") and "token_embd.weight" not in tensors:
        raise UserError(f"{path}: its metadata lacks {missing[0] if missing else 'tokenizer.ggml.tokens'}; not a "
                        "model GGUF file slowllama can read")
    n_heads, dim = key("attention.head_count"), key("embedding_length")
    kv = key("attention.head_count_kv", n_heads)
    if isinstance(kv, list):
        raise UserError(f"{path}: a different number of key/value heads per layer is not supported")
    vocab = len(meta.get("tokenizer.ggml.tokens") or []) or int(tensors["token_embd.weight"].shape[1])
    params = {"family": ARCHES[arch], "dim": dim, "n_layers": key("block_count"), "n_heads": n_heads,
              "n_kv_heads": kv, "vocab_size": vocab, "hidden_dim": key("feed_forward_length"),
              "norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5), "rope_theta": key("rope.freq_base", 10000.0),
              "head_dim": key("attention.key_length") or dim // n_heads, "qkv_bias": arch == "qwen2",
              "qk_norm": "head" if arch == "qwen3" else None, "tie_embeddings": "output.weight" not in tensors,
              "max_position_embeddings": key("context_length")}
    kind = key("rope.scaling.type")
    if kind in ("linear", "yarn"):
        params["rope_scaling"] = {"rope_type": kind, "factor": key("rope.scaling.factor"),
                                  **({"original_max_position_embeddings": key("rope.scaling.original_context_length")}
                                     if kind == "yarn" else {})}
    elif kind not in (None, "none"):
        raise UserError(f"{path}: rope scaling {kind!r} is not read here")
    if "rope_freqs.weight" in tensors:
        params["rope_scaling"] = llama3_scaling(path, params, tensors["rope_freqs.weight"])
    return params


def llama3_scaling(path, params, freqs):
    """Llama 3.1's rope scaling of the per-pair factors llama.cpp keeps (rope_freqs): Meta's low and high
    frequency factors and original context with the largest factor, where those give these factors."""
    factors = torch.from_numpy(np.array(freqs.data, dtype=np.float32)).reshape(-1)
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    if not torch.allclose(rope_factors(model_args({**params, "rope_scaling": scaling}, params["vocab_size"])), factors):
        raise UserError(f"{path}: its rope_freqs are not Llama 3's rope scaling with any factor; not read here")
    return scaling


def source(files, out, base_quant, log):
    """(params, ModelArgs, read_module(name) -> ({key: tensor}, {key: kind}), the type of GGUF exports) of a GGUF
    source's files (its metadata in the first), its tokenizer written into the folder out."""
    meta, tensors = open_gguf(files)
    params = read_params(files[0], meta, tensors)
    args = model_args(params, params["vocab_size"])
    write_tokenizer(files[0], meta, out)
    blocks = sorted({kind_of(files[0], t) for t in tensors.values()} & set(quant.BLOCKS))
    if blocks and base_quant == "none":
        log(f"{files[0]}: its {', '.join(blocks)} tensors are dequantized once, into fp32 (exact: full fine-tuning "
            "starts from these values); --mode=lora --base_quant=source keeps them as they are")
    return params, args, lambda name: read_module(files[0], tensors, args, name, module_shapes(args, name),
                                                  base_quant), gguf_file_type(meta)


def stored_kinds(files, base_quant, found=None):
    """(ModelArgs, [[key, kind]] as the offload stores them) of a GGUF source (found: its open_gguf), without
    converting it: a block format as it is (base_quant none: its values in float32), a float matrix quantized
    where base_quant q8_0 / q4_0 says (quant.kinds_at_conversion), else under its dtype's name."""
    meta, tensors = found or open_gguf(files)
    params = read_params(files[0], meta, tensors)
    args = model_args(params, params["vocab_size"])
    keys = []
    for name in module_names(args):
        quantized = quant.kinds_at_conversion(args, name, base_quant)
        for key in module_shapes(args, name):
            kind = stored_kind(kind_of(files[0], tensor_of(files[0], tensors, args, f"{name}.{key}")), base_quant)
            keys.append([f"{name}.{key}", kind if quant.is_quantized(kind) else quantized.get(key, kind)])
    return args, keys


def offload_bytes(files, base_quant):
    """Bytes of the offload of a GGUF source: its tensors as the offload will store them."""
    args, keys = stored_kinds(files, base_quant)
    shapes = {f"{name}.{key}": shape for name in module_names(args) for key, shape in module_shapes(args, name).items()}
    return sum(quant.stored_bytes(shapes[key], kind) for key, kind in keys)


# --- tensors ---

def stored_kind(kind, base_quant):
    """The kind the offload keeps a tensor of the file's kind in: a block format as it is (or, base_quant none, its
    values in float32), a float type under its dtype's name."""
    if quant.is_quantized(kind):
        return "float32" if base_quant == "none" else kind
    return dtype_name(quant.FLOATS[kind])


def tensor_of(path, tensors, args, key):
    """The GGUF tensor of a Meta key; one line where the file lacks it."""
    gname = gguf_key(key, args)
    if gname not in tensors:
        raise UserError(f"{path}: tensor {gname} ({key}) is missing")
    return tensors[gname]


def kind_of(path, tensor):
    kind = {number: name for name, number in quant.GGML_TYPES.items()}.get(int(tensor.tensor_type))
    if kind is None:
        raise UserError(f"{path}: tensor {tensor.name} is of type {tensor.tensor_type.name}; slowllama reads "
                        f"{', '.join(quant.GGML_TYPES)}")
    return kind


def read_module(path, tensors, args, name, shapes, base_quant):
    """({key: tensor}, {key: its kind}) of a module: floats as stored (bf16's bytes seen as bf16), block formats as
    their bytes, or dequantized into fp32 where base_quant is none; q/k rows in Meta's order."""
    out, kinds = {}, {}
    for key, shape in shapes.items():
        full = f"{name}.{key}"
        t = tensor_of(path, tensors, args, full)
        gname, kind = t.name, kind_of(path, t)
        values = tuple(int(n) for n in reversed(t.shape.tolist()))
        if values != tuple(shape):
            raise UserError(f"{path}: {gname} has shape {values}, but the model's metadata means {tuple(shape)}")
        data = torch.from_numpy(np.array(t.data))
        if kind == "bf16":
            data = data.view(torch.int16).view(torch.bfloat16)
        data = data.reshape(shape) if kind in quant.FLOATS else data.reshape(shape[0], -1)
        if quant.is_quantized(kind) and base_quant == "none":
            data = quant.dequantize(data, kind, shape[-1])
        p = permutation(full, args) if architecture(args) != "llama" else None
        out[key], kinds[key] = (to_meta_rows(data, *p) if p else data), stored_kind(kind, base_quant)
    return out, kinds


# --- the tokenizer ---

def write_tokenizer(path, meta, folder):
    """The tokenizer of a GGUF's metadata written into folder as a model folder's files: tokenizer.model
    (sentencepiece, for "llama") or tokenizer.json ("gpt2"), tokenizer_config.json (chat template, BOS, EOS)
    and generation_config.json (the ids that end a generation)."""
    model = meta.get("tokenizer.ggml.model")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not tokens:
        raise UserError(f"{path}: has no tokenizer (tokenizer.ggml.tokens)")
    types = types or [1] * len(tokens)
    token = lambda key: meta.get(f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    bos, eos, add_bos = token("bos"), token("eos"), bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    if model == "llama":
        (folder / "tokenizer.model").write_bytes(sentencepiece_model(meta, tokens, types))
    elif model == "gpt2":
        write_json(tokenizer_json(path, meta, tokens, types, bos if add_bos else None), folder / "tokenizer.json")
    else:
        raise UserError(f"{path}: tokenizer.ggml.model {model!r}; slowllama reads llama (sentencepiece) and gpt2 (BPE)")
    config = {"add_bos_token": add_bos, "bos_token": tokens[bos] if bos is not None else None,
              "eos_token": tokens[eos] if eos is not None else None}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    write_json(config, folder / "tokenizer_config.json")
    stops = [i for i in (eos, token("eot"), token("eom")) if i is not None]
    write_json({"eos_token_id": list(dict.fromkeys(stops))}, folder / "generation_config.json")


def field(number, wire, payload):
    """One protobuf field: varint (wire 0), bytes (2) or 4-byte (5) payload."""
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 5:
        return key + payload
    return key + varint(len(payload)) + payload


def varint(n):
    n &= (1 << 64) - 1  # negative int32s as their 64-bit two's complement, as protobuf writes them
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def sentencepiece_model(meta, tokens, types):
    """A sentencepiece ModelProto of the pieces, scores and types (a BPE model whose merges follow the pieces'
    scores, as llama.cpp's tokenizer of tokenizer.ggml.model "llama"), byte fallback where there are byte
    pieces, the dummy prefix as add_space_prefix says."""
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    pieces = b"".join(field(1, 2, field(1, 2, t.encode()) + field(2, 5, struct.pack("<f", s)) + field(3, 0, k))
                      for t, s, k in zip(tokens, scores, types))
    ids = {"unk": (40, 45, UNKNOWN), "bos": (41, 46, None), "eos": (42, 47, None), "padding": (43, 48, None)}
    trainer = field(3, 0, 2) + field(35, 0, int(BYTE in types))
    for key, (id_field, piece_field, kind) in ids.items():
        i = meta.get(f"tokenizer.ggml.{'unknown' if key == 'unk' else key}_token_id")
        if i is None and kind is not None:
            i = next((j for j, k in enumerate(types) if k == kind), None)
        trainer += field(id_field, 0, -1 if i is None else i)
        if i is not None:
            trainer += field(piece_field, 2, tokens[i].encode())
    normalizer = field(1, 2, b"identity") + field(3, 0, int(meta.get("tokenizer.ggml.add_space_prefix", True))) + \
        field(4, 0, 0) + field(5, 0, 1)
    return pieces + field(2, 2, trainer) + field(3, 2, normalizer)


def tokenizer_json(path, meta, tokens, types, bos):
    """Hugging Face's tokenizer.json of a byte-level BPE vocabulary ("gpt2"): its merges, the pre-tokenizer
    llama.cpp names (tokenizer.ggml.pre), control and user-defined tokens as added tokens, BOS put first by the
    post-processor where add_bos_token says so."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in PRE_TOKENIZERS:
        split = [{"type": "Split", "pattern": {"Regex": PRE_TOKENIZERS[pre]}, "behavior": "Isolated", "invert": False},
                 {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]
    elif pre in ("smollm", "gpt-2", "default"):
        split = [{"type": "Digits", "individual_digits": True}] * (pre == "smollm") + \
                [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]
    else:
        raise UserError(f"{path}: its pre-tokenizer {pre!r} is not one slowllama knows (llama-bpe, qwen2, smollm, "
                        "gpt-2); text would be split differently from llama.cpp")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": k == CONTROL} for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, USER_DEFINED)]
    post = None
    if bos is not None:
        special = {"SpecialToken": {"id": tokens[bos], "type_id": 0}}
        post = {"type": "TemplateProcessing", "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special,
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": split}, "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": pre == "llama-bpe", "vocab": {t: i for i, t in enumerate(tokens)},
                      "merges": list(meta.get("tokenizer.ggml.merges") or [])}}


def gguf_file_type(meta):
    """The type a merged export is written in: the source's where slowllama writes that type (f32, f16, bf16,
    q8_0), else None (f16)."""
    return {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}.get(meta.get("general.file_type"))
