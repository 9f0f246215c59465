"""Crash safety: runs killed at random moments resume to exactly the weights of an uninterrupted run."""
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from conftest import ROOT, read_shards, run

SETTINGS = ["--iters=16", "--seq_len=16", "--batch_size=4", "--eval_period=0", "--dropout=0.1", "--save_period=2",
            "--memory_budget=0"]


def command(model, out, tmp_path, mode, *extra):
    return [sys.executable, "finetune.py", f"--model_path={model}", f"--out_path={out}",
            f"--offload_path={tmp_path}/off", f"--mode={mode}", *SETTINGS, *extra]


def final_state(out, mode):
    """Every trained tensor of a finished run, as committed: module files (full) or the adapter (lora)."""
    state = json.loads((out / "run" / "state.json").read_text())
    if mode == "lora":
        adapter = torch.load(out / "adapter.pt", weights_only=True)
        tensors = {f"{k}:{i}": t for k, pair in adapter["tensors"].items() for i, t in enumerate(pair)}
    else:
        tensors = {f"{name}/{k}": t for name, file in state["files"].items()
                   for k, t in safetensors.torch.load_file(out / "run" / file).items()}
    shards = {f"{i}/{k}": t for i, shard in enumerate(read_shards(out)) for k, t in shard.items()}
    return state["step"], tensors, shards


def assert_identical(a, b):
    assert a[0] == b[0]
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])][:5]


def last_step(log_file):
    steps = re.findall(r"step (\d+)/", log_file.read_text())
    return int(steps[-1]) if steps else 0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_killed_runs_resume_bit_exactly(make, tmp_path, mode):
    """SIGKILL three times at random moments of training (a random step, a random time into it), resume
    each time, and compare every trained tensor and the exported model with an uninterrupted run."""
    model = make(seed=41, dim=256, n_heads=8, n_kv_heads=4, n_layers=3, multiple_of=64)
    start = time.time()
    rc, log, err = run(*command(model, tmp_path / "whole", tmp_path, mode)[1:])
    assert rc == 0, err
    step_time = statistics.median(float(t) for t in re.findall(r"\| ([\d.]+) s/step", log))
    want = final_state(tmp_path / "whole", mode)

    rng = random.Random(7)
    out, kills = tmp_path / "killed", []
    for attempt in range(4):
        log_file = tmp_path / f"log{attempt}"
        with open(log_file, "w") as log:
            p = subprocess.Popen(command(model, out, tmp_path, mode, *(["--resume=1"] if attempt else [])),
                                 cwd=ROOT, stdout=log, stderr=subprocess.PIPE, text=True)
            if attempt == 3:
                assert p.wait(timeout=300) == 0, p.stderr.read()
                break
            target = rng.randint(min(max(kills[-1][0] if kills else 0, 1), 14), 14)  # a run may pass 14 before its kill
            while p.poll() is None and last_step(log_file) < target:
                time.sleep(0.005)
            delay = rng.uniform(0, 1.5 * step_time)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills.append((last_step(log_file), f"{delay * 1000:.0f} ms after step {target}"))
    assert_identical(final_state(out, mode), want)
    print(f"{mode}: {time.time() - start:.0f} s; killed {'; '.join(k[1] for k in kills)}")


def test_ctrl_c_commits_the_step_and_resumes_exactly(make, tmp_path):
    model = make(seed=42)
    assert run(*command(model, tmp_path / "whole", tmp_path, "full")[1:])[0] == 0
    out = tmp_path / "stopped"
    p = subprocess.Popen(command(model, out, tmp_path, "full", "--save_period=100"), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step 3/"):
            p.send_signal(signal.SIGINT)
            break
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "--resume=1" in err
    stopped_at = json.loads((out / "run" / "state.json").read_text())["step"]
    assert 3 <= stopped_at < 12  # the step in progress was finished and committed
    rc, _, err = run(*command(model, out, tmp_path, "full", "--save_period=100", "--resume=1")[1:])
    assert rc == 0, err
    assert_identical(final_state(out, "full"), final_state(tmp_path / "whole", "full"))


def test_a_diverging_run_stops_before_committing_the_bad_step(make, tmp_path):
    out = tmp_path / "out"
    rc, log, err = run("finetune.py", f"--model_path={make()}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
                       "--optimizer=sgd", "--lr=1e30", "--iters=5", "--save_period=1", "--seq_len=16", "--eval_period=0")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and len(errors) == 1 and "nothing of this step was committed" in errors[0], err
    failed = int(re.search(r"step (\d+):", errors[0]).group(1))
    assert json.loads((out / "run" / "state.json").read_text())["step"] == failed - 1


def test_a_non_finite_gradient_is_refused(make, load, tmp_path):
    model = load(make())
    model.setup_training(tmp_path / "run", mode="full", optimizer="sgd")
    box = model.layers[0].load()
    nan = torch.full(box.shapes["attention.wq.weight"], float("nan"))
    before = box.weights["attention.wq.weight"].clone()
    with pytest.raises(FloatingPointError, match="layers.0.attention.wq.weight"):
        model.optimizer.update(box, "attention.wq.weight", nan)
    assert torch.equal(box.weights["attention.wq.weight"], before)
