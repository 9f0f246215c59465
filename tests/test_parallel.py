"""Data-parallel runs (torchrun, gloo on the CPU): 2 processes x batch_size 2 are 1 process x
batch_size 4; a killed process stops the run; a resumed parallel run ends as an uninterrupted one."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import loader
from adapters import add_lora
from helpers import ROOT, lora, run_main
from parallel import Group

SETTINGS = ["--iters=4", "--seq_len=32", "--eval_period=0", "--save_period=2", "--compute_dtype=float32", "--dropout=0",
            "--dist_timeout=60"]
CASES = {"sgd": ["--optimizer=sgd", "--lr=0.05"],
         "adamw_clip_accum": ["--optimizer=adamw", "--grad_clip=0.5", "--grad_accum=2"],
         "lora": ["--mode=lora", "--lora_dropout=0", "--lora_targets=wq,wv,w2,output"]}


def command(processes, out, offload, *settings):
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launch, "finetune.py", f"--out_path={out}", f"--offload_path={offload}", *settings]


def launch(processes, out, offload, *settings):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # loopback only
    return subprocess.Popen(command(processes, out, offload, *settings), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def train(processes, out, offload, *settings):
    """A run of processes (torchrun); one process runs in this one."""
    if processes == 1:
        code, log, err = run_main("finetune.py", f"--out_path={out}", f"--offload_path={offload}", *settings)
        assert code == 0, err[-3000:]
        return log + err
    p = launch(processes, out, offload, *settings)
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log[-3000:]
    return log


def losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def trained(out, mode):
    """{name: tensor} of the committed run: the module files' weights and AdamW moments, or the adapters."""
    state = json.loads((out / "run" / "state.json").read_text())
    if mode == "lora":  # the adapters in order, and the AdamW moments of each from the checkpoint
        checkpoint = torch.load(out / "run" / state["checkpoint"], weights_only=True)
        names = [f"{k}:{i}" for k, pair in checkpoint["tensors"].items() for i in range(len(pair))]
        tensors = [t for pair in checkpoint["tensors"].values() for t in pair]
        moments = checkpoint["optimizer"]["state"]
        return {**dict(zip(names, tensors)), **{f"{name}:{m}": moments[i][m] for i, name in enumerate(names)
                                                if i in moments for m in ("exp_avg", "exp_avg_sq")}}  # (an expert's
        # adapters have none until a token chooses it)
    return {f"{name}/{k}": t for name, file in state["files"].items()
            for k, t in safetensors.torch.load_file(out / "run" / file).items() if not k.endswith(":step")}


def initial(offload):
    """The source's weights in fp32 (the working copy's start): {module/key: tensor}."""
    folder = next(p for p in offload.iterdir() if p.is_dir())
    return {f"{f.name.removesuffix('.safetensors')}/{k}": t.float()
            for f in folder.glob("*.safetensors") for k, t in safetensors.torch.load_file(f).items()}


def lora_start(offload, settings, model_path=None):
    """The adapters a LoRA run of the model (the built-in one) starts from (seed 1337, rank 8)."""
    model = loader.load_model(model_path, offload_path=offload, log=lambda *_: None)
    targets = next(s for s in settings if s.startswith("--lora_targets=")).split("=")[1].split(",")
    add_lora(model, lora(8, 16.0, 0.0, targets), seed=1337)
    model.close()
    return {f"{k}:{i}": t.detach() for k, pair in model.lora.items() for i, t in enumerate(pair)}


