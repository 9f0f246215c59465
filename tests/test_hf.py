"""Hugging Face's layout in and out, instruction data, PEFT adapters."""
import importlib.util
import json

import pytest
import safetensors.torch
import torch

import finetune
import hf_format as hf
import loader
from adapters import add_lora
from data import encode_file, get_batch
from families import hf_rows_by_definition, save_as_hf
from helpers import lora, make_batches, ours, refused, run
from tokenizer import Tokenizer

def test_the_rotary_permutation_matches_its_definition():
    w = torch.randn(4 * 16, 10)
    assert torch.equal(hf.to_hf_rows(w, 4), hf_rows_by_definition(w, 4))
    assert torch.equal(hf.to_meta_rows(hf_rows_by_definition(w, 4), 4), w)


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
    a = ours(load, meta, tmp_path / "meta", steps, "adamw", 1e-3, dropout=0.1)
    b = ours(load, other, tmp_path / "hf-run", steps, "adamw", 1e-3, dropout=0.1)
    assert a[0] == b[0]
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_exports_in_both_layouts_round_trip(make, load, tmp_path):
    meta = make(seed=53)
    source = save_as_hf(meta, tmp_path / "hf")
    loader.save_model(load(source), tmp_path / "again", log=lambda *a: None)  # the source's layout: hf
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
    loader.save_model(load(meta), tmp_path / "as_hf", out_format="hf", log=lambda *a: None)
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
    adapter = lora(4, 8.0, 0.0, ["wq", "wk", "w2", "output"])
    add_lora(model, adapter, seed=1)
    with torch.no_grad():
        for a, b in model.lora.values():
            b.normal_(0, 0.05)
    hf.write_peft(tmp_path / "peft", model, adapter)
    loader.save_model(load(meta), tmp_path / "as_hf", out_format="hf", log=lambda *a: None)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "as_hf", torch_dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    tokens = torch.randint(0, 200, (2, 13))
    with torch.no_grad():
        assert torch.allclose(theirs(tokens).logits, model.eval()(tokens), atol=1e-4)


def test_instruction_data_counts_only_response_tokens(make, tmp_path):
    tokenizer = Tokenizer(make() / "tokenizer.model")
    examples = [{"prompt": "What is kept?", "response": "The input of each block."},
                {"system": "Be brief.", "prompt": "And the random state?", "response": "It is saved too."}]
    text = "\n".join(json.dumps(e) for e in examples) + "\n\n"
    data = finetune.settings(prompt_template="[INST] {prompt} [/INST]").data  # and the default system_template
    (tmp_path / "data.jsonl").write_text(text)
    stream = encode_file(tmp_path / "data.jsonl", data, tokenizer, None)
    tokens, targets = stream.tokens, stream.targets
    sp = tokenizer.sp
    responses = [sp.encode(e["response"]) + [sp.eos_id()] for e in examples]
    prompts = [[sp.bos_id()] + sp.encode("[INST] What is kept? [/INST]"),
               [sp.bos_id()] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nAnd the random state? [/INST]")]
    assert tokens.tolist() == prompts[0] + responses[0] + prompts[1] + responses[1]
    counted = targets[targets != -1].tolist()
    assert counted == responses[0] + responses[1]  # exactly the responses and their EOS, nothing of the prompts
    x, y, _ = get_batch(stream, finetune.settings(seq_len=len(tokens) - 1, batch_size=1).data,
                     torch.Generator().manual_seed(0))
    assert torch.equal(x[0], tokens[:-1]) and torch.equal(y[0], targets[1:])


@pytest.mark.slow
def test_finetune_on_the_bundled_instructions(tmp_path):
    rc, out, err = run("finetune.py", "--data_path=test_data/instructions.jsonl", f"--out_path={tmp_path}/out",
                       f"--offload_path={tmp_path}/off", "--iters=30", "--seq_len=48", "--eval_period=0",
                       "--out_format=hf")
    assert rc == 0, err
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "config.json").exists()


def test_bad_instruction_lines_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "no response"}\n')
    refused("finetune.py", f"--data_path={tmp_path}/bad.jsonl", f"--out_path={tmp_path}/out", f"--offload_path={tmp_path}/off",
            messages=["line 2 does not fit the format of the first row (instructions (prompt, response))"])
    assert not (tmp_path / "out").exists()
