"""OpenAI tool calling on the server: a request's tools / tool_choice / parallel_tool_calls read into ToolSettings,
the grammar that enforces `required`, a named function and strict tools (handed to the engine's structured
outputs), and the parsers that turn a sample's text into OpenAI tool_calls, whole or piece by piece as it streams,
with the same result either way (the whole text is one feed).

tool_choice, as this server reads it:
- "none": the tools are still rendered (the prompt, and its prefix-cache blocks, are auto's; vLLM renders them
  too) but the text is never parsed: whatever the model writes is content;
- "auto" (the default when tools are offered): the text is free (or, when a tool is strict, OpenAI's
  function.strict, held by ToolSettings.auto_grammar to text followed by well-formed calls) and parsed the hermes
  way the prompt asked for (processor/tools.py): each <tool_call>{"name": ..., "arguments": {...}}</tool_call>
  block naming an offered tool becomes a call; a block that is not such JSON, names no offered tool, or is cut
  off stays content, as does the text around the calls (the whitespace between calls and tags dropped); with
  parallel_tool_calls false only the first call is one, later blocks stay content;
- "required": the text is constrained to a JSON array of {"name": <an offered tool>, "arguments": <its parameters>}
  (one element when parallel_tool_calls is false), as vLLM constrains it; each element becomes a call;
- {"type": "function", "function": {"name": ...}}: the text is constrained to that tool's arguments object.
A sample that made calls and stopped has finish_reason "tool_calls". The legacy `functions` / `function_call`
fields (OpenAI's deprecated spelling, answered with a `function_call` message this server does not produce) are
a 400 naming them rather than mapped.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from ..errors import PromptError
from ..processor.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, check_tools
from ..sampling import StructuredOutputsParams

TOOL_CHOICES = ("none", "auto", "required")
# OpenAI's meaning of a function declared without parameters: it takes none
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class ToolRequestError(PromptError):
    """A request's tool fields are wrong; param names the field (the server's 400 carries it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSettings:
    tools: tuple            # the offered tools, as the request gave them
    choice: str             # "none", "auto", "required" or "named"
    name: str | None        # the function a named tool_choice forces
    parallel: bool          # parallel_tool_calls

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)

    def parameters(self, name: str) -> dict:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or NO_PARAMETERS

    def schema(self) -> dict | None:
        """The JSON schema the text is held to: required's array of calls, a named function's arguments, else None."""
        if self.choice == "named":
            return self.parameters(self.name)
        if self.choice != "required":
            return None
        call = [{"type": "object", "properties": {"name": {"type": "string", "enum": [n]},
                                                  "arguments": self.parameters(n)},
                 "required": ["name", "arguments"], "additionalProperties": False} for n in self.names]
        array = {"type": "array", "items": call[0] if len(call) == 1 else {"anyOf": call}, "minItems": 1}
        return {**array, "maxItems": 1} if not self.parallel else array

    @property
    def strict(self) -> bool:
        """Whether a tool asks for strict arguments (OpenAI's function.strict: calls always match its parameters)."""
        return any(t["function"].get("strict") is True for t in self.tools)

    def auto_grammar(self) -> str:
        """auto with a strict tool: free text (no <tool_call> in it), then hermes calls exactly as the prompt shows
        them, a strict tool's arguments held to its parameters, another's to any object (llguidance's Lark: <tool_call>
        names the token, %json a JSON schema; a space allowed where json.dumps, which the template writes with,
        puts one)."""
        rules, calls = [], []
        for i, t in enumerate(self.tools):
            fn = t["function"]
            schema = (fn.get("parameters") or NO_PARAMETERS) if fn.get("strict") is True else {"type": "object"}
            head = json.dumps(f'\n{{"name": "{fn["name"]}", "arguments": ')
            rules += [f'call_{i}: <tool_call> {head} args_{i} "}}\\n" </tool_call>',
                      f"args_{i}: %json {json.dumps({**schema, 'x-guidance': {'whitespace_pattern': '[ ]?'}})}"]
            calls.append(f"call_{i}")
        more = ' ("\\n" call)*' if self.parallel else ""
        return "\n".join([f"start: TEXT? (call{more})?", f"call: {' | '.join(calls)}", *rules,
                          "TEXT: /(?s:.+)/ & ~/(?s:.*<tool_call>.*)/"])

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """What the engine holds the text to: required's / a named function's schema, auto's grammar when a tool is
        strict, else nothing."""
        if self.choice == "auto" and self.strict:
            return StructuredOutputsParams(grammar=self.auto_grammar())
        schema = self.schema()
        return None if schema is None else StructuredOutputsParams(json=schema)

    def parser(self) -> "ToolParser | None":
        """A fresh parser for one sample's text; None when the text is not parsed (tool_choice none)."""
        return {"auto": AutoParser, "required": ArrayParser, "named": NamedParser}.get(self.choice, _none)(self)


def _none(settings):
    return None


