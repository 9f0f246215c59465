"""Meta's Llama checkpoint folders in and out.

A model folder holds params.json, consolidated.00.pth ... (one shard per model-parallel rank) and
tokenizer.model. load_llama2 converts it once into an offload folder with one file per module
(token embeddings, each block, norm, output) and returns the offloaded model; save_llama2 streams
a model back into Meta's shard layout. Usage: python loader.py SRC_DIR DST_DIR [--shards N]
"""
import argparse
import fcntl
import hashlib
import io
import itertools
import json
import math
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

import torch

import hf
from blackbox_model import ModelArgs, Transformer, module_names, module_shapes
from utils import (UserError, check_device, check_disk, dtype_name, fsync_path, gb, load_tensors, main_guard,
                   parse_dtype, progress, published, save_tensors, total_ram_bytes, write_json, write_tensors)

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "models" / "tiny"  # made on first use, git-ignored
DEFAULT_TEXT = HERE / "slowllama.txt"
DEFAULT_OFFLOAD = HERE / "offload"
FORMAT = 2  # of the offload folder; a change makes every offload be converted again

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


def module_of(key):
    """('layers.3', 'attention.wq.weight') for 'layers.3.attention.wq.weight'; ('output', 'weight') ..."""
    parts = key.split(".")
    n = 2 if parts[0] == "layers" else 1
    return ".".join(parts[:n]), ".".join(parts[n:])


def log_line(text):
    print(text, file=sys.stderr, flush=True)


# --- params.json and tokenizer.model ---

def read_params(model_dir):
    path = Path(model_dir) / "params.json"
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; a Llama model folder holds params.json, consolidated.NN.pth "
                        "and tokenizer.model")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})")
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a JSON object")
    for key in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps"):
        if key not in params:
            raise UserError(f"{path}: missing the key {key!r}")
    for key in ("dim", "n_layers", "n_heads", "multiple_of", "n_kv_heads", "vocab_size"):
        if key in params and params[key] is not None and (not isinstance(params[key], int) or
                                                           params[key] <= 0 and key != "vocab_size"):
            raise UserError(f"{path}: {key} must be a positive integer, not {params[key]!r}")
    kv = params.get("n_kv_heads") or params["n_heads"]
    if params["dim"] % params["n_heads"] or params["n_heads"] % kv or (params["dim"] // params["n_heads"]) % 2:
        raise UserError(f"{path}: dim={params['dim']}, n_heads={params['n_heads']}, n_kv_heads={kv} do not fit "
                        "(dim must split into heads of even size, n_heads into groups of n_kv_heads)")
    return params


def model_args(params, vocab_size):
    return ModelArgs(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                     vocab_size=vocab_size, n_kv_heads=params.get("n_kv_heads"),
                     multiple_of=params["multiple_of"], ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                     norm_eps=params["norm_eps"], rope_theta=params.get("rope_theta") or 10000.0,
                     ffn_dim=params.get("hidden_dim"))


class Tokenizer:
    """sentencepiece's tokenizer.model: encode with optional BOS/EOS, decode."""

    def __init__(self, path):
        import sentencepiece
        if not Path(path).is_file():
            raise UserError(f"{path}: not found; the model folder needs its sentencepiece tokenizer.model")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path}: not a sentencepiece model ({str(e).strip()[:120]})")
        self.n_words, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode([i for i in ids if i not in (self.bos_id, self.eos_id)])


# --- conversion into the offload folder ---

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


def source_files(model_dir):
    """The weight files of a model folder: Meta's shards, or Hugging Face's safetensors or .bin files."""
    if hf.is_hf_folder(model_dir):
        return sorted(set(hf.weight_files(model_dir).values()))
    return shard_files(model_dir)


