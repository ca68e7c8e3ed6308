"""SamplingParams options, each against an independent reference: transformers' logits processors (repetition
penalty, min_p) or a plain loop (OpenAI's frequency / presence penalties) over the raw logits the engine returns, a
plain log-softmax for logprobs and prompt logprobs, a naive string search for stop strings. Plus n with seeds,
min_tokens, batch invariance with every option on, and typed validation errors. CPU, random:tiny, fp32."""
import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from internvl_engine import LLM, SamplingParams
from internvl_engine.errors import SamplingParamsError
from internvl_engine.engine.step_builder import sampling_input
from internvl_engine.sampling import Sampler, _penalize, filter_logits
from internvl_engine.worker.step_input import PromptRows, StepInput
from internvl_engine.worker.step_output import finish_step

PROMPT = "Tell me a long story about a lighthouse keeper and the sea."
OTHER = "List some rivers of the world, please."


@pytest.fixture(scope="module")
def llm():
    return LLM("random:tiny", device="cpu", kv_cache_tokens=8192)


def _greedy_with(llm, **kw):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True, return_logits=True, **kw))[0]
    return out, out.logits


@pytest.mark.parametrize("penalty", [1.7, 0.3])  # < 1 rewards repeats: random weights rarely repeat otherwise
def test_repetition_penalty_matches_transformers(llm, penalty):
    out, raw = _greedy_with(llm, repetition_penalty=penalty)
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    ids = list(out.prompt_token_ids)
    for t, tok in enumerate(out.token_ids):
        ref = proc(torch.tensor([ids]), raw[t:t + 1].clone())
        assert tok == int(ref.argmax()), t
        ids.append(tok)
    if penalty < 1:
        assert out.token_ids != _greedy_with(llm)[0].token_ids  # the penalty changed something


@pytest.mark.parametrize("freq,pres", [(1.5, 0.0), (0.0, 1.9), (-1.5, 0.0), (0.0, -1.9), (1.2, -2.0)])
def test_frequency_and_presence_penalties_match_a_plain_loop(llm, freq, pres):
    out, raw = _greedy_with(llm, frequency_penalty=freq, presence_penalty=pres)
    for t, tok in enumerate(out.token_ids):
        ref = raw[t].clone()
        for prev in set(out.token_ids[:t]):  # OpenAI: generated tokens only
            n = out.token_ids[:t].count(prev)
            ref[prev] -= freq * n + pres
        assert tok == int(ref.argmax()), t
    if freq < 0 or pres < 0:  # rewarding repeats changes random-weight output (penalising alone may not)
        assert out.token_ids != _greedy_with(llm)[0].token_ids


def test_min_p_matches_transformers():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for min_p in (0.05, 0.3):
        ours = filter_logits(logits, [0] * 3, [1.0] * 3, [min_p] * 3)
        ref = MinPLogitsWarper(min_p, min_tokens_to_keep=1)(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))


# ---------------------------------------------------------------------- the batched sampler against the per-row one
def _per_row_filter(logits, top_k, top_p, min_p):
    """The per-row filter the batched one replaced (sampling.py before issue 3.1), kept here as the oracle."""
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _per_row_penalties(row, p, prompt_ids, output_ids):
    """The per-row penalties the batched ones replaced (sampling.apply_penalties before issue 3.1), the oracle."""
    row = row.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if output_ids and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(output_ids), minlength=row.shape[0])[:row.shape[0]]
        row -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty * (counts > 0).to(row.dtype)
    return row


def _seq(params, prompt_ids=(), output_ids=(), seed=None):
    """What the step builder reads of an engine Sequence for the sampler (sampling_input)."""
    from types import SimpleNamespace
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return SimpleNamespace(params=params, prompt_ids=list(prompt_ids), output_ids=list(output_ids), generator=gen,
                           plain=not (params.penalized or params.min_tokens))


def _random_params(g, vocab, **fixed):
    """Mixed rows: every filter on or off, edge values included (top_k 1, -1, the vocabulary and beyond; top_p tiny)."""
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    kw = dict(temperature=pick([0.0, 0.3, 0.7, 1.0, 1.5]), top_k=pick([0, -1, 1, 5, 50, 3000, vocab, vocab + 7]),
              top_p=pick([1.0, 1.0, 0.95, 0.8, 0.3, 1e-12]), min_p=pick([0.0, 0.0, 0.02, 0.2]),
              repetition_penalty=pick([1.0, 1.3, 0.7]), frequency_penalty=pick([0.0, 0.8, -0.5]),
              presence_penalty=pick([0.0, 1.1, -0.4]), max_tokens=64)
    kw.update(fixed)
    return SamplingParams(**kw)


