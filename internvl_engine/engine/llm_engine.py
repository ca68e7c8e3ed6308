"""LLMEngine: the serving core. Owns the model, processor, runner, sampler, one persistent paged KV pool with its
BlockManager (prefix caching), the VisionCache and the continuous-batching Scheduler.

    engine.add_request(id, conversation, params)   # preprocess + validate now; typed errors raise here
    while engine.has_unfinished_requests():
        for out in engine.step(): ...               # one prefill or decode step; RequestOutput per touched request
    engine.abort(id)

add_request / abort / step are serialised by one lock, so other threads may add or abort while a loop steps."""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import torch

from .. import ops
from ..config import ModelConfig
from ..errors import BackendError, CheckpointError, InternVLEngineError, PromptError
from ..loader import load_weights
from ..models.internvl import InternVLForConditionalGeneration
from ..outputs import RequestMetrics, RequestOutput
from ..processor import Processor
from ..processor.tokenizer import IncrementalDetokenizer
from ..sampling import Sampler, SamplingParams
from .block_manager import BlockManager, MediaSpan, media_key, media_spans
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence
from .vision_cache import VisionCache


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device} requested but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise BackendError(f"device type {device.type!r} is not supported (cpu, cuda)")
    return device


def resolve_dtype(dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto": fp32 on the CPU (bf16 matmuls are slow there), else the checkpoint's dtype, bf16 if it names none."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise InternVLEngineError(f"dtype {dtype!r} is not supported; use one of auto, {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(str(config.torch_dtype).replace("torch.", ""), torch.bfloat16)


def _resolve_checkpoint(model: str | os.PathLike) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    if isinstance(model, str) and model.count("/") == 1 and not path.exists() and not model.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{model!r} is not a local directory; downloading hub ids needs the `hub` extra "
                                  "(pip install 'internvl-engine[hub]')") from None
        try:
            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
        except Exception as e:  # network or repository errors, surfaced with the id
            raise CheckpointError(f"cannot download {model!r} from the hub: {e}") from None
    raise CheckpointError(f"{model}: checkpoint directory not found")


class CapacityError(PromptError):
    """A request cannot fit in the whole KV pool even alone (raise kv_cache_tokens or lower max_tokens)."""


class DuplicateRequestError(InternVLEngineError, ValueError):
    """add_request() was given a request id that is still in the engine."""


def _positive_int(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InternVLEngineError(f"{name} must be an integer >= {minimum}, got {value!r}")


class LLMEngine:
    def __init__(self, model: str | os.PathLike, dtype="auto", device=None, *, max_model_len: int | None = None,
                 seed: int = 0, block_size: int = 16, backend: str = "auto", kv_cache_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 64, max_num_batched_tokens: int = 8192,
                 enable_prefix_caching: bool = True, vision_cache_bytes: int | None = None, enforce_eager: bool = False):
        if max_model_len is not None and (not isinstance(max_model_len, int) or isinstance(max_model_len, bool)
                                          or max_model_len < 2):
            raise InternVLEngineError(f"max_model_len must be None or an integer >= 2, got {max_model_len!r}")
        _positive_int("block_size", block_size)
        _positive_int("max_num_seqs", max_num_seqs)
        _positive_int("max_num_batched_tokens", max_num_batched_tokens, block_size)
        if kv_cache_tokens is not None:
            _positive_int("kv_cache_tokens", kv_cache_tokens, block_size)
        if not isinstance(gpu_memory_utilization, (int, float)) or not 0 < gpu_memory_utilization <= 1:
            raise InternVLEngineError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        self.device = resolve_device(device)
        ops.resolve(backend, self.device)  # an unavailable kernel backend fails here, before any weight is read
        if isinstance(model, str) and model.startswith("random:"):
            from ..processor.tokenizer import build_internvl3_tokenizer_json
            from ..random_model import init_random_, preset_config
            self.config = ModelConfig.from_dict(preset_config(model.split(":", 1)[1]), model)
            self.processor = Processor.from_parts(build_internvl3_tokenizer_json(), None)
            checkpoint = None
        else:
            checkpoint = _resolve_checkpoint(model)
            self.config = ModelConfig.from_pretrained(checkpoint)
            self.processor = Processor.from_pretrained(checkpoint)
        self.dtype = resolve_dtype(dtype, self.config, self.device)
        with torch.device("meta"):
            net = InternVLForConditionalGeneration(self.config)
        net.to_empty(device=self.device)
        net.to(self.dtype)
        if checkpoint is None:
            init_random_(net, seed)
        else:
            load_weights(net, checkpoint, self.dtype, self.device)
        self.model = net.eval()
        self.max_model_len = min(max_model_len or self.config.max_model_len, self.config.max_model_len)
        self.block_size = block_size
        self.runner = ModelRunner(net, self.device, self.dtype, block_size, backend)
        self.sampler = Sampler()
        tok = self.processor.tokenizer
        self.eos_token_ids = set(self.config.eos_token_ids) | {tok.eos_token_id}

        # ---- persistent paged KV pool + block manager
        if kv_cache_tokens is None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # memory torch merely caches (e.g. a previous engine's pool) counts as free
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_tokens = max(block_size, int(free * gpu_memory_utilization) // self.runner.kv_bytes_per_token())
            else:
                kv_cache_tokens = 16384
        num_blocks = max(1, kv_cache_tokens // block_size)
        self.cache = self.runner.new_pool(num_blocks)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.enforce_eager = bool(enforce_eager) or self.device.type != "cuda"
        if not self.enforce_eager:  # decode graphs for the batch ladder, over this pool (cuda_graphs.py)
            self.runner.enable_graphs(self.cache, max_num_seqs, -(-self.max_model_len // block_size))
        if vision_cache_bytes is None:
            vision_cache_bytes = (256 if self.device.type == "cuda" else 64) << 20
        self.vision_cache = VisionCache(vision_cache_bytes) if vision_cache_bytes > 0 else None
        self._requests: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        self._lock = threading.RLock()  # re-entrant: an abandoned stream may be collected (and abort) inside step()

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # ------------------------------------------------------------------ requests
    def _encode(self, conversation, params: SamplingParams, add_generation_prompt: bool = True):
        kwargs = dict(max_num_tiles=params.max_num_tiles, num_frames=params.num_frames)
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        if isinstance(conversation, dict):  # raw prompt with <IMG_CONTEXT> / <video> placeholders
            if "prompt" not in conversation:
                raise PromptError("a raw request must be a dict with a 'prompt' key (and optional 'images', 'videos')")
            return self.processor(text=conversation["prompt"], images=conversation.get("images"),
                                  videos=conversation.get("videos"), **kwargs)
        return self.processor(conversation, add_generation_prompt=add_generation_prompt, **kwargs)

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

    def make_sequence(self, request_id: str, conversation, params: SamplingParams, arrival: float, what: str,
                      add_generation_prompt: bool = True, check_capacity: bool = True) -> Sequence:
        """Preprocess and validate one request (typed errors, nothing changes in the engine)."""
        t0 = time.perf_counter()
        try:
            enc = self._encode(conversation, params, add_generation_prompt)
        except InternVLEngineError as e:  # name the request: in a batch, "image 0" alone is ambiguous
            raise type(e)(f"{what}: {e}") from e
        self._check_prompt(enc.input_ids, what)
        need = min(len(enc.input_ids) + params.max_tokens, self.max_model_len)
        pool = self.block_manager.num_blocks * self.block_size
        if check_capacity and -(-need // self.block_size) > self.block_manager.num_blocks:
            raise CapacityError(f"{what}: needs KV for {need} tokens (prompt {len(enc.input_ids)} + max_tokens "
                                f"{params.max_tokens}) but the whole KV pool holds {pool} tokens (kv_cache_tokens); "
                                "raise kv_cache_tokens or lower max_tokens")
        num_patches = list(enc.num_patches)
        metrics = RequestMetrics(arrival_time=arrival, prompt_tokens=len(enc.input_ids), num_images=len(num_patches),
                                 num_tiles=sum(num_patches))
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, list(enc.input_ids), params,
                       IncrementalDetokenizer(self.processor.tokenizer, params.skip_special_tokens), metrics,
                       pixel_values=enc.pixel_values, generator=gen, num_patches=num_patches)
        if num_patches and enc.pixel_values is not None:
            # keyed by the processor's digests of the uint8 pixels (a quarter of the float bytes to hash)
            keys = [media_key(d, max_num_tiles=params.max_num_tiles, num_patches=n)
                    for d, n in zip(enc.media_digests, num_patches, strict=True)]
            seq.media_keys, seq.image_feats = keys, [None] * len(keys)
            seq.media = self._spans(seq.prompt_ids, keys, num_patches)
        metrics.preprocess_s = time.perf_counter() - t0
        return seq

    def _spans(self, ids: list[int], keys: list[bytes], num_patches: list[int]) -> list[MediaSpan]:
        img = self.config.image_token_id
        try:
            spans = media_spans(ids, img, keys)
            per = self.config.image_seq_length
            if all(s.end - s.start == n * per for s, n in zip(spans, num_patches)):
                return spans
        except ValueError:
            pass
        # placeholder runs do not map one to one onto images (e.g. a raw prompt with adjacent images): one span over
        # all of them, keyed by every image, keeps prefix hashes exact; features are then handed out all at once
        pos = [i for i, t in enumerate(ids) if t == img]
        return [MediaSpan(pos[0], pos[-1] + 1, hashlib.blake2b(b"".join(keys), digest_size=32).digest())]

    def add_sequence(self, seq: Sequence) -> None:
        with self._lock:
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
            self.scheduler.remove(seq)
            seq.finish_reason, seq.delta = "abort", seq.detokenizer.flush()
            seq.text += seq.delta
            self._finish_metrics(seq)
            self._aborted.append(seq)
            return True

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished() or bool(self._aborted)

    # ------------------------------------------------------------------ the step
    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _features(self, chunks) -> list[torch.Tensor | None]:
        """Feature rows of the placeholders inside each chunk; runs the vision tower once for every needed image that
        is neither on its sequence nor in the vision cache."""
        need: list[tuple[Sequence, int]] = []
        for s, start, end in chunks:
            for i, sp in enumerate(s.media):
                if sp.start < end and sp.end > start and s.image_feats[i] is None:
                    need.append((s, i))
        if need:
            single = {id(s) for s, _ in need if len(s.media) != len(s.media_keys)}
            todo: list[tuple[Sequence, int]] = []   # (seq, image) missing from the vision cache
            for s, i in need:
                if id(s) in single:  # one span for all images: compute every image
                    todo += [(s, j) for j in range(len(s.media_keys))]
                    continue
                hit = self.vision_cache.get(s.media_keys[i]) if self.vision_cache is not None else None
                if hit is not None:
                    s.image_feats[i] = hit
                    s.cached_image_ids.add(i)
                    s.metrics.cached_images = len(s.cached_image_ids)
                else:
                    todo.append((s, i))
            if todo:
                t0 = time.perf_counter()
                pixels, rows = [], []
                for s, i in todo:
                    off = sum(s.num_patches[:i])
                    pixels.append(s.pixel_values[off:off + s.num_patches[i]])
                    rows.append(s.num_patches[i] * self.config.image_seq_length)
                feats = self.runner.vision(torch.cat(pixels))
                self._sync()
                dt = time.perf_counter() - t0
                for (s, i), f in zip(todo, torch.split(feats, rows)):
                    s.image_feats[i] = f = f.clone()
                    if id(s) not in single and self.vision_cache is not None:
                        self.vision_cache.put(s.media_keys[i], f)
                for s in {id(s): s for s, _ in todo}.values():
                    s.metrics.vision_s += dt
            for s in {id(s): s for s, _ in need}.values():
                if id(s) in single:  # keep one entry per span: the concatenation of all images
                    s.image_feats = [torch.cat(s.image_feats)]
        out = []
        for s, start, end in chunks:
            if not s.media:
                out.append(None)
                continue
            parts = []
            for i, sp in enumerate(s.media):
                lo, hi = max(start, sp.start), min(end, sp.end)
                if lo < hi:
                    parts.append(s.image_feats[i][lo - sp.start:hi - sp.start])
            out.append(torch.cat(parts) if parts else None)
        return out

    def _append(self, seq: Sequence, token: int, logits: torch.Tensor | None) -> None:
        seq.output_ids.append(token)
        if logits is not None:
            seq.step_logits.append(logits.cpu())
        p = seq.params
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        delta = seq.detokenizer.add([token])
        if seq.finished:
            delta += seq.detokenizer.flush()
            self._finish_metrics(seq)
        seq.text += delta
        seq.delta = delta

    @staticmethod
    def _finish_metrics(s: Sequence) -> None:
        m = s.metrics
        m.tpot_s = m.decode_s / max(1, len(s.output_ids) - 1)
        m.e2e_s = time.perf_counter() - m.arrival_time

    def output(self, s: Sequence) -> RequestOutput:
        m = s.metrics
        m.generated_tokens = len(s.output_ids)
        logits = torch.stack(s.step_logits) if s.step_logits and s.finished else None
        return RequestOutput(s.request_id, s.text, list(s.output_ids), list(s.prompt_ids), s.finish_reason,
                             RequestMetrics(**m.as_dict()), logits, s.delta)

    def step(self) -> list[RequestOutput]:
        with self._lock:
            outputs = [self.output(s) for s in self._aborted]
            self._aborted.clear()
            sched = self.scheduler.schedule()
            if sched.empty:
                if self.scheduler.waiting and not self.scheduler.running:  # cannot happen: checked at add time
                    s = self.scheduler.waiting[0]
                    raise CapacityError(f"request {s.request_id} does not fit in the KV pool")
                return outputs
            now = time.perf_counter()
            for s in sched.admitted:
                if s.first_scheduled is None:  # first admission; a preempted sequence is re-admitted later
                    s.first_scheduled = now
                    s.metrics.queue_s = now - s.metrics.arrival_time
                    s.metrics.cached_prompt_tokens = s.num_computed
                    if len(s.media) == len(s.media_keys):
                        s.cached_image_ids |= {i for i, sp in enumerate(s.media) if sp.end <= s.num_computed}
                        s.metrics.cached_images = len(s.cached_image_ids)
            sampled: list[tuple[Sequence, torch.Tensor]] = []
            if sched.is_prefill:
                feats = self._features(sched.chunks)
                t0 = time.perf_counter()  # prefill_s excludes the vision tower (vision_s)
                logits, last = self.runner.prefill_chunks(sched.chunks, self.cache, feats)
                finished_chunk = [sched.chunks[i][0] for i in last]
                if finished_chunk:
                    tokens = self.runner.to_host(self.sampler(logits, [s.params for s in finished_chunk],
                                                              [s.generator for s in finished_chunk]))
                # no sync for a chunk that samples nothing: the last chunk's token copy waits for all of them, so
                # the chunks' prefill_s still add up
                dt = time.perf_counter() - t0
                for s, start, end in sched.chunks:
                    s.num_computed = end
                    s.metrics.prefill_s += dt
                for k, s in enumerate(finished_chunk):
                    s.prefilled = True
                    self.block_manager.register_computed(s.request_id, s.token_ids, s.num_computed)
                    if not s.output_ids:
                        s.metrics.ttft_s = time.perf_counter() - s.metrics.arrival_time
                    self._append(s, tokens[k], logits[k] if s.params.return_logits else None)
                    sampled.append(s)
            else:
                seqs = sched.decode
                t0 = time.perf_counter()
                logits = self.runner.decode(seqs, self.cache)
                tokens = self.runner.to_host(self.sampler(logits, [s.params for s in seqs],
                                                          [s.generator for s in seqs]))
                dt = time.perf_counter() - t0
                for i, s in enumerate(seqs):
                    s.num_computed = s.num_tokens
                    if s.num_computed % self.block_size == 0:  # a block filled by decode: a follow-up turn reuses it
                        self.block_manager.register_computed(s.request_id, s.token_ids, s.num_computed)
                    s.metrics.decode_s += dt
                    self._append(s, tokens[i], logits[i] if s.params.return_logits else None)
                    sampled.append(s)
            for s in sampled:
                if s.finished:
                    self.scheduler.remove(s)
                    self._requests.pop(s.request_id, None)
                outputs.append(self.output(s))
            return outputs
