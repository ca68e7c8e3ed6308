"""rotary (NeoX rotate-half, in place) on every backend against ops.rotary_ref, through strided q/k views."""
import pytest
import torch

from internvl_engine import ops
from internvl_engine.layers.rotary import RotaryEmbedding
from kernel_cases import BACKENDS, DTYPES, assert_close, backend, packed_qkv


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(7, 6, 1, 64), (1025, 14, 2, 64), (13, 7, 7, 128),
                                                            (5, 4, 2, 16)])
def test_rotary(backend_name, device, dtype, tokens, heads, kv_heads, head_dim):
    table = RotaryEmbedding(head_dim, 1e6, 4096).table(device)
    q, k, v = packed_qkv(tokens, heads, kv_heads, head_dim, dtype, device)
    pos = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(3)).to(device)
    q_ref, k_ref, v0 = q.clone(), k.clone(), v.clone()
    ops.rotary_ref(q_ref, k_ref, pos, table)
    with backend(backend_name, device):
        q_out, k_out = ops.rotary(q, k, pos, table)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr(), "rotary works in place"
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)
    assert torch.equal(v, v0), "v, beside k in the packed tensor, must be untouched"
