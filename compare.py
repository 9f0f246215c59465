"""The offloaded training step against the reference: the same steps taken by both, and their results
compared. test_backprop.py's checks and the tests use this one harness.

A step is a list of micro-batches (x, y). reference_run trains reference.Reference with plain autograd
and torch.optim on the micro-batches of each step concatenated; offloaded_run trains the offloaded model
(blackbox_model.Transformer) as finetune.py does. Both seed torch's generator with SEED just before the
first step, so dropout draws the same masks. Updates are compared as deltas from the initial weights
(relative L2 error); elements whose reference gradient was at float rounding level in some step
(rounding_level) may take the other sign on another CPU, which AdamW turns into a whole +-lr step:
those are held to a learning-rate bound only.
"""
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from reference import LoraLinear, Reference, add_adapters, meta_key, read_meta_folder
from settings import Lora

SEED = 42
# the gradients seen to differ in sign between CPUs were at 1.7e-7 to 1.4e-5 of their tensor's RMS; AdamW feels
# a change in g within a few eps (1e-8) of 0, and the smallest RMS in test_backprop's model is 1e-4
ROUNDING = 1e-3
HERE = Path(__file__).resolve().parent
DATA_FILE = HERE / "test_data" / "backprop_default.pt"  # test_backprop.py's data mode
# test_backprop.py's check: two steps with dropout for each optimizer (LoRA: AdamW on adapters of LORA's targets)
DROPOUT, BATCH, SEQ_LEN, STEPS = 0.1, 2, 16, 2
LR = {"sgd": 1.0, "adamw": 1e-3, "lora": 1e-2}
LORA = Lora(rank=4, alpha=8.0, dropout=0.1, targets=("wq", "wv", "w2", "output"))


