"""Model runner: executes a plain-data StepInput (step_input.py) as one packed forward pass over the paged KV
pool, samples the rows it asks for and returns a StepOutput (step_output.py). The pool has the paged layout of the
kernel contract ([num_blocks, block_size, Hk, D] per layer) and belongs to the runner; the BlockManager hands out
its blocks.
Decode runs from a CUDA graph when enable_graphs() was called and the step fits one (cuda_graphs.py), else eagerly.

Host-to-device inputs go through pinned memory without blocking, so the only host synchronisation of a step is
to_host(), the one copy of its results."""
from __future__ import annotations

import logging

import torch

from ..errors import UnsupportedModelError
from ..layers.attention import AttentionMetadata
from ..models.internvl import InternVLForConditionalGeneration
from ..models.moe import decode_graph_problem
from ..sampling import Sampler
from .cuda_graphs import DecodeGraphs, VisionGraphs
from .step_input import StepInput
from .step_output import MAX_EXACT_ID, StepOutput, finish_step


log = logging.getLogger(__name__)
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
                 block_size: int, decode_path: str = "default"):
        self.model, self.device, self.dtype, self.block_size = model, device, dtype, block_size
        model.set_decode_path(decode_path)  # the model's forward picks it, so decode graphs capture it too
        t = model.config.text
        if t.vocab_size >= MAX_EXACT_ID:
            raise UnsupportedModelError(f"a vocabulary of {t.vocab_size} tokens: sampled ids travel to the host as "
                                        f"fp32, exact below {MAX_EXACT_ID}")
        self.max_pos = t.max_position_embeddings
        self.dynamic_rope = t.rope_type == "dynamic"
        self.cache: KVCache | None = None
        self.graphs: DecodeGraphs | None = None
        self.vision_graphs: VisionGraphs | None = None
        self._pinned = device.type == "cuda"
        self.sampler = Sampler()

    @property
    def kernels(self) -> dict[str, str]:
        """op -> backend of the model's kernel table."""
        return dict(self.model.ops.binding)

    def allocate_pool(self, num_blocks: int) -> KVCache:
        """The paged KV pool of this rank's KV heads (all of them with one rank)."""
        t = self.model.config.text
        self.cache = KVCache(t.num_hidden_layers, num_blocks, self.block_size, self.model.num_kv_heads, t.head_dim,
                             self.dtype, self.device)
        return self.cache

    def kv_bytes_per_token(self) -> int:
        t = self.model.config.text
        return 2 * t.num_hidden_layers * self.model.num_kv_heads * t.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def enable_graphs(self, cache: KVCache, max_batch: int, max_blocks: int, emulate: bool = False,
                      vision: bool = True, sample: bool = False) -> None:
        """Capture decode graphs for the batch ladder up to max_batch over `cache` (the runner's pool), and (vision)
        let the vision tower run from graphs captured per tile count at first use (emulate: CPU tests). sample:
        the graphs sample too (worker/graph_sampler.py), so such a step copies back its tokens alone."""
        assert cache is self.cache, "graphs run over the runner's own pool"
        problem = decode_graph_problem(self.model.config.text, self.kernels)  # a MoE op that syncs the host
        if problem is not None:
            log.info("no decode CUDA graphs: %s", problem)
        else:
            self.graphs = DecodeGraphs(self, cache, max_batch, max_blocks, emulate, sample)
            self.graphs.capture_start()
        self.vision_graphs = VisionGraphs(self, VISION_CHUNK_TILES, emulate) if vision else None

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """The step's one synchronisation: a device-to-host copy into pinned memory, then wait for it."""
        if not self._pinned:
            return t.cpu()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    @torch.inference_mode()
    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N * tokens_per_tile, D], in chunks so activation memory stays bounded; each chunk
        from a graph when vision graphs are on."""
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

    def _cu(self, lens: list[int]) -> torch.Tensor:
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        return self._tensor(cu, torch.int32)

    def _metadata(self, step: StepInput) -> AttentionMetadata:
        rope = None  # per-token lengths for dynamic-NTK RoPE, only once a sequence outgrew the trained range
        if self.dynamic_rope and max(step.seq_lens) > self.max_pos:
            rope = torch.repeat_interleave(self._tensor(step.seq_lens, torch.int64),
                                           self._tensor(step.query_lens, torch.int64))
        caches = self.cache.layers if step.write_cache else None
        slots = self._tensor(step.slots, torch.int64)
        if not step.is_prefill:
            return AttentionMetadata(False, slots, caches, block_tables=self._tensor(step.block_tables, torch.int32),
                                     seq_lens=self._tensor(step.seq_lens, torch.int32), rope_seq_lens=rope)
        cu_q = self._cu(step.query_lens)
        cu_k = cu_q if step.gather_slots is None else self._cu(step.key_lens)
        gather = None if step.gather_slots is None else self._tensor(step.gather_slots, torch.int64)
        return AttentionMetadata(True, slots, caches, cu_q, cu_k, max(step.query_lens), max(step.key_lens),
                                 rope_seq_lens=rope, kv_gather_slots=gather)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        """One step: the forward, then its sampling rows sampled and its results on the host (StepOutput)."""
        key = self._graph_key(step)
        tokens = None if key is None else self.graphs.sample_step(key, step)
        if tokens is not None:  # sampled inside the graph: its tokens are the step's one copy
            n = len(tokens)
            return StepOutput(self.to_host(tokens).tolist(), [None] * n, [None] * n, [])
        return finish_step(self._logits(step), step, self.sampler, self.to_host)

    @torch.inference_mode()
    def logits(self, step: StepInput) -> torch.Tensor:
        """Host fp32 logits [len(logits_rows), V] of one forward that samples nothing (every row when logits_rows
        is None). A plain copy, not to_host's pinned staging: [prompt_len, V] fp32 is gigabytes for a long prompt,
        which the pinned-memory cache would keep locked for the life of the process."""
        return self._logits(step).cpu()

    def _logits(self, step: StepInput) -> torch.Tensor | None:
        """fp32 logits [len(logits_rows), V] of one forward on the device (every row when logits_rows is None;
        None when it is empty, and on a tensor-parallel worker, which has no lm_head output)."""
        key = self._graph_key(step)
        if key is not None:
            return self.graphs.run(key, step)
        hidden = self._forward(step)
        if step.logits_rows is not None:
            if not step.logits_rows:
                return None  # a chunk that samples nothing: no logits, no sync
            hidden = hidden[self._tensor(step.logits_rows, torch.int64)]
        logits = self.model.compute_logits(hidden)  # None on a tensor-parallel worker: the driver samples
        return None if logits is None else logits.float()

    def _graph_key(self, step: StepInput) -> tuple[int, int] | None:
        """The decode graph bucket a step runs in, or None: eager (a prefill, no graphs, too large, or dynamic-NTK
        RoPE past the trained range, whose per-token lengths a graph's metadata does not carry)."""
        if step.is_prefill or self.graphs is None or (self.dynamic_rope and max(step.seq_lens) > self.max_pos):
            return None
        return self.graphs.bucket(len(step.input_ids), len(step.block_tables[0]))

    @staticmethod
    def check(step: StepInput) -> None:
        """What a step must satisfy before it runs (the tensor-parallel driver checks before sending it)."""
        if step.image_rows:
            feats = step.image_features
            if feats is None or feats.shape[0] != len(step.image_rows):
                raise RuntimeError(f"step has {len(step.image_rows)} image positions but "
                                   f"{0 if feats is None else feats.shape[0]} feature rows")

    def _forward(self, step: StepInput) -> torch.Tensor:
        rows = feats = None
        self.check(step)
        if step.image_rows:
            feats = step.image_features
            rows = self._tensor(step.image_rows, torch.int64)
        return self.model(self._tensor(step.input_ids, torch.int64), self._tensor(step.positions, torch.int64),
                          self._metadata(step), feats, rows)
