"""Meta's checkpoint layout: params.json and consolidated.NN.pth shards, read and written.

A model folder holds params.json, consolidated.00.pth ... (one shard per model-parallel rank) and
tokenizer.model. Each weight is split across the shards along one dimension (norms are replicated).
Shards are read through memory maps, a module's slices at a time, and written by laying each shard
out first and filling it through a shared memory map, so neither needs a whole shard in RAM.
"""
import mmap
import os
import shutil
from pathlib import Path

import torch

from files import fsync_path, published
from model import ModelArgs, module_shapes
from utils import UserError, check_keys, progress, read_json_object

# Meta's model-parallel layout: the dimension along which each weight is split across shards
# (weights not named here, such as the norms, are replicated in every shard)
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}

def split_dim(key):
    parts = key.split(".")
    return SPLIT_DIM.get(parts[-2] if len(parts) > 1 else parts[0])

def shard_shape(key, shape, n_shards):
    dim = split_dim(key)
    if dim is None:
        return tuple(shape)
    if shape[dim] % n_shards:
        raise UserError(f"{key} has {shape[dim]} along dimension {dim}, which {n_shards} shards cannot split evenly")
    return tuple(s // n_shards if d == dim else s for d, s in enumerate(shape))

def shard_slice(tensor, key, shard, n_shards):
    dim = split_dim(key)
    if dim is None:
        return tensor
    size = tensor.shape[dim] // n_shards
    return tensor.narrow(dim, shard * size, size)

def expected_shard_shape(model_dir, key, shape, n_shards):
    try:
        return shard_shape(key, shape, n_shards)
    except UserError:
        raise UserError(f"{model_dir}: {n_shards} shards, but {key} of shape {tuple(shape)} cannot be split into "
                        f"{n_shards} equal parts; is a shard missing, or one too many?")


# --- reading ---

def read_params(model_dir):
    path = Path(model_dir) / "params.json"
    params = read_json_object(path, "; a Llama model folder holds params.json, consolidated.NN.pth and tokenizer.model")
    required = {"dim": "a positive integer", "n_layers": "a positive integer", "n_heads": "a positive integer",
                "norm_eps": "a positive number"}
    if "hidden_dim" not in params:  # Mistral's params.json gives the FFN size instead of Meta's formula
        required["multiple_of"] = "a positive integer"
    check_keys(path, params, required, {
        "n_kv_heads": "a positive integer or null", "vocab_size": "a positive integer or -1",
        "multiple_of": "a positive integer", "ffn_dim_multiplier": "a positive number or null",
        "rope_theta": "a positive number or null", "hidden_dim": "a positive integer",
        "use_scaled_rope": "true or false", "rope_scaling_factor": "a positive number or null",
        "head_dim": "a positive integer or null", "max_seq_len": "a positive integer"})
    check_heads(path, params["dim"], params["n_heads"], params.get("n_kv_heads") or params["n_heads"])
    return params


def check_heads(path, dim, n_heads, kv, names=("dim", "n_heads", "n_kv_heads")):
    """Refuses head counts the weights cannot be split by; names: the three settings as the file calls them."""
    if dim % n_heads or n_heads % kv or (dim // n_heads) % 2:
        raise UserError(f"{path}: {names[0]}={dim}, {names[1]}={n_heads}, {names[2]}={kv} do not fit "
                        f"({names[0]} must split into heads of even size, {names[1]} into groups of {names[2]})")


# the settings of the other families, under ModelArgs' own names
VARIANTS = ("family", "norms", "norm_offset", "activation", "embed_scale", "attn_scale", "attn_softcap", "final_softcap",
            "layer_types", "rope_local_theta", "rotary_dim", "pad_id", "n_experts", "top_k", "moe_hidden_dim",
            "norm_topk", "dense_layers")


def model_args(params, vocab_size):
    """ModelArgs of params in Meta's terms (params.json, or what hf_format.read_config makes of config.json)."""
    scaling = params.get("rope_scaling")
    if params.get("use_scaled_rope") and not scaling:  # Meta's Llama 3.1 to 3.3
        # Meta's params.json does not say the factor: 8 as for Llama 3.1, unless rope_scaling_factor is
        # given (Llama 3.2 1B and 3B were trained with 32, as their Hugging Face config.json says)
        scaling = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor") or 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": params.get("rope_high_freq_factor") or 4.0,
                   "original_max_position_embeddings": 8192}
    qk_norm = params.get("qk_norm")
    return ModelArgs(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                     vocab_size=vocab_size, n_kv_heads=params.get("n_kv_heads"),
                     multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                     norm_eps=params["norm_eps"], rope_theta=params.get("rope_theta") or 10000.0,
                     ffn_dim=params.get("hidden_dim"), explicit_head_dim=params.get("head_dim"),
                     qkv_bias=bool(params.get("qkv_bias")), qk_norm="head" if qk_norm is True else qk_norm or None,
                     tied=bool(params.get("tie_embeddings")), rope_scaling=scaling,
                     sliding_window=params.get("sliding_window"),
                     max_seq_len=params.get("max_position_embeddings") or params.get("max_seq_len"),
                     **{k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in VARIANTS})


def meta_params(args):
    """params.json for a model read from another layout: its FFN size as Meta's formula gives it, or,
    where no multiple_of does, as an explicit hidden_dim; the variants of other families as keys of
    their own (read back by model_args)."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": 256, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta}
    if model_args(params, args.vocab_size).hidden_dim != args.hidden_dim:
        params["hidden_dim"] = args.hidden_dim
    variants = {"head_dim": args.explicit_head_dim if args.head_dim != args.dim // args.n_heads else None,
                "qkv_bias": args.qkv_bias, "qk_norm": args.qk_norm, "tie_embeddings": args.tied,
                "rope_scaling": args.rope_scaling, "sliding_window": args.sliding_window,
                "max_position_embeddings": args.max_seq_len,
                **{k: getattr(args, k) for k in VARIANTS if getattr(args, k) != ModelArgs.__dataclass_fields__[k].default}}
    return {**params, **{k: list(v) if isinstance(v, tuple) else v for k, v in variants.items()
                         if v is not None and v is not False and (v != 0 or k == "pad_id")}}


def shard_files(model_dir):
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model folder not found")
    files = sorted(model_dir.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{model_dir}: no consolidated.00.pth shard found")
    for i, f in enumerate(files):
        if f.name != f"consolidated.{i:02d}.pth":
            raise UserError(f"{f}: unexpected shard name; shards are numbered consolidated.00.pth to "
                            f"consolidated.{len(files) - 1:02d}.pth without gaps")
    return files

def read_source(model_dir):
    """(params, ModelArgs, shard files, the first shard memory-mapped) of a Meta folder: params.json's
    settings with what the first shard tells (tied embeddings where it has no output.weight: Llama 3.2 1B,
    3B; the vocabulary from the table where params.json says -1). Only the shard's headers are read."""
    params, shards = read_params(model_dir), shard_files(model_dir)
    first = read_shard(shards[0])
    if "tok_embeddings.weight" not in first:
        raise UserError(f"{shards[0]}: no tok_embeddings.weight tensor; is this a Llama checkpoint?")
    params = {**params, "tie_embeddings": "output.weight" not in first}
    vocab = params.get("vocab_size", -1)
    args = model_args(params, vocab if vocab and vocab > 0 else first["tok_embeddings.weight"].shape[0])
    return params, args, shards, first


def read_shard(path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot be read as a checkpoint of plain tensors "
                        f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})")

