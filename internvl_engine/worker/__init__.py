"""The device side, one floor below the engine (docs/ARCHITECTURE.md, "Floors"): what runs a step on a rank.

- step_input.py:  StepInput, one forward pass as plain data (what every rank receives)
- runner.py:      ModelRunner: the model, its KV pool, the forward (eager or CUDA graphs) and the sampler
- step_output.py: StepOutput, what a step hands back (tokens, logprobs, logits rows) in one device-to-host copy
- cuda_graphs.py: captured decode and vision graphs
- executor.py:    the driver's side of tensor parallelism (start, watch and drive the workers; ParallelRunner)
- loop.py:        a worker rank's process: build its shard, run what the driver sends until told to stop

A tensor-parallel worker imports this room, models, loader and config: never engine/.
"""