def make_steps(vocab, n_steps, micro_batches=1, batch=2, seq_len=12, seed=0):
    """n_steps steps of micro_batches random micro-batches (x, y) of batch rows of seq_len tokens."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        window = torch.randint(0, vocab, (micro_batches * batch, seq_len + 1), generator=g)
        steps.append([(w[:, :-1], w[:, 1:]) for w in window.split(batch)])
    return steps


# --- the two runs ---

def reference_run(weights, params, steps, optimizer, lr, dropout=0.0, grad_clip=0.0, adapters=None, lora_alpha=1.0,
                  lora_dropout=0.0, rope=None, device="cpu", probe=None, edit_grads=None):
    """Plain autograd on weights {Meta key: tensor} (Reference's params and rope): every weight trained with
    optimizer "sgd" or "adamw", or (adapters {key: (A, B)}) only the adapters, with AdamW. Returns {losses,
    weights (the trained tensors: Meta keys, or "key:A"/"key:B"), marks (per trained tensor, the flat indices
    of the elements whose gradient was at rounding level in some step), logits_before and logits_after (of
    probe, a batch of tokens, when given)}. edit_grads(step, {key: parameter}) may change the gradients
    before each optimizer step (tests of the comparison)."""
    model = Reference(weights, params, dropout, rope).to(device)
    if adapters is not None:
        model.requires_grad_(False)
        add_adapters(model, adapters, lora_alpha, lora_dropout)
    tensors = trained_tensors(model, adapters is not None)
    result = {"logits_before": logits(model, probe, device)}
    model.train()
    opt = torch.optim.SGD(tensors.values(), lr=lr) if optimizer == "sgd" else \
        torch.optim.AdamW(tensors.values(), lr=lr)
    torch.manual_seed(SEED)
    losses, marks = [], {k: torch.zeros(0, dtype=torch.int32) for k in tensors}
    for i, batches in enumerate(steps):
        x, y = (torch.cat([b[j] for b in batches]).to(device) for j in (0, 1))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        marks = {k: torch.cat([marks[k], rounding_level(p.grad)]).unique() for k, p in tensors.items()}
        if edit_grads is not None:
            edit_grads(i, tensors)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(tensors.values(), grad_clip)
        opt.step()
        losses.append(loss.item())
    return {**result, "losses": torch.tensor(losses), "marks": marks, "logits_after": logits(model, probe, device),
            "weights": {k: p.detach().cpu().clone() for k, p in tensors.items()}}


def offloaded_run(model, run_dir, steps, optimizer, lr, grad_clip=0.0, lora=None, adapters=None, base_copy=-1,
                  keep_activations=True, probe=None):
    """The offloaded model's steps, its run folder in run_dir: every weight trained with optimizer "sgd" or
    "adamw", or LoRA (lora: settings.Lora; adapters: its starting {key: (A, B)}, else LoRA's own start).
    Returns reference_run's figures but the marks, and the model (flushed, in eval mode)."""
    import finetune
    from adapters import add_lora
    from run_folder import RunFolder
    if lora is not None:
        add_lora(model, lora, tensors=None if adapters is None else {k: (a.clone(), b.clone())
                                                                      for k, (a, b) in adapters.items()})
    result = {"logits_before": logits(model, probe, model.device)}
    optim = finetune.settings(optimizer=optimizer if lora is None else "adamw", grad_clip=grad_clip).optim
    model.setup_training(RunFolder(run_dir), "full" if lora is None else "lora", optim,
                         sum(x.numel() for x, _ in steps[0][:1]), len(steps[0]), keep_activations, base_copy,
                         log=lambda *a: None)
    model.train()
    torch.manual_seed(SEED)
    losses = torch.tensor([model.train_step(batches, lr) for batches in steps])
    model.flush()
    model.eval()
    if lora is None:
        weights = {f"{name}.{k}": t.float().cpu().clone() for name in model.boxes
                   for k, t in model.read_weights(name).items()}
    else:
        weights = {f"{k}:{ab}": t.detach().cpu().clone() for k, pair in model.lora.items() for ab, t in zip("AB", pair)}
    return {**result, "losses": losses, "weights": weights, "logits_after": logits(model, probe, model.device),
            "model": model}


def logits(model, tokens, device):
    if tokens is None:
        return None
    model.eval()
    with torch.no_grad():
        return model(tokens.to(device)).float().cpu()


def trained_tensors(model, lora):
    """{key: parameter} of what a reference run trains, keyed as the offloaded run's updated tensors."""
    if not lora:
        return {meta_key(n): p for n, p in model.named_parameters()}
    return {f"{meta_key(n)}.weight:{ab}": getattr(m, f"lora_{ab.lower()}") for n, m in model.named_modules()
            if isinstance(m, LoraLinear) and m.lora_a is not None for ab in ("A", "B")}


def rounding_level(grad):
    """Flat int32 indices of the elements with 0 < |g| < ROUNDING * RMS(g): float rounding may decide their
    sign, which AdamW's first steps turn into up to +-lr. Exact zeros are structural (embedding rows of tokens
    not in the batch), zero on any CPU, and stay fully checked."""
    g = grad.detach().float().flatten().cpu()
    small = g.abs() < ROUNDING * g.square().mean().sqrt()
    return (small & (g != 0)).nonzero().flatten().int()


# --- comparing ---

def relative_error(a, b):
    """|a - b| / |b| (L2 over all elements)."""
    a, b = a.float(), b.float()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-20)).item()


def close(a, b, rtol):
    """The difference is small against the expected values (relative L2 error)."""
    return relative_error(a, b) <= rtol


def update_close(got, want, marks, rtol, bound):
    """Updates agree: to rtol (relative L2) on every element whose gradient was clear in all steps, and
    within bound on the marked ones, whose gradient was at rounding level in some step."""
    got, want, marks = got.float().flatten(), want.float().flatten(), marks.long()
    clear = torch.ones_like(want, dtype=torch.bool)
    clear[marks] = False
    return close(got[clear], want[clear], rtol) and bool(((got[marks] - want[marks]).abs() <= bound).all())


def mismatched_updates(got, want, initial, marks=None, rtol=1e-3, bound=0.0):
    """[(key, relative error)] of the trained tensors whose update (from initial) differs from want's:
    update_close with want's marks, or every element to rtol without them."""
    bad = []
    for key, w in want.items():
        none = torch.zeros(0, dtype=torch.int32)
        delta_got, delta_want = got[key] - initial[key], w - initial[key]
        if not update_close(delta_got, delta_want, none if marks is None else marks[key], rtol, bound):
            bad.append((key, relative_error(delta_got, delta_want)))
    return bad


