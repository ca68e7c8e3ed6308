"""Rotary position embedding tables (NeoX rotate-half layout), matching transformers' rotary numerics, the same code
in its Qwen2, Llama and Qwen3 models: inverse frequencies and angles in fp32 over the config's head_dim (which
Llama and Qwen3 may state apart from hidden_size / heads); dynamic NTK rescales the base per sequence once it
outgrows max_position_embeddings (spec section 4)."""
from __future__ import annotations

import torch
from torch import nn



def inverse_frequencies(base, head_dim: int, device=None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (base ** exponents)


def _cos_sin(angles: torch.Tensor) -> torch.Tensor:
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, max_position_embeddings: int, rope_type: str = "default",
                 factor: float = 1.0, *, ops=None):
        super().__init__()
        self.ops = ops
        self.head_dim, self.theta, self.max_pos = head_dim, theta, max_position_embeddings
        self.rope_type, self.factor = rope_type, factor
        self._table: torch.Tensor | None = None

    def table(self, device) -> torch.Tensor:
        """[P, D] fp32 rows (cos | sin) for every position the model accepts, built once per device (no host sync
        in the step). Dynamic NTK positions past max_position_embeddings use dynamic_rows instead."""
        t = self._table
        if t is None or t.device != torch.device(device):
            rows = int(self.max_pos * (self.factor if self.rope_type == "linear" else 1.0))
            inv = inverse_frequencies(self.theta, self.head_dim, device)
            if self.rope_type == "linear":
                inv = inv / self.factor
            pos = torch.arange(rows, device=device, dtype=torch.float32)
            self._table = t = _cos_sin(pos[:, None] * inv[None, :])
        return t

    def dynamic_rows(self, positions: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Per-token rows for dynamic NTK: base' = base * (f*S/M - (f-1))^(D/(D-2)) with S = max(seq_len, M),
        in fp32 exactly as transformers' _compute_dynamic_ntk_parameters evaluates it."""
        m, f, d = self.max_pos, self.factor, self.head_dim
        s = torch.clamp(seq_lens.to(torch.int64), min=m)
        base = self.theta * ((f * s / m) - (f - 1)) ** (d / (d - 2))
        exponents = torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d
        inv = 1.0 / (base[:, None] ** exponents[None, :])
        return _cos_sin(positions.float()[:, None] * inv)

    def forward(self, positions, q, k, rope_seq_lens: torch.Tensor | None = None):
        """Rotates q and k in place; rope_seq_lens [T] (dynamic NTK past the trained range) picks per-token rows."""
        if self.rope_type == "dynamic" and rope_seq_lens is not None:
            rows = self.dynamic_rows(positions, rope_seq_lens)
            return self.ops.rotary(q, k, torch.arange(positions.shape[0], device=positions.device), rows)
        return self.ops.rotary(q, k, positions, self.table(positions.device))
