"""LLMEngine: continuous batching, paged KV pool with preemption, chunked prefill, prefix + vision caches, abort.
CPU, fp32, the tiny random-weight checkpoint; every check compares greedy tokens with the request run alone."""
import numpy as np
import pytest
import torch
from PIL import Image

from internvl_engine import SamplingParams
from internvl_engine.engine.input_processor import CapacityError
from internvl_engine.engine.llm_engine import DuplicateRequestError, LLMEngine

TILES = 1  # 256 image tokens per image with the 448px / patch 14 / shuffle 0.5 tower


def _image(seed, w=96, h=80):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _conv(kind: int, i: int):
    if kind == 0:
        return [{"role": "user", "content": f"Tell me story number {i} about a dragon and a knight."}]
    if kind == 1:
        return [{"role": "user", "content": [{"type": "image", "image": _image(100 + i)},
                                             {"type": "text", "text": f"Describe picture {i}."}]}]
    return [{"role": "user", "content": [{"type": "image", "image": _image(200 + i)}, {"type": "text", "text": "and"},
                                         {"type": "image", "image": _image(300 + i)},
                                         {"type": "text", "text": f"compare them ({i})."}]}]


REQUESTS = [_conv(i % 3, i) for i in range(8)]


def _params(n=6):
    return SamplingParams(max_tokens=n, ignore_eos=True, max_num_tiles=TILES)


def _engine(path, **kw):
    return LLMEngine(path, dtype="float32", device="cpu", **kw)


def _drain(engine, limit=10_000):
    final = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    assert not engine.has_unfinished_requests()
    return final


@pytest.fixture(scope="module")
def path(hf_checkpoint):
    return hf_checkpoint("300m")[0]


@pytest.fixture(scope="module")
def alone(path):
    """Greedy tokens of each request run alone, prefix and vision caches off."""
    eng = _engine(path, enable_prefix_caching=False, vision_cache_bytes=0)
    out = []
    for i, conv in enumerate(REQUESTS):
        eng.add_request(f"a{i}", conv, _params())
        out.append(_drain(eng)[f"a{i}"].token_ids)
    return out


