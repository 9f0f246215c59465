"""The families people fine-tune now: Llama 3.x, Qwen 2.5, Qwen 3, SmolLM2, Mistral (and yarn rope scaling).

Tiny Hugging Face folders are written here from random tensors in Hugging Face's own convention (q and k
rows in the half-split rotary layout); the offloaded model is held to a forward pass written here from
Hugging Face's definitions (rotate_half, biases, q/k norms before rope, repeated kv heads, a tied head),
the rope scaling formulas are written out element by element with Python's math, and training steps are
held to autograd on reference.Reference built from the same tensors put in Meta's order by a permutation
written from its definition.
"""
import copy
import json
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import llama
import loader
import meta_format
import test_backprop as tb
from reference import Reference, add_adapters, meta_key, read_meta_folder
from test_training import assert_updates_match, make_batches, ours
from utils import UserError

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


@pytest.fixture
def hf_folder(tmp_path, tokenizer_bytes):
    """hf_folder(family, seed=0, dtype=float32, name=family, **config changes): a Hugging Face folder."""
    def make(family, seed=0, dtype=torch.float32, name=None, **changes):
        config = config_of(family, **changes)
        folder = tmp_path / (name or family)
        folder.mkdir()
        tensors = {k: v.to(dtype).contiguous() for k, v in hf_tensors(config, seed).items()}
        safetensors.torch.save_file(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        (folder / "tokenizer.model").write_bytes(tokenizer_bytes)  # 256 tokens
        return folder
    return make


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


# --- the forward pass ---

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_hugging_face_definition(hf_folder, load, family):
    folder = hf_folder(family, seed=1)
    config, t = read_folder(folder)
    tokens = tokens_for(1)
    want = hf_forward(config, t, tokens)
    assert want.std() > 0.5  # logits far from flat: a mistake shows
    for budget in (None, 0):
        model = load(folder, memory_budget=budget).eval()
        got = model(tokens)
        assert got.shape == (2, SEQ, config["vocab_size"])
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (budget, (got - want).abs().max().item())
    # and the reference of the training tests, on the same tensors in Meta's order, given params or ModelArgs
    ref, weights = reference_of(folder)
    assert torch.allclose(ref.eval()(tokens), want, atol=1e-4, rtol=1e-4)
    ref = Reference(weights, model.args, rope=rope_by_definition(config))
    assert torch.allclose(ref.eval()(tokens), want, atol=1e-4, rtol=1e-4)


def test_the_test_forward_is_sensitive(hf_folder):
    """The Hugging Face definition here tells apart what the families differ in (else the above proves little)."""
    tokens = tokens_for(2)
    config, t = read_folder(hf_folder("llama3", seed=2))
    base = hf_forward(config, t, tokens)
    unscaled = hf_forward({**config, "rope_scaling": None}, t, tokens)
    assert (base - unscaled).abs().max() > 1e-2
    config, t = read_folder(hf_folder("qwen3", seed=2))
    base = hf_forward(config, t, tokens)
    swapped = {k: meta_rows_by_definition(w, 1) if "norm" in k and "self_attn" in k else w for k, w in t.items()}
    assert (base - hf_forward(config, swapped, tokens)).abs().max() > 1e-2  # the q/k norm order matters
    config, t = read_folder(hf_folder("yarn", seed=2))
    scaled = hf_forward(config, t, tokens)
    assert (scaled - hf_forward({**config, "rope_scaling": None}, t, tokens)).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_model_settings_come_from_config(hf_folder, load, family):
    config = config_of(family)
    args = load(hf_folder(family)).args
    assert args.head_dim == head_dim_of(config)
    assert args.qkv_bias == (family in ("qwen2", "yarn")) and args.qk_norm == (family == "qwen3")
    assert args.tied == (family in TIED) and args.vocab_size == config["vocab_size"]
    assert ("output" in llama.module_names(args)) == (family not in TIED)
    assert args.sliding_window == (4096 if family == "mistral" else None)  # Qwen's window: off
    assert args.max_seq_len == config["max_position_embeddings"]
    assert (args.rope_scaling or {}).get("rope_type") == (config.get("rope_scaling") or {}).get("rope_type")


# --- rope scaling, element by element ---

ROPE_CASES = {
    "plain": (10000.0, 16, {}, 2048),
    "linear": (10000.0, 16, {"rope_type": "linear", "factor": 2.5}, 2048),
    "llama3-tiny": (500000.0, 16, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 2048),
    "llama3.1": (500000.0, 128, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 131072),
    "yarn-tiny": (1000000.0, 16, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}, 32),
    "yarn-qwen2.5": (1000000.0, 128, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                     131072),
    "yarn-no-original": (10000.0, 32, {"rope_type": "yarn", "factor": 8.0}, 4096),
    "yarn-untruncated": (10000.0, 32, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                                       "truncate": False}, 4096),
    "yarn-betas": (10000.0, 32, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                                 "beta_fast": 16, "beta_slow": 2}, 4096),
    "yarn-attention-factor": (10000.0, 32, {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.3}, 4096),
    "yarn-mscale": (10000.0, 32, {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5}, 4096),
    # the band of blended pairs beyond the last pair: transformers' ramp then slows every pair
    "yarn-degenerate-band": (10.0, 16, {"rope_type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 65536}, 65536),
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_tables_follow_the_scaling_formulas(case):
    theta, d, scaling, max_positions = ROPE_CASES[case]
    args = llama.ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=10, rope_theta=theta,
                           explicit_head_dim=d if d != 16 else None, rope_scaling=scaling or None,
                           max_seq_len=max_positions)
    inv, factor = rope_formulas(theta, d, scaling, max_positions)
    start, length = 3, 20
    cos, sin = llama.rope_tables(args, start, length, "cpu")
    assert cos.shape == sin.shape == (length, d // 2)
    for p in range(length):
        for i in range(d // 2):
            angle = (start + p) * inv[i]
            assert abs(cos[p, i].item() - factor * math.cos(angle)) < 2e-5, (case, p, i)
            assert abs(sin[p, i].item() - factor * math.sin(angle)) < 2e-5, (case, p, i)


def test_the_scaling_cases_are_not_trivial():
    """Each case moves the frequencies (or the factor) away from plain rope, and llama3's and yarn's
    cases have pairs kept, blended and slowed."""
    for case, (theta, d, scaling, max_positions) in ROPE_CASES.items():
        inv, factor = rope_formulas(theta, d, scaling, max_positions)
        plain = rope_formulas(theta, d, {}, max_positions)[0]
        ratios = [a / b for a, b in zip(inv, plain)]
        if case != "plain":
            assert factor != 1.0 or any(abs(r - 1) > 1e-3 for r in ratios), case
        if case in ("llama3-tiny", "llama3.1", "yarn-qwen2.5", "yarn-untruncated"):
            f = scaling["factor"]
            assert any(abs(r - 1) < 1e-9 for r in ratios) and any(abs(r - 1 / f) < 1e-9 for r in ratios), case
            assert any(1 / f + 1e-3 < r < 1 - 1e-3 for r in ratios), case


@pytest.mark.parametrize("case", [c for c in ROPE_CASES if ROPE_CASES[c][2]])
def test_the_formulas_here_equal_transformers(case):
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the definitions are transformers 5's (4.5x took yarn's factor from the context lengths)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    theta, d, scaling, max_positions = ROPE_CASES[case]
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=d,
                                      max_position_embeddings=max_positions,
                                      rope_parameters={"rope_theta": theta, **scaling})
    inv, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    mine, my_factor = rope_formulas(theta, d, scaling, max_positions)
    assert torch.allclose(inv.double(), torch.tensor(mine, dtype=torch.float64), rtol=1e-6, atol=0)
    assert factor == pytest.approx(my_factor, rel=1e-12)


@pytest.mark.parametrize("params,factor", [({"use_scaled_rope": True}, 8.0),
                                           ({"use_scaled_rope": True, "rope_scaling_factor": 32.0}, 32.0)])
def test_meta_use_scaled_rope_is_llama3_scaling(params, factor):
    args = meta_format.model_args({"dim": 256, "n_layers": 1, "n_heads": 2, "multiple_of": 16, "norm_eps": 1e-5,
                                   "rope_theta": 500000.0, **params}, 100)
    s = args.rope_scaling
    assert s["rope_type"] == "llama3" and s["factor"] == factor and s["low_freq_factor"] == 1.0
    assert s["high_freq_factor"] == 4.0 and s["original_max_position_embeddings"] == 8192
    inv, _ = rope_formulas(500000.0, 128, s, None)
    cos, sin = llama.rope_tables(args, 100, 4, "cpu")
    for p in range(4):
        for i in range(64):
            assert abs(cos[p, i].item() - math.cos((100 + p) * inv[i])) < 1e-4
            assert abs(sin[p, i].item() - math.sin((100 + p) * inv[i])) < 1e-4


@pytest.mark.parametrize("family", ["llama3", "yarn", "qwen3", "mistral"])
def test_the_model_uses_the_rope_of_its_config(hf_folder, load, family):
    folder = hf_folder(family)
    config = read_folder(folder)[0]
    inv, factor = rope_by_definition(config)
    cos, sin = llama.rope_tables(load(folder).args, 0, 40, "cpu")
    want_cos = torch.tensor([[factor * math.cos(p * f) for f in inv] for p in range(40)])
    want_sin = torch.tensor([[factor * math.sin(p * f) for f in inv] for p in range(40)])
    assert torch.allclose(cos, want_cos, atol=2e-5) and torch.allclose(sin, want_sin, atol=2e-5)


@pytest.mark.parametrize("family,other", [("llama3", 8192), ("yarn", 4096)])
def test_original_max_position_embeddings_changes_the_logits(hf_folder, load, family, other):
    scaling = {**FAMILIES[family]["rope_scaling"], "original_max_position_embeddings": other}
    a = hf_folder(family, seed=3, name="a")
    b = hf_folder(family, seed=3, name="b", rope_scaling=scaling, max_position_embeddings=4 * other)
    tokens = tokens_for(3)
    got_a, got_b = load(a).eval()(tokens), load(b).eval()(tokens)
    assert (got_a - got_b).abs().max() > 1e-2
    config, t = read_folder(b)
    assert torch.allclose(got_b, hf_forward(config, t, tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_transformers_5_rope_parameters_equal_rope_scaling(hf_folder, load, family):
    """transformers 5 writes rope_parameters (with rope_theta inside; rope_type "default": no scaling)."""
    config = config_of(family)
    parameters = {"rope_theta": config["rope_theta"], **(config.get("rope_scaling") or {"rope_type": "default"})}
    old = hf_folder(family, seed=4, name="old")
    new = hf_folder(family, seed=4, name="new", rope_parameters=parameters, rope_scaling=DROP, rope_theta=DROP)
    a, b = load(old), load(new)
    assert a.args.rope_theta == b.args.rope_theta == config["rope_theta"]
    assert a.args.rope_scaling == b.args.rope_scaling
    assert (b.args.rope_scaling is None) == (family == "qwen2")
    tokens = tokens_for(4)
    assert torch.equal(a.eval()(tokens), b.eval()(tokens))


def test_the_older_type_key_equals_rope_type(hf_folder, load):
    """Qwen 2.5's model cards enable yarn with {"type": "yarn", ...}, transformers' older spelling."""
    scaling = dict(FAMILIES["yarn"]["rope_scaling"])
    scaling["type"] = scaling.pop("rope_type")
    a, b = load(hf_folder("yarn", seed=15, name="a")), load(hf_folder("yarn", seed=15, name="b", rope_scaling=scaling))
    assert b.args.rope_scaling["rope_type"] == "yarn"
    tokens = tokens_for(15)
    assert torch.equal(a.eval()(tokens), b.eval()(tokens))


# --- generation ---

@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "yarn"])
def test_cached_generation_equals_uncached_and_the_definition(hf_folder, load, family):
    folder = hf_folder(family, seed=5)
    model = load(folder).eval()
    prompt = [1, 17, 42, 99, 7]
    cached = model.generate(prompt, 10, use_cache=True)
    assert cached == model.generate(prompt, 10, use_cache=False)
    config, t = read_folder(folder)
    tokens = list(prompt)
    for _ in range(10):  # greedy by the Hugging Face definition
        tokens.append(int(hf_forward(config, t, torch.tensor([tokens]))[0, -1].argmax()))
    assert cached == tokens[len(prompt):]
    stop = cached[2]
    assert model.generate(prompt, 10, stop_ids={stop}) == cached[:cached.index(stop) + 1]


# --- training ---

def reference_step(folder, x, y, optimizer, lr, untied=False):
    """One autograd step of the reference: (loss, {Meta key: updated tensor}, initial Meta weights, {Meta key:
    flat indices of the elements whose gradient was at float rounding level})."""
    model, weights = reference_of(folder, untied)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd" else \
        torch.optim.AdamW(model.parameters(), lr=lr)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1)
    opt.zero_grad()
    loss.backward()
    marks = {meta_key(n): tb.rounding_level(p.grad) for n, p in model.named_parameters()}
    opt.step()
    return loss.item(), {meta_key(n): p.detach().clone() for n, p in model.named_parameters()}, weights, marks


def assert_step_matches(got, want, initial, marks, lr):
    """Every update equals autograd's to 1e-3 (relative L2), except elements whose gradient was at rounding
    level (k biases in pairs that hardly turn over 12 positions: a bias there is nearly the same shift of
    every key, whose gradient softmax cancels), where AdamW's +-lr may take either sign: held to 3 lr."""
    for key, w in want.items():
        delta_got, delta_want = got[key] - initial[key], w - initial[key]
        err = torch.linalg.vector_norm(delta_got - delta_want) / torch.linalg.vector_norm(delta_want).clamp(min=1e-20)
        assert tb.update_close(delta_got, delta_want, marks[key], 1e-3, 3 * lr), \
            f"{key}: relative error {err:.2e} ({len(marks[key])} elements at rounding level)"


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adamw", 1e-3)])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_full_step_equals_autograd(hf_folder, load, tmp_path, family, optimizer, lr):
    folder = hf_folder(family, seed=6)
    steps = make_batches(1, seed=6)
    got_losses, got, _ = ours(load, folder, tmp_path / "run", steps, optimizer, lr)
    loss, want, initial, marks = reference_step(folder, *steps[0][0], optimizer, lr)
    assert got_losses == pytest.approx([loss], abs=1e-4)
    assert set(got) == set(want)  # every tensor, biases and q/k norms included; no output.weight when tied
    if optimizer == "sgd":  # lr * g: rounding-level gradients make rounding-level updates, checked as any other
        marks = {k: torch.zeros(0, dtype=torch.int32) for k in want}
    assert_step_matches(got, want, initial, marks, lr)


@pytest.mark.parametrize("family,budget", [("llama3", None), ("llama3", 0), ("qwen3", 0)])
def test_tied_table_gets_both_gradients(hf_folder, load, tmp_path, family, budget):
    """One tensor, used as the embedding table and as the output projection, takes the sum of both gradients
    (also when the table is let go between its two uses: budget 0)."""
    folder = hf_folder(family, seed=7)
    steps = make_batches(1, seed=7)
    _, got, model = ours(load, folder, tmp_path / "run", steps, "sgd", 0.1, budget=budget)
    assert "output" not in model.boxes and "output.weight" not in got
    _, want, initial, _ = reference_step(folder, *steps[0][0], "sgd", 0.1)
    assert_updates_match(got, want, initial)
    _, untied, _, _ = reference_step(folder, *steps[0][0], "sgd", 0.1, untied=True)
    key = "tok_embeddings.weight"
    both, input_only = want[key] - initial[key], untied[key] - initial[key]
    # the output's share of the update is far above the tolerance: a model that dropped it fails the match above
    assert torch.linalg.vector_norm(both - input_only) > 0.05 * torch.linalg.vector_norm(both)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_lora_step_equals_autograd(hf_folder, load, tmp_path, family):
    folder = hf_folder(family, seed=8)
    config = read_folder(folder)[0]
    (x, y), = make_batches(1, seed=8)[0]
    rank, alpha, lr = 4, 8.0, 1e-2
    hd, d, vocab = head_dim_of(config), config["hidden_size"], config["vocab_size"]
    g = torch.Generator().manual_seed(8)
    adapters = {"output.weight": (torch.randn(rank, d, generator=g) * 0.1,
                                  torch.randn(vocab, rank, generator=g) * 0.02)}
    for i in range(config["num_hidden_layers"]):
        for name, rows in (("wq", config["num_attention_heads"] * hd), ("wv", config["num_key_value_heads"] * hd)):
            adapters[f"layers.{i}.attention.{name}.weight"] = (torch.randn(rank, d, generator=g) * 0.1,
                                                              torch.randn(rows, rank, generator=g) * 0.02)
    model = load(folder)
    # copies: add_lora keeps the tensors it is given, and training updates them in place
    copies = {k: (a.clone(), b.clone()) for k, (a, b) in adapters.items()}
    model.add_lora(rank, alpha, 0.0, ["wq", "wv", "output"], tensors=copies)
    assert set(model.lora) == set(adapters)
    model.setup_training(tmp_path / "run", mode="lora", tokens_per_step=x.numel())
    model.train()
    loss = model.train_step([(x, y)], lr)
    got = {f"{k}:{ab}": t.detach().clone() for k, pair in model.lora.items() for ab, t in zip("AB", pair)}
    logits = model.eval()(x)

    ref, _ = reference_of(folder)
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(add_adapters(ref, adapters, alpha, 0.0), lr=lr)
    ref.train()
    want_loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten(), ignore_index=-1)
    opt.zero_grad()
    want_loss.backward()
    opt.step()
    assert loss == pytest.approx(want_loss.item(), abs=1e-4)
    initial = {f"{k}:{ab}": t for k, pair in adapters.items() for ab, t in zip("AB", pair)}
    want = {f"{meta_key(n)}.weight:{ab}": getattr(m, f"lora_{ab.lower()}").detach()
            for n, m in ref.named_modules() if getattr(m, "lora_a", None) is not None for ab in "AB"}
    assert set(got) == set(want) == set(initial)
    assert_updates_match(got, want, initial)
    # the output's adapter changes the output projection only, not the (tied) embedding lookup
    assert torch.allclose(logits, ref.eval()(x), atol=1e-4, rtol=1e-4)


