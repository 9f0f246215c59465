"""Bad input: one clear line naming the file or setting, a non-zero exit, no traceback, nothing written."""
import contextlib
import errno
import json
import os
import shlex
import shutil
import sys

import pytest
import torch

import default_model
import loader
from families import save_as_hf
from helpers import read_shards, refused, run_main


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(folder, **changes):
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **changes}))


def edit_params(path, **changes):
    params = json.loads((path / "params.json").read_text())
    params.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del params[key]
    (path / "params.json").write_text(json.dumps(params))


# (name, how to break a copy of a good model folder, extra settings, what the one error line says)
CASES = [
    ("missing model folder", lambda m, t: shutil.rmtree(m), [], "model folder not found"),
    ("model path is a file", lambda m, t: (shutil.rmtree(m), m.write_text("x")), [], "model folder not found"),
    ("params.json missing", lambda m, t: (m / "params.json").unlink(), [], "params.json: not found"),
    ("a folder holding no model", lambda m, t: (shutil.rmtree(m), m.mkdir(), (m / "notes.txt").write_text("x")), [],
     "holds no model slowllama reads; it looks for params.json with consolidated.*.pth"),
    ("a folder holding a damaged GGUF file", lambda m, t: (shutil.rmtree(m), m.mkdir(), (m / "model.gguf").write_bytes(
        b"GGUF")), [], "model.gguf: not a GGUF file"),
    ("params.json not JSON", lambda m, t: (m / "params.json").write_text("{'dim': 64"), [], "not valid JSON"),
    ("params.json lacks a key", lambda m, t: edit_params(m, n_layers=None), [], "missing the key 'n_layers'"),
    ("params.json wrong type", lambda m, t: edit_params(m, dim="64"), [], "dim must be a positive integer"),
    ("missing shard", lambda m, t: (m / "consolidated.00.pth").unlink(), [], "unexpected shard name"),
    ("extra shard", lambda m, t: shutil.copy(m / "consolidated.01.pth", m / "consolidated.02.pth"), [],
     "3 shards, but tok_embeddings.weight"),
    ("truncated shard", lambda m, t: (m / "consolidated.01.pth").write_bytes(
        (m / "consolidated.01.pth").read_bytes()[:5000]), [], "cannot be read as a checkpoint"),
    ("tensors do not fit params.json", lambda m, t: edit_params(m, n_kv_heads=4), [], "has shape"),
    ("more layers in the shards", lambda m, t: edit_params(m, n_layers=1), [], "n_layers=1"),
    ("tokenizer missing", lambda m, t: (m / "tokenizer.model").unlink(), [], "tokenizer.model: not found"),
    ("tokenizer corrupt", lambda m, t: (m / "tokenizer.model").write_bytes(b"\x00garbage" * 100), [],
     "not a sentencepiece model"),
    ("tokenizer of another size", lambda m, t: (m / "tokenizer.model").write_bytes(
        default_model.train_tokenizer(default_model.DEFAULT_TEXT, 300)), [], "300 tokens, but the model has 256"),
    ("data file missing", None, ["--data_path={t}/none.txt"], "data_path="),
    ("data file empty", lambda m, t: (t / "empty.txt").write_text("  \n"), ["--data_path={t}/empty.txt"],
     "the file is empty"),
    ("data file not UTF-8", lambda m, t: (t / "latin1.txt").write_bytes("café crème".encode("latin-1") * 50),
     ["--data_path={t}/latin1.txt"], "not UTF-8"),
    ("data too short", lambda m, t: (t / "short.txt").write_text("a few words"), ["--data_path={t}/short.txt"],
     "fewer than one window"),
    ("data .pt not token ids", lambda m, t: torch.save(torch.randn(100), t / "floats.pt"),
     ["--data_path={t}/floats.pt"], "1-D LongTensor"),
    ("unknown setting", None, ["--learning_rate=0.1"], "unknown setting --learning_rate"),
    ("mistyped value", None, ["--iters=ten"], "--iters=ten: expected an integer"),
    ("integer out of range", None, ["--iters=1e400"], "--iters=1e400: expected an integer"),
    ("infinite number", None, ["--lr=inf"], "--lr=inf: expected a finite number"),
    ("negative period", None, ["--eval_period=-1"], "--eval_period=-1: must be at least 0"),
    ("a flag of 2", None, ["--resume=2"], "--resume=2: use 0 or 1"),
    ("beta of 1", None, ["--beta2=1"], "--beta2=1.0: must be in [0, 1)"),
    ("negative memory budget", None, ["--memory_budget=-5"], "--memory_budget=-5.0: GiB, or -1 for half the RAM"),
    ("not --name=value", None, ["--iters", "10"], "settings are given as --name=value"),
    ("unknown optimizer", None, ["--optimizer=adam"], "--optimizer=adam"),
    ("unknown LoRA target", None, ["--mode=lora", "--lora_targets=wq,q_proj"], "--lora_targets=wq,q_proj: unknown q_proj"),
    ("unsupported device", None, ["--device=tpu"], "device='tpu' is not supported"),
    ("out_path is the model", None, ["--out_path={m}"], "never written to"),
    ("out_path inside the model", None, ["--out_path={m}/run1"], "never written to"),
]


