"""Tensor parallelism (docs/ARCHITECTURE.md, "Tensor parallelism"): the only package that imports torch.distributed.

- group.py:    TensorParallel, one engine's rank / size / process groups, how each dimension splits, the
               collectives the parallel layers (layers/linear.py) call, and the control channel; check_shardable.
- worker.py:   a worker rank's process: build its shard, then run every step the driver sends until told to stop.
- executor.py: the driver's side: start the workers (spawn, or torchrun's ranks), watch them, send each step, and
               ParallelRunner, the engine's runner that does all of this behind ModelRunner's interface.
"""
from .group import TensorParallel, check_shardable

__all__ = ["TensorParallel", "check_shardable"]