def report(name, got, want, initial, lr, rtol=1e-3):
    """[ OK ]/[FAIL] lines comparing an offloaded run with a reference run (or the saved data) of optimizer name
    at learning rate lr; True when all pass. An AdamW step moves an element by at most about lr (bias-corrected
    |m|/sqrt(v) <= 1 at step 1, 1.0013 at step 2, whatever the gradients), so runs whose gradients differ in sign
    differ by <= 2 lr per step on the marked elements; 3 lr per step leaves room for weight decay and eps. SGD
    moves an element by lr |g|."""
    bad = mismatched_updates(got["weights"], want["weights"], initial, want["marks"], rtol,
                             3 * lr * len(want["losses"]))
    checks = [("logits before", close(got["logits_before"], want["logits_before"], 1e-5)),
              ("losses", (got["losses"] - want["losses"]).abs().max().item() < 1e-4),
              ("logits after", close(got["logits_after"], want["logits_after"], rtol)),
              (f"all {len(want['weights'])} updated tensors" + (f" (wrong: {', '.join(k for k, _ in bad[:5])})"
                                                                 if bad else ""), not bad)]
    for what, passed in checks:
        print(f"[{' OK ' if passed else 'FAIL'}] {name}: {what}")
    return all(passed for _, passed in checks)


# --- test_backprop.py's check: a model folder's two steps, each optimizer (LR's keys) ---

def backprop_steps(vocab, seed=SEED):
    return make_steps(vocab, STEPS, batch=BATCH, seq_len=SEQ_LEN, seed=seed)


def make_adapters(model_dir):
    """{meta key: (A, B)} for LORA's targets, both random (with B = 0 the first step would not move A)."""
    weights, _ = read_meta_folder(model_dir)
    g = torch.Generator().manual_seed(SEED)
    adapters = {}
    for key, w in weights.items():
        name = key.split(".")[-2] if key != "output.weight" else "output"
        if name in LORA.targets:
            adapters[key] = (torch.randn(LORA.rank, w.shape[1], generator=g) * 0.1,
                             torch.randn(w.shape[0], LORA.rank, generator=g) * 0.02)
    return adapters


def initial_values(model_dir, optimizer, weights):
    """What the trained tensors start from: the model's weights, or the adapters for LoRA."""
    if optimizer != "lora":
        return weights
    return {f"{k}:{ab}": t for k, pair in make_adapters(model_dir).items() for ab, t in zip("AB", pair)}


def backprop_reference(model_dir, optimizer, steps, device="cpu", edit_grads=None):
    weights, params = read_meta_folder(model_dir)
    lora = optimizer == "lora"
    return reference_run(weights, params, steps, "adamw" if lora else optimizer, LR[optimizer], DROPOUT,
                         adapters=make_adapters(model_dir) if lora else None, lora_alpha=LORA.alpha,
                         lora_dropout=LORA.dropout, device=device, probe=steps[0][0][0], edit_grads=edit_grads)


def backprop_offloaded(model_dir, optimizer, steps, device, workdir, base_copy=-1, **model_settings):
    """The offloaded side of the check, the offload and run folders in workdir; the model is closed."""
    from loader import load_model
    model = load_model(model_dir, offload_path=Path(workdir) / "offload", device=device, dropout=DROPOUT,
                       log=lambda *a: None, **model_settings)
    lora = optimizer == "lora"
    result = offloaded_run(model, Path(workdir) / f"run-{optimizer}", steps, "adamw" if lora else optimizer,
                           LR[optimizer], lora=LORA if lora else None, base_copy=base_copy,
                           adapters=make_adapters(model_dir) if lora else None, probe=steps[0][0][0])
    model.close()
    return result


# --- test_backprop.py's saved data: a reference run kept small ---

def pack_expected(result):
    """What test_data keeps of a reference run: the deltas of every tensor, scaled into float16, and the
    marks of rounding-level gradients (int32 flat indices)."""
    deltas = {}
    for k, w in result["weights"].items():
        delta = w - result["initial"][k]
        scale = delta.abs().max().clamp(min=1e-30)
        deltas[k] = {"scale": scale, "delta": (delta / scale).half()}
    return {"logits_before": result["logits_before"], "losses": result["losses"],
            "logits_after": result["logits_after"], "deltas": deltas, "marks": result["marks"]}


def unpack_expected(saved, initial):
    weights = {k: initial[k] + d["delta"].float() * d["scale"] for k, d in saved["deltas"].items()}
    return {**saved, "weights": weights}


def weights_hash(weights):
    h = hashlib.sha256()
    for key, w in weights.items():
        h.update(key.encode() + w.float().contiguous().view(torch.int32).numpy().tobytes())
    return h.hexdigest()
