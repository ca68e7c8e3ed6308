"""LLM: the synchronous front end over LLMEngine. conversation -> Processor -> vision tower -> projector -> Qwen2
with a paged KV cache -> sampler -> text, for one conversation or a batch (continuously batched by the engine)."""
from __future__ import annotations

import functools
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

from .engine.async_llm import carries_media
from .engine.sequence import Sequence
from .errors import PromptError
from .outputs import RequestOutput
from .sampling import SamplingParams


@functools.lru_cache(maxsize=2)
def _preprocess_pool(media: bool) -> ThreadPoolExecutor:
    """Threads that preprocess batches; media requests (which may wait on URL fetches) have their own, so that
    text-only requests never queue behind slow URLs."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                              thread_name_prefix=f"internvl-preprocess-{'media' if media else 'text'}")


class TextStream:
    """Iterator over text deltas of one request; `.output` holds the RequestOutput once it is exhausted."""

    def __init__(self, steps: Iterator[str]):
        self._steps = steps
        self.output: RequestOutput | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._steps)


class LLM:
    """Synchronous front end over one LLMEngine (`.engine`), for one caller at a time: concurrent callers share an
    engine through AsyncLLM. Settings are EngineConfig's fields (engine/config.py), validated there."""

    def __init__(self, model: str | os.PathLike, dtype="auto", device=None, **settings):
        from .engine.llm_engine import LLMEngine
        self.engine = LLMEngine(model, dtype, device, **settings)

    # read-only views of the engine: what it loaded and how it runs
    config = property(lambda self: self.engine.config, doc="ModelConfig of the checkpoint")
    engine_config = property(lambda self: self.engine.engine_config, doc="EngineConfig the engine was built with")
    processor = property(lambda self: self.engine.processor, doc="the Processor (template, tokenizer, media)")
    model = property(lambda self: self.engine.model, doc="the InternVLForConditionalGeneration module")
    runner = property(lambda self: self.engine.runner, doc="the ModelRunner (KV pool, CUDA graphs)")
    device = property(lambda self: self.engine.device)
    dtype = property(lambda self: self.engine.dtype)
    max_model_len = property(lambda self: self.engine.max_model_len, doc="longest sequence accepted, in tokens")

    def shutdown(self) -> None:
        """Release the engine's worker processes (tensor parallelism); the LLM is unusable afterwards."""
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end generation (checkpoint's eos ids and the tokenizer's); settable, validated."""
        return self.engine.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        self.engine.eos_token_ids = ids

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _as_batch(conversations) -> list:
        if isinstance(conversations, (str, dict)):
            return [conversations]
        if isinstance(conversations, list) and conversations and isinstance(conversations[0], dict) \
                and "role" in conversations[0]:
            return [conversations]
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise PromptError("expected a conversation (a list of messages) or a non-empty list of conversations")
        return list(conversations)

    def _make_sequence(self, conversation, params: SamplingParams, arrival: float, index: int,
                       add_generation_prompt: bool = True, check_capacity: bool = True) -> Sequence:
        rid = f"req-{index}-{uuid.uuid4().hex[:8]}"
        return self.engine.make_sequence(rid, conversation, params, arrival, f"request {index}", add_generation_prompt,
                                         check_capacity)

    def _sequences(self, conversations, params) -> list[Sequence]:
        batch = self._as_batch(conversations)
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(batch)
        if len(plist) != len(batch):
            raise PromptError(f"{len(plist)} SamplingParams for {len(batch)} conversations")
        for p in plist:
            if not isinstance(p, SamplingParams):
                raise PromptError(f"expected SamplingParams, got {type(p).__name__}")
            p.validate()
        arrival = time.perf_counter()
        def make(i):
            return self._make_sequence(batch[i], plist[i], arrival, i)
        if len(batch) == 1:
            return [make(0)]
        # preprocessing is host work on each request's critical path (image decode, resize, normalise, hash), and
        # most of it releases the GIL: spread a batch over threads, keep the order, raise the first error
        futures = [_preprocess_pool(carries_media(c)).submit(make, i) for i, c in enumerate(batch)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    # ------------------------------------------------------------------ the loop
    def _run(self, seqs: list[Sequence]) -> Iterator[list[RequestOutput]]:
        """Adds the sequences to the engine and steps it until they finish, yielding after each step. Their outputs
        are read off the sequences (`engine.output`), so they are "final_only": the engine builds no snapshot of
        them on the steps in between. Closing the iterator early aborts whatever is unfinished."""
        ids = {s.request_id for s in seqs}
        added = []
        try:
            for s in seqs:
                for x in s.group or [s]:
                    x.output_kind = "final_only"
                self.engine.add_sequence(s)
                added.append(s)
            while not all(self.engine.request_finished(s) for s in seqs):
                yield [o for o in self.engine.step() if o.request_id in ids]
        finally:
            for s in added:
                if not self.engine.request_finished(s):
                    self.engine.abort(s.request_id)

    # ------------------------------------------------------------------ public API
    def generate(self, conversations, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One conversation or a list of them -> one RequestOutput each, in order. Bad input raises before anything
        runs; a request that fails while running comes back with finish_reason "error" and `.error`, and the others
        are unaffected."""
        seqs = self._sequences(conversations, params)
        for _ in self._run(seqs):
            pass
        # read from the sequences: another thread stepping the same engine may have produced the final outputs
        return [self.engine.output(s) for s in seqs]

    def stream(self, conversation, params: SamplingParams | None = None) -> TextStream:
        """Text deltas of one conversation as they are produced; the stream's `.output` is set at the end.
        Bad input raises here, before the first delta. Deltas are read off the request's text, so none is lost when
        another thread's call steps the engine in between."""
        seqs = self._sequences(conversation, params)
        if len(seqs) != 1:
            raise PromptError("stream() takes one conversation")
        if seqs[0].params.n > 1:
            raise PromptError("stream() streams one sample; for n > 1 use generate() or AsyncLLM.generate()")
        seq = seqs[0]

        def steps():  # seq.text[:seq.sent] is what may be shown (the rest could start a stop string)
            sent = 0
            for _ in self._run(seqs):
                if seq.sent > sent:
                    yield seq.text[sent:seq.sent]
                    sent = seq.sent
            if seq.sent > sent:  # the step that finished it may have been another caller's
                yield seq.text[sent:seq.sent]
            stream.output = self.engine.output(seq)
            if seq.error is not None:  # it failed while running: RequestFailedError naming the stage
                raise seq.error

        stream = TextStream(steps())
        return stream

    def prompt_logits(self, conversation, add_generation_prompt: bool = True,
                      params: SamplingParams | None = None) -> torch.Tensor:
        """fp32 [prompt_len, vocab] logits of every prompt position, from one forward pass (no KV cache)."""
        return self.engine.prompt_logits(conversation, add_generation_prompt, params)
