"""Training data: a text file, a stream of token ids or a .jsonl file of conversations or instruction
examples, as (tokens, targets) streams, and the random windows a step trains on."""
import json
from pathlib import Path

import torch

from chat import chat_format, encode_conversation
from default_model import DEFAULT_TEXT
from files import load_tensors
from utils import UserError

LLAMA2_PROMPT = "[INST] {prompt} [/INST]"


def load_tokens(data, tokenizer, model_dir):
    """(train, val) streams of the data settings (settings.Data), each (tokens, targets): targets are the
    tokens, or -1 where no loss is counted (prompts and user turns). Text is encoded with BOS and EOS; a
    .pt stream of token ids is used as it is; a .jsonl file holds conversations or instruction examples
    (model_dir: whose chat template renders them)."""
    path = Path(data.path or DEFAULT_TEXT)
    if not path.is_file():
        raise UserError(f"data_path={path}: file not found")
    if path.suffix == ".pt":
        tokens = load_tensors(path, mmap=False)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long:
            raise UserError(f"data_path={path}: a .pt file must hold a 1-D LongTensor of token ids")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= tokenizer.n_words):
            raise UserError(f"data_path={path}: token ids must lie in [0, {tokenizer.n_words})")
        targets = tokens
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data_path={path}: not UTF-8 text ({e.reason} at byte {e.start})")
        if not text.strip():
            raise UserError(f"data_path={path}: the file is empty")
        if path.suffix == ".jsonl":
            tokens, targets = encode_instructions(text, path, data, tokenizer, model_dir)
        else:
            tokens = targets = torch.tensor(tokenizer.encode(text, bos=True, eos=True))
    n_val = int(len(tokens) * data.val_fraction)
    cut = len(tokens) - n_val
    if cut < data.seq_len + 1:
        raise UserError(f"data_path={path}: {cut} training tokens{' after the validation hold-out' if n_val else ''}, "
                        f"fewer than one window of seq_len+1={data.seq_len + 1}; lower seq_len or give more data")
    return (tokens[:cut], targets[:cut]), (tokens[cut:], targets[cut:])


def encode_instructions(text, path, data, tokenizer, model_dir=None):
    """One example per line, packed one after another: a conversation {"messages": [{"role", "content"},
    ...]} in the model's chat format, the loss on its assistant turns (chat.py); or {"prompt",
    "response", optional "system"}: the prompt in prompt_template (the model's chat template when
    prompt_template is empty and the model has one), then the response and EOS, the loss on the response."""
    render, no_chat = None, None
    try:
        render = chat_format(model_dir, tokenizer) if model_dir else None
    except UserError as e:
        no_chat = e
    tokens, targets = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"data_path={path}: line {number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not JSON ({e.msg})")
        has_pair = isinstance(example, dict) and all(isinstance(example.get(k), str) for k in ("prompt", "response"))
        if not isinstance(example, dict) or "messages" not in example and not has_pair:
            raise UserError(f"{where} needs messages, or the text fields prompt and response")
        if "messages" in example and render is None:
            raise UserError(f"{where}: conversations need the model's chat format{f' ({no_chat})' if no_chat else ''}")
        if "messages" in example or render and not data.prompt_template:
            messages = example["messages"] if "messages" in example else as_messages(example)
            ids, marks = encode_conversation(tokenizer, render, messages, where)
            tokens, targets = tokens + ids, targets + marks
            continue
        template = data.prompt_template or LLAMA2_PROMPT
        system = data.system_template.replace("{system}", example["system"]) if example.get("system") else ""
        prompt = tokenizer.encode(template.replace("{prompt}", system + example["prompt"]), bos=True)
        response = tokenizer.encode(example["response"], bos=False, eos=True)
        tokens += prompt + response
        targets += [-1] * len(prompt) + response
    if not tokens:
        raise UserError(f"data_path={path}: no examples")
    return torch.tensor(tokens), torch.tensor(targets)


def as_messages(example):
    system = [{"role": "system", "content": example["system"]}] if example.get("system") else []
    return system + [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["response"]}]


def get_batch(stream, data, generator, part=(0, 1)):
    """data.batch_size random windows of seq_len+1 tokens: x the first seq_len tokens, y the targets of
    the last seq_len. part=(i, n): n x batch_size windows are drawn (the same on every process of a
    parallel run), process i takes the i-th batch_size of them."""
    tokens, targets = stream
    i, n, rows, length = *part, data.batch_size, data.seq_len
    starts = torch.randint(0, len(tokens) - length, (n * rows,), generator=generator).tolist()[i * rows:(i + 1) * rows]
    x = torch.stack([tokens[s:s + length] for s in starts])
    y = torch.stack([targets[s + 1:s + length + 1] for s in starts])
    return x, y
