"""Intake: a request's conversation -> a checked Sequence, before anything in the engine changes. Encodes through
the Processor (chat template, media), bounds the text before tokenising it, checks the prompt (empty, context,
vocabulary) and that the request fits the KV pool, places one media span per image, validates the request's
SamplingParams (once, here: a caller may have changed them since they were made) and makes its samples. Every
refusal is a typed error naming the request."""
from __future__ import annotations

import time

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, InternVLEngineError, PromptError
from ..outputs import RequestMetrics
from ..processor import Encoding, Processor
from ..processor.tokenizer import IncrementalDetokenizer
from ..sampling import SamplingParams, seed_for
from ..structured import StructuredOutputs
from .block_manager import MediaSpan, media_key
from .output_processor import OutputState
from .sequence import Sequence


class CapacityError(PromptError):
    """A request cannot fit in the whole KV pool even alone (raise kv_cache_tokens or lower max_tokens)."""


def text_chars(conversation) -> int:
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


def token_ids_prompt(prompt: dict) -> list[int]:
    """The ids of a prompt given as tokens ({"prompt_token_ids": [...]}, vLLM's TokensPrompt): the model reads them
    as they are (no chat template, no special tokens added). Media are refused: their placeholder runs and pixels
    would have to be placed by the caller, which the processor does for a text prompt."""
    extra = sorted(set(prompt) - {"prompt_token_ids"})
    if extra:
        raise PromptError(f"a prompt of token ids takes no other keys (got {extra}); send images with a text prompt")
    ids = prompt["prompt_token_ids"]
    if not isinstance(ids, (list, tuple)) or not all(type(i) is int for i in ids):  # bool is no token id
        raise PromptError("prompt_token_ids must be a list of integers")
    return list(ids)


class InputProcessor:
    def __init__(self, processor: Processor, config: ModelConfig, max_model_len: int, max_prompt_chars: int | None,
                 num_blocks: int, block_size: int, device: torch.device):
        self.processor, self.config, self.device = processor, config, device
        self.max_model_len, self.max_prompt_chars = max_model_len, max_prompt_chars
        self.num_blocks, self.block_size = num_blocks, block_size
        eos = set(config.eos_token_ids) | {processor.tokenizer.eos_token_id}  # the scheduler's
        self.structured = StructuredOutputs(processor.tokenizer, config.text.vocab_size, eos, device)

    def make_sequence(self, request_id: str, conversation, params: SamplingParams, arrival: float, what: str,
                      add_generation_prompt: bool = True, check_capacity: bool = True,
                      output_kind: str | None = None) -> Sequence:
        """One request's Sequence (its first sample; the others in .group). output_kind: what the front end reads
        (default params.output_kind)."""
        t0 = time.perf_counter()
        if not isinstance(params, SamplingParams):
            raise PromptError(f"expected SamplingParams, got {type(params).__name__}")
        params.validate()
        self.structured.check(params, what)  # logit_bias ids in the vocabulary; the grammar compiles
        try:
            enc = self._encode(conversation, params, add_generation_prompt)
        except InternVLEngineError as e:  # name the request: in a batch, "image 0" alone is ambiguous
            raise type(e)(f"{what}: {e}") from e
        self._check_prompt(enc.input_ids, what)
        if check_capacity:
            self._check_capacity(len(enc.input_ids), params, what)
        metrics = RequestMetrics(arrival_time=arrival, prompt_tokens=len(enc.input_ids),
                                 num_images=len(enc.num_patches), num_tiles=sum(enc.num_patches))
        kind = output_kind or params.output_kind
        seq = self._sample(request_id, list(enc.input_ids), params, metrics, 0, kind)
        seq.pixel_values, seq.num_patches = enc.pixel_values, list(enc.num_patches)
        seq.media = self._media(enc, params)
        seq.image_feats = [None] * len(seq.media)
        if params.n > 1:  # the other samples join the scheduler once the first has prefilled (they share its blocks)
            # every sample carries the caller's id as its label; the engine keys them by Sequence.seq_id
            seq.group = [seq] + [self._sample(request_id, seq.prompt_ids, params,
                                              metrics.copy(), i, kind) for i in range(1, params.n)]
            for child in seq.group[1:]:
                child.group = seq.group  # every sample finds its request (outputs go out under the first's id)
                child.pixel_values, child.num_patches, child.media = seq.pixel_values, seq.num_patches, seq.media
                child.image_feats = seq.image_feats
        metrics.preprocess_s = time.perf_counter() - t0
        return seq

    def _sample(self, request_id: str, prompt_ids: list[int], params: SamplingParams, metrics: RequestMetrics,
                index: int, output_kind: str) -> Sequence:
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(seed_for(params.seed, index))
        detokenizer = IncrementalDetokenizer(self.processor.tokenizer, params.skip_special_tokens)
        return Sequence(request_id, prompt_ids, params, metrics, OutputState(detokenizer, output_kind),
                        generator=gen, index=index)

    def _encode(self, conversation, params: SamplingParams, add_generation_prompt: bool):
        kwargs = dict(max_num_tiles=params.max_num_tiles, num_frames=params.num_frames)
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        self._check_text(conversation, add_generation_prompt)
        if isinstance(conversation, dict) and "prompt_token_ids" in conversation:
            ids = token_ids_prompt(conversation)
            image = self.processor.tokenizer.image_token_id
            if image in ids:  # a placeholder row with no image behind it
                raise PromptError(f"prompt_token_ids holds the image placeholder id {image} at position "
                                  f"{ids.index(image)}, with no image; send images with a text prompt")
            return Encoding(input_ids=ids, pixel_values=None)
        if isinstance(conversation, dict):  # raw prompt with <IMG_CONTEXT> / <video> placeholders
            if "prompt" not in conversation:
                raise PromptError("a raw request must be a dict with a 'prompt' key (and optional 'images', 'videos'), "
                                  "or with 'prompt_token_ids'")
            return self.processor(text=conversation["prompt"], images=conversation.get("images"),
                                  videos=conversation.get("videos"), **kwargs)
        return self.processor(conversation, add_generation_prompt=add_generation_prompt, **kwargs)

    def _check_text(self, conversation, add_generation_prompt: bool) -> None:
        """Bound a request's text before the processor scans and tokenises it (seconds a megabyte): over
        max_prompt_chars, or a text that cannot fit in max_model_len tokens, is a PromptError at once."""
        n = text_chars(conversation)
        limit = self.max_prompt_chars
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
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise PromptError(f"{what}: token id {bad[0]} is outside the model's vocabulary ({vocab})")

    def _check_capacity(self, prompt_len: int, params: SamplingParams, what: str) -> None:
        need = min(prompt_len + params.max_tokens, self.max_model_len)
        if -(-need // self.block_size) > self.num_blocks:
            pool = self.num_blocks * self.block_size
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
