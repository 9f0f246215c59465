"""Packing that keeps examples apart (data.py, model.attend, rope.layer_ropes): a packed row's examples attend only
to themselves with positions restarting, so its logits and loss are those of the examples run one by one, and a
step on it is the step on its examples as micro-batches; pack=0 rows are one example each, padded."""
import pytest
import torch

import finetune
from data import encode_file, get_batch, pack, windows

LENGTHS = (5, 9, 7)  # three examples of a 21-token window: the second is longer than the gemma3 window (4)


def examples(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append((ids, [-1] * 2 + ids[2:]))  # a prompt of two tokens, then the answer
    return out


def test_windows_restart_positions_at_each_example():
    stream = pack(examples(50))
    assert stream.starts.tolist() == [0, 5, 14]
    assert stream.targets[stream.starts].tolist() == [-1, -1, -1]  # no example's first token is a target
    x, y, positions = windows(stream, [0, 3, 12], 8)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert torch.equal(x[1], stream.tokens[3:11]) and torch.equal(y[1], stream.targets[4:12])
    whole = windows(stream, [5], 8)  # inside one example: positions 0.. as an unpacked row
    assert whole[2] is None


@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma2", "qwen3-window", "phi3"])
def test_a_packed_row_equals_its_examples_run_one_by_one(make, hf_folder, load, family):
    """Logits and loss, in fp32: the same up to the rounding of matmuls of other shapes. gemma3: sliding windows
    shorter than an example and a rope of their own; gemma2: capped attention written out; phi3: a window on
    every layer."""
    model = load(make(seed=3, dtype=torch.float32) if family == "llama" else hf_folder(family, seed=3),
                 compute_dtype="float32")
    stream = pack(examples(model.args.vocab_size))
    x, y, positions = windows(stream, [0], len(stream.tokens) - 1)
    logits = model(x, positions=positions)
    loss = -model(x, y, positions=positions).sum() / int((y != -1).sum())
    alone, total, n = [], 0.0, 0
    for (a, b) in zip(stream.starts.tolist(), [*stream.starts.tolist()[1:], len(stream.tokens)]):
        b = min(b, len(stream.tokens) - 1)
        one = model(stream.tokens[None, a:b])
        alone.append(one[0])
        total -= model(stream.tokens[None, a:b], stream.targets[None, a + 1:b + 1]).sum().item()
        n += int((stream.targets[a + 1:b + 1] != -1).sum())
    assert torch.allclose(logits[0], torch.cat(alone), rtol=1e-4, atol=1e-5)
    assert abs(loss.item() - total / n) <= 1e-5 * abs(loss.item())
    unpacked = model(x)  # without positions the examples see each other: a different result
    assert not torch.allclose(unpacked[0, LENGTHS[0]:], logits[0, LENGTHS[0]:], atol=1e-3)


def test_a_step_on_a_packed_row_is_the_step_on_its_examples(make, load, tmp_path):
    """One packed row against its examples as micro-batches of one row each (gradients summed, the loss over
    the same targets): the same losses and updates (SGD, two steps), in fp32 up to rounding."""
    from compare import relative_error
    from run_folder import RunFolder
    folder = make(seed=5, dtype=torch.float32)
    stream = pack(examples(256, seed=1))
    packed = [windows(stream, [0], len(stream.tokens) - 1)]
    ends = [*stream.starts.tolist()[1:], len(stream.tokens) - 1]
    apart = [(stream.tokens[None, a:b], stream.targets[None, a + 1:b + 1]) for a, b in zip(stream.starts.tolist(), ends)]
    results = []
    for batches, name in ((packed, "packed"), (apart, "apart")):
        model = load(folder, compute_dtype="float32")
        model.setup_training(RunFolder(tmp_path / name), "full", finetune.settings(optimizer="sgd").optim,
                             len(stream.tokens), len(batches), log=lambda *a: None)
        initial = {f"{m}.{k}": t.clone() for m in model.boxes for k, t in model.read_weights(m).items()}
        model.train()
        losses = [model.train_step(batches, 1.0) for _ in range(2)]
        model.flush()
        results.append((losses, {f"{m}.{k}": t - initial[f"{m}.{k}"] for m in model.boxes
                                 for k, t in model.read_weights(m).items()}))
    (packed_losses, packed_weights), (apart_losses, apart_weights) = results
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(packed_losses, apart_losses))
    for key in packed_weights:
        assert relative_error(packed_weights[key], apart_weights[key]) < 1e-4, key


def test_unpacked_rows_are_one_example_each_padded(make, load):
    model = load(make(seed=3, dtype=torch.float32), compute_dtype="float32")
    stream = pack(examples(model.args.vocab_size))
    data = finetune.settings(pack=0, seq_len=8, batch_size=64).data
    x, y, positions = get_batch(stream, data, torch.Generator().manual_seed(0))
    assert positions is None
    spans = list(zip(stream.starts.tolist(), [*stream.starts.tolist()[1:], len(stream.tokens)]))
    for row_x, row_y in zip(x, y):
        n = int((row_y != -1).nonzero().max()) + 1  # past the last target: padding
        a, b = next((a, b) for a, b in spans if any(torch.equal(row_x[:n], stream.tokens[s:s + n])
                                                    for s in range(a, b - n + 1)))
        assert n <= b - a - 1 and (row_y[n:] == -1).all()
    # a padded row's loss is its example's alone: the padding is after it, out of its view
    a, b = spans[0]
    padded = model(x[:1] * 0 + torch.cat([stream.tokens[a:b - 1], torch.zeros(8 - (b - a - 1), dtype=torch.long)])[None],
                   torch.cat([stream.targets[a + 1:b], torch.full((8 - (b - a - 1),), -1)])[None]).sum()
    alone = model(stream.tokens[None, a:b - 1], stream.targets[None, a + 1:b]).sum()
    assert abs(padded.item() - alone.item()) <= 1e-5 * abs(alone.item())


def test_text_rows_are_as_before_packing(tmp_path):
    """A text file is one document: one tensor of its ids serves as tokens and targets, and its windows have no
    positions (the fused causal path): the rows of before packing."""
    from tokenizer import load_tokenizer
    from default_model import DEFAULT_TEXT, default_model
    tok = load_tokenizer(default_model())
    data = finetune.settings(seq_len=16, batch_size=8).data
    stream = encode_file(DEFAULT_TEXT, data, tok, None, log=lambda *a: None)
    ids = tok.encode(DEFAULT_TEXT.read_text(), bos=True, eos=True)
    assert stream.tokens.tolist() == ids and stream.targets is stream.tokens and stream.starts.tolist() == [0]
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    x, y, positions = get_batch(stream, data, g1)
    starts = torch.randint(0, len(ids) - 16, (8,), generator=g2)
    assert positions is None
    assert all(x[i].tolist() == ids[s:s + 16] and y[i].tolist() == ids[s + 1:s + 17] for i, s in enumerate(starts.tolist()))