@pytest.mark.parametrize("name,breaks,settings,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(make, tmp_path, name, breaks, settings, message):
    model = copy_model(make(), tmp_path / "model")
    if breaks:
        breaks(model, tmp_path)
    args = [s.format(m=model, t=tmp_path) for s in settings]
    refused("finetune.py", f"--model_path={model}", f"--out_path={tmp_path}/out", f"--offload_path={tmp_path}/offload",
            "--iters=2", "--seq_len=16", *args, messages=[message], protect=[model] if model.is_dir() else [])
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not list((tmp_path / "offload").glob("*.tmp-*")) if (tmp_path / "offload").exists() else True


def truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])


def three_token_tokenizer_json(path):
    """What transformers 5 writes converting a small sentencepiece model without byte fallback: a BPE of
    three special pieces whose post-processor adds nothing; it encodes plain text to no tokens."""
    from tokenizers import Tokenizer, models
    Tokenizer(models.BPE(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, merges=[])).save(str(path))


def index_of(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def another_models_tensor(folder):
    """A safetensors file holding the layer's tensors of a model of another width."""
    import safetensors.torch
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(128, 128, dtype=torch.bfloat16)
    safetensors.torch.save_file(tensors, folder / "model.safetensors")


def integer_tensor(folder):
    import safetensors.torch
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int64)
    safetensors.torch.save_file(tensors, folder / "model.safetensors")


def missing_tensor(folder):
    import safetensors.torch
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(tensors, folder / "model.safetensors")


# Hugging Face's layout: (name, how to break a copy of a good folder, what the one error line says)
HF_CASES = [
    ("config.json missing", lambda m: (m / "config.json").unlink(), "config.json: not found"),
    ("config.json empty", lambda m: (m / "config.json").write_text(""), "config.json: not valid JSON"),
    ("config.json a list", lambda m: (m / "config.json").write_text("[1]"), "config.json: expected a JSON object"),
    ("weights missing", lambda m: (m / "model.safetensors").unlink(), "no model.safetensors or pytorch_model.bin"),
    ("safetensors truncated", lambda m: truncate(m / "model.safetensors", 5000), "not a complete safetensors file"),
    ("safetensors cut in its header", lambda m: truncate(m / "model.safetensors", 100), "not a complete safetensors"),
    ("safetensors empty", lambda m: (m / "model.safetensors").write_bytes(b""), "not a complete safetensors file"),
    ("safetensors is text", lambda m: (m / "model.safetensors").write_text("<html>404</html>"),
     "not a complete safetensors file"),
    ("a tensor missing", missing_tensor, "missing tensor model.layers.1.mlp.up_proj.weight"),
    ("another model's tensor", another_models_tensor, "has shape (128, 128)"),
    ("integer weights", integer_tensor, "norm.weight is stored as int64"),
    ("index not JSON", lambda m: (m / "model.safetensors.index.json").write_text("{"), "index.json: not valid JSON"),
    ("index without weight_map", lambda m: (m / "model.safetensors.index.json").write_text("{}"),
     "weight_map must map tensor names"),
    ("index names a missing file", lambda m: index_of(m, {"model.norm.weight": "model-00002-of-00002.safetensors"}),
     "model-00002-of-00002.safetensors: not found, but model.safetensors.index.json names it"),
    ("pytorch_model.bin truncated", lambda m: ((m / "model.safetensors").rename(m / "pytorch_model.bin"),
                                               truncate(m / "pytorch_model.bin", 3000)), "pytorch_model.bin: cannot be read"),
    ("tokenizer.json broken", lambda m: (m / "tokenizer.json").write_text("{}"), "not a Hugging Face tokenizer"),
    ("tokenizer.json that encodes nothing", lambda m: ((m / "tokenizer.model").unlink(),
                                                       three_token_tokenizer_json(m / "tokenizer.json")),
     "tokenizer.json: encodes plain text to no tokens"),
    ("tokenizer.model empty", lambda m: (m / "tokenizer.model").write_bytes(b""), "not a sentencepiece model"),
    ("generation_config.json not JSON", lambda m: (m / "generation_config.json").write_text("{"),
     "generation_config.json: not valid JSON"),
    ("eos_token_id not an id", lambda m: (m / "generation_config.json").write_text('{"eos_token_id": "2"}'),
     "eos_token_id must be a token id"),
]


