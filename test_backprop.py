"""Integration check of the offloaded training step against plain PyTorch autograd.

python test_backprop.py [MODEL_DIR] [ref|data|none] [DEVICE]
  ref   one model in memory, trained by plain autograd and torch.optim, against the offloaded step: the
        strong check, on any model, with the reference computed in the same process
  data  the offloaded step against outputs saved in test_data/ by the reference path, for the built-in
        default model and the saved batches only: the logits, losses and every update agree with the
        reference to float rounding, on any CPU. Elements whose reference gradient was at rounding level
        in some step (|g| < ROUNDING of the tensor's RMS gradient; their sign, so AdamW's +-lr step, may
        differ between CPUs) are held to a learning-rate bound only; all others to 1e-3 relative L2.
        ref mode marks them from its own reference run and compares the same way
  none  only time the offloaded step
Each check runs two steps with dropout > 0, for SGD and AdamW (every weight trained) and for LoRA
(AdamW on adapters of wq, wv, w2 and output), and compares the logits before and after, the losses
and every updated tensor. python test_backprop.py --make-data rewrites
test_data/ from the reference path.
"""
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reference import LoraLinear, Reference, add_adapters, meta_key, read_meta_folder
from utils import check_device, main_guard

HERE = Path(__file__).resolve().parent
DATA_FILE = HERE / "test_data" / "backprop_default.pt"
SEED, DROPOUT, BATCH, SEQ_LEN, STEPS = 42, 0.1, 2, 16, 2
LR = {"sgd": 1.0, "adamw": 1e-3, "lora": 1e-2}
# see rounding_level: the gradients seen to differ between CPUs were at 1.7e-7 to 1.4e-5 of their tensor's
# RMS; AdamW feels a change in g within a few eps (1e-8) of 0, and the smallest RMS here is 1e-4
ROUNDING = 1e-3
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": ["wq", "wv", "w2", "output"]}


