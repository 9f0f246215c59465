"""Config files: every key a format needs is checked for presence and type before use, and bad input is
one line naming the file and the key, never a traceback."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import architectures
import loader
import meta_format
from families import save_as_hf
from helpers import ROOT, refused
from utils import UserError

DELETE = object()  # a case's value meaning "the key removed"

# Every required key of each format and its kind, written out here rather than read from the code: a key
# that stops being checked fails its cases.
META_REQUIRED = {"dim": "int", "n_layers": "int", "n_heads": "int", "multiple_of": "int", "norm_eps": "number"}
HF_REQUIRED = {"architectures": "list", "hidden_size": "int", "num_hidden_layers": "int",
               "num_attention_heads": "int", "intermediate_size": "int", "vocab_size": "int"}
BAD = {"int": [("a string", "64"), ("true", True), ("zero", 0), ("a float", 64.0)],
       "number": [("a string", "1e-5"), ("true", True), ("zero", 0), ("negative", -1e-5)],
       "list": [("a string", "LlamaForCausalLM"), ("empty", []), ("not strings", [1])]}


def cases(required):
    return [pytest.param(key, value, id=f"{key}-{name}") for key, kind in required.items()
            for name, value in [("removed", DELETE), ("null", None), *BAD[kind]]]


# one wrong value of each optional key
META_OPTIONAL_BAD = {"n_kv_heads": "2", "vocab_size": "32000", "ffn_dim_multiplier": "1.3", "rope_theta": "10000",
                     "hidden_dim": "224", "use_scaled_rope": "yes"}
HF_OPTIONAL_BAD = {"num_key_value_heads": "2", "rms_norm_eps": "1e-5", "rope_theta": "10000", "head_dim": "16",
                   "tie_word_embeddings": "false", "max_position_embeddings": "4096"}


@pytest.fixture(scope="module")
def meta_model(make):
    return make(seed=61)


@pytest.fixture(scope="module")
def hf_model(meta_model, tmp_path_factory):
    return save_as_hf(meta_model, tmp_path_factory.mktemp("hf") / "hf")


def edited(src, tmp_path, name, **changes):
    """A copy of a model folder with keys of its config file set (DELETE: removed); the config's path."""
    folder = shutil.copytree(src, tmp_path / "model")
    path = folder / name
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is DELETE]:
        del config[key]
    path.write_text(json.dumps(config))
    return path


def refusal(folder, tmp_path):
    with pytest.raises(UserError) as e:
        loader.load_model(folder, offload_path=tmp_path / "offload", log=lambda *a: None)
    message = str(e.value)
    assert "\n" not in message
    return message


def assert_names(message, path, key):
    assert message.startswith(f"{path}: ") and key in message.removeprefix(f"{path}: "), message


@pytest.mark.parametrize("key,value", cases(META_REQUIRED))
def test_every_required_params_key_is_checked(meta_model, tmp_path, key, value):
    path = edited(meta_model, tmp_path, "params.json", **{key: value})
    assert_names(refusal(path.parent, tmp_path), path, key)


@pytest.mark.parametrize("key,value", cases(HF_REQUIRED))
def test_every_required_config_key_is_checked(hf_model, tmp_path, key, value):
    path = edited(hf_model, tmp_path, "config.json", **{key: value})
    assert_names(refusal(path.parent, tmp_path), path, key)


@pytest.mark.parametrize("key,value", META_OPTIONAL_BAD.items())
def test_optional_params_keys_of_a_wrong_type(meta_model, tmp_path, key, value):
    path = edited(meta_model, tmp_path, "params.json", **{key: value})
    assert_names(refusal(path.parent, tmp_path), path, key)


@pytest.mark.parametrize("key,value", HF_OPTIONAL_BAD.items())
def test_optional_config_keys_of_a_wrong_type(hf_model, tmp_path, key, value):
    path = edited(hf_model, tmp_path, "config.json", **{key: value})
    assert_names(refusal(path.parent, tmp_path), path, key)


def test_the_messages_read_as_documented(meta_model, tmp_path):
    path = edited(meta_model, tmp_path / "a", "params.json", dim=DELETE)
    assert refusal(path.parent, tmp_path) == f"{path}: missing the key 'dim'"
    path = edited(meta_model, tmp_path / "b", "params.json", dim=None)
    assert refusal(path.parent, tmp_path) == f"{path}: dim must be a positive integer, not None"


@pytest.mark.parametrize("name,model", [("params.json", "meta_model"), ("config.json", "hf_model")])
def test_a_config_that_is_not_an_object(request, tmp_path, name, model):
    folder = shutil.copytree(request.getfixturevalue(model), tmp_path / "model")
    (folder / name).write_text("[64, 2]")
    assert refusal(folder, tmp_path) == f"{folder / name}: expected a JSON object"


@pytest.mark.parametrize("name,model,changes", [
    ("params.json", "meta_model", {"n_kv_heads": 3}), ("params.json", "meta_model", {"n_heads": 64, "n_kv_heads": 32}),
    ("config.json", "hf_model", {"num_attention_heads": 3, "num_key_value_heads": 3}),
    ("config.json", "hf_model", {"num_attention_heads": 64, "num_key_value_heads": 32})], ids=str)
