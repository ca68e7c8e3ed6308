"""LLMEngine: the serving core. Owns the model, processor, runner (with the paged KV pool), sampler, the
BlockManager (prefix caching), the VisionCache and the continuous-batching Scheduler.

    engine.add_request(id, conversation, params)   # preprocess + validate now; typed errors raise here
    while engine.has_unfinished_requests():
        for out in engine.step(): ...               # one prefill or decode step; RequestOutput per touched request
    engine.abort(id)

A step is schedule (scheduler) -> execute (a plain-data StepInput through the runner, then the sampler) ->
postprocess (scheduler: progress, prefix registration, finish rules) -> outputs (detokenised deltas, metrics).
add_request / abort / step / prompt_logits are serialised by one lock, so other threads may add or abort while a
loop steps."""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import fields

import torch

from ..config import load_model_config
from ..errors import CheckpointError, EngineDeadError, InternVLEngineError, PromptError, RequestFailedError
from ..worker.executor import ParallelRunner, launch
from ..loader import load_model
from ..models.internvl import InternVLForConditionalGeneration
from ..ops import OpTable
from ..outputs import RequestMetrics, RequestOutput
from ..processor import Processor
from ..processor.tokenizer import build_internvl3_tokenizer_json
from ..processor.tokenizer import IncrementalDetokenizer
from ..sampling import SamplingParams, seed_for
from .block_manager import BlockManager, MediaSpan, media_key
from .faults import FaultInjector, InjectedFatalFault
from .output_processor import OutputProcessor
from ..settings import EngineConfig, EngineConfigError, resolve_device, resolve_dtype
from ..worker.runner import ModelRunner
from ..worker.step_output import StepOutput
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence
from ..worker.step_input import prompt_input
from .step_builder import decode_input, prefill_input, sampling_input
from .features import ImageFeatures
from .vision_cache import VisionCache


class CapacityError(PromptError):
    """A request cannot fit in the whole KV pool even alone (raise kv_cache_tokens or lower max_tokens)."""


class DuplicateRequestError(InternVLEngineError, ValueError):
    """add_request() was given a request id that is still in the engine."""


def _text_chars(conversation) -> int:
    """Characters of a request's own text (a string, a raw prompt, the text of its messages), counted without
    copying anything: what max_prompt_chars bounds."""
    if isinstance(conversation, str):
        return len(conversation)
    if isinstance(conversation, dict):
        prompt = conversation.get("prompt")
        return len(prompt) if isinstance(prompt, str) else 0
    n = 0
    for message in conversation if isinstance(conversation, (list, tuple)) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            n += len(content)
        elif isinstance(content, (list, tuple)):
            for item in content:
                text = item.get("text") if isinstance(item, dict) and item.get("type") == "text" else item
                n += len(text) if isinstance(text, str) else 0
    return n


