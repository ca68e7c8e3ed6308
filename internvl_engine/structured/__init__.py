"""Structured outputs: a request's StructuredOutputsParams compiled to a grammar (llguidance), a matcher per sampled
sequence, and each step's token bitmask, filled on a worker thread while the step's forward runs and applied by
the Sampler (sampling.py). See manager.py for the step's timeline and grammar.py for the compilation."""
from .grammar import GrammarCompiler
from .manager import StructuredOutputs

__all__ = ["GrammarCompiler", "StructuredOutputs"]
