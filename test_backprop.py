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
and every updated tensor (compare.py: the harness the tests use too). python test_backprop.py --make-data
rewrites test_data/ from the reference path.
"""
import sys
import tempfile
import time
from pathlib import Path

import torch

import compare
from compare import LR, backprop_offloaded, backprop_reference, backprop_steps, initial_values
from reference import read_meta_folder
from utils import check_device, main_guard


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
    steps = backprop_steps(initial["tok_embeddings.weight"].shape[0])
    if make_data:
        saved = {"model": compare.weights_hash(initial), "batches": [b for batches in steps for b in batches]}
        for opt in LR:
            result = backprop_reference(model_dir, opt, steps, device)
            saved[opt] = compare.pack_expected({**result, "initial": initial_values(model_dir, opt, initial)})
        compare.DATA_FILE.parent.mkdir(exist_ok=True)
        torch.save(saved, compare.DATA_FILE)
        marked = {opt: sum(len(m) for m in saved[opt]["marks"].values()) for opt in LR}
        print(f"wrote {compare.DATA_FILE}; elements marked at rounding level: {marked}")
        return
    if mode == "data":
        if Path(model_dir).resolve() != default_model().resolve():
            print("data mode compares with outputs saved for the built-in default model only")
            sys.exit(2)
        saved = torch.load(compare.DATA_FILE, weights_only=True)
        if saved["model"] != compare.weights_hash(initial) or "marks" not in saved["sgd"]:
            print(f"{compare.DATA_FILE} was made for other default-model weights or by an older version; "
                  "remake it: python test_backprop.py --make-data")
            sys.exit(1)
        steps = [[batch] for batch in saved["batches"]]
    ok = True
    with tempfile.TemporaryDirectory() as workdir:
        for opt in LR:
            began = time.perf_counter()
            got = backprop_offloaded(model_dir, opt, steps, device, workdir)
            print(f"{opt}: {len(steps)} offloaded steps (and loading, logits) in {time.perf_counter() - began:.2f} s, "
                  f"losses {[round(v, 4) for v in got['losses'].tolist()]}")
            start = initial_values(model_dir, opt, initial)
            if mode == "ref":
                ok &= compare.report(opt, got, backprop_reference(model_dir, opt, steps, device), start, LR[opt])
            elif mode == "data":
                ok &= compare.report(opt, got, compare.unpack_expected(saved[opt], start), start, LR[opt])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main_guard(main)
