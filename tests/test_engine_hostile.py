"""What a caller sends cannot kill, stall or skew the engine (issue 3.0, the engine core's items): request ids are
labels, not keys; a sequence that fails to schedule fails its request alone; fault-isolation reruns keep seeded
tokens; tiny temperatures and huge seeds are handled; stop lists and prompt texts are bounded before the work they
would cause. CPU, the random:tiny preset."""
import random

import pytest

from internvl_engine import SamplingParams
from internvl_engine.engine.llm_engine import LLMEngine
from internvl_engine.engine.output_processor import StopMatcher
from internvl_engine.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from internvl_engine.errors import PromptError, RequestFailedError, SamplingParamsError
from test_engine import _drain


@pytest.fixture(scope="module")
def engine():
    return LLMEngine("random:tiny", device="cpu")


def _clean(engine):
    engine.check_health()
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


# ---------------------------------------------------------------- 11. seeded reruns, tiny temperatures, seeds
SEEDED = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=1234)


def test_a_rerun_after_a_sampling_fault_keeps_a_seeded_requests_tokens(engine):
    """An injected "sample" fault fires after the draw, so the failed attempt advanced the seeded generator; the
    rerun must draw from where that attempt started."""
    ref = _alone(engine, "a seeded prompt", SEEDED)
    engine.add_request("seeded", "a seeded prompt", SEEDED)
    engine.add_request("failing", "a failing prompt", GREEDY)
    engine.inject_fault("failing", "sample")
    out = _drain(engine)
    assert out["failing"].finish_reason == "error"
    assert out["seeded"].token_ids == ref.token_ids and out["seeded"].finish_reason == "length"
    _clean(engine)


def test_a_failure_inside_the_sampler_keeps_a_seeded_requests_tokens(engine, monkeypatch):
    """A sampler that raises after drawing the rows before the failing one (as a nan row does in multinomial)."""
    ref = _alone(engine, "a seeded prompt", SEEDED)
    real = engine.runner.sampler

    def sampler(logits, rows):  # the runner samples plain rows: the failing request is the greedy one
        tokens = real(logits, rows)
        if GREEDY.temperature in rows.temperature:
            raise RuntimeError("planted sampler failure")
        return tokens

    monkeypatch.setattr(engine.runner, "sampler", sampler)
    out = _run(engine, [("seeded", "a seeded prompt", SEEDED), ("failing", "a failing prompt", GREEDY)])
    assert out["failing"].finish_reason == "error" and "planted sampler failure" in str(out["failing"].error)
    assert out["seeded"].token_ids == ref.token_ids
    _clean(engine)


def test_a_rerun_keeps_seeded_tokens_of_every_sample(engine):
    two = SamplingParams(n=2, max_tokens=6, ignore_eos=True, temperature=1.0, seed=99)
    ref = _alone(engine, "two seeded samples", two)
    engine.add_request("seeded", "two seeded samples", two)
    engine.add_request("failing", "a failing prompt", GREEDY)
    engine.inject_fault("failing", "sample")
    out = _drain(engine)
    assert out["failing"].finish_reason == "error"
    assert [c.token_ids for c in out["seeded"].outputs] == [c.token_ids for c in ref.outputs]
    _clean(engine)


def test_a_tiny_temperature_is_greedy_and_fails_nobody(engine):
    """temperature=1e-300 is valid but dividing logits by it gives inf / nan: every step failed and reran the others
    (and drew their seeded generators again)."""
    greedy = _alone(engine, "a tiny temperature", GREEDY)
    ref = _alone(engine, "a seeded prompt", SEEDED)
    tiny = SamplingParams(max_tokens=6, ignore_eos=True, temperature=1e-300, seed=3)
    splits = engine.num_isolation_splits
    out = _run(engine, [("seeded", "a seeded prompt", SEEDED), ("tiny", "a tiny temperature", tiny)])
    assert out["tiny"].finish_reason == "length" and out["tiny"].token_ids == greedy.token_ids
    assert out["seeded"].token_ids == ref.token_ids
    assert engine.num_isolation_splits == splits
    _clean(engine)


def test_a_tiny_top_p_keeps_the_most_likely_token_and_fails_nobody(engine):
    """top_p=1e-300 is valid but rounds to 0 in fp32, so the nucleus filter dropped every token (nan probabilities:
    the request failed, and its batch reran)."""
    greedy = _alone(engine, "a tiny nucleus", GREEDY)
    tiny = SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, top_p=1e-300, seed=3)
    splits = engine.num_isolation_splits
    out = _run(engine, [("tiny-p", "a tiny nucleus", tiny)])
    assert out["tiny-p"].finish_reason == "length" and out["tiny-p"].token_ids == greedy.token_ids
    assert engine.num_isolation_splits == splits
    _clean(engine)


@pytest.mark.parametrize("seed", [2**64, 2**100])
def test_seeds_a_generator_cannot_take_are_refused(seed):
    with pytest.raises(SamplingParamsError, match="seed"):
        SamplingParams(temperature=1.0, seed=seed)


def test_the_largest_seed_runs(engine):
    params = SamplingParams(n=2, max_tokens=2, ignore_eos=True, temperature=1.0, seed=2**64 - 1)
    out = _run(engine, [("big-seed", "hello", params)])["big-seed"]
    assert all(c.finish_reason == "length" for c in out.outputs)
    _clean(engine)


