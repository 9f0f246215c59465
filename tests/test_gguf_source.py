"""A GGUF file as the source model (gguf_source.py) and a quantized frozen base (base_quant): a model exported
to GGUF and read back holds the file's values (gguf-py's reading of them) and computes as the model it came
from; block formats are read as gguf-py dequantizes them; the tokenizer rebuilt from the metadata tokenizes as
the model's own; Ollama's store, a folder and split files name the same model; a LoRA step over a quantized
base equals the same step over a model holding the dequantized values in fp32; quantizing the trained default
model costs little perplexity and LoRA loss; llama.cpp applies the adapter.gguf of a GGUF base as we do."""
import itertools
import json
import shutil

import gguf
import numpy as np
import pytest
import torch

import loader
import quant
from adapters import add_lora
from families import tokens_for
from helpers import TEXTS, lora, one_error_line, run_main, setup
from test_gguf import NODE_LLAMA_CPP, SP_TEXTS, assert_llama_cpp_agrees, export, read, values
from test_quant import random_blocks

KINDS = list(quant.BLOCKS)


def rewrite(src, dst, kind_of=None, split_max_tensors=0):
    """A copy of the GGUF at src (every key and tensor; kind_of(index, tensor) -> a block format: that matrix as
    random blocks of it instead) written to dst, in files of split_max_tensors tensors where given."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents(), split_max_tensors=split_max_tensors)
    if kind_of:
        writer.add_file_type(15)  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M: a mixture of block formats
    for key, f in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture" and not (kind_of and key == "general.file_type"):
            vtype = f.types[0]
            writer.add_key_value(key, f.contents(), vtype, f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for i, t in enumerate(reader.tensors):
        kind = kind_of(i, t) if kind_of and len(t.shape) == 2 else None
        if kind is None:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        else:
            rows, cols = int(t.shape[1]), int(t.shape[0])
            writer.add_tensor(t.name, random_blocks(kind, rows, cols // quant.BLOCKS[kind][0], seed=i),
                              raw_dtype=getattr(gguf.GGMLQuantizationType, kind.upper()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def assert_holds_the_file(model, path):
    """Every module's weights are the file's values (gguf-py's dequantization; llama's rows as they are)."""
    import gguf_format
    _, tensors = read(path)
    for name in model.boxes:
        for key, w in model.read_weights(name).items():
            want = values(tensors[gguf_format.gguf_key(f"{name}.{key}", model.args)])
            assert torch.equal(w.float(), want), f"{name}.{key}"


def logits(model, seed=0):
    return model(tokens_for(seed, 2, 12) % model.args.vocab_size)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_an_exported_gguf_reads_back(make, load, tmp_path, gguf_type):
    model = load(make())
    path = export(model, tmp_path / "out", gguf_type)
    back = load(path)
    assert back.manifest["layout"] == "gguf" and back.manifest["gguf_type"] == gguf_type
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "head_dim", "norm_eps", "rope_theta",
                  "vocab_size", "tied", "qkv_bias", "qk_norm"):
        assert getattr(back.args, field) == getattr(model.args, field), field
    assert_holds_the_file(back, path)
    if gguf_type == "f32":  # the same values: the same logits
        assert torch.equal(logits(back), logits(model))
    if gguf_type == "q8_0":  # kept as blocks: the same values as dequantized at conversion
        source = load(path, base_quant="source")
        assert {b.name: set(b.quant.values()) for b in source.boxes.values() if b.quant} == \
            {name: {"q8_0"} for name in model.boxes if name != "norm"}
        assert not any(b.quant for b in back.boxes.values())
        assert torch.equal(logits(source), logits(back))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "smollm2"])
def test_hugging_face_rows_turn_back_into_ours(hf_folder, load, tmp_path, family):
    model = load(hf_folder(family, seed=3))
    path = export(model, tmp_path / "out", "f32")
    back = load(path)
    assert (back.args.qkv_bias, back.args.qk_norm, back.args.tied) == (model.args.qkv_bias, model.args.qk_norm,
                                                                       model.args.tied)
    assert torch.equal(logits(back), logits(model))


def test_block_formats_of_every_kind(make, load, tmp_path):
    """A llama GGUF whose matrices are random blocks of every format (rows of 256 values: k-quants too)."""
    model = load(make(dim=256, multiple_of=256))
    cycle = itertools.cycle(KINDS)
    path = rewrite(export(model, tmp_path / "out", "f32"), tmp_path / "k.gguf", lambda i, t: next(cycle))
    source, dequantized = load(path, base_quant="source"), load(path)
    kinds = {k for b in source.boxes.values() for k in b.quant.values()}
    assert kinds == set(KINDS)
    assert source.manifest["gguf_type"] is None and "q4_k" in dict(source.manifest["keys"]).values()
    assert_holds_the_file(source, path)
    assert_holds_the_file(dequantized, path)
    assert torch.equal(logits(source), logits(dequantized))
    bf16 = load(path, base_quant="source", compute_dtype="bfloat16")  # dequantized into bf16: fp32's values rounded
    w = bf16.layers[0].load().weights["attention.wq.weight"]
    assert w.dtype == torch.bfloat16 and torch.equal(w, dequantized.read_weights("layers.0")["attention.wq.weight"]
                                                     .to(torch.bfloat16))
    bf16.layers[0].release()


@pytest.fixture
def json_model(hf_folder, hf_json):
    from test_gguf import json_model
    return json_model.__wrapped__(hf_folder, hf_json)


@pytest.fixture
def tiktoken_model(make, ranks):
    import base64
    folder = make(vocab_size=len(ranks) + 256)
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return folder


@pytest.mark.parametrize("source", ["json_model", "tiktoken_model"])
def test_byte_level_bpe_from_the_metadata(request, load, tmp_path, source):
    """gpt2-type vocabularies: GPT-2's pre-tokenizer (json_model) and Llama 3's (llama-bpe, from Meta's file)."""
    model = load(request.getfixturevalue(source))
    back = load(export(model, tmp_path / "out", "f32"))
    assert back.tokenizer.kind == "tokenizers"
    assert (back.tokenizer.bos_id, back.tokenizer.eos_id) == (model.tokenizer.bos_id, model.tokenizer.eos_id)
    for text in TEXTS:
        assert back.tokenizer.encode(text) == model.tokenizer.encode(text), text
        assert back.tokenizer.decode(back.tokenizer.encode(text)) == model.tokenizer.decode(model.tokenizer.encode(text))
        assert back.tokenizer.encode(text, allow_special=True) == model.tokenizer.encode(text, allow_special=True)
    assert back.tokenizer.stop_ids == model.tokenizer.stop_ids
    config = json.loads((back.offload_dir / "tokenizer_config.json").read_text())
    if source == "json_model":
        assert config["chat_template"] == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    else:
        special = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        assert back.tokenizer.encode(special, allow_special=True) == model.tokenizer.encode(special, allow_special=True)


def test_sentencepiece_from_the_metadata(load, tmp_path, byte_fallback_tokenizer):
    """llama.cpp's sentencepiece-style tokenizer: pieces merged by score, byte pieces for what the vocabulary
    lacks, no normalisation (texts here are the same under the model's own NFKC)."""
    import default_model
    from helpers import TINY
    folder = default_model.make_model(tmp_path / "meta", {**TINY, "vocab_size": -1}, byte_fallback_tokenizer, 1, 5)
    model = load(folder)
    back = load(export(model, tmp_path / "out", "f32"))
    assert back.tokenizer.kind == "sentencepiece"
    for text in SP_TEXTS + ["中文 and 🙂 are bytes here", "x"]:
        assert back.tokenizer.encode(text) == model.tokenizer.encode(text), text
        assert back.tokenizer.decode(back.tokenizer.encode(text)) == text
    assert (back.tokenizer.bos_id, back.tokenizer.eos_id, back.tokenizer.stop_ids) == \
        (model.tokenizer.bos_id, model.tokenizer.eos_id, model.tokenizer.stop_ids)


def test_ollama_store_folder_and_split_files_name_the_same_model(make, load, tmp_path, monkeypatch):
    path = export(load(make()), tmp_path / "out", "q8_0")
    want = logits(load(path))
    store = tmp_path / "ollama"
    digest = "sha256:" + "ab" * 32
    (store / "blobs").mkdir(parents=True)
    shutil.copyfile(path, store / "blobs" / digest.replace(":", "-"))
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny"
    manifest.mkdir(parents=True)
    (manifest / "3b").write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert torch.equal(logits(load("ollama:tiny:3b")), want)
    with pytest.raises(loader.UserError, match="ollama:tiny: Ollama has no such model"):
        load("ollama:tiny")
    assert torch.equal(logits(load(tmp_path / "out")), want)  # the folder holding it
    (tmp_path / "split").mkdir()
    rewrite(path, tmp_path / "split" / "tiny.gguf", split_max_tensors=7)
    parts = sorted((tmp_path / "split").glob("*.gguf"))
    n = len(parts)
    assert n >= 3 and [p.name for p in parts] == [f"tiny-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert torch.equal(logits(load(parts[0])), want)
    assert torch.equal(logits(load(tmp_path / "split")), want)
    parts[1].unlink()
    with pytest.raises(loader.UserError, match=f"tiny-00002-of-{n:05d}.gguf is missing"):
        load(parts[0])


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_at_conversion_as_ggml_writes_it(make, load, tmp_path, kind):
    folder = make(dtype=torch.float32)
    plain, quantized = load(folder), load(folder, base_quant=kind)
    assert quantized.offload_dir != plain.offload_dir
    for name, box in plain.boxes.items():
        for key, w in plain.read_weights(name).items():
            stored = quantized.boxes[name].quant.get(key)
            if w.dim() == 2 and w.shape[1] % 32 == 0:
                assert stored == kind, f"{name}.{key}"
                blocks = gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, kind.upper()))
                want = torch.from_numpy(gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType,
                                                                                   kind.upper())))
                assert torch.equal(quantized.read_weights(name)[key], want.reshape(w.shape)), f"{name}.{key}"
            else:
                assert stored is None and torch.equal(quantized.read_weights(name)[key], w), f"{name}.{key}"
    assert quantized.memory.peak > 0 and quantized.layers[0].memory_bytes() == \
        plain.layers[0].numel() * 4 + sum(quant.stored_bytes(quantized.layers[0].shapes[k], q)
                                          for k, q in quantized.layers[0].quant.items())


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_a_lora_step_over_a_quantized_base_is_the_step_over_its_values(make, load, tmp_path, kind):
    """The base quantized, against a Meta folder of its dequantized values in fp32 (loader.save_model of the
    quantized model writes them), each read past or through the page cache: the same adapters after two steps."""
    folder = make(dtype=torch.float32)
    quantized = load(folder, base_quant=kind)
    loader.save_model(quantized, tmp_path / "values", dtype="float32", log=lambda *a: None)
    trained = []
    for model in (quantized, load(tmp_path / "values")):
        add_lora(model, lora(4, 8.0, 0.0, ("wq", "wv", "w2", "output")), seed=1)
        setup(model, tmp_path / f"run{len(trained)}", mode="lora", tokens=24)
        model.train()
        for step in range(2):
            x = tokens_for(step, 2, 12) % model.args.vocab_size
            model.train_step([(x[:, :-1], x[:, 1:])], 1e-2)
        trained.append({k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in model.lora.items()})
    for key, (a, b) in trained[0].items():
        assert torch.equal(a, trained[1][key][0]) and torch.equal(b, trained[1][key][1]), key


