"""Long rows (head.py, chunked.py, spill.py): the head over chunks of tokens, blocks over chunks of tokens and a step
whose block inputs wait on disk give the numbers of the whole computed at once, against autograd on the same math
written out here, with the chunks forced small."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import chunked
import head
import model as m
from model import ModelArgs

DIM, VOCAB = 16, 300


class Box(SimpleNamespace):
    """A module as the math sees it: its weights, adapters, and the gradients handed over (each in row blocks
    of at most 7 rows, as the optimizer asks for them, into a buffer)."""

    def __init__(self, weights, trainable=True, lora=None):
        super().__init__(compute=weights, lora=lora or {}, trainable=trainable, grads={},
                         shapes={k: w.shape for k, w in weights.items()}, compute_dtype=torch.float32)

    def take_grad(self, key, rows):
        assert key not in self.grads  # once a step
        n = self.shapes[key][0]
        self.grads[key] = torch.cat([rows(r0, min(n, r0 + 7), torch.empty(min(n, r0 + 7) - r0, *self.shapes[key][1:]))
                                     .clone() for r0 in range(0, n, 7)])


def written_out_logps(h, norm_w, out_w, y, args, lora=None, masks=None):
    """Each token's log-probability of its target, by autograd: RMSNorm, the output (with an adapter x A^T B^T s on
    dropout masks, one a chunk), the cap, log-softmax."""
    xn = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + args.norm_eps) * norm_w
    logits = xn @ out_w.t()
    if lora:
        a, b, scale, _ = lora
        dropped = torch.cat([c * mask for c, mask in zip(xn.flatten(0, 1).split(len(masks[0])), masks)]).view(xn.shape)
        logits = logits + dropped @ a.t() @ (b * scale).t()
    if args.final_softcap:
        logits = torch.tanh(logits / args.final_softcap) * args.final_softcap
    logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return logp * (y != -1)


@pytest.mark.parametrize("chunk", [5, None])  # tokens a chunk of the head (None: every token in one)
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("adapter", [False, True])
def test_the_head_in_chunks_equals_autograd(monkeypatch, chunk, softcap, adapter):
    """Loss (rows weighted as DPO's coefficients weigh them), the gradient at the head's input, the norm's and the
    output weight's gradients (full), or the adapter's (LoRA with dropout: the chunks' masks drawn again)."""
    if chunk:
        monkeypatch.setattr(head, "HEAD_CHUNK_BYTES", 4 * VOCAB * chunk)
    args = ModelArgs(dim=DIM, n_layers=1, n_heads=2, vocab_size=VOCAB, final_softcap=softcap)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 23, DIM, generator=g) * 3
    y = torch.randint(0, VOCAB, (2, 23), generator=g)
    y[1, 4:9] = -1
    norm_w, out_w = 1 + 0.1 * torch.randn(DIM, generator=g), torch.randn(VOCAB, DIM, generator=g) / 2
    row_weights = torch.tensor([0.7, -1.3])
    lora = (torch.randn(4, DIM, generator=g) / 4, torch.randn(VOCAB, 4, generator=g) / 4, 2.0, 0.25) if adapter else None
    lora_ours = (lora[0].clone().requires_grad_(), lora[1].clone().requires_grad_(), 2.0, 0.25) if adapter else None
    norm = Box({"weight": norm_w.clone()}, trainable=not adapter)
    output = Box({"weight": out_w.clone()}, trainable=not adapter, lora={"weight": lora_ours} if adapter else None)

    torch.manual_seed(1)
    got_h = h.clone().requires_grad_()
    got_logps = head.target_logps(norm, output, got_h, y, args, training=adapter)
    (got_logps.sum(-1) * row_weights).sum().backward()

    torch.manual_seed(1)  # the masks the chunks drew, in their order
    size = len(y.flatten()) if chunk is None else chunk
    masks = [F.dropout(torch.ones(min(size, 46 - t0), DIM), 0.25, True) for t0 in range(0, 46, size)]
    want_h, want_norm, want_out = h.clone().requires_grad_(), norm_w.clone().requires_grad_(), out_w.clone().requires_grad_()
    want_lora = (lora[0].clone().requires_grad_(), lora[1].clone().requires_grad_(), 2.0, 0.25) if adapter else None
    want_logps = written_out_logps(want_h, want_norm, want_out, y, args, want_lora, masks)
    (want_logps.sum(-1) * row_weights).sum().backward()

    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    assert close(got_logps, want_logps.detach()) and not got_logps[1, 4:9].any()
    assert close(got_h.grad, want_h.grad)
    if adapter:
        assert not norm.grads and not output.grads
        assert close(lora_ours[0].grad, want_lora[0].grad) and close(lora_ours[1].grad, want_lora[1].grad)
    else:
        assert close(norm.grads["weight"], want_norm.grad) and close(output.grads["weight"], want_out.grad)


def force_small_chunks(monkeypatch, tokens=5):
    """Chunks of a few tokens in the MLP and the head, and blocks of a few rows of the vocabulary."""
    monkeypatch.setattr(chunked, "chunk_tokens", lambda args, dtype: tokens)
    monkeypatch.setattr(head, "chunk_tokens", lambda args: tokens)
    monkeypatch.setattr(head, "HEAD_CHUNK_BYTES", 4 * 7 * 24)


@pytest.mark.parametrize("optimizer,lr,micro_batches,keep", [("sgd", 0.5, 1, True), ("adamw", 1e-3, 2, False)])
def test_steps_in_chunks_of_tokens_equal_autograd(make, load, tmp_path, monkeypatch, optimizer, lr, micro_batches,
                                                  keep):
    """Three full steps, the blocks and the head in chunks of 5 tokens (the blocks: 2 positions of 2 rows) of rows
    of 12: the losses and updates of autograd on the whole rows; with 2 micro-batches the gradients add up whole;
    the blocks' graphs kept, or recomputed in the backward (attention alone). (Without dropout: chunks draw their
    masks in another order than a whole block does.)"""
    from helpers import assert_updates_match, make_batches, ours, reference
    force_small_chunks(monkeypatch)
    src = make(seed=41)
    steps = make_batches(3, micro_batches=micro_batches)
    got_losses, got, model = ours(load, src, tmp_path / "run", steps, optimizer, lr, keep_activations=keep)
    assert model.recomputed == (0 if keep else model.args.n_layers * micro_batches)
    want_losses, want, initial = reference(src, steps, optimizer, lr)
    assert got_losses == pytest.approx(want_losses, abs=1e-4)
    assert_updates_match(got, want, initial)


def test_lora_steps_in_chunks_of_tokens_equal_autograd(make, load, tmp_path, monkeypatch):
    """LoRA (adapters on wq, wv, w2 and the output), chunks of 5 tokens: autograd's two steps (without dropout)."""
    import compare
    from helpers import lora
    from reference import read_meta_folder
    force_small_chunks(monkeypatch)
    src = make(seed=42)
    steps, adapters, lr = compare.backprop_steps(256), compare.make_adapters(src), compare.LR["lora"]
    weights, params = read_meta_folder(src)
    probe = steps[0][0][0]
    want = compare.reference_run(weights, params, steps, "adamw", lr, adapters=adapters, lora_alpha=compare.LORA.alpha,
                                 probe=probe)
    got = compare.offloaded_run(load(src), tmp_path / "run", steps, "adamw", lr, adapters=adapters, probe=probe,
                                lora=lora(compare.LORA.rank, compare.LORA.alpha, 0.0, compare.LORA.targets))
    assert compare.report("lora", got, want, compare.initial_values(src, "lora", None), lr)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_step_whose_block_inputs_wait_on_disk_is_bit_identical(make, load, tmp_path, optimizer):
    """A budget that holds one block's inputs: the others' are written in the forward pass and read back in the
    backward; two steps of two micro-batches (dropout: the random state of a recomputed block) give the bits of
    a run that keeps every input in memory, and no spilled file is left."""
    from helpers import make_batches, ours
    src = make(seed=43, n_layers=3)
    steps = make_batches(2, micro_batches=2)
    kept_losses, kept, kept_model = ours(load, src, tmp_path / "kept", steps, optimizer, 1e-3, dropout=0.1)
    losses, spilled, model = ours(load, src, tmp_path / "spilled", steps, optimizer, 1e-3, dropout=0.1, budget=0,
                                  keep_activations=False)
    assert kept_model.memory.kept_inputs == 3 and model.memory.kept_inputs == 1
    assert losses == kept_losses and all(torch.equal(spilled[k], kept[k]) for k in kept)
    assert model.offload.seconds["writing"] > 0 and not list((tmp_path / "spilled").glob("spilled-input*"))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recomputed_blocks_in_chunks_draw_the_dropout_masks_of_the_forward_pass(make, load, tmp_path, monkeypatch,
                                                                                mode):
    """Blocks in chunks with dropout (on their sublayers' outputs; with LoRA on wq, wv and w2, on the adapters'
    inputs too): recomputed in the backward (attention alone, then each chunk with the random state the forward
    pass had) they give the bits of kept graphs, two steps of two micro-batches."""
    import compare
    from helpers import lora, make_batches
    force_small_chunks(monkeypatch)
    src = make(seed=44)
    steps, runs = make_batches(2, micro_batches=2), []
    for keep in (True, False):
        model = load(src, dropout=0.1)
        adapters = lora(4, 8.0, 0.1, ("wq", "wv", "w2")) if mode == "lora" else None
        runs.append(compare.offloaded_run(model, tmp_path / f"run{keep}", steps, "adamw", 1e-3, lora=adapters,
                                          keep_activations=keep))
        assert model.recomputed == (0 if keep else 2 * model.args.n_layers)
    kept, recomputed = runs
    assert torch.equal(recomputed["losses"], kept["losses"])
    assert all(torch.equal(recomputed["weights"][k], w) for k, w in kept["weights"].items())


FAMILIES = {"llama": {}, "qwen2": {"qkv_bias": True},
            "gemma3": {"norms": "sandwich", "norm_offset": 1.0, "activation": "gelu_tanh", "qk_norm": "head",
                       "explicit_head_dim": 32, "sliding_window": 16, "layer_types": ("sliding_attention",),
                       "rope_local_theta": 10000.0, "rope_theta": 1e6},
            "olmo2": {"norms": "post", "qk_norm": "all"}, "phi3": {"rotary_dim": 12, "sliding_window": 16}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("packed", [False, True])
def test_a_block_in_chunks_equals_the_whole(monkeypatch, family, packed):
    """Each family's block (and with three packed examples a row): its output, the gradient at its input, every
    weight's gradient (full) and the adapters' (LoRA on every matrix), chunks of 3 positions of 2 rows against the
    block run whole, in fp32."""
    import rope
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_dim=160, **FAMILIES[family])
    shapes = m.module_shapes(args, "layers")
    positions = torch.arange(40).remainder(15).expand(2, -1) if packed else None
    ropes = rope.layer_ropes(args, 0, 40, "cpu", positions)
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) * 0.2 + (1.0 if "norm" in k else 0.0) for k, s in shapes.items()}
    x, dy = torch.randn(2, 40, args.dim, generator=g), torch.randn(2, 40, args.dim, generator=g)
    adapted = [k for k in shapes if k.endswith("weight") and "norm" not in k]
    adapters = {k: (torch.randn(2, shapes[k][1], generator=g), torch.randn(shapes[k][0], 2, generator=g) * 0.1)
                for k in adapted}
    runs = []
    for chunk in (None, 6):
        if chunk:
            monkeypatch.setattr(chunked, "chunk_tokens", lambda args, dtype: chunk)
        for lora in (False, True):
            box = Box({k: w.clone() for k, w in weights.items()}, trainable=not lora,
                      lora={k: (a.clone().requires_grad_(), b.clone().requires_grad_(), 0.5, 0.0)
                            for k, (a, b) in adapters.items()} if lora else None)
            xi = x.clone().requires_grad_()
            with torch.enable_grad():
                y = m.block_forward(box, xi, args, ropes, 0, True)
            y.backward(dy)
            trained = {k: a.grad for k, (a, b, _, _) in box.lora.items()} if lora else box.grads
            runs.append((chunk, lora, y.detach(), xi.grad, trained))
    assert chunked.runs_in_chunks(x, args, 0, torch.float32)  # (the patched chunk)
    for (chunk, lora, y, dx, trained), (_, _, want_y, want_dx, want) in zip(runs[2:], runs[:2]):
        close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
        assert close(y, want_y) and close(dx, want_dx)
        assert set(trained) == set(want) and len(want) >= (len(adapted) if lora else len(shapes))
        assert all(close(trained[k], want[k]) for k in want), [k for k in want if not close(trained[k], want[k])]


