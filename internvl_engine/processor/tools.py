"""Tools in the prompt: the functions a request offers, the calls an assistant made and the results role "tool"
messages bring back, rendered as the model was trained to read them.

InternVL3 / 3.5 decode with Qwen2.5 / Qwen3, whose chat templates write tools the "hermes" way; InternVL's own
-hf template has no tools branch. So a chat template that reads `tools` gets them as transformers passes them (the
request's tool dicts, each call's arguments as an object); any other template gets a conversation already
rewritten the way Qwen2.5-Instruct's published chat_template renders one (tokenizer_config.json of
Qwen/Qwen2.5-7B-Instruct; Qwen3's differs only where noted):
- the tools become a system turn: the system message's text, a blank line, then TOOLS_HEADER, each tool's JSON on
  its own line, TOOLS_FOOTER. Without a system message Qwen2.5 writes its own identity prompt ("You are Qwen, ...")
  there; InternVL's template has no default system prompt, so none is written and the block starts with "# Tools",
  as Qwen3's template does;
- an assistant turn's calls follow its text, each as <tool_call>\\n{"name": "<name>", "arguments": <json>}\\n
  </tool_call>, one per line;
- consecutive role "tool" messages become one user turn of <tool_response>\\n<content>\\n</tool_response> blocks.
"""
from __future__ import annotations

import json
import re

from ..errors import PromptError

TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_VARIABLE = "tools"  # the template variable transformers (and vLLM) pass the tools in
# OpenAI's rule for a function's name
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _json(value) -> str:
    # the templates' tojson filter as transformers defines it (template._environment): json.dumps, non-ASCII kept
    return json.dumps(value, ensure_ascii=False)


def check_unicode(value, where: str) -> None:
    """JSON's \\ud800-style escapes give strings with lone surrogates, which no tokenizer takes: a PromptError
    naming the place (the server checks message text the same way before any work)."""
    try:
        _json(value).encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError(f"{where} holds a lone surrogate: not valid Unicode text") from None


def check_tools(tools) -> list[dict]:
    """The offered tools in OpenAI's shape ({"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}), returned as given; PromptError naming the first thing wrong."""
    if not isinstance(tools, (list, tuple)):
        raise PromptError(f"tools must be a list of tools, got {type(tools).__name__}")
    seen = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise PromptError(f'{where} must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise PromptError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise PromptError(f"{where}.function.name {name!r} is offered twice")
        seen.add(name)
        if "parameters" in fn and fn["parameters"] is not None and not isinstance(fn["parameters"], dict):
            raise PromptError(f"{where}.function.parameters must be a JSON schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise PromptError(f"{where}.function.description must be a string")
        check_unicode(tool, where)
    return list(tools)


def call_arguments(arguments, where: str):
    """A call's arguments as an object: OpenAI sends them as a JSON string, transformers-style callers as a dict."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            raise PromptError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(arguments, dict):
        raise PromptError(f"{where} must be a JSON object, got {type(arguments).__name__}")
    check_unicode(arguments, where)
    return arguments


def tool_call_text(name: str, arguments: dict) -> str:
    """One call as the model writes it (Qwen2.5's template: the name inserted as is, the arguments as tojson)."""
    return f'{TOOL_CALL_OPEN}\n{{"name": "{name}", "arguments": {_json(arguments)}}}\n{TOOL_CALL_CLOSE}'


def _arguments(call: dict):
    return call_arguments(call["function"]["arguments"], "tool_calls[].function.arguments")


def _with_text(content, text: str):
    """content (a string or a list of items) with text after it."""
    return content + text if isinstance(content, str) else [*content, {"type": "text", "text": text}]


def hermes_messages(messages: list[dict], tools: list | None) -> list[dict]:
    """The conversation (messages.normalize_messages' form) rewritten with only system / user / assistant turns,
    for a template without tools."""
    out: list[dict] = []
    if tools:
        block = TOOLS_HEADER + "".join("\n" + _json(t) for t in tools) + TOOLS_FOOTER
        if messages and messages[0]["role"] == "system":
            out.append({**messages[0], "content": _with_text(messages[0]["content"], "\n\n" + block)})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    tool_turn = None  # the user turn that consecutive tool results go into
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if tool_turn is None:
                tool_turn = {"role": "user", "content": block}
                out.append(tool_turn)
            else:
                tool_turn["content"] += "\n" + block
            continue
        tool_turn = None
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(tool_call_text(c["function"]["name"], _arguments(c)) for c in m["tool_calls"])
            rest = {k: v for k, v in m.items() if k != "tool_calls"}
            m = {**rest, "content": _with_text(m["content"], ("\n" if m["content"] else "") + calls)}
        out.append(m)
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """The conversation for a template that reads tools: each call's arguments an object, as transformers documents
    them (Qwen2.5's template writes `arguments | tojson`, which would quote OpenAI's JSON string a second time)."""
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments(c)}}
                                 for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


def prepare(messages: list[dict], variables: dict, template_takes_tools: bool) -> tuple[list[dict], dict]:
    """(messages, variables) a chat template renders: as they are for a template that reads tools (with the calls'
    arguments as objects), else rewritten by hermes_messages with `tools` taken out of the variables."""
    tools = variables.get(TOOLS_VARIABLE)
    if tools is not None:
        check_tools(tools)
    if template_takes_tools:
        return template_messages(messages), variables
    if tools is None and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return messages, variables
    return hermes_messages(messages, tools), {k: v for k, v in variables.items() if k != TOOLS_VARIABLE}
