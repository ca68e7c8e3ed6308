"""The rest of the OpenAI surface (issue 3.3), driven over loopback HTTP by the official `openai` client and httpx:
completions echo with prompt logprobs in lm-evaluation-harness's shape (max_tokens 1 and 0, streamed and not),
prompts of token ids (equal to their text), /tokenize and /detokenize (vLLM's shapes, a round trip, image tokens
counted), image_url.detail, system_fingerprint, X-Request-Id on every answer, Retry-After on 429, and the fields
the server does not implement refused by name."""
from __future__ import annotations

import re
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from internvl_engine import LLM, SamplingParams  # noqa: E402
from internvl_engine.errors import PromptError  # noqa: E402
from internvl_engine.server import ServerSettings  # noqa: E402

from test_server import png_data_uri, served, status_of, wait_idle  # noqa: E402

MODEL = "random:tiny"
ENGINE = dict(device="cpu", kv_cache_tokens=4096, max_num_seqs=8, max_model_len=2048)
TEXT = "The quick brown fox jumps over the lazy dog; naïve café, 東京."


@pytest.fixture(scope="module")
def server():
    with served(engine=ENGINE) as srv:
        yield srv


@pytest.fixture(scope="module")
def small_server():
    """An API key, one sequence at a time and one waiting at most."""
    settings = ServerSettings(model_name=MODEL, api_key="sekrit", max_waiting=1)
    with served(settings, {**ENGINE, "max_num_seqs": 1}) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline():
    return LLM(MODEL, device="cpu", kv_cache_tokens=4096, max_model_len=2048)


def tokenize(srv, **body) -> dict:
    r = httpx.post(srv.url + "/tokenize", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def image_conversation(detail: str | None = None, size=(900, 500)) -> list[dict]:
    ref = {"url": png_data_uri(7, size=size)}
    if detail is not None:
        ref["detail"] = detail
    return [{"role": "user", "content": [{"type": "image_url", "image_url": ref}, {"type": "text", "text": "What?"}]}]


# ------------------------------------------------------------------------------------------------ echo
def test_echo_logprobs_in_lm_eval_shape(server, offline):
    """lm-evaluation-harness's loglikelihood request (token-id prompts, echo, logprobs 1, max_tokens 1, temperature
    0) read as its parse_logprobs reads it; the prompt's logprobs equal the log-softmax of the model's own logits."""
    ids = tokenize(server, prompt=TEXT)["tokens"]
    ctxlen = 5
    r = server.client().completions.create(model=MODEL, prompt=[ids, ids[:8]], echo=True, logprobs=1, max_tokens=1,
                                           temperature=0, seed=1234, extra_body={"return_token_ids": True})
    assert len(r.choices) == 2
    choice = sorted(r.choices, key=lambda c: c.index)[0]
    lp = choice.logprobs
    assert choice.text.startswith(TEXT) and len(choice.text) > len(TEXT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    tok = server.llm.engine.processor.tokenizer
    assert lp.tokens[:len(ids)] == [tok.decode([i], skip_special_tokens=False) for i in ids]  # (a byte-level token
    # may hold part of a character: 東 is two here, each alone decodes to U+FFFD, as in vLLM's answer)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]  # vLLM's offsets
    # parse_logprobs: the continuation's tokens, the last (generated) one dropped
    continuation = lp.token_logprobs[ctxlen:-1]
    tops = lp.top_logprobs[ctxlen:-1]
    assert all(isinstance(x, float) for x in continuation) and all(len(t) >= 1 for t in tops)
    is_greedy = all(tok == max(top.values()) for tok, top in zip(continuation, tops))
    logprobs = torch.log_softmax(offline.prompt_logits({"prompt_token_ids": ids}).double(), -1)
    expect = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expect.tolist(), abs=2e-3)
    top1 = logprobs.argmax(-1)[ctxlen - 1:len(ids) - 1]
    assert is_greedy == bool((top1 == torch.tensor(ids[ctxlen:])).all())
    # the generated token is the greedy one after the prompt (the last position's logits), with its logprob
    generated = choice.model_extra["token_ids"]
    assert generated == [int(logprobs[-1].argmax())]
    assert lp.token_logprobs[-1] == pytest.approx(logprobs[-1].max().item(), abs=2e-3)


def test_echo_marks_a_greedy_continuation_greedy(server):
    """A continuation the model itself chose greedily: each of its tokens is its position's top logprob, the way
    lm-evaluation-harness decides is_greedy (token logprob == max(top_logprobs.values()))."""
    client = server.client()
    ids = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0,
                                    extra_body={"return_token_ids": True}).choices[0].model_extra
    full = ids["prompt_token_ids"] + ids["token_ids"]
    lp = client.completions.create(model=MODEL, prompt=full, echo=True, logprobs=1, max_tokens=0,
                                   temperature=0).choices[0].logprobs
    n = len(ids["prompt_token_ids"])
    assert len(lp.token_logprobs) == len(full)
    assert all(tok == max(top.values()) for tok, top in zip(lp.token_logprobs[n:], lp.top_logprobs[n:]))


