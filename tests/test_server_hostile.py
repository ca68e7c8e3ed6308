"""Hostile callers over loopback HTTP (issue 3.0, "Nothing a caller sends may kill, stall or bloat the service"):
each gets its own status in OpenAI's error shape (never a 500 or a 429 it cannot act on), nothing a caller sends
names another request in the engine, clients that stop reading are cut off and their requests aborted, and other
clients are served meanwhile. random:tiny on the CPU."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from internvl_engine.engine.async_llm import AsyncLLM  # noqa: E402
from internvl_engine.server import ServerSettings  # noqa: E402
from test_server import MODEL, ThreadServer, wait_idle, write_png  # noqa: E402

ENGINE = dict(device="cpu", kv_cache_tokens=8192, max_num_seqs=8)
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-media")
    write_png(d / "cat.png")
    return d


@pytest.fixture(scope="module")
def server(media_dir):
    """Default limits; local files under media_dir (so a path reaches the media intake)."""
    settings = ServerSettings(model_name=MODEL, allowed_local_media_path=str(media_dir))
    llm = AsyncLLM(MODEL, **ENGINE, media_policy=settings.media_policy())
    srv = ThreadServer(llm, settings)
    yield srv
    srv.stop()
    llm.shutdown()


@contextlib.contextmanager
def settings(server: ThreadServer, **changes):
    """The running server's settings changed meanwhile."""
    api = server.app.state.server
    before = api.settings
    api.settings = dataclasses.replace(before, **changes)
    try:
        yield
    finally:
        api.settings = before


def post(server: ThreadServer, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=kw.pop("timeout", 60), **kw)


def outcomes(server: ThreadServer) -> dict[str, int]:
    return dict(server.app.state.server.metrics.requests)


def assert_served(server: ThreadServer) -> None:
    r = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------------ bodies
def test_nested_json_is_400(server):
    """json's parser recurses per level: depth 990 was a RecursionError, a 500. Bounded before parsing."""
    for depth in (990, 100_000):
        body = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
        r = post(server, "/v1/chat/completions", body)
        assert r.status_code == 400, (depth, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_json" and "--max-json-depth" in err["message"]
    # brackets inside strings are text, not nesting
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "[{" * 5000}],
                                              "max_tokens": 1})
    assert r.status_code == 200, r.text
    # NaN / Infinity are not JSON (Python's parser would take them)
    r = post(server, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert_served(server)


def test_unterminated_string_of_escaped_quotes_is_refused_at_once(server):
    """The depth scan skipped strings with a pattern that needed the closing quote: every quote of '"\\"\\"\\"...'
    started a match that ran to the end and failed, quadratic on the event loop (80 KB took 18 s, this 1 MB body
    some 45 minutes, every other client stalled)."""
    body = b'{"messages": ' + b"[" * 70 + b'"' + b'\\"' * 500_000
    r = post(server, "/v1/chat/completions", body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert_served(server)


def test_bad_values_are_400(server, media_dir):
    """Values that used to fail deep inside (500): a seed outside int64 (OpenAI's type; torch.Generator takes no
    more), a non-string text part, a NUL in a local media path."""
    for seed in (1 << 63, 1 << 64, -(1 << 63) - 1):
        r = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", (seed, r.text)
    r = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2, "seed": (1 << 63) - 1,
                                              "temperature": 1.0})
    assert r.status_code == 200, r.text
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": ["not", "a", "string"]}]}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "PromptError", r.text
    # a lone surrogate (valid JSON, no text): the tokenizer raised a TypeError
    for path, body in (("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", '
                                                b'"text": "\\udfff"}]}]}'),
                       ("/v1/completions", b'{"prompt": ["ok", "\\ud83d"]}')):
        r = post(server, path, body)
        assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"], r.text
    assert_served(server)


def test_nul_in_local_media_path_is_400(server, media_dir):
    """open() raises a bare ValueError for an embedded NUL: the media intake must type it (a 400)."""
    for url in (str(media_dir / "cat.png") + "\x00.txt", "file://" + str(media_dir) + "/\x00cat.png"):
        r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}], "max_tokens": 2})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert_served(server)


