"""What a model name stands for: a checkpoint directory, a hub id (downloaded once, with the `hub` extra) or
`random:<preset>`; the one resolution the engine, each tensor-parallel worker and `info --model` share."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .model import ModelConfig
from .presets import preset_config

RANDOM_PREFIX = "random:"


def resolve_checkpoint(model: str | os.PathLike) -> Path:
    """The local checkpoint directory `model` names; an `owner/name` that is not a local path is a hub id."""
    path = Path(model)
    if path.is_dir():
        return path
    if isinstance(model, str) and model.count("/") == 1 and not path.exists() and not model.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(f"{model!r} is not a local directory; downloading hub ids needs the `hub` extra "
                                  "(pip install 'internvl-engine[hub]')") from None
        try:
            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
        except Exception as e:  # network or repository errors, surfaced with the id
            raise CheckpointError(f"cannot download {model!r} from the hub: {e}") from None
    raise CheckpointError(f"{model}: checkpoint directory not found")


def load_model_config(model: str | os.PathLike) -> tuple[ModelConfig, Path | None]:
    """(the model's config, its checkpoint directory), or (the preset's config, None) for `random:<preset>`, whose
    weights the loader draws from a seed."""
    if isinstance(model, str) and model.startswith(RANDOM_PREFIX):
        return ModelConfig.from_dict(preset_config(model[len(RANDOM_PREFIX):]), model), None
    checkpoint = resolve_checkpoint(model)
    return ModelConfig.from_pretrained(checkpoint), checkpoint
