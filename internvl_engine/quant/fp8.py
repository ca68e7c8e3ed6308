"""FP8 W8A8 in compressed-tensors form as a linear method: weight float8_e4m3fn [out, in], weight_scale [out, 1]
(per output channel), optional bias [out]; activations quantized per token at run time (ops.fp8_gemm).
Column-parallel ranks keep whole rows with their scales; row-parallel ranks keep their input columns of weight and
every scale, and quantize their slice of the activations with their own per-token scale (quant/layers.py)."""
from __future__ import annotations

import torch

from ..ops.ref import fp8_gemm_ref
from .common import FLOATS, param

FP8_MAX = 448.0                            # largest finite float8_e4m3fn


class Fp8LinearMethod:
    name = "fp8"
    # compressed-tensors' float-quantized format stores float8_e4m3fn weights; an e5m2 tensor would be clipped
    # into e4m3's range on the cast, so the loader refuses it (exact dtypes, as AWQ's).
    CHECKPOINT_DTYPES = {"weight": ((torch.float8_e4m3fn,), "FP8 weight: compressed-tensors float-quantized"),
                         "weight_scale": (FLOATS, "FP8 weight_scale"), "bias": (FLOATS, "FP8 bias")}
    FIRST_LEAF = "weight"

    def check(self, layer, where: str) -> None:
        """Every split of the dense model fits: whole rows (column-parallel) or whole columns (row-parallel)."""

    def create_weights(self, layer, dtype: torch.dtype, device) -> None:
        layer.weight = param((layer.out_features, layer.in_local), torch.float8_e4m3fn, device)
        layer.weight_scale = param((layer.out_features, 1), torch.float32, device)

    def layout(self, leaf: str) -> tuple[int, int, int | None, int]:
        """As AWQLinearMethod.layout; weight_scale is whole on every row-parallel rank (one scale per row)."""
        return {"weight": (0, 1, 1, 1), "weight_scale": (0, 1, None, 1), "bias": (0, 1, None, 1)}[leaf]

    def apply(self, layer, x: torch.Tensor, bias) -> torch.Tensor:
        x2 = x.reshape(-1, layer.in_local).contiguous()
        fn = fp8_gemm_ref if layer.ops is None else layer.ops.fp8_gemm
        return fn(x2, layer.weight, layer.weight_scale, bias).reshape(*x.shape[:-1], layer.out_features)
