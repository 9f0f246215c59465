"""The tokenizer of a model as GGUF metadata: sentencepiece as tokenizer.ggml.model "llama" (pieces,
scores, types read from the .model file); byte-level BPE (tokenizer.json, Meta's Llama 3 tiktoken
file) as "gpt2" with merges and a pre-tokenizer name llama.cpp knows; special token ids, add_bos,
the chat template. Names and types follow llama.cpp's convert_hf_to_gguf.py and llama-vocab.cpp."""

from pathlib import Path

from chat import template_of, token_text
from tokenizer import LLAMA3_PATTERN, read_ranks
from utils import UserError, read_json_object

# pre-tokenizers of byte-level BPE tokenizers, by the regular expression that splits text before the
# merges, and the names llama.cpp gives them (llama-vocab.cpp)
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {LLAMA3_PATTERN: "llama-bpe", QWEN2_PATTERN: "qwen2"}
# token types (gguf.TokenType, the same numbers as sentencepiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Meta's Llama 3 chat format (chat.meta_llama3) as a template, for Meta's folders, which have none
LLAMA3_TEMPLATE = ("{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
                   "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")



def gguf():
    try:
        import gguf as module
    except ImportError:
        raise UserError("GGUF files (reading and writing them) need the gguf package: pip install gguf")
    return module



def byte_alphabet():
    """GPT-2's byte-level alphabet: the character each byte is written as in a byte-level vocabulary."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in shown]
    return {**{b: chr(b) for b in shown}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def vocabulary(model):
    """The tokenizer's GGUF metadata as a dict, its token list padded to the embedding rows."""
    tok, folder, n = model.tokenizer, model.offload_dir, model.args.vocab_size
    if tok.kind == "sentencepiece":
        vocab = sentencepiece_vocab(tok.sp, tok.path)
    elif tok.kind == "tiktoken":
        vocab = tiktoken_vocab(tok)
    else:
        vocab = tokenizer_json_vocab(tok, folder)
    tokens, types = vocab["tokens"], vocab["types"]
    if len(tokens) > n:
        raise UserError(f"{tok.path}: {len(tokens)} tokens, but the model has {n} embedding rows")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n)]  # rows no token names, as llama.cpp's converter
    types += [UNUSED] * (n - len(types))
    if vocab.get("scores") is not None:
        vocab["scores"] += [-10000.0] * (n - len(vocab["scores"]))
    config = {**read_json_object(folder / "special_tokens_map.json", optional=True),
              **read_json_object(folder / "tokenizer_config.json", optional=True)}
    ids = {text: i for i, text in enumerate(tokens)}
    configured_bos = read_json_object(folder / "config.json", optional=True).get("bos_token_id")  # Qwen: named, never added
    vocab["bos"] = tok.bos_id if tok.bos_id is not None else configured_bos if isinstance(configured_bos, int) else None
    vocab["add_bos"] = tok.bos_id is not None
    vocab["eos"] = tok.eos_id
    if vocab.get("pad") is None:
        vocab["pad"] = ids.get(token_text(config.get("pad_token")))
    for key, names in (("eot", ("<|eot_id|>", "<|im_end|>")), ("eom", ("<|eom_id|>",))):
        found = [ids[name] for name in names if name in ids and ids[name] in tok.stop_ids and ids[name] != tok.eos_id]
        vocab[key] = found[0] if found else None
    template = template_of(folder)
    if template is None and "<|start_header_id|>" in tok.special_tokens:
        template = LLAMA3_TEMPLATE  # Meta's folders: the format chat.py renders for them
    vocab["chat_template"] = template
    return vocab


def sentencepiece_vocab(sp, path):
    """tokenizer.ggml.model "llama": the pieces, their scores and types (sentencepiece's own: normal,
    unknown, control, user-defined, unused, byte), as llama.cpp's converter writes them."""
    n = sp.vocab_size()
    types = piece_types(Path(path).read_bytes(), n)
    if types is None:  # not readable here: the flags sentencepiece gives (user-defined pieces as normal)
        types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                 else BYTE if sp.is_byte(i) else NORMAL for i in range(n)]
    return {"model": "llama", "pre": "default", "tokens": [sp.id_to_piece(i) for i in range(n)],
            "scores": [sp.get_score(i) for i in range(n)], "types": types,
            "unk": sp.unk_id() if sp.unk_id() >= 0 else None, "pad": sp.pad_id() if sp.pad_id() >= 0 else None,
            "add_space_prefix": add_dummy_prefix(Path(path).read_bytes())}


def proto_fields(data):
    """(field number, wire type, value) of a protobuf message: varints as ints, the rest as bytes."""
    i = 0
    while i < len(data):
        key, i = varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(data, i)
        elif wire == 2:
            size, i = varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"wire type {wire}")
        yield field, wire, value


def varint(data, i):
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def piece_types(model_bytes, n):
    """Each piece's type from a sentencepiece model (ModelProto: field 1 the pieces, each with its
    type in field 3, NORMAL when absent); None when the file does not read as expected."""
    try:
        types = [next((v for f, w, v in proto_fields(piece) if f == 3 and w == 0), NORMAL)
                 for f, w, piece in proto_fields(model_bytes) if f == 1 and w == 2]
    except (ValueError, IndexError):
        return None
    return types if len(types) == n and all(NORMAL <= t <= BYTE for t in types) else None


