"""LLM: the synchronous front end. conversation -> Processor -> vision tower -> projector -> Qwen2 with a KV cache
-> sampler -> text, for one conversation or a batch."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Iterator

import torch

from . import ops
from .config import ModelConfig
from .engine.runner import ModelRunner
from .engine.sequence import Sequence
from .errors import BackendError, CheckpointError, InternVLEngineError, PromptError
from .loader import load_weights
from .models.internvl import InternVLForConditionalGeneration
from .outputs import RequestMetrics, RequestOutput
from .processor import Processor
from .processor.tokenizer import IncrementalDetokenizer
from .sampling import Sampler, SamplingParams

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
    def __init__(self, model: str | os.PathLike, dtype="auto", device=None, *, max_model_len: int | None = None,
                 seed: int = 0, block_size: int = 16, backend: str = "auto"):
        if max_model_len is not None and (not isinstance(max_model_len, int) or isinstance(max_model_len, bool)
                                          or max_model_len < 2):
            raise InternVLEngineError(f"max_model_len must be None or an integer >= 2, got {max_model_len!r}")
        self.device = resolve_device(device)
        ops.resolve(backend, self.device)  # an unavailable kernel backend fails here, before any weight is read
        if isinstance(model, str) and model.startswith("random:"):
            from .processor.tokenizer import build_internvl3_tokenizer_json
            from .random_model import init_random_, preset_config
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
        self.runner = ModelRunner(net, self.device, self.dtype, block_size, backend)
        self.sampler = Sampler()
        tok = self.processor.tokenizer
        self.eos_token_ids = set(self.config.eos_token_ids) | {tok.eos_token_id}

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

    def _make_sequence(self, conversation, params: SamplingParams, arrival: float, index: int,
                       add_generation_prompt: bool = True) -> Sequence:
        t0 = time.perf_counter()
        try:
            enc = self._encode(conversation, params, add_generation_prompt)
        except InternVLEngineError as e:  # name the request: in a batch, "image 0" alone is ambiguous
            raise type(e)(f"request {index}: {e}") from e
        rid = f"req-{index}-{uuid.uuid4().hex[:8]}"
        self._check_prompt(enc.input_ids, f"request {index}")
        metrics = RequestMetrics(arrival_time=arrival, preprocess_s=time.perf_counter() - t0,
                                 prompt_tokens=len(enc.input_ids), num_images=len(enc.num_patches),
                                 num_tiles=sum(enc.num_patches))
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        return Sequence(rid, enc.input_ids, params, IncrementalDetokenizer(self.processor.tokenizer,
                                                                           params.skip_special_tokens),
                        metrics, pixel_values=enc.pixel_values, generator=gen)

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
        return [self._make_sequence(c, p, arrival, i) for i, (c, p) in enumerate(zip(batch, plist))]

    # ------------------------------------------------------------------ the loop
    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _vision(self, seqs: list[Sequence]) -> None:
        with_images = [s for s in seqs if s.pixel_values is not None and s.pixel_values.shape[0]]
        if not with_images:
            return
        t0 = time.perf_counter()
        feats = self.runner.vision(torch.cat([s.pixel_values for s in with_images]))
        self._sync()
        dt = time.perf_counter() - t0
        per_tile = self.config.image_seq_length
        offset = 0
        for s in with_images:
            n = s.pixel_values.shape[0] * per_tile
            s.image_features, offset = feats[offset:offset + n], offset + n
            s.pixel_values = None
            s.metrics.vision_s = dt

    def _append(self, seq: Sequence, token: int, logits: torch.Tensor | None) -> str:
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
        seq.text += delta
        return delta

    def _run(self, seqs: list[Sequence]) -> Iterator[list[tuple[Sequence, str]]]:
        """Runs the batch to completion, yielding (sequence, text delta) pairs after every step."""
        self._vision(seqs)
        cache = self.runner.new_cache([min(len(s.prompt_ids) + s.params.max_tokens, self.max_model_len)
                                       for s in seqs])
        for s in seqs:
            s.block_table = cache.allocate(min(len(s.prompt_ids) + s.params.max_tokens, self.max_model_len))
        t0 = time.perf_counter()
        logits = self.runner.prefill(seqs, cache)
        tokens = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        now = time.perf_counter()
        step = []
        for i, s in enumerate(seqs):
            s.metrics.prefill_s = now - t0
            s.metrics.ttft_s = now - s.metrics.arrival_time
            step.append((s, self._append(s, tokens[i], logits[i] if s.params.return_logits else None)))
        yield step
        running = [s for s in seqs if not s.finished]
        while running:
            t0 = time.perf_counter()
            logits = self.runner.decode(running, cache)
            tokens = self.sampler(logits, [s.params for s in running], [s.generator for s in running]).tolist()
            dt = time.perf_counter() - t0
            step = []
            for i, s in enumerate(running):
                s.metrics.decode_s += dt
                step.append((s, self._append(s, tokens[i], logits[i] if s.params.return_logits else None)))
            yield step
            running = [s for s in running if not s.finished]

    def _output(self, s: Sequence) -> RequestOutput:
        m = s.metrics
        m.generated_tokens = len(s.output_ids)
        m.tpot_s = m.decode_s / max(1, m.generated_tokens - 1)
        m.e2e_s = time.perf_counter() - m.arrival_time
        logits = torch.stack(s.step_logits) if s.step_logits else None
        return RequestOutput(s.request_id, s.text, list(s.output_ids), list(s.prompt_ids), s.finish_reason, m, logits)

    # ------------------------------------------------------------------ public API
    def generate(self, conversations, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One conversation or a list of them -> one RequestOutput each, in order."""
        seqs = self._sequences(conversations, params)
        for _ in self._run(seqs):
            pass
        return [self._output(s) for s in seqs]

    def stream(self, conversation, params: SamplingParams | None = None) -> TextStream:
        """Text deltas of one conversation as they are produced; the stream's `.output` is set at the end.
        Bad input raises here, before the first delta."""
        seqs = self._sequences(conversation, params)
        if len(seqs) != 1:
            raise PromptError("stream() takes one conversation")

        def steps():
            for step in self._run(seqs):
                for _, delta in step:
                    if delta:
                        yield delta
            stream.output = self._output(seqs[0])

        stream = TextStream(steps())
        return stream

    @torch.inference_mode()
    def prompt_logits(self, conversation, add_generation_prompt: bool = True,
                      params: SamplingParams | None = None) -> torch.Tensor:
        """fp32 [prompt_len, vocab] logits of every prompt position, from one forward pass (no KV cache)."""
        params = params or SamplingParams()
        params.validate()
        seq = self._make_sequence(conversation, params, time.perf_counter(), 0, add_generation_prompt)
        self._vision([seq])
        return self.runner.prefill([seq], None, all_logits=True).cpu()
