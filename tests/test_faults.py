"""Fault isolation (docs/ARCHITECTURE.md, "Failure model"): a fault injected for one request at any stage finishes that
request with finish_reason "error" and a RequestFailedError naming the stage, while every other request's tokens are
exactly what they are alone, the KV pool ends clean and the engine keeps serving. Callers cannot kill the async
loop (cancelled futures, closed event loops, consumers that raise); a fatal fault marks the engine dead and every
pending and later call raises EngineDeadError at once. CPU, random:tiny."""
import asyncio
import time

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_engine import LLM, SamplingParams
from internvl_engine.engine.async_llm import AsyncLLM
from internvl_engine.engine.faults import InjectedFault
from internvl_engine.errors import EngineDeadError, RequestFailedError

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True, max_num_tiles=1)


def _conv(i):
    if i % 2:
        return [{"role": "user", "content": f"Question {i}: why is the sky blue?"}]
    img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 72, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": f"Picture {i}."}]}]


CONVS = [_conv(i) for i in range(6)]


@pytest.fixture(scope="module")
def llm():
    return LLM("random:tiny", device="cpu", kv_cache_tokens=4096, vision_cache_bytes=0, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def alone(llm):
    return [llm.generate(c, PARAMS)[0].token_ids for c in CONVS]


def _assert_clean(engine):
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()
    engine.check_health()


class _Victim:
    """Injects a fault for the request LLM.generate will name `req-<index>-...` (ids are made per call)."""

    def __init__(self, engine, index, stage):
        self.engine, self.index, self.stage = engine, index, stage
        self.original = engine.make_sequence

    def __enter__(self):
        def make(request_id, *args, **kwargs):
            if request_id.startswith(f"req-{self.index}-"):
                self.engine.inject_fault(request_id, self.stage)
            return self.original(request_id, *args, **kwargs)
        self.engine.make_sequence = make
        return self

    def __exit__(self, *exc):
        del self.engine.make_sequence


STAGES = ["vision", "prefill", "decode", "sample", "detokenize", "step"]


@pytest.mark.parametrize("stage", STAGES)
def test_generate_batch_fault_at_each_stage_fails_only_its_request(llm, alone, stage):
    _fault_fails_only_its_request(llm, alone, stage)


@pytest.fixture(scope="module")
def moe_llm():
    return LLM("random:tiny-qwen3-moe", device="cpu", kv_cache_tokens=4096, vision_cache_bytes=0,
               enable_prefix_caching=False)


@pytest.fixture(scope="module")
def moe_alone(moe_llm):
    return [moe_llm.generate(c, PARAMS)[0].token_ids for c in CONVS]


@pytest.mark.parametrize("stage", STAGES)
def test_moe_fault_at_each_stage_fails_only_its_request(moe_llm, moe_alone, stage):
    """The same isolation on a mixture-of-experts decoder, where a batch's tokens share each layer's expert
    dispatch (fused_moe sorts every token of the step by expert): a failed request leaves the others' routing and
    tokens exactly as they are alone."""
    _fault_fails_only_its_request(moe_llm, moe_alone, stage)


def _fault_fails_only_its_request(llm, alone, stage):
    victim = 2  # an image request, so the vision stage applies
    with _Victim(llm.engine, victim, stage):
        outs = llm.generate(CONVS, PARAMS)
    for i, o in enumerate(outs):
        if i == victim:
            assert o.finish_reason == "error" and isinstance(o.error, RequestFailedError)
            assert o.error.stage == stage and isinstance(o.error.__cause__, InjectedFault)
        else:
            assert o.finish_reason == "length" and o.token_ids == alone[i], (stage, i)
    _assert_clean(llm.engine)
    assert [o.token_ids for o in llm.generate(CONVS, PARAMS)] == alone  # serving on


def test_preprocess_fault_raises_at_submission_and_the_engine_serves_on(llm, alone):
    with _Victim(llm.engine, 1, "preprocess"):
        with pytest.raises(InjectedFault):
            llm.generate(CONVS, PARAMS)
    _assert_clean(llm.engine)
    assert llm.generate(CONVS[1], PARAMS)[0].token_ids == alone[1]


def test_stream_fault_raises_the_request_error(llm, alone):
    with _Victim(llm.engine, 0, "decode"):
        stream = llm.stream(CONVS[0], PARAMS)
        with pytest.raises(RequestFailedError, match="decode"):
            list(stream)
    assert stream.output.finish_reason == "error"
    _assert_clean(llm.engine)
    assert "".join(llm.stream(CONVS[0], PARAMS)) == llm.generate(CONVS[0], PARAMS)[0].text


def test_generated_image_token_is_text_after_preemption():
    """Features are placed by the processor's spans: a generated <IMG_CONTEXT> id is plain text, also when the
    sequence is recomputed after preemption (merging by id found more image positions than features)."""
    def run(kv_tokens):
        llm = LLM("random:tiny", device="cpu", kv_cache_tokens=kv_tokens, enable_prefix_caching=False)
        image_id = llm.config.image_token_id
        sampler = llm.engine.runner.sampler
        llm.engine.runner.sampler = lambda logits, *rest: torch.full_like(sampler(logits, *rest), image_id)
        outs = llm.generate([CONVS[0], CONVS[2]], SamplingParams(max_tokens=40, ignore_eos=True, max_num_tiles=1))
        return [o.token_ids for o in outs], llm.engine.stats().num_preemptions

    roomy, _ = run(4096)
    tight, preemptions = run(2 * 16 * 19)  # two ~300-token sequences cannot both grow: one is preempted
    assert preemptions > 0 and tight == roomy and set(roomy[0]) == {151667}


# ---------------------------------------------------------------------------------------------- AsyncLLM
@pytest.fixture(scope="module")
def engine():
    e = AsyncLLM("random:tiny", device="cpu", kv_cache_tokens=4096, vision_cache_bytes=0, enable_prefix_caching=False)
    yield e
    e.shutdown()


def _wait_idle(engine, timeout=60):
    deadline = time.time() + timeout
    while engine.engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.02)


