"""Training data as people keep it: the rows of a JSON file, JSON lines, Parquet files (a Hugging Face dataset
saved with to_parquet, or a dataset repository's *.parquet; read in batches) or a folder of text files, their
format recognised from the keys of the first row and every row turned into one kind of example:

  text          {"text"}: a document (a plain text file, each file of a folder)
  messages      {"messages": [{"role", "content", "tool_calls"}], "tools"}: a conversation (OpenAI's layout)
  sharegpt      {"conversations": [{"from": "human" | "gpt" | "system", "value"}]}: a conversation
  alpaca        {"instruction", "input", "output", "system"}: a prompt (instruction, then input) and response
  instructions  {"prompt", "response", "system"}: a prompt and response
  preferences   {"prompt", "chosen", "rejected"} (TRL's preference layout; prompt optional): a preference pair

A text file is one document unless it parses as JSON (an array of rows, or JSON lines): data that parses as
JSON is never trained on as prose. A row that does not fit the format of the first is one error naming it.
"""
import json
import re
from pathlib import Path

from utils import UserError

FORMATS = {  # name: (keys a row must have, what it is)
    "preferences": (("chosen", "rejected"), "preference pairs (prompt, chosen, rejected)"),
    "messages": (("messages",), "conversations (messages)"),
    "sharegpt": (("conversations",), "ShareGPT conversations (conversations: from, value)"),
    "alpaca": (("instruction", "output"), "Alpaca instructions (instruction, input, output)"),
    "instructions": (("prompt", "response"), "instructions (prompt, response)"),
    "text": (("text",), "documents (text)"),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PARQUET_BATCH_ROWS = 256  # rows read at a time: a dataset is never in memory whole


def read_rows(path):
    """(what the file holds, an iterator of (where, row)): the rows of path (a file or folder), where naming the
    row in an error ("data_path=chat.jsonl: line 3", "data_path=train.parquet: row 12", a text file's path)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                              p.relative_to(path).parts))
        for suffix, kind in ((".parquet", "Parquet files"), (".jsonl", "JSON lines files"), (".json", "JSON files")):
            picked = [p for p in files if p.suffix == suffix]
            train = [p for p in picked if p.name.startswith("train")]  # a dataset's training split, not its others
            if picked:
                names = ", ".join(str(p.relative_to(path)) for p in train or picked)
                return f"{kind} ({names})", (item for p in train or picked for item in read_rows(p)[1])
        if not files:
            raise UserError(f"data_path={path}: the folder holds no files")
        return "a folder of text files", ((f"data_path={p}", {"text": read_text(p)}) for p in files)
    if not path.is_file():
        raise UserError(f"data_path={path}: file not found")
    if path.suffix == ".parquet":
        return "Parquet", parquet_rows(path)
    text = read_text(path)
    return json_rows(path, text) or ("text", iter([(f"data_path={path}", {"text": text})]))


def read_text(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data_path={path}: not UTF-8 text ({e.reason} at byte {e.start})")


def json_rows(path, text):
    """(kind, rows) of a text that parses as a JSON array or object, or as JSON lines; else None. A file named
    .json or .jsonl that does not parse is one error line."""
    first_char = re.search(r"\S", text)
    if first_char is None:
        raise UserError(f"data_path={path}: the file is empty")
    start = first_char.start()
    error = f"starts with {text[start:start + 20]!r}"
    if text[start] in "[{":  # (prose is never copied or split into lines here)
        lines = text.splitlines()
        first = next(i for i, line in enumerate(lines) if line.strip())
        try:
            whole = json.loads(text) if path.suffix != ".jsonl" else None
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            return "a JSON array", ((f"data_path={path}: row {i}", row) for i, row in enumerate(whole, 1))
        if isinstance(whole, dict):
            return "a JSON object", iter([(f"data_path={path}: row 1", whole)])
        try:
            json.loads(lines[first])
            return "JSON lines", jsonl_rows(path, lines)
        except json.JSONDecodeError as e:
            error = f"line {first + 1} is not JSON ({e.msg})"
    if path.suffix in (".json", ".jsonl"):
        raise UserError(f"data_path={path}: not JSON: {error}")
    return None


def jsonl_rows(path, lines):
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"data_path={path}: line {number}", json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"data_path={path}: line {number} is not JSON ({e.msg})")


def parquet_rows(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"data_path={path}: reading Parquet needs pyarrow (pip install pyarrow)")
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors have no common base but Exception
        raise UserError(f"data_path={path}: not a Parquet file ({e})")
    number, batches = 0, table.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            rows = next(batches, None)
            rows = None if rows is None else rows.to_pylist()
        except Exception as e:  # a damaged row group: pyarrow's errors have no common base
            raise UserError(f"data_path={path}: row {number + 1} on cannot be read ({e})")
        if rows is None:
            return
        for row in rows:
            number += 1
            yield f"data_path={path}: row {number}", without_nulls(row)


def without_nulls(value):
    """A Parquet row as JSON would hold it: struct fields that are null in this row (a column of messages has
    every field any message has: tool_calls of a user turn, name of a plain one) are left out."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def recognise(row, where):
    """The format (FORMATS) a row's keys say."""
    if isinstance(row, dict):
        for name, (keys, _) in FORMATS.items():
            if all(k in row for k in keys):
                return name
    found = f"the keys {', '.join(sorted(row))}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
    raise UserError(f"{where} has {found}; slowllama reads rows of "
                    + "; ".join(", ".join(keys) for keys, _ in FORMATS.values()))


def example(fmt, row, where):
    """The row as an example of its format: {"text"}, {"messages", "tools"}, {"prompt", "response", "system"} or
    {"prompt", "chosen", "rejected"} (each a list of messages). Raises a UserError naming where."""
    if not isinstance(row, dict) or not all(k in row for k in FORMATS[fmt][0]):
        raise UserError(f"{where} does not fit the format of the first row ({FORMATS[fmt][1]})")
    if fmt == "text":
        return {"text": text_field(row, "text", where)}
    if fmt == "messages":
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise UserError(f"{where}: tools must be a list")
        return {"messages": row["messages"], "tools": tools or None}
    if fmt == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: conversations must be a non-empty list")
        messages = []
        for i, turn in enumerate(turns, 1):
            role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None or not isinstance(turn.get("value"), str):
                raise UserError(f"{where}: turn {i} needs from ({', '.join(SHAREGPT_ROLES)}) and a text value")
            messages.append({"role": role, "content": turn["value"]})
        return {"messages": messages, "tools": None}
    if fmt == "alpaca":
        prompt = "\n\n".join(t for t in (text_field(row, "instruction", where), optional_text(row, "input", where)) if t)
        return {"prompt": prompt, "response": text_field(row, "output", where), "system": optional_text(row, "system", where)}
    if fmt == "instructions":
        return {"prompt": text_field(row, "prompt", where), "response": text_field(row, "response", where),
                "system": optional_text(row, "system", where)}
    return preference_pair(row, where)


def preference_pair(row, where):
    """prompt: a text (the user's turn) or messages; chosen, rejected: a text (the assistant's turn), an
    assistant message or messages. Without a prompt, chosen and rejected are whole conversations and the prompt
    is the messages they share (TRL's implicit prompt)."""
    chosen, rejected = (as_turns(row[k], "assistant", f"{where}: {k}") for k in ("chosen", "rejected"))
    if "prompt" in row:
        prompt = as_turns(row["prompt"], "user", f"{where}: prompt")
    else:
        shared = 0  # (each a list of messages: as_turns)
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise UserError(f"{where}: without a prompt, chosen and rejected must be conversations sharing their "
                            "first turns")
    if prompt[-1].get("role") == "assistant":
        raise UserError(f"{where}: the prompt must end with a user turn")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if any(m.get("role") != "assistant" for m in turns if isinstance(m, dict)):
            raise UserError(f"{where}: {name} must hold the assistant's answer only")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def as_turns(value, role, where):
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    raise UserError(f"{where} must be a text, a message or a list of messages")


def text_field(row, key, where):
    if not isinstance(row.get(key), str):
        raise UserError(f"{where}: {key} must be a text")
    return row[key]


def optional_text(row, key, where):
    return text_field(row, key, where) if row.get(key) is not None else ""
