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

import compare
from reference import Reference, read_meta_folder

BASE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0, "vocab_size": 320,
         "sliding_window": 8, "use_sliding_window": False, "max_window_layers": 2}  # the window is off
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32, "rope_theta": 1000000.0,
         "vocab_size": 320, "tie_word_embeddings": True, "attention_bias": False, "sliding_window": None,
         "use_sliding_window": False, "max_window_layers": 2}
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
    "qwen3": QWEN3,
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
    # Qwen 2 with use_sliding_window: the layers from max_window_layers on slide (here the second, window 4)
    "qwen2-window": {**QWEN2, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    # Qwen 3 likewise (its configuration slides the same layers)
    "qwen3-window": {**QWEN3, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    # Mistral v0.1 with a window shorter than the sequences
    "mistral-window": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "head_dim": 16,
                       "rope_theta": 1000000.0, "sliding_window": 4, "max_position_embeddings": 32768},
    # Gemma 3 (1B to 27B): sandwich norms of (1 + w), GeGLU, scaled embeddings, q/k norms over each head, heads
    # wider than hidden / heads, query_pre_attn_scalar of its own, two sliding layers then a full one (window 4),
    # the sliding layers' own rope theta, linear rope scaling on the full ones (4B and up), tied
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 32,
               "num_hidden_layers": 3, "query_pre_attn_scalar": 24, "sliding_window": 4, "sliding_window_pattern": 3,
               "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "hidden_activation": "gelu_pytorch_tanh",
               "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "tie_word_embeddings": True, "vocab_size": 320,
               "final_logit_softcapping": None, "attn_logit_softcapping": None},
    # Gemma 2: the same family with capped attention and output logits, layers sliding and full in turn
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 16,
               "query_pre_attn_scalar": 16, "sliding_window": 4, "attn_logit_softcapping": 5.0,
               "final_logit_softcapping": 3.0, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    # Phi-3 (mini 4k): q, k, v in qkv_proj, gate and up in gate_up_proj, a sliding window on every layer
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "sliding_window": 8, "rms_norm_eps": 1e-5,
             "pad_token_id": 0},
    # Phi-4-mini / Phi-3.5-mini: longrope (original context 8: long factors past it), partial rotary (12 of 16), tied
    "phi3-longrope": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "partial_rotary_factor": 0.75,
                      "pad_token_id": 0,
                      "max_position_embeddings": 32, "original_max_position_embeddings": 8,
                      "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                       "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]},
                      "tie_word_embeddings": True, "sliding_window": None},
    # OLMo 2: norms after attention and the MLP only, q/k norms over the whole projections
    "olmo2": {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "rope_theta": 500000.0,
              "rms_norm_eps": 1e-6, "attention_bias": False},
    # Qwen3-MoE (30B-A3B): Qwen 3's attention, experts renormalised (norm_topk_prob), a dense layer between
    # sparse ones (mlp_only_layers), the experts' own FFN size (transformers 5 writes num_local_experts)
    "qwen3moe": {**QWEN3, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": 3,
                 "tie_word_embeddings": False, "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 40,
                 "norm_topk_prob": True, "mlp_only_layers": [1], "decoder_sparse_step": 1},
    # Mixtral 8x7B: Mistral's attention with a window shorter than the sequences, 4 experts, top 2
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "rope_theta": 1000000.0,
                "sliding_window": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48},
    # OLMoE: q/k norms over the whole projections, a key and value head for each query head, 8 experts, top 3,
    # not renormalised
    "olmoe": {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "rms_norm_eps": 1e-5, "num_experts": 8,
              "num_key_value_heads": 4,
              "num_experts_per_tok": 3, "intermediate_size": 40, "norm_topk_prob": False, "pad_token_id": 1},

}
TIED = ["llama3", "qwen3", "qwen3-window", "smollm2", "gemma3", "gemma2", "phi3-longrope"]
MOE = ["qwen3moe", "mixtral", "olmoe"]  # mixtures of experts
NEW = ["gemma3", "gemma2", "phi3", "phi3-longrope", "olmo2", *MOE]  # families Meta never published in its layout
WINDOWED = ["qwen2-window", "qwen3-window", "mistral-window", "gemma3", "gemma2", "phi3", "mixtral"]
SEQ = 12