def tool_settings(tools, tool_choice, parallel_tool_calls, functions=None, function_call=None) -> ToolSettings | None:
    """The request's tool fields read, or ToolRequestError naming the field; None when it offers no tools."""
    if functions is not None:
        raise ToolRequestError("functions (OpenAI's deprecated form) is not supported by this server: send tools",
                               "functions")
    if function_call is not None:
        raise ToolRequestError("function_call (OpenAI's deprecated form) is not supported by this server: send "
                               "tool_choice", "function_call")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolRequestError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise ToolRequestError("tool_choice needs tools", "tool_choice")
        return None
    if not tools:
        raise ToolRequestError("tools must offer at least one tool (or be left out)", "tools")
    try:
        tools = tuple(check_tools(tools))
    except PromptError as e:
        raise ToolRequestError(str(e), "tools") from None
    choice, name = _choice(tool_choice, [t["function"]["name"] for t in tools])
    return ToolSettings(tools, choice, name, True if parallel_tool_calls is None else parallel_tool_calls)


def _choice(tool_choice, names: list[str]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ToolRequestError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or "
                                   '{"type": "function", "function": {"name": ...}}, got ' f"{tool_choice!r}",
                                   "tool_choice")
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or tool_choice.get("type") != "function":
        raise ToolRequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                               '{"name": ...}}', "tool_choice")
    if name not in names:
        raise ToolRequestError(f"tool_choice names the function {name!r}, which tools does not offer "
                               f"(offered: {', '.join(names)})", "tool_choice")
    return "named", name


def template_variables(chat_template_kwargs: dict | None, settings: ToolSettings | None) -> dict | None:
    """The chat template's variables for a request: its chat_template_kwargs, with the offered tools as `tools`."""
    if settings is None:
        return chat_template_kwargs
    if chat_template_kwargs and "tools" in chat_template_kwargs:
        raise ToolRequestError("chat_template_kwargs.tools: send the tools in the request's tools field",
                               "chat_template_kwargs")
    return {**(chat_template_kwargs or {}), "tools": list(settings.tools)}


def finish_reason(finish: str | None, parser: "ToolParser | None") -> str | None:
    """A sample that made calls and stopped finished with "tool_calls" (cut by max_tokens: still "length")."""
    return "tool_calls" if finish == "stop" and parser is not None and parser.calls else finish


def shape_message(message: dict, settings: ToolSettings | None, finish: str | None) -> tuple[dict, str | None]:
    """A whole chat message with its content parsed for calls (tool_calls; content None when calls took all of it),
    and the choice's finish reason: what the streamed deltas of the same text add up to."""
    parser = settings.parser() if settings is not None else None
    if parser is None:
        return message, finish
    text = message["content"]
    content = parser.feed(text or "")[0] + parser.finish()[0]
    if parser.calls:
        message = {**message, "content": content or None, "tool_calls": parser.calls}
    elif text is not None:  # auto's text without calls comes back whole; required's cut before a call, empty
        message = {**message, "content": content}
    return message, finish_reason(finish, parser)


def shape_delta(delta: dict, parser: "ToolParser | None", finished: bool) -> dict:
    """A streamed chat delta with its content parsed: the text outside calls as content, the calls' pieces as
    tool_calls."""
    if parser is None:
        return delta
    content, calls = parser.feed(delta.pop("content", ""))
    if finished:
        more, last = parser.finish()
        content, calls = content + more, calls + last
    return {**delta, **({"content": content} if content else {}), **({"tool_calls": calls} if calls else {})}


# ------------------------------------------------------------------------------------------------ parsers
class ToolParser:
    """One sample's parser: feed() each new piece of text, finish() at the end; each returns (content, deltas),
    deltas in OpenAI's delta.tool_calls shape. A call's first delta carries its index, id, type and name, later
    ones its index and the next piece of its arguments; calls holds every call so far, whole."""

    def __init__(self, settings: ToolSettings):
        self.settings = settings
        self.calls: list[dict] = []
        self._deltas: list[dict] = []

    def _open(self, name: str, arguments: str = "") -> None:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": arguments}}
        self.calls.append(call)
        self._deltas.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                             "function": {"name": name, "arguments": arguments}})

    def _arguments(self, piece: str) -> None:
        if not piece:
            return
        index = len(self.calls) - 1
        self.calls[index]["function"]["arguments"] += piece
        last = self._deltas[-1] if self._deltas else None
        if last is not None and last["index"] == index:
            last["function"]["arguments"] += piece
        else:
            self._deltas.append({"index": index, "function": {"arguments": piece}})

    def _take(self) -> list[dict]:
        deltas, self._deltas = self._deltas, []
        return deltas

    def feed(self, text: str) -> tuple[str, list[dict]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[dict]]:
        return "", self._take()


