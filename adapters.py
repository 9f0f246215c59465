"""LoRA: adapters on the model's weights, their files (an adapter's settings, the model it fits and its
(A, B) tensors, checked on load), and the fp32 copy of the frozen base a LoRA run in fp32 maps."""
import math
import shutil
from contextlib import contextmanager

import torch

from architectures import FUSED
from files import load_tensors, read_tensors, write_tensors
from model import lora_target, module_of, module_shapes
from settings import Lora
from utils import UserError, gb


def adapted(model, targets):
    """[(box, key, full name)] of the weights LoRA adapts with these targets (settings.Lora.targets), in order:
    the blocks' matrices (a mixture's router and each expert's), and the output projection (which is the
    embedding table where tied)."""
    blocks = [box for name, box in model.boxes.items() if name.startswith("layers.")]  # each block, its experts
    return [(box, key, "output.weight" if box is model.output else f"{box.name}.{key}")
            for box in [*blocks, model.output] for key, shape in box.shapes.items()
            if len(shape) == 2 and lora_target("output" if box is model.output else box.name, key) in targets]


def add_lora(model, lora, seed=0, tensors=None):
    """Adapters W x + alpha/rank * B A dropout(x) on the weights named in lora.targets (settings.Lora);
    A random and B zero as in the LoRA paper, or the given {name: (A, B)}."""
    generator = torch.Generator().manual_seed(seed)
    model.lora = {}
    for box, key, name in adapted(model, lora.targets):
        shape = box.shapes[key]
        if tensors is not None:
            a, b = tensors[name]
        else:  # A like nn.Linear's default initialisation of a (rank x in) weight
            a = (torch.rand(lora.rank, shape[1], generator=generator) * 2 - 1) / math.sqrt(shape[1])
            b = torch.zeros(shape[0], lora.rank)
        a, b = (t.detach().to(model.device, torch.float32).clone().requires_grad_() for t in (a, b))
        model.lora[name] = (a, b)
        box.lora[key] = (a, b, lora.scale, lora.dropout)


def adapted_params(model, targets):
    """Rows plus columns of the weights LoRA adapts with these targets: its adapters' parameters per unit of
    rank (for the disk its checkpoints need)."""
    return sum(sum(box.shapes[key]) for box, key, _ in adapted(model, targets))


# --- files ---

def model_identity(args):
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
            "vocab_size": args.vocab_size, "hidden_dim": args.hidden_dim}


def adapter_state(model, lora):
    """An adapter as plain tensors and values: its settings, the model it fits, and every (A, B)."""
    return {"config": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
                       "model": model_identity(model.args)},
            "tensors": {k: [a.detach().cpu(), b.detach().cpu()] for k, (a, b) in model.lora.items()}}


@contextmanager
def without_adapters(*holders):
    """Inside, the modules (Blackboxes, or a model: all of its) run without their LoRA adapters: the base alone,
    DPO's reference."""
    boxes = [box for h in holders for box in (h.boxes.values() if hasattr(h, "boxes") else [h])]
    saved = [(box, box.lora) for box in boxes]
    for box in boxes:
        box.lora = {}
    try:
        yield
    finally:
        for box, lora in saved:
            box.lora = lora


def read_adapter(path, model, lora=None):
    """The adapter file's {config, tensors}, checked against the model (and, if given, the settings.Lora it
    must have been made with: a run continues with the adapters it started with)."""
    data = load_tensors(path, mmap=False)
    if not isinstance(data, dict) or "config" not in data or "tensors" not in data:
        raise UserError(f"{path}: not a slowllama adapter (no config and tensors)")
    config, tensors = data["config"], data["tensors"]
    if config.get("model") != model_identity(model.args):
        raise UserError(f"{path}: the adapter was made for another model ({config.get('model')}), "
                        f"not for this one ({model_identity(model.args)})")
    made = lora_of(config)
    if lora is not None and (made.rank, made.alpha, made.dropout, set(made.targets)) != \
            (lora.rank, lora.alpha, lora.dropout, set(lora.targets)):
        raise UserError(f"{path}: the run's adapters have lora_rank={made.rank}, lora_alpha={made.alpha}, "
                        f"lora_dropout={made.dropout}, lora_targets={','.join(made.targets)}; it continues only with "
                        f"those, not with lora_rank={lora.rank}, lora_alpha={lora.alpha}, lora_dropout={lora.dropout}, "
                        f"lora_targets={','.join(lora.targets)}")
    for key, (a, b) in tensors.items():
        name, local = module_of(key)
        shape = module_shapes(model.args, name).get(local)
        if shape is None or tuple(a.shape) != (config["rank"], shape[1]) or tuple(b.shape) != (shape[0], config["rank"]):
            raise UserError(f"{path}: adapter tensors for {key} do not fit this model")
    return data


def lora_of(config):
    return Lora(rank=config["rank"], alpha=config["alpha"], dropout=config["dropout"], targets=tuple(config["targets"]))


