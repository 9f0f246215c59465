"""LoRA adapter files: an adapter's settings, the model it fits and its (A, B) tensors, checked on load."""
from files import load_tensors
from llama import module_of, module_shapes
from utils import UserError


def model_identity(args):
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
            "vocab_size": args.vocab_size, "hidden_dim": args.hidden_dim}

def adapter_state(model, rank, alpha, dropout, targets):
    """An adapter as plain tensors and values: its settings, the model it fits, and every (A, B)."""
    return {"config": {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets),
                       "model": model_identity(model.args)},
            "tensors": {k: [a.detach().cpu(), b.detach().cpu()] for k, (a, b) in model.lora.items()}}

def read_adapter(path, model, rank=None):
    """(config, {key: (A, B)}) of an adapter file, checked against the model (and the rank, if given)."""
    data = load_tensors(path, mmap=False)
    if not isinstance(data, dict) or "config" not in data or "tensors" not in data:
        raise UserError(f"{path}: not a slowllama adapter (no config and tensors)")
    config, tensors = data["config"], data["tensors"]
    if config.get("model") != model_identity(model.args):
        raise UserError(f"{path}: the adapter was made for another model ({config.get('model')}), "
                        f"not for this one ({model_identity(model.args)})")
    if rank is not None and config["rank"] != rank:
        raise UserError(f"{path}: the adapter has rank {config['rank']}, not lora_rank={rank}")
    for key, (a, b) in tensors.items():
        name, local = module_of(key)
        shape = module_shapes(model.args, name.split(".")[0]).get(local)
        if shape is None or tuple(a.shape) != (config["rank"], shape[1]) or tuple(b.shape) != (shape[0], config["rank"]):
            raise UserError(f"{path}: adapter tensors for {key} do not fit this model")
    return data

def attach_adapter(model, path):
    data = read_adapter(path, model)
    c = data["config"]
    model.add_lora(c["rank"], c["alpha"], c["dropout"], c["targets"], tensors=data["tensors"])
    return data
