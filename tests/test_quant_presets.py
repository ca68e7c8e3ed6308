"""The quantized random presets (`random:<preset>-awq` / `-fp8`, issue 18) against the tests' own writer.

`random:X-awq` must be exactly the AWQ quantization of `random:X`: the tests quantize the dense preset's checkpoint
with their independent writer (test_quant.quantize_awq: int64 packing, the other tensor layout) and compare every
tensor bit for bit with the preset's checkpoint; then the engine on the preset is compared with transformers on
the dense dequantized twin (AWQ; FP8 activations are rounded per token, so the FP8 twin comparison lives in
test_quant, where transformers is fed the engine's own activations and no rounding can flip: here the bit-exact
files and the preset-equals-its-checkpoint test carry FP8 over to it)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from internvl_engine import LLM, SamplingParams
from internvl_engine.errors import UnsupportedModelError
from internvl_engine.config import preset_config, preset_names
from internvl_engine.loader import write_checkpoint
from test_quant import CONV, _compare, _is_decoder_linear, _twin_model, quantize_awq

PROMPT_PARAMS = SamplingParams(max_tokens=4, return_logits=True, ignore_eos=True, max_num_tiles=2)


def quantize_fp8_bf16(w: torch.Tensor):
    """Per-channel FP8 with the scale stored in bf16, as llm-compressor stores it in a bf16 model:
    (weight e4m3 [out, in], weight_scale bf16 [out, 1], dense twin fp32)."""
    scale = (w.float().abs().amax(dim=1, keepdim=True) / 448).bfloat16()
    q = torch.clamp(w.float() / scale.float(), min=-448, max=448).to(torch.float8_e4m3fn)
    return q, scale, q.float() * scale.float()


# the least preset of each decoder family whose sizes AWQ can hold: Qwen2, Llama (explicit head_dim), Qwen3
SMALL = ["small", "small-llama", "small-qwen3"]


@pytest.fixture(scope="module", params=SMALL)
def dense_small(request, tmp_path_factory):
    """(preset, its dense checkpoint, the checkpoint's tensors)."""
    path = tmp_path_factory.mktemp(f"{request.param}-dense")
    write_checkpoint(path, request.param, seed=0)
    return request.param, path, load_file(str(path / "model.safetensors"))


def _expected(method, dense_tensors):
    """(the quantized files the tests' writer makes of the dense preset, the dense twin in fp32)."""
    quant, twin = {}, {}
    for key, t in dense_tensors.items():
        if not _is_decoder_linear(key):
            quant[key], twin[key] = t, t.float()
            continue
        base = key[: -len(".weight")]
        if method == "awq":
            qw, qz, s, w = quantize_awq(t)
            quant.update({f"{base}.qweight": qw, f"{base}.qzeros": qz, f"{base}.scales": s})
        else:
            q, s, w = quantize_fp8_bf16(t)
            quant.update({key: q, f"{base}.weight_scale": s})
        twin[key] = w
    return quant, twin


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_preset_is_the_quantized_dense_preset_bit_for_bit(dense_small, tmp_path, method):
    base, dense_path, dense_tensors = dense_small
    path = write_checkpoint(tmp_path / method, f"{base}-{method}", seed=0)
    ours = load_file(str(path / "model.safetensors"))
    expected, _ = _expected(method, dense_tensors)
    assert sorted(ours) == sorted(expected)
    for key, t in expected.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape, key
        assert torch.equal(ours[key].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else ours[key],
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), key
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == preset_config(f"{base}-{method}")["quantization_config"]
    assert {k: v for k, v in config.items() if k != "quantization_config"} == \
        json.loads((dense_path / "config.json").read_text())


@pytest.mark.parametrize("base", SMALL)
@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_random_preset_equals_its_written_checkpoint(tmp_path, method, base):
    """The in-memory preset (weights quantized as they are drawn) and the checkpoint it writes run identically."""
    path = write_checkpoint(tmp_path / method, f"{base}-{method}", seed=0)
    a = LLM(f"random:{base}-{method}", dtype="float32", device="cpu")
    b = LLM(path, dtype="float32", device="cpu")
    assert torch.equal(a.prompt_logits(CONV, params=PROMPT_PARAMS), b.prompt_logits(CONV, params=PROMPT_PARAMS))


def test_awq_preset_matches_transformers_on_the_dense_twin(dense_small, tmp_path):
    base, dense_path, dense_tensors = dense_small
    _, twin = _expected("awq", dense_tensors)
    hf_model, twin_path = _twin_model(twin, dense_path, tmp_path)
    llm = _compare(f"random:{base}-awq", hf_model, twin_path, atol=1e-3)
    assert llm.config.text.model_type == {"small": "qwen2", "small-llama": "llama", "small-qwen3": "qwen3"}[base]


def test_every_preset_has_quantized_variants():
    names = preset_names()
    for base in ("tiny", "small", "internvl3-1b", "internvl3-78b", "internvl3-9b", "internvl3_5-1b", "internvl3_5-38b",
                 "small-llama", "small-qwen3"):
        assert {base, f"{base}-awq", f"{base}-fp8"} <= set(names)
    assert preset_config("internvl3-8b-awq")["quantization_config"]["quant_method"] == "awq"
    with pytest.raises(UnsupportedModelError, match="-awq"):
        preset_config("internvl3-8b-int3")


def test_awq_preset_of_a_shape_awq_cannot_hold_is_a_typed_error():
    with pytest.raises(UnsupportedModelError, match="multiple of the group size 128"):
        LLM("random:tiny-awq", dtype="float32", device="cpu")


def test_quant_backend_opts_in_the_quantized_kernels_alone():
    """quant_backend="triton" binds awq_gemm / fp8_gemm to Triton (its interpreter here) and leaves every other op
    on `backend`'s choice; the logits agree with the dequantize-then-matmul path to fp32 summation order."""
    params = SamplingParams(max_tokens=2, return_logits=True, ignore_eos=True)
    ref = LLM("random:small-awq", dtype="float32", device="cpu")
    llm = LLM("random:small-awq", dtype="float32", device="cpu", quant_backend="triton")
    table = llm.model.language_model.layers[0].mlp.gate_up_proj.ops.binding
    assert table["awq_gemm"] == table["fp8_gemm"] == "triton"
    assert {op: b for op, b in table.items() if "gemm" not in op} == \
        {op: b for op, b in ref.runner.kernels.items() if "gemm" not in op}
    a, b = ref.prompt_logits("Hello there", params=params), llm.prompt_logits("Hello there", params=params)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_quant_backend_is_validated():
    from internvl_engine.settings import EngineConfigError
    with pytest.raises(EngineConfigError, match="quant_backend"):
        LLM("random:small-awq", dtype="float32", device="cpu", quant_backend="fast")


def test_use_ops_rebinds_the_quantized_layers():
    """model.use_ops (benchmarks time one model on each backend) reaches the quantized linears too."""
    from internvl_engine.ops import OpTable
    llm = LLM("random:small-fp8", dtype="float32", device="cpu")
    table = OpTable.resolve("torch", "cpu")
    llm.model.use_ops(table)
    assert llm.model.language_model.layers[1].self_attn.o_proj.ops is table
