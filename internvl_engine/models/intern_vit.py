"""InternViT (300M: LayerNorm + qkv bias; 6B: RMSNorm + full-width qk-norm), spec section 2.
Per tile: conv patch embedding -> [CLS] + patches + absolute positions -> pre-norm blocks with layer scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..layers.linear import PackedLinear
from ..layers.norm import LayerNorm, RMSNorm, make_norm


class InternVisionPatchEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values):
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # [N, rows*cols, C], row-major


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))
        self.patch_embeddings = InternVisionPatchEmbeddings(cfg)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """The stored table, or for another input size its patch grid resized bicubically (CLS row kept)."""
        pos = self.position_embeddings
        grid = int((pos.shape[1] - 1) ** 0.5)
        rows, cols = height // self.patch_size, width // self.patch_size
        if rows == cols == grid:
            return pos
        patch = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat((pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)), dim=1)

    def forward(self, pixel_values):
        x = self.patch_embeddings(pixel_values)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.positions(pixel_values.shape[-2], pixel_values.shape[-1])


class InternVisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, ops):
        super().__init__()
        self.ops = ops
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        # Checkpoints keep q_proj/k_proj/v_proj (-hf) or a fused qkv (original); both load into this one matmul.
        self.qkv = PackedLinear(c, [c, c, c], ["q_proj", "k_proj", "v_proj"], bias=cfg.attention_bias)
        if cfg.use_qk_norm:  # normalises all heads together, before the head split
            self.q_norm = RMSNorm(c, cfg.layer_norm_eps, ops)
            self.k_norm = RMSNorm(c, cfg.layer_norm_eps, ops)
        self.use_qk_norm = cfg.use_qk_norm
        self.projection_layer = nn.Linear(c, c, bias=True)

    def forward(self, x):
        n, length, c = x.shape
        q, k, v = self.qkv.split(self.qkv(x))
        if self.use_qk_norm:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())  # norm kernels take dense rows
        heads = (n * length, self.num_heads, self.head_dim)
        cu = torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device=x.device)
        o = self.ops.flash_attention(q.reshape(heads), k.reshape(heads), v.reshape(heads), cu, cu, length, length,
                                causal=False, scale=self.head_dim ** -0.5)
        return self.projection_layer(o.reshape(n, length, c))


class InternVisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, ops):
        super().__init__()
        self.attention = InternVisionAttention(cfg, ops)
        self.mlp = InternVisionMLP(cfg)
        self.layernorm_before = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps, ops)
        self.layernorm_after = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps, ops)
        self.lambda_1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lambda_2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x):
        x = x + self.lambda_1 * self.attention(self.layernorm_before(x))
        return x + self.lambda_2 * self.mlp(self.layernorm_after(x))


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, ops):
        super().__init__()
        self.layer = nn.ModuleList(InternVisionLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))


class InternVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig, feature_layer: int, ops):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg, ops)
        # feature_layer -k is the output of layer L-k+1; later layers are never run.
        self.num_layers_used = cfg.num_hidden_layers + feature_layer + 1
        if not cfg.use_mean_pooling:
            self.layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, ops)

    def forward(self, pixel_values):
        """pixel_values [N, 3, S, S] -> hidden states [N, 1 + (S/14)^2, C] of the selected layer."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layer[: self.num_layers_used]:
            x = layer(x)
        if hasattr(self, "layernorm") and self.num_layers_used == len(self.encoder.layer):
            x = self.layernorm(x)
        return x
