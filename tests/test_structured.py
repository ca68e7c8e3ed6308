"""Structured outputs and logit_bias in the engine (SamplingParams.structured_outputs, internvl_engine/structured/):
the bitmask Sampler against a plain-PyTorch reference (masked logits, then the same sampling), the bit unpacking
against a per-token loop, and on a random-weight model at temperature 1 (only a constrained decoder writes valid
JSON there): nested schemas valid for several seeds, choice / regex / grammar obeyed, n > 1 samples, a preempted
sequence, a failed step's rerun in halves, an unconstrained neighbour's tokens unchanged, a complete grammar ending
with "stop", compact JSON, typed errors for a constraint that does not compile. logit_bias: +100 forces a token,
-100 bans one, and equals the raw logits plus the bias. CPU, random:tiny."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from internvl_engine import LLM, SamplingParams  # noqa: E402
from internvl_engine.engine.step_builder import sampling_input  # noqa: E402
from internvl_engine.errors import SamplingParamsError, StructuredOutputError  # noqa: E402
from internvl_engine.sampling import Sampler, StructuredOutputsParams as SO, allow_only  # noqa: E402

SEEDS = (1, 2, 3)
ASK = "Describe a person as JSON."
# every string bounded (a pattern or maxLength), arrays bounded: a random model closes what it opens
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           "floor": {"type": "integer", "minimum": -2, "maximum": 40},
                           "city": {"type": "string", "maxLength": 6}},
            "required": ["zip", "floor", "city"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm():
    return LLM("random:tiny", device="cpu", kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def reference(llm):
    """The nested schema's outputs for SEEDS, each request alone in the engine's batch."""
    return [llm.generate(ASK, _sampled(SO(json=SCHEMA), seed=s))[0].outputs[0] for s in SEEDS]


def _sampled(params, max_tokens=80, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, structured_outputs=params, **kw)


def _valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


# ------------------------------------------------------------------------------------------------ the sampler
class _Grammar:
    """SamplingInput.allowed as structured.StepGrammar presents it, over fixed masks: rows `late` are checked after
    the draw (a CPU's rejection path), the others masked up front."""

    def __init__(self, rows, words, allowed, late=()):
        self.at = {r: j for j, r in enumerate(rows)}
        self.words, self.allowed, self.late = words, allowed, [r for r in rows if r in late]
        self.early = [r for r in rows if r not in late]
        self.deferred = bool(self.late)

    def upfront(self):
        return self.masks(self.early) if self.early else None

    def refused(self, tokens):
        return [r for r in self.late if not self.allowed[self.at[r], tokens[r]]]

    def masks(self, rows):
        return rows, self.words[[self.at[r] for r in rows]]


def _seq(params, seed=None):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return SimpleNamespace(params=params, prompt_ids=[1, 2], output_ids=[], generator=gen,
                           plain=not (params.penalized or params.logit_bias))


def _random_mask(g, rows: int, vocab: int) -> torch.Tensor:
    """int32 words with random bits (about 1 token in 8 allowed); at least one token per row."""
    allowed = torch.rand(rows, vocab, generator=g) < 0.125
    allowed[:, 0] = True
    return _pack(allowed)


def _pack(allowed: torch.Tensor):
    """(int32 words, allowed): bit t of a row's words is token t (llguidance's layout)."""
    rows, vocab = allowed.shape
    padded = torch.zeros(rows, -(-vocab // 32) * 32, dtype=torch.bool)
    padded[:, :vocab] = allowed
    weights = (1 << torch.arange(32, dtype=torch.int64))
    words = (padded.view(rows, -1, 32).long() * weights).sum(-1)
    return words.to(torch.int64).where(words < 2**31, words - 2**32).to(torch.int32), allowed


def test_unpacking_matches_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    words, _ = _random_mask(g, 3, vocab)
    logits = torch.randn(5, vocab + 9, generator=g)  # wider than the mask: the tokens past it are never allowed
    out = allow_only(logits.clone(), [0, 2, 4], words)
    for j, row in enumerate([0, 2, 4]):
        for t in range(vocab + 9):
            ok = t < words.shape[1] * 32 and (int(words[j, t // 32]) >> (t % 32)) & 1
            assert out[row, t] == (logits[row, t] if ok else float("-inf")), (row, t)
    assert torch.equal(out[[1, 3]], logits[[1, 3]])
    # the device path (shifts instead of numpy's unpacking) reads the same bits
    from internvl_engine.sampling import banned_by_shifts
    unpacked = torch.tensor([[(int(w) >> j) & 1 == 0 for w in row for j in range(32)] for row in words.tolist()])
    assert torch.equal(banned_by_shifts(words), unpacked)


def test_the_bitmask_sampler_equals_masked_logits_sampled_plainly():
    """Reference: the disallowed logits set to -inf by hand, then the same Sampler with no mask. Greedy, seeded and
    penalised rows alike; logit_bias rows too (the bias added before the mask)."""
    g = torch.Generator().manual_seed(1)
    vocab, batch = 3000, 12
    logits = torch.randn(batch, vocab, generator=g) * 3
    constrained = [0, 2, 3, 5, 8, 11]
    words, allowed = _random_mask(g, len(constrained), vocab)
    params = [SamplingParams(temperature=[0.0, 0.7, 1.0][i % 3], top_k=[0, 50][i % 2], top_p=[1.0, 0.9][i % 4 // 2],
                             seed=100 + i, repetition_penalty=1.3 if i % 5 == 0 else 1.0,
                             logit_bias={7: 5.0, 9: -3.0} if i % 4 == 1 else None) for i in range(batch)]
    rows = sampling_input([_seq(p, p.seed) for p in params], ())
    rows.allowed = _Grammar(constrained, words, allowed)
    got = Sampler()(logits, rows)
    ref = logits.clone()
    for i, p in enumerate(params):
        for t, b in (p.logit_bias or {}).items():
            ref[i, t] += b
    for j, i in enumerate(constrained):
        ref[i, ~allowed[j]] = float("-inf")
    ref_rows = sampling_input([_seq(dataclass_without_bias(p), p.seed) for p in params], ())
    want = Sampler()(ref, ref_rows)
    assert torch.equal(got, want)
    for j, i in enumerate(constrained):
        assert allowed[j, int(got[i])]


def test_rejection_draws_the_masked_distribution():
    """Rows checked after the draw (the CPU path): greedy rows give the masked argmax, every token is allowed, and
    the draws' frequencies fit the masked, tempered softmax (chi-square, fixed seeds), seeded and unseeded rows."""
    g = torch.Generator().manual_seed(2)
    vocab, n = 24, 4000
    x = torch.randn(1, vocab, generator=g) * 2
    words, allowed = _random_mask(g, 1, vocab)
    allowed[0, :] = False
    allowed[0, [1, 4, 5, 9, 17, 20]] = True  # a few allowed tokens, the likeliest among them not the argmax
    words, _ = _pack(allowed)
    masked = x.masked_fill(~allowed, float("-inf"))
    greedy = sampling_input([_seq(SamplingParams())], ())
    greedy.allowed = _Grammar([0], words, allowed, late=[0])
    assert int(Sampler()(x, greedy)[0]) == int(masked.argmax())
    probs = (masked[0] / 0.8).softmax(-1).double()
    for seeded in (False, True):
        torch.manual_seed(7)
        seqs = [_seq(SamplingParams(temperature=0.8, seed=i if seeded else None), i if seeded else None)
                for i in range(n)]
        rows = sampling_input(seqs, ())
        rows.allowed = _Grammar(list(range(n)), words.expand(n, -1), allowed.expand(n, -1), late=range(n))
        draws = Sampler()(x.expand(n, -1), rows)
        counts = torch.bincount(draws, minlength=vocab).double()
        assert counts[~allowed[0]].sum() == 0
        keep = allowed[0]
        chi2 = float(((counts[keep] - n * probs[keep]) ** 2 / (n * probs[keep])).sum())
        assert chi2 < 20.52, chi2  # chi-square critical value, 5 degrees of freedom, p = 0.001


def dataclass_without_bias(p: SamplingParams) -> SamplingParams:
    import dataclasses
    return dataclasses.replace(p, logit_bias=None)


# ------------------------------------------------------------------------------------------------ the engine
def test_json_schema_is_valid_for_every_seed_and_compact(llm, reference):
    for out in reference:
        assert out.finish_reason == "stop"
        _valid(out.text)
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', out.text)
        assert not re.search(r"\s", outside_strings), out.text  # compact JSON
    assert len({out.text for out in reference}) > 1  # the seeds matter: the mask constrains, it does not pick
    batched = llm.generate([ASK] * len(SEEDS), [_sampled(SO(json=SCHEMA), seed=s) for s in SEEDS])
    assert [o.outputs[0].text for o in batched] == [out.text for out in reference]  # batch-invariant


def test_unconstrained_neighbour_is_unchanged_and_n_samples_each_obey(llm):
    plain = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = llm.generate("Tell me a story.", plain)[0].outputs[0].token_ids
    outs = llm.generate(["Tell me a story.", "JSON please"],
                        [plain, _sampled(SO(json=SCHEMA), seed=5, n=2)])
    assert outs[0].outputs[0].token_ids == alone
    assert len(outs[1].outputs) == 2
    for c in outs[1].outputs:
        _valid(c.text)


def test_masking_first_and_checking_after_agree(llm, reference):
    """The GPU's way (every mask filled on the worker thread beside the forward, applied before the draw) on this
    CPU: greedy tokens equal the CPU's way (draw, then check), sampled outputs are as valid."""
    structured = llm.engine.inputs.structured
    greedy = [SamplingParams(max_tokens=80, structured_outputs=SO(json=SCHEMA)),
              SamplingParams(max_tokens=80, structured_outputs=SO(regex="[a-z]{3,9}-[0-9]{2}"))]
    after = [o.outputs[0].text for o in llm.generate([ASK] * 2, greedy)]
    structured.defer = False
    try:
        first = [o.outputs[0].text for o in llm.generate([ASK] * 2, greedy)]
        sampled = llm.generate([ASK] * len(SEEDS), [_sampled(SO(json=SCHEMA), seed=s) for s in SEEDS])
    finally:
        structured.defer = True
    assert first == after
    _valid(after[0])
    assert re.fullmatch("[a-z]{3,9}-[0-9]{2}", after[1])
    for o in sampled:
        _valid(o.outputs[0].text)


def test_choice_regex_and_grammar_are_obeyed(llm):
    choices = ["red", "green", "blue", "dark purple"]
    lark = 'start: "(" NUM ("+" NUM){1,3} ")"\nNUM: /[1-9][0-9]?/'
    cases = [(SO(choice=choices), lambda t: t in choices),
             (SO(regex=r"[A-Z]{2}-[0-9]{3}"), lambda t: re.fullmatch(r"[A-Z]{2}-[0-9]{3}", t)),
             (SO(grammar=lark), lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?){1,3}\)", t))]
    for spec, ok in cases:
        outs = llm.generate(["Answer."] * 3, [_sampled(spec, seed=s) for s in SEEDS[:3]])
        for o in outs:
            assert o.outputs[0].finish_reason == "stop" and ok(o.outputs[0].text), (spec, o.outputs[0].text)


def test_a_complete_grammar_ends_with_stop_even_on_the_last_token(llm):
    digits = len(llm.engine.tokenizer.encode("123"))  # the regex admits exactly this many tokens at most
    out = llm.generate("x", _sampled(SO(regex="[0-9]{3}"), max_tokens=3, seed=1))[0].outputs[0]
    assert re.fullmatch("[0-9]{3}", out.text) and out.finish_reason == "stop" and len(out.token_ids) <= 3 >= digits


def test_a_preempted_sequence_keeps_its_matcher(reference):
    tight = LLM("random:tiny", device="cpu", kv_cache_tokens=112, enable_prefix_caching=False)
    outs = tight.generate([ASK] * len(SEEDS), [_sampled(SO(json=SCHEMA), seed=s) for s in SEEDS])
    # one request fits alone (prompt + 80 tokens); three cannot grow together
    assert tight.engine.stats().num_preemptions > 0
    assert [o.outputs[0].text for o in outs] == [out.text for out in reference]


def test_a_failed_step_does_not_advance_the_grammars(llm, reference):
    """A request that fails in decode makes the step rerun in halves; the others' matchers take each token once."""
    eng = llm.engine
    for i, s in enumerate(SEEDS):
        eng.add_request(f"f{i}", ASK, _sampled(SO(json=SCHEMA), seed=s))
    eng.add_request("doomed", "x", SamplingParams(max_tokens=30, ignore_eos=True))
    eng.inject_fault("doomed", "decode")
    final = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            final[o.request_id] = o
    assert final["doomed"].outputs[0].finish_reason == "error"
    assert [final[f"f{i}"].outputs[0].text for i in range(len(SEEDS))] == [out.text for out in reference]


def test_an_aborted_request_leaves_its_neighbour_and_no_matcher(llm, reference):
    import gc
    eng = llm.engine
    eng.add_request("kept", ASK, _sampled(SO(json=SCHEMA), seed=SEEDS[0]))
    eng.add_request("dropped", ASK, _sampled(SO(json=SCHEMA), seed=SEEDS[1]))
    final = {}
    for _ in range(4):
        final.update((o.request_id, o) for o in eng.step())
    assert eng.abort("dropped")
    while eng.has_unfinished_requests():
        final.update((o.request_id, o) for o in eng.step())
    assert final["kept"].outputs[0].text == reference[0].text and final["dropped"].outputs[0].finish_reason == "abort"
    final.clear()
    gc.collect()
    assert len(eng.inputs.structured._matchers) == 0


def test_whitespace_pattern_allows_bounded_whitespace(llm):
    spec = SO(json={"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"],
                    "additionalProperties": False}, whitespace_pattern="[ ]{0,2}")
    for s in SEEDS[:2]:
        text = llm.generate("x", _sampled(spec, seed=s))[0].outputs[0].text
        assert json.loads(text)["a"] in (1, 2) and re.fullmatch(r'\{ {0,2}"a" {0,2}: {0,2}[12] {0,2}\}', text), text


@pytest.mark.parametrize("spec,what", [(SO(regex="[a-"), "regex"), (SO(json={"type": "objec"}), "json"),
                                       (SO(json="{not json"), "json"), (SO(grammar="start: x y"), "grammar"),
                                       (SO(json={"type": "string", "format": "no-such-format"}), "json"),
                                       (SO(json={"type": "string", "format": "no-such-format",
                                                 "x-guidance": {"lenient": True}}), "json")])
def test_a_constraint_that_does_not_compile_is_a_typed_error(llm, spec, what):
    with pytest.raises(StructuredOutputError, match=f"structured_outputs.{what}"):
        llm.generate("x", _sampled(spec))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("bad", [dict(structured_outputs=SO()), dict(structured_outputs=SO(regex="a", choice=["b"])),
                                 dict(structured_outputs=SO(choice=[])), dict(structured_outputs={"json": {}}),
                                 dict(structured_outputs=SO(regex="a", whitespace_pattern=" ")),
                                 dict(logit_bias={1: 100.5}), dict(logit_bias={"1": 1.0}), dict(logit_bias=[1])])
def test_malformed_constraints_are_sampling_params_errors(bad):
    with pytest.raises(SamplingParamsError):
        SamplingParams(**bad)


# ------------------------------------------------------------------------------------------------ logit_bias
def test_logit_bias_forces_bans_and_adds(llm):
    forced = llm.engine.tokenizer.encode(" lighthouse")[0]
    out = llm.generate("x", SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True,
                                           logit_bias={forced: 100}))[0].outputs[0]
    assert out.token_ids == [forced] * 6
    greedy = llm.generate("Say something.", SamplingParams(max_tokens=4, return_logits=True, ignore_eos=True))[0]
    banned = greedy.outputs[0].token_ids[0]
    bias = {banned: -100, 17: 3.5, 2000: 7.25}
    out = llm.generate("Say something.", SamplingParams(max_tokens=4, return_logits=True, ignore_eos=True,
                                                        logit_bias=bias))[0]
    assert out.outputs[0].token_ids[0] != banned
    for t, tok in enumerate(out.outputs[0].token_ids):  # greedy over raw logits + bias; logits stay raw
        ref = out.logits[t].clone()
        for k, b in bias.items():
            ref[k] += b
        assert tok == int(ref.argmax())
    with pytest.raises(SamplingParamsError, match="outside the model's vocabulary"):
        llm.generate("x", SamplingParams(logit_bias={llm.config.text.vocab_size: 1.0}))


class _Seq:  # what StructuredOutputs reads of a sequence (weakly referenced: a plain class, not a namespace)
    def __init__(self, params):
        self.params, self.output_ids, self.finish_reason = params, [], None


def test_a_refused_greedy_row_takes_its_best_allowed_runner_up(llm):
    """The CPU's shortcut for a greedy row whose argmax the grammar refused: its runner-ups in argmax's order, asked
    of the grammar, give the masked row's argmax whenever one of the first GREEDY_TRIES is allowed (checked against
    the mask itself); rows it leaves out go to the mask. Both kinds occur here, so neither side is vacuous."""
    from internvl_engine.sampling import allow_only
    structured = llm.engine.inputs.structured
    g = torch.Generator().manual_seed(3)
    specs = [SO(regex="[a-z]{3,9}-[0-9]{2}"), SO(json=SCHEMA)]
    seqs = [_Seq(SamplingParams(max_tokens=8, structured_outputs=specs[i % 2])) for i in range(24)]
    step = structured.masks(seqs)  # a StepGrammar, every row deferred (a CPU)
    logits = torch.randn(len(seqs), structured.vocab_size, generator=g)
    found = step.next_allowed(logits, list(range(len(seqs))))
    rows, bitmask = step.masks(list(range(len(seqs))))
    want = allow_only(logits.clone(), rows, bitmask).argmax(-1)
    assert found and len(found) < len(seqs)
    for i, t in found.items():
        assert t == int(want[i])
