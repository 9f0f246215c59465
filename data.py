"""Training data: the rows of a data file (data_formats.py) encoded as examples of token ids and targets, a
stream of them packed one after another (or, for preference tuning, pairs: dpo.py), and the rows a step
trains on.

A Stream holds the tokens, their targets (-1: no loss, as on prompts and user turns; an example's first
token is never the target of the one before) and where each example starts. Packed rows (pack=1) are
windows of the stream: an example attends only to itself, its positions restarting at 0 (as transformers
packs with position ids); an example longer than a row spans rows, its positions counted from the row's
start. pack=0: one example a row, padded.
"""
from pathlib import Path
from typing import NamedTuple

import torch

from chat import chat_format, check_messages, encode_conversation
from data_formats import FORMATS, example, read_rows, recognise
from default_model import DEFAULT_TEXT
from files import load_tensors
from utils import UserError

LLAMA2_PROMPT = "[INST] {prompt} [/INST]"


class Stream(NamedTuple):
    tokens: torch.Tensor  # (n,) token ids, the examples one after another
    targets: torch.Tensor  # (n,) the token, or -1 where no loss is counted
    starts: torch.Tensor  # (examples,) where each example begins, the first at 0


def load_data(data, tokenizer, model_dir, objective="sft", log=print):
    """(train, val) of the data settings (settings.Data), the tail held out (val_fraction): Streams, or with
    objective "dpo" lists of encoded preference pairs (dpo.py). The format found is said in a line (log)."""
    path = Path(data.path or DEFAULT_TEXT)
    encoded = encode_file(path, data, tokenizer, model_dir, objective, log)
    if objective != "dpo":
        return split(encoded, data, path)
    n_val = round(len(encoded) * data.val_fraction)
    if n_val == len(encoded):
        raise UserError(f"data_path={path}: {len(encoded)} pairs, all held out by val_fraction={data.val_fraction}")
    log(f"{len(encoded) - n_val} pairs for training, {n_val} held out")
    return encoded[:len(encoded) - n_val], encoded[len(encoded) - n_val:]


def packs_examples(data):
    """Whether rows of data (settings.Data) may hold several examples (attention then keeps them apart, with a
    mask): packed rows of anything but one document (a text file, token ids), not DPO's pairs."""
    path = Path(data.path or DEFAULT_TEXT)
    return data.objective != "dpo" and data.pack and (path.is_dir() or path.suffix != ".pt" and
                                                      read_rows(path)[0] != "text")


def encode_file(path, data, tokenizer, model_dir, objective="sft", log=print):
    """The Stream of the examples in path (a file or folder; data_formats.py), or with objective "dpo" the list
    of its encoded preference pairs."""
    path = Path(path)
    if path.suffix == ".pt":
        if objective == "dpo":
            raise UserError(f"data_path={path}: token ids hold no preference pairs; --objective=dpo needs rows of "
                            "prompt, chosen and rejected")
        return token_ids(path, tokenizer)
    kind, rows = read_rows(path)
    encode = encoder(data, tokenizer, model_dir)
    fmt, examples = None, []
    for where, row in rows:
        fmt = fmt or recognise(row, where)
        if (fmt == "preferences") != (objective == "dpo"):
            raise UserError(f"{where}: {FORMATS[fmt][1]} are for --objective={'dpo' if fmt == 'preferences' else 'sft'}")
        encoded = encode(example(fmt, row, where), where)
        if objective != "dpo":  # ids as a tensor; a document's targets (its ids themselves) as None
            ids, targets = encoded
            encoded = torch.tensor(ids), None if targets is ids else targets
        examples.append(encoded)
    if not examples:
        raise UserError(f"data_path={path}: no examples")
    if objective == "dpo":
        log(f"data_path={path}: {kind} of {FORMATS[fmt][1]}: {len(examples)} pairs")
        return examples
    stream = pack(examples)
    log(f"data_path={path}: {kind} of {FORMATS[fmt][1]}: {len(examples)} examples, {len(stream.tokens)} tokens, "
        f"{int((stream.targets != -1).sum())} of them trained on")
    return stream


