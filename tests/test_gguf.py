"""GGUF export (gguf_format.py): every export read back with gguf-py's GGUFReader and held to the source
weights, named and laid out as llama.cpp's own tables (gguf-py's tensor name map, Meta's interleaved
rows for llama, Hugging Face's half-split rows for qwen2/qwen3), its tokenizer rebuilt from the file and
held to slowllama's; LoRA adapters held to the merged model; bad input refused with nothing written.
Where transformers is installed, it loads the file and generates as slowllama does."""
import json
import math
import os
import subprocess

import gguf
import numpy as np
import pytest
import torch

import chat
import gguf_format
import gguf_types
import loader
import tokenizer
from adapters import add_lora
from families import config_of, meta_rows_by_definition, read_folder, rope_formulas
from helpers import TEXTS, lora, refused, run_main, tokenizer_folder
from reference import read_meta_folder
from utils import UserError

Q = gguf.GGMLQuantizationType
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
SP_TEXTS = ["The basic problem is one of size.", "slowllama fine-tunes models on disk, one module at a time!"]


def export(model, out, gguf_type="f16", logs=None):
    loader.save_model(model, out, out_format="gguf", gguf_type=gguf_type,
                       log=(logs.append if logs is not None else lambda *a: None))
    return out / "model.gguf"


def read(path):
    """({key: value}, {name: ReaderTensor}) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def values(t):
    """A tensor of the file dequantized to float32, in torch's shape (the reverse of ggml's)."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(tuple(int(n) for n in reversed(t.shape)))


def shape_of(t):
    return tuple(int(n) for n in reversed(t.shape))


def gguf_names(sources, arch, n_layers):
    """{source name: GGUF name} by gguf-py's own table (llama.cpp's names for Meta's and Hugging Face's keys)."""
    table = gguf.get_tensor_name_map(ARCHS[arch], n_layers)
    return {k: table.get_name(k, try_suffixes=(".weight", ".bias")) for k in sources}


def assert_encoded(got, want, ggml_type, name):
    """got (from the file) against the source want: f32 exact, f16/bf16 exactly their rounding, q8_0 the
    bytes of gguf's (ggml's) quantizer and within half a step of each block's scale."""
    want = want.float()
    if ggml_type == Q.F32:
        assert torch.equal(got, want), name
    elif ggml_type in (Q.F16, Q.BF16):
        assert torch.equal(got, want.to(torch.float16 if ggml_type == Q.F16 else torch.bfloat16).float()), name
    else:
        blocks = want.reshape(-1, 32)
        step = blocks.abs().amax(1, keepdim=True) / 127
        err = (got.reshape(-1, 32) - blocks).abs()
        assert bool((err <= step * 0.57 + 1e-12).all()), name  # half a step, and the scale's f16 rounding
        assert err.max() > 0, name


def check_weights(tensors, sources, arch, n_layers, gguf_type, skip=()):
    """Every source tensor is in the file under llama.cpp's name, shape and type; the file has nothing else
    (but skip)."""
    names = gguf_names(sources, arch, n_layers)
    assert set(tensors) - set(skip) == set(names.values())
    for key, want in sources.items():
        t = tensors[names[key]]
        assert shape_of(t) == tuple(want.shape), key
        expected = Q.F32 if want.dim() == 1 else gguf_type
        if gguf_type == Q.Q8_0 and want.dim() == 2 and want.shape[1] % 32:
            expected = Q.F16
        assert t.tensor_type == expected, key
        assert_encoded(values(t), want, t.tensor_type, key)
        if t.tensor_type == Q.Q8_0:
            assert np.array_equal(np.asarray(t.data).reshape(-1),
                                  gguf.quants.quantize(want.float().numpy(), Q.Q8_0).reshape(-1)), key


def hf_sources(folder, arch):
    """A Hugging Face folder's tensors as GGUF holds them: q/k rows in Meta's order for llama (its rotary
    layout), as they are (half-split, NEOX) for qwen2/qwen3."""
    config, t = read_folder(folder)
    if arch != "llama":
        return t
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    return {k: meta_rows_by_definition(w, heads[k.split(".")[-2]]) if k.split(".")[-2] in heads else w
            for k, w in t.items()}