def fingerprint(model_dir):
    """Cheap identity of a model folder: content hashes of the small files, size and time of the weights."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model folder not found")
    result = {}
    for name in ("config.json" if hf.is_hf_folder(model_dir) else "params.json", "tokenizer.model"):
        path = model_dir / name
        if not path.is_file():
            raise UserError(f"{path}: not found")
        result[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    for f in source_files(model_dir):
        st = f.stat()
        result[f.name] = [st.st_size, st.st_mtime_ns]
    return result


def offload_dir_for(model_dir, offload_root=None):
    model_dir = Path(model_dir).resolve()
    tag = hashlib.sha256(str(model_dir).encode()).hexdigest()[:8]
    root = Path(offload_root or os.environ.get("SLOWLLAMA_OFFLOAD", DEFAULT_OFFLOAD)).resolve()
    if root == model_dir or model_dir in root.parents:
        raise UserError(f"offload_path={root} is inside the model folder {model_dir}, which is never written to")
    return root / f"{model_dir.name}-{tag}"


def read_shard(path):
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot be read as a checkpoint of plain tensors "
                        f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})")


def convert(model_dir, offload_root=None, log=log_line):
    """Make (or reuse) the offload folder of a model folder; returns (folder, manifest)."""
    model_dir = Path(model_dir).resolve()
    fp = fingerprint(model_dir)
    target = offload_dir_for(model_dir, offload_root)
    manifest = read_manifest(target)
    if manifest and manifest["fingerprint"] == fp and manifest["format"] == FORMAT:
        return target, manifest
    sizes = [f.stat().st_size for f in source_files(model_dir)]
    check_disk([("offload", target.parent, sum(sizes))], log)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion of a folder at a time
        manifest = read_manifest(target)
        if manifest and manifest["fingerprint"] == fp and manifest["format"] == FORMAT:
            return target, manifest  # made by another process meanwhile
        for stale in target.parent.glob(f"{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        module = sum(sizes) / (n_layers_of(model_dir) + 2)
        log(f"converting {model_dir}: RAM about {gb(2 * module + (300 << 20))} at peak (a module and its slices)")
        tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            start = time.time()
            manifest = write_offload(model_dir, tmp, fp)
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


def n_layers_of(model_dir):
    return hf.read_config(model_dir)[0]["n_layers"] if hf.is_hf_folder(model_dir) else read_params(model_dir)["n_layers"]


def read_manifest(folder):
    try:
        return json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_offload(model_dir, out, fp):
    """Convert every module into out: one safetensors file each, in the source dtype."""
    if hf.is_hf_folder(model_dir):
        params, config = hf.read_config(model_dir)
        files = hf.weight_files(model_dir)
        args = model_args(params, params["vocab_size"])
        keys, extras, n_shards = None, {}, 1
        read_module = lambda name: hf.read_module(files, [f"{name}.{k}" for k in module_shapes(
            args, name.split(".")[0])], args)
        (out / "config.json").write_text(json.dumps(config, indent=1))
        params = meta_params(args)
        (out / "params.json").write_text(json.dumps(params) + "\n")
    else:
        params, config = read_params(model_dir), None
        shards = shard_files(model_dir)
        first = read_shard(shards[0])
        if "tok_embeddings.weight" not in first:
            raise UserError(f"{shards[0]}: no tok_embeddings.weight tensor; is this a Llama checkpoint?")
        vocab = params.get("vocab_size", -1)
        args = model_args(params, vocab if vocab and vocab > 0 else first["tok_embeddings.weight"].shape[0])
        keys, n_shards = list(first), len(shards)
        expected = {f"{n}.{k}" for n in module_names(args) for k in module_shapes(args, n.split(".")[0])}
        for key in keys:
            if key not in expected and key.startswith("layers."):
                raise UserError(f"{shards[0]}: tensor {key} does not belong to a model with "
                                f"n_layers={args.n_layers} as params.json says")
        extras = {k: first[k].clone() for k in keys if k not in expected}  # e.g. rope.freqs: kept as they are
        del first
        read_module = lambda name: read_meta_module(model_dir, shards, args, name)
        shutil.copyfile(model_dir / "params.json", out / "params.json")
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    if tokenizer.n_words != args.vocab_size:
        raise UserError(f"{model_dir / 'tokenizer.model'}: {tokenizer.n_words} tokens, but the model has "
                        f"{args.vocab_size} embedding rows; use the tokenizer that came with these weights")
    dtypes = {k: dtype_name(t.dtype) for k, t in extras.items()}
    for name in progress(module_names(args), "converting", unit="module"):
        tensors = read_module(name)
        for key, shape in module_shapes(args, name.split(".")[0]).items():
            got = tuple(tensors[f"{name}.{key}"].shape)
            if got != tuple(shape):
                raise UserError(f"{model_dir}: {name}.{key} has shape {got}, but the model's settings mean {shape}")
            dtypes[f"{name}.{key}"] = dtype_name(tensors[f"{name}.{key}"].dtype)
        write_tensors({k.removeprefix(f"{name}."): t for k, t in tensors.items()}, out / f"{name}.safetensors")
    save_tensors(extras, out / "extras.pt")
    shutil.copyfile(model_dir / "tokenizer.model", out / "tokenizer.model")
    keys = keys or [f"{n}.{k}" for n in module_names(args) for k in module_shapes(args, n.split(".")[0])]
    manifest = {"format": FORMAT, "source": str(model_dir), "fingerprint": fp, "params": params,
                "vocab_size": args.vocab_size, "n_shards": n_shards, "layout": "hf" if config else "meta",
                "keys": [[k, dtypes[k]] for k in keys]}
    write_json(manifest, out / "manifest.json")
    return manifest


def read_meta_module(model_dir, shards, args, name):
    """{key: tensor} of one module, its slices read from every shard (memory-mapped, one at a time)."""
    tensors = {}
    for shard_index, path in enumerate(shards):
        data = read_shard(path)  # memory-mapped: only this module's slices are read
        for local, shape in module_shapes(args, name.split(".")[0]).items():
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


def meta_params(args):
    """params.json for a model read from another layout: its FFN size as Meta's formula gives it, or,
    where no multiple_of does, as an explicit hidden_dim."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": 256, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta}
    if model_args(params, args.vocab_size).hidden_dim != args.hidden_dim:
        params["hidden_dim"] = args.hidden_dim
    return params