def test_tiny_temperature_is_greedy(server):
    """temperature=1e-300 divided the logits into inf/nan on every step (a 500); below ~1e-5 it is greedy."""
    body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 6, "ignore_eos": True,
            "return_token_ids": True}
    greedy = post(server, "/v1/chat/completions", {**body, "temperature": 0})
    tiny = post(server, "/v1/chat/completions", {**body, "temperature": 1e-300})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["token_ids"] == greedy.json()["choices"][0]["token_ids"]


# ------------------------------------------------------------------------------------------------ admission
def test_request_that_can_never_be_admitted_is_400(server):
    """10,000 prompts got 429 "retry later", which can never succeed: a request over the per-request prompt limit,
    or with more prompts than may ever wait, is a 400 naming the limit; a full queue stays a 429."""
    r = post(server, "/v1/completions", {"prompt": ["x"] * 10_000, "max_tokens": 1})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_prompts" and "--max-prompts" in err["message"] and err["param"] == "prompt"
    with settings(server, max_waiting=4):
        r = post(server, "/v1/completions", {"prompt": ["x"] * 5, "max_tokens": 1})
        assert r.status_code == 400 and "--max-waiting" in r.json()["error"]["message"], r.text
        r = post(server, "/v1/completions", {"prompt": ["x"] * 4, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_big_text_refused_before_tokenising_and_others_served(server):
    """A ~50 MB text was tokenised for 79 s (a normal request waited as long): text over --max-prompt-chars is
    refused before the engine sees it, and a small request is served meanwhile."""
    limit = server.app.state.server.settings.max_prompt_chars
    big = {"messages": [{"role": "user", "content": "lorem ipsum " * (limit // 4)}], "max_tokens": 1}
    answers = {}

    def send_big():
        answers["big"] = post(server, "/v1/chat/completions", big, timeout=120)

    t = threading.Thread(target=send_big)
    t.start()
    small = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 2}, timeout=120)
    assert small.status_code == 200  # served (old code: after the big one's 79 s of tokenising; 120 s guards)
    t.join(120)
    r = answers["big"]
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "prompt_too_long" and "--max-prompt-chars" in err["message"]
    # completions: the prompts' text together
    r = post(server, "/v1/completions", {"prompt": ["y" * (limit // 2 + 1)] * 2, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long", r.text
    assert_served(server)


# ------------------------------------------------------------------------------------------------ ids
def test_request_id_header_is_only_a_label(server):
    """X-Request-Id went to the engine verbatim: n=2 with id "v" then a request "v#1" killed the engine, and two
    requests with the same header refused one another. Now it is echoed back, never the engine's key."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, headers={"X-Request-Id": "v"},
                      json={"messages": HI, "max_tokens": 40, "n": 2, "temperature": 1.0, "ignore_eos": True,
                            "stream": True}) as stream:
        assert stream.headers["x-request-id"] == "v"
        lines = stream.iter_lines()
        next(lines)  # the role chunk: the request (both samples) is running
        for rid in ("v#1", "v", "v-0"):
            r = httpx.post(server.url + "/v1/chat/completions", headers={"X-Request-Id": rid}, timeout=60,
                           json={"messages": HI, "max_tokens": 3})
            assert r.status_code == 200, (rid, r.text)
            assert r.headers["x-request-id"] == rid
        events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]" and "error" not in events[-2]
    r = httpx.post(server.url + "/v1/completions", headers={"X-Request-Id": "v"}, timeout=60,
                   json={"prompt": ["a", "b"], "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert_served(server)
    wait_idle(server)


# ------------------------------------------------------------------------------------------------ reporting
def test_models_max_model_len_is_what_the_pool_serves(server):
    """random:tiny's context is 65,536 tokens but this pool holds 8,192: a request longer could never run."""
    engine = server.llm.engine
    pool = engine.block_manager.num_blocks * engine.block_size
    assert pool < engine.max_model_len
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert data[0]["max_model_len"] == pool


def test_client_disconnect_is_not_a_server_error(server):
    """A client that leaves while sending its body raised starlette's ClientDisconnect, counted as a 500 error."""
    before = outcomes(server)
    tasks = server.server.server_state.tasks  # uvicorn's running request tasks

    def started() -> bool:
        try:
            return bool(set(tasks) - running)
        except RuntimeError:  # the server's thread changed the set meanwhile
            return False

    running = set(tasks)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000\r\n\r\n" + b'{"messages": [')
        deadline = time.time() + 60  # until the app has the request (a fixed sleep may not do on a loaded machine)
        while not started():
            assert time.time() < deadline
            time.sleep(0.01)
    deadline = time.time() + 120
    while outcomes(server)["abort"] == before["abort"]:
        assert time.time() < deadline, outcomes(server)
        time.sleep(0.05)
    after = outcomes(server)
    assert after["error"] == before["error"] and after["abort"] == before["abort"] + 1
    assert_served(server)


# ------------------------------------------------------------------------------------------------ stalls
def _send_and_never_read(port: int, body: dict) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def test_stream_clients_that_never_read_are_cut_off():
    """Two streams with logprobs=20 whose clients never read grew the server to GBs: the server's writes wait on
    the client (nothing buffers for it unboundedly), and a client that takes nothing for
    stream_stall_timeout_s is cut off, its requests aborted and their blocks freed; others are served meanwhile."""
    settings = ServerSettings(model_name=MODEL, stream_stall_timeout_s=1.0)
    llm = AsyncLLM(MODEL, device="cpu", kv_cache_tokens=65536, max_num_seqs=8, media_policy=settings.media_policy())
    srv = ThreadServer(llm, settings, sndbuf=8192)
    socks = []
    try:
        before = outcomes(srv)
        long = {"max_tokens": 60000, "ignore_eos": True, "logprobs": 20, "stream": True, "temperature": 1.0}
        socks = [_send_and_never_read(srv.port, {**long, "prompt": "one"}),
                 _send_and_never_read(srv.port, {**long, "prompt": ["two", "three"]})]  # the merged path
        deadline = time.time() + 120
        while len(llm.engine.scheduler.running) < 3:
            assert time.time() < deadline, "the streams did not start"
            time.sleep(0.05)
        assert_served(srv)  # while they stall
        wait_idle(srv, timeout=60)  # aborted, blocks freed (old code: 60,000 tokens each, minutes)
        deadline = time.time() + 120
        while outcomes(srv)["abort"] < before["abort"] + 2:
            assert time.time() < deadline, outcomes(srv)
            time.sleep(0.05)
        assert outcomes(srv)["error"] == before["error"]
        assert_served(srv)
    finally:
        for s in socks:
            s.close()
        srv.stop()
        llm.shutdown()


def test_server_takes_no_more_than_a_stalled_client_reads():
    """Without the server's own cut-off: the server pulls outputs only as the client takes them (the merged queue
    of a many-prompt stream used to drain every output into memory), so AsyncLLM sees the stalled consumer and
    aborts its requests after consumer_timeout_s."""
    settings = ServerSettings(model_name=MODEL, stream_stall_timeout_s=None)
    llm = AsyncLLM(MODEL, device="cpu", kv_cache_tokens=65536, max_num_seqs=8, consumer_timeout_s=1.0,
                   media_policy=settings.media_policy())
    srv = ThreadServer(llm, settings, sndbuf=8192)
    sock = None
    try:
        before = outcomes(srv)
        sock = _send_and_never_read(srv.port, {"max_tokens": 60000, "ignore_eos": True, "logprobs": 20,
                                               "stream": True, "prompt": ["two", "three"]})
        deadline = time.time() + 120
        while len(llm.engine.scheduler.running) < 2:
            assert time.time() < deadline, "the stream did not start"
            time.sleep(0.05)
        wait_idle(srv, timeout=60)  # old code: the pumps took every output, 60,000 tokens each
        assert_served(srv)
        sock.close()  # the stalled client leaves at last: an abort, not a server error
        deadline = time.time() + 120
        while outcomes(srv)["abort"] == before["abort"]:
            assert time.time() < deadline, outcomes(srv)
            time.sleep(0.05)
        assert outcomes(srv)["error"] == before["error"]
    finally:
        if sock is not None:
            sock.close()
        srv.stop()
        llm.shutdown()


@pytest.mark.parametrize("stream", [False, True])
def test_prompts_waiting_for_each_other_are_not_slow_consumers(stream):
    """The server answers once every prompt has its first output; meanwhile it left the prompts that had started
    unread, and AsyncLLM aborted them as stalled consumers: a 408 for a client that did nothing wrong (here the
    second prompt waits for the first to finish, max_num_seqs=1; with the defaults, any prompt queued 60 s)."""
    settings = ServerSettings(model_name=MODEL)
    # The slow-consumer limit is far above any stall of a loaded machine's event loop (it was 0.25 s: a server that
    # reads every output could still miss it); the steps made while the second prompt waits are slowed instead, so
    # the first prompt's 200 steps take at least 6 s, twice the limit, all of them while the old server, waiting for
    # the second prompt's first output, left the first prompt's outputs unread.
    llm = AsyncLLM(MODEL, device="cpu", kv_cache_tokens=8192, max_num_seqs=1, consumer_timeout_s=3.0,
                   media_policy=settings.media_policy())
    step = llm.engine.step

    def slow_step():
        if llm.engine.scheduler.waiting:
            time.sleep(0.03)  # 200 steps: at least 6 s
        return step()

    llm.engine.step = slow_step
    srv = ThreadServer(llm, settings)
    try:
        r = post(srv, "/v1/completions", {"prompt": ["one", "two"], "max_tokens": 200, "ignore_eos": True,
                                          "stream": stream}, timeout=120)
        assert r.status_code == 200, r.text
        if stream:
            events = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            assert not any("error" in e for e in events), events[-1]
            text = ["", ""]
            for e in events:
                for c in e["choices"]:
                    text[c["index"]] += c["text"]
            finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        else:
            text = [c["text"] for c in r.json()["choices"]]
            finish = [c["finish_reason"] for c in r.json()["choices"]]
        assert finish == ["length", "length"] and all(text)
        assert outcomes(srv)["success"] == 1
    finally:
        srv.stop()
        llm.shutdown()


# ------------------------------------------------------------------------------------------------ shutdown
def test_requests_cut_at_shutdown_get_503_and_streams_end_properly():
    """Requests outliving --shutdown-timeout got uvicorn's plain-text 500, streams ended without an error event or
    [DONE]: now a 503 in OpenAI's shape, and an error event then [DONE]."""
    settings = ServerSettings(model_name=MODEL)
    llm = AsyncLLM(MODEL, device="cpu", kv_cache_tokens=65536, max_num_seqs=4, media_policy=settings.media_policy())
    srv = ThreadServer(llm, settings, grace=1)
    long = {"messages": HI, "max_tokens": 60000, "ignore_eos": True}
    results, streaming = {}, threading.Event()

    def plain():
        results["plain"] = httpx.post(srv.url + "/v1/chat/completions", json=long, timeout=120)

    def stream():
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**long, "stream": True},
                          timeout=120) as r:
            events = []
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    streaming.set()
            results["stream"] = events

    threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
    try:
        for t in threads:
            t.start()
        assert streaming.wait(60)
        deadline = time.time() + 120
        while len(llm.engine.scheduler.running) < 2:
            assert time.time() < deadline
            time.sleep(0.05)
        srv.server.should_exit = True  # what SIGTERM does
        for t in threads:
            t.join(60)
        r = results["plain"]
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "shutting_down"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        events = results["stream"]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == "shutting_down"
        assert outcomes(srv)["unavailable"] == 2 and outcomes(srv)["error"] == 0
    finally:
        srv.stop()
        llm.shutdown()
