"""What a run leaves to look at: metrics.jsonl, loss.png, report.md; plot.py; and finetune.py --plan=1."""
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import plan as plan_module
from helpers import ROOT, folder_hash, records, run_main

IO_FIELDS = ("rchar", "wchar", "read_bytes", "write_bytes")
HAS_PROC_IO = Path("/proc/self/io").exists()


def picture(path):
    """The decoded PNG: (height, width, channels) floats in [0, 1]."""
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image


def has_colour(image, hex_colour, tolerance=0.03, min_pixels=30):
    rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < tolerance).sum()) >= min_pixels


def test_metrics_file_has_a_line_per_step_and_evaluation(default_run):
    out, _, log = default_run
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    for r in train:
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 20
        assert r["lr"] == pytest.approx(3e-3)
        assert r["tokens"] == r["step"] * 16 * 64  # trained so far
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(16 * 64 / r["seconds"], rel=1e-3)
        assert "grad_norm" not in r  # computed only with grad_clip
        if HAS_PROC_IO:
            assert all(isinstance(r[k], int) and r[k] >= 0 for k in IO_FIELDS)
    assert all(a["elapsed"] <= b["elapsed"] for a, b in zip(train, train[1:]))
    assert train[-1]["loss"] < train[0]["loss"]  # the default run learns
    if HAS_PROC_IO:  # full fine-tuning writes the working copy: the process wrote something
        assert sum(r["wchar"] for r in records(out)) > 0
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 5, 10, 12]
    for r in evals:
        assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["completion"].startswith("The basic problem is one of size.")
    # the printed lines agree with the file (not a terminal: a line per step, no bar)
    printed = [float(x) for x in re.findall(r"step \d+/12 \| loss ([\d.]+)", log)]
    assert printed == pytest.approx([r["loss"] for r in train], abs=1e-4)
    run_records = records(out, "run")
    assert len(run_records) == 1 and run_records[0]["mode"] == "full" and run_records[0]["model"] == "tiny"


def test_loss_plot_and_report(default_run):
    out, _, log = default_run
    image = picture(out / "loss.png")
    assert image.shape[0] >= 400 and image.shape[1] >= 700
    assert has_colour(image, "#1f77b4") and has_colour(image, "#d62728")  # training and validation curves
    report = (out / "report.md").read_text()
    train, evals = records(out, "train"), records(out, "eval")
    assert f"{train[-1]['tokens']:,} tokens" in report and "12 steps" in report
    assert f"loss: {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}" in report
    assert f"val loss: {evals[0]['val_loss']:.4f} -> {evals[-1]['val_loss']:.4f}" in report
    assert str(out / "loss.png") in report and f"python test_gen.py {out}" in report
    assert "consolidated.00.pth" in report  # where the model is
    assert report.strip() in log  # also printed at the end


def test_plot_two_runs(default_run, tmp_path):
    out, _, _ = default_run
    other = tmp_path / "other"
    other.mkdir()
    lines = [{"kind": "train", "step": s, "loss": 7.0 - 0.1 * s} for s in range(1, 21)]
    lines += [{"kind": "eval", "step": s, "val_loss": 7.2 - 0.1 * s, "completion": ""} for s in (0, 10, 20)]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tr')  # torn
    png = tmp_path / "both.png"
    rc, stdout, err = run_main("plot.py", out, other, f"--out={png}")
    assert rc == 0, err
    assert f"wrote {png}" in stdout
    image = picture(png)
    assert image.shape[0] >= 400 and image.shape[1] >= 700
    assert has_colour(image, "#1f77b4") and has_colour(image, "#d62728")  # one colour per run
    rc, _, err = run_main("plot.py", tmp_path / "nothing-here", f"--out={tmp_path / 'x.png'}")
    assert rc != 0 and "no metrics" in err and not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_resumed_run_has_every_step_once(tmp_path):
    """Killed after a commit and after later steps were recorded, then resumed: steps 1..12 once each,
    the records of steps that were not committed dropped, tokens and time carried on."""
    out = tmp_path / "out"
    args = [sys.executable, "finetune.py", f"--out_path={out}", f"--offload_path={tmp_path / 'offload'}",
            "--iters=12", "--save_period=3", "--eval_period=4", "--batch_size=4", "--seq_len=32", "--grad_clip=1.0"]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    try:  # kill when a step past the first commit and not itself a commit is recorded
        while time.time() < deadline and p.poll() is None:
            steps = [r["step"] for r in records(out, "train")] if (out / "metrics.jsonl").exists() else []
            if any(s > 3 and s % 3 for s in steps):
                break
            time.sleep(0.01)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    committed = json.loads((out / "run" / "state.json").read_text())["step"]
    with open(out / "metrics.jsonl", "a") as f:  # as if killed further on, mid-line
        f.write(json.dumps({"kind": "train", "step": committed + 1, "loss": 1.0}) + '\n{"kind": "train", "st')
    rc, log, err = run_main(*args[1:], "--resume=1")
    assert rc == 0, err
    assert f"resuming {out / 'run'} from step {committed}" in log
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["tokens"] for r in train] == [s * 4 * 32 for s in range(1, 13)]
    assert all(r["grad_norm"] > 0 and math.isfinite(r["grad_norm"]) for r in train)
    assert all(a["elapsed"] <= b["elapsed"] for a, b in zip(train, train[1:]))
    assert [r["step"] for r in records(out, "eval")] == [0, 4, 8, 12]
    runs = records(out, "run")
    assert [(r["step"], r["resumed"]) for r in runs] == [(0, False), (committed, True)]
    picture(out / "loss.png")
    assert "12 steps" in (out / "report.md").read_text()


