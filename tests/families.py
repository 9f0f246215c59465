"""Hugging Face's conventions and each family's definitions, written here from transformers' modeling code
(read, never imported): tiny folders in each family's own layout from random tensors (q and k rows in the
half-split rotary layout), the forward pass as Hugging Face computes it (rotate_half, biases, q/k norms
before rope, repeated kv heads, a tied head), the rope scaling formulas element by element with Python's
math, the permutation between Hugging Face's and Meta's rows from its definition, and the reference
(reference.Reference) on the same tensors in Meta's order.
"""
import copy
import json
import math

import safetensors.torch
import torch
import torch.nn.functional as F

from reference import Reference, read_meta_folder

BASE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0, "vocab_size": 320,
         "sliding_window": 8, "use_sliding_window": False, "max_window_layers": 2}  # the window is off
FAMILIES = {
    # Llama 3.2 1B: GQA, tied, llama3 rope scaling (original context 64 here, so that the 16-wide heads have
    # pairs in each of the three regimes: kept, blended, slowed by factor)
    "llama3": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 500000.0,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    # Qwen 2.5: q, k, v biases, theta 1e6, untied, more embedding rows than the tokenizer has tokens
    "qwen2": QWEN2,
    # Qwen 3: q and k norms, heads of 32 with hidden 64 and 4 heads (4 * 32 = 128 != 64), tied
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32, "rope_theta": 1000000.0,
              "vocab_size": 320, "tie_word_embeddings": True, "attention_bias": False, "sliding_window": None,
              "use_sliding_window": False, "max_window_layers": 2},
    # SmolLM2: Llama, tied, no scaling (all heads with their own k and v here)
    "smollm2": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_key_value_heads": 4,
                "rope_theta": 100000.0, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
                "rope_scaling": None},
    # Mistral v0.1: a sliding window far longer than the sequences
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "head_dim": 16,
                "rope_theta": 1000000.0, "sliding_window": 4096, "max_position_embeddings": 32768},
    # Qwen 2.5 with yarn, as its model cards say to enable it (max_position_embeddings = factor * original)
    "yarn": {**QWEN2, "max_position_embeddings": 32,
             "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}},
}
TIED = ["llama3", "qwen3", "smollm2"]
SEQ = 12

# --- Hugging Face's convention, written here ---

HF_TO_META = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
              "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm"}


DROP = object()  # a change's value meaning "the key removed"


def config_of(family, **changes):
    config = {**BASE, **copy.deepcopy(FAMILIES[family])}
    for key, value in changes.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def head_dim_of(config):
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def hf_tensors(config, seed):
    """Random weights with Hugging Face's names and shapes; scales that make attention sharp (so that rope,
    and any mistake in it, shows in the logits) and norm weights away from 1 (so that their order shows)."""
    g = torch.Generator().manual_seed(seed)
    d, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], head_dim_of(config)
    arch = config["architectures"][0]

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1.0 + randn(n, std=0.2)
    t = {"model.embed_tokens.weight": randn(vocab, d, std=0.5), "model.norm.weight": norm(d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": randn(heads * hd, d, std=0.4),
                  p + "self_attn.k_proj.weight": randn(kv * hd, d, std=0.4),
                  p + "self_attn.v_proj.weight": randn(kv * hd, d, std=0.2),
                  p + "self_attn.o_proj.weight": randn(d, heads * hd, std=0.1),
                  p + "mlp.gate_proj.weight": randn(inner, d, std=0.15),
                  p + "mlp.up_proj.weight": randn(inner, d, std=0.15),
                  p + "mlp.down_proj.weight": randn(d, inner, std=0.1),
                  p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d)})
        if arch == "Qwen2ForCausalLM":
            t.update({p + "self_attn.q_proj.bias": randn(heads * hd, std=0.5),
                      p + "self_attn.k_proj.bias": randn(kv * hd, std=0.5),
                      p + "self_attn.v_proj.bias": randn(kv * hd, std=0.2)})
        if arch == "Qwen3ForCausalLM":
            t.update({p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)})
    if not config.get("tie_word_embeddings"):
        t["lm_head.weight"] = randn(vocab, d, std=0.3)
    return t


