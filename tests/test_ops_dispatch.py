"""The dispatch point and its argument checks: backend selection and availability, and a clear KernelInputError
for a wrong device, dtype, shape or layout before any kernel runs (the output buffers stay untouched)."""
import pytest
import torch

from internvl_engine import LLM, ops
from internvl_engine.errors import BackendError, KernelInputError
from kernel_cases import packed_qkv

CPU_BACKENDS = ["torch", "cpp", "triton"]


def test_cpu_backends_are_available():
    """CI builds the extension and runs triton through its interpreter: neither may be silently skipped."""
    assert set(CPU_BACKENDS) <= set(ops.available_backends()), {b: ops.unavailable_reason(b) for b in CPU_BACKENDS}


def test_extension_reports_cuda_kernels():
    import internvl_engine._C as C
    from internvl_engine.cli import extension_info
    info = extension_info()
    assert info["built"] and info["cuda_kernels"] == bool(C.CUDA_KERNELS)
    if C.CUDA_KERNELS:
        assert info["archs"] and all(a.startswith("sm_") for a in info["archs"])


def test_use_backend_restores_the_previous_binding():
    with ops.use_backend("torch"):
        before = ops.current_binding()
        with ops.use_backend("cpp"):
            assert set(ops.current_binding().values()) == {"cpp"} and ops.current_backend() == "cpp"
            assert ops.rms_norm.backend == "cpp"
        assert ops.current_binding() == before and ops.rms_norm.backend == "torch"


def test_auto_binds_the_measured_defaults_on_cpu():
    binding = ops.resolve("auto", "cpu")
    assert binding == ops.AUTO["cpu"] and binding["rms_norm"] == "cpp" and binding["paged_attention"] == "cpp"


@pytest.mark.parametrize("name,match", [("nope", "unknown kernel backend 'nope'"), ("cuda", "cuda")])
def test_unknown_or_unavailable_backend(name, match):
    if name == "cuda" and torch.cuda.is_available():
        pytest.skip("cuda is available here")
    with ops.use_backend("torch"):
        with pytest.raises(BackendError, match=match):
            with ops.use_backend(name):
                pass
        assert ops.current_backend() == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        ops.use("triton")


def test_llm_rejects_an_unavailable_backend_before_loading():
    with pytest.raises(BackendError, match="nope"):
        LLM("random:tiny", backend="nope")


def _norm_inputs():
    return torch.randn(4, 8), torch.ones(8)


