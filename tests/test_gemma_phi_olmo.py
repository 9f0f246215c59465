"""Gemma 2 and 3, Phi-3 / Phi-4 and OLMo 2 end to end: LoRA against autograd on each family's definition
(families.py), longrope's two sets of factors, Gemma 3's image-text checkpoints, the embeddings' scale in the
weights' dtype, the PEFT and GGUF exports of fused and Gemma weights, chat in Gemma's format, a resumed run;
and, where transformers is installed, a training step against its own."""
import json

import gguf
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import compare
import gguf_format
import loader
from adapters import add_lora
from families import DROP, MOE, NEW, TIED, family_of, head_dim_of, hf_forward, meta_weights, read_folder, tokens_for
from helpers import (assert_step_matches, assert_updates_match, lora, make_batches, ours, refused, run_main, setup,
                     sgd_step)

DENSE = [f for f in NEW if f not in MOE]  # (the mixtures of experts: test_moe.py)

# the definition's LoRA parts of each target (families.hf_forward's lora keys)
PARTS = {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w1": "gate", "w3": "up", "w2": "down"}


def adapters_for(config, targets, rank, seed):
    """{Meta key: (A, B)} random adapters of targets (both random: a step moves both)."""
    g = torch.Generator().manual_seed(seed)
    d, hd, inner = config["hidden_size"], head_dim_of(config), config["intermediate_size"]
    rows = {"wq": config["num_attention_heads"] * hd, "wk": config["num_key_value_heads"] * hd,
            "wv": config["num_key_value_heads"] * hd, "wo": d, "w1": inner, "w3": inner, "w2": d}
    ins = {"wo": config["num_attention_heads"] * hd, "w2": inner}
    out = {}
    for i in range(config["num_hidden_layers"]):
        for name in targets:
            module = "attention" if name.startswith("wq") or name in ("wk", "wv", "wo") else "feed_forward"
            out[f"layers.{i}.{module}.{name}.weight"] = (torch.randn(rank, ins.get(name, d), generator=g) * 0.1,
                                                        torch.randn(rows[name], rank, generator=g) * 0.05)
    return out


def hf_order(config, name, b):
    """Meta's rows of a q or k matrix in Hugging Face's order: the inverse of families.meta_rows_by_definition."""
    from families import meta_rows_by_definition, rotary_dim_of
    heads = config["num_attention_heads"] if name == "wq" else config["num_key_value_heads"]
    rd = rotary_dim_of(config) if rotary_dim_of(config) != head_dim_of(config) else None
    forward = meta_rows_by_definition(torch.eye(b.shape[0]), heads, rd)  # Meta row r = HF row forward[r].argmax()
    return forward.T @ b


@pytest.mark.parametrize("family", DENSE)
def test_lora_step_equals_autograd_on_the_definition(hf_folder, load, tmp_path, family):
    """Adapters on every matrix of a block (on Phi-3's fused projections: on their parts) and an AdamW step,
    against autograd on the definition with the same adapters."""
    folder = hf_folder(family, seed=81)
    config, t = read_folder(folder)
    (x, y), = make_batches(1, seed=81)[0]
    rank, alpha, lr = 4, 8.0, 1e-2
    targets = ["wq", "wk", "wv", "wo", "w1", "w3", "w2"]
    adapters = adapters_for(config, targets, rank, 81)
    model = load(folder)
    add_lora(model, lora(rank, alpha, 0.0, targets), tensors={k: (a.clone(), b.clone()) for k, (a, b) in adapters.items()})
    setup(model, tmp_path, "lora", tokens=x.numel())
    model.train()
    loss = model.train_step([(x, y)], lr)
    got = {f"{k}:{ab}": p.detach().clone() for k, pair in model.lora.items() for ab, p in zip("AB", pair)}

    params = {(k, ab): p.clone().requires_grad_() for k, (a, b) in adapters.items() for ab, p in (("A", a), ("B", b))}
    frozen = {k: v.float() for k, v in t.items()}
    # the definition's B in Hugging Face's rows: for q and k, the Meta-ordered B seen through the permutation
    ref_lora = {}
    for key in adapters:
        layer, name = int(key.split(".")[1]), key.split(".")[-2]
        b = params[key, "B"]
        ref_lora[layer, PARTS[name]] = (params[key, "A"], hf_order(config, name, b) if name in ("wq", "wk") else b,
                                        alpha / rank)
    opt = torch.optim.AdamW(params.values(), lr=lr)
    want_loss = F.cross_entropy(hf_forward(config, frozen, x, ref_lora).flatten(0, 1), y.flatten(), ignore_index=-1)
    want_loss.backward()
    marks = {f"{k}:{ab}": compare.rounding_level(p.grad) for (k, ab), p in params.items()}
    opt.step()
    assert loss == pytest.approx(want_loss.item(), abs=1e-4)
    want = {f"{k}:{ab}": p.detach() for (k, ab), p in params.items()}
    initial = {f"{k}:{ab}": p for k, pair in adapters.items() for ab, p in zip("AB", pair)}
    assert set(got) == set(want)
    # AdamW moves an element by about lr whatever its gradient: where that is at rounding level, either sign
    assert_updates_match(got, want, initial, marks=marks, bound=3 * lr)


@pytest.mark.parametrize("length", [6, 8, 9, 14])
def test_longrope_takes_its_long_factors_past_the_original_context(hf_folder, load, length):
    """Phi-4-mini's longrope (original context 8): the short factors up to 8 positions, the long ones for a
    pass beyond; a cached generation crossing the boundary turns every key again with the long ones."""
    folder = hf_folder("phi3-longrope", seed=82)
    config, t = read_folder(folder)
    model = load(folder).eval()
    tokens = tokens_for(82, length=length)
    assert torch.allclose(model(tokens), hf_forward(config, t, tokens), atol=1e-4, rtol=1e-4)
    if length == 6:
        prompt = tokens[0, :5].tolist()
        cached = model.generate(prompt, 9)  # 5 + 9 positions: past 8 on the way
        seq = list(prompt)
        for _ in range(9):
            seq.append(int(hf_forward(config, t, torch.tensor([seq]))[0, -1].argmax()))
        assert cached == seq[len(prompt):] == model.generate(prompt, 9, use_cache=False)


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_gemma3_image_text_checkpoints_load_their_text_model(hf_folder, load, tmp_path, prefix):
    """Gemma3ForConditionalGeneration's config (text_config) and tensors (under transformers 5's or 4's prefix):
    its text model, as the definition computes it; exported to Hugging Face's layout as Gemma3ForCausalLM."""
    folder = hf_folder("gemma3", seed=83, image_text=prefix)
    config, t = read_folder(folder)
    tokens = tokens_for(83)
    model = load(folder)
    assert torch.allclose(model.eval()(tokens), hf_forward(config, t, tokens), atol=1e-4, rtol=1e-4)
    loader.save_model(model, tmp_path / "out", out_format="hf", log=lambda *a: None)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["architectures"] == ["Gemma3ForCausalLM"] and exported["head_dim"] == config["head_dim"]
    got = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)


