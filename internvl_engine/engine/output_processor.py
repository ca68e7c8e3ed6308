"""From sampled tokens to what callers see: incremental detokenisation, stop strings (matched across token
boundaries, and held back from streamed text while they could still be starting), logprobs with their decoded
tokens, and the RequestOutput snapshot of a request and all its samples."""
from __future__ import annotations

import functools

import torch

from ..outputs import CompletionOutput, RequestMetrics, RequestOutput
from ..sampling import Logprob
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


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token_added(self, s: Sequence, logprobs: dict[int, Logprob] | None = None) -> None:
        """Detokenise s's newest token and apply its stop strings (which may finish it with "stop")."""
        p = s.params
        if logprobs is not None:
            for t, lp in logprobs.items():
                lp.decoded_token = self.tokenizer.decode([t], skip_special_tokens=False)
            s.logprobs.append(logprobs)
            s.cumulative_logprob += logprobs[s.output_ids[-1]].logprob
        delta = s.detokenizer.add(s.output_ids[-1:])
        if s.finished:
            delta += s.detokenizer.flush()
        if not p.stop:  # the common case, on every token of every sequence: no search, nothing held back
            s.text += delta
            s.delta, s.sent = delta, len(s.text)
            return
        if s.stop_matcher is None:
            s.stop_matcher = StopMatcher(p.stop)
        before = len(s.text)
        s.text += delta
        hit = s.stop_matcher.feed(delta, match=len(s.output_ids) >= p.min_tokens)
        if hit is not None:
            i, stop = before + hit[0], hit[1]
            s.text = s.text[:i + len(stop)] if p.include_stop_str_in_output else s.text[:i]
            s.finish_reason, s.stop_reason = "stop", stop
        self.release(s)

    @staticmethod
    def release(s: Sequence) -> None:
        """Advance what callers may see: all of a finished text, else all but what could start a stop string."""
        end = len(s.text)
        if not s.finished and s.stop_matcher is not None:
            end -= s.stop_matcher.held()
        s.delta = s.text[s.sent:end] if end > s.sent else ""
        s.sent = max(s.sent, end)

    @staticmethod
    def completion(s: Sequence) -> CompletionOutput:
        if s.output_kind == "delta":  # what is new since this sample's previous output: O(1) a step, not O(length)
            start, s.ids_sent = s.ids_sent, len(s.output_ids)
            text, s.text_sent = s.text[s.text_sent:s.sent], s.sent
            return CompletionOutput(s.index, text, s.output_ids[start:], s.finish_reason, s.delta,
                                    s.logprobs[start:] if s.params.logprobs is not None else None,
                                    s.cumulative_logprob, s.stop_reason, s.error)
        return CompletionOutput(s.index, s.text[:s.sent], list(s.output_ids), s.finish_reason, s.delta,
                                list(s.logprobs) if s.params.logprobs is not None else None,
                                s.cumulative_logprob, s.stop_reason, s.error)

    def output(self, head: Sequence) -> RequestOutput:
        """The snapshot of the request whose first sample is `head` (all its samples; flat fields mirror the
        first sample). Its snapshots share one copy of the prompt ids, made once: copying a multi-tile prompt (3k+
        ids) for every request on every step cost more than the rest of the snapshot; a caller that edits it
        changes only what it was handed, never the engine's own list."""
        m = head.metrics
        if head.prompt_copy is None:
            head.prompt_copy = list(head.prompt_ids)
        if not head.group:  # n = 1, the hot path
            first = self.completion(head)
            m.generated_tokens = len(head.output_ids)
            logits = torch.stack(head.step_logits) if head.step_logits and head.finish_reason else None
            return RequestOutput(head.request_id, first.text, first.token_ids, head.prompt_copy,
                                 first.finish_reason, RequestMetrics(**m.as_dict()), logits, first.delta,
                                 head.error, [first], head.prompt_logprobs)
        samples = head.group
        finished = all(x.finished for x in samples)
        m.generated_tokens = sum(len(x.output_ids) for x in samples)
        outs = [self.completion(x) for x in samples]
        logits = torch.stack(head.step_logits) if head.step_logits and finished else None
        first = outs[0]
        error = next((x.error for x in samples if x.error is not None), None)
        return RequestOutput(head.request_id, first.text, first.token_ids, head.prompt_copy,
                             first.finish_reason if finished else None, RequestMetrics(**m.as_dict()), logits,
                             first.delta, error, outs, head.prompt_logprobs)
