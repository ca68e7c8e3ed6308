"""The fused decode forward (issue 3.6; EngineConfig.decode_path = "fused"): a decode step of 1 to MAX_BATCH tokens
runs each decoder layer as five kernel-contract ops instead of the default layer's eleven launches (four matmuls, two
norms, rotary, the KV write, paged attention, SiLU and the gating product; fifteen with Qwen3's q/k norms and the
copies of q and k they read), as tests/test_decode_fused.py counts:

    decode_qkv            RMSNorm(input_layernorm) -> packed q/k/v -> [q/k norm] -> rotary -> k, v into the cache
    paged_attention       as the default path
    decode_gemv_residual  residual + o_proj(attention)
    decode_gate_up        silu(gate) * up of RMSNorm(post_attention_layernorm)
    decode_gemv_residual  residual + down_proj(...)

The residual stream is the only hidden state carried between layers: each GEMV adds it in its epilogue, where the
default path adds it in the prologue of the norm that follows, with the same roundings (ops/ref.py), so the final
norm needs no add. Five, not four: the next op of each pair needs whole rows of what the previous one produced (the
norms, attention over every head, the o_proj of every head) and a kernel has no grid-wide barrier; merging a pair
would mean every program recomputing the whole previous GEMV, or split-K partials with atomics (nondeterministic).

It reads the weights of the default decoder's layers (models/decoder.py): nothing of its own is loaded. Steps it
does not cover take the default forward: prefill, more than MAX_BATCH tokens, dynamic-NTK rows past the trained
range, a forward without a KV cache. Models it does not cover get no fused forward at all (`unsupported`): tensor
parallelism, a quantized or non-dense linear, a layer that is not the dense attention + SiLU-gated MLP."""
from __future__ import annotations

import torch

from ..layers.attention import AttentionMetadata
from ..layers.linear import DenseLinearMethod
from .decoder import DecoderAttention, DecoderLayer, DecoderMLP, DecoderModel

MAX_BATCH = 8  # the GEMV kernels' design point (kernels/decode_fused.py); larger batches are compute, not launches


def unsupported(lm: DecoderModel, tp) -> str | None:
    """Why the fused forward cannot run this decoder, or None when it can."""
    if tp.size != 1:
        return f"tensor parallelism (size {tp.size})"
    for i, layer in enumerate(lm.layers):
        if type(layer) is not DecoderLayer or type(layer.self_attn) is not DecoderAttention \
                or type(layer.mlp) is not DecoderMLP:
            return f"layer {i} is not a dense attention + MLP layer"
        a, m = layer.self_attn, layer.mlp
        for lin in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj):
            if type(lin.quant_method) is not DenseLinearMethod:
                return f"{lin.prefix} is quantized ({lin.quant_method.name})"
        eps = layer.input_layernorm.eps
        if a.q_norm is not None and not a.q_norm.eps == a.k_norm.eps == eps:
            return f"layer {i}: q/k norm eps differs from the layer norms' (one eps per fused op)"
    return None


class FusedDecode:
    """The fused forward of one DecoderModel (not an nn.Module: it owns no parameters)."""

    def __init__(self, lm: DecoderModel):
        self.lm = lm

    @staticmethod
    def applies(x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step takes the fused forward; host facts only (no device read), so a CUDA graph captures
        the same choice it replays."""
        return (not meta.is_prefill and 1 <= x.shape[0] <= MAX_BATCH and meta.kv_caches is not None
                and meta.rope_seq_lens is None)

    def __call__(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states [B, C] of a decode step (what DecoderModel.forward returns)."""
        lm = self.lm
        ops = lm.norm.ops  # the model's current table (use_ops rebinds every layer's)
        cos_sin = lm.rotary_emb.table(positions.device)
        b, residual = x.shape[0], x
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            k_cache, v_cache = meta.kv_caches[a.attn.layer_idx]
            norm = layer.input_layernorm
            q = ops.decode_qkv(residual, norm.weight, norm.eps, a.qkv_proj.weight, a.qkv_proj.bias,
                               None if a.q_norm is None else a.q_norm.weight,
                               None if a.k_norm is None else a.k_norm.weight,
                               positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
            o = ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, a.attn.scale)
            residual = ops.decode_gemv_residual(o.reshape(b, -1), a.o_proj.weight, a.o_proj.bias, residual)
            norm = layer.post_attention_layernorm
            h = ops.decode_gate_up(residual, norm.weight, norm.eps, m.gate_up_proj.weight, m.gate_up_proj.bias)
            residual = ops.decode_gemv_residual(h, m.down_proj.weight, m.down_proj.bias, residual)
        return lm.norm(residual)
