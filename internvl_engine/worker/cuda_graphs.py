"""Decode and the vision tower through CUDA graphs. One decode step of a small model is a few hundred short kernels, so on a GPU its time
is launch and Python overhead, not memory traffic (performance.md: TPOT's floor is the weight read). The decode
forward (language model + lm_head + fp32 cast) is therefore captured once per (batch bucket, context bucket) over
persistent device buffers, and a step only copies its inputs into those buffers and replays the graph.

- Batch buckets: 1, 2, 4, 8, ... up to max_num_seqs (the last bucket is max_num_seqs itself). A batch of n runs in
  the smallest bucket >= n; the padding rows decode token 0 at position 0 with slot -1 (no KV write) and
  seq_len 1 over block 0, and their logits are dropped.
- Context buckets: the block-table width, 1024 tokens first, then x4, up to max_model_len. The paged-attention
  kernels walk only seq_len tokens, so width only decides split-KV; the torch backend's gather reads the whole
  width, which is why there is more than one bucket.
- Inputs travel as one asynchronous copy per dtype from pinned host staging. The staging is overwritten only at the
  next step, after the runner has waited for this step's results (stream order), so it is never in use.
- Graphs of the batch ladder at the first context bucket are captured at start; other buckets at their first use.
- With `sample=True` (EngineConfig.decode_path "fused") the graph also samples (graph_sampler.py): a step whose rows
  it can sample copies back only their [n] tokens, so a step is two input copies (three with the fp32 rows of
  temperature, top_p and min_p when a row draws), one replay and one small copy.
  Each bucket then has two graphs: argmax alone ("greedy", captured at start; its logits serve the steps whose rows
  need the eager sampler) and the full sampler ("sample", at first use: it sorts the whole vocabulary a row).

The vision tower is the same story at TTFT: 24 layers of about a dozen kernels each, around 350 launches per image
chunk whatever its size. VisionGraphs captures the tower, pixel shuffle and projector once per tile count (1 to the
runner's chunk size, each at its first use) over one persistent pixel buffer. No padding: a chunk of n tiles replays
the graph of exactly n, so it runs the kernels eager mode would run on the same shapes.

With `emulate=True` (CPU tests) a "graph" is the captured Python closure itself, replayed over the same
persistent buffers: everything here but the capture runs and is compared with eager decode."""
from __future__ import annotations

import torch

from ..layers.attention import AttentionMetadata
from . import graph_sampler

FIRST_CONTEXT_TOKENS = 1024


