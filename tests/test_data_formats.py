"""The data formats people have (data_formats.py): each one's file in test_data/ encodes as its rows' conversations
written out as the chat template renders them (test_chat's expected renderings, built here by hand), the format
is recognised from the keys and said, JSON is never trained on as prose, and a row that does not fit is one line
naming it."""
import json
from pathlib import Path

import pytest
import torch

import data_formats
import finetune
from data import encode_file
from helpers import refused
import test_chat
from test_chat import CHATML_TEMPLATE, QWEN_SYSTEM, Special, assistant, expect, llama2_segments, system, user

chatml, llama2 = test_chat.chatml, test_chat.llama2  # (fixtures)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "test_data"


def cfg(**changes):
    return finetune.settings(**changes).data


def expected_stream(fmt, conversations):
    """(ids, targets) of conversations one after another, each rendered as written out in test_chat."""
    ids, targets = [], []
    for messages in conversations:
        _, i, t, _ = expect(fmt.segments(messages), fmt.encode, fmt.specials)
        ids, targets = ids + i, targets + [-1] + t[1:]  # an example's first token is no one's target
    return ids, targets


def encoded(path, fmt, **changes):
    lines = []
    stream = encode_file(path, cfg(**changes), fmt.tok, fmt.folder, log=lines.append)
    return stream, lines


def alpaca_messages(row):
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    return ([system(row["system"])] if row.get("system") else []) + [user(prompt), assistant(row["output"])]


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@pytest.mark.parametrize("name,said,conversations", [
    ("alpaca.json", "a JSON array of Alpaca instructions",
     lambda: [alpaca_messages(r) for r in json.loads((DATA / "alpaca.json").read_text())]),
    ("sharegpt.json", "a JSON array of ShareGPT conversations",
     lambda: [[{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]
              for r in json.loads((DATA / "sharegpt.json").read_text())]),
    ("chat.parquet", "Parquet of conversations",
     lambda: [json.loads(line)["messages"] for line in (DATA / "chat.jsonl").read_text().splitlines() if line]),
], ids=["alpaca", "sharegpt", "parquet"])
def test_each_format_loads_from_its_file(llama2, name, said, conversations):
    stream, lines = encoded(DATA / name, llama2)
    ids, targets = expected_stream(llama2, conversations())
    assert stream.tokens.tolist() == ids and stream.targets.tolist() == targets
    assert len(stream.starts) == len(conversations()) and said in lines[0], lines


def test_a_folder_of_text_files_is_one_document_a_file(llama2):
    stream, lines = encoded(DATA / "notes", llama2)
    files = sorted((DATA / "notes").iterdir())
    docs = [[1] + llama2.encode(f.read_text()) + [2] for f in files]
    assert stream.tokens.tolist() == [t for d in docs for t in d]
    assert stream.targets.tolist() == [t for d in docs for t in [-1] + d[1:]]
    assert stream.starts.tolist() == [sum(map(len, docs[:k])) for k in range(len(docs))]
    assert "a folder of text files of documents (text): 3 examples" in lines[0]


def test_parquet_is_read_in_batches_and_its_nulls_left_out(llama2, chatml, tmp_path, monkeypatch):
    """Messages of several shapes in one Parquet column (tool calls on some) read a few rows at a time: the
    same stream as the JSON lines they came from."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in (DATA / "tools.jsonl").read_text().splitlines()] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "tools.parquet")
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(data_formats, "PARQUET_BATCH_ROWS", 2)
    fmt = tool_format(chatml)
    got, want = encoded(tmp_path / "tools.parquet", fmt)[0], encoded(tmp_path / "tools.jsonl", fmt)[0]
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got.starts) == 6


TOOLS_TEMPLATE = CHATML_TEMPLATE.replace(
    """{%- for message in messages %}""",
    """{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}{% for t in tools %}{{ t.function.name }}
{% endfor %}{{- '<|im_end|>\\n' }}{% endif %}{%- for message in messages %}
    {%- if message.role == "assistant" and message.tool_calls %}{{- '<|im_start|>assistant\\n' }}{% for c in message.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}{{- '<|im_start|>user\\n<tool_response>' + message.content + '</tool_response><|im_end|>\\n' }}{% endif %}""")


def tool_format(chatml):
    config = json.loads((chatml.folder / "tokenizer_config.json").read_text())
    (chatml.folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    return chatml


def test_tool_calls_are_learned_and_tool_results_are_not(chatml):
    """tools.jsonl in a template that renders tools: the assistant's calls and answer are targets (each with the
    <|im_end|> closing it), the tool list and the tool's result are not."""
    fmt = tool_format(chatml)
    stream, lines = encoded(DATA / "tools.jsonl", fmt)
    rows = [json.loads(line) for line in (DATA / "tools.jsonl").read_text().splitlines()]
    ids, targets = [], []
    for row in rows:
        start, end = Special("<|im_start|>"), Special("<|im_end|>")
        segments = [(start, False), (f"system\n{QWEN_SYSTEM}", False), (end, False), ("\n", False),
                    (start, False), ("system\n# Tools\ndisk_free\n", False), (end, False), ("\n", False)]
        for m in row["messages"]:
            if m["role"] == "user":
                segments += [(start, False), (f"user\n{m['content']}", False), (end, False), ("\n", False)]
            elif m["role"] == "tool":
                segments += [(start, False), (f"user\n<tool_response>{m['content']}</tool_response>", False),
                             (end, False), ("\n", False)]
            else:
                said = m["content"] or "".join(f"<tool_call>{json.dumps(c['function'])}</tool_call>"
                                               for c in m["tool_calls"])
                segments += [(start, False), ("assistant\n", False), (said, True), (end, True), ("\n", False)]
        _, i, t, _ = expect(segments, fmt.encode, fmt.specials)
        ids, targets = ids + i, targets + [-1] + t[1:]
    assert stream.tokens.tolist() == ids and stream.targets.tolist() == targets
    assert "JSON lines of conversations (messages)" in lines[0]


