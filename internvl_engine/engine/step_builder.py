"""Turns the scheduler's choice into a StepInput (worker/step_input.py), reading block tables from their one owner,
the BlockManager, and the sampled sequences into its SamplingInput (sampling.py)."""
from __future__ import annotations

import numpy as np
import torch

from ..sampling import SamplingInput
from ..worker.step_input import PromptRows, StepInput
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
            # every row predicts the next token; row j of [start, end) predicts position start + j + 1
            first, last = start + 1, min(end + 1, len(s.prompt_ids))
            row = len(step.logits_rows)
            step.prompt_rows.append(PromptRows(ci, first, list(range(row, row + last - first)),
                                               s.prompt_ids[first:last], s.params.prompt_logprobs))
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


def sampling_input(seqs: list[Sequence], stop_ids, structured=None) -> SamplingInput:
    """The sampling rows of `seqs`, in order. Penalties and min_tokens masks as the (row, token) pairs they touch:
    min_tokens masks eos (`stop_ids`, unless ignore_eos) and stop_token_ids while the output is shorter; repetition
    reaches every token seen in prompt or output, frequency and presence every distinct output token, logit_bias its
    own tokens. `structured` (a structured.StructuredOutputs) starts filling the constrained rows' token bitmask,
    which the Sampler waits for (SamplingInput.allowed)."""
    params = [s.params for s in seqs]
    rows = SamplingInput([p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                         [p.min_p for p in params], [s.generator for s in seqs], [p.logprobs for p in params],
                         [p.return_logits for p in params], ([], []), ([], [], []), ([], [], [], [], []),
                         ([], [], []))
    for i, s in enumerate(seqs):
        if not s.plain:  # else nothing in _pairs applies
            _pairs(rows, i, s, stop_ids)
    if structured is not None:
        rows.allowed = structured.masks(seqs)
    return rows


def _pairs(rows: SamplingInput, i: int, s: Sequence, stop_ids) -> None:
    """Row i's (row, token) pairs (sequence s) appended to rows' masks, penalties and biases."""
    p = s.params
    if p.logit_bias:
        rows.bias[0].extend([i] * len(p.logit_bias))
        rows.bias[1].extend(p.logit_bias)
        rows.bias[2].extend(p.logit_bias.values())
    if len(s.output_ids) < p.min_tokens:
        ends = sorted(({*stop_ids} if not p.ignore_eos else set()) | set(p.stop_token_ids))
        rows.masked[0].extend([i] * len(ends))
        rows.masked[1].extend(ends)
    if p.repetition_penalty != 1.0:
        seen = sorted(set(s.prompt_ids) | set(s.output_ids))
        rep_r, rep_t, rep_p = rows.repetition
        rep_r += [i] * len(seen)
        rep_t += seen
        rep_p += [p.repetition_penalty] * len(seen)
    if s.output_ids and (p.frequency_penalty or p.presence_penalty):
        counts: dict[int, int] = {}
        for t in s.output_ids:
            counts[t] = counts.get(t, 0) + 1
        pen_r, pen_t, pen_c, pen_f, pen_p = rows.counted
        pen_r += [i] * len(counts)
        pen_t += list(counts)
        pen_c += list(counts.values())
        pen_f += [p.frequency_penalty] * len(counts)
        pen_p += [p.presence_penalty] * len(counts)