def token_ids(path, tokenizer):
    tokens = load_tensors(path, mmap=False)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long:
        raise UserError(f"data_path={path}: a .pt file must hold a 1-D LongTensor of token ids")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= tokenizer.n_words):
        raise UserError(f"data_path={path}: token ids must lie in [0, {tokenizer.n_words})")
    return Stream(tokens, tokens, torch.zeros(1, dtype=torch.long))


def pack(examples):
    """The Stream of (ids, targets) examples one after another (ids a tensor or list; targets a list, or None
    where they are the ids: a document's; one document's tensor serves as both)."""
    lengths = torch.tensor([len(ids) for ids, _ in examples])
    starts = torch.cumsum(lengths, 0) - lengths
    tokens = torch.cat([torch.as_tensor(ids, dtype=torch.long) for ids, _ in examples])
    if len(examples) == 1 and examples[0][1] is None:
        return Stream(tokens, tokens, starts)  # (its first target, at 0, is never read: no token comes before)
    targets = torch.cat([torch.as_tensor(ids if t is None else t, dtype=torch.long) for ids, t in examples])
    targets[starts[starts < len(targets)]] = -1  # nothing before an example predicts its first token
    return Stream(tokens, targets, starts)


def split(stream, data, path):
    """(train, val) Streams: the last val_fraction of the tokens held out."""
    n_val = int(len(stream.tokens) * data.val_fraction)
    cut = len(stream.tokens) - n_val
    if cut < data.seq_len + 1:
        raise UserError(f"data_path={path}: {cut} training tokens{' after the validation hold-out' if n_val else ''}, "
                        f"fewer than one window of seq_len+1={data.seq_len + 1}; lower seq_len or give more data")
    tokens, targets, starts = stream
    later = starts[starts > cut] - cut
    return (Stream(tokens[:cut], targets[:cut], starts[starts < cut]),
            Stream(tokens[cut:], targets[cut:], torch.cat([torch.zeros(1, dtype=torch.long), later])))


def encoder(data, tokenizer, model_dir):
    """encode(example, where) -> (ids, targets) of an example (data_formats.example), or of a preference pair
    ((ids, targets) of prompt + chosen, of prompt + rejected: targets on the answer only). Conversations in the
    model's chat format (chat.py); text with BOS and EOS; a prompt and response (a pair of texts: each answer)
    in prompt_template where given, else in the model's chat template, else in Llama 2's [INST] format."""
    render, no_chat = None, None
    try:
        render = chat_format(model_dir, tokenizer) if model_dir else None
    except UserError as e:
        no_chat = str(e)  # (not the exception: its traceback would hold the frames of the run)

    def conversation(messages, where, tools=None, answers_from=0):
        if render is None:
            raise UserError(f"{where}: conversations need the model's chat format{f' ({no_chat})' if no_chat else ''}")
        return encode_conversation(tokenizer, render, messages, where, tools, answers_from)

    def encode(ex, where):
        if "text" in ex:
            ids = tokenizer.encode(ex["text"], bos=True, eos=True)
            return ids, ids
        if "messages" in ex:
            return conversation(ex["messages"], where, ex["tools"])
        if "chosen" in ex:
            turns = [ex["prompt"], ex["chosen"], ex["rejected"]]
            for answer in turns[1:]:
                check_messages(turns[0] + answer, where)
            if (render is None or data.prompt_template) and all(len(t) == 1 for t in turns):  # as a prompt, response
                return tuple(encode({"prompt": turns[0][0]["content"], "response": t[0]["content"]}, where)
                             for t in turns[1:])
            return tuple(conversation(ex["prompt"] + ex[k], where, answers_from=len(ex["prompt"]))
                         for k in ("chosen", "rejected"))
        if render and not data.prompt_template:
            return conversation(as_messages(ex), where)
        template = data.prompt_template or LLAMA2_PROMPT
        system = data.system_template.replace("{system}", ex["system"]) if ex.get("system") else ""
        prompt = tokenizer.encode(template.replace("{prompt}", system + ex["prompt"]), bos=True)
        response = tokenizer.encode(ex["response"], bos=False, eos=True)
        return prompt + response, [-1] * len(prompt) + response
    return encode


