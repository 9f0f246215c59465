"""The fixtures every test module may use: tiny models in Meta's layout (make) and each family's Hugging Face
layout (hf_folder), the offloaded model of a folder (load), tokenizers of each kind made here, and one
default run of finetune.py shared by the tests that only read what it leaves. Helpers are in helpers.py,
the families' definitions in families.py.

Tests marked slow start processes of their own (finetune.py runs, torchrun, kills): pytest -m "not slow"
is the quick inner loop; the suite runs everything."""
import base64
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import default_model  # noqa: E402
import families  # noqa: E402
import loader  # noqa: E402
from helpers import MERGES, SPECIAL, TEXTS, TINY, run  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes of its own (finetune.py, torchrun, kills)")


@pytest.fixture(scope="session")
def tokenizer_bytes():
    """A sentencepiece tokenizer.model of 256 pieces, trained on slowllama.txt."""
    return default_model.train_tokenizer(default_model.DEFAULT_TEXT, 256)


@pytest.fixture(scope="session")
def make(tmp_path_factory, tokenizer_bytes):
    """make(n_shards=2, seed=0, dtype=bf16, **params): a fresh model folder in Meta's layout (TINY's shape)."""
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
        model = loader.load_model(model_dir, offload_path=tmp_path / "offload", **settings)
        models.append(model)
        return model
    yield load
    for model in models:
        model.close()


@pytest.fixture
def hf_folder(tmp_path, tokenizer_bytes):
    """hf_folder(family, seed=0, dtype=float32, name=family, image_text=None, **config changes): a Hugging Face
    folder of a family of families.FAMILIES, random weights, the 256-piece sentencepiece tokenizer (image_text:
    as Gemma 3's image-text checkpoints hold their text model, families.write_folder)."""
    def make(family, seed=0, dtype=torch.float32, name=None, image_text=None, **changes):
        return families.write_folder(tmp_path / (name or family), families.config_of(family, **changes), seed, dtype,
                                     tokenizer_bytes, image_text)
    return make


# --- tokenizers made here ---

@pytest.fixture(scope="session")
def ranks():
    """Meta's Llama 3 tokenizer.model's content in small: the 256 bytes, then MERGES."""
    return {token: rank for rank, token in enumerate([bytes([b]) for b in range(256)] + MERGES)}


@pytest.fixture
def meta_folder(tmp_path, ranks):
    """A folder with a tiktoken ranks file as tokenizer.model, as Meta's Llama 3 folders have."""
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.fixture(scope="session")
def hf_json():
    """tokenizer.json text of a byte-level BPE trained here (300 tokens), with (True) and without (False)
    a post-processor putting <|begin_of_text|> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([default_model.DEFAULT_TEXT.read_text(), *TEXTS * 3], trainer)
    plain = tok.to_str()
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[(SPECIAL[0], 0)])
    return {False: plain, True: tok.to_str()}


# --- one run shared by the tests that read what it leaves ---

@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The default run (the built-in model, slowllama.txt): 12 steps with evaluations at 0, 5, 10 and 12, a
    tenth of the text held out. (out_path, offload folder, stdout)."""
    tmp = tmp_path_factory.mktemp("default_run")
    out = tmp / "out"
    code, log, err = run("finetune.py", "--iters=12", "--eval_period=5", "--val_fraction=0.1",
                         f"--out_path={out}", f"--offload_path={tmp / 'offload'}")
    assert code == 0, err
    return out, tmp / "offload", log


@pytest.fixture(scope="session")
def byte_fallback_tokenizer():
    """A sentencepiece BPE of 512 pieces with the 256 byte pieces (<0x00>...) every Llama sentencepiece model
    has: llama.cpp stops with an error on a character outside a vocabulary without them."""
    import io

    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        input=str(default_model.DEFAULT_TEXT), model_writer=model, vocab_size=512, model_type="bpe",
        character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        byte_fallback=True)
    return model.getvalue()