def test_gemma3_config_of_transformers_5_is_the_same_model(hf_folder, load):
    """transformers 5 writes Gemma 3's rope per layer type (rope_parameters) and the layer types themselves."""
    old = hf_folder("gemma3", seed=91, name="old")
    config = read_folder(old)[0]
    new = hf_folder("gemma3", seed=91, name="new", rope_theta=DROP, rope_local_base_freq=DROP, rope_scaling=DROP,
                    sliding_window_pattern=DROP, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    a, b = load(old), load(new)
    assert (a.args.rope_theta, a.args.rope_local_theta, a.args.rope_scaling, a.args.layer_types) == \
        (b.args.rope_theta, b.args.rope_local_theta, b.args.rope_scaling, b.args.layer_types)
    tokens = tokens_for(91)
    assert torch.equal(a.eval()(tokens), b.eval()(tokens))
    assert torch.allclose(b(tokens), hf_forward(config, read_folder(new)[1], tokens), atol=1e-4, rtol=1e-4)


def test_gemma_embeddings_are_scaled_in_the_weights_dtype(hf_folder, load):
    """sqrt(hidden_size) rounded to the checkpoint's dtype, as transformers multiplies (bf16: 80 ** 0.5 is 8.9375)."""
    bf16 = load(hf_folder("gemma3", seed=84, dtype=torch.bfloat16, hidden_size=80))
    assert bf16.args.embed_scale == torch.tensor(80 ** 0.5, dtype=torch.bfloat16).item() == 8.9375
    fp32 = load(hf_folder("gemma3", seed=84, name="fp32", hidden_size=80))
    assert fp32.args.embed_scale == torch.tensor(80 ** 0.5, dtype=torch.float32).item()


def test_peft_export_of_fused_projections(hf_folder, load, tmp_path):
    """On Phi-3 the adapters of wq and wv are one PEFT adapter of qkv_proj (rank 2r, alpha 2 alpha in the
    patterns): applied as PEFT applies it (W + alpha/r B A per module), it is the sum of the parts."""
    import hf_format as hf
    folder = hf_folder("phi3", seed=85)
    model = load(folder)
    adapter = lora(4, 8.0, 0.0, ["wq", "wv", "w3"])
    add_lora(model, adapter, seed=1)
    with torch.no_grad():
        for _, b in model.lora.values():
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    hf.write_peft(tmp_path / "peft", model, adapter)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["gate_up_proj", "qkv_proj"]
    assert config["rank_pattern"] == {"qkv_proj": 8} and config["alpha_pattern"] == {"qkv_proj": 16.0}
    assert "gate_up_proj" not in config["rank_pattern"]  # one part: rank r as it is
    tensors = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    source = read_folder(folder)[1]
    merged = meta_weights(read_folder(folder)[0], {k: v.clone() for k, v in source.items()})
    for i in range(2):
        p = f"base_model.model.model.layers.{i}."
        for module, rank in (("self_attn.qkv_proj", 8), ("mlp.gate_up_proj", 4)):
            a, b = tensors[p + module + ".lora_A.weight"], tensors[p + module + ".lora_B.weight"]
            alpha = config["alpha_pattern"].get(module.split(".")[1], config["lora_alpha"])
            source[f"model.layers.{i}.{module}.weight"] = source[f"model.layers.{i}.{module}.weight"] + alpha / rank * b @ a
    want = {k: w.float() + 2.0 * (model.lora[k][1] @ model.lora[k][0]).detach() if k in model.lora else w
            for k, w in merged.items()}
    assert_updates_match(meta_weights(read_folder(folder)[0], source), want, merged, rtol=1e-5)


ARCH = {"gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3,
        "olmo2": gguf.MODEL_ARCH.OLMO2}


@pytest.mark.parametrize("family", DENSE)
def test_gguf_export_as_llama_cpp_names_and_reads_it(hf_folder, load, tmp_path, family):
    """Each family under llama.cpp's architecture name, its tensors under gguf-py's names for the Hugging Face
    ones, as llama.cpp's converter writes them: q/k rows as they are (NEOX), Gemma's norms as 1 + w, Phi-3's
    fused projections whole, no output for a tied model; its windows, caps and ropes as metadata."""
    folder = hf_folder(family, seed=86)
    config, t = read_folder(folder)
    model, notes = load(folder), []
    path = gguf_format.write_model(model, tmp_path / "out", "f32", log=notes.append)
    assert not any("sliding window" in note for note in notes)  # each of these reads its windows
    reader = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    tensors = {r.name: torch.from_numpy(r.data.copy()).reshape(tuple(reversed([int(n) for n in r.shape]))) for r in reader.tensors}
    arch = family_of(config)
    assert fields["general.architecture"] == arch
    table = gguf.get_tensor_name_map(ARCH[arch], config["num_hidden_layers"])
    names = {k: table.get_name(k, try_suffixes=(".weight", ".bias")) for k in t}
    extra = {"rope_factors_long.weight", "rope_factors_short.weight"} if family == "phi3-longrope" else set()
    assert set(tensors) == set(names.values()) | extra
    for key, want in t.items():
        if family.startswith("gemma") and key.endswith("norm.weight"):
            want = want + 1  # llama.cpp multiplies by the weight
        assert torch.equal(tensors[names[key]], want.float()), key
    assert ("output.weight" in tensors) == (family not in TIED)
    head_dim = head_dim_of(config)
    assert fields[f"{arch}.rope.dimension_count"] == int(head_dim * config.get("partial_rotary_factor", 1.0))
    if family == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == 5.0 and fields["gemma2.final_logit_softcapping"] == 3.0
        assert fields["gemma2.attention.sliding_window"] == 4 and fields["gemma2.attention.key_length"] == 16
    if family == "gemma3":
        assert fields["gemma3.rope.freq_base"] == 1e6 and fields["gemma3.rope.freq_base_swa"] == 1e4
        assert fields["gemma3.rope.scaling.type"] == "linear" and fields["gemma3.rope.scaling.factor"] == 8.0
        assert fields["gemma3.attention.sliding_window"] == 4
        assert fields["gemma3.attention.sliding_window_pattern"] == [True, True, False]  # not llama.cpp's 6
    if family == "phi3-longrope":
        scaling = config["rope_scaling"]
        assert tensors["rope_factors_long.weight"].tolist() == scaling["long_factor"]
        assert tensors["rope_factors_short.weight"].tolist() == pytest.approx(scaling["short_factor"])
        assert fields["phi3.rope.scaling.original_context_length"] == 8
        assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + __import__("math").log(4) /
                                                                          __import__("math").log(8)) ** 0.5)