def reference_run(model_dir, optimizer, batches, device, steps=STEPS, adapters=None, edit_grads=None):
    """Plain autograd on all weights (sgd, adamw), or on the given LoRA adapters only (lora). Also marks, per
    trained tensor, the elements whose gradient was at rounding level in some step (see rounding_level).
    edit_grads(step, {key: parameter}) may change the gradients before each optimizer step (tests)."""
    weights, params = read_meta_folder(model_dir)
    model = Reference(weights, params, DROPOUT).to(device)
    if adapters is not None:
        model.requires_grad_(False)
        add_adapters(model, adapters, LORA["alpha"], LORA["dropout"])
    tensors = trained_tensors(model, adapters is not None)
    x = batches[0][0].to(device)
    model.eval()
    logits_before = model(x).cpu()
    model.train()
    opt = torch.optim.SGD(tensors.values(), lr=LR[optimizer]) if optimizer == "sgd" else \
        torch.optim.AdamW(tensors.values(), lr=LR[optimizer])
    torch.manual_seed(SEED)
    losses, marks = [], {k: torch.zeros(0, dtype=torch.int32) for k in tensors}
    for step, (xb, yb) in enumerate(batches[:steps]):
        loss = F.cross_entropy(model(xb.to(device)).flatten(0, 1), yb.to(device).flatten(), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        marks = {k: torch.cat([marks[k], rounding_level(p.grad)]).unique() for k, p in tensors.items()}
        if edit_grads is not None:
            edit_grads(step, tensors)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return {"logits_before": logits_before, "losses": torch.tensor(losses), "marks": marks,
            "weights": {k: p.detach().cpu() for k, p in tensors.items()}, "logits_after": model(x).cpu(),
            "initial": weights}


def trained_tensors(model, lora):
    """{key: parameter} of what a reference run trains, keyed as the offloaded run's updated tensors."""
    if not lora:
        return {meta_key(n): p for n, p in model.named_parameters()}
    return {f"{meta_key(n)}.weight:{ab}": getattr(m, f"lora_{ab.lower()}") for n, m in model.named_modules()
            if isinstance(m, LoraLinear) and m.lora_a is not None for ab in ("A", "B")}


def rounding_level(grad):
    """Flat int32 indices of the elements with 0 < |g| < ROUNDING * RMS(g): float rounding may decide their
    sign, which AdamW's first steps turn into up to +-lr. Exact zeros are structural (embedding rows of tokens not
    in the batch), zero on any CPU, and stay fully checked."""
    g = grad.detach().float().flatten().cpu()
    small = g.abs() < ROUNDING * g.square().mean().sqrt()
    return (small & (g != 0)).nonzero().flatten().int()


def offloaded_run(model_dir, optimizer, batches, device, workdir, steps=STEPS, base_copy=-1, **model_settings):
    from loader import load_llama2
    model = load_llama2(model_dir, offload_path=Path(workdir) / "offload", device=device, dropout=DROPOUT,
                        log=lambda *a: None, **model_settings)
    x = batches[0][0]
    lora = optimizer == "lora"
    if lora:
        model.add_lora(LORA["rank"], LORA["alpha"], LORA["dropout"], LORA["targets"], tensors=make_adapters(model_dir))
    model.eval()
    logits_before = model(x).cpu()
    model.setup_training(Path(workdir) / f"run-{optimizer}", mode="lora" if lora else "full",
                         optimizer="adamw" if lora else optimizer, tokens_per_step=x.numel(), base_copy=base_copy,
                         log=lambda *a: None)
    model.train()
    torch.manual_seed(SEED)
    losses, start = [], time.time()
    for step, batch in enumerate(batches[:steps]):
        losses.append(model.train_step([batch], LR[optimizer]))
    seconds = (time.time() - start) / steps
    model.flush()
    model.eval()
    updated = {f"{name}.{k}": t.float().cpu() for name in model.boxes for k, t in model.read_weights(name).items()}
    if lora:
        updated = {f"{k}:{ab}": t.detach().cpu() for k, pair in model.lora.items() for ab, t in zip("AB", pair)}
    result = {"logits_before": logits_before, "losses": torch.tensor(losses), "weights": updated,
              "logits_after": model(x).cpu(), "seconds": seconds}
    model.close()
    return result


def make_adapters(model_dir):
    """{meta key: (A, B)} for LORA's targets, both random (with B = 0 the first step would not move A)."""
    weights, _ = read_meta_folder(model_dir)
    g = torch.Generator().manual_seed(SEED)
    adapters = {}
    for key, w in weights.items():
        name = key.split(".")[-2] if key != "output.weight" else "output"
        if name in LORA["targets"]:
            adapters[key] = (torch.randn(LORA["rank"], w.shape[1], generator=g) * 0.1,
                             torch.randn(w.shape[0], LORA["rank"], generator=g) * 0.02)
    return adapters


def initial_values(model_dir, optimizer, weights):
    """What the trained tensors start from: the model's weights, or the adapters for LoRA."""
    if optimizer != "lora":
        return weights
    return {f"{k}:{ab}": t for k, pair in make_adapters(model_dir).items() for ab, t in zip("AB", pair)}


def make_batches(vocab, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        window = torch.randint(0, vocab, (BATCH, SEQ_LEN + 1), generator=g)
        batches.append((window[:, :-1], window[:, 1:]))
    return batches


# --- comparing ---

def close(a, b, rtol):
    """The difference is small against the expected values (relative L2 error)."""
    a, b = a.float(), b.float()
    return torch.linalg.vector_norm(a - b).item() <= rtol * max(torch.linalg.vector_norm(b).item(), 1e-20)


def update_close(got, want, marks, rtol, bound):
    """Updates agree: to rtol (relative L2) on every element whose gradient was clear in all steps, and
    within bound on the marked ones, whose gradient was at rounding level in some step."""
    got, want, marks = got.float().flatten(), want.float().flatten(), marks.long()
    clear = torch.ones_like(want, dtype=torch.bool)
    clear[marks] = False
    return close(got[clear], want[clear], rtol) and bool(((got[marks] - want[marks]).abs() <= bound).all())


def compare(name, got, want, initial, rtol=1e-3):
    """[ OK ]/[FAIL] lines for the run of optimizer name (a key of LR); weight updates are compared as deltas
    from the initial weights, want's marks (elements with rounding-level gradients) to a learning-rate bound."""
    checks = [("logits before", close(got["logits_before"], want["logits_before"], 1e-5)),
              ("losses", (got["losses"] - want["losses"]).abs().max().item() < 1e-4),
              ("logits after", close(got["logits_after"], want["logits_after"], rtol))]
    # An AdamW step moves an element by at most ~lr (bias-corrected |m|/sqrt(v) <= 1 at step 1, 1.0013 at
    # step 2, whatever the gradients), so runs whose gradients differ in sign differ by <= 2 lr per step;
    # 3 leaves room for weight decay and eps. SGD moves an element by lr |g|, |g| << 1 here.
    bound = 3 * LR[name] * len(want["losses"])
    bad = [k for k in want["weights"] if not update_close(
        got["weights"][k] - initial[k], want["weights"][k] - initial[k], want["marks"][k], rtol, bound)]
    checks.append((f"all {len(want['weights'])} updated tensors" + (f" (wrong: {', '.join(bad[:5])})" if bad else ""),
                   not bad))
    ok = True
    for what, passed in checks:
        print(f"[{' OK ' if passed else 'FAIL'}] {name}: {what}")
        ok &= passed
    return ok


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


def main():
    from default_model import default_model
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    make_data = "--make-data" in sys.argv
    model_dir = Path(args[0]) if args else default_model()
    mode = args[1] if len(args) > 1 else ("data" if not args else "ref")
    device = check_device(args[2] if len(args) > 2 else "cpu")
    if mode not in ("ref", "data", "none"):
        print(f"usage: python test_backprop.py [MODEL_DIR] [ref|data|none] [DEVICE]; got mode {mode!r}")
        sys.exit(2)
    initial, params = read_meta_folder(model_dir)
    batches = make_batches(initial["tok_embeddings.weight"].shape[0])
    if make_data:
        saved = {"model": weights_hash(initial), "batches": batches}
        for opt in LR:
            result = reference_run(model_dir, opt, batches, device,
                                   adapters=make_adapters(model_dir) if opt == "lora" else None)
            saved[opt] = pack_expected({**result, "initial": initial_values(model_dir, opt, initial)})
        DATA_FILE.parent.mkdir(exist_ok=True)
        torch.save(saved, DATA_FILE)
        marked = {opt: sum(len(m) for m in saved[opt]["marks"].values()) for opt in LR}
        print(f"wrote {DATA_FILE}; elements marked at rounding level: {marked}")
        return
    if mode == "data":
        if Path(model_dir).resolve() != default_model().resolve():
            print("data mode compares with outputs saved for the built-in default model only")
            sys.exit(2)
        saved = torch.load(DATA_FILE, weights_only=True)
        if saved["model"] != weights_hash(initial) or "marks" not in saved["sgd"]:
            print(f"{DATA_FILE} was made for other default-model weights or by an older version; "
                  "remake it: python test_backprop.py --make-data")
            sys.exit(1)
        batches = saved["batches"]
    ok = True
    with tempfile.TemporaryDirectory() as workdir:
        for opt in LR:
            got = offloaded_run(model_dir, opt, batches, device, workdir)
            print(f"{opt}: offloaded step {got['seconds']:.3f} s, losses {[round(v, 4) for v in got['losses'].tolist()]}")
            start = initial_values(model_dir, opt, initial)
            if mode == "ref":
                adapters = make_adapters(model_dir) if opt == "lora" else None
                ok &= compare(opt, got, reference_run(model_dir, opt, batches, device, adapters=adapters), start)
            elif mode == "data":
                ok &= compare(opt, got, unpack_expected(saved[opt], start), start)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main_guard(main)
