"""The engine's structured outputs: intake checks, a matcher per constrained sequence, each step's token bitmask and
the matchers' advance after the step.

A step's timeline (LLMEngine._execute / _run): the step builder makes the sampling rows; masks() starts filling the
bitmask of the constrained rows on a worker thread (llguidance drops the GIL while it fills) and returns the pending
job, which rides in SamplingInput.allowed; the runner runs the forward meanwhile, and the Sampler waits for the job
only when it samples. So the mask for the tokens a step samples is computed while that step's forward runs: it
cannot start earlier, since it depends on the token the previous step sampled. A failed step advances no matcher
(advance() runs only after a step succeeded), so its rerun in halves fills the same masks again; preemption keeps
a sequence and so its matcher, and n > 1 samples each get their own.

After the step, advance() gives each constrained sequence's matcher its new token; once the grammar admits nothing
more the sequence ends with finish_reason "stop" (also when that token was its max_tokens-th: the text is whole)."""
from __future__ import annotations

import weakref
from concurrent.futures import Future, ThreadPoolExecutor
import torch

from ..errors import RequestFailedError, SamplingParamsError, StructuredOutputError
from ..processor.tokenizer import Tokenizer
from ..sampling import SamplingParams
from .grammar import GrammarCompiler, llguidance


def _fill(executor, matchers: list, rows: list[int], words: int, pin: bool) -> tuple[list[int], torch.Tensor]:
    """The bitmask [len(rows), words] (int32, bit t of row i: token t allowed for rows[i]), llguidance's layout."""
    mask = torch.empty((len(matchers), words), dtype=torch.int32, pin_memory=pin)
    executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], mask.data_ptr(), words * 4,
                                     len(matchers))
    return rows, mask


class StructuredOutputs:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: set[int], device: torch.device):
        self.vocab_size = vocab_size  # the logits' width: logit_bias ids must be below it
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Sequence -> its LLMatcher
        self._pin = device.type == "cuda"  # the Sampler copies the mask to the device without waiting
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

    def masks(self, seqs) -> Future | None:
        """Start filling the bitmask of the constrained rows among `seqs` (a step's sampled sequences, in row
        order); the job's result() is (rows, bitmask) for SamplingInput.allowed. None when no row is constrained."""
        rows = [i for i, s in enumerate(seqs) if s.params.structured_outputs is not None]
        if not rows:
            return None
        matchers = [self._matcher(seqs[i]) for i in rows]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="structured-mask")
            self._executor = llguidance.LLExecutor()
        words = -(-self.compiler.mask_vocab // 32)
        return self._pool.submit(_fill, self._executor, matchers, rows, words, self._pin)

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
