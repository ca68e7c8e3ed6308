"""Quantized checkpoints, in the layouts their producers write (below; details in awq.py, fp8.py), as linear
methods the layers of layers/linear.py hold.

- AWQ W4A16 as OpenGVLab/LMDeploy ship it (`quant_method: awq, version: gemm, bits: 4, group_size: 128,
  zero_point: true`): only the decoder linears are quantized; per layer `qweight` int32 [in, out/8],
  `qzeros` int32 [in/128, out/8], `scales` [in/128, out], `bias` on q/k/v; w = (q - z) * s (awq.py).
- FP8 W8A8 in compressed-tensors form (`quant_method: compressed-tensors, format: float-quantized`): `weight`
  float8_e4m3fn [out, in], `weight_scale` [out, 1], activations quantized per token at run time; the `ignore`
  list is honoured (fp8.py).

config/quant.py reads the config block into a QuantConfig (plain data). A model builds each of its quantizable
linears with `method_for(quant_config, names)`: the format's method, or the dense one for a dense checkpoint or a
module the ignore list names. The loader builds the model on the meta device and fills the methods' parameters
from the checkpoint like any other; on the CPU (torch / cpp backends) the methods dequantize and run the matmul.

Under tensor parallelism the quantized layers split as the dense ones do (column-parallel q/k/v and gate/up,
row-parallel o_proj and down_proj). AWQ adds two alignments: a rank's output columns fill whole int32 packs of 8,
and a rank's input rows of o_proj / down_proj are whole groups of 128 (their qzeros and scales hold one row per
group). `check_tensor_parallel` refuses other sizes before any worker starts (worker/executor.py) and again when a
rank builds its model, and names the sizes that fit; each layer's method checks its own shard as it is built."""
from __future__ import annotations

from ..config import QuantConfig
from ..errors import ShardingError, UnsupportedModelError
from ..layers.linear import DENSE
from ..parallel import check_shardable
from .awq import AWQLinearMethod
from .fp8 import Fp8LinearMethod


def _format_method(quant: QuantConfig):
    return AWQLinearMethod(quant.group_size) if quant.method == "awq" else Fp8LinearMethod()


def method_for(quant: QuantConfig | None, names: list[str]):
    """The linear method of a layer whose output shards the model calls `names` (one each, e.g.
    language_model.layers.0.self_attn.q_proj / k_proj / v_proj): the checkpoint's format, or the dense method for a
    dense checkpoint and for modules its ignore list leaves dense. Packed shards share one matmul, so they must
    agree (UnsupportedModelError otherwise)."""
    if quant is None:
        return DENSE
    dense = [quant.keeps_dense(name) for name in names]
    if all(dense):
        return DENSE
    if any(dense):
        raise UnsupportedModelError(f"{', '.join(names)}: the ignore list leaves only some of these dense; they "
                                    "share one matmul here")
    return _format_method(quant)


def tensor_parallel_sizes(text, quant: QuantConfig | None) -> list[int]:
    """Every tensor_parallel_size the model can use: the dense split works (check_shardable: N divides the
    attention heads, so no larger N is possible) and so does the quantized one."""
    method = None if quant is None else _format_method(quant)
    sizes = []
    for n in range(1, text.num_attention_heads + 1):
        try:
            check_shardable(text, n)
        except ShardingError:
            continue
        if method is None or method.tensor_parallel_problem(text, n) is None:
            sizes.append(n)
    return sizes


def check_tensor_parallel(text, quant: QuantConfig | None, n: int) -> None:
    """UnsupportedModelError naming the layer, its size and n when the quantized decoder linears of a model that
    check_shardable splits over n ranks cannot be split so."""
    problem = None if quant is None or n == 1 else _format_method(quant).tensor_parallel_problem(text, n)
    if problem is not None:
        fit = ", ".join(map(str, tensor_parallel_sizes(text, quant))) or "none"
        raise UnsupportedModelError(f"tensor_parallel_size {n}: {problem}; tensor_parallel_size that fit this "
                                    f"checkpoint: {fit}")
