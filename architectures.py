"""The families slowllama reads in Hugging Face's layout: what each one's config.json means (as the settings
of model.ModelArgs, in params.json's terms) and what its tensors are named.

Each family as transformers defines it (its modeling and configuration code, read; every default below is
the family's own where config.json leaves a key out):
- Llama (Llama 2 / 3.x, CodeLlama, TinyLlama, SmolLM2), Mistral: norms before attention and the MLP, SwiGLU;
- Qwen 2 / 2.5: q, k, v biases (and, with use_sliding_window, sliding layers from max_window_layers on);
  Qwen 3: RMSNorm over each head of q and k;
- Gemma 2 / 3: norms before and after attention and the MLP scaling by (1 + w), GeGLU, embeddings times
  sqrt(hidden_size), attention scaled by query_pre_attn_scalar ** -0.5, sliding and full layers (layer_types);
  Gemma 2 caps attention and output logits; Gemma 3 norms each head of q and k and turns its sliding layers
  with a theta of their own (rope_local_base_freq), without the scaling of its full layers;
- Phi-3 / Phi-4: q, k, v in one qkv_proj and gate and up in one gate_up_proj (split on reading, joined on
  writing), longrope scaling, partial rotary;
- OLMo 2: norms after attention and the MLP only, RMSNorm over the whole q and k projections;
- mixtures of experts (moe.py): Qwen3-MoE (Qwen 3's attention; num_experts, top num_experts_per_tok, renormalised
  where norm_topk_prob, dense MLPs in mlp_only_layers and off the decoder_sparse_step), Mixtral (Mistral's
  attention, 8 experts, top 2, always renormalised), OLMoE (q/k norms over the whole projections, norms before
  attention and the MLP). Each expert's tensors are their own in the checkpoints (mlp.experts.N.gate_proj, or
  Mixtral's block_sparse_moe.experts.N.w1), read and written so.
"""
import math
from pathlib import Path

from meta_format import check_heads
from utils import UserError, check_keys, read_json_object

FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
            "Gemma3ForConditionalGeneration": "gemma3", "Phi3ForCausalLM": "phi3", "Olmo2ForCausalLM": "olmo2",
            "Qwen3MoeForCausalLM": "qwen3moe", "MixtralForCausalLM": "mixtral", "OlmoeForCausalLM": "olmoe"}
MOE = ("qwen3moe", "mixtral", "olmoe")
# transformers' defaults where config.json leaves a key out
DEFAULTS = {"gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                       "final_logit_softcapping": 30.0, "sliding_window": 4096, "tie_word_embeddings": True,
                       "rms_norm_eps": 1e-6, "pad_token_id": 0},
            "gemma3": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                       "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                       "rope_local_base_freq": 10000.0, "pad_token_id": 0},
            "phi3": {"rms_norm_eps": 1e-5, "pad_token_id": 32000}, "olmo2": {"rms_norm_eps": 1e-5, "pad_token_id": 1},
            "qwen3moe": {"num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
                         "norm_topk_prob": False, "mlp_only_layers": []},
            "mixtral": {"num_experts_per_tok": 2, "rms_norm_eps": 1e-5},
            "olmoe": {"num_experts_per_tok": 8, "norm_topk_prob": False, "rms_norm_eps": 1e-5, "pad_token_id": 1}}
EXPERTS = {"qwen3moe": 128, "mixtral": 8, "olmoe": 64}  # the configurations' default number of experts
# the rope scalings read, and the numbers each needs (longrope also its lists of factors)
ROPE_TYPES = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "linear": ("factor",), "yarn": ("factor",), "longrope": ("original_max_position_embeddings",)}
NORM_NAMES = {"pre": {"attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"},
              "sandwich": {"attention_norm.weight": "input_layernorm.weight",
                           "post_attention_norm.weight": "post_attention_layernorm.weight",
                           "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                           "post_ffn_norm.weight": "post_feedforward_layernorm.weight"},
              "post": {"post_attention_norm.weight": "post_attention_layernorm.weight",
                       "post_ffn_norm.weight": "post_feedforward_layernorm.weight"}}
BLOCK_NAMES = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
               "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
               "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
               "feed_forward.w3.weight": "mlp.up_proj.weight",
               "attention.wq.bias": "self_attn.q_proj.bias", "attention.wk.bias": "self_attn.k_proj.bias",
               "attention.wv.bias": "self_attn.v_proj.bias", "attention.q_norm.weight": "self_attn.q_norm.weight",
               "attention.k_norm.weight": "self_attn.k_norm.weight"}
