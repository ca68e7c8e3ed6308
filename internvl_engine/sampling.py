"""SamplingParams (vLLM's names and semantics) and the sampler.

Per row, in vLLM's order: the raw logits' fp32 log-softmax gives the logprobs; min_tokens masks the stop tokens;
repetition (prompt and output), frequency and presence (output) penalties; then greedy argmax (ties to the lowest
id, as transformers), or temperature -> min_p -> top_k -> top_p and a seeded draw. Every step of a row reads only that
row, so a request's tokens do not depend on what it is batched with. Rows that ask for none of it cost nothing."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from .errors import SamplingParamsError


OUTPUT_KINDS = ("cumulative", "delta", "final_only")

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing fp32 logits by 1e-300 gives inf / nan,
# which failed the step for every request batched with it (and made them rerun) on every step.
GREEDY_TEMPERATURE = 1e-5
# torch.Generator.manual_seed takes a 64-bit unsigned seed; a larger one raised deep inside the engine.
MAX_SEED = 2**64 - 1
# Stop strings are matched on the engine thread for every generated token, so a request's list is bounded. OpenAI's
# API takes 4 stop strings; these leave room for long templated stops (role headers, closing tags) while keeping a
# token's matching cost small (stop_matcher: O(number of stops x characters of the token)).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024  # checked against every sampled token (and masked before min_tokens)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0                # keep tokens with prob >= min_p * the top prob (after temperature)
    seed: int | None = None           # per-request generator (sample i of n: seed_for(seed, i)); None: global RNG
    n: int = 1                        # samples of the prompt, sharing its KV blocks
    stop: list[str] | str | None = None  # strings that end the text (matched across tokens, excluded by default)
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0               # eos, stop_token_ids and stop strings cannot end the text before this many
    presence_penalty: float = 0.0     # OpenAI: logit -= presence * [token generated before]
    frequency_penalty: float = 0.0    # OpenAI: logit -= frequency * (times generated before)
    repetition_penalty: float = 1.0   # CTRL / transformers: tokens in prompt or output: l / p if l > 0 else l * p
    logprobs: int | None = None       # per generated token: its logprob and the top-k (raw logits, fp32)
    prompt_logprobs: int | None = None  # per prompt token (after the first): its logprob and the top-k
    skip_special_tokens: bool = True
    return_logits: bool = False       # keep every step's raw fp32 logits in RequestOutput.logits
    max_num_tiles: int | None = None  # per-request override of the image processor's max_patches
    num_frames: int | None = None     # frames sampled from each video (None: all frames)
    output_kind: str = "cumulative"   # what each step's RequestOutput holds (vLLM's RequestOutputKind): "cumulative"
                                      # (everything so far), "delta" (the new tokens, text and logprobs since the
                                      # previous output) or "final_only" (one output, when the request ends)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise SamplingParamsError(f"invalid SamplingParams: {msg}")

        def is_int(v, lo, hi=None, optional=False):
            if optional and v is None:
                return True
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)

        def is_num(v, lo, hi):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi

        if not is_int(self.max_tokens, 1):
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not is_num(self.temperature, 0, math.inf):
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k, -1):
            bad(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not is_num(self.top_p, 0, 1) or self.top_p == 0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_num(self.min_p, 0, 1):
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not is_int(self.seed, 0, MAX_SEED, optional=True):
            bad(f"seed must be None or an integer in [0, 2**64 - 1] (sampling.MAX_SEED), got {self.seed!r}")
        if not is_int(self.n, 1, 128):
            bad(f"n must be an integer in [1, 128], got {self.n!r}")
        if self.stop is not None:  # counted before anything looks at each string
            if not isinstance(self.stop, (list, tuple)):
                bad(f"stop must be a non-empty string or a list of them, got {_short(self.stop)}")
            if len(self.stop) > MAX_STOP_STRINGS:
                bad(f"stop has {len(self.stop)} strings, over the {MAX_STOP_STRINGS} limit (sampling.MAX_STOP_STRINGS)")
            if any(not isinstance(s, str) or not s for s in self.stop):
                bad(f"stop must be a non-empty string or a list of them, got {_short(self.stop)}")
            longest = max(map(len, self.stop), default=0)
            if longest > MAX_STOP_CHARS:
                bad(f"a stop string has {longest} characters, over the {MAX_STOP_CHARS} limit "
                    "(sampling.MAX_STOP_CHARS)")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            bad(f"stop_token_ids must be a list of non-negative integers, got {_short(self.stop_token_ids)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad(f"stop_token_ids has {len(self.stop_token_ids)} ids, over the {MAX_STOP_TOKEN_IDS} limit "
                "(sampling.MAX_STOP_TOKEN_IDS)")
        if any(not is_int(t, 0) for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {_short(self.stop_token_ids)}")
        if self.output_kind not in OUTPUT_KINDS:
            bad(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}")
        if not is_int(self.min_tokens, 0) or self.min_tokens > self.max_tokens:
            bad(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name), -2, 2):
                bad(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not is_num(self.repetition_penalty, 0, math.inf) or self.repetition_penalty == 0:
            bad(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if not is_int(getattr(self, name), 0, 20, optional=True):
                bad(f"{name} must be None or an integer in [0, 20], got {getattr(self, name)!r}")
        if not is_int(self.max_num_tiles, 1, 64, optional=True):
            bad(f"max_num_tiles must be an integer in [1, 64], got {self.max_num_tiles!r}")
        if not is_int(self.num_frames, 1, optional=True):
            bad(f"num_frames must be an integer >= 1, got {self.num_frames!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _short(value, limit: int = 200) -> str:
    """repr() cut to `limit` characters: an error message must not echo a caller's megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def seed_for(seed: int, index: int) -> int:
    """The generator seed of sample `index` of a request seeded with `seed`: the seed itself for the first, so
    n=1 is unchanged; a hash for the others, so each sample is reproducible and no two requests' samples collide
    by arithmetic (seed 1's second sample is not seed 2's first)."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class Logprob:
    logprob: float
    rank: int                 # 1 = the most likely token
    decoded_token: str | None = None


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Mask logits below min_p times the top probability, outside the top-k, then outside the smallest prefix of
    the sorted distribution whose mass reaches top_p (the most likely token is always kept)."""
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False  # a top_p below fp32's smallest value compares as 0: the most likely token stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def apply_penalties(row: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """One row's logits after the repetition penalty (tokens seen in prompt or output, as transformers'
    RepetitionPenaltyLogitsProcessor) and the frequency / presence penalties (output tokens, as OpenAI defines)."""
    row = row.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if output_ids and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=row.device), minlength=row.shape[0])[:row.shape[0]]
        row -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty * (counts > 0).to(row.dtype)
    return row


class Sampler:
    """Samples one token per sequence from fp32 logits [B, V]; `seqs` carry params, generator, prompt and output
    ids (engine.sequence.Sequence), `stop_ids` the token ids that end generation (masked before min_tokens)."""

    def __call__(self, logits: torch.Tensor, seqs, stop_ids: set[int] = frozenset()) -> torch.Tensor:
        special = [i for i, s in enumerate(seqs)
                   if not getattr(s, "plain", False) and (s.params.penalized or len(s.output_ids) < s.params.min_tokens)]
        if special:
            logits = logits.clone()
            for i in special:
                s = seqs[i]
                if len(s.output_ids) < s.params.min_tokens:
                    ends = ({*stop_ids} if not s.params.ignore_eos else set()) | set(s.params.stop_token_ids)
                    logits[i, sorted(t for t in ends if t < logits.shape[1])] = float("-inf")
                if s.params.penalized:
                    logits[i] = apply_penalties(logits[i], s.params, s.prompt_ids, s.output_ids)
        out = torch.argmax(logits, dim=-1)
        for i, s in enumerate(seqs):
            p = s.params
            if p.greedy:
                continue
            row = _filter(logits[i] / p.temperature, p.top_k, p.top_p, p.min_p)
            probs = torch.softmax(row, dim=-1)
            out[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
        return out


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor | list[int], k: int) -> list[dict[int, Logprob]]:
    """Per row: {token: Logprob} for the chosen token and the top-k of the fp32 log-softmax of the raw logits."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    tokens = torch.as_tensor(tokens, device=lp.device).reshape(-1, 1)
    chosen = lp.gather(1, tokens)
    ranks = (lp > chosen).sum(-1) + 1
    top = lp.topk(k, dim=-1) if k > 0 else None
    rows = []
    for i in range(lp.shape[0]):
        entry = {int(tokens[i, 0]): Logprob(float(chosen[i, 0]), int(ranks[i]))}
        if top is not None:
            for r, (v, t) in enumerate(zip(top.values[i].tolist(), top.indices[i].tolist()), start=1):
                entry.setdefault(t, Logprob(v, r))
        rows.append(entry)
    return rows
