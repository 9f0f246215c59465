"""Every file the project reads is loaded as plain tensors: a pickle payload is refused and never runs."""
import json
import os

import pytest
import torch

from helpers import run_main


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker):
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)


def expect_refused(args, marker):
    rc, _, err = run_main(*args)
    assert rc != 0 and "Traceback" not in err, err
    assert any(line.startswith("error:") for line in err.splitlines()), err
    assert not marker.exists(), "the payload ran"


def trained(make, tmp_path, *settings):
    model, out = make(), tmp_path / "out"
    rc, _, err = run_main("finetune.py", f"--model_path={model}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
                          "--iters=2", "--seq_len=16", "--eval_period=0", *settings)
    assert rc == 0, err
    return model, out


def test_payload_in_a_shard(make, tmp_path):
    model, marker = make(), tmp_path / "ran"
    plant(model / "consolidated.01.pth", marker)
    expect_refused(["test_gen.py", model, "--offload_path", tmp_path / "off"], marker)


def test_payload_in_a_data_file(make, tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "data.pt", marker)
    expect_refused(["finetune.py", f"--model_path={make()}", f"--data_path={tmp_path}/data.pt",
                    f"--out_path={tmp_path}/out", f"--offload_path={tmp_path}/off"], marker)


def test_payload_in_an_adapter(make, tmp_path):
    model, marker = make(), tmp_path / "ran"
    plant(tmp_path / "adapter.pt", marker)
    expect_refused(["test_gen.py", model, "--lora", tmp_path / "adapter.pt", "--offload_path", tmp_path / "off"], marker)
    expect_refused(["merge_lora.py", model, tmp_path / "adapter.pt", tmp_path / "merged", "--offload_path",
                    tmp_path / "off"], marker)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_payload_in_a_run_checkpoint(make, tmp_path, mode):
    model, out = trained(make, tmp_path, f"--mode={mode}")
    marker = tmp_path / "ran"
    state = json.loads((out / "run" / "state.json").read_text())
    plant(out / "run" / state["checkpoint"], marker)
    expect_refused(["finetune.py", f"--model_path={model}", f"--out_path={out}", f"--offload_path={tmp_path}/off",
                    f"--mode={mode}", "--resume=1", "--iters=4", "--seq_len=16"], marker)


def test_payload_in_the_offload(make, tmp_path):
    model, marker = make(), tmp_path / "ran"
    assert run_main("test_gen.py", model, "--tokens", "1", "--offload_path", tmp_path / "off")[0] == 0
    offload = next((tmp_path / "off").glob("llama-*"))
    plant(offload / "extras.pt", marker)
    expect_refused(["loader.py", model, tmp_path / "copy", "--offload_path", tmp_path / "off"], marker)
    plant(offload / "layers.0.safetensors", marker)  # module files are not pickles at all
    expect_refused(["test_gen.py", model, "--offload_path", tmp_path / "off"], marker)


def test_the_planted_payload_is_real(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "payload.pt", marker)
    torch.load(tmp_path / "payload.pt", weights_only=False)  # what loading without weights_only would do
    assert marker.exists()