def test_batched_filter_matches_the_per_row_filter():
    """Random mixed rows over a vocabulary larger than the CPU's top_p guess (sampling.TOP_P_GUESS): peaked rows
    whose nucleus lies within the guess and flat rows that need the full sort. The filtered distributions match
    the per-row oracle's within float rounding (both normalise the same kept logits; sums differ in order)."""
    g = torch.Generator().manual_seed(0)
    vocab, rows = 5000, 48
    scale = torch.tensor([0.05, 1.0, 4.0, 12.0])[torch.randint(4, (rows, 1), generator=g)]
    x = torch.randn(rows, vocab, generator=g) * scale
    params = [_random_params(g, vocab, temperature=1.0) for _ in range(rows)]
    ours = filter_logits(x, [p.top_k for p in params], [p.top_p for p in params], [p.min_p for p in params])
    for i, p in enumerate(params):
        ref = _per_row_filter(x[i], p.top_k, p.top_p, p.min_p)
        assert torch.allclose(ours[i].softmax(-1), ref.softmax(-1), rtol=0, atol=1e-6), (i, p)
        assert torch.isfinite(ours[i]).sum() >= 1


@pytest.mark.parametrize("top_p", [1.0, 0.999, 0.8])
def test_ties_with_the_kth_logit_past_the_sort_stay_under_top_p(top_p):
    """top_k and top_p on one row whose k-th logit ties with tokens that sort past the batch's largest top_k (the
    CPU's sort size): the per-row oracle keeps the ties top_k keeps, then walks them all for the nucleus, so at
    top_p 0.999 every tie stays (the mass before each is below it) and at 0.8 all go (no order among ties
    matters)."""
    x = torch.tensor([[5.0, 3.0, 4.0, 3.0, 1.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    ours = filter_logits(x, [3, 2], [top_p, 1.0], [0.0, 0.0])
    for i, k in enumerate([3, 2]):
        ref = _per_row_filter(x[i], k, [top_p, 1.0][i], 0.0)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), (i, ours[i], ref)


def test_batched_penalties_match_the_per_row_penalties():
    """min_tokens masks and penalties at their (row, token) pairs give exactly the per-row oracle's logits."""
    g = torch.Generator().manual_seed(1)
    vocab, stop_ids = 300, {7, 299}
    seqs, want = [], []
    x = torch.randn(32, vocab, generator=g) * 3
    for i in range(32):
        p = _random_params(g, vocab, min_tokens=int(torch.randint(0, 4, (1,), generator=g)), stop_token_ids=[11],
                           ignore_eos=bool(i % 5 == 0))
        prompt = torch.randint(vocab, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        output = torch.randint(vocab, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
        seqs.append(_seq(p, prompt, output))
        row = x[i].clone()
        if len(output) < p.min_tokens:
            row[sorted(({*stop_ids} if not p.ignore_eos else set()) | {11})] = float("-inf")
        want.append(_per_row_penalties(row, p, prompt, output) if p.penalized else row)
    assert torch.equal(_penalize(x, sampling_input(seqs, stop_ids)), torch.stack(want))
    greedy = [_seq(SamplingParams(), s.prompt_ids, s.output_ids) for s in seqs]
    assert torch.equal(Sampler()(x, sampling_input(greedy, ())), x.argmax(-1))  # plain greedy rows: the raw argmax


def test_seeded_draws_are_torch_multinomial_of_the_filtered_distribution():
    """The exponential race draws what torch.multinomial(probs, 1, generator) drew before issue 3.1 (multinomial
    draws one sample the same way, from one [V] Exp(1) draw): seeded streams are unchanged."""
    g = torch.Generator().manual_seed(2)
    vocab = 2000
    for seed in range(12):
        p = _random_params(g, vocab, temperature=0.9, repetition_penalty=1.0, frequency_penalty=0.0,
                           presence_penalty=0.0, seed=seed)
        seq, ref_gen = _seq(p, seed=seed), torch.Generator().manual_seed(seed)
        for _ in range(4):
            x = torch.randn(1, vocab, generator=g) * 4
            probs = _per_row_filter(x[0] / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
            drawn = int(Sampler()(x, sampling_input([seq], ()))[0])
            assert drawn == int(torch.multinomial(probs, 1, generator=ref_gen)[0]), (seed, p)


def test_a_seeded_row_draws_the_same_alone_and_in_a_mixed_batch_of_64():
    g = torch.Generator().manual_seed(3)
    vocab, steps = 20000, 6
    params = SamplingParams(temperature=0.8, top_k=200, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                            frequency_penalty=0.4, presence_penalty=0.2, seed=1234, max_tokens=64)
    rows = [_random_params(g, vocab, seed=s if s % 3 else None) for s in range(63)]
    logits = [torch.randn(64, vocab, generator=g) * 3 for _ in range(steps)]

    def run(batch, where, seed=1234):
        seqs = [_seq(p, range(0, 300, 7), seed=p.seed) for p in batch]
        seqs[where].generator.manual_seed(seed)
        tokens = []
        for x in logits:
            drawn = Sampler()(x[:len(seqs)], sampling_input(seqs, {5}))
            tokens.append(int(drawn[where]))
            for s, t in zip(seqs, drawn.tolist()):
                s.output_ids.append(t)
        return tokens

    alone = run([params], 0)
    for x in logits:  # alone sees row 0's logits; in the batch the row sits at index 40 with the same logits
        x[40] = x[0]
    assert run(rows[:40] + [params] + rows[40:], 40) == alone
    assert run([params], 0) == alone                       # reproducible
    assert run([params], 0, seed=4321) != alone            # and the seed matters


@pytest.mark.parametrize("seeded", [False, True])
def test_draw_frequencies_match_the_filtered_distribution(seeded):
    """Chi-square goodness of fit of 6,000 draws (fixed seeds) against the per-row oracle's filtered distribution."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 40, generator=g) * 1.5
    p = SamplingParams(temperature=0.7, top_k=12, top_p=0.95, min_p=0.01, seed=99 if seeded else None)
    probs = _per_row_filter(x[0] / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
    n = 6000
    if seeded:  # one row, drawn step after step from its own generator
        seq = _seq(p, seed=99)
        draws = torch.stack([Sampler()(x, sampling_input([seq], ()))[0] for _ in range(n)])
    else:  # unseeded rows: one batched draw from the global generator
        torch.manual_seed(5)
        draws = Sampler()(x.expand(n, -1), sampling_input([_seq(p) for _ in range(n)], ()))
    counts = torch.bincount(draws, minlength=40).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0  # nothing outside the filtered support
    expected = n * probs[kept].double()
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    # chi-square critical values at p = 0.001 (dof 1..11); a correct sampler fails this one time in a thousand seeds
    critical = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26][dof - 1]
    assert 1 <= dof <= 11 and chi2 < critical, (chi2, dof)


def test_a_step_hands_back_its_results_in_one_copy():
    """The runner's end of a step (worker/step_output.py): the sampled tokens, the logprobs of the rows that asked,
    the prompt logprobs and the return_logits rows come back through one device-to-host copy, each equal to what it
    is alone; a chunk whose rows predict no prompt token and sample nothing copies nothing."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(7, 300, generator=g) * 3
    params = [SamplingParams(logprobs=3, return_logits=True), SamplingParams(temperature=0.8, seed=11)]
    prompt = PromptRows(chunk=0, first=1, rows=[0, 1, 2, 3], tokens=[5, 6, 7, 8], k=2)
    step = StepInput(True, [], [], [], [], [], [], sampling=sampling_input([_seq(p, seed=p.seed) for p in params], ()),
                     sample_index=[4, 6], prompt_rows=[prompt])
    copies = []
    out = finish_step(logits, step, Sampler(), lambda t: copies.append(t) or t.cpu())
    assert len(copies) == 1
    want = Sampler()(logits[[4, 6]], sampling_input([_seq(p, seed=p.seed) for p in params], ()))
    assert out.tokens == want.tolist()
    assert torch.equal(out.logits[0], logits[4]) and out.logits[1] is None and out.logprobs[1] is None
    lp = torch.log_softmax(logits, -1)
    tok = out.tokens[0]
    assert out.logprobs[0][tok].logprob == pytest.approx(float(lp[4, tok]), abs=1e-6)
    assert out.logprobs[0][tok].rank == int((lp[4] > lp[4, tok]).sum()) + 1
    assert {t for t, e in out.logprobs[0].items() if e.rank <= 3} == set(lp[4].topk(3).indices.tolist())
    assert len(out.prompt_logprobs) == 1 and len(out.prompt_logprobs[0]) == 4
    for j, entry in enumerate(out.prompt_logprobs[0]):
        assert entry[prompt.tokens[j]].logprob == pytest.approx(float(lp[j, prompt.tokens[j]]), abs=1e-6)
        assert {t for t, e in entry.items() if e.rank <= 2} == set(lp[j].topk(2).indices.tolist())
    idle = StepInput(True, [], [], [], [], [], [], sampling=sampling_input([], ()), sample_index=[],
                     prompt_rows=[PromptRows(chunk=0, first=9, rows=[], tokens=[], k=2)])
    assert finish_step(logits[:1], idle, Sampler(), copies.append).prompt_logprobs == [[]] and len(copies) == 1


def test_prompt_logits_are_not_staged_in_pinned_memory(llm, monkeypatch):
    """runner.to_host stages a step's results in pinned memory, which torch's host allocator keeps (locked) once
    used; prompt_logits' [prompt_len, V] fp32 (gigabytes for a long prompt) is a plain copy instead."""
    staged = []
    real = llm.engine.runner.to_host
    monkeypatch.setattr(llm.engine.runner, "to_host", lambda t: staged.append(t.shape) or real(t))
    logits = llm.prompt_logits(PROMPT)
    assert logits.shape[1] == llm.config.text.vocab_size and staged == []


def test_logprobs_are_the_raw_log_softmax(llm):
    out, raw = _greedy_with(llm, logprobs=3)
    lp = torch.log_softmax(raw.double(), -1)
    for t, (tok, entry) in enumerate(zip(out.token_ids, out.outputs[0].logprobs)):
        assert entry[tok].logprob == pytest.approx(float(lp[t, tok]), abs=1e-5)
        assert entry[tok].rank == int((lp[t] > lp[t, tok]).sum()) + 1
        top = lp[t].topk(3)
        assert {k for k, v in entry.items() if v.rank <= 3} == set(top.indices.tolist())
        assert entry[tok].decoded_token == llm.processor.tokenizer.decode([tok], skip_special_tokens=False)
    assert out.outputs[0].cumulative_logprob == pytest.approx(sum(float(lp[t, k]) for t, k in
                                                                  enumerate(out.token_ids)), abs=1e-4)


def test_prompt_logprobs_match_prompt_logits(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=2))[0]
    lp = torch.log_softmax(llm.prompt_logits(PROMPT).double(), -1)
    ids = out.prompt_token_ids
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        entry = out.prompt_logprobs[p]
        assert entry[ids[p]].logprob == pytest.approx(float(lp[p - 1, ids[p]]), abs=1e-4), p
        assert {k for k, v in entry.items() if v.rank <= 2} == set(lp[p - 1].topk(2).indices.tolist())
    again = llm.generate(PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=2))[0]  # no prefix-cache shortcut
    assert [sorted(e) for e in again.prompt_logprobs[1:]] == [sorted(e) for e in out.prompt_logprobs[1:]]


def test_stop_strings_match_a_naive_search_and_are_held_back_while_streaming(llm):
    params = dict(max_tokens=40, ignore_eos=True)
    full = llm.generate(PROMPT, SamplingParams(**params))[0].text
    assert len(full) > 12
    stop = full[len(full) // 2:len(full) // 2 + 3]  # text from the middle: usually spans a token boundary
    expected = full[:full.find(stop)]
    out = llm.generate(PROMPT, SamplingParams(stop=[stop, "\x00never"], **params))[0]
    assert out.text == expected and out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    inc = llm.generate(PROMPT, SamplingParams(stop=stop, include_stop_str_in_output=True, **params))[0]
    assert inc.text == expected + stop
    deltas = list(llm.stream(PROMPT, SamplingParams(stop=[stop], **params)))
    assert "".join(deltas) == expected
    shown = ""
    for d in deltas:  # nothing streamed is ever taken back: every prefix is a prefix of the final text
        shown += d
        assert expected.startswith(shown)


def test_min_tokens_masks_the_stop_tokens(llm):
    first = llm.generate(PROMPT, SamplingParams(max_tokens=1))[0].token_ids[0]
    eos = llm.eos_token_ids
    llm.eos_token_ids = eos | {first}
    try:
        assert llm.generate(PROMPT, SamplingParams(max_tokens=8))[0].token_ids == [first]
        out = llm.generate(PROMPT, SamplingParams(max_tokens=8, min_tokens=5, stop_token_ids=[first]))[0]
        assert len(out.token_ids) >= 5 and first not in out.token_ids[:5]
    finally:
        llm.eos_token_ids = eos


def test_n_samples_are_seeded_each_and_share_the_prompt_blocks(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=3, ignore_eos=True)
    bm = llm.engine.block_manager
    hits0 = bm.prefix_hit_tokens
    a = llm.generate(OTHER + " (n)", params)[0]
    shared = bm.prefix_hit_tokens - hits0
    b = llm.generate(OTHER + " (n)", params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    single = llm.generate(OTHER + " (n)", SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert single.token_ids == a.outputs[0].token_ids  # sample 0 is the n=1 request
    prompt_blocks = (len(a.prompt_token_ids) - 1) // bm.block_size
    assert shared >= 2 * prompt_blocks * bm.block_size  # samples 1 and 2 reused the prompt's full blocks


def test_every_option_is_batch_invariant(llm):
    p = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, seed=3, logprobs=2,
                       repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3, stop=["zz"], n=2)
    alone = llm.generate(PROMPT, p)[0]
    batch = llm.generate([OTHER, PROMPT, OTHER + "!"], [SamplingParams(max_tokens=7), p,
                                                        SamplingParams(max_tokens=12, temperature=1.0, seed=1)])[1]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in batch.outputs]
    assert [[sorted(e) for e in o.logprobs] for o in alone.outputs] == \
           [[sorted(e) for e in o.logprobs] for o in batch.outputs]


@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, "n must"), ({"logprobs": -1}, "logprobs"), ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": "x"}, "prompt_logprobs"), ({"stop": [""]}, "stop"), ({"stop": 3}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"min_p": 1.5}, "min_p"), ({"seed": -1}, "seed")])
def test_bad_values_raise_typed_errors(kwargs, match):
    with pytest.raises(SamplingParamsError, match=match):
        SamplingParams(**kwargs)


# ------------------------------------------------------------------------------------------- output_kind
def _step_all(engine):
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


@pytest.fixture(scope="module")
def kind_engine():
    from internvl_engine.engine.llm_engine import LLMEngine
    return LLMEngine("random:tiny", device="cpu", dtype="float32")


def test_output_kinds_agree_and_final_only_emits_once(kind_engine):
    """The same three requests (n=2, logprobs, a stop string) as cumulative, delta and final_only: the deltas add up
    to the cumulative result, and final_only yields exactly one output per request, the finished one."""
    results = {}
    for kind in ("cumulative", "delta", "final_only"):
        params = SamplingParams(max_tokens=9, temperature=0.8, seed=3, n=2, logprobs=2, stop=["e"],
                                output_kind=kind)
        for i in range(3):
            kind_engine.add_request(f"{kind}-{i}", f"Tell me story number {i}", params)
        results[kind] = _step_all(kind_engine)
    final = {o.request_id.split("-", 1)[1]: o for o in results["cumulative"] if o.finished}
    once = results["final_only"]
    assert len(once) == 3 and all(o.finished for o in once)
    for o in once:
        ref = final[o.request_id.split("-", 1)[1]]
        assert [(c.text, c.token_ids, c.finish_reason) for c in o.outputs] == \
            [(c.text, c.token_ids, c.finish_reason) for c in ref.outputs]
    for i in range(3):
        deltas = [o for o in results["delta"] if o.request_id == f"delta-{i}"]
        ref = final[str(i)]
        assert len(deltas) > 1 and deltas[-1].finished and not any(o.finished for o in deltas[:-1])
        for j, c in enumerate(ref.outputs):
            parts = [o.outputs[j] for o in deltas]
            assert "".join(p.text for p in parts) == c.text
            assert [t for p in parts for t in p.token_ids] == c.token_ids
            assert [lp for p in parts for lp in p.logprobs] == c.logprobs
            assert parts[-1].cumulative_logprob == c.cumulative_logprob


def test_output_kind_is_validated():
    from internvl_engine.errors import InternVLEngineError
    with pytest.raises(InternVLEngineError, match="output_kind"):
        SamplingParams(output_kind="streaming").validate()
