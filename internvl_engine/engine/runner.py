"""Model runner: turns a list of sequences into one packed forward pass (prefill or decode) and returns the
logits of each sequence's last token. The KV cache has the paged layout of the kernel contract
([num_blocks, block_size, Hk, D] per layer). The serving engine keeps one persistent pool (new_pool) whose blocks
the BlockManager hands out; prefill_chunks runs chunks [start, end) of sequences' token lists over it, reading a
cached prefix / earlier chunks back from the pool. decode runs one token per sequence, from a CUDA graph when
enable_graphs() was called and the step fits one (cuda_graphs.py), else eagerly. prefill_logits is the no-cache
path (prompt_logits).

Host-to-device inputs go through pinned memory without blocking, so the only host synchronisation of a step is
to_host(), the copy of its sampled tokens."""
from __future__ import annotations

import torch

from .. import ops

from ..layers.context import StepContext, set_context
from ..models.internvl import InternVLForConditionalGeneration
from .cuda_graphs import DecodeGraphs, VisionGraphs
from .sequence import Sequence


VISION_CHUNK_TILES = 16  # tiles per vision-tower forward (activation memory), and so the largest vision graph


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.layers = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(num_layers)]
        self.num_blocks = num_blocks


class ModelRunner:
    def __init__(self, model: InternVLForConditionalGeneration, device: torch.device, dtype: torch.dtype,
                 block_size: int = 16, backend: str = "auto"):
        self.model, self.device, self.dtype, self.block_size = model, device, dtype, block_size
        # op -> kernel backend, resolved once; re-bound at every step so engines with different backends can share
        # a process
        self.kernels = ops.resolve(backend, device)
        t = model.config.text
        self.max_pos = t.max_position_embeddings
        self.dynamic_rope = t.rope_type == "dynamic"
        self.graphs: DecodeGraphs | None = None
        self.vision_graphs: VisionGraphs | None = None
        self._pinned = device.type == "cuda"

    def enable_graphs(self, cache: "KVCache", max_batch: int, max_blocks: int, emulate: bool = False) -> None:
        """Capture decode graphs for the batch ladder up to max_batch over `cache`, and let the vision tower run from
        graphs captured per tile count at first use (emulate: CPU tests)."""
        self.graphs = DecodeGraphs(self, cache, max_batch, max_blocks, emulate)
        self.graphs.capture_start()
        self.vision_graphs = VisionGraphs(self, VISION_CHUNK_TILES, emulate)

    def to_host(self, t: torch.Tensor) -> list:
        """The step's one synchronisation: a device-to-host copy into pinned memory, then wait for it."""
        if not self._pinned:
            return t.tolist()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.tolist()

    def kv_bytes_per_token(self) -> int:
        t = self.model.config.text
        return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def new_pool(self, num_blocks: int) -> KVCache:
        t = self.model.config.text
        return KVCache(t.num_hidden_layers, num_blocks, self.block_size, t.num_key_value_heads, t.head_dim, self.dtype,
                       self.device)

    @torch.inference_mode()
    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N * tokens_per_tile, D], in chunks so activation memory stays bounded; each chunk
        from a graph when enable_graphs() was called."""
        ops.bind(self.kernels)
        out = []
        for i in range(0, pixel_values.shape[0], VISION_CHUNK_TILES):
            chunk = pixel_values[i:i + VISION_CHUNK_TILES]
            if self.vision_graphs is not None and self.vision_graphs.fits(chunk):
                out.append(self.vision_graphs.run(chunk))
            else:
                out.append(self.model.get_image_features(chunk.to(self.device)))
        return torch.cat(out)

    def _tensor(self, values, dtype):
        if self._pinned:  # a plain copy from pageable memory would block on the stream
            return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _rope_lens(self, seq_lens: list[int], tokens_per_seq: list[int]):
        """Per-token sequence length for dynamic-NTK RoPE, only when some sequence has outgrown the trained range."""
        if self.dynamic_rope and max(seq_lens) > self.max_pos:
            return torch.repeat_interleave(self._tensor(seq_lens, torch.int64), self._tensor(tokens_per_seq, torch.int64))
        return None

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

    @torch.inference_mode()
    def prefill_logits(self, prompt_ids: list[int], features: torch.Tensor | None) -> torch.Tensor:
        """fp32 logits of every position of one prompt, in one forward pass that writes no KV cache."""
        ops.bind(self.kernels)
        n = len(prompt_ids)
        cu = self._tensor([0, n], torch.int32)
        set_context(StepContext(True, self._tensor([], torch.int64), None, cu, cu, n, n,
                                rope_seq_lens=self._rope_lens([n], [n])))
        try:
            hidden = self.model(self._tensor(prompt_ids, torch.int64), self._tensor(list(range(n)), torch.int64),
                                features)
        finally:
            set_context(None)
        return self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def prefill_chunks(self, chunks: list[tuple[Sequence, int, int]], cache: KVCache,
                       features: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, list[int]]:
        """One packed prefill over chunks (seq, start, end) of each sequence's token list; features[i] holds the
        image-feature rows of the placeholders inside chunk i (or None). Returns (logits [k, V] of the chunks that
        end their sequence's token list, their indices into chunks)."""
        ops.bind(self.kernels)
        ids, positions, slots, cu_q, cu_k, gather = [], [], [], [0], [0], []
        prefix = any(start > 0 for _, start, _ in chunks)
        totals = []
        for s, start, end in chunks:
            toks = s.token_ids
            ids += toks[start:end]
            positions += range(start, end)
            slots += self._slots(s, start, end)
            if prefix:
                gather += self._slots(s, 0, end)
            cu_q.append(cu_q[-1] + end - start)
            cu_k.append(cu_k[-1] + (end if prefix else end - start))
            totals.append(len(toks))
        q_lens = [e - st for _, st, e in chunks]
        k_lens = [e if prefix else e - st for _, st, e in chunks]
        feats = [f for f in features if f is not None and f.numel()]
        cu_q_t = self._tensor(cu_q, torch.int32)
        set_context(StepContext(True, self._tensor(slots, torch.int64), cache.layers, cu_q_t,
                                self._tensor(cu_k, torch.int32) if prefix else cu_q_t, max(q_lens), max(k_lens),
                                rope_seq_lens=self._rope_lens(totals, q_lens),
                                kv_gather_slots=self._tensor(gather, torch.int64) if prefix else None))
        try:
            hidden = self.model(self._tensor(ids, torch.int64), self._tensor(positions, torch.int64),
                                torch.cat(feats) if feats else None)
        finally:
            set_context(None)
        last = [i for i, ((_, _, end), total) in enumerate(zip(chunks, totals)) if end == total]
        if not last:
            return None, []
        hidden = hidden[self._tensor([cu_q[i + 1] - 1 for i in last], torch.int64)]
        return self.model.compute_logits(hidden).float(), last

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], cache: KVCache) -> torch.Tensor:
        ops.bind(self.kernels)
        bs = self.block_size
        lens = [s.num_tokens for s in seqs]
        width = -(-max(lens) // bs)
        key = self.graphs.bucket(len(seqs), width) if self.graphs is not None else None
        if key is not None and not (self.dynamic_rope and max(lens) > self.max_pos):
            return self.graphs.run(key, [s.output_ids[-1] for s in seqs], [n - 1 for n in lens],
                                   [self._slots(s, n - 1, n)[0] for s, n in zip(seqs, lens)], lens,
                                   [s.block_table for s in seqs])
        tables = [s.block_table[:width] + [0] * (width - min(width, len(s.block_table))) for s in seqs]
        slots = [self._slots(s, n - 1, n)[0] for s, n in zip(seqs, lens)]
        set_context(StepContext(False, self._tensor(slots, torch.int64), cache.layers,
                                block_tables=self._tensor(tables, torch.int32),
                                seq_lens=self._tensor(lens, torch.int32),
                                rope_seq_lens=self._rope_lens(lens, [1] * len(lens))))
        try:
            hidden = self.model(self._tensor([s.output_ids[-1] for s in seqs], torch.int64),
                                self._tensor([n - 1 for n in lens], torch.int64))
        finally:
            set_context(None)
        return self.model.compute_logits(hidden).float()
