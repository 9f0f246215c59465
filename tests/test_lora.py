"""LoRA: the offloaded adapter step against autograd, a read-only base, merging and generation."""
import json
import re
import shutil

import pytest
import torch

import blackbox_model
import compare
from adapters import add_lora, adapter_state, base_copy_bytes
from files import read_tensors, save_tensors
from helpers import folder_hash, lora, read_shards, run_main, setup


@pytest.mark.parametrize("budget", [None, 0])
def test_lora_steps_equal_autograd_with_dropout(make, tmp_path, budget):
    src = make(n_shards=2, seed=31)
    steps = compare.backprop_steps(256)
    got = compare.backprop_offloaded(src, "lora", steps, torch.device("cpu"), tmp_path, memory_budget=budget)
    want = compare.backprop_reference(src, "lora", steps)
    start = compare.initial_values(src, "lora", None)
    assert set(got["weights"]) == set(want["weights"]) == set(start)
    assert compare.report("lora", got, want, start, compare.LR["lora"])


def adapter_file(model, path, rank=4, targets=("wq", "wk", "w1", "output"), seed=0):
    adapter = lora(rank, 2.0 * rank, 0.0, targets)
    add_lora(model, adapter, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for a, b in model.lora.values():  # B random: a fresh adapter (B = 0) would change nothing
        with torch.no_grad():
            b.normal_(0, 0.05, generator=g)
    save_tensors(adapter_state(model, adapter), path)
    return path


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_merged_model_equals_model_plus_adapter(make, load, tmp_path, dtype, tolerance):
    src = make(seed=32, dtype=dtype)
    model = load(src)
    adapter = adapter_file(model, tmp_path / "adapter.pt")
    tokens = torch.randint(0, 200, (2, 12))
    unmerged = model.eval()(tokens)
    rc, _, err = run_main("merge_lora.py", src, adapter, tmp_path / "merged", "--offload_path", tmp_path / "off")
    assert rc == 0, err
    merged = load(tmp_path / "merged")(tokens)
    assert (merged - unmerged).abs().max() <= tolerance * unmerged.abs().max()
    source, out = read_shards(src), read_shards(tmp_path / "merged")
    for a, b in zip(source, out):
        assert list(a) == list(b)
        for key in a:
            assert a[key].dtype == b[key].dtype
            targeted = key.split(".")[-2] in ("wq", "wk", "w1") or key == "output.weight"
            assert torch.equal(a[key], b[key]) != targeted, key  # only the adapted weights change


def test_generation_with_adapter_equals_merged(make, load, tmp_path):
    src = make(seed=33, dtype=torch.float32)
    adapter = adapter_file(load(src), tmp_path / "adapter.pt")
    off = ["--offload_path", tmp_path / "off"]
    assert run_main("merge_lora.py", src, adapter, tmp_path / "merged", *off)[0] == 0
    rc, with_adapter, err = run_main("test_gen.py", src, "cpu", "--lora", adapter, "--tokens", "20", *off)
    assert rc == 0, err
    rc, merged, err = run_main("test_gen.py", tmp_path / "merged", "cpu", "--tokens", "20", *off)
    assert rc == 0, err
    plain = run_main("test_gen.py", src, "cpu", "--tokens", "20", *off)[1]
    assert with_adapter.splitlines()[0] == merged.splitlines()[0] != plain.splitlines()[0]


def test_lora_run_reads_the_base_and_writes_only_small_files(make, tmp_path):
    src = make(seed=34)
    off, out = tmp_path / "offload", tmp_path / "out"
    assert run_main("test_gen.py", src, "cpu", "--tokens", "1", "--offload_path", off)[0] == 0  # the offload exists
    before = folder_hash(off)
    rc, log, err = run_main("finetune.py", f"--model_path={src}", f"--offload_path={off}", f"--out_path={out}",
                            "--mode=lora", "--iters=30", "--lr=1e-2", "--seq_len=32", "--eval_period=0",
                            "--save_period=10")
    assert rc == 0, err
    assert folder_hash(off) == before  # the shared offload of the base was only read
    assert not list((out / "run").glob("*.safetensors"))  # no module was written in the run folder
    adapter = torch.load(out / "adapter.pt", weights_only=True)
    assert adapter["config"]["targets"] == ["wq", "wv"] and adapter["step"] == 30
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", log)]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert len(read_shards(out)) == 2  # and the merged model in the source's layout


def test_fp32_copy_of_the_base_changes_no_number(make, tmp_path):
    """LoRA in fp32 over a bf16 base: the modules read from an fp32 copy in the run folder (mapped) give
    the same losses, adapters and logits, bit for bit, as converting the bf16 files at every read."""
    src = make(n_shards=2, seed=35)  # bf16
    steps = compare.backprop_steps(256)
    runs = {copy: compare.backprop_offloaded(src, "lora", steps, torch.device("cpu"), tmp_path / str(copy),
                                             memory_budget=0, compute_dtype="float32", base_copy=copy)
            for copy in (1, 0)}
    copies = sorted((tmp_path / "1" / "run-lora" / "run").glob("*.fp32.safetensors"))
    assert copies and not list((tmp_path / "0" / "run-lora" / "run").glob("*.fp32.safetensors"))
    for copy in copies:  # each the bf16 module, widened
        module = copy.name.removesuffix(".fp32.safetensors")
        widened, _ = read_tensors(copy)
        offload = next(d for d in (tmp_path / "1" / "offload").iterdir() if d.is_dir())
        stored, _ = read_tensors(offload / f"{module}.safetensors")
        assert set(widened) == set(stored)
        assert all(widened[k].dtype == torch.float32 and torch.equal(widened[k], stored[k].float()) for k in stored)
    with_copy, converting = runs[1], runs[0]
    assert torch.equal(with_copy["losses"], converting["losses"])
    assert torch.equal(with_copy["logits_after"], converting["logits_after"])
    assert all(torch.equal(with_copy["weights"][k], converting["weights"][k]) for k in converting["weights"])


def test_fp32_copy_only_where_it_fits(make, load, tmp_path, monkeypatch):
    model = load(make(seed=36), compute_dtype="float32", memory_budget=0)
    add_lora(model, lora())
    setup(model, tmp_path, "lora", tokens=64, base_copy=0)
    need = sum(box.numel() * 4 for box in model.boxes.values() if not box.resident)
    peak = model.memory.peak
    assert need and base_copy_bytes(model, 1) == need
    monkeypatch.setattr(blackbox_model, "mem_available_bytes", lambda: peak + 2 * need)
    assert base_copy_bytes(model, -1) == need
    monkeypatch.setattr(blackbox_model, "mem_available_bytes", lambda: peak + need // 2)
    assert base_copy_bytes(model, -1) == 0  # the page cache could not keep it: converting reads instead
    monkeypatch.setattr(blackbox_model, "mem_available_bytes", lambda: peak + 2 * need)
    assert base_copy_bytes(model, -1, disk_reserve=shutil.disk_usage(tmp_path).free) == 0  # no room on the disk
    model.close()
    bf16 = load(make(seed=36), compute_dtype="bfloat16", memory_budget=0)  # a base in the compute dtype is mapped as it is
    add_lora(bf16, lora())
    setup(bf16, tmp_path / "2", "lora", tokens=64, base_copy=0)
    assert base_copy_bytes(bf16, 1) == 0
    bf16.close()


def test_finetune_removes_the_fp32_copy_at_the_end(make, tmp_path):
    src = make(seed=37)
    out = tmp_path / "out"
    settings = [f"--model_path={src}", f"--offload_path={tmp_path / 'off'}", f"--out_path={out}", "--mode=lora",
                "--compute_dtype=float32", "--base_copy=1", "--memory_budget=0", "--seq_len=32", "--eval_period=0", "--save_period=2"]
    rc, log, err = run_main("finetune.py", *settings, "--iters=2")
    assert rc == 0, err
    assert "an fp32 copy of the base" in log + err
    assert not list(out.rglob("*.fp32.safetensors"))
    state = json.loads((out / "run" / "state.json").read_text())
    assert not state["files"]  # a LoRA run's committed state names no module file
    rc, log, err = run_main("finetune.py", *settings, "--iters=4", "--resume=1")  # made again, removed again
    assert rc == 0, err
    assert "an fp32 copy of the base" in log + err and not list(out.rglob("*.fp32.safetensors"))


def test_a_frozen_embedding_table_is_mapped_without_reading_it_all(make, load, tmp_path, monkeypatch):
    """LoRA looks up a few rows of the frozen table a step: its file is mapped and its pages come in as
    rows are read; every other module is mapped with its pages read in at once."""
    import offload
    calls, real = [], offload.map_tensors

    def recording(path, dtype, writable, populate=False):
        calls.append((path.name.split(".")[0], populate))
        return real(path, dtype, writable, populate)
    monkeypatch.setattr(offload, "map_tensors", recording)
    model = load(make(seed=5), memory_budget=0)
    add_lora(model, lora())
    setup(model, tmp_path, "lora", tokens=16, base_copy=1)
    x = torch.randint(0, 200, (1, 16))
    model.train().train_step([(x, x)], 1e-3)
    assert {"tok_embeddings", "layers", "output"} <= {name for name, _ in calls}
    assert all(populate == (name != "tok_embeddings") for name, populate in calls)


def test_the_heap_is_trimmed_only_where_the_backward_would_cross_the_plan(make, load, tmp_path, monkeypatch):
    """At the turn of a step the process gives the heap's free pages back to the OS when its resident
    memory, a block and a block's activations would reach past the planned peak, and only then
    (trimming costs page faults: docs/performance.md)."""
    import blackbox_model
    model = load(make(seed=6), memory_budget=0)
    add_lora(model, lora())
    setup(model, tmp_path, "lora", tokens=16)
    x = torch.randint(0, 200, (1, 16))
    trims = []
    monkeypatch.setattr(blackbox_model, "release_heap_holes", lambda: trims.append(1))
    for rss, trimmed in [(0, 0), (model.memory.peak, 1)]:
        monkeypatch.setattr(blackbox_model, "rss_bytes", lambda: rss)
        model.train().train_step([(x, x)], 1e-3)
        assert len(trims) == trimmed
