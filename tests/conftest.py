import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import default_model  # noqa: E402
import loader  # noqa: E402

# small, but with every feature of the big ones: GQA, ffn_dim_multiplier, splits that 8 shards divide
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5, "vocab_size": -1}


@pytest.fixture(scope="session")
def tokenizer_bytes():
    return default_model.train_tokenizer(default_model.DEFAULT_TEXT, 256)


@pytest.fixture(scope="session")
def make(tmp_path_factory, tokenizer_bytes):
    """make(n_shards=2, seed=0, dtype=bf16, **params): a fresh Meta-format model folder."""
    def make(n_shards=2, seed=0, dtype=torch.bfloat16, **params):
        path = tmp_path_factory.mktemp("model") / "llama"
        return default_model.make_model(path, {**TINY, **params}, tokenizer_bytes, n_shards, seed, dtype)
    return make


@pytest.fixture
def load(tmp_path):
    """load(model_dir, **settings): the offloaded model, its offload under this test's tmp_path."""
    models = []

    def load(model_dir, **settings):
        settings.setdefault("log", lambda *a: None)
        model = loader.load_llama2(model_dir, offload_path=tmp_path / "offload", **settings)
        models.append(model)
        return model
    yield load
    for model in models:
        model.close()


def run(*args, cwd=ROOT, timeout=600):
    """A script of the project in a subprocess: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def folder_hash(path):
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def read_shards(path):
    return [torch.load(f, weights_only=True) for f in sorted(Path(path).glob("consolidated.*.pth"))]
