"""Continuous-batching scheduler over the paged KV pool.

Each step is a prefill step or a decode step. Prefill has priority, except that two prefill steps never follow each
other while some sequence is ready to decode. Partially prefilled running sequences continue first, then waiting
sequences are admitted FIFO while max_num_seqs and the pool allow; their chunks [start, end) share the
max_num_batched_tokens budget (chunked prefill). Otherwise every fully prefilled running sequence decodes one token;
when the pool cannot grow a table, the newest running sequence is preempted (blocks freed, put back at the front
of the waiting queue, recomputed from prompt + outputs on re-admission).

After the forward, postprocess() advances what each sequence has computed, registers filled blocks for prefix
reuse, appends the sampled tokens, applies the finish rules and drops finished sequences."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..settings import EngineConfigError
from .block_manager import BlockManager, NoFreeBlocksError
from .input_processor import CapacityError
from .sequence import Sequence


@dataclass
class SchedulerOutput:
    is_prefill: bool
    chunks: list[tuple[Sequence, int, int]] = field(default_factory=list)  # prefill: (seq, start, end)
    decode: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)                 # newly (re)admitted this step
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # dropped: scheduling them raised

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.decode

    @property
    def sequences(self) -> list[Sequence]:
        return [s for s, _, _ in self.chunks] if self.is_prefill else list(self.decode)

    def halves(self) -> list["SchedulerOutput"]:
        """The step split in two (fault isolation reruns each part)."""
        items = self.chunks if self.is_prefill else self.decode
        mid = len(items) // 2
        if self.is_prefill:
            return [SchedulerOutput(True, chunks=items[:mid]), SchedulerOutput(True, chunks=items[mid:])]
        return [SchedulerOutput(False, decode=items[:mid]), SchedulerOutput(False, decode=items[mid:])]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: set[int], max_model_len: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < block_manager.block_size:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= block_size "
                             f"({block_manager.block_size})")
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._last_was_prefill = False
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len

    def set_eos_token_ids(self, ids) -> None:
        ids = set(ids)
        if any(not isinstance(i, int) or i < 0 for i in ids):
            raise EngineConfigError(f"eos_token_ids must be non-negative integers, got {sorted(ids, key=str)}")
        self.eos_token_ids = ids

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_front(self, seqs: list[Sequence]) -> None:
        """Queue sequences ahead of every waiting one (the other samples of a request whose prompt just ran)."""
        self.waiting.extendleft(reversed(seqs))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence, releasing its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.seq_id in self.bm:
            self.bm.free(seq.seq_id)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.num_computed, seq.prefilled = 0, False
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = self._schedule()
        if out.empty and not out.failed and self.waiting and not self.running:
            # checked at add time already; should it happen, the request fails, not the engine
            s = self.waiting[0]
            self.remove(s)
            out.failed.append((s, CapacityError(f"request {s.request_id} does not fit in the KV pool")))
        now = time.perf_counter()
        for s in out.admitted:
            if s.first_scheduled is None:  # first admission; a preempted sequence is re-admitted later
                s.first_scheduled = now
                s.metrics.queue_s = now - s.metrics.arrival_time
                s.metrics.cached_prompt_tokens = s.num_computed
                s.cached_image_ids |= {i for i, sp in enumerate(s.media) if sp.end <= s.num_computed}
                s.metrics.cached_images = len(s.cached_image_ids)
        return out

    def _schedule(self) -> SchedulerOutput:
        # Prefill first, but never twice in a row while sequences wait to decode: a steady stream of arrivals
        # would otherwise stall every running request (at worst, decode runs every other step).
        if self._last_was_prefill and any(s.prefilled for s in self.running):
            out = self._schedule_decode()
            if out.decode:
                self._last_was_prefill = False
                return out
        out = self._schedule_prefill()
        if out.chunks:
            self._last_was_prefill = True
            return out
        self._last_was_prefill = False
        return self._schedule_decode()

    def _schedule_prefill(self) -> SchedulerOutput:
        out = SchedulerOutput(True)
        budget = self.max_num_batched_tokens
        for s in self.running:
            if budget <= 0:
                break
            if not s.prefilled and s.num_computed < s.num_tokens:
                end = min(s.num_tokens, s.num_computed + budget)
                out.chunks.append((s, s.num_computed, end))
                budget -= end - s.num_computed
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            s = self.waiting[0]
            tokens = s.token_ids
            try:
                # prompt logprobs need every prompt position computed: no prefix-cache hits for that request
                alloc = self.bm.allocate(s.seq_id, tokens, s.media,
                                         use_cache=s.params.prompt_logprobs is None or s.index > 0)
            except NoFreeBlocksError:
                break
            except Exception as e:  # this sequence's own fault: it alone leaves, the others are scheduled
                self._drop(s, e, out)
                continue
            self.waiting.popleft()
            self.running.append(s)
            s.num_computed, s.prefilled = alloc.num_cached_tokens, False
            out.admitted.append(s)
            end = min(len(tokens), s.num_computed + budget)
            out.chunks.append((s, s.num_computed, end))
            budget -= end - s.num_computed
        return out

    def _schedule_decode(self) -> SchedulerOutput:
        out = SchedulerOutput(False)
        preempted = set()  # ids of the sequences this pass preempted (a set: `in self.running` made the pass O(B^2))
        for s in [s for s in self.running if s.prefilled]:
            if id(s) in preempted:  # preempted below by an older sequence's growth
                continue
            try:
                grown = self.bm.append_slot(s.seq_id, s.num_tokens)
            except Exception as e:  # this sequence's own fault: it alone leaves, the others decode
                self._drop(s, e, out)
                continue
            while not grown:
                victim = self.running[-1]
                self.preempt(victim)
                preempted.add(id(victim))
                if victim is s:
                    break
                grown = self.bm.append_slot(s.seq_id, s.num_tokens)
            else:
                out.decode.append(s)
        if preempted:
            out.decode = [s for s in out.decode if id(s) not in preempted]
        return out

    def _drop(self, s: Sequence, error: Exception, out: SchedulerOutput) -> None:
        """Take a sequence whose scheduling raised out of the queues (its blocks freed); the engine fails its
        request alone (a request is the unit of failure, never the engine)."""
        self.remove(s)
        out.failed.append((s, error))

    # ------------------------------------------------------------------ after the forward
    def sampling(self, out: SchedulerOutput) -> list[Sequence]:
        """The sequences that sample a token in this step: every decoding one, and the chunks that end a prompt."""
        if not out.is_prefill:
            return out.decode
        return [s for s, _, end in out.chunks if end == s.num_tokens]  # no token is appended while prefilling

    def postprocess(self, out: SchedulerOutput, sampled: list[Sequence], tokens: list[int], structured=None) -> None:
        """Record a step's progress: computed counts, prefix registration of filled blocks, the sampled token of each
        of `sampled` (= sampling(out)), finish rules (`structured`, a structured.StructuredOutputs: a constrained
        sequence's grammar takes the token and ends it once complete); finished sequences leave the scheduler."""
        bs = self.bm.block_size
        for s, _, end in out.chunks:
            s.num_computed = end
        for s, token in zip(sampled, tokens, strict=True):
            if out.is_prefill:
                s.prefilled = True
                self.bm.register_computed(s.seq_id, s.token_ids, s.num_computed)
            else:
                s.num_computed = s.num_tokens
                if s.num_computed % bs == 0:  # a block filled by decode: a follow-up turn reuses it
                    self.bm.register_computed(s.seq_id, s.token_ids, s.num_computed)
            s.output_ids.append(token)
            s.finish_reason = self.finish_reason(s, token)
            if structured is not None and s.params.structured_outputs is not None:
                structured.advance(s)
            if s.finished:
                self.remove(s)

    @staticmethod
    def charge(out: SchedulerOutput, seconds: float) -> None:
        """A step's forward time, charged in full to every sequence in it (RequestMetrics.prefill_s / decode_s)."""
        if out.is_prefill:
            for s, _, _ in out.chunks:
                s.metrics.prefill_s += seconds
        else:
            for s in out.decode:
                s.metrics.decode_s += seconds

    def finish_reason(self, s: Sequence, token: int) -> str | None:
        p = s.params
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            return "stop"
        if len(s.output_ids) >= p.max_tokens or s.num_tokens >= self.max_model_len:
            return "length"
        return None
