"""Shared by the kernel tests (tests/test_<family>.py): which backends run where, the tolerance rules, and inputs
laid out as the model lays them out (q/k/v as token-strided views of one packed qkv matmul output)."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

from internvl_engine import ops

DTYPES = [torch.float32, torch.bfloat16]
# Every test runs each backend on the CPU (triton through its interpreter) and, under -m gpu, on CUDA.
BACKENDS = ([pytest.param(b, "cpu", id=f"{b}-cpu") for b in ("torch", "cpp", "triton")]
            + [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu) for b in ("torch", "triton", "cuda")])


@contextlib.contextmanager
def backend(name, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (set by conftest when "
                    "no GPU is visible)")
    with ops.use_backend(name, device):
        yield


def compile_for_sm90(script: str, kernels: int) -> None:
    """Runs `script` (which compiles Triton kernels for a Hopper target with triton.compile and prints "compiled"
    for each) in a fresh interpreter without TRITON_INTERPRET, so that @triton.jit takes the GPU branch the CPU
    tests never run; the triton wheel's ptxas builds the cubins, no GPU needed. Asserts `kernels` of them built."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == kernels, r.stdout


def assert_close(out, ref, dtype):
    """Ops whose only rounding is the final cast: a few units in the last place of the storage dtype."""
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def attention_refs(oracle, q, k, v, *args):
    """(ref, lowp) for assert_attention_close, from the oracle alone: ref on fp64 copies of q, k, v (or of q and the
    caches), lowp the fp32 oracle's output rounded to q's dtype, i.e. the error that storing the result in that
    dtype costs (for fp32, the fp32 oracle's own error). Neither comes from a backend: the yardstick used to be the
    torch backend in q's dtype, and with the torch backend under test the rule then held whatever it computed."""
    ref = oracle(*(t.double() for t in (q, k, v)), *args)
    lowp = oracle(*(t.float() for t in (q, k, v)), *args).to(q.dtype)
    return ref, lowp


def assert_attention_close(out, ref, lowp, dtype):
    """The flash-attention rule: max|kernel - ref| <= 2 * max|lowp - ref| + atol, where ref is the reference on
    high-precision copies of the inputs and lowp a result in the kernel's dtype computed independently of the
    kernel under test (attention_refs)."""
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    err = (out.double() - ref.double()).abs().max().item()
    bound = 2 * (lowp.double() - ref.double()).abs().max().item() + atol
    assert out.dtype == dtype and not out.isnan().any()
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


def packed_qkv(tokens, heads, kv_heads, head_dim, dtype, device, seed=0):
    """q [T, H, D], k/v [T, Hk, D] as row-strided views of one [T, (H + 2 Hk) D] tensor."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(device)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim))