def _partial(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper start of tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class AutoParser(ToolParser):
    """Hermes blocks in free text. Text outside blocks is content; what may be the start of a tag, and whitespace
    that may turn out to stand between calls and tags, is held until the next piece decides it. A block becomes a
    call when it closes, whole (its arguments in its first delta)."""

    def __init__(self, settings: ToolSettings):
        super().__init__(settings)
        self.held = ""          # text state: a possible tag start or trailing whitespace; in a block: the block
        self.in_block = False
        self.gap = ""           # whitespace before the open block (dropped if it is a call)
        self.after_call = False  # whitespace right after a call's closing tag is dropped

    def feed(self, text: str) -> tuple[str, list[dict]]:
        buf, self.held, content = self.held + text, "", ""
        while buf:
            if self.in_block:
                end = buf.find(TOOL_CALL_CLOSE)
                if end < 0:
                    self.held = buf
                    break
                content += self._close(buf[:end])
                buf = buf[end + len(TOOL_CALL_CLOSE):]
                continue
            if self.after_call:
                buf = buf.lstrip()
                if not buf:
                    break
                self.after_call = False
            start = buf.find(TOOL_CALL_OPEN)
            if start >= 0:
                before = buf[:start]
                text_part = before.rstrip()
                content += text_part
                self.gap, self.in_block = before[len(text_part):], True
                buf = buf[start + len(TOOL_CALL_OPEN):]
                continue
            keep = _partial(buf, TOOL_CALL_OPEN)
            body = buf[:len(buf) - keep]
            stripped = body.rstrip()
            content += stripped
            self.held = body[len(stripped):] + buf[len(buf) - keep:]
            break
        return content, self._take()

    def _close(self, body: str) -> str:
        """A closed block: a call (nothing goes to content), or its text back as content."""
        self.in_block = False
        call = _hermes_call(body, self.settings.names)
        if call is None or (self.calls and not self.settings.parallel):  # parallel_tool_calls false: the first
            return self.gap + TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE
        self._open(call[0], call[1])
        self.after_call = True
        return ""

    def finish(self) -> tuple[str, list[dict]]:
        held, self.held = self.held, ""
        if self.in_block:  # cut off inside a block: its text is content
            content = self.gap + TOOL_CALL_OPEN + held
        else:  # trailing whitespace after the text (kept) or after a call (dropped)
            content = "" if self.after_call else held
        self.in_block = False
        return content, self._take()


def _hermes_call(body: str, names: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments JSON) of a block's text, or None when it is not {"name": <offered>, "arguments": {...}}."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


class _JSONScanner:
    """Where a character of JSON text stands: its nesting depth before it, and whether it is inside a string."""

    def __init__(self):
        self.depth, self.in_string, self.escaped = 0, False, False

    def step(self, ch: str) -> tuple[int, bool]:
        """(depth before ch, whether ch is part of a string, its quotes included)."""
        depth = self.depth
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
            return depth, True
        if ch == '"':
            self.in_string = True
            return depth, True
        if ch in "[{":
            self.depth += 1
        elif ch in "]}":
            self.depth -= 1
        return depth, False


class NamedParser(ToolParser):
    """A named function's call: the whole text is its arguments (whitespace outside the object dropped)."""

    def __init__(self, settings: ToolSettings):
        super().__init__(settings)
        self._open(settings.name)
        self.scan = _JSONScanner()

    def feed(self, text: str) -> tuple[str, list[dict]]:
        kept = []
        for ch in text:
            depth, in_string = self.scan.step(ch)
            if in_string or depth > 0 or not ch.isspace():
                kept.append(ch)
        self._arguments("".join(kept))
        return "", self._take()


class ArrayParser(ToolParser):
    """required's JSON array of {"name", "arguments"} objects: a call opens once its name is read, and its arguments
    stream as they are written (held until the name is known, should arguments come first)."""

    def __init__(self, settings: ToolSettings):
        super().__init__(settings)
        self.scan = _JSONScanner()
        self.phase = "key"      # inside an element: "key", "colon" (after a key), "value"
        self.key = self.raw = ""
        self.name: str | None = None
        self.pending = ""       # arguments read before the element's name

    def feed(self, text: str) -> tuple[str, list[dict]]:
        for ch in text:
            depth, in_string = self.scan.step(ch)
            if depth < 2:  # the array's own brackets, commas and whitespace; "{" opens an element
                if depth == 1 and ch == "{" and not in_string:
                    self.phase, self.key, self.raw, self.name, self.pending = "key", "", "", None, ""
                continue
            if depth == 2 and not in_string:  # the element's own punctuation, or a value's first character
                if ch == ":" and self.phase == "colon":
                    self.phase = "value"
                elif ch in ",}" and self.phase == "value":
                    self._value_done()
                    self.phase = "key"
                elif self.phase == "value" and not ch.isspace():
                    self._value_char(ch)
            elif self.phase == "key":  # a key's characters (depth 2, in its string)
                self.raw += ch
                if not self.scan.in_string:  # its closing quote
                    self.key, self.raw, self.phase = _loads(self.raw), "", "colon"
            elif self.phase == "value":
                self._value_char(ch)
        return "", self._take()

    def _value_char(self, ch: str) -> None:
        if self.key == "name":
            self.raw += ch
        elif self.key == "arguments":
            if self.name is None:
                self.pending += ch
            else:
                self._arguments(ch)

    def _value_done(self) -> None:
        if self.key == "name":
            name = _loads(self.raw)
            self.raw = ""
            if isinstance(name, str) and self.name is None:
                self.name = name
                self._open(name)
                self._arguments(self.pending)
                self.pending = ""


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None
