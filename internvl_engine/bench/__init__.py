"""The benchmark harness behind benchmarks/*.py and `internvl-engine bench`: run metadata and measured device peaks
(common), the physical floors of each stage from the model's shape (floors), and the end-to-end harness (e2e).
transformers is imported only for `--baseline hf` (a test/benchmark dependency, never the engine's)."""
