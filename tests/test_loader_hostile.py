"""Hostile or broken checkpoint files (issue 3.0 items 6, 12, 13): every malformed config.json, index or tensor
header is a typed error (CheckpointError, or UnsupportedModelError for an architecture not implemented) naming the
file and the key, raised before the model is allocated; an untied checkpoint without lm_head is refused; quantized
tensors must have their format's exact dtypes. Checkpoints are the random presets' writer's output, edited."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_engine import LLM, CheckpointError, InternVLEngineError, UnsupportedModelError
from internvl_engine.config import ModelConfig
from internvl_engine.loader import checkpoint_files, load_model
from internvl_engine.ops import OpTable
from internvl_engine.config import preset_config
from internvl_engine.loader import write_checkpoint

WEIGHTS = "model.safetensors"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def tensors(tiny):
    return load_file(str(tiny / WEIGHTS))


def _copy(src, dst, *, config=None, weights=None):
    """src's files symlinked into dst, with config.json and / or model.safetensors replaced when given."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if (f.name == "config.json" and config is not None) or (f.name == WEIGHTS and weights is not None):
            continue
        os.symlink(f, dst / f.name)
    if config is not None:
        (dst / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        save_file(weights, str(dst / WEIGHTS))
    return dst


def _load(path):
    """The loader alone (no tokenizer, no engine): config.json, then the weights."""
    config = ModelConfig.from_pretrained(path)
    return load_model(config, path, OpTable.resolve("torch", "cpu"), CPU, torch.float32)


def _expect(cls, match, fn, *args):
    with pytest.raises(cls, match=match) as info:
        fn(*args)
    assert isinstance(info.value, InternVLEngineError)
    return info.value


# ------------------------------------------------------------------------------------------ config.json (item 6)
def _set(path: str, value):
    """An edit of the preset's config dict: `a.b.c` set to value."""
    def edit(raw):
        *parents, leaf = path.split(".")
        d = raw
        for p in parents:
            d = d[p]
        d[leaf] = value
    return edit


def _original(edit=None):
    """The tiny preset in OpenGVLab's original form (llm_config, force_image_size, dynamic-patch limits)."""
    raw = preset_config("tiny")
    out = {"model_type": "internvl_chat", "force_image_size": 448, "downsample_ratio": 0.5, "ps_version": "v2",
           "select_layer": -1, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
           "vision_config": {**raw["vision_config"], "image_size": 448, "patch_size": 14},
           "llm_config": raw["text_config"]}
    if edit:
        edit(out)
    return out


C, U = CheckpointError, UnsupportedModelError
CONFIGS = [  # (id, edit of the -hf preset config or a whole original-form config, error, message)
    ("layers-string", _set("text_config.num_hidden_layers", "2"), C,
     r"text_config\.num_hidden_layers must be an integer, got str '2'"),
    ("layers-float", _set("text_config.num_hidden_layers", 2.5), C, r"text_config\.num_hidden_layers must be an int"),
    ("layers-bool", _set("vision_config.num_hidden_layers", True), C, r"vision_config\.num_hidden_layers must be"),
    ("hidden-null", _set("text_config.hidden_size", None), C, r"text_config\.hidden_size must be an integer"),
    ("hidden-list", _set("text_config.hidden_size", [64]), C, r"text_config\.hidden_size must be an integer"),
    ("hidden-negative", _set("text_config.hidden_size", -64), C, r"text_config\.hidden_size is -64; it must be at "
                                                                 r"least 1"),
    ("heads-zero", _set("text_config.num_attention_heads", 0), C, r"text_config\.num_attention_heads is 0"),
    ("vision-heads-zero", _set("vision_config.num_attention_heads", 0), C, r"vision_config\.num_attention_heads"),
    ("kv-heads-zero", _set("text_config.num_key_value_heads", 0), C, r"text_config\.num_key_value_heads is 0"),
    ("heads-not-dividing", _set("text_config.num_attention_heads", 5), C,
     r"text_config\.num_attention_heads 5 does not divide text_config\.hidden_size 64"),
    ("vision-heads-not-dividing", _set("vision_config.num_attention_heads", 3), C,
     r"vision_config\.num_attention_heads 3 does not divide vision_config\.hidden_size 64"),
    ("kv-not-dividing", _set("text_config.num_key_value_heads", 3), C, r"num_key_value_heads 3 does not divide"),
    ("head-dim-odd", _set("text_config.head_dim", 15), C, r"text_config\.head_dim is 15"),
    ("layers-huge", _set("text_config.num_hidden_layers", 10 ** 12), C,
     r"text_config\.num_hidden_layers is 1000000000000, over the 1024 limit \(internvl_engine\.config\.CONFIG_LIMITS"),
    ("vision-layers-huge", _set("vision_config.num_hidden_layers", 10 ** 12), C, r"over the 1024 limit"),
    ("vocab-huge", _set("text_config.vocab_size", 10 ** 12), C, r"text_config\.vocab_size .* over the"),
    ("intermediate-huge", _set("text_config.intermediate_size", 2 ** 40), C, r"intermediate_size .* over the"),
    ("positions-huge", _set("text_config.max_position_embeddings", 10 ** 9), C, r"max_position_embeddings .* over"),
    ("positions-times-factor", _set("text_config.max_position_embeddings", 1 << 20), C,
     r"max_position_embeddings 1048576 x RoPE factor 2\.0 is over"),
    ("image-size-huge", _set("vision_config.image_size", [10 ** 6] * 2), C, r"vision_config\.image_size .* over"),
    ("image-size-not-square", _set("vision_config.image_size", [448, 224]), C, r"vision_config\.image_size must be "
                                                                              r"one side or a square"),
    ("image-size-odd-grid", _set("vision_config.image_size", [462, 462]), C,
     r"vision_config\.image_size 462 is not an even number of vision_config\.patch_size 14 patches"),
    ("patch-zero", _set("vision_config.patch_size", [0, 0]), C, r"vision_config\.patch_size is 0"),
    ("channels", _set("vision_config.num_channels", 4), U, r"num_channels 4"),
    ("vision-config-list", _set("vision_config", ["x"]), C, r"vision_config must be a JSON object, got list"),
    ("text-config-string", _set("text_config", "qwen2"), C, r"text_config must be a JSON object, got str"),
    ("rope-scaling-string", _set("text_config.rope_scaling", "dynamic"), C, r"text_config\.rope_scaling must be a "
                                                                           r"JSON object"),
    ("rope-theta-string", _set("text_config.rope_theta", "1e6"), C, r"text_config\.rope_theta must be a number"),
    ("rope-factor-zero", _set("text_config.rope_scaling", {"rope_type": "linear", "factor": 0}), C,
     r"text_config\.rope_scaling\.factor is 0"),
    ("eps-zero", _set("text_config.rms_norm_eps", 0), C, r"text_config\.rms_norm_eps is 0"),
    ("eps-nan", _set("vision_config.layer_norm_eps", float("nan")), C, r"vision_config\.layer_norm_eps is nan"),
    ("bias-string", _set("vision_config.attention_bias", "false"), C, r"vision_config\.attention_bias must be true "
                                                                      r"or false, got str"),
    ("tie-string", _set("tie_word_embeddings", "no"), C, r"tie_word_embeddings must be true or false"),
    ("image-token-negative", _set("image_token_id", -1), C, r"image_token_id is -1"),
    ("image-token-string", _set("image_token_id", "151667"), C, r"image_token_id must be an integer"),
    ("eos-string", _set("text_config.eos_token_id", "</s>"), C, r"text_config\.eos_token_id must be a token id"),
    ("eos-list-of-null", _set("text_config.eos_token_id", [None]), C, r"text_config\.eos_token_id must be a token"),
    ("architectures-string", _set("text_config.architectures", "Qwen2ForCausalLM"), C,
     r"text_config\.architectures must be a list of strings"),
    ("downsample-string", _set("downsample_ratio", "0.5"), C, r"downsample_ratio must be a number"),
    ("dtype-number", _set("dtype", 16), C, r"dtype must be a string"),
    ("quant-not-object", _set("quantization_config", ["awq"]), U, r"quantization_config must be an object"),
    ("quant-groups-list", _set("quantization_config", {"quant_method": "compressed-tensors",
                                                       "format": "float-quantized", "config_groups": ["g"]}), C,
     r"quantization_config\.config_groups must be a JSON object"),
    ("quant-group-string", _set("quantization_config", {"quant_method": "compressed-tensors",
                                                        "format": "float-quantized", "config_groups": {"g": "x"}}),
     C, r"quantization_config\.config_groups\.g must be a JSON object"),
    ("quant-ignore-ints", lambda raw: _fp8_ignore(raw, [1]), C, r"quantization_config\.ignore must be a list of "
                                                                r"strings"),
    ("quant-ignore-bad-regex", lambda raw: _fp8_ignore(raw, ["re:(unclosed"]), C,
     r"quantization_config\.ignore entry 're:\(unclosed' is not a valid regular expression"),
    ("original-llm-config-list", lambda raw: _replace(raw, _original(_set("llm_config", [1]))), C,
     r"llm_config must be a JSON object"),
    ("original-layers-string", lambda raw: _replace(raw, _original(_set("llm_config.num_hidden_layers", "24"))), C,
     r"llm_config\.num_hidden_layers must be an integer"),
    ("original-select-layer-string", lambda raw: _replace(raw, _original(_set("select_layer", "last"))), C,
     r"select_layer must be an integer"),
    ("original-patch-limits-swapped", lambda raw: _replace(raw, _original(_set("min_dynamic_patch", 13))), C,
     r"min_dynamic_patch 13 is over max_dynamic_patch 12"),
    ("original-max-patch-string", lambda raw: _replace(raw, _original(_set("max_dynamic_patch", "12"))), C,
     r"max_dynamic_patch must be an integer"),
    ("original-force-size-list", lambda raw: _replace(raw, _original(_set("force_image_size", [448]))), C,
     r"force_image_size must be an integer"),
    # the original form's own key names, not the -hf names they are read as
    ("original-qkv-bias-string", lambda raw: _replace(raw, _original(_set("vision_config.qkv_bias", "yes"))), C,
     r"vision_config\.qkv_bias must be true or false, got str 'yes'"),
    ("original-qk-norm-null", lambda raw: _replace(raw, _original(_set("vision_config.qk_normalization", None))), C,
     r"vision_config\.qk_normalization must be true or false"),
]


def _replace(raw, new):
    raw.clear()
    raw.update(new)


def _fp8_ignore(raw, ignore):
    raw.update(preset_config("small-fp8"))
    raw["quantization_config"]["ignore"] = ignore


@pytest.mark.parametrize("edit,cls,match", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_malformed_config_is_a_typed_error_naming_the_key(tmp_path, edit, cls, match):
    raw = preset_config("tiny")
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    err = _expect(cls, match, ModelConfig.from_pretrained, tmp_path)
    assert str(tmp_path / "config.json") in str(err)


def test_the_original_form_table_base_is_valid():
    """The edits above break a config that loads: the original-form base itself is accepted."""
    cfg = ModelConfig.from_dict(_original())
    assert (cfg.text.num_hidden_layers, cfg.min_tiles, cfg.max_tiles) == (2, 1, 12)


@pytest.mark.parametrize("text,match", [
    ("[" * 100_000, r"not valid JSON \(RecursionError"),       # nested past the parser's stack
    ('{"model_type": "internvl", "text_config": {"hidden_size": 64,}}', r"not valid JSON"),
])
def test_unparsable_config(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    _expect(CheckpointError, match, ModelConfig.from_pretrained, tmp_path)


def test_malformed_generation_config_names_its_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset_config("tiny")))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    _expect(CheckpointError, r"generation_config\.json: eos_token_id must be a token id", ModelConfig.from_pretrained,
            tmp_path)


def test_from_dict_refuses_a_non_object():
    _expect(CheckpointError, r"expected a JSON object, got list", ModelConfig.from_dict, ["internvl"])


@pytest.mark.parametrize("key,value,match", [
    # Python's JSON reader takes Infinity and NaN: int(inf) was a bare OverflowError, and a NaN mean or a zero std
    # made every pixel NaN or infinite, a model that answers without a word of error
    ("max_patches", float("inf"), r"max_patches must be a positive integer, got inf"),
    ("min_patches", float("nan"), r"min_patches must be a positive integer, got nan"),
    ("image_mean", [0.5, float("nan"), 0.5], r"image_mean must be three finite numbers"),
    ("image_std", [0.2, 0.2, float("inf")], r"image_std must be three finite numbers"),
    ("image_std", [0.2, 0, 0.2], r"image_std must be three numbers > 0"),
    ("image_mean", [True, 0.5, 0.5], r"image_mean must be three finite numbers"),
])
def test_malformed_preprocessor_config_is_a_typed_error(tmp_path, key, value, match):
    from internvl_engine.processor.files import read_processor_settings

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 448, "width": 448},
                                                                   key: value}))
    err = _expect(CheckpointError, match, read_processor_settings, tmp_path)
    assert "preprocessor_config.json" in str(err)


