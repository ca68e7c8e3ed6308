"""StepInput: one forward pass as plain data (token ids, positions, cache slots, block tables, lengths, image
features and where they go), with no Sequence or tokenizer in it, and what the driver's runner does with the logits
(the sampling rows, prompt-logprob rows). The runner executes it; a tensor-parallel worker on another rank receives
it without the sampling rows (their seeded generators never leave the driver's process). The engine builds it
(engine/step_builder.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..sampling import SamplingInput


@dataclass
class PromptRows:
    """Prompt logprobs of one prefill chunk: logits row rows[j] predicts prompt position first + j, whose token is
    tokens[j]; each position gets its token's logprob and rank and the top k."""
    chunk: int
    first: int
    rows: list[int]
    tokens: list[int]
    k: int


@dataclass
class StepInput:
    is_prefill: bool
    input_ids: list[int]                      # packed over the step's sequences
    positions: list[int]
    slots: list[int]                          # KV-cache slot of each token (block * block_size + offset)
    query_lens: list[int]                     # tokens of each sequence in this step (1 in decode)
    key_lens: list[int]                       # keys each sequence attends to (decode: its length)
    seq_lens: list[int]                       # each sequence's whole length (dynamic-NTK RoPE)
    logits_rows: list[int] | None = None      # rows whose logits are wanted (None: every row)
    block_tables: np.ndarray | None = None  # decode: int32 [B, max blocks], one row per sequence, padded with block 0
    gather_slots: list[int] | None = None     # prefill after a cached prefix / earlier chunk: slots of keys [0, end)
    image_features: torch.Tensor | None = None  # [R, D] projector rows of the placeholders in this step
    image_rows: list[int] | None = None       # their rows in input_ids
    write_cache: bool = True                  # False: a forward that reads and writes no cache (prompt logits)
    # the driver's work on the logits (a worker gets none of it)
    sampling: SamplingInput | None = None     # one row per sampling sequence
    sample_index: list[int] | None = None     # logits row of each sampling sequence (None: row i for sequence i)
    prompt_rows: list[PromptRows] | None = None


def prompt_input(prompt_ids: list[int], spans, features: torch.Tensor | None) -> StepInput:
    """Every position of one prompt, no cache: the forward behind prompt_logits."""
    n = len(prompt_ids)
    rows = [p for sp in spans for p in range(sp.start, sp.end)]
    return StepInput(True, list(prompt_ids), list(range(n)), [], [n], [n], [n], image_features=features,
                     image_rows=rows, write_cache=False)