def plan(tmp_path, *extra, offload=None):
    """finetune.py --plan=1's figures and what it printed (the matmul rate measured over a shorter time)."""
    out, offload = tmp_path / "plan-out", offload or tmp_path / "plan-offload"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plan_module, "MATMUL_PROBE_S", 0.3)
        rc, stdout, err = run_main("finetune.py", "--plan=1", "--plan_mb=16", f"--out_path={out}",
                                   f"--offload_path={offload}", *extra)
    assert rc == 0, err
    return json.loads(stdout.strip().splitlines()[-1]), stdout


def check_plan(f, stdout):
    """Every figure positive, and the step times those the printed measurements give: each pass the
    slower of its arithmetic and its disk traffic (plan.step_seconds), recomputed here."""
    for key in ("params", "write_bps", "disk_read_bps", "cache_read_bps", "matmul_flops", "flops_per_step",
                "compute_s", "step_s", "total_s", "peak_ram_bytes", "disk_space_bytes", "run_write_bytes"):
        assert f[key] > 0, key
    assert f["compute_s"] == pytest.approx(f["flops_per_step"] / f["matmul_flops"], rel=1e-3)
    assert f["forward_share"] == pytest.approx(1 / 3 if f["mode"] == "full" else 1 / 2)
    rf, rb, w = f["forward_read_bytes"], f["backward_read_bytes"], f["write_bytes_per_step"]
    assert rf + rb == f["read_bytes_per_step"] and rf == f["working_set_bytes"]
    # device cpu: the I/O's memory copies take time from the arithmetic, unless LoRA maps an fp32 copy of the base
    assert f["copies_share_cpu"] == (f["base_copy_bytes"] == 0) and f["stream_write_bps"] >= f["write_bps"]
    cache, copies = f["cache_read_bps"], f["copies_share_cpu"]
    fwd = f["compute_s"] * f["forward_share"] + rf / cache * copies
    bwd = f["compute_s"] * (1 - f["forward_share"]) + (rb + w) / cache * copies
    warm = max(max(fwd, rf / cache) + max(bwd, rb / cache), w / f["stream_write_bps"])
    cold = max(fwd, rf / f["disk_read_bps"]) + max(bwd, rb / f["disk_read_bps"] + w / f["stream_write_bps"])
    assert f["warm_step_s"] == pytest.approx(warm, rel=1e-6)
    assert f["cold_step_s"] == pytest.approx(cold, rel=1e-6)
    assert f["compute_s"] <= warm * 1.001 and f["compute_s"] <= cold * 1.001
    assert f["warm"] == (f["working_set_bytes"] <= f["cache_room_bytes"])
    step_s = warm if f["warm"] else cold
    assert f["step_s"] == pytest.approx(step_s, rel=1e-3, abs=1e-3)
    assert f["total_s"] >= f["steps"] * step_s * 0.999
    assert f"{f['step_s']:.1f} s/step" in stdout
    assert f"matmul {f['matmul_flops'] / 1e9:.1f} GFLOP/s" in stdout
    assert f"write {f['write_bps'] / 1e9:.2f} GB/s" in stdout


