"""The architecture against independent formulations, generation, streaming settings."""
import math
from types import SimpleNamespace

import pytest
import torch

import model as bm
import rope
from memory_plan import graph_bytes_per_token
from reference import Reference, read_meta_folder


@pytest.mark.parametrize("rotate", [rope.apply_rope, rope.rotate_pairs])  # the second: what Apple GPUs run
def test_rotary_embedding_matches_the_complex_formulation(rotate):
    args = bm.ModelArgs(dim=48, n_layers=1, n_heads=3, vocab_size=10, rope_theta=500.0)
    x = torch.randn(2, 7, 3, 16)
    start = 5
    cos, sin = rope.rope_tables(args, start, 7, "cpu")
    got = rotate(x, cos, sin)
    # features (2k, 2k+1) as the complex number x_2k + i x_2k+1, times e^(i * position * theta^(-2k/d))
    k = torch.arange(8, dtype=torch.float64)
    positions = torch.arange(start, start + 7, dtype=torch.float64)
    angle = positions[:, None] * 500.0 ** (-2 * k / 16)
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.exp(1j * angle)[None, :, None, :]
    want = torch.stack((z.real, z.imag), -1).flatten(-2)
    assert torch.allclose(got.double(), want, atol=1e-5)


def fake_box(weights):
    return SimpleNamespace(compute=weights, lora={}, trainable=False, compute_dtype=torch.float32)


def test_grouped_query_attention_equals_explicitly_repeated_heads():
    gqa = bm.ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=10)
    mha = bm.ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=8, vocab_size=10)
    hd = gqa.head_dim
    w = {"attention.wq.weight": torch.randn(64, 64), "attention.wk.weight": torch.randn(2 * hd, 64),
         "attention.wv.weight": torch.randn(2 * hd, 64), "attention.wo.weight": torch.randn(64, 64)}
    # each kv head serves n_heads / n_kv_heads = 4 consecutive query heads
    repeated = {k: t.view(2, hd, 64).repeat_interleave(4, dim=0).reshape(8 * hd, 64) if k[10:12] in ("wk", "wv")
                else t for k, t in w.items()}
    x = torch.randn(3, 11, 64)
    tables = rope.layer_ropes(gqa, 0, 11, "cpu")
    got = bm.attention(fake_box(w), x, gqa, tables, 0, False, None, 0)
    want = bm.attention(fake_box(repeated), x, mha, tables, 0, False, None, 0)
    assert torch.allclose(got, want, atol=1e-5)


