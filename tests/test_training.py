"""The offloaded training step against plain autograd and torch.optim, and its properties."""
import re

import pytest
import safetensors.torch
import torch

import files
import finetune
import loader
from default_model import DEFAULT_TEXT, default_model
from helpers import SEED, assert_updates_match, make_batches, ours, reference, run, setup, weights_of
from reference import read_meta_folder
from run_folder import RunFolder
from tokenizer import Tokenizer

@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-3)])
@pytest.mark.parametrize("budget", [None, 0])
def test_offloaded_steps_equal_autograd_with_dropout(make, load, tmp_path, optimizer, lr, budget):
    src = make(n_shards=2, seed=21)
    steps = make_batches(3)
    got_losses, got, _ = ours(load, src, tmp_path / "run", steps, optimizer, lr, dropout=0.2, budget=budget)
    want_losses, want, initial = reference(src, steps, optimizer, lr, dropout=0.2)
    assert got_losses == pytest.approx(want_losses, abs=1e-4)
    assert_updates_match(got, want, initial)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-3)])
def test_grad_accumulation_equals_one_step_on_the_whole_batch(make, load, tmp_path, optimizer, lr):
    src = make(seed=22)
    split = make_batches(2, micro_batches=3)
    whole = [[(torch.cat([b[0] for b in s]), torch.cat([b[1] for b in s]))] for s in split]
    losses_split, split_weights, _ = ours(load, src, tmp_path / "a", split, optimizer, lr)
    losses_whole, whole_weights, _ = ours(load, src, tmp_path / "b", whole, optimizer, lr)
    initial = read_meta_folder(src)[0]
    assert losses_split == pytest.approx(losses_whole, abs=1e-5)
    assert_updates_match(split_weights, whole_weights, initial, rtol=1e-4)
    assert_updates_match(split_weights, reference(src, split, optimizer, lr)[1], initial)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-3)])
@pytest.mark.parametrize("budget", [None, 0])
def test_gradient_clipping_equals_clip_grad_norm(make, load, tmp_path, optimizer, lr, budget):
    src = make(seed=23)
    steps = make_batches(2, micro_batches=2)
    got_losses, got, _ = ours(load, src, tmp_path / "run", steps, optimizer, lr, grad_clip=0.05, budget=budget)
    want_losses, want, initial = reference(src, steps, optimizer, lr, grad_clip=0.05)
    unclipped = reference(src, steps, optimizer, lr)[1]
    assert not torch.allclose(want["output.weight"], unclipped["output.weight"])  # the clipping is active
    assert got_losses == pytest.approx(want_losses, abs=1e-4)
    assert_updates_match(got, want, initial)


def test_adamw_state_survives_a_new_model_object(make, load, tmp_path):
    src = make(seed=24)
    steps = make_batches(2)
    _, _, first = ours(load, src, tmp_path, steps[:1], "adamw", 1e-3)
    files = first.flush()
    saved = safetensors.torch.load_file(tmp_path / "run" / files["layers.0"])
    assert "attention.wq.weight:exp_avg" in saved and "attention.wq.weight:exp_avg_sq" in saved
    model = load(src)
    run = RunFolder(tmp_path)
    run.module_files, run.committed = files, set(files.values())  # as RunFolder.open reads them on resume
    model.setup_training(run, "full", finetune.settings(optimizer="adamw").optim, 24)
    model.train()
    torch.manual_seed(SEED)
    torch.rand(1)  # the random stream moves on as in an uninterrupted run (no dropout: nothing is drawn)
    model.train_step(steps[1], 1e-3)
    model.flush()
    _, want, initial = reference(src, steps, "adamw", 1e-3)
    assert_updates_match(weights_of(model), want, initial)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_results_are_bit_identical_under_any_budget_and_prefetch(make, load, tmp_path, optimizer):
    """cold: the modules read and written past the page cache, as where it cannot hold the model."""
    src = make(seed=25)
    steps = make_batches(3, micro_batches=2)
    runs = [ours(load, src, tmp_path / f"r{i}", steps, optimizer, 1e-3, dropout=0.1, budget=budget, prefetch=prefetch,
                 keep_activations=keep, cold=cold)
            for i, (budget, prefetch, keep, cold) in enumerate([
                (None, True, True, False), (0, False, True, False), (0, True, False, False),
                (300_000, True, True, False), (10**6, False, False, False), (0, True, True, True),
                (None, True, True, True)])]
    assert all(model.offload.direct for *_, model in runs[-2:]) == files.direct_io_works(tmp_path)  # (streamed; all
    # resident: each read and written once, at the commit)
    for losses, weights, _ in runs[1:]:
        assert losses == runs[0][0]
        assert all(torch.equal(weights[k], runs[0][1][k]) for k in weights)


