"""LLM: the synchronous front end over LLMEngine. conversation -> Processor -> vision tower -> projector ->
decoder with a paged KV cache -> sampler -> text, for one conversation or a batch (continuously batched by the
engine)."""
from __future__ import annotations

import collections
import functools
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

from .engine.async_llm import carries_media, merge_deltas
from .engine.llm_engine import LLMEngine
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
    """Synchronous front end over one LLMEngine (`.engine`). Calls from several threads are safe (each call's
    outputs reach it whichever call stepped the engine), but concurrent serving is AsyncLLM's. Settings are
    EngineConfig's fields (settings.py), validated there."""

    def __init__(self, model: str | os.PathLike, dtype="auto", device=None, **settings):
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

    def _rendered(self, conversation, chat_template_kwargs, add_generation_prompt: bool = True):
        """The request as the engine takes it: rendered with chat_template_kwargs (the engine's intake renders
        without variables)."""
        return self.engine.processor.with_template_variables(conversation, chat_template_kwargs, add_generation_prompt)

    def _sequences(self, conversations, params, output_kind: str | None = None,
                   chat_template_kwargs: dict | None = None) -> list[Sequence]:
        """The batch's sequences (the engine's intake checks each request and its SamplingParams); output_kind: what
        this call reads of them; chat_template_kwargs: template variables for every conversation of the batch."""
        batch = self._as_batch(conversations)
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(batch)
        if len(plist) != len(batch):
            raise PromptError(f"{len(plist)} SamplingParams for {len(batch)} conversations")
        arrival = time.perf_counter()

        def make(i):
            return self.engine.make_sequence(f"req-{i}-{uuid.uuid4().hex[:8]}",
                                             self._rendered(batch[i], chat_template_kwargs), plist[i], arrival,
                                             f"request {i}", output_kind=output_kind)
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
        """Adds the sequences to the engine and steps it until their final outputs are out, yielding their outputs
        after each step. Their outputs reach this call's inbox in order whichever thread steps the engine (another
        call's, an AsyncLLM loop over the same engine), so none is lost. Closing the iterator early aborts whatever
        is unfinished."""
        inbox: collections.deque[RequestOutput] = collections.deque()  # appended under the engine's lock
        pending, added = {s.request_id for s in seqs}, []
        try:
            for s in seqs:
                self.engine.add_sequence(s, inbox.append)
                added.append(s.request_id)
            while pending:
                self.engine.step()  # what it returns belongs to requests without a sink
                mine = [inbox.popleft() for _ in range(len(inbox))]
                pending.difference_update(o.request_id for o in mine if o.finished)
                yield mine
        finally:
            for rid in added:
                if rid in pending:
                    self.engine.abort(rid)

    # ------------------------------------------------------------------ public API
    def generate(self, conversations, params: SamplingParams | list[SamplingParams] | None = None,
                 chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation or a list of them -> one RequestOutput each, in order. A request is a conversation (a
        list of messages, or a string as one user message), a raw prompt {"prompt": text, "images"?, "videos"?} (no
        chat template) or a prompt of token ids {"prompt_token_ids": [...]} (vLLM's TokensPrompt: read as given, no
        media). Bad input raises before anything runs; a request that fails while running comes back with finish_reason "error" and `.error`, and the others
        are unaffected. chat_template_kwargs: the chat template's variables (vLLM's LLM.chat argument), e.g.
        {"enable_thinking": True} for InternVL3.5's thinking mode (Processor.thinking_mode)."""
        # "final_only": the engine snapshots each request once
        seqs = self._sequences(conversations, params, "final_only", chat_template_kwargs)
        final = {o.request_id: o for outputs in self._run(seqs) for o in outputs}
        return [final[s.request_id] for s in seqs]

    def stream(self, conversation, params: SamplingParams | None = None,
               chat_template_kwargs: dict | None = None) -> TextStream:
        """Text deltas of one conversation as they are produced (the request's "delta" outputs); the stream's
        `.output` (all of them merged) is set at the end. Bad input raises here, before the first delta."""
        seqs = self._sequences(conversation, params, "delta", chat_template_kwargs)
        if len(seqs) != 1:
            raise PromptError("stream() takes one conversation")
        if seqs[0].params.n > 1:
            raise PromptError("stream() streams one sample; for n > 1 use generate() or AsyncLLM.generate()")

        def steps():
            merged = None
            for outputs in self._run(seqs):
                for o in outputs:
                    merged = o if merged is None else merge_deltas(merged, o)
                    if o.text:
                        yield o.text
            stream.output = merged
            if merged.error is not None:  # it failed while running: RequestFailedError naming the stage
                raise merged.error

        stream = TextStream(steps())
        return stream

    def prompt_logits(self, conversation, add_generation_prompt: bool = True,
                      params: SamplingParams | None = None, chat_template_kwargs: dict | None = None) -> torch.Tensor:
        """fp32 [prompt_len, vocab] logits of every prompt position, from one forward pass (no KV cache)."""
        return self.engine.prompt_logits(self._rendered(conversation, chat_template_kwargs, add_generation_prompt),
                                         add_generation_prompt, params)
