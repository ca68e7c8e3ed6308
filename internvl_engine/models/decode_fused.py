"""The fused decode forward (issue 3.6; EngineConfig.decode_path = "fused"): a decode step of 1 to MAX_BATCH tokens
runs each decoder layer as four kernel-contract ops instead of the default layer's eleven launches (four matmuls, two
norms, rotary, the KV write, paged attention, SiLU and the gating product; fifteen with Qwen3's q/k norms and the
copies of q and k they read), as tests/test_decode_fused.py counts:

    decode_qkv            RMSNorm(input_layernorm) -> packed q/k/v -> [q/k norm] -> rotary -> k, v into the cache
    decode_attention_o    paged attention, then o_proj, as G partials whose sum is o_proj's output
    decode_gate_up        residual += sum of the partials; silu(gate) * up of RMSNorm(post_attention_layernorm)
    decode_gemv_residual  residual + down_proj(...)

The residual stream is the only hidden state carried between layers, with the default path's roundings (ops/ref.py):
decode_gate_up forms the post-attention residual in its prologue (the o_proj output rounded, then the add rounded, as
the default layer's norm adds it) and returns it; down_proj adds it in its epilogue, so the next layer's norm and the
final norm need no add.

Why four, and this four: a kernel has no grid-wide barrier, so an op whose programs each need whole rows of its
predecessor's output (a norm, attention over every head) cannot be merged with it unless every program recomputes
the predecessor, or the predecessor's partial results are reduced where they are read. o_proj is linear in its input
heads, o_proj(attn) = sum_h W[:, h D:(h + 1) D] attn_h, so attention can run per head with that head's slice of the
GEMV (no other head's output needed), and the sum over heads moves into decode_gate_up, whose programs read whole
rows for their RMSNorm anyway (deterministic: no atomics, the partials summed in head order), at the price of
re-reading H x C fp32 partials per row in each of its programs, once per pass of the norm (14 x 896 for the 1B
layer). The other seams: qkv -> attention: each query head of a group reads the new token's k and v, which one
program writes (recomputing them in each of the group's programs would re-read their weights H / HK times).
gate_up -> down: down_proj is linear in its F inputs too, so the same split would fold it into decode_gate_up
(three ops a layer), but with F / BLOCK_N partials (152 for the 1B layer) for the next layer's decode_qkv to re-read
in every program, eleven times o_proj's; a device profile would have to show that pays.

Long contexts: the Triton decode_attention_o walks a head's whole sequence in one program (no split over the KV, and
each output split recomputes it), where the default path's paged_attention splits the KV and merges. At long contexts
the default path may win; a device profile decides (the optional next step: carry per-split (m, l) in the partials
and let decode_gate_up rescale them, flash-decoding's merge in the reducer).

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
        residual = x
        for layer in lm.layers:
            a, m = layer.self_attn, layer.mlp
            k_cache, v_cache = meta.kv_caches[a.attn.layer_idx]
            norm = layer.input_layernorm
            q = ops.decode_qkv(residual, norm.weight, norm.eps, a.qkv_proj.weight, a.qkv_proj.bias,
                               None if a.q_norm is None else a.q_norm.weight,
                               None if a.k_norm is None else a.k_norm.weight,
                               positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
            partials = ops.decode_attention_o(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, a.attn.scale,
                                              a.o_proj.weight, a.o_proj.bias)
            norm = layer.post_attention_layernorm
            h, residual = ops.decode_gate_up(partials, residual, norm.weight, norm.eps, m.gate_up_proj.weight,
                                             m.gate_up_proj.bias)
            residual = ops.decode_gemv_residual(h, m.down_proj.weight, m.down_proj.bias, residual)
        return lm.norm(residual)
