"""Hugging Face's Llama layout in and out, and PEFT adapters.

A Hugging Face folder holds config.json, model.safetensors (or model-0000N-of-0000M.safetensors with
model.safetensors.index.json, or pytorch_model*.bin) and tokenizer.model. Its names differ from Meta's,
and q_proj/k_proj rows are permuted: Hugging Face's rotary embedding rotates the two halves of each
head, Meta's rotates adjacent pairs, so Meta's rows (2i, 2i+1) of a head are rows (i, i + head_dim/2).
"""
import contextlib
import math
from pathlib import Path

import torch

from files import fsync_path, safetensors_header, write_json
from meta_format import check_heads
from utils import UserError, check_keys, read_json_object

# the Llama family: Llama 2 / 3.x, CodeLlama, SmolLM2, TinyLlama; Mistral; Qwen 2 / 2.5 (q, k, v biases);
# Qwen 3 (q and k norms, wider heads)
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
BLOCK_NAMES = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
               "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
               "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
               "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
               "ffn_norm.weight": "post_attention_layernorm.weight",
               "attention.wq.bias": "self_attn.q_proj.bias", "attention.wk.bias": "self_attn.k_proj.bias",
               "attention.wv.bias": "self_attn.v_proj.bias", "attention.q_norm.weight": "self_attn.q_norm.weight",
               "attention.k_norm.weight": "self_attn.k_norm.weight"}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
MAX_FILE_BYTES = 5 * 10**9  # Hugging Face's default largest file when saving


def hf_key(key):
    """Hugging Face's name of a Meta key: layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    _, layer, local = key.split(".", 2)
    return f"model.layers.{layer}.{BLOCK_NAMES[local]}"


def to_hf_rows(w, n_heads):
    """Meta's q/k rows into Hugging Face's order: per head, the even rows first, then the odd ones."""
    head = w.shape[0] // n_heads
    return w.reshape(n_heads, head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_meta_rows(w, n_heads):
    head = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permuted_heads(key, args):
    """How many heads a tensor's rows are permuted over between the layouts (0: not permuted): q and k
    with their biases per head; the q and k norms' weights, one head wide, within the head."""
    return {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.kv_heads,
            "attention.wq.bias": args.n_heads, "attention.wk.bias": args.kv_heads,
            "attention.q_norm.weight": 1, "attention.k_norm.weight": 1}.get(key.split(".", 2)[-1], 0)


# --- reading ---