def test_head_counts_that_do_not_fit(request, tmp_path, name, model, changes):
    path = edited(request.getfixturevalue(model), tmp_path, name, **changes)
    message = refusal(path.parent, tmp_path)
    assert message.startswith(f"{path}: ") and "do not fit" in message, message


def test_an_unsupported_architecture(hf_model, tmp_path):
    path = edited(hf_model, tmp_path, "config.json", architectures=["GPT2LMHeadModel"])
    assert "architecture GPT2LMHeadModel" in refusal(path.parent, tmp_path)


@pytest.mark.parametrize("changes", [{"n_kv_heads": None}, {"ffn_dim_multiplier": None}, {"rope_theta": None},
                                     {"rope_theta": 500000.0}, {"vocab_size": 256}, {"use_scaled_rope": True},
                                     {"multiple_of": DELETE, "hidden_dim": 224}], ids=str)
def test_good_optional_params_values_are_taken(meta_model, tmp_path, changes):
    meta_format.read_params(edited(meta_model, tmp_path, "params.json", **changes).parent)


@pytest.mark.parametrize("changes", [{"num_key_value_heads": None}, {"rope_theta": None}, {"head_dim": None},
                                     {"head_dim": 16}, {"tie_word_embeddings": False}, {"rms_norm_eps": 1e-6},
                                     {"max_position_embeddings": 4096}, {"rms_norm_eps": DELETE}], ids=str)
def test_good_optional_config_values_are_taken(hf_model, tmp_path, changes):
    architectures.read_config(edited(hf_model, tmp_path, "config.json", **changes).parent)


def test_hidden_dim_stands_for_multiple_of(meta_model, tmp_path):
    path = edited(meta_model, tmp_path, "params.json", multiple_of=DELETE, hidden_dim=224)
    model = loader.load_model(path.parent, offload_path=tmp_path / "offload", log=lambda *a: None)
    assert model.args.hidden_dim == 224
    model.close()


def test_a_null_dim_is_one_line_from_the_command_line(meta_model, tmp_path):
    path = edited(meta_model, tmp_path, "params.json", dim=None)
    line = refused("test_gen.py", path.parent, "cpu", "--offload_path", tmp_path / "offload")
    assert line == f"error: {path}: dim must be a positive integer, not None"


def test_large_tensors_get_huge_pages_where_the_os_gives_them():
    """utils asks PyTorch's allocator for transparent huge pages before the first tensor exists: in a
    fresh process that imports the training script, a 64 MB tensor lies in 2 MB pages."""
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages here")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off on this machine")
    code = ("import finetune, torch; x = torch.ones(16 << 20); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert child.returncode == 0, child.stderr
    assert int(child.stdout) > 0  # kB (the OS may be short of huge pages: not necessarily all 64 MB)



BACKGROUND_THREADS = """
import os, sys, threading, torch, default_model, loader
from pathlib import Path
from adapters import add_lora
from helpers import TINY, lora, setup
mode, dtype, out = sys.argv[1], getattr(torch, sys.argv[2]), Path(sys.argv[3])
tokenizer = default_model.train_tokenizer(default_model.DEFAULT_TEXT, 256)
source = default_model.make_model(out / "source", TINY, tokenizer, 1, 0, torch.bfloat16)
model = loader.load_model(source, offload_path=out / "offload", compute_dtype=dtype, memory_budget=0, log=print)
if mode == "lora":
    add_lora(model, lora(4, 8.0, 0.0, ["wq", "wv"]))
setup(model, out, mode, "adamw", tokens=8, base_copy=1)
tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
for _ in range(2):
    model.train_step([(tokens[:, :-1], tokens[:, 1:])], 1e-3)
new = []  # threads each later step leaves: a team made at every step would show in each
for _ in range(3):
    threads = len(os.listdir("/proc/self/task"))
    model.train_step([(tokens[:, :-1], tokens[:, 1:])], 1e-3)
    new.append(len(os.listdir("/proc/self/task")) - threads)
later = []
thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
thread.start()
thread.join()
print(torch.get_num_threads(), model.offload.io.submit(torch.get_num_threads).result(), min(new), later[0])
"""


@pytest.mark.parametrize("mode,dtype,background", [("lora", "float32", 1), ("full", "float32", 1),
                                                   ("full", "bfloat16", 2)])
@pytest.mark.slow
def test_the_background_thread_runs_on_one_thread_where_steps_only_map_files(tmp_path, mode, dtype, background):
    """Steps that only map files (fp32 LoRA over the fp32 copy, full fp32 over the working copy) leave
    the background thread's torch work on that thread: no OpenMP team of its own beside the step's
    (more OpenMP threads than cores make OpenMP put idle threads to sleep at once). Steps that convert
    at every read (bf16 copies of fp32 weights) keep its team. Threads started later get the usual count.
    (A thread the OS shows for a moment, on a loaded machine, may fall into one step's count: the check is
    that some step leaves none.)"""
    if not torch.backends.openmp.is_available() or (os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"):
        pytest.skip("needs OpenMP, two cores and /proc")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    child = subprocess.run([sys.executable, "-c", BACKGROUND_THREADS, mode, dtype, str(tmp_path)],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert child.returncode == 0, child.stderr
    step_threads, background_threads, new_threads, later_threads = map(int, child.stdout.split("\n")[-2].split())
    assert (step_threads, background_threads, new_threads, later_threads) == (2, background, 0, 2), child.stdout
