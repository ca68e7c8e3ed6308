from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

from ..outputs import RequestMetrics
from ..sampling import SamplingParams
from .block_manager import MediaSpan

# Engine-internal sequence ids: the block manager and the scheduler key sequences by these, never by the caller's
# request id, which is only a label (a caller's "v#1" once met another request's second sample there and killed the
# engine). next() on a count is atomic under the GIL, so sequences made on any thread get distinct ids.
_seq_ids = itertools.count()


@dataclass(eq=False)  # identity: `seq in running` must not compare token lists field by field
class Sequence:
    """One sample of a request as the scheduler, step builder and sampler see it. What callers have seen of it
    (text, stop strings, logprobs, output kind) is `out`, an output_processor.OutputState that only the output
    processor reads and writes."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    out: object                 # output_processor.OutputState
    pixel_values: torch.Tensor | None = None
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    error: Exception | None = None  # why it finished with "error"
    index: int = 0              # sample index in its request (SamplingParams.n)
    group: list = field(default_factory=list)  # every sample of the request, the first first (n > 1 only)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))  # the engine's key for this sequence (see _seq_ids)
    # ---- media: shared by the samples of a request
    num_patches: list[int] = field(default_factory=list)       # tiles (pixel rows) per image, in text order
    media: list[MediaSpan] = field(default_factory=list)       # the processor's placeholder spans, one per image
    image_feats: list = field(default_factory=list)            # per image: projector rows or None (not computed)
    cached_image_ids: set = field(default_factory=set)  # images that skipped the tower (vision or prefix cache)
    # ---- paged-KV progress (scheduler)
    num_computed: int = 0       # leading tokens whose KV is in the paged cache
    prefilled: bool = False     # the last prefill chunk ran; decodable
    first_scheduled: float | None = None  # set at the first admission (queue time, cached-prompt metrics)

    @functools.cached_property  # read for every row of every step; params are fixed once the intake checked them
    def plain(self) -> bool:
        """No penalties, min_tokens, logit_bias or logprobs: the sampler's and logprobs' fast path."""
        p = self.params
        return not (p.penalized or p.min_tokens or p.logprobs is not None or p.logit_bias)

    @property
    def head(self) -> Sequence:
        """The request's first sample: it carries the request's id in the engine, its prompt logprobs and metrics."""
        return self.group[0] if self.index and self.group else self

    @property
    def request_finished(self) -> bool:
        """Every sample of the request is finished."""
        head = self.head
        return all(x.finished for x in head.group) if head.group else head.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
