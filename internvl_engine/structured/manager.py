"""The engine's structured outputs: intake checks, a matcher per constrained sequence, each step's token masks and
the matchers' advance after the step.

A step's timeline (LLMEngine._execute / _run): the step builder makes the sampling rows and masks() wraps the
constrained ones in a StepGrammar (SamplingInput.allowed). On a GPU it starts filling their bitmask on a worker
thread (llguidance drops the GIL while it fills), the runner runs the forward meanwhile, and the Sampler waits for
the fill only when it samples: the mask for the tokens a step samples is computed while that step's forward runs (it
cannot start earlier: it depends on the token the previous step sampled). On a CPU the Sampler draws first and asks
the grammar after (StepGrammar says why and when that is exact). A failed step advances no matcher (advance() runs
only after a step succeeded), so its rerun in halves computes the same masks again; preemption keeps a sequence and
so its matcher, and n > 1 samples each get their own.

After the step, advance() gives each constrained sequence's matcher its new token; once the grammar admits nothing
more the sequence ends with finish_reason "stop" (also when that token was its max_tokens-th: the text is whole)."""
from __future__ import annotations

import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import RequestFailedError, SamplingParamsError, StructuredOutputError
from ..processor.tokenizer import Tokenizer
from ..sampling import SamplingParams
from .grammar import GrammarCompiler, llguidance


GREEDY_TRIES = 8  # runner-ups of a refused greedy row asked of its grammar before its mask is computed


def _fill(executor, matchers: list, rows: list[int], words: int, pin: bool) -> tuple[list[int], torch.Tensor]:
    """The bitmask [len(rows), words] (int32, bit t of row i: token t allowed for rows[i]), llguidance's layout."""
    mask = torch.empty((len(matchers), words), dtype=torch.int32, pin_memory=pin)
    executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], mask.data_ptr(), words * 4,
                                     len(matchers))
    return rows, mask


def _exact_after_the_draw(p: SamplingParams, vocab: int) -> bool:
    """Drawing first and checking after (rejection) samples what masking first does: greedy rows, and rows whose
    distribution nothing truncates (a top_k, top_p or min_p row's kept set would change with the mask)."""
    return p.greedy or ((p.top_k <= 0 or p.top_k >= vocab) and p.top_p >= 1.0 and p.min_p <= 0.0)


class StepGrammar:
    """One step's constrained rows, SamplingInput.allowed (its interface is described there). On a GPU every row's
    mask is filled on the worker thread while the forward runs, and upfront() waits for it. On a CPU the forward
    keeps every core busy, so a fill beside it takes the same cores and overlaps nothing (measured: the step time
    grew by the fills' CPU time); there the rows where rejection is exact are deferred: their masks are computed
    only for the rows whose drawn token the grammar refuses (inside a JSON string most tokens are allowed, and those
    are the costly masks); the others are filled at upfront()."""

    def __init__(self, owner: "StructuredOutputs", seqs, rows: list[int], defer: bool):
        self.owner = owner
        self.matchers = {i: owner._matcher(seqs[i]) for i in rows}
        vocab = owner.vocab_size
        late = [i for i in rows if defer and _exact_after_the_draw(seqs[i].params, vocab)]
        self.late, early = late, [i for i in rows if i not in set(late)]
        self._early = owner.fill(self, early, now=False) if early and not defer else None
        self._early_rows = early

    @property
    def deferred(self) -> bool:
        return bool(self.late)

    def upfront(self):
        if self._early is not None:
            return self._early.result()
        return self.masks(self._early_rows) if self._early_rows else None

    def refused(self, tokens: list[int]) -> list[int]:
        return [i for i in self.late if self.matchers[i].validate_tokens([tokens[i]]) < 1]

    def next_allowed(self, logits: torch.Tensor, rows: list[int]) -> dict[int, int]:
        """{row: token} for greedy rows (of host logits [B, V], penalised and biased) whose argmax the grammar
        refused: the row's next best tokens in argmax's order (highest logit, ties to the lowest id), each asked of
        the grammar, up to GREEDY_TRIES; the first allowed is the masked row's argmax. Rows left out need their
        mask. Asking costs microseconds where a mask costs a walk of the vocabulary's trie."""
        found = {}
        for i in rows:
            row = logits[i].numpy().copy()  # numpy's argmax: 5x torch's on a CPU row
            for _ in range(GREEDY_TRIES):
                t = int(row.argmax())
                if row[t] == -np.inf:
                    break
                if self.matchers[i].validate_tokens([t]) == 1:
                    found[i] = t
                    break
                row[t] = -np.inf
        return found

    def masks(self, rows: list[int]):
        return self.owner.fill(self, rows, now=True)


class StructuredOutputs:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: set[int], device: torch.device):
        self.vocab_size = vocab_size  # the logits' width: logit_bias ids must be below it
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Sequence -> its LLMatcher
        self._device = device  # on a GPU the Sampler copies the mask from pinned memory without waiting
        self.defer = device.type == "cpu"  # check drawn tokens after the draw where exact (StepGrammar)
        self._pool: ThreadPoolExecutor | None = None
        self._executor = None  # llguidance's own threads, for the rows of one fill

    def check(self, params: SamplingParams, what: str) -> None:
        """Intake: logit_bias ids inside the vocabulary, and the request's grammar compiles (typed errors)."""
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= self.vocab_size]
            if bad:
                raise SamplingParamsError(f"{what}: logit_bias token id {bad[0]} is outside the model's vocabulary "
                                          f"({self.vocab_size} tokens)")
        if params.structured_outputs is not None:
            try:
                self.compiler.compile(params.structured_outputs)
            except StructuredOutputError as e:
                raise StructuredOutputError(f"{what}: {e}") from e

    def _matcher(self, seq):
        m = self._matchers.get(seq)
        if m is None:
            m = self._matchers[seq] = self.compiler.matcher(seq.params.structured_outputs)
            if seq.output_ids and not m.consume_tokens(seq.output_ids):
                raise StructuredOutputError(f"the grammar refused the sequence's tokens: {m.get_error()}")
        return m

    def masks(self, seqs) -> StepGrammar | None:
        """The constrained rows among `seqs` (a step's sampled sequences, in row order) as SamplingInput.allowed; on
        a GPU their masks' fill starts now, beside the forward. None when no row is constrained."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured_outputs is not None]
        if not rows:
            return None
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        return StepGrammar(self, seqs, rows, self.defer)

    def fill(self, step: StepGrammar, rows: list[int], now: bool):
        """(rows, bitmask) of `rows` of a step; now=False: a Future of it, filled on the worker thread."""
        job = (_fill, self._executor, [step.matchers[i] for i in rows], rows, -(-self.compiler.mask_vocab // 32),
               self._device.type == "cuda")
        if now:
            return job[0](*job[1:])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="structured-mask")
        return self._pool.submit(*job)

    def advance(self, seq) -> None:
        """After a successful step (Scheduler.postprocess): the sequence's matcher takes its new token; a finished
        grammar ends it with "stop". A token the grammar refuses (the mask allowed it: a bug, not the caller's)
        ends the request alone with "error", as a failed step would."""
        m = self._matchers.get(seq)
        if m is None:
            return
        token = seq.output_ids[-1]
        if not m.consume_token(token):
            cause = StructuredOutputError(f"the grammar refused token {token}: {m.get_error()}")
            seq.finish_reason, seq.error = "error", RequestFailedError(seq.head.request_id, "sample", cause)
        elif m.is_stopped() and seq.finish_reason in (None, "length"):
            seq.finish_reason = "stop"
        if seq.finish_reason is not None:
            del self._matchers[seq]