def hf_tokenizer_of(fields, pre):
    """A tokenizers.Tokenizer rebuilt from a gpt2-type GGUF vocabulary: its tokens, merges and pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (1, 3)}
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pre), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


# --- a model in Meta's layout with a sentencepiece tokenizer ---

@pytest.mark.parametrize("gguf_type", gguf_types.TYPES)
def test_sentencepiece_model_in_every_type(make, load, tmp_path, gguf_type):
    folder = make()
    model = load(folder)
    fields, tensors = read(export(model, tmp_path / "out", gguf_type))
    weights, params = read_meta_folder(folder)
    weights.pop("rope.freqs")  # llama.cpp computes the frequencies from rope.freq_base
    check_weights(tensors, weights, "llama", params["n_layers"], getattr(Q, gguf_type.upper()))
    hidden = weights["layers.0.feed_forward.w1.weight"].shape[0]
    assert {k: v for k, v in fields.items() if not k.startswith("tokenizer.")} == pytest.approx({
        "general.architecture": "llama", "general.type": "model", "general.name": "llama",
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[gguf_type], "general.quantization_version": 2,
        "llama.context_length": 4096, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": hidden, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0, "llama.vocab_size": 256})
    sp = model.tokenizer.sp
    n = sp.vocab_size()
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(n)])
    assert fields["tokenizer.ggml.token_type"] == [2, 3, 3] + [1] * (n - 3)  # unknown, control (<s>, </s>), normal
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.ggml.merges" not in fields and "tokenizer.chat_template" not in fields
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "model.gguf"]


def test_q8_0_falls_back_to_f16_for_rows_of_partial_blocks(make, load, tmp_path):
    folder = make(ffn_dim_multiplier=None)  # hidden 176: w2's rows are 5.5 blocks
    logs = []
    fields, tensors = read(export(load(folder), tmp_path / "out", "q8_0", logs))
    weights, params = read_meta_folder(folder)
    weights.pop("rope.freqs")
    check_weights(tensors, weights, "llama", params["n_layers"], Q.Q8_0)
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16 and tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0
    assert "blk.1.ffn_down.weight: rows of 176 values are not whole q8_0 blocks of 32; written as f16" in logs
    assert any(line.startswith("note: tokenizer.model has no byte pieces") for line in logs)


def test_user_defined_and_padded_sentencepiece_pieces(make, load, tmp_path):
    import default_model
    folder = make(vocab_size=300)
    (folder / "tokenizer.model").write_bytes(default_model.train_tokenizer(default_model.DEFAULT_TEXT, 260, 3))
    model = load(folder)
    fields, _ = read(export(model, tmp_path / "out", "f16"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 300 and tokens[3:6] == ["<unused0>", "<unused1>", "<unused2>"] and types[3:6] == [4] * 3
    assert tokens[260:] == [f"[PAD{i}]" for i in range(260, 300)] and types[260:] == [5] * 40
    assert fields["tokenizer.ggml.scores"][260:] == [-10000.0] * 40


def test_f16_clamps_values_beyond_its_range():
    logs = []
    out = gguf_types.encode(torch.tensor([[1e6, -7e4, 1.5]]), Q.F16, "blk.0.ffn_down.weight", logs.append)
    assert out.tolist() == [[65504.0, -65504.0, 1.5]] and len(logs) == 1
    assert logs[0].startswith("blk.0.ffn_down.weight: values beyond f16's range")


# --- Hugging Face folders: tokenizer.json, tied embeddings, Qwen 2 and 3, rope scaling ---

@pytest.fixture
def json_model(hf_folder, hf_json):
    """A Hugging Face Llama folder with a byte-level BPE tokenizer.json (300 tokens, 320 embedding rows)."""
    folder = hf_folder("smollm2", seed=11, name="json", vocab_size=320, tie_word_embeddings=False)
    (folder / "tokenizer.model").unlink()
    tokenizer_folder(folder, hf_json, True, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                              "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
                     generation={"eos_token_id": [1, 2]})
    return folder


def test_tokenizer_json_model(json_model, load, tmp_path):
    model = load(json_model)
    fields, tensors = read(export(model, tmp_path / "out", "bf16"))
    check_weights(tensors, hf_sources(json_model, "llama"), "llama", 2, Q.BF16)
    spec = json.loads((json_model / "tokenizer.json").read_text())
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    vocab = model.tokenizer.tok.get_vocab(with_added_tokens=True)
    assert len(tokens) == 320 and tokens[:300] == sorted(vocab, key=vocab.get)
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)] and types[300:] == [5] * 20
    assert types[:3] == [3, 3, 3] and set(types[3:300]) == {1}
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert fields["tokenizer.ggml.add_bos_token"] is True and "tokenizer.ggml.scores" not in fields
    assert fields["tokenizer.chat_template"] == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    rebuilt = hf_tokenizer_of(fields, "gpt-2")
    for text in TEXTS:
        assert rebuilt.encode(text).ids == model.tokenizer.encode(text, bos=False), text


def test_sentencepiece_style_tokenizer_json_goes_out_from_tokenizer_model(make, load, tmp_path):
    """Llama 2's, TinyLlama's, Mistral's Hugging Face folders: a tokenizer.json with sentencepiece's pieces
    (not byte-level) beside the sentencepiece tokenizer.model, which GGUF's "llama" tokenizer describes,
    with tokenizer.json's added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    folder = make(n_shards=1, vocab_size=258)
    sp = load(folder).tokenizer.sp
    tok = Tokenizer(models.BPE(vocab={sp.id_to_piece(i): i for i in range(sp.vocab_size())}, merges=[],
                               unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>", "<|im_end|>")])
    tok.add_tokens([AddedToken("<extra>", special=False)])  # ids 256 and 257, after sentencepiece's pieces
    tok.save(str(folder / "tokenizer.json"))
    model = load(folder)
    assert model.tokenizer.kind == "tokenizers"
    fields, _ = read(export(model, tmp_path / "out", "f16"))
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("llama", "default")
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(256)] + ["<|im_end|>", "<extra>"]
    assert fields["tokenizer.ggml.token_type"] == [2, 3, 3] + [1] * 253 + [3, 4]
    assert len(fields["tokenizer.ggml.scores"]) == 258
    (folder / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="a BPE tokenizer that is not byte-level; GGUF export reads such a vocabulary "
                                        "from its sentencepiece tokenizer.model, which this model folder lacks"):
        export(load(folder), tmp_path / "out2", "f16")
    assert not (tmp_path / "out2").exists()


def test_tied_model_has_no_output_tensor(hf_folder, load, tmp_path):
    folder = hf_folder("smollm2")
    fields, tensors = read(export(load(folder), tmp_path / "out", "f32"))
    assert "output.weight" not in tensors
    check_weights(tensors, hf_sources(folder, "llama"), "llama", 2, Q.F32)
    assert fields["general.architecture"] == "llama" and fields["llama.rope.freq_base"] == 100000.0


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "yarn"])
def test_qwen_keeps_hugging_face_rows(hf_folder, load, tmp_path, family):
    folder = hf_folder(family, seed=3)
    arch = "qwen3" if family == "qwen3" else "qwen2"
    fields, tensors = read(export(load(folder), tmp_path / "out", "f32"))
    check_weights(tensors, hf_sources(folder, arch), arch, 2, Q.F32)
    assert fields["general.architecture"] == arch and fields[f"{arch}.rope.freq_base"] == 1e6
    assert len(fields["tokenizer.ggml.tokens"]) == fields[f"{arch}.vocab_size"] == 320
    head_dim = 32 if family == "qwen3" else 16
    assert fields[f"{arch}.rope.dimension_count"] == head_dim
    assert fields.get(f"{arch}.attention.key_length") == fields.get(f"{arch}.attention.value_length") == \
        (32 if family == "qwen3" else None)
    scaling = {k.split(".", 3)[-1]: v for k, v in fields.items() if ".rope.scaling." in k}
    assert scaling == ({"type": "yarn", "factor": 4.0, "original_context_length": 8} if family == "yarn" else {})