# --- Hugging Face's convention, written here ---

HF_TO_META = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
              "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm"}


EXPERT_TO_META = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "w1": "w1", "w2": "w2", "w3": "w3"}


DROP = object()  # a change's value meaning "the key removed"


def config_of(family, **changes):
    config = {**BASE, **copy.deepcopy(FAMILIES[family])}
    for key, value in changes.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def family_of(config):
    return {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
            "Phi3ForCausalLM": "phi3", "Olmo2ForCausalLM": "olmo2", "Qwen3MoeForCausalLM": "qwen3moe",
            "MixtralForCausalLM": "mixtral", "OlmoeForCausalLM": "olmoe"}[config["architectures"][0]]


def head_dim_of(config):
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rotary_dim_of(config):
    return int(head_dim_of(config) * config.get("partial_rotary_factor", 1.0))


def layer_types_of(config):
    """Which layers slide, as transformers' configurations say (Mistral, Phi-3: all where a window is set;
    Qwen 2 and 3: from max_window_layers on with use_sliding_window; Gemma 2: every other; Gemma 3: all but every
    sliding_window_pattern-th; layer_types where given)."""
    n, family, window = config["num_hidden_layers"], family_of(config), config.get("sliding_window")
    if config.get("layer_types"):
        return config["layer_types"]
    slides = {"mistral": lambda i: bool(window), "phi3": lambda i: bool(window), "mixtral": lambda i: bool(window),
              **dict.fromkeys(("qwen2", "qwen3", "qwen3moe"), lambda i: bool(config.get("use_sliding_window"))
                              and i >= config.get("max_window_layers", 28)),
              "gemma2": lambda i: (i + 1) % 2 == 1,
              "gemma3": lambda i: (i + 1) % config.get("sliding_window_pattern", 6) != 0}.get(family, lambda i: False)
    return ["sliding_attention" if slides(i) else "full_attention" for i in range(n)]


def n_experts(config):
    return config.get("num_experts") or config.get("num_local_experts") or 0


def sparse(config, layer):
    """Whether a layer's MLP is a mixture of experts, as transformers' configurations say (Qwen3-MoE: not in
    mlp_only_layers and on the decoder_sparse_step)."""
    return n_experts(config) > 0 and layer not in config.get("mlp_only_layers", []) and \
        (layer + 1) % config.get("decoder_sparse_step", 1) == 0


def expert_names(config):
    """(where a block keeps its experts, the names of an expert's gate, up and down projections)."""
    if family_of(config) == "mixtral":
        return "block_sparse_moe", ("w1", "w3", "w2")
    return "mlp", ("gate_proj", "up_proj", "down_proj")


def routed(config, t, p, x, lora, i, router_logits=None):
    """A mixture's MLP by its definition: softmax of the router's logits in fp32, the top k of them (renormalised
    where norm_topk_prob, always in Mixtral), each token's output the sum of its chosen experts' outputs times
    their weights; written here as every expert on every token, masked (not as slowllama streams them)."""
    moe, names = expert_names(config)
    logits = x @ t[p + f"{moe}.gate.weight"].T
    if (i, "router") in lora:
        a, b, scale = lora[i, "router"]
        logits = logits + scale * (x @ a.T) @ b.T
    if router_logits is not None:
        router_logits.append(logits.flatten(0, -2))
    probs = logits.float().softmax(-1)
    weights, chosen = probs.topk(config["num_experts_per_tok"], -1)
    if config.get("norm_topk_prob") or family_of(config) == "mixtral":
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(n_experts(config)):
        w = (weights * (chosen == e)).sum(-1, keepdim=True)  # 0 where e is not among a token's choices

        def proj(h, n, part):
            y = h @ t[p + f"{moe}.experts.{e}.{n}.weight"].T
            if (i, e, part) in lora:
                a, b, scale = lora[i, e, part]
                y = y + scale * (h @ a.T) @ b.T
            return y
        hidden = F.silu(proj(x, names[0], "gate")) * proj(x, names[1], "up")
        out = out + w * proj(hidden, names[2], "down")
    return out


