"""Dense weights -> quantized tensors, and back: the engine's side of the `random:<preset>-awq` / `-fp8` presets
(loader/random_init.py) and of the dense twin the benchmark baseline runs (bench/hf_baseline.py).

- AWQ: the asymmetric min/max rounding of LMDeploy's `pseudo_quantize_tensor` (what `lite auto_awq` applies after
  its smoothing search), per output channel and group of 128 input channels: s = (max - min) / 15 (at least
  1e-5 / 15), rounded to fp16 as the files store it; z = clamp(-round(min / s), 0, 15); q = clamp(round(w / s) + z,
  0, 15). The tests hold their own writer and compare bit for bit.
- FP8 (llm-compressor's FP8_DYNAMIC weights): per output channel, scale = amax / 448 (at least 1e-12 so an
  all-zero row stays finite) rounded to bf16, the dtype community InternVL3 FP8 builds store it in;
  e4m3 = clamp(w / scale, -448, 448) with that rounded scale."""
from __future__ import annotations

import torch

from .awq import awq_dequantize, awq_pack
from .fp8 import FP8_MAX

AWQ_GROUP = 128


def awq_quantize(w: torch.Tensor, group_size: int = AWQ_GROUP) -> dict[str, torch.Tensor]:
    """w [out, in] -> {qweight int32 [in, out/8], qzeros int32 [in/G, out/8], scales fp16 [in/G, out]}."""
    out, inp = w.shape
    if inp % group_size or out % 8:
        raise ValueError(f"AWQ: weight [{out}, {inp}] needs in % {group_size} == 0 and out % 8 == 0")
    groups = w.float().t().reshape(inp // group_size, group_size, out)   # [groups, rows of a group, out]
    lo, hi = groups.amin(1), groups.amax(1)                              # [groups, out]
    scales = ((hi - lo).clamp(min=1e-5) / lo.new_tensor(15.0)).half()  # a tensor divisor: exact on CUDA too
    s = scales.float()
    zeros = (-(lo / s).round()).clamp(0, 15)
    q = ((groups / s.unsqueeze(1)).round() + zeros.unsqueeze(1)).clamp(0, 15)
    return {"qweight": awq_pack(q.reshape(inp, out)), "qzeros": awq_pack(zeros), "scales": scales}


def fp8_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [out, in] -> {weight float8_e4m3fn [out, in], weight_scale bf16 [out, 1]}."""
    amax = w.float().abs().amax(1, keepdim=True)
    scale = (amax / amax.new_tensor(FP8_MAX)).clamp(min=1e-12).bfloat16()  # a tensor divisor: exact on CUDA too
    q = (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}


def quantize_dense(method: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    return awq_quantize(w) if method == "awq" else fp8_quantize(w)


def dense_twin(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A quantized `-hf` state dict -> the dense one holding the dequantized weights ([out, in], `dtype`)."""
    out = {}
    for key, t in state.items():
        base, _, leaf = key.rpartition(".")
        if leaf == "qweight":
            qz, s = state[f"{base}.qzeros"], state[f"{base}.scales"]
            out[f"{base}.weight"] = awq_dequantize(t, qz, s).t().contiguous().to(dtype)
        elif leaf == "weight" and t.dtype == torch.float8_e4m3fn:
            out[key] = (t.float() * state[f"{base}.weight_scale"].float()).to(dtype)
        elif leaf not in ("qzeros", "scales", "weight_scale"):
            out[key] = t
    return out