def test_modules_are_read_past_the_page_cache_where_it_cannot_hold_them(make, load, tmp_path, monkeypatch):
    """Where the streamed modules do not fit the RAM left beside the plan, they are read and written with
    O_DIRECT; the plan then reads ahead before it keeps activations (nothing else reads ahead)."""
    import blackbox_model
    from memory_plan import plan_memory
    src = make(seed=27)
    model = load(src, memory_budget=0)
    setup(model, tmp_path)
    plan = lambda budget, from_disk: plan_memory(model.args, model.embeddings, model.layers, model.norm, model.output,
                                                 budget, 24, reads_from_disk=from_disk)
    block = max(box.memory_bytes() for box in model.layers)
    prefetch = plan(0, False).prefetch  # the next module beside the one in use and its work
    assert block <= prefetch < plan(1 << 40, False).graph_budget  # activations alone would take the room
    one_input = 24 * model.args.dim * 4  # (at no budget the first blocks' inputs wait on disk: here all stay)
    budget = plan(0, False).peak + (model.args.n_layers - 2) * one_input + prefetch
    assert plan(budget, False).kept_inputs == model.args.n_layers
    through_cache, from_disk = plan(budget, False), plan(budget, True)
    assert not through_cache.prefetch_in_memory and through_cache.graph_budget >= prefetch
    assert from_disk.prefetch_in_memory and from_disk.graph_budget == through_cache.graph_budget - prefetch

    assert not model.offload.direct  # a tiny model fits
    model.memory_budget = budget
    model.make_plan(24)
    assert not model.offload.direct and model.plan == through_cache
    monkeypatch.setattr(blackbox_model, "mem_available_bytes", lambda: 0)  # the page cache holds nothing
    model.make_plan(24)
    assert model.offload.direct == files.direct_io_works(tmp_path)
    assert model.plan == (from_disk if model.offload.direct else through_cache)
    if not model.offload.direct:
        pytest.skip("this file system has no O_DIRECT")
    monkeypatch.undo()
    import offload
    calls = {"read_image": 0, "write_image": 0}
    for name in calls:  # count the reads and writes past the page cache
        monkeypatch.setattr(offload, name, lambda *a, f=getattr(offload, name), name=name: (
            calls.__setitem__(name, calls[name] + 1), f(*a))[1])
    steps = make_batches(3)  # 24 tokens a step, as planned
    (want_losses, want, _), (losses, weights, cold) = [
        ours(load, src, tmp_path / f"r{i}", steps, "sgd", 0.5, dropout=0.1, budget=budget, cold=i == 1) for i in (0, 1)]
    assert cold.offload.direct and cold.plan.resident == from_disk.resident
    # every streamed module read past the page cache twice a step (the last block once), written once
    blocks = len(cold.layers)
    assert calls["read_image"] >= 2 * 2 * blocks and calls["write_image"] >= 2 * blocks
    assert losses == want_losses and all(torch.equal(weights[k], want[k]) for k in want)


def test_export_after_training_reloads_to_the_same_logits(make, load, tmp_path):
    src = make(seed=26, dtype=torch.float32)
    _, _, model = ours(load, src, tmp_path / "run", make_batches(2), "adamw", 1e-3)
    tokens = torch.randint(0, 200, (2, 10))
    want = model.eval()(tokens)
    loader.save_model(model, tmp_path / "exported", log=lambda *a: None)
    shard = torch.load(tmp_path / "exported" / "consolidated.00.pth", weights_only=True)
    assert all(t.dtype == torch.float32 for t in shard.values())
    assert torch.equal(load(tmp_path / "exported")(tokens), want)


def test_bf16_source_keeps_small_updates(make, load, tmp_path):
    src = make(seed=27)
    steps = make_batches(1)
    _, got, _ = ours(load, src, tmp_path / "run", steps, "sgd", lr=1e-4)
    _, want, initial = reference(src, steps, "sgd", lr=1e-4)
    assert_updates_match(got, want, initial)
    w, w0 = got["layers.0.feed_forward.w1.weight"], initial["layers.0.feed_forward.w1.weight"]
    assert (w != w0).float().mean() > 0.9  # the fp32 working copy moved almost everywhere ...
    assert (w.bfloat16() != w0.bfloat16()).float().mean() < 0.01  # where a bf16 copy would hardly move


def test_default_finetune_run_lowers_the_loss(tmp_path):
    rc, out, err = run("finetune.py", "--iters=100", "--eval_period=0", f"--out_path={tmp_path / 'out'}",
                       f"--offload_path={tmp_path / 'offload'}")
    assert rc == 0, err
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", out)]
    assert len(losses) == 100 and losses[0] > 6.0
    # a model that learns no more than token frequencies cannot beat the unigram entropy of the text
    tokens = torch.tensor(Tokenizer(default_model() / "tokenizer.model").encode(
        DEFAULT_TEXT.read_text(), bos=True, eos=True))
    p = torch.bincount(tokens).float() / len(tokens)
    unigram_entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    assert sum(losses[-10:]) / 10 < unigram_entropy - 1.0, (losses[-10:], unigram_entropy)
    assert (tmp_path / "out" / "consolidated.00.pth").exists()