# --- the model ---

def load_llama2(path=None, offload_path=None, device="cpu", compute_dtype="float32", memory_budget=None,
                dropout=0.0, log=log_line):
    """The offloaded model of a Meta-format folder (the built-in default model when path is None).
    memory_budget: bytes of RAM the whole process plans for (None: half of this machine's RAM)."""
    device = check_device(device)
    compute_dtype = parse_dtype(compute_dtype, "compute_dtype")
    folder, manifest = convert(path or default_model(), offload_path, log)
    args = model_args(manifest["params"], manifest["vocab_size"])
    storage = parse_dtype(dict(manifest["keys"])["tok_embeddings.weight"])
    budget = total_ram_bytes() // 2 if memory_budget is None else int(memory_budget)
    model = Transformer(args, folder, storage, device, compute_dtype, budget, dropout)
    model.manifest, model.tokenizer = manifest, Tokenizer(folder / "tokenizer.model")
    return model


def save_llama2(model, out_path, shards=None, dtype=None, out_format=None, log=log_line):
    """Write the model in Meta's format (out_format="meta": the source's shard count and dtypes unless
    told otherwise) or Hugging Face's ("hf"); by default in the source's layout. Streams module by module."""
    manifest, out_path = model.manifest, Path(out_path).resolve()
    for protected in (Path(manifest["source"]), model.offload_dir.resolve()):
        if out_path == protected or protected in out_path.parents:
            raise UserError(f"{out_path}: is (inside) {protected}, which is never written to")
    out_format = out_format or manifest.get("layout", "meta")
    if out_format not in ("meta", "hf"):
        raise UserError(f"out_format={out_format!r}: use meta or hf")
    n_shards = shards or manifest["n_shards"]
    dtypes = {k: parse_dtype(dtype) if dtype else parse_dtype(d) for k, d in manifest["keys"]}
    extras = load_tensors(model.offload_dir / "extras.pt", mmap=False)
    if out_format == "hf":
        extras = {}  # rope.freqs and such: not part of Hugging Face's layout
    entries = [(k, shape_of(model.args, k, extras), dtypes[k]) for k, _ in manifest["keys"]
               if k in extras or module_of(k)[0] in model.boxes]
    check_disk([("export", out_path, sum(math.prod(s) * d.itemsize for _, s, d in entries))], log)

    def modules():
        for name in module_names(model.args):
            yield {f"{name}.{k}": t.cpu() for k, t in model.read_weights(name).items()}
        yield extras

    start = time.time()
    if out_format == "hf":
        out_path.mkdir(parents=True, exist_ok=True)
        order = {k: i for i, k in enumerate(f"{n}.{k}" for n in module_names(model.args)
                                             for k in module_shapes(model.args, n.split(".")[0]))}
        entries.sort(key=lambda e: order[e[0]])
        source_config = model.offload_dir / "config.json"
        config = hf.config_for(model.args, entries[0][2], json.loads(source_config.read_text())
                               if source_config.exists() and not dtype else None)
        hf.write_model(out_path, model.args, entries, modules(), config)
        shutil.copyfile(model.offload_dir / "tokenizer.model", out_path / "tokenizer.model")
    else:
        write_checkpoint(out_path, entries, modules(), len(model.boxes) + 1, n_shards,
                         model.offload_dir / "params.json", model.offload_dir / "tokenizer.model")
    log(f"wrote {out_path} ({out_format} layout) in {time.time() - start:.1f} s")


