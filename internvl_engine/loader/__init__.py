"""Where a model's weights come from (docs/ARCHITECTURE.md, "Floors"):
  checkpoint.py   load_model: a checkpoint's tensors (this rank's slices under tensor parallelism), every one
                  checked against the model on the meta device before anything is allocated; or seeded weights
  names.py        checkpoint keys <-> parameter names in the three InternVL layouts, and back to -hf
  files.py        the weight files: safetensors (single or sharded), else tensors-only pickle `.bin`
  random_init.py  seeded weights of random:<preset> models and the checkpoints written from them
  convert.py      `.bin` -> safetensors, once (`internvl-engine convert`)"""
from .checkpoint import load_model
from .convert import convert_bin_to_safetensors
from .files import checkpoint_files
from .names import PACKED, export_hf_state_dict
from .random_init import init_random_, write_checkpoint

__all__ = ["load_model", "convert_bin_to_safetensors", "checkpoint_files", "PACKED", "export_hf_state_dict",
           "init_random_", "write_checkpoint"]