def test_plan_writes_nothing_and_adds_up(tmp_path):
    """Streaming every module (memory_budget=0): a step reads about twice and writes once the fp32
    working copy with AdamW's moments; the model is not converted, out_path not made."""
    before = sorted(p.name for p in tmp_path.iterdir())
    f, stdout = plan(tmp_path, "--memory_budget=0", "--iters=40", "--eval_period=0")
    assert not (tmp_path / "plan-out").exists() and not (tmp_path / "plan-offload").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the probe file is gone too
    assert not f["converted"] and f["steps"] == 40 and f["evaluations"] == 0
    check_plan(f, stdout)
    assert f["resident_modules"] == 1  # the final norm only
    dim = 128  # the built-in model's: its final norm's parameters, the only module not streamed
    working_copy = (f["params"] - dim) * 4 * 3  # fp32 weights and AdamW's two moments
    assert f["write_bytes_per_step"] == working_copy == f["working_set_bytes"]
    assert 1.5 * working_copy < f["read_bytes_per_step"] < 2 * working_copy
    # the built-in model: 4 blocks of dim 128 (wq, wo 128x128; wk, wv 32x128: 2 kv heads of 16; w1, w2, w3
    # 448x128), vocabulary 512: its matmuls are the blocks' and the output's
    block = 2 * 128 * 128 + 2 * 32 * 128 + 3 * 448 * 128
    assert f["params"] == 4 * block + 2 * 512 * 128 + 9 * 128
    assert f["flops_per_step"] == 6 * (4 * block + 512 * 128) * 16 * 64 + 3 * attention_flops(16 * 64, 64)
    assert f"{40 * f['write_bytes_per_step'] / 1e9:.1f} GB over 40 steps" in stdout or \
        f"{40 * f['write_bytes_per_step'] / 1e6:.0f} MB over 40 steps" in stdout


def attention_flops(tokens, row):
    """A forward pass's attention in the built-in model: each token's query against the (row + 1) / 2 keys before
    it on average, 2 FLOPs each for the scores and the weighted values, 8 heads of 16, 4 blocks. The plan counts
    it once for the forward pass and twice for the backward (LoRA too: the gradients at q, k and v)."""
    return 4 * tokens * (row + 1) / 2 * 8 * 16 * 4


def test_plan_of_lora_before_the_conversion(tmp_path):
    """LoRA streaming every module of a model not yet converted: the plan reads the source's shapes and
    writes nothing (no offload file exists to look into). In fp32 over the built-in model's bf16 weights
    the plan counts the fp32 copy of the base that the run would map (set here, not left to auto)."""
    f, stdout = plan(tmp_path, "--mode=lora", "--memory_budget=0", "--iters=40", "--eval_period=0",
                     "--compute_dtype=float32")
    assert not (tmp_path / "plan-out").exists() and not (tmp_path / "plan-offload").exists()
    assert not f["converted"] and f["mode"] == "lora" and f["resident_modules"] == 1
    assert f["compute_dtype"] == "float32" and f["base_copy_bytes"] > 0 and not f["copies_share_cpu"]
    check_plan(f, stdout)
    assert f["write_bytes_per_step"] == 0 and f["read_bytes_per_step"] > 0


def test_plan_of_a_converted_model_and_lora(default_run, tmp_path):
    """With the model converted already, the offload folder is left as it is; LoRA writes nothing a step
    and does 4 FLOPs per parameter per token instead of 6. In bf16 over the bf16 base (set here, not left
    to auto) the base is mapped as it is: no copy."""
    _, offload, _ = default_run
    state = folder_hash(offload)
    f, stdout = plan(tmp_path, "--mode=lora", "--memory_budget=0", "--compute_dtype=bfloat16", offload=offload)
    assert folder_hash(offload) == state and not (tmp_path / "plan-out").exists()
    assert f["converted"] and f["mode"] == "lora"
    assert f["compute_dtype"] == "bfloat16" and f["base_copy_bytes"] == 0 and f["copies_share_cpu"]
    check_plan(f, stdout)
    assert f["write_bytes_per_step"] == 0 and f["read_bytes_per_step"] > 0
    assert f["flops_per_step"] == 4 * f["matmul_params"] * f["tokens_per_step"] + \
        3 * attention_flops(f["tokens_per_step"], 64)
