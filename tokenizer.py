"""Tokenizers of model folders, of three kinds chosen by the files present (load_tokenizer):

- "tokenizers": Hugging Face's tokenizer.json (Llama 3 in HF's layout, Qwen, SmolLM2, Mistral v0.3),
  BOS as its post-processor (or, without one, its tokenizer_config.json) says;
- "tiktoken": Meta's Llama 3 tokenizer.model, a text file of "base64(token) rank" lines, with
  Meta's pre-tokenizer pattern and 256 special tokens after the ranks;
- "sentencepiece": a binary sentencepiece tokenizer.model (Llama 2, CodeLlama, Mistral v0.1, TinyLlama).

Every kind has encode(text, bos=True, eos=False, allow_special=False), decode(ids, skip_special=True,
partial=False), n_words (ids 0..n_words-1, special tokens included), bos_id (None: the tokenizer puts
none first), eos_id, stop_ids (every id that ends a generation), special_tokens ({text: id}) and kind.
Plain text never turns into control tokens: "<|eot_id|>" in user data is encoded as the characters
it is made of. allow_special=True is for text a chat template wrote, where it is meant as the token.
"""
import base64
import binascii
import re
from pathlib import Path

from utils import UserError, read_json_object

# what the fingerprint, the offload folder and the exports carry; config.json travels with the model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's Llama 3.1 list (3.0's names differ only for ids nobody generates); reserved names fill it to 256
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(LLAMA3_SPECIAL))]
LLAMA3_STOPS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def load_tokenizer(folder):
    """The tokenizer of a model folder (or offload folder), its stop ids from config.json and
    generation_config.json added. tokenizer.json is read where there is one, as transformers reads it;
    one that encodes plain text to no tokens is refused, or passed over for a tokenizer.model beside it."""
    folder = Path(folder)
    main, spm, tokenizer = tokenizer_files(folder)[0], folder / "tokenizer.model", None
    if main.name == "tokenizer.json":
        tokenizer = HFTokenizer(main, {**read_json_object(folder / "special_tokens_map.json", optional=True),
                                       **read_json_object(folder / "tokenizer_config.json", optional=True)})
        if not tokenizer.encodes_text() and not spm.is_file():
            raise UserError(f"{main}: encodes plain text to no tokens (a vocabulary of {tokenizer.n_words} without "
                            "byte fallback?); use the tokenizer the model was trained with")
    if tokenizer is None or not tokenizer.encodes_text():
        tokenizer = model_file_tokenizer(spm)
    configured = config_eos_ids(folder)
    if tokenizer.eos_id is None and configured:
        tokenizer.eos_id = configured[0]
    tokenizer.stop_ids = frozenset(tokenizer.stop_ids | set(configured) | ({tokenizer.eos_id} - {None}))
    return tokenizer


def model_file_tokenizer(path):
    """tokenizer.model: Meta's Llama 3 ranks file or a sentencepiece model."""
    return MetaTokenizer(path) if is_ranks_file(path) else Tokenizer(path)


def choice_note(folder, tokenizer):
    """Where a folder has both tokenizer.json and tokenizer.model and they differ: which one tokenizer (the one
    load_tokenizer chose) is and why, for the conversion to say once. None elsewhere."""
    folder = Path(folder)
    hf, spm = folder / "tokenizer.json", folder / "tokenizer.model"
    if not (hf.is_file() and spm.is_file()):
        return None
    if tokenizer.path == spm:
        return f"{hf.name} encodes plain text to no tokens: {spm.name} is used, and {hf.name} left out of exports"
    try:
        other = model_file_tokenizer(spm)
    except UserError as e:
        return f"{hf.name} is used; {spm.name} beside it cannot be read ({e})"
    if other.n_words != tokenizer.n_words:
        return f"{hf.name} ({tokenizer.n_words} tokens) is used, not {spm.name} ({other.n_words} tokens), as " \
               "transformers uses it"
    return None


def tokenizer_files(folder):
    """The tokenizer files present in folder, the one load_tokenizer reads first: tokenizer.json wins
    over a tokenizer.model beside it, as in transformers, which loads the fast tokenizer."""
    folder = Path(folder)
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not files or files[0].name not in ("tokenizer.json", "tokenizer.model"):
        raise UserError(f"{folder / 'tokenizer.model'}: not found; the model folder needs its tokenizer "
                        "(tokenizer.model or tokenizer.json)")
    return files


def config_eos_ids(folder):
    """eos_token_id of config.json and generation_config.json (an integer or a list), in order."""
    ids = []
    for path in (Path(folder) / "config.json", Path(folder) / "generation_config.json"):
        value = read_json_object(path, optional=True).get("eos_token_id")
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UserError(f"{path}: eos_token_id must be a token id or a list of them, not {value!r}")
            ids += [v] * (v not in ids)
    return ids