def add_dummy_prefix(model_bytes):
    """normalizer_spec.add_dummy_prefix of a sentencepiece model (field 3, then 3; true when absent)."""
    try:
        for f, w, spec in proto_fields(model_bytes):
            if f == 3 and w == 2:
                return bool(next((v for g, x, v in proto_fields(spec) if g == 3 and x == 0), 1))
    except (ValueError, IndexError):
        pass
    return True


def tiktoken_vocab(tok):
    """Meta's Llama 3 tokenizer.model as tokenizer.ggml.model "gpt2": the ranks' byte strings in GPT-2's
    byte alphabet, then Meta's special tokens; the merges recovered from the ranks (each token of two
    or more bytes is the merge of the two parts byte-pair encoding with the ranks below its own makes)."""
    ranks = read_ranks(tok.path)
    alphabet = byte_alphabet()
    spell = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    ordered = sorted(ranks, key=ranks.get)
    merges = []
    for token in ordered:
        if len(token) > 1:
            parts = bpe_parts(ranks, token, ranks[token])
            if len(parts) != 2:
                raise UserError(f"{tok.path}: token {token!r} is not the merge of two tokens of lower rank; "
                                "not a byte-pair vocabulary GGUF can describe")
            merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    specials = sorted(tok.special_tokens, key=tok.special_tokens.get)
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": [spell(t) for t in ordered] + specials,
            "types": [NORMAL] * len(ordered) + [CONTROL] * len(specials), "merges": merges, "unk": None}


def bpe_parts(ranks, token, max_rank):
    """The parts byte-pair encoding makes of token with the merges of rank below max_rank."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_json_vocab(tok, folder):
    """tokenizer.json: byte-level BPE as "gpt2" with its merges; a sentencepiece-style BPE (Llama 2's,
    Mistral's) from the sentencepiece tokenizer.model beside it, with tokenizer.json's added tokens."""
    import json
    spec = json.loads(tok.path.read_text())
    model = spec.get("model") or {}
    added = {t.get("id"): t for t in spec.get("added_tokens") or []}
    if not is_byte_level(spec):
        sp_path = Path(folder) / "tokenizer.model"
        if model.get("type") == "BPE" and sp_path.is_file() and not is_ranks(sp_path):
            from tokenizer import Tokenizer
            vocab = sentencepiece_vocab(Tokenizer(sp_path).sp, sp_path)
            tokens, types, scores = vocab["tokens"], vocab["types"], vocab["scores"]
            for i, t in sorted(added.items()):  # tokenizer.json's added tokens over (or after) the pieces
                if i >= len(tokens):
                    gap = range(len(tokens), i + 1)
                    tokens += [f"[PAD{j}]" for j in gap]
                    types += [UNUSED] * len(gap)
                    scores += [-10000.0] * len(gap)
                if types[i] not in (UNKNOWN, CONTROL):
                    tokens[i] = t["content"]
                    types[i] = CONTROL if t.get("special") else USER_DEFINED
            return vocab
        raise UserError(f"{tok.path}: a {model.get('type')} tokenizer that is not byte-level; GGUF export reads such "
                        "a vocabulary from its sentencepiece tokenizer.model, which this model folder lacks")
    if model.get("type") != "BPE":
        raise UserError(f"{tok.path}: a byte-level {model.get('type')} tokenizer; GGUF's gpt2 tokenizer is BPE")
    pre = pre_tokenizer_name(spec, tok.path)
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(tok.n_words):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(CONTROL if added[i].get("special") or looks_special(added[i]["content"]) else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    unk = model.get("unk_token")
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "unk": vocab.get(unk) if unk else None}


def is_ranks(path):
    from tokenizer import is_ranks_file
    return is_ranks_file(path)


def looks_special(text):
    return text.startswith("<|") and text.endswith("|>")


def parts_of(spec):
    if not spec:
        return []
    return [p for s in spec["pretokenizers"] for p in parts_of(s)] if spec.get("type") == "Sequence" else [spec]


def is_byte_level(spec):
    return any(p.get("type") == "ByteLevel" for p in parts_of(spec.get("pre_tokenizer"))) or \
        (spec.get("decoder") or {}).get("type") == "ByteLevel"


def pre_tokenizer_name(spec, path):
    """The name llama.cpp knows for a byte-level tokenizer.json's pre-tokenizer (how text is split
    before the merges), from its structure: Llama 3's and Qwen 2's regular expressions, SmolLM's
    digits and GPT-2's; anything else is refused, as the runtime would split text differently."""
    parts = parts_of(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    last = parts[-1] if parts else {}
    if kinds and kinds[-1] == "ByteLevel" and not last.get("add_prefix_space"):
        regex = last.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and regex:
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not regex and not parts[0].get("invert") and \
                str(parts[0].get("behavior")).lower() == "isolated":
            name = SPLIT_PRE.get((parts[0].get("pattern") or {}).get("Regex"))
            if name:
                return name
    raise UserError(f"{path}: its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not one llama.cpp knows "
                    "by name (Llama 3's, Qwen 2's, SmolLM's, GPT-2's); a GGUF runtime would split text differently")


