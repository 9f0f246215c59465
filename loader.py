"""Model folders in, the offload folder, and models out.

convert() turns a model folder (Meta's layout, meta_format.py, or Hugging Face's, hf_format.py) once
into an offload folder with one file per module (token embeddings, each block, norm, output), read a
module at a time; load_model returns the offloaded model over it; save_model streams a model back
out in any layout (GGUF: gguf_format.py).
Usage: python loader.py SRC_DIR DST_DIR [--shards N] [--dtype D] [--out_format meta|hf|gguf]
"""
import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import gguf_source
import hf_format as hf
import quant
from architectures import read_config
from blackbox_model import Transformer
from default_model import HERE, default_model
from files import fsync_path, load_tensors, save_tensors, write_json, write_tensors
from model import module_names, module_of, module_shapes
from meta_format import meta_params, model_args, read_meta_module, read_params, read_source, shard_files, \
    write_checkpoint
from settings import BASE_QUANTS
from tokenizer import choice_note, load_tokenizer, tokenizer_files
from utils import (UserError, check_device, check_disk, choose_compute_dtype, dtype_name, gb, main_guard,
                   memory_budget_bytes, parse_dtype, progress)

DEFAULT_OFFLOAD = HERE / "offload"

FORMAT = 2  # of the offload folder; a change makes every offload be converted again
NOT_META = ("gemma2", "gemma3", "phi3", "olmo2", "qwen3moe", "mixtral", "olmoe")  # families Meta's layout never held


def log_line(text):
    print(text, file=sys.stderr, flush=True)


# --- conversion into the offload folder ---

def layout_of(model_dir):
    """"meta" (params.json) or "hf" (config.json) for a model folder; one line saying what is missing for
    anything else."""
    if gguf_source.is_gguf(model_dir):
        return "gguf"
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model folder not found")
    if (model_dir / "params.json").is_file():
        return "meta"
    if (model_dir / "config.json").is_file():
        return "hf"
    if any(model_dir.glob("consolidated.*.pth")):
        raise UserError(f"{model_dir / 'params.json'}: not found; a model folder in Meta's layout holds params.json "
                        "beside its consolidated.NN.pth shards")
    if any(model_dir.glob("*.safetensors")) or any(model_dir.glob("pytorch_model*.bin")):
        raise UserError(f"{model_dir / 'config.json'}: not found; a model folder in Hugging Face's layout holds "
                        "config.json beside its weights")
    raise UserError(f"{model_dir}: holds no model slowllama reads; it looks for params.json with "
                    "consolidated.*.pth (Meta's layout), config.json with *.safetensors or pytorch_model*.bin "
                    "(Hugging Face's) or a .gguf file")


def source_files(model_dir):
    """The weight files of a model folder: Meta's shards, Hugging Face's safetensors or .bin files, GGUF files."""
    if layout_of(model_dir) == "gguf":
        return gguf_source.files_of(model_dir)
    if layout_of(model_dir) == "hf":
        return sorted(set(hf.weight_files(model_dir).values()))
    return shard_files(model_dir)