def test_batch_invariance(path, alone):
    eng = _engine(path)
    for i, conv in enumerate(REQUESTS):
        eng.add_request(f"b{i}", conv, _params())
    final = _drain(eng)
    assert [final[f"b{i}"].token_ids for i in range(8)] == alone
    # staggered: 4 requests mid-decode when 4 more arrive
    eng = _engine(path, enable_prefix_caching=False, vision_cache_bytes=0)
    for i in range(4):
        eng.add_request(f"c{i}", REQUESTS[i], _params())
    final = {}
    for _ in range(3):
        for o in eng.step():
            final[o.request_id] = o
    assert any(o.token_ids and not o.finished for o in final.values())  # some are decoding
    for i in range(4, 8):
        eng.add_request(f"c{i}", REQUESTS[i], _params())
    final.update(_drain(eng))
    assert [final[f"c{i}"].token_ids for i in range(8)] == alone
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_preemption_keeps_outputs(path):
    # long outputs relative to the prompts: decode growth, not admission, exhausts the pool
    n = 48
    kinds = [_conv(0, i) for i in range(7)] + [REQUESTS[1]]
    ref = _engine(path, enable_prefix_caching=False, vision_cache_bytes=0)
    alone = []
    for i, conv in enumerate(kinds):
        ref.add_request(f"a{i}", conv, _params(n))
        alone.append(_drain(ref)[f"a{i}"].token_ids)
    reqs = [kinds[i % 8] for i in range(16)]
    need = 0
    probe = _engine(path, kv_cache_tokens=64)
    for conv in reqs:
        need += len(probe.make_sequence("x", conv, _params(), 0.0, "x", check_capacity=False).prompt_ids) + n
    del probe
    eng = _engine(path, kv_cache_tokens=max(need // 4, 400), enable_prefix_caching=False)
    free0 = eng.block_manager.num_free_blocks
    for i, conv in enumerate(reqs):
        eng.add_request(f"p{i}", conv, _params(n))
    final = _drain(eng)
    assert eng.stats().num_preemptions > 0
    assert [final[f"p{i}"].token_ids for i in range(16)] == [alone[i % 8] for i in range(16)]
    assert eng.block_manager.num_free_blocks == free0
    eng.block_manager.check_invariants()


def test_request_larger_than_pool_raises(path):
    eng = _engine(path, kv_cache_tokens=64)
    with pytest.raises(CapacityError, match="kv_cache_tokens"):
        eng.add_request("big", REQUESTS[1], _params())
    eng.add_request("small", [{"role": "user", "content": "hi"}], _params())
    assert _drain(eng)["small"].finish_reason == "length"


def test_chunked_prefill(path, alone):
    eng = _engine(path, max_num_batched_tokens=64, enable_prefix_caching=False)
    for i in (1, 2, 0):
        eng.add_request(f"k{i}", REQUESTS[i], _params())
    final = _drain(eng)
    assert final["k1"].metrics.prompt_tokens > 256
    assert [final[f"k{i}"].token_ids for i in (0, 1, 2)] == [alone[0], alone[1], alone[2]]


def test_prefix_and_vision_cache(path, alone):
    eng = _engine(path)
    eng.add_request("first", REQUESTS[1], _params())
    first = _drain(eng)["first"]
    assert first.metrics.cached_images == 0 and first.metrics.cached_prompt_tokens == 0
    assert first.token_ids == alone[1]
    eng.add_request("again", REQUESTS[1], _params())
    again = _drain(eng)["again"]
    assert again.metrics.cached_prompt_tokens > 0 and again.metrics.cached_images == 1
    assert again.token_ids == first.token_ids
    # same prompt text, a different image of the same size: only blocks before the image can be reused
    other = [{"role": "user", "content": [{"type": "image", "image": _image(999)},
                                          {"type": "text", "text": "Describe picture 1."}]}]
    seq = eng.make_sequence("probe", other, _params(), 0.0, "probe")
    image_start = seq.media[0].start
    eng.add_request("other", other, _params())
    out = _drain(eng)["other"]
    assert out.metrics.cached_images == 0
    assert out.metrics.cached_prompt_tokens < image_start
    ref = _engine(path, enable_prefix_caching=False, vision_cache_bytes=0)
    ref.add_request("other", other, _params())
    assert _drain(ref)["other"].token_ids == out.token_ids
    # vision cache alone (prefix caching off): the tower is skipped, same tokens
    eng2 = _engine(path, enable_prefix_caching=False)
    for rid in ("v1", "v2"):
        eng2.add_request(rid, REQUESTS[2], _params())
        o = _drain(eng2)[rid]
        assert o.token_ids == alone[2]
    assert o.metrics.cached_images == 2 and o.metrics.cached_prompt_tokens == 0


def test_abort_and_duplicate_ids(path):
    eng = _engine(path)
    free0 = eng.block_manager.num_free_blocks
    eng.add_request("x", REQUESTS[0], _params(50))
    with pytest.raises(DuplicateRequestError):
        eng.add_request("x", REQUESTS[0], _params())
    eng.add_request("y", REQUESTS[0], _params(10))
    for _ in range(3):
        eng.step()
    assert eng.block_manager.num_free_blocks < free0
    assert eng.abort("x") and not eng.abort("nope")
    outs = _drain(eng)
    assert outs["x"].finish_reason == "abort" and outs["y"].finish_reason == "length"
    assert eng.block_manager.num_free_blocks == free0
    eng.add_request("x", REQUESTS[0], _params(2))  # the id is free again
    assert _drain(eng)["x"].finish_reason == "length"
    eng.block_manager.check_invariants()


def test_decode_is_not_starved_by_arrivals(path):
    """A new request arrives before every step; the running one still gains a token at least every other step."""
    eng = _engine(path, max_num_seqs=64)
    eng.add_request("first", REQUESTS[0], _params(8))
    progress = []
    for i in range(16):
        eng.add_request(f"arrival{i}", _conv(0, 50 + i), _params(8))
        for o in eng.step():
            if o.request_id == "first":
                progress.append(i)
    assert len(progress) >= 7, progress  # 16 steps, prefills alternate with decodes
    _drain(eng)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_decode_graph_path_matches_eager(path, alone, monkeypatch):
    """The CUDA-graph decode path (cuda_graphs.py) with its replay emulated on the CPU: persistent buffers, batch
    and context buckets, padding rows, lazy capture of a new context bucket. Same tokens as each request alone."""
    from internvl_engine.worker import cuda_graphs
    monkeypatch.setattr(cuda_graphs, "FIRST_CONTEXT_TOKENS", 32)  # widths 2, 8, 32, ... blocks: prompts cross them
    eng = _engine(path, max_num_seqs=6)
    eng.runner.enable_graphs(eng.cache, 6, -(-eng.max_model_len // eng.block_size), emulate=True)
    graphs = eng.runner.graphs
    assert graphs.batches == [1, 2, 4, 6] and set(graphs.graphs) == {(b, 2) for b in (1, 2, 4, 6)}
    lengths = [3, 6, 4, 6, 5, 2, 6, 6]  # finishing at different steps: batches shrink through the buckets
    for i, conv in enumerate(REQUESTS):
        eng.add_request(f"g{i}", conv, _params(lengths[i]))
    final = _drain(eng)
    assert [final[f"g{i}"].token_ids for i in range(8)] == [alone[i][:n] for i, n in enumerate(lengths)]
    assert graphs.replays > 0
    assert any(w > 2 for _, w in graphs.graphs)  # captured at first use
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_vision_graph_path_matches_eager(path, monkeypatch):
    """The vision tower from graphs captured per tile count (cuda_graphs.VisionGraphs), replay emulated on the CPU:
    images of 1, 3 and 4 tiles in chunks of at most 3 tiles, so chunks of 3 and 1 repeat and replay. Same features
    and tokens as the eager tower."""
    from internvl_engine.worker import runner as runner_mod
    monkeypatch.setattr(runner_mod, "VISION_CHUNK_TILES", 3)
    convs = [[{"role": "user", "content": [{"type": "image", "image": _image(400 + i, w=w, h=100)},
                                           {"type": "text", "text": f"What is in picture {i}?"}]}]
             for i, w in enumerate([100, 300, 200, 100, 300])]
    params = SamplingParams(max_tokens=4, ignore_eos=True, max_num_tiles=4)
    eager = _engine(path, enable_prefix_caching=False, vision_cache_bytes=0)
    graphed = _engine(path, enable_prefix_caching=False, vision_cache_bytes=0)
    graphed.runner.enable_graphs(graphed.cache, 4, -(-graphed.max_model_len // graphed.block_size), emulate=True)
    vg = graphed.runner.vision_graphs
    pixels = [graphed.processor(c, max_num_tiles=4).pixel_values for c in convs]
    assert [p.shape[0] for p in pixels] == [1, 4, 3, 1, 4]
    for p in pixels:
        assert torch.equal(graphed.runner.vision(p), eager.runner.vision(p))
    assert set(vg.graphs) == {1, 3} and vg.replays == 7  # 1 | 3+1 | 3 | 1 | 3+1
    for engine, tag in ((eager, "e"), (graphed, "g")):
        for i, conv in enumerate(convs):
            engine.add_request(f"{tag}{i}", conv, params)
    final = {**_drain(eager), **_drain(graphed)}
    assert [final[f"g{i}"].token_ids for i in range(5)] == [final[f"e{i}"].token_ids for i in range(5)]
    assert vg.replays > 7


def test_decode_blocks_are_registered_for_reuse(path):
    """Blocks filled during decode become prefix-cache entries: a follow-up turn that repeats the answer reuses
    them."""
    eng = _engine(path)
    eng.add_request("turn1", REQUESTS[0], _params(40))
    out = _drain(eng)["turn1"]
    history = out.prompt_token_ids + out.token_ids
    cached = eng.block_manager.num_cached_tokens(history + [0])
    assert cached > len(out.prompt_token_ids)  # beyond the prompt: decode-time blocks
    assert cached == (len(history) - 1) // eng.block_size * eng.block_size  # every block whose KV was written