def test_json_is_never_trained_on_as_prose(llama2, tmp_path):
    rows = json.loads((DATA / "alpaca.json").read_text())
    (tmp_path / "notes.txt").write_text(json.dumps(rows))  # a JSON array, whatever the name
    (tmp_path / "lines.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "plain.txt").write_text("[a note that starts with a bracket]\n")
    want = encoded(DATA / "alpaca.json", llama2)[0]
    for name in ("notes.txt", "lines.txt"):
        got, lines = encoded(tmp_path / name, llama2)
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and "Alpaca instructions" in lines[0]
    got, lines = encoded(tmp_path / "plain.txt", llama2)
    assert got.tokens.tolist() == [1] + llama2.encode("[a note that starts with a bracket]\n") + [2]
    assert "text of documents" in lines[0]


@pytest.mark.parametrize("name,text,message", [
    ("alpaca.json", json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"},
                                {"instruction": "no output"}]), "row 3 does not fit the format of the first row "
                                                                "(Alpaca instructions"),
    ("alpaca.json", json.dumps([{"instruction": "a", "output": 7}]), "row 1: output must be a text"),
    ("share.json", json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}]),
     "row 1: turn 2 needs from (human"),
    ("broken.json", '[{"instruction": "a",', "not JSON"),
    ("odd.jsonl", json.dumps({"question": "a", "answer": "b"}) + "\n", "line 1 has the keys answer, question"),
    ("pairs.jsonl", json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n",
     "preference pairs (prompt, chosen, rejected) are for --objective=dpo"),
    ("dpo:chat.jsonl", json.dumps({"messages": [user("a"), assistant("b")]}) + "\n",
     "conversations (messages) are for --objective=sft"),
    ("dpo:odd.jsonl", json.dumps({"prompt": ["hi"], "chosen": "b", "rejected": "c"}) + "\n",
     "line 1: prompt must be a text, a message or a list of messages"),
    ("dpo:roles.jsonl", json.dumps({"prompt": "a", "chosen": [user("b")], "rejected": "c"}) + "\n",
     "line 1: chosen must hold the assistant's answer only"),
    ("dpo:ids.pt", None, "token ids hold no preference pairs"),
    ("dpo:few.jsonl", json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n",
     "1 pairs, all held out by val_fraction=0.9"),
], ids=["alpaca row", "alpaca field", "sharegpt role", "broken json", "unknown keys", "pairs for sft",
        "conversations for dpo", "prompt not messages", "answer of the user", "token ids for dpo", "all held out"])