# --- export ---

@pytest.mark.parametrize("family,dtype", [*((f, torch.float32) for f in FAMILIES), ("qwen3", torch.bfloat16)])
def test_hf_export_round_trips(hf_folder, load, tmp_path, family, dtype):
    folder = hf_folder(family, seed=9, dtype=dtype)
    loader.save_llama2(load(folder), tmp_path / "out", out_format="hf", log=lambda *a: None)
    source, out = read_folder(folder), read_folder(tmp_path / "out")
    assert source[1].keys() == out[1].keys()
    assert ("lm_head.weight" in out[1]) == (family not in TIED)
    for name, t in source[1].items():
        assert out[1][name].dtype == t.dtype and torch.equal(out[1][name], t), name
    for key in ("architectures", "rope_scaling", "tie_word_embeddings", "head_dim", "rope_theta", "vocab_size",
                "sliding_window", "max_position_embeddings", "num_key_value_heads"):
        assert out[0].get(key) == source[0].get(key), key


@pytest.mark.parametrize("out_format", ["hf", "meta"])
def test_tied_model_with_an_output_adapter_exports_untied(hf_folder, load, tmp_path, out_format):
    """Merged into the output projection, an adapter makes it differ from the table: written as a tensor of
    its own (lm_head.weight / output.weight), the table as it was."""
    folder = hf_folder("llama3", seed=14)
    model = load(folder)
    model.add_lora(4, 8.0, 0.0, ["wq", "output"], seed=1)
    with torch.no_grad():
        for a, b in model.lora.values():
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    tokens = tokens_for(14)
    want = model.eval()(tokens)
    assert (want - load(folder).eval()(tokens)).abs().max() > 1e-2  # the adapters matter
    loader.save_llama2(model, tmp_path / "out", out_format=out_format, log=lambda *a: None)
    assert torch.allclose(load(tmp_path / "out").eval()(tokens), want, atol=1e-4, rtol=1e-4)
    table = read_folder(folder)[1]["model.embed_tokens.weight"]
    if out_format == "hf":
        config, t = read_folder(tmp_path / "out")
        assert config["tie_word_embeddings"] is False and "lm_head.weight" in t
        assert torch.equal(t["model.embed_tokens.weight"], table)
    else:
        weights, _ = read_meta_folder(tmp_path / "out")
        assert "output.weight" in weights and torch.equal(weights["tok_embeddings.weight"], table)


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_export_keeps_the_model(hf_folder, load, tmp_path, family):
    folder = hf_folder(family, seed=10)
    tokens = tokens_for(10)
    want = load(folder).eval()(tokens)
    loader.save_llama2(load(folder), tmp_path / "meta", out_format="meta", log=lambda *a: None)
    assert torch.equal(load(tmp_path / "meta").eval()(tokens), want)
    # Meta's layout by its definition: the reference on the exported shards, with the rope of the config
    weights, params = read_meta_folder(tmp_path / "meta")
    assert ("output.weight" in weights) == (family not in TIED)
    config, t = read_folder(folder)
    ref = Reference(weights, params, rope=rope_by_definition(config)).eval()
    assert torch.allclose(ref(tokens), hf_forward(config, t, tokens), atol=1e-4, rtol=1e-4)


