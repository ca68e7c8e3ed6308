"""Quantized checkpoints (issue 18): AWQ W4A16 as OpenGVLab/LMDeploy ship it and FP8 W8A8 compressed-tensors.

The checkpoints are written here by an independent writer from random fp16 weights (AWQ packed in int64 and
reinterpreted as int32), and the engine's logits are compared with transformers running the dense dequantized
twin (fp32 compute)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import checkpoints
from internvl_engine import LLM, SamplingParams
from internvl_engine.config import ModelConfig
from internvl_engine.errors import CheckpointError, UnsupportedModelError
from internvl_engine.ops.ref import fp8_gemm_ref
from internvl_engine.quant.awq import awq_dequantize, awq_pack, awq_unpack
from hf_processor import make_hf_processor
from reference import hf_greedy, hf_inputs, hf_logits
from test_loader import _copy_side_files, to_original

# AWQ needs every quantized input size to be a multiple of 128 (hidden, heads x head_dim and intermediate)
checkpoints.VARIANTS.setdefault("quant", dict(
    vision=checkpoints.VARIANTS["300m"]["vision"],
    text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=256, tie_word_embeddings=False)))
# The same on the Llama (InternLM3 as converted) and Qwen3 (InternVL3.5) decoders: no biases, head_dim 64 where
# hidden / heads is 32 (q_proj 128 -> 256, o_proj 256 -> 128), Qwen3's q/k norms and tied lm_head.
checkpoints.VARIANTS.setdefault("quant-llama", dict(
    vision=checkpoints.VARIANTS["300m"]["vision"],
    text=dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, intermediate_size=256, tie_word_embeddings=False)))
checkpoints.VARIANTS.setdefault("quant-qwen3", dict(
    vision=checkpoints.VARIANTS["300m"]["vision"],
    text=dict(model_type="qwen3", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, intermediate_size=256, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6})))
FAMILY_SUFFIX = {"qwen2": "", "llama": "_llama", "qwen3": "_qwen3"}  # the fixtures of each decoder family

IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 260, 3), dtype=np.uint8))
CONV = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]}]
DECODER = r"language_model.model.layers."
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
AWQ_BLOCK = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True}


# ---------------------------------------------------------------------------------- the independent writer
def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit values -> int32 [rows, cols/8]: word |= q[:, 8c + ORDER[i]] << 4i, in int64."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    q = q.to(torch.int64)
    words = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for c in range(q.shape[1] // 8):
        for i in range(8):
            words[:, c] |= q[:, 8 * c + order[i]] << (4 * i)
    return words.to(torch.int32)  # keeps the low 32 bits: nibble 7 may set the sign bit


def quantize_awq(w: torch.Tensor):
    """LMDeploy's pseudo_quantize_tensor per output row and group of 128 inputs. w [out, in] ->
    (qweight, qzeros, scales fp16, the dense twin [out, in] fp32)."""
    out, inp = w.shape
    g = w.float().reshape(out, inp // 128, 128)
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    s = ((hi - lo).clamp(min=1e-5) / 15).half().float()
    z = torch.clamp(-torch.round(lo / s), 0, 15)
    q = torch.clamp(torch.round(g / s) + z, 0, 15)
    twin = ((q - z) * s).reshape(out, inp)
    q, z, s = q.reshape(out, inp), z[..., 0], s[..., 0]  # z, s: [out, in/128]
    return pack_awq(q.t().contiguous()), pack_awq(z.t().contiguous()), s.t().contiguous().half(), twin


def quantize_fp8(w: torch.Tensor):
    """Per-output-channel FP8: (weight e4m3 [out, in], weight_scale [out, 1] fp16, dense twin fp32)."""
    scale = (w.float().abs().amax(1, keepdim=True) / 448).half()
    q = (w.float() / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale, q.float() * scale.float()


def _dense_files(path):
    """The transformers-written -hf checkpoint, every float tensor rounded to fp16."""
    return {k: v.half() for k, v in load_file(str(path / "model.safetensors")).items()}


def _twin_model(tensors_fp32, dense_path, tmp_path):
    """transformers' model on the dense twin weights (fp32)."""
    from transformers import InternVLForConditionalGeneration

    twin = tmp_path / "twin"
    _copy_side_files(dense_path, twin)
    shutil.copy(dense_path / "config.json", twin / "config.json")
    save_file({k: v.float().contiguous() for k, v in tensors_fp32.items()}, str(twin / "model.safetensors"))
    return InternVLForConditionalGeneration.from_pretrained(twin, dtype=torch.float32).eval(), twin