def batch_ladder(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def context_ladder(max_blocks: int, block_size: int) -> list[int]:
    widths, w = [], max(1, -(-FIRST_CONTEXT_TOKENS // block_size))
    while w < max_blocks:
        widths.append(w)
        w *= 4
    return widths + [max_blocks]


class _Emulated:
    """CPU stand-in for torch.cuda.CUDAGraph: replay re-runs the captured closure over the same buffers."""

    def __init__(self, fn):
        self.fn, self.out = fn, fn()

    def replay(self):
        new = self.fn()
        for out, value in zip(*((self.out, new) if isinstance(new, tuple) else ((self.out,), (new,)))):
            out.copy_(value)


def capture(fn, device: torch.device, pool, emulate: bool):
    """(graph, its output: a tensor or a tuple of them) for `fn`, a forward over persistent buffers."""
    if emulate:
        g = _Emulated(fn)
        return g, g.out
    # warm up on a side stream first (Triton compiles and autotunes here, cuBLAS creates its workspaces), as
    # torch's CUDA-graph notes prescribe
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    # capture_begin registers the current device's default generator with the graph (each replay then advances its
    # Philox offset): the device of the graph sampler's draws must be the current one
    with torch.cuda.device(device), torch.cuda.graph(g, pool=pool):
        out = fn()
    return g, out


class DecodeGraphs:
    def __init__(self, runner, cache, max_batch: int, max_blocks: int, emulate: bool = False,
                 sample: bool = False):
        self.runner, self.cache, self.emulate = runner, cache, emulate
        self.batches = batch_ladder(max_batch)
        self.widths = context_ladder(max_blocks, runner.block_size)
        self.max_batch, self.max_blocks = max_batch, max_blocks
        dev, pin = runner.device, runner.device.type == "cuda"
        # int64 rows: input ids, positions, slots, top_k; int32: seq_lens then the block table ([b, w] row-major);
        # fp32 rows: temperature, top_p, min_p (the sampler's rows, staged only when it is in the graph)
        self.host64 = torch.zeros(4 if sample else 3, max_batch, dtype=torch.int64, pin_memory=pin)
        self.host32 = torch.zeros(max_batch + max_batch * max_blocks, dtype=torch.int32, pin_memory=pin)
        self.hostf = torch.zeros(3, max_batch, dtype=torch.float32, pin_memory=pin)
        self.dev64 = torch.zeros_like(self.host64, device=dev)
        self.dev32 = torch.zeros_like(self.host32, device=dev)
        self.devf = torch.zeros_like(self.hostf, device=dev)
        self.np64, self.np32, self.npf = self.host64.numpy(), self.host32.numpy(), self.hostf.numpy()
        self.sample = sample
        self.pool = None if emulate else torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], object] = {}  # sample: keyed (b, w, "greedy" | "sample")
        self.replays = 0  # decode steps served from a graph (tests and the harness read it)
        self.sampled = 0  # of them, steps whose tokens the graph sampled

    def capture_start(self) -> None:
        for b in reversed(self.batches):  # largest first: smaller graphs reuse its memory pool
            self._capture(b, self.widths[0], "greedy" if self.sample else None)

    def bucket(self, n: int, blocks: int) -> tuple[int, int] | None:
        if n > self.max_batch or blocks > self.max_blocks:
            return None
        return next(b for b in self.batches if b >= n), next(w for w in self.widths if w >= blocks)

    # ------------------------------------------------------------------ capture
    def _forward(self, b: int, w: int) -> torch.Tensor:
        m = self.max_batch
        meta = AttentionMetadata(False, self.dev64[2, :b], self.cache.layers,
                                 block_tables=self.dev32[m:m + b * w].view(b, w), seq_lens=self.dev32[:b])
        hidden = self.runner.model(self.dev64[0, :b], self.dev64[1, :b], meta)
        return self.runner.model.compute_logits(hidden).float()

    def _graphed(self, b: int, w: int, mode: str | None):
        """What a graph computes: the logits (mode None), or (tokens, logits) by argmax ("greedy") or by the graph
        sampler over the staged rows ("sample")."""
        if mode is None:
            return lambda: self._forward(b, w)
        if mode == "greedy":
            def fn():
                logits = self._forward(b, w)
                return graph_sampler.greedy(logits), logits
            return fn
        params = self.devf[0, :b], self.dev64[3, :b], self.devf[1, :b], self.devf[2, :b]

        def fn():
            logits = self._forward(b, w)
            return graph_sampler.sample(logits, *params), logits
        return fn

    def _stage_padding(self, b: int, w: int, n: int = 0) -> None:
        self.np64[:, n:b] = 0
        self.np64[2, n:b] = -1
        self.np32[n:b] = 1
        m = self.max_batch
        self.np32[m + n * w:m + b * w] = 0
        if self.sample:
            graph_sampler.stage_padding(*self._sampler_staging(b), n)

    def _sampler_staging(self, b: int):
        """Host staging views of the sampler's rows: temperature, top_p, min_p, top_k."""
        return self.npf[0, :b], self.npf[1, :b], self.npf[2, :b], self.np64[3, :b]

    def _key(self, b: int, w: int, mode: str | None):
        return (b, w) if mode is None else (b, w, mode)

    @torch.inference_mode()
    def _capture(self, b: int, w: int, mode: str | None):
        self._stage_padding(b, w)
        self._upload(b, w, mode)
        g, out = capture(self._graphed(b, w, mode), self.runner.device, self.pool, self.emulate)
        self.graphs[self._key(b, w, mode)] = g, out
        return g, out

    # ------------------------------------------------------------------ a step
    def _upload(self, b: int, w: int, mode: str | None) -> None:
        self.dev64.copy_(self.host64, non_blocking=True)
        k = self.max_batch + b * w
        self.dev32[:k].copy_(self.host32[:k], non_blocking=True)
        if mode == "sample":  # the fp32 rows only when the graph reads them
            self.devf.copy_(self.hostf, non_blocking=True)

    @torch.inference_mode()
    def run(self, key: tuple[int, int], step) -> torch.Tensor:
        """fp32 logits [n, V] of one decode StepInput through the graph for `key` (from bucket())."""
        mode = "greedy" if self.sample else None
        out = self._replay(key, step, mode)
        return (out[1] if self.sample else out)[:len(step.input_ids)]

    @torch.inference_mode()
    def sample_step(self, key: tuple[int, int], step) -> torch.Tensor | None:
        """Tokens [n] (long, on the device) of one decode StepInput, sampled inside the graph for `key`; None when
        graphs do not sample or its rows need the eager sampler (graph_sampler.fits): then run() and sample."""
        rows, n = step.sampling, len(step.input_ids)
        if not (self.sample and step.sample_index is None and not step.prompt_rows and graph_sampler.fits(rows, n)):
            return None
        mode = "sample" if graph_sampler.needs_draw(rows) else "greedy"
        tokens = self._replay(key, step, mode, rows)[0]
        self.sampled += 1
        return tokens[:n]

    def _replay(self, key: tuple[int, int], step, mode: str | None, rows=None):
        """The output of the graph for `key` and `mode` replayed over the step's inputs (and, mode "sample", the
        sampling rows')."""
        b, w = key
        g, out = self.graphs.get(self._key(b, w, mode)) or self._capture(b, w, mode)
        n, m = len(step.input_ids), self.max_batch
        self.np64[0, :n], self.np64[1, :n], self.np64[2, :n] = step.input_ids, step.positions, step.slots
        self.np32[:n] = step.seq_lens
        table = self.np32[m:m + b * w].reshape(b, w)
        for i, row in enumerate(step.block_tables):
            k = min(len(row), w)
            table[i, :k] = row[:k]
            table[i, k:] = 0
        self._stage_padding(b, w, n)
        if mode == "sample":
            graph_sampler.stage(rows, out[1].shape[1], *self._sampler_staging(b))  # the logits' width, as eager
        self._upload(b, w, mode)
        g.replay()
        self.replays += 1
        return out


class VisionGraphs:
    def __init__(self, runner, max_tiles: int, emulate: bool = False):
        self.runner, self.max_tiles, self.emulate = runner, max_tiles, emulate
        self.pixels: torch.Tensor | None = None  # [max_tiles, 3, S, S] fp32, shaped by the first chunk
        self.pool = None if emulate else torch.cuda.graph_pool_handle()
        self.graphs: dict[int, object] = {}
        self.replays = 0  # chunks served from a graph

    def fits(self, pixel_values: torch.Tensor) -> bool:
        n = pixel_values.shape[0]
        return 0 < n <= self.max_tiles and (self.pixels is None or pixel_values.shape[1:] == self.pixels.shape[1:])

    def _forward(self, n: int) -> torch.Tensor:
        return self.runner.model.get_image_features(self.pixels[:n])

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Feature rows [n * tokens_per_tile, D] of a chunk that fits(), in a fresh tensor (the graph's output buffer
        is overwritten by the next replay)."""
        n = pixel_values.shape[0]
        if self.pixels is None:
            self.pixels = torch.zeros((self.max_tiles, *pixel_values.shape[1:]), dtype=torch.float32,
                                      device=self.runner.device)
        self.pixels[:n].copy_(pixel_values, non_blocking=True)
        if n not in self.graphs:
            self.graphs[n] = capture(lambda: self._forward(n), self.runner.device, self.pool, self.emulate)
        g, out = self.graphs[n]
        g.replay()
        self.replays += 1
        return out.clone()
