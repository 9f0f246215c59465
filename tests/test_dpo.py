"""DPO (dpo.py) against autograd: the loss written out here from Rafailov et al. and TRL's sigmoid loss, on the
plain in-memory reference model (reference.py) with torch.optim; the streamed step with the reference
precomputed (full fine-tuning) or computed in its own pass without the adapters (LoRA); the metrics TRL logs;
the toy preference set learned by the built-in model, full and LoRA; the reference kept across a resume."""
import math

import pytest
import torch
import torch.nn.functional as F

import dpo
import finetune
from compare import LORA, make_adapters, mismatched_updates, rounding_level, trained_tensors
from helpers import records, run_main
from reference import Reference, add_adapters, read_meta_folder
from run_folder import RunFolder

BETA, SMOOTHING = 0.5, 0.1


def written_out_logps(logits, y):
    """Each row's summed log-probability of its targets (-1: not counted)."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (logp * (y != -1)).sum(-1)


def written_out_loss(policy, reference, beta=BETA, smoothing=SMOOTHING):
    """The mean over pairs of -log sigmoid(beta h) (1 - s) - log sigmoid(-beta h) s, h the policy's log-ratio of
    chosen to rejected less the reference's (chosen rows first)."""
    n = len(policy) // 2
    h = (policy[:n] - policy[n:]) - (reference[:n] - reference[n:])
    return (-F.logsigmoid(beta * h) * (1 - smoothing) - F.logsigmoid(-beta * h) * smoothing).mean()


def toy_pairs(vocab, n=3, seed=0):
    """n pairs of (ids, targets): a shared prompt of 3 to 5 tokens, answers of 2 to 5 learned tokens."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()
    pairs = []
    for _ in range(n):
        prompt = rand(int(torch.randint(3, 6, (1,), generator=g)))
        rows = [prompt + rand(int(torch.randint(2, 6, (1,), generator=g))) for _ in range(2)]
        pairs.append(tuple((r, [-1] * len(prompt) + r[len(prompt):]) for r in rows))
    return pairs


@pytest.mark.parametrize("mode", ["sgd", "adamw", "lora"])
def test_a_dpo_step_equals_autograd_on_the_loss_written_out(make, load, tmp_path, mode):
    """Two steps on three pairs, fp32. Full: the reference's log-probabilities of the starting model, given to the
    step; LoRA (random A and B on wq, wv, w2 and the output): the base model without the adapters, computed in the
    step's pass. The first full step's loss is log 2 (the policy is the reference)."""
    folder = make(seed=7, dtype=torch.float32)
    weights, params = read_meta_folder(folder)
    pairs = toy_pairs(weights["tok_embeddings.weight"].shape[0])
    x, y, _, _ = dpo.pair_rows(pairs, torch.arange(len(pairs)), 16)
    lr = {"sgd": 1.0, "adamw": 1e-3, "lora": 1e-2}[mode]
    adapters = make_adapters(folder) if mode == "lora" else None

    with torch.no_grad():
        reference = written_out_logps(Reference(weights, params)(x), y)
    policy = Reference(weights, params)
    if adapters:
        policy.requires_grad_(False)
        add_adapters(policy, adapters, LORA.alpha, 0.0)
    tensors = trained_tensors(policy, adapters is not None)
    initial = {k: p.detach().clone() for k, p in tensors.items()}
    opt = torch.optim.SGD(tensors.values(), lr=lr) if mode == "sgd" else torch.optim.AdamW(tensors.values(), lr=lr)
    want_losses, marks = [], {k: torch.zeros(0, dtype=torch.int32) for k in tensors}
    for _ in range(2):
        loss = written_out_loss(written_out_logps(policy(x), y), reference)
        opt.zero_grad()
        loss.backward()
        marks = {k: torch.cat([marks[k], rounding_level(p.grad)]).unique() for k, p in tensors.items()}
        opt.step()
        want_losses.append(loss.item())
    want = {k: p.detach().clone() for k, p in tensors.items()}

    from adapters import add_lora
    model = load(folder, compute_dtype="float32")
    model.objective = dpo.Objective(BETA, SMOOTHING, reference_in_pass=mode == "lora")
    if adapters:
        lora = LORA.__class__(rank=LORA.rank, alpha=LORA.alpha, dropout=0.0, targets=LORA.targets)
        add_lora(model, lora, tensors={k: (a.clone(), b.clone()) for k, (a, b) in adapters.items()})
    optim = finetune.settings(optimizer="adamw" if mode != "sgd" else "sgd").optim
    model.setup_training(RunFolder(tmp_path / "run"), "lora" if adapters else "full", optim, x.numel(),
                         log=lambda *a: None)
    model.train()
    losses = [model.train_step([(x, y, None, None if adapters else reference)], lr) for _ in range(2)]
    model.flush()
    if adapters:
        got = {f"{k}:{ab}": t.detach().clone() for k, pair in model.lora.items() for ab, t in zip("AB", pair)}
    else:
        got = {f"{m}.{k}": t.float() for m in model.boxes for k, t in model.read_weights(m).items()}
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(losses, want_losses)), (losses, want_losses)
    if not adapters:
        assert abs(losses[0] - math.log(2)) <= 1e-5  # (log-probabilities near -30 in fp32 from two programs)
    assert not mismatched_updates(got, want, initial, marks, rtol=1e-4, bound=3 * lr * 2)
    assert abs(model.objective.metrics()["loss"] - want_losses[1]) <= 1e-5  # (the last step's pairs)


def test_the_metrics_are_trls():
    """rewards/chosen = beta (policy - reference) of the chosen rows (rejected likewise), their margin, the share
    of pairs whose chosen reward is the higher (a tie: not), the mean log-probabilities, the loss: means over the
    pairs since reset, of rows whose log-probabilities are written out here."""
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 3, 5, generator=g), torch.randint(0, 5, (8, 3), generator=g)
    y[:, 0] = -1
    policy = written_out_logps(logits, y)
    reference = policy + 0.5 * torch.randn(8, generator=g)
    reference[3], reference[7] = policy[3], policy[7]  # pair 3: both rewards 0
    objective = dpo.Objective(0.2, 0.0, False)
    loss = objective.loss(policy, reference, 4)
    m = objective.metrics()
    chosen, rejected = 0.2 * (policy[:4] - reference[:4]), 0.2 * (policy[4:] - reference[4:])
    want = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": policy[:4].mean(), "logps/rejected": policy[4:].mean(),
            "loss": written_out_loss(policy, reference, 0.2, 0.0)}
    assert set(m) == set(want) and all(abs(m[k] - want[k].item()) < 1e-6 for k in want), (m, want)
    assert abs(loss.item() - m["loss"]) < 1e-6 and m["rewards/accuracies"] < 1.0


# --- end to end, on the built-in model and the bundled preference pairs ---

@pytest.mark.slow
@pytest.mark.parametrize("mode,iters,lr", [("full", 30, "3e-3"), ("lora", 60, "1e-2")])
def test_dpo_learns_the_bundled_preferences(tmp_path, mode, iters, lr):
    """test_data/preferences.jsonl (chosen answers helpful, rejected ones rude): the held-out pairs' accuracy goes
    from 0 (every reward is 0 while the policy is the reference, their rows computed as the reference's were: no
    pair is ahead) to above 0.9, the loss from log 2 down; every step logs TRL's metrics."""
    out = tmp_path / "out"
    code, stdout, err = run_main("finetune.py", "--objective=dpo", "--data_path=test_data/preferences.jsonl",
                                 f"--mode={mode}", f"--iters={iters}", f"--lr={lr}", f"--eval_period={iters // 2}",
                                 "--compute_dtype=float32",
                                 f"--out_path={out}", f"--offload_path={tmp_path}/off")
    assert code == 0, err
    evals = records(out, "eval")
    assert evals[0]["rewards/accuracies"] == 0.0 and abs(evals[0]["val_loss"] - math.log(2)) < 1e-6
    assert evals[-1]["rewards/accuracies"] > 0.9 and evals[-1]["val_loss"] < 0.5, evals[-1]
    steps = records(out, "train")  # the first step's policy is its reference (LoRA: B = 0)
    assert len(steps) == iters and all(set(dpo.METRICS) <= set(r) for r in steps)
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4 and abs(steps[0]["rewards/margins"]) < 1e-3  # (other rows
    # in a batch: fp32 rounding)
    said = stdout + err
    assert "15 held out" in said and ("the reference's log-probabilities" in said) == (mode == "full")


