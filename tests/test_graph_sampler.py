"""The sampler inside the decode graph (worker/graph_sampler.py, issue 3.6) against the eager Sampler and against an
independent float64 statement of the filters; then an engine whose decode graphs sample (replay emulated on the
CPU) against the default path: equal tokens, one replay and one device-to-host copy a step."""
import numpy as np
import pytest
import torch

from internvl_engine import SamplingParams
from internvl_engine.engine.llm_engine import LLMEngine
from internvl_engine.sampling import Sampler, SamplingInput
from internvl_engine.worker import graph_sampler

V = 40


def _rows(temperature, top_k=None, top_p=None, min_p=None, **kw) -> SamplingInput:
    n = len(temperature)
    return SamplingInput(list(temperature), top_k or [0] * n, top_p or [1.0] * n, min_p or [0.0] * n, [None] * n,
                         [None] * n, [False] * n, **kw)


def _buffers(rows: SamplingInput, vocab: int, b: int | None = None):
    """The graph's [b] parameter tensors staged from rows (padding rows past len(rows)), as DecodeGraphs stages them."""
    b = b or len(rows)
    temperature, top_p, min_p = (np.zeros(b, np.float32) for _ in range(3))
    top_k = np.zeros(b, np.int64)
    graph_sampler.stage(rows, vocab, temperature, top_p, min_p, top_k)
    graph_sampler.stage_padding(temperature, top_p, min_p, top_k, len(rows))
    return tuple(torch.from_numpy(a) for a in (temperature, top_k, top_p, min_p))


def _graph(logits, rows, b=None):
    return graph_sampler.sample(logits, *_buffers(rows, logits.shape[1], b))


# rows: (temperature, top_k, top_p, min_p), each filter alone and together; top_k -1 and >= V are off
CASES = [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (0.9, 0, 1.0, 0.2),
         (0.8, 7, 0.8, 0.05), (2.0, -1, 0.95, 0.0), (1.0, V, 1.0, 0.0), (3.0, 6, 0.7, 0.0)]


def _case_rows(cases):
    return _rows(*[list(c) for c in zip(*cases)])


def test_drawn_rows_equal_the_eager_sampler_given_the_same_uniforms():
    """Every row drawn, unseeded: both samplers take row i's uniform from the global generator's i-th draw, so the
    same seed must give the same tokens, row for row."""
    rows = _case_rows(CASES)
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        logits = torch.randn(len(CASES), 300, generator=gen) * 3
        torch.manual_seed(trial)
        eager = Sampler()(logits, rows)
        torch.manual_seed(trial)
        assert torch.equal(_graph(logits, rows), eager), trial


def test_greedy_rows_equal_the_eager_argmax_and_padding_rows_change_nothing():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=gen)
    logits[1, [7, 250]] = 9.0  # a tie: the lowest id, as the eager argmax
    rows = _rows([0.0, 0.0, 0.8, 0.0, 1.0], [0, 3, 10, 0, 0], [1.0, 0.5, 0.9, 1.0, 0.7])
    torch.manual_seed(3)
    eager = Sampler()(logits, rows)
    greedy = [0, 1, 3]
    assert torch.equal(_graph(logits, rows)[greedy], eager[greedy]) and eager[1] == 7
    # a bucket of 8 holding the 5 rows: padding rows (temperature 0) draw nothing and do not move the real rows'
    # uniforms (the global generator's first draws go to the first rows)
    padded = torch.cat([logits, torch.randn(3, 300, generator=gen)])
    torch.manual_seed(4)
    alone = _graph(logits, rows)
    torch.manual_seed(4)
    in_bucket = _graph(padded, rows, b=8)
    assert torch.equal(in_bucket[:5], alone)
    assert torch.equal(in_bucket[5:], padded[5:].argmax(-1))


def test_ties_with_the_kth_logit_stay_in_both_samplers():
    """top_k alone over logits with ties at the k-th value (common in bf16): every tied token stays in the support
    (vLLM's and the per-row oracle's rule), in the graph and in the eager sampler, whose sort stops at the batch's
    largest top_k on a CPU."""
    row = torch.tensor([5.0, 3.0, 4.0, 3.0, 1.0, 3.0, 0.0])
    n = 3000
    logits, rows = row.expand(n, 7).contiguous(), _rows([1.0] * n, [3] * n)
    torch.manual_seed(0)
    eager = Sampler()(logits, rows)
    torch.manual_seed(0)
    graph = _graph(logits, rows)
    assert torch.equal(graph, eager)
    assert set(eager.tolist()) == {0, 1, 2, 3, 5}