def test_cancelled_future_does_not_kill_the_loop(engine, alone):
    futures = [engine.submit(c, PARAMS, request_id=f"cancel-{i}") for i, c in enumerate(CONVS)]
    futures[1].cancel()
    futures[4].cancel()
    for i, f in enumerate(futures):
        if i not in (1, 4):
            assert f.result(timeout=120).token_ids == alone[i]
    assert engine.submit(CONVS[3], PARAMS).result(timeout=120).token_ids == alone[3]
    _wait_idle(engine)
    _assert_clean(engine.engine)


def test_consumer_whose_event_loop_closed_does_not_kill_the_loop(engine, alone):
    loop = asyncio.new_event_loop()

    async def first_output():
        gen = engine.generate(CONVS[0], SamplingParams(max_tokens=50, ignore_eos=True, max_num_tiles=1), "closed")
        await gen.__anext__()
        return gen

    gen = loop.run_until_complete(first_output())
    loop.close()  # the generator is left open on a closed loop: later deliveries cannot be scheduled
    assert engine.submit(CONVS[1], PARAMS).result(timeout=120).token_ids == alone[1]
    _wait_idle(engine)
    _assert_clean(engine.engine)
    del gen


def test_consumer_that_raises_and_faults_in_async_requests(engine, alone):
    async def main():
        async def consume(i):
            if i == 1:
                engine.engine.inject_fault("async-1", "decode")
            if i == 3:
                engine.engine.inject_fault("async-3", "deliver")
            last = None
            async for out in engine.generate(CONVS[i], PARAMS, f"async-{i}"):
                if i == 5:
                    raise ValueError("consumer gave up")
                last = out
            return last.token_ids
        return await asyncio.gather(*(consume(i) for i in range(len(CONVS))), return_exceptions=True)

    results = asyncio.run(main())
    for i, r in enumerate(results):
        if i in (1, 3):
            assert isinstance(r, RequestFailedError) and r.stage == ("decode" if i == 1 else "deliver")
        elif i == 5:
            assert isinstance(r, ValueError)
        else:
            assert r == alone[i]
    _wait_idle(engine)
    _assert_clean(engine.engine)


def test_fatal_fault_kills_the_engine_and_nothing_hangs():
    engine = AsyncLLM("random:tiny", device="cpu", kv_cache_tokens=4096)
    try:
        engine.engine.inject_fault("doomed", "decode", fatal=True)
        long = SamplingParams(max_tokens=30, ignore_eos=True, max_num_tiles=1)
        futures = [engine.submit(CONVS[0], long, request_id="doomed")]
        for c in CONVS[1:]:
            try:
                futures.append(engine.submit(c, long))
            except EngineDeadError:  # it may already be dead: then submission says so at once
                pass
        for f in futures:
            with pytest.raises(EngineDeadError):
                f.result(timeout=60)
        with pytest.raises(EngineDeadError, match="decode"):
            engine.check_health()
        with pytest.raises(EngineDeadError):  # raised by the call itself, not a future that would never complete
            engine.submit(CONVS[0], PARAMS)
        with pytest.raises(EngineDeadError):  # the guard only against a hang
            asyncio.run(asyncio.wait_for(anext(engine.generate(CONVS[0], PARAMS)), timeout=120))
    finally:
        engine.shutdown()