# --- refusals and the sliding window ---

@pytest.mark.parametrize("arch", ["GemmaForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM"])
def test_other_architectures_are_refused_by_name(hf_folder, load, arch):
    folder = hf_folder("smollm2", architectures=[arch])
    with pytest.raises(UserError, match=arch):
        load(folder)


def test_longer_than_the_sliding_window_is_refused(hf_folder, load, tmp_path):
    folder = hf_folder("mistral", seed=11, sliding_window=8)
    model = load(folder).eval()
    config, t = read_folder(folder)
    tokens = tokens_for(11, length=8)  # up to the window: attention is exact
    assert torch.allclose(model(tokens), hf_forward(config, t, tokens), atol=1e-4, rtol=1e-4)
    with pytest.raises((UserError, ValueError), match="(?i)sliding.window"):
        model(tokens_for(11, length=SEQ))
    model.setup_training(tmp_path / "run", mode="full", optimizer="sgd", tokens_per_step=2 * SEQ)
    model.train()
    with pytest.raises((UserError, ValueError), match="(?i)sliding.window"):
        model.train_step(make_batches(1, seed=11)[0], 0.1)


def test_sliding_window_null_is_no_window(hf_folder, load):
    folder = hf_folder("mistral", seed=12, sliding_window=None)
    assert load(folder).args.sliding_window is None
    config, t = read_folder(folder)
    tokens = tokens_for(12, length=20)
    assert torch.allclose(load(folder).eval()(tokens), hf_forward(config, t, tokens), atol=1e-4, rtol=1e-4)


# --- transformers itself, where it is installed ---

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(hf_folder, load, family):
    transformers = pytest.importorskip("transformers")
    folder = hf_folder(family, seed=13)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    tokens = tokens_for(13)
    with torch.no_grad():
        want = theirs(tokens).logits
    assert torch.allclose(load(folder).eval()(tokens), want, atol=1e-4, rtol=1e-4)
    config, t = read_folder(folder)
    assert torch.allclose(hf_forward(config, t, tokens), want, atol=1e-4, rtol=1e-4)  # this file's definition too
