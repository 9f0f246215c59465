"""Bad input: one clear line naming the file or setting, a non-zero exit, no traceback, nothing written."""
import json
import shutil
import sys

import pytest
import torch

import default_model
import loader
from conftest import folder_hash, run


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


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
    ("not --name=value", None, ["--iters", "10"], "settings are given as --name=value"),
    ("unknown optimizer", None, ["--optimizer=adam"], "--optimizer=adam"),
    ("unsupported device", None, ["--device=tpu"], "device='tpu' is not supported"),
    ("out_path is the model", None, ["--out_path={m}"], "never written to"),
    ("out_path inside the model", None, ["--out_path={m}/run1"], "never written to"),
]


@pytest.mark.parametrize("name,breaks,settings,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(make, tmp_path, name, breaks, settings, message):
    model = copy_model(make(), tmp_path / "model")
    if breaks:
        breaks(model, tmp_path)
    before = folder_hash(model) if model.is_dir() else None
    args = [s.format(m=model, t=tmp_path) for s in settings]
    rc, out, err = run("finetune.py", f"--model_path={model}", f"--out_path={tmp_path}/out",
                       f"--offload_path={tmp_path}/offload", "--iters=2", "--seq_len=16", *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and "Traceback" not in err, err
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not list((tmp_path / "offload").glob("*.tmp-*")) if (tmp_path / "offload").exists() else True
    if before:
        assert folder_hash(model) == before  # the source folder is never written to


def test_debug_shows_the_traceback(make, tmp_path):
    rc, _, err = run("finetune.py", f"--model_path={tmp_path}/none", "--debug=1")
    assert rc != 0 and "Traceback" in err and "model folder not found" in err


def finished_run(make, tmp_path, *settings):
    model = make()
    out = tmp_path / "out"
    rc, _, err = run("finetune.py", f"--model_path={model}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
                     "--iters=2", "--seq_len=16", "--eval_period=0", *settings)
    assert rc == 0, err
    return model, out


def expect_refusal(args, message, out):
    before = folder_hash(out)
    rc, _, err = run(*args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and "Traceback" not in err and len(errors) == 1 and message in errors[0], err
    assert folder_hash(out) == before  # the earlier run is left as it was


def test_resume_from_another_model_is_refused(make, tmp_path):
    _, out = finished_run(make, tmp_path)
    other = make(seed=99)
    expect_refusal(["finetune.py", f"--model_path={other}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
                    "--resume=1", "--iters=4", "--seq_len=16"], "this run was made from", out)


def test_an_earlier_run_is_not_overwritten_silently(make, tmp_path):
    model, out = finished_run(make, tmp_path)
    expect_refusal(["finetune.py", f"--model_path={model}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
                    "--iters=4", "--seq_len=16"], "holds an earlier run", out)


def test_lora_resume_with_another_rank_is_refused(make, tmp_path):
    model, out = finished_run(make, tmp_path, "--mode=lora", "--lora_rank=4")
    expect_refusal(["finetune.py", f"--model_path={model}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
                    "--mode=lora", "--lora_rank=8", "--resume=1", "--iters=4", "--seq_len=16"], "rank 4", out)


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
    loader.load_llama2(src, offload_path=tmp_path / "off", log=lambda *a: None).close()
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    with pytest.raises(utils.UserError, match="free"):  # converting
        loader.load_llama2(src, offload_path=tmp_path / "off2", log=lambda *a: None)
    assert not (tmp_path / "off2").exists()
    monkeypatch.setattr(sys, "argv", ["finetune.py", f"--model_path={src}", f"--out_path={tmp_path}/out",
                                      f"--offload_path={tmp_path}/off", "--seq_len=16"])
    with pytest.raises(utils.UserError, match="run folder"):  # training
        finetune.main()
    assert not (tmp_path / "out").exists()
    model = loader.load_llama2(src, offload_path=tmp_path / "off", log=lambda *a: None)
    with pytest.raises(utils.UserError, match="export"):  # exporting
        loader.save_llama2(model, tmp_path / "exported", log=lambda *a: None)
    assert not (tmp_path / "exported").exists()
    model.close()
