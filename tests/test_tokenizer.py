"""The three kinds of tokenizers (tokenizer.py) on tiny tokenizers made here, and a Hugging Face model
folder with a tokenizer.json loaded, generating and exported."""
import os

import pytest

import loader
from families import save_as_hf
from helpers import META_FIRST, PATTERN, SPECIAL, TEXTS, byte_of_char, tokenizer_folder, write_json
from tokenizer import load_tokenizer
from utils import UserError

# --- Meta's Llama 3 tokenizer.model (tiktoken) ---

def test_tiktoken_kind_matches_tiktoken_and_the_bytes(meta_folder, ranks):
    import tiktoken
    tok = load_tokenizer(meta_folder)
    n = len(ranks)
    assert (tok.kind, tok.n_words, tok.bos_id, tok.eos_id) == ("tiktoken", n + 256, n, n + 1)
    direct = tiktoken.Encoding(name="direct", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    token_bytes = {rank: token for token, rank in ranks.items()}
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids == [n] + direct.encode(text) + [n + 1]
        assert b"".join(token_bytes[i] for i in ids[1:-1]) == text.encode()
        assert tok.decode(ids) == text
    assert tok.encode("the") == [n, ranks[b"the"]] and tok.encode(" the", bos=False) == [ranks[b" the"]]
    assert tok.encode("12345", bos=False) == [ranks[b"123"], ranks[b"45"]]
    assert tok.encode("a  the", bos=False) == [ord("a"), ord(" "), ranks[b" the"]]


def test_tiktoken_special_ids_sit_after_the_ranks(meta_folder, ranks):
    tok = load_tokenizer(meta_folder)
    n = len(ranks)
    names = META_FIRST + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
    assert tok.special_tokens == {name: n + k for k, name in enumerate(names)}
    assert len(tok.special_tokens) == 256 and tok.special_tokens["<|reserved_special_token_247|>"] == n + 255
    assert tok.stop_ids == {n + 1, n + 8, n + 9}  # <|end_of_text|>, <|eom_id|>, <|eot_id|>


def test_tiktoken_stop_ids_add_the_configs(meta_folder, ranks):
    write_json(meta_folder / "config.json", {"eos_token_id": 7})
    write_json(meta_folder / "generation_config.json", {"eos_token_id": [7, 9]})
    n = len(ranks)
    assert load_tokenizer(meta_folder).stop_ids == {n + 1, n + 8, n + 9, 7, 9}


def test_tiktoken_special_text_stays_text_unless_allowed(meta_folder, ranks):
    tok = load_tokenizer(meta_folder)
    n = len(ranks)
    text = "<|begin_of_text|>user says <|eot_id|> here"
    ids = tok.encode(text)
    assert ids[0] == n and ids.count(n) == 1 and not set(ids[1:]) & set(range(n, n + 256))
    assert tok.decode(ids) == text
    allowed = tok.encode(text, bos=True, allow_special=True)
    assert allowed[0] == n and allowed.count(n) == 1 and n + 9 in allowed  # BOS not doubled
    assert tok.decode(allowed) == "user says  here" and tok.decode(allowed, skip_special=False) == text


def test_tiktoken_partial_decoding_holds_back_split_characters(meta_folder, ranks):
    tok = load_tokenizer(meta_folder)
    token_bytes = {rank: token for token, rank in ranks.items()}
    splits = 0
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        for k in range(len(ids) + 1):
            raw = b"".join(token_bytes[i] for i in ids[:k])
            complete = raw.decode("utf-8", errors="ignore")  # a prefix is only ever incomplete at its end
            assert tok.decode(ids[:k], partial=True) == complete
            splits += complete != raw.decode("utf-8", errors="replace")
    assert splits > 5  # the texts do split characters across tokens


def test_tiktoken_long_runs_are_cut_as_meta_cuts_them(meta_folder, ranks):
    tok = load_tokenizer(meta_folder)
    text = "th" * 20_000 + " x " + " " * 30_000 + "the"
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    assert ids[:2] == [ranks[b"th"]] * 2 and len(ids) < len(text)


@pytest.mark.parametrize("content,message", [
    ("AA== 0\nnot-base64\n", "line 2 is not a base64 token"), ("AA== 0\nAQ== 5\n", "ranks must be 0 to 1"),
    ("AA== 0\nAQ== 1\n", "byte 0x02 has no token")])
def test_tiktoken_bad_ranks_files(tmp_path, content, message):
    (tmp_path / "tokenizer.model").write_text(content)
    with pytest.raises(UserError, match=message) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(e.value)


@pytest.mark.skipif(not os.environ.get("SLOWLLAMA_LLAMA3_TOKENIZER"), reason="SLOWLLAMA_LLAMA3_TOKENIZER: "
                    "a folder with Meta's real Llama 3 tokenizer.model")
def test_meta_llama3_fixture():
    tok = load_tokenizer(os.environ["SLOWLLAMA_LLAMA3_TOKENIZER"])
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == \
        [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.n_words == 128256 and tok.stop_ids >= {128001, 128008, 128009}


# --- Hugging Face's tokenizer.json (tokenizers) ---

def test_tokenizers_kind_round_trips_byte_exact(tmp_path, hf_json):
    tok = load_tokenizer(tokenizer_folder(tmp_path, hf_json, True))
    alphabet = byte_of_char()
    assert (tok.kind, tok.n_words, tok.bos_id) == ("tokenizers", 300, 0)
    assert tok.special_tokens == {s: i for i, s in enumerate(SPECIAL)}
    splits = 0
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        pieces = [bytes(alphabet[c] for c in tok.tok.id_to_token(i)) for i in ids]
        assert b"".join(pieces) == text.encode() and tok.decode(ids) == text
        for k in range(len(ids) + 1):
            raw = b"".join(pieces[:k])
            assert tok.decode(ids[:k], partial=True) == raw.decode("utf-8", errors="ignore")
            splits += raw.decode("utf-8", errors="ignore") != raw.decode("utf-8", errors="replace")
    assert splits > 5


@pytest.mark.parametrize("post_bos,tokenizer_config,bos", [
    (True, None, 0),  # Llama 3: the post-processor puts <|begin_of_text|> first
    (False, {"bos_token": None, "eos_token": "<|end_of_text|>"}, None),  # Qwen, SmolLM2: none
    (False, {"add_bos_token": True, "bos_token": {"content": "<|begin_of_text|>"}}, 0),  # no post-processor: config
    (True, {"add_bos_token": False, "bos_token": "<|begin_of_text|>"}, 0)])  # the post-processor wins
def test_tokenizers_bos_as_the_files_say(tmp_path, hf_json, post_bos, tokenizer_config, bos):
    tok = load_tokenizer(tokenizer_folder(tmp_path, hf_json, post_bos, tokenizer_config))
    assert tok.bos_id == bos
    body = tok.tok.encode("hello there", add_special_tokens=False).ids
    assert tok.encode("hello there") == [bos] * (bos is not None) + body
    assert tok.encode("hello there", bos=False) == body
    written = tok.encode("<|begin_of_text|>hello there", allow_special=True)
    assert written == [0] + body  # the template's BOS, never a second one
    if post_bos or not (tokenizer_config or {}).get("add_bos_token"):  # transformers 5 ignores it; 4 may not
        transformers = pytest.importorskip("transformers")
        reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        for text in TEXTS:
            assert tok.encode(text) == reference(text)["input_ids"]


def test_tokenizers_special_text_stays_text_unless_allowed(tmp_path, hf_json):
    tok = load_tokenizer(tokenizer_folder(tmp_path, hf_json, True))
    text = "user says <|eot_id|> and <|begin_of_text|> here"
    ids = tok.encode(text)
    assert ids.count(0) == 1 and 2 not in ids and tok.decode(ids) == text
    allowed = tok.encode(text, allow_special=True)
    assert allowed.count(2) == 1 and allowed.count(0) == 2  # BOS first, then the one written mid-text
    assert tok.decode(allowed, skip_special=False) == "<|begin_of_text|>" + text
    assert tok.encode(text, allow_special=True) == allowed and tok.encode(text) == ids  # no state left behind


def test_tokenizers_stop_ids_are_the_union(tmp_path, hf_json):
    tok = load_tokenizer(tokenizer_folder(tmp_path, hf_json, True, {"eos_token": "<|end_of_text|>"},
                                   {"eos_token_id": 1}, {"eos_token_id": [1, 2]}))
    assert (tok.eos_id, tok.stop_ids) == (1, {1, 2})
    assert tok.encode("hi", eos=True)[-1] == 1
    bare = load_tokenizer(tokenizer_folder(tmp_path / "bare", hf_json, False, config={"eos_token_id": [2, 1]}))
    assert (bare.eos_id, bare.stop_ids) == (2, {1, 2})  # no tokenizer_config.json: the config's first


def test_tokenizer_json_wins_over_tokenizer_model(tmp_path, hf_json, tokenizer_bytes):
    folder = tokenizer_folder(tmp_path, hf_json, True)
    (folder / "tokenizer.model").write_bytes(tokenizer_bytes)
    assert load_tokenizer(folder).kind == "tokenizers"
    (folder / "tokenizer.json").unlink()
    assert load_tokenizer(folder).kind == "sentencepiece"


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer.json", "{not json", "tokenizer.json: not a Hugging Face tokenizer"),
    ("tokenizer.json", '{"model": {"type": "BPE"}}', "tokenizer.json: not a Hugging Face tokenizer"),
    ("config.json", '{"eos_token_id": "2"}', "config.json: eos_token_id must be"),
    ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: expected a JSON object")])
def test_bad_tokenizer_files(tmp_path, hf_json, name, content, message):
    folder = tokenizer_folder(tmp_path, hf_json, True)
    (folder / name).write_text(content)
    with pytest.raises(UserError, match=message):
        load_tokenizer(folder)


def test_a_folder_without_a_tokenizer(tmp_path):
    with pytest.raises(UserError, match="tokenizer.model: not found"):
        load_tokenizer(tmp_path)


# --- sentencepiece ---

def test_sentencepiece_as_before(tmp_path, tokenizer_bytes):
    import sentencepiece
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_bytes)
    sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_bytes)
    tok = load_tokenizer(tmp_path)
    text = "The basic problem is one of size."
    assert (tok.kind, tok.n_words, tok.bos_id, tok.eos_id, tok.stop_ids) == ("sentencepiece", 256, 1, 2, {2})
    assert tok.encode(text, eos=True) == [1] + sp.encode(text) + [2] and tok.decode(tok.encode(text)) == text
    assert tok.special_tokens == {"<s>": 1, "</s>": 2}
    assert 1 not in tok.encode("<s>x", bos=False)
    assert tok.encode("<s>x</s>", allow_special=True) == [1] + sp.encode("x") + [2]
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 5]})
    assert load_tokenizer(tmp_path).stop_ids == {2, 5}