# --------------------------------------------------------------- sizes checked against the files, before allocating
@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if the loader materialises the meta model (Module.to_empty)."""
    def refuse(self, *a, **k):
        raise AssertionError("the model was allocated before the checkpoint was checked")
    monkeypatch.setattr(torch.nn.Module, "to_empty", refuse)


@pytest.mark.parametrize("key,value,match", [
    # within CONFIG_LIMITS, but not what the files hold: refused from the headers, nothing allocated
    ("text_config.num_hidden_layers", 1000, r"text_config\.num_hidden_layers is 1000, but the checkpoint .* holds "
                                            r"tensors of 2 decoder layers"),
    ("text_config.num_hidden_layers", 1, r"text_config\.num_hidden_layers is 1, but .* 2 decoder layers"),
    ("vision_config.num_hidden_layers", 3, r"vision_config\.num_hidden_layers is 3, but .* 2 vision layers"),
    ("text_config.vocab_size", 1 << 21, r"weight' has shape \(151674, 64\), the model expects \(2097152, 64\)"),
    ("text_config.intermediate_size", 262144, r"mlp\.\w+_proj\.weight' has shape .*, the model expects .*262144"),
])
def test_config_larger_than_the_checkpoint_fails_before_allocating(tiny, tmp_path, no_allocation, key, value, match):
    raw = json.loads((tiny / "config.json").read_text())
    _set(key, value)(raw)
    path = _copy(tiny, tmp_path / "big", config=raw)
    _expect(CheckpointError, match, _load, path)


def test_hostile_config_through_the_engine(tiny, tmp_path):
    raw = json.loads((tiny / "config.json").read_text())
    raw["text_config"]["num_hidden_layers"] = 10 ** 12
    path = _copy(tiny, tmp_path / "huge", config=raw)
    _expect(CheckpointError, r"config\.json: text_config\.num_hidden_layers is 1000000000000, over the 1024 limit",
            lambda: LLM(path, dtype="float32", device="cpu"))


# --------------------------------------------------------------------------------------- index files (item 6)
def _indexed(tiny, dst, weight_map, name="model.safetensors.index.json"):
    """tiny's side files, its weights as model-00001-of-00001.safetensors, and an index holding weight_map."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        os.symlink(f, dst / (f.name if f.name != WEIGHTS else "model-00001-of-00001.safetensors"))
    (dst / name).write_text(weight_map if isinstance(weight_map, str) else json.dumps(weight_map))
    return dst


