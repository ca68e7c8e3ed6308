"""Structured outputs over the wire, driven by the official `openai` client against a served random-weight model
(only a constrained decoder writes valid JSON there), at temperature 1 for several seeds, streamed and not:
response_format json_schema (a nested schema: enums, integer ranges, string patterns, additionalProperties false)
and json_object, vLLM's structured_outputs (choice, regex, json) and the older guided_* fields, logit_bias (+100
forces a token, -100 bans one); and the 400s naming the field for a constraint that does not compile or one this
server does not implement."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
sys.path.insert(0, str(Path(__file__).parent))
from test_server import MODEL, served  # noqa: E402
from test_structured import SCHEMA  # noqa: E402


SEEDS = (1, 2, 3)
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server():
    with served() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _chat(client, stream=False, **kw):
    """(text, finish_reason) of one chat completion, its streamed deltas joined when stream=True."""
    kw = {"model": MODEL, "messages": ASK, "max_tokens": 80, "temperature": 1.0, **kw}
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_is_valid_for_every_seed(client, stream):
    texts = []
    for seed in SEEDS:
        text, finish = _chat(client, stream, seed=seed, response_format=RESPONSE_FORMAT)
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
        texts.append(text)
    assert len(set(texts)) > 1


def test_streamed_equals_unstreamed(client):
    assert _chat(client, True, seed=4, response_format=RESPONSE_FORMAT) == \
        _chat(client, False, seed=4, response_format=RESPONSE_FORMAT)


def test_the_clients_parse_helper_gets_its_pydantic_model(client):
    """client.chat.completions.parse with a pydantic model: the client sends its strict schema ($defs, $ref,
    titles, anyOf with null) and parses the answer into the model."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Address(BaseModel):
        zip: str = Field(pattern=r"^[0-9]{5}$")
        kind: Literal["home", "work"]

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)
        addresses: list[Address] = Field(max_length=2)
        nick: str | None = Field(max_length=5)

    for seed in SEEDS:
        out = client.chat.completions.parse(model=MODEL, messages=ASK, max_tokens=120, temperature=1.0, seed=seed,
                                            response_format=Person)
        assert isinstance(out.choices[0].message.parsed, Person) and out.choices[0].finish_reason == "stop"


def test_json_object_gives_an_object(client, server):
    """A random model inside a JSON string closes it only by chance (a quote among ~150k tokens): the bias raises
    the tokens that close strings and objects, and the grammar still decides what is valid where."""
    tok = server.llm.engine.tokenizer
    bias = {str(tok.encode(s)[0]): 8 for s in ('"', '"}', '}', '":"')}
    for seed in SEEDS:
        text, finish = _chat(client, seed=seed, max_tokens=120, response_format={"type": "json_object"},
                             logit_bias=bias)
        assert finish == "stop" and isinstance(json.loads(text), dict), text


def test_vllm_structured_outputs_and_guided_fields(client):
    choices = ["alpha", "beta", "gamma ray"]
    for seed in SEEDS:
        for body in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
            text, finish = _chat(client, seed=seed, extra_body=body)
            assert text in choices and finish == "stop", (body, text)
        for body in ({"structured_outputs": {"regex": "[a-f]{2}-[0-9]{2,3}"}},
                     {"guided_regex": "[a-f]{2}-[0-9]{2,3}", "guided_decoding_backend": "llguidance"}):
            text, _ = _chat(client, seed=seed, extra_body=body)
            assert re.fullmatch("[a-f]{2}-[0-9]{2,3}", text), (body, text)
        text, _ = _chat(client, seed=seed, extra_body={"guided_json": SCHEMA})
        jsonschema.validate(json.loads(text), SCHEMA)
    completion = client.completions.create(model=MODEL, prompt="Pick one:", max_tokens=20, temperature=1.0, seed=1,
                                           extra_body={"structured_outputs": {"choice": choices}})
    assert completion.choices[0].text in choices
    completion = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=80, temperature=1.0, seed=2,
                                           extra_body={"response_format": RESPONSE_FORMAT})
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)


def test_logit_bias_forces_and_bans(client, server):
    tok = server.llm.engine.tokenizer
    forced = tok.encode(" harbor")[0]
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=1.0, seed=1,
                                         logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == tok.decode([forced] * 5)
    kw = dict(model=MODEL, prompt="Hello", max_tokens=1, temperature=0, extra_body={"return_token_ids": True})
    first = client.completions.create(**kw).choices[0].model_extra["token_ids"][0]
    banned = client.completions.create(**kw, logit_bias={str(first): -100}).choices[0].model_extra["token_ids"][0]
    assert banned != first


@pytest.mark.parametrize("kw,param,says", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}),
     "response_format", "structured_outputs.json cannot be compiled"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format",
     "json_schema.schema"),
    (dict(response_format={"type": "structural_tag", "format": {}}), "response_format", "structural_tag"),
    (dict(response_format={"type": "yaml"}), "response_format", "'yaml'"),
    (dict(extra_body={"guided_regex": "[a-"}), "guided_regex", "structured_outputs.regex cannot be compiled"),
    (dict(extra_body={"guided_grammar": "start: x y"}), "guided_grammar", "structured_outputs.grammar cannot be compiled"),
    (dict(extra_body={"structured_outputs": {"regex": "[a-"}}), "structured_outputs", "regex cannot be compiled"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["b"]}}), None, "exactly one of"),
    (dict(extra_body={"structured_outputs": {"structural_tag": "{}"}}), "structured_outputs", "structural_tag"),
    (dict(extra_body={"structured_outputs": {"json": {}, "no_such_key": 1}}), "structured_outputs", "no_such_key"),
    (dict(extra_body={"structured_outputs": {"json": {}, "disable_additional_properties": True}}),
     "structured_outputs", "disable_additional_properties"),
    (dict(extra_body={"guided_choice": ["a"], "guided_decoding_backend": "xgrammar"}), "guided_decoding_backend",
     "xgrammar"),
    (dict(extra_body={"guided_choice": ["a"], "guided_regex": "b"}), "guided_json", "at most one"),
    (dict(extra_body={"guided_whitespace_pattern": " "}), "guided_whitespace_pattern", "guided_json"),
    (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}), "guided_regex",
     "response_format and guided_regex"),
    (dict(logit_bias={"abc": 1}), "logit_bias", "'abc'"),
    (dict(logit_bias={"5": 101}), None, "logit_bias"),
    (dict(logit_bias={"999999": 1}), None, "outside the model's vocabulary"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(client, kw, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kw)
    err = e.value.body.get("error", e.value.body) if isinstance(e.value.body, dict) else {}
    assert says in err["message"] and err.get("param") == param, err
