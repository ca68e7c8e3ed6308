"""AsyncLLM against callers that misbehave (issue 3.0): a consumer that stops reading, slow image URLs ahead of a
text-only request, shutdown with requests in flight, an abort racing a request that reuses its id. Nothing a caller
does may grow memory without bound, stall another request or leave a caller waiting forever."""
import asyncio
import dataclasses
import http.server
import threading
import time

import pytest

from internvl_engine import SamplingParams
from internvl_engine.engine.async_llm import AsyncLLM, carries_media
from internvl_engine.errors import EngineDeadError, RequestFailedError, SlowConsumerError
from internvl_engine.processor.media import MediaPolicy

TIMEOUT_S = 2.0  # consumer_timeout_s of the shared engine; the slow reader below waits 100x less between takes
PROMPT = "Tell me a very long story."


@pytest.fixture(scope="module")
def llm():
    e = AsyncLLM("random:tiny", device="cpu", consumer_timeout_s=TIMEOUT_S)
    yield e
    e.shutdown()


def _wait_idle(llm, timeout=60):
    deadline = time.time() + timeout
    while (llm.engine.has_unfinished_requests() or llm._loop._requests) and time.time() < deadline:
        time.sleep(0.01)
    assert not llm.engine.has_unfinished_requests()


class StepGate:
    """Holds an engine's steps until the test allows them (`allow(n)`), or lets them run freely once `open()`."""

    def __init__(self, engine, monkeypatch):
        self._allowed, self._open = threading.Semaphore(0), threading.Event()
        self.steps = 0  # steps that have returned (their outputs delivered)
        step = engine.step

        def gated():
            while not self._open.is_set() and not self._allowed.acquire(timeout=0.05):
                pass
            try:
                return step()
            finally:
                self.steps += 1

        monkeypatch.setattr(engine, "step", gated)

    def allow(self, n: int) -> None:
        self._allowed.release(n)

    def open(self) -> None:
        self._open.set()


# ------------------------------------------------------------------------------------- consumers that lag
def test_idle_consumer_keeps_one_pending_output_and_is_aborted(llm):
    """A consumer that takes one output and then stops reading a long generation: the request keeps one unread
    snapshot (the newest), not one per step, and is aborted after consumer_timeout_s with its blocks freed (the old
    unbounded queue grew by a full copy of the output every step and ran to max_tokens)."""
    free0 = llm.engine.block_manager.num_free_blocks
    params = SamplingParams(max_tokens=8000, ignore_eos=True)

    async def main():
        gen = llm.generate(PROMPT, params, "idle")
        first = await gen.__anext__()
        channel = llm._loop._requests["idle"].channel
        seen = []
        deadline = time.monotonic() + 60
        while "idle" in llm._loop._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the event loop runs, the consumer takes nothing
            pending = channel.pending
            if pending is not None:
                seen.append(len(pending.token_ids))
        assert "idle" not in llm._loop._requests, "the idle consumer was not aborted"
        # one snapshot at a time, each newer than the last: superseded, not queued
        assert seen and seen[-1] > len(first.token_ids) and seen == sorted(seen)
        outs = []
        with pytest.raises(RequestFailedError) as info:
            async for out in gen:
                outs.append(out)
        assert len(outs) <= 1  # what was pending when it was aborted, then the error
        return info.value

    err = asyncio.run(main())
    assert err.stage == "deliver" and isinstance(err.__cause__, SlowConsumerError)
    assert "consumer_timeout_s" in str(err)
    _wait_idle(llm)
    assert llm.engine.block_manager.num_free_blocks == free0


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=60, ignore_eos=True, logprobs=2, output_kind="delta"),
    SamplingParams(max_tokens=60, ignore_eos=True, n=2, temperature=1.0, seed=7, output_kind="delta"),
], ids=["logprobs", "n2"])
def test_delta_outputs_of_a_lagging_consumer_merge_into_the_cumulative_result(llm, params, monkeypatch):
    """A consumer that reads deltas slower than they come gets fewer, merged deltas that add up to exactly the
    cumulative result (text, token ids, logprobs, every sample)."""
    ref = llm.submit(PROMPT, dataclasses.replace(params, output_kind="cumulative")).result(timeout=120)
    # The engine steps only when the test lets it, so the lag is counted in steps, whatever the machine's load (a
    # free-running engine could finish before the consumer first looked, leaving nothing to merge)
    gate = StepGate(llm.engine, monkeypatch)

    async def main():
        outs = []
        gate.allow(1)  # the prefill: the first output holds one token
        async for out in llm.generate(PROMPT, params, "lagging"):
            outs.append(out)
            if len(outs) == 1:  # lag while 5 more steps' deltas wait (5 steps: well within consumer_timeout_s)
                gate.allow(5)
                while gate.steps < 6:
                    await asyncio.sleep(0.005)
            elif len(outs) == 2:
                gate.open()
        return outs

    try:
        outs = asyncio.run(main())
    finally:
        gate.open()
    # merged: 5 steps' tokens (n=2: each sample's first step is its own prefill); the old queue handed over one
    # delta, one token a sample, per step
    assert len(outs[0].token_ids) == 1 and sum(len(c.token_ids) for c in outs[1].outputs) >= 5
    assert outs[-1].finished and outs[-1].finish_reason == ref.finish_reason
    for i, sample in enumerate(ref.outputs):
        parts = [o.outputs[i] for o in outs]
        assert "".join(p.text for p in parts) == sample.text
        assert [t for p in parts for t in p.token_ids] == sample.token_ids
        if params.logprobs is not None:
            assert [lp for p in parts for lp in p.logprobs] == sample.logprobs
    assert "".join(o.text for o in outs) == ref.text and [t for o in outs for t in o.token_ids] == ref.token_ids


