"""Mixtures of experts (Qwen3-MoE, Mixtral, OLMoE) streamed by expert: routing against its formula, the experts
no token chose neither read nor written (the files read counted), the load-balancing loss and its gradient
against transformers' formula written out, LoRA on experts and router, micro-batches and recomputed blocks
against autograd on the definition (families.py); where transformers is installed, folders it made itself
generate and train one step as it does."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import compare
import offload
from adapters import add_lora
from families import MOE, config_of, expert_names, hf_forward, meta_weights, n_experts, read_folder, reference_step, \
    sparse, tokens_for
from helpers import assert_step_matches, assert_updates_match, lora, make_batches, ours, setup, sgd_step
from moe import route
from model import ModelArgs
from test_gguf import NODE_LLAMA_CPP, SP_TEXTS, assert_llama_cpp_agrees

# --- routing ---

@pytest.mark.parametrize("norm_topk", [False, True])
def test_routing_follows_its_formula(norm_topk):
    """Softmax over every expert, the k largest, divided by their sum where norm_topk_prob: each weight
    computed here with Python's math."""
    args = ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=8, n_experts=6, top_k=2, norm_topk=norm_topk)
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)) * 2
    weights, chosen, probs = route(logits, args)
    for t in range(5):
        exps = [math.exp(v) for v in logits[t].tolist()]
        p = [e / sum(exps) for e in exps]
        top = sorted(range(6), key=lambda e: -p[e])[:2]
        assert chosen[t].tolist() == top
        want = [p[e] / (sum(p[e] for e in top) if norm_topk else 1.0) for e in top]
        assert weights[t].tolist() == pytest.approx(want, rel=1e-6)
        assert probs[t].tolist() == pytest.approx(p, rel=1e-6)


# --- streaming by expert ---

def reads_of(monkeypatch, folder):
    """The module files of folder (the offload) the model reads, in order (whether mapped or read)."""
    seen = []
    for name in ("map_tensors", "read_tensors"):
        original = getattr(offload, name)

        def counted(path, *a, _original=original, **k):
            if path.parent == folder:
                seen.append(path.name.removesuffix(".safetensors"))
            return _original(path, *a, **k)
        monkeypatch.setattr(offload, name, counted)
    return seen


@pytest.mark.parametrize("optimizer,keep", [("sgd", True), ("adamw", True), ("sgd", False)])
def test_experts_no_token_chose_are_neither_read_nor_written(hf_folder, load, tmp_path, monkeypatch, optimizer, keep):
    """16 experts, top 2, one row of 3 tokens: at most 6 of each block's experts are chosen. The chosen ones
    (those whose gradient is not zero by the definition) are read once in the forward pass and once in the
    backward pass (also where the block is recomputed for it: keep_activations=0) and written to the run
    folder; the others are never read and keep their offload file."""
    folder = hf_folder("qwen3moe", seed=21, num_experts=16, mlp_only_layers=[])
    config, t = read_folder(folder)
    x = tokens_for(21, batch=1, length=3)
    y = tokens_for(22, batch=1, length=3)
    _, want, initial, marks = reference_step(folder, x, y, optimizer, 0.1)
    chosen = {k.rsplit(".", 2)[0] for k in want if ".experts." in k and not torch.equal(want[k], initial[k])}
    assert 0 < len(chosen) < 2 * 16  # some experts, not all
    model = load(folder, memory_budget=0)  # nothing resident
    run = setup(model, tmp_path, "full", optimizer, tokens=3, keep_activations=keep)
    model.train()
    seen = reads_of(monkeypatch, model.offload_dir)
    model.train_step([(x, y)], 0.1)
    experts = [name for name in seen if ".experts." in name]
    assert sorted(set(experts)) == sorted(chosen)
    assert all(experts.count(name) == 2 for name in chosen)  # forward, backward
    model.flush()
    written = {name for name, box in model.boxes.items() if ".experts." in name and box.file.parent == run.dir}
    assert written == chosen
    got = {f"{n}.{k}": w.float() for n in model.boxes for k, w in model.read_weights(n).items()}
    if optimizer == "sgd":
        marks = {k: torch.zeros(0, dtype=torch.int32) for k in want}
    assert_step_matches(got, want, initial, marks, 0.1)