def test_echo_without_generation(server):
    """max_tokens 0 with echo (vLLM's): the prompt alone, its logprobs, no completion tokens; without echo a 400."""
    client = server.client()
    r = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=2, max_tokens=0, temperature=0)
    c = r.choices[0]
    n = tokenize(server, prompt=TEXT)["count"]
    assert c.text == TEXT and c.finish_reason == "length"
    assert len(c.logprobs.token_logprobs) == n and c.logprobs.token_logprobs[0] is None
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs[1:])
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == n
    chunks = list(client.completions.create(model=MODEL, prompt=TEXT, echo=True, max_tokens=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == TEXT
    assert chunks[-1].usage.completion_tokens == 0
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    status, body = status_of(lambda: client.completions.create(model=MODEL, prompt=TEXT, max_tokens=0))
    assert status == 400 and "max_tokens" in body["error"]["message"]


def test_echo_streamed_equals_whole(server):
    """Streamed echo: each choice's first chunk is its prompt (vLLM's), then the generated text; the chunks join to
    the non-streamed choice, logprobs and offsets included."""
    client = server.client()
    args = dict(model=MODEL, prompt=["Hello there", "Once upon"], echo=True, logprobs=1, max_tokens=4, temperature=0)
    whole = {c.index: c for c in client.completions.create(**args).choices}
    streamed: dict[int, dict] = {}
    for ch in client.completions.create(**args, stream=True):
        for c in ch.choices:
            s = streamed.setdefault(c.index, {"texts": [], "tokens": [], "lps": [], "offsets": []})
            s["texts"].append(c.text)
            s["tokens"] += c.logprobs.tokens
            s["lps"] += c.logprobs.token_logprobs
            s["offsets"] += c.logprobs.text_offset
    assert streamed[0]["texts"][0] == "Hello there" and streamed[1]["texts"][0] == "Once upon"
    for i, c in whole.items():
        assert "".join(streamed[i]["texts"]) == c.text
        assert streamed[i]["tokens"] == c.logprobs.tokens and streamed[i]["offsets"] == c.logprobs.text_offset
        assert streamed[i]["lps"][0] is None and c.logprobs.token_logprobs[0] is None
        assert streamed[i]["lps"][1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-4)


# ------------------------------------------------------------------------------------------------ token-id prompts
def test_token_id_prompt_equals_its_text(server):
    client = server.client()
    ids = tokenize(server, prompt=TEXT)["tokens"]
    extra = {"return_token_ids": True}
    by_text = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=6, temperature=0, extra_body=extra)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, extra_body=extra)
    a, b = by_text.choices[0].model_extra, by_ids.choices[0].model_extra
    assert a["prompt_token_ids"] == b["prompt_token_ids"] == ids
    assert a["token_ids"] == b["token_ids"] and by_text.choices[0].text == by_ids.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    both = client.completions.create(model=MODEL, prompt=[ids, ids[:4]], max_tokens=3, temperature=0)
    assert sorted(c.index for c in both.choices) == [0, 1]
    assert both.usage.prompt_tokens == len(ids) + 4


def test_token_id_prompts_checked_by_field(server):
    vocab = server.llm.engine.config.text.vocab_size
    image_id = server.llm.engine.processor.tokenizer.image_token_id
    for prompt, words in [([], "empty"), ([[1, 2], []], "empty"), ([5, -1], "vocabulary"), ([5, vocab], "vocabulary"),
                          ([1] * 2100, "context"), ([5, image_id], "image placeholder")]:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
        assert r.status_code == 400, (prompt[:3], r.text)
        err = r.json()["error"]
        assert words in err["message"], err
        if words != "image placeholder":  # (refused by the engine's intake, which names the request)
            assert err["param"] == "prompt"
    for prompt in ([1, True], [1, 2.0], [[1], "x"]):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text