@pytest.fixture(scope="module")
def hf_model(make, tmp_path_factory):
    return save_as_hf(make(seed=62), tmp_path_factory.mktemp("hf") / "hf")


@pytest.mark.parametrize("name,breaks,message", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_a_damaged_hugging_face_folder(hf_model, tmp_path, name, breaks, message):
    model = copy_model(hf_model, tmp_path / "model")
    breaks(model)
    refused("finetune.py", f"--model_path={model}", f"--out_path={tmp_path}/out", f"--offload_path={tmp_path}/offload",
            "--iters=2", "--seq_len=16", messages=[message], protect=[model])
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "offload").glob("*.tmp-*")) if (tmp_path / "offload").exists() else True


def test_a_tokenizer_json_that_encodes_nothing_is_passed_over_for_the_tokenizer_model(hf_model, tmp_path):
    """Beside a tokenizer.model, the broken tokenizer.json is not used, and the conversion says which file is."""
    model = copy_model(hf_model, tmp_path / "model")
    three_token_tokenizer_json(model / "tokenizer.json")
    code, out, err = run_main("test_gen.py", model, "cpu", "--tokens", "3", "--offload_path", tmp_path / "off")
    assert code == 0, err
    assert "tokenizer.json encodes plain text to no tokens: tokenizer.model is used" in err
    assert out.startswith("The basic problem is one of size.")
    code, _, err = run_main("loader.py", model, tmp_path / "hf", "--out_format", "hf", "--offload_path", tmp_path / "off")
    assert code == 0, err  # an export transformers would read the broken file of first leaves it out
    assert (tmp_path / "hf" / "tokenizer.model").is_file() and not (tmp_path / "hf" / "tokenizer.json").exists()


