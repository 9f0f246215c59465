"""What many test modules use: the project's scripts run as a user runs them (run: a subprocess) or in
this process (run_main: for refusals, which end before any work), the check of a refusal (one error
line), folder hashes, a run's metrics, and the offloaded run against the reference (compare.py) with the
tests' defaults. Fixtures are in conftest.py; the families' definitions in families.py."""
import contextlib
import hashlib
import importlib
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import torch

import compare
import loader
from reference import read_meta_folder
from utils import main_guard

ROOT = Path(__file__).resolve().parent.parent
# small, but with every feature of the big ones: GQA, ffn_dim_multiplier, splits that 8 shards divide
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5, "vocab_size": -1}
SEED = compare.SEED


# --- the scripts ---

def run(*args, cwd=ROOT, timeout=600, env=None):
    """A script of the project in a subprocess, as a user runs it: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env=env)
    return p.returncode, p.stdout, p.stderr


def run_main(script, *args):
    """A script's main() in this process under main_guard, as `python script args` runs it: (returncode,
    stdout, stderr). For refusals and short runs, where starting Python and torch would cost more than
    the check; what must run as its own process (signals, torchrun, the first import) uses run."""
    module = importlib.import_module(Path(script).stem)
    out, err, argv, sigint = io.StringIO(), io.StringIO(), sys.argv, signal.getsignal(signal.SIGINT)
    sys.argv, code = [script, *map(str, args)], 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main_guard(module.main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, sigint)  # finetune.py's Ctrl-C handler
    return code, out.getvalue(), err.getvalue()


def one_error_line(code, err, *messages):
    """A refusal: a non-zero exit, no traceback, and exactly one "error:" line, holding each of messages."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and "Traceback" not in err, err
    assert len(errors) == 1 and all(m in errors[0] for m in messages), err
    return errors[0]


def refused(script, *args, messages=(), protect=()):
    """script refuses args with one error line holding messages, leaving the folders in protect as they were."""
    hashes = [folder_hash(p) for p in protect]
    line = one_error_line(*run_main(script, *args)[::2], *messages)
    assert hashes == [folder_hash(p) for p in protect]  # nothing written there
    return line


# --- files ---

def folder_hash(path):
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def read_shards(path):
    return [torch.load(f, weights_only=True) for f in sorted(Path(path).glob("consolidated.*.pth"))]


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj))
    return path


def records(out, kind=None):
    """The lines of a run's metrics.jsonl (of one kind)."""
    rs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rs if kind is None or r["kind"] == kind]


# --- the offloaded step against the reference ---

def make_batches(n_steps, micro_batches=1, batch=2, seq_len=12, vocab=256, seed=0):
    return compare.make_steps(vocab, n_steps, micro_batches, batch, seq_len, seed)


def weights_of(model):
    return {f"{n}.{k}": t.float().clone() for n in model.boxes for k, t in model.read_weights(n).items()}


def ours(load, src, workdir, steps, optimizer="sgd", lr=0.5, dropout=0.0, grad_clip=0.0, budget=None,
         prefetch=True, keep_activations=True, cold=False):
    """Train the offloaded model of src on steps: (losses, {key: fp32 weight}, model)."""
    model = load(src, dropout=dropout, memory_budget=budget, prefetch=prefetch, cold=cold)
    result = compare.offloaded_run(model, workdir, steps, optimizer, lr, grad_clip, keep_activations=keep_activations)
    return result["losses"].tolist(), result["weights"], model


def reference(src, steps, optimizer="sgd", lr=0.5, dropout=0.0, grad_clip=0.0, rope=None, weights=None, params=None):
    """Plain autograd on the Meta folder src (or the given weights and params): (losses, {key: weight}, the
    initial weights)."""
    if weights is None:
        weights, params = read_meta_folder(src)
    result = compare.reference_run(weights, params, steps, optimizer, lr, dropout, grad_clip, rope=rope)
    return result["losses"].tolist(), result["weights"], weights