def _is_decoder_linear(key):
    return key.startswith(DECODER) and key.endswith(".weight") and any(f".{s}." in key for s in LINEARS)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant-dense")
    checkpoints.build_hf_checkpoint(path, "quant", seed=1)
    return path


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant-dense-llama")
    checkpoints.build_hf_checkpoint(path, "quant-llama", seed=1)
    return path


@pytest.fixture(scope="module")
def dense_qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant-dense-qwen3")
    checkpoints.build_hf_checkpoint(path, "quant-qwen3", seed=1)
    return path


# The triton backend runs on the CPU through Triton's interpreter, a Python loop over every program and block: its
# AWQ case took 100-200 s on 2 cores at 448-pixel tiles. It runs on a checkpoint with 224-pixel tiles instead (64
# image tokens a tile against 256): the same kernels on the same paths (the prefill still runs the tiled AWQ GEMM,
# past GEMV_MAX_M rows, and every decode step the GEMV; checked in the test) on a quarter of the tokens.
TRITON_IMAGE_SIZE = 224


@pytest.fixture(scope="module")
def dense_224(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant-dense-224")
    checkpoints.build_hf_checkpoint(path, "quant", seed=1, image_size=TRITON_IMAGE_SIZE)
    return path


@pytest.fixture(scope="module")
def awq(dense, tmp_path_factory):
    """(AWQ tensors in the -hf key layout, the twin model, the twin's path)."""
    return _awq_and_twin(dense, tmp_path_factory.mktemp("awq"))


@pytest.fixture(scope="module")
def awq_224(dense_224, tmp_path_factory):
    return _awq_and_twin(dense_224, tmp_path_factory.mktemp("awq-224"))


@pytest.fixture(scope="module")
def awq_llama(dense_llama, tmp_path_factory):
    return _awq_and_twin(dense_llama, tmp_path_factory.mktemp("awq-llama"))


@pytest.fixture(scope="module")
def awq_qwen3(dense_qwen3, tmp_path_factory):
    return _awq_and_twin(dense_qwen3, tmp_path_factory.mktemp("awq-qwen3"))


def _awq_and_twin(dense, tmp_path):
    files = _dense_files(dense)
    quant, twin = {}, {}
    for key, t in files.items():
        if _is_decoder_linear(key):
            base = key[: -len(".weight")]
            qw, qz, s, w = quantize_awq(t)
            quant.update({f"{base}.qweight": qw, f"{base}.qzeros": qz, f"{base}.scales": s})
            twin[key] = w
        else:
            quant[key] = t
            twin[key] = t.float()
    model, twin_path = _twin_model(twin, dense, tmp_path)
    return quant, model, twin_path


def _compare(path, hf_model, twin_path, atol, backend="auto"):
    """Logits within atol of the twin's at every prompt position, greedy tokens equal (W4A16: the activations are
    not quantized, so both sides compute the same function up to fp32 summation order)."""
    llm = LLM(path, dtype="float32", device="cpu", backend=backend)
    params = SamplingParams(max_tokens=8, return_logits=True, ignore_eos=True, max_num_tiles=2)
    inputs = hf_inputs(make_hf_processor(twin_path), CONV, 2)
    ours, ref = llm.prompt_logits(CONV, params=params), hf_logits(hf_model, inputs)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= atol
    out = llm.generate(CONV, params)[0]
    ref_ids, _ = hf_greedy(hf_model, inputs, 8)
    assert out.token_ids == ref_ids
    return llm


def test_awq_pack_order_and_unpack_bit_exact():
    row = torch.arange(8).reshape(1, 8)
    assert pack_awq(row).item() == 0x75316420
    assert awq_pack(row).item() == 0x75316420
    q = torch.randint(0, 16, (256, 96))
    packed = pack_awq(q)
    assert torch.equal(awq_pack(q), packed)
    assert (packed < 0).any()  # nibble 7 >= 8 sets the sign bit
    assert torch.equal(awq_unpack(packed).long(), q)


def test_awq_dequantize_matches_the_writer():
    w = torch.randn(64, 256).half()
    qw, qz, s, twin = quantize_awq(w)
    assert qw.shape == (256, 8) and qz.shape == (2, 8) and s.shape == (2, 64)
    assert torch.equal(awq_dequantize(qw, qz, s).t(), twin)
    assert (twin - w.float()).abs().max() < 0.5


def test_fp8_gemm_ref_emulates_per_token_quantization():
    x, w = torch.randn(5, 64), torch.randn(32, 64)
    q, scale, twin = quantize_fp8(w)
    sx = x.abs().amax(-1, keepdim=True) / 448
    xq = (x / sx).to(torch.float8_e4m3fn).float() * sx
    assert torch.allclose(fp8_gemm_ref(x, q, scale), xq @ twin.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_quantized_tensors_keep_their_dtypes_through_casts_and_moves(method):
    """A format's own tensors (int32 packs, e4m3 weights, float32 scales) keep their dtype and bits through the
    casts and moves a model goes through (the loader's .to(dtype) on the meta device and to_empty, .half(),
    .to(device, dtype)); the bias follows the model's dtype like any dense parameter."""
    from internvl_engine.layers.linear import PackedLinear
    from internvl_engine.quant.awq import AWQLinearMethod
    from internvl_engine.quant.fp8 import Fp8LinearMethod

    def build():
        layer = PackedLinear(256, [128, 128], ["gate_proj", "up_proj"], True,
                             method=AWQLinearMethod() if method == "awq" else Fp8LinearMethod())
        with torch.no_grad():
            for p in layer.parameters():
                bits = torch.randint(0, 256, (p.numel() * p.element_size(),), dtype=torch.uint8)
                p.copy_(bits.view(p.dtype).reshape(p.shape) if p.dtype in (torch.int32, torch.float8_e4m3fn)
                        else torch.randn(p.shape, dtype=p.dtype))
        return layer

    own = {"awq": {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float32},
           "fp8": {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32}}[method]
    for cast, dtype in [(lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                        (lambda m: m.to("cpu", torch.float16), torch.float16), (lambda m: m.double(), torch.float64),
                        (lambda m: m.to("cpu"), torch.float32)]:
        layer = build()
        before = {name: p.detach().clone() for name, p in layer.named_parameters()}
        cast(layer)
        for name, want in own.items():
            p = getattr(layer, name)
            assert p.dtype == want and torch.equal(p.view(torch.uint8), before[name].view(torch.uint8)), name
        assert layer.bias.dtype == dtype and torch.equal(layer.bias, before["bias"].to(dtype))
    with torch.device("meta"):  # as the loader builds and casts it
        layer = PackedLinear(256, [128, 128], ["gate_proj", "up_proj"], True,
                             method=AWQLinearMethod() if method == "awq" else Fp8LinearMethod()).to(torch.bfloat16)
    layer.to_empty(device="cpu")
    assert {n: p.dtype for n, p in layer.named_parameters()} == {**own, "bias": torch.bfloat16}


def test_ignore_list_leaving_part_of_a_packed_layer_dense_is_refused():
    """q/k/v (and gate/up) share one matmul: the ignore list leaves all of them dense or none. Names are matched
    in every layout the loader reads (language_model.model.layers.N..., model.layers.N..., ...)."""
    from internvl_engine.config.quant import QuantConfig
    from internvl_engine.layers.linear import DENSE
    from internvl_engine.quant import method_for
    from internvl_engine.quant.fp8 import Fp8LinearMethod

    qkv = [f"language_model.layers.1.self_attn.{s}" for s in ("q_proj", "k_proj", "v_proj")]
    assert type(method_for(QuantConfig("fp8", 8, 0), qkv)) is Fp8LinearMethod
    assert method_for(None, qkv) is DENSE
    whole = QuantConfig("fp8", 8, 0, [r"re:.*layers\.1\.self_attn\.[qkv]_proj"])
    assert method_for(whole, qkv) is DENSE
    assert type(method_for(whole, [q.replace("layers.1", "layers.0") for q in qkv])) is Fp8LinearMethod
    part = QuantConfig("fp8", 8, 0, ["model.layers.1.self_attn.k_proj"])
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.self_attn\.q_proj, .*k_proj, .*v_proj: the "
                                                    r"ignore list leaves only some of these dense"):
        method_for(part, qkv)


def _original_config(block_at, block):
    llm_config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 128,
                  "num_attention_heads": 4}
    raw = {"model_type": "internvl_chat", "vision_config": {}, "llm_config": llm_config}
    if block_at == "top":
        raw["quantization_config"] = block
    else:
        llm_config["quantization_config"] = block
    return raw


@pytest.mark.parametrize("where", ["top", "llm_config"])
def test_config_block_found_at_top_level_and_under_llm_config(where):
    cfg = ModelConfig.from_dict(_original_config(where, AWQ_BLOCK))
    assert cfg.quant.method == "awq" and cfg.quant.group_size == 128


def test_config_block_under_text_config():
    raw = {"model_type": "internvl", "text_config": {"model_type": "qwen2", "quantization_config": AWQ_BLOCK}}
    assert ModelConfig.from_dict(raw).quant.method == "awq"
    assert ModelConfig.from_dict({"model_type": "internvl"}).quant is None


@pytest.mark.parametrize("change,word", [({"bits": 8}, "bits"), ({"group_size": 64}, "group_size"),
                                         ({"version": "gemv"}, "version"), ({"zero_point": False}, "zero_point"),
                                         ({"quant_method": "gptq"}, "gptq")])
def test_unsupported_awq_configs_are_typed_errors(change, word):
    with pytest.raises(UnsupportedModelError, match=word):
        ModelConfig.from_dict(_original_config("llm_config", AWQ_BLOCK | change))


# ------------------------------------------------------------------------------------------- checkpoints
def _write_awq_bin(dense, quant, path):
    """OpenGVLab's shipping form: original layout, pickle .bin shards + index, block under llm_config."""
    config = json.loads((dense / "config.json").read_text())
    tensors, orig = to_original(quant, config)
    orig["llm_config"]["quantization_config"] = AWQ_BLOCK
    _copy_side_files(dense, path)
    (path / "config.json").write_text(json.dumps(orig))
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: tensors[k].contiguous() for k in part}, path / name)
        weight_map.update({k: name for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_awq_bin_original_layout_matches_dense_twin(dense, awq, tmp_path):
    quant, hf_model, twin_path = awq
    path = _write_awq_bin(dense, quant, tmp_path / "awq-bin")
    llm = _compare(path, hf_model, twin_path, atol=1e-3)
    layer = llm.model.language_model.layers[0]
    assert layer.self_attn.qkv_proj.qweight.dtype == torch.int32
    assert layer.mlp.down_proj.qweight.shape == (256, 16)


def _awq_safetensors(dense, quant, path):
    """The dense checkpoint's side files, its config with the AWQ block at the top level, and `quant` as one
    safetensors file."""
    _copy_side_files(dense, path)
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = AWQ_BLOCK
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in quant.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("backend, family", [("torch", "qwen2"), ("triton", "qwen2"), ("torch", "llama"),
                                             ("torch", "qwen3")])
def test_awq_safetensors_hf_layout_matches_dense_twin(request, tmp_path, backend, family):
    suffix = "_224" if backend == "triton" else FAMILY_SUFFIX[family]  # see TRITON_IMAGE_SIZE
    dense, (quant, hf_model, twin_path) = (request.getfixturevalue(f"{name}{suffix}") for name in ("dense", "awq"))
    if backend == "triton":  # the prefill's rows take the tiled GEMM (decode steps: the GEMV)
        from internvl_engine.kernels.awq_gemm import GEMV_MAX_M
        assert hf_inputs(make_hf_processor(twin_path), CONV, 2)["input_ids"].shape[1] > GEMV_MAX_M
    path = _awq_safetensors(dense, quant, tmp_path / "awq-st")
    llm = _compare(path, hf_model, twin_path, atol=1e-3, backend=backend)
    assert llm.model.language_model.layers[0].mlp.gate_up_proj.ops.binding["awq_gemm"] == backend


def test_awq_missing_scales_is_a_checkpoint_error(dense, awq, tmp_path):
    quant, _, _ = awq
    dropped = "language_model.model.layers.1.self_attn.k_proj.scales"
    path = _awq_safetensors(dense, {k: v for k, v in quant.items() if k != dropped}, tmp_path / "awq-missing")
    with pytest.raises(CheckpointError, match="scales"):
        LLM(path, dtype="float32", device="cpu")


def test_bin_with_pickled_objects_is_refused(dense, tmp_path):
    path = tmp_path / "evil"
    _copy_side_files(dense, path)
    shutil.copy(dense / "config.json", path / "config.json")
    torch.save({"x": torch.zeros(1), "obj": Image.new("RGB", (1, 1))}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tensors-only"):
        LLM(path, dtype="float32", device="cpu")


FP8_IGNORE = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*layers\\.1\\.mlp\\.down_proj$"]
FP8_BLOCK = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": FP8_IGNORE,
             "config_groups": {"group_0": {
                 "targets": ["Linear"],
                 "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                             "dynamic": False},
                 "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                       "dynamic": True}}}}


def quantized_files(dense_path, method):
    """The dense -hf checkpoint's tensors (fp16) with every decoder linear quantized by this file's independent
    writers (FP8: but those FP8_IGNORE names), and the config block: for the TP and original-layout tests."""
    import re

    out = {}
    for key, t in _dense_files(dense_path).items():
        base = key[: -len(".weight")]
        if method == "awq" and _is_decoder_linear(key):
            qw, qz, s, _ = quantize_awq(t)
            out.update({f"{base}.qweight": qw, f"{base}.qzeros": qz, f"{base}.scales": s})
        elif method == "fp8" and _is_decoder_linear(key) and not re.fullmatch(FP8_IGNORE[-1][3:], base):
            q, s, _ = quantize_fp8(t)
            out.update({key: q, f"{base}.weight_scale": s})
        else:
            out[key] = t
    return out, (AWQ_BLOCK if method == "awq" else FP8_BLOCK)


def _fake_quant(x):
    """The reference's per-token dynamic FP8 activations (quantize, dequantize): scale = amax / 448 per row."""
    s = (x.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


# transformers' decoder linear -> the engine module (per decoder layer) that reads the same input
_ENGINE_LINEAR = {"q_proj": "self_attn.qkv_proj", "k_proj": "self_attn.qkv_proj", "v_proj": "self_attn.qkv_proj",
                  "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj",
                  "down_proj": "mlp.down_proj"}


def _record_fp8_inputs(llm):
    """Forward pre-hooks on the engine's FP8 decoder linears: each call's input rows, appended per module name
    (a prefill is one call of all its rows, a decode step one more row)."""
    seen, handles = {}, []
    for name, module in llm.model.language_model.layers.named_modules():
        if getattr(module, "weight", None) is not None and module.weight.dtype == torch.float8_e4m3fn:
            def hook(m, args, name=name):
                seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
            handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


def _feed_engine_activations(hf_model, seen, atol):
    """Forward pre-hooks on transformers' FP8 twin linears: check that transformers' own input is the engine's (to
    fp32 summation order, `atol`), then quantize the engine's input with the reference quantizer and feed that.
    Both sides then round the same numbers, so no per-token rounding can flip between them: what remains is the
    engine's quantizer against the reference's, its e4m3 matmul against the dequantized twin, and everything
    around the linears, all compared tightly. Returns the hook handles and the per-module call counts."""
    import re

    handles, used = [], {}
    for name, module in hf_model.named_modules():
        m = re.search(r"language_model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$", name)
        if not (isinstance(module, torch.nn.Linear) and m):
            continue
        engine = f"{m.group(1)}.{_ENGINE_LINEAR[m.group(2)]}"
        if engine not in seen:
            continue  # dense on the engine too (the ignore list): transformers runs it as it is

        def hook(mod, args, engine=engine, hf_name=name):
            x = args[0]
            mine = torch.cat(seen[engine])
            assert mine.shape == (x.numel() // x.shape[-1], x.shape[-1]), (hf_name, tuple(mine.shape), x.shape)
            gap = (x.reshape(mine.shape) - mine).abs().max().item()
            assert gap <= atol, (hf_name, gap)  # the engine reached the same activations
            used[hf_name] = used.get(hf_name, 0) + 1
            return (_fake_quant(mine).reshape(x.shape),)
        handles.append(module.register_forward_pre_hook(hook))
    return handles, used


@pytest.mark.parametrize("family", list(FAMILY_SUFFIX))
def test_fp8_compressed_tensors_matches_dense_twin(request, tmp_path, family):
    import re

    dense = request.getfixturevalue(f"dense{FAMILY_SUFFIX[family]}")
    files = _dense_files(dense)
    quant, twin, fp8_modules = {}, {}, []
    for key, t in files.items():
        base = key[: -len(".weight")]
        if _is_decoder_linear(key) and not re.fullmatch(FP8_IGNORE[-1][3:], base):
            q, s, w = quantize_fp8(t)
            quant.update({key: q, f"{base}.weight_scale": s})
            twin[key] = w
            fp8_modules.append(base)
        else:
            quant[key] = t
            twin[key] = t.float()
    hf_model, twin_path = _twin_model(twin, dense, tmp_path)
    path = tmp_path / "fp8"
    _copy_side_files(dense, path)
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = FP8_BLOCK
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in quant.items()}, str(path / "model.safetensors"))
    # A yardstick independent of summation order: per-token FP8 rounding flips wherever two fp32 computations of
    # the same activation differ in the last bit (a share of positions that depends on the machine), so
    # transformers quantizes the engine's own activations (after checking they equal its own to atol) rather than
    # its own; both sides round the same numbers and every position must agree within atol.
    llm = LLM(path, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=8, return_logits=True, ignore_eos=True, max_num_tiles=2)
    inputs = hf_inputs(make_hf_processor(twin_path), CONV, 2)
    atol = 1e-4

    seen, handles = _record_fp8_inputs(llm)
    ours = llm.prompt_logits(CONV, params=params)  # one forward pass: one call per linear
    for h in handles:
        h.remove()
    assert len(seen) == 7  # 2 layers x 4 matmuls (q/k/v and gate/up packed), less layer 1's dense down_proj
    hooks, used = _feed_engine_activations(hf_model, seen, atol)
    ref = hf_logits(hf_model, inputs)
    for h in hooks:
        h.remove()
    assert len(used) == len(fp8_modules) == 13 and set(used.values()) == {1}
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= atol

    # greedy decoding: the engine's 8 steps (a prefill, then one row per step) replayed in one transformers pass
    # over the prompt and the first 7 tokens, fed the engine's activations the same way
    seen, handles = _record_fp8_inputs(llm)
    out = llm.generate(CONV, params)[0]
    for h in handles:
        h.remove()
    hooks, _ = _feed_engine_activations(hf_model, seen, atol)
    n = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([out.token_ids[:-1]])], dim=1)
    with torch.no_grad():
        ref = hf_model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0, n - 1:]
    for h in hooks:
        h.remove()
    assert ref.argmax(-1).tolist() == out.token_ids
    assert (out.logits - ref.float()).abs().max().item() <= atol

    layers = llm.model.language_model.layers
    assert layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert layers[1].mlp.down_proj.weight.dtype == torch.float32  # ignored: dense


def test_fp8_unsupported_scheme_is_a_typed_error():
    block = json.loads(json.dumps(FP8_BLOCK))
    block["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    with pytest.raises(UnsupportedModelError, match="dynamic per-token"):
        ModelConfig.from_dict({"model_type": "internvl", "quantization_config": block})


def test_convert_bin_to_safetensors(dense, awq, tmp_path):
    from internvl_engine.cli import main

    src = _write_awq_bin(dense, awq[0], tmp_path / "src")
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst)]) == 0
    assert not list(dst.glob("*.bin")) and (dst / "model.safetensors.index.json").exists()
    assert len(list(dst.glob("*.safetensors"))) == 2
    params = SamplingParams(max_num_tiles=2)
    a = LLM(src, dtype="float32", device="cpu").prompt_logits(CONV, params=params)
    b = LLM(dst, dtype="float32", device="cpu").prompt_logits(CONV, params=params)
    assert torch.equal(a, b)
    assert main(["convert", str(src), str(dst)]) == 2  # DST already holds weights: a typed error, exit 2


