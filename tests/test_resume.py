"""Crash safety: runs killed at random moments resume to exactly the weights of an uninterrupted run."""
import json
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from helpers import ROOT, one_error_line, read_shards, run_main, setup

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


@pytest.fixture(scope="module")
def whole(make, tmp_path_factory):
    """{mode: (model folder, its uninterrupted run's final state, the run's median step time)}, made once: a
    model whose steps take long enough to be killed in the middle of one."""
    model = make(seed=41, dim=256, n_heads=8, n_kv_heads=4, n_layers=3, multiple_of=64)
    tmp = tmp_path_factory.mktemp("whole")
    runs = {}
    for mode in ("full", "lora"):
        rc, log, err = run_main(*command(model, tmp / mode, tmp, mode)[1:])
        assert rc == 0, err
        step_time = statistics.median(float(t) for t in re.findall(r"\| ([\d.]+) s/step", log))
        runs[mode] = model, final_state(tmp / mode, mode), step_time
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_killed_runs_resume_bit_exactly(whole, tmp_path, mode):
    """SIGKILL three times at random moments of training (a random step, a random time into it), resume
    each time, and compare every trained tensor and the exported model with an uninterrupted run."""
    model, want, step_time = whole[mode]
    start = time.time()

    rng = random.Random(7)
    out, kills = tmp_path / "killed", []
    for attempt in range(3):
        log_file = tmp_path / f"log{attempt}"
        with open(log_file, "w") as log:
            p = subprocess.Popen(command(model, out, tmp_path, mode, *(["--resume=1"] if attempt else [])),
                                 cwd=ROOT, stdout=log, stderr=subprocess.PIPE, text=True)
            target = rng.randint(min(max(kills[-1][0] if kills else 0, 1), 14), 14)  # a run may pass 14 before its kill
            while p.poll() is None and last_step(log_file) < target:
                time.sleep(0.005)
            delay = rng.uniform(0, 1.5 * step_time)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills.append((last_step(log_file), f"{delay * 1000:.0f} ms after step {target}"))
    code, _, err = run_main(*command(model, out, tmp_path, mode, "--resume=1")[1:])  # to the end
    assert code == 0, err
    assert_identical(final_state(out, mode), want)
    print(f"{mode}: {time.time() - start:.0f} s; killed {'; '.join(k[1] for k in kills)}")


@pytest.mark.slow
def test_ctrl_c_commits_the_step_and_resumes_exactly(whole, tmp_path):
    model, want, _ = whole["full"]
    out = tmp_path / "stopped"
    p = subprocess.Popen(command(model, out, tmp_path, "full", "--save_period=100"), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step 3/"):
            p.send_signal(signal.SIGINT)
            break
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    stopped_at = json.loads((out / "run" / "state.json").read_text())["step"]
    assert 3 <= stopped_at < 12  # the step in progress was finished and committed
    printed = re.search(r"continue with: (.+)", err).group(1)  # the command it printed, run as printed
    assert printed.startswith("python finetune.py") and printed.endswith("--resume=1"), printed
    resumed = subprocess.run(["bash", "-c", printed.replace("python", shlex.quote(sys.executable), 1)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(final_state(out, "full"), want)


def test_a_diverging_run_stops_before_committing_the_bad_step(make, tmp_path):
    out = tmp_path / "out"
    code, log, err = run_main("finetune.py", f"--model_path={make()}", f"--out_path={out}",
                              f"--offload_path={tmp_path}/off", "--optimizer=sgd", "--lr=1e30", "--iters=5",
                              "--save_period=1", "--seq_len=16", "--eval_period=0")
    line = one_error_line(code, err, "nothing of this step was committed")
    failed = int(re.search(r"step (\d+):", line).group(1))
    assert json.loads((out / "run" / "state.json").read_text())["step"] == failed - 1


def test_a_non_finite_gradient_is_refused(make, load, tmp_path):
    model = load(make())
    setup(model, tmp_path)
    box = model.layers[0].load()
    nan = torch.full(box.shapes["attention.wq.weight"], float("nan"))
    before = box.weights["attention.wq.weight"].clone()
    with pytest.raises(FloatingPointError, match="layers.0.attention.wq.weight"):
        model.optimizer.update(box, "attention.wq.weight", nan)
    assert torch.equal(box.weights["attention.wq.weight"], before)