def engine_config(model, dtype="auto", device=None, **settings) -> EngineConfig:
    """An EngineConfig from LLM-style arguments; an unknown setting is an error, not a silently ignored name."""
    if isinstance(model, EngineConfig):
        return model
    known = {f.name for f in fields(EngineConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise EngineConfigError(f"unknown engine setting(s) {unknown}; known: {sorted(known - {'model'})}")
    return EngineConfig(model, dtype, device, **settings)


class LLMEngine:
    def __init__(self, model, dtype="auto", device=None, **settings):
        """`model` is an EngineConfig, or its `model` field with the other fields as keywords."""
        cfg = self.engine_config = engine_config(model, dtype, device, **settings)
        self.device = resolve_device(cfg.device)
        ops = cfg.op_table(self.device)
        self.config, self.processor, checkpoint = self._load_config(cfg)
        self.dtype = resolve_dtype(cfg.dtype, self.config, self.device)
        self.model = self._load_model(checkpoint, ops, cfg.seed)
        self.max_model_len = min(cfg.max_model_len or self.config.max_model_len, self.config.max_model_len)
        self.processor.tokenizer.limit_text(self.max_model_len)  # what cannot fit is refused before tokenising
        self.block_size = cfg.block_size
        self.runner = self._make_runner(cfg)
        self.output_processor = OutputProcessor(self.processor.tokenizer)
        if cfg.media_policy is not None:
            self.processor.media_policy = cfg.media_policy
        self.cache = self.runner.allocate_pool(self._pool_blocks(cfg))
        self.block_manager = BlockManager(self.cache.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        eos = set(self.config.eos_token_ids) | {self.processor.tokenizer.eos_token_id}
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, eos,
                                   self.max_model_len)
        self.enforce_eager = cfg.enforce_eager or self.device.type != "cuda" or cfg.tensor_parallel_size > 1
        if not self.enforce_eager:  # decode graphs for the batch ladder, over this pool (cuda_graphs.py)
            self.runner.enable_graphs(self.cache, cfg.max_num_seqs, -(-self.max_model_len // cfg.block_size),
                                      vision=cfg.vision_graphs)
        vision_bytes = cfg.vision_cache_bytes
        if vision_bytes is None:
            vision_bytes = (256 if self.device.type == "cuda" else 64) << 20
        self.vision_cache = VisionCache(vision_bytes) if vision_bytes > 0 else None
        self.features = ImageFeatures(self.runner, self.vision_cache, self.config.image_seq_length, self._on_vision)
        self._requests: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        self._lock = threading.RLock()  # re-entrant: an abandoned stream may be collected (and abort) inside step()
        self.faults = FaultInjector()   # the fault-injection test hook (faults.py); empty in service
        self._stage = ""                # what the current step is doing, named in a failed request's error
        self._dead: str | None = None   # why the engine died (EngineDeadError from then on)
        self.num_request_errors = 0     # requests finished with "error" while running
        self.num_isolation_splits = 0   # failed steps rerun in halves to find the failing requests

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _load_config(cfg: EngineConfig):
        """(model config, processor, checkpoint dir or None for random:<preset>)."""
        config, checkpoint = load_model_config(cfg.model)
        if checkpoint is None:  # a random preset: the InternVL3 tokenizer, built without files
            return config, Processor.from_parts(build_internvl3_tokenizer_json(), None, model_config=config), None
        # the processor follows the model and must agree with it
        return config, Processor.from_pretrained(checkpoint, model_config=config), checkpoint

    def _load_model(self, checkpoint, ops: OpTable, seed: int) -> InternVLForConditionalGeneration:
        """The driver's model; under tensor parallelism its shard, once the workers it starts have loaded theirs."""
        self.executor = launch(self.engine_config, self.config, self.device, self.dtype)  # None with one rank
        try:
            net = load_model(self.config, checkpoint, ops, self.device, self.dtype, seed,
                             None if self.executor is None else self.executor.tp)
            if self.executor is not None:
                self.executor.wait_ready()
        except BaseException:
            self.shutdown_workers()
            raise
        return net

    def _make_runner(self, cfg: EngineConfig):
        runner = ModelRunner(self.model, self.device, self.dtype, cfg.block_size)
        return runner if self.executor is None else ParallelRunner(runner, self.executor)

    def shutdown_workers(self) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()

    def shutdown(self) -> None:
        """Stop the engine: tensor-parallel workers are told to leave and joined (none is left behind; this also
        runs at interpreter exit). Every later call raises EngineDeadError."""
        self.shutdown_workers()  # first, outside the lock: it kills the workers of a hung step, which frees the lock
        with self._lock:
            if self._dead is None:
                self._die("the engine was shut down")

    def _pool_blocks(self, cfg: EngineConfig) -> int:
        tokens = cfg.kv_cache_tokens
        if tokens is None and self.device.type == "cuda":
            torch.cuda.empty_cache()  # memory torch merely caches (e.g. a previous engine's pool) counts as free
            free, _ = torch.cuda.mem_get_info(self.device)
            tokens = max(cfg.block_size, int(free * cfg.gpu_memory_utilization) // self.runner.kv_bytes_per_token())
        return max(1, (tokens or 16384) // cfg.block_size)

    @property
    def eos_token_ids(self) -> set[int]:
        return self.scheduler.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids) -> None:
        ids = set(ids)
        if any(not isinstance(i, int) or i < 0 for i in ids):
            raise EngineConfigError(f"eos_token_ids must be non-negative integers, got {sorted(ids, key=str)}")
        self.scheduler.eos_token_ids = ids

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # ------------------------------------------------------------------ health
    def check_health(self) -> None:
        """Raises EngineDeadError, saying why, once the engine has hit a fault it cannot recover from."""
        reason = None if self.executor is None else self.executor.dead_reason  # a worker died, raised or hung
        if self._dead is None and reason is not None:
            if not self._lock.acquire(blocking=False):  # a step hung on a worker holds it: answer without waiting
                raise EngineDeadError(f"the engine is dead: {reason}")
            try:
                if self._dead is None:
                    self._die(reason)
            finally:
                self._lock.release()
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead}")

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def inject_fault(self, request_id: str, stage: str, error: BaseException | None = None, times: int | None = None,
                     fatal: bool = False) -> None:
        """Test hook: raise `error` (default: faults.InjectedFault) whenever a step reaches `stage` for `request_id`
        (stages in faults.STAGES; at most `times` times); fatal=True makes it a fault the engine cannot recover
        from."""
        self.faults.add(request_id, stage, error, times, fatal)

    def _die(self, why: str) -> EngineDeadError:
        """Mark the engine dead and finish every request it holds with the error; the error to raise."""
        self._dead = why
        dead = EngineDeadError(f"the engine is dead: {why}")
        for head in list(self._requests.values()):
            for s in head.group or [head]:
                s.finish_reason, s.error = "error", dead
                self.scheduler.remove(s)
        self._requests.clear()
        return dead

    # ------------------------------------------------------------------ requests
    def _encode(self, conversation, params: SamplingParams, add_generation_prompt: bool = True):
        kwargs = dict(max_num_tiles=params.max_num_tiles, num_frames=params.num_frames)
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        self._check_text(conversation, add_generation_prompt)
        if isinstance(conversation, dict):  # raw prompt with <IMG_CONTEXT> / <video> placeholders
            if "prompt" not in conversation:
                raise PromptError("a raw request must be a dict with a 'prompt' key (and optional 'images', 'videos')")
            return self.processor(text=conversation["prompt"], images=conversation.get("images"),
                                  videos=conversation.get("videos"), **kwargs)
        return self.processor(conversation, add_generation_prompt=add_generation_prompt, **kwargs)

    def _check_text(self, conversation, add_generation_prompt: bool) -> None:
        """Bound a request's text before the processor scans and tokenises it (seconds a megabyte): over
        max_prompt_chars, or a text that cannot fit in max_model_len tokens, is a PromptError at once."""
        n = _text_chars(conversation)
        limit = self.engine_config.max_prompt_chars
        if limit is not None and n > limit:
            raise PromptError(f"the text has {n} characters, over the {limit} limit (max_prompt_chars)")
        if n > self.max_model_len:  # long enough to be worth measuring: the very text the processor will tokenise
            raw = isinstance(conversation, dict)
            text = conversation.get("prompt") if raw else self.processor.apply_chat_template(
                conversation, add_generation_prompt)
            if isinstance(text, str):
                self.processor.tokenizer.check_text(text)

    def _check_prompt(self, ids: list[int], what: str) -> None:
        if not ids:
            raise PromptError(f"{what}: the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptError(f"{what}: prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                              "tokens (max_model_len); use fewer or smaller images (max_num_tiles) or a shorter text")
        vocab = self.config.text.vocab_size
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise PromptError(f"{what}: token id {bad[0]} is outside the model's vocabulary ({vocab})")

    def _check_capacity(self, prompt_len: int, params: SamplingParams, what: str) -> None:
        need = min(prompt_len + params.max_tokens, self.max_model_len)
        if -(-need // self.block_size) > self.block_manager.num_blocks:
            pool = self.block_manager.num_blocks * self.block_size
            raise CapacityError(f"{what}: needs KV for {need} tokens (prompt {prompt_len} + max_tokens "
                                f"{params.max_tokens}) but the whole KV pool holds {pool} tokens (kv_cache_tokens); "
                                "raise kv_cache_tokens or lower max_tokens")

    def _media(self, enc, params: SamplingParams) -> list[MediaSpan]:
        """One span per image (or video frame), placed where the processor put its placeholders and keyed by the
        processor's digest of its uint8 pixels (a quarter of the float bytes to hash)."""
        per_tile = self.config.image_seq_length
        spans = []
        for (start, end), digest, n in zip(enc.image_spans, enc.media_digests, enc.num_patches, strict=True):
            if end - start != n * per_tile:
                raise CheckpointError(f"the processor placed {end - start} placeholder tokens for {n} tile(s) but the "
                                      f"model reads {per_tile} per tile (image_seq_length)")
            spans.append(MediaSpan(start, end, media_key(digest, max_num_tiles=params.max_num_tiles, num_patches=n)))
        return spans

    def make_sequence(self, request_id: str, conversation, params: SamplingParams, arrival: float, what: str,
                      add_generation_prompt: bool = True, check_capacity: bool = True) -> Sequence:
        """Preprocess and validate one request (typed errors, nothing changes in the engine)."""
        t0 = time.perf_counter()
        self.check_health()
        self.faults.check("preprocess", (request_id,))
        try:
            enc = self._encode(conversation, params, add_generation_prompt)
        except InternVLEngineError as e:  # name the request: in a batch, "image 0" alone is ambiguous
            raise type(e)(f"{what}: {e}") from e
        self._check_prompt(enc.input_ids, what)
        if check_capacity:
            self._check_capacity(len(enc.input_ids), params, what)
        metrics = RequestMetrics(arrival_time=arrival, prompt_tokens=len(enc.input_ids),
                                 num_images=len(enc.num_patches), num_tiles=sum(enc.num_patches))
        seq = self._sample(request_id, list(enc.input_ids), params, metrics, 0)
        seq.pixel_values, seq.num_patches = enc.pixel_values, list(enc.num_patches)
        seq.media = self._media(enc, params)
        seq.media_keys, seq.image_feats = [sp.key for sp in seq.media], [None] * len(seq.media)
        if params.n > 1:  # the other samples join the scheduler once the first has prefilled (they share its blocks)
            # every sample carries the caller's id as its label; the engine keys them by Sequence.seq_id
            seq.group = [seq] + [self._sample(request_id, seq.prompt_ids, params,
                                              RequestMetrics(**metrics.as_dict()), i) for i in range(1, params.n)]
            for child in seq.group[1:]:
                child.group = seq.group  # every sample finds its request (outputs go out under the first's id)
                child.pixel_values, child.num_patches, child.media = seq.pixel_values, seq.num_patches, seq.media
                child.media_keys, child.image_feats = seq.media_keys, seq.image_feats
        metrics.preprocess_s = time.perf_counter() - t0
        return seq

    def _sample(self, request_id: str, prompt_ids: list[int], params: SamplingParams, metrics: RequestMetrics,
                index: int) -> Sequence:
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(seed_for(params.seed, index))
        plain = not (params.penalized or params.min_tokens or params.logprobs is not None)
        return Sequence(request_id, prompt_ids, params,
                        IncrementalDetokenizer(self.processor.tokenizer, params.skip_special_tokens), metrics,
                        generator=gen, index=index, plain=plain, output_kind=params.output_kind)

    def add_sequence(self, seq: Sequence) -> None:
        with self._lock:
            self.check_health()
            if seq.request_id in self._requests:
                raise DuplicateRequestError(f"request id {seq.request_id!r} is already in the engine")
            self._requests[seq.request_id] = seq
            self.scheduler.add(seq)

    def add_request(self, request_id: str, conversation, params: SamplingParams | None = None) -> None:
        if not isinstance(request_id, str):
            raise PromptError(f"request_id must be a string, got {type(request_id).__name__}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise PromptError(f"expected SamplingParams, got {type(params).__name__}")
        params.validate()
        with self._lock:
            if request_id in self._requests:
                raise DuplicateRequestError(f"request id {request_id!r} is already in the engine")
        seq = self.make_sequence(request_id, conversation, params, time.perf_counter(), f"request {request_id}")
        self.add_sequence(seq)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            seq = self._requests.pop(request_id, None)
            if seq is None:
                return False
            for s in seq.group or [seq]:
                self.scheduler.remove(s)
                if not s.finished:
                    s.finish_reason = "abort"
                    s.text += s.detokenizer.flush()
                    self.output_processor.release(s)
            self._finish_metrics(seq)
            self._aborted.append(seq)
            return True

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished() or bool(self._aborted)

    @torch.inference_mode()
    def prompt_logits(self, conversation, add_generation_prompt: bool = True,
                      params: SamplingParams | None = None) -> torch.Tensor:
        """fp32 [prompt_len, vocab] logits of every prompt position, from one forward pass that writes no KV cache."""
        params = params or SamplingParams()
        params.validate()
        seq = self.make_sequence(f"prompt-logits-{uuid.uuid4().hex[:8]}", conversation, params, time.perf_counter(),
                                 "request 0", add_generation_prompt, check_capacity=False)
        with self._lock:
            self.check_health()
            feats = self.runner.vision(seq.pixel_values) if seq.media else None
            return self.runner.logits(prompt_input(seq.prompt_ids, seq.media, feats))

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        with self._lock:
            self.check_health()
            outputs = [self.output(s) for s in self._aborted]
            self._aborted.clear()
            sched = self._schedule()
            done = [self._fail(s, "schedule", e) for s, e in sched.failed]
            if not sched.empty:
                done += self._run(sched)
            return outputs + self._outputs(done)

    def _outputs(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """One snapshot per request the step touched (a request's samples share one); "final_only" requests only
        when they end."""
        touched = {id(h): h for h in map(self._head, seqs)}
        outputs = [self.output_processor.output(h) for h in touched.values()
                   if h.output_kind != "final_only" or self.request_finished(h)]
        for h in touched.values():  # a sample's delta belongs to the step that made it
            h.delta = ""
            for s in h.group:
                s.delta = ""
        return outputs

    @staticmethod
    def _head(s: Sequence) -> Sequence:
        """The request's first sample (the one that carries its id, prompt logprobs and metrics)."""
        return s.group[0] if s.index and s.group else s

    def _run(self, sched: SchedulerOutput) -> list[Sequence]:
        """Execute, postprocess and emit a scheduled step. When it raises, its requests run again in halves until a
        failure is down to one request, which alone finishes with an error; the others' tokens do not depend on
        what they are batched with, so they come out as they would have without it."""
        sampled = self.scheduler.sampling(sched)
        # A failed attempt may have drawn from seeded generators already (rows before the failing one, or a half
        # that failed): reruns start from these states, so a seeded request's tokens never depend on a failure.
        seeded = [(s.generator, s.generator.get_state()) for s in sampled if s.generator is not None]
        try:
            out = self._execute(sched, sampled)
        except Exception as e:
            self._raise_if_fatal(e)
            for generator, state in seeded:
                generator.set_state(state)
            if len(sched.sequences) == 1:
                return [self._fail(sched.sequences[0], self._stage, e)]
            self.num_isolation_splits += 1
            return [s for part in sched.halves() for s in self._run(part)]
        self.scheduler.postprocess(sched, sampled, out.tokens)
        for k, s in enumerate(sampled):
            self._emit_or_fail(s, out, k)
            if s.index == 0 and len(s.group) > 1 and len(s.output_ids) == 1:
                self.scheduler.add_front(s.group[1:])  # their prompt blocks are cached now
        return sampled

    def _raise_if_fatal(self, e: Exception) -> None:
        """A fault no rerun can survive (a sticky device error, an injected fatal one) kills the engine."""
        fatal = e if isinstance(e, (InjectedFatalFault, EngineDeadError)) else None  # e.g. a tensor-parallel worker died
        if fatal is None and self.device.type == "cuda":
            try:  # a sticky CUDA error poisons the context: every later call on the device fails too
                torch.cuda.synchronize(self.device)
            except Exception as sticky:
                fatal = sticky
        if fatal is not None:
            raise self._die(f"{self._stage}: {type(fatal).__name__}: {fatal}") from fatal

    def _on_vision(self, seqs: list[Sequence]) -> None:
        self._stage = "vision"
        self.faults.check("vision", seqs)

    def _fail(self, s: Sequence, stage: str, cause: Exception) -> Sequence:
        error = RequestFailedError(self._head(s).request_id, stage, cause)
        waiting = s.group[1:] if s.index == 0 and not s.output_ids else []  # samples that never started fail too
        for x in [s, *waiting]:
            x.finish_reason, x.error = "error", error
            self.scheduler.remove(x)  # frees its blocks
        self.num_request_errors += 1
        self._request_done(s)
        if self.request_finished(s):  # an injected fault lasts until its request ends (all its samples)
            self.faults.clear(s.request_id)
        return s

    def _request_done(self, s: Sequence) -> None:
        head = self._head(s)
        if all(x.finished for x in head.group or [head]):
            if self._requests.get(head.request_id) is head:  # the id is a label: only this request's entry
                del self._requests[head.request_id]
            self._finish_metrics(head)

    def _schedule(self) -> SchedulerOutput:
        sched = self.scheduler.schedule()
        if sched.empty and not sched.failed and self.scheduler.waiting and not self.scheduler.running:
            # checked at add time already; should it happen, the request fails, not the engine
            s = self.scheduler.waiting[0]
            self.scheduler.remove(s)
            sched.failed.append((s, CapacityError(f"request {s.request_id} does not fit in the KV pool")))
        now = time.perf_counter()
        for s in sched.admitted:
            if s.first_scheduled is None:  # first admission; a preempted sequence is re-admitted later
                s.first_scheduled = now
                s.metrics.queue_s = now - s.metrics.arrival_time
                s.metrics.cached_prompt_tokens = s.num_computed
                s.cached_image_ids |= {i for i, sp in enumerate(s.media) if sp.end <= s.num_computed}
                s.metrics.cached_images = len(s.cached_image_ids)
        return sched

    def _execute(self, sched: SchedulerOutput, sampled: list[Sequence]) -> StepOutput:
        """The step on the runner: its forward, a token per sampled sequence, and the logprobs and logits asked for."""
        faults = self.faults  # falsy unless a test injected something: then it names the step's sequences
        self._stage = "step"
        if faults:
            faults.check("step", sched.sequences)
        if sched.is_prefill:
            step = prefill_input(sched.chunks, self.block_manager, self.features(sched.chunks))
        else:
            step = decode_input(sched.decode, self.block_manager)
        step.sampling = sampling_input(sampled, self.scheduler.eos_token_ids)
        self._stage = "prefill" if sched.is_prefill else "decode"
        if faults:
            faults.check(self._stage, sched.sequences)
        t0 = time.perf_counter()  # prefill_s excludes the vision tower (vision_s)
        out = self.runner.execute(step)  # a sampler failure inside it is named by the forward's stage
        if sampled:
            self._stage = "sample"
            if faults:  # after the draw: an injected sampling fault finds the generators advanced, as a real one may
                faults.check("sample", sampled)
        if step.prompt_rows:
            self._prompt_logprobs(sched.chunks, step.prompt_rows, out.prompt_logprobs)
        dt = time.perf_counter() - t0
        if sched.is_prefill:
            for s, _, _ in sched.chunks:
                s.metrics.prefill_s += dt
        else:
            for s in sched.decode:
                s.metrics.decode_s += dt
        return out

    def _prompt_logprobs(self, chunks, prompt_rows, entries) -> None:
        """Record each prompt position once: a recomputed chunk's rows for positions recorded already are dropped."""
        for rows, got in zip(prompt_rows, entries):
            s = chunks[rows.chunk][0]
            if s.prompt_logprobs is None:
                s.prompt_logprobs = [None]
            for entry in got[max(0, len(s.prompt_logprobs) - rows.first):]:
                for t, lp in entry.items():
                    lp.decoded_token = self.processor.tokenizer.decode([t], skip_special_tokens=False)
                s.prompt_logprobs.append(entry)

    def _emit_or_fail(self, s: Sequence, out: StepOutput, row: int) -> None:
        try:
            self.faults.check("detokenize", (s,))
            self._emit(s, out, row)
        except Exception as e:
            self._fail(s, "detokenize", e)

    def _emit(self, s: Sequence, out: StepOutput, row: int) -> None:
        """Detokenise the token a step appended to `s` (stop strings may finish it here) and record its metrics."""
        if out.logits[row] is not None:
            s.step_logits.append(out.logits[row])
        if len(s.output_ids) == 1 and s.index == 0:
            s.metrics.ttft_s = time.perf_counter() - s.metrics.arrival_time
        self.output_processor.token_added(s, out.logprobs[row])
        if s.finished:
            self.scheduler.remove(s)  # a stop string ends it here, after the scheduler's token rules
            self._request_done(s)

    @staticmethod
    def _finish_metrics(s: Sequence) -> None:
        m = s.metrics
        m.tpot_s = m.decode_s / max(1, len(s.output_ids) - 1)
        m.e2e_s = time.perf_counter() - m.arrival_time

    def output(self, s: Sequence) -> RequestOutput:
        """The snapshot of the request `s` belongs to."""
        return self.output_processor.output(self._head(s))

    def request_finished(self, s: Sequence) -> bool:
        head = self._head(s)
        return all(x.finished for x in head.group or [head])
