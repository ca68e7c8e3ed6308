import os
import shutil
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


# Disk: the suite writes ~20 GB of random checkpoints (CI's disk once filled up under it). pyproject's
# tmp_path_retention_policy = "failed" drops each passing test's tmp_path at its teardown; the module-scoped
# checkpoints that tmp_path_factory makes are dropped here when their module ends. Session fixtures name their
# directories with SESSION_PREFIX so the sweep leaves them for later modules.
SESSION_PREFIX = "session-"


@pytest.fixture(scope="module", autouse=True)
def _sweep_module_tmp_dirs(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for path in set(base.iterdir()) - before:
        if path.is_dir() and not path.name.startswith(SESSION_PREFIX):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """variant -> (checkpoint dir written by transformers, the transformers model), built once per session."""
    from checkpoints import build_hf_checkpoint

    built = {}

    def get(variant: str, **config_kw):
        key = (variant, tuple(sorted(config_kw.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"{SESSION_PREFIX}hf-{variant}")
            built[key] = (path, build_hf_checkpoint(path, variant, **config_kw))
        return built[key]

    return get
