"""LLMEngine: the serving core. Owns the model, processor, runner (with the paged KV pool and the sampler), the
BlockManager (prefix caching), the VisionCache and the continuous-batching Scheduler.

    engine.add_request(id, conversation, params)   # preprocess + validate now; typed errors raise here
    while engine.has_unfinished_requests():
        for out in engine.step(): ...               # one prefill or decode step; RequestOutput per touched request
    engine.abort(id)

A step is schedule (scheduler) -> execute (a plain-data StepInput through the runner, which samples) -> update
(scheduler: progress, prefix registration, finish rules; output processor: detokenised deltas, stop strings,
logprobs, the RequestOutput snapshots). Intake (encoding, checks, media spans) is input_processor's. Front ends
use add_request / make_sequence + add_sequence, step, abort, stats(), check_health, fail(why) and tokenizer;
these are serialised by one lock, so other threads may add or abort while a loop steps."""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import Callable

import torch

from ..config import load_model_config
from ..errors import EngineDeadError, InternVLEngineError, PromptError, RequestFailedError
from ..loader import load_model
from ..models.internvl import InternVLForConditionalGeneration
from ..ops import OpTable
from ..outputs import RequestOutput
from ..processor import Processor
from ..processor.tokenizer import builtin_tokenizer_json
from ..sampling import SamplingParams
from ..settings import EngineConfig, EngineConfigError, resolve_device, resolve_dtype
from ..worker.executor import ParallelRunner, launch
from ..worker.runner import ModelRunner
from ..worker.step_input import prompt_input
from ..worker.step_output import StepOutput
from .block_manager import BlockManager
from .faults import FaultInjector, Stage
from .features import ImageFeatures
from .health import Health
from .input_processor import InputProcessor
from .output_processor import OutputProcessor
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence
from .step_builder import decode_input, prefill_input, sampling_input
from .vision_cache import VisionCache


class DuplicateRequestError(InternVLEngineError, ValueError):
    """add_request() was given a request id that is still in the engine."""


@dataclass(slots=True)
class EngineStats:
    """What a front end may know of the engine at a glance (LLMEngine.stats()): taken under the engine's lock at
    the end of each step and whenever a request is added or aborted, so a reader never waits for a step."""
    running: int = 0               # sequences (samples) the scheduler is running
    waiting: int = 0               # waiting to be scheduled
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0        # unused or cached (evictable)
    kv_pool_tokens: int = 0        # kv_blocks_total * block_size
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache at admission
    prefix_cache_hits: int = 0     # of which were found cached
    vision_cache_hits: int = 0
    vision_cache_misses: int = 0
    num_request_errors: int = 0    # requests finished with "error" while running
    num_isolation_splits: int = 0  # failed steps rerun in halves to find the failing requests

    @classmethod
    def take(cls, scheduler: Scheduler, vision_cache: VisionCache | None, errors: int, splits: int) -> EngineStats:
        bm, vc = scheduler.bm, vision_cache
        return cls(len(scheduler.running), len(scheduler.waiting), bm.num_blocks, bm.num_free_blocks,
                   bm.num_blocks * bm.block_size, scheduler.num_preemptions, bm.prefix_query_tokens,
                   bm.prefix_hit_tokens, vc.hits if vc else 0, vc.misses if vc else 0, errors, splits)


