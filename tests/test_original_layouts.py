"""The original OpenGVLab (InternVLChatModel) layouts of every decoder family load to the same logits as their -hf
form: a Llama decoder as InternLM2 stores it (packed `wqkv` grouped by KV head, wo, feed_forward.w1/w2/w3,
attention_norm / ffn_norm, tok_embeddings, output; llm_config InternLM2ForCausalLM) and as InternLM3 stores it
(transformers' Llama names; llm_config InternLM3ForCausalLM), and a Qwen3 decoder (Qwen3ForCausalLM). Each original
checkpoint is written here from the -hf one by the inverse of transformers' convert_internvl_weights_to_hf.py
(ORIGINAL_TO_CONVERTED_KEY_MAPPING_TEXT_LLAMA, and its wqkv split:
rearrange(wqkv, "(h gs d) z -> h gs d z", gs=2 + H/Hk, d=head_dim); q = [:, :H/Hk], k = [:, -2], v = [:, -1]).
Under tensor parallelism each rank reads only its run of wqkv's KV-head groups."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
from internvl_engine import LLM
from internvl_engine.config import ModelConfig
from internvl_engine.errors import UnsupportedModelError
from internvl_engine.parallel import TensorParallel
from hf_processor import make_hf_processor
from reference import hf_inputs, hf_logits
from test_loader import CONV, PARAMS, _copy_side_files, to_original

TEXT_CONV = [{"role": "user", "content": "Tell me a story about a dragon and a knight."}]
# InternLM2 states no head_dim (hidden_size / heads): Llama decoders of that shape, GQA (3 and 2 query heads per KV
# head), with InternLM2's one bias switch on (wqkv and wo biased) and off. Registered beside helper A's variants.
checkpoints.VARIANTS.setdefault("internlm2-300m", dict(
    vision=checkpoints.VARIANTS["300m"]["vision"],
    text=dict(model_type="llama", hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
              head_dim=16, intermediate_size=160, tie_word_embeddings=False, attention_bias=True)))
checkpoints.VARIANTS.setdefault("internlm2-6b", dict(
    vision=checkpoints.VARIANTS["6b"]["vision"],
    text=dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, intermediate_size=192, tie_word_embeddings=False)))
# (original style, -hf variant); for the Llama ones, max_position_embeddings 512 puts the image prompt (783 tokens)
# past it: dynamic NTK RoPE (the variants' scaling, factor 2) rescales, and a mistranslated rope_scaling would show.
# The Qwen3 variants have plain RoPE (as InternVL3.5) and their default 32768 positions.
CASES = [("internlm2", "internlm2-300m"), ("internlm2", "internlm2-6b"), ("internlm3", "llama-300m"),
         ("internlm3", "llama-6b"), ("qwen3", "qwen3-300m"), ("qwen3", "qwen3-6b")]
MAX_POS = 512
# <IMG_CONTEXT>'s id per decoder family, where neither config.json nor a tokenizer.json says (_from_original)
FAMILY_IMAGE_TOKEN = {"qwen2": 151667, "llama": 92546, "qwen3": 151671}


# ---------------------------------------------------------------------------------------- -hf -> original
def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """InternLM2's wqkv from q [H*d, ...], k and v [Hk*d, ...]: per KV head, its H/Hk query heads, its key head,
    its value head (the layout the converter's rearrange splits)."""
    rest = q.shape[1:]
    groups = [q.reshape(kv_heads, -1, *rest), k.reshape(kv_heads, -1, *rest), v.reshape(kv_heads, -1, *rest)]
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def converter_split(wqkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """convert_internvl_weights_to_hf.py's split of wqkv (its rearrange, written with reshape)."""
    g = heads // kv_heads
    qkv = wqkv.reshape(kv_heads, g + 2, head_dim, *wqkv.shape[1:])
    return (qkv[:, :g].reshape(-1, *wqkv.shape[1:]), qkv[:, -2].reshape(-1, *wqkv.shape[1:]),
            qkv[:, -1].reshape(-1, *wqkv.shape[1:]))


# transformers' Llama names -> InternLM2's (the converter's mapping, inverted), inside language_model.model.
_TO_INTERNLM2 = [("embed_tokens.", "tok_embeddings."), ("self_attn.o_proj.", "attention.wo."),
                 ("mlp.gate_proj.", "feed_forward.w1."), ("mlp.down_proj.", "feed_forward.w2."),
                 ("mlp.up_proj.", "feed_forward.w3."), ("input_layernorm.", "attention_norm."),
                 ("post_attention_layernorm.", "ffn_norm.")]


def to_internlm2_names(tensors: dict, text: dict) -> dict:
    """The language model's tensors in InternLM2's layout; the rest as they are."""
    kv_heads = text["num_key_value_heads"]
    out = {}
    for key, t in tensors.items():
        if key == "language_model.lm_head.weight":
            out["language_model.output.weight"] = t
            continue
        if not key.startswith("language_model.model."):
            out[key] = t
            continue
        rest = key[len("language_model.model."):]
        if ".self_attn." in rest and rest.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            layer, leaf = rest.split(".self_attn.")[0], rest.rsplit(".", 1)[1]
            if rest.endswith(f"q_proj.{leaf}"):
                parts = [tensors[f"language_model.model.{layer}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
                out[f"language_model.model.{layer}.attention.wqkv.{leaf}"] = pack_wqkv(*parts, kv_heads)
            continue
        for old, new in _TO_INTERNLM2:
            rest = rest.replace(old, new)
        out["language_model.model." + rest] = t
    return out


def original_llm_config(text: dict, style: str) -> dict:
    """llm_config as OpenGVLab's config.json writes it for an -hf text_config (transformers 5's rope_parameters
    become rope_theta + rope_scaling, as 4.x config classes write them)."""
    rope = text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 1e6)}
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "hidden_act")
    llm = {k: text[k] for k in keep if k in text}
    llm["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] != "default":
        llm["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
    bias = bool(text.get("attention_bias", False))
    if style == "internlm2":
        assert text["hidden_size"] == text["num_attention_heads"] * text["head_dim"], "InternLM2 states no head_dim"
        llm.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=bias,
                   attn_implementation="eager")
    elif style == "internlm3":
        llm.update(architectures=["InternLM3ForCausalLM"], model_type="internlm3", head_dim=text["head_dim"],
                   qkv_bias=bias, bias=False)
    else:
        llm.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=text["head_dim"],
                   attention_bias=bias)
    return llm


def write_original(hf_path, dst, style: str, tensors: dict | None = None, quantize=None):
    """The -hf checkpoint at hf_path (or its `tensors`, given) rewritten in the original layout of `style`
    ("internlm2", "internlm3", "qwen3") under dst, side files (tokenizer, template, processor) copied. quantize:
    (original tensors, llm_config) -> original tensors, applied before writing."""
    tensors = load_file(str(hf_path / "model.safetensors")) if tensors is None else tensors
    config = json.loads((hf_path / "config.json").read_text())
    text = config["text_config"]
    tensors, orig = to_original(tensors, {**config, "text_config": {**text, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1.0, "factor": 1.0}}})  # its llm_config is replaced below
    if style == "internlm2":
        tensors = to_internlm2_names(tensors, text)
    orig["llm_config"] = original_llm_config(text, style)
    if style == "qwen3" and text["tie_word_embeddings"]:
        # OpenGVLab's InternVL3.5 config class sets tie_word_embeddings false for every size (sglang's copy,
        # python/sglang/srt/configs/internvl.py): the original files hold the lm_head, a copy of the embeddings
        tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
        orig["tie_word_embeddings"] = orig["llm_config"]["tie_word_embeddings"] = False
    # no img_context_token_id, as OpenGVLab's files: the tokenizer's <IMG_CONTEXT> (151667 in the test tokenizer)
    if quantize is not None:
        tensors = quantize(tensors, orig["llm_config"])
    _copy_side_files(hf_path, dst)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(orig))
    return dst


