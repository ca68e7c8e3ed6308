"""Chat template loading/rendering the way transformers' apply_chat_template does (jinja2 sandbox settings
from transformers.utils.chat_template_utils). The messages it renders come from messages.py."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..errors import PromptError
from .tools import TOOLS_VARIABLE, prepare as prepare_tools

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

# InternVL3.5's thinking switch (its model cards, "Thinking Mode"; the vLLM recipe InternVL/InternVL3_5.md): this
# system prompt, verbatim as the model was trained with it; its -HF chat template has no enable_thinking variable
# (the same template as InternVL3's), so the switch is this message, not a template branch.
THINKING_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and "
    "reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> "
    "tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate "
    "the answer from the think section with a newline.\n\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section."
)
THINKING_SWITCH = "enable_thinking"  # the template variable Qwen3-style templates branch on (vLLM passes it the same)


def _environment():
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
    return env


class ChatTemplate:
    def __init__(self, source: str | None = None):
        import jinja2.meta

        self.source = source if source is not None else DEFAULT_CHAT_TEMPLATE
        env = _environment()
        self._template = env.from_string(self.source)
        # the variables the template reads (messages, add_generation_prompt, ...): a switch it has is among them
        self.variables = frozenset(jinja2.meta.find_undeclared_variables(env.parse(self.source)))

    @property
    def has_thinking_switch(self) -> bool:
        """Whether the template itself turns thinking on and off (it reads enable_thinking)."""
        return THINKING_SWITCH in self.variables

    @property
    def takes_tools(self) -> bool:
        """Whether the template renders tools itself (it reads `tools`, as Qwen2.5 / Qwen3's do); else tools.py
        rewrites a conversation with tools the way Qwen2.5's template renders it."""
        return TOOLS_VARIABLE in self.variables

    def render(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages from messages.split_media; extra kwargs are template variables."""
        import jinja2

        messages, kwargs = prepare_tools(messages, kwargs, self.takes_tools)
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
