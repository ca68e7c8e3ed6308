"""FP8 W8A8 in compressed-tensors form as a linear method: weight float8_e4m3fn [out, in], weight_scale [out, 1]
(per output channel), optional bias [out]; activations quantized per token at run time (ops.fp8_gemm).
Column-parallel ranks keep whole rows with their scales; row-parallel ranks keep their input columns of weight and
every scale, and quantize their slice of the activations with their own per-token scale (apply)."""
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
    keeps_dtypes = True  # e4m3 weights and float32 scales in a model of any dtype

    def check(self, layer) -> None:
        """Every split of the dense model fits: whole rows (column-parallel) or whole columns (row-parallel)."""

    def tensor_parallel_problem(self, text, n: int) -> str | None:
        """None: FP8 splits wherever the dense model does (parallel.check_shardable)."""
        return None

    def create_weights(self, layer) -> None:
        layer.weight = param((layer.out_features, layer.in_local), torch.float8_e4m3fn)
        layer.weight_scale = param((layer.out_features, 1), torch.float32)

    def layout(self, leaf: str) -> tuple[int, int, int | None, int]:
        """As DenseLinearMethod.layout; weight_scale is whole on every row-parallel rank (one scale per row)."""
        return {"weight": (0, 1, 1, 1), "weight_scale": (0, 1, None, 1), "bias": (0, 1, None, 1)}[leaf]

    def apply(self, layer, x: torch.Tensor, bias) -> torch.Tensor:
        """A row-parallel rank quantizes its slice of the activations with its own per-token scale, amax over its
        in / N features / 448 (as vLLM's row-parallel FP8 does): ops.fp8_gemm quantizes the input it is given, and
        one scale over all in features would cost one more collective per layer. So FP8 at N ranks rounds these
        activations on a grid at most as coarse as one rank's: close to, not bit-equal to, FP8 at one rank."""
        x2 = x.reshape(-1, layer.in_local).contiguous()
        fn = fp8_gemm_ref if layer.ops is None else layer.ops.fp8_gemm
        return fn(x2, layer.weight, layer.weight_scale, bias).reshape(*x.shape[:-1], layer.out_features)
