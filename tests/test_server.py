"""The OpenAI-compatible server, driven over loopback HTTP by the official `openai` client: chat (data: images,
video_url, streaming, logprobs, stop strings, n with seeds), completions, the media policy from the flags (local
root, URL domains), the error statuses (400, 401, 404, 413, 429, 500, 503), client disconnects, SIGTERM, and greedy
tokens equal to LLM.generate's for the same conversation."""
from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from internvl_engine import LLM, SamplingParams  # noqa: E402
from internvl_engine.engine.async_llm import AsyncLLM  # noqa: E402
from internvl_engine.server import ServerSettings, build_app  # noqa: E402

MODEL = "random:tiny"
ENGINE = dict(device="cpu", kv_cache_tokens=8192, max_num_seqs=32)


# ------------------------------------------------------------------------------------------------ helpers
class ThreadServer:
    """uvicorn serving build_app(llm, settings) on a thread, on a socket bound to a free loopback port."""

    def __init__(self, llm, settings: ServerSettings, grace: float = 5, sndbuf: int | None = None):
        """grace: uvicorn's timeout_graceful_shutdown (serve's --shutdown-timeout); sndbuf: the send buffer of the
        accepted sockets (they inherit the listening socket's), small to make a client that does not read stall
        the server's writes soon."""
        import uvicorn

        self.llm = llm
        self.sock = socket.socket()
        if sndbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = build_app(llm, settings)
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=grace)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 120  # a hang guard
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, api_key="none", **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics").text)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@contextlib.contextmanager
def engine_request_id(server: ThreadServer, request_id: str):
    """Requests meanwhile get `request_id` as their engine request id (the server makes a fresh one for each, never
    the caller's X-Request-Id), so a test can inject a fault for them."""
    api = server.app.state.server
    api.new_request_id = lambda kind: request_id
    try:
        yield
    finally:
        del api.new_request_id


def parse_metrics(text: str) -> dict[str, float]:
    """Sample -> value, keyed without the model_name label every series carries (tests/test_metrics.py checks it)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r'model_name="(?:[^"\\]|\\.)*",?', "", name).replace("{}", "")] = float(value)
    return out


def wait_idle(server: ThreadServer, timeout: float = 120) -> None:
    """Until the engine holds no request and every KV block is free again."""
    engine = server.llm.engine
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not engine.has_unfinished_requests() and \
                engine.block_manager.num_free_blocks == engine.block_manager.num_blocks:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {len(engine.scheduler.running)} running, "
                         f"{len(engine.scheduler.waiting)} waiting, {engine.block_manager.num_free_blocks} of "
                         f"{engine.block_manager.num_blocks} blocks free")


def png_data_uri(seed: int = 0, size=(64, 48)) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_png(path: Path, seed: int = 0) -> Path:
    data = base64.b64decode(png_data_uri(seed).split(",", 1)[1])
    path.write_bytes(data)
    return path


def write_video(path: Path, frames: int = 8) -> Path:
    av = pytest.importorskip("av")
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def image_message(url: str, text: str = "Describe this image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def status_of(call) -> tuple[int, dict]:
    """(status, {"error": ...}) of a client call that must fail (the client hands over the "error" member)."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.body
    return info.value.status_code, {"error": body.get("error", body) if isinstance(body, dict) else body}


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    png = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)


@contextlib.contextmanager
def served(settings: ServerSettings | None = None, engine: dict = ENGINE, **server_kw):
    """A ThreadServer (server_kw: its grace, sndbuf) over a fresh AsyncLLM of MODEL with `engine`'s settings and
    the media policy `settings` describes (default: strict, no key); stopped, and the engine shut down, at the end."""
    settings = settings or ServerSettings(model_name=MODEL)
    llm = AsyncLLM(MODEL, **engine, media_policy=settings.media_policy())
    srv = ThreadServer(llm, settings, **server_kw)
    try:
        yield srv
    finally:
        srv.stop()
        llm.shutdown()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server():
    """The default server: strict media policy, no key."""
    with served() as srv:
        yield srv


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    write_png(d / "cat.png", seed=3)
    write_video(d / "clip.mp4")
    return d