def test_backprop_script_passes_against_saved_outputs():
    rc, out, err = run("test_backprop.py")
    assert rc == 0, out + err
    assert out.count("[ OK ]") == 12 and "[FAIL]" not in out


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-3)])
def test_updates_in_blocks_of_rows_equal_whole_updates(make, load, tmp_path, monkeypatch, optimizer, lr):
    import optim
    src = make(seed=28)
    steps = make_batches(2)
    whole = ours(load, src, tmp_path / "a", steps, optimizer, lr, dropout=0.1)
    monkeypatch.setattr(optim, "CHUNK_BYTES", 4 * 64 * 5)  # five rows of a 64-wide weight at a time
    rows = ours(load, src, tmp_path / "b", steps, optimizer, lr, dropout=0.1)
    assert rows[0] == pytest.approx(whole[0], abs=1e-6)
    # the same arithmetic, but a matmul of other sizes may sum in another order: float noise only
    assert_updates_match(rows[1], whole[1], read_meta_folder(src)[0], rtol=1e-4)


BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding changes a value by at most this factor


def bf16_error_bound(n_layers, backward=True):
    """What bf16 rounding can do, to first order, to a value computed through the step's bf16 roundings: a
    product of m factors each within (1 +- u) is within gamma_m = m u / (1 - m u) (Higham, Accuracy and Stability
    of Numerical Algorithms, 3.1). m counts the roundings on the longest path through the model: in each block
    and in each direction (forward; backward for gradients), the two normed inputs, the q/k/v, attention, wo,
    w1/w3, SwiGLU and w2 results, and the weight copies of the two matmuls in line: 10; at the head the normed
    input, the output weight and the logits: 3."""
    m = (10 * n_layers + 3) * (2 if backward else 1)
    return m * BF16_UNIT_ROUNDOFF / (1 - m * BF16_UNIT_ROUNDOFF)


def test_bf16_compute_is_identical_under_any_budget_and_follows_fp32_within_its_rounding(make, load, tmp_path):
    """Depends on nothing compute_dtype=auto picks: bf16 and fp32 are set. Resident or streamed, the bf16 steps
    are bit-identical (stale bf16 copies of resident modules are made again before use); and one SGD step in
    bf16 is as far from the fp32 step as bf16 rounding can take the gradient (SGD's update is lr times it)."""
    src = make(seed=29)
    steps = make_batches(3)

    def train(budget, name, dtype, optimizer, lr, steps):
        model = load(src, memory_budget=budget, compute_dtype=dtype)
        setup(model, tmp_path / name, "full", optimizer, tokens=steps[0][0][0].numel())
        model.train()
        losses = [model.train_step(batches, lr) for batches in steps]
        model.flush()
        return losses, weights_of(model)

    resident, streamed = train(None, "a", "bfloat16", "adamw", 1e-3, steps), train(0, "b", "bfloat16", "adamw", 1e-3, steps)
    assert resident[0] == streamed[0]
    assert all(torch.equal(resident[1][k], streamed[1][k]) for k in resident[1])

    (bf16_loss,), bf16 = train(None, "c", "bfloat16", "sgd", 0.5, steps[:1])
    (fp32_loss,), fp32 = train(None, "d", "float32", "sgd", 0.5, steps[:1])
    n_layers = read_meta_folder(src)[1]["n_layers"]
    assert bf16_loss != fp32_loss  # the bf16 path ran
    assert bf16_loss == pytest.approx(fp32_loss, rel=bf16_error_bound(n_layers, backward=False))
    assert_updates_match(bf16, fp32, read_meta_folder(src)[0], rtol=bf16_error_bound(n_layers))


@pytest.mark.parametrize("budget", [0, None])  # every module streamed (mapped, updated in place) / resident
def test_a_committed_slot_is_never_written_again(make, load, tmp_path, budget):
    src = make(seed=26)
    steps = make_batches(3)
    model = load(src, memory_budget=budget)
    run = setup(model, tmp_path, "full", "adamw")
    model.train()
    model.train_step(steps[0], 1e-3)
    committed = model.flush()
    run.committed = set(committed.values())
    saved = {name: (tmp_path / "run" / file).read_bytes() for name, file in committed.items()}
    for batches in steps[1:]:
        model.train_step(batches, 1e-3)
    files = model.flush()
    for name, file in committed.items():
        assert (tmp_path / "run" / file).read_bytes() == saved[name], name
        assert files[name] != file  # the newer state went to the other slot
        on_disk = safetensors.torch.load_file(tmp_path / "run" / files[name])
        for key, weight in model.read_weights(name).items():
            assert torch.equal(on_disk[key], weight), (name, key)
    _, want, initial = reference(src, steps, "adamw", 1e-3)
    assert_updates_match(weights_of(model), want, initial)
