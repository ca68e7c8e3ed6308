"""Chat template loading/rendering the way transformers' apply_chat_template does (jinja2 sandbox settings
from transformers.utils.chat_template_utils). The messages it renders come from messages.py."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..errors import PromptError

# Equivalent of the InternVL3 -hf chat_template.jinja (spec section 7): no default system prompt.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)

def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers overrides jinja's tojson (which HTML-escapes)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class ChatTemplate:
    def __init__(self, source: str | None = None):
        self.source = source if source is not None else DEFAULT_CHAT_TEMPLATE
        self._template = _compile(self.source)

    def render(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages from messages.split_media; extra kwargs are template variables."""
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
        except jinja2.exceptions.TemplateError as e:
            raise PromptError(f"chat template failed to render: {e}") from e


def load_chat_template(checkpoint_dir) -> str:
    """Template source from a checkpoint dir (chat_template.jinja, chat_template.json, processor_config.json,
    tokenizer_config.json, in that order); DEFAULT_CHAT_TEMPLATE if none has one."""
    d = Path(checkpoint_dir)
    p = d / "chat_template.jinja"
    if p.is_file():
        return p.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        p = d / name
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        tpl = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(tpl, str) and tpl:
            return tpl
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
    return DEFAULT_CHAT_TEMPLATE
