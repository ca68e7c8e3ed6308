import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the triton backend runs through Triton's interpreter; @triton.jit reads this when a kernel module
# is imported, so it is set before any test imports one.
if not os.environ.get("TRITON_INTERPRET"):
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """variant -> (checkpoint dir written by transformers, the transformers model), built once per session."""
    from checkpoints import build_hf_checkpoint

    built = {}

    def get(variant: str, **config_kw):
        key = (variant, tuple(sorted(config_kw.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"hf-{variant}")
            built[key] = (path, build_hf_checkpoint(path, variant, **config_kw))
        return built[key]

    return get
