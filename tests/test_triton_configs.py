"""Each config of the autotuned Triton kernels, forced one at a time (kernels/_tuning.py, `use_config`), against the
same oracles and tolerance rules as the family tests: on a GPU the autotuner may pick any config for any shape,
while the family tests there run pinned to configs[0] (gpu_check.sh) so as not to tune every shape they try.
Under the interpreter, configs that differ only in warps or pipeline stages are one program and run once."""
import os
import subprocess
import sys

import pytest

from internvl_engine.kernels import _tuning, flash_attention, fused_moe, paged_attention
from kernel_cases import DTYPES
import test_flash_attention
import test_fused_moe
import test_paged_attention

def _indices(configs):
    """All configs on a GPU; on the CPU the first of each distinct set of block sizes."""
    seen, cpu = set(), []
    for i, c in enumerate(configs):
        key = tuple(sorted(c.kwargs.items()))
        if key not in seen:
            seen.add(key)
            cpu.append(i)
    return range(len(configs)), cpu


def _cases(configs):
    gpu, cpu = _indices(configs)
    return ([pytest.param("cpu", i, id=f"cpu-config{i}") for i in cpu]
            + [pytest.param("cuda", i, id=f"cuda-config{i}", marks=pytest.mark.gpu) for i in gpu])


@pytest.mark.parametrize("device,index", _cases(flash_attention._CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,seqs,causal", [(14, 2, 128, "varlen", True),
                                                                 (4, 4, 64, "varlen", False),
                                                                 (7, 1, 128, "prefix", True)])
def test_flash_attention_config(device, index, dtype, heads, kv_heads, head_dim, seqs, causal):
    with _tuning.use_config(index):
        test_flash_attention._run("triton", device, dtype, seqs, heads, kv_heads, head_dim, causal)


@pytest.mark.parametrize("device,index", _cases(paged_attention._CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(14, 2, 64, 16), (7, 1, 128, 32)])
def test_paged_attention_config(device, index, dtype, heads, kv_heads, head_dim, block_size):
    with _tuning.use_config(index):
        test_paged_attention._run("triton", device, dtype, heads, kv_heads, head_dim, block_size, [37, 1, 300])


@pytest.mark.parametrize("device,index", _cases(fused_moe._CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [test_fused_moe.CASES[3], test_fused_moe.CASES[7]], ids=["rows16", "rows64"])
def test_fused_moe_config(device, index, dtype, case):
    with _tuning.use_config(index):
        test_fused_moe._run("triton", device, dtype, *case)


def test_use_config_nests_and_restores():
    before = _tuning._forced
    with _tuning.use_config(3):
        assert _tuning._forced == 3
        with _tuning.use_config(None):
            assert _tuning._forced is None
        assert _tuning._forced == 3
    assert _tuning._forced == before


def test_environment_forces_a_config():
    code = "from internvl_engine.kernels import _tuning; print(_tuning._forced)"
    env = {**os.environ, "INTERNVL_ENGINE_TRITON_CONFIG": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"


def test_a_forced_index_past_the_configs_is_a_clear_error(monkeypatch):
    import torch
    from kernel_cases import packed_qkv
    q, k, v = packed_qkv(4, 2, 2, 16, torch.float32, "cpu")
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with _tuning.use_config(len(paged_attention._CONFIGS) + len(flash_attention._CONFIGS)):
        with pytest.raises(ValueError, match="forced Triton config"):
            flash_attention.flash_attention(q, k, v, cu, cu, 4, 4, True, 0.25)