def test_slow_reading_consumer_gets_the_exact_final_output(llm):
    """A consumer that keeps reading, only slower than the engine, is not aborted: its last snapshot is the exact
    final output, and the deltas it saw add up to the text (a superseded snapshot hands its delta on)."""
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    ref = llm.submit(PROMPT, params).result(timeout=120)

    async def main():
        outs = []
        async for out in llm.generate(PROMPT, params):
            outs.append(out)
            await asyncio.sleep(TIMEOUT_S / 100)
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "length"
    assert outs[-1].token_ids == ref.token_ids and outs[-1].text == ref.text
    assert "".join(o.delta for o in outs) == ref.text


# ------------------------------------------------------------------------------------- media vs text
@pytest.mark.parametrize("conversation, media", [
    ("plain text", False),
    ([{"role": "user", "content": "text"}], False),
    ([{"role": "user", "content": ["a", {"type": "text", "text": "b"}]}], False),
    ({"prompt": "no media"}, False),
    ([{"role": "user", "content": [{"type": "image", "image": "http://x/a.png"}]}], True),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}], True),
    ([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}], True),
    ({"prompt": "<image>", "images": ["a.png"]}, True),
    (42, True),  # unsure: the media pool (and a PromptError from it)
])
def test_carries_media(conversation, media):
    assert carries_media(conversation) is media


class _StallingHandler(http.server.BaseHTTPRequestHandler):
    release: threading.Event
    hits: list

    def do_GET(self):
        self.hits.append(self.path)
        self.release.wait(600)
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def stalling_url(llm, monkeypatch):
    """(url, hits, release): a loopback server whose answers wait for `release` (600 s at most), under a media
    policy with a 600 s fetch timeout on the shared engine's processor: both far past the tests' hang guards (120 s),
    so a request that queued behind the stalled ones fails them instead of slipping through once the stall ends."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    release, hits = threading.Event(), []
    handler = type("Handler", (_StallingHandler,), {"release": release, "hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(llm.engine.processor, "media_policy", MediaPolicy(fetch_timeout_s=600))
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/stall.png", hits, release
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def _image(url):
    return [{"role": "user", "content": [{"type": "image", "image": url}, {"type": "text", "text": "What?"}]}]


def _wait_for_hits(hits, n):
    deadline = time.monotonic() + 120  # a hang guard
    while len(hits) < n and time.monotonic() < deadline:  # the threads that add media are busy fetching
        time.sleep(0.02)
    assert len(hits) >= n


def test_text_request_does_not_queue_behind_stalled_image_urls(llm, stalling_url):
    """40 requests whose image URL stalls occupy every thread that adds media; a text-only request still completes
    at once (it used to wait in the same executor as them: 8 slow URLs delayed one by 223 s)."""
    url, hits, release = stalling_url

    async def first_output(conversation, rid):
        async for out in llm.generate(conversation, SamplingParams(max_tokens=4, ignore_eos=True), rid):
            return out

    async def main():
        stalled = [asyncio.ensure_future(first_output(_image(url), f"img-{i}")) for i in range(40)]
        try:
            await asyncio.to_thread(_wait_for_hits, hits, 6)
            out = await asyncio.wait_for(first_output("Hello there", "text"), timeout=120)
            assert out.request_id == "text" and not any(t.done() for t in stalled)
        finally:
            for t in stalled:
                t.cancel()
            release.set()
            await asyncio.gather(*stalled, return_exceptions=True)

    asyncio.run(main())
    _wait_idle(llm)


def test_llm_text_batch_does_not_queue_behind_another_callers_stalled_image_urls(llm, stalling_url):
    """LLM batches are preprocessed on shared threads: one caller's batch of stalled image URLs must not hold up
    another caller's text-only batch."""
    from internvl_engine import LLM
    url, hits, release = stalling_url
    sync = LLM.__new__(LLM)  # an LLM over the shared engine (an LLM holds nothing but its engine)
    sync.engine = llm.engine
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    stalled_errors = []

    def stalled_batch():
        try:
            sync.generate([_image(url)] * 16, params)
        except Exception as e:  # noqa: BLE001 - an ImageError (404) once released
            stalled_errors.append(e)

    worker = threading.Thread(target=stalled_batch)
    worker.start()
    try:
        _wait_for_hits(hits, 2)
        done = []
        text = threading.Thread(target=lambda: done.append(sync.generate(["Hi", "Hello"], params)))
        text.start()
        text.join(timeout=120)
        assert done and [o.finish_reason for o in done[0]] == ["length", "length"]
    finally:
        release.set()
        worker.join(timeout=120)
    assert stalled_errors
    _wait_idle(llm)


