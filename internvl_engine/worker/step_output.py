"""StepOutput: what a step hands back to the engine, as host data: a token per sampling row, the logprobs and logits
rows that were asked for, the prompt logprobs. The runner samples on the logits' device and gathers everything the
host needs into one fp32 buffer, so a step costs one device-to-host copy (none when it samples and records
nothing: a prefill chunk that ends no sequence)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sampling import Logprob, Sampler, logprob_entry, logprob_table, on_device
from .step_input import StepInput

# token ids and ranks travel as fp32 in the one copy: exact below 2**24 (the runner refuses a larger vocabulary)
MAX_EXACT_ID = 2 ** 24


@dataclass
class StepOutput:
    tokens: list[int] = field(default_factory=list)                      # one per sampling row
    logprobs: list[dict[int, Logprob] | None] = field(default_factory=list)  # per sampling row, where asked
    logits: list[torch.Tensor | None] = field(default_factory=list)      # per sampling row: raw fp32 [V], where asked
    prompt_logprobs: list[list[dict[int, Logprob]]] = field(default_factory=list)  # per StepInput.prompt_rows entry


def finish_step(logits: torch.Tensor | None, step: StepInput, sampler: Sampler, to_host) -> StepOutput:
    """Sample the rows of `step.sampling` from `logits` (the fp32 rows of step.logits_rows) and gather the results;
    to_host(tensor) -> host tensor is the one copy."""
    rows, prompt = step.sampling, step.prompt_rows or []
    n = 0 if rows is None else len(rows)
    if logits is None or not (n or any(g.rows for g in prompt)):  # a worker rank, or a chunk that ends no sequence
        return StepOutput([], [None] * n, [None] * n, [[] for _ in prompt])
    dev = logits.device
    sampled = logits
    if n and step.sample_index is not None and len(step.sample_index) != logits.shape[0]:
        sampled = logits[on_device(dev, step.sample_index)]  # prompt-logprob rows come first
    tokens = sampler(sampled, rows) if n else None
    if not (prompt or (n and (rows.logprobs.count(None) != n or True in rows.return_logits))):
        return StepOutput(to_host(tokens).tolist(), [None] * n, [None] * n, [])  # the usual decode step: tokens alone
    asked = [i for i, k in enumerate(rows.logprobs) if k is not None] if n else []
    kept = [i for i, r in enumerate(rows.return_logits) if r] if n else []
    parts = [tokens.float()] if n else []
    # logprobs of the sampled rows that asked, then of every prompt-logprob row: one log-softmax, one top-k
    prompt_rows = [r for g in prompt for r in g.rows]
    k = max([rows.logprobs[i] for i in asked] + [g.k for g in prompt if g.rows], default=0)
    if asked or prompt_rows:
        where = on_device(dev, asked)
        src = torch.cat([sampled[where], logits[on_device(dev, prompt_rows)]])
        ids = torch.cat([tokens[where] if asked else where, on_device(dev, [t for g in prompt for t in g.tokens])])
        parts.append(logprob_table(src, ids, k).flatten())
    if kept:
        parts.append(sampled[on_device(dev, kept)].flatten())
    host = to_host(torch.cat(parts) if len(parts) > 1 else parts[0])
    out = StepOutput(host[:n].long().tolist(), [None] * n, [None] * n, [])
    width = 2 + 2 * k
    table = host[n:n + width * (len(asked) + len(prompt_rows))].view(-1, width).tolist()
    for i, row in zip(asked, table):
        out.logprobs[i] = logprob_entry(out.tokens[i], row, k, rows.logprobs[i])
    at = len(asked)
    for g in prompt:
        out.prompt_logprobs.append([logprob_entry(t, row, k, g.k) for t, row in zip(g.tokens, table[at:])])
        at += len(g.rows)
    if kept:
        vocab = logits.shape[1]
        flat = host[n + width * (len(asked) + len(prompt_rows)):].view(len(kept), vocab)
        for i, row in zip(kept, flat):
            out.logits[i] = row.clone()  # its own storage: the step's host buffer is not kept alive by it
    return out
