"""SamplingParams (vLLM's names and semantics), a step's sampling rows as plain data (SamplingInput) and the
sampler, which the runner (worker/runner.py) calls on the logits' device.

Per row, in vLLM's order: the raw logits' fp32 log-softmax gives the logprobs; logit_bias is added; a structured
output's grammar masks the tokens it does not allow (or, on a CPU, checks the drawn token and draws a refused one
again from the masked row: Sampler); min_tokens masks the stop tokens; repetition (prompt and output), frequency
and presence (output) penalties; then greedy argmax (ties to the lowest id, as transformers), or temperature ->
min_p -> top_k -> top_p and a draw (a seeded request's from its own generator). Each step runs on all rows at
once, as [B] parameters over the [B, V] logits, yet reads only a row's own values for that row, so a request's
tokens do not depend on what it is batched with. Rows that ask for none of it cost nothing."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np
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
# logit_bias: OpenAI's range for a bias; the count bounds the (row, token) pairs a step applies for one request
LOGIT_BIAS_RANGE = 100.0
MAX_LOGIT_BIAS = 1024
# A grammar's text (a JSON schema serialised, a regex, a grammar, the choices joined) is compiled at intake on the
# caller's thread; this bounds what one request can make the compiler read.
MAX_GRAMMAR_CHARS = 256 * 1024
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's StructuredOutputsParams names): exactly one of json (a JSON schema,
    as a dict or its JSON text), regex, choice (the text is one of these strings), grammar (Lark, or GBNF as
    llama.cpp writes it) or json_object (any JSON object). Compiled at intake (internvl_engine/structured/); each
    step's sampling then allows only the tokens that keep the text inside the language, and the request ends with
    finish_reason "stop" once the grammar admits nothing more.

    JSON is compact by default: no whitespace between tokens, "," and ":" as separators, so a weak model cannot
    spend its tokens on indentation. whitespace_pattern (a regex, vLLM's name) allows that whitespace instead; a
    bounded one ("[ ]?") keeps the bound."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    whitespace_pattern: str | None = None

    def validate(self) -> None:
        """Shape only (types, one constraint, sizes); whether it compiles is the intake's question."""
        def bad(msg):
            raise SamplingParamsError(f"invalid structured_outputs: {msg}")

        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            bad(f"exactly one of {', '.join(STRUCTURED_KINDS)} must be given, got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            bad(f"json must be a JSON schema (a dict or its JSON text), got {type(self.json).__name__}")
        for name in ("regex", "grammar", "whitespace_pattern"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                bad(f"{name} must be a non-empty string, got {_short(v)}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            bad(f"choice must be a non-empty list of non-empty strings, got {_short(self.choice)}")
        if not isinstance(self.json_object, bool):
            bad(f"json_object must be a boolean, got {_short(self.json_object)}")
        if self.whitespace_pattern is not None and self.json is None and not self.json_object:
            bad("whitespace_pattern applies to json and json_object only")
        size = self.size()
        if size > MAX_GRAMMAR_CHARS:
            bad(f"the constraint has {size} characters, over the {MAX_GRAMMAR_CHARS} limit "
                "(sampling.MAX_GRAMMAR_CHARS)")

    def size(self) -> int:
        return sum(len(x) for x in (self._json_text() or "", self.regex or "", self.grammar or "",
                                    self.whitespace_pattern or "")) + sum(len(c) + 1 for c in self.choice or ())

    def key(self) -> tuple:
        """What identifies the compiled grammar (its cache key)."""
        return (self._json_text(), self.regex, tuple(self.choice) if self.choice else None, self.grammar,
                self.json_object, self.whitespace_pattern)

    def _json_text(self) -> str | None:
        """json as text: a dict serialised canonically (sorted keys, compact), so equal schemas share a key."""
        return self.json if isinstance(self.json, str) or self.json is None else _json_text(self.json)


def _json_text(value) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise SamplingParamsError(f"invalid structured_outputs: json is not serialisable as JSON: {e}") from e


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
    logit_bias: dict[int, float] | None = None  # OpenAI: token id -> bias in [-100, 100], added to the logits
    structured_outputs: StructuredOutputsParams | None = None  # constrain the text (grammar-masked sampling)

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
        if self.logit_bias is not None:  # the ids are checked against the model's vocabulary at intake
            if not isinstance(self.logit_bias, dict):
                bad(f"logit_bias must be a dict of token id -> bias, got {_short(self.logit_bias)}")
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                bad(f"logit_bias has {len(self.logit_bias)} entries, over the {MAX_LOGIT_BIAS} limit "
                    "(sampling.MAX_LOGIT_BIAS)")
            for t, b in self.logit_bias.items():
                if not is_int(t, 0) or not is_num(b, -LOGIT_BIAS_RANGE, LOGIT_BIAS_RANGE):
                    bad(f"logit_bias maps token ids (integers >= 0) to biases in [-100, 100], got {t!r}: {b!r}")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                bad(f"structured_outputs must be a StructuredOutputsParams, got "
                    f"{type(self.structured_outputs).__name__}")
            self.structured_outputs.validate()

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


NEG_INF = float("-inf")
# On a CPU, a full sort of a 151k vocabulary costs ~30 ms a row; when a row's top_p nucleus lies within its first
# TOP_P_GUESS tokens (the usual case for a trained model), a top-k of that size finds it exactly. A GPU sorts fast
# but would have to synchronise to learn whether the guess held, so there the sort is always full.
TOP_P_GUESS = 1024


def on_device(device: torch.device, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on `device`. To a GPU through pinned memory and a non-blocking copy: a blocking
    host-to-device copy waits for the stream, i.e. for the step's forward, which would be a sync a call."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def _truncate(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """top_k then top_p on rows x [R, V] from the `size` largest logits of each row (one sorted top-k; size = V is a
    full sort). top_k [R] (long, 0 = off, every active one <= size), top_p [R]. Returns the masked rows and, per row,
    whether the result is exact: a top_p row whose nucleus did not end within `size` tokens is not, unless its
    top_k left no more than `size` tokens."""
    vals, order = x.topk(size, dim=-1)                            # descending
    has_k = (top_k > 0)[:, None]
    kth = vals.gather(1, (top_k.clamp(1, size) - 1)[:, None])
    kth = torch.where(has_k, kth, torch.full_like(kth, NEG_INF))
    x = x.masked_fill(x < kth, NEG_INF)                          # ties with the k-th logit stay, as topk's value
    vals = vals.masked_fill(vals < kth, NEG_INF)
    probs = (vals - x.logsumexp(-1, keepdim=True)).exp()         # the top-k-masked row's softmax, in sorted order
    cum = probs.cumsum(-1)
    drop = (cum - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]  # mass before this token already reaches top_p
    drop[:, 0] = False  # a top_p below fp32's smallest value compares as 0: the most likely token stays
    # a top_k-only row starts from its masked row, so ties with its k-th logit that sorted past `size` stay too (a
    # batch's size may be that top_k); a top_p row keeps only what the sorted walk kept
    base = torch.where((top_p < 1.0)[:, None], torch.full_like(x, NEG_INF), x)
    kept = base.scatter(1, order, vals.masked_fill(drop, NEG_INF))
    # else the nucleus may go on past `size`: a top_p row without top_k, or one whose ties with its k-th logit
    # sorted past `size` (top_k keeps them all, so the walk must see them all)
    within = (x > NEG_INF).sum(-1) <= size
    exact = (top_p >= 1.0) | (cum[:, -1] >= top_p) | (has_k[:, 0] & within)
    return kept, exact


def filter_logits(x: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Rows x [R, V] (already divided by their temperature) masked to -inf, in vLLM's order: below min_p times the
    row's top probability, outside its top_k, then outside the smallest prefix of its sorted distribution whose mass
    reaches top_p (the most likely token is always kept). The per-row values come as host lists: what to run is
    decided from them, never from the device. Every operation reads one row at a time, so a row's result does not
    depend on the others."""
    vocab, dev = x.shape[1], x.device
    top_k = [k if 0 < k < vocab else 0 for k in top_k]  # 0, -1 or the whole vocabulary: off
    if any(m > 0 for m in min_p):
        probs = x.softmax(-1)
        floor = on_device(dev, min_p, x.dtype)[:, None] * probs.amax(-1, keepdim=True)
        x = x.masked_fill(probs < floor, NEG_INF)
    rows = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if k > 0 or p < 1.0]
    if not rows:
        return x
    size = max(top_k[i] for i in rows)
    if any(top_k[i] == 0 for i in rows):  # a top_p-only row: its nucleus may reach anywhere
        size = max(size, TOP_P_GUESS) if dev.type == "cpu" else vocab
    if dev.type != "cpu" and any(top_p[i] < 1.0 for i in rows):
        # a device cumsum's rounding may depend on its length, and the length here on the batch's largest top_k:
        # sorting the whole vocabulary keeps a row's nucleus independent of its batch
        size = vocab
    size = min(size, vocab)
    sub = on_device(dev, rows)
    ks = on_device(dev, [top_k[i] for i in rows])
    ps = on_device(dev, [top_p[i] for i in rows], x.dtype)
    kept, exact = _truncate(x[sub], ks, ps, size)
    # CPU only (a device sorts the whole vocabulary for any top_p): reading `exact` is free there
    guessed = size < vocab and any(top_p[i] < 1.0 for i in rows)
    if guessed and not bool(exact.all()):  # the nucleus of some top_p row goes on past the sort: sort it fully
        redo = (~exact).nonzero()[:, 0]
        kept[redo] = _truncate(x[sub[redo]], ks[redo], ps[redo], vocab)[0]
    x = x.clone()
    x[sub] = kept
    return x


@dataclass
class SamplingInput:
    """A step's sampling rows as plain data, row i for the step's i-th sampling sequence (engine/step_builder.py
    builds it from the scheduled sequences). Penalties and min_tokens masks come as the (row, token) pairs they
    touch, so the sampler never walks a token history. The seeded generators are the requests' own objects: this
    stays in the driver's process."""
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    generators: list[torch.Generator | None] = field(default_factory=list)  # None: the global generator
    logprobs: list[int | None] = field(default_factory=list)  # top-k beside the chosen token's logprob (None: none)
    return_logits: list[bool] = field(default_factory=list)
    masked: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))  # min_tokens: (row, stop token)
    repetition: tuple[list[int], list[int], list[float]] = field(default_factory=lambda: ([], [], []))
    # frequency / presence over the output: (row, token, times generated, frequency penalty, presence penalty)
    counted: tuple[list[int], list[int], list[int], list[float], list[float]] = field(
        default_factory=lambda: ([], [], [], [], []))
    bias: tuple[list[int], list[int], list[float]] = field(default_factory=lambda: ([], [], []))  # logit_bias
    # structured outputs (None: no row is constrained): a structured.StepGrammar, read by the Sampler as
    #   upfront() -> (rows, bitmask) | None   the rows to mask before the draw (waits for a fill begun before the
    #                                         forward); bitmask [len(rows), words] int32 on the host, bit t of row j
    #                                         set when token t may follow in row rows[j] (llguidance's layout)
    #   deferred -> bool                      some rows are checked after the draw instead
    #   refused(tokens) -> rows               the deferred rows whose drawn token the grammar refuses
    #   next_allowed(logits, rows) -> {row: token}   greedy refused rows' best allowed token, where found cheaply
    #   masks(rows) -> (rows, bitmask)        their masks, to draw them again from
    allowed: object = None

    def __len__(self) -> int:
        return len(self.temperature)

    def subset(self, keep: list[int]) -> SamplingInput:
        """Rows `keep` alone, with nothing left to apply to their logits (penalties, bias and masks are in them)."""
        pick = lambda values: [values[i] for i in keep]  # noqa: E731
        return SamplingInput(pick(self.temperature), pick(self.top_k), pick(self.top_p), pick(self.min_p),
                             pick(self.generators), pick(self.logprobs), pick(self.return_logits))