@pytest.mark.slow
def test_the_reference_is_kept_across_a_resume(tmp_path):
    """A full DPO run stopped at a commit and resumed reads its reference log-probabilities back (no second
    pass) and ends as the uninterrupted run, bit for bit; resumed on other pairs, it is refused."""
    from helpers import read_shards
    common = ["--objective=dpo", "--data_path=test_data/preferences.jsonl", "--eval_period=0", "--save_period=2",
              "--optimizer=sgd", "--lr=0.1", f"--offload_path={tmp_path}/off"]
    assert run_main("finetune.py", *common, "--iters=4", f"--out_path={tmp_path}/whole")[0] == 0
    assert run_main("finetune.py", *common, "--iters=2", f"--out_path={tmp_path}/out")[0] == 0
    code, stdout, err = run_main("finetune.py", *common, "--iters=4", f"--out_path={tmp_path}/out", "--resume=1")
    assert code == 0, err
    assert "resuming" in stdout + err and "the reference's log-probabilities" not in stdout + err
    assert [t.tolist() for s in read_shards(tmp_path / "out") for t in s.values()] == \
        [t.tolist() for s in read_shards(tmp_path / "whole") for t in s.values()]
    lines = tmp_path / "other.jsonl"
    lines.write_text(open("test_data/preferences.jsonl").read().replace("Sure.", "Yes."))
    code, _, err = run_main("finetune.py", *common, "--iters=6", f"--data_path={lines}", f"--out_path={tmp_path}/out",
                            "--resume=1")
    assert code != 0 and "the run's data changed since it started" in err