def write_folder(folder, config, seed, dtype, tokenizer_bytes):
    """A Hugging Face folder of config with hf_tensors(config, seed) in dtype and a sentencepiece tokenizer."""
    folder.mkdir()
    tensors = {k: v.to(dtype).contiguous() for k, v in hf_tensors(config, seed).items()}
    safetensors.torch.save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "tokenizer.model").write_bytes(tokenizer_bytes)  # 256 tokens
    return folder


def read_folder(folder):
    return json.loads((folder / "config.json").read_text()), safetensors.torch.load_file(folder / "model.safetensors")


def rope_by_definition(config):
    """(inverse frequency of each pair, factor on cos and sin) of a Hugging Face config, element by element."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = config.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    return rope_formulas(theta, head_dim_of(config), scaling, config.get("max_position_embeddings"))


def rope_formulas(theta, d, scaling, max_positions):
    """transformers' definitions: default, linear, llama3 and yarn, with Python's math on each pair."""
    inv = [1.0 / theta ** (2 * i / d) for i in range(d // 2)]
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return inv, 1.0
    factor = scaling["factor"]
    if kind == "linear":
        return [f / factor for f in inv], 1.0
    if kind == "llama3":
        old, low, high = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], \
            scaling["high_freq_factor"]
        out = []
        for f in inv:
            wavelength = 2 * math.pi / f
            if wavelength < old / high:  # high frequencies: kept
                out.append(f)
            elif wavelength > old / low:  # low frequencies: slowed by factor
                out.append(f / factor)
            else:  # a smooth blend in between
                smooth = (old / wavelength - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out, 1.0
    assert kind == "yarn", kind
    old = scaling.get("original_max_position_embeddings") or max_positions

    def correction_dim(rotations):  # the dimension that turns `rotations` times over the old context
        return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    out = []
    for j, f in enumerate(inv):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        extrapolation = 1 - ramp
        out.append(f / factor * (1 - extrapolation) + f * extrapolation)

    def mscale(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
    attention = scaling.get("attention_factor")
    if attention is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention = mscale(factor)
    return out, attention


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def hf_forward(config, t, tokens):
    """Logits as Hugging Face's Llama / Mistral / Qwen 2 / Qwen 3 compute them, on Hugging Face's tensors."""
    B, T = tokens.shape
    heads, kv, hd, eps = config["num_attention_heads"], config["num_key_value_heads"], head_dim_of(config), \
        config["rms_norm_eps"]
    t = {k: v.float() for k, v in t.items()}
    inv, attention_factor = rope_by_definition(config)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor(inv, dtype=torch.float64)[None]
    angles = torch.cat((angles, angles), -1)  # feature i and i + hd/2 turn together
    cos, sin = (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()
    h = t["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, t[p + "input_layernorm.weight"], eps)

        def project(name, n):
            y = x @ t[p + f"self_attn.{name}.weight"].T
            if p + f"self_attn.{name}.bias" in t:
                y = y + t[p + f"self_attn.{name}.bias"]
            return y.view(B, T, n, hd).transpose(1, 2)
        q, k, v = project("q_proj", heads), project("k_proj", kv), project("v_proj", kv)
        if p + "self_attn.q_norm.weight" in t:  # Qwen 3: per head, before rope
            q, k = rms(q, t[p + "self_attn.q_norm.weight"], eps), rms(k, t[p + "self_attn.k_norm.weight"], eps)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, heads * hd)
        h = h + out @ t[p + "self_attn.o_proj.weight"].T
        x = rms(h, t[p + "post_attention_layernorm.weight"], eps)
        h = h + (F.silu(x @ t[p + "mlp.gate_proj.weight"].T) * (x @ t[p + "mlp.up_proj.weight"].T)) @ \
            t[p + "mlp.down_proj.weight"].T
    head = t["lm_head.weight"] if "lm_head.weight" in t else t["model.embed_tokens.weight"]  # tied: the table
    return rms(h, t["model.norm.weight"], eps) @ head.T


def meta_rows_by_definition(w, heads):
    """Hugging Face's row i of a head pairs with row i + head_dim/2; Meta's pairs are rows 2i and 2i+1."""
    head_dim = w.shape[0] // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for i in range(head_dim // 2):
            out[h * head_dim + 2 * i] = w[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = w[h * head_dim + head_dim // 2 + i]
    return out


def meta_weights(config, t):
    """{Meta key: fp32 tensor}: q and k rows and biases permuted per head, q/k norm weights within the head."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    out = {}
    for name, w in t.items():
        w = w.float()
        if not name.startswith("model.layers."):
            key = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                   "lm_head.weight": "output.weight"}[name]
        else:
            layer, rest = name.split(".", 3)[2:]
            module, kind = rest.rsplit(".", 1)
            key = f"layers.{layer}.{HF_TO_META[module]}.{kind}"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                w = meta_rows_by_definition(w, heads if module == "self_attn.q_proj" else kv)
            elif module in ("self_attn.q_norm", "self_attn.k_norm"):
                w = meta_rows_by_definition(w, 1)
        out[key] = w
    return out