@pytest.mark.parametrize("family", ["qwen2-window", "qwen3-window", "mistral-window"])
def test_gguf_of_an_architecture_without_windows_says_so(hf_folder, load, tmp_path, family):
    notes = []
    path = gguf_format.write_model(load(hf_folder(family)), tmp_path / "out", "f32", log=notes.append)
    fields = {f.name for f in gguf.GGUFReader(path).fields.values()}
    assert not any("sliding_window" in name for name in fields)
    assert any("architecture has no sliding window; the model's window of 4 positions is not in the file" in note
               for note in notes)


def test_gguf_adapter_of_fused_projections(hf_folder, load, tmp_path):
    """Phi-3's adapters of wq and wv as one adapter of attn_qkv: the base's GGUF with the adapter applied as
    llama.cpp applies it (W + alpha / rank B A, rank of the tensor) is the merged model's GGUF."""
    folder = hf_folder("phi3", seed=87)
    model = load(folder)
    _, base = read_gguf(gguf_format.write_model(model, tmp_path / "base", "f32", log=lambda *a: None))
    add_lora(model, lora(4, 8.0, 0.0, ["wq", "wv", "w2"]), seed=1)
    with torch.no_grad():
        for _, b in model.lora.values():
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    _, merged = read_gguf(gguf_format.write_model(model, tmp_path / "merged", "f32", log=lambda *a: None))
    fields, adapter = read_gguf(gguf_format.write_adapter(model, tmp_path / "adapter.gguf", 8.0, log=lambda *a: None))
    assert fields["general.architecture"] == "phi3"
    for name, w in base.items():
        if name + ".lora_a" in adapter:
            a, b = adapter[name + ".lora_a"], adapter[name + ".lora_b"]
            w = w + 8.0 / a.shape[0] * b @ a
        assert torch.allclose(w, merged[name], atol=1e-5), name
    assert adapter["blk.0.attn_qkv.weight.lora_a"].shape[0] == 8  # two parts of rank 4


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    return ({f.name: f.contents() for f in reader.fields.values()},
            {r.name: torch.from_numpy(r.data.copy()).reshape(tuple(reversed([int(n) for n in r.shape])))
             for r in reader.tensors})