@pytest.mark.parametrize("family", MOE)
def test_cached_generation_equals_uncached_and_the_definition(hf_folder, load, family):
    folder = hf_folder(family, seed=23)
    model = load(folder, memory_budget=0).eval()
    prompt = [1, 17, 42, 99, 7]
    cached = model.generate(prompt, 8, use_cache=True)
    assert cached == model.generate(prompt, 8, use_cache=False)
    config, t = read_folder(folder)
    tokens = list(prompt)
    for _ in range(8):
        tokens.append(int(hf_forward(config, t, torch.tensor([tokens]))[0, -1].argmax()))
    assert cached == tokens[len(prompt):]


# --- training ---

def aux_loss_by_formula(router_logits, n, k):
    """transformers' load_balancing_loss_func without an attention mask, written out: over the layers' rows
    together, the share of top-k choices of each expert times its mean probability, summed, times n."""
    probs = torch.cat([F.softmax(logits.float(), -1) for logits in router_logits])
    chosen = probs.topk(k, -1).indices
    share = torch.stack([(chosen == e).sum() for e in range(n)]).float() / probs.shape[0]
    return n * (share * probs.mean(0)).sum()


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("micro_batches,keep", [(1, True), (2, False)])
def test_a_step_with_the_load_balancing_loss_equals_autograd(hf_folder, load, tmp_path, family, micro_batches, keep):
    """Cross-entropy plus coef times the load-balancing loss, one AdamW step of every weight (the routers
    through the routing weights and the aux loss), over micro-batches and with blocks recomputed in the
    backward pass (keep_activations=0), against autograd on the definition with the loss written out."""
    folder = hf_folder(family, seed=24)
    config, t = read_folder(folder)
    steps = make_batches(1, micro_batches=micro_batches, batch=2 // micro_batches, seed=24)
    coef, lr = 0.5, 1e-3
    params = {k: v.float().clone().requires_grad_() for k, v in t.items()}
    opt = torch.optim.AdamW(params.values(), lr=lr)
    loss, aux = 0.0, 0.0
    n_targets = sum(int((y != -1).sum()) for x, y in steps[0])
    for x, y in steps[0]:
        router_logits = []
        logits = hf_forward(config, params, x, router_logits=router_logits)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum") / n_targets
        a = aux_loss_by_formula(router_logits, n_experts(config), config["num_experts_per_tok"])
        (ce + coef * a / micro_batches).backward()
        loss, aux = loss + ce.item(), aux + a.item() / micro_batches
    marks = {k: compare.rounding_level(g) for k, g in meta_weights(config, {n: p.grad for n, p in params.items()}).items()}
    for name, p in params.items():  # an expert no token chose has no gradient (and no AdamW step)
        if ".experts." in name and not p.grad.any():
            p.grad = None
    opt.step()
    want = meta_weights(config, {n: p.detach() for n, p in params.items()})
    initial = meta_weights(config, t)

    model = load(folder)
    model.router.coef = coef
    setup(model, tmp_path, "full", "adamw", tokens=steps[0][0][0].numel(), micro_batches=micro_batches,
          keep_activations=keep)
    model.train()
    got_loss = model.train_step(steps[0], lr)
    assert got_loss == pytest.approx(loss, abs=1e-4)
    assert model.router_loss == pytest.approx(aux, rel=1e-5)
    got = {f"{n}.{k}": w.float() for n in model.boxes for k, w in model.read_weights(n).items()}
    assert set(got) == set(want)
    routers = [k for k in want if k.endswith("feed_forward.gate.weight")]
    assert routers and all(not torch.equal(want[k], initial[k]) for k in routers)
    assert_step_matches(got, want, initial, marks, lr)


def test_the_load_balancing_loss_moves_the_routers(hf_folder, load, tmp_path):
    """The aux term's share of the routers' update is far above the tolerance above (else that test proves
    nothing of its gradient)."""
    folder = hf_folder("mixtral", seed=25)
    steps = make_batches(1, seed=25)
    results = []
    for coef in (0.0, 0.5):
        model = load(folder)
        model.router.coef = coef
        setup(model, tmp_path / str(coef), "full", "sgd", tokens=steps[0][0][0].numel())
        model.train().train_step(steps[0], 0.1)
        results.append(model.read_weights("layers.0")["feed_forward.gate.weight"].float())
    initial = read_folder(folder)[1]["model.layers.0.block_sparse_moe.gate.weight"]
    without, with_aux = results[0] - initial, results[1] - initial
    assert torch.linalg.vector_norm(with_aux - without) > 0.01 * torch.linalg.vector_norm(without)


def expert_adapters(config, rank, seed, targets):
    """{Meta key: (A, B)} random adapters on every sparse layer's experts (w1, w2, w3) and router (a dense
    layer's w1, w2, w3), and on the attention's wq and wv."""
    g = torch.Generator().manual_seed(seed)
    d, hd = config["hidden_size"], config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    size = config.get("moe_intermediate_size") or config["intermediate_size"]
    out = {}

    def pair(n_in, n_out):
        return torch.randn(rank, n_in, generator=g) * 0.1, torch.randn(n_out, rank, generator=g) * 0.05
    for i in range(config["num_hidden_layers"]):
        out[f"layers.{i}.attention.wq.weight"] = pair(d, config["num_attention_heads"] * hd)
        out[f"layers.{i}.attention.wv.weight"] = pair(d, config["num_key_value_heads"] * hd)
        if not sparse(config, i):  # a dense layer's MLP (Qwen3-MoE's mlp_only_layers)
            inner = config["intermediate_size"]
            out.update({f"layers.{i}.feed_forward.w1.weight": pair(d, inner), f"layers.{i}.feed_forward.w3.weight":
                        pair(d, inner), f"layers.{i}.feed_forward.w2.weight": pair(inner, d)})
            continue
        if "router" in targets:
            out[f"layers.{i}.feed_forward.gate.weight"] = pair(d, n_experts(config))
        for e in range(n_experts(config)):
            out.update({f"layers.{i}.experts.{e}.w1.weight": pair(d, size), f"layers.{i}.experts.{e}.w3.weight":
                        pair(d, size), f"layers.{i}.experts.{e}.w2.weight": pair(size, d)})
    return out


@pytest.mark.parametrize("family", MOE)
def test_lora_on_experts_and_router_equals_autograd(hf_folder, load, tmp_path, family):
    """Adapters on each expert's w1, w2, w3 (one each), the router and attention, one AdamW step, against
    autograd on the definition with the same adapters; an expert no token chose keeps its adapters."""
    folder = hf_folder(family, seed=26, **({"num_experts": 12} if family != "mixtral" else {"num_local_experts": 12}))
    config, t = read_folder(folder)
    x, y = tokens_for(26, batch=1, length=4), tokens_for(27, batch=1, length=4)
    rank, alpha, lr = 4, 8.0, 1e-2
    targets = ["wq", "wv", "w1", "w2", "w3", "router"]
    adapters = expert_adapters(config, rank, 26, targets)
    model = load(folder)
    add_lora(model, lora(rank, alpha, 0.0, targets), tensors={k: (a.clone(), b.clone()) for k, (a, b) in adapters.items()})
    assert set(model.lora) == set(adapters)
    setup(model, tmp_path, "lora", tokens=x.numel())
    model.train()
    loss = model.train_step([(x, y)], lr)
    got = {f"{k}:{ab}": p.detach().clone() for k, pair in model.lora.items() for ab, p in zip("AB", pair)}

    from test_gemma_phi_olmo import PARTS, hf_order
    params = {(k, ab): p.clone().requires_grad_() for k, (a, b) in adapters.items() for ab, p in (("A", a), ("B", b))}
    ref_lora = {}
    for key in adapters:
        parts = key.split(".")
        a, b = params[key, "A"], params[key, "B"]
        if parts[2] == "experts":
            ref_lora[int(parts[1]), int(parts[3]), {"w1": "gate", "w3": "up", "w2": "down"}[parts[4]]] = (a, b, alpha / rank)
        elif parts[3] == "gate":
            ref_lora[int(parts[1]), "router"] = (a, b, alpha / rank)
        else:
            name = parts[3]
            ref_lora[int(parts[1]), PARTS[name]] = (a, hf_order(config, name, b) if name == "wq" else b,
                                                                     alpha / rank)
    want_loss = F.cross_entropy(hf_forward(config, {k: v.float() for k, v in t.items()}, x, ref_lora).flatten(0, 1),
                                y.flatten(), ignore_index=-1)
    want_loss.backward()
    marks = {f"{k}:{ab}": compare.rounding_level(p.grad) for (k, ab), p in params.items()}
    untouched = set()
    for (k, ab), p in params.items():
        if ".experts." in k and not p.grad.any():
            p.grad = None
            untouched.add(k)
    torch.optim.AdamW(params.values(), lr=lr).step()
    assert loss == pytest.approx(want_loss.item(), abs=1e-4)
    assert untouched  # 4 tokens, top k of 12: some experts are left out
    want = {f"{k}:{ab}": p.detach() for (k, ab), p in params.items()}
    initial = {f"{k}:{ab}": p for k, pair in adapters.items() for ab, p in zip("AB", pair)}
    assert all(torch.equal(got[f"{k}:{ab}"], initial[f"{k}:{ab}"]) for k in untouched for ab in "AB")
    assert_updates_match(got, want, initial, marks=marks, bound=3 * lr)


def test_lora_dropout_on_experts_draws_the_same_masks_when_recomputed(hf_folder, load, tmp_path):
    """With dropout on the experts' adapters, a block recomputed for its backward pass (keep_activations=0)
    gives the bits of one whose graph was kept: each expert's masks are drawn again as in the forward pass."""
    folder = hf_folder("olmoe", seed=28)
    steps = make_batches(1, seed=28)
    results = []
    for keep, p in ((True, 0.3), (False, 0.3), (True, 0.0)):
        model = load(folder, dropout=0.0)
        add_lora(model, lora(4, 8.0, p, ["w1", "w2", "router"]), seed=3)
        for a, b in model.lora.values():  # B non-zero: every adapter matters from the first step
            b.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
        setup(model, tmp_path / f"{keep}{p}", "lora", tokens=steps[0][0][0].numel(), keep_activations=keep)
        torch.manual_seed(5)
        model.train().train_step(steps[0], 1e-2)
        results.append({k: torch.cat([a.flatten(), b.flatten()]) for k, (a, b) in model.lora.items()})
    kept, recomputed, without = results
    assert all(torch.equal(kept[k], recomputed[k]) for k in kept)
    assert any(not torch.equal(kept[k], without[k]) for k in kept)  # the dropout did something


def test_settings_come_from_each_config(hf_folder, load):
    """Experts, top k, an expert's size, renormalisation and dense layers as each configuration says."""
    q = load(hf_folder("qwen3moe", name="q")).args
    assert (q.n_experts, q.top_k, q.moe_hidden_dim, q.norm_topk, q.dense_layers) == (6, 2, 40, True, (1,))
    step = load(hf_folder("qwen3moe", name="s", mlp_only_layers=[], decoder_sparse_step=2)).args
    assert step.dense_layers == (0, 2)  # (i + 1) % 2: the second layer alone is sparse
    m = load(hf_folder("mixtral", name="m", num_experts_per_tok=1)).args
    assert (m.n_experts, m.top_k, m.moe_hidden_dim, m.norm_topk) == (4, 1, None, True)
    o = load(hf_folder("olmoe", name="o")).args
    assert (o.n_experts, o.top_k, o.norm_topk, o.qk_norm) == (8, 3, False, "all")


# --- transformers itself, where it is installed ---

def made_by_transformers(transformers, family, folder, tokenizer_bytes, **changes):
    """A tiny folder of family made by transformers' save_pretrained (its own names and config), weights far
    from their initialisation."""
    config = config_of(family, **changes)
    config.pop("architectures")
    cls = {"qwen3moe": transformers.Qwen3MoeConfig, "mixtral": transformers.MixtralConfig,
           "olmoe": transformers.OlmoeConfig}[family]
    model = transformers.AutoModelForCausalLM.from_config(cls(**{k: v for k, v in config.items() if k != "model_type"}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.3)
    model.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(tokenizer_bytes)
    return model


@pytest.mark.parametrize("family", MOE)
def test_folders_made_by_transformers_generate_and_train_as_it_does(load, tmp_path, tokenizer_bytes, family):
    """Logits, a greedy generation and one SGD step of every weight (each expert's slices of transformers 5's
    fused expert tensors) against transformers' own model and autograd."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / family
    theirs = made_by_transformers(transformers, family, folder, tokenizer_bytes)
    (x, y), = make_batches(1, seed=29)[0]
    ours_model = load(folder)
    with torch.no_grad():
        assert torch.allclose(ours_model.eval()(x), theirs.eval()(x).logits, atol=1e-4, rtol=1e-4)
        want = theirs.generate(x[:1, :5], max_new_tokens=6, do_sample=False)[0, 5:].tolist()
    assert ours_model.generate(x[0, :5].tolist(), 6) == want
    losses, got, _ = ours(load, folder, tmp_path / "run", [[(x, y)]], "sgd", 0.1)
    assert losses == pytest.approx([sgd_step(theirs, x, y, 0.1)], abs=1e-4)
    state = {k: v.detach() for k, v in theirs.state_dict().items()}
    config = json.loads((folder / "config.json").read_text())
    per_expert = {}
    moe, names = expert_names(config)
    for name, v in state.items():  # transformers 5: experts fused as gate_up_proj (E, 2h, d) and down_proj (E, d, h)
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix("experts.gate_up_proj").replace(".mlp.", f".{moe}.")
            for e, w in enumerate(v):
                gate, up = w.chunk(2)
                per_expert.update({f"{prefix}experts.{e}.{names[0]}.weight": gate, f"{prefix}experts.{e}.{names[1]}.weight": up})
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("experts.down_proj").replace(".mlp.", f".{moe}.")
            per_expert.update({f"{prefix}experts.{e}.{names[2]}.weight": w for e, w in enumerate(v)})
        else:
            per_expert[name.replace("mlp.gate.weight", f"{moe}.gate.weight")] = v
    want = meta_weights(config, {k: v for k, v in per_expert.items() if k in read_folder(folder)[1]})
    initial = meta_weights(config, read_folder(folder)[1])
    assert set(want) == set(got)
    assert_updates_match(got, want, initial)


# --- a run, resumed, and in two processes ---

@pytest.mark.slow
@pytest.mark.parametrize("case", ["sgd_clip_accum", "lora"])
def test_two_processes_equal_one_with_their_rows(hf_folder, tmp_path, case):
    """Data parallel: each process streams the experts any process chose (those it has no tokens for take a
    zero gradient), so the gradients are summed in the same order everywhere; 2 processes x 2 rows end as 1
    process x 4 rows (weights; adapters and their AdamW moments). (A router's gradient is at rounding level for
    the experts of small probability, where AdamW's step takes the sign of the rounding: the routers are trained
    with SGD here, and get no adapter.)"""
    from test_parallel import SETTINGS, assert_runs_match, initial, lora_start, train, trained
    folder = hf_folder("qwen3moe", seed=30, num_experts=32)
    # rows of 4 tokens: each process's 8 tokens choose a few of the 32 experts, mostly not the other's
    settings = [*SETTINGS, "--seq_len=4", f"--model_path={folder}",  # (no aux loss: of each process's rows, as DDP)
                *(["--optimizer=sgd", "--lr=0.05", "--grad_clip=0.5", "--grad_accum=2"] if case != "lora" else
                  ["--mode=lora", "--lora_dropout=0", "--lora_targets=wq,w1,w2"])]
    train(1, tmp_path / "one", tmp_path / "off", "--batch_size=4", *settings)
    train(2, tmp_path / "two", tmp_path / "off", "--batch_size=2", *settings)
    mode = "lora" if case == "lora" else "full"
    one, two = trained(tmp_path / "one", mode), trained(tmp_path / "two", mode)
    assert one.keys() == two.keys() and any(".experts." in k for k in one)
    start = initial(tmp_path / "off") if mode == "full" else lora_start(tmp_path / "off", settings, folder)
    assert_runs_match(one, two, start, mode, tiny_share=0.05)  # (an expert with a few tokens in 4 steps)


def test_a_resumed_run_ends_as_an_uninterrupted_one_and_logs_the_aux_loss(hf_folder, tmp_path):
    """finetune.py on a mixture with the load-balancing loss on: stopped after its second step's commit and
    resumed, it ends with the weights of an uninterrupted run; metrics.jsonl holds the aux loss of each step;
    the exported model (Hugging Face's layout, each expert's tensors) generates as the trained one does."""
    import safetensors.torch
    from helpers import records, run_main
    folder = hf_folder("olmoe", seed=31)
    base = [f"--model_path={folder}", f"--offload_path={tmp_path}/off", "--seq_len=8", "--batch_size=2",
            "--eval_period=0", "--save_period=2", "--router_aux_loss_coef=0.01", "--compute_dtype=float32"]
    assert run_main("finetune.py", *base, "--iters=4", f"--out_path={tmp_path}/whole")[0] == 0
    assert run_main("finetune.py", *base, "--iters=2", f"--out_path={tmp_path}/parts")[0] == 0
    assert run_main("finetune.py", *base, "--iters=4", "--resume=1", f"--out_path={tmp_path}/parts")[0] == 0
    whole, parts = (safetensors.torch.load_file(tmp_path / name / "model.safetensors") for name in ("whole", "parts"))
    assert whole.keys() == parts.keys() and "model.layers.0.mlp.experts.7.down_proj.weight" in whole
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    steps = records(tmp_path / "whole", "train")
    assert len(steps) == 4 and all(0.5 < r["router_aux_loss"] < 8 for r in steps)  # E * sum f P: 1 when balanced
    no_aux = [a for a in base if "router_aux" not in a]
    assert run_main("finetune.py", *no_aux, "--iters=1", f"--out_path={tmp_path}/plain")[0] == 0
    assert "router_aux_loss" not in records(tmp_path / "plain", "train")[0]


def test_bad_settings_of_a_mixture_are_one_line(hf_folder, tmp_path):
    from helpers import refused
    base = [f"--offload_path={tmp_path}/off", f"--out_path={tmp_path}/out", "--iters=1"]
    refused("finetune.py", *base, f"--model_path={hf_folder('llama3')}", "--router_aux_loss_coef=0.1",
            messages=("--router_aux_loss_coef=0.1", "is not a mixture of experts"))
    refused("finetune.py", *base, "--router_aux_loss_coef=-1", messages=("--router_aux_loss_coef=-1.0", "at least 0"))
    for changes, message in (({"num_experts_per_tok": 9}, "num_experts_per_tok=9 is more than the 8 experts"),
                             ({"clip_qkv": 8.0}, "clip_qkv is not supported"),
                             ({"num_experts": 0}, "num_experts must be a positive integer"),
                             ({"router_jitter_noise": 0.1}, "router_jitter_noise is not supported")):
        folder = hf_folder("olmoe", name=str(len(message)), **changes)
        refused("finetune.py", *base, f"--model_path={folder}", messages=(str(folder / "config.json"), message))


# --- GGUF ---

GGUF_ARCH = {"qwen3moe": "qwen3moe", "mixtral": "llama", "olmoe": "olmoe"}


@pytest.mark.parametrize("family", MOE)
def test_gguf_export_stacks_the_experts_as_llama_cpp_names_them(hf_folder, load, tmp_path, family):
    """Each family under llama.cpp's architecture, its tensors under gguf-py's names for the Hugging Face ones
    (a block's experts stacked as the converter stacks them: one (experts, rows, columns) tensor per weight,
    the router as ffn_gate_inp), q/k rows in Meta's order for llama (Mixtral), as they are for the others; the
    expert counts as metadata. A LoRA adapter's expert adapters stacked likewise."""
    import gguf
    import gguf_format
    from families import meta_rows_by_definition
    folder = hf_folder(family, seed=32, **({"mlp_only_layers": []} if family == "qwen3moe" else {}))
    config, t = read_folder(folder)
    model = load(folder)
    path = gguf_format.write_model(model, tmp_path / "out", "f32", log=lambda *a: None)
    reader = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    tensors = {r.name: torch.from_numpy(r.data.copy()).reshape(tuple(reversed([int(n) for n in r.shape])))
               for r in reader.tensors}
    arch = GGUF_ARCH[family]
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.expert_count"] == n_experts(config)
    assert fields[f"{arch}.expert_used_count"] == config["num_experts_per_tok"]
    if family == "qwen3moe":
        assert fields[f"{arch}.expert_feed_forward_length"] == config["moe_intermediate_size"]
    moe, names = expert_names(config)
    want = {}
    for key, w in t.items():
        if ".experts." not in key:
            want[key] = w
            continue
        layer, expert, weight = key.split(".")[2], int(key.split(".")[5]), key.split(".")[6]
        want.setdefault(f"model.layers.{layer}.mlp.experts.{weight}.weight", {})[expert] = w
    want = {k: torch.stack([v[e] for e in range(len(v))]) if isinstance(v, dict) else v for k, v in want.items()}
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config["num_hidden_layers"])
    gnames = {k: table.get_name(k.replace("block_sparse_moe.", "mlp.").replace("mlp.experts.w1", "mlp.experts.gate_proj")
                                .replace("mlp.experts.w3", "mlp.experts.up_proj").replace("mlp.experts.w2",
                                                                                           "mlp.experts.down_proj"),
                                try_suffixes=(".weight",)) for k in want}
    assert None not in gnames.values() and set(tensors) == set(gnames.values())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    for key, w in want.items():
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            w = meta_rows_by_definition(w, heads if "q_proj" in key else kv)
        assert torch.equal(tensors[gnames[key]], w.float()), key
    add_lora(model, lora(4, 8.0, 0.0, ["w1", "w2", "wq"]), seed=1)
    adapter = gguf_format.write_adapter(model, tmp_path / "adapter.gguf", 8.0, log=lambda *a: None)
    reader = gguf.GGUFReader(adapter)
    shapes = {r.name: tuple(reversed([int(n) for n in r.shape])) for r in reader.tensors}
    size = config.get("moe_intermediate_size") or config["intermediate_size"]
    d, E = config["hidden_size"], n_experts(config)
    assert shapes["blk.0.ffn_gate_exps.weight.lora_a"] == (E, 4, d)
    assert shapes["blk.0.ffn_gate_exps.weight.lora_b"] == (E, size, 4)
    assert shapes["blk.0.ffn_down_exps.weight.lora_a"] == (E, 4, size)
    data = {r.name: torch.from_numpy(r.data.copy()).reshape(shapes[r.name]) for r in reader.tensors}
    assert torch.equal(data["blk.0.ffn_gate_exps.weight.lora_a"][3], model.lora["layers.0.experts.3.w1.weight"][0])


def test_gguf_export_refuses_what_llama_cpp_cannot_run(hf_folder, load, tmp_path):
    """llama.cpp's qwen3moe has no dense layers and renormalises; its olmoe does not renormalise, and has as many
    key and value heads as query heads."""
    from utils import UserError
    import gguf_format
    with pytest.raises(UserError, match=r"no dense MLP between layers of experts .* layers \[1\]"):
        gguf_format.write_model(load(hf_folder("qwen3moe", name="a")), tmp_path / "out", "f32")
    with pytest.raises(UserError, match="renormalises the top-k routing weights, this model's norm_topk_prob is false"):
        gguf_format.write_model(load(hf_folder("qwen3moe", name="b", mlp_only_layers=[], norm_topk_prob=False)),
                                tmp_path / "b", "f32")
    with pytest.raises(UserError, match="olmoe does not renormalise"):
        gguf_format.write_model(load(hf_folder("olmoe", name="c", norm_topk_prob=True)), tmp_path / "c", "f32")
    with pytest.raises(UserError, match="olmoe takes q, k and v of hidden_size each"):
        gguf_format.write_model(load(hf_folder("olmoe", name="d", num_key_value_heads=2)), tmp_path / "d", "f32")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not NODE_LLAMA_CPP, reason="SLOWLLAMA_NODE_LLAMA_CPP: a folder where `npm install "
                    "node-llama-cpp` was run (llama.cpp's own code, prebuilt)")