def read_meta_module(model_dir, shards, args, name):
    """{key: tensor} of one module, its slices read from every shard (memory-mapped, one at a time)."""
    tensors = {}
    for shard_index, path in enumerate(shards):
        data = read_shard(path)  # memory-mapped: only this module's slices are read
        for local, shape in module_shapes(args, name).items():
            key = f"{name}.{local}"
            if key not in data:
                raise UserError(f"{path}: missing tensor {key}")
            part, want = data[key], expected_shard_shape(model_dir, key, shape, len(shards))
            if tuple(part.shape) != want:
                raise UserError(f"{path}: {key} has shape {tuple(part.shape)}, but params.json and "
                                f"{len(shards)} shard(s) mean {want}")
            if shard_index == 0:
                tensors[key] = torch.empty(shape, dtype=part.dtype)
            shard_slice(tensors[key], key, shard_index, len(shards)).copy_(part)
        del data
    return tensors


# --- writing ---

def write_checkpoint(out_dir, entries, modules, n_modules, n_shards, params_file, tokenizer_file):
    """Stream tensors into Meta's shards without holding a shard in memory: each shard file is laid
    out first with its bytes left empty, then every module's slices are written into it through a
    shared memory map, one module at a time. entries: [(key, full shape, dtype)] in file order;
    modules: dicts {key: full tensor} covering every key once."""
    out_dir = Path(out_dir)
    shapes = {k: shard_shape(k, shape, n_shards) for k, shape, _ in entries}  # refuses before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = [out_dir / f"consolidated.{s:02d}.pth.tmp{os.getpid()}" for s in range(n_shards)]
    try:
        for path in tmp:
            skeleton = {k: torch.empty(shapes[k], dtype=dt) for k, _, dt in entries}
            with torch.serialization.skip_data():
                torch.save(skeleton, path)
        for tensors in progress(modules, f"writing {out_dir.name}", total=n_modules, unit="module"):
            for s, path in enumerate(tmp):
                with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                    shard = torch.load(path, mmap=True, weights_only=True)
                for key, tensor in tensors.items():
                    shard[key].copy_(shard_slice(tensor, key, s, n_shards))
                del shard
        for s, path in enumerate(tmp):
            fsync_path(path)
            os.replace(path, out_dir / f"consolidated.{s:02d}.pth")
        for stale in out_dir.glob("consolidated.*.pth"):
            if int(stale.name.split(".")[1]) >= n_shards:
                stale.unlink()
        for src in (params_file, tokenizer_file):
            if Path(src).resolve() != (out_dir / Path(src).name).resolve():
                with published(out_dir / Path(src).name) as tmp_copy:
                    shutil.copyfile(src, tmp_copy)
        fsync_path(out_dir)
    finally:
        for path in tmp:
            path.unlink(missing_ok=True)