def attach_adapter(model, path):
    data = read_adapter(path, model)
    add_lora(model, lora_of(data["config"]), tensors=data["tensors"])
    return data


def stacked_adapters(model, target, rows):
    """{target(key): (A, B, parts)} of model.lora but a mixture's experts' (each layout stacks a block's experts in
    its own way), for a layout that names the weights differently: B's rows as
    rows(key, B) puts them; the adapters of the parts of one fused projection (Phi-3's q|k|v, gate|up:
    architectures.FUSED) stacked into one adapter of it: A the parts' A one under the other, B each part's B
    in that part's rows and its own columns (the product is the parts' products in their rows); parts: how
    many are stacked."""
    args, out = model.args, {}
    for key, (a, b) in model.lora.items():
        if ".experts." in key:
            continue
        a, b = a.detach().cpu().float(), b.detach().cpu().float()
        b = rows(key, b) if key.startswith("layers.") else b
        local = key.split(".", 2)[-1]
        fused = [p for p in FUSED.get(args.family, {}).values() if local in p] if key.startswith("layers.") else []
        if not fused:
            out[target(key)] = (a, b, 1)
            continue
        sizes = [module_shapes(args, "layers")[part][0] for part in fused[0]]
        start = sum(sizes[:fused[0].index(local)])
        placed = torch.zeros(sum(sizes), b.shape[1])
        placed[start:start + b.shape[0]] = b
        a0, b0, n = out.get(target(key), (torch.zeros(0, a.shape[1]), torch.zeros(sum(sizes), 0), 0))
        out[target(key)] = (torch.cat((a0, a)), torch.cat((b0, placed), 1), n + 1)
    return out


# --- the fp32 copy of the frozen base ---

def base_copy_boxes(model):
    """The modules a LoRA step reads (those not resident; a mixture's experts, any of which a step may choose)."""
    return [box for name, box in model.boxes.items() if name != "norm" and not box.resident]


def base_copy_bytes(model, wanted=-1, disk_reserve=0, folder=None):
    """Bytes of the fp32 copy of the base copy_base makes, 0 when none: LoRA in fp32 on the CPU over a base
    stored in another dtype converts every module at every read (two passes over the model a step, on the
    cores the matmuls use), and an fp32 copy written once into the run folder is mapped from the page cache
    instead: no conversion, no copy. Made when wanted (1), or (-1) when the page cache can keep it beside
    the run's memory and the disk has room for it (disk_reserve bytes left on the disk of folder, by default
    the run folder). Never over a quantized base: its point is reading fewer bytes. One answer for every process of a parallel run."""
    need = sum(box.numel() * 4 for box in base_copy_boxes(model))
    if not need or model.device.type != "cpu" or model.compute_dtype != torch.float32 or \
            model.storage_dtype == torch.float32 or not wanted or any(box.quant for box in base_copy_boxes(model)):
        return 0
    if wanted < 0:
        ram = model.page_cache_room()
        disk = shutil.disk_usage(folder or model.run.dir).free - disk_reserve - (1 << 30)  # 1 GB to spare
        if not all(model.group.gather(need <= min(ram, disk))):
            return 0
    return need


def copy_base(model, wanted=-1, disk_reserve=0, log=print):
    """Write base_copy_bytes' fp32 copy of the base into the run folder (the machine's first process; a
    resumed run's copies are reused: whole, as each was written under another name and renamed) and read
    the modules from it. Returns {box: its offload file} for drop_base_copy."""
    run, first = model.run, model.group.rank == 0
    need = base_copy_bytes(model, wanted, disk_reserve)
    if wanted > 0 and any(box.quant for box in base_copy_boxes(model)) and model.group.rank == 0:
        log("LoRA: base_copy=1 is for a bf16 or f16 base; a quantized base is read as its blocks (base_quant)")
    if not need:
        if first and wanted < 0 and base_copy_bytes(model, 1):
            log("LoRA: the base is converted to fp32 at every read (an fp32 copy would not fit in the page "
                "cache or on the disk)")
        return {}
    copies = [(box, run.base_copy_file(box.name)) for box in base_copy_boxes(model)]

    def write_copies():
        for box, copy in copies:
            if not copy.exists():
                write_tensors(read_tensors(box.file, model.offload.take_buffer, torch.float32)[0], copy)
    if first:
        log(f"LoRA: an fp32 copy of the base in {run.dir} ({gb(need)}), mapped at every read, not converted")
    run.group.agree(write_copies)
    base_files = {}
    for box, copy in copies:
        base_files[box], box.file = box.file, copy
    return base_files


def drop_base_copy(model, base_files):
    """Remove copy_base's files (at the end of a run); the modules are read from the offload again."""
    for box, base in base_files.items():
        if model.group.local_rank == 0:
            box.file.unlink(missing_ok=True)
        box.file = base