def hf_tensors(config, seed):
    """Random weights with Hugging Face's names and shapes of the family; scales that make attention sharp (so
    that rope, and any mistake in it, shows in the logits) and norm weights away from their neutral value (so
    that their order shows)."""
    g = torch.Generator().manual_seed(seed)
    family = family_of(config)
    d, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], head_dim_of(config)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def norm(n):  # Gemma's scale by (1 + w): weights about 0
        return (0.0 if family.startswith("gemma") else 1.0) + randn(n, std=0.2)
    t = {"model.embed_tokens.weight": randn(vocab, d, std=0.5 if not family.startswith("gemma") else 0.1),
         "model.norm.weight": norm(d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q, k, v = randn(heads * hd, d, std=0.4), randn(kv * hd, d, std=0.4), randn(kv * hd, d, std=0.2)
        gate, up = randn(inner, d, std=0.15), randn(inner, d, std=0.15)
        if family == "phi3":
            t.update({p + "self_attn.qkv_proj.weight": torch.cat((q, k, v)), p + "mlp.gate_up_proj.weight": torch.cat((gate, up))})
        else:
            t.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                      p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
        t.update({p + "self_attn.o_proj.weight": randn(d, heads * hd, std=0.1),
                  p + "mlp.down_proj.weight": randn(d, inner, std=0.1), p + "post_attention_layernorm.weight": norm(d)})
        if sparse(config, i):  # the router and each expert's gate, up and down, in place of the dense MLP
            for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
                del t[p + name]
            moe, names = expert_names(config)
            t[p + f"{moe}.gate.weight"] = randn(n_experts(config), d, std=0.5)
            size = config.get("moe_intermediate_size") or inner
            for e in range(n_experts(config)):
                t.update({p + f"{moe}.experts.{e}.{names[0]}.weight": randn(size, d, std=0.15),
                          p + f"{moe}.experts.{e}.{names[1]}.weight": randn(size, d, std=0.15),
                          p + f"{moe}.experts.{e}.{names[2]}.weight": randn(d, size, std=0.1)})
        if family != "olmo2":
            t[p + "input_layernorm.weight"] = norm(d)
        if family.startswith("gemma"):
            t.update({p + "pre_feedforward_layernorm.weight": norm(d), p + "post_feedforward_layernorm.weight": norm(d)})
        if family == "olmo2":
            t[p + "post_feedforward_layernorm.weight"] = norm(d)
        if family in ("olmo2", "olmoe"):
            t.update({p + "self_attn.q_norm.weight": norm(heads * hd), p + "self_attn.k_norm.weight": norm(kv * hd)})
        if family == "qwen2":
            t.update({p + "self_attn.q_proj.bias": randn(heads * hd, std=0.5),
                      p + "self_attn.k_proj.bias": randn(kv * hd, std=0.5),
                      p + "self_attn.v_proj.bias": randn(kv * hd, std=0.2)})
        if family in ("qwen3", "gemma3", "qwen3moe"):
            t.update({p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)})
    if not config.get("tie_word_embeddings"):
        t["lm_head.weight"] = randn(vocab, d, std=0.3)
    return t


def write_folder(folder, config, seed, dtype, tokenizer_bytes, image_text=None):
    """A Hugging Face folder of config with hf_tensors(config, seed) in dtype and a sentencepiece tokenizer.
    image_text (Gemma 3): as an image-text model's checkpoint, its config nested under text_config and its
    tensors under that prefix ("model.language_model.": transformers 5, "language_model.model.": 4)."""
    folder.mkdir()
    tensors = {k: v.to(dtype).contiguous() for k, v in hf_tensors(config, seed).items()}
    if image_text:
        tensors = {image_text + k.removeprefix("model."): v for k, v in tensors.items()}
        config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                  "text_config": config, "vision_config": {"model_type": "siglip_vision_model"}}
    safetensors.torch.save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "tokenizer.model").write_bytes(tokenizer_bytes)  # 256 tokens
    return folder


