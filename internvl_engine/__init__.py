"""internvl-engine: fast, faithful inference for InternVL3, 3.5 and 2.5 (InternViT + pixel shuffle + MLP projector +
a Qwen2.5, Llama / InternLM or Qwen3 decoder)."""
from ._version import __version__

from .errors import (BackendError, CheckpointError, ImageError, InternVLEngineError, KernelInputError, PromptError,
                     SamplingParamsError, StructuredOutputError, UnsupportedModelError, VideoError)
from .engine.async_llm import AsyncLLM
from .engine.llm_engine import LLMEngine
from .llm import LLM
from .outputs import RequestMetrics, RequestOutput
from .processor import Processor
from .sampling import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "LLMEngine", "AsyncLLM", "SamplingParams", "StructuredOutputsParams", "Processor", "RequestOutput",
           "RequestMetrics", "InternVLEngineError", "CheckpointError", "UnsupportedModelError", "ImageError",
           "VideoError", "PromptError", "SamplingParamsError", "StructuredOutputError", "BackendError",
           "KernelInputError", "__version__"]