@pytest.fixture(scope="module")
def image_http():
    """A loopback HTTP server that answers every GET with a PNG."""
    handler = type("H", (_ImageHandler,), {"png": base64.b64decode(png_data_uri(5).split(",", 1)[1])})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def open_server(media_dir):
    """Local files under media_dir, URLs from 127.0.0.1 (a private address, so explicitly allowed), an API key."""
    settings = ServerSettings(model_name="tiny", api_key="sekrit", allowed_local_media_path=str(media_dir),
                              allowed_media_domains=("127.0.0.1",), allow_private_media_networks=True)
    with served(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def small_server():
    """One sequence at a time, one waiting at most, small body and media caps, only example.com for URLs."""
    settings = ServerSettings(model_name=MODEL, max_waiting=1, max_request_bytes=200_000,
                              max_media_bytes=20_000, allowed_media_domains=("example.com",),
                              allow_private_media_networks=True)
    with served(settings, {**ENGINE, "max_num_seqs": 1}) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline():
    return LLM(MODEL, device="cpu", kv_cache_tokens=8192)


# ------------------------------------------------------------------------------------------------ basics
def test_models_health_version(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    v = httpx.get(server.url + "/version").json()
    assert v["name"] == "internvl-engine" and v["version"]
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_the_engine_carries_the_servers_media_policy(server):
    """The server reads the media policy off the engine (EngineConfig.media_policy) and never sets it: an engine
    built with another policy than the settings describe is refused, not silently served with."""
    from internvl_engine.settings import EngineConfigError
    assert server.llm.engine.processor.media_policy == ServerSettings(model_name=MODEL).media_policy()
    with pytest.raises(EngineConfigError, match="media_policy"):
        build_app(server.llm, ServerSettings(model_name=MODEL, allowed_local_media_path="/"))


def test_chat_image_nonstreaming_and_streaming(server):
    client = server.client()
    messages = image_message(png_data_uri(0))
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 8 and full.usage.prompt_tokens > 256  # one tile: 256 image tokens
    assert full.usage.total_tokens == full.usage.prompt_tokens + 8

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens

    # the raw stream: SSE events, the last one [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # no include_usage: no usage field


def test_completions(server):
    client = server.client()
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    two = client.completions.create(model=MODEL, prompt=["One", "Two three"], max_tokens=4, temperature=0)
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 8
    one = client.completions.create(model=MODEL, prompt="Two three", max_tokens=4, temperature=0)
    assert [c.text for c in two.choices if c.index == 1] == [one.choices[0].text]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == out.choices[0].text


def test_greedy_tokens_equal_llm_generate(server, offline):
    """The same conversation, greedy, over HTTP and through LLM.generate: the same token ids."""
    image = png_data_uri(7, size=(500, 300))
    cases = [
        ([{"role": "user", "content": "Tell me a story."}],
         [{"role": "user", "content": "Tell me a story."}]),
        ([{"role": "system", "content": "Be brief."}] + image_message(image, "What is here?"),
         [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": "What is here?"}]}]),
        # LLM.generate reads OpenAI's messages with the server's own normaliser
        ([{"role": "developer", "content": "Be short."}] + image_message(image, "What is this?"),
         [{"role": "developer", "content": "Be short."}] + image_message(image, "What is this?")),
    ]
    client = server.client()
    for messages, conversation in cases:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"return_token_ids": True, "ignore_eos": True})
        ref = offline.generate(conversation, SamplingParams(max_tokens=12, ignore_eos=True))[0]
        choice = r.choices[0].model_dump()
        assert choice["token_ids"] == ref.token_ids
        assert choice["prompt_token_ids"] == ref.prompt_token_ids
        assert r.choices[0].message.content == ref.text
    # mm_processor_kwargs reach the processor: one tile instead of the default tiling
    tiled = client.chat.completions.create(model=MODEL, messages=image_message(image), max_tokens=1, temperature=0)
    one = client.chat.completions.create(model=MODEL, messages=image_message(image), max_tokens=1, temperature=0,
                                         extra_body={"mm_processor_kwargs": {"max_dynamic_patch": 1}})
    assert one.usage.prompt_tokens < 2 * 256 < tiled.usage.prompt_tokens  # 500x300: 6 tiles + thumbnail -> 1
    assert (tiled.usage.prompt_tokens - one.usage.prompt_tokens) % 256 == 0


def test_logprobs(server):
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count."}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert bytes(t.bytes).decode() == t.token
    streamed = [t for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count."}], max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=3, stream=True) if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]

    c = client.completions.create(model=MODEL, prompt="Count.", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                          lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    status, body = status_of(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2))
    assert status == 400 and body["error"]["param"] == "top_logprobs"
    # vLLM's prompt_logprobs: None for the first prompt token, then {token id: logprob, rank, decoded token}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count."}], max_tokens=1,
                                       extra_body={"prompt_logprobs": 1, "return_token_ids": True})
    body = r.model_dump()
    prompt_ids = body["choices"][0]["prompt_token_ids"]
    plp = body["prompt_logprobs"]
    assert len(plp) == len(prompt_ids) and plp[0] is None
    for tid, entry in zip(prompt_ids[1:], plp[1:]):
        assert str(tid) in entry and min(e["rank"] for e in entry.values()) == 1
    c = client.completions.create(model=MODEL, prompt="Count to three.", max_tokens=1,
                                  extra_body={"prompt_logprobs": 0})
    assert c.choices[0].model_dump()["prompt_logprobs"][0] is None


def test_stop_strings(server):
    client = server.client()
    messages = [{"role": "user", "content": "Say something long."}]
    base = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = base[len(base) // 2:len(base) // 2 + 3]
    cut = base[:base.find(stop)]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == cut
    kept = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=[stop],
                                          extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].message.content == cut + stop


def test_n_with_seeds(server):
    client = server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Pick words."}], max_tokens=8, temperature=1.0,
              n=2, seed=11, extra_body={"ignore_eos": True}, timeout=20)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in a.choices] == [0, 1]
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]  # reproducible
    assert texts[0] != texts[1]  # two different samples
    assert a.usage.completion_tokens == 16
    other = client.chat.completions.create(**{**kw, "seed": 12})
    assert [c.message.content for c in sorted(other.choices, key=lambda c: c.index)] != texts
    # streamed: the same two samples, told apart by index
    parts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
    assert [parts[0], parts[1]] == texts