def test_llm_takes_a_prompt_of_token_ids(offline):
    ids = offline.processor.tokenizer.encode(TEXT)
    p = SamplingParams(max_tokens=5, temperature=0)
    by_text, by_ids = offline.generate([{"prompt": TEXT}, {"prompt_token_ids": ids}], p)
    assert by_ids.prompt_token_ids == by_text.prompt_token_ids == ids and by_ids.token_ids == by_text.token_ids
    for bad in ({"prompt_token_ids": []}, {"prompt_token_ids": [1, -3]}, {"prompt_token_ids": ["a"]},
                {"prompt_token_ids": [1], "images": [png_data_uri()]}):
        with pytest.raises(PromptError):
            offline.generate(bad, p)


# ------------------------------------------------------------------------------------------------ /tokenize
def test_tokenize_detokenize_round_trip(server):
    got = tokenize(server, model=MODEL, prompt=TEXT, return_token_strs=True)
    assert got["count"] == len(got["tokens"]) == len(got["token_strs"]) and got["max_model_len"] == 2048
    tok = server.llm.engine.processor.tokenizer
    assert got["tokens"] == tok.encode(TEXT) and got["token_strs"] == [tok.id_to_token(i) for i in got["tokens"]]
    assert tokenize(server, prompt=TEXT, add_special_tokens=False)["tokens"] == got["tokens"]
    # the tokenizer's own post-processor adds nothing (no BOS), so add_special_tokens true changes nothing either
    assert tok.backend.encode(TEXT, add_special_tokens=True).ids == got["tokens"]
    assert tokenize(server, prompt=TEXT, add_special_tokens=True)["tokens"] == got["tokens"]
    back = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": got["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.json() == {"prompt": TEXT}
    # lm-evaluation-harness's remote tokenizer checks /tokenizer_info for eos_token before using /tokenize
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|im_end|>" and "{%" in info["chat_template"]


def test_tokenize_messages_counts_what_chat_feeds_the_model(server):
    client = server.client()
    for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
                     image_conversation()):
        got = tokenize(server, messages=messages)
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
        assert got["count"] == chat.usage.prompt_tokens == len(got["tokens"])
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    got, bare = tokenize(server, messages=messages, tools=tools), tokenize(server, messages=messages)
    chat = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="none",
                                          max_tokens=1)
    assert got["count"] == chat.usage.prompt_tokens > bare["count"]
    text_only = tokenize(server, messages=[{"role": "user", "content": "Hi!"}], add_generation_prompt=False)
    with_prompt = tokenize(server, messages=[{"role": "user", "content": "Hi!"}])
    assert with_prompt["tokens"][:text_only["count"]] == text_only["tokens"] and \
        with_prompt["count"] > text_only["count"]


def test_tokenize_refusals(server):
    def post(route, body):
        r = httpx.post(server.url + route, json=body, timeout=30)
        return r.status_code, r.json().get("error", {})
    vocab = server.llm.engine.processor.tokenizer.vocab_size
    for route, body, param in [
        ("/detokenize", {"tokens": [1, vocab]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "chat_template": "{{x}}"}, "chat_template"),
        ("/tokenize", {"prompt": "a", "prompt_typo": 1}, "prompt_typo"),
        ("/tokenize", {"prompt": "a", "tools": []}, "tools"),
        ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "tools": [{"type": "function"}]}, "tools"),
        ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "mm_processor_kwargs": {"bogus": 1}},
         "mm_processor_kwargs"),
    ]:
        status, err = post(route, body)
        assert status == 400 and err["param"] == param, (route, body, err)
    status, err = post("/tokenize", {"model": "gpt-4", "prompt": "a"})
    assert status == 404 and err["code"] == "model_not_found"
    status, err = post("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}]}]})
    assert status == 400 and "MediaPolicy" in err["code"]  # the server's media policy holds here too


# ------------------------------------------------------------------------------------------------ image detail
def test_image_detail(server):
    """detail "low": one tile (image_seq_length placeholders between its start and end tokens, no thumbnail);
    "high" and "auto": the model's tiling; the counts /tokenize gives are what chat requests are charged."""
    seq = server.llm.engine.config.image_seq_length
    count = {d: tokenize(server, messages=image_conversation(d))["count"] for d in (None, "auto", "high", "low")}
    no_image = tokenize(server, messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}]}])["count"]
    assert count[None] == count["auto"] == count["high"] > count["low"]
    overhead = count["low"] - no_image - seq  # <img>, </img> and the template's line break around the image
    assert 2 <= overhead <= 3
    tiles, rest = divmod(count["high"] - no_image - overhead, seq)
    assert rest == 0 and tiles == 3  # 900x500: a 2x1 grid and the thumbnail
    client = server.client()
    chat = client.chat.completions.create(model=MODEL, messages=image_conversation("low"), max_tokens=1)
    assert chat.usage.prompt_tokens == count["low"]
    status, body = status_of(lambda: client.chat.completions.create(
        model=MODEL, messages=image_conversation("medium"), max_tokens=1))
    assert status == 400 and "image_url.detail" in body["error"]["message"]