# Gemma's chat format, written here: turns between <start_of_turn>ROLE and <end_of_turn>, the assistant's role
# "model", a system text before the first user turn
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def test_gemma_chat_learns_the_model_turns_and_their_end(hf_folder, hf_json, tmp_path):
    """A Gemma folder with its turn tokens, template and generation_config's stop ids (<eos>, <end_of_turn>):
    the loss counts the model's turns and the <end_of_turn> closing each, nothing of the user's."""
    from tokenizers import Tokenizer

    import finetune
    from data import encode_file
    from tokenizer import load_tokenizer
    raw = Tokenizer.from_str(hf_json[True])
    raw.add_special_tokens(["<start_of_turn>", "<end_of_turn>"])
    folder = hf_folder("gemma3", seed=88)
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").write_text(raw.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                                              "chat_template": GEMMA_TEMPLATE}))
    end = raw.token_to_id("<end_of_turn>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, end]}))
    tok = load_tokenizer(folder)
    assert end in tok.stop_ids
    line = json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "the garden"}]})
    (tmp_path / "chat.jsonl").write_text(line)
    tokens, targets, _ = encode_file(tmp_path / "chat.jsonl", finetune.settings().data, tok, folder)
    counted = [i for i, t in zip(tokens.tolist(), targets.tolist()) if t != -1]
    assert counted == raw.encode("the garden", add_special_tokens=False).ids + [end]


