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

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None            # "stop" (eos or a stop token), "length" (max_tokens or context)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    logits: torch.Tensor | None = None   # [generated, vocab] fp32, when SamplingParams.return_logits