def fingerprint(model_dir):
    """Cheap identity of a model folder: content hashes of the small files, size and time of the weights."""
    layout, result = layout_of(model_dir), {}
    model_dir = Path(model_dir)
    config = [] if layout == "gguf" else [model_dir / ("config.json" if layout == "hf" else "params.json")]
    for path in [*config, *([] if layout == "gguf" else tokenizer_files(model_dir))]:
        result[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    for f in source_files(model_dir):
        st = f.stat()
        result[f.name] = [st.st_size, st.st_mtime_ns]
    return result

def source_path(model_dir):
    """The source as a resolved path (Ollama's ollama:NAME as its blob)."""
    return gguf_source.files_of(model_dir)[0] if str(model_dir).startswith(gguf_source.OLLAMA) else \
        Path(model_dir).resolve()


def offload_dir_for(model_dir, offload_root=None, base_quant="none"):
    """The offload folder of a source (and of its base quantized as base_quant: a folder of its own)."""
    model_dir = source_path(model_dir)
    tag = hashlib.sha256(str(model_dir).encode()).hexdigest()[:8]
    root = Path(offload_root or os.environ.get("SLOWLLAMA_OFFLOAD", DEFAULT_OFFLOAD)).resolve()
    if root == model_dir or model_dir in root.parents:
        raise UserError(f"offload_path={root} is inside the model folder {model_dir}, which is never written to")
    return root / f"{model_dir.name}-{tag}{'' if base_quant == 'none' else '-' + base_quant}"


def offload_bytes(model_dir, base_quant):
    """Bytes the offload of a source takes at most: the source's (a model folder's quantized is smaller), or a
    GGUF's tensors as stored (a quantized GGUF's none: their values in fp32)."""
    if layout_of(model_dir) == "gguf":
        return gguf_source.offload_bytes(source_files(model_dir), base_quant)
    return sum(f.stat().st_size for f in source_files(model_dir))


def check_base_quant(model_dir, base_quant):
    if base_quant not in BASE_QUANTS:
        raise UserError(f"base_quant={base_quant!r}: use one of {', '.join(BASE_QUANTS)}")
    if base_quant == "source" and layout_of(model_dir) != "gguf":
        raise UserError(f"base_quant=source keeps a GGUF's own quantized tensors; {model_dir} is not a GGUF file "
                        "(q8_0 or q4_0 quantize a model folder's weights)")


def convert(model_dir, offload_root=None, log=log_line, base_quant="none"):
    """Make (or reuse) the offload folder of a source model (with its base quantized as base_quant: none, source,
    q8_0, q4_0); returns (folder, manifest)."""
    check_base_quant(model_dir, base_quant)
    model_dir = source_path(model_dir)
    fp = fingerprint(model_dir)
    target = offload_dir_for(model_dir, offload_root, base_quant)
    manifest = read_manifest(target)
    if manifest and manifest["fingerprint"] == fp and manifest["format"] == FORMAT:
        return target, manifest
    size = offload_bytes(model_dir, base_quant)
    module = size * largest_module_share(model_dir)  # reads (and checks) the config before anything is written
    check_disk([("offload", target.parent, size)], log)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion of a folder at a time
        manifest = read_manifest(target)
        if manifest and manifest["fingerprint"] == fp and manifest["format"] == FORMAT:
            return target, manifest  # made by another process meanwhile
        for stale in target.parent.glob(f"{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        log(f"converting {model_dir}: RAM about {gb(2 * module + (300 << 20))} at peak (a module and its slices)")
        tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            start = time.time()
            manifest = write_offload(model_dir, tmp, fp, log, base_quant)
            for f in tmp.iterdir():  # on the disk before the folder is published
                fsync_path(f)
            log(f"converted {model_dir} into {target} in {time.time() - start:.1f} s")
            old = target.parent / f"{target.name}.old-{os.getpid()}"
            if target.exists():
                target.rename(old)
            tmp.rename(target)  # published in one step: a half-made offload is never used
            fsync_path(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target, manifest

def largest_module_share(model_dir):
    """The largest module's share of a model's parameters (a block's; of a mixture, the embeddings' or an expert's)."""
    layout = layout_of(model_dir)
    params = read_config(model_dir)[0] if layout == "hf" else read_params(model_dir) if layout == "meta" else \
        gguf_source.read_params(model_dir, *gguf_source.open_gguf(source_files(model_dir)))
    args = model_args(params, params.get("vocab_size") if params.get("vocab_size", -1) > 0 else 32000)
    sizes = [sum(math.prod(s) for s in module_shapes(args, name).values()) for name in module_names(args)]
    return max(sizes) / sum(sizes)

def read_manifest(folder):
    try:
        return json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None

def write_offload(model_dir, out, fp, log=log_line, base_quant="none"):
    """Convert every module into out: one safetensors file each, in the source dtype (a GGUF's block formats as
    their bytes), or with its matrices quantized as base_quant says (quant.py)."""
    layout, gguf_type, keys, extras, n_shards = layout_of(model_dir), None, None, {}, 1
    if layout == "gguf":  # its tokenizer into out
        params, args, read_module, gguf_type = gguf_source.source(source_files(model_dir), out, base_quant, log)
        config, tokenizer_dir = None, out
    elif layout == "hf":
        params, config = read_config(model_dir)
        files = hf.weight_files(model_dir)
        args = model_args(params, params["vocab_size"])
        read_module = lambda name: float_kinds(model_dir, hf.read_module(
            files, [f"{name}.{k}" for k in module_shapes(args, name)], args), name)
        (out / "config.json").write_text(json.dumps(config, indent=1))
    else:
        params, args, shards, first = read_source(model_dir)
        config, keys, n_shards = None, list(first), len(shards)
        expected = {f"{n}.{k}" for n in module_names(args) for k in module_shapes(args, n)}
        for key in keys:
            if key not in expected and key.startswith("layers."):
                raise UserError(f"{shards[0]}: tensor {key} does not belong to a model with "
                                f"n_layers={args.n_layers} as params.json says")
        extras = {k: first[k].clone() for k in keys if k not in expected}  # e.g. rope.freqs: kept as they are
        del first
        read_module = lambda name: float_kinds(model_dir, read_meta_module(model_dir, shards, args, name), name)
        shutil.copyfile(model_dir / "params.json", out / "params.json")
    if layout != "gguf":
        tokenizer_dir = model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    note = choice_note(tokenizer_dir, tokenizer)
    if note:
        log(f"{model_dir}: {note}")
    if tokenizer.n_words > args.vocab_size:  # fewer is fine: Qwen pads its embedding rows
        raise UserError(f"{tokenizer.path}: {tokenizer.n_words} tokens, but the model has "
                        f"{args.vocab_size} embedding rows; use the tokenizer that came with these weights")
    dtypes = {k: dtype_name(t.dtype) for k, t in extras.items()}
    for name in progress(module_names(args), "converting", unit="module"):
        tensors, kinds = read_module(name)
        for key, shape in module_shapes(args, name).items():
            if name == "tok_embeddings":  # the dtype the embeddings' scale is rounded to, quantized or not
                table_dtype = quant.float_dtype(kinds[key])
            got = tuple(tensors[key].shape)
            if got != tuple(shape) and not quant.is_quantized(kinds[key]):
                raise UserError(f"{model_dir}: {name}.{key} has shape {got}, but the model's settings mean {shape}")
            if key in quant.kinds_at_conversion(args, name, base_quant) and not quant.is_quantized(kinds[key]):
                tensors[key], kinds[key] = quant.quantize(tensors[key], base_quant), base_quant
            dtypes[f"{name}.{key}"] = kinds[key]
        write_tensors(tensors, out / f"{name}.safetensors")
    save_tensors(extras, out / "extras.pt")
    if config is not None or layout == "gguf":  # params.json in Meta's terms, the embeddings' scale in their dtype
        if args.embed_scale != 1.0:
            args.embed_scale = torch.tensor(args.embed_scale, dtype=table_dtype).item()
        params = meta_params(args)
        (out / "params.json").write_text(json.dumps(params) + "\n")
    for f in tokenizer_files(model_dir) if layout != "gguf" else []:  # not a tokenizer.json passed over
        if f.name != "tokenizer.json" or f == tokenizer.path:  # (load_tokenizer): it is not the model's
            shutil.copyfile(f, out / f.name)
    if base_quant != "none" or layout == "gguf":
        log(f"{model_dir}: the base as {quant.kinds_note(dtypes.values())}")
    keys = keys or [f"{n}.{k}" for n in module_names(args) for k in module_shapes(args, n)]
    manifest = {"format": FORMAT, "source": str(model_dir), "fingerprint": fp, "params": params,
                "vocab_size": args.vocab_size, "n_shards": n_shards, "layout": layout, "base_quant": base_quant,
                "gguf_type": gguf_type, "keys": [[k, dtypes[k]] for k in keys]}
    write_json(manifest, out / "manifest.json")
    return manifest


def float_kinds(model_dir, tensors, name):
    """({key in the module: tensor}, {key: dtype name}) of a module's tensors read from a model folder, which
    must be float32, bfloat16 or float16."""
    kinds = {}
    for key, t in tensors.items():
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise UserError(f"{model_dir}: {key} is stored as {dtype_name(t.dtype)}; weights are float32, "
                            "bfloat16 or float16")
        kinds[key.removeprefix(f"{name}.")] = dtype_name(t.dtype)
    return {k.removeprefix(f"{name}."): t for k, t in tensors.items()}, kinds


# --- the model ---

def load_model(path=None, offload_path=None, device="cpu", compute_dtype="float32", memory_budget=None,
               dropout=0.0, prefetch=True, cold=False, log=log_line, base_quant="none"):
    """The offloaded model of a source model (the built-in default model when path is None): a model folder, a
    GGUF file or ollama:NAME. compute_dtype: float32, bfloat16 or auto (bf16 where the device has it natively);
    memory_budget: bytes of RAM the whole process plans for (None: memory_budget's default,
    utils.memory_budget_bytes); prefetch: read the next module in the background; cold: benchmarks of a disk
    serving every read; base_quant: how the frozen base is kept (none: as the source stores it, a GGUF's block
    formats dequantized into fp32; source: a GGUF's as they are; q8_0, q4_0: quantized at conversion)."""
    device = check_device(device)
    compute_dtype = choose_compute_dtype(compute_dtype, device, log)
    folder, manifest = convert(path or default_model(), offload_path, log, base_quant)
    args = model_args(manifest["params"], manifest["vocab_size"])
    storage = quant.float_dtype(dict(manifest["keys"])["tok_embeddings.weight"])
    budget = memory_budget_bytes() if memory_budget is None else int(memory_budget)
    return Transformer(args, folder, manifest, load_tokenizer(folder), storage, device,
                       compute_dtype, budget, dropout, prefetch, cold)


def export_layout(model, out_format=None, gguf_type=None, shards=None, dtype=None):
    """The layout save_model writes the model in (out_format, else the source's), or the UserError of options
    that do not go with it or a layout this family was never published in."""
    out_format = out_format or model.manifest.get("layout", "meta")
    if out_format == "gguf" and (shards or dtype):
        raise UserError("shards and dtype are for the meta and hf layouts; a GGUF's is gguf_type (f16, bf16, q8_0, f32)")
    if out_format != "gguf" and gguf_type:
        raise UserError(f"gguf_type={gguf_type!r} is for out_format=gguf, not {out_format}")
    if out_format not in ("meta", "hf", "gguf"):
        raise UserError(f"out_format={out_format!r}: use meta, hf or gguf")
    if out_format == "meta" and model.args.family in NOT_META:
        raise UserError(f"Meta's layout: {model.args.family} models were never published in it; export as hf or gguf")
    return out_format


def check_export(model, out_format=None, gguf_type=None, output_adapter=False):
    """Before a run trains: the UserError of an export that could not be written at its end (a GGUF's
    architecture, vocabulary and type too; output_adapter: the output weight gets a LoRA adapter)."""
    if export_layout(model, out_format, gguf_type) == "gguf":
        import gguf_format
        gguf_format.check_model(model, gguf_type or gguf_format.source_type(model), output_adapter)


def save_model(model, out_path, shards=None, dtype=None, out_format=None, log=log_line, gguf_type=None):
    """Write the model in Meta's format (out_format="meta": the source's shard count and dtypes unless
    told otherwise), Hugging Face's ("hf") or as out_path/model.gguf ("gguf", gguf_type f16 by default:
    gguf_format.py); by default in the source's layout. Streams module by module."""
    manifest, out_path = model.manifest, Path(out_path).resolve()
    for protected in (Path(manifest["source"]), model.offload_dir.resolve()):
        if out_path == protected or protected in out_path.parents:
            raise UserError(f"{out_path}: is (inside) {protected}, which is never written to")
    out_format = export_layout(model, out_format, gguf_type, shards, dtype)
    if out_format == "gguf":  # one file for llama.cpp, Ollama and LM Studio (gguf_format.check_model as it writes)
        import gguf_format
        gguf_format.write_model(model, out_path, gguf_type or gguf_format.source_type(model, log), log)
        return
    n_shards = shards or manifest["n_shards"]
    dtypes = {k: parse_dtype(dtype) if dtype else quant.float_dtype(d) for k, d in manifest["keys"]}
    extras = load_tensors(model.offload_dir / "extras.pt", mmap=False)
    if out_format == "hf":
        extras = {}  # rope.freqs and such: not part of Hugging Face's layout
    entries = [(k, shape_of(model.args, k, extras), dtypes[k]) for k, _ in manifest["keys"]
               if k in extras or module_of(k)[0] in model.boxes]
    names = module_names(model.args)
    untie = model.args.tied and "output.weight" in model.lora  # a merged output adapter: no longer the table
    if untie:
        names.append("output")
        entries.append(("output.weight", (model.args.vocab_size, model.args.dim), dtypes["tok_embeddings.weight"]))
    check_disk([("export", out_path, sum(math.prod(s) * d.itemsize for _, s, d in entries))], log)

    def modules():
        for name in names:
            yield {f"{name}.{k}": t.cpu() for k, t in model.read_weights(name).items()}
        yield extras

    start = time.time()
    if out_format == "hf":
        out_path.mkdir(parents=True, exist_ok=True)
        order = {k: i for i, k in enumerate(f"{n}.{k}" for n in names for k in module_shapes(model.args, n))}
        entries.sort(key=lambda e: order[e[0]])
        source_config = model.offload_dir / "config.json"
        config = hf.config_for(model.args, entries[0][2], json.loads(source_config.read_text())
                               if source_config.exists() else None, model.tokenizer.bos_id,
                               sorted(model.tokenizer.stop_ids) if len(model.tokenizer.stop_ids) > 1 else
                               model.tokenizer.eos_id)
        config = {**config, "tie_word_embeddings": model.args.tied and not untie}
        hf.write_model(out_path, model.args, entries, modules(), config)
        if model.tokenizer.kind == "sentencepiece":
            hf.sentencepiece_tokenizer_config(out_path)
    else:
        write_checkpoint(out_path, entries, modules(), len(model.boxes) + 1, n_shards,
                         model.offload_dir / "params.json", model.tokenizer.path)
    for f in tokenizer_files(model.offload_dir):  # after write_model: the source's tokenizer_config.json wins
        if f != model.tokenizer.path or out_format == "hf":  # write_checkpoint copied that one
            shutil.copyfile(f, out_path / f.name)
    log(f"wrote {out_path} ({out_format} layout) in {time.time() - start:.1f} s")

def shape_of(args, key, extras):
    if key in extras:
        return tuple(extras[key].shape)
    name, local = module_of(key)
    return module_shapes(args, name)[local]


def main():
    parser = argparse.ArgumentParser(description="Convert a Llama model folder and export it again.")
    parser.add_argument("src", help="model folder: Meta's (params.json, consolidated.NN.pth, tokenizer.model) "
                                    "or Hugging Face's (config.json, *.safetensors or *.bin, tokenizer.json "
                                    "or tokenizer.model)")
    parser.add_argument("dst", help="folder to write the model to")
    parser.add_argument("--shards", type=int, default=None, help="shard count (default: the source's)")
    parser.add_argument("--dtype", default=None, help="dtype of the written weights (default: the source's)")
    parser.add_argument("--out_format", default=None, help="meta, hf or gguf (DST/model.gguf for llama.cpp, "
                                                            "Ollama, LM Studio; default: the source's layout)")
    parser.add_argument("--gguf_type", default=None, help="with --out_format gguf: f16 (default), bf16, q8_0 or "
                                                           "f32 (norms and biases always f32)")
    parser.add_argument("--offload_path", default=None, help="where offload folders live")
    a = parser.parse_args()
    if a.shards is not None and a.shards < 1:
        raise UserError(f"--shards={a.shards}: must be at least 1")
    if Path(a.dst).resolve() == Path(a.src).resolve():
        raise UserError(f"{a.dst}: the destination is the source folder, which is never written to")
    if a.gguf_type is not None and a.out_format != "gguf":
        raise UserError(f"--gguf_type={a.gguf_type} is for --out_format gguf")
    if a.out_format == "gguf":  # checked before the conversion: the type, and that gguf is installed
        import gguf_format
        gguf_format.check_type(a.gguf_type or "f16")
    model = load_model(a.src, offload_path=a.offload_path)
    save_model(model, a.dst, shards=a.shards, dtype=a.dtype, out_format=a.out_format, gguf_type=a.gguf_type)
    model.close()


if __name__ == "__main__":
    main_guard(main)