def test_a_gemma_run_resumes_exactly(hf_folder, tmp_path):
    """Full fine-tuning of Gemma 3 stopped after a commit and resumed ends as an uninterrupted run."""
    folder = hf_folder("gemma3", seed=89)
    args = [f"--model_path={folder}", f"--offload_path={tmp_path}/off", "--seq_len=16", "--batch_size=2",
            "--eval_period=0", "--save_period=2", "--dropout=0.1", "--out_format=hf", "--compute_dtype=float32"]
    assert run_main("finetune.py", *args, "--iters=4", f"--out_path={tmp_path}/whole")[0] == 0
    assert run_main("finetune.py", *args, "--iters=2", f"--out_path={tmp_path}/cut")[0] == 0
    code, _, err = run_main("finetune.py", *args, "--iters=4", f"--out_path={tmp_path}/cut", "--resume=1")
    assert code == 0, err
    whole = safetensors.torch.load_file(tmp_path / "whole" / "model.safetensors")
    cut = safetensors.torch.load_file(tmp_path / "cut" / "model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_meta_layout_is_refused_for_families_meta_never_published(hf_folder, tmp_path):
    refused("loader.py", hf_folder("olmo2"), tmp_path / "out", "--out_format", "meta", "--offload_path",
            tmp_path / "off", messages=["Meta's layout: olmo2 models were never published in it"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings,message", [
    (["--out_format=meta"], "Meta's layout: gemma2 models were never published in it"),
    (["--out_format=gguf", "--mode=lora", "--lora_targets=wq,output"], "llama.cpp's gemma2 always takes the embedding"),
])
def test_an_export_that_cannot_be_written_is_refused_before_training(hf_folder, tmp_path, settings, message):
    refused("finetune.py", f"--model_path={hf_folder('gemma2')}", f"--out_path={tmp_path}/out",
            f"--offload_path={tmp_path}/off", "--iters=2", "--seq_len=16", *settings, messages=[message])
    assert not (tmp_path / "out").exists()  # no step taken, nothing written


# --- transformers itself, where it is installed ---

@pytest.mark.parametrize("family", DENSE)
def test_one_training_step_equals_transformers(hf_folder, load, tmp_path, family):
    """The loss and one SGD step of every weight against transformers' own model and autograd."""
    transformers = pytest.importorskip("transformers")
    folder = hf_folder(family, seed=90)
    steps = make_batches(1, seed=90)
    (x, y), = steps[0]
    losses, got, _ = ours(load, folder, tmp_path, steps, "sgd", 0.1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert losses == pytest.approx([sgd_step(theirs, x, y, 0.1)], abs=1e-4)
    config, t = read_folder(folder)
    after = {k: v.detach() for k, v in theirs.state_dict().items() if k in t}
    want, initial = meta_weights(config, after), meta_weights(config, t)
    assert set(got) == set(want)
    assert_step_matches(got, want, initial, {k: torch.zeros(0, dtype=torch.int32) for k in want}, 0.1)
