"""InternVL = InternViT -> pixel shuffle -> MLP projector -> a Qwen2, Llama, Qwen3 or Qwen3-MoE decoder (spec
sections 0-4; decoder.py, moe.py).
Parameter names equal the checkpoint keys after the loader's prefix normalisation. Under tensor parallelism the
language model and lm_head are sharded (decoder.py, layers/linear.py); the vision tower and projector are whole on
every rank, which runs its share of a step's tiles (worker/executor.py). A quantized checkpoint's format applies
to the decoder linears (quant/)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as ops_module
from ..config import ModelConfig
from ..parallel import TensorParallel
from ..quant import check_tensor_parallel
from ..layers.attention import AttentionMetadata
from ..layers.linear import lm_head
from ..layers.norm import LayerNorm
from .intern_vit import InternVisionModel
from .decoder import DecoderModel
from .decode_fused import FusedDecode, unsupported


class InternVLMultiModalProjector(nn.Module):
    def __init__(self, cfg: ModelConfig, ops):
        super().__init__()
        width = cfg.vision.hidden_size * int(1 / cfg.downsample_ratio) ** 2
        self.layer_norm = LayerNorm(width, 1e-5, ops)  # torch's default eps, unlike the tower's 1e-6
        self.linear_1 = nn.Linear(width, cfg.text.hidden_size)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(self.layer_norm(x))))


class InternVLForConditionalGeneration(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ops_module.OpTable | None = None, tp: TensorParallel | None = None):
        """ops: the engine's kernel table (default: the caller's current one, torch unless chosen otherwise);
        tp: this rank's tensor-parallel group (default: one rank, plain layers)."""
        super().__init__()
        self.config = cfg
        self.ops = ops = ops or ops_module.current_table()
        self.tp = tp = tp or TensorParallel.single()
        check_tensor_parallel(cfg.text, cfg.quant, tp.size)  # the whole model's sizes, before any layer's own check
        self.vision_tower = InternVisionModel(cfg.vision, cfg.vision_feature_layer, ops)
        self.multi_modal_projector = InternVLMultiModalProjector(cfg, ops)
        self.language_model = DecoderModel(cfg.text, ops, tp, cfg.quant)
        self.lm_head = lm_head(cfg.text.hidden_size, cfg.text.vocab_size, tp)
        self.fused_decode: FusedDecode | None = None  # set_decode_path
        self.fused_unsupported: str | None = None

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank keeps in its cache (all of them with one rank)."""
        return self.tp.kv_heads(self.config.text.num_key_value_heads)[1]

    def use_ops(self, table: ops_module.OpTable) -> None:
        """Rebind every layer to another kernel table: for benchmarks that time one model on each backend; an
        engine binds its table once, at construction."""
        for m in self.modules():
            if "ops" in m.__dict__:
                m.ops = table

    def set_decode_path(self, path: str) -> None:
        """"fused": decode steps of 1-8 tokens take models/decode_fused.py's forward where this model supports it
        (else `fused_unsupported` says why, and every step takes the default forward); "default": none do."""
        self.fused_unsupported = unsupported(self.language_model, self.tp) if path == "fused" else None
        use = path == "fused" and self.fused_unsupported is None
        self.fused_decode = FusedDecode(self.language_model) if use else None

    def tie_lm_head(self) -> None:
        self.lm_head.weight = self.language_model.embed_tokens.weight

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> [N * tokens_per_tile, D] rows in tile order."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        states = self.vision_tower(pixel_values.to(dtype))[:, 1:]  # drop CLS
        features = self.ops.pixel_shuffle(states.contiguous(), self.config.downsample_ratio)
        return self.multi_modal_projector(features).flatten(0, 1)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None,
              image_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, with image_features [R, D] written over rows image_rows [R] (int64): the positions of
        the processor's placeholder spans, never a search for the <IMG_CONTEXT> id (a generated one is text)."""
        x = self.language_model.embed_tokens(input_ids)
        if image_rows is not None and image_rows.numel():
            x = x.index_copy(0, image_rows, image_features.to(x.dtype))
        return x

    def forward(self, input_ids, positions, meta: AttentionMetadata, image_features=None, image_rows=None):
        x = self.embed(input_ids, image_features, image_rows)
        if self.fused_decode is not None and self.fused_decode.applies(x, meta):
            return self.fused_decode(positions, x, meta)
        return self.language_model(positions, x, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary; None on a tensor-parallel rank other than the driver."""
        return self.lm_head(hidden)
