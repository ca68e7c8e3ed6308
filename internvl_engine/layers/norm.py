import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps, self.ops = eps, ops

    def forward(self, x, residual=None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.eps, self.ops = eps, ops

    def forward(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


def make_norm(norm_type: str, hidden_size: int, eps: float, ops) -> nn.Module:
    return RMSNorm(hidden_size, eps, ops) if norm_type == "rms_norm" else LayerNorm(hidden_size, eps, ops)
