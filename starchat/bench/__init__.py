"""Benchmarks shipped with the package (`starchat bench ...`): random checkpoints of named shapes,
our engine and HF transformers measured in the same run, achieved bandwidth beside the floor."""