def _expected(row: torch.Tensor, t: float, k: int, p: float, min_p: float) -> np.ndarray:
    """vLLM's filters in float64, written out independently of sampling.py: min_p on the tempered softmax, top_k
    by value (ties kept), then the smallest prefix of the sorted distribution whose mass reaches top_p."""
    z = row.double().numpy() / t
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    z = np.where(probs < min_p * probs.max(), -np.inf, z)
    if 0 < k < len(z):
        z = np.where(z < np.sort(z)[::-1][k - 1], -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if p < 1:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        assert np.abs(before - p).min() > 1e-3, "a case on top_p's boundary: fp32 rounding could go either way"
        probs[order[before >= p]] = 0
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("case", CASES)
def test_draws_follow_the_filtered_distribution(case):
    """20,000 draws of one row: no token outside the support, each frequency within 5 sigma (+0.002) of its
    probability. A sampler that ignores the temperature, keeps one token too many or too few at top_p or top_k,
    or drops min_p's floor fails it."""
    n = 20_000
    row = torch.randn(V, generator=torch.Generator().manual_seed(7)) * 2
    want = _expected(row, *case)
    torch.manual_seed(11)
    tokens = _graph(row.expand(n, V).contiguous(), _case_rows([case] * n))
    freq = np.bincount(tokens.numpy(), minlength=V) / n
    assert not freq[want == 0].any(), np.nonzero((want == 0) & (freq > 0))
    bound = 5 * np.sqrt(want * (1 - want) / n) + 0.002
    assert (np.abs(freq - want) <= bound).all(), (np.abs(freq - want) - bound).max()
    assert (want > 0).sum() > 1  # each case draws from more than one token, so it tests the draw


def test_stage_normalises_top_k_and_fits_names_what_the_graph_cannot_do():
    rows = _rows([1.0, 1.0, 1.0, 0.0], [-1, V, V + 5, 3])
    _, top_k, _, _ = _buffers(rows, V, b=6)
    assert top_k.tolist() == [0, 0, 0, 3, 0, 0]
    assert graph_sampler.fits(_rows([0.0, 1.0]), 2)
    assert not graph_sampler.fits(_rows([0.0, 1.0]), 3)  # a row count that is not the step's
    assert not graph_sampler.fits(None, 2)
    plain = dict(temperature=[0.0, 1.0], top_k=[0, 0], top_p=[1.0, 1.0], min_p=[0.0, 0.0])
    refused = [dict(generators=[None, torch.Generator()]), dict(logprobs=[None, 2]), dict(return_logits=[True, False]),
               dict(masked=([0], [5])), dict(repetition=([1], [4], [1.2])), dict(counted=([0], [3], [1], [0.5], [0.0])),
               dict(bias=([1], [2], [3.0])), dict(allowed=object())]
    for extra in refused:
        rows = SamplingInput(**{**plain, "generators": [None, None], "logprobs": [None, None],
                                "return_logits": [False, False], **extra})
        assert not graph_sampler.fits(rows, 2), extra
    assert not graph_sampler.needs_draw(_rows([0.0, 1e-6])) and graph_sampler.needs_draw(_rows([0.0, 1e-5]))


# ---------------------------------------------------------------------------------------------- through an engine
CONVS = [[{"role": "user", "content": f"Tell me story number {i} about a dragon."}] for i in range(3)]


def _engine(graphs: bool, sample: bool = False, fused: bool | None = None) -> LLMEngine:
    """fused: decode_path "fused" (the fused forward, models/decode_fused.py; by default with sample)."""
    path = "fused" if (sample if fused is None else fused) else "default"
    eng = LLMEngine("random:tiny", dtype="float32", device="cpu", decode_path=path)
    if graphs:  # the CPU never captures graphs itself (enforce_eager): replay emulated, as test_engine does
        eng.runner.enable_graphs(eng.cache, 4, -(-eng.max_model_len // eng.block_size), emulate=True, sample=sample)
    return eng


def _run(eng: LLMEngine, params: list[SamplingParams], probe=None) -> dict:
    for i, p in enumerate(params):
        eng.add_request(f"r{i}", CONVS[i], p)
    final = {}
    while eng.has_unfinished_requests():
        before = probe() if probe else None
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        if probe:
            probe.steps.append([a - b for a, b in zip(probe(), before)])
    return final


class _Probe:
    """Counts per step: graph replays, steps sampled in the graph, device-to-host copies, eager sampler calls."""

    def __init__(self, eng: LLMEngine):
        self.eng, self.copies, self.eager, self.steps = eng, 0, 0, []
        runner, to_host, sampler = eng.runner, eng.runner.to_host, eng.runner.sampler

        def counted_copy(t):
            self.copies += 1
            return to_host(t)

        def counted_sampler(*a):
            self.eager += 1
            return sampler(*a)
        runner.to_host, runner.sampler = counted_copy, counted_sampler

    def __call__(self):
        g = self.eng.runner.graphs
        return g.replays, g.sampled, self.copies, self.eager


@pytest.fixture(scope="module")
def default_greedy():
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 6, 8)]
    return params, _run(_engine(graphs=False), params)


def test_greedy_decode_sampled_in_the_graph_equals_the_default_path(default_greedy):
    """Batches of 3, 2 and 1 in buckets of 4, 2 and 1: each decode step is one replay, sampled in the graph, one
    copy back, no eager sampling; the tokens are the default path's."""
    params, want = default_greedy
    eng = _engine(graphs=True, sample=True)
    probe = _Probe(eng)
    got = _run(eng, params, probe)
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    decode = [s for s in probe.steps if s[1]]
    assert len(decode) == 7  # 8 tokens, the first from the prefill
    assert all(s == [1, 1, 1, 0] for s in decode), probe.steps
    assert set(eng.runner.graphs.graphs) >= {(b, eng.runner.graphs.widths[0], "greedy") for b in (1, 2, 4)}


def test_rows_the_graph_cannot_sample_fall_back_to_the_eager_sampler(default_greedy):
    """A row asking for logprobs sends its steps to the eager sampler over the graph's logits: one replay, the same
    tokens, the logprobs there."""
    params, want = default_greedy
    params = [params[0], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2), params[2]]
    eng = _engine(graphs=True, sample=True)
    probe = _Probe(eng)
    got = _run(eng, params, probe)
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    assert len(got["r1"].outputs[0].logprobs) == 6 and all(len(e) >= 2 for e in got["r1"].outputs[0].logprobs)
    steps = [s for s in probe.steps if s[0]]
    assert [s[1] for s in steps] == [0] * 5 + [1] * 2  # r1 decodes for 5 steps; then r2 alone, in the graph
    assert all(s[0] == 1 and s[2] == 1 for s in steps)