# --- a model folder with a tokenizer.json ---

def test_hf_model_with_tokenizer_json_loads_generates_and_exports(make, load, tmp_path, hf_json):
    folder = save_as_hf(make(vocab_size=320), tmp_path / "hf")
    (folder / "tokenizer.model").unlink()
    own_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                  "eos_token": "<|end_of_text|>"}
    tokenizer_folder(folder, hf_json, True, own_config, generation={"eos_token_id": [1, 2]})
    fp = loader.fingerprint(folder)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(fp)
    model = load(folder)
    tok = model.tokenizer
    assert (tok.kind, tok.n_words, model.args.vocab_size, tok.stop_ids) == ("tokenizers", 300, 320, {1, 2})
    prompt = tok.encode("the model streams")
    out = model.generate(prompt, 12, stop_ids=tok.stop_ids)
    assert 1 <= len(out) <= 12 and not set(out[:-1]) & tok.stop_ids
    assert tok.decode(prompt + out).startswith("the model streams")
    forced = model.generate(prompt, 12, stop_ids={out[0]})  # stops at the first stop token it makes
    assert forced == out[:1]
    loader.save_model(model, tmp_path / "out_hf", out_format="hf", log=lambda *a: None)
    loader.save_model(model, tmp_path / "out_meta", out_format="meta", log=lambda *a: None)
    for out_dir in (tmp_path / "out_hf", tmp_path / "out_meta"):
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (out_dir / name).read_bytes() == (folder / name).read_bytes(), (out_dir, name)
        assert not (out_dir / "tokenizer.model").exists()
    assert load_tokenizer(tmp_path / "out_meta").encode("the model streams") == prompt
    write_json(folder / "generation_config.json", {"eos_token_id": [1]})
    assert loader.fingerprint(folder) != fp


def test_a_tokenizer_larger_than_the_embedding_rows(make, load, tmp_path, hf_json):
    folder = save_as_hf(make(), tmp_path / "hf")  # 256 rows
    (folder / "tokenizer.model").unlink()
    tokenizer_folder(folder, hf_json, True)
    with pytest.raises(UserError, match="tokenizer.json: 300 tokens, but the model has 256 embedding rows"):
        load(folder)