# ------------------------------------------------------------------------------------------------ headers
def test_fingerprint_and_request_id_on_every_answer(server, small_server):
    client = server.client()
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    comp = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    fp = chat.system_fingerprint
    assert re.fullmatch(r"internvl-engine-[\w.+-]+-[0-9a-f]{10}", fp) and comp.system_fingerprint == fp
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=2, stream=True, stream_options={"include_usage": True}))
    assert {c.system_fingerprint for c in chunks} == {fp}
    assert {c.system_fingerprint for c in client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                                                    stream=True)} == {fp}
    label = {"X-Request-Id": "trace-42"}
    calls = [
        ("POST", server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2}, 200),
        ("POST", server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stream": True}, 200),
        ("POST", server.url + "/v1/completions", {"prompt": "Hi", "max_tokens": -1}, 400),
        ("POST", server.url + "/v1/completions", {"model": "nope", "prompt": "Hi"}, 404),
        ("GET", server.url + "/v1/nowhere", None, 404),
        ("POST", server.url + "/tokenize", {"prompt": "Hi"}, 200),
        ("GET", server.url + "/health", None, 200),
        ("POST", small_server.url + "/v1/completions", {"prompt": "Hi"}, 401),
        ("POST", small_server.url + "/tokenize", {"prompt": "Hi"}, 401),
    ]
    for method, url, body, status in calls:
        r = httpx.request(method, url, json=body, headers=label, timeout=60)
        assert r.status_code == status and r.headers.get("x-request-id") == "trace-42", (url, body, r.status_code)
        assert r.headers.get_list("x-request-id") == ["trace-42"]
    ok = httpx.post(small_server.url + "/tokenize", json={"prompt": "Hi"}, headers={"Authorization": "Bearer sekrit"})
    assert ok.status_code == 200


def test_retry_after_on_429(small_server):
    """One running, one waiting (--max-waiting 1): the third is a 429 with Retry-After."""
    auth = {"Authorization": "Bearer sekrit"}
    long = {"prompt": "Long.", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    engine = small_server.llm.engine
    with httpx.stream("POST", small_server.url + "/v1/completions", json=long, headers=auth, timeout=60) as running:
        lines = running.iter_lines()  # (held: a dropped iterator closes the stream, and the request with it)
        next(lines)
        waiter = threading.Thread(target=lambda: httpx.post(
            small_server.url + "/v1/completions", json={"prompt": "Short.", "max_tokens": 1}, headers=auth,
            timeout=120))
        waiter.start()
        deadline = time.time() + 120
        while engine.stats().waiting < 1:
            assert time.time() < deadline, "the second request never waited"
            time.sleep(0.01)
        r = httpx.post(small_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=auth,
                       timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
    waiter.join(120)
    wait_idle(small_server)


# ------------------------------------------------------------------------------------------------ refusals
def test_unimplemented_fields_are_refused_by_name(server):
    messages = [{"role": "user", "content": "Hi"}]
    refused_chat = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
                    "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low", "echo": True,
                    "add_generation_prompt": False, "continue_final_message": True, "use_beam_search": True,
                    "truncate_prompt_tokens": 5, "allowed_token_ids": [1, 2], "bad_words": ["x"],
                    "return_tokens_as_token_ids": True, "length_penalty": 2.0}
    for name, value in refused_chat.items():
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, name: value},
                       timeout=30)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["param"] == name and r.json()["error"]["code"] == "unsupported"
    for name, value in {"suffix": "!", "use_beam_search": True, "truncate_prompt_tokens": 3}.items():
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, name: value},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
    # what changes nothing in the answer is accepted: labels, storage hints, a latency hint, the defaults
    fine = {"user": "u1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto", "modalities": ["text"],
            "prediction": {"type": "content", "content": "x"}, "use_beam_search": False, "echo": False,
            "add_generation_prompt": True, "length_penalty": 1.0}
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, **fine},
                   timeout=30)
    assert r.status_code == 200, r.text
