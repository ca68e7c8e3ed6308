"""Physical floors of each stage, from the model's shape (counting rules below).

A stage's floor is max(FLOPs / matmul peak, bytes / copy bandwidth), with both peaks measured in the same run
(`common.measure_peaks`). Counting rules:

- vision, per 448x448 tile: 2 * (linear parameters of the tower) * tokens_per_tile (1024 patches + CLS = 1025)
  + bidirectional attention 4 * L^2 * C per layer (QK^T and PV, C = vision hidden) + the patch embedding (a linear
  over the 1024 patches) = 723.6 GFLOP for InternViT-300M (619 linear, 103 attention, 1.2 patch embedding); then the
  projector (LayerNorm + two linears) over the 256 pixel-shuffled tokens. Bytes: the tower's and projector's weights.
- prefill, per request of P prompt tokens: 2 * (decoder parameters, no embedding table, no lm_head) * P + causal
  attention 2 * P^2 * C_attn per layer (C_attn = heads * head_dim) + lm_head for the last token only. Bytes: all LM
  weights read once (incl. lm_head, excl. the embedding table, of which only rows are gathered), shared by the batch.
- decode step at batch B and context T: bytes = all LM weights once (incl. lm_head) + B * T * KV bytes per token;
  FLOPs = 2 * params * B + attention 4 * T * C_attn per layer per request.

TTFT floor = vision + prefill floors; TPOT floor = the decode step floor.

Mixture of experts (Qwen3-MoE: cfg.text.moe_layers hold num_experts E experts of width moe_intermediate_size, k =
num_experts_per_tok of them routed per token): FLOPs count the k experts a token runs (plus the router, E x hidden,
which every token multiplies in full). Bytes count only the experts a step touches: over N tokens (B at a decode
step, the batch's prompt tokens in a prefill), the expected number per MoE layer is E * (1 - (1 - k/E)^N), assuming
uniform routing (each token picks k distinct experts, each expert with probability k/E, independently of the other
tokens); k at N = 1, towards all E as N grows. Trained routers are not uniform: a skewed router touches fewer
experts, so this is the floor of a balanced one (the load-balancing loss's aim), not a bound on every batch.
Everything else (attention, routers, dense layers, lm_head) is read once a step as in a dense model.

Quantized checkpoints (cfg.quant) count their decoder linears at the format's size, as the producers store them:
AWQ 4 bits a weight + per group of 128 inputs and output an fp16 scale and a 4-bit zero (0.5 + 2.5 / 128 bytes a
weight); FP8 one byte a weight + a bf16 scale per output channel; layers an FP8 `ignore` list keeps dense at the
activation dtype. Everything else (embeddings, lm_head, norms, biases, the vision side) stays at dtype_bytes.
FLOPs are unchanged and still divided by the measured bf16/fp16 matmul peak: Hopper's FP8 tensor cores run twice
that, so an FP8 prefill floor can be up to 2x too high (decode is bandwidth-bound either way).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class StageCost:
    flops: float
    bytes: float

    def floor_s(self, peaks: dict) -> float:
        return max(self.flops / peaks["matmul_flop_per_s"], self.bytes / peaks["copy_bytes_per_s"])


# ---------------------------------------------------------------------------------------------- parameter counts
def vision_linear_params(cfg: ModelConfig) -> int:
    """Weights of the tower's per-token linears (qkv, proj, fc1, fc2), all layers; biases excluded (no FLOPs)."""
    v = cfg.vision
    c, i = v.hidden_size, v.intermediate_size
    return v.num_hidden_layers * (4 * c * c + 2 * c * i)


def vision_tokens_per_tile(cfg: ModelConfig) -> int:
    return cfg.vision.num_patches + 1  # + CLS


def patch_embed_params(cfg: ModelConfig) -> int:
    v = cfg.vision
    return v.num_channels * v.patch_size ** 2 * v.hidden_size


def projector_params(cfg: ModelConfig) -> int:
    c_in = cfg.vision.hidden_size * int(round(1 / cfg.downsample_ratio)) ** 2
    h = cfg.text.hidden_size
    return c_in * h + h * h


def vision_params(cfg: ModelConfig) -> int:
    """All vision weights read per forward (tower linears + patch embedding + projector; norms and biases are noise)."""
    return vision_linear_params(cfg) + patch_embed_params(cfg) + projector_params(cfg)


def _attention_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each attention linear of a decoder layer, by its checkpoint name."""
    t = cfg.text
    h, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h)}


def _mlp_shapes(cfg: ModelConfig, width: int, prefix: str = "mlp") -> dict[str, tuple[int, int]]:
    h = cfg.text.hidden_size
    return {f"{prefix}.gate_proj": (h, width), f"{prefix}.up_proj": (h, width), f"{prefix}.down_proj": (width, h)}


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of a dense decoder layer, by its checkpoint name."""
    return {**_attention_shapes(cfg), **_mlp_shapes(cfg, cfg.text.intermediate_size)}


def _moe_layers(cfg: ModelConfig) -> list[int]:
    return cfg.text.moe_layers if cfg.text.num_experts else []