def as_messages(ex):
    system = [{"role": "system", "content": ex["system"]}] if ex.get("system") else []
    return system + [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["response"]}]


# --- the rows of a step ---

def get_batch(stream, data, generator, part=(0, 1)):
    """data.batch_size random rows of seq_len tokens: (x, y, positions), y the targets of x's next tokens,
    positions (rows, seq_len) or None where every row is positions 0.. (one example, or its part). part=(i, n):
    n x batch_size rows are drawn (the same on every process of a parallel run), process i takes the i-th
    batch_size of them. Packed: random windows of the stream; else random examples (a random window of a
    longer one), padded."""
    length = data.seq_len
    if data.pack:
        return windows(stream, draw(len(stream.tokens) - length, data, generator, part).tolist(), length)
    picked = torch.randint(0, len(stream.starts), (part[1] * data.batch_size,), generator=generator)
    spans = [example_span(stream, e) for e in picked.tolist()]
    offsets = [int(torch.randint(0, max(1, b - a - length), (1,), generator=generator)) for a, b in spans]
    spans = [(a + o, min(b, a + o + length + 1)) for (a, b), o in zip(spans, offsets)]
    return padded_rows(stream, spans[part[0] * data.batch_size:(part[0] + 1) * data.batch_size], length)


def draw(high, data, generator, part=(0, 1)):
    """This process's batch_size of n x batch_size random integers in [0, high) (part=(i, n): the same draw on
    every process of a parallel run, process i takes the i-th batch_size)."""
    i, n, rows = *part, data.batch_size
    return torch.randint(0, high, (n * rows,), generator=generator)[i * rows:(i + 1) * rows]


def example_span(stream, e):
    end = int(stream.starts[e + 1]) if e + 1 < len(stream.starts) else len(stream.tokens)
    return int(stream.starts[e]), end


def windows(stream, starts, length):
    """(x, y, positions) of the windows of length + 1 tokens at starts."""
    x = torch.stack([stream.tokens[s:s + length] for s in starts])
    y = torch.stack([stream.targets[s + 1:s + length + 1] for s in starts])
    at = torch.tensor(starts)[:, None] + torch.arange(length)
    begins = stream.starts[torch.searchsorted(stream.starts, at, right=True) - 1]
    positions = at - torch.maximum(begins, at[:, :1])
    return x, y, None if bool((positions == torch.arange(length)).all()) else positions


def padded_rows(stream, spans, length):
    """(x, y, None) of one span (a, b) of the stream a row (padded)."""
    return (*padded([(stream.tokens[a:b], stream.targets[a:b]) for a, b in spans], length), None)


def padded(rows, length):
    """(x, y) of rows of (ids, targets), each x its ids but the last and y its targets but the first, padded at
    the end to length (targets -1): causal attention keeps the padding out of every real token's view."""
    x = torch.zeros(len(rows), length, dtype=torch.long)
    y = torch.full((len(rows), length), -1, dtype=torch.long)
    for row, (ids, targets) in enumerate(rows):
        x[row, :len(ids) - 1] = torch.as_tensor(ids[:-1])
        y[row, :len(ids) - 1] = torch.as_tensor(targets[1:])
    return x, y


def eval_rows(stream, data, limit):
    """The held-out rows of an evaluation, up to limit: consecutive windows (packed), or each example's
    consecutive pieces, padded."""
    length = min(data.seq_len, len(stream.tokens) - 1)
    if data.pack:
        return windows(stream, list(range(0, len(stream.tokens) - length, length))[:limit], length)
    spans = [(s, min(b, s + length + 1)) for a, b in map(lambda e: example_span(stream, e), range(len(stream.starts)))
             for s in range(a, b - 1, length)]
    return padded_rows(stream, spans[:limit], length)
