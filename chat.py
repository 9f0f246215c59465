"""Chat formats: a conversation rendered as the model was trained to see it, and its training targets.

The model's own template (chat_template.jinja, else tokenizer_config.json's chat_template) is rendered
with jinja2 as transformers renders it; Meta's Llama 3 folders without a template use Meta's header
format. Training data in the messages format counts the loss on the assistant turns only: their
content and the end-of-turn token that closes them.
"""
import json
from datetime import datetime
from pathlib import Path

from utils import UserError, read_json_object

ROLES = ("system", "user", "assistant", "tool")


# --- the format ---

def template_of(folder):
    """The chat template text of a model folder (or offload folder), or None."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = tokenizer_config(folder)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def tokenizer_config(folder):
    return read_json_object(Path(folder) / "tokenizer_config.json", optional=True)


def special_tokens_map(folder):
    return read_json_object(Path(folder) / "special_tokens_map.json", optional=True)


def token_text(value):
    """A special token as tokenizer_config.json gives it (a string, or {"content": string}), or None."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def chat_format(folder, tokenizer):
    """render(messages, add_generation_prompt) -> text, for the model in folder; a UserError when it
    has no chat format."""
    template = template_of(folder)
    if template is not None:
        config = {**special_tokens_map(folder), **tokenizer_config(folder)}  # as tokenizer.py reads them
        special = {k: token_text(config.get(k)) or "" for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        compiled = compile_template(template)

        def render(messages, add_generation_prompt=False, tools=None):
            import jinja2
            try:
                return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                       documents=None, **special)
            except jinja2.exceptions.TemplateError as e:  # raise_exception(...) of the template, or its own bug
                raise UserError(f"the model's chat template refuses this conversation: {e}")
        return render
    if "<|start_header_id|>" in tokenizer.special_tokens:
        return meta_llama3
    raise UserError(f"{folder}: the model has no chat template (chat_template.jinja or tokenizer_config.json's "
                    "chat_template), nor Meta's Llama 3 format; it is not a chat model")


def compile_template(template):
    """The template compiled as transformers compiles chat templates: a sandbox, blocks trimmed,
    loop controls, {% generation %} blocks (rendered as their content), tojson, raise_exception and
    strftime_now."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: transformers marks the assistant's text with it."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_content"), [], [], body).set_lineno(lineno)

        def _content(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    # transformers' own tojson, its arguments in its order: no HTML escaping, ensure_ascii off
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"the chat template cannot be read ({e})")


def meta_llama3(messages, add_generation_prompt=False, tools=None):
    """Meta's Llama 3 format: each message as a header with its role, its text, then <|eot_id|> (tools: not
    rendered)."""
    text = "<|begin_of_text|>" + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                                         f"{(m['content'] or '').strip()}<|eot_id|>" for m in messages)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


# --- token ids ---

def encode_rendered(tokenizer, text):
    """Ids of rendered chat text: the special tokens the template wrote as text become their ids, and
    nothing is added (the template writes the BOS and EOS it wants)."""
    return tokenizer.encode(text, bos=False, eos=False, allow_special=True)


def check_messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list")
    for i, m in enumerate(messages, 1):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise UserError(f"{where}: message {i} needs a role and a text content")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} has role {m.get('role')!r}; use {', '.join(ROLES)}")
        if calls and not (isinstance(calls, list) and all(isinstance(c, dict) and isinstance(called(c), str)
                                                          for c in calls)):
            raise UserError(f"{where}: message {i}'s tool_calls must be a list of {{\"function\": {{\"name\", "
                            "\"arguments\"}}")


def called(call):
    """The function name of a tool call ({"function": {"name", "arguments"}}, or the function itself)."""
    function = call.get("function", call)
    return function.get("name") if isinstance(function, dict) else None


def check_tools_rendered(messages, tools, text, where):
    """Tool results, calls and definitions must reach the rendered text: a template that drops them would train
    the model on conversations it never sees."""
    results = [m["content"] for m in messages if m["role"] == "tool"]
    names = [called(c) for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or ()] + \
        [called(t) if isinstance(t, dict) else None for t in tools or ()]
    # (a result may be rendered as a JSON string, escaped: Llama 3.1's template)
    if any(r not in text and json.dumps(r, ensure_ascii=False) not in text and json.dumps(r) not in text
           for r in results) or any(not isinstance(n, str) or n not in text for n in names):
        raise UserError(f"{where}: the model's chat template does not render tool calls, their results or the tools "
                        "given; this conversation cannot be trained on with it")


def encode_conversation(tokenizer, render, messages, where, tools=None, answers_from=0):
    """(ids, targets) of a conversation (tools: the definitions its template is given): targets are -1 except on
    each assistant turn from message answers_from on, its content and the end-of-turn token that closes it. The
    conversation is rendered whole and cut where the rendering of the messages up to a turn ends (before an
    assistant turn: with the generation prompt, which is not the assistant's to learn); a turn whose rendering
    changes once later ones follow (consecutive tool results grouped in one turn) is cut with those."""
    check_messages(messages, where)
    render = with_where(render, where, tools)
    whole = render(messages)
    check_tools_rendered(messages, tools, whole, where)
    ends = set(tokenizer.stop_ids) | {tokenizer.eos_id}
    ids, targets, done = [], [], ""
    for i, message in enumerate(messages):
        learn = message["role"] == "assistant" and i >= answers_from
        if learn:
            prompt = render(messages[:i], add_generation_prompt=True) if i else ""
            ids_, done = piece(tokenizer, done, prompt, whole, where)
            ids += ids_
            targets += [-1] * len(ids_)
        rendered = render(messages[:i + 1])
        if not learn and not whole.startswith(rendered):
            continue
        turn, done = piece(tokenizer, done, rendered, whole, where)
        ids += turn
        if not learn:
            targets += [-1] * len(turn)
            continue
        end = next((j for j, t in enumerate(turn) if t in ends), len(turn) - 1)
        targets += turn[:end + 1] + [-1] * (len(turn) - end - 1)
    rest, _ = piece(tokenizer, done, whole, whole, where)
    return ids + rest, targets + [-1] * len(rest)


def with_where(render, where, tools=None):
    def rendered(messages, add_generation_prompt=False):
        try:
            return render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        except UserError as e:
            raise UserError(f"{where}: {e}")
    return rendered


def piece(tokenizer, done, rendered, whole, where):
    """(ids of what rendered adds to done, rendered), where both are the start of the whole rendering."""
    if not rendered.startswith(done) or not whole.startswith(rendered):
        raise UserError(f"{where}: the chat template renders earlier turns differently once later ones follow; "
                        "its turns cannot be told apart for training")
    return encode_rendered(tokenizer, rendered[len(done):]), rendered