def read_folder(folder):
    """(the text model's config, its tensors named as a text model's)."""
    config = json.loads((folder / "config.json").read_text())
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    if "text_config" in config:
        config = config["text_config"]
        tensors = {"model." + k.split("language_model.", 1)[1].removeprefix("model."): v for k, v in tensors.items()}
    return config, tensors


def rope_by_definition(config, length=0, local=False):
    """(inverse frequency of each rotary pair, factor on cos and sin) of a Hugging Face config, element by
    element; length: the positions of the pass (longrope's choice); local: Gemma 3's sliding layers."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = config.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    if local:
        return rope_formulas(config.get("rope_local_base_freq", 10000.0), rotary_dim_of(config), {}, None)
    if (scaling.get("type") or scaling.get("rope_type")) in ("longrope", "su"):
        return longrope_formulas(theta, rotary_dim_of(config), {**scaling, "original_max_position_embeddings":
                                 config["original_max_position_embeddings"]}, config["max_position_embeddings"], length)
    return rope_formulas(theta, rotary_dim_of(config), scaling, config.get("max_position_embeddings"))


def longrope_formulas(theta, d, scaling, max_positions, length):
    """transformers' longrope: the long factors for passes past the original context, the short ones else;
    cos and sin times sqrt(1 + ln(max / original) / ln(original))."""
    old = scaling["original_max_position_embeddings"]
    factors = scaling["long_factor"] if length > old else scaling["short_factor"]
    inv = [1.0 / (factors[i] * theta ** (2 * i / d)) for i in range(d // 2)]
    ratio = max_positions / old
    return inv, 1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(old))


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


def rms(x, w, eps, offset=0.0):
    return (offset + w) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def hf_forward(config, t, tokens, lora=None, router_logits=None):
    """Logits as Hugging Face's Llama / Mistral / Qwen 2 / Qwen 3 / Gemma 2 / Gemma 3 / Phi-3 / OLMo 2 /
    Qwen3-MoE / Mixtral / OLMoE compute them, on Hugging Face's tensors (all of it differentiable: a training
    step's reference). lora: {(layer, "q" | "k" | "v" | "o" | "gate" | "up" | "down"): (A, B, scale)} adds
    scale * B A x to that projection (of a fused one, to its part); (layer, expert, "gate" | "up" | "down"): to
    an expert's; (layer, "router"): to the router; (None, "head"): to the output. router_logits: a list each
    sparse layer's router logits (tokens, experts) are appended to."""
    family, lora = family_of(config), lora or {}
    gemma = family.startswith("gemma")
    B, T = tokens.shape
    heads, kv, hd, eps = config["num_attention_heads"], config["num_key_value_heads"], head_dim_of(config), \
        config["rms_norm_eps"]
    offset, rd = (1.0 if gemma else 0.0), rotary_dim_of(config)
    types = layer_types_of(config)

    def rope(local):
        inv, factor = rope_by_definition(config, T, local and family == "gemma3")
        angles = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor(inv, dtype=torch.float64)[None]
        angles = torch.cat((angles, angles), -1)  # feature i and i + rd/2 turn together
        return (angles.cos() * factor).float(), (angles.sin() * factor).float()

    def turn(x, cos, sin):  # the first rd features of each head; the rest pass through
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), -1)
    ropes = {False: rope(False), True: rope(True)}
    pad = config.get("pad_token_id", {"gemma2": 0, "gemma3": 0, "phi3": 32000, "olmo2": 1, "olmoe": 1}.get(family))
    h = F.embedding(tokens, t["model.embed_tokens.weight"], padding_idx=pad if pad is not None and
                    pad < config["vocab_size"] else None)  # the padding row takes no gradient from lookups
    if gemma:  # times sqrt(hidden_size) in the weights' dtype
        h = h * torch.tensor(config["hidden_size"] ** 0.5, dtype=t["model.embed_tokens.weight"].dtype)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."

        def linear(x, name, part=None, bias=None):
            y = x @ t[p + name].T
            if bias is not None:
                y = y + bias
            if (i, part) in lora:
                a, b, scale = lora[i, part]
                y = y + scale * (x @ a.T) @ b.T
            return y
        x = h if family == "olmo2" else rms(h, t[p + "input_layernorm.weight"], eps, offset)
        if family == "phi3":  # q | k | v rows of one projection
            qkv = x @ t[p + "self_attn.qkv_proj.weight"].T
            q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], -1)
            for part, idx in (("q", 0), ("k", 1), ("v", 2)):
                if (i, part) in lora:
                    a, b, scale = lora[i, part]
                    delta = scale * (x @ a.T) @ b.T
                    q, k, v = [y + delta if j == idx else y for j, y in enumerate((q, k, v))]
        else:
            q, k, v = (linear(x, f"self_attn.{n}_proj.weight", n, t.get(p + f"self_attn.{n}_proj.bias")) for n in "qkv")
        if family in ("olmo2", "olmoe"):  # over the whole projections, before the heads
            q, k = rms(q, t[p + "self_attn.q_norm.weight"], eps), rms(k, t[p + "self_attn.k_norm.weight"], eps)
        q, k, v = (y.view(B, T, n, hd).transpose(1, 2) for y, n in ((q, heads), (k, kv), (v, kv)))
        if family in ("qwen3", "gemma3", "qwen3moe"):  # over each head, before rope
            q = rms(q, t[p + "self_attn.q_norm.weight"], eps, offset)
            k = rms(k, t[p + "self_attn.k_norm.weight"], eps, offset)
        sliding = types[i] == "sliding_attention"
        cos, sin = ropes[sliding]
        q, k = turn(q, cos, sin), turn(k, cos, sin)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scale = config["query_pre_attn_scalar"] ** -0.5 if gemma else hd ** -0.5
        scores = (q @ k.transpose(-1, -2)) * scale
        if config.get("attn_logit_softcapping") and family == "gemma2":
            cap = config["attn_logit_softcapping"]
            scores = torch.tanh(scores / cap) * cap
        query, key = torch.arange(T)[:, None], torch.arange(T)[None, :]
        hidden = key > query
        if sliding:  # the last sliding_window keys, the query's own included
            hidden = hidden | (key <= query - config["sliding_window"])
        scores = scores.masked_fill(hidden, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, heads * hd)
        out = linear(out, "self_attn.o_proj.weight", "o")
        if gemma or family == "olmo2":
            out = rms(out, t[p + "post_attention_layernorm.weight"], eps, offset)
        h = h + out
        x = h if family == "olmo2" else rms(h, t[p + ("pre_feedforward_layernorm.weight" if gemma else
                                                        "post_attention_layernorm.weight")], eps, offset)
        if family == "phi3":  # gate | up rows of one projection
            gate, up = (x @ t[p + "mlp.gate_up_proj.weight"].T).chunk(2, -1)
            for part in ("gate", "up"):
                if (i, part) in lora:
                    a, b, scale = lora[i, part]
                    delta = scale * (x @ a.T) @ b.T
                    gate, up = (gate + delta, up) if part == "gate" else (gate, up + delta)
        elif sparse(config, i):
            h = h + routed(config, t, p, x, lora, i, router_logits)
            continue
        else:
            gate, up = linear(x, "mlp.gate_proj.weight", "gate"), linear(x, "mlp.up_proj.weight", "up")
        act = F.gelu(gate, approximate="tanh") if gemma else F.silu(gate)
        f = linear(act * up, "mlp.down_proj.weight", "down")
        if gemma or family == "olmo2":
            f = rms(f, t[p + "post_feedforward_layernorm.weight"], eps, offset)
        h = h + f
    head = t["lm_head.weight"] if "lm_head.weight" in t else t["model.embed_tokens.weight"]  # tied: the table
    x = rms(h, t["model.norm.weight"], eps, offset)
    logits = x @ head.T
    if (None, "head") in lora:
        a, b, scale = lora[None, "head"]
        logits = logits + scale * (x @ a.T) @ b.T
    if config.get("final_logit_softcapping") and gemma:
        cap = config["final_logit_softcapping"]
        logits = torch.tanh(logits / cap) * cap
    return logits