def test_awq_that_cannot_split_over_the_ranks_is_refused_before_anything_starts(dense, awq, tmp_path):
    """Hidden 128 at tensor_parallel_size 2: o_proj keeps 64 input rows per rank, half a group of 128 (its qzeros
    and scales rows would straddle the ranks): a typed error naming the layer, the sizes and the sizes that fit,
    before any worker starts; a rank's model built directly (load_model with tp) refuses the same way.
    AWQ and FP8 under tensor parallelism run in test_tensor_parallel."""
    import multiprocessing

    from internvl_engine.parallel import TensorParallel
    from internvl_engine.loader import load_model
    from internvl_engine.ops import OpTable

    path = _awq_safetensors(dense, awq[0], tmp_path / "awq-tp")
    message = (r"tensor_parallel_size 2: AWQ self_attn\.o_proj \(every decoder layer\) has input size 128, 64 per "
               r"rank, not a multiple of the group size 128 .*fit this checkpoint: 1$")
    before = set(multiprocessing.active_children())
    with pytest.raises(UnsupportedModelError, match=message):
        LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2)
    assert set(multiprocessing.active_children()) == before
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(ModelConfig.from_pretrained(path), path, OpTable.resolve("torch", "cpu"), torch.device("cpu"),
                   torch.float32, tp=TensorParallel(1, 2))


def test_awq_tensors_without_the_config_block_are_refused(dense, awq, tmp_path):
    path = tmp_path / "no-block"
    _copy_side_files(dense, path)
    shutil.copy(dense / "config.json", path / "config.json")
    save_file({k: v.contiguous() for k, v in awq[0].items()}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="qweight"):
        LLM(path, dtype="float32", device="cpu")


def test_awq_runs_in_bf16(dense, awq, tmp_path):
    path = tmp_path / "awq-bf16"
    _copy_side_files(dense, path)
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = AWQ_BLOCK
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in awq[0].items()}, str(path / "model.safetensors"))
    llm = LLM(path, dtype="bfloat16", device="cpu")
    layer = llm.model.language_model.layers[0].self_attn.qkv_proj
    assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    out = llm.generate(CONV, SamplingParams(max_tokens=4, ignore_eos=True, max_num_tiles=2))[0]
    assert len(out.token_ids) == 4