def assert_updates_match(got, want, initial, rtol=1e-3, marks=None, bound=0.0):
    """Every update (from initial) equals want's to rtol (relative L2); with marks, the marked elements (their
    gradient at rounding level) to bound."""
    bad = compare.mismatched_updates(got, want, initial, marks, rtol, bound)
    assert not bad, ", ".join(f"{key}: relative error {err:.2e}" for key, err in bad)


def setup(model, workdir, mode="full", optimizer="sgd", tokens=24, micro_batches=1, keep_activations=True,
          base_copy=-1, grad_clip=0.0):
    """model.setup_training in a run folder of workdir (workdir/run), the optimizer's other settings
    finetune.py's defaults. Returns the RunFolder."""
    import finetune
    from run_folder import RunFolder
    optim = finetune.settings(optimizer=optimizer if mode == "full" else "adamw", grad_clip=grad_clip).optim
    run = RunFolder(workdir)
    model.setup_training(run, mode, optim, tokens, micro_batches, keep_activations, base_copy, log=lambda *a: None)
    return run


def lora(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wv")):
    from settings import Lora
    return Lora(rank, alpha, dropout, tuple(targets))


def assert_step_matches(got, want, initial, marks, lr):
    """Every update equals autograd's to 1e-3 (relative L2), except elements whose gradient was at rounding
    level (k biases in pairs that hardly turn over 12 positions: a bias there is nearly the same shift of
    every key, whose gradient softmax cancels), where AdamW's +-lr may take either sign: held to 3 lr."""
    for key, w in want.items():
        delta_got, delta_want = got[key] - initial[key], w - initial[key]
        err = torch.linalg.vector_norm(delta_got - delta_want) / torch.linalg.vector_norm(delta_want).clamp(min=1e-20)
        assert compare.update_close(delta_got, delta_want, marks[key], 1e-3, 3 * lr), \
            f"{key}: relative error {err:.2e} ({len(marks[key])} elements at rounding level)"


def load_model(path, tmp_path, **settings):
    """loader.load_model with the offload under tmp_path and no log (for tests that do not use the load fixture)."""
    return loader.load_model(path, offload_path=Path(tmp_path) / "offload", log=lambda *a: None, **settings)


# --- tokenizers made here (conftest's fixtures: ranks, meta_folder, hf_json) ---

TEXTS = ["the thing in the garden, then another thing", "café crème brûlée à la française",
         "中文 text 中 and 文字", "emoji 😀 and 👍🏽 and 🇫🇷", "tabs\tand\nnew lines  \n\n  trailing ",
         "numbers 12345 and it's they're"]
# Meta's list as published in its llama-models repository (Llama 3.1), typed out here independently
META_FIRST = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
              "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# merges after the 256 bytes; "中"[:2] and "文"[:2] are tokens that end inside a character
# "34" before "12" and "  ": texts whose pieces differ unless the pattern cuts digits by 3 and spaces before words
MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ng", b"ing", b" a", "é".encode(), b"34", b"12", b"123",
          b"45", b"  ", "中".encode()[:2], "中".encode(), "文".encode()[:2]]
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]  # hf_json's ids 0, 1, 2


def tokenizer_folder(path, hf_json, post_bos, tokenizer_config=None, config=None, generation=None):
    """A folder with hf_json's tokenizer.json (post_bos: the one whose post-processor puts BOS first) and the
    given config files."""
    path.mkdir(exist_ok=True)
    (path / "tokenizer.json").write_text(hf_json[post_bos])
    for name, obj in (("tokenizer_config.json", tokenizer_config), ("config.json", config),
                      ("generation_config.json", generation)):
        if obj is not None:
            write_json(path / name, obj)
    return path


def byte_of_char():
    """GPT-2's byte-level alphabet: the character each byte is written as in a byte-level BPE vocabulary."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in shown]
    return {**{chr(b): b for b in shown}, **{chr(256 + i): b for i, b in enumerate(others)}}


def sgd_step(model, x, y, lr):
    """One SGD step of a torch model (transformers' own) on the cross-entropy of its logits: the loss."""
    import torch.nn.functional as F
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    loss.backward()
    optimizer.step()
    return loss.item()
