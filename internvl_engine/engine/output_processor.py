"""From sampled tokens to what callers see: incremental detokenisation, stop strings (matched across token
boundaries, and held back from streamed text while they could still be starting), logprobs with their decoded
tokens, and the RequestOutput snapshot of a request and all its samples."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from ..outputs import CompletionOutput, RequestOutput
from ..processor.tokenizer import IncrementalDetokenizer
from ..sampling import Logprob
from .request_stats import RequestStats, request_finish_reason
from .sequence import Sequence


@functools.lru_cache(maxsize=1024)  # requests of one deployment tend to share their stop strings
def _borders(stop: str) -> tuple[int, ...]:
    """Knuth-Morris-Pratt failure function: b[i] = length of the longest proper prefix of stop[:i + 1] that is
    also its suffix."""
    b, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = b[k - 1]
        if stop[i] == stop[k]:
            k += 1
        b[i] = k
    return tuple(b)


class StopMatcher:
    """A sequence's stop strings, matched as its text grows. Per stop string it keeps the length of the longest
    prefix of it that ends the text so far (Knuth-Morris-Pratt), advanced by each new character, so a token costs
    O(stop strings x its characters) however long the text is, and the text to hold back from streaming (it could
    still start a stop string) is the largest of those lengths."""

    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.borders = [_borders(stop) for stop in self.stops]
        self.state = [0] * len(self.stops)

    def feed(self, delta: str, match: bool = True) -> tuple[int, str] | None:
        """Advance over `delta`, the text's newest characters. With match, (offset from the start of delta, which
        may be negative, of the earliest-starting stop string that ends inside delta, the stop string), or None."""
        best = None
        for i, stop in enumerate(self.stops):
            k, b, n = self.state[i], self.borders[i], len(stop)
            if k == 0 and stop[0] not in delta:  # nothing of it begins here: the usual case, at C speed
                continue
            for j, ch in enumerate(delta):
                while k and stop[k] != ch:
                    k = b[k - 1]
                if stop[k] == ch:
                    k += 1
                    if k == n:
                        start = j + 1 - n
                        if match:  # the first match of this stop string is its earliest
                            if best is None or start < best[0]:
                                best = (start, stop)
                            break
                        k = b[k - 1]
            self.state[i] = k
        return best

    def held(self) -> int:
        return max(self.state)


@dataclass(eq=False, slots=True)
class OutputState:
    """What callers have seen of one sample (Sequence.out): its text and how much of it was released, its stop
    strings' progress, its logprobs, and for "delta" outputs how much was handed out. The output processor alone
    reads and writes it (the engine sets `sink` when the request is added)."""
    detokenizer: IncrementalDetokenizer
    kind: str = "cumulative"    # SamplingParams.output_kind, or what the front end reads (LLM: final_only, delta)
    text: str = ""
    sent: int = 0               # characters of text released to callers (the rest may start a stop string)
    delta: str = ""             # text released by the current step
    stop_reason: str | None = None
    stop_matcher: StopMatcher | None = None  # over params.stop, made at the first token
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_copy: list | None = None  # the prompt ids every snapshot of the request shares
    prompt_logprobs: list | None = None  # [None, {token id: Logprob}, ...] (the request's first sample only)
    step_logits: list = field(default_factory=list)  # raw fp32 [V] per generated token, with return_logits
    sink: object = None         # the request's outputs go here, not to step()'s caller (LLMEngine.add_sequence)
    ids_sent: int = 0           # "delta": output ids (and logprobs) already handed out
    text_sent: int = 0          # "delta": characters of text already handed out
    last_token_time: float = 0.0  # perf_counter at this sample's newest token (its next token's gap starts here)
    ended: bool = False         # the request's closing metrics are recorded (on its first sample's state)


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.stats = RequestStats(max_model_len)  # what /metrics reports of requests (request_stats.py)

    def token_added(self, s: Sequence, logprobs: dict[int, Logprob] | None = None,
                    logits: torch.Tensor | None = None) -> None:
        """Record s's newest token (its logprobs, its logits with return_logits, the request's time to first token),
        detokenise it and apply the stop strings (which may finish s with "stop")."""
        p, o = s.params, s.out
        if logits is not None:
            o.step_logits.append(logits)
        now, stats = time.perf_counter(), self.stats
        stats.generation_tokens += 1
        if o.last_token_time:
            stats.inter_token_latency_seconds.observe(now - o.last_token_time)
        elif s.index == 0:
            s.metrics.ttft_s = now - s.metrics.arrival_time
            stats.first_token(s.metrics, len(s.prompt_ids))
        o.last_token_time = now
        if logprobs is not None:
            for t, lp in logprobs.items():
                lp.decoded_token = self.tokenizer.decode([t], skip_special_tokens=False)
            o.logprobs.append(logprobs)
            o.cumulative_logprob += logprobs[s.output_ids[-1]].logprob
        delta = o.detokenizer.add(s.output_ids[-1:])
        if s.finished:
            delta += o.detokenizer.flush()
        if not p.stop:  # the common case, on every token of every sequence: no search, nothing held back
            o.text += delta
            o.delta, o.sent = delta, len(o.text)
            return
        if o.stop_matcher is None:
            o.stop_matcher = StopMatcher(p.stop)
        before = len(o.text)
        o.text += delta
        hit = o.stop_matcher.feed(delta, match=len(s.output_ids) >= p.min_tokens)
        if hit is not None:
            i, stop = before + hit[0], hit[1]
            o.text = o.text[:i + len(stop)] if p.include_stop_str_in_output else o.text[:i]
            s.finish_reason, o.stop_reason = "stop", stop
        self.release(s)

    def prompt_logprobs(self, chunks, prompt_rows, entries) -> None:
        """Record each prompt position once: a recomputed chunk's rows for positions recorded already are dropped."""
        for rows, got in zip(prompt_rows, entries):
            o = chunks[rows.chunk][0].out
            if o.prompt_logprobs is None:
                o.prompt_logprobs = [None]
            for entry in got[max(0, len(o.prompt_logprobs) - rows.first):]:
                for t, lp in entry.items():
                    lp.decoded_token = self.tokenizer.decode([t], skip_special_tokens=False)
                o.prompt_logprobs.append(entry)

    def aborted(self, s: Sequence) -> None:
        """An unfinished sample was aborted: the text held in the detokenizer and behind stop strings goes out."""
        s.out.text += s.out.detokenizer.flush()
        self.release(s)

    def request_done(self, head: Sequence) -> None:
        """The request whose first sample is `head` has ended: its closing metrics, recorded once (samples of a
        request that end in the same step each report the end)."""
        m, o = head.metrics, head.out
        if o.ended:
            return
        o.ended = True
        m.tpot_s = m.decode_s / max(1, len(head.output_ids) - 1)
        m.e2e_s = time.perf_counter() - m.arrival_time
        samples = head.group or [head]
        last = max(x.out.last_token_time for x in samples)
        if last:
            m.last_token_s = last - m.arrival_time
        self.stats.finished_request(request_finish_reason(samples), m, head.params.n, head.params.max_tokens,
                                    sum(len(x.output_ids) for x in samples),
                                    max(len(x.output_ids) for x in samples), head.first_scheduled is not None,
                                    head.out.last_token_time > 0)

    @staticmethod
    def release(s: Sequence) -> None:
        """Advance what callers may see: all of a finished text, else all but what could start a stop string."""
        o = s.out
        end = len(o.text)
        if not s.finished and o.stop_matcher is not None:
            end -= o.stop_matcher.held()
        o.delta = o.text[o.sent:end] if end > o.sent else ""
        o.sent = max(o.sent, end)

    @staticmethod
    def completion(s: Sequence) -> CompletionOutput:
        o = s.out
        if o.kind == "delta":  # what is new since this sample's previous output: O(1) a step, not O(length)
            start, o.ids_sent = o.ids_sent, len(s.output_ids)
            text, o.text_sent = o.text[o.text_sent:o.sent], o.sent
            return CompletionOutput(s.index, text, s.output_ids[start:], s.finish_reason, o.delta,
                                    o.logprobs[start:] if s.params.logprobs is not None else None,
                                    o.cumulative_logprob, o.stop_reason, s.error)
        return CompletionOutput(s.index, o.text[:o.sent], list(s.output_ids), s.finish_reason, o.delta,
                                list(o.logprobs) if s.params.logprobs is not None else None,
                                o.cumulative_logprob, o.stop_reason, s.error)

    def outputs(self, touched: list[Sequence]) -> list[RequestOutput]:
        """One snapshot per request a step touched (a request's samples share one; "final_only" requests only when
        they end), handed to the request's sink if it has one, else returned; then their step deltas are spent."""
        outputs, output = [], self.output
        heads = {id(h): h for h in [s.head if s.group else s for s in touched]}.values()  # once per request
        for h in heads:
            o = h.out
            if o.kind != "final_only" or h.request_finished:
                (outputs.append if o.sink is None else o.sink)(output(h))
            if h.group:  # a sample's delta belongs to the step that made it
                for s in h.group:
                    s.out.delta = ""
            else:
                o.delta = ""
        return outputs

    def output(self, head: Sequence) -> RequestOutput:
        """The snapshot of the request whose first sample is `head` (all its samples; flat fields mirror the
        first sample). Its snapshots share one copy of the prompt ids, made once: copying a multi-tile prompt (3k+
        ids) for every request on every step cost more than the rest of the snapshot; a caller that edits it
        changes only what it was handed, never the engine's own list."""
        m, o = head.metrics, head.out
        if o.prompt_copy is None:
            o.prompt_copy = list(head.prompt_ids)
        if not head.group:  # n = 1, the hot path
            first = self.completion(head)
            m.generated_tokens = len(head.output_ids)
            logits = torch.stack(o.step_logits) if o.step_logits and head.finish_reason else None
            return RequestOutput(head.request_id, first.text, first.token_ids, o.prompt_copy,
                                 first.finish_reason, m.copy(), logits, first.delta,
                                 head.error, [first], o.prompt_logprobs)
        samples = head.group
        finished = all(x.finished for x in samples)
        m.generated_tokens = sum(len(x.output_ids) for x in samples)
        outs = [self.completion(x) for x in samples]
        logits = torch.stack(o.step_logits) if o.step_logits and finished else None
        first = outs[0]
        error = next((x.error for x in samples if x.error is not None), None)
        return RequestOutput(head.request_id, first.text, first.token_ids, o.prompt_copy,
                             first.finish_reason if finished else None, m.copy(), logits,
                             first.delta, error, outs, o.prompt_logprobs)