def test_random_rows_sampled_in_the_graph_draw_what_the_eager_sampler_draws():
    """Unseeded rows with temperature, top_k, top_p and min_p, two at a time (a bucket of 2, so both paths take the
    same uniforms from the global generator): the graph's tokens are the eager sampler's over the same graph
    logits (the fused forward in both). A first run captures the graphs, whose capture draws too."""
    params = [SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.9, top_k=50, top_p=0.9),
              SamplingParams(max_tokens=4, ignore_eos=True, temperature=1.2, min_p=0.05)]
    out = {}
    for sample in (False, True):
        eng = _engine(graphs=True, sample=sample, fused=True)
        _run(eng, params)
        torch.manual_seed(5)
        sampled = eng.runner.graphs.sampled
        out[sample] = {k: o.token_ids for k, o in _run(eng, params).items()}
        assert eng.runner.graphs.sampled - sampled == (3 if sample else 0)
    assert out[True] == out[False]
    assert len({t for ids in out[True].values() for t in ids}) > 2  # they drew, not argmax'ed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampler_captured_in_a_cuda_graph():
    """On CUDA: the sampler captured in a graph over static buffers; each replay draws afresh (the default generator
    is registered with the graph) and the draws follow the filtered distribution; no synchronisation inside."""
    case, n, replays = CASES[5], 2048, 10
    row = torch.randn(V, generator=torch.Generator().manual_seed(7)) * 2
    want = _expected(row, *case)
    logits = row.expand(n, V).contiguous().cuda()
    params = [t.cuda() for t in _buffers(_case_rows([case] * n), V)]
    graph_sampler.sample(logits, *params)  # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tokens = graph_sampler.sample(logits, *params)
    draws = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(replays):
            g.replay()
            draws.append(tokens.clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    draws = torch.stack(draws).cpu()
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    freq = np.bincount(draws.flatten().numpy(), minlength=V) / draws.numel()
    assert not freq[want == 0].any()
    assert (np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / draws.numel()) + 0.002).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_decode_graphs_on_cuda_equal_the_default_graphs():
    """decode_path="fused" on CUDA: graphs sample inside (one replay and one copy a step, no synchronisation in
    the replay path), greedy tokens equal decode_path="default"'s graphs."""
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 6, 8)]
    runs = {}
    for path in ("default", "fused"):
        # a fixed KV pool, as test_gpu's: gpu_check.sh runs the GPU tests in parallel processes
        eng = LLMEngine("random:tiny", dtype="float32", device="cuda", decode_path=path, max_num_seqs=4,
                        kv_cache_tokens=32768)
        graphs = eng.runner.graphs
        assert graphs is not None and graphs.sample == (path == "fused")
        step = graphs.sample_step

        def no_sync(*a, step=step):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return step(*a)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        graphs.sample_step = no_sync
        runs[path] = {k: o.token_ids for k, o in _run(eng, params).items()}
        assert graphs.sampled == (7 if path == "fused" else 0)
    assert runs["fused"] == runs["default"]
