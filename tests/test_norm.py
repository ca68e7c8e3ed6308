"""rms_norm (with the fused residual add) and layer_norm on every backend against ops.rms_norm_ref / layer_norm_ref."""
import pytest
import torch

from internvl_engine import ops
from kernel_cases import BACKENDS, DTYPES, assert_close, backend


def _inputs(tokens, hidden, dtype, device):
    g = torch.Generator().manual_seed(tokens * 1000 + hidden)
    x, r = (torch.randn(tokens, hidden, generator=g) * 3).to(dtype), torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    b = (0.1 * torch.randn(hidden, generator=g)).to(dtype)
    return [t.to(device) for t in (x, r, w, b)]


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("tokens,hidden", [(7, 769), (1025, 64), (3, 896)])
def test_rms_norm(backend_name, device, dtype, tokens, hidden):
    x, r, w, _ = _inputs(tokens, hidden, dtype, device)
    x0, r0 = x.clone(), r.clone()
    with backend(backend_name, device):
        y = ops.rms_norm(x, w, 1e-6)
        y2, s = ops.rms_norm(x, w, 1e-6, r)
    assert_close(y, ops.rms_norm_ref(x, w, 1e-6), dtype)
    y2_ref, s_ref = ops.rms_norm_ref(x, w, 1e-6, r)
    assert_close(y2, y2_ref, dtype)
    assert_close(s, s_ref, dtype)
    assert torch.equal(x, x0) and torch.equal(r, r0), "inputs must not be modified"


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("tokens,hidden", [(7, 769), (1025, 64), (2, 1024)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm(backend_name, device, dtype, tokens, hidden, with_bias):
    x, _, w, b = _inputs(tokens, hidden, dtype, device)
    x = x + 5  # a large mean: the variance must not be computed as E[x^2] - E[x]^2 in low precision
    b = b if with_bias else None
    with backend(backend_name, device):
        y = ops.layer_norm(x, w, b, 1e-6)
    assert_close(y, ops.layer_norm_ref(x, w, b, 1e-6), dtype)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_norms_keep_leading_dims(backend_name, device):
    x, _, w, b = _inputs(6, 40, torch.float32, device)
    x = x.view(2, 3, 40)
    with backend(backend_name, device):
        assert ops.rms_norm(x, w, 1e-6).shape == (2, 3, 40)
        assert ops.layer_norm(x, w, b, 1e-6).shape == (2, 3, 40)
