"""Many callers on one engine: 200 requests from 8 threads and from 64 asyncio tasks, some aborted midway; every
request finishes or aborts cleanly, finished ones match a solo run, and no KV block leaks."""
import asyncio
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image

from internvl_engine import SamplingParams
from internvl_engine.engine.async_llm import AsyncLLM

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True, max_num_tiles=1)
# aborted after their second output: far more tokens than any lag of a loaded machine's consumer lets the engine
# make meanwhile (with 400, a consumer that lagged 400 steps saw "length"), and within the 4096-token pool
LONG = SamplingParams(max_tokens=3000, ignore_eos=True, max_num_tiles=1)


def _conversations(n):
    rng = np.random.default_rng(0)
    convs = []
    for i in range(n):
        if i % 3 == 0:
            image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            convs.append([{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": f"Describe picture {i}."}]}])
        else:
            convs.append([{"role": "user", "content": f"Question number {i}: why?"}])
    return convs


@pytest.fixture(scope="module")
def engine():
    llm = AsyncLLM("random:tiny", device="cpu", kv_cache_tokens=4096, max_num_seqs=32)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def solo(engine):
    """Reference tokens, one request at a time."""
    convs = _conversations(12)
    return convs, [engine.submit(c, PARAMS).result(timeout=120).token_ids for c in convs]


def _run_threads(worker, n):
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _wait_idle(llm, timeout=60):
    deadline = time.time() + timeout
    while llm.engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.01)
    assert not llm.engine.has_unfinished_requests()


def test_200_requests_from_8_threads_with_aborts(engine, solo):
    convs, ref = solo
    free0 = engine.engine.block_manager.num_free_blocks
    results, errors = {}, []

    def worker(t):
        rnd = random.Random(t)
        futures = []
        for i in range(25):
            rid = f"t{t}-{i}"
            futures.append((rid, i % len(convs), engine.submit(convs[i % len(convs)], PARAMS, request_id=rid)))
            if rnd.random() < 0.2:
                engine.abort(rid)
        for rid, k, f in futures:
            try:
                results[rid] = (k, f.result(timeout=300))
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    _run_threads(worker, 8)
    assert not errors and len(results) == 200
    aborted = [o for _, o in results.values() if o.finish_reason == "abort"]
    done = [(k, o) for k, o in results.values() if o.finish_reason != "abort"]
    assert aborted and done and all(o.token_ids == ref[k] for k, o in done)
    assert all(len(o.token_ids) <= PARAMS.max_tokens for o in aborted)
    _wait_idle(engine)
    assert engine.engine.block_manager.num_free_blocks == free0


def test_64_asyncio_tasks_with_aborts_and_cancellation(engine, solo):
    convs, ref = solo
    free0 = engine.engine.block_manager.num_free_blocks

    async def one(i):
        rid = f"a{i}"
        outs = []
        if i % 7 == 3:  # cancelled by its consumer after the first output
            async for out in engine.generate(convs[i % len(convs)], PARAMS, rid):
                outs.append(out)
                break
            return i, "cancelled", outs
        # aborted after its second output; long, so the stepping thread cannot finish it before the consumer (a
        # coroutine that may lag behind on a loaded machine) gets there
        params = LONG if i % 5 == 0 else PARAMS
        async for out in engine.generate(convs[i % len(convs)], params, rid):
            outs.append(out)
            if i % 5 == 0 and len(outs) == 2:
                engine.abort(rid)
        return i, outs[-1].finish_reason, outs

    async def task(t):  # 64 tasks share the 200 requests: task t sends requests t, t + 64, t + 128, ...
        return [await one(i) for i in range(t, 200, 64)]

    async def main():
        return [r for rs in await asyncio.gather(*[task(t) for t in range(64)]) for r in rs]

    results = asyncio.run(main())
    assert len(results) == 200
    reasons = [reason for _, reason, _ in results]
    assert "abort" in reasons and "cancelled" in reasons and "length" in reasons
    for i, reason, outs in results:
        assert outs, i
        if i % 5 == 0 and reason != "cancelled":
            assert reason == "abort", i
        elif reason != "cancelled":
            assert outs[-1].finished and outs[-1].token_ids == ref[i % len(convs)]
    _wait_idle(engine)
    assert engine.engine.block_manager.num_free_blocks == free0


def test_llm_generate_from_several_threads():
    """LLM.generate on one LLM from 4 threads at once: whichever thread steps the engine, each call returns its own
    requests' final outputs, equal to a solo run."""
    from internvl_engine import LLM
    llm = LLM("random:tiny", device="cpu")
    convs = _conversations(6)
    ref = [o.token_ids for o in llm.generate(convs, PARAMS)]
    results, errors = {}, []

    def worker(t):
        try:
            results[t] = [o.token_ids for o in llm.generate(convs, PARAMS)]
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    _run_threads(worker, 4)
    assert not errors and all(results[t] == ref for t in range(4))


def test_generate_takes_template_variables_as_llm_does(engine):
    """AsyncLLM.generate's chat_template_kwargs render as LLM.generate's (offered tools here: the prompt grows by
    the tools block); a raw prompt takes none, and a model without a thinking mode refuses enable_thinking."""
    from internvl_engine import LLM
    from internvl_engine.errors import PromptError
    tools = [{"type": "function", "function": {"name": "now", "description": "The time.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    conv = [{"role": "user", "content": "What time is it?"}]
    params = SamplingParams(max_tokens=3)

    async def run(request, kwargs):
        async for out in engine.generate(request, params, chat_template_kwargs=kwargs):
            last = out
        return last

    with_tools = asyncio.run(run(conv, {"tools": tools}))
    plain = asyncio.run(run(conv, None))
    offline = LLM("random:tiny", device="cpu", kv_cache_tokens=1024)
    try:
        want = offline.generate(conv, params, chat_template_kwargs={"tools": tools})[0]
    finally:
        offline.shutdown()
    assert with_tools.prompt_token_ids == want.prompt_token_ids and with_tools.token_ids == want.token_ids
    assert len(with_tools.prompt_token_ids) > len(plain.prompt_token_ids)
    for request, kwargs in (({"prompt": "hi"}, {"tools": tools}), (conv, {"enable_thinking": True})):
        with pytest.raises(PromptError):
            asyncio.run(run(request, kwargs))
