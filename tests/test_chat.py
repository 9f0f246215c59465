"""Chat formats (chat.py): conversations rendered as each kind of model was trained to see them, their
training targets, chat generation (test_gen.py --chat) and conversations as training data (finetune.py).
The templates are written out here and the expected renderings built with plain Python, the expected
ids by encoding the plain pieces with the tokenizer libraries themselves and putting the special ids in."""
import base64
import itertools
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import chat
import finetune
import loader
from chat import chat_format, encode_conversation, encode_rendered
from data import encode_file, get_batch
from default_model import LLAMA2_CHAT_TEMPLATE, default_model, make_model
from helpers import META_FIRST, PATTERN, ROOT, TINY, refused, run, tokenizer_folder, write_json
from tokenizer import load_tokenizer
from utils import UserError

# Meta-Llama-3-8B-Instruct's template, as its tokenizer_config.json has it
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

# Qwen2.5-Instruct's template without its tools branch, and two tags without "-": the newlines after them
# and the indentation before them are left out only as transformers compiles templates (trim_blocks,
# lstrip_blocks); a default system message
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {% if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{% endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# what else transformers gives templates: loop controls, namespace, tojson (its arguments in its order, no
# escaping), {% generation %} blocks
FEATURES_TEMPLATE = """{%- set ns = namespace(n=0) %}
{%- for m in messages %}
    {%- if m.role == 'system' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {%- if m.role == 'assistant' %}{% generation %}<a>{{ m.content }}</a>{% endgeneration %}
    {%- else %}<u>{{ m | tojson }}|{{ m.content | tojson(true) }}|{{ m | tojson(indent=1, sort_keys=true) }}</u>
    {%- endif %}
    {%- if ns.n == 3 %}{% break %}{% endif %}
{%- endfor %}
{{- ns.n }}"""

# Llama 2's template as Meta's HF repositories have it: roles must alternate, else raise_exception
LLAMA2_STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


CONVERSATIONS = [
    [user("What does slowllama do?"), assistant("It fine-tunes a model that does not fit in memory.")],
    [system("Answer in one short sentence."), user("Does it quantize the weights?"),
     assistant("No, it trains them at full precision.")],
    [user("Where do the trained weights live?"), assistant("In the run folder."), user("And the source model?"),
     assistant("It is only read, never written.")],
    [system("Be brief, the garden is big."), user("Then the thing in the garden?"), assistant("Another thing, then."),
     user("12345 and 678?"), assistant("They're numbers; the thing is 12 and 345.")],
]

FEATURES_MESSAGES = [system("s"), user("café <b>"), assistant("ok"), user("x"), assistant("never")]


class Special(str):
    """A special token in an expected rendering: its id, not its characters, once encoded."""


def expect(segments, encode_plain, special_ids):
    """(text, ids, targets, whole_ids) of a rendering given as [(piece, learned)]: each piece encoded on its
    own (as the turns are), and whole_ids: the text between special tokens encoded in one go."""
    text = "".join(piece for piece, _ in segments)
    ids, targets, whole, run_ = [], [], [], ""
    for piece, learned in segments:
        piece_ids = [special_ids[piece]] if isinstance(piece, Special) else encode_plain(piece) if piece else []
        ids += piece_ids
        targets += piece_ids if learned else [-1] * len(piece_ids)
        if isinstance(piece, Special):
            whole += (encode_plain(run_) if run_ else []) + [special_ids[piece]]
            run_ = ""
        else:
            run_ += piece
    whole += encode_plain(run_) if run_ else []
    return text, ids, targets, whole


def llama3_segments(messages, generation_prompt=False, bos=True):
    """Meta's header format, each content stripped (the template's trim, Meta's strip())."""
    def header(role):
        return [(Special("<|start_header_id|>"), False), (role, False), (Special("<|end_header_id|>"), False),
                ("\n\n", False)]

    segments = [(Special("<|begin_of_text|>"), False)] * bos
    for m in messages:
        mine = m["role"] == "assistant"
        segments += header(m["role"]) + [(m["content"].strip(), mine), (Special("<|eot_id|>"), mine)]
    return segments + header("assistant") * generation_prompt


def chatml_segments(messages, generation_prompt=False):
    first = messages[0]["content"] if messages[0]["role"] == "system" else QWEN_SYSTEM
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    segments = [(Special("<|im_start|>"), False), (f"system\n{first}", False), (Special("<|im_end|>"), False),
                ("\n", False)]
    for m in rest:
        mine = m["role"] == "assistant"
        segments += [(Special("<|im_start|>"), False), (f"{m['role']}\n", False), (m["content"], mine),
                     (Special("<|im_end|>"), mine), ("\n", False)]
    return segments + [(Special("<|im_start|>"), False), ("assistant\n", False)] * generation_prompt


def llama2_segments(messages, generation_prompt=False):
    """[INST] user [/INST] assistant </s>, the system text inside the first [INST], <s> before each [INST]."""
    sys_text = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if sys_text is not None else messages
    segments = []
    for k, m in enumerate(rest):
        if m["role"] == "user":
            inner = f"<<SYS>>\n{sys_text}\n<</SYS>>\n\n" if k == 0 and sys_text is not None else ""
            segments += [(Special("<s>"), False), (f"[INST] {inner}{m['content']} [/INST]", False)]
        else:
            segments += [(f" {m['content']} ", True), (Special("</s>"), True)]
    return segments


def ranks_text(ranks):
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())


# --- the three kinds of chat models: (folder, tokenizer, segments, encode_plain, special_ids, end of turn) ---

@pytest.fixture
def llama3(meta_folder, ranks):
    """Meta's tiktoken tokenizer.model with Llama 3 Instruct's template in tokenizer_config.json."""
    import tiktoken
    write_json(meta_folder / "tokenizer_config.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                                       "chat_template": LLAMA3_TEMPLATE})
    plain = tiktoken.Encoding(name="plain", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    specials = {name: len(ranks) + k for k, name in enumerate(META_FIRST)}
    return SimpleNamespace(folder=meta_folder, tok=load_tokenizer(meta_folder), segments=llama3_segments,
                           encode=plain.encode, specials=specials, end="<|eot_id|>", exact_decode=True)


@pytest.fixture
def chatml(tmp_path, hf_json):
    """A byte-level BPE tokenizer.json with <|im_start|> and <|im_end|> added, Qwen's template, no BOS."""
    from tokenizers import Tokenizer
    raw = Tokenizer.from_str(hf_json[False])
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder = tokenizer_folder(tmp_path / "chatml", {False: raw.to_str()}, False,
                       {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>",
                        "chat_template": CHATML_TEMPLATE})
    specials = {name: raw.token_to_id(name) for name in ("<|im_start|>", "<|im_end|>")}
    assert specials == {"<|im_start|>": 300, "<|im_end|>": 301}
    return SimpleNamespace(folder=folder, tok=load_tokenizer(folder), segments=chatml_segments,
                           encode=lambda text: raw.encode(text, add_special_tokens=False).ids, specials=specials,
                           end="<|im_end|>", exact_decode=True)


@pytest.fixture
def llama2():
    """The built-in default model: sentencepiece, Llama 2's template."""
    import sentencepiece
    folder = default_model()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return SimpleNamespace(folder=folder, tok=load_tokenizer(folder), segments=llama2_segments, encode=sp.encode,
                           specials={"<s>": 1, "</s>": 2}, end="</s>", exact_decode=False)


FORMATS = ["llama3", "chatml", "llama2"]


@pytest.fixture(params=FORMATS)
def fmt(request):
    return request.getfixturevalue(request.param)


def test_the_templates_render_as_written_out_here(fmt):
    render = chat_format(fmt.folder, fmt.tok)
    for messages in CONVERSATIONS:
        text, ids, _, whole = expect(fmt.segments(messages), fmt.encode, fmt.specials)
        assert render(messages) == text
        assert encode_rendered(fmt.tok, text) == whole == ids  # pieces encode as the whole text does
        prompt_text, prompt_ids, _, _ = expect(fmt.segments(messages[:-1], True), fmt.encode, fmt.specials)
        assert render(messages[:-1], add_generation_prompt=True) == prompt_text
        assert encode_rendered(fmt.tok, prompt_text) == prompt_ids


def test_conversation_targets_are_the_assistant_turns(fmt):
    ends = fmt.specials[fmt.end]
    assert ends in fmt.tok.stop_ids
    for messages in CONVERSATIONS:
        ids, targets = encode_conversation(fmt.tok, chat_format(fmt.folder, fmt.tok), messages, "here")
        _, want_ids, want_targets, _ = expect(fmt.segments(messages), fmt.encode, fmt.specials)
        assert (ids, targets) == (want_ids, want_targets)
        # counted independently: each assistant content's tokens (as the template writes it) and one end token
        content = (lambda c: f" {c} ") if fmt.segments is llama2_segments else (lambda c: c.strip())
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert sum(t != -1 for t in targets) == sum(len(fmt.encode(content(c))) + 1 for c in replies)
        assert all(t in (-1, i) for t, i in zip(targets, ids))
        runs = [list(run_) for learned, run_ in itertools.groupby(targets, lambda t: t != -1) if learned]
        assert len(runs) == len(replies) and all(r[-1] == ends and ends not in r[:-1] for r in runs)
        if fmt.exact_decode:
            assert [fmt.tok.decode(r) for r in runs] == replies
        # nothing of the system and user texts is learned
        learned = [i for i, t in zip(ids, targets) if t != -1]
        for m in messages:
            if m["role"] != "assistant":
                assert fmt.tok.decode(learned).find(m["content"]) == -1


def test_meta_llama3_folder_without_a_template_uses_the_header_format(meta_folder, ranks):
    """Meta's ChatFormat (llama3/tokenizer.py): BOS, then per message start_header, the role, end_header,
    "\\n\\n" and the stripped content, each encoded on its own, and eot; the generation prompt a header."""
    import tiktoken
    plain = tiktoken.Encoding(name="plain", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    special = {name: len(ranks) + k for k, name in enumerate(META_FIRST)}

    def header(role):
        return [special["<|start_header_id|>"], *plain.encode(role), special["<|end_header_id|>"],
                *plain.encode("\n\n")]

    messages = [system("  Be brief, the garden is big.\n"), user("\tthe thing in the garden, 12345?  "),
                assistant("\nthe thing  is 123, they're 45 "), user("café crème brûlée à la française")]
    meta = [special["<|begin_of_text|>"]]
    for m in messages:
        meta += header(m["role"]) + plain.encode(m["content"].strip()) + [special["<|eot_id|>"]]
    meta += header("assistant")
    tok = load_tokenizer(meta_folder)
    for config in (None, {"bos_token": "<|begin_of_text|>"}):  # a tokenizer_config.json without a template
        if config:
            write_json(meta_folder / "tokenizer_config.json", config)
        render = chat_format(meta_folder, tok)
        assert encode_rendered(tok, render(messages, add_generation_prompt=True)) == meta
    ids, targets = encode_conversation(tok, render, messages[:3], "here")
    assert ids == meta[:len(ids)] and ids[len(ids) - 1] == special["<|eot_id|>"]
    reply = plain.encode(messages[2]["content"].strip()) + [special["<|eot_id|>"]]
    assert [t for t in targets if t != -1] == reply and targets[-len(reply):] == reply


def test_which_template_a_folder_has(tmp_path, hf_json, tokenizer_bytes):
    folder = tokenizer_folder(tmp_path / "m", hf_json, False, {"eos_token": "<|eot_id|>", "chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT {{ messages[0].content }}"}]})
    tok = load_tokenizer(folder)
    assert chat_format(folder, tok)([user("hi")]) == "DEFAULT hi"  # named templates: the default one
    (folder / "chat_template.jinja").write_text("FILE {{ eos_token }}")
    assert chat_format(folder, tok)([user("hi")]) == "FILE <|eot_id|>"  # chat_template.jinja wins
    (folder / "chat_template.jinja").unlink()
    write_json(folder / "tokenizer_config.json", {"eos_token": "<|eot_id|>"})
    with pytest.raises(UserError, match="not a chat model"):  # no template, no Llama 3 header tokens
        chat_format(folder, tok)
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(tokenizer_bytes)
    with pytest.raises(UserError, match="not a chat model"):
        chat_format(tmp_path / "sp", load_tokenizer(tmp_path / "sp"))


def test_templates_get_what_transformers_gives_them(chatml):
    write_json(chatml.folder / "tokenizer_config.json", {"chat_template": FEATURES_TEMPLATE})
    first = '{"role": "user", "content": "café <b>"}|"caf\\u00e9 <b>"|{\n "content": "café <b>",\n "role": "user"\n}'
    second = '{"role": "user", "content": "x"}|"x"|{\n "content": "x",\n "role": "user"\n}'
    want = f"<u>{first}</u><a>ok</a><u>{second}</u>3"  # the system message skipped, the loop left after 3
    assert chat_format(chatml.folder, chatml.tok)(FEATURES_MESSAGES) == want


def test_special_tokens_map_gives_the_template_its_tokens(tmp_path, tokenizer_bytes):
    """Older folders name BOS and EOS in special_tokens_map.json only; the template still gets them,
    as transformers gives them (and as tokenizer.py reads them)."""
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_bytes)
    write_json(tmp_path / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    write_json(tmp_path / "tokenizer_config.json", {"chat_template": LLAMA2_CHAT_TEMPLATE})
    render = chat_format(tmp_path, load_tokenizer(tmp_path))
    assert render([user("q"), assistant("a")]) == "<s>[INST] q [/INST] a </s>"


def test_a_template_refusing_a_conversation_is_one_clear_error(tmp_path, tokenizer_bytes):
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_bytes)
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>",
                                                    "chat_template": LLAMA2_STRICT_TEMPLATE})
    tok = load_tokenizer(tmp_path)
    render = chat_format(tmp_path, tok)
    assert render([system("s"), user("q"), assistant("a")]) == "<s>[INST] <<SYS>>\ns\n<</SYS>>\n\nq [/INST] a </s>"
    with pytest.raises(UserError, match="line 7: .*roles must alternate"):
        encode_conversation(tok, render, [user("q"), user("q again"), assistant("a")], "line 7")