def test_offloaded_logits_equal_a_plain_in_memory_model(make, load):
    src = make(n_shards=2, seed=5)
    weights, params = read_meta_folder(src)
    tokens = torch.randint(0, weights["tok_embeddings.weight"].shape[0], (2, 13))
    want = Reference(weights, params).eval()(tokens)
    for budget in (None, 0):  # everything resident, or every module streamed from disk
        got = load(src, memory_budget=budget).eval()(tokens)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_loss_is_mean_cross_entropy_over_targets(make, load):
    model = load(make()).eval()
    x = torch.randint(0, 200, (2, 9))
    y = torch.randint(0, 200, (2, 9))
    y[0, :4] = -1
    logits, logps = model(x), model(x, y)
    loss = -logps.sum() / int((y != -1).sum())
    logp = logits.log_softmax(-1)
    picked = [-logp[b, t, y[b, t]] for b in range(2) for t in range(9) if y[b, t] != -1]
    assert math.isclose(loss.item(), (sum(picked) / len(picked)).item(), rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_and_its_gradients_match_autograd(dtype):
    a0, b0, g = (torch.randn(3, 5, 40).to(dtype) for _ in range(3))
    want_a, want_b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    want = torch.nn.functional.silu(want_a) * want_b
    want.backward(g)
    got_a, got_b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = bm.gated(got_a * 1, got_b * 1)  # a and b as a projection's output: fresh, used only here
    got.backward(g)
    assert torch.equal(got, want)
    assert torch.allclose(got_a.grad.float(), want_a.grad.float(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(got_b.grad.float(), want_b.grad.float(), rtol=1e-6, atol=1e-6)
    assert len(saved) == 2  # a and b, not silu(a) besides


FAMILY_ARGS = {  # the families' blocks as the memory plan must count them
    "llama": {}, "gemma3": {"norms": "sandwich", "norm_offset": 1.0, "activation": "gelu_tanh", "qk_norm": "head",
                            "explicit_head_dim": 32, "sliding_window": 16, "layer_types": ("sliding_attention",)},
    "gemma2": {"norms": "sandwich", "norm_offset": 1.0, "activation": "gelu_tanh", "attn_softcap": 5.0,
               "sliding_window": 16},
    "olmo2": {"norms": "post", "qk_norm": "all"}, "phi3": {"rotary_dim": 12, "sliding_window": 16}}


@pytest.mark.parametrize("family", FAMILY_ARGS)
def test_graph_bytes_per_token_bounds_what_a_block_keeps(family):
    args = bm.ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_dim=160, **FAMILY_ARGS[family])
    shapes = bm.module_shapes(args, "layers")
    for trainable, adapted in [(True, ()), (False, [k for k in shapes if k.endswith("weight") and "norm" not in k])]:
        generator = torch.Generator().manual_seed(0)
        box = SimpleNamespace(compute={k: torch.randn(s, generator=generator) * 0.1 for k, s in shapes.items()},
                              trainable=trainable, compute_dtype=torch.float32, take_grad=lambda key, rows: None,
                              lora={k: (torch.randn(2, shapes[k][1], requires_grad=True),
                                        torch.zeros(shapes[k][0], 2, requires_grad=True), 1.0, 0.0) for k in adapted})
        x = torch.randn(1, 48, args.dim, requires_grad=True)
        kept = {}  # storage -> bytes: tensors saved twice count once

        def keep(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        for positions in (None, torch.arange(48).remainder(20)[None]):  # one example a row, or three packed
            kept.clear()
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.enable_grad():
                bm.block_forward(box, x, args, rope.layer_ropes(args, 0, 48, "cpu", positions), 0, True)
            kept.pop(x.untyped_storage().data_ptr(), None)  # the block's input is kept by the caller
            per_token = sum(kept.values()) / 48
            # an upper bound, and not far above (frozen norms keep less: LoRA's bound is looser)
            assert per_token <= graph_bytes_per_token(args, torch.float32, 48) <= (1.25 if trainable else 1.4) * per_token


def test_cached_generation_equals_uncached(make, load):
    model = load(make(seed=7)).eval()
    prompt = model.tokenizer.encode("the model streams")
    cached = model.generate(prompt, 25)
    assert cached == model.generate(prompt, 25, use_cache=False)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert model.generate(prompt, 25, temperature=0.8, top_p=0.9, generator=g1) == \
        model.generate(prompt, 25, temperature=0.8, top_p=0.9, generator=g2, use_cache=False)


def test_eval_turns_dropout_off_everywhere(make, load):
    src = make()
    tokens = torch.randint(0, 200, (2, 10))
    plain = load(src)(tokens)
    dropped = load(src, dropout=0.5)
    assert torch.equal(dropped.eval()(tokens), plain)
    assert not torch.allclose(dropped.train()(tokens), plain)


def test_streaming_settings_give_identical_logits(make, load):
    src = make(seed=9)
    tokens = torch.randint(0, 200, (2, 10))
    want = load(src)(tokens)
    for budget in (0, 10**5, 10**6):
        for prefetch in (True, False):
            for cold in (False, True):  # cold: evicted after use (a bf16 offload converted on the way in)
                model = load(src, memory_budget=budget, prefetch=prefetch, cold=cold)
                assert torch.equal(model(tokens), want)