def test_sampling_extras_validated_by_the_engine(server):
    client = server.client()
    ok = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=3, temperature=0.8, seed=1,
        presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 3, "ignore_eos": True})
    assert ok.usage.completion_tokens == 3
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"n": 0},
                {"extra_body": {"mm_processor_kwargs": {"max_dynamic_patch": 0}}},
                {"extra_body": {"mm_processor_kwargs": {"bogus": 1}}}):
        status, body = status_of(lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], **bad))
        assert status == 400, bad
        assert set(body["error"]) == {"message", "type", "param", "code"}


def test_bad_requests_are_400_and_disturb_nobody(server):
    client = server.client()
    messages = [{"role": "user", "content": "Steady."}]
    ref = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].message.content
    result = {}

    def steady():
        result["text"] = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                        extra_body={"ignore_eos": True}).choices[0].message.content

    t = threading.Thread(target=steady)
    t.start()
    bad = [
        lambda: client.chat.completions.create(model=MODEL, messages=image_message("data:image/png;base64,AAAA"),
                                               max_tokens=2),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}], max_tokens=2),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}]),
        lambda: client.chat.completions.create(model=MODEL, messages=[]),
        lambda: client.chat.completions.create(model=MODEL, messages=image_message("ftp://example.com/x.png")),
        lambda: client.completions.create(model=MODEL, prompt=[1, 10**9]),  # outside the vocabulary
    ]
    for call in bad:
        status, body = status_of(call)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    status, body = status_of(lambda: client.chat.completions.create(model="gpt-4", messages=messages))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    t.join(60)
    assert result["text"] == ref
    wait_idle(server)