def test_a_block_in_chunks_replays_the_dropout_masks_of_its_forward_pass(monkeypatch):
    """Dropout on the sublayers' outputs and on LoRA's inputs (every matrix): a block in chunks of 3 positions of
    2 rows, its graph kept or recomputed (attention alone) before the backward, against autograd through the same
    chunks written out here, drawing in the same order (the queries', keys' and values' chunks, then the rest's):
    its output, the gradient at its input and the adapters'."""
    import rope
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_dim=160)
    shapes, ropes = m.module_shapes(args, "layers"), rope.layer_ropes(args, 0, 40, "cpu")
    g = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(s, generator=g) * 0.2 + (1.0 if "norm" in k else 0.0) for k, s in shapes.items()}
    x, dy = torch.randn(2, 40, args.dim, generator=g), torch.randn(2, 40, args.dim, generator=g)
    adapters = {k: (torch.randn(2, s[1], generator=g), torch.randn(s[0], 2, generator=g) * 0.1)
                for k, s in shapes.items() if k.endswith("weight") and "norm" not in k}
    monkeypatch.setattr(chunked, "chunk_tokens", lambda args, dtype: 6)

    def run(recomputing=None):
        box = Box({k: w.clone() for k, w in weights.items()}, trainable=False,
                  lora={k: (a.clone().requires_grad_(), b.clone().requires_grad_(), 0.5, 0.25)
                        for k, (a, b) in adapters.items()})
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        with torch.enable_grad():
            if recomputing is None:  # written out: autograd through the chunks
                spans = chunked.spans(xi, args, torch.float32)
                parts = [m.qkv(box, m.attention_input(box, xi[:, s], args), args, chunked.rope_of(ropes, s), 0, True)
                         for s in spans]
                q, k, v = (torch.cat(t, 1) for t in zip(*parts))
                o = m.attend_rows(q, k, v, args, 0, 0, ropes)
                y = torch.cat([m.after_attention(box, xi[:, s], m.linear(box, "attention.wo.weight", o[:, s], True),
                                                 args, 0, True, 0.2) for s in spans], 1)
            else:
                y = m.block_forward(box, xi, args, ropes, 0, True, 0.2)
                if recomputing:
                    torch.manual_seed(5)
                    y = m.block_forward(box, xi, args, ropes, 0, True, 0.2, recomputing=True)
        torch.manual_seed(6)  # (the backward restores the states it needs)
        y.backward(dy)
        return y.detach(), xi.grad, {k: (a.grad, b.grad) for k, (a, b, _, _) in box.lora.items()}

    want_y, want_dx, want = run()
    assert chunked.runs_in_chunks(x, args, 0, torch.float32)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    for recomputing in (False, True):
        y, dx, got = run(recomputing)
        assert recomputing or close(y, want_y)
        assert close(dx, want_dx) and all(close(got[k][i], want[k][i]) for k in want for i in (0, 1))


def test_a_long_prompt_in_chunks_generates_as_the_whole(make, load, monkeypatch):
    """A prompt's pass in chunks of 4 tokens fills the cache of keys and values as the whole pass does: the same
    logits and greedy tokens (fp32); the memory plan of a generation counts its cache."""
    model = load(make(seed=44, dtype=torch.float32), compute_dtype="float32").eval()
    prompt = torch.randint(3, model.args.vocab_size, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    want_logits, want = model(torch.tensor([prompt]))[0, -1], model.generate(prompt, 6)
    force_small_chunks(monkeypatch, 4)
    assert chunked.runs_in_chunks(torch.zeros(1, 30, 1), model.args, 0, model.compute_dtype)
    got_logits, got = model(torch.tensor([prompt]))[0, -1], model.generate(prompt, 6)
    assert torch.allclose(got_logits, want_logits, rtol=1e-4, atol=1e-5) and got == want
    model.make_plan(0)
    alone = model.memory.peak
    model.make_plan(0, cache_tokens=1000)
    args = model.args
    assert model.memory.peak - alone >= 2 * args.n_layers * 1000 * args.kv_heads * args.head_dim * 4