# Phi-3's fused projections: their parts in row order
FUSED = {"phi3": {"self_attn.qkv_proj.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
                  "mlp.gate_up_proj.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight")}}
# a mixture's router and experts: where each family keeps them in a block
MOE_NAMES = {"qwen3moe": ("mlp", {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}),
             "olmoe": ("mlp", {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}),
             "mixtral": ("block_sparse_moe", {"w1": "w1", "w2": "w2", "w3": "w3"})}
TOP_NAMES = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
# where the text model's tensors are: text models, and Gemma 3's image-text checkpoints (two layouts)
PREFIXES = ("model.", "language_model.model.", "model.language_model.")


# --- config.json ---

def read_config(folder):
    """(params in params.json's terms, the text model's config as transformers reads it) of a folder."""
    path = Path(folder) / "config.json"
    config = read_json_object(path)
    check_keys(path, config, {"architectures": "a non-empty list of strings"})
    arch = config["architectures"][0]
    if arch not in FAMILIES:
        raise UserError(f"{path}: architecture {arch} is not supported; slowllama reads {', '.join(FAMILIES)}")
    family = FAMILIES[arch]
    if arch == "Gemma3ForConditionalGeneration":  # the text part of an image-text model
        check_keys(path, config, {"text_config": "an object"})
        config = {**config["text_config"], "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    config = {**DEFAULTS.get(family, {}), **config}
    check_keys(path, config, {
        "hidden_size": "a positive integer", "num_hidden_layers": "a positive integer",
        "num_attention_heads": "a positive integer", "intermediate_size": "a positive integer",
        "vocab_size": "a positive integer"}, {
        "num_key_value_heads": "a positive integer or null", "rms_norm_eps": "a positive number",
        "rope_theta": "a positive number or null", "head_dim": "a positive integer or null",
        "tie_word_embeddings": "true or false", "max_position_embeddings": "a positive integer",
        "query_pre_attn_scalar": "a positive number", "attn_logit_softcapping": "a positive number or null",
        "final_logit_softcapping": "a positive number or null", "rope_local_base_freq": "a positive number",
        "partial_rotary_factor": "a positive number"})
    for key in ("attention_bias", "mlp_bias", "clip_qkv"):  # not in these models' releases
        if config.get(key):
            raise UserError(f"{path}: {key} is not supported")
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    rotary_dim = int(head_dim * config.get("partial_rotary_factor", 1.0)) if family == "phi3" else head_dim
    gemma = family in ("gemma2", "gemma3")
    rope_parameters = config.get("rope_parameters") or {}
    params = {"family": family, "dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
              "n_heads": n_heads, "n_kv_heads": config.get("num_key_value_heads") or n_heads,
              "vocab_size": config["vocab_size"], "multiple_of": 256, "hidden_dim": config["intermediate_size"],
              "norm_eps": config.get("rms_norm_eps", 1e-6),  # transformers' default
              "rope_theta": rope_theta(config, family), "head_dim": head_dim, "qkv_bias": family == "qwen2",
              "qk_norm": {"qwen3": "head", "gemma3": "head", "olmo2": "all", "qwen3moe": "head", "olmoe": "all"}.get(family),
              "tie_embeddings": bool(config.get("tie_word_embeddings")),
              "rope_scaling": rope_scaling(path, config, family, rotary_dim),
              "max_position_embeddings": config.get("max_position_embeddings"),
              "norms": "sandwich" if gemma else "post" if family == "olmo2" else "pre",
              "pad_id": pad_id(config)}
    params.update(sliding(path, config, family))
    if family in MOE:
        params.update(experts(path, config, family))
    if gemma:
        params.update(norm_offset=1.0, activation=activation(path, config), attn_scale=config["query_pre_attn_scalar"] ** -0.5,
                      embed_scale=math.sqrt(config["hidden_size"]))  # rounded to the weights' dtype on conversion
        if family == "gemma2":
            params.update(attn_softcap=config.get("attn_logit_softcapping"),
                          final_softcap=config.get("final_logit_softcapping"))
        else:
            params["final_softcap"] = config.get("final_logit_softcapping")
            local = (rope_parameters.get("sliding_attention") or {}).get("rope_theta")
            params["rope_local_theta"] = local or config.get("rope_local_base_freq") or 10000.0
    if rotary_dim != head_dim:
        params["rotary_dim"] = rotary_dim
    check_heads(path, head_dim * n_heads, n_heads, params["n_kv_heads"],
                ("num_attention_heads * head_dim" if config.get("head_dim") else "hidden_size", "num_attention_heads",
                 "num_key_value_heads"))
    return {k: v for k, v in params.items() if v is not None}, config


def experts(path, config, family):
    """A mixture's settings in params.json's terms: experts, top k, an expert's size, renormalisation, dense layers."""
    n_experts = config.get("num_experts", config.get("num_local_experts", EXPERTS[family]))
    check_keys(path, {**config, "num_experts": n_experts}, {"num_experts": "a positive integer",
                                                            "num_experts_per_tok": "a positive integer"})
    if config.get("router_jitter_noise"):  # Mixtral's noise on the router's input while training
        raise UserError(f"{path}: router_jitter_noise is not supported (Mixtral's releases have 0)")
    top_k = config["num_experts_per_tok"]
    if top_k > n_experts:
        raise UserError(f"{path}: num_experts_per_tok={top_k} is more than the {n_experts} experts")
    n, dense = config["num_hidden_layers"], []
    if family == "qwen3moe":
        check_keys(path, config, {"moe_intermediate_size": "a positive integer", "decoder_sparse_step": "a positive integer"})
        only = config.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise UserError(f"{path}: mlp_only_layers must be a list of layer numbers, not {only!r}")
        dense = [i for i in range(n) if i in only or (i + 1) % config["decoder_sparse_step"]]
    return {"n_experts": n_experts, "top_k": top_k, "moe_hidden_dim": config.get("moe_intermediate_size"),
            "norm_topk": family == "mixtral" or bool(config.get("norm_topk_prob")), "dense_layers": dense or None}


def pad_id(config):
    """The padding token, whose embedding row transformers' embedding lookup never trains (padding_idx)."""
    pad = config.get("pad_token_id")
    return pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < config["vocab_size"] else None


def activation(path, config):
    kind = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if kind not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(f"{path}: hidden_activation {kind!r} is not supported; Gemma's is gelu_pytorch_tanh")
    return "gelu_tanh"


def rope_theta(config, family):
    parameters = config.get("rope_parameters") or {}
    if family == "gemma3":  # transformers 5: one rope a layer type
        parameters = parameters.get("full_attention") or parameters
    return config.get("rope_theta") or parameters.get("rope_theta") or 10000.0


def rope_scaling(path, config, family, rotary_dim):
    """The rope scaling of config.json (transformers 4's rope_scaling or 5's rope_parameters; Gemma 3's of its
    full layers) as {"rope_type": ..., parameters}, or None; types other than ROPE_TYPES' are refused.
    rotary_dim: the features of a head that turn (longrope has a factor for each pair of them)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if family == "gemma3" and "full_attention" in scaling:
        scaling = scaling["full_attention"]
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if kind in ("su", "yarn") and family == "phi3":  # Phi-3's older names of longrope
        kind = "longrope"
    if kind in (None, "default"):
        return None
    if kind not in ROPE_TYPES:
        raise UserError(f"{path}: rope scaling {kind!r} is not supported; slowllama reads {', '.join(ROPE_TYPES)}")
    if kind == "longrope":
        scaling.setdefault("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        pairs = rotary_dim // 2
        for key in ("short_factor", "long_factor"):
            factors = scaling.get(key)
            if not isinstance(factors, list) or len(factors) != pairs or \
                    not all(isinstance(f, (int, float)) and f > 0 for f in factors):
                raise UserError(f"{path}: longrope's {key} must be {pairs} positive numbers (one a rotary pair)")
    missing = [key for key in ROPE_TYPES[kind] if not isinstance(scaling.get(key), (int, float))]
    if missing:
        raise UserError(f"{path}: rope scaling {kind} needs the number {missing[0]!r}")
    if kind == "yarn" and not (scaling.get("original_max_position_embeddings") or config.get("max_position_embeddings")):
        raise UserError(f"{path}: yarn rope scaling needs original_max_position_embeddings or max_position_embeddings")
    return {"rope_type": kind, **scaling}


def sliding(path, config, family):
    """{sliding_window, layer_types}: the window and which layers it holds in, as transformers sets them:
    layer_types where config.json gives them; else every layer (Mistral, Phi-3), Qwen 2's and Qwen 3's from
    max_window_layers on where use_sliding_window, Gemma 2's every other (the first slides), Gemma 3's all but
    every sliding_window_pattern-th; none for Llama and OLMo 2."""
    window = config.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise UserError(f"{path}: sliding_window must be a positive integer or null, not {window!r}")
    n = config["num_hidden_layers"]
    qwen = family in ("qwen2", "qwen3", "qwen3moe")
    if qwen and not config.get("use_sliding_window") or family in ("llama", "olmo2", "olmoe") or not window:
        return {}
    given = config.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != n or \
                not set(given) <= {"sliding_attention", "full_attention"}:
            raise UserError(f"{path}: layer_types must give sliding_attention or full_attention for each of the "
                            f"{n} layers")
        types = given
    elif qwen:
        first = config.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    elif family == "gemma2":
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    elif family == "gemma3":
        pattern = config.get("sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    else:  # Mistral, Mixtral, Phi-3: every layer
        return {"sliding_window": window}
    return {"sliding_window": window, "layer_types": types} if "sliding_attention" in types else {}


# --- tensor names ---

def block_names(args):
    """{Meta key of a block tensor: its name in the block, in Hugging Face's layout} for the family."""
    return {**BLOCK_NAMES, **NORM_NAMES[args.norms]}


def hf_name(key, args, prefix="model."):
    """Hugging Face's name of a Meta key (layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight;
    Phi-3's q, k, v: model.layers.3.self_attn.qkv_proj.weight, one of its parts)."""
    if key == "output.weight":
        return "lm_head.weight"
    if key in TOP_NAMES:
        return prefix + TOP_NAMES[key]
    _, layer, local = key.split(".", 2)
    if args.family in MOE_NAMES and (local.startswith("experts.") or local == "feed_forward.gate.weight"):
        sparse, names = MOE_NAMES[args.family]
        if local.startswith("experts."):  # experts.5.w1.weight
            _, expert, weight, _ = local.split(".")
            return f"{prefix}layers.{layer}.{sparse}.experts.{expert}.{names[weight]}.weight"
        return f"{prefix}layers.{layer}.{sparse}.gate.weight"
    fused = next((name for name, parts in FUSED.get(args.family, {}).items() if local in parts), None)
    return f"{prefix}layers.{layer}.{fused or block_names(args)[local]}"


def fused_parts(name, args):
    """The Meta keys (in row order) a fused Hugging Face tensor holds, or None for a tensor of its own."""
    layer_prefix, _, local = name.rpartition("layers.")
    layer, _, local = local.partition(".")
    parts = FUSED.get(args.family, {}).get(local)
    return [f"layers.{layer}.{part}" for part in parts] if parts and layer_prefix else None
