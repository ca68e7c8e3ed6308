"""Completions' `echo`: each choice's text starts with its prompt, and with `logprobs` its logprobs cover the prompt's
tokens (the first has no logprob: null, as its top_logprobs) before the generated ones, in the legacy completions
shape lm-evaluation-harness reads for loglikelihood (token_logprobs[ctxlen:-1], top_logprobs[ctxlen:-1]: it sends
`echo: true, logprobs: 1, max_tokens: 1`, and vLLM also accepts `max_tokens: 0`). The prompt's logprobs are the
engine's (SamplingParams.prompt_logprobs, computed from the prefill's logits, the prefix cache bypassed).

`max_tokens: 0` with echo (vLLM's echo without generation): the engine runs one token, which no part of the
response shows (text, logprobs, token ids, usage); the choice finishes with "length"."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Echo:
    texts: list[str]  # per prompt of the request: the text its choices begin with
    generate_nothing: bool = False  # max_tokens 0: the one token the engine ran is hidden


def hide_generation(out):
    """The RequestOutput as if it had generated nothing: every sample's text, tokens and logprobs empty, and a
    finished sample's finish_reason "length" (max_tokens 0 was reached), unless it was aborted or failed."""
    def empty(c):
        finish = c.finish_reason if c.finish_reason in (None, "abort", "error") else "length"
        return dataclasses.replace(c, text="", delta="", token_ids=[], cumulative_logprob=0.0, stop_reason=None,
                                   logprobs=None if c.logprobs is None else [], finish_reason=finish)
    samples = [empty(c) for c in out.outputs]
    return dataclasses.replace(out, outputs=samples, text="", token_ids=[], delta="",
                               finish_reason=samples[0].finish_reason if samples else out.finish_reason)


def prompt_logprobs(prompt_ids, entries, k: int, decode, shape) -> dict:
    """The prompt's part of a choice's completions logprobs: shape (protocol.completion_logprobs: token ids, their
    entries, k, decode, first text offset) on every prompt token after the first, whose logprob and top_logprobs
    are null (nothing precedes it)."""
    if not prompt_ids:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    head = decode(prompt_ids[0])
    rest = shape(prompt_ids[1:], entries[1:], k, decode, len(head))
    return {"tokens": [head] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


def end_offset(prompt: dict) -> int:
    """The text_offset the generated tokens start at: the running sum of the prompt's token texts, vLLM's offsets.
    (It is the prompt text's length unless a character is split across tokens: each part alone reads U+FFFD.)"""
    return prompt["text_offset"][-1] + len(prompt["tokens"][-1]) if prompt["tokens"] else 0


def join(prompt: dict, generated: dict | None) -> dict:
    """One logprobs object: the prompt's entries, then the generated ones (whose offsets already count the prompt's
    text)."""
    if generated is None:
        return prompt
    return {key: prompt[key] + generated[key] for key in prompt}
