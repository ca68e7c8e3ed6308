"""Load over loopback HTTP (CPU, random:tiny): 200 chat requests, 32 at a time, text and image, greedy and seeded,
streamed and not; every fifth client disconnects mid-stream. All others finish with the tokens the engine gives the
same request offline, /metrics counts what happened, and no KV block leaks. Bounded: 200 requests of 8 tokens (the
ones that leave after 3 chunks may run to 1,000, so that no lag of a loaded machine lets one finish before its
client leaves: it would count as a success), a 300 s ceiling, loopback only."""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from internvl_engine import SamplingParams  # noqa: E402
from internvl_engine.engine.async_llm import AsyncLLM  # noqa: E402
from internvl_engine.server import ServerSettings  # noqa: E402
from test_server import MODEL, ThreadServer, png_data_uri, wait_idle  # noqa: E402

REQUESTS, CONCURRENCY, DISCONNECT_EVERY = 200, 32, 5
MAX_TOKENS, DISCONNECT_MAX_TOKENS = 8, 1000


def _templates():
    """(OpenAI messages, engine conversation, sampling fields) of the distinct requests the load cycles through."""
    out = []
    for i in range(12):
        if i % 3 == 0:
            url = png_data_uri(i, size=(64 + 8 * i, 48))
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": f"Describe picture {i}."}]}]
            conversation = [{"role": "user", "content": [{"type": "image", "url": url},
                                                         {"type": "text", "text": f"Describe picture {i}."}]}]
        else:
            messages = conversation = [{"role": "user", "content": f"Question {i}: why is the sky blue?"}]
        fields = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.9, "seed": 100 + i}
        out.append((messages, conversation, fields))
    return out


@pytest.fixture(scope="module")
def loaded():
    settings = ServerSettings(model_name=MODEL, max_waiting=4 * CONCURRENCY)
    llm = AsyncLLM(MODEL, device="cpu", kv_cache_tokens=8192, max_num_seqs=CONCURRENCY,
                   media_policy=settings.media_policy())
    srv = ThreadServer(llm, settings)
    yield srv
    srv.stop()
    llm.shutdown()


def test_load_with_disconnects(loaded):
    templates = _templates()
    # offline references: the same engine in-process, one request at a time, before any HTTP
    engine_params = {k: SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, max_num_tiles=1, **fields)
                     for k, (_, _, fields) in enumerate(templates)}
    reference = {k: loaded.llm.submit(conv, engine_params[k]).result(timeout=120).token_ids
                 for k, (_, conv, _) in enumerate(templates)}
    wait_idle(loaded)
    offline = loaded.metrics()  # the engine's own counts include those requests

    client = openai.AsyncOpenAI(base_url=loaded.url + "/v1", api_key="none", max_retries=0, timeout=120)
    # Clients that leave mid-stream do so over plain httpx: the openai client's stream, closed mid-way, left its
    # transport's async generators for the garbage collector, which finalised them on another thread while they
    # were suspended in an await ("async generator already executing", a warning in about half the runs)
    raw = httpx.AsyncClient(base_url=loaded.url + "/v1", timeout=120, limits=httpx.Limits(max_connections=None))
    gate = asyncio.Semaphore(CONCURRENCY)
    results: dict[int, list[int] | str] = {}

    async def one(i: int):
        k = i % len(templates)
        messages, _, fields = templates[k]
        leave = i % DISCONNECT_EVERY == DISCONNECT_EVERY - 1
        body = dict(model=MODEL, messages=messages, max_tokens=DISCONNECT_MAX_TOKENS if leave else MAX_TOKENS,
                    extra_body={"ignore_eos": True, "return_token_ids": True,
                                "mm_processor_kwargs": {"max_dynamic_patch": 1}}, **fields)
        async with gate:
            if leave:
                extra = body.pop("extra_body")
                chunks = 0
                async with raw.stream("POST", "/chat/completions", json={**body, **extra, "stream": True}) as r:
                    assert r.status_code == 200
                    async with contextlib.aclosing(r.aiter_lines()) as lines:
                        async for line in lines:
                            chunks += line.startswith("data: {")
                            if chunks >= 3:
                                break
                results[i] = "left"  # leaving the block closes the connection: the client went away mid-stream
            elif i % 2 == 0:
                stream = await client.chat.completions.create(**body, stream=True)
                tokens = []
                async with contextlib.aclosing(stream.__aiter__()) as chunk_iter:
                    async for chunk in chunk_iter:
                        for c in chunk.choices:
                            tokens += c.model_dump().get("token_ids") or []
                results[i] = tokens
            else:
                r = await client.chat.completions.create(**body)
                results[i] = r.choices[0].model_dump()["token_ids"]

    async def run_all():
        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        await client.close()
        await raw.aclose()

    t0 = time.time()
    asyncio.run(asyncio.wait_for(run_all(), timeout=300))
    elapsed = time.time() - t0
    wait_idle(loaded, timeout=120)  # a hang guard

    left = [i for i in range(REQUESTS) if i % DISCONNECT_EVERY == DISCONNECT_EVERY - 1]
    assert all(results[i] == "left" for i in left)
    stayed = [i for i in range(REQUESTS) if i not in left]
    wrong = [i for i in stayed if results[i] != reference[i % len(templates)]]
    assert not wrong, f"{len(wrong)} requests differ from offline, e.g. {wrong[:5]}"

    m = loaded.metrics()
    assert m['internvl_requests_total{outcome="success"}'] == len(stayed)
    assert m['internvl_requests_total{outcome="abort"}'] == len(left)
    assert sum(v for k, v in m.items() if k.startswith("internvl_requests_total")) == REQUESTS
    # the engine counts each request once by how it ended, and every token as it was made (the left ones' too)
    engine = {k: m[k] - offline[k] for k in m if k in offline}
    assert engine['internvl_request_success_total{finished_reason="length"}'] == len(stayed)
    assert engine['internvl_request_success_total{finished_reason="abort"}'] == len(left)
    assert len(stayed) * MAX_TOKENS + len(left) <= engine["internvl_generation_tokens_total"] <= \
        len(stayed) * MAX_TOKENS + len(left) * DISCONNECT_MAX_TOKENS
    assert engine["internvl_e2e_request_latency_seconds_count"] == REQUESTS
    assert m["internvl_num_requests_running"] == 0 and m["internvl_num_requests_waiting"] == 0
    bm = loaded.llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # no leaked blocks
    assert m["internvl_kv_cache_blocks_free"] == m["internvl_kv_cache_blocks_total"]
    bm.check_invariants()
    print(f"\n{REQUESTS} requests ({len(left)} disconnecting) in {elapsed:.1f} s")