# ---------------------------------------------------------------- 8. stop lists bounded, matched per token
@pytest.mark.parametrize("params, limit", [
    (dict(stop=["x"] * (MAX_STOP_STRINGS + 1)), "sampling.MAX_STOP_STRINGS"),
    (dict(stop=["a", "y" * (MAX_STOP_CHARS + 1)]), "sampling.MAX_STOP_CHARS"),
    (dict(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))), "sampling.MAX_STOP_TOKEN_IDS"),
])
def test_stop_lists_over_their_limits_are_refused(params, limit):
    with pytest.raises(SamplingParamsError, match=limit) as e:
        SamplingParams(**params)
    assert len(str(e.value)) < 300  # names the count, never echoes the list back


def test_stop_lists_at_their_limits_are_taken():
    SamplingParams(stop=["s" * MAX_STOP_CHARS] * MAX_STOP_STRINGS, stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))


def _naive(text, new_from, stops):
    """The earliest-starting stop string that ends at or after new_from, by searching the whole text."""
    hits = [(text.find(stop, max(0, new_from - len(stop) + 1)), stop) for stop in stops]
    hits = [(i, stop) for i, stop in hits if i >= 0]
    return min(hits, key=lambda h: h[0]) if hits else None


def _naive_held(text, stops):
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def test_stop_matcher_agrees_with_a_whole_text_search():
    """Fed a token's characters at a time, the matcher finds what searching the whole text finds (stops spanning
    tokens, overlapping and self-overlapping stops, stops that are prefixes of others) and holds back exactly the
    tail that could start a stop string."""
    rng = random.Random(0)
    for trial in range(400):
        alphabet = "ab" if trial % 2 else "abc"
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        text, matcher, eligible_from = "", StopMatcher(stops), rng.randint(0, 3)
        for step in range(30):
            delta = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
            before, text = len(text), text + delta
            hit = matcher.feed(delta, match=step >= eligible_from)
            expected = _naive(text, before, stops) if step >= eligible_from else None
            assert (None if hit is None else (before + hit[0], hit[1])) == expected, (stops, text)
            if hit is not None:
                break
            assert matcher.held() == _naive_held(text, stops), (stops, text)


def test_stop_strings_end_generation_and_are_held_back(engine):
    """Through the engine: the stop string found in the generated text ends it, and no streamed delta is taken
    back."""
    free = _alone(engine, "stop strings", SamplingParams(max_tokens=24, ignore_eos=True))
    text = free.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    params = SamplingParams(max_tokens=24, ignore_eos=True, stop=["\x00" * MAX_STOP_CHARS, stop], output_kind="delta")
    engine.add_request("stopped", "stop strings", params)
    shown, final = "", None
    while engine.has_unfinished_requests():
        for o in engine.step():
            shown += o.outputs[0].text
            final = o
    assert final.finish_reason == "stop" and shown == text[:text.find(stop)]
    _clean(engine)


# ---------------------------------------------------------------- 7. texts bounded before tokenising
class _EncodeSpy:
    """Stands in for the tokenizers backend and records the length of every text encoded."""

    def __init__(self, backend):
        self.backend, self.encoded = backend, []

    def encode(self, text, **kwargs):
        self.encoded.append(len(text))
        return self.backend.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


@pytest.fixture(scope="module")
def short():
    """A 512-token context: a byte-level BPE token is at most 128 bytes, so texts over 65,536 bytes cannot fit."""
    return LLMEngine("random:tiny", device="cpu", max_model_len=512, kv_cache_tokens=1024, max_prompt_chars=200_000)


@pytest.fixture
def spy(short, monkeypatch):
    tok = short.processor.tokenizer
    monkeypatch.setattr(tok, "_tok", _EncodeSpy(tok._tok))
    return tok._tok


@pytest.mark.parametrize("request_", [
    {"prompt": "a" * (512 * 128 + 1)},
    [{"role": "user", "content": "word " * 13_200}],
    [{"role": "user", "content": [{"type": "text", "text": "é" * 33_000}]}],  # 66,000 bytes in 33,000 characters
], ids=["raw", "chat", "two-byte characters"])
def test_a_text_that_cannot_fit_is_refused_before_tokenising(short, spy, request_):
    with pytest.raises(PromptError, match=r"max_model_len") as e:
        short.add_request("long", request_, SamplingParams(max_tokens=1))
    assert "characters" in str(e.value) and "bytes" in str(e.value)
    assert all(n <= 512 * 128 for n in spy.encoded)  # nothing that long reached the tokenizer
    _clean(short)


def test_a_long_text_that_fits_is_taken(short, spy):
    """64,000 characters, but runs of 128 spaces are single tokens: 500 tokens fit in 512 (no false refusal)."""
    out = _run(short, [("spaces", {"prompt": " " * (128 * 500)}, SamplingParams(max_tokens=1))])["spaces"]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) == 500
    _clean(short)


def test_max_prompt_chars_refuses_a_long_text_first(short, spy):
    conv = [{"role": "user", "content": [{"type": "text", "text": "b" * 100_000}, "c" * 100_001]}]
    with pytest.raises(PromptError, match=r"200001 characters, over the 200000 limit \(max_prompt_chars\)"):
        short.add_request("long", conv, SamplingParams(max_tokens=1))
    assert not spy.encoded
    _clean(short)


def test_the_tokenizer_refuses_a_text_that_cannot_fit_whoever_calls_it(short, spy):
    with pytest.raises(PromptError, match="max_model_len"):
        short.processor(text="z" * (512 * 128 + 1))
    assert not spy.encoded
    assert short.processor.tokenizer.token_bound() == (128, ("NFC",))
