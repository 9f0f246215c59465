"""test_backprop.py's data mode (outputs saved on one CPU, checked on any other; compare.py): it still catches
a wrong gradient, and it passes whatever sign float rounding gives the gradients that are at rounding level."""
import pytest
import torch

import compare as tb
from default_model import default_model
from reference import read_meta_folder

CPU = torch.device("cpu")
EMB = "tok_embeddings.weight"


@pytest.fixture(scope="module")
def data():
    initial, _ = read_meta_folder(default_model())
    saved = torch.load(tb.DATA_FILE, weights_only=True)
    assert saved["model"] == tb.weights_hash(initial), "remake it: python test_backprop.py --make-data"
    return saved, initial


def reference_vs_saved(data, optimizer, edit_grads=None):
    """The reference run on this CPU (gradients edited by edit_grads), the saved data, the start values."""
    saved, initial = data
    model_dir = default_model()
    steps = [[batch] for batch in saved["batches"]]
    got = tb.backprop_reference(model_dir, optimizer, steps, CPU, edit_grads=edit_grads)
    start = tb.initial_values(model_dir, optimizer, initial)
    return got, tb.unpack_expected(saved[optimizer], start), start


def compare(optimizer, got, want, start, capsys):
    capsys.readouterr()
    return tb.report(optimizer, got, want, start, tb.LR[optimizer]), capsys.readouterr().out


def unmarked(want):
    return {**want, "marks": {k: torch.zeros(0, dtype=torch.int32) for k in want["marks"]}}


@pytest.mark.parametrize("optimizer", list(tb.LR))
def test_correct_reference_run_passes_against_saved_data(data, optimizer, capsys):
    # the control for the failures below; saved on another CPU this is itself a cross-CPU check
    ok, out = compare(optimizer, *reference_vs_saved(data, optimizer), capsys)
    assert ok, out


def test_saved_marks_are_few_and_leave_out_structural_zeros(data):
    saved, initial = data
    for optimizer in tb.LR:
        start = tb.initial_values(default_model(), optimizer, initial)
        for key, marks in saved[optimizer]["marks"].items():
            n = start[key].numel()
            assert marks.dtype == torch.int32 and torch.equal(marks, marks.unique())
            assert len(marks) <= 0.02 * n, (optimizer, key)  # the tight check still covers >= 98%
    assert 0 < len(saved["adamw"]["marks"][EMB]) < 100  # not the ~61k zero rows of tokens not in the batch


def test_scaled_embedding_gradient_fails_sgd(data, capsys):
    # SGD's update is linear in the gradient: 1% more gradient is 1% more update, 10x the tolerance
    ok, out = compare("sgd", *reference_vs_saved(data, "sgd", lambda step, t: t[EMB].grad.mul_(1.01)), capsys)
    assert not ok and f"(wrong: {EMB}" in out


def test_one_wrong_sign_just_above_rounding_level_fails_adamw(data, capsys):
    # AdamW barely sees a scaled gradient (x1.01 in step 2 only moves the update by 4.6e-4 relative L2 and
    # passes) but follows signs: one embedding element flipped, its gradient 10x the marking threshold,
    # moves by 2 lr; the check must see that one element among 65536
    flipped = []

    def flip(step, tensors):
        g = tensors[EMB].grad.view(-1)
        if step == 0:
            clear = (g.abs() >= 10 * tb.ROUNDING * g.square().mean().sqrt()).nonzero().flatten()
            flipped.append(clear[g[clear].abs().argmin()].item())
            g[flipped[0]] = -g[flipped[0]]
    got, want, start = reference_vs_saved(data, "adamw", flip)
    assert flipped[0] not in want["marks"][EMB]
    ok, out = compare("adamw", got, want, start, capsys)
    assert not ok and f"(wrong: {EMB})" in out


def test_rounding_level_signs_flipped_pass_adamw(data, capsys):
    # what another CPU may do: in the last step, every gradient element at rounding level (and marked in the
    # saved data) gets the other sign, so AdamW moves it by up to 2 lr the other way. Not in the first step:
    # flipping ~1000 first-step signs moves as many weights by 2 lr and changes every gradient of step 2 by
    # ~1e-3, another training run; a real CPU's rounding (~1e-9) there is damped by AdamW's eps (1e-8)
    flipped = []

    def flip(step, tensors):
        if step == tb.STEPS - 1:
            for key, p in tensors.items():
                i = tb.rounding_level(p.grad).long()
                i = i[torch.isin(i, saved_marks[key].long())]
                p.grad.view(-1)[i] *= -1
                flipped.append(len(i))
    saved_marks = data[0]["adamw"]["marks"]
    got, want, start = reference_vs_saved(data, "adamw", flip)
    assert sum(flipped) > 100
    ok, out = compare("adamw", got, want, start, capsys)
    assert ok, out
    assert not compare("adamw", got, unmarked(want), start, capsys)[0]  # the flips matter without the marks