def engine_config(model, dtype="auto", device=None, **settings) -> EngineConfig:
    """An EngineConfig from LLM-style arguments; an unknown setting is an error, not a silently ignored name."""
    if isinstance(model, EngineConfig):
        return model
    known = {f.name for f in fields(EngineConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise EngineConfigError(f"unknown engine setting(s) {unknown}; known: {sorted(known - {'model'})}")
    return EngineConfig(model, dtype, device, **settings)


def _kv_pool_blocks(cfg: EngineConfig, device: torch.device, kv_bytes_per_token: int) -> int:
    tokens = cfg.kv_cache_tokens
    if tokens is None and device.type == "cuda":
        torch.cuda.empty_cache()  # memory torch merely caches (e.g. a previous engine's pool) counts as free
        free, _ = torch.cuda.mem_get_info(device)
        tokens = max(cfg.block_size, int(free * cfg.gpu_memory_utilization) // kv_bytes_per_token)
    return max(1, (tokens or 16384) // cfg.block_size)


def _vision_cache(cfg: EngineConfig, device: torch.device) -> VisionCache | None:
    size = cfg.vision_cache_bytes
    if size is None:
        size = (256 if device.type == "cuda" else 64) << 20
    return VisionCache(size) if size > 0 else None


class LLMEngine:
    def __init__(self, model, dtype="auto", device=None, **settings):
        """`model` is an EngineConfig, or its `model` field with the other fields as keywords."""
        cfg = self.engine_config = engine_config(model, dtype, device, **settings)
        self.device = resolve_device(cfg.device)
        self.config, self.processor, checkpoint = self._load_config(cfg)
        if cfg.media_policy is not None:
            self.processor.media_policy = cfg.media_policy
        self.dtype = resolve_dtype(cfg.dtype, self.config, self.device)
        self.model = self._load_model(checkpoint, cfg.op_table(self.device), cfg.seed)
        self.max_model_len = min(cfg.max_model_len or self.config.max_model_len, self.config.max_model_len)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.limit_text(self.max_model_len)  # what cannot fit is refused before tokenising
        self.block_size = cfg.block_size
        self.runner = ModelRunner(self.model, self.device, self.dtype, cfg.block_size, cfg.decode_path)
        if self.executor is not None:
            self.runner = ParallelRunner(self.runner, self.executor)
        self.cache = self.runner.allocate_pool(_kv_pool_blocks(cfg, self.device, self.runner.kv_bytes_per_token()))
        self.block_manager = BlockManager(self.cache.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.inputs = InputProcessor(self.processor, self.config, self.max_model_len, cfg.max_prompt_chars,
                                     self.cache.num_blocks, cfg.block_size, self.device)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   set(self.config.eos_token_ids) | {self.tokenizer.eos_token_id}, self.max_model_len)
        self.enforce_eager = cfg.enforce_eager or self.device.type != "cuda" or cfg.tensor_parallel_size > 1
        if not self.enforce_eager:  # decode graphs for the batch ladder, over this pool (worker/cuda_graphs.py)
            self.runner.enable_graphs(self.cache, cfg.max_num_seqs, -(-self.max_model_len // cfg.block_size),
                                      vision=cfg.vision_graphs, sample=cfg.decode_path == "fused")
        self.vision_cache = _vision_cache(cfg, self.device)
        self.faults = FaultInjector()   # the fault-injection test hook (faults.py); empty in service
        self._stage = Stage(self.faults)  # what the step is doing: named in a failed request's error
        self.features = ImageFeatures(self.runner, self.vision_cache, self.config.image_seq_length,
                                      lambda seqs: self._stage("vision", seqs))
        self._requests, self._aborted = {}, []  # request id -> its first sample; aborted heads not yet reported
        self._lock = threading.RLock()  # re-entrant: an abandoned stream may be collected (and abort) inside step()
        self.health = Health(self._lock, self.executor, self.device, self._finish_all)
        self.num_request_errors = self.num_isolation_splits = 0  # requests failed while running; steps rerun in halves
        self._publish_stats()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _load_config(cfg: EngineConfig):
        """(model config, processor, checkpoint dir or None for random:<preset>)."""
        config, checkpoint = load_model_config(cfg.model)
        if checkpoint is None:  # a random preset: the InternVL3 or 3.5 tokenizer, built without files
            return config, Processor.from_parts(builtin_tokenizer_json(config), None, model_config=config), None
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

    eos_token_ids = property(lambda self: self.scheduler.eos_token_ids,
                             lambda self, ids: self.scheduler.set_eos_token_ids(ids),
                             doc="token ids that end generation (the checkpoint's and the tokenizer's); settable")

    def stats(self) -> EngineStats:
        """The latest snapshot (EngineStats); never waits for a step in flight."""
        return self._stats

    def _publish_stats(self) -> None:  # under the lock
        self._stats = EngineStats.take(self.scheduler, self.vision_cache, self.num_request_errors,
                                       self.num_isolation_splits)

    # ------------------------------------------------------------------ health (health.py)
    def check_health(self) -> None:
        """Raises EngineDeadError, saying why, once the engine has hit a fault it cannot recover from."""
        self.health.check()

    def inject_fault(self, request_id: str, stage: str, error: BaseException | None = None, times: int | None = None,
                     fatal: bool = False) -> None:
        """Test hook: raise `error` (default: faults.InjectedFault) whenever a step reaches `stage` for `request_id`
        (stages in faults.STAGES; at most `times` times); fatal=True makes it a fault the engine cannot recover
        from."""
        self.faults.add(request_id, stage, error, times, fatal)

    def fail(self, why: str) -> EngineDeadError:
        """A front end met a fault outside any request's stages (the engine cannot vouch for itself): the engine
        dies, every request it holds finishes with EngineDeadError; that error, to raise."""
        return self.health.fail(why)

    def _finish_all(self, dead: EngineDeadError) -> None:  # the engine died (under the lock)
        for head in list(self._requests.values()):
            for s in head.group or [head]:
                s.finish_reason, s.error = "error", dead
                self.scheduler.remove(s)
            self.output_processor.request_done(head)  # /metrics counts it as an error, once
        self._requests.clear()
        self._publish_stats()

    def shutdown_workers(self) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()

    def shutdown(self) -> None:
        """Stop the engine: tensor-parallel workers are told to leave and joined (none is left behind; this also
        runs at interpreter exit). Every later call raises EngineDeadError."""
        self.shutdown_workers()  # first, outside the lock: it kills the workers of a hung step, which frees the lock
        self.health.fail("the engine was shut down")

    # ------------------------------------------------------------------ requests
    def make_sequence(self, request_id: str, conversation, params: SamplingParams, arrival: float, what: str,
                      add_generation_prompt: bool = True, check_capacity: bool = True,
                      output_kind: str | None = None) -> Sequence:
        """Preprocess and check one request (input_processor; typed errors, nothing changes in the engine).
        output_kind: what the caller reads (default params.output_kind)."""
        self.check_health()
        self.faults.check("preprocess", (request_id,))
        return self.inputs.make_sequence(request_id, conversation, params, arrival, what, add_generation_prompt,
                                         check_capacity, output_kind)

    def add_sequence(self, seq: Sequence, sink: Callable[[RequestOutput], None] | None = None) -> None:
        """sink(output) takes the request's outputs, not step()'s caller (under the lock: never blocks or raises)."""
        with self._lock:
            seq.out.sink = sink
            self.check_health()
            if seq.request_id in self._requests:
                raise DuplicateRequestError(f"request id {seq.request_id!r} is already in the engine")
            self._requests[seq.request_id] = seq
            self.scheduler.add(seq)
            self._publish_stats()

    def add_request(self, request_id: str, conversation, params: SamplingParams | None = None,
                    output_kind: str | None = None, sink: Callable[[RequestOutput], None] | None = None) -> None:
        if not isinstance(request_id, str):
            raise PromptError(f"request_id must be a string, got {type(request_id).__name__}")
        with self._lock:
            if request_id in self._requests:
                raise DuplicateRequestError(f"request id {request_id!r} is already in the engine")
        self.add_sequence(self.make_sequence(request_id, conversation, SamplingParams() if params is None else params,
                                             time.perf_counter(), f"request {request_id}", output_kind=output_kind), sink)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            head = self._requests.pop(request_id, None)
            if head is None:
                return False
            for s in head.group or [head]:
                self.scheduler.remove(s)
                if not s.finished:
                    s.finish_reason = "abort"
                    self.output_processor.aborted(s)
            self.output_processor.request_done(head)
            self._aborted.append(head)
            self._publish_stats()
            return True

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished() or bool(self._aborted)

    @torch.inference_mode()
    def prompt_logits(self, conversation, add_generation_prompt: bool = True,
                      params: SamplingParams | None = None) -> torch.Tensor:
        """fp32 [prompt_len, vocab] logits of every prompt position, from one forward pass that writes no KV cache."""
        seq = self.make_sequence(f"prompt-logits-{uuid.uuid4().hex[:8]}", conversation, params or SamplingParams(),
                                 time.perf_counter(), "request 0", add_generation_prompt, check_capacity=False)
        with self._lock:
            self.check_health()
            feats = self.runner.vision(seq.pixel_values) if seq.media else None
            return self.runner.logits(prompt_input(seq.prompt_ids, seq.media, feats))

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        with self._lock:
            self.check_health()
            done, self._aborted = self._aborted, []
            sched = self.scheduler.schedule()
            done += [self._fail(s, "schedule", e) for s, e in sched.failed]
            if not sched.empty:
                done += self._run(sched)
            self._publish_stats()
            return self.output_processor.outputs(done)

    def _run(self, sched: SchedulerOutput) -> list[Sequence]:
        """Execute a scheduled step and update from it. When it raises, its requests run again in halves until a
        failure is down to one request, which alone finishes with an error; the others' tokens do not depend on
        what they are batched with, so they come out as they would have without it."""
        sampled = self.scheduler.sampling(sched)
        # A failed attempt may have drawn from seeded generators already (rows before the failing one, or a half
        # that failed): reruns start from these states, so a seeded request's tokens never depend on a failure.
        seeded = [(s.generator, s.generator.get_state()) for s in sampled if s.generator is not None]
        try:
            out = self._execute(sched, sampled)
        except Exception as e:
            self.health.raise_if_fatal(e, self._stage.name)
            for generator, state in seeded:
                generator.set_state(state)
            if len(sched.sequences) == 1:
                return [self._fail(sched.sequences[0], self._stage.name, e)]
            self.num_isolation_splits += 1
            return [s for part in sched.halves() for s in self._run(part)]
        self.scheduler.postprocess(sched, sampled, out.tokens, self.inputs.structured)
        for k, s in enumerate(sampled):
            try:
                self._stage("detokenize", (s,))
                self.output_processor.token_added(s, out.logprobs[k], out.logits[k])
                if s.finish_reason is not None:
                    self.scheduler.remove(s)  # a stop string ends it here, after the scheduler's token rules
                    self._request_done(s)
            except Exception as e:
                self._fail(s, "detokenize", e)
            if s.index == 0 and len(s.group) > 1 and len(s.output_ids) == 1:
                self.scheduler.add_front(s.group[1:])  # their prompt blocks are cached now
        return sampled

    def _execute(self, sched: SchedulerOutput, sampled: list[Sequence]) -> StepOutput:
        """The step on the runner: its forward, a token per sampled sequence, and the logprobs and logits asked for."""
        with self._stage("step", sched.sequences):  # the features of a prefill may run the vision tower ("vision")
            step = (prefill_input(sched.chunks, self.block_manager, self.features(sched.chunks)) if sched.is_prefill
                    else decode_input(sched.decode, self.block_manager))
            step.sampling = sampling_input(sampled, self.scheduler.eos_token_ids, self.inputs.structured)
        t0 = time.perf_counter()  # prefill_s excludes the vision tower (vision_s)
        with self._stage("prefill" if sched.is_prefill else "decode", sched.sequences):
            out = self.runner.execute(step)  # a sampler failure inside it is named by the forward's stage
        if sampled:  # after the draw: an injected sampling fault finds the generators advanced, as a real one may
            self._stage("sample", sampled)
        if step.prompt_rows:
            self.output_processor.prompt_logprobs(sched.chunks, step.prompt_rows, out.prompt_logprobs)
        self.scheduler.charge(sched, time.perf_counter() - t0)
        return out

    def _fail(self, s: Sequence, stage: str, cause: Exception) -> Sequence:
        error = RequestFailedError(s.head.request_id, stage, cause)
        waiting = s.group[1:] if s.index == 0 and not s.output_ids else []  # samples that never started fail too
        for x in [s, *waiting]:
            x.finish_reason, x.error = "error", error
            self.scheduler.remove(x)  # frees its blocks
        self.num_request_errors += 1
        self._request_done(s)
        if s.request_finished:  # an injected fault lasts until its request ends (all its samples)
            self.faults.clear(s.request_id)
        return s

    def _request_done(self, s: Sequence) -> None:
        head = s.head
        if s.request_finished:
            if self._requests.get(head.request_id) is head:  # the id is a label: only this request's entry
                del self._requests[head.request_id]
            self.output_processor.request_done(head)