def meta_rows_by_definition(w, heads, rotary=None):
    """Hugging Face's row i of a head pairs with row i + rotary/2 (of its first rotary rows); Meta's pairs are
    rows 2i and 2i+1; the rows past rotary stay where they are."""
    head_dim = w.shape[0] // heads
    rotary = rotary or head_dim
    out = w.clone()
    for h in range(heads):
        for i in range(rotary // 2):
            out[h * head_dim + 2 * i] = w[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = w[h * head_dim + rotary // 2 + i]
    return out


def meta_weights(config, t):
    """{Meta key: fp32 tensor}: Hugging Face's tensors under slowllama's names (each family's norms; Phi-3's fused
    projections split), q and k rows and biases permuted per head (of its rotary features), q/k norm weights
    within the head, or over every head where they norm the whole projection (OLMo 2)."""
    family = family_of(config)
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], head_dim_of(config)
    rd = rotary_dim_of(config) if rotary_dim_of(config) != hd else None
    norms = {"input_layernorm": "attention_norm",
             "post_attention_layernorm": "post_attention_norm" if family.startswith("gemma") or family == "olmo2"
             else "ffn_norm", "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffn_norm"}
    out = {}
    for name, w in t.items():
        w = w.float()
        if not name.startswith("model.layers."):
            out[{"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}[name]] = w
            continue
        layer, rest = name.split(".", 3)[2:]
        module, kind = rest.rsplit(".", 1)
        expert = EXPERT_TO_META.get(module.split(".")[-1]) if ".experts." in module else None
        if expert:  # mlp.experts.5.gate_proj -> experts.5.w1
            out[f"layers.{layer}.experts.{module.split('.')[-2]}.{expert}.{kind}"] = w
            continue
        if module.endswith(".gate"):  # the router
            out[f"layers.{layer}.feed_forward.gate.{kind}"] = w
            continue
        if module == "self_attn.qkv_proj":
            parts = dict(zip(("attention.wq", "attention.wk", "attention.wv"), w.split([heads * hd, kv * hd, kv * hd])))
        elif module == "mlp.gate_up_proj":
            parts = dict(zip(("feed_forward.w1", "feed_forward.w3"), w.chunk(2)))
        else:
            parts = {norms.get(module) or HF_TO_META[module]: w}
        for meta, part in parts.items():
            if meta in ("attention.wq", "attention.wk"):
                part = meta_rows_by_definition(part, heads if meta == "attention.wq" else kv, rd)
            elif meta in ("attention.q_norm", "attention.k_norm"):
                whole = family in ("olmo2", "olmoe")
                part = meta_rows_by_definition(part, (heads if meta == "attention.q_norm" else kv) if whole else 1, rd)
            out[f"layers.{layer}.{meta}.{kind}"] = part
    return out


def reference_step(folder, x, y, optimizer, lr, untied=False):
    """One autograd step on the family's definition (families.hf_forward) on the folder's tensors: (loss,
    {Meta key: updated tensor}, initial Meta weights, {Meta key: flat indices of the elements whose gradient was
    at float rounding level}); untied: with an output projection of its own, a copy of the table."""
    config, t = read_folder(folder)
    params = {k: v.float().clone().requires_grad_() for k, v in t.items()}
    if untied:
        params["lm_head.weight"] = params["model.embed_tokens.weight"].detach().clone().requires_grad_()
    opt = torch.optim.SGD(params.values(), lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params.values(), lr=lr)
    loss = F.cross_entropy(hf_forward(config, params, x).flatten(0, 1), y.flatten(), ignore_index=-1)
    loss.backward()
    marks = {k: compare.rounding_level(g) for k, g in meta_weights(config, {n: p.grad for n, p in params.items()}).items()}
    for name, p in params.items():  # an expert no token chose has no gradient (transformers 4's modules of their
        if ".experts." in name and not p.grad.any():  # own): AdamW neither decays nor moves it
            p.grad = None
    opt.step()
    updated = meta_weights(config, {n: p.detach() for n, p in params.items()})
    return loss.item(), updated, meta_weights(config, {n: p for n, p in t.items() if n in params}), marks


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
