"""Turns the scheduler's choice into a StepInput (worker/step_input.py), reading block tables from their one owner,
the BlockManager."""
from __future__ import annotations

import numpy as np
import torch

from ..worker.step_input import StepInput
from .block_manager import BlockManager
from .sequence import Sequence


def _slots(table: list[int], block_size: int, start: int, end: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def image_rows(seq: Sequence, start: int, end: int, base: int) -> list[int]:
    """Rows (offset by `base`) of seq's placeholder positions inside [start, end), in span order."""
    rows: list[int] = []
    for sp in seq.media:
        lo, hi = max(start, sp.start), min(end, sp.end)
        rows += range(base + lo - start, base + hi - start)
    return rows


def prefill_input(chunks: list[tuple[Sequence, int, int]], bm: BlockManager,
                  features: list[torch.Tensor | None]) -> StepInput:
    """Chunks [start, end) of sequences' token lists in one packed prefill; features[i] holds the projector rows of
    the placeholders inside chunk i (or None). Logits are wanted for the chunks that end their token list."""
    bs = bm.block_size
    prefix = any(start > 0 for _, start, _ in chunks)
    step = StepInput(True, [], [], [], [], [], [], logits_rows=[], gather_slots=[] if prefix else None, image_rows=[],
                     sample_index=[], prompt_rows=[])
    for ci, (s, start, end) in enumerate(chunks):
        toks, table, base = s.token_ids, bm.block_table(s.seq_id), len(step.input_ids)
        step.input_ids += toks[start:end]
        step.positions += range(start, end)
        step.slots += _slots(table, bs, start, end)
        if prefix:
            step.gather_slots += _slots(table, bs, 0, end)
        step.query_lens.append(end - start)
        step.key_lens.append(end if prefix else end - start)
        step.seq_lens.append(len(toks))
        step.image_rows += image_rows(s, start, end, base)
        if s.params.prompt_logprobs is not None and s.index == 0 and start < len(s.prompt_ids):
            step.prompt_rows.append((ci, len(step.logits_rows), end - start))  # every row predicts the next token
            step.logits_rows += range(base, base + end - start)
            if end == len(toks):
                step.sample_index.append(len(step.logits_rows) - 1)
        elif end == len(toks):
            step.sample_index.append(len(step.logits_rows))
            step.logits_rows.append(len(step.input_ids) - 1)
    feats = [f for f in features if f is not None and f.numel()]
    step.image_features = torch.cat(feats) if feats else None
    return step


def decode_input(seqs: list[Sequence], bm: BlockManager) -> StepInput:
    """One new token per sequence: its last sampled token at position len - 1."""
    bs = bm.block_size
    lens = [s.num_tokens for s in seqs]
    width = -(-max(lens) // bs)
    tables = [bm.block_table_array(s.seq_id) for s in seqs]
    padded = np.zeros((len(seqs), width), dtype=np.int32)  # unused entries: block 0, never read past seq_lens
    for row, t in zip(padded, tables):
        k = min(len(t), width)  # a table may reserve blocks past the longest sequence
        row[:k] = t[:k]
    return StepInput(False, [s.output_ids[-1] for s in seqs], [n - 1 for n in lens],
                     [int(t[(n - 1) // bs]) * bs + (n - 1) % bs for t, n in zip(tables, lens)], [1] * len(seqs), lens,
                     lens, block_tables=padded)
