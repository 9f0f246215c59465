"""The built-in default model (a tiny Llama trained on the bundled slowllama.txt) and synthetic model
folders in Meta's exact format for tests and benchmarks (SHAPES: the real models' shapes bench.py makes)."""
import fcntl
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from model import module_names, module_shapes
from meta_format import model_args, write_checkpoint
from tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent

DEFAULT_MODEL = HERE / "models" / "tiny"  # made on first use, git-ignored

DEFAULT_TEXT = HERE / "slowllama.txt"


# Llama 2's chat format: [INST] user [/INST] assistant </s>, the system text inside the first [INST]
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system is defined %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }} {{ eos_token }}{% endif %}"
    "{% endfor %}")


def default_model():
    """A tiny Llama in Meta's format, made on first use: a tokenizer trained on slowllama.txt, random
    weights, 2 shards, grouped-query attention and ffn_dim_multiplier (the code paths of 70B), and
    Llama 2's chat template."""
    DEFAULT_MODEL.parent.mkdir(exist_ok=True)
    with open(DEFAULT_MODEL.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (DEFAULT_MODEL / "params.json").exists():
            params = {"dim": 128, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 32,
                      "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "vocab_size": -1}
            make_model(DEFAULT_MODEL, params, train_tokenizer(DEFAULT_TEXT, 512), n_shards=2, seed=1234)
        if not (DEFAULT_MODEL / "tokenizer_config.json").exists():
            (DEFAULT_MODEL / "tokenizer_config.json").write_text(json.dumps(
                {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2_CHAT_TEMPLATE}, indent=1) + "\n")
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
            shapes = module_shapes(args, name)
            # in the file's dtype at once: a 405B block is 13 GB in float32
            return {f"{name}.{k}": (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator).mul_(0.02)).to(dtype)
                    for k, s in shapes.items()}

        names = [n for n in ("tok_embeddings", "norm", "output") if n in module_names(args)] + \
            [n for n in module_names(args) if n.startswith("layers.")]  # (no output with tie_embeddings)
        entries = [(f"{n}.{k}", s, dtype) for n in names for k, s in module_shapes(args, n).items()]
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


# --- synthetic checkpoints of real shapes (bench.py): random weights, the real models' params.json ---

SHAPES = {  # params.json of the real models; 1b is a 7B-like model cut to dim 2048; 8b and 405b are Llama 3.1
    "tiny": {"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 64, "ffn_dim_multiplier": 1.3},
    "1b": {"dim": 2048, "n_layers": 16, "n_heads": 16, "multiple_of": 256},
    "7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256},
    "13b": {"dim": 5120, "n_layers": 40, "n_heads": 40, "multiple_of": 256},
    "70b": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096, "ffn_dim_multiplier": 1.3},
    "8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 1024, "ffn_dim_multiplier": 1.3,
           "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
    "405b": {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "multiple_of": 4096,
             "ffn_dim_multiplier": 1.2, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256},
    # config.json of Gemma 3 27B (its text model) and of Phi-4 (14B), in params.json's terms
    "gemma3-27b": {"dim": 5376, "n_layers": 62, "n_heads": 32, "n_kv_heads": 16, "head_dim": 128, "hidden_dim": 21504,
                   "vocab_size": 262208, "norm_eps": 1e-6, "rope_theta": 1e6, "family": "gemma3", "norms": "sandwich",
                   "norm_offset": 1.0, "activation": "gelu_tanh", "embed_scale": 73.5, "attn_scale": 168 ** -0.5,
                   "qk_norm": "head", "tie_embeddings": True, "sliding_window": 1024, "rope_local_theta": 10000.0,
                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "max_position_embeddings": 131072},
    "phi4": {"dim": 5120, "n_layers": 40, "n_heads": 40, "n_kv_heads": 10, "hidden_dim": 17920, "vocab_size": 100352,
             "norm_eps": 1e-5, "rope_theta": 250000.0, "family": "phi3", "max_position_embeddings": 16384},
    # mixtures of experts: config.json of Qwen3-30B-A3B and of Mixtral 8x7B
    "qwen3-30b-a3b": {"dim": 2048, "n_layers": 48, "n_heads": 32, "n_kv_heads": 4, "head_dim": 128, "hidden_dim": 6144,
                      "vocab_size": 151936, "norm_eps": 1e-6, "rope_theta": 1e6, "family": "qwen3moe", "qk_norm": "head",
                      "n_experts": 128, "top_k": 8, "moe_hidden_dim": 768, "norm_topk": True,
                      "max_position_embeddings": 40960},
    "mixtral-8x7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "hidden_dim": 14336, "vocab_size": 32000,
                     "norm_eps": 1e-5, "rope_theta": 1e6, "family": "mixtral", "n_experts": 8, "top_k": 2,
                     "norm_topk": True, "max_position_embeddings": 32768},
}
SHARDS = {"tiny": 2, "1b": 1, "7b": 1, "13b": 2, "70b": 8, "8b": 1, "405b": 8, "gemma3-27b": 1, "phi4": 1,
          "qwen3-30b-a3b": 1, "mixtral-8x7b": 1}


def shape_params(shape, layers):
    """params.json of SHAPES[shape] cut to its first layers blocks."""
    params = {"norm_eps": 1e-5, "vocab_size": -1, **SHAPES[shape], "n_layers": layers}
    if params.get("family") == "gemma3":  # five sliding layers, then a full one
        params["layer_types"] = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    return params


CACHE = HERE / "bench_cache"  # bench.py's synthetic checkpoints, offloads and runs
VOCAB = 32000  # of the synthetic tokenizer (padded to this size); the embedding rows of shapes without a vocab_size


def shape_args(shape, layers):
    return model_args(shape_params(shape, layers), SHAPES[shape].get("vocab_size", VOCAB))


def n_params(shape, layers):
    args = shape_args(shape, layers)
    return sum(math.prod(s) for name in module_names(args) for s in module_shapes(args, name).values())


def checkpoint(shape, layers):
    """The synthetic model folder, made in a child process the first time (so its memory is not counted)."""
    path = CACHE / f"{shape}-{layers}L"
    if not (path / "params.json").exists():
        code = ("import sys, json, default_model as d; d.make_model(sys.argv[1], json.loads(sys.argv[2]), "
                f"d.train_tokenizer(d.DEFAULT_TEXT, {VOCAB}, {VOCAB - 500}), int(sys.argv[3]))")
        params = shape_params(shape, layers)
        start = time.time()
        subprocess.run([sys.executable, "-c", code, str(path), json.dumps(params), str(SHARDS[shape])], check=True, cwd=HERE)
        print(f"made {path} in {time.time() - start:.0f} s", file=sys.stderr)
    return path


def remove(paths):
    """Remove what this run made (and any half-made temporaries of it), then bench_cache/ if it is empty."""
    for path in paths:
        for p in [path, *path.parent.glob(f"{path.name}.tmp-*"), path.parent / f".{path.name}.lock"]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
    for folder in (CACHE / "offload", CACHE):
        try:
            folder.rmdir()
        except OSError:  # not empty: what an earlier --keep_cache run left
            pass