def test_llama3_rope_scaling_as_rope_freqs(hf_folder, load, tmp_path):
    folder = hf_folder("llama3")
    config = config_of("llama3")
    fields, tensors = read(export(load(folder), tmp_path / "out", "q8_0"))
    check_weights(tensors, hf_sources(folder, "llama"), "llama", 2, Q.Q8_0, skip={"rope_freqs.weight"})
    base, _ = rope_formulas(config["rope_theta"], 16, {}, None)
    scaled, _ = rope_formulas(config["rope_theta"], 16, config["rope_scaling"], None)
    factors = values(tensors["rope_freqs.weight"])
    assert tensors["rope_freqs.weight"].tensor_type == Q.F32 and factors.shape == (8,)
    assert factors.tolist() == pytest.approx([b / s for b, s in zip(base, scaled)], rel=1e-6)
    assert factors[0] == 1 and factors[-1] == 32 and 1 < factors[1] < 32  # kept, blended, slowed: all three
    assert not [k for k in fields if ".rope.scaling." in k]


def test_tiktoken_model(make, load, tmp_path, ranks):
    n = len(ranks)
    folder = make(vocab_size=n + 256)
    import base64
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    model = load(folder)
    fields, _ = read(export(model, tmp_path / "out", "f16"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    assert len(tokens) == n + 256 and types == [1] * n + [3] * 256
    assert tokens[n:n + 3] == ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
    assert len(fields["tokenizer.ggml.merges"]) == n - 256
    assert [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "eom", "eot")] == [n, n + 1, n + 8, n + 9]
    rebuilt = hf_tokenizer_of(fields, tokenizer.LLAMA3_PATTERN)
    for text in TEXTS:
        assert rebuilt.encode(text).ids == model.tokenizer.encode(text, bos=False), text
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}]
    template = chat.compile_template(fields["tokenizer.chat_template"])
    assert template.render(messages=messages, add_generation_prompt=True) == chat.meta_llama3(messages, True)


