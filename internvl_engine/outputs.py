from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RequestMetrics:
    """Seconds, measured on the host around device-synchronising points. Stages shared by a batch (vision,
    prefill, each decode step) are charged in full to every request of that batch."""
    arrival_time: float = 0.0
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    num_images: int = 0
    num_tiles: int = 0
    queue_s: float = 0.0              # arrival -> first scheduled
    cached_prompt_tokens: int = 0     # prompt tokens whose KV came from the prefix cache (first admission)
    cached_images: int = 0            # images that skipped the vision tower (vision cache or cached prefix)
    last_token_s: float = 0.0         # arrival -> the request's last token (over its samples), set when it ends

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def copy(self) -> RequestMetrics:
        """A snapshot (every field is a number); every output of every step takes one, so it skips __init__."""
        new = object.__new__(RequestMetrics)
        new.__dict__.update(self.__dict__)
        return new


@dataclass
class CompletionOutput:
    """One sample of a request (SamplingParams.n of them)."""
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    delta: str = ""
    logprobs: list | None = None         # per token {token_id: sampling.Logprob}, with SamplingParams.logprobs
    cumulative_logprob: float = 0.0
    stop_reason: str | None = None       # the stop string that ended it
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None            # "stop" (eos, a stop token or string), "length" (max_tokens or context),
                                         # "abort" (LLMEngine.abort), "error" (see .error), None while running
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    logits: torch.Tensor | None = None   # [generated, vocab] fp32, when SamplingParams.return_logits
    delta: str = ""                      # text newly detokenized by the step that produced this output
    error: Exception | None = None       # with finish_reason "error": a RequestFailedError naming stage and cause
    outputs: list[CompletionOutput] = field(default_factory=list)  # every sample; the flat fields mirror outputs[0]
    prompt_logprobs: list | None = None  # [None, {token_id: Logprob}, ...] with SamplingParams.prompt_logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
