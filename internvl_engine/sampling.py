"""SamplingParams and the sampler: greedy (argmax, ties to the lowest id, as transformers) or seeded
temperature / top-k / top-p sampling on the device."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import SamplingParamsError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 or -1 = off
    top_p: float = 1.0
    seed: int | None = None           # per-request generator; None draws from torch's global RNG
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    return_logits: bool = False       # keep every step's raw fp32 logits in RequestOutput.logits
    max_num_tiles: int | None = None  # per-request override of the image processor's max_patches
    num_frames: int | None = None     # frames sampled from each video (None: all frames)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise SamplingParamsError(f"invalid SamplingParams: {msg}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or \
                any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.max_num_tiles is not None and (not isinstance(self.max_num_tiles, int) or not 1 <= self.max_num_tiles <= 64):
            bad(f"max_num_tiles must be an integer in [1, 64], got {self.max_num_tiles!r}")
        if self.num_frames is not None and (not isinstance(self.num_frames, int) or self.num_frames < 1):
            bad(f"num_frames must be an integer >= 1, got {self.num_frames!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k, then outside the smallest prefix of the sorted distribution whose mass reaches
    top_p (the most likely token is always kept)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class Sampler:
    """Samples one token per sequence from fp32 logits [B, V]."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
        out = torch.argmax(logits, dim=-1)
        for i, p in enumerate(params):
            if p.greedy:
                continue
            row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(row, dim=-1)
            out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
        return out