def test_a_row_that_does_not_fit_is_one_line_naming_it(tmp_path, name, text, message):
    objective, _, name = name.rpartition(":")
    if text is None:
        torch.save(torch.arange(100), tmp_path / name)
    else:
        (tmp_path / name).write_text(text)
    refused("finetune.py", f"--data_path={tmp_path / name}", f"--out_path={tmp_path}/out", f"--objective={objective or 'sft'}",
            f"--offload_path={tmp_path}/off", "--val_fraction=0.9" if name == "few.jsonl" else "--val_fraction=-1",
            messages=[f"data_path={tmp_path / name}", message])
    assert not (tmp_path / "out").exists()


def test_preference_pairs_learn_only_the_answer(llama2, tmp_path):
    """A text pair, a conversational pair (earlier assistant turns in the prompt are not learned) and an implicit
    prompt (the turns chosen and rejected share) each encode as prompt + answer with targets on the answer only."""
    history = [user("Is the base written?"), assistant("No."), user("And the adapters?")]
    rows = [{"prompt": "Is the base written?", "chosen": "No, only read.", "rejected": "Yes."},
            {"prompt": history, "chosen": [assistant("They are saved.")], "rejected": [assistant("Lost.")]},
            {"chosen": history + [assistant("They are saved.")], "rejected": history + [assistant("Lost.")]}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = encode_file(tmp_path / "pairs.jsonl", cfg(), llama2.tok, llama2.folder, "dpo", log=lambda *a: None)
    prompts = [[user("Is the base written?")], history, history]
    for (chosen, rejected), prompt, row in zip(pairs, prompts, rows):
        for got, answer in ((chosen, "No, only read." if row is rows[0] else "They are saved."),
                            (rejected, "Yes." if row is rows[0] else "Lost.")):
            _, ids, _, _ = expect(llama2_segments(prompt + [assistant(answer)]), llama2.encode, llama2.specials)
            learned = llama2.encode(f" {answer} ") + [2]
            assert got[0] == ids and got[1] == [-1] * (len(ids) - len(learned)) + learned


def test_text_pairs_for_a_model_without_a_chat_template_use_the_prompt_template(make, tmp_path):
    import sentencepiece

    from tokenizer import load_tokenizer
    folder = make()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "Is it kept?", "chosen": "Yes.", "rejected": "No."}))
    [(chosen, rejected)] = encode_file(tmp_path / "pairs.jsonl", cfg(), load_tokenizer(folder), folder, "dpo",
                                       log=lambda *a: None)
    prompt = [1] + sp.encode("[INST] Is it kept? [/INST]")
    for (ids, targets), answer in ((chosen, "Yes."), (rejected, "No.")):
        assert ids == prompt + sp.encode(answer) + [2] and targets == [-1] * len(prompt) + sp.encode(answer) + [2]


def test_a_dataset_folder_trains_on_its_train_split(llama2, tmp_path):
    """A dataset repository's data/ folder: the train-* files, said in the format line; not test-*."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in (DATA / "chat.jsonl").read_text().splitlines() if line]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "data" / "test-00000-of-00001.parquet")
    (tmp_path / "README.md").write_text("# a dataset card\n")
    stream, lines = encoded(tmp_path, llama2)
    want = encoded(DATA / "chat.jsonl", llama2)[0]
    assert all(torch.equal(a, b) for a, b in zip(stream, want))
    assert "train-00000-of-00002.parquet, data/train-00001-of-00002.parquet" in lines[0], lines


LLAMA31_TOOL_RESULT = ("{% for m in messages %}{% if m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>"
                       "\n\n{% if m.content is mapping or m.content is iterable %}{{ m.content | tojson }}"
                       "{% else %}{{ m.content }}{% endif %}<|eot_id|>{% else %}<|start_header_id|>{{ m.role }}"
                       "<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endif %}{% endfor %}")


def test_a_tool_result_rendered_as_a_json_string_is_rendered(chatml):
    """Llama 3.1's template writes a tool's result through tojson (a string is iterable): escaped, it is still the
    result, and the conversation trains."""
    from chat import check_tools_rendered, compile_template
    messages = [user("room?"), {"role": "tool", "content": '{"free_gb": 120}\nok'}, assistant("Yes.")]
    text = compile_template(LLAMA31_TOOL_RESULT).render(messages=messages)
    assert '{"free_gb": 120}' not in text  # escaped
    check_tools_rendered(messages, None, text, "here")
    with pytest.raises(Exception, match="does not render tool calls"):
        check_tools_rendered(messages, None, text.replace("free_gb", "x"), "here")