def _logits(path, conv):
    return LLM(path, dtype="float32", device="cpu").prompt_logits(conv, params=PARAMS)


# ---------------------------------------------------------------------------------------------- tests
def test_pack_wqkv_is_what_the_converter_splits():
    q, k, v = torch.randn(6 * 4, 5), torch.randn(2 * 4, 5), torch.randn(2 * 4, 5)
    wqkv = pack_wqkv(q, k, v, kv_heads=2)
    assert wqkv.shape == (10 * 4, 5)
    for got, want in zip(converter_split(wqkv, 6, 2, 4), (q, k, v)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("style,variant", CASES)
def test_original_layout_loads_to_the_same_logits(hf_checkpoint, tmp_path, style, variant):
    path, hf_model = (hf_checkpoint(variant) if style == "qwen3" else
                      hf_checkpoint(variant, max_position_embeddings=MAX_POS))
    original = write_original(path, tmp_path / style, style)
    tensors = load_file(str(original / "model.safetensors"))
    if style == "internlm2":
        assert any(k.endswith("attention.wqkv.weight") for k in tensors) and "language_model.output.weight" in tensors
        assert not any("q_proj" in k or "embed_tokens" in k for k in tensors)
    cfg = ModelConfig.from_pretrained(original)
    assert cfg.source_format == "original" and cfg.text.model_type == {"qwen3": "qwen3"}.get(style, "llama")
    # read from tokenizer.json, not the family's id, where config.json leaves it out
    assert "img_context_token_id" not in json.loads((original / "config.json").read_text())
    assert cfg.image_token_id == 151667 != FAMILY_IMAGE_TOKEN[cfg.text.model_type]
    hf, orig = LLM(path, dtype="float32", device="cpu"), LLM(original, dtype="float32", device="cpu")
    for conv in (CONV, TEXT_CONV):
        reference = hf.prompt_logits(conv, params=PARAMS)
        assert torch.equal(orig.prompt_logits(conv, params=PARAMS), reference), (style, variant, conv[0]["content"])
    if style != "qwen3":
        assert reference.shape[0] < MAX_POS < hf.prompt_logits(CONV, params=PARAMS).shape[0]
    # and the -hf form is transformers' own model (the parity tests' tolerance)
    ref = hf_logits(hf_model, hf_inputs(make_hf_processor(path), CONV, 2))
    assert (hf.prompt_logits(CONV, params=PARAMS) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("n", [2, 4])
def test_each_rank_reads_only_its_groups_of_wqkv(hf_checkpoint, tmp_path, monkeypatch, n):
    """Ranks of N=2 (one KV head each: whole groups) and N=4 (the KV head replicated on two ranks: half a group's
    query heads each), built without a process group: every parameter equals its part of the N=1 model loaded from
    the -hf files, and wqkv is read through get_slice, never whole."""
    from internvl_engine.loader import checkpoint as loader  # _read, patched below, lives there
    from internvl_engine.ops import OpTable

    path, _ = hf_checkpoint("internlm2-6b", max_position_embeddings=MAX_POS)
    original = write_original(path, tmp_path / "internlm2", "internlm2")
    ops, cpu = OpTable.resolve("torch", "cpu"), torch.device("cpu")
    full = dict(loader.load_model(ModelConfig.from_pretrained(path), path, ops, cpu, torch.float32).named_parameters())
    config = ModelConfig.from_pretrained(original)
    reads = []
    real_read = loader._read
    monkeypatch.setattr(loader, "_read", lambda f, key, index, shape, file: (reads.append((key, index)),
                                                                              real_read(f, key, index, shape, file))[1])
    for rank in range(n):
        reads.clear()
        model = loader.load_model(config, original, ops, cpu, torch.float32, tp=TensorParallel(rank, n))
        for name, p in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            want = module.from_full(leaf, full[name]) if hasattr(module, "from_full") else full[name]
            assert torch.equal(p, want), (n, rank, name)
        wqkv = [index for key, index in reads if key.endswith("attention.wqkv.weight")]
        assert len(wqkv) == 2 and all(index is not None for index in wqkv), (n, rank, wqkv)
        rows = wqkv[0][0]
        assert rows.stop - rows.start == (2 + 2) * 32  # one KV head's group, (H/Hk + 2) x head_dim rows, either way


def test_packed_original_at_two_ranks_matches_one(hf_checkpoint, tmp_path):
    """The packed original layout served at N=2 over gloo: the same prompt logits as the -hf files at N=1 (up to
    the all-reduce's summation order, the tensor-parallel tests' tolerance)."""
    path, _ = hf_checkpoint("internlm2-300m", max_position_embeddings=MAX_POS)
    original = write_original(path, tmp_path / "internlm2", "internlm2")
    one = LLM(path, dtype="float32", device="cpu").prompt_logits(CONV, params=PARAMS)
    llm = LLM(original, dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        two = llm.prompt_logits(CONV, params=PARAMS)
    finally:
        llm.engine.shutdown()
    assert (two - one).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------- quantized
# AWQ groups 128 inputs: hidden 128 = 4 heads x head_dim 32 (InternLM2: no head_dim of its own), intermediate 256
checkpoints.VARIANTS.setdefault("internlm2-quant", dict(
    vision=checkpoints.VARIANTS["300m"]["vision"],
    text=dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, intermediate_size=256, tie_word_embeddings=False)))
_INTERNLM2_LINEAR = r"language_model\.model\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.w[123])\.weight"


# and the same at N=2 and N=4: AWQ splits o_proj's and down_proj's inputs into whole groups of 128 per rank
checkpoints.VARIANTS.setdefault("internlm2-quant-tp", dict(
    vision=checkpoints.VARIANTS["300m"]["vision"],
    text=dict(model_type="llama", hidden_size=512, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=2,
              head_dim=32, intermediate_size=1024, tie_word_embeddings=False)))


def _quantized_pair(dense, tmp_path, method):
    """(the -hf checkpoint quantized per projection, the InternLM2 original quantized as it is stored), both by
    test_quant's independent writers. AWQ and per-channel FP8 quantize each output feature on its own, so wqkv
    quantized whole (as LMDeploy quantizes OpenGVLab's InternLM2 builds) is q, k and v quantized apart,
    interleaved; FP8's rows and their scales are packed as they are."""
    import re

    import test_quant as tq

    files = tq._dense_files(dense)  # fp16, as the quantized checkpoints store the rest
    hf, block = tq.quantized_files(dense, method)

    def quantize(tensors, llm):
        llm["quantization_config"] = block  # where LMDeploy writes it
        if method == "fp8":
            return tensors
        out = {}
        for key, t in tensors.items():
            if re.fullmatch(_INTERNLM2_LINEAR, key):
                base = key[: -len(".weight")]
                qw, qz, sc, _ = tq.quantize_awq(t)
                out.update({f"{base}.qweight": qw, f"{base}.qzeros": qz, f"{base}.scales": sc})
            else:
                out[key] = t
        return out
    original = write_original(dense, tmp_path / "original", "internlm2", files if method == "awq" else hf,
                              quantize)
    hf_path = tmp_path / "hf"
    _copy_side_files(dense, hf_path)
    config = json.loads((dense / "config.json").read_text())
    (hf_path / "config.json").write_text(json.dumps({**config, "quantization_config": block}))
    save_file({k: v.contiguous() for k, v in hf.items()}, str(hf_path / "model.safetensors"))
    stored = load_file(str(original / "model.safetensors"))
    wqkv = "language_model.model.layers.0.attention.wqkv." + ("qweight" if method == "awq" else "weight")
    assert stored[wqkv].dtype == (torch.int32 if method == "awq" else torch.float8_e4m3fn)
    return hf_path, original


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_quantized_packed_wqkv_matches_the_quantized_hf_form(hf_checkpoint, tmp_path, method):
    """The quantized original loads to exactly the logits of the quantized -hf form."""
    hf_path, original = _quantized_pair(hf_checkpoint("internlm2-quant")[0], tmp_path, method)
    a, b = LLM(hf_path, dtype="float32", device="cpu"), LLM(original, dtype="float32", device="cpu")
    assert b.config.quant.method == method
    assert torch.equal(b.prompt_logits(CONV, params=PARAMS), a.prompt_logits(CONV, params=PARAMS))


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_each_rank_reads_its_groups_of_a_quantized_wqkv(hf_checkpoint, tmp_path, method):
    """At N=2 (whole KV groups) and N=4 (a KV head replicated on two ranks), each rank's quantized tensors
    (AWQ's qweight / qzeros / scales, whose output features run along columns, 8 to an int32 in qweight; FP8's
    rows and scales) equal its part of the N=1 model's loaded from the -hf form."""
    from internvl_engine.loader import load_model
    from internvl_engine.ops import OpTable

    hf_path, original = _quantized_pair(hf_checkpoint("internlm2-quant-tp")[0], tmp_path, method)
    ops, cpu = OpTable.resolve("torch", "cpu"), torch.device("cpu")
    full = dict(load_model(ModelConfig.from_pretrained(hf_path), hf_path, ops, cpu, torch.float32).named_parameters())
    config = ModelConfig.from_pretrained(original)
    for n in (2, 4):
        for rank in range(n):
            model = load_model(config, original, ops, cpu, torch.float32, tp=TensorParallel(rank, n))
            qkv = model.language_model.layers[0].self_attn.qkv_proj
            assert qkv.quant_method.name == method and qkv.column_sharded
            for name, p in model.named_parameters():
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                want = module.from_full(leaf, full[name]) if hasattr(module, "from_full") else full[name]
                assert torch.equal(p, want), (method, n, rank, name)


# ---------------------------------------------------------------------------------------------- config.json
def _original(llm: dict, **top) -> dict:
    return {"model_type": "internvl_chat", "vision_config": {}, "ps_version": "v2", "llm_config": llm, **top}


def test_internlm_configs_read_as_the_converters_llama():
    cfg = ModelConfig.from_dict(_original({
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "num_hidden_layers": 32,
        "vocab_size": 92553, "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "max_position_embeddings": 32768, "bias": False, "rms_norm_eps": 1e-5}))
    t = cfg.text
    assert (t.model_type, t.head_dim, t.qkv_bias, t.o_proj_bias, t.mlp_bias) == ("llama", 128, False, False, False)
    assert (t.rope_type, t.rope_factor, t.rope_theta, t.vocab_size) == ("dynamic", 2.0, 1e6, 92553)
    assert cfg.image_token_id == FAMILY_IMAGE_TOKEN["llama"]  # the converter's <IMG_CONTEXT> for InternLM decoders
    # InternLM2Config's default bias is true: q/k/v and o biased, as its wqkv and wo are
    t = ModelConfig.from_dict(_original({"architectures": ["InternLM2ForCausalLM"], "hidden_size": 256,
                                         "num_attention_heads": 4})).text
    assert (t.qkv_bias, t.o_proj_bias, t.head_dim, t.vocab_size) == (True, True, 64, 103168)
    t = ModelConfig.from_dict(_original({"architectures": ["InternLM3ForCausalLM"], "model_type": "internlm3",
                                         "rope_theta": 5e7, "rope_scaling": {"rope_type": "dynamic", "factor": 6.0},
                                         "qkv_bias": False, "bias": False})).text
    assert (t.model_type, t.head_dim, t.num_key_value_heads, t.rope_factor, t.qkv_bias) == ("llama", 128, 2, 6.0,
                                                                                            False)
    cfg = ModelConfig.from_dict(_original({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                                           "hidden_size": 1024, "num_attention_heads": 16}))
    assert (cfg.text.model_type, cfg.text.head_dim, cfg.text.qk_norm) == ("qwen3", 128, True)
    assert cfg.image_token_id == FAMILY_IMAGE_TOKEN["qwen3"]  # InternVL3.5's, after <think> and </think>
    stated = ModelConfig.from_dict(_original({"architectures": ["Qwen3ForCausalLM"]}, img_context_token_id=7))
    assert stated.image_token_id == 7


@pytest.mark.parametrize("llm,match", [
    ({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"},
     r"llm_config\.architectures \['Qwen2MoeForCausalLM'\].*InternLM2ForCausalLM"),
    ({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss"},
     r"llm_config\.architectures.*Qwen3ForCausalLM"),
    ({"architectures": ["Phi3ForCausalLM"]}, r"llm_config\.architectures \['Phi3ForCausalLM'\]"),
    ({"architectures": ["InternLM2ForCausalLM"], "model_type": "llama"}, r"llm_config\.model_type 'llama'"),
    ({"architectures": ["InternLM3ForCausalLM"], "bias": True}, r"llm_config\.bias true"),
    ({"architectures": ["InternLM2ForCausalLM"], "rope_pos_id_version": "v2pe"},
     r"llm_config\.rope_pos_id_version 'v2pe' is not supported"),
])
def test_unsupported_original_language_models_name_the_field(llm, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_dict(_original(llm))


# ---------------------------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("ships,match", [
    (("tokenizer.model",), r"SentencePiece only \(tokenizer\.model.*converted -hf form"),
    (("vocab.json", "merges.txt"), r"only vocab\.json \+ merges\.txt.*save_pretrained"),
    ((), r"tokenizer file not found: .*tokenizer\.json"),
])
def test_a_checkpoint_without_tokenizer_json_names_what_to_use(hf_checkpoint, tmp_path, ships, match):
    """OpenGVLab's InternLM-based originals ship only a SentencePiece tokenizer.model; no maintained reader of it
    is installed, so the error names the converted form, which ships tokenizer.json."""
    from internvl_engine.errors import CheckpointError
    from internvl_engine.processor import Processor

    path, _ = hf_checkpoint("internlm2-300m", max_position_embeddings=MAX_POS)
    original = write_original(path, tmp_path / "internlm2", "internlm2")
    (original / "tokenizer.json").unlink()
    for name in ships:
        (original / name).write_bytes(b"\0")
    with pytest.raises(CheckpointError, match=match):
        Processor.from_pretrained(original, model_config=ModelConfig.from_pretrained(original))
    with pytest.raises(CheckpointError, match=match):
        LLM(original, dtype="float32", device="cpu")


@pytest.mark.parametrize("change,match", [
    # (H + 2 Hk) x head_dim = (4 + 2 x 2) x 32 rows
    ("short", r"attention\.wqkv\.weight' has shape \(96, 128\), the model expects \(256, 128\)"),
    ("twice", r"fills parameter 'language_model\.layers\.0\.self_attn\.qkv_proj\.weight' \(q_proj\), already loaded"),
    ("no_wqkv", r"missing tensors for language_model\.layers\.0\.self_attn\.qkv_proj\.weight"),
])
def test_a_bad_wqkv_is_a_checkpoint_error(hf_checkpoint, tmp_path, change, match):
    from internvl_engine.errors import CheckpointError

    path, _ = hf_checkpoint("internlm2-6b", max_position_embeddings=MAX_POS)
    original = write_original(path, tmp_path / "internlm2", "internlm2")
    tensors = load_file(str(original / "model.safetensors"))
    key = "language_model.model.layers.0.attention.wqkv.weight"
    if change == "short":
        tensors[key] = tensors[key][:96].clone()
    elif change == "twice":  # InternLM2's packed tensor beside transformers' q_proj for the same layer
        tensors["language_model.model.layers.0.self_attn.q_proj.weight"] = tensors[key][:128].clone()
    else:
        del tensors[key]
    save_file(tensors, str(original / "model.safetensors"))
    with pytest.raises(CheckpointError, match=match):
        LLM(original, dtype="float32", device="cpu")