def test_local_path_refused_by_default(server, media_dir):
    client = server.client()
    for url in (str(media_dir / "cat.png"), "file://" + str(media_dir / "cat.png")):
        status, body = status_of(lambda: client.chat.completions.create(
            model=MODEL, messages=image_message(url), max_tokens=2))
        assert status == 400 and body["error"]["code"] == "MediaPolicyError"
        assert "local" in body["error"]["message"]
    # private addresses are refused by the strict policy too
    status, body = status_of(lambda: client.chat.completions.create(
        model=MODEL, messages=image_message("http://127.0.0.1:9/x.png"), max_tokens=2))
    assert status == 400 and body["error"]["code"] == "MediaPolicyError"


def test_request_failing_while_running(server):
    """A fault inside the engine for one request: 500 (or an error event mid-stream); the others carry on."""
    client = server.client()
    engine = server.llm.engine
    engine.inject_fault("doomed", "decode", times=1)
    with engine_request_id(server, "doomed"):
        status, body = status_of(lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5))
    assert status == 500 and body["error"]["code"] == "RequestFailedError"
    engine.inject_fault("doomed-2", "decode", times=1)
    with engine_request_id(server, "doomed-2"), httpx.stream(
            "POST", server.url + "/v1/chat/completions", timeout=60, json={
                "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert "error" in json.loads(events[-2][6:]) and events[-1] == "data: [DONE]"
    wait_idle(server)


def test_client_disconnect_aborts(server):
    """A client that goes away mid-stream (or while waiting for a non-streamed answer) aborts its request."""
    before = server.metrics()
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 4000,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={**long, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk and a few tokens
        assert got[0].startswith("data: ")
        assert len(server.llm.engine.scheduler.running) == 1
    # the timeouts only guard against hangs: that each request was aborted (not run to its 4000 tokens) is what
    # the abort counter below says, whatever the machine's load
    wait_idle(server, timeout=120)
    with pytest.raises(httpx.ReadTimeout):  # 4000 tokens take far longer than the 1 s this client waits
        httpx.post(server.url + "/v1/chat/completions", json=long, timeout=1.0)
    wait_idle(server, timeout=120)
    after = server.metrics()
    assert after['internvl_requests_total{outcome="abort"}'] - before['internvl_requests_total{outcome="abort"}'] == 2
    assert after["internvl_num_requests_running"] == 0


def test_metrics(server):
    client = server.client()
    for _ in range(2):  # the same image and prompt twice: prefix and vision cache hits
        client.chat.completions.create(model=MODEL, messages=image_message(png_data_uri(9)), max_tokens=2)
    status_of(lambda: client.chat.completions.create(model=MODEL, messages=[], max_tokens=2))
    text = httpx.get(server.url + "/metrics").text
    m = parse_metrics(text)
    for name in ("internvl_time_to_first_token_seconds", "internvl_time_per_output_token_seconds",
                 "internvl_e2e_request_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert m[name + "_count"] == m[name + '_bucket{le="+Inf"}'] > 0
    assert m['internvl_requests_total{outcome="success"}'] > 0
    assert m['internvl_requests_total{outcome="invalid"}'] > 0
    assert m["internvl_kv_cache_blocks_total"] == server.llm.engine.block_manager.num_blocks
    assert 0 <= m["internvl_kv_cache_usage_perc"] <= 1
    assert m["internvl_prefix_cache_hits_total"] > 0  # the same prompts came back
    assert m["internvl_vision_cache_hits_total"] > 0  # and the same images
    for name in ("internvl_num_requests_running", "internvl_num_requests_waiting", "internvl_num_preemptions_total",
                 "internvl_prefix_cache_hit_rate", "internvl_vision_cache_hit_rate", "internvl_engine_healthy",
                 "internvl_server_loop_cpu_seconds_total"):
        assert name in m


# ------------------------------------------------------------------------------------------------ flags
def test_api_key(open_server):
    status, body = status_of(lambda: open_server.client(api_key="wrong").models.list())
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _ = status_of(lambda: open_server.client(api_key="wrong").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}]))
    assert status == 401
    assert httpx.post(open_server.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(open_server.url + "/health").status_code == 200  # outside /v1: open
    assert [m.id for m in open_server.client(api_key="sekrit").models.list().data] == ["tiny"]


def test_allowed_local_media_and_video(open_server, media_dir, tmp_path):
    client = open_server.client(api_key="sekrit")
    for url in (str(media_dir / "cat.png"), "file://" + str(media_dir / "cat.png")):
        r = client.chat.completions.create(model="tiny", messages=image_message(url), max_tokens=2)
        assert r.usage.prompt_tokens > 256
    outside = write_png(tmp_path / "outside.png")
    status, body = status_of(lambda: client.chat.completions.create(
        model="tiny", messages=image_message(str(outside)), max_tokens=2))
    assert status == 400 and "outside the allowed local media root" in body["error"]["message"]
    video = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "file://" + str(media_dir / "clip.mp4")}},
        {"type": "text", "text": "What happens?"}]}]
    r = client.chat.completions.create(model="tiny", messages=video, max_tokens=3, temperature=0,
                                       extra_body={"mm_processor_kwargs": {"num_frames": 4}})
    assert r.usage.prompt_tokens > 4 * 256  # four frames of 256 tokens each
    r2 = client.chat.completions.create(model="tiny", messages=video, max_tokens=3, temperature=0,
                                        extra_body={"mm_processor_kwargs": {"num_frames": 2}})
    assert 2 * 256 <= r.usage.prompt_tokens - r2.usage.prompt_tokens <= 2 * 256 + 32  # two frames fewer
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=video, max_tokens=3, temperature=0, stream=True,
        extra_body={"mm_processor_kwargs": {"num_frames": 4}}) if c.choices)
    assert streamed == r.choices[0].message.content


