"""From sampled tokens to what callers see: incremental detokenisation, stop strings (matched across token
boundaries, and held back from streamed text while they could still be starting), logprobs with their decoded
tokens, and the RequestOutput snapshot of a request and all its samples."""
from __future__ import annotations

import torch

from ..outputs import CompletionOutput, RequestMetrics, RequestOutput
from ..sampling import Logprob
from .sequence import Sequence


def find_stop(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """(index, stop) of the earliest stop string in `text` that ends at or after `new_from` (text before it was
    searched already), or None."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, new_from - len(stop) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    return best


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string: not streamed yet."""
    for k in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


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
        before = len(s.text)
        s.text += delta
        if len(s.output_ids) >= p.min_tokens:
            hit = find_stop(s.text, before, p.stop)
            if hit is not None:
                i, stop = hit
                s.text = s.text[:i + len(stop)] if p.include_stop_str_in_output else s.text[:i]
                s.finish_reason, s.stop_reason = "stop", stop
        self.release(s)

    @staticmethod
    def release(s: Sequence) -> None:
        """Advance what callers may see: all of a finished text, else all but what could start a stop string."""
        end = len(s.text)
        if not s.finished and s.params.stop:
            end -= held_back(s.text, s.params.stop)
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
