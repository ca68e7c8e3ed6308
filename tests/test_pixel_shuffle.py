"""pixel_shuffle on every backend: an exact copy, equal to the spec's closed form. The torch backend is
ops.pixel_shuffle_ref itself, so the backends are checked against a closed form written here instead (the torch
cases then test the reference)."""
import pytest
import torch

from internvl_engine import ops
from kernel_cases import BACKENDS, DTYPES, backend


def _closed_form(features, scale):
    """Output position (i, j) of the (S/r)^2 grid concatenates grid[r*i + di, r*j + dj] over (di, dj) in row-major
    order, r = 1/scale: strided slices here, where the reference reshapes and permutes."""
    n, hw, c = features.shape
    s, r = round(hw ** 0.5), round(1 / scale)
    grid = features.view(n, s, s, c)
    parts = [grid[:, di::r, dj::r] for di in range(r) for dj in range(r)]  # each [n, S/r, S/r, c]
    return torch.cat(parts, dim=-1).reshape(n, (s // r) ** 2, c * r * r)


def test_reference_closed_form():
    f = torch.randn(2, 32 * 32, 5)
    out = ops.pixel_shuffle_ref(f, 0.5)
    grid = f.view(2, 32, 32, 5)
    i, j = 3, 11
    expected = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                          grid[:, 2 * i + 1, 2 * j + 1]], dim=-1)
    assert out.shape == (2, 256, 20)
    assert torch.equal(out[:, i * 16 + j], expected)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles,side,channels,scale", [(3, 32, 24, 0.5), (1, 4, 769, 0.5), (2, 6, 7, 1 / 3),
                                                       (1, 32, 1024, 0.5)])
def test_pixel_shuffle(backend_name, device, dtype, tiles, side, channels, scale):
    f = torch.randn(tiles, side * side, channels).to(dtype).to(device)
    with backend(backend_name, device):
        out = ops.pixel_shuffle(f, scale)
    assert torch.equal(out, _closed_form(f, scale))
