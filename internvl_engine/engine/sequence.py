from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..outputs import RequestMetrics
from ..processor.tokenizer import IncrementalDetokenizer
from ..sampling import SamplingParams


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    pixel_values: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    step_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
