"""The language model (spec section 4): pre-norm RMSNorm blocks, GQA attention with RoPE, a SiLU-gated MLP. One
decoder for every family TextConfig describes (config/model.py TEXT_FAMILIES), which differ only in data: Qwen2 has a
bias on q/k/v; Llama and Qwen3 on q/k/v/o when attention_bias says so, Llama on the MLP when mlp_bias does; Qwen3
normalises each head of q and k (q_norm, k_norm: RMSNorm over head_dim, before RoPE, as transformers'
Qwen3Attention); Llama and Qwen3 may state a head_dim other than hidden_size / heads (q_proj then has
heads * head_dim outputs, o_proj as many inputs). Module names are the checkpoints' (transformers' names).
Tokens of all sequences in a step are packed along one axis; the step's AttentionMetadata says where each belongs.
Under tensor parallelism (`tp`, parallel.py) each rank holds its query heads, their KV heads and its share of the
MLP columns; o_proj and down_proj all-reduce (layers/linear.py). With tp.size 1 the layers are whole.
Qwen3-MoE layers replace the MLP by routed experts (moe.py), in the layers TextConfig.is_moe_layer names.
The decoder linears take the linear method the checkpoint's quantization block picks for their names
(quant.method_for: dense, AWQ or FP8); `prefix` is each module's name in the model (language_model.layers.N...)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..config import QuantConfig, TextConfig
from ..layers.attention import Attention, AttentionMetadata
from ..layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, vocab_embedding
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..quant import method_for
from .moe import SparseMoeBlock


class DecoderAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, rotary_emb: RotaryEmbedding, ops, tp,
                 quant: QuantConfig | None, prefix: str):
        super().__init__()
        h, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        hq, hkv = tp.part(h)[1], tp.kv_heads(hk)[1]  # this rank's query heads and the KV heads they read
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, d
        qkv = [f"{prefix}.{name}" for name in ("q_proj", "k_proj", "v_proj")]
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, h, hk, cfg.qkv_bias, tp, method_for(quant, qkv),
                                          f"{prefix}.qkv_proj", ops)
        self.o_proj = RowParallelLinear(h * d, cfg.hidden_size, cfg.o_proj_bias, tp,
                                        method_for(quant, [f"{prefix}.o_proj"]), f"{prefix}.o_proj", ops)
        # weights [head_dim], the same on every rank; the norm kernels take contiguous rows, hence the copies below
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.rotary_emb = [rotary_emb]  # shared by all layers; a list keeps it out of this module's state dict
        self.attn = Attention(hq, hkv, d, layer_idx, ops)

    def forward(self, positions, x, meta: AttentionMetadata):
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        self.rotary_emb[0](positions, q, k, meta.rope_seq_lens)
        return self.o_proj(self.attn(q, k, v, meta).reshape(t, -1))


class DecoderMLP(nn.Module):
    def __init__(self, cfg: TextConfig, ops, tp, quant: QuantConfig | None, prefix: str):
        super().__init__()
        f = cfg.intermediate_size
        gate_up = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [f, f], ["gate_proj", "up_proj"], cfg.mlp_bias,
                                                       tp, method_for(quant, gate_up), f"{prefix}.gate_up_proj", ops)
        self.down_proj = RowParallelLinear(f, cfg.hidden_size, cfg.mlp_bias, tp,
                                           method_for(quant, [f"{prefix}.down_proj"]), f"{prefix}.down_proj", ops)

    def forward(self, x):
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, rotary_emb: RotaryEmbedding, ops, tp,
                 quant: QuantConfig | None, prefix: str):
        super().__init__()
        self.self_attn = DecoderAttention(cfg, layer_idx, rotary_emb, ops, tp, quant, f"{prefix}.self_attn")
        # Qwen3-MoE: routed experts in the layers cfg.is_moe_layer names (moe.py), the dense MLP in the others
        self.mlp = SparseMoeBlock(cfg, ops, tp) if cfg.is_moe_layer(layer_idx) else \
            DecoderMLP(cfg, ops, tp, quant, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, positions, x, residual, meta: AttentionMetadata):
        # The residual stream is carried separately so each norm can fuse the preceding add.
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: TextConfig, ops, tp, quant: QuantConfig | None = None, prefix: str = "language_model"):
        super().__init__()
        self.embed_tokens = vocab_embedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_type,
                                          cfg.rope_factor, ops=ops)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.rotary_emb, ops, tp, quant, f"{prefix}.layers.{i}")
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, positions, inputs_embeds, meta: AttentionMetadata):
        x, residual = inputs_embeds, None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual)[0]
