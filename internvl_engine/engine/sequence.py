from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..outputs import RequestMetrics
from ..processor.tokenizer import IncrementalDetokenizer
from ..sampling import SamplingParams
from .block_manager import MediaSpan

# Engine-internal sequence ids: the block manager and the scheduler key sequences by these, never by the caller's
# request id, which is only a label (a caller's "v#1" once met another request's second sample there and killed the
# engine). next() on a count is atomic under the GIL, so sequences made on any thread get distinct ids.
_seq_ids = itertools.count()


@dataclass(eq=False)  # identity: `seq in running` must not compare token lists field by field
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    pixel_values: torch.Tensor | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    step_logits: list[torch.Tensor] = field(default_factory=list)
    # ---- serving state (engine): media, paged-KV progress
    num_patches: list[int] = field(default_factory=list)       # tiles (pixel rows) per image, in text order
    media_keys: list[bytes] = field(default_factory=list)      # block_manager.media_key() per image
    media: list[MediaSpan] = field(default_factory=list)       # the processor's placeholder spans, one per image
    image_feats: list = field(default_factory=list)            # per image: projector rows or None (not computed)
    num_computed: int = 0       # leading tokens whose KV is in the paged cache
    prefill_target: int = 0     # len(token_ids) when (re)admitted: prefill runs [num_computed, prefill_target)
    prefilled: bool = False     # the last prefill chunk ran; decodable
    first_scheduled: float | None = None  # set at the first admission (queue time, cached-prompt metrics)
    delta: str = ""             # text produced by the current step
    cached_image_ids: set = field(default_factory=set)  # images that skipped the tower (vision or prefix cache)
    error: Exception | None = None  # why it finished with "error"
    # ---- output: what callers have seen of text, stop strings, logprobs, samples of one request
    sent: int = 0               # characters of text released to callers (the rest may start a stop string)
    stop_reason: str | None = None
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: list | None = None
    index: int = 0              # sample index in its request (SamplingParams.n)
    group: list = field(default_factory=list)  # every sample of the request, the first first (n > 1 only)
    pending_logprobs: dict | None = None  # logprobs of the token just sampled, until it is detokenised
    plain: bool = True          # no penalties, min_tokens or logprobs: the sampler's and logprobs' fast path
    prompt_copy: list | None = None  # the prompt ids every snapshot of the request shares (output_processor)
    output_kind: str = "cumulative"  # params.output_kind, or "final_only" where the caller reads the sequence (LLM)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))  # the engine's key for this sequence (see _seq_ids)
    stop_matcher: object = None      # output_processor.StopMatcher over params.stop, made at the first token
    ids_sent: int = 0                # "delta": output ids (and logprobs) already handed out
    text_sent: int = 0               # "delta": characters of text already handed out

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