def expert_params(cfg: ModelConfig) -> int:
    """One routed expert's weights (gate, up, down of width moe_intermediate_size); 0 for a dense model."""
    return 3 * cfg.text.hidden_size * cfg.text.moe_intermediate_size if _moe_layers(cfg) else 0


def experts_touched(cfg: ModelConfig, tokens: int | None) -> float:
    """Expected experts a MoE layer reads for `tokens` tokens under uniform routing (module docstring):
    E * (1 - (1 - k/E)^tokens); all E when tokens is None."""
    e, k = cfg.text.num_experts, cfg.text.num_experts_per_tok
    return float(e) if tokens is None else e * (1 - (1 - k / e) ** tokens)


def lm_linear_params(cfg: ModelConfig, experts: float | None = None) -> float:
    """Weights of the decoder linears (q/k/v/o, the dense layers' gate/up/down, the MoE layers' experts: `experts`
    of them a layer, all by default), all layers: what AWQ and FP8 quantize. The routers are not counted here."""
    t = cfg.text
    moe = len(_moe_layers(cfg))
    attention = sum(i * o for i, o in _attention_shapes(cfg).values())
    mlp = sum(i * o for i, o in _mlp_shapes(cfg, t.intermediate_size).values())
    n = t.num_experts if experts is None else experts
    return t.num_hidden_layers * attention + (t.num_hidden_layers - moe) * mlp + moe * n * expert_params(cfg)


def lm_layer_params(cfg: ModelConfig, experts: float | None = None) -> float:
    """Decoder-layer weights of the language model, all layers: the linears (`experts` experts a MoE layer, all by
    default), the two RMSNorms, the MoE layers' routers (num_experts x hidden) and what the family adds (text
    config): q/k/v biases (Qwen2; Llama/Qwen3 with attention_bias, which also biases o_proj), Llama's mlp_bias on
    gate/up/down, Qwen3's q_norm and k_norm ([head_dim] each)."""
    t = cfg.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer = 2 * t.hidden_size
    per_layer += (q + 2 * kv) * t.qkv_bias + t.hidden_size * t.o_proj_bias
    per_layer += (2 * t.intermediate_size + t.hidden_size) * t.mlp_bias + 2 * t.head_dim * t.qk_norm
    routers = len(_moe_layers(cfg)) * t.num_experts * t.hidden_size
    return lm_linear_params(cfg, experts) + t.num_hidden_layers * per_layer + routers


def lm_head_params(cfg: ModelConfig) -> int:
    return cfg.text.vocab_size * cfg.text.hidden_size


def lm_weight_params(cfg: ModelConfig, experts: float | None = None) -> float:
    """LM weights a step reads: the layers (`experts` experts a MoE layer, all by default) + the lm_head (tied or
    not), without the embedding table. A dense model's decode step reads all of them."""
    return lm_layer_params(cfg, experts) + lm_head_params(cfg)


def lm_active_params(cfg: ModelConfig) -> float:
    """LM weights one token multiplies with (its k experts a MoE layer; lm_weight_params for a dense model)."""
    return lm_weight_params(cfg, cfg.text.num_experts_per_tok if _moe_layers(cfg) else None)


def lm_params(cfg: ModelConfig, active: bool = False) -> float:
    """The language model's parameters as model cards count them: the decoder layers, the embedding table and an
    untied lm_head; `active`: with only the k routed experts a MoE layer (the "activated" count)."""
    experts = cfg.text.num_experts_per_tok if active and _moe_layers(cfg) else None
    return lm_layer_params(cfg, experts) + lm_head_params(cfg) * (1 if cfg.ties_lm_head else 2)


def model_params(cfg: ModelConfig, active: bool = False) -> float:
    """lm_params + the vision tower and projector: the whole model (InternVL's model cards' totals)."""
    return vision_params(cfg) + lm_params(cfg, active)


def lm_linear_bytes(cfg: ModelConfig, dtype_bytes: int, experts: float | None = None) -> float:
    """Bytes of the decoder linears as stored (`experts` experts a MoE layer, all by default): dense, AWQ or FP8
    (module docstring; dense experts only)."""
    quant = getattr(cfg, "quant", None)
    if quant is None:
        return lm_linear_params(cfg, experts) * dtype_bytes
    if _moe_layers(cfg):  # ModelConfig refuses these; a config built by hand must not get a dense count
        raise UnsupportedModelError(f"{cfg.source or 'model'}: no floors for quantized ({quant.method}) experts")
    if quant.method == "awq":
        return lm_linear_params(cfg) * (0.5 + 2.5 / quant.group_size)
    total = 0
    for layer in range(cfg.text.num_hidden_layers):
        for name, (i, o) in _linear_shapes(cfg).items():
            dense = quant.keeps_dense(f"language_model.layers.{layer}.{name}")
            total += i * o * dtype_bytes if dense else i * o + 2 * o
    return total


