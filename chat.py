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

ROLES = ("system", "user", "assistant")


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

        def render(messages, add_generation_prompt=False):
            import jinja2
            try:
                return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
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


def meta_llama3(messages, add_generation_prompt=False):
    """Meta's Llama 3 format: each message as a header with its role, its text, then <|eot_id|>."""
    text = "<|begin_of_text|>" + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                                         f"{m['content'].strip()}<|eot_id|>" for m in messages)
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
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} needs a role and a text content")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} has role {m.get('role')!r}; use {', '.join(ROLES)}")


def encode_conversation(tokenizer, render, messages, where):
    """(ids, targets) of a conversation: targets are -1 except on each assistant turn's content and the
    end-of-turn token that closes it. Each turn is the text its message adds to the rendering of the
    conversation before it (with the generation prompt before an assistant turn)."""
    check_messages(messages, where)
    render = with_where(render, where)
    ends = set(tokenizer.stop_ids) | {tokenizer.eos_id}
    ids, targets, done = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":  # the generation prompt is not the assistant's to learn
            prompt = render(messages[:i], add_generation_prompt=True) if i else ""
            ids_, done = piece(tokenizer, done, prompt, where)
            ids += ids_
            targets += [-1] * len(ids_)
        turn, done = piece(tokenizer, done, render(messages[:i + 1]), where)
        ids += turn
        if message["role"] != "assistant":
            targets += [-1] * len(turn)
            continue
        end = next((j for j, t in enumerate(turn) if t in ends), len(turn) - 1)
        targets += turn[:end + 1] + [-1] * (len(turn) - end - 1)
    return ids, targets


def with_where(render, where):
    def rendered(messages, add_generation_prompt=False):
        try:
            return render(messages, add_generation_prompt=add_generation_prompt)
        except UserError as e:
            raise UserError(f"{where}: {e}")
    return rendered


def piece(tokenizer, done, rendered, where):
    """(ids of what rendered adds to done, rendered)."""
    if not rendered.startswith(done):
        raise UserError(f"{where}: the chat template renders earlier turns differently once later ones follow; "
                        "its turns cannot be told apart for training")
    return encode_rendered(tokenizer, rendered[len(done):]), rendered