def test_transformers_tokenizes_tiktoken_as_slowllama(make, load, tmp_path, ranks):
    transformers = pytest.importorskip("transformers")
    n = len(ranks)
    folder = make(vocab_size=n + 256)
    import base64
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    model = load(folder)
    export(model, tmp_path / "out", "f16")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == model.tokenizer.encode(text), text


# --- LoRA adapters ---

@pytest.mark.parametrize("family", ["meta", "qwen2"])
def test_lora_adapter_applies_to_the_base_gguf(make, hf_folder, load, tmp_path, family):
    model = load(make() if family == "meta" else hf_folder("qwen2", seed=5))
    arch = "llama" if family == "meta" else "qwen2"
    _, base = read(export(model, tmp_path / "base", "f32"))
    add_lora(model, lora(4, 8.0, 0.0, ["wq", "wk", "w2", "output"]), seed=1)
    with torch.no_grad():
        for _, b in model.lora.values():
            b.normal_(generator=torch.Generator().manual_seed(2))
    _, merged = read(export(model, tmp_path / "merged", "f32"))
    path = gguf_format.write_adapter(model, tmp_path / "adapter.gguf", 8.0, log=lambda *a: None)
    fields, tensors = read(path)
    assert {k: v for k, v in fields.items() if not k.startswith("general.name")} == {
        "general.architecture": arch, "general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0}
    assert len(tensors) == 2 * len(model.lora) == 2 * 7
    for name in merged:
        if name + ".lora_a" not in tensors:
            assert torch.equal(values(merged[name]), values(base[name])), name
            continue
        a, b = values(tensors[name + ".lora_a"]), values(tensors[name + ".lora_b"])
        w = values(base[name])
        assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
        assert torch.allclose(w + 2.0 * b @ a, values(merged[name]), atol=1e-5), name  # alpha / rank = 2


def test_no_adapter_gguf_for_an_output_adapter_of_a_tied_model(hf_folder, load, tmp_path):
    model = load(hf_folder("smollm2"))
    add_lora(model, lora(4, 8.0, 0.0, ["wq", "output"]))
    logs = []
    assert gguf_format.write_adapter(model, tmp_path / "adapter.gguf", 8.0, log=logs.append) is None
    assert "no output tensor" in logs[0] and not list(tmp_path.glob("adapter.gguf*"))
    _, tensors = read(export(model, tmp_path / "out", "f16"))
    assert "output.weight" in tensors  # the merged model: untied


# --- bad input: one clear line, nothing written ---

def test_bad_input_writes_nothing(make, hf_folder, load, tmp_path, monkeypatch):
    model = load(make())
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"gguf_type='q4_0' is not supported; use f16, bf16, q8_0, f32"):
        export(model, out, "q4_0")
    with pytest.raises(UserError, match="shards and dtype are for the meta and hf layouts"):
        loader.save_model(model, out, dtype="float16", out_format="gguf")
    with pytest.raises(UserError, match="gguf_type='q8_0' is for out_format=gguf, not hf"):
        loader.save_model(model, out, out_format="hf", gguf_type="q8_0")
    assert not out.exists()
    calls = []

    def failing(name, merge_lora=True):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk gone")
        return type(model).read_weights(model, name, merge_lora)
    monkeypatch.setattr(model, "read_weights", failing)
    with pytest.raises(OSError, match="disk gone"):
        export(model, out, "f16")
    assert list(out.iterdir()) == []  # the partial file under its temporary name removed
    qwen = load(hf_folder("qwen2", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    with pytest.raises(UserError, match="llama3 rope scaling on a qwen2 model cannot be expressed"):
        export(qwen, out, "f16")
    yarn = load(hf_folder("yarn", name="yarn_beta", rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8,
                                                                  "original_max_position_embeddings": 8}))
    with pytest.raises(UserError, match=r"yarn rope scaling with beta_fast=8 cannot be expressed \(llama.cpp's qwen2 "
                                        r"reads the scaling type, factor and original context only\)"):
        export(yarn, out, "f16")
    assert list(out.iterdir()) == []


def test_command_line(make, tmp_path):
    folder = make()
    offload = ["--offload_path", tmp_path / "offload"]
    line = refused("loader.py", folder, tmp_path / "bad", "--out_format", "gguf", "--gguf_type", "q4_k", *offload)
    assert line == "error: gguf_type='q4_k' is not supported; use f16, bf16, q8_0, f32"
    assert not (tmp_path / "bad").exists() and not (tmp_path / "offload").exists()  # refused before converting
    line = refused("loader.py", folder, tmp_path / "bad", "--gguf_type", "q8_0", *offload)
    assert line == "error: --gguf_type=q8_0 is for --out_format gguf"
    code, _, err = run_main("loader.py", folder, tmp_path / "out", "--out_format", "gguf", "--gguf_type", "q8_0",
                            *offload)
    assert code == 0, err
    fields, tensors = read(tmp_path / "out" / "model.gguf")
    assert fields["general.file_type"] == 7 and tensors["blk.1.attn_v.weight"].tensor_type == Q.Q8_0


# --- transformers reads the file as slowllama runs it (where transformers is installed) ---

@pytest.mark.parametrize("case", ["sentencepiece", "tokenizer_json", "tied", "qwen2", "qwen3"])
def test_transformers_generates_as_slowllama(make, hf_folder, request, load, tmp_path, case):
    transformers = pytest.importorskip("transformers")
    if case == "sentencepiece":
        folder, texts = make(seed=7), SP_TEXTS
    elif case == "tokenizer_json":
        folder, texts = request.getfixturevalue("json_model"), TEXTS
    else:  # Hugging Face folders with the sentencepiece tokenizer; qwen3 with transformers' default head_dim
        # of 128, as its GGUF reader reads no key_length for qwen3 (Qwen3's releases have 128)
        family = {"tied": "smollm2", "qwen2": "qwen2", "qwen3": "qwen3"}[case]
        folder, texts = hf_folder(family, seed=9, **({"head_dim": 128} if case == "qwen3" else {})), SP_TEXTS
    model = load(folder)
    export(model, tmp_path / "out", "f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf",
                                                               dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    for text in texts:
        assert tokenizer(text)["input_ids"] == model.tokenizer.encode(text), text
    prompt = model.tokenizer.encode(texts[0])
    with torch.no_grad():
        logits = theirs(torch.tensor([prompt])).logits
        theirs.generation_config.eos_token_id = None  # 12 tokens, as slowllama's generate without stop ids
        ids = torch.tensor([prompt])
        generated = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                    do_sample=False)[0, len(prompt):].tolist()
    assert torch.allclose(logits, model(torch.tensor([prompt])), atol=1e-4, rtol=1e-4)
    assert math.isfinite(float(logits.std())) and logits.std() > 0.1
    ours = model.generate(prompt, 12)
    if generated != ours:  # only where two tokens tie within float rounding (random models: flat logits)
        i = next(i for i, (a, b) in enumerate(zip(generated, ours)) if a != b)
        at = model(torch.tensor([prompt + ours[:i]]))[0, -1]
        assert abs(float(at[ours[i]] - at[generated[i]])) < 1e-3, (i, generated, ours)


# --- llama.cpp itself runs the file (where node-llama-cpp, prebuilt llama.cpp from npm, is installed) ---

NODE_LLAMA_CPP = os.environ.get("SLOWLLAMA_NODE_LLAMA_CPP")  # a folder where `npm install node-llama-cpp` ran
LLAMA_CPP_JOB = """
import fs from "node:fs";
import {pathToFileURL} from "node:url";
const [pkg, jobPath] = process.argv.slice(2);
const {getLlama} = await import(pathToFileURL(pkg).href);
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: job.model});
const out = {tokens: job.texts.map((text) => Array.from(model.tokenize(text)))};
const context = await model.createContext({contextSize: 64, batchSize: 64, experimentalKvCacheKeyType: "F32",
    experimentalKvCacheValueType: "F32", ...(job.lora ? {lora: {adapters: [{filePath: job.lora}]}} : {})});
out.generated = [];
for await (const token of context.getSequence().evaluate(job.prompt, {temperature: 0})) {
    out.generated.push(token);
    if (out.generated.length >= job.n) break;
}
console.log(JSON.stringify(out));
process.exit(0);
"""


def llama_cpp(tmp_path, model_path, texts, prompt, n, lora=None):
    """(token ids of each text, n greedy tokens after prompt) by llama.cpp (node-llama-cpp's prebuilt build)."""
    script, job = tmp_path / "job.mjs", tmp_path / "job.json"
    script.write_text(LLAMA_CPP_JOB)
    job.write_text(json.dumps({"model": str(model_path), "texts": texts, "prompt": prompt, "n": n,
                               "lora": str(lora) if lora else None}))
    package = os.path.join(NODE_LLAMA_CPP, "node_modules", "node-llama-cpp", "dist", "index.js")
    p = subprocess.run(["node", str(script), package, str(job)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out["tokens"], out["generated"]


@pytest.mark.skipif(not NODE_LLAMA_CPP, reason="SLOWLLAMA_NODE_LLAMA_CPP: a folder where `npm install "
                    "node-llama-cpp` was run (llama.cpp's own code, prebuilt)")
@pytest.mark.parametrize("case", ["sentencepiece", "tokenizer_json", "tiktoken", "tied", "llama3", "mistral", "qwen2",
                                  "qwen3", "yarn", "lora", "lora_qwen2"])
def test_llama_cpp_runs_the_gguf(hf_folder, load, tmp_path, request, byte_fallback_tokenizer, case):
    import default_model
    from helpers import TINY
    texts = SP_TEXTS
    if case in ("sentencepiece", "lora"):
        folder = default_model.make_model(tmp_path / "meta", {**TINY, "vocab_size": -1}, byte_fallback_tokenizer, 2, 5)
    elif case == "tokenizer_json":
        folder, texts = request.getfixturevalue("json_model"), TEXTS
    elif case == "tiktoken":
        import base64
        ranks = request.getfixturevalue("ranks")
        folder = default_model.make_model(tmp_path / "meta", {**TINY, "vocab_size": len(ranks) + 256},
                                          byte_fallback_tokenizer, 2, 5)
        (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                        for t, r in ranks.items()))
        texts = TEXTS
    else:
        family = {"tied": "smollm2", "lora_qwen2": "qwen2"}.get(case, case)
        folder = hf_folder(family, seed=13, vocab_size=512)
        (folder / "tokenizer.model").write_bytes(byte_fallback_tokenizer)
    model = load(folder)
    path = export(model, tmp_path / "out", "f32")
    assert_llama_cpp_agrees(tmp_path, model, path, texts, ["wq", "wk", "wv", "w2"] if case.startswith("lora") else None)


def assert_llama_cpp_agrees(tmp_path, model, path, texts, lora_targets=None):
    """llama.cpp (on the GGUF at path; with lora_targets, with random adapters of those in adapter.gguf, on
    model too) tokenizes texts as model does and continues the first greedily with model's tokens."""
    adapter = None
    if lora_targets:
        add_lora(model, lora(4, 8.0, 0.0, lora_targets), seed=1)
        with torch.no_grad():
            for _, b in model.lora.values():
                b.normal_(generator=torch.Generator().manual_seed(2)).mul_(0.2)
        adapter = gguf_format.write_adapter(model, tmp_path / "adapter.gguf", 8.0, log=lambda *a: None)
    prompt = model.tokenizer.encode(texts[0])
    tokens, generated = llama_cpp(tmp_path, path, texts, prompt, 12, adapter)
    assert tokens == [model.tokenizer.encode(text, bos=False) for text in texts]
    ours = model.generate(prompt, 12)
    if len(generated) < 12:  # llama.cpp ends before an end-of-generation token (<|eot_id|> ...): ours is one there
        assert ours[len(generated)] in model.tokenizer.stop_ids, (generated, ours)
        ours = ours[:len(generated)]
    if generated != ours:  # only where two tokens tie within float rounding
        i = next(i for i, (a, b) in enumerate(zip(generated, ours)) if a != b)
        at = model(torch.tensor([prompt + ours[:i]]))[0, -1]
        assert abs(float(at[ours[i]] - at[generated[i]])) < 1e-3, (i, generated, ours)