def test_an_llm_stepping_the_shared_engine_does_not_take_async_requests_outputs(llm):
    """An LLM over AsyncLLM's engine steps it too: the outputs of the AsyncLLM's requests that such a step makes
    still reach their futures (step() used to hand them to the LLM's thread, which dropped them: the futures never
    completed)."""
    from internvl_engine import LLM
    sync = LLM.__new__(LLM)
    sync.engine = llm.engine
    futures = [llm.submit(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True)) for _ in range(8)]
    sync.generate(["Hi", "Hello"], SamplingParams(max_tokens=40, ignore_eos=True))
    outs = [f.result(timeout=120) for f in futures]
    assert [len(o.token_ids) for o in outs] == [12] * 8
    _wait_idle(llm)


def test_an_engine_killed_from_another_thread_fails_the_requests_in_flight():
    """engine.fail(why) (or a shared LLM's step meeting a fatal fault) while the loop thread waits for the lock in
    has_unfinished_requests(): the dead engine holds no request, so the loop went idle and the request's future
    waited forever; it gets the EngineDeadError."""
    import sys
    e = AsyncLLM("random:tiny", device="cpu")
    try:
        future = e.submit(PROMPT, SamplingParams(max_tokens=8000, ignore_eos=True))
        loop_thread = e._loop._thread.ident

        def loop_waits_in(name):
            f = sys._current_frames().get(loop_thread)
            while f is not None and f.f_code.co_name != name:
                f = f.f_back
            return f is not None

        for _ in range(500):
            with e.engine._lock:
                time.sleep(0.02)
                if loop_waits_in("has_unfinished_requests"):
                    e.engine.fail("a front end met a fault")
                    break
            time.sleep(0.005)
        else:
            pytest.fail("the loop thread was never caught waiting in has_unfinished_requests")
        with pytest.raises(EngineDeadError, match="a front end met a fault"):
            future.result(timeout=10)
    finally:
        e.shutdown()


# ------------------------------------------------------------------------------------- shutdown
def test_shutdown_fails_requests_in_flight_and_refuses_later_ones():
    """shutdown() with a generate() consumer and a submit() future waiting: both get EngineDeadError saying it was
    shut down (they used to wait forever), and later calls are refused the same way."""
    e = AsyncLLM("random:tiny", device="cpu")
    long = SamplingParams(max_tokens=8000, ignore_eos=True)
    future = e.submit(PROMPT, long)

    async def main():
        gen = e.generate(PROMPT, long)
        await gen.__anext__()
        threading.Thread(target=e.shutdown).start()
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(_drain(gen), timeout=30)

    async def _drain(gen):
        async for _ in gen:
            pass

    asyncio.run(main())
    with pytest.raises(EngineDeadError, match="shut down"):
        future.result(timeout=30)
    with pytest.raises(EngineDeadError, match="shut down"):
        e.submit(PROMPT, long)
    with pytest.raises(EngineDeadError, match="shut down"):
        asyncio.run(anext(e.generate(PROMPT, long)))
    with pytest.raises(EngineDeadError, match="shut down"):
        e.check_health()


# ------------------------------------------------------------------------------------- aborts and reused ids
def test_late_abort_does_not_hit_a_request_that_reuses_the_id(llm):
    """abort("x") issued for a request x, handled by the loop thread only after x finished and a new request x
    was added: the new x runs to the end (a queue of bare ids used to abort it)."""
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    assert llm.submit(PROMPT, params, request_id="x").result(timeout=120).finish_reason == "length"
    with llm.engine._lock:  # the loop thread cannot abort or step until this block ends
        llm.abort("x")
        again = llm.submit(PROMPT, params, request_id="x")  # the engine lock is re-entrant: added here
    out = again.result(timeout=120)
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_abort_while_the_request_is_being_added_is_not_lost(llm):
    """An abort that arrives while the request is still being preprocessed aborts it once it is in the engine."""
    params = SamplingParams(max_tokens=8000, ignore_eos=True)
    free0 = llm.engine.block_manager.num_free_blocks
    loop = llm._loop
    req = loop.register("adding", lambda out: None)
    assert llm.abort("adding")
    loop.start(req, PROMPT, params)
    _wait_idle(llm)
    assert "adding" not in loop._requests
    assert llm.engine.block_manager.num_free_blocks == free0