def is_ranks_file(path):
    """Meta's Llama 3 tokenizer.model is text, "base64 rank" a line; sentencepiece's is a protobuf."""
    with open(path, "rb") as f:
        first = f.read(256).split(b"\n")[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", first) is not None


class BaseTokenizer:
    kind, bos_id, eos_id, stop_ids, special_tokens, note = "", None, None, frozenset(), {}, None

    def encode(self, text, bos=True, eos=False, allow_special=False):
        """Token ids of text: bos puts the tokenizer's BOS first (never a second one, should the text
        start with it as a special token), eos appends EOS. allow_special: special tokens written in
        text become their ids (chat templates); else they are plain text."""
        ids = self.encode_text(text, allow_special)
        if bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids + [self.eos_id] * (eos and self.eos_id is not None)

    def decode(self, ids, skip_special=True, partial=False):
        """The text of ids, byte-exact once every character is complete. skip_special: leave special
        tokens out; partial: ids stop anywhere (streaming), so an incomplete character at the end is
        held back (the next call, with more ids, prints it)."""
        text = self.decode_ids([i for i in ids if 0 <= i < self.n_words], skip_special)
        return text.rstrip("\ufffd") if partial else text


class Tokenizer(BaseTokenizer):
    """sentencepiece's tokenizer.model."""
    kind = "sentencepiece"

    def __init__(self, path):
        import sentencepiece
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{path}: not found; the model folder needs its sentencepiece tokenizer.model")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path}: not a sentencepiece model ({str(e).strip()[:120]})")
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = (i if i >= 0 else None for i in (self.sp.bos_id(), self.sp.eos_id()))
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.n_words) if self.sp.is_control(i)}
        self.stop_ids = frozenset({self.eos_id} - {None})

    def encode_text(self, text, allow_special):
        if not allow_special or not self.special_tokens:  # sentencepiece never makes control ids of text
            return self.sp.encode(text)
        ids, pieces = [], re.split("(" + "|".join(map(re.escape, self.special_tokens)) + ")", text)
        for i, piece in enumerate(pieces):  # odd pieces: the special tokens that split the text
            ids += [self.special_tokens[piece]] if i % 2 else self.sp.encode(piece) if piece else []
        return ids

    def decode_ids(self, ids, skip_special):
        return self.sp.decode([i for i in ids if not (skip_special and self.sp.is_control(i))])


class MetaTokenizer(BaseTokenizer):
    """Meta's Llama 3 tokenizer.model with tiktoken."""
    kind = "tiktoken"

    def __init__(self, path):
        import tiktoken
        self.path = Path(path)
        ranks = read_ranks(self.path)
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL)}
        self.enc = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.n_words = len(ranks) + len(LLAMA3_SPECIAL)
        self.bos_id, self.eos_id = self.special_tokens["<|begin_of_text|>"], self.special_tokens["<|end_of_text|>"]
        self.stop_ids = frozenset(self.special_tokens[name] for name in LLAMA3_STOPS)

    def encode_text(self, text, allow_special):
        allowed = "all" if allow_special else set()  # disallowed_special=(): special text is plain text
        return [i for chunk in chunks(text) for i in self.enc.encode(chunk, allowed_special=allowed,
                                                                     disallowed_special=())]

    def decode_ids(self, ids, skip_special):
        limit = self.n_words - len(LLAMA3_SPECIAL) if skip_special else self.n_words
        return self.enc.decode_bytes([i for i in ids if i < limit]).decode("utf-8", errors="replace")


def read_ranks(path):
    """{token bytes: rank} of a tiktoken ranks file: ranks 0..n-1, every single byte among the tokens."""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(f"{path}: line {number} is not a base64 token and its rank: {line[:60]!r}")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: the ranks must be 0 to {len(ranks) - 1}, each given to one token")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # tiktoken could not encode text with that byte
        raise UserError(f"{path}: byte {missing[0]:#04x} has no token; every single byte needs one")
    return ranks


def chunks(text, window=400_000, run=25_000):
    """Pieces tiktoken encodes safely, as Meta's tokenizer cuts them: windows of at most 400,000
    characters, and no run of 25,000 spaces or non-spaces (slow, and beyond tiktoken's stack)."""
    for start in range(0, len(text), window):
        piece, cut = text[start:start + window], 0
        for match in re.finditer(rf"(?<!\S)\S{{{run},}}|(?<!\s)\s{{{run},}}", piece):  # linear: runs from their start
            for at in range(match.start() + run, match.end(), run):
                yield piece[cut:at]
                cut = at
        yield piece[cut:]


class HFTokenizer(BaseTokenizer):
    """Hugging Face's tokenizer.json with the tokenizers library; config: tokenizer_config.json over
    special_tokens_map.json."""
    kind = "tokenizers"

    def __init__(self, path, config):
        import tokenizers
        self.path = Path(path)
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library's one exception type for every malformed file
            raise UserError(f"{path}: not a Hugging Face tokenizer ({str(e).strip().splitlines()[0][:160]})")
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.n_words = max(vocab.values()) + 1  # ids may leave gaps
        self.special_tokens = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        if not self.encodes_text():
            return  # refused by load_tokenizer, or passed over for a tokenizer.model
        self.bos_id = self.first_token(config, vocab)
        self.eos_id = vocab.get(token_text(config.get("eos_token")))

    def encodes_text(self):
        """Whether a plain word becomes tokens (a vocabulary without its pieces and without byte fallback
        drops unknown text)."""
        return bool(self.tok.encode("hello", add_special_tokens=False).ids)

    def first_token(self, config, vocab):
        """BOS as transformers puts it: the special token the post-processor puts before a text (Llama 3's,
        Mistral's; none for Qwen, SmolLM2), which transformers 5 follows over add_bos_token. Without a
        post-processor, add_bos_token of tokenizer_config.json, as transformers 4's Llama tokenizers read it."""
        if self.tok.post_processor is None:
            return vocab.get(token_text(config.get("bos_token"))) if config.get("add_bos_token") is True else None
        encoding = self.tok.encode("a", add_special_tokens=True)
        return encoding.ids[0] if encoding.special_tokens_mask[0] else None

    def encode_text(self, text, allow_special):
        self.tok.encode_special_tokens = not allow_special  # True: special tokens' text is plain text
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode_ids(self, ids, skip_special):
        return self.tok.decode(ids, skip_special_tokens=skip_special)


def token_text(value):
    """A special token as tokenizer_config.json writes it: a string or {"content": string}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None
