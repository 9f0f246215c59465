"""Hugging Face's layout in and out, instruction data, PEFT adapters."""
import importlib.util
import json
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

import hf_format as hf
import loader
from conftest import run
from data import encode_instructions, get_batch
from tokenizer import Tokenizer
from reference import read_meta_folder
from test_training import make_batches, ours

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


def test_the_rotary_permutation_matches_its_definition():
    w = torch.randn(4 * 16, 10)
    assert torch.equal(hf.to_hf_rows(w, 4), hf_rows_by_definition(w, 4))
    assert torch.equal(hf.to_meta_rows(hf_rows_by_definition(w, 4), 4), w)


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


@pytest.mark.parametrize("files,bin_format", [(1, False), (2, False), (1, True), (3, True)])
def test_hugging_face_folders_load_to_the_same_model(make, load, tmp_path, files, bin_format):
    meta = make(seed=51)
    other = save_as_hf(meta, tmp_path / "hf", files, bin_format)
    tokens = torch.randint(0, 200, (2, 11))
    assert torch.equal(load(other)(tokens), load(meta)(tokens))


def test_hugging_face_folder_trains_identically(make, load, tmp_path):
    meta = make(seed=52)
    other = save_as_hf(meta, tmp_path / "hf")
    steps = make_batches(2)
    a = ours(load, meta, tmp_path / "run-meta", steps, "adamw", 1e-3, dropout=0.1)
    b = ours(load, other, tmp_path / "run-hf", steps, "adamw", 1e-3, dropout=0.1)
    assert a[0] == b[0]
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_exports_in_both_layouts_round_trip(make, load, tmp_path):
    meta = make(seed=53)
    source = save_as_hf(meta, tmp_path / "hf")
    loader.save_llama2(load(source), tmp_path / "again", log=lambda *a: None)  # the source's layout: hf
    want, got = safetensors.torch.load_file(source / "model.safetensors"), \
        safetensors.torch.load_file(tmp_path / "again" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    rc, _, err = run("loader.py", meta, tmp_path / "as_hf", "--out_format", "hf", "--offload_path", tmp_path / "off")
    assert rc == 0, err
    got = safetensors.torch.load_file(tmp_path / "as_hf" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    tokens = torch.randint(0, 200, (1, 9))
    assert torch.equal(load(tmp_path / "as_hf")(tokens), load(meta)(tokens))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_loads_the_export(make, load, tmp_path):
    from transformers import LlamaForCausalLM
    meta = make(seed=54, dtype=torch.float32)
    loader.save_llama2(load(meta), tmp_path / "as_hf", out_format="hf", log=lambda *a: None)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "as_hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 200, (2, 13))
    with torch.no_grad():
        assert torch.allclose(theirs(tokens).logits, load(meta)(tokens), atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_peft_loads_the_adapter(make, load, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    meta = make(seed=55, dtype=torch.float32)
    model = load(meta)
    model.add_lora(4, 8.0, 0.0, ["wq", "wk", "w2", "output"], seed=1)
    with torch.no_grad():
        for a, b in model.lora.values():
            b.normal_(0, 0.05)
    hf.write_peft(tmp_path / "peft", model, 4, 8.0, 0.0, ["wq", "wk", "w2", "output"])
    loader.save_llama2(load(meta), tmp_path / "as_hf", out_format="hf", log=lambda *a: None)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "as_hf", torch_dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    tokens = torch.randint(0, 200, (2, 13))
    with torch.no_grad():
        assert torch.allclose(theirs(tokens).logits, model.eval()(tokens), atol=1e-4)


def test_instruction_data_counts_only_response_tokens(make):
    tokenizer = Tokenizer(make() / "tokenizer.model")
    examples = [{"prompt": "What is kept?", "response": "The input of each block."},
                {"system": "Be brief.", "prompt": "And the random state?", "response": "It is saved too."}]
    text = "\n".join(json.dumps(e) for e in examples) + "\n\n"
    cfg = SimpleNamespace(prompt_template="[INST] {prompt} [/INST]", system_template="<<SYS>>\n{system}\n<</SYS>>\n\n")
    tokens, targets = encode_instructions(text, "data.jsonl", cfg, tokenizer)
    sp = tokenizer.sp
    responses = [sp.encode(e["response"]) + [sp.eos_id()] for e in examples]
    prompts = [[sp.bos_id()] + sp.encode("[INST] What is kept? [/INST]"),
               [sp.bos_id()] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nAnd the random state? [/INST]")]
    assert tokens.tolist() == prompts[0] + responses[0] + prompts[1] + responses[1]
    counted = targets[targets != -1].tolist()
    assert counted == responses[0] + responses[1]  # exactly the responses and their EOS, nothing of the prompts
    x, y = get_batch((tokens, targets), SimpleNamespace(seq_len=len(tokens) - 1, batch_size=1),
                              torch.Generator().manual_seed(0))
    assert torch.equal(x[0], tokens[:-1]) and torch.equal(y[0], targets[1:])


def test_finetune_on_the_bundled_instructions(tmp_path):
    rc, out, err = run("finetune.py", "--data_path=test_data/instructions.jsonl", f"--out_path={tmp_path}/out",
                       f"--offload_path={tmp_path}/off", "--iters=30", "--seq_len=48", "--eval_period=0",
                       "--out_format=hf")
    assert rc == 0, err
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "config.json").exists()


def test_bad_instruction_lines_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "no response"}\n')
    rc, _, err = run("finetune.py", f"--data_path={tmp_path}/bad.jsonl", f"--out_path={tmp_path}/out",
                     f"--offload_path={tmp_path}/off")
    assert rc != 0 and "line 2 needs messages, or the text fields prompt and response" in err and "Traceback" not in err
