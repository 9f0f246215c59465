"""Meta's format in and out: shard layouts, bit-exact round trips, the offload folder, bad input."""
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

import loader
from helpers import folder_hash, read_shards, refused, run_main
from reference import read_meta_folder


def assert_same_checkpoint(a, b):
    sa, sb = read_shards(a), read_shards(b)
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert list(x) == list(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and torch.equal(x[k], y[k]), k
    for name in ("params.json", "tokenizer.model"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_one_two_and_eight_shards_hold_the_same_weights(make, load):
    folders = [make(n_shards=n, seed=3) for n in (1, 2, 8)]
    assert [len(read_shards(f)) for f in folders] == [1, 2, 8]
    one = read_meta_folder(folders[0])[0]
    for folder in folders[1:]:  # concatenated along Meta's split dimensions, they equal the single shard
        assert all(torch.equal(one[k], w) for k, w in read_meta_folder(folder)[0].items())
    models = [load(f) for f in folders]
    for name in models[0].boxes:
        first = models[0].read_weights(name)
        for model in models[1:]:
            assert all(torch.equal(first[k], w) for k, w in model.read_weights(name).items()), name


def test_reexport_is_bit_identical(make, load, tmp_path):
    src = make(n_shards=2, seed=1)
    loader.save_model(load(src), tmp_path / "copy", log=lambda *a: None)
    assert_same_checkpoint(src, tmp_path / "copy")


def test_resharding_1_2_8_1_round_trips(make, tmp_path):
    one = make(n_shards=1, seed=2)
    previous = one
    for n in (2, 8, 1):
        out = tmp_path / f"s{n}"
        rc, _, err = run_main("loader.py", previous, out, "--shards", n, "--offload_path", tmp_path / "offload")
        assert rc == 0, err
        assert len(read_shards(out)) == n
        previous = out
    assert_same_checkpoint(one, previous)
    assert all(torch.equal(a, b) for a, b in zip(read_meta_folder(one)[0].values(),
                                                   read_meta_folder(tmp_path / "s8")[0].values()))


def test_offload_files_hold_plain_tensors_in_the_source_dtype(make, load):
    model = load(make())
    for name in model.boxes:
        data = safetensors.torch.load_file(model.offload_dir / f"{name}.safetensors")  # an independent reader
        assert data and all(t.dtype == torch.bfloat16 for t in data.values())
        assert data.keys() == model.boxes[name].shapes.keys()


def test_offload_is_reused_and_rebuilt_when_the_source_changes(make, load):
    src = make()
    logs = []
    load(src, log=logs.append)
    load(src, log=logs.append)
    assert sum("converted" in line for line in logs) == 1
    shard = src / "consolidated.01.pth"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load(src, log=logs.append)
    assert sum("converted" in line for line in logs) == 2


def test_interrupted_conversion_is_never_used(make, load, monkeypatch):
    src = make()
    model = load(src)
    target, before = model.offload_dir, folder_hash(model.offload_dir)
    st = (src / "consolidated.00.pth").stat()
    os.utime(src / "consolidated.00.pth", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed
    calls = []
    real_save = loader.write_tensors

    def dying_save(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed in the middle of the conversion
        real_save(tensors, path)
    monkeypatch.setattr(loader, "write_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        load(src)
    monkeypatch.undo()
    assert folder_hash(target) == before  # the old, complete offload is untouched
    assert not list(target.parent.glob("*.tmp-*"))
    (target.parent / f"{target.name}.tmp-999999").mkdir()  # debris of a killed process
    (target / "manifest.json").unlink()  # and an offload without its manifest is not used either
    logs = []
    model = load(src, log=logs.append)
    assert any("converted" in line for line in logs)
    assert not list(target.parent.glob("*.tmp-*"))
    assert torch.equal(model.read_weights("output")["weight"], read_meta_folder(src)[0]["output.weight"].bfloat16())


def expect_error(args, needle, protect=()):
    refused(*args, messages=[needle], protect=protect)  # the source folder is never written to


def broken_copy(src, tmp_path, name="broken"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_bad_model_folders_give_one_clear_line(make, tmp_path):
    src = make()
    off = ["--offload_path", tmp_path / "offload"]
    expect_error(["loader.py", tmp_path / "nope", tmp_path / "o1", *off], "model folder not found")
    b = broken_copy(src, tmp_path, "no_params")
    (b / "params.json").unlink()
    expect_error(["loader.py", b, tmp_path / "o2", *off], "params.json", [b])
    b = broken_copy(src, tmp_path, "bad_json")
    (b / "params.json").write_text("{dim: 64")
    expect_error(["loader.py", b, tmp_path / "o3", *off], "not valid JSON", [b])
    b = broken_copy(src, tmp_path, "no_key")
    (b / "params.json").write_text(json.dumps({k: v for k, v in json.loads((src / "params.json").read_text()).items()
                                               if k != "n_heads"}))
    expect_error(["loader.py", b, tmp_path / "o4", *off], "n_heads", [b])
    b = broken_copy(src, tmp_path, "missing_shard")
    (b / "consolidated.00.pth").unlink()
    expect_error(["loader.py", b, tmp_path / "o5", *off], "consolidated", [b])
    b = broken_copy(src, tmp_path, "one_of_two_shards")
    (b / "consolidated.01.pth").unlink()
    expect_error(["loader.py", b, tmp_path / "o6", *off], "shape", [b])
    b = broken_copy(src, tmp_path, "no_tokenizer")
    (b / "tokenizer.model").unlink()
    expect_error(["loader.py", b, tmp_path / "o7", *off], "tokenizer.model", [b])
    b = broken_copy(src, tmp_path, "wrong_dim")
    params = json.loads((src / "params.json").read_text())
    (b / "params.json").write_text(json.dumps({**params, "dim": 128, "n_heads": 8, "n_kv_heads": 4}))
    expect_error(["loader.py", b, tmp_path / "o8", *off], "shape", [b])
    for i in range(1, 9):
        assert not (tmp_path / f"o{i}").exists()  # nothing half-written


def test_a_shard_count_that_does_not_divide_is_refused_before_writing(make, tmp_path):
    src = make()
    expect_error(["loader.py", src, tmp_path / "out", "--shards", "3", "--offload_path", tmp_path / "off"],
                 "cannot split evenly", [src])
    assert not (tmp_path / "out").exists()


def test_unknown_device_is_refused(make, tmp_path):
    expect_error(["test_gen.py", make(), "tpu", "--offload_path", tmp_path / "off"], "device='tpu'")


def test_the_source_is_never_the_destination(make, tmp_path):
    src = make()
    expect_error(["loader.py", src, src, "--offload_path", tmp_path / "off"], "never written", [src])
    expect_error(["loader.py", src, src / "inside", "--offload_path", tmp_path / "off"], "never written", [src])


def test_a_module_file_read_past_the_page_cache_round_trips(tmp_path):
    """read_image holds the file's bytes, its tensors views of them; write_image writes the changed image back."""
    import files
    if not files.direct_io_works(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(33, 70, generator=g), "n": torch.randn(70, generator=g),
               "w:exp_avg": torch.randn(33, 70, generator=g), "step": torch.tensor(3.0)}
    path, copy = tmp_path / "m.safetensors", tmp_path / "copy.safetensors"
    files.write_tensors(tensors, path)
    taken = []
    read, (buffer, image, size) = files.read_image(path, lambda n: taken.append(n) or torch.empty(n, dtype=torch.uint8),
                                                   torch.float32)
    assert size == path.stat().st_size and image.data_ptr() % files.DIRECT_ALIGN == 0 and taken == [buffer.numel()]
    assert bytes(image[:size].numpy()) == path.read_bytes()
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], t) for k, t in tensors.items())
    read["w"].mul_(2)
    read["step"].add_(1)
    copy.write_bytes(b"x" * (3 * size))  # a longer file is cut to the image's size
    for target in (copy, path):  # (the file it was read from too)
        files.write_image(image, size, target)
        back, _ = files.read_tensors(target)
        assert target.stat().st_size == size and torch.equal(back["w"], 2 * tensors["w"])
        assert back["step"] == 4 and torch.equal(back["n"], tensors["n"]) and torch.equal(back["w:exp_avg"],
                                                                                            tensors["w:exp_avg"])
    assert files.read_image(path, lambda n: torch.empty(n, dtype=torch.uint8), torch.bfloat16) is None  # as stored only
