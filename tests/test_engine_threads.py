"""Engines own their kernel table and step metadata (nothing process-wide is rebound per step): two engines on
different backends, stepped from two threads at once, give every request exactly the logits and tokens each engine
gives it alone. Also LLM.stream loses no delta when another thread steps the same engine."""
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_engine import LLM, SamplingParams
from internvl_engine.engine.llm_engine import LLMEngine

N = 12


def _conv(i):
    if i % 3:
        return f"Tell me story number {i} about a lighthouse keeper."
    img = Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": f"Picture {i}?"}]}]


def _run(engine, tag):
    params = SamplingParams(max_tokens=5, ignore_eos=True, max_num_tiles=1, return_logits=True)
    for i in range(N):
        engine.add_request(f"{tag}-{i}", _conv(i), params)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[int(o.request_id.split("-")[1])] = (o.token_ids, o.logits)
    return done


@pytest.fixture(scope="module")
def path(hf_checkpoint):
    return hf_checkpoint("300m")[0]


def test_two_engines_on_two_backends_in_two_threads_match_each_alone(path):
    engines = {b: LLMEngine(path, dtype="float32", device="cpu", backend=b, max_num_seqs=4) for b in ("torch", "cpp")}
    alone = {b: _run(e, b) for b, e in engines.items()}
    together, errors = {}, []

    def worker(b):
        try:
            together[b] = _run(engines[b], b)
        except BaseException as e:  # reported below, with the backend
            errors.append((b, e))

    threads = [threading.Thread(target=worker, args=(b,)) for b in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for b in engines:
        for i in range(N):
            ids, logits = together[b][i]
            assert ids == alone[b][i][0], (b, i)
            assert torch.equal(logits, alone[b][i][1]), (b, i)  # bit-equal: no op ran on the other engine's backend
    # and the two backends really differ somewhere, so a crossed binding would have shown
    assert any(not torch.equal(alone["torch"][i][1], alone["cpp"][i][1]) for i in range(N))


def test_stream_loses_no_delta_when_another_thread_steps_the_engine():
    llm = LLM("random:tiny", device="cpu")
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = llm.generate("Write a long poem about the sea.", params)[0].text
    stream = llm.stream("Write a long poem about the sea.", params)
    stop = threading.Event()

    def other():
        while not stop.is_set():
            llm.generate("Count to ten.", SamplingParams(max_tokens=3))

    t = threading.Thread(target=other)
    t.start()
    try:
        text = "".join(stream)
    finally:
        stop.set()
        t.join()
    assert text == expected == stream.output.text


def test_prompt_logits_while_another_thread_generates():
    """prompt_logits runs under the engine's lock with its own step metadata: from a second thread, during
    generation, it returns the logits it returns alone, and the generation is unchanged."""
    llm = LLM("random:tiny", device="cpu")
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    expected_text = llm.generate("Tell me about clouds.", params)[0].text
    expected = llm.prompt_logits("What is a river?")
    got, texts = [], []
    t = threading.Thread(target=lambda: texts.append(llm.generate("Tell me about clouds.", params)[0].text))
    t.start()
    for _ in range(5):
        got.append(llm.prompt_logits("What is a river?"))
    t.join()
    assert texts == [expected_text] and all(torch.equal(g, expected) for g in got)