# --- generation: python test_gen.py MODEL cpu --chat ---

@pytest.mark.slow
def test_chat_generation_prints_the_reply_up_to_the_stop_token(tmp_path, ranks, tokenizer_bytes):
    """A tiny Meta-layout Llama 3 (tiktoken tokenizer.model, no template), its output rows edited: zero for
    the special tokens and the tokens that are not printable ASCII (the reply is plain text), and the row
    of <|eot_id|> 1.25 times the row of the fourth token it would reply, so that it stops about there."""
    import tiktoken
    folder = make_model(tmp_path / "llama3", {**TINY, "vocab_size": len(ranks) + 256}, tokenizer_bytes, 1, seed=3)
    (folder / "tokenizer.model").write_text(ranks_text(ranks))
    plain = tiktoken.Encoding(name="plain", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    special = {name: len(ranks) + k for k, name in enumerate(META_FIRST)}
    eot, question, sys_text = special["<|eot_id|>"], "What is in the garden?", "Answer with one thing."
    prompt = [special["<|begin_of_text|>"]]
    for role, text in (("system", sys_text), ("user", question), ("assistant", None)):
        prompt += [special["<|start_header_id|>"], *plain.encode(role), special["<|end_header_id|>"],
                   *plain.encode("\n\n")]
        prompt += [*plain.encode(text), eot] if text else []
    shard = folder / "consolidated.00.pth"
    weights = torch.load(shard, weights_only=True)
    printable = {rank for token, rank in ranks.items() if all(32 <= b < 127 for b in token)}
    weights["output.weight"][[i for i in range(len(ranks) + 256) if i not in printable]] = 0
    torch.save(weights, shard)
    model = loader.load_model(folder, offload_path=tmp_path / "off", log=lambda *a: None)
    before = model.generate(prompt, 12)
    model.close()
    assert set(before) <= printable
    weights["output.weight"][eot] = weights["output.weight"][before[3]].float() * 1.25
    torch.save(weights, shard)
    model = loader.load_model(folder, offload_path=tmp_path / "off", log=lambda *a: None)
    stops = model.tokenizer.stop_ids
    assert stops == {special[s] for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    after = model.generate(prompt, 12)  # no stop ids: what the model makes on past the stop
    cut = next(k for k, t in enumerate(after) if t in stops)
    reply = model.tokenizer.decode(after[:cut])
    assert 2 <= cut <= 8 and len(reply.strip()) >= 2 and model.tokenizer.decode(after[cut + 1:]).strip()
    model.close()
    rc, out, err = run("test_gen.py", folder, "cpu", "--chat", "--prompt", question, "--system", sys_text,
                       "--tokens", 12, "--compute_dtype", "float32", "--offload_path", tmp_path / "off")
    assert rc == 0, err
    assert re.fullmatch(re.escape(f"{question}\n{reply}\n") + rf"[\d.]+ ms per token \({cut + 1} tokens\)\n", out), \
        (out, after, cut)


# Mistral Instruct v0.1's template: no system role
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template,message", [(None, "not a chat model"), (
    MISTRAL_TEMPLATE, "the model's chat template refuses this conversation: Conversation roles must alternate")])