def test_bad_input_is_one_line(make, load, hf_folder, tmp_path):
    folder = make()
    code, _, err = run_main("finetune.py", f"--model_path={folder}", "--mode=lora", "--base_quant=source",
                            f"--out_path={tmp_path / 'o1'}", f"--offload_path={tmp_path / 'off'}")
    one_error_line(code, err, "base_quant=source", "is not a GGUF file")
    code, _, err = run_main("finetune.py", f"--model_path={folder}", "--base_quant=q4_0", f"--out_path={tmp_path / 'o2'}")
    one_error_line(code, err, "--base_quant=q4_0 is for --mode=lora")
    code, _, err = run_main("finetune.py", f"--model_path={folder}", "--mode=lora", "--base_quant=q3",
                            f"--out_path={tmp_path / 'o3'}")
    one_error_line(code, err, "--base_quant=q3: use one of none, source, q8_0, q4_0")
    gemma = export(load(hf_folder("gemma2")), tmp_path / "gemma", "f32")
    code, _, err = run_main("finetune.py", f"--model_path={gemma}", f"--out_path={tmp_path / 'o4'}",
                            f"--offload_path={tmp_path / 'off'}")
    one_error_line(code, err, "architecture 'gemma2'")
    assert not (tmp_path / "off").exists() or not any((tmp_path / "off").glob("model.gguf-*"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 20)
    code, _, err = run_main("finetune.py", f"--model_path={broken}", f"--out_path={tmp_path / 'o5'}")
    one_error_line(code, err, "broken.gguf: not a GGUF file")


def test_finetune_trains_a_gguf_and_writes_its_adapter(make, load, tmp_path):
    path = export(load(make()), tmp_path / "base", "q8_0")
    out = tmp_path / "run"
    code, _, err = run_main("finetune.py", f"--model_path={path}", "--mode=lora", "--base_quant=source", "--iters=3",
                            "--eval_period=0", "--batch_size=2", "--seq_len=16", f"--out_path={out}",
                            f"--offload_path={tmp_path / 'off'}", "--lora_targets=wq,wv,w2")
    assert code == 0, err
    fields, tensors = read(out / "model.gguf")
    assert fields["general.file_type"] == 7 and tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    adapter, _ = read(out / "adapter.gguf")
    assert adapter["general.type"] == "adapter"
    assert f"llama-cli -m {path} --lora {out / 'adapter.gguf'}" in (out / "report.md").read_text()


@pytest.mark.skipif(not NODE_LLAMA_CPP, reason="SLOWLLAMA_NODE_LLAMA_CPP: a folder where `npm install "
                    "node-llama-cpp` was run (llama.cpp's own code, prebuilt)")
@pytest.mark.parametrize("family", ["meta", "qwen2"])
def test_llama_cpp_applies_the_adapter_to_the_gguf_it_was_trained_on(load, hf_folder, tmp_path,
                                                                     byte_fallback_tokenizer, family):
    import default_model
    from helpers import TINY
    if family == "meta":
        folder = default_model.make_model(tmp_path / "meta", {**TINY, "vocab_size": -1}, byte_fallback_tokenizer, 1, 5)
    else:
        folder = hf_folder("qwen2", seed=13, vocab_size=512)
        (folder / "tokenizer.model").write_bytes(byte_fallback_tokenizer)
    path = export(load(folder), tmp_path / "base", "f32")
    model = load(path)  # read from the GGUF: the adapter is for that file
    assert_llama_cpp_agrees(tmp_path, model, path, SP_TEXTS, ["wq", "wk", "wv", "w2"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The built-in model after 80 steps on slowllama.txt, a tenth of it held out."""
    tmp = tmp_path_factory.mktemp("trained")
    code, _, err = run_main("finetune.py", "--iters=80", "--val_fraction=0.1", "--eval_period=0", "--compute_dtype=float32",
                            f"--out_path={tmp / 'out'}", f"--offload_path={tmp / 'offload'}")
    assert code == 0, err
    return tmp / "out"


def test_quantizing_a_trained_model_costs_little(trained, tmp_path):
    """The trained built-in model quantized: perplexity on the held-out tenth of its text within 1% (q8_0) and 5%
    (q4_0) of the unquantized model's; a LoRA run over each base ends with a training loss within 2% and 5% of the
    same run over the unquantized one (fp32 arithmetic everywhere)."""
    import default_model
    from helpers import load_model, records
    out = trained
    perplexity, loss = {}, {}
    for kind in ("none", "q8_0", "q4_0"):
        model = load_model(out, tmp_path, base_quant=kind)
        ids = model.tokenizer.encode(default_model.DEFAULT_TEXT.read_text())
        held_out = torch.tensor(ids[-len(ids) // 10:])
        n = len(held_out) // 65
        rows = held_out[:n * 65].reshape(n, 65)
        perplexity[kind] = float(torch.exp(-model(rows[:, :-1], rows[:, 1:]).mean()))
        model.close()
        code, _, err = run_main("finetune.py", f"--model_path={out}", "--mode=lora", f"--base_quant={kind}",
                                "--iters=12", "--eval_period=0", "--compute_dtype=float32", "--lr=1e-2",
                                "--lora_targets=wq,wv,w2,output",
                                f"--out_path={tmp_path / kind}", f"--offload_path={tmp_path / 'offload'}")
        assert code == 0, err
        loss[kind] = records(tmp_path / kind, "train")[-1]["loss"]
    assert perplexity["none"] < 0.3 * 512 and loss["none"] < records(tmp_path / "none", "train")[0]["loss"]  # learned
    assert abs(perplexity["q8_0"] / perplexity["none"] - 1) < 0.01, perplexity
    assert abs(perplexity["q4_0"] / perplexity["none"] - 1) < 0.05, perplexity
    assert abs(loss["q8_0"] / loss["none"] - 1) < 0.02, loss
    assert abs(loss["q4_0"] / loss["none"] - 1) < 0.05, loss
    assert perplexity["q4_0"] != perplexity["none"], perplexity  # (the quantized bases are read, not the plain one)
    print(f"perplexity {perplexity}, final LoRA loss {loss}")


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_the_plan_counts_the_blocks(tmp_path, kind):
    """--plan=1 of LoRA over the built-in model quantized, streaming every module, before the conversion and
    after it: a step reads each matrix as its blocks (q8_0: 34 bytes, q4_0: 18 bytes a block of 32 values), the
    norms in the source's bf16, every module once forward and all blocks but the last again backward."""
    from test_report import check_plan, plan
    block = 2 * 128 * 128 + 2 * 32 * 128 + 3 * 448 * 128  # the built-in model's (test_report)
    per_value = {"q8_0": 34 / 32, "q4_0": 18 / 32}[kind]
    forward = (2 * 512 * 128 + 4 * block) * per_value + 4 * 2 * 128 * 2
    backward = 3 * (block * per_value + 2 * 128 * 2)
    settings = ("--mode=lora", f"--base_quant={kind}", "--memory_budget=0", "--iters=10", "--eval_period=0",
                "--compute_dtype=float32")
    before, stdout = plan(tmp_path, *settings)
    check_plan(before, stdout)
    assert not before["converted"] and before["base_copy_bytes"] == 0 and "dequantized at every read" in stdout
    assert (before["forward_read_bytes"], before["backward_read_bytes"]) == (forward, backward)
    load_model_dir = tmp_path / "plan-offload"
    loader.load_model(None, offload_path=load_model_dir, base_quant=kind, log=lambda *a: None).close()
    after, _ = plan(tmp_path, *settings, offload=load_model_dir)
    assert after["converted"] and (after["forward_read_bytes"], after["backward_read_bytes"]) == (forward, backward)


def test_damaged_gguf_and_ollama_store_are_one_line(make, load, tmp_path, monkeypatch):
    """A file without a tensor, one without its settings, a tensor of a type not read here, a broken manifest."""
    path = export(load(make()), tmp_path / "out", "f32")
    reader = gguf.GGUFReader(path)
    for name, change in (("no-tensor", "drop"), ("no-settings", "meta"), ("iq-type", "type")):
        writer = gguf.GGUFWriter(tmp_path / f"{name}.gguf", "llama")
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or change == "meta" and \
                    key == "llama.embedding_length":
                continue
            vtype = f.types[0]
            writer.add_key_value(key, f.contents(), vtype, f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
        for t in reader.tensors:
            if change == "drop" and t.name == "blk.1.ffn_down.weight":
                continue
            if change == "type" and t.name == "blk.0.attn_q.weight":  # IQ4_NL: blocks of 32 in 18 bytes
                writer.add_tensor(t.name, np.zeros((int(t.shape[1]), int(t.shape[0]) // 32 * 18), np.uint8),
                                  raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
                continue
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    for name, message in (("no-tensor", "tensor blk.1.ffn_down.weight (layers.1.feed_forward.w2.weight) is missing"),
                          ("no-settings", "its metadata lacks llama.embedding_length"),
                          ("iq-type", "tensor blk.0.attn_q.weight is of type IQ4_NL")):
        code, _, err = run_main("finetune.py", f"--model_path={tmp_path / name}.gguf", f"--out_path={tmp_path / 'o'}",
                                f"--offload_path={tmp_path / 'off'}", "--mode=lora", "--base_quant=source")
        one_error_line(code, err, f"{name}.gguf", message)
    store = tmp_path / "ollama"
    (store / "manifests" / "registry.ollama.ai" / "library" / "tiny").mkdir(parents=True)
    (store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest").write_text('{"layers": [{"x": 1}]}')
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    code, _, err = run_main("finetune.py", "--model_path=ollama:tiny", f"--out_path={tmp_path / 'o'}")
    one_error_line(code, err, "latest: not an Ollama manifest naming a model layer")
