"""The quantized matmul ops of the kernel contract (awq_gemm, fp8_gemm) on every backend against their
plain-torch oracles (ops/ref.py), on odd shapes; Triton through its interpreter on the CPU. The Triton kernels' own
paths (AWQ split-K GEMV vs tiled, FP8 dot on e4m3 vs on decoded fp16, the e4m3 rounding) are pinned down below."""
import importlib
import os

import pytest
import torch

from internvl_engine import ops
from internvl_engine.errors import KernelInputError
from kernel_cases import BACKENDS, backend

# (M, K, N), N never a multiple of the GEMV's 128-column tile. Triton's split-K GEMV path (M <= 16): decode (1
# token) with K of 1 and 8 groups, 2, 5, 8 and 16 tokens; its split heuristic gives K <= 384 one split and K 1024
# four (kernels/awq_gemm.split_k). Tiled path: 17 and 33 tokens.
SHAPES = [(1, 128, 8), (1, 1024, 200), (2, 384, 136), (3, 256, 40), (5, 1024, 264), (8, 384, 72), (16, 256, 40),
          (17, 384, 72), (33, 128, 136)]


def _awq_inputs(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    qweight = torch.randint(-2 ** 31, 2 ** 31, (k, n // 8), generator=g, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-2 ** 31, 2 ** 31, (k // 128, n // 8), generator=g, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(k // 128, n, generator=g) * 0.02).half().to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x, qweight, qzeros, scales, bias


@pytest.mark.parametrize("name,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_awq_gemm_matches_oracle(name, device, dtype, m, k, n):
    x, qw, qz, s, b = _awq_inputs(m, k, n, dtype)
    x, qw, qz, s, b = (t.to(device) for t in (x, qw, qz, s, b))
    ref = ops.awq_gemm_ref(x, qw, qz, s, b)
    with backend(name, device):
        out = ops.awq_gemm(x, qw, qz, s, b)
        no_bias = ops.awq_gemm(x, qw, qz, s)
    assert out.dtype == dtype and out.shape == (m, n)
    # fp32: summation order only; bf16: the backends may round the dequantized weight to bf16 before the matmul
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * scale, rtol=tol)
    torch.testing.assert_close(no_bias.float(), ops.awq_gemm_ref(x, qw, qz, s).float(), atol=tol * scale, rtol=tol)


def _fp8_inputs(m, k, n, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g)
    ws = (w.abs().amax(1, keepdim=True) / 448).to(dtype)  # checkpoints store weight_scale in the model dtype
    return x, (w / ws.float()).to(torch.float8_e4m3fn), ws, torch.randn(n, generator=g).to(dtype)


# (M, K, N): decode, K not a multiple of the 64-deep step, M over one 16-row tile (tiled under the interpreter's
# 32-row tiles too); bf16 with N, K multiples of 16 reaches torch._scaled_mm on sm89+ GPUs (opt-in there)
FP8_SHAPES = [(1, 96, 40), (5, 96, 48), (5, 200, 72), (33, 128, 136)]


@pytest.mark.parametrize("name,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", FP8_SHAPES)
def test_fp8_gemm_matches_oracle(name, device, dtype, m, k, n):
    """_scaled_mm's only extra rounding is the output's bf16; the Triton kernel quantizes x bit-exactly, so both
    differ from the oracle by summation order and that rounding."""
    x, wq, ws, b = (t.to(device) for t in _fp8_inputs(m, k, n, dtype))
    with backend(name, device):
        out = ops.fp8_gemm(x, wq, ws, b)
        no_bias = ops.fp8_gemm(x, wq, ws)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, bias in ((out, b), (no_bias, None)):
        ref = ops.fp8_gemm_ref(x, wq, ws, bias).float()
        err = (got.float() - ref).abs()
        assert (err <= tol + tol * ref.abs() + _fp8_dot_slack(name, device, x, wq, ws)).all(), err.max()


def _fp8_dot_slack(name, device, x, wq, ws):
    """0, except where the Triton kernel runs tl.dot on e4m3 operands (sm89+): Hopper's FP8 tensor cores keep about
    14 bits while they accumulate inside one instruction (DeepSeek-V3 report, 3.3.2), and the kernel moves the sum
    to fp32 every 32 products (max_num_imprecise_acc=32), so each product may carry an error up to 2^-14 of the
    magnitudes accumulated with it: bounded by 2^-13 * sum_k |xq_k * w_k| per output (a factor 2 to spare)."""
    if name != "triton" or device != "cuda" or not _kernels("fp8_gemm", device).fp8_dot_supported(x.device):
        return 0.0
    from internvl_engine.ops.ref import fp8_quantize_tokens
    xq, sx = fp8_quantize_tokens(x.float())
    xq = xq.float() * sx
    return 2.0 ** -13 * (xq.abs() @ (wq.float() * ws.float()).abs().t())


@pytest.mark.parametrize("name,device", BACKENDS)
def test_no_tokens(name, device):
    x, qw, qz, s, b = (t.to(device) for t in _awq_inputs(0, 256, 40, torch.bfloat16))
    xf, wq, ws, bf = (t.to(device) for t in _fp8_inputs(0, 96, 40, torch.float32))
    with backend(name, device):
        awq, fp8 = ops.awq_gemm(x, qw, qz, s, b), ops.fp8_gemm(xf, wq, ws, bf)
    assert awq.shape == (0, 40) and awq.dtype == torch.bfloat16
    assert fp8.shape == (0, 40) and fp8.dtype == torch.float32


# ---- the Triton kernels' own paths (kernels/awq_gemm.py, kernels/fp8_gemm.py), called directly
TRITON_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _kernels(family, device="cpu"):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest when no GPU is visible)")
    pytest.importorskip("triton")
    return importlib.import_module(f"internvl_engine.kernels.{family}")


def test_awq_path_and_split_heuristic():
    pytest.importorskip("triton")
    awq = importlib.import_module("internvl_engine.kernels.awq_gemm")
    dev = torch.device("cpu")  # the heuristic's H100 / H200 SM count (132)
    assert [awq.path(m, 896, 1152, dev) for m in (1, 8, 16, 17)] == ["gemv split_k=3"] * 3 + ["tiled"]
    # InternVL3-1B (kernels/awq_gemm.split_k): q/k/v, gate/up, down; 1 group and 3 groups cannot split
    assert [awq.split_k(k, n, dev) for k, n in ((896, 1152), (896, 9728), (4864, 896), (128, 8), (384, 72))] \
        == [(3, 3), (3, 3), (19, 2), (1, 1), (1, 3)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awq_gemv_split_count_changes_only_summation_order(device, dtype):
    """1, 3 (groups 3 + 3 + 2) and 8 splits of 8 groups: each group's sum is the same; only the fp32 adds of group
    results into partials and of partials into y are reordered."""
    awq = _kernels("awq_gemm", device)
    x, qw, qz, s, b = (t.to(device) for t in _awq_inputs(5, 1024, 136, dtype))
    outs = [awq.awq_gemv(x, qw, qz, s, b, splits=n).float() for n in (1, 3, 8)]
    scale = outs[0].abs().max().item()
    for out in outs[1:]:
        if dtype == torch.float32:
            torch.testing.assert_close(out, outs[0], atol=1e-6 * scale, rtol=0)
        else:  # a reordering can move an fp32 sum across a bf16 rounding boundary: one bf16 step (2^-7 |y|) at most
            assert ((out - outs[0]).abs() <= outs[0].abs() * 2 ** -7 + 1e-6 * scale).all()


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_awq_tiled_path_at_decode_sizes(device):
    """The tiled kernel still serves any M (benchmarks/quant.py times it against the GEMV below GEMV_MAX_M)."""
    awq = _kernels("awq_gemm", device)
    x, qw, qz, s, b = (t.to(device) for t in _awq_inputs(5, 384, 136, torch.float32))
    ref = ops.awq_gemm_ref(x, qw, qz, s, b)
    scale = ref.abs().max().item()
    torch.testing.assert_close(awq.awq_tiled(x, qw, qz, s, b), ref, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_e4m3_rounding_is_bit_exact(device):
    """Every finite e4m3 value, every midpoint between neighbours (ties to even) and the fp32 values either side
    of each midpoint, in a row whose amax is 448 (so sx is 1 and x / sx is x); then random bf16 rows of many
    magnitudes, and a zero row (sx clamps to 1e-12)."""
    fp8 = _kernels("fp8_gemm", device)
    finite = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = finite[~finite.isnan()].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    row = torch.cat([torch.tensor([448.0]), finite, mids, torch.nextafter(mids, finite[1:]),
                     torch.nextafter(mids, finite[:-1])])
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(3, row.numel(), generator=g) * torch.logspace(-6, 3, row.numel())
    x = torch.cat([row[None], rows, torch.zeros(1, row.numel())])
    for xt in (x, x.bfloat16()):
        xt = xt.to(device)
        codes, sx = fp8.quantize_rows(xt)
        xf = xt.float()
        ref_sx = (xf.abs().amax(-1, keepdim=True) / xf.new_tensor(448.0)).clamp(min=1e-12)  # exact on CUDA too
        ref_codes = (xf / ref_sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
        assert torch.equal(sx, ref_sx[:, 0]) and torch.equal(codes, ref_codes)
    assert sx[0].item() == 1.0


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_fp8_dot_on_e4m3_and_on_decoded_fp16_agree(device):
    """Both dots see exact products; under the interpreter both run as fp16 x fp16 -> fp32, so they agree bit for
    bit (the float8 loads and dot are otherwise only compiled on sm89+)."""
    fp8 = _kernels("fp8_gemm", device)
    if device == "cuda" and not fp8.fp8_dot_supported(torch.device(device)):
        pytest.skip("tl.dot on float8e4nv needs CUDA capability 8.9+")
    x, wq, ws, b = (t.to(device) for t in _fp8_inputs(33, 200, 72, torch.bfloat16))
    on_e4m3, on_f16 = fp8.fp8_gemm(x, wq, ws, b, fp8_dot=True), fp8.fp8_gemm(x, wq, ws, b, fp8_dot=False)
    if device == "cpu":
        assert torch.equal(on_e4m3, on_f16)
    torch.testing.assert_close(on_e4m3.float(), ops.fp8_gemm_ref(x, wq, ws, b).float(), atol=2e-2, rtol=2e-2)


def test_checks_name_the_bad_tensor():
    x, qw, qz, s, b = _awq_inputs(2, 256, 16, torch.float32)
    with pytest.raises(KernelInputError, match="qweight"):
        ops.awq_gemm(x, qw.float(), qz, s, b)
    with pytest.raises(KernelInputError, match="qzeros"):
        ops.awq_gemm(x, qw, qz[:1], s, b)
    with pytest.raises(KernelInputError, match="multiple"):
        ops.awq_gemm(x[:, :200].contiguous(), qw[:200], qz, s, b)
    with pytest.raises(KernelInputError, match="weight"):
        ops.fp8_gemm(x, torch.zeros(4, 256), torch.ones(4, 1))