def banned_by_shifts(words: torch.Tensor) -> torch.Tensor:
    """[R, 32 * W] bool, True where the bit of int32 words [R, W] is clear (bit j of word w: token 32w + j), on the
    words' device. (An arithmetic shift of a negative word fills with ones from the left; & 1 reads bit j alone.)"""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    return ((words[:, :, None] >> shifts) & 1).view(words.shape[0], -1) == 0


def allow_only(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    """In place on logits [B, V]: rows[j]'s tokens whose bit is clear in bitmask[j] (int32 words on the host, bit t
    of the row: token t, llguidance's layout) -> -inf, as are tokens past the mask's width. Other rows untouched.
    On a CPU numpy unpacks the bits (a little-endian word's byte k holds tokens 8k .. 8k + 7); on a GPU shifts do."""
    dev, vocab = logits.device, logits.shape[1]
    if dev.type == "cpu":
        inverted = ~bitmask.contiguous().numpy().view(np.uint8)  # 32x fewer values to flip than the unpacked bits
        banned = torch.from_numpy(np.unpackbits(inverted, axis=1, bitorder="little")).view(torch.bool)
    else:
        banned = banned_by_shifts(bitmask.to(dev, non_blocking=True))
    width = min(vocab, banned.shape[1])
    if rows == list(range(rows[0], rows[0] + len(rows))):  # one block of rows (the usual case): one op
        logits[rows[0]:rows[0] + len(rows), :width].masked_fill_(banned[:, :width], NEG_INF)
        logits[rows[0]:rows[0] + len(rows), width:] = NEG_INF
    else:
        for j, r in enumerate(rows):
            logits[r, :width].masked_fill_(banned[j, :width], NEG_INF)
            logits[r, width:] = NEG_INF
    return logits


def _penalize(logits: torch.Tensor, rows: SamplingInput, upfront: tuple | None = None) -> torch.Tensor:
    """logit_bias, the structured-output mask, min_tokens masks and the repetition / frequency / presence
    penalties, applied to a copy of logits [B, V] at the (row, token) pairs they touch: the bias added (OpenAI),
    tokens the row's grammar does not allow -> -inf, repetition over the tokens seen in prompt or output
    (transformers' RepetitionPenaltyLogitsProcessor: l / p if l > 0 else l * p), then frequency and presence over
    the output tokens (OpenAI: l -= frequency * count + presence). -inf stays -inf through every penalty."""
    vocab = logits.shape[1]
    masked = [(r, t) for r, t in zip(*rows.masked) if t < vocab]  # a stop id past the vocabulary is never drawn
    (rep_r, rep_t, rep_p), (pen_r, pen_t, pen_c, pen_f, pen_p) = rows.repetition, rows.counted
    bias_r, bias_t, bias_b = rows.bias
    if not (masked or rep_r or pen_r or bias_r or upfront is not None):
        return logits
    logits = logits.clone()
    dev, dt = logits.device, logits.dtype
    if bias_r:
        logits[on_device(dev, bias_r), on_device(dev, bias_t)] += on_device(dev, bias_b, dt)
    if upfront is not None:  # the grammar's (rows, bitmask)
        allow_only(logits, *upfront)
    if masked:
        logits[on_device(dev, [r for r, _ in masked]), on_device(dev, [t for _, t in masked])] = NEG_INF
    if rep_r:
        r, t = on_device(dev, rep_r), on_device(dev, rep_t)
        vals, pen = logits[r, t], on_device(dev, rep_p, dt)
        logits[r, t] = torch.where(vals > 0, vals / pen, vals * pen)
    if pen_r:
        r, t = on_device(dev, pen_r), on_device(dev, pen_t)
        f, c = on_device(dev, pen_f, dt), on_device(dev, pen_c, dt)
        logits[r, t] -= f * c + on_device(dev, pen_p, dt)
    return logits


class Sampler:
    """Samples one token per row of fp32 logits [B, V] as `rows` (a SamplingInput) asks.

    Batched over rows: penalties and masks at their (row, token) pairs, then temperature, min_p, top_k and top_p
    over all sampled rows at once (filter_logits). A seeded row draws by an exponential race, argmax(probs / E) with
    E ~ Exp(1) per token from its own generator: that is how torch.multinomial draws one sample, with the same [V]
    draw, so seeded streams are those of the per-row sampler before it, and a row's tokens depend only on its seed
    and its logits. Unseeded rows draw one batched uniform (inverse CDF). Nothing here copies to the host on a GPU;
    the runner's one copy of the step's results is its sync.
    """

    def __call__(self, logits: torch.Tensor, rows: SamplingInput) -> torch.Tensor:
        grammar = rows.allowed
        upfront = grammar.upfront() if grammar is not None else None  # (rows, bitmask) to mask before the draw
        if rows.masked[0] or rows.repetition[0] or rows.counted[0] or rows.bias[0] or upfront is not None:
            logits = _penalize(logits, rows, upfront)
        tokens = self._draw(logits, rows)
        if grammar is not None and grammar.deferred:
            # Rejection: a token drawn from p that the grammar allows is a draw from p restricted to the allowed
            # tokens; a refused one is drawn again from the masked row. Only rows where that equals masking first
            # (greedy, or no top_k / top_p / min_p) are deferred, and only on a CPU, where reading the tokens costs
            # nothing and computing masks nobody needs is what the step would wait for.
            refused = grammar.refused(tokens.tolist())
            greedy = [i for i in refused if rows.temperature[i] < GREEDY_TEMPERATURE]
            if greedy:  # a greedy row's masked argmax is its best allowed token: ask for its runner-ups first
                found = grammar.next_allowed(logits, greedy)
                if found:
                    tokens[list(found)] = torch.tensor(list(found.values()))
                    refused = [i for i in refused if i not in found]
            if refused:
                sub, bitmask = grammar.masks(refused)
                index = on_device(logits.device, sub)
                again = allow_only(logits[index], list(range(len(sub))), bitmask)  # logits[index] is a copy
                tokens.index_copy_(0, index, self._draw(again, rows.subset(sub)))
        return tokens

    def _draw(self, logits: torch.Tensor, rows: SamplingInput) -> torch.Tensor:
        out = torch.argmax(logits, dim=-1)  # greedy rows: the raw (penalised, masked) argmax, ties to the lowest id
        if max(rows.temperature, default=0.0) < GREEDY_TEMPERATURE:
            return out
        drawn = [i for i, t in enumerate(rows.temperature) if t >= GREEDY_TEMPERATURE]
        drawn.sort(key=lambda i: rows.generators[i] is not None)  # unseeded rows first: one batched draw for them
        dev = logits.device
        index = on_device(dev, drawn)
        temperature = on_device(dev, [rows.temperature[i] for i in drawn], logits.dtype)
        x = logits[index] / temperature[:, None]
        x = filter_logits(x, [rows.top_k[i] for i in drawn], [rows.top_p[i] for i in drawn],
                          [rows.min_p[i] for i in drawn])
        probs = x.softmax(-1)
        tokens = torch.empty(len(drawn), dtype=torch.long, device=dev)
        unseeded = sum(rows.generators[i] is None for i in drawn)
        if unseeded:  # one uniform u a row from the global generator: the first token whose cumulative mass > u
            # (V exponentials a row cost a CPU 30x more). In float64, u < 1 - 2**-24 (an fp32 uniform) keeps
            # u * total below total, so the token found has a nonzero probability.
            cum = probs[:unseeded].double().cumsum(-1)
            u = torch.rand(unseeded, 1, device=dev).double()
            tokens[:unseeded] = torch.searchsorted(cum, u * cum[:, -1:], right=True)[:, 0]
        if unseeded < len(drawn):  # seeded rows: the exponential race, each with noise from its own generator
            noise = torch.empty_like(probs[unseeded:])
            for j, i in enumerate(drawn[unseeded:]):
                noise[j].exponential_(generator=rows.generators[i])
            # Exp(1) may round to 0 (about 2**-53 on a CPU): 0 / 0 would be a NaN, which argmax would pick
            tokens[unseeded:] = (probs[unseeded:] / noise.clamp_min_(torch.finfo(probs.dtype).tiny)).argmax(-1)
        return out.index_copy_(0, index, tokens)


def logprob_table(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of logits [R, V], on their device: [the token's logprob, its rank (1 = the most likely), the top-k
    logprobs, their token ids] of the fp32 log-softmax of the raw logits, [R, 2 + 2k] fp32 (ranks and token ids
    below 2**24 are exact in fp32), so that it travels to the host with the step's other results in one copy."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens.reshape(-1, 1))
    ranks = (lp > chosen).sum(-1) + 1
    parts = [chosen, ranks[:, None].float()]
    if k > 0:
        top = lp.topk(k, dim=-1)
        parts += [top.values, top.indices.float()]
    return torch.cat(parts, dim=1)


def logprob_entry(token: int, row: list[float], k: int, keep: int) -> dict[int, Logprob]:
    """{token: Logprob} from a host row of logprob_table(..., k): the chosen token, then its top `keep` <= k."""
    entry = {token: Logprob(row[0], int(row[1]))}
    for r, (v, t) in enumerate(zip(row[2:2 + keep], row[2 + k:2 + k + keep]), start=1):
        entry.setdefault(int(t), Logprob(v, r))
    return entry