def test_chat_generation_needs_a_chat_format_that_takes_the_messages(make, tmp_path, template, message):
    folder = make()
    if template:
        write_json(folder / "tokenizer_config.json",
                   {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template})
    refused("test_gen.py", folder, "cpu", "--chat", "--prompt", "hi", "--system", "be brief", "--offload_path",
            tmp_path / "off", messages=[message])


# --- training data ---

def settings(**changes):
    return finetune.settings(**changes).data


def test_a_long_conversation_keeps_its_targets_on_every_window(llama2, tmp_path):
    messages = [system("Answer in one short sentence.")]
    for k in range(6):
        messages += [user(f"Question {k}: where do the trained weights live?"),
                     assistant(f"Answer {k}: in the run folder, as a float32 working copy.")]
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    cfg = settings(seq_len=16, batch_size=256)
    tokens, targets, _ = encode_file(data, cfg, llama2.tok, llama2.folder)
    _, want_ids, want_targets, _ = expect(llama2_segments(messages), llama2.encode, llama2.specials)
    assert tokens.tolist() == want_ids and targets.tolist() == want_targets and len(want_ids) > 8 * cfg.seq_len
    x, y, _ = get_batch(encode_file(data, cfg, llama2.tok, llama2.folder), cfg, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (cfg.batch_size, cfg.seq_len)
    starts_inside = ends_inside = 0
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        starts = [s for s in range(len(want_ids) - cfg.seq_len) if want_ids[s:s + cfg.seq_len] == row_x]
        assert any(want_targets[s + 1:s + cfg.seq_len + 1] == row_y for s in starts)
        assert all(t in (-1, nxt) for t, nxt in zip(row_y, row_x[1:]))  # y[t]: the token after x[t]
        starts_inside += row_y[0] != -1 and want_targets[starts[0]] != -1
        ends_inside += row_y[-1] != -1 and row_y[-1] != llama2.specials["</s>"]
    assert starts_inside and ends_inside  # windows do cut through assistant turns


def test_prompt_response_lines_use_the_models_template(fmt, tmp_path):
    pairs = [{"prompt": "What does slowllama do?", "response": "It fine-tunes."},
             {"system": "Be brief.", "prompt": "Does it quantize?", "response": "No."}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokens, targets, _ = encode_file(data, settings(), fmt.tok, fmt.folder)
    want_ids, want_targets = [], []
    for p in pairs:
        messages = ([system(p["system"])] if "system" in p else []) + [user(p["prompt"]), assistant(p["response"])]
        _, ids, marks, _ = expect(fmt.segments(messages), fmt.encode, fmt.specials)
        want_ids, want_targets = want_ids + ids, want_targets + marks
    assert tokens.tolist() == want_ids and targets.tolist() == want_targets


def test_an_explicit_prompt_template_still_wins(llama2, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"system": "Be brief.", "prompt": "Does it quantize?", "response": "No, never."}) + "\n")
    cfg = settings(prompt_template="### Question: {prompt}\n### Answer:", system_template="({system}) ")
    tokens, targets, _ = encode_file(data, cfg, llama2.tok, llama2.folder)
    prompt = [1] + llama2.encode("### Question: (Be brief.) Does it quantize?\n### Answer:")
    response = llama2.encode("No, never.") + [2]
    assert tokens.tolist() == prompt + response and targets.tolist() == [-1] * len(prompt) + response


