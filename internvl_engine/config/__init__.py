"""Everything a checkpoint's config.json says, and where a model's files are:
  model.py    config.json / generation_config.json -> ModelConfig (both InternVL formats, every value checked)
  quant.py    its quantization block -> QuantConfig (quant/ turns it into the layers' linear methods)
  presets.py  the config.json of each random:<preset> model
  resolve.py  model name -> (ModelConfig, checkpoint directory or None): load_model_config
Plain data over JSON: nothing here imports torch or a room above errors and constants."""
from .model import CONFIG_LIMITS, ModelConfig, TextConfig, VisionConfig, read_json
from .quant import QuantConfig
from .presets import PRESETS, QUANT_BLOCKS, preset_config, preset_names, split_preset
from .resolve import RANDOM_PREFIX, load_model_config, resolve_checkpoint

__all__ = ["CONFIG_LIMITS", "ModelConfig", "TextConfig", "VisionConfig", "read_json", "QuantConfig", "PRESETS",
           "QUANT_BLOCKS", "preset_config", "preset_names", "split_preset", "RANDOM_PREFIX", "load_model_config",
           "resolve_checkpoint"]