def read_config(folder):
    """(params in Meta's terms, the raw config) of a Hugging Face Llama folder."""
    path = Path(folder) / "config.json"
    config = read_json_object(path)
    check_keys(path, config, {
        "architectures": "a non-empty list of strings", "hidden_size": "a positive integer",
        "num_hidden_layers": "a positive integer", "num_attention_heads": "a positive integer",
        "intermediate_size": "a positive integer", "vocab_size": "a positive integer"}, {
        "num_key_value_heads": "a positive integer or null", "rms_norm_eps": "a positive number",
        "rope_theta": "a positive number or null", "head_dim": "a positive integer or null",
        "tie_word_embeddings": "true or false", "max_position_embeddings": "a positive integer"})
    arch = config["architectures"][0]
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: architecture {arch} is not supported; slowllama reads the Llama family "
                        f"({', '.join(ARCHITECTURES)})")
    n_heads = config["num_attention_heads"]
    params = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
              "n_kv_heads": config.get("num_key_value_heads") or n_heads, "vocab_size": config["vocab_size"],
              "multiple_of": 256, "hidden_dim": config["intermediate_size"],
              "norm_eps": config.get("rms_norm_eps", 1e-6),  # transformers' default
              "rope_theta": rope_theta(config), "head_dim": config.get("head_dim") or config["hidden_size"] // n_heads,
              "qkv_bias": arch == "Qwen2ForCausalLM",
              "qk_norm": arch == "Qwen3ForCausalLM", "tie_embeddings": bool(config.get("tie_word_embeddings")),
              "rope_scaling": rope_scaling(path, config), "max_position_embeddings": config.get("max_position_embeddings"),
              "sliding_window": sliding_window(path, arch, config)}
    if config.get("head_dim"):  # heads of their own width (Qwen 3)
        check_heads(path, params["head_dim"] * n_heads, n_heads, params["n_kv_heads"],
                    ("num_attention_heads * head_dim", "num_attention_heads", "num_key_value_heads"))
    else:
        check_heads(path, params["dim"], n_heads, params["n_kv_heads"],
                    ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    for key in ("attention_bias", "mlp_bias"):  # biases on every projection: not in these models' releases
        if config.get(key):
            raise UserError(f"{path}: {key} is not supported")
    return params, config


def rope_theta(config):
    parameters = config.get("rope_parameters") or {}
    return config.get("rope_theta") or parameters.get("rope_theta") or 10000.0


def rope_scaling(path, config):
    """The rope scaling of config.json (transformers 4's rope_scaling or 5's rope_parameters) as
    {"rope_type": ..., parameters}, or None; types other than llama3, linear and yarn are refused."""
    scaling = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear", "yarn"):
        raise UserError(f"{path}: rope scaling {kind!r} is not supported; slowllama reads llama3, linear and yarn")
    needed = {"linear": ("factor",), "yarn": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    missing = [key for key in needed if not isinstance(scaling.get(key), (int, float))]
    if missing:
        raise UserError(f"{path}: rope scaling {kind} needs the number {missing[0]!r}")
    if kind == "yarn" and not (scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings")):
        raise UserError(f"{path}: yarn rope scaling needs original_max_position_embeddings or max_position_embeddings")
    return {"rope_type": kind, **scaling}


def sliding_window(path, arch, config):
    """Mistral's attention window (None: none). Qwen's optional window is off unless use_sliding_window."""
    if arch.startswith("Qwen"):
        if config.get("use_sliding_window"):
            raise UserError(f"{path}: use_sliding_window (Qwen's windowed layers) is not supported")
        return None
    window = config.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise UserError(f"{path}: sliding_window must be a positive integer or null, not {window!r}")
    return window


def weight_files(folder):
    """{Hugging Face key: file} of a folder, from its index or its single weights file, each file there."""
    folder = Path(folder)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = read_json_object(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
                raise UserError(f"{folder / index}: weight_map must map tensor names to the files of this folder")
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise UserError(f"{folder / missing[0]}: not found, but {index} names it")
            return {k: folder / f for k, f in weight_map.items()}
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return {k: folder / single for k in keys_of(folder / single)}
    raise UserError(f"{folder}: no model.safetensors or pytorch_model.bin (nor an index of them)")


def keys_of(file):
    if file.suffix == ".safetensors":
        with open_safetensors(file) as f:
            return list(f.keys())
    return list(open_bin(file))


@contextlib.contextmanager
def open_safetensors(file):
    """safetensors' reader of a file; a damaged or incomplete file is one UserError line naming it."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise UserError(f"{file}: not a complete safetensors file ({str(e).strip()[:160]}); the file is damaged or "
                        "was not fully downloaded")


def open_bin(file):
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"{file}: cannot be read as plain tensors ({str(e).strip().splitlines()[0][:160]})")


def read_module(files, keys, args):
    """{Meta key: tensor} of one module, read from the files that hold it, rows in Meta's order."""
    wanted = {}
    for key in keys:
        name = hf_key(key)
        if name == "lm_head.weight" and name not in files:  # tied embeddings
            name = "model.embed_tokens.weight"
        if name not in files:
            raise UserError(f"{next(iter(files.values())).parent}: missing tensor {name}")
        wanted.setdefault(files[name], []).append((key, name))
    tensors = {}
    for file, names in wanted.items():
        if file.suffix == ".safetensors":
            with open_safetensors(file) as f:
                present = set(f.keys())
                for key, name in names:
                    if name not in present:
                        raise UserError(f"{file}: missing tensor {name}")
                    tensors[key] = f.get_tensor(name).clone()
        else:
            data = open_bin(file)
            for key, name in names:
                if not isinstance(data.get(name), torch.Tensor):
                    raise UserError(f"{file}: missing tensor {name}")
                tensors[key] = data[name].clone()
            del data
    for key, t in tensors.items():
        if permuted_heads(key, args):
            tensors[key] = to_meta_rows(t, permuted_heads(key, args))
    return tensors


# --- writing ---

def config_for(args, dtype, source_config=None, bos_id=1, eos_id=2):
    """config.json of an export: the source's own where it has one, else one written from the settings."""
    if source_config is not None:
        return source_config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
              "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "max_position_embeddings": args.max_seq_len or 4096, "hidden_act": "silu", "bos_token_id": bos_id,
              "eos_token_id": eos_id, "tie_word_embeddings": args.tied, "attention_bias": False, "mlp_bias": False,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    if args.rope_scaling:
        config["rope_scaling"] = args.rope_scaling
    return config


def write_model(out_dir, args, entries, modules, config):
    """Stream a model into Hugging Face safetensors files (model.safetensors, or several of at most
    MAX_FILE_BYTES with an index): every file's header is known beforehand, so tensors are written
    as their modules come. entries: [(Meta key, shape, dtype)] in module order."""
    out_dir = Path(out_dir)
    files, size = [[]], 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if files[-1] and size + nbytes > MAX_FILE_BYTES:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += nbytes
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    tmp = [out_dir / f"{name}.tmp" for name in names]
    tensors = (item for module in modules for item in module.items())  # in the order of entries
    try:
        for path, group in zip(tmp, files):
            with open(path, "wb") as f:
                f.write(safetensors_header([(hf_key(k), s, d) for k, s, d in group]))
                for key, _, dtype in group:
                    name, tensor = next(tensors)
                    assert name == key, (name, key)
                    if permuted_heads(key, args):
                        tensor = to_hf_rows(tensor, permuted_heads(key, args))
                    f.write(tensor.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
        for path, name in zip(tmp, names):
            fsync_path(path)
            path.replace(out_dir / name)
    finally:
        for path in tmp:
            path.unlink(missing_ok=True)
    if len(files) > 1:
        weight_map = {hf_key(k): name for name, group in zip(names, files) for k, _, _ in group}
        total = sum(math.prod(s) * d.itemsize for _, s, d in entries)
        write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, out_dir / "model.safetensors.index.json")
    write_json(config, out_dir / "config.json")


def sentencepiece_tokenizer_config(out_dir):
    """tokenizer_config.json for a sentencepiece tokenizer.model that came without one (Meta's folders)."""
    write_json({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False}, out_dir / "tokenizer_config.json")


def write_peft(out_dir, model, lora, base_name=""):
    """The adapter as PEFT saves one for the Hugging Face model: adapter_config.json and
    adapter_model.safetensors, B's rows of q_proj/k_proj permuted like their weights."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, set()
    for key, (a, b) in model.lora.items():
        name = hf_key(key).removesuffix(".weight")
        heads = permuted_heads(key, model.args) if key.startswith("layers.") else 0
        b = to_hf_rows(b.detach().cpu(), heads) if heads else b.detach().cpu()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        modules.add(name.split(".")[-1])
    save_file(tensors, out_dir / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": base_name, "modules_to_save": None}
    write_json(config, out_dir / "adapter_config.json")