def test_prompt_response_lines_without_a_chat_template_use_llama2s_inst(make, tmp_path):
    import sentencepiece
    folder = make()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Does it quantize?", "response": "No."}) + "\n")
    tokens, targets, _ = encode_file(data, settings(), load_tokenizer(folder), folder)
    prompt, response = [1] + sp.encode("[INST] Does it quantize? [/INST]"), sp.encode("No.") + [2]
    assert tokens.tolist() == prompt + response and targets.tolist() == [-1] * len(prompt) + response


def test_the_bundled_chat_data_learns_only_the_replies(llama2):
    path = ROOT / "test_data" / "chat.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tokens, targets, _ = encode_file(path, settings(), llama2.tok, llama2.folder)
    replies = [m["content"] for line in lines for m in line["messages"] if m["role"] == "assistant"]
    assert int((targets != -1).sum()) == sum(len(llama2.encode(f" {r} ")) + 1 for r in replies)
    assert int((targets == 2).sum()) == len(replies) == int((tokens == 2).sum())


# --- bad input: one error line naming the data file and its line ---

@pytest.fixture(scope="module")
def shared_offload(tmp_path_factory):
    return tmp_path_factory.mktemp("offload")


GOOD = json.dumps({"messages": [user("hi"), assistant("hello there")]})
BAD_LINES = [
    ("no messages", json.dumps({"text": "hello"}), "does not fit the format of the first row (conversations"),
    ("prompt without response", json.dumps({"prompt": "hello"}), "does not fit the format of the first row"),
    ("unknown role", json.dumps({"messages": [user("hi"), {"role": "robot", "content": "x"}]}),
     "message 2 has role 'robot'"),
    ("tool results the template drops", json.dumps({"messages": [user("hi"), {"role": "tool", "content": "42"}]}),
     "does not render tool calls"),
    ("content not a string", json.dumps({"messages": [{"role": "user", "content": ["hi"]}]}), "message 1 needs a role"),
    ("content missing", json.dumps({"messages": [{"role": "user"}]}), "message 1 needs a role"),
    ("messages not a list", json.dumps({"messages": "hi"}), "messages must be a non-empty list"),
    ("messages empty", json.dumps({"messages": []}), "messages must be a non-empty list"),
    ("not JSON", '{"messages": [', "is not JSON"),
]


