"""The quantized matmul ops of the kernel contract (awq_gemm, fp8_gemm) on every backend against their
plain-torch oracles (ops/ref.py), on odd shapes; Triton through its interpreter on the CPU."""
import pytest
import torch

from internvl_engine import ops
from internvl_engine.errors import KernelInputError
from kernel_cases import BACKENDS, backend

# (M, K, N): decode (1 token), odd token counts, N not a multiple of the tile, K of several groups
SHAPES = [(1, 128, 8), (3, 256, 40), (17, 384, 72), (33, 128, 136)]


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


@pytest.mark.parametrize("name,device", BACKENDS)
@pytest.mark.parametrize("dtype,n", [(torch.float32, 40), (torch.bfloat16, 48)])
def test_fp8_gemm_matches_oracle(name, device, dtype, n):
    """bf16 with N, K multiples of 16: torch._scaled_mm on sm89+ GPUs (rounding to bf16 only), the oracle elsewhere."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=g).to(dtype).to(device)
    w = torch.randn(n, 96, generator=g)
    ws = (w.abs().amax(1, keepdim=True) / 448)
    wq = (w / ws).to(torch.float8_e4m3fn).to(device)
    with backend(name, device):
        out = ops.fp8_gemm(x, wq, ws.to(device))
    assert out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ops.fp8_gemm_ref(x, wq, ws.to(device)).float(), atol=tol, rtol=tol)


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