def test_a_damaged_tokenizer_model_beside_the_tokenizer_json_used_is_only_noted(hf_json, tmp_path):
    from tokenizer import choice_note, load_tokenizer
    (tmp_path / "tokenizer.json").write_text(hf_json[True])
    (tmp_path / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.path == tmp_path / "tokenizer.json" and tokenizer.n_words == 300
    assert choice_note(tmp_path, tokenizer).startswith("tokenizer.json is used; tokenizer.model beside it cannot be read")


def test_tokenizer_files_of_other_sizes_say_which_is_used(hf_model, hf_json, tmp_path):
    model = copy_model(hf_model, tmp_path / "model")
    (model / "tokenizer.json").write_text(hf_json[True])  # 300 tokens beside the 256 of tokenizer.model
    edit_config(model, vocab_size=320)
    code, _, err = run_main("loader.py", model, tmp_path / "out", "--offload_path", tmp_path / "off")
    assert "tokenizer.json (300 tokens) is used, not tokenizer.model (256 tokens), as transformers uses it" in err


# The run folder, damaged between a run and its resumption
def torn_slot(out):
    slot = next((out / "run").glob("layers.0.*.safetensors"))
    truncate(slot, slot.stat().st_size // 2)


RUN_CASES = [
    ("state.json not JSON", lambda out: (out / "run" / "state.json").write_text("{"), "state.json: cannot be read"),
    ("state.json of something else", lambda out: (out / "run" / "state.json").write_text("[1]"),
     "state.json: not the manifest of a committed step"),
    ("checkpoint truncated", lambda out: truncate(next((out / "run").glob("checkpoint.*.pt")), 100),
     "cannot be read as plain tensors"),
    ("a committed slot torn", torn_slot, "safetensors: truncated"),
    ("adapter.pt truncated", None, "adapter.pt: cannot be read as plain tensors"),
]


@pytest.mark.parametrize("name,breaks,message", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_a_damaged_run_folder(make, tmp_path, name, breaks, message):
    lora = breaks is None
    model, out = finished_run(make, tmp_path, *(["--mode=lora"] if lora else []))
    if lora:  # the adapter a LoRA run leaves, given to test_gen.py
        truncate(out / "adapter.pt", 100)
        refused("test_gen.py", model, "cpu", "--lora", out / "adapter.pt", "--offload_path", tmp_path / "off",
                messages=[message])
        return
    breaks(out)
    resume = [f"--model_path={model}", f"--out_path={out}", f"--offload_path={tmp_path}/off", "--iters=4",
              "--seq_len=16", "--eval_period=0", "--resume=1"]
    refused("finetune.py", *resume, messages=[message])
    if name.startswith("state.json"):  # the plan of the run's continuation reads it too
        refused("finetune.py", *resume, "--plan=1", messages=[message])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full: a file every write to fails as on a full disk")
def test_a_full_disk_while_saving_a_checkpoint_is_an_enospc_oserror(monkeypatch, tmp_path):
    """What the run's full-disk line is made from: save_tensors (every checkpoint) fails with errno ENOSPC."""
    import files
    monkeypatch.setattr(files, "published", contextlib.contextmanager(lambda path: (yield "/dev/full")))
    with pytest.raises(OSError) as e:
        files.save_tensors({"a": torch.zeros(1 << 16)}, tmp_path / "checkpoint.pt")
    assert e.value.errno == errno.ENOSPC


def test_a_disk_that_fills_during_the_run(make, tmp_path, monkeypatch):
    """The run folder's disk fills once a step is committed: one line naming the folder, its disk, what the run
    needs and the command that continues it; the committed step stays, and the run resumed after space is
    freed ends as an uninterrupted one."""
    import run_folder
    model = make(seed=63)
    settings = [f"--model_path={model}", f"--offload_path={tmp_path}/off", "--iters=4", "--seq_len=16",
                "--eval_period=0", "--save_period=2", "--optimizer=sgd"]
    code, _, err = run_main("finetune.py", *settings, f"--out_path={tmp_path}/whole")
    assert code == 0, err
    real, calls = run_folder.save_tensors, []

    def full_disk(state, path):
        calls.append(path)
        if len(calls) == 2:  # the second commit's checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(state, path)
    monkeypatch.setattr(run_folder, "save_tensors", full_disk)
    out = tmp_path / "out"
    line = refused("finetune.py", *settings, f"--out_path={out}")
    assert "is full writing checkpoint.000004.pt" in line and "committed step 2" in line and "--resume=1" in line, line
    assert str(out / "run") in line
    monkeypatch.undo()
    assert json.loads((out / "run" / "state.json").read_text())["step"] == 2
    printed = shlex.split(line.split("continue with: ")[1])  # the command it printed, as printed
    assert printed[:2] == ["python", "finetune.py"] and printed[-1] == "--resume=1"
    code, _, err = run_main(*printed[1:])
    assert code == 0, err
    assert [t.tolist() for s in read_shards(out) for t in s.values()] == \
        [t.tolist() for s in read_shards(tmp_path / "whole") for t in s.values()]


def test_debug_shows_the_traceback(make, tmp_path):
    with pytest.raises(loader.UserError, match="model folder not found"):  # main_guard lets it through
        run_main("finetune.py", f"--model_path={tmp_path}/none", "--debug=1")


def finished_run(make, tmp_path, *settings):
    model = make()
    out = tmp_path / "out"
    rc, _, err = run_main("finetune.py", f"--model_path={model}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
                          "--iters=2", "--seq_len=16", "--eval_period=0", *settings)
    assert rc == 0, err
    return model, out


def expect_refusal(args, message, out):
    refused(*args, messages=[message], protect=[out])  # the earlier run is left as it was


def test_resume_from_another_model_is_refused(make, tmp_path):
    _, out = finished_run(make, tmp_path)
    other = make(seed=99)
    expect_refusal(["finetune.py", f"--model_path={other}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
                    "--resume=1", "--iters=4", "--seq_len=16"], "this run was made from", out)


def test_an_earlier_run_is_not_overwritten_silently(make, tmp_path):
    model, out = finished_run(make, tmp_path)
    again = ["finetune.py", f"--model_path={model}", f"--offload_path={tmp_path}/off", "--iters=4", "--seq_len=16"]
    expect_refusal([*again, f"--out_path={out}"], "holds an earlier run", out)
    # an exported model without its run folder, of each layout, is not overwritten either, nor taken for a run
    for i, exported in enumerate([["consolidated.00.pth"], ["config.json", "model.safetensors"], ["model.gguf"]]):
        folder = tmp_path / f"exported{i}"
        folder.mkdir()
        for name in exported:
            (folder / name).write_bytes(b"x")
        for resume in ([], ["--resume=1"]):
            expect_refusal([*again, f"--out_path={folder}", *resume], "holds an exported model and no step to continue",
                           folder)


def test_lora_resume_with_other_adapters_is_refused(make, tmp_path):
    """A run continues with the adapters it started with: another rank, alpha, dropout or set of targets is one
    line naming both (the same targets in another order are the same adapters)."""
    model, out = finished_run(make, tmp_path, "--mode=lora", "--lora_rank=4", "--lora_targets=wq,wv")
    resume = ["finetune.py", f"--model_path={model}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
              "--mode=lora", "--resume=1", "--iters=3", "--seq_len=16", "--eval_period=0"]
    for other in (["--lora_rank=8"], ["--lora_targets=wq,wv,wk"], ["--lora_targets=wq"], ["--lora_alpha=32"],
                  ["--lora_dropout=0.1"]):
        expect_refusal([*resume, "--lora_rank=4", "--lora_targets=wq,wv", *other],
                       "adapters have lora_rank=4, lora_alpha=16.0, lora_dropout=0.05, lora_targets=wq,wv", out)
    rc, stdout, err = run_main(*resume, "--lora_rank=4", "--lora_targets=wv,wq")
    assert rc == 0 and "resuming" in stdout, err


def test_adapter_for_another_model_is_refused(make, tmp_path):
    _, out = finished_run(make, tmp_path, "--mode=lora")
    other = make(dim=128, n_heads=8, n_kv_heads=4)
    expect_refusal(["test_gen.py", other, "cpu", "--lora", out / "adapter.pt", "--offload_path", tmp_path / "off"],
                   "made for another model", out)
    expect_refusal(["merge_lora.py", other, out / "adapter.pt", tmp_path / "merged", "--offload_path",
                    tmp_path / "off"], "made for another model", out)
    assert not (tmp_path / "merged").exists()


def test_a_full_disk_is_refused_before_anything_is_written(make, tmp_path, monkeypatch):
    import finetune
    import utils
    src = make()
    real = shutil.disk_usage
    loader.load_model(src, offload_path=tmp_path / "off", log=lambda *a: None).close()
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    with pytest.raises(utils.UserError, match="free"):  # converting
        loader.load_model(src, offload_path=tmp_path / "off2", log=lambda *a: None)
    assert not (tmp_path / "off2").exists()
    monkeypatch.setattr(sys, "argv", ["finetune.py", f"--model_path={src}", f"--out_path={tmp_path}/out",
                                      f"--offload_path={tmp_path}/off", "--seq_len=16"])
    with pytest.raises(utils.UserError, match="run folder"):  # training
        finetune.main()
    assert not (tmp_path / "out").exists()
    model = loader.load_model(src, offload_path=tmp_path / "off", log=lambda *a: None)
    with pytest.raises(utils.UserError, match="export"):  # exporting
        loader.save_model(model, tmp_path / "exported", log=lambda *a: None)
    assert not (tmp_path / "exported").exists()
    model.close()
