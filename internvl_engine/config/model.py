"""Model configuration read from a checkpoint's config.json, in the transformers `-hf` form (model_type
"internvl") and the original OpenGVLab form (model_type "internvl_chat"), plus generation_config.json."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..constants import IMAGE_TOKEN_ID, TILE_SIZE
from ..errors import CheckpointError, UnsupportedModelError
from .quant import QuantConfig, parse_quant_config

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
    """The decoder, in what its families (TEXT_FAMILIES) differ by: all of them are pre-norm RMSNorm blocks with
    GQA attention, NeoX RoPE and a SiLU-gated MLP, or routed SiLU-gated experts in Qwen3-MoE's sparse layers
    (transformers' Qwen2, Llama, Qwen3 and Qwen3-MoE modeling code)."""
    model_type: str = "qwen2"  # "qwen2" | "llama" | "qwen3" | "qwen3_moe"
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
    qkv_bias: bool = True  # Qwen2 always; Llama and Qwen3 as attention_bias says
    o_proj_bias: bool = False  # Llama and Qwen3: attention_bias covers o_proj too
    mlp_bias: bool = False  # Llama's mlp_bias (gate, up and down)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k (weights [head_dim]) before RoPE
    # Mixture of experts (Qwen3-MoE; the defaults are transformers' Qwen3MoeConfig's): num_experts routed SwiGLU
    # experts of width moe_intermediate_size, num_experts_per_tok of them a token, their softmax weights renormalised
    # to sum to 1 when norm_topk_prob. Which layers are sparse: is_moe_layer. num_experts 0: a dense decoder.
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_moe_layer(self, i: int) -> bool:
        """Whether decoder layer i holds the routed experts (else the dense MLP of intermediate_size), by
        transformers' Qwen3MoeDecoderLayer rule: not listed in mlp_only_layers, and every decoder_sparse_step-th
        layer counting from 1."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]


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
    # quantization_config (top level, llm_config or text_config); None for a dense checkpoint
    quant: QuantConfig | None = None

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
        """Every malformed value (a wrong type, a size out of range, heads that do not divide the width) is a
        CheckpointError naming `where` and the key; an architecture this engine does not implement is an
        UnsupportedModelError."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        fields = _Fields(raw, where)
        if model_type == "internvl":
            cfg = _from_hf(fields)
        elif model_type == "internvl_chat":
            cfg = _from_original(fields)
        else:
            arch = raw.get("architectures")
            raise UnsupportedModelError(
                f"{where}: model_type {model_type!r} (architectures {arch}) is not supported; "
                "expected an InternVL checkpoint ('internvl' or 'internvl_chat')")
        _validate(cfg, where)
        cfg.quant = _quant_config(fields)
        if cfg.quant is not None and cfg.text.moe_layers:
            # the quantized linear methods (quant/) cover 2-D linears; the experts are one 3-D weight per layer
            raise UnsupportedModelError(f"{where}: a quantized ({cfg.quant.method}) mixture-of-experts checkpoint is "
                                        "not supported: the routed experts are read as dense weights only")
        cfg.source = where
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        raw = read_json(cfg_file)
        cfg = cls.from_dict(raw, str(cfg_file))
        if cfg.source_format == "original" and raw.get("img_context_token_id") is None:
            cfg.image_token_id = _original_image_token(path, cfg.image_token_id)
        gen_file = path / "generation_config.json"
        eos = [cfg.text.eos_token_id]
        if gen_file.exists():
            eos.append(_Fields(read_json(gen_file), str(gen_file)).token_ids("eos_token_id", None))
        ids = {i for e in eos if e is not None for i in (e if isinstance(e, list) else [e])}
        cfg.eos_token_ids = tuple(sorted(ids)) or (151645,)
        return cfg

    @property
    def ties_lm_head(self) -> bool:
        """The config says the lm_head is the embedding matrix (either level): what a random preset builds, as
        transformers builds the model from that config."""
        return True in (self.tie_word_embeddings, self.text.tie_word_embeddings)

    @property
    def lm_head_may_tie(self) -> bool:
        """Whether a checkpoint without an lm_head tensor ties it to the embeddings: unless the config says
        tie_word_embeddings false (top level or the language model's, and neither says true), when the lm_head
        must be in the files. transformers 5 reads the top level, 4.x and OpenGVLab's code the language model's."""
        flags = (self.tie_word_embeddings, self.text.tie_word_embeddings)
        return True in flags or flags == (None, None)


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
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." nested past the parser's stack
        raise CheckpointError(f"{p}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


# Bounds on the sizes config.json states, far above every InternVL3 release (spec 1.4: at most 80 decoder layers,
# hidden 8192, intermediate 29568, vocabulary 151674, 32768 positions): a corrupt or hostile file is refused here,
# before the model is built (num_hidden_layers = 10**12 once grew the process to 21 GB before it was killed). The
# loader then checks every tensor the config implies against the checkpoint's headers before allocating any.
CONFIG_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "intermediate_size": 262144,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "vocab_size": 1 << 21,
    "max_position_embeddings": 1 << 20,
    "max_model_len": 1 << 20,  # max_position_embeddings x the RoPE factor: the rotary table has a row per position
    "image_size": 4096,
    "patch_size": 4096,
    "min_dynamic_patch": 1024,
    "max_dynamic_patch": 1024,
    "force_image_size": 4096,
    "num_experts": 4096,  # the MoE releases route over 128 experts
    "num_experts_per_tok": 4096,
    "moe_intermediate_size": 262144,
    "decoder_sparse_step": 1024,
}


def _show(v) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


class _Fields:
    """One JSON object of config.json, read key by key: each value is checked for its type and range, and an error
    is a CheckpointError naming the file and the key's path (e.g. text_config.hidden_size). A key that is absent
    takes the default; an explicit null only where the key is optional."""

    def __init__(self, raw: dict, where: str, path: str = ""):
        self.raw, self.where, self.path = raw, where, path
        self.spelled: dict[str, str] = {}  # key read -> the key as the file spells it, where they differ

    def fail(self, key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {self.path}{self.spelled.get(key, key)} {problem}")

    def get(self, key: str, default=None):
        return self.raw.get(key, default)

    def sub(self, key: str) -> "_Fields":
        v = self.raw.get(key)
        if v is not None and not isinstance(v, dict):
            raise self.fail(key, f"must be a JSON object, got {_show(v)}")
        return _Fields(v or {}, self.where, f"{self.path}{key}.")

    def integer(self, key: str, default, lo: int = 1, optional: bool = False) -> int | None:
        v = self.raw.get(key, default)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(key, f"must be an integer, got {_show(v)}")
        if v < lo:
            raise self.fail(key, f"is {v}; it must be at least {lo}")
        limit = CONFIG_LIMITS.get(key)
        if limit is not None and v > limit:
            raise self.fail(key, f"is {v}, over the {limit} limit (internvl_engine.config.CONFIG_LIMITS[{key!r}])")
        return v

    def number(self, key: str, default) -> float:
        """A finite number > 0 (norm epsilons, RoPE base and factor)."""
        v = self.raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(key, f"must be a number, got {_show(v)}")
        if not math.isfinite(v) or v <= 0:
            raise self.fail(key, f"is {v}; it must be a finite number > 0")
        return float(v)

    def flag(self, key: str, default, optional: bool = False) -> bool | None:
        v = self.raw.get(key, default)
        if v is None and optional:
            return None
        if not isinstance(v, bool):
            raise self.fail(key, f"must be true or false, got {_show(v)}")
        return v

    def text(self, key: str, default, optional: bool = False) -> str | None:
        v = self.raw.get(key, default)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise self.fail(key, f"must be a string, got {_show(v)}")
        return v

    def side(self, key: str, default: int) -> int:
        """An image or patch side: an integer, or [height, width] as transformers writes it (square only)."""
        v = self.raw.get(key, default)
        if isinstance(v, list):
            if len(v) != 2 or v[0] != v[1]:
                raise self.fail(key, f"must be one side or a square [height, width], got {_show(v)}")
            return _Fields({key: v[0]}, self.where, self.path).integer(key, default)
        return self.integer(key, default)

    def token_ids(self, key: str, default) -> list[int]:
        """A token id, a list of them, or null."""
        v = self.raw.get(key, default)
        if v is None:
            return []
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise self.fail(key, f"must be a token id (an integer >= 0) or a list of them, got {_show(v)}")
        return list(v) if isinstance(v, list) else [v]


# The decoder families this engine implements: text_config.model_type -> the architectures their configs name, and
# the defaults of the keys where transformers' config classes differ (Qwen2Config, LlamaConfig, Qwen3Config; a key
# the file states wins). Qwen2 puts a bias on q/k/v only; Llama and Qwen3 have `attention_bias` for q/k/v/o (false by
# default); Qwen3 adds q_norm/k_norm and states head_dim (128 when absent), which Llama may state too.
TEXT_FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM",),
    # transformers' converter builds the LlamaConfig of InternVL3-9B / InternVL2.5 from the original llm_config,
    # whose architectures (InternLM3ForCausalLM / InternLM2ForCausalLM) it keeps
    "llama": ("LlamaForCausalLM", "InternLM3ForCausalLM", "InternLM2ForCausalLM"),
    "qwen3": ("Qwen3ForCausalLM",),
    # InternVL3.5-30B-A3B and -241B-A28B: Qwen3's attention, routed experts in the MLP (TextConfig.is_moe_layer)
    "qwen3_moe": ("Qwen3MoeForCausalLM",),
}
_FAMILY_DEFAULTS = {
    "qwen2": dict(head_dim=None, max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645),
    "llama": dict(head_dim=None, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "qwen3": dict(head_dim=128, max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
    # Qwen3MoeConfig has no head_dim default: Qwen3MoeAttention takes hidden_size / heads unless the file states one.
    # Its sizes (Qwen3-30B-A3B's but for 24 layers and the vocabulary) are what transformers reads a file without
    # them as; the other families keep the sizes below (InternVL3-1B's)
    "qwen3_moe": dict(head_dim=None, max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
                      vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4),
}
_SIZE_DEFAULTS = dict(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14)


def _supported_families() -> str:
    return ", ".join(f"{mt} ({'/'.join(archs)})" for mt, archs in TEXT_FAMILIES.items())


def _gpt_oss_refusal(f: _Fields, key: str, value) -> UnsupportedModelError:
    """InternVL3.5-GPT-OSS-20B-A4B's decoder (transformers' GptOss modeling) is a mixture of experts like Qwen3-MoE,
    but differs in what this engine lacks: a learned per-head sink logit in every attention softmax, sliding-window
    (128) attention on every other layer, YaRN RoPE, a clamped SwiGLU with biased experts, and gpt-oss's experts
    released in MXFP4."""
    return UnsupportedModelError(
        f"{f.where}: {f.path}{key} {value!r} (GPT-OSS, e.g. InternVL3.5-GPT-OSS-20B-A4B) is not supported: this "
        "engine lacks attention sinks (a learned per-head logit in the softmax), sliding-window attention on "
        "alternating layers, YaRN RoPE, the clamped SwiGLU with expert biases and MXFP4 expert weights; the "
        f"language models implemented are {_supported_families()}")


def _text_config(t: _Fields) -> TextConfig:
    mt = t.get("model_type", "qwen2")
    archs = t.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise t.fail("architectures", f"must be a list of strings, got {_show(archs)}")
    if mt == "gpt_oss" or "GptOssForCausalLM" in archs:
        raise _gpt_oss_refusal(t, "model_type", mt)
    if mt not in TEXT_FAMILIES:
        raise UnsupportedModelError(
            f"{t.where}: {t.path}model_type {mt!r} (architectures {archs}) is not supported; the language models "
            f"implemented are {_supported_families()}")
    unknown = [a for a in archs if a not in TEXT_FAMILIES[mt]]
    if unknown:
        raise UnsupportedModelError(
            f"{t.where}: {t.path}architectures {unknown} is not a {mt!r} decoder this engine implements; the "
            f"language models implemented are {_supported_families()}")
    defaults = _FAMILY_DEFAULTS[mt]
    # transformers >= 5 writes rope_parameters; 4.x files carry rope_theta + rope_scaling.
    rope, scaling = t.sub("rope_parameters"), t.sub("rope_scaling")
    theta = rope.number("rope_theta", None) if "rope_theta" in rope.raw else t.number("rope_theta", 10000.0)
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    factor = rope.number("factor", None) if "factor" in rope.raw else scaling.number("factor", 1.0)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        key = "rope_parameters" if rope.get("rope_type") else "rope_scaling"
        raise UnsupportedModelError(f"{t.where}: {t.path}{key} rope type {rope_type!r} is not supported "
                                    f"({', '.join(SUPPORTED_ROPE_TYPES)})")
    for block, where_key in ((rope, "rope_parameters."), (scaling, "rope_scaling."), (t, "")):
        # transformers' rope init rotates only the first head_dim x partial_rotary_factor features; these rotate all
        if block.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError(f"{t.where}: {t.path}{where_key}partial_rotary_factor "
                                        f"{block.get('partial_rotary_factor')!r} is not supported (only 1.0)")
    if t.get("use_sliding_window"):
        raise UnsupportedModelError(f"{t.where}: {t.path}use_sliding_window: sliding-window attention is not "
                                    "supported")
    size = _SIZE_DEFAULTS | defaults  # the family's sizes where it states them
    layers = t.integer("num_hidden_layers", size["num_hidden_layers"])
    hidden, heads = t.integer("hidden_size", size["hidden_size"]), t.integer("num_attention_heads",
                                                                              size["num_attention_heads"])
    kv_heads = t.integer("num_key_value_heads", size.get("num_key_value_heads", heads))
    head_dim = t.integer("head_dim", defaults["head_dim"], optional=True)
    if head_dim is None:  # Qwen2 and Llama: hidden_size / heads unless the file states head_dim
        if hidden % heads:
            raise t.fail("num_attention_heads", f"{heads} does not divide {t.path}hidden_size {hidden}")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise t.fail("num_key_value_heads", f"{kv_heads} does not divide {t.path}num_attention_heads {heads}")
    if head_dim % 2:
        raise t.fail("head_dim", f"is {head_dim}; rotary embeddings need an even head size")
    max_pos = t.integer("max_position_embeddings", defaults["max_position_embeddings"])
    if max_pos * (factor if rope_type in ("linear", "dynamic") else 1.0) > CONFIG_LIMITS["max_model_len"]:
        raise t.fail("max_position_embeddings", f"{max_pos} x RoPE factor {factor} is over the "
                     f"{CONFIG_LIMITS['max_model_len']} positions limit "
                     "(internvl_engine.config.CONFIG_LIMITS['max_model_len'])")
    eos = t.token_ids("eos_token_id", defaults["eos_token_id"])
    bos = t.token_ids("bos_token_id", defaults["bos_token_id"])
    attention_bias = mt != "qwen2" and t.flag("attention_bias", False)
    return TextConfig(
        model_type=mt,
        vocab_size=t.integer("vocab_size", size["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=t.integer("intermediate_size", size["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=t.get("hidden_act", "silu"),
        rms_norm_eps=t.number("rms_norm_eps", 1e-6),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_type=rope_type,
        rope_factor=factor,
        tie_word_embeddings=t.flag("tie_word_embeddings", None, optional=True),
        bos_token_id=bos[0] if bos else None,
        eos_token_id=eos if len(eos) > 1 else eos[0] if eos else None,
        qkv_bias=mt == "qwen2" or attention_bias,
        o_proj_bias=attention_bias,
        mlp_bias=mt == "llama" and t.flag("mlp_bias", False),
        qk_norm=mt in ("qwen3", "qwen3_moe"),
        **(_moe_fields(t, layers) if mt == "qwen3_moe" else {}),
    )


# Keys of MoE configs whose feature transformers' Qwen3MoeSparseMoeBlock does not have (Qwen2-MoE's shared expert,
# DeepSeek-style routers: sigmoid scores, group-limited top-k, scaled weights), with the values that mean plain
# Qwen3-MoE routing anyway.
_MOE_UNSUPPORTED = {"shared_expert_intermediate_size": (None, 0), "n_shared_experts": (None, 0),
                    "num_shared_experts": (None, 0), "scoring_func": (None, "softmax"),
                    "topk_method": (None, "greedy"), "n_group": (None, 1), "topk_group": (None, 1),
                    "routed_scaling_factor": (None, 1, 1.0)}


def _moe_fields(t: _Fields, layers: int) -> dict:
    """The MoE keys of a qwen3_moe text config (Qwen3MoeConfig's defaults where absent). transformers writes the
    expert count as num_local_experts (Qwen3MoeConfig.attribute_map), Qwen's and OpenGVLab's files as num_experts."""
    for key, plain in _MOE_UNSUPPORTED.items():
        if t.get(key) not in plain:
            raise UnsupportedModelError(f"{t.where}: {t.path}{key} {t.get(key)!r} is not supported (Qwen3-MoE routes "
                                        "every token over the routed experts only, by a softmax top-k)")
    if "num_experts" in t.raw and "num_local_experts" in t.raw and t.get("num_experts") != t.get("num_local_experts"):
        raise t.fail("num_experts", f"{t.get('num_experts')!r} differs from {t.path}num_local_experts "
                                    f"{t.get('num_local_experts')!r}")
    key = "num_experts" if "num_experts" in t.raw or "num_local_experts" not in t.raw else "num_local_experts"
    experts = t.integer(key, 128, lo=0)
    k = t.integer("num_experts_per_tok", 8)
    if experts and k > experts:
        raise t.fail("num_experts_per_tok", f"is {k}, more than the {experts} experts ({t.path}{key})")
    only = t.get("mlp_only_layers", [])
    if only is None:
        only = []
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers
                                         for i in only):
        raise t.fail("mlp_only_layers", f"must be a list of layer indices in [0, {layers}), got {_show(only)}")
    return dict(num_experts=experts, num_experts_per_tok=k,
                moe_intermediate_size=t.integer("moe_intermediate_size", 768),
                norm_topk_prob=t.flag("norm_topk_prob", False),
                decoder_sparse_step=t.integer("decoder_sparse_step", 1),
                mlp_only_layers=tuple(sorted(set(only))))


# The original InternVisionConfig spells two switches differently from transformers' InternVLVisionConfig.
_ORIGINAL_VISION_KEYS = {"qkv_bias": "attention_bias", "qk_normalization": "use_qk_norm"}


def _vision_config(v: _Fields, image_size_default: int = TILE_SIZE) -> VisionConfig:
    hidden, heads = v.integer("hidden_size", 1024), v.integer("num_attention_heads", 16)
    if hidden % heads:
        raise v.fail("num_attention_heads", f"{heads} does not divide {v.path}hidden_size {hidden}")
    image, patch = v.side("image_size", image_size_default), v.side("patch_size", 14)
    if image % patch or (image // patch) % 2:
        # the pixel shuffle (downsample_ratio 0.5) folds 2 x 2 patches into one token: an even grid of whole patches
        raise v.fail("image_size", f"{image} is not an even number of {v.path}patch_size {patch} patches")
    if v.get("num_channels", 3) != 3:
        raise UnsupportedModelError(f"{v.where}: {v.path}num_channels {v.get('num_channels')!r} (the processor "
                                    "makes RGB tiles: only 3)")
    return VisionConfig(
        hidden_size=hidden,
        num_hidden_layers=v.integer("num_hidden_layers", 24),
        num_attention_heads=heads,
        intermediate_size=v.integer("intermediate_size", 4096),
        hidden_act=v.get("hidden_act", "gelu"),
        attention_bias=v.flag("attention_bias", False),
        use_qk_norm=v.flag("use_qk_norm", False),
        norm_type=v.get("norm_type", "layer_norm"),
        layer_norm_eps=v.number("layer_norm_eps", 1e-6),
        image_size=image,
        patch_size=patch,
        num_channels=3,
        use_mean_pooling=v.flag("use_mean_pooling", True),
    )


def _from_hf(f: _Fields) -> ModelConfig:
    text = f.sub("text_config")
    return ModelConfig(
        vision=_vision_config(f.sub("vision_config")),
        text=_text_config(text),
        image_token_id=f.integer("image_token_id", IMAGE_TOKEN_ID, lo=0),
        downsample_ratio=f.number("downsample_ratio", 0.5),
        projector_hidden_act=f.get("projector_hidden_act", "gelu"),
        vision_feature_layer=f.get("vision_feature_layer", -1),
        vision_feature_select_strategy=f.get("vision_feature_select_strategy", "default"),
        tie_word_embeddings=f.flag("tie_word_embeddings", None, optional=True),
        torch_dtype=(f.text("dtype", None, optional=True) or f.text("torch_dtype", None, optional=True)
                     or text.text("dtype", None, optional=True)),
        source_format="hf",
    )


# OpenGVLab's language models that transformers reads as a Llama (convert_internvl_weights_to_hf.py,
# LM_TYPE_CORRESPONDENCE "llama": InternVL2.5 2B/8B/26B on InternLM2.5, InternVL3-9B on InternLM3), by the
# architecture their llm_config names, with the defaults of the config classes their checkpoints ship
# (InternLM2Config in OpenGVLab's internvl_chat code; transformers' InternLM3Config) where they differ from
# LlamaConfig's; a key the file states wins.
_ORIGINAL_AS_LLAMA = {
    "InternLM2ForCausalLM": ("internlm2", dict(vocab_size=103168, hidden_size=4096, intermediate_size=11008,
                                               num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                                               tie_word_embeddings=False)),
    "InternLM3ForCausalLM": ("internlm3", dict(vocab_size=128512, hidden_size=4096, intermediate_size=10240,
                                               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=2,
                                               head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
                                               tie_word_embeddings=False)),
}
# <IMG_CONTEXT>'s id where the original config.json leaves img_context_token_id out (OpenGVLab's model reads it
# from the tokenizer at run time): the converter writes 151667 for Qwen2 and 92546 for the InternLM decoders; the
# InternVL3.5 -HF configs (Qwen3 tokenizer, <think> and </think> added before it) 151671.
_ORIGINAL_IMAGE_TOKEN_IDS = {"qwen2": IMAGE_TOKEN_ID, "llama": 92546, "qwen3": 151671, "qwen3_moe": 151671}


def _original_llm(llm: _Fields) -> _Fields:
    """llm_config as the -hf text_config transformers' converter writes for it: InternLM2 and InternLM3 configs
    become Llama ones (InternLM2's one `bias` switch covers wqkv and wo: Llama's attention_bias); Qwen2, Qwen3 and
    Llama ones are read as they are. Any other architecture is an UnsupportedModelError naming it."""
    archs = llm.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise llm.fail("architectures", f"must be a list of strings, got {_show(archs)}")
    if llm.get("rope_pos_id_version", "default") != "default":
        # OpenGVLab's training code (internvl_chat) may give visual tokens V2PE's fractional position steps
        raise UnsupportedModelError(f"{llm.where}: {llm.path}rope_pos_id_version "
                                    f"{llm.get('rope_pos_id_version')!r} is not supported (only 'default')")
    if "GptOssForCausalLM" in archs or llm.get("model_type") == "gpt_oss":
        raise _gpt_oss_refusal(llm, "architectures", archs)
    # InternLM architectures are converted below even though a converted -hf llama config may still name them
    known = {a: mt for mt, names in TEXT_FAMILIES.items() for a in names if a not in _ORIGINAL_AS_LLAMA}
    by_type = {family: a for a, (family, _) in _ORIGINAL_AS_LLAMA.items()}
    arch = archs[0] if archs else by_type.get(llm.get("model_type"))
    if arch is None:  # no architectures: its model_type decides, as in a text_config
        return llm
    if arch not in known and arch not in _ORIGINAL_AS_LLAMA or len(set(archs)) > 1:
        supported = sorted(known) + sorted(_ORIGINAL_AS_LLAMA)
        raise UnsupportedModelError(f"{llm.where}: {llm.path}architectures {archs} is not supported; the original "
                                    f"(InternVLChatModel) language models implemented are {', '.join(supported)}")
    if arch in known:
        return llm if "model_type" in llm.raw else _Fields({**llm.raw, "model_type": known[arch]}, llm.where,
                                                              llm.path)
    family, defaults = _ORIGINAL_AS_LLAMA[arch]
    if llm.get("model_type", family) != family:
        raise UnsupportedModelError(f"{llm.where}: {llm.path}model_type {llm.get('model_type')!r} with "
                                    f"architectures {archs} (expected {family!r})")
    raw = {**defaults, **llm.raw, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    if family == "internlm2":
        raw["attention_bias"] = llm.flag("bias", True)  # InternLM2Config's default
    else:
        raw["attention_bias"] = llm.flag("qkv_bias", False)
        if llm.flag("bias", False):
            # transformers' InternLM3Config reads `bias` as the MLP's bias, vLLM's Llama as o_proj's; no InternLM3
            # release sets it
            raise UnsupportedModelError(f"{llm.where}: {llm.path}bias true (InternLM3) is not supported")
    raw.pop("mlp_bias", None)  # neither InternLM config has one; their MLPs carry no bias
    out = _Fields(raw, llm.where, llm.path)
    out.spelled = {"attention_bias": "bias" if family == "internlm2" else "qkv_bias"}
    return out


def _original_image_token(path: Path, default: int) -> int:
    """<IMG_CONTEXT>'s id in the checkpoint's tokenizer.json, which OpenGVLab's model looks up at run time where
    config.json does not state img_context_token_id; the family's id (_ORIGINAL_IMAGE_TOKEN_IDS) without one."""
    tok = path / "tokenizer.json"
    if not tok.is_file():
        return default
    added = read_json(tok).get("added_tokens")
    ids = [t.get("id") for t in added if isinstance(t, dict) and t.get("content") == "<IMG_CONTEXT>"] \
        if isinstance(added, list) else []
    return ids[0] if len(ids) == 1 and isinstance(ids[0], int) and not isinstance(ids[0], bool) else default


def _from_original(f: _Fields) -> ModelConfig:
    """OpenGVLab's InternVLChatConfig: vision_config (InternVisionConfig) + llm_config (Qwen2Config, Qwen3Config,
    LlamaConfig, InternLM2Config or InternLM3Config, named by its architectures)."""
    v = f.sub("vision_config")
    v.spelled = {new: old for old, new in _ORIGINAL_VISION_KEYS.items() if old in v.raw}  # errors name qkv_bias
    v.raw = {_ORIGINAL_VISION_KEYS.get(k, k): val for k, val in v.raw.items()}
    force = f.integer("force_image_size", None, optional=True)
    vision = _vision_config(v, force or TILE_SIZE)
    if force and force != vision.image_size:
        # OpenGVLab's model then interpolates the position embeddings to force_image_size tiles; this one does not
        raise UnsupportedModelError(f"{f.where}: force_image_size {force} differs from the vision "
                                    f"image_size {vision.image_size}")
    if f.get("ps_version", "v2") != "v2":
        raise UnsupportedModelError(f"{f.where}: ps_version {f.get('ps_version')!r}; only 'v2' (InternVL3) is "
                                    "supported")
    llm = f.sub("llm_config")
    min_tiles, max_tiles = _original_tiling(f)
    text = _text_config(_original_llm(llm))
    image_token = f.integer("img_context_token_id", None, lo=0, optional=True)
    return ModelConfig(
        vision=vision,
        text=text,
        image_token_id=_ORIGINAL_IMAGE_TOKEN_IDS[text.model_type] if image_token is None else image_token,
        downsample_ratio=f.number("downsample_ratio", 0.5),
        vision_feature_layer=f.integer("select_layer", -1, lo=-CONFIG_LIMITS["num_hidden_layers"]),
        tie_word_embeddings=f.flag("tie_word_embeddings", None, optional=True),
        torch_dtype=f.text("torch_dtype", None, optional=True) or llm.text("torch_dtype", None, optional=True),
        source_format="original",
        min_tiles=min_tiles,
        max_tiles=max_tiles,
    )


def _original_tiling(f: _Fields) -> tuple[int | None, int | None]:
    """The original format keeps its tiling limits in config.json, where OpenGVLab's training code and vLLM
    read them."""
    if "dynamic_image_size" in f.raw and not f.flag("dynamic_image_size", True):
        return 1, 1  # one resized tile per image, no thumbnail
    if f.get("use_thumbnail") is False:
        raise UnsupportedModelError(f"{f.where}: use_thumbnail=false is not supported (InternVL3 tiles add a "
                                    "thumbnail)")
    lo = f.integer("min_dynamic_patch", None, optional=True)
    hi = f.integer("max_dynamic_patch", None, optional=True)
    if lo is not None and hi is not None and lo > hi:
        raise f.fail("min_dynamic_patch", f"{lo} is over max_dynamic_patch {hi}")
    return lo, hi


def _quant_config(f: _Fields):
    """The quantization block, wherever the producer put it (LMDeploy: llm_config; transformers: top level)."""
    blocks = [f.get("quantization_config"), f.sub("llm_config").get("quantization_config"),
              f.sub("text_config").get("quantization_config")]
    blocks = [b for b in blocks if b]
    if len(blocks) > 1 and any(b != blocks[0] for b in blocks[1:]):
        raise UnsupportedModelError(f"{f.where}: different quantization_config blocks at the top level and in the "
                                    "language model's config")
    return parse_quant_config(blocks[0] if blocks else None, f.where)


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