def shape_of(args, key, extras):
    if key in extras:
        return tuple(extras[key].shape)
    name, local = module_of(key)
    return module_shapes(args, name.split(".")[0])[local]


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


# --- LoRA adapters ---

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


# --- the built-in default model ---

def default_model():
    """A tiny Llama in Meta's format, made on first use: a tokenizer trained on slowllama.txt, random
    weights, 2 shards, grouped-query attention and ffn_dim_multiplier (the code paths of 70B)."""
    DEFAULT_MODEL.parent.mkdir(exist_ok=True)
    with open(DEFAULT_MODEL.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (DEFAULT_MODEL / "params.json").exists():
            params = {"dim": 128, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 32,
                      "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "vocab_size": -1}
            make_model(DEFAULT_MODEL, params, train_tokenizer(DEFAULT_TEXT, 512), n_shards=2, seed=1234)
    return DEFAULT_MODEL


def train_tokenizer(text_file, vocab_size, filler_pieces=0):
    """A sentencepiece BPE model trained on a text (deterministic); filler_pieces unused symbols pad the
    vocabulary of synthetic models to a real size such as 32000."""
    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        input=str(text_file), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, split_digits=True, required_chars="[]{}()<>?!/:;'\"*#%&=+-_@",
        user_defined_symbols=[f"<unused{i}>" for i in range(filler_pieces)])
    return model.getvalue()


def make_model(out_dir, params, tokenizer_bytes, n_shards=1, seed=0, dtype=torch.bfloat16, rope_freqs=True):
    """A model folder in Meta's exact format with random weights (tests, benchmarks, the default model).
    Written under a temporary name and renamed into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "tokenizer.model").write_bytes(tokenizer_bytes)
        (tmp / "params.json").write_text(json.dumps(params) + "\n")
        vocab = params["vocab_size"] if params.get("vocab_size", -1) > 0 else Tokenizer(tmp / "tokenizer.model").n_words
        args = model_args(params, vocab)
        generator = torch.Generator().manual_seed(seed)

        def module(name):
            shapes = module_shapes(args, name.split(".")[0])
            return {f"{name}.{k}": torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator) * 0.02
                    for k, s in shapes.items()}

        names = ["tok_embeddings", "norm", "output"] + [f"layers.{i}" for i in range(args.n_layers)]
        entries = [(f"{n}.{k}", s, dtype) for n in names for k, s in module_shapes(args, n.split(".")[0]).items()]
        extras = {}
        if rope_freqs:
            half = args.head_dim // 2
            extras["rope.freqs"] = 1.0 / (args.rope_theta ** (torch.arange(0, 2 * half, 2)[:half].float() / args.head_dim))
            entries.append(("rope.freqs", (half,), dtype))
        modules = itertools.chain((module(n) for n in names), [extras])
        write_checkpoint(tmp, entries, modules, len(names) + 1, n_shards, tmp / "params.json",
                         tmp / "tokenizer.model")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description="Convert a Llama model folder and export it again.")
    parser.add_argument("src", help="model folder: Meta's (params.json, consolidated.NN.pth, tokenizer.model) "
                                    "or Hugging Face's (config.json, *.safetensors or *.bin, tokenizer.model)")
    parser.add_argument("dst", help="folder to write the model to")
    parser.add_argument("--shards", type=int, default=None, help="shard count (default: the source's)")
    parser.add_argument("--dtype", default=None, help="dtype of the written weights (default: the source's)")
    parser.add_argument("--out_format", default=None, help="meta or hf (default: the source's layout)")
    parser.add_argument("--offload_path", default=None, help="where offload folders live")
    parser.add_argument("--debug", default="0")
    a = parser.parse_args()
    if a.shards is not None and a.shards < 1:
        raise UserError(f"--shards={a.shards}: must be at least 1")
    if Path(a.dst).resolve() == Path(a.src).resolve():
        raise UserError(f"{a.dst}: the destination is the source folder, which is never written to")
    model = load_llama2(a.src, offload_path=a.offload_path)
    save_llama2(model, a.dst, shards=a.shards, dtype=a.dtype, out_format=a.out_format)
    model.close()


if __name__ == "__main__":
    main_guard(main)