def test_http_image_allowed_by_domain_list(open_server, image_http):
    client = open_server.client(api_key="sekrit")
    r = client.chat.completions.create(model="tiny", messages=image_message(image_http + "/cat.png"), max_tokens=2)
    assert r.usage.prompt_tokens > 256


def test_http_image_refused_by_domain_list(small_server, image_http):
    status, body = status_of(lambda: small_server.client().chat.completions.create(
        model=MODEL, messages=image_message(image_http + "/cat.png"), max_tokens=2))
    assert status == 400 and body["error"]["code"] == "MediaPolicyError"
    assert "allowed domain" in body["error"]["message"]


def test_size_limits_are_413(small_server):
    client = small_server.client()
    big = png_data_uri(1, size=(200, 200))  # ~160 kB: over the 20 kB media cap, under the 200 kB body cap
    status, body = status_of(lambda: client.chat.completions.create(model=MODEL, messages=image_message(big),
                                                                    max_tokens=2))
    assert status == 413 and body["error"]["code"] == "MediaTooLargeError"
    status, body = status_of(lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x" * 300_000}], max_tokens=2))
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_queue_limit_is_429(small_server):
    """max_num_seqs=1 and --max-waiting 1: one running, one waiting, the third is refused; a queued client that
    gives up leaves the queue."""
    client = small_server.client()
    long = dict(model=MODEL, messages=[{"role": "user", "content": "Long."}], max_tokens=3000, temperature=0,
                extra_body={"ignore_eos": True})

    def waiting(n):
        deadline = time.time() + 60  # a hang guard
        while small_server.metrics()["internvl_num_requests_waiting"] != n:
            assert time.time() < deadline
            time.sleep(0.01)

    running = client.chat.completions.create(**long, stream=True)
    next(iter(running))
    # a raw connection that the test closes when it chooses (a client timeout could expire before the 429 below on a
    # loaded machine, and the third request would then queue instead)
    body = json.dumps(long["extra_body"] | {k: v for k, v in long.items() if k != "extra_body"}).encode()
    impatient = socket.create_connection(("127.0.0.1", small_server.port))
    impatient.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    waiting(1)
    status, body = status_of(lambda: client.chat.completions.create(**long))
    assert status == 429 and body["error"]["code"] == "queue_full"
    impatient.close()  # it gives up while queued
    waiting(0)
    answered = {}
    queued = threading.Thread(target=lambda: answered.update(r=client.chat.completions.create(**{**long,
                                                                                               "max_tokens": 2})))
    queued.start()
    waiting(1)
    running.close()  # aborts the first: the queued one runs
    queued.join(60)
    assert answered["r"].usage.completion_tokens == 2
    wait_idle(small_server)
    m = small_server.metrics()
    assert m['internvl_requests_total{outcome="rejected"}'] == 1 and m['internvl_requests_total{outcome="abort"}'] == 2


def test_dead_engine_is_503(small_server):
    """Last on this server: a fatal fault kills its engine; then /health and every request answer 503."""
    client = small_server.client()
    small_server.llm.engine.inject_fault("fatal", "decode", fatal=True)
    with engine_request_id(small_server, "fatal"):
        status, _ = status_of(lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4))
    assert status == 503
    r = httpx.get(small_server.url + "/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    status, _ = status_of(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                                          "content": "x"}]))
    assert status == 503
    assert small_server.metrics()["internvl_engine_healthy"] == 0


# ------------------------------------------------------------------------------------------------ the process
def test_serve_command_sigterm(tmp_path):
    """`internvl-engine serve` in its own process: SIGTERM stops accepting, lets the request in flight finish, cuts
    the one that outlives --shutdown-timeout, and exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    grace = 8
    proc = subprocess.Popen([sys.executable, "-m", "internvl_engine", "serve", "--model", MODEL, "--device", "cpu",
                             "--port", str(port), "--kv-cache-tokens", "65536", "--shutdown-timeout", str(grace),
                             "--log-level", "critical"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        results, ended, started = {}, {}, {"short": threading.Event(), "long": threading.Event()}

        def run(name, max_tokens):
            events = []
            try:
                with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                        "model": MODEL, "prompt": name, "max_tokens": max_tokens, "ignore_eos": True,
                        "stream": True}) as r:
                    for line in r.iter_lines():
                        if line:
                            events.append(line)
                            started[name].set()
            except httpx.HTTPError as e:
                events.append(f"error: {type(e).__name__}")
            results[name], ended[name] = events, time.time()

        threads = [threading.Thread(target=run, args=("long", 60000)), threading.Thread(target=run, args=("short", 64))]
        for t, name in zip(threads, ("long", "short")):
            t.start()
            assert started[name].wait(60)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        refused_while_running = False  # no longer accepting, while the long request still holds the process up
        while not refused_while_running and proc.poll() is None:
            try:
                httpx.get(url + "/health", timeout=2)
                time.sleep(0.05)  # the signal has not been handled yet (a loaded machine may take a while)
            except httpx.TransportError:
                refused_while_running = proc.poll() is None
        assert refused_while_running
        assert proc.wait(timeout=120) == 0
        elapsed = time.time() - t0
        for t in threads:
            t.join(10)
        assert results["short"][-1] == "data: [DONE]" and ended["short"] > t0  # in flight, finished in the grace
        finals = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in results["short"][:-1]]
        assert finals[-1] == "length"
        # cut at the timeout: an error event (OpenAI's shape, 503's type), then [DONE]
        assert results["long"][-1] == "data: [DONE]"
        assert json.loads(results["long"][-2][6:])["error"]["code"] == "shutting_down"
        assert elapsed > grace - 1  # it waited for the grace (proc.wait above is the hang guard; load only adds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