def assert_runs_match(one, two, start, mode, tiny_share=0.01):
    """Two runs' trained tensors (one process, two) equal but for the order of float sums: each tensor's change
    from start compared (tiny_share: the most of a tensor whose AdamW moment may be at rounding level)."""
    eps = torch.finfo(torch.float32).eps
    for name in one:  # the change each made, compared: only the order of float sums differs
        change = one[name] - start[name] if name in start else one[name]  # moments: as they are
        # LoRA: the first gradients of A are products with B, which starts at zero: sums of tiny terms, where
        # the order of the sums shows most, and A and B then move each other (measured: up to 5e-4 in one of 26)
        diff, rtol = two[name] - one[name], 1e-3 if mode == "lora" else 1e-5
        if f"{name}:exp_avg" in one:
            # AdamW moves a weight by about lr whatever the size of its gradient, so where the gradient is
            # about zero its rounding decides the sign: those elements are left out, and the others compared
            # at 3e-5 (the moments, linear in the gradients, are compared whole at 1e-5)
            moment = one[f"{name}:exp_avg"].abs()
            tiny = (moment > 0) & (moment < 1e-3 * moment[moment > 0].mean())  # 0: rows of tokens not in the data
            assert tiny.float().mean() < tiny_share, name
            diff, change, rtol = diff[~tiny], change[~tiny], max(rtol, 3e-5)
        rounding = 2 * 4 * eps * one[name].norm()  # the weights' own last bits, rounded at each of 4 steps
        assert diff.norm() <= rtol * change.norm() + rounding, name


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_with_their_rows(tmp_path, case):
    mode = "lora" if "--mode=lora" in CASES[case] else "full"
    settings = [*SETTINGS, *CASES[case]]
    train(1, tmp_path / "one", tmp_path / "off", "--batch_size=4", *settings)
    log = train(2, tmp_path / "two", tmp_path / "off", "--batch_size=2", *settings)
    assert "2 processes, 2 on this machine: 4 rows a micro-batch" in log
    assert log.count("step 4/4") == 1  # progress is printed by the first process only
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    one, two = trained(tmp_path / "one", mode), trained(tmp_path / "two", mode)
    assert one.keys() == two.keys() and len(one) > 5
    start = initial(tmp_path / "off") if mode == "full" else lora_start(tmp_path / "off", CASES[case])
    assert_runs_match(one, two, start, mode)
    assert any((one[k] - two[k]).abs().max() > 0 for k in one) or mode == "lora"  # two runs, not one run twice


def children(pid):
    """The processes whose parent is pid: {RANK: pid}."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
                found[int(env.get("RANK", -1))] = int(entry.name)
        except (OSError, ValueError):
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's processes in /proc")
def test_a_killed_process_stops_the_run_and_it_resumes_exactly(tmp_path):
    settings = [*SETTINGS, "--iters=8", "--batch_size=2", "--optimizer=adamw", "--memory_budget=0"]
    train(2, tmp_path / "whole", tmp_path / "off", *settings)
    p = launch(2, tmp_path / "cut", tmp_path / "off", *settings)
    for line in p.stdout:  # until step 5 is printed, then SIGKILL the second process
        if line.startswith("step 5/"):
            os.kill(children(p.pid)[1], signal.SIGKILL)
            break
    start = time.time()
    log = p.stdout.read()
    assert p.wait(timeout=90) != 0, log[-2000:]
    assert time.time() - start < 90
    assert not children(p.pid)
    committed = json.loads((tmp_path / "cut" / "run" / "state.json").read_text())["step"]
    assert 2 <= committed < 8
    train(2, tmp_path / "cut", tmp_path / "off", *settings, "--resume=1")
    want, got = trained(tmp_path / "whole", "full"), trained(tmp_path / "cut", "full")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])][:5]


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    p = launch(1, tmp_path / "out", tmp_path / "off", *SETTINGS, "--iters=2000", "--batch_size=2")
    for line in p.stdout:
        if line.startswith("step 1/"):
            break
    try:
        code, _, err = run_main(*command(1, tmp_path / "out", tmp_path / "off", *SETTINGS, "--overwrite=1")[1:])
    finally:
        p.kill()
        p.wait()
    assert code != 0
    assert err.strip().splitlines()[-1] == \
        f"error: out_path={tmp_path / 'out'}: another run is using this folder; wait for it to end or choose another out_path"


@pytest.mark.slow
def test_each_machine_removes_its_fp32_copy_of_the_base(tmp_path):
    """Two machines of one process each (here two processes with LOCAL_WORLD_SIZE=1 and folders of their own,
    as on two machines): each machine's first process writes LoRA's fp32 copy of the base into its run folder,
    and each removes it when the run ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    machines = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        folder = tmp_path / f"machine{rank}"
        machines.append((folder, subprocess.Popen(
            command(1, folder / "out", folder / "off", *SETTINGS, "--iters=2", "--mode=lora", "--base_copy=1",
                    "--memory_budget=0"),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for folder, p in machines:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log[-3000:]
        assert (folder / "out" / "run" / "state.json").exists()  # the run's folder on this machine
        assert not list((folder / "out" / "run").glob("*.fp32.safetensors")), folder


def test_processes_holding_different_weights_are_stopped():
    group = Group()
    group.gather = lambda sums: [sums, {**sums, ("layers.0", "attention.wq.weight", 0, 8): 7}]
    same = {("layers.0", "attention.wq.weight", 0, 8): 5, ("lora", "0", 0, 8): 1}
    with pytest.raises(Exception, match="processes 0 and 1 hold different weights in layers.0.attention.wq.weight"):
        group.check_same(same, step=3)
    group.gather = lambda sums: [sums, dict(sums)]
    group.check_same(same, step=3)
