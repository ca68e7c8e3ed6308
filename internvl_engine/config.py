"""Model configuration read from a checkpoint's config.json, in the transformers `-hf` form (model_type
"internvl") and the original OpenGVLab form (model_type "internvl_chat"), plus generation_config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .constants import IMAGE_TOKEN_ID, TILE_SIZE
from .errors import CheckpointError, UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    attention_bias: bool = True
    use_qk_norm: bool = False
    norm_type: str = "layer_norm"  # "layer_norm" (InternViT-300M) | "rms_norm" (InternViT-6B)
    layer_norm_eps: float = 1e-6
    image_size: int = TILE_SIZE
    patch_size: int = 14
    num_channels: int = 3
    use_mean_pooling: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 151674
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 64
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rope_type: str = "default"
    rope_factor: float = 1.0
    tie_word_embeddings: bool | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = IMAGE_TOKEN_ID
    downsample_ratio: float = 0.5
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    tie_word_embeddings: bool | None = None
    torch_dtype: str | None = None
    eos_token_ids: tuple[int, ...] = (151645,)
    source_format: str = "hf"  # "hf" | "original"
    source: str = ""  # where it was read (the config.json path), for error messages
    # Tiling limits the model config itself states (the original format's min/max_dynamic_patch); None: it does not
    # say, and the processor files or the defaults decide.
    min_tiles: int | None = None
    max_tiles: int | None = None
    # quantization_config (top level, llm_config or text_config): quant.QuantConfig, None for a dense checkpoint
    quant: object = None

    @property
    def image_seq_length(self) -> int:
        grid = self.vision.image_size // self.vision.patch_size
        return int(grid * self.downsample_ratio) ** 2

    @property
    def max_model_len(self) -> int:
        """Longest sequence the engine accepts: the trained context, stretched by the RoPE scaling factor."""
        t = self.text
        scale = t.rope_factor if t.rope_type in ("linear", "dynamic") else 1.0
        return int(t.max_position_embeddings * scale)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type == "internvl":
            cfg = _from_hf(raw, where)
        elif model_type == "internvl_chat":
            cfg = _from_original(raw, where)
        else:
            arch = raw.get("architectures")
            raise UnsupportedModelError(
                f"{where}: model_type {model_type!r} (architectures {arch}) is not supported; "
                "expected an InternVL checkpoint ('internvl' or 'internvl_chat')")
        _validate(cfg, where)
        cfg.quant = _quant_config(raw, where)
        cfg.source = where
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        raw = read_json(cfg_file)
        cfg = cls.from_dict(raw, str(cfg_file))
        gen_file = path / "generation_config.json"
        eos = [cfg.text.eos_token_id]
        if gen_file.exists():
            eos.append(read_json(gen_file).get("eos_token_id"))
        cfg.eos_token_ids = tuple(sorted({i for e in eos for i in _as_list(e)})) or (151645,)
        return cfg


def read_json(p: Path) -> dict:
    """A checkpoint's JSON file as a dict; any problem is a CheckpointError naming the file."""
    try:
        text = Path(p).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: cannot read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _scalar(v) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def _text_config(t: dict, where: str) -> TextConfig:
    mt = t.get("model_type", "qwen2")
    archs = t.get("architectures") or []
    if mt != "qwen2" or any(a not in ("Qwen2ForCausalLM",) for a in archs):
        raise UnsupportedModelError(
            f"{where}: language model {mt!r} {archs} is not supported; only Qwen2 (InternVL3 1B-78B) is implemented")
    # transformers >= 5 writes rope_parameters; 4.x files carry rope_theta + rope_scaling.
    rope = dict(t.get("rope_parameters") or {})
    scaling = t.get("rope_scaling") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = rope.get("factor", scaling.get("factor", 1.0))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"{where}: rope type {rope_type!r} is not supported ({SUPPORTED_ROPE_TYPES})")
    hidden, heads = int(t.get("hidden_size", 896)), int(t.get("num_attention_heads", 14))
    if t.get("use_sliding_window"):
        raise UnsupportedModelError(f"{where}: sliding-window attention is not supported")
    return TextConfig(
        vocab_size=int(t.get("vocab_size", 151674)),
        hidden_size=hidden,
        intermediate_size=int(t.get("intermediate_size", 4864)),
        num_hidden_layers=int(t.get("num_hidden_layers", 24)),
        num_attention_heads=heads,
        num_key_value_heads=int(t.get("num_key_value_heads", heads)),
        head_dim=int(t.get("head_dim") or hidden // heads),
        hidden_act=t.get("hidden_act", "silu"),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(t.get("max_position_embeddings", 32768)),
        rope_theta=float(theta),
        rope_type=rope_type,
        rope_factor=float(factor),
        tie_word_embeddings=t.get("tie_word_embeddings"),
        bos_token_id=t.get("bos_token_id"),
        eos_token_id=t.get("eos_token_id"),
    )


# The original InternVisionConfig spells two switches differently from transformers' InternVLVisionConfig.
_ORIGINAL_VISION_KEYS = {"qkv_bias": "attention_bias", "qk_normalization": "use_qk_norm"}


def _vision_config(v: dict, image_size_default: int = TILE_SIZE) -> VisionConfig:
    return VisionConfig(
        hidden_size=int(v.get("hidden_size", 1024)),
        num_hidden_layers=int(v.get("num_hidden_layers", 24)),
        num_attention_heads=int(v.get("num_attention_heads", 16)),
        intermediate_size=int(v.get("intermediate_size", 4096)),
        hidden_act=v.get("hidden_act", "gelu"),
        attention_bias=bool(v.get("attention_bias", False)),
        use_qk_norm=bool(v.get("use_qk_norm", False)),
        norm_type=v.get("norm_type", "layer_norm"),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        image_size=_scalar(v.get("image_size", image_size_default)),
        patch_size=_scalar(v.get("patch_size", 14)),
        num_channels=int(v.get("num_channels", 3)),
        use_mean_pooling=bool(v.get("use_mean_pooling", True)),
    )


def _from_hf(raw: dict, where: str) -> ModelConfig:
    vision = _vision_config(raw.get("vision_config") or {})
    return ModelConfig(
        vision=vision,
        text=_text_config(raw.get("text_config") or {}, where),
        image_token_id=int(raw.get("image_token_id", IMAGE_TOKEN_ID)),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        projector_hidden_act=raw.get("projector_hidden_act", "gelu"),
        vision_feature_layer=raw.get("vision_feature_layer", -1),
        vision_feature_select_strategy=raw.get("vision_feature_select_strategy", "default"),
        tie_word_embeddings=raw.get("tie_word_embeddings"),
        torch_dtype=raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype"),
        source_format="hf",
    )


def _from_original(raw: dict, where: str) -> ModelConfig:
    """OpenGVLab's InternVLChatConfig: vision_config (InternVisionConfig) + llm_config (Qwen2Config)."""
    v = {_ORIGINAL_VISION_KEYS.get(k, k): val for k, val in (raw.get("vision_config") or {}).items()}
    vision = _vision_config(v, raw.get("force_image_size") or TILE_SIZE)
    if raw.get("force_image_size") and raw["force_image_size"] != vision.image_size:
        # OpenGVLab's model then interpolates the position embeddings to force_image_size tiles; this one does not
        raise UnsupportedModelError(f"{where}: force_image_size {raw['force_image_size']} differs from the vision "
                                    f"image_size {vision.image_size}")
    if raw.get("ps_version", "v2") != "v2":
        raise UnsupportedModelError(f"{where}: ps_version {raw.get('ps_version')!r}; only 'v2' (InternVL3) is supported")
    llm = dict(raw.get("llm_config") or {})
    min_tiles, max_tiles = _original_tiling(raw, where)
    return ModelConfig(
        vision=vision,
        text=_text_config(llm, where),
        image_token_id=int(raw.get("img_context_token_id") or IMAGE_TOKEN_ID),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        vision_feature_layer=int(raw.get("select_layer", -1)),
        tie_word_embeddings=raw.get("tie_word_embeddings"),
        torch_dtype=raw.get("torch_dtype") or llm.get("torch_dtype"),
        source_format="original",
        min_tiles=min_tiles,
        max_tiles=max_tiles,
    )


def _original_tiling(raw: dict, where: str) -> tuple[int | None, int | None]:
    """The original format keeps its tiling limits in config.json, where OpenGVLab's training code and vLLM
    read them."""
    if "dynamic_image_size" in raw and not raw["dynamic_image_size"]:
        return 1, 1  # one resized tile per image, no thumbnail
    if raw.get("use_thumbnail") is False:
        raise UnsupportedModelError(f"{where}: use_thumbnail=false is not supported (InternVL3 tiles add a thumbnail)")
    lo, hi = raw.get("min_dynamic_patch"), raw.get("max_dynamic_patch")
    return (None if lo is None else int(lo)), (None if hi is None else int(hi))


def _quant_config(raw: dict, where: str):
    """The quantization block, wherever the producer put it (LMDeploy: llm_config; transformers: top level)."""
    from .quant import parse_quant_config

    blocks = [raw.get("quantization_config"), (raw.get("llm_config") or {}).get("quantization_config"),
              (raw.get("text_config") or {}).get("quantization_config")]
    blocks = [b for b in blocks if b]
    if len(blocks) > 1 and any(b != blocks[0] for b in blocks[1:]):
        raise UnsupportedModelError(f"{where}: different quantization_config blocks at the top level and in the "
                                    "language model's config")
    return parse_quant_config(blocks[0] if blocks else None, where)


def _validate(cfg: ModelConfig, where: str) -> None:
    v, t = cfg.vision, cfg.text
    if v.norm_type not in ("layer_norm", "rms_norm"):
        raise UnsupportedModelError(f"{where}: vision norm_type {v.norm_type!r} is not supported")
    if v.hidden_act != "gelu" or cfg.projector_hidden_act != "gelu" or t.hidden_act != "silu":
        raise UnsupportedModelError(
            f"{where}: activations {v.hidden_act!r}/{cfg.projector_hidden_act!r}/{t.hidden_act!r} are not supported "
            "(expected gelu/gelu/silu)")
    if cfg.vision_feature_select_strategy != "default":
        raise UnsupportedModelError(f"{where}: vision_feature_select_strategy must be 'default'")
    if not isinstance(cfg.vision_feature_layer, int) or not -v.num_hidden_layers <= cfg.vision_feature_layer < 0:
        raise UnsupportedModelError(f"{where}: vision_feature_layer {cfg.vision_feature_layer!r} is not supported")
    if cfg.downsample_ratio != 0.5:
        raise UnsupportedModelError(f"{where}: downsample_ratio {cfg.downsample_ratio} (only 0.5 is supported)")
    if t.num_attention_heads % t.num_key_value_heads or v.hidden_size % v.num_attention_heads:
        raise UnsupportedModelError(f"{where}: head counts do not divide evenly")
