"""What a caller sends cannot kill, stall or skew the engine (issue 3.0, the engine core's items): request ids are
labels, not keys; a sequence that fails to schedule fails its request alone; fault-isolation reruns keep seeded
tokens; tiny temperatures and huge seeds are handled; stop lists and prompt texts are bounded before the work they
would cause. CPU, the random:tiny preset."""
import time

import pytest
import torch

from internvl_engine import SamplingParams
from internvl_engine.engine.llm_engine import LLMEngine
from internvl_engine.errors import PromptError, RequestFailedError, SamplingParamsError


@pytest.fixture(scope="module")
def engine():
    return LLMEngine("random:tiny", device="cpu")


def _drain(engine, limit=2_000):
    final = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    assert not engine.has_unfinished_requests()
    return final


def _clean(engine):
    assert not engine.is_dead
    assert not engine._requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_invariants()


def _run(engine, requests):
    """{request id: final RequestOutput} of `requests` ((id, prompt, params)) run together."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    return _drain(engine)


def _alone(engine, prompt, params):
    return _run(engine, [("alone", prompt, params)])["alone"]


GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


# ---------------------------------------------------------------- 1. request ids are labels; scheduling failures
def test_request_id_that_looks_like_a_sample_name_does_not_collide(engine):
    """Sample 1 of request 'v' and a request named 'v#1' used to share a block-manager key: allocate raised inside
    schedule() and the engine died."""
    two = SamplingParams(n=2, max_tokens=6, ignore_eos=True, temperature=1.0, seed=5)
    ref = _alone(engine, "a prompt with two samples", two)
    ref1 = _alone(engine, "another prompt", GREEDY)
    out = _run(engine, [("v", "a prompt with two samples", two), ("v#1", "another prompt", GREEDY)])
    assert [c.token_ids for c in out["v"].outputs] == [c.token_ids for c in ref.outputs]
    assert out["v#1"].token_ids == ref1.token_ids and out["v#1"].finish_reason == "length"
    assert all(c.finish_reason == "length" for c in out["v"].outputs)
    _clean(engine)


def test_samples_carry_the_callers_id_and_distinct_internal_ids(engine):
    engine.add_request("w", "samples", SamplingParams(n=3, max_tokens=2, ignore_eos=True))
    head = engine._requests["w"]
    assert [s.request_id for s in head.group] == ["w"] * 3
    assert len({s.seq_id for s in head.group}) == 3
    _drain(engine)
    _clean(engine)


def test_a_sequence_that_fails_to_schedule_fails_its_request_alone(engine, monkeypatch):
    ref = _alone(engine, "the good one", GREEDY)
    ref2 = _alone(engine, "the second good one", GREEDY)
    bm = engine.block_manager
    real_allocate = bm.allocate
    engine.add_request("good", "the good one", GREEDY)
    engine.add_request("bad", "the bad one", GREEDY)
    engine.add_request("good2", "the second good one", GREEDY)
    bad = engine._requests["bad"].seq_id

    def allocate(seq_id, *args, **kwargs):
        if seq_id == bad:
            raise RuntimeError("planted allocate failure")
        return real_allocate(seq_id, *args, **kwargs)

    monkeypatch.setattr(bm, "allocate", allocate)
    out = _drain(engine)
    assert out["bad"].finish_reason == "error" and isinstance(out["bad"].error, RequestFailedError)
    assert "planted allocate failure" in str(out["bad"].error) and out["bad"].error.stage == "schedule"
    assert out["good"].token_ids == ref.token_ids and out["good2"].token_ids == ref2.token_ids
    _clean(engine)


def test_a_decode_slot_failure_fails_its_request_alone(engine, monkeypatch):
    ref = _alone(engine, "the good one", GREEDY)
    bm = engine.block_manager
    real_append = bm.append_slot
    engine.add_request("good", "the good one", GREEDY)
    engine.add_request("bad", "the bad one", GREEDY)
    bad = engine._requests["bad"].seq_id

    def append_slot(seq_id, num_tokens):
        if seq_id == bad:
            raise RuntimeError("planted append_slot failure")
        return real_append(seq_id, num_tokens)

    monkeypatch.setattr(bm, "append_slot", append_slot)
    out = _drain(engine)
    assert out["bad"].finish_reason == "error" and "planted append_slot failure" in str(out["bad"].error)
    assert out["good"].token_ids == ref.token_ids
    _clean(engine)