def reference_of(folder, untied=False):
    """(reference.Reference of a folder, its Meta-order weights); untied: with an output projection of its
    own, a copy of the table."""
    config, t = read_folder(folder)
    weights = meta_weights(config, t)
    params = {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
              "n_heads": config["num_attention_heads"], "n_kv_heads": config["num_key_value_heads"],
              "norm_eps": config["rms_norm_eps"], "hidden_dim": config["intermediate_size"],
              "head_dim": head_dim_of(config)}
    model_weights = {**weights, "output.weight": weights["tok_embeddings.weight"].clone()} if untied else weights
    return Reference(model_weights, params, rope=rope_by_definition(config)), weights


def tokens_for(seed=0, batch=2, length=SEQ):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
         "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
         "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_rows_by_definition(w, heads):
    """Hugging Face's rotary pairs feature i with i + head_dim/2 of a head, Meta's 2i with 2i+1: Meta's
    row 2i of a head becomes row i, row 2i+1 becomes row i + head_dim/2."""
    head_dim = w.shape[0] // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for i in range(head_dim // 2):
            out[h * head_dim + i] = w[h * head_dim + 2 * i]
            out[h * head_dim + head_dim // 2 + i] = w[h * head_dim + 2 * i + 1]
    return out


def save_as_hf(meta_folder, out, files=1, bin_format=False):
    """The same model in Hugging Face's layout, written here independently of hf.py."""
    weights, params = read_meta_folder(meta_folder)
    dtype = torch.load(next(meta_folder.glob("consolidated.*.pth")), weights_only=True)["norm.weight"].dtype
    heads, kv = params["n_heads"], params.get("n_kv_heads") or params["n_heads"]
    tensors = {}
    for key, w in weights.items():
        if key == "rope.freqs":
            continue
        if key.endswith(("wq.weight", "wk.weight")):
            w = hf_rows_by_definition(w, heads if "wq" in key else kv)
        if key.startswith("layers."):
            _, layer, rest = key.split(".", 2)
            name = f"model.layers.{layer}.{NAMES[rest.removesuffix('.weight')]}.weight"
        else:
            name = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}[key]
        tensors[name] = w.to(dtype).contiguous()
    out.mkdir()
    names = sorted(tensors)
    groups = [names[i::files] for i in range(files)]
    suffix = "bin" if bin_format else "safetensors"
    file_names = [f"model-{i + 1:05d}-of-{files:05d}.{suffix}" for i in range(files)] if files > 1 else \
        ["pytorch_model.bin" if bin_format else "model.safetensors"]
    for file, group in zip(file_names, groups):
        part = {k: tensors[k] for k in group}
        torch.save(part, out / file) if bin_format else safetensors.torch.save_file(part, out / file)
    if files > 1:
        index = "pytorch_model.bin.index.json" if bin_format else "model.safetensors.index.json"
        (out / index).write_text(json.dumps({"weight_map": {k: f for f, g in zip(file_names, groups) for k in g}}))
    hidden = weights["layers.0.feed_forward.w1.weight"].shape[0]
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": params["dim"], "intermediate_size": hidden,
        "num_hidden_layers": params["n_layers"], "num_attention_heads": heads, "num_key_value_heads": kv,
        "vocab_size": weights["output.weight"].shape[0], "rms_norm_eps": params["norm_eps"]}))
    (out / "tokenizer.model").write_bytes((meta_folder / "tokenizer.model").read_bytes())
    return out
