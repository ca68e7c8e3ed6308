"""rms_norm (with the fused residual add) and layer_norm on every backend against fp64 formulas written here. Not
against ops.rms_norm_ref / layer_norm_ref: the torch backend's rms_norm is rms_norm_ref, and its fp32 layer_norm
the same F.layer_norm call as layer_norm_ref, so those cases compared a function with itself."""
import pytest
import torch

from internvl_engine import ops
from kernel_cases import BACKENDS, DTYPES, assert_close, backend


def _rms_norm64(x, weight, eps, residual=None):
    """In fp64 throughout. With a residual, the sum rounded to x's dtype is part of the contract (it is returned,
    and it is what gets normalised), so that one rounding is kept."""
    if residual is not None:
        s = (x.double() + residual.double()).to(x.dtype)
        return _rms_norm64(s, weight, eps), s
    xd = x.double()
    return weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)


def _layer_norm64(x, weight, bias, eps):
    xd = x.double()
    xc = xd - xd.mean(-1, keepdim=True)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return y if bias is None else y + bias.double()


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
    assert_close(y, _rms_norm64(x, w, 1e-6), dtype)
    y2_ref, s_ref = _rms_norm64(x, w, 1e-6, r)
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
    assert_close(y, _layer_norm64(x, w, b, 1e-6), dtype)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_norms_where_eps_matters(backend_name, device):
    """Rows whose mean square (variance) is about eps: in the cases above eps is far below every tolerance, so a
    backend that dropped or misplaced it would pass them."""
    x, r, w, b = _inputs(7, 769, torch.float32, device)
    x, r = x * 3e-4, r * 1e-3
    with backend(backend_name, device):
        y = ops.rms_norm(x, w, 1e-6)
        y2, s = ops.rms_norm(x, w, 1e-6, r)
        z = ops.layer_norm(x, w, b, 1e-6)
    assert_close(y, _rms_norm64(x, w, 1e-6), torch.float32)
    y2_ref, s_ref = _rms_norm64(x, w, 1e-6, r)
    assert_close(y2, y2_ref, torch.float32)
    assert_close(s, s_ref, torch.float32)
    assert_close(z, _layer_norm64(x, w, b, 1e-6), torch.float32)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_norms_keep_leading_dims(backend_name, device):
    x, _, w, b = _inputs(6, 40, torch.float32, device)
    x = x.view(2, 3, 40)
    with backend(backend_name, device):
        assert ops.rms_norm(x, w, 1e-6).shape == (2, 3, 40)
        assert ops.layer_norm(x, w, b, 1e-6).shape == (2, 3, 40)
