"""The families people fine-tune now: Llama 3.x, Qwen 2.5, Qwen 3, SmolLM2, Mistral, Gemma 2 and 3, Phi-3 and
Phi-4, OLMo 2 (with yarn, longrope and linear rope scaling, and sliding windows).

The offloaded model on tiny Hugging Face folders of each family (families.py: written here from random
tensors in Hugging Face's own convention) is held to the forward pass written there from Hugging Face's
definitions, the rope scaling formulas element by element, and training steps to autograd on that same
definition (its tensors put in Meta's order by a mapping written from its definition).
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import model as llama
import rope
import loader
import meta_format
from adapters import add_lora
from families import (DROP, FAMILIES, NEW, SEQ, TIED, WINDOWED, config_of, family_of, head_dim_of, hf_forward, sparse,
                      layer_types_of, meta_rows_by_definition, read_folder, reference_of, reference_step,
                      rope_by_definition, rope_formulas, tokens_for)
from helpers import assert_step_matches, assert_updates_match, lora, make_batches, ours, setup
from reference import Reference, add_adapters, meta_key, read_meta_folder
from utils import UserError

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
    if family in NEW or family in WINDOWED:
        return  # reference.Reference is the Llama family's, without windows
    # and reference.Reference (test_backprop.py's), on the same tensors in Meta's order, given params or ModelArgs
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
    assert args.family == family_of(config) and args.head_dim == head_dim_of(config)
    assert args.qkv_bias == (family in ("qwen2", "yarn", "qwen2-window"))
    assert args.qk_norm == {"qwen3": "head", "gemma3": "head", "olmo2": "all", "qwen3moe": "head",
                            "olmoe": "all"}.get(family_of(config))
    assert args.n_experts == (config.get("num_experts") or config.get("num_local_experts") or 0)
    assert [args.sparse(i) for i in range(args.n_layers)] == [sparse(config, i) for i in range(args.n_layers)]
    assert args.tied == (family in TIED) and args.vocab_size == config["vocab_size"]
    assert ("output" in llama.module_names(args)) == (family not in TIED)
    types = layer_types_of(config)  # the sliding layers as transformers' configurations set them
    assert [args.window(i) for i in range(args.n_layers)] == \
        [config["sliding_window"] if t == "sliding_attention" else None for t in types]
    assert args.sliding_window == (4096 if family == "mistral" else config["sliding_window"] if family in WINDOWED
                                   else None)  # Qwen's window off unless use_sliding_window
    assert (family in WINDOWED) == any(w and w < SEQ for w in map(args.window, range(args.n_layers)))
    assert args.max_seq_len == config["max_position_embeddings"]
    kind = (config.get("rope_scaling") or {}).get("rope_type") or (config.get("rope_scaling") or {}).get("type")
    assert (args.rope_scaling or {}).get("rope_type") == {"su": "longrope"}.get(kind, kind)
    gemma = family.startswith("gemma")
    assert (args.norms, args.norm_offset, args.activation) == (
        ("sandwich", 1.0, "gelu_tanh") if gemma else ("post", 0.0, "silu") if family == "olmo2" else ("pre", 0.0, "silu"))
    assert args.embed_scale == (config["hidden_size"] ** 0.5 if gemma else 1.0)
    assert args.attn_scale == (config["query_pre_attn_scalar"] ** -0.5 if gemma else None)
    assert (args.attn_softcap, args.final_softcap) == ((5.0, 3.0) if family == "gemma2" else (None, None))
    assert args.rope_local_theta == (10000.0 if family == "gemma3" else None)
    assert args.rotary_dim == (12 if family == "phi3-longrope" else None)


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
    cos, sin = rope.rope_tables(args, start, length, "cpu")
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
    cos, sin = rope.rope_tables(args, 100, 4, "cpu")
    for p in range(4):
        for i in range(64):
            assert abs(cos[p, i].item() - math.cos((100 + p) * inv[i])) < 1e-4
            assert abs(sin[p, i].item() - math.sin((100 + p) * inv[i])) < 1e-4


@pytest.mark.parametrize("family", ["llama3", "yarn", "qwen3", "mistral"])
def test_the_model_uses_the_rope_of_its_config(hf_folder, load, family):
    folder = hf_folder(family)
    config = read_folder(folder)[0]
    inv, factor = rope_by_definition(config)
    cos, sin = rope.rope_tables(load(folder).args, 0, 40, "cpu")
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

@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adamw", 1e-3)])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_full_step_equals_autograd(hf_folder, load, tmp_path, family, optimizer, lr):
    folder = hf_folder(family, seed=6)
    steps = make_batches(1, seed=6)
    got_losses, got, _ = ours(load, folder, tmp_path, steps, optimizer, lr)
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
    _, got, model = ours(load, folder, tmp_path, steps, "sgd", 0.1, budget=budget)
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
    add_lora(model, lora(rank, alpha, 0.0, ["wq", "wv", "output"]), tensors=copies)
    assert set(model.lora) == set(adapters)
    setup(model, tmp_path, "lora", tokens=x.numel())
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
    loader.save_model(load(folder), tmp_path / "out", out_format="hf", log=lambda *a: None)
    source, out = read_folder(folder), read_folder(tmp_path / "out")
    assert source[1].keys() == out[1].keys()
    assert ("lm_head.weight" in out[1]) == (family not in TIED)
    for name, t in source[1].items():
        assert out[1][name].dtype == t.dtype and torch.equal(out[1][name], t), name
    for key in ("architectures", "rope_scaling", "tie_word_embeddings", "head_dim", "rope_theta", "vocab_size",
                "sliding_window", "max_position_embeddings", "num_key_value_heads"):
        assert out[0].get(key) == source[0].get(key), key


@pytest.mark.parametrize("family", ["gemma2", "qwen2", "phi3"])
def test_hf_export_in_another_dtype_keeps_the_family(hf_folder, load, tmp_path, family):
    """--dtype changes the weights' dtype and config.json's, nothing else of the model."""
    folder = hf_folder(family, seed=10)
    loader.save_model(load(folder), tmp_path / "out", out_format="hf", dtype="bfloat16", log=lambda *a: None)
    source, out = read_folder(folder), read_folder(tmp_path / "out")
    assert {k: out[0].get(k) for k in source[0]} == {**source[0], "torch_dtype": "bfloat16"}
    assert all(out[1][k].dtype == torch.bfloat16 and torch.equal(out[1][k], t.bfloat16()) for k, t in source[1].items())


@pytest.mark.parametrize("out_format", ["hf", "meta"])
def test_tied_model_with_an_output_adapter_exports_untied(hf_folder, load, tmp_path, out_format):
    """Merged into the output projection, an adapter makes it differ from the table: written as a tensor of
    its own (lm_head.weight / output.weight), the table as it was."""
    folder = hf_folder("llama3", seed=14)
    model = load(folder)
    add_lora(model, lora(4, 8.0, 0.0, ["wq", "output"]), seed=1)
    with torch.no_grad():
        for a, b in model.lora.values():
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    tokens = tokens_for(14)
    want = model.eval()(tokens)
    assert (want - load(folder).eval()(tokens)).abs().max() > 1e-2  # the adapters matter
    loader.save_model(model, tmp_path / "out", out_format=out_format, log=lambda *a: None)
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
    if family in NEW:  # Meta never published these families in its layout
        with pytest.raises(UserError, match=f"Meta's layout: {family_of(config_of(family))} models"):
            loader.save_model(load(folder), tmp_path / "meta", out_format="meta", log=lambda *a: None)
        assert not (tmp_path / "meta").exists()
        return
    tokens = tokens_for(10)
    want = load(folder).eval()(tokens)
    loader.save_model(load(folder), tmp_path / "meta", out_format="meta", log=lambda *a: None)
    assert torch.equal(load(tmp_path / "meta").eval()(tokens), want)
    if family in WINDOWED:
        return  # reference.Reference has no windows
    # Meta's layout by its definition: the reference on the exported shards, with the rope of the config
    weights, params = read_meta_folder(tmp_path / "meta")
    assert ("output.weight" in weights) == (family not in TIED)
    config, t = read_folder(folder)
    ref = Reference(weights, params, rope=rope_by_definition(config)).eval()
    assert torch.allclose(ref(tokens), hf_forward(config, t, tokens), atol=1e-4, rtol=1e-4)


# --- refusals and the sliding window ---

@pytest.mark.parametrize("arch", ["GemmaForCausalLM", "GptOssForCausalLM", "DeepseekV3ForCausalLM", "PhiForCausalLM"])
def test_other_architectures_are_refused_by_name(hf_folder, load, arch):
    folder = hf_folder("smollm2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
    with pytest.raises(UserError, match=f"architecture {arch} is not supported"):
        load(folder)


@pytest.mark.parametrize("family", WINDOWED)
def test_three_windows_long_in_training_and_generation(hf_folder, load, tmp_path, family):
    """Sequences three times the sliding window (and more): the logits, a cached generation across the
    window and one training step as the definition gives them."""
    folder = hf_folder(family, seed=11)
    config, t = read_folder(folder)
    length = 3 * config["sliding_window"] + 2
    tokens = tokens_for(11, length=length)
    model = load(folder).eval()
    want = hf_forward(config, t, tokens)
    assert torch.allclose(model(tokens), want, atol=1e-4, rtol=1e-4)
    # the window matters here: without it the logits differ
    assert (hf_forward({**config, "sliding_window": None, "layer_types": ["full_attention"] * config["num_hidden_layers"]},
                       t, tokens) - want).abs().max() > 1e-3
    prompt = tokens[0, :3].tolist()
    cached = model.generate(prompt, length)
    assert cached == model.generate(prompt, length, use_cache=False)
    seq = list(prompt)
    for _ in range(length):
        seq.append(int(hf_forward(config, t, torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]
    steps = make_batches(1, seq_len=length, seed=11)
    got_losses, got, _ = ours(load, folder, tmp_path, steps, "sgd", 0.1)
    loss, want_weights, initial, _ = reference_step(folder, *steps[0][0], "sgd", 0.1)
    assert got_losses == pytest.approx([loss], abs=1e-4)
    assert_step_matches(got, want_weights, initial, {k: torch.zeros(0, dtype=torch.int32) for k in want_weights}, 0.1)


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


@pytest.mark.parametrize("family,changes,limit", [
    ("qwen2", {}, 2048),  # max_position_embeddings
    ("yarn", {"max_position_embeddings": 16}, 32),  # yarn enabled as Qwen's cards say: 4 x the original 8
    ("phi3-longrope", {}, 32),  # longrope: max_position_embeddings, past the original 8
])
def test_rows_longer_than_the_model_reads_are_refused(hf_folder, tmp_path, family, changes, limit):
    """seq_len up to the positions the model reads (after its rope scaling) runs; one more is one line, in the
    run and in --plan=1."""
    from helpers import refused, run_main
    folder = hf_folder(family, **changes)
    common = [f"--model_path={folder}", f"--offload_path={tmp_path}/off", "--iters=1", "--eval_period=0",
              "--batch_size=1", "--data_path=test_data/instructions.jsonl" if limit < 2048 else "--data_path="]
    if limit < 2048:
        code, _, err = run_main("finetune.py", *common, f"--seq_len={limit}", f"--out_path={tmp_path}/ok")
        assert code == 0, err
    for plan in ("0", "1"):
        refused("finetune.py", *common, f"--seq_len={limit + 1}", f"--plan={plan}", f"--out_path={tmp_path}/no",
                messages=[f"--seq_len={limit + 1}", f"reads at most {limit} positions"])
    assert not (tmp_path / "no").exists()