@pytest.mark.parametrize("name,line,message", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_chat_data(tmp_path, shared_offload, name, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    expect_error(["--data_path=" + str(data), f"--offload_path={shared_offload}"], tmp_path,
                 f"data_path={data}: line 3", message)


def test_conversations_for_a_model_without_a_chat_format(make, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(f"{GOOD}\n")
    expect_error([f"--model_path={make()}", f"--data_path={data}", f"--offload_path={tmp_path}/off"], tmp_path,
                 f"data_path={data}: line 1", "not a chat model")


def expect_error(args, tmp_path, where, message):
    refused("finetune.py", *args, f"--out_path={tmp_path}/out", "--iters=2", "--seq_len=8", messages=[where, message])
    assert not (tmp_path / "out").exists()


# --- end to end ---

@pytest.mark.slow
def test_finetune_on_the_bundled_conversations(tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = run("finetune.py", "--data_path=test_data/chat.jsonl", "--iters=20", "--seq_len=48",
                          "--batch_size=8", "--eval_period=0", f"--out_path={out}", f"--offload_path={tmp_path}/off")
    assert rc == 0, err
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", stdout)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    # the exported model is still a chat model, in the same format
    assert chat.template_of(out) == LLAMA2_CHAT_TEMPLATE
    tok = load_tokenizer(out)
    assert chat_format(out, tok)([user("q"), assistant("a")]) == "<s>[INST] q [/INST] a </s>"


# --- where transformers is installed: its own rendering ---

def test_rendering_equals_transformers_apply_chat_template(chatml, tmp_path, hf_json):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    raw = Tokenizer.from_str(hf_json[True])
    raw.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>"])
    llama3_hf = tokenizer_folder(tmp_path / "llama3_hf", {True: raw.to_str()}, True,
                          {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                           "chat_template": LLAMA3_TEMPLATE})
    llama2_hf = tokenizer_folder(tmp_path / "llama2_hf", hf_json, False,
                          {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                           "chat_template": LLAMA2_STRICT_TEMPLATE})
    features = tokenizer_folder(tmp_path / "features", hf_json, False, {"chat_template": FEATURES_TEMPLATE})
    for folder in (chatml.folder, llama3_hf, llama2_hf, features):
        reference = transformers.AutoTokenizer.from_pretrained(str(folder))
        tok = load_tokenizer(folder)
        render = chat_format(folder, tok)
        for messages in CONVERSATIONS + [FEATURES_MESSAGES]:
            for generation_prompt, part in ((False, messages), (True, messages[:-1])):
                text = reference.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
                assert render(part, add_generation_prompt=generation_prompt) == text
                ids = reference.apply_chat_template(part, tokenize=True, add_generation_prompt=generation_prompt)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
                assert encode_rendered(tok, text) == list(ids)