SHARD = "model-00001-of-00001.safetensors"
INDEXES = [  # (id, the index's contents, the message after "<index file>: ")
    ("invalid-json", "{ not json", r"not valid JSON"),
    ("top-level-list", json.dumps([SHARD]), r"expected a JSON object, got list"),
    ("no-weight-map", {"metadata": {}}, r"not a valid safetensors index .*got NoneType"),
    ("weight-map-list", {"weight_map": [SHARD]}, r"not a valid safetensors index \(weight_map must map tensor "
                                                 r"names to shard file names, got list\)"),
    ("weight-map-int-values", {"weight_map": {"a": 1}}, r"not a valid safetensors index \(weight_map must map"),
    ("weight-map-null-values", {"weight_map": {"a": None}}, r"not a valid safetensors index \(weight_map must map"),
    ("empty-shard-name", {"weight_map": {"a": ""}}, r"weight_map entry 'a' names shard '', which is not a file"),
    ("nul-in-shard-name", {"weight_map": {"a": "x\0y.safetensors"}}, r"weight_map entry 'a' names shard 'x\\x00y"),
]


@pytest.mark.parametrize("weight_map,match", [c[1:] for c in INDEXES], ids=[c[0] for c in INDEXES])
@pytest.mark.parametrize("kind", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_malformed_index(tiny, tmp_path, weight_map, match, kind):
    if kind.startswith("pytorch"):
        match = match.replace("safetensors index", "pytorch_model.bin index")
        path = tmp_path / "bin"
        path.mkdir()
        (path / kind).write_text(weight_map if isinstance(weight_map, str) else json.dumps(weight_map))
    else:
        path = _indexed(tiny, tmp_path / "st", weight_map)
    _expect(CheckpointError, re.escape(kind) + ": " + match, checkpoint_files, path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_naming_a_file_outside_the_checkpoint_is_refused(tiny, tmp_path, shard):
    """A `../` or absolute shard name would load a file the checkpoint does not own, even one that exists."""
    outside = tmp_path / "outside.safetensors"
    os.symlink(tiny / WEIGHTS, outside)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    weight_map = {k: SHARD for k in load_file(str(tiny / WEIGHTS))}
    weight_map["language_model.model.norm.weight"] = shard
    path = _indexed(tiny, tmp_path / "ckpt", {"weight_map": weight_map})
    err = _expect(CheckpointError, r"model\.safetensors\.index\.json: weight_map entry "
                                   r"'language_model\.model\.norm\.weight' names shard .*not a file name inside the "
                                   r"checkpoint directory", lambda: LLM(path, dtype="float32", device="cpu"))
    assert shard in str(err)


def test_an_index_with_only_plain_names_still_loads(tiny, tmp_path):
    weight_map = {k: SHARD for k in load_file(str(tiny / WEIGHTS))}
    path = _indexed(tiny, tmp_path / "ok", {"weight_map": weight_map})
    assert checkpoint_files(path) == [path / SHARD]


# -------------------------------------------------------------------------------- tie_word_embeddings (item 12)
def _without_lm_head(tensors):
    return {k: v for k, v in tensors.items() if k != "language_model.lm_head.weight"}


@pytest.mark.parametrize("top,text", [(False, False), (None, False), (False, None)])
def test_untied_checkpoint_without_lm_head_is_refused(tiny, tensors, tmp_path, top, text):
    raw = json.loads((tiny / "config.json").read_text())
    for d, v in ((raw, top), (raw["text_config"], text)):
        d.pop("tie_word_embeddings", None)
        if v is not None:
            d["tie_word_embeddings"] = v
    path = _copy(tiny, tmp_path / "untied", config=raw, weights=_without_lm_head(tensors))
    _expect(CheckpointError, r"missing tensor lm_head\.weight \(language_model\.lm_head\.weight\).*"
                             r"tie_word_embeddings false", _load, path)


@pytest.mark.parametrize("top,text", [(True, True), (True, False), (None, True), (None, None)])
def test_tied_checkpoint_without_lm_head_still_loads(tiny, tensors, tmp_path, top, text):
    """Tied: a true at either level (transformers 5 reads the top level, 4.x and OpenGVLab's code the language
    model's), or neither stated."""
    raw = json.loads((tiny / "config.json").read_text())
    for d, v in ((raw, top), (raw["text_config"], text)):
        d.pop("tie_word_embeddings", None)
        if v is not None:
            d["tie_word_embeddings"] = v
    path = _copy(tiny, tmp_path / "tied", config=raw, weights=_without_lm_head(tensors))
    model = _load(path)
    assert model.lm_head.weight is model.language_model.embed_tokens.weight


# --------------------------------------------------------------------------------- quantized dtypes (item 13)
@pytest.fixture(scope="module")
def awq(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("awq"), "small-awq", seed=0)
    return path, load_file(str(path / WEIGHTS))


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("fp8"), "small-fp8", seed=0)
    return path, load_file(str(path / WEIGHTS))


LAYER = "language_model.model.layers.0"
QUANT_DTYPES = [  # (checkpoint, key, its dtype in the file, expected in the message)
    ("fp8", f"{LAYER}.mlp.down_proj.weight", torch.float8_e5m2, r"float8_e5m2, the model expects float8_e4m3fn"),
    ("fp8", f"{LAYER}.mlp.down_proj.weight", torch.bfloat16, r"bfloat16, the model expects float8_e4m3fn"),
    ("fp8", f"{LAYER}.self_attn.q_proj.weight_scale", torch.float8_e4m3fn,
     r"float8_e4m3fn, the model expects float16 or bfloat16 or float32 \(FP8 weight_scale\)"),
    ("awq", f"{LAYER}.self_attn.k_proj.qzeros", torch.uint8, r"uint8, the model expects int32 \(AWQ qzeros"),
    ("awq", f"{LAYER}.mlp.up_proj.qweight", torch.int64, r"int64, the model expects int32 \(AWQ qweight"),
    ("awq", f"{LAYER}.mlp.up_proj.qweight", torch.float32, r"float32, the model expects int32"),
    ("awq", f"{LAYER}.mlp.down_proj.scales", torch.int32, r"int32, the model expects float16 or bfloat16 or float32"),
    ("awq", f"{LAYER}.input_layernorm.weight", torch.float8_e4m3fn,
     r"float8_e4m3fn, the model expects float16 or bfloat16 or float32 or float64 \(a dense parameter\)"),
]


@pytest.mark.parametrize("which,key,dtype,match", QUANT_DTYPES,
                         ids=[f"{c[0]}-{c[1].rpartition('.')[2]}-{str(c[2])[6:]}" for c in QUANT_DTYPES])
def test_quantized_tensor_with_the_wrong_dtype_is_refused(request, tmp_path, which, key, dtype, match):
    src, files = request.getfixturevalue(which)
    bad = dict(files)
    bad[key] = files[key].to(dtype) if files[key].dtype.is_floating_point or dtype.is_floating_point else \
        files[key].view(torch.uint8).reshape(*files[key].shape, 4)[..., 0].to(dtype).contiguous()  # same shape
    assert bad[key].shape == files[key].shape
    path = _copy(src, tmp_path / "bad", weights=bad)
    _expect(CheckpointError, re.escape(f"{WEIGHTS}: tensor {key!r} is ") + match, _load, path)


@pytest.mark.parametrize("which,leaf,dtype", [("awq", "scales", torch.bfloat16), ("awq", "scales", torch.float32),
                                              ("fp8", "weight_scale", torch.float16),
                                              ("fp8", "weight_scale", torch.float32)])
def test_quantized_scales_in_any_float_dtype_load(request, tmp_path, which, leaf, dtype):
    src, files = request.getfixturevalue(which)
    edited = {k: v.to(dtype) if k.endswith(f".{leaf}") else v for k, v in files.items()}
    model = _load(_copy(src, tmp_path / "ok", weights=edited))
    layer = model.language_model.layers[0].mlp.down_proj
    assert torch.equal(getattr(layer, leaf), files[f"{LAYER}.mlp.down_proj.{leaf}"].to(dtype).float())
