"""Hugging Face's layout in and out, and PEFT adapters.

A Hugging Face folder holds config.json, model.safetensors (or model-0000N-of-0000M.safetensors with
model.safetensors.index.json, or pytorch_model*.bin) and its tokenizer files. Its names differ from Meta's
(each family's: architectures.py), and q/k rows are permuted: Hugging Face's rotary embedding rotates the
two halves of each head (of its rotary features), Meta's adjacent pairs, so Meta's rows (2i, 2i+1) of a head
are rows (i, i + rotary/2). Phi-3's fused q/k/v and gate/up projections are split on reading, joined on writing.
"""
import contextlib
import math
from pathlib import Path

import torch

from architectures import PREFIXES, fused_parts, hf_name
from files import fsync_path, safetensors_header, write_json
from model import module_of, module_shapes
from utils import UserError, read_json_object

MAX_FILE_BYTES = 5 * 10**9  # Hugging Face's default largest file when saving


def to_hf_rows(w, n_heads, rotary=None):
    """Meta's q/k rows into Hugging Face's order: per head, of its first rotary rows (all by default), the
    even rows first, then the odd ones; the rows past them as they are."""
    head = w.shape[0] // n_heads
    r, rest = rotary or head, w.shape[1:]
    x = w.reshape(n_heads, head, *rest)
    turned = x[:, :r].reshape(n_heads, r // 2, 2, *rest).transpose(1, 2).reshape(n_heads, r, *rest)
    return torch.cat((turned, x[:, r:]), 1).reshape(w.shape)


def to_meta_rows(w, n_heads, rotary=None):
    head = w.shape[0] // n_heads
    r, rest = rotary or head, w.shape[1:]
    x = w.reshape(n_heads, head, *rest)
    turned = x[:, :r].reshape(n_heads, 2, r // 2, *rest).transpose(1, 2).reshape(n_heads, r, *rest)
    return torch.cat((turned, x[:, r:]), 1).reshape(w.shape)


def permutation(key, args):
    """(heads, rotary features) a tensor's rows are permuted over between the layouts, or None: q and k with
    their biases per head; the q and k norms' weights within the head (over each head: one head wide) or
    over every head (over the whole projection)."""
    local = key.split(".", 2)[-1]
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.kv_heads,
             "attention.wq.bias": args.n_heads, "attention.wk.bias": args.kv_heads,
             "attention.q_norm.weight": 1 if args.qk_norm == "head" else args.n_heads,
             "attention.k_norm.weight": 1 if args.qk_norm == "head" else args.kv_heads}.get(local)
    return (heads, args.rotary_dim) if heads else None


def hf_rows(key, tensor, args):
    """A tensor of a Meta key in Hugging Face's row order."""
    p = permutation(key, args)
    return to_hf_rows(tensor, *p) if p else tensor


# --- reading ---

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


def text_prefix(files):
    """Where the text model's tensors are in a folder's names: "model.", or an image-text model's text part."""
    return next((p for p in PREFIXES if f"{p}embed_tokens.weight" in files), "model.")


def read_module(files, keys, args):
    """{Meta key: tensor} of one module, read from the files that hold it, rows in Meta's order."""
    prefix, wanted = text_prefix(files), {}
    for key in keys:
        name = hf_name(key, args, prefix)
        if name == "lm_head.weight" and name not in files:  # tied embeddings
            name = prefix + "embed_tokens.weight"
        if name not in files:
            raise UserError(f"{next(iter(files.values())).parent}: missing tensor {name}")
        wanted.setdefault(files[name], {})[name] = None
    stored = {}
    for file, names in wanted.items():
        if file.suffix == ".safetensors":
            with open_safetensors(file) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise UserError(f"{file}: missing tensor {name}")
                    stored[name] = f.get_tensor(name).clone()
        else:
            data = open_bin(file)
            for name in names:
                if not isinstance(data.get(name), torch.Tensor):
                    raise UserError(f"{file}: missing tensor {name}")
                stored[name] = data[name].clone()
            del data
    tensors = {}
    for key in keys:
        name = hf_name(key, args, prefix)
        t = stored.get(name, stored.get(prefix + "embed_tokens.weight"))
        parts = fused_parts(name, args)
        if parts:  # this key's rows of the fused tensor
            sizes = [module_shapes(args, "layers")[module_of(part)[1]][0] for part in parts]
            if t.shape[0] != sum(sizes):
                raise UserError(f"{files[name]}: {name} has {t.shape[0]} rows, but the model's settings mean {sum(sizes)}")
            t = t.split(sizes)[parts.index(key)].clone()
        p = permutation(key, args)
        tensors[key] = to_meta_rows(t, *p) if p else t
    return tensors


# --- writing ---

def config_for(args, dtype, source_config=None, bos_id=1, eos_id=2):
    """config.json of an export: the source's own where it has one (with the dtype the weights are written in),
    else one written from the settings (a source in Meta's layout)."""
    if source_config is not None:  # transformers 5 names the dtype "dtype", 4 "torch_dtype"
        keys = [k for k in ("torch_dtype", "dtype") if k in source_config] or ["torch_dtype"]
        return {**source_config, **dict.fromkeys(keys, str(dtype).removeprefix("torch."))}
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


def hf_entries(args, entries):
    """[(Hugging Face name, shape, dtype)] of [(Meta key, shape, dtype)]: fused tensors once, their rows summed."""
    out = {}
    for key, shape, dtype in entries:
        name = hf_name(key, args)
        if name in out:
            out[name] = (name, (out[name][1][0] + shape[0], *shape[1:]), dtype)
        else:
            out[name] = (name, tuple(shape), dtype)
    return list(out.values())


def hf_tensors(module, args):
    """{Hugging Face name: tensor} of a module's {Meta key: tensor}: rows in Hugging Face's order, fused
    tensors joined."""
    out = {}
    for key, t in module.items():
        name = hf_name(key, args)
        parts = fused_parts(name, args)
        if parts is None:
            out[name] = hf_rows(key, t, args)
        elif key == parts[0]:
            out[name] = torch.cat([hf_rows(part, module[part], args) for part in parts])
    return out


def write_model(out_dir, args, entries, modules, config):
    """Stream a model into Hugging Face safetensors files (model.safetensors, or several of at most
    MAX_FILE_BYTES with an index): every file's header is known beforehand, so tensors are written
    as their modules come. entries: [(Meta key, shape, dtype)] in module order; modules: {Meta key: tensor}
    dicts in that order."""
    out_dir = Path(out_dir)
    files, size = [[]], 0
    for entry in hf_entries(args, entries):
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if files[-1] and size + nbytes > MAX_FILE_BYTES:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += nbytes
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    tmp = [out_dir / f"{name}.tmp" for name in names]
    modules, pending = iter(modules), {}

    def take(name):  # the tensor of name, from the modules as they come
        while name not in pending:
            pending.update(hf_tensors(next(modules), args))
        return pending.pop(name)
    try:
        for path, group in zip(tmp, files):
            with open(path, "wb") as f:
                f.write(safetensors_header(group))
                for name, _, dtype in group:
                    f.write(take(name).to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
        for path, name in zip(tmp, names):
            fsync_path(path)
            path.replace(out_dir / name)
    finally:
        for path in tmp:
            path.unlink(missing_ok=True)
    if len(files) > 1:
        weight_map = {n: name for name, group in zip(names, files) for n, _, _ in group}
        total = sum(math.prod(s) * d.itemsize for _, s, d in entries)
        write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, out_dir / "model.safetensors.index.json")
    write_json(config, out_dir / "config.json")


def sentencepiece_tokenizer_config(out_dir):
    """tokenizer_config.json for a sentencepiece tokenizer.model that came without one (Meta's folders)."""
    write_json({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False}, out_dir / "tokenizer_config.json")


def write_peft(out_dir, model, lora, base_name="", log=print):
    """The adapter as PEFT saves one for the Hugging Face model: adapter_config.json and
    adapter_model.safetensors, B's rows of q/k permuted like their weights. On a fused projection (Phi-3's
    qkv_proj, gate_up_proj) the adapters of its parts are one adapter of it (adapters.stacked_adapters), its
    rank the parts' together and its alpha as many times lora.alpha, in rank_pattern and alpha_pattern: the
    same products, the same scale. A mixture's experts and routers: peft_experts. Returns the folder, or None
    where PEFT would not load the adapter as trained."""
    from safetensors.torch import save_file

    from adapters import stacked_adapters
    out_dir = Path(out_dir)
    if model.args.n_experts and any(k.split(".")[2] == "feed_forward" and ".gate." not in k for k in model.lora
                                    if k.startswith("layers.")):
        log(f"{out_dir} not written: PEFT loads adapters of a mixture's dense MLP layers (mlp_only_layers) as if they "
            "were its experts'; adapter.pt and the merged model hold them")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    stacked = stacked_adapters(model, lambda key: hf_name(key, model.args).removesuffix(".weight"),
                               lambda key, b: hf_rows(key, b, model.args))
    routed = [key for key in model.lora if ".experts." in key or key.endswith("feed_forward.gate.weight")]
    for key in routed:  # (the routers': in peft_experts too)
        stacked.pop(hf_name(key, model.args).removesuffix(".weight"), None)
    tensors = {f"base_model.model.{name}.lora_{ab}.weight": t.contiguous()
               for name, (a, b, _) in stacked.items() for ab, t in (("A", a), ("B", b))}
    stacks = {name.split(".")[-1]: n for name, (_, _, n) in stacked.items() if n > 1}
    parameters, parts = peft_experts(model, routed, tensors)
    stacks.update({name: n for name, n in parts.items() if n > 1})
    save_file(tensors, out_dir / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": 0.0 if parameters else lora.dropout,  # (PEFT's adapters of parameters take none)
              "target_modules": sorted({name.split(".")[-1] for name in stacked}) or None,
              "target_parameters": parameters or None,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_name,
              "modules_to_save": None, "rank_pattern": {m: n * lora.rank for m, n in stacks.items()},
              "alpha_pattern": {m: n * lora.alpha for m, n in stacks.items()}}
    write_json(config, out_dir / "adapter_config.json")
    return out_dir


def peft_experts(model, keys, tensors):
    """A mixture's adapters (of keys: experts' and routers') as PEFT adapts transformers 5's model, whose experts
    are one parameter per block and weight (mlp.experts.gate_up_proj: gate over up rows, each expert's;
    mlp.experts.down_proj) and whose router is a parameter (mlp.gate.weight): with target_parameters. An
    expert's w1 and w3 adapters are one of its gate_up rows, stacked as a fused projection's (rank and alpha
    times the parts, in rank_pattern and alpha_pattern). PEFT's adapter of a (experts, out, in) parameter holds
    expert e's A in rows e * r to (e + 1) * r and its B in columns j * experts + e; of several parameters of one
    module, the one listed first there wraps as its base_layer. Adds the tensors to tensors; returns
    (target_parameters, {parameter: parts stacked})."""
    args, per_block = model.args, {}
    for key in keys:
        _, layer, local = key.split(".", 2)
        per_block.setdefault(int(layer), []).append(local)
    parameters, parts = set(), {}
    for layer, locals_ in per_block.items():
        prefix = f"base_model.model.model.layers.{layer}.mlp"
        if "feed_forward.gate.weight" in locals_:
            a, b = model.lora[f"layers.{layer}.feed_forward.gate.weight"]
            tensors.update({f"{prefix}.gate.lora_A.weight": a.detach().cpu().float().contiguous(),
                            f"{prefix}.gate.lora_B.weight": b.detach().cpu().float().contiguous()})
            parameters.add("mlp.gate.weight")
        weights = {local.split(".")[2] for local in locals_ if local.startswith("experts.")}
        params = [p for p, ws in (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))) if weights & set(ws)]
        hidden = args.moe_hidden_dim or args.hidden_dim
        for i, param in enumerate(params):
            where = f"{prefix}.experts" + ".base_layer" * (len(params) - 1 - i)
            a_rows, b_columns = [], []
            for e in range(args.n_experts):
                pieces = [(w, model.lora.get(f"layers.{layer}.experts.{e}.{w}.weight")) for w in
                          (("w1", "w3") if param == "gate_up_proj" else ("w2",))]
                pieces = [(w, [t.detach().cpu().float() for t in pair]) for w, pair in pieces if pair is not None]
                b = torch.zeros(2 * hidden if param == "gate_up_proj" else args.dim, len(pieces) * pieces[0][1][0].shape[0])
                for j, (w, (a_w, b_w)) in enumerate(pieces):
                    rows = slice(hidden if w == "w3" else 0, (hidden if w == "w3" else 0) + b_w.shape[0])
                    b[rows, j * b_w.shape[1]:(j + 1) * b_w.shape[1]] = b_w
                a_rows.append(torch.cat([a_w for _, (a_w, _) in pieces]))
                b_columns.append(b)
            tensors.update({f"{where}.lora_A.weight": torch.cat(a_rows).contiguous(),
                            f"{where}.lora_B.weight": torch.stack(b_columns, -1).flatten(1).contiguous()})
            parameters.add(f"mlp.experts.{param}")
            parts[param] = len(pieces)
    return sorted(parameters), parts