@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("adapter", [False, True])
def test_llama_cpp_runs_the_gguf_of_a_mixture(hf_folder, load, tmp_path, byte_fallback_tokenizer, family, adapter):
    """llama.cpp tokenizes as we do and continues a prompt greedily with the tokens we generate, from the
    exported mixture (and with the adapter GGUF of LoRA on the experts, the router's and attention's)."""
    import gguf_format
    changes = {"qwen3moe": {"mlp_only_layers": []}, "mixtral": {"sliding_window": None}}.get(family, {})  # (llama.cpp's
    folder = hf_folder(family, seed=33, vocab_size=512, **changes)  # qwen3moe has no dense layers, its llama no window)
    (folder / "tokenizer.model").write_bytes(byte_fallback_tokenizer)
    model = load(folder)
    path = gguf_format.write_model(model, tmp_path / "out", "f32", log=lambda *a: None)
    assert_llama_cpp_agrees(tmp_path, model, path, SP_TEXTS, ["wq", "w1", "w2", "w3"] if adapter else None)


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("targets", [("wq", "w1", "w2", "w3", "router"), ("wv", "w1"), ("w2",)])
def test_peft_loads_the_adapter_of_experts_and_routers(load, tmp_path, tokenizer_bytes, family, targets):
    """The PEFT export of adapters on experts (transformers 5's fused expert parameters, with target_parameters)
    and routers: PEFT loads it onto transformers' own model, whose logits then equal ours with the adapters."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import hf_format as hf
    folder = tmp_path / family
    changes = {"mlp_only_layers": []} if family == "qwen3moe" else {}  # (as Qwen3-30B-A3B and 235B-A22B: below)
    theirs = made_by_transformers(transformers, family, folder, tokenizer_bytes, **changes)
    model = load(folder)
    add_lora(model, lora(2, 6.0, 0.1, targets), seed=1)
    with torch.no_grad():
        for _, b in model.lora.values():
            b.normal_(generator=torch.Generator().manual_seed(2)).mul_(0.3)
    hf.write_peft(tmp_path / "peft", model, lora(2, 6.0, 0.1, targets))
    tokens = tokens_for(34)
    with torch.no_grad():
        plain = theirs.eval()(tokens).logits
        adapted = peft.PeftModel.from_pretrained(theirs, tmp_path / "peft").eval()(tokens).logits
        ours_logits = model.eval()(tokens)
    assert (ours_logits - plain).abs().max() > 1e-2  # the adapters matter
    assert torch.allclose(ours_logits, adapted, atol=1e-4, rtol=1e-4), (ours_logits - adapted).abs().max()


def test_peft_export_of_a_mixture_with_adapted_dense_layers_is_left_out(hf_folder, load, tmp_path):
    """PEFT (with transformers 5) takes a Qwen3-MoE's adapters of gate_proj, up_proj and down_proj for those of its
    experts, also where they adapt a dense layer (mlp_only_layers): such an adapter is not written, said in one
    line; one of the experts and attention alone is."""
    import hf_format as hf
    model, notes = load(hf_folder("qwen3moe")), []
    add_lora(model, lora(2, 6.0, 0.0, ["wq", "w2"]))
    assert hf.write_peft(tmp_path / "a", model, lora(2, 6.0, 0.0, ["wq", "w2"]), log=notes.append) is None
    assert not (tmp_path / "a").exists() and "not written" in notes[0] and "mlp_only_layers" in notes[0]
    add_lora(model, lora(2, 6.0, 0.0, ["wq", "router"]))
    assert hf.write_peft(tmp_path / "b", model, lora(2, 6.0, 0.0, ["wq", "router"]), log=notes.append) == tmp_path / "b"


def test_plan_counts_every_expert_and_the_active_ones_arithmetic(hf_folder, tmp_path):
    """--plan=1 on a mixture: every expert's file read in each pass (the worst case, said in a line), the
    arithmetic of attention, router, top_k experts a token and the output (counted here from the config)."""
    from test_report import plan
    folder = hf_folder("olmoe", seed=35)
    config = config_of("olmoe")
    f, stdout = plan(tmp_path, f"--model_path={folder}", "--mode=lora", "--memory_budget=0", "--compute_dtype=float32")
    assert "count every expert of every block (the worst case" in stdout
    d, heads, kv, E = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"], 8
    hd, inner, k = d // heads, config["intermediate_size"], config["num_experts_per_tok"]
    attention = heads * hd * d * 2 + 2 * kv * hd * d
    assert f["matmul_params"] == config["num_hidden_layers"] * (attention + E * d + k * 3 * inner * d) + \
        config["vocab_size"] * d
    experts = config["num_hidden_layers"] * E * 3 * inner * d * 4  # fp32 files, every expert
    assert f["forward_read_bytes"] > experts and f["backward_read_bytes"] > experts