BAD_CALLS = {
    "rms_norm: int dtype": ("rms_norm", lambda: (torch.ones(4, 8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), 1e-6),
                            "must be float32/float16/bfloat16"),
    "rms_norm: weight dtype": ("rms_norm", lambda: (torch.randn(4, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6),
                               "weight must be float32"),
    "rms_norm: weight shape": ("rms_norm", lambda: (torch.randn(4, 8), torch.ones(7), 1e-6), "last dimension"),
    "rms_norm: transposed x": ("rms_norm", lambda: (torch.randn(8, 4).t(), torch.ones(8), 1e-6), "contiguous"),
    "rms_norm: residual shape": ("rms_norm", lambda: (torch.randn(4, 8), torch.ones(8), 1e-6, torch.randn(3, 8)),
                                 "residual"),
    "rms_norm: weight on meta": ("rms_norm", lambda: (torch.randn(4, 8), torch.ones(8, device="meta"), 1e-6),
                                 "weight is on meta"),
    "layer_norm: bias shape": ("layer_norm", lambda: (torch.randn(4, 8), torch.ones(8), torch.ones(9), 1e-6),
                               "bias"),
    "pixel_shuffle: not square": ("pixel_shuffle", lambda: (torch.randn(1, 30, 4), 0.5), "square map"),
    "pixel_shuffle: odd side": ("pixel_shuffle", lambda: (torch.randn(1, 25, 4), 0.5), "divisible by 2"),
    "pixel_shuffle: 2d": ("pixel_shuffle", lambda: (torch.randn(16, 4), 0.5), "3 dimensions"),
    "rotary: positions dtype": ("rotary", lambda: (*packed_qkv(3, 2, 1, 8, torch.float32, "cpu")[:2],
                                                   torch.zeros(3, dtype=torch.int32), torch.zeros(10, 8)), "int64"),
    "rotary: table width": ("rotary", lambda: (*packed_qkv(3, 2, 1, 8, torch.float32, "cpu")[:2],
                                               torch.zeros(3, dtype=torch.int64), torch.zeros(10, 6)), "cos_sin"),
    "rotary: bf16 table": ("rotary", lambda: (*packed_qkv(3, 2, 1, 8, torch.float32, "cpu")[:2],
                                              torch.zeros(3, dtype=torch.int64),
                                              torch.zeros(10, 8, dtype=torch.bfloat16)), "cos_sin must be float32"),
    "rotary: head-major q": ("rotary", lambda: (torch.randn(2, 3, 8).transpose(0, 1), torch.randn(3, 1, 8),
                                                torch.zeros(3, dtype=torch.int64), torch.zeros(10, 8)),
                             "dense heads"),
    "write_kv_cache: cache shape": ("write_kv_cache", lambda: (torch.randn(3, 2, 8), torch.randn(3, 2, 8),
                                                               torch.zeros(4, 16, 1, 8), torch.zeros(4, 16, 1, 8),
                                                               torch.zeros(3, dtype=torch.int64)), "caches must be"),
    "write_kv_cache: slot dtype": ("write_kv_cache", lambda: (torch.randn(3, 2, 8), torch.randn(3, 2, 8),
                                                              torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8),
                                                              torch.zeros(3, dtype=torch.int32)), "int64"),
    "flash_attention: GQA": ("flash_attention", lambda: (torch.randn(5, 3, 8), torch.randn(5, 2, 8),
                                                         torch.randn(5, 2, 8), torch.tensor([0, 5], dtype=torch.int32),
                                                         torch.tensor([0, 5], dtype=torch.int32), 5, 5, True, 0.3),
                             "multiple of KV heads"),
    "flash_attention: cu dtype": ("flash_attention", lambda: (torch.randn(5, 2, 8), torch.randn(5, 2, 8),
                                                              torch.randn(5, 2, 8), torch.tensor([0, 5]),
                                                              torch.tensor([0, 5]), 5, 5, True, 0.3), "int32"),
    "flash_attention: tensor max_seqlen": ("flash_attention", lambda: (
        torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.tensor([0, 5], dtype=torch.int32),
        torch.tensor([0, 5], dtype=torch.int32), torch.tensor(5), 5, True, 0.3), "host int"),
    "flash_attention: k dtype": ("flash_attention", lambda: (
        torch.randn(5, 2, 8), torch.randn(5, 2, 8).half(), torch.randn(5, 2, 8), torch.tensor([0, 5], dtype=torch.int32),
        torch.tensor([0, 5], dtype=torch.int32), 5, 5, True, 0.3), "k must be float32"),
    "paged_attention: tables per query": ("paged_attention", lambda: (
        torch.randn(2, 2, 8), torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8),
        torch.zeros(3, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 0.3), "one row per query"),
    "paged_attention: head dim": ("paged_attention", lambda: (
        torch.randn(2, 2, 16), torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8),
        torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 0.3), "head dims must agree"),
    "paged_attention: non-contiguous cache": ("paged_attention", lambda: (
        torch.randn(2, 2, 8), torch.zeros(4, 8, 2, 16)[..., ::2], torch.zeros(4, 16, 2, 8),
        torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 0.3), "k_cache must be contiguous"),
}


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_before_any_kernel(backend_name, case):
    op, make, match = BAD_CALLS[case]
    args = make()
    before = [a.clone() if isinstance(a, torch.Tensor) and a.device.type != "meta" else None for a in args]
    with ops.use_backend(backend_name):
        with pytest.raises(KernelInputError, match=match) as info:
            getattr(ops, op)(*args)
    assert str(info.value).startswith(op + ":")
    for a, b in zip(args, before):  # in-place ops (rotary, write_kv_cache) must not have started
        if b is not None:
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
def test_wrong_device_type_names_the_backend(backend_name):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    x = torch.empty(4, 8, device="meta")
    with ops.use_backend(backend_name):
        with pytest.raises(KernelInputError, match=f"backend '{backend_name}' runs on"):
            ops.rms_norm(x, torch.empty(8, device="meta"), 1e-6)


def test_cpp_checks_host_indices():
    """On the CPU the cpp backend also bounds-checks index values (free there): a bad slot or block id is an
    error, not a write or read outside the cache."""
    k = torch.randn(2, 1, 8)
    cache = torch.zeros(2, 4, 1, 8)
    with ops.use_backend("cpp"):
        with pytest.raises(KernelInputError, match="capacity"):
            ops.write_kv_cache(k, k, cache, cache.clone(), torch.tensor([1, 8]))
        with pytest.raises(KernelInputError, match="outside"):
            ops.paged_attention(torch.randn(1, 1, 8), cache, cache, torch.tensor([[0, 5]], dtype=torch.int32),
                                torch.tensor([6], dtype=torch.int32), 0.3)
        with pytest.raises(KernelInputError, match="capacity"):
            ops.paged_attention(torch.randn(1, 1, 8), cache, cache, torch.tensor([[0, 1]], dtype=torch.int32),
                                torch.tensor([9], dtype=torch.int32), 0.3)
        with pytest.raises(KernelInputError, match="positions"):
            q, kk, _ = packed_qkv(2, 1, 1, 8, torch.float32, "cpu")
            ops.rotary(q, kk, torch.tensor([0, 10]), torch.zeros(10, 8))
        assert not cache.any()
