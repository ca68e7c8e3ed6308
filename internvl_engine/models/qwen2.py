"""Qwen2 decoder (spec section 4): pre-norm blocks, GQA attention with q/k/v bias and RoPE, SiLU-gated MLP.
Tokens of all sequences in a step are packed along one axis; the step context says where each one belongs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import TextConfig
from ..layers.context import get_context
from ..layers.linear import PackedLinear
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        h, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, h, hk, d
        self.qkv_proj = PackedLinear(cfg.hidden_size, [h * d, hk * d, hk * d], ["q_proj", "k_proj", "v_proj"], bias=True)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.rotary_emb = [rotary_emb]  # shared by all layers; a list keeps it out of this module's state dict

    def forward(self, positions, x):
        ctx = get_context()
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        self.rotary_emb[0](positions, q, k)
        scale = self.head_dim ** -0.5
        if ctx.kv_caches is not None:
            k_cache, v_cache = ctx.kv_caches[self.layer_idx]
            ops.write_kv_cache(k, v, k_cache, v_cache, ctx.slot_mapping)
        if ctx.is_prefill and ctx.kv_gather_slots is not None:
            # chunk after a cached prefix or an earlier chunk: attend over keys [0, end) read back from the cache
            # (the causal mask is bottom-right aligned, so query i of a chunk sees keys up to start + i)
            k_ctx = k_cache.view(-1, self.num_kv_heads, self.head_dim)[ctx.kv_gather_slots]
            v_ctx = v_cache.view(-1, self.num_kv_heads, self.head_dim)[ctx.kv_gather_slots]
            o = ops.flash_attention(q, k_ctx, v_ctx, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                    ctx.max_seqlen_k, causal=True, scale=scale)
        elif ctx.is_prefill:
            o = ops.flash_attention(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k,
                                    causal=True, scale=scale)
        else:
            o = ops.paged_attention(q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens, scale)
        return self.o_proj(o.reshape(t, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        f = cfg.intermediate_size
        self.gate_up_proj = PackedLinear(cfg.hidden_size, [f, f], ["gate_proj", "up_proj"], bias=False)
        self.down_proj = nn.Linear(f, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, layer_idx, rotary_emb)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual):
        # The residual stream is carried separately so each norm can fuse the preceding add.
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_type,
                                          cfg.rope_factor)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i, self.rotary_emb) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, inputs_embeds):
        x, residual = inputs_embeds, None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]
