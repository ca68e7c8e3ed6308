"""What the linear methods (awq.py, fp8.py) share."""
from __future__ import annotations

import torch
from torch import nn

# the float dtypes producers store scales and biases in (AWQ scales: fp16; FP8 weight_scale: the model dtype);
# they are cast on the way, exactly (scales are kept in float32)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def param(shape, dtype) -> nn.Parameter:
    """A format's tensor, on the device the model is built on (the meta device, in the loader)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