def lm_weight_bytes(cfg: ModelConfig, dtype_bytes: int, tokens: int | None = None) -> float:
    """Bytes of the LM weights a step over `tokens` tokens reads (lm_weight_params, quantized linears at their
    stored size): a MoE layer's experts_touched(tokens) experts, all of them when tokens is None."""
    experts = experts_touched(cfg, tokens) if _moe_layers(cfg) else None
    return ((lm_weight_params(cfg, experts) - lm_linear_params(cfg, experts)) * dtype_bytes
            + lm_linear_bytes(cfg, dtype_bytes, experts))


def moe_summary(cfg: ModelConfig) -> dict | None:
    """The mixture of experts in numbers (None for a dense model): what `info --model` prints."""
    t = cfg.text
    if not _moe_layers(cfg):
        return None
    return {"experts": t.num_experts, "experts_per_token": t.num_experts_per_tok,
            "expert_width": t.moe_intermediate_size, "norm_topk_prob": t.norm_topk_prob,
            "moe_layers": len(_moe_layers(cfg)), "dense_layers": t.num_hidden_layers - len(_moe_layers(cfg)),
            "lm_active_params": lm_params(cfg, active=True), "lm_total_params": lm_params(cfg),
            "active_params": model_params(cfg, active=True), "total_params": model_params(cfg)}


def weight_summary(cfg: ModelConfig, dtype_bytes: int) -> dict:
    """What the harness records and `info --model` prints: the format and the bytes each stage reads. The decode
    bytes are a batch-1 step's (a MoE model's k experts a layer); lm_weight_bytes_all counts every expert."""
    quant = getattr(cfg, "quant", None)
    active = lm_active_params(cfg)
    return {"quantization": None if quant is None else quant.method, "activation_dtype_bytes": dtype_bytes,
            "lm_weight_params": lm_weight_params(cfg), "lm_active_params": active,
            "lm_decode_bytes": lm_weight_bytes(cfg, dtype_bytes, tokens=1),
            "lm_decode_bytes_dense": active * dtype_bytes,
            "lm_weight_bytes_all": lm_weight_bytes(cfg, dtype_bytes),
            "vision_bytes": vision_params(cfg) * dtype_bytes,
            "embedding_bytes": cfg.text.vocab_size * cfg.text.hidden_size * dtype_bytes,
            "moe": moe_summary(cfg)}


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    t = cfg.text
    return t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * dtype_bytes


# ---------------------------------------------------------------------------------------------- stage costs
def vision_tower_flops_per_tile(cfg: ModelConfig) -> dict:
    v = cfg.vision
    n = vision_tokens_per_tile(cfg)
    linear = 2 * vision_linear_params(cfg) * n
    attention = v.num_hidden_layers * 4 * n * n * v.hidden_size
    patch = 2 * patch_embed_params(cfg) * v.num_patches
    return {"linear": linear, "attention": attention, "patch_embed": patch, "total": linear + attention + patch}


def vision_cost(cfg: ModelConfig, tiles: int, dtype_bytes: int) -> StageCost:
    per_tile = vision_tower_flops_per_tile(cfg)["total"] + 2 * projector_params(cfg) * cfg.image_seq_length
    return StageCost(per_tile * tiles, vision_params(cfg) * dtype_bytes if tiles else 0.0)


def prefill_cost(cfg: ModelConfig, prompt_tokens: list[int], dtype_bytes: int) -> StageCost:
    t = cfg.text
    c_attn = t.num_attention_heads * t.head_dim
    layer = lm_active_params(cfg) - lm_head_params(cfg)  # a MoE token runs its k experts
    flops = sum(2 * layer * p + t.num_hidden_layers * 2 * p * p * c_attn + 2 * lm_head_params(cfg)
                for p in prompt_tokens)
    return StageCost(flops, lm_weight_bytes(cfg, dtype_bytes, tokens=sum(prompt_tokens)))


def decode_cost(cfg: ModelConfig, batch: int, context: int, dtype_bytes: int) -> StageCost:
    t = cfg.text
    c_attn = t.num_attention_heads * t.head_dim
    flops = batch * (2 * lm_active_params(cfg) + t.num_hidden_layers * 4 * context * c_attn)
    nbytes = lm_weight_bytes(cfg, dtype_bytes, tokens=batch) + batch * context * kv_bytes_per_token(cfg, dtype_bytes)
    return StageCost(flops, nbytes)


def floors(cfg: ModelConfig, peaks: dict, *, tiles_per_request: int, prompt_tokens: list[int], output_tokens: int,
           dtype_bytes: int) -> dict:
    """Seconds: vision and prefill of a whole batch (one request per entry of `prompt_tokens`), their sum (TTFT)
    and one decode step of that batch at the mean context of the decode phase (TPOT)."""
    batch = len(prompt_tokens)
    vision = vision_cost(cfg, tiles_per_request * batch, dtype_bytes).floor_s(peaks) if tiles_per_request else 0.0
    prefill = prefill_cost(cfg, prompt_tokens, dtype_bytes).floor_s(peaks)
    context = round(sum(prompt_tokens) / batch + output_tokens / 2)
    tpot = decode_cost(cfg, batch, context, dtype_bytes).floor_s(peaks)
    return {"vision_s": vision, "prefill_s": prefill, "ttft_s": vision + prefill, "tpot_s": tpot}
